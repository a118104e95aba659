//! `mychat-cli`: a scriptable MyChat client.
//!
//! Each command connects, logs in as `--user` (on `--platform`, as `--device`), does
//! its work and exits; a failed command exits 1 and prints the server's error name and
//! message on stderr. The device id defaults to one kept per (user, platform) in the
//! state directory ($MYCHAT_CLI_HOME, else $XDG_STATE_HOME/mychat-cli, else
//! ~/.local/state/mychat-cli), so repeated runs are the same device and `recv` resumes
//! where the last run stopped.
use clap::{Parser, Subcommand};
use mychat_client::proto as pb;
use mychat_client::{Client, ClientError, ConnectOptions, Event, Session, SessionOptions};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "mychat-cli", version, about = "MyChat command-line client")]
struct Cli {
    /// Server address.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:7100",
        env = "MYCHAT_SERVER"
    )]
    server: String,
    /// Username to log in as.
    #[arg(long, global = true, env = "MYCHAT_USER")]
    user: Option<String>,
    /// Password.
    #[arg(long, global = true, env = "MYCHAT_PASSWORD")]
    password: Option<String>,
    /// desktop, mobile, web or tablet.
    #[arg(long, global = true, default_value = "desktop")]
    platform: String,
    /// Device id (default: one kept per user and platform in the state directory).
    #[arg(long, global = true)]
    device: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an account.
    Register { username: String, password: String },
    /// Send a text message to a user.
    Send {
        to: String,
        text: String,
        #[arg(long)]
        json: bool,
    },
    /// Print what was missed, then messages as they arrive.
    Recv {
        /// Exit after this many seconds without a new message.
        #[arg(long)]
        wait: Option<f64>,
        #[arg(long)]
        json: bool,
    },
    /// Messages exchanged with a user, oldest first.
    History {
        peer: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Conversations, most recent first, with unread counts.
    Conversations {
        #[arg(long)]
        json: bool,
    },
    /// Interactive chat with a user: type a line to send it; Ctrl-D to quit.
    Chat { peer: String },
}

fn state_dir() -> PathBuf {
    if let Ok(d) = std::env::var("MYCHAT_CLI_HOME") {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("XDG_STATE_HOME") {
        return PathBuf::from(d).join("mychat-cli");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".local/state/mychat-cli")
}

/// The stored device id for (user, platform), created on first use.
fn device_id(user: &str, platform: &str) -> anyhow::Result<String> {
    let dir = state_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("devices.json");
    let mut map: HashMap<String, String> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let key = format!("{user}/{platform}");
    if let Some(d) = map.get(&key) {
        return Ok(d.clone());
    }
    let id = format!("cli-{platform}-{:016x}", rand::random::<u64>());
    map.insert(key, id.clone());
    let tmp = dir.join("devices.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&map)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

fn platform(name: &str) -> anyhow::Result<pb::Platform> {
    Ok(match name {
        "desktop" => pb::Platform::Desktop,
        "mobile" => pb::Platform::Mobile,
        "web" => pb::Platform::Web,
        "tablet" => pb::Platform::Tablet,
        other => anyhow::bail!("unknown platform {other:?}: desktop, mobile, web or tablet"),
    })
}

struct Names<'a> {
    client: &'a Client,
    cache: HashMap<u64, String>,
}

impl<'a> Names<'a> {
    async fn name(&mut self, id: u64) -> String {
        if let Some(n) = self.cache.get(&id) {
            return n.clone();
        }
        let n = match self.client.get_users(vec![id], vec![]).await {
            Ok(u) if !u.is_empty() => u[0].username.clone(),
            _ => format!("#{id}"),
        };
        self.cache.insert(id, n.clone());
        n
    }
}

async fn print_message(names: &mut Names<'_>, m: &pb::Message, json: bool) {
    let from = names.name(m.sender_id).await;
    let to = names.name(m.recipient_id).await;
    if json {
        let v = serde_json::json!({
            "id": m.id, "conversation": m.conversation_id, "seq": m.seq,
            "from": from, "to": to, "text": m.text, "time": m.time_ms,
            "kind": pb::MessageKind::try_from(m.kind).map(|k| k.as_str_name()).unwrap_or("UNKNOWN"),
        });
        println!("{v}");
    } else {
        println!(
            "[{}] #{} {} -> {}: {}",
            fmt_time(m.time_ms),
            m.seq,
            from,
            to,
            m.text
        );
    }
    let _ = std::io::stdout().flush();
}

fn fmt_time(ms: i64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}Z")
}

fn need(v: &Option<String>, what: &str) -> anyhow::Result<String> {
    v.clone()
        .ok_or_else(|| anyhow::anyhow!("--{what} is required for this command"))
}

struct Login {
    user: String,
    password: String,
    device: String,
    platform: pb::Platform,
}

impl Cli {
    fn login(&self) -> anyhow::Result<Login> {
        let user = need(&self.user, "user")?;
        let password = need(&self.password, "password")?;
        let device = match &self.device {
            Some(d) => d.clone(),
            None => device_id(&user, &self.platform)?,
        };
        Ok(Login {
            user,
            password,
            device,
            platform: platform(&self.platform)?,
        })
    }

    async fn connect(&self) -> Result<Client, ClientError> {
        Client::connect(&self.server).await
    }

    async fn logged_in(&self) -> anyhow::Result<(Client, u64)> {
        let l = self.login()?;
        let c = self.connect().await?;
        let r = c
            .login_password(&l.user, &l.password, &l.device, l.platform)
            .await?;
        Ok((c, r.user_id))
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        Cmd::Register { username, password } => {
            let c = cli.connect().await?;
            let id = c.register(username, password).await?;
            println!("registered {username} (user id {id})");
        }
        Cmd::Send { to, text, json } => {
            let (c, _) = cli.logged_in().await?;
            let to_id = c.user_id(to).await?;
            let ack = c.send_text(to_id, text).await?;
            if *json {
                println!(
                    "{}",
                    serde_json::json!({"id": ack.message_id, "conversation": ack.conversation_id, "seq": ack.seq, "time": ack.time_ms})
                );
            } else {
                println!(
                    "sent to {to}: id {} conversation {} seq {}",
                    ack.message_id, ack.conversation_id, ack.seq
                );
            }
        }
        Cmd::Recv { wait, json } => {
            let l = cli.login()?;
            let mut s = Session::start(SessionOptions {
                addr: cli.server.clone(),
                username: l.user,
                password: l.password,
                device_id: l.device,
                platform: l.platform,
                connect: ConnectOptions::default(),
                reconnect_for: Duration::from_secs(3600),
            })
            .await?;
            let wait = wait.map(Duration::from_secs_f64);
            loop {
                let ev = tokio::select! {
                    e = s.next_event(wait) => e?,
                    _ = tokio::signal::ctrl_c() => None,
                };
                let Some(ev) = ev else { break };
                if let Event::Message(m) = ev {
                    let c = s.client().ok_or(ClientError::Disconnected)?;
                    let mut names = Names {
                        client: &c,
                        cache: HashMap::new(),
                    };
                    print_message(&mut names, &m, *json).await;
                    if m.sender_id != s.user_id {
                        let _ = c.delivered(m.conversation_id, m.seq).await;
                    }
                }
            }
            let _ = s.ack().await;
        }
        Cmd::History { peer, limit, json } => {
            let (c, _) = cli.logged_in().await?;
            let peer_id = c.user_id(peer).await?;
            let r = c
                .history(pb::HistoryRequest {
                    conversation_id: 0,
                    peer_user_id: peer_id,
                    before_seq: 0,
                    limit: *limit,
                })
                .await?;
            let mut names = Names {
                client: &c,
                cache: HashMap::new(),
            };
            for m in &r.messages {
                print_message(&mut names, m, *json).await;
            }
        }
        Cmd::Conversations { json } => {
            let (c, _) = cli.logged_in().await?;
            let mut names = Names {
                client: &c,
                cache: HashMap::new(),
            };
            let mut offset = 0;
            loop {
                let r = c.conversations(offset, 0).await?;
                for cv in &r.conversations {
                    let peer = names.name(cv.peer_user_id).await;
                    let last = cv
                        .last_message
                        .as_ref()
                        .map(|m| m.text.clone())
                        .unwrap_or_default();
                    if *json {
                        println!(
                            "{}",
                            serde_json::json!({"conversation": cv.id, "peer": peer, "last_seq": cv.last_seq, "read_seq": cv.read_seq, "unread": cv.unread, "last_text": last, "last_time": cv.last_message.as_ref().map(|m| m.time_ms)})
                        );
                    } else {
                        println!(
                            "{peer}: {} unread, last #{}: {last}",
                            cv.unread, cv.last_seq
                        );
                    }
                }
                offset += r.conversations.len() as u32;
                if !r.has_more || r.conversations.is_empty() {
                    break;
                }
            }
        }
        Cmd::Chat { peer } => {
            let l = cli.login()?;
            let mut s = Session::start(SessionOptions {
                addr: cli.server.clone(),
                username: l.user.clone(),
                password: l.password,
                device_id: l.device,
                platform: l.platform,
                connect: ConnectOptions::default(),
                reconnect_for: Duration::from_secs(3600),
            })
            .await?;
            let c = s.client().ok_or(ClientError::Disconnected)?;
            let peer_id = c.user_id(peer).await?;
            eprintln!(
                "chatting with {peer} as {}; type a line to send, Ctrl-D to quit",
                l.user
            );
            let (line_tx, mut line_rx) = tokio::sync::mpsc::channel::<String>(16);
            std::thread::spawn(move || {
                let stdin = std::io::stdin();
                let mut line = String::new();
                while stdin.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    if line_tx.blocking_send(line.trim_end().to_string()).is_err() {
                        return;
                    }
                    line.clear();
                }
            });
            loop {
                tokio::select! {
                    line = line_rx.recv() => {
                        let Some(line) = line else { break };
                        if line.is_empty() { continue; }
                        let c = s.client().ok_or(ClientError::Disconnected)?;
                        if let Err(e) = c.send_text(peer_id, &line).await {
                            eprintln!("not sent: {e}");
                        }
                    }
                    ev = s.next_event(Some(Duration::from_millis(500))) => {
                        if let Some(Event::Message(m)) = ev? {
                            if m.sender_id == peer_id || m.recipient_id == peer_id {
                                let c = s.client().ok_or(ClientError::Disconnected)?;
                                let mut names = Names { client: &c, cache: HashMap::new() };
                                print_message(&mut names, &m, false).await;
                                if m.sender_id == peer_id {
                                    let _ = c.read(m.conversation_id, m.seq).await;
                                }
                            }
                        }
                    }
                }
            }
            let _ = s.ack().await;
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run(cli)) {
        match e.downcast_ref::<ClientError>() {
            Some(ClientError::Server {
                code,
                raw_code,
                message,
            }) => {
                eprintln!(
                    "error: {} ({raw_code}): {message}",
                    code.map(|c| c.name()).unwrap_or("UNKNOWN")
                );
            }
            _ => eprintln!("error: {e}"),
        }
        std::process::exit(1);
    }
}

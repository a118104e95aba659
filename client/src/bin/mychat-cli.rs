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
use mychat_client::{
    Client, ClientError, ConnectOptions, Event, Session, SessionOptions, TlsOptions,
};
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
    /// Print results as JSON, one object per line.
    #[arg(long, global = true)]
    json: bool,
    /// Connect with TLS (to the server's tls.listen address).
    #[arg(long, global = true, env = "MYCHAT_TLS")]
    tls: bool,
    /// PEM file of the CA that signed the server's certificate (with --tls; default:
    /// the system's bundle).
    #[arg(long, global = true, env = "MYCHAT_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// The name the server's certificate must carry (with --tls; default: the host of
    /// --server).
    #[arg(long, global = true)]
    tls_name: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an account.
    Register { username: String, password: String },
    /// Send a text message to a user.
    Send { to: String, text: String },
    /// Print what was missed, then messages as they arrive.
    Recv {
        /// Exit after this many seconds without a new message.
        #[arg(long)]
        wait: Option<f64>,
    },
    /// Messages exchanged with a user, oldest first.
    History {
        peer: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Conversations, most recent first, with unread counts.
    Conversations {},
    /// Interactive chat with a user: type a line to send it; Ctrl-D to quit.
    Chat { peer: String },
    /// Friend requests and friendship.
    Friend {
        #[command(subcommand)]
        cmd: FriendCmd,
    },
    /// Your friends, with presence.
    Friends {},
    /// Block a user: they can neither message nor befriend you.
    Block {
        #[arg(value_name = "USER")]
        who: String,
    },
    /// Unblock a user.
    Unblock {
        #[arg(value_name = "USER")]
        who: String,
    },
    /// Groups.
    Group {
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// Your groups.
    Groups {},
    /// Recall a message you sent (within the server's recall window).
    Recall { message_id: u64 },
    /// Presence of users.
    Presence {
        #[arg(value_name = "USER")]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum FriendCmd {
    /// Ask a user to be friends.
    Add {
        #[arg(value_name = "USER")]
        who: String,
        #[arg(long, default_value = "")]
        message: String,
    },
    /// Accept a user's friend request.
    Accept {
        #[arg(value_name = "USER")]
        who: String,
    },
    /// Reject a user's friend request.
    Reject {
        #[arg(value_name = "USER")]
        who: String,
    },
    /// End a friendship.
    Remove {
        #[arg(value_name = "USER")]
        who: String,
    },
    /// Pending requests, to and from you.
    Requests {},
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Create a group with these members; prints its group_id.
    Create {
        name: String,
        members: Vec<String>,
        /// Anyone may join without approval.
        #[arg(long)]
        open: bool,
    },
    /// Send a text to a group.
    Send { group_id: u64, text: String },
    /// The group's members.
    Members { group_id: u64 },
    /// Add a user to the group.
    Invite {
        group_id: u64,
        #[arg(value_name = "USER")]
        who: String,
    },
    /// Remove a user from the group.
    Kick {
        group_id: u64,
        #[arg(value_name = "USER")]
        who: String,
    },
    /// Leave the group.
    Leave { group_id: u64 },
    /// Mute a member for SECS seconds (0 unmutes).
    Mute {
        group_id: u64,
        #[arg(value_name = "USER")]
        who: String,
        secs: u32,
    },
    /// Join a group (or ask to, when it needs approval).
    Join {
        group_id: u64,
        #[arg(long, default_value = "")]
        message: String,
    },
    /// Messages of a group, oldest first.
    History {
        group_id: u64,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
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

/// Writes a state file atomically (a temporary file named for this process, then a
/// rename), so concurrent runs never see half a file.
fn write_state(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The stored device id for (user, platform), created on first use: one file per
/// user and platform under `devices/`.
fn device_id(user: &str, platform: &str) -> anyhow::Result<String> {
    let path = state_dir()
        .join("devices")
        .join(format!("{user}@{platform}"));
    if let Ok(d) = std::fs::read_to_string(&path) {
        let d = d.trim().to_string();
        if !d.is_empty() {
            return Ok(d);
        }
    }
    let id = format!("cli-{platform}-{:016x}", rand::random::<u64>());
    write_state(&path, &id)?;
    Ok(id)
}

/// The last seq this device holds per group, kept in the state directory like a
/// real client's local store (`groups/<user>@<platform>.json`).
fn load_group_cursors(key: &str) -> HashMap<u64, u64> {
    let path = state_dir().join("groups").join(format!("{key}.json"));
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

fn save_group_cursors(key: &str, cursors: &HashMap<u64, u64>) -> anyhow::Result<()> {
    let path = state_dir().join("groups").join(format!("{key}.json"));
    write_state(&path, &serde_json::to_string(cursors)?)
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
    let to = if m.group_id == 0 {
        Some(names.name(m.recipient_id).await)
    } else {
        None
    };
    let text = if m.recalled {
        "(recalled)".to_string()
    } else {
        m.text.clone()
    };
    if json {
        let mut v = serde_json::json!({
            "id": m.id, "conversation": m.conversation_id, "seq": m.seq,
            "from": from, "to": to, "text": text, "time": m.time_ms,
            "kind": pb::MessageKind::try_from(m.kind).map(|k| k.as_str_name()).unwrap_or("UNKNOWN"),
        });
        if m.group_id != 0 {
            v["group"] = m.group_id.into();
        }
        if m.recalled {
            v["recalled"] = true.into();
        }
        println!("{v}");
    } else {
        let to = to.unwrap_or_else(|| format!("group {}", m.group_id));
        println!(
            "[{}] #{} {} -> {}: {}",
            fmt_time(m.time_ms),
            m.seq,
            from,
            to,
            text
        );
    }
    let _ = std::io::stdout().flush();
}

fn fmt_time(ms: i64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}Z")
}

/// Prints a result: the JSON object with --json, else the sentence.
fn say(json: bool, v: serde_json::Value, text: String) {
    if json {
        println!("{v}");
    } else {
        println!("{text}");
    }
}

fn presence_name(p: i32) -> &'static str {
    match pb::PresenceStatus::try_from(p) {
        Ok(pb::PresenceStatus::Online) => "online",
        Ok(pb::PresenceStatus::Away) => "away",
        _ => "offline",
    }
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

    fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            tls: (self.tls || self.ca_file.is_some()).then(|| TlsOptions {
                ca_file: self.ca_file.clone(),
                server_name: self.tls_name.clone(),
            }),
            ..ConnectOptions::default()
        }
    }

    async fn connect(&self) -> Result<Client, ClientError> {
        Client::connect_with(&self.server, self.connect_options()).await
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
    let json = cli.json;
    match &cli.cmd {
        Cmd::Register { username, password } => {
            let c = cli.connect().await?;
            let id = c.register(username, password).await?;
            say(
                json,
                serde_json::json!({"user": username, "id": id}),
                format!("registered {username} (user id {id})"),
            );
        }
        Cmd::Send { to, text } => {
            let (c, _) = cli.logged_in().await?;
            let to_id = c.user_id(to).await?;
            let ack = c.send_text(to_id, text).await?;
            if json {
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
        Cmd::Recv { wait } => {
            let l = cli.login()?;
            let key = format!("{}@{}", l.user, cli.platform);
            let mut s = Session::start(SessionOptions {
                addr: cli.server.clone(),
                username: l.user,
                password: l.password,
                device_id: l.device,
                platform: l.platform,
                connect: cli.connect_options(),
                reconnect_for: Duration::from_secs(3600),
                group_cursors: load_group_cursors(&key),
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
                    print_message(&mut names, &m, json).await;
                    if m.sender_id != s.user_id {
                        let _ = c.delivered(m.conversation_id, m.seq).await;
                    }
                }
            }
            let _ = s.ack().await;
            save_group_cursors(&key, s.group_cursors())?;
        }
        Cmd::History { peer, limit } => {
            let (c, _) = cli.logged_in().await?;
            let peer_id = c.user_id(peer).await?;
            let r = c
                .history(pb::HistoryRequest {
                    peer_user_id: peer_id,
                    limit: *limit,
                    ..Default::default()
                })
                .await?;
            let mut names = Names {
                client: &c,
                cache: HashMap::new(),
            };
            for m in &r.messages {
                print_message(&mut names, m, json).await;
            }
        }
        Cmd::Conversations {} => {
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
                    if json {
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
                connect: cli.connect_options(),
                reconnect_for: Duration::from_secs(3600),
                group_cursors: load_group_cursors(&format!("{}@{}", l.user, cli.platform)),
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
                                print_message(&mut names, &m, json).await;
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
        Cmd::Friend { cmd } => {
            let (c, _) = cli.logged_in().await?;
            match cmd {
                FriendCmd::Add { who: user, message } => {
                    let id = c.user_id(user).await?;
                    if c.friend_request(id, message).await? {
                        say(
                            json,
                            serde_json::json!({"user": user, "friends": true}),
                            format!("{user} had asked you: you are now friends"),
                        );
                    } else {
                        say(
                            json,
                            serde_json::json!({"user": user, "friends": false, "requested": true}),
                            format!("friend request sent to {user}"),
                        );
                    }
                }
                FriendCmd::Accept { who: user } => {
                    c.friend_accept(c.user_id(user).await?).await?;
                    say(
                        json,
                        serde_json::json!({"user": user, "friends": true}),
                        format!("you and {user} are now friends"),
                    );
                }
                FriendCmd::Reject { who: user } => {
                    c.friend_reject(c.user_id(user).await?).await?;
                    say(
                        json,
                        serde_json::json!({"user": user, "rejected": true}),
                        format!("rejected {user}'s request"),
                    );
                }
                FriendCmd::Remove { who: user } => {
                    c.friend_remove(c.user_id(user).await?).await?;
                    say(
                        json,
                        serde_json::json!({"user": user, "friends": false}),
                        format!("removed {user} from your friends"),
                    );
                }
                FriendCmd::Requests {} => {
                    for r in c.friend_requests().await? {
                        let name = r.user.map(|u| u.username).unwrap_or_default();
                        if json {
                            println!(
                                "{}",
                                serde_json::json!({"user": name, "message": r.message, "time": r.time_ms, "incoming": r.incoming})
                            );
                        } else if r.incoming {
                            println!("from {name}: {}", r.message);
                        } else {
                            println!("to {name}: {}", r.message);
                        }
                    }
                }
            }
        }
        Cmd::Friends {} => {
            let (c, _) = cli.logged_in().await?;
            let mut offset = 0;
            loop {
                let r = c.friends(offset, 0).await?;
                for f in &r.friends {
                    let u = f.user.clone().unwrap_or_default();
                    let status = presence_name(f.presence);
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"id": u.id, "username": u.username, "nickname": u.nickname, "remark": f.remark, "category": f.category_id, "presence": status, "last_seen": f.last_seen_ms})
                        );
                    } else {
                        println!("{} ({status})", u.username);
                    }
                }
                offset += r.friends.len() as u32;
                if !r.has_more || r.friends.is_empty() {
                    break;
                }
            }
        }
        Cmd::Block { who: user } => {
            let (c, _) = cli.logged_in().await?;
            c.block(c.user_id(user).await?).await?;
            say(
                json,
                serde_json::json!({"user": user, "blocked": true}),
                format!("blocked {user}"),
            );
        }
        Cmd::Unblock { who: user } => {
            let (c, _) = cli.logged_in().await?;
            c.unblock(c.user_id(user).await?).await?;
            say(
                json,
                serde_json::json!({"user": user, "blocked": false}),
                format!("unblocked {user}"),
            );
        }
        Cmd::Group { cmd } => {
            let (c, _) = cli.logged_in().await?;
            match cmd {
                GroupCmd::Create {
                    name,
                    members,
                    open,
                } => {
                    let mut ids = Vec::new();
                    for m in members {
                        ids.push(c.user_id(m).await?);
                    }
                    let policy = if *open {
                        pb::JoinPolicy::Open
                    } else {
                        pb::JoinPolicy::Approval
                    };
                    let g = c.group_create(name, ids, policy).await?;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"group_id": g.id, "conversation": g.conversation_id, "name": g.name, "members": g.member_count})
                        );
                    } else {
                        println!("group_id {}", g.id);
                    }
                }
                GroupCmd::Send { group_id, text } => {
                    let ack = c.send_group_text(*group_id, text).await?;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"id": ack.message_id, "conversation": ack.conversation_id, "seq": ack.seq, "time": ack.time_ms, "group": group_id})
                        );
                    } else {
                        println!(
                            "sent to group {group_id}: id {} seq {}",
                            ack.message_id, ack.seq
                        );
                    }
                }
                GroupCmd::Members { group_id } => {
                    let mut names = Names {
                        client: &c,
                        cache: HashMap::new(),
                    };
                    let mut offset = 0;
                    loop {
                        let r = c.group_members(*group_id, offset, 0).await?;
                        for m in &r.members {
                            let name = names.name(m.user_id).await;
                            let role = pb::GroupRole::try_from(m.role)
                                .map(|r| r.as_str_name())
                                .unwrap_or("MEMBER");
                            if json {
                                println!(
                                    "{}",
                                    serde_json::json!({"user": name, "id": m.user_id, "role": role, "joined": m.joined_ms, "muted_until": m.muted_until_ms})
                                );
                            } else {
                                println!("{name} {}", role.to_lowercase());
                            }
                        }
                        offset += r.members.len() as u32;
                        if !r.has_more || r.members.is_empty() {
                            break;
                        }
                    }
                }
                GroupCmd::Invite {
                    group_id,
                    who: user,
                } => {
                    c.group_invite(*group_id, vec![c.user_id(user).await?])
                        .await?;
                    say(
                        json,
                        serde_json::json!({"group": group_id, "user": user, "member": true}),
                        format!("added {user} to group {group_id}"),
                    );
                }
                GroupCmd::Kick {
                    group_id,
                    who: user,
                } => {
                    c.group_kick(*group_id, c.user_id(user).await?).await?;
                    say(
                        json,
                        serde_json::json!({"group": group_id, "user": user, "member": false}),
                        format!("removed {user} from group {group_id}"),
                    );
                }
                GroupCmd::Leave { group_id } => {
                    c.group_leave(*group_id).await?;
                    say(
                        json,
                        serde_json::json!({"group": group_id, "member": false}),
                        format!("left group {group_id}"),
                    );
                }
                GroupCmd::Mute {
                    group_id,
                    who: user,
                    secs,
                } => {
                    c.group_mute(*group_id, c.user_id(user).await?, *secs)
                        .await?;
                    if *secs == 0 {
                        say(
                            json,
                            serde_json::json!({"group": group_id, "user": user, "muted_secs": 0}),
                            format!("unmuted {user} in group {group_id}"),
                        );
                    } else {
                        say(
                            json,
                            serde_json::json!({"group": group_id, "user": user, "muted_secs": secs}),
                            format!("muted {user} in group {group_id} for {secs} s"),
                        );
                    }
                }
                GroupCmd::Join { group_id, message } => {
                    if c.group_join(*group_id, message).await? {
                        say(
                            json,
                            serde_json::json!({"group": group_id, "joined": true}),
                            format!("joined group {group_id}"),
                        );
                    } else {
                        say(
                            json,
                            serde_json::json!({"group": group_id, "joined": false}),
                            format!("asked to join group {group_id}; waiting for approval"),
                        );
                    }
                }
                GroupCmd::History { group_id, limit } => {
                    let r = c
                        .history(pb::HistoryRequest {
                            group_id: *group_id,
                            limit: *limit,
                            ..Default::default()
                        })
                        .await?;
                    let mut names = Names {
                        client: &c,
                        cache: HashMap::new(),
                    };
                    for m in &r.messages {
                        print_message(&mut names, m, json).await;
                    }
                }
            }
        }
        Cmd::Groups {} => {
            let (c, _) = cli.logged_in().await?;
            for g in c.groups().await? {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"group_id": g.id, "name": g.name, "members": g.member_count, "owner": g.owner_id, "last_seq": g.last_seq})
                    );
                } else {
                    println!("{} {} ({} members)", g.id, g.name, g.member_count);
                }
            }
        }
        Cmd::Recall { message_id } => {
            let (c, _) = cli.logged_in().await?;
            c.recall(*message_id).await?;
            say(
                json,
                serde_json::json!({"recalled": message_id}),
                format!("recalled message {message_id}"),
            );
        }
        Cmd::Presence { names: users } => {
            let (c, _) = cli.logged_in().await?;
            let mut ids = Vec::new();
            for u in users {
                ids.push((c.user_id(u).await?, u.clone()));
            }
            let got = c.presence(ids.iter().map(|(i, _)| *i).collect()).await?;
            for p in got {
                let name = ids
                    .iter()
                    .find(|(i, _)| *i == p.user_id)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_default();
                let status = presence_name(p.status);
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"user": name, "status": status, "last_seen": p.last_seen_ms})
                    );
                } else if p.last_seen_ms > 0 {
                    println!("{name}: {status} (last seen {})", fmt_time(p.last_seen_ms));
                } else {
                    println!("{name}: {status}");
                }
            }
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Catches clashing argument ids (a subcommand's positional named like a global
    /// option would silently replace it).
    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}

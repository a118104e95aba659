//! Request dispatch under arbitrary input: a real server (store in a temporary
//! directory) and a logged-in connection; the input becomes a pipelined stream of
//! well-framed requests whose commands and bodies come from the input bytes (raw bytes,
//! or protobuf fields with small ids that hit the users, conversations and groups that
//! exist, or huge numbers).
//!
//! The property checked for every input:
//! - every request gets exactly one answer, with its seq and command, within 10 s
//!   (no hang), and no answer is INTERNAL (no handler panic, no unexpected failure);
//! - no frame the server sends is malformed;
//! - afterwards a fresh connection is served (the server is alive).
//!
//! Shared by the cargo-fuzz target (`fuzz/fuzz_targets/dispatch.rs`) and the proptest
//! that runs in CI (`tests/dispatch_prop.rs`).

use bytes::BytesMut;
use mychat_codec::{FrameCodec, Header};
use mychat_proto::{Command, ErrorCode};
use prost::Message as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;

pub struct Harness {
    pub rt: tokio::runtime::Runtime,
    server: Option<mychat::ServerHandle>,
    pub addr: String,
    commands: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown_blocking();
        }
    }
}

fn frame(cmd: u16, seq: u32, body: &[u8]) -> bytes::Bytes {
    mychat_codec::frame_bytes(Header::request(cmd, seq), body)
}

/// Reads one frame (None: closed or 10 s passed).
async fn read_frame(
    s: &mut TcpStream,
    codec: &mut FrameCodec,
    buf: &mut BytesMut,
) -> Result<Option<mychat_codec::Frame>, String> {
    loop {
        match codec.decode(buf) {
            Ok(Some(f)) => return Ok(Some(f)),
            Ok(None) => {}
            Err(e) => return Err(format!("the server sent a malformed frame: {e}")),
        }
        let mut tmp = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut tmp)).await {
            Err(_) => return Err("no answer within 10 s".into()),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
            Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Sends `req` as one request and returns the answer's body (Err: an error answer).
async fn call(
    s: &mut TcpStream,
    cmd: Command,
    req: &impl prost::Message,
) -> Result<bytes::Bytes, String> {
    s.write_all(&frame(cmd.id(), 1, &req.encode_to_vec()))
        .await
        .map_err(|e| e.to_string())?;
    let mut codec = FrameCodec::new(u32::MAX);
    let mut buf = BytesMut::new();
    loop {
        let f = read_frame(s, &mut codec, &mut buf).await?.ok_or("closed")?;
        if f.header.is_push() {
            continue;
        }
        if f.header.is_error() {
            let e = mychat_proto::Error::decode(f.body).unwrap_or_default();
            return Err(format!("{:?}: {}", ErrorCode::from_u32(e.code), e.message));
        }
        return Ok(f.body);
    }
}

/// A password LOGIN of the `fuzzer` user on `device`.
fn fuzzer_login(device: &str) -> mychat_proto::LoginRequest {
    use mychat_proto::*;
    LoginRequest {
        credential: Some(login_request::Credential::Password(PasswordCredential {
            username: "fuzzer".into(),
            password: "password-fuzzer".into(),
        })),
        device_id: device.into(),
        platform: Platform::Web as i32,
    }
}

/// Turns input bytes into (command, body) requests.
pub fn requests(commands: &[u16], mut input: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut next = |n: usize| -> Option<Vec<u8>> {
        if input.len() < n {
            return None;
        }
        let (a, b) = input.split_at(n);
        input = b;
        Some(a.to_vec())
    };
    let mut out = Vec::new();
    while out.len() < 64 {
        let Some(sel) = next(1) else { break };
        let cmd = if sel[0] < 240 {
            commands[sel[0] as usize % commands.len()]
        } else {
            match next(2) {
                Some(b) => u16::from_le_bytes([b[0], b[1]]),
                None => break,
            }
        };
        let Some(mode) = next(1) else { break };
        let mut body = Vec::new();
        let fields = (mode[0] & 0x0f) as usize;
        if mode[0] & 0x80 != 0 {
            // Raw bytes.
            if let Some(b) = next(fields * 4) {
                body = b;
            }
        } else {
            // Protobuf fields: small ids (real users, groups, conversations), huge
            // numbers, strings or nested bytes.
            for _ in 0..fields {
                let Some(t) = next(1) else { break };
                let field = 1 + (t[0] % 8) as u32;
                match (t[0] / 8) % 4 {
                    0 => {
                        let v = next(1).map(|b| (b[0] % 6) as u64).unwrap_or(1);
                        prost::encoding::uint64::encode(field, &v, &mut body);
                    }
                    1 => {
                        let v = next(8)
                            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                            .unwrap_or(u64::MAX);
                        prost::encoding::uint64::encode(field, &v, &mut body);
                    }
                    2 => {
                        let n = next(1).map(|b| (b[0] % 48) as usize).unwrap_or(0);
                        let v = next(n).unwrap_or_default();
                        prost::encoding::bytes::encode(field, &v, &mut body);
                    }
                    _ => {
                        let v = next(1).map(|b| b[0] as i32 % 5).unwrap_or(-1);
                        prost::encoding::int32::encode(field, &v, &mut body);
                    }
                }
            }
        }
        out.push((cmd, body));
    }
    out
}

impl Harness {
    /// Starts a server with a few users, a friend request, a group and a conversation.
    pub fn new() -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let base = std::path::Path::new("/dev/shm");
        let dir = if base.is_dir() {
            tempfile::tempdir_in(base).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let mut cfg = mychat::Config::default();
        cfg.server.listen = "127.0.0.1:0".parse().unwrap();
        cfg.server.data_dir = dir.path().to_path_buf();
        cfg.server.shards = 1;
        cfg.auth.argon2_m_cost_kib = 64;
        cfg.auth.argon2_t_cost = 1;
        cfg.auth.multi_device = mychat_config::MultiDevice::Multi;
        cfg.auth.max_sessions_per_user = 1024;
        cfg.auth.failed_logins_per_addr = 1_000_000;
        cfg.auth.failed_logins_per_user = 1_000_000;
        cfg.auth.registrations_per_addr_per_min = 10_000_000;
        cfg.server.requests_per_sec = 10_000_000;
        cfg.server.request_burst = 10_000_000;
        cfg.messages.sends_per_sec = 10_000_000;
        cfg.messages.send_burst = 10_000_000;
        cfg.presence.typing_per_sec = 1000;
        let server = rt.block_on(async { mychat::start(cfg) }).unwrap();
        let addr = server.local_addr().to_string();
        rt.block_on(async {
            use mychat_proto::*;
            let mut ids = Vec::new();
            for name in ["fuzzer", "peer", "third"] {
                let mut s = TcpStream::connect(&addr).await.unwrap();
                let r = call(
                    &mut s,
                    Command::Register,
                    &RegisterRequest {
                        username: name.into(),
                        password: format!("password-{name}"),
                    },
                )
                .await
                .unwrap();
                ids.push(RegisterResponse::decode(r).unwrap().user_id);
            }
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let r = call(&mut s, Command::Login, &fuzzer_login("setup"))
                .await
                .unwrap();
            assert!(LoginResponse::decode(r).is_ok());
            let _ = call(
                &mut s,
                Command::SendMessage,
                &SendMessageRequest {
                    to_user_id: ids[1],
                    client_msg_id: "setup-1".into(),
                    kind: MessageKind::Text as i32,
                    text: "hello".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let _ = call(
                &mut s,
                Command::GroupCreate,
                &GroupCreateRequest {
                    name: "fuzz".into(),
                    member_ids: vec![ids[1], ids[2]],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let _ = call(
                &mut s,
                Command::FriendRequest,
                &FriendRequestRequest {
                    user_id: ids[2],
                    ..Default::default()
                },
            )
            .await;
        });
        let commands = (0..=u16::MAX)
            .filter(|id| Command::from_id(*id).is_some())
            .collect();
        Harness {
            rt,
            server: Some(server),
            addr,
            commands,
            _dir: dir,
        }
    }

    /// Runs one input; Err says which property broke.
    pub fn run(&self, input: &[u8]) -> Result<(), String> {
        let reqs = requests(&self.commands, input);
        let internal_before = self.internal_count();
        self.rt.block_on(async {
            use mychat_proto::*;
            let mut s = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| e.to_string())?;
            // By password: an input's LOGOUT revokes the tokens issued so far.
            call(&mut s, Command::Login, &fuzzer_login("fuzz"))
                .await
                .map_err(|e| format!("login: {e}"))?;
            let mut all = Vec::new();
            for (i, (cmd, body)) in reqs.iter().enumerate() {
                all.extend_from_slice(&frame(*cmd, i as u32 + 2, body));
            }
            s.write_all(&all).await.map_err(|e| e.to_string())?;
            let mut codec = FrameCodec::new(u32::MAX);
            let mut buf = BytesMut::new();
            let mut answered = vec![false; reqs.len()];
            let mut left = reqs.len();
            while left > 0 {
                let Some(f) = read_frame(&mut s, &mut codec, &mut buf).await? else {
                    // Closed: only after LOGOUT (or a kick) may the server stop answering.
                    let logged_out = reqs.iter().any(|(c, _)| *c == Command::Logout.id());
                    if logged_out {
                        return Ok(());
                    }
                    return Err(format!("closed with {left} requests unanswered"));
                };
                let h = f.header;
                if h.is_push() {
                    continue;
                }
                if h.seq == 0 {
                    return Err(format!(
                        "a connection-level error to well-framed requests: {h:?}"
                    ));
                }
                let i = (h.seq - 2) as usize;
                if i >= reqs.len() || answered[i] {
                    return Err(format!("an answer to no request, or a second one: {h:?}"));
                }
                if h.command != reqs[i].0 {
                    return Err(format!(
                        "answer command {} for request {}",
                        h.command, reqs[i].0
                    ));
                }
                if h.is_error() {
                    let e = mychat_proto::Error::decode(f.body.clone())
                        .map_err(|e| format!("an error body that does not decode: {e}"))?;
                    if e.code == ErrorCode::Internal as u32 {
                        return Err(format!("INTERNAL for command {}: {}", h.command, e.message));
                    }
                    if ErrorCode::from_u32(e.code).is_none() {
                        return Err(format!("unknown error code {}", e.code));
                    }
                }
                answered[i] = true;
                left -= 1;
            }
            Ok::<(), String>(())
        })?;
        if self.internal_count() != internal_before {
            return Err("the server counted an INTERNAL answer".into());
        }
        // Still serving.
        self.rt.block_on(async {
            let mut s = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| e.to_string())?;
            call(&mut s, Command::Heartbeat, &())
                .await
                .map(|_| ())
                .map_err(|e| format!("the server stopped serving: {e}"))
        })
    }

    fn internal_count(&self) -> u64 {
        self.server
            .as_ref()
            .unwrap()
            .shared()
            .metrics
            .internal_total
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

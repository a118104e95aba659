//! The real `mychat` binary as a child process: kill -9 right after acks loses no
//! acknowledged message; SIGTERM drains and exits; bad config is refused by key.
mod common;
use bytes::Bytes;
use mychat_client::proto as pb;
use mychat_client::Client;
use pb::Platform;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Proc {
    child: Child,
    addr: String,
}

fn spawn(data: &std::path::Path) -> Proc {
    spawn_with(data, &[])
}

fn spawn_with(data: &std::path::Path, env: &[(&str, &str)]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mychat"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .envs(env.iter().copied())
        .env("MYCHAT__AUTH__ARGON2_M_COST_KIB", "64")
        .env("MYCHAT__AUTH__ARGON2_T_COST", "1")
        .env("MYCHAT__SERVER__SHUTDOWN_DEADLINE_MS", "3000")
        // These tests flood from one user on purpose: lift the rate limits.
        .env("MYCHAT__MESSAGES__SENDS_PER_SEC", "1000000")
        .env("MYCHAT__MESSAGES__SEND_BURST", "1000000")
        .env("MYCHAT__SERVER__REQUESTS_PER_SEC", "1000000")
        .env("MYCHAT__SERVER__REQUEST_BURST", "1000000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mychat");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("mychat listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line}"))
        .to_string();
    Proc { child, addr }
}

async fn login(addr: &str, user: &str, device: &str) -> Client {
    let c = Client::connect(addr).await.unwrap();
    c.login_password(user, &format!("password-{user}"), device, Platform::Desktop)
        .await
        .unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_acks_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path());
    let reg = Client::connect(&p.addr).await.unwrap();
    reg.register("alice", "password-alice").await.unwrap();
    let bob = reg.register("bob", "password-bob").await.unwrap();
    let acked: Arc<Mutex<Vec<(u64, u64, String)>>> = Arc::new(Mutex::new(Vec::new()));
    // Four connections keep sending, pipelined, until the server dies under them.
    let mut senders = Vec::new();
    for d in 0..4 {
        let a = Arc::new(login(&p.addr, "alice", &format!("dev{d}")).await);
        for k in 0..8 {
            let (a, acked) = (a.clone(), acked.clone());
            senders.push(tokio::spawn(async move {
                for i in 0.. {
                    let text = format!("d{d}-k{k}-{i}");
                    let req = pb::SendMessageRequest {
                        group_id: 0,
                        to_user_id: bob,
                        client_msg_id: text.clone(),
                        kind: 1,
                        text: text.clone(),
                        payload: Bytes::new(),
                    };
                    match a.send(req).await {
                        Ok(ack) => acked.lock().unwrap().push((ack.message_id, ack.seq, text)),
                        Err(_) => return,
                    }
                }
            }));
        }
    }
    // Kill as soon as 500 acks are in, while sends are still in flight.
    let t0 = Instant::now();
    while acked.lock().unwrap().len() < 500 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "500 acks within a minute"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    p.child.kill().unwrap(); // SIGKILL
    p.child.wait().unwrap();
    for s in senders {
        let _ = s.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 500);

    let p2 = spawn(dir.path());
    let b = login(&p2.addr, "bob", "b").await;
    let alice = b.user_id("alice").await.unwrap();
    let mut stored = std::collections::HashMap::new();
    let mut before = 0;
    loop {
        let h = b
            .history(pb::HistoryRequest {
                peer_user_id: alice,
                before_seq: before,
                limit: 200,
                ..Default::default()
            })
            .await
            .unwrap();
        for m in &h.messages {
            stored.insert(m.id, (m.seq, m.text.clone()));
        }
        if !h.has_more {
            break;
        }
        before = h.messages[0].seq;
    }
    // Every acknowledged message is there, with its seq; seqs are gap-free.
    for (id, seq, text) in &acked {
        assert_eq!(
            stored.get(id),
            Some(&(*seq, text.clone())),
            "acked message {id} lost"
        );
    }
    let mut seqs: Vec<u64> = stored.values().map(|(s, _)| *s).collect();
    seqs.sort();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    // And the recipient's sync sees them too (never-synced device: unread snapshot
    // holds the newest, the stream holds all).
    let page = b.sync(Some(0), 0).await.unwrap();
    assert!(!page.updates.is_empty());
    drop(b);
    let mut p2 = p2;
    p2.child.kill().unwrap();
    p2.child.wait().unwrap();
}

#[tokio::test]
async fn sigterm_kicks_clients_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path());
    let reg = Client::connect(&p.addr).await.unwrap();
    reg.register("alice", "password-alice").await.unwrap();
    let c = login(&p.addr, "alice", "a").await;
    let mut pushes = c.take_pushes().unwrap();
    let started = Instant::now();
    let st = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    match tokio::time::timeout(Duration::from_secs(5), pushes.recv())
        .await
        .unwrap()
    {
        Some(mychat_client::Push::Kick(k)) => {
            assert_eq!(k.reason, pb::KickReason::ServerShutdown as i32)
        }
        other => panic!("expected a shutdown kick, got {other:?}"),
    }
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "exited within the deadline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    // Data survives a clean stop, and the WAL was folded back.
    let p2 = spawn(dir.path());
    let again = Client::connect(&p2.addr).await.unwrap();
    assert_eq!(
        again
            .register("alice", "password-alice")
            .await
            .unwrap_err()
            .code(),
        Some(pb::ErrorCode::Conflict)
    );
    let mut p2 = p2;
    p2.child.kill().unwrap();
    p2.child.wait().unwrap();
}

#[test]
fn invalid_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mychat"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("MYCHAT__SERVER__LOGIN_TIMEOUT_MS", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.login_timeout_ms"), "{err}");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[server]\nlisten_addr = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mychat"))
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.listen_addr"), "{err}");
}

/// The binary as the README starts it, with `login_timeout` set to 2 s through the
/// environment: a connection that never logs in gets a LOGIN_TIMEOUT kick and is
/// closed at about 2 s, not before.
#[tokio::test]
async fn login_timeout_from_the_environment_closes_idle_connections() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn_with(dir.path(), &[("MYCHAT__SERVER__LOGIN_TIMEOUT_MS", "2000")]);
    let mut s = tokio::net::TcpStream::connect(&p.addr).await.unwrap();
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("closed within 10 s")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1900),
        "closed after {waited:?}"
    );
    let mut codec = mychat_codec::FrameCodec::new(u32::MAX);
    let mut b = bytes::BytesMut::from(&got[..]);
    use tokio_util::codec::Decoder as _;
    let f = codec
        .decode(&mut b)
        .unwrap()
        .expect("a KICK frame before the close");
    assert_eq!(f.header.command, pb::Command::Kick.id());
    use prost::Message as _;
    let k = pb::KickPush::decode(f.body).unwrap();
    assert_eq!(k.reason, pb::KickReason::LoginTimeout as i32);
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

//! Shared helpers for the integration tests: a real server on 127.0.0.1:0 in a
//! temporary data directory, driven through the client library or raw frames.
#![allow(dead_code)]

pub mod pki;

use bytes::{Bytes, BytesMut};
use mychat::{Config, ServerHandle};
use mychat_client::proto as pb;
use mychat_client::{Client, ClientError, Push};
use mychat_codec::{Frame, FrameCodec, Header};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;

/// Lifts the per-user and per-connection rate limits, for tests that flood on purpose.
pub fn unlimited(c: &mut Config) {
    c.messages.sends_per_sec = 1_000_000;
    c.messages.send_burst = 1_000_000;
    c.server.requests_per_sec = 1_000_000;
    c.server.request_burst = 1_000_000;
}

/// A config for tests: port 0, the given data dir, cheap password hashing.
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.data_dir = dir.to_path_buf();
    c.server.shards = 2;
    c.server.shutdown_deadline_ms = 3000;
    c.auth.argon2_m_cost_kib = 64;
    c.auth.argon2_t_cost = 1;
    // Merge the update streams' log every few events (the default waits for 65,536):
    // every test then reads streams while events sit in the log, in the index, or are
    // halfway between.
    c.store.stream_log_rows = 3;
    c.store.stream_merge_rows = 2;
    c
}

pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub addr: String,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> TestServer {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        f(&mut cfg);
        let handle = mychat::start(cfg).expect("server starts");
        let addr = handle.local_addr().to_string();
        TestServer {
            handle: Some(handle),
            addr,
            dir,
        }
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.addr).await.expect("connect")
    }

    /// Registers `name` (password "password-<name>") and returns its id.
    pub async fn register(&self, name: &str) -> u64 {
        let c = self.client().await;
        c.register(name, &format!("password-{name}"))
            .await
            .expect("register")
    }

    /// A client logged in as `name` on `platform` with `device`.
    pub async fn login(
        &self,
        name: &str,
        device: &str,
        platform: pb::Platform,
    ) -> (Client, pb::LoginResponse) {
        let c = self.client().await;
        let r = c
            .login_password(name, &format!("password-{name}"), device, platform)
            .await
            .expect("login");
        (c, r)
    }
}

pub fn code(e: ClientError) -> pb::ErrorCode {
    e.code()
        .unwrap_or_else(|| panic!("not a server error: {e:?}"))
}

/// The next push within 5 s.
pub async fn next_push(rx: &mut tokio::sync::mpsc::Receiver<Push>) -> Push {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a push within 5 s")
        .expect("connection open")
}

/// The next message push within 5 s (skipping receipts).
pub async fn next_message(rx: &mut tokio::sync::mpsc::Receiver<Push>) -> pb::MessagePush {
    loop {
        if let Push::Message(m) = next_push(rx).await {
            return m;
        }
    }
}

/// Syncs from the start of the user's stream to its end; returns the seqs of the
/// messages in it, in stream order.
pub async fn synced_message_seqs(c: &Client) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut since = 0;
    loop {
        let p = c.sync(Some(since), 0).await.unwrap();
        for u in &p.updates {
            if let Some(pb::update::Event::Message(m)) = &u.event {
                seqs.push(m.seq);
            }
        }
        since = p.pts;
        if !p.has_more {
            return seqs;
        }
    }
}

/// Asserts nothing arrives within `ms`.
pub async fn no_push(rx: &mut tokio::sync::mpsc::Receiver<Push>, ms: u64) {
    if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(ms), rx.recv()).await {
        panic!("unexpected push {p:?}");
    }
}

/// A raw connection for frame-level tests.
pub struct Raw {
    pub s: TcpStream,
    buf: BytesMut,
    codec: FrameCodec,
}

impl Raw {
    pub async fn connect(addr: &str) -> Raw {
        Raw::from_stream(TcpStream::connect(addr).await.unwrap())
    }

    pub fn from_stream(s: TcpStream) -> Raw {
        Raw {
            s,
            buf: BytesMut::new(),
            codec: FrameCodec::new(u32::MAX),
        }
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    pub async fn request(&mut self, cmd: u16, seq: u32, body: &[u8]) {
        let f = mychat_codec::frame_bytes(Header::request(cmd, seq), body);
        self.send_bytes(&f).await;
    }

    /// The next frame, or None when the server closed the connection (within 5 s).
    pub async fn frame(&mut self) -> Option<Frame> {
        let fut = async {
            loop {
                if let Some(f) = self.codec.decode(&mut self.buf).unwrap() {
                    return Some(f);
                }
                let mut tmp = [0u8; 4096];
                match self.s.read(&mut tmp).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .expect("server answered or closed within 5 s")
    }

    /// Asserts the server closes the connection (EOF) within 5 s, with no more frames.
    pub async fn expect_closed(&mut self) {
        assert!(
            self.frame().await.is_none(),
            "expected the connection to close"
        );
    }
}

/// Decodes an error body.
pub fn error_of(f: &Frame) -> pb::Error {
    use prost::Message as _;
    assert!(f.header.is_error(), "not an error frame: {:?}", f.header);
    pb::Error::decode(f.body.clone()).unwrap()
}

pub fn body<M: prost::Message>(m: &M) -> Bytes {
    Bytes::from(m.encode_to_vec())
}

/// Registers `n` users named `{prefix}{i}` (password "password-{name}") over 50
/// connections at once; returns their ids by index.
pub async fn register_many(addr: &str, prefix: &str, n: usize) -> Vec<u64> {
    let mut regs = Vec::new();
    for chunk in 0..50 {
        let (addr, prefix) = (addr.to_string(), prefix.to_string());
        regs.push(tokio::spawn(async move {
            let c = Client::connect(&addr).await.unwrap();
            let mut ids = Vec::new();
            for i in (chunk..n).step_by(50) {
                let name = format!("{prefix}{i}");
                ids.push((
                    i,
                    c.register(&name, &format!("password-{name}"))
                        .await
                        .unwrap(),
                ));
            }
            ids
        }));
    }
    let mut ids = vec![0u64; n];
    for r in regs {
        for (i, id) in r.await.unwrap() {
            ids[i] = id;
        }
    }
    ids
}

/// Connects and logs in users `{prefix}0..n` all at once (desktop, device "d").
pub async fn login_many(addr: &str, prefix: &str, n: usize) -> Vec<Client> {
    let mut logins = Vec::new();
    for i in 0..n {
        let (addr, name) = (addr.to_string(), format!("{prefix}{i}"));
        logins.push(tokio::spawn(async move {
            let c = Client::connect(&addr).await.unwrap();
            c.login_password(
                &name,
                &format!("password-{name}"),
                "d",
                pb::Platform::Desktop,
            )
            .await
            .unwrap();
            c
        }));
    }
    let mut clients = Vec::new();
    for l in logins {
        clients.push(l.await.unwrap());
    }
    clients
}

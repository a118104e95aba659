//! The MyChat async client library.
//!
//! - [`Client`]: one connection. Requests are pipelined (each gets its own `seq`, and
//!   responses are matched back by it); pushes arrive on a bounded channel
//!   ([`Client::take_pushes`]); a heartbeat is sent on an interval.
//! - [`Session`]: a logged-in device that survives disconnects. It logs in, syncs what
//!   the device missed, then yields messages and receipts in order, detecting gaps in
//!   the user's `pts` stream and filling them with SYNC, and reconnecting (with re-login
//!   and re-sync) when the connection drops. It acknowledges its cursor to the server,
//!   so the next run of the same device resumes where this one stopped.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use mychat_codec::{Frame, FrameCodec, Header};
use mychat_proto as pb;
use mychat_proto::{Command, ErrorCode};
use prost::Message as _;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

pub use mychat_proto as proto;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The server answered with an error (PROTOCOL.md code).
    #[error("{} ({}): {message}", code.map(|c| c.name()).unwrap_or("UNKNOWN"), raw_code)]
    Server {
        code: Option<ErrorCode>,
        raw_code: u32,
        message: String,
    },
    #[error("connection closed")]
    Disconnected,
    #[error("i/o: {0}")]
    Io(String),
    #[error("bad response: {0}")]
    Decode(String),
    #[error("timed out")]
    Timeout,
    /// The server kicked this session (another login, logout …).
    #[error("kicked by the server: {0}")]
    Kicked(String),
}

impl ClientError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => *code,
            _ => None,
        }
    }
}

/// A push from the server.
#[derive(Debug, Clone)]
pub enum Push {
    Message(pb::MessagePush),
    Receipt(pb::ReceiptPush),
    Kick(pb::KickPush),
    Other(u16, Bytes),
}

type Pending = Arc<waiters::Map>;

mod waiters {
    //! The requests waiting for their response, by seq. A std mutex (never held
    //! across an await); `None` once the connection is gone.
    use super::*;
    type Waiter = oneshot::Sender<Result<Bytes, ClientError>>;
    #[derive(Default)]
    pub struct Map(pub std::sync::Mutex<Option<HashMap<u32, Waiter>>>);
    impl Map {
        pub fn new() -> Map {
            Map(std::sync::Mutex::new(Some(HashMap::new())))
        }
        pub fn insert(&self, seq: u32, tx: Waiter) -> bool {
            match self.0.lock().unwrap().as_mut() {
                Some(m) => {
                    m.insert(seq, tx);
                    true
                }
                None => false,
            }
        }
        pub fn take(&self, seq: u32) -> Option<Waiter> {
            self.0.lock().unwrap().as_mut().and_then(|m| m.remove(&seq))
        }
        pub fn close(&self) {
            if let Some(m) = self.0.lock().unwrap().take() {
                for (_, tx) in m {
                    let _ = tx.send(Err(ClientError::Disconnected));
                }
            }
        }
    }
}

/// Options of a connection.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub max_frame_len: u32,
    /// HEARTBEAT interval; None: no heartbeat.
    pub heartbeat: Option<Duration>,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Pushes buffered before the reader waits for the application.
    pub push_buffer: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            max_frame_len: mychat_codec::DEFAULT_MAX_FRAME_LEN,
            heartbeat: Some(Duration::from_secs(30)),
            request_timeout: Duration::from_secs(30),
            push_buffer: 4096,
        }
    }
}

/// One connection to a MyChat server.
pub struct Client {
    out: mpsc::Sender<Frame>,
    pending: Pending,
    next_seq: AtomicU32,
    pushes: std::sync::Mutex<Option<mpsc::Receiver<Push>>>,
    timeout: Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Client {
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        Client::connect_with(addr, ConnectOptions::default()).await
    }

    pub async fn connect_with(addr: &str, opts: ConnectOptions) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::Io(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let (out_tx, mut out_rx) = mpsc::channel::<Frame>(1024);
        let (push_tx, push_rx) = mpsc::channel(opts.push_buffer);
        let pending: Pending = Arc::new(waiters::Map::new());
        let codec = FrameCodec::new(opts.max_frame_len);
        let writer = tokio::spawn(async move {
            let mut sink = FramedWrite::new(w, codec);
            while let Some(f) = out_rx.recv().await {
                // Coalesce: feed everything queued, flush once.
                if sink.feed(f).await.is_err() {
                    return;
                }
                while let Ok(f) = out_rx.try_recv() {
                    if sink.feed(f).await.is_err() {
                        return;
                    }
                }
                if SinkExt::<Frame>::flush(&mut sink).await.is_err() {
                    return;
                }
            }
        });
        let p = pending.clone();
        let reader = tokio::spawn(async move {
            let mut frames = FramedRead::new(r, FrameCodec::new(opts.max_frame_len));
            while let Some(Ok(f)) = frames.next().await {
                let h = f.header;
                if h.is_response() {
                    if let Some(tx) = p.take(h.seq) {
                        let r = if h.is_error() {
                            let e = pb::Error::decode(f.body).unwrap_or_default();
                            Err(ClientError::Server {
                                code: ErrorCode::from_u32(e.code),
                                raw_code: e.code,
                                message: e.message,
                            })
                        } else {
                            Ok(f.body)
                        };
                        let _ = tx.send(r);
                    } else if h.is_error() && h.seq == 0 {
                        // A connection-level error (BAD_FRAME …): the server closes next.
                        let e = pb::Error::decode(f.body).unwrap_or_default();
                        let _ = push_tx
                            .send(Push::Kick(pb::KickPush {
                                reason: 0,
                                message: e.message,
                            }))
                            .await;
                    }
                } else if h.is_push() {
                    let push = match Command::from_id(h.command) {
                        Some(Command::MessagePush) => {
                            pb::MessagePush::decode(f.body.clone()).map(Push::Message)
                        }
                        Some(Command::ReceiptPush) => {
                            pb::ReceiptPush::decode(f.body.clone()).map(Push::Receipt)
                        }
                        Some(Command::Kick) => pb::KickPush::decode(f.body.clone()).map(Push::Kick),
                        _ => Ok(Push::Other(h.command, f.body.clone())),
                    };
                    if let Ok(push) = push {
                        if push_tx.send(push).await.is_err() {
                            // Nobody listens for pushes: keep serving responses.
                        }
                    }
                }
            }
            p.close();
        });
        let mut tasks = vec![writer, reader];
        if let Some(every) = opts.heartbeat {
            let out = out_tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut t = tokio::time::interval(every);
                t.tick().await;
                loop {
                    t.tick().await;
                    // seq u32::MAX is reserved for heartbeats; their answers are ignored.
                    if out
                        .send(Frame {
                            header: Header::request(Command::Heartbeat.id(), u32::MAX),
                            body: Bytes::new(),
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }));
        }
        Ok(Client {
            out: out_tx,
            pending,
            next_seq: AtomicU32::new(1),
            pushes: std::sync::Mutex::new(Some(push_rx)),
            timeout: opts.request_timeout,
            tasks,
        })
    }

    /// The stream of pushes (once; later calls get None).
    pub fn take_pushes(&self) -> Option<mpsc::Receiver<Push>> {
        self.pushes.lock().unwrap().take()
    }

    /// Sends a raw request body and waits for the response body.
    pub async fn call_raw(&self, cmd: u16, body: Bytes) -> Result<Bytes, ClientError> {
        let mut seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        if seq == 0 || seq == u32::MAX {
            seq = self.next_seq.fetch_add(2, Ordering::Relaxed).max(1);
        }
        let (tx, rx) = oneshot::channel();
        if !self.pending.insert(seq, tx) {
            return Err(ClientError::Disconnected);
        }
        self.out
            .send(Frame {
                header: Header::request(cmd, seq),
                body,
            })
            .await
            .map_err(|_| ClientError::Disconnected)?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ClientError::Disconnected),
            Err(_) => {
                self.pending.take(seq);
                Err(ClientError::Timeout)
            }
        }
    }

    /// Sends a request and decodes its response.
    pub async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        cmd: Command,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        let body = self
            .call_raw(cmd.id(), Bytes::from(req.encode_to_vec()))
            .await?;
        Resp::decode(body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn heartbeat(&self) -> Result<(), ClientError> {
        self.call_raw(Command::Heartbeat.id(), Bytes::new())
            .await
            .map(|_| ())
    }

    pub async fn hello(&self) -> Result<pb::HelloResponse, ClientError> {
        self.call(
            Command::Hello,
            &pb::HelloRequest {
                client_name: "mychat-client".into(),
                client_version: env!("CARGO_PKG_VERSION").into(),
            },
        )
        .await
    }

    pub async fn register(&self, username: &str, password: &str) -> Result<u64, ClientError> {
        let r: pb::RegisterResponse = self
            .call(
                Command::Register,
                &pb::RegisterRequest {
                    username: username.into(),
                    password: password.into(),
                },
            )
            .await?;
        Ok(r.user_id)
    }

    pub async fn login(
        &self,
        cred: pb::login_request::Credential,
        device_id: &str,
        platform: pb::Platform,
    ) -> Result<pb::LoginResponse, ClientError> {
        self.call(
            Command::Login,
            &pb::LoginRequest {
                credential: Some(cred),
                device_id: device_id.into(),
                platform: platform as i32,
            },
        )
        .await
    }

    pub async fn login_password(
        &self,
        username: &str,
        password: &str,
        device_id: &str,
        platform: pb::Platform,
    ) -> Result<pb::LoginResponse, ClientError> {
        let cred = pb::login_request::Credential::Password(pb::PasswordCredential {
            username: username.into(),
            password: password.into(),
        });
        self.login(cred, device_id, platform).await
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<pb::Tokens, ClientError> {
        let r: pb::RefreshResponse = self
            .call(
                Command::Refresh,
                &pb::RefreshRequest {
                    refresh_token: refresh_token.into(),
                },
            )
            .await?;
        r.tokens
            .ok_or_else(|| ClientError::Decode("no tokens".into()))
    }

    pub async fn logout(&self) -> Result<(), ClientError> {
        let _: pb::LogoutResponse = self.call(Command::Logout, &pb::LogoutRequest {}).await?;
        Ok(())
    }

    pub async fn get_users(
        &self,
        ids: Vec<u64>,
        names: Vec<String>,
    ) -> Result<Vec<pb::User>, ClientError> {
        let r: pb::GetUsersResponse = self
            .call(
                Command::GetUsers,
                &pb::GetUsersRequest {
                    user_ids: ids,
                    usernames: names,
                },
            )
            .await?;
        Ok(r.users)
    }

    /// The user id of `username`, or NOT_FOUND.
    pub async fn user_id(&self, username: &str) -> Result<u64, ClientError> {
        let users = self.get_users(vec![], vec![username.to_string()]).await?;
        users.first().map(|u| u.id).ok_or(ClientError::Server {
            code: Some(ErrorCode::NotFound),
            raw_code: ErrorCode::NotFound as u32,
            message: format!("no user named {username}"),
        })
    }

    pub async fn send(
        &self,
        req: pb::SendMessageRequest,
    ) -> Result<pb::SendMessageResponse, ClientError> {
        self.call(Command::SendMessage, &req).await
    }

    /// Sends a text with a fresh client message id.
    pub async fn send_text(
        &self,
        to_user_id: u64,
        text: &str,
    ) -> Result<pb::SendMessageResponse, ClientError> {
        self.send(pb::SendMessageRequest {
            to_user_id,
            client_msg_id: new_client_msg_id(),
            kind: pb::MessageKind::Text as i32,
            text: text.into(),
            payload: Bytes::new(),
        })
        .await
    }

    pub async fn delivered(&self, conversation_id: u64, seq: u64) -> Result<(), ClientError> {
        let _: pb::DeliveredResponse = self
            .call(
                Command::Delivered,
                &pb::DeliveredRequest {
                    conversation_id,
                    seq,
                },
            )
            .await?;
        Ok(())
    }

    pub async fn read(&self, conversation_id: u64, seq: u64) -> Result<u64, ClientError> {
        let r: pb::ReadResponse = self
            .call(
                Command::Read,
                &pb::ReadRequest {
                    conversation_id,
                    seq,
                },
            )
            .await?;
        Ok(r.read_seq)
    }

    pub async fn sync(
        &self,
        since_pts: Option<u64>,
        limit: u32,
    ) -> Result<pb::SyncResponse, ClientError> {
        self.call(Command::Sync, &pb::SyncRequest { since_pts, limit })
            .await
    }

    pub async fn sync_ack(&self, pts: u64) -> Result<(), ClientError> {
        let _: pb::SyncAckResponse = self
            .call(Command::SyncAck, &pb::SyncAckRequest { pts })
            .await?;
        Ok(())
    }

    pub async fn history(
        &self,
        req: pb::HistoryRequest,
    ) -> Result<pb::HistoryResponse, ClientError> {
        self.call(Command::History, &req).await
    }

    pub async fn conversations(
        &self,
        offset: u32,
        limit: u32,
    ) -> Result<pb::ConversationsResponse, ClientError> {
        self.call(
            Command::Conversations,
            &pb::ConversationsRequest { limit, offset },
        )
        .await
    }
}

/// A random client message id (128 bits, hex).
pub fn new_client_msg_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// What a [`Session`] yields.
#[derive(Debug, Clone)]
pub enum Event {
    /// A message, in the order of the user's stream (live or caught up by sync).
    Message(pb::Message),
    Receipt(pb::Receipt),
}

/// How a [`Session`] logs in.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub addr: String,
    pub username: String,
    pub password: String,
    pub device_id: String,
    pub platform: pb::Platform,
    pub connect: ConnectOptions,
    /// Give up reconnecting after this long without a connection.
    pub reconnect_for: Duration,
}

/// A logged-in device that reconnects and re-syncs by itself. See the crate docs.
pub struct Session {
    opts: SessionOptions,
    client: Option<Arc<Client>>,
    pushes: Option<mpsc::Receiver<Push>>,
    /// The last pts this device holds, once known.
    pts: Option<u64>,
    acked: Option<u64>,
    queue: VecDeque<Event>,
    pub user_id: u64,
    refresh_token: Option<String>,
}

impl Session {
    /// Connects, logs in and syncs (the first events are what the device missed).
    pub async fn start(opts: SessionOptions) -> Result<Session, ClientError> {
        let mut s = Session {
            opts,
            client: None,
            pushes: None,
            pts: None,
            acked: None,
            queue: VecDeque::new(),
            user_id: 0,
            refresh_token: None,
        };
        s.connect_once().await?;
        Ok(s)
    }

    /// The live connection (for requests such as send or history).
    pub fn client(&self) -> Option<Arc<Client>> {
        self.client.clone()
    }

    async fn connect_once(&mut self) -> Result<(), ClientError> {
        let c = Client::connect_with(&self.opts.addr, self.opts.connect.clone()).await?;
        let pushes = c.take_pushes();
        let r = c
            .login_password(
                &self.opts.username,
                &self.opts.password,
                &self.opts.device_id,
                self.opts.platform,
            )
            .await?;
        self.user_id = r.user_id;
        self.refresh_token = r.tokens.map(|t| t.refresh_token);
        let c = Arc::new(c);
        self.client = Some(c.clone());
        self.pushes = pushes;
        self.catch_up(&c).await
    }

    /// Syncs from what this device holds (the server's cursor the first time).
    async fn catch_up(&mut self, c: &Client) -> Result<(), ClientError> {
        let mut since = self.pts;
        loop {
            let page = c.sync(since, 0).await?;
            for u in page.updates {
                if u.pts != 0 && self.pts.is_some_and(|p| u.pts <= p) {
                    continue;
                }
                match u.event {
                    Some(pb::update::Event::Message(m)) => self.queue.push_back(Event::Message(m)),
                    Some(pb::update::Event::Receipt(r)) => self.queue.push_back(Event::Receipt(r)),
                    None => {}
                }
                if u.pts != 0 {
                    self.pts = Some(u.pts);
                }
            }
            self.pts = Some(self.pts.unwrap_or(0).max(page.pts));
            since = self.pts;
            if !page.has_more {
                return Ok(());
            }
        }
    }

    /// Tells the server this device holds everything up to its pts.
    pub async fn ack(&mut self) -> Result<(), ClientError> {
        if let (Some(p), Some(c)) = (self.pts, self.client.clone()) {
            if self.acked != Some(p) {
                c.sync_ack(p).await?;
                self.acked = Some(p);
            }
        }
        Ok(())
    }

    /// The next event, waiting at most `wait` (None: forever). Ok(None): timed out.
    pub async fn next_event(
        &mut self,
        wait: Option<Duration>,
    ) -> Result<Option<Event>, ClientError> {
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Ok(Some(e));
            }
            if self.client.is_none() {
                self.reconnect(deadline).await?;
                continue;
            }
            let _ = self.ack().await;
            let pushes = self.pushes.as_mut().expect("connected");
            let next = match deadline {
                Some(d) => match tokio::time::timeout_at(d, pushes.recv()).await {
                    Ok(p) => p,
                    Err(_) => return Ok(None),
                },
                None => pushes.recv().await,
            };
            match next {
                None => {
                    // Disconnected.
                    self.client = None;
                    self.pushes = None;
                }
                Some(Push::Message(mp)) => {
                    if let Some(m) = mp.message {
                        self.on_stream(mp.pts, Event::Message(m)).await?;
                    }
                }
                Some(Push::Receipt(rp)) => {
                    if let Some(r) = rp.receipt {
                        if rp.pts == 0 {
                            self.queue.push_back(Event::Receipt(r));
                        } else {
                            self.on_stream(rp.pts, Event::Receipt(r)).await?;
                        }
                    }
                }
                Some(Push::Kick(k)) => {
                    let reason =
                        pb::KickReason::try_from(k.reason).unwrap_or(pb::KickReason::Unspecified);
                    self.client = None;
                    self.pushes = None;
                    if matches!(
                        reason,
                        pb::KickReason::LoggedInElsewhere | pb::KickReason::LoggedOut
                    ) {
                        return Err(ClientError::Kicked(k.message));
                    }
                }
                Some(Push::Other(..)) => {}
            }
        }
    }

    /// A stream event with its pts: in order → yield; old → drop; gap → sync.
    async fn on_stream(&mut self, pts: u64, ev: Event) -> Result<(), ClientError> {
        let have = self.pts.unwrap_or(0);
        if pts <= have {
            return Ok(());
        }
        if pts == have + 1 {
            self.pts = Some(pts);
            self.queue.push_back(ev);
            return Ok(());
        }
        let c = self.client.clone().ok_or(ClientError::Disconnected)?;
        match self.catch_up(&c).await {
            Ok(()) => Ok(()),
            Err(ClientError::Disconnected) => {
                self.client = None;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn reconnect(
        &mut self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), ClientError> {
        let give_up = tokio::time::Instant::now() + self.opts.reconnect_for;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.connect_once().await {
                Ok(()) => return Ok(()),
                Err(e @ ClientError::Server { .. }) if e.code() != Some(ErrorCode::Unavailable) => {
                    return Err(e)
                }
                Err(_) => {}
            }
            let now = tokio::time::Instant::now();
            if now >= give_up || deadline.is_some_and(|d| now >= d) {
                return Err(ClientError::Disconnected);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

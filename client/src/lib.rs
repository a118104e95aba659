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
    FriendRequest(pb::FriendRequestPush),
    FriendAnswer(pb::FriendAnswerPush),
    FriendRemoved(pb::FriendRemovedPush),
    GroupMembership(pb::GroupMembershipPush),
    GroupJoinRequest(pb::GroupJoinRequestPush),
    GroupJoinAnswer(pb::GroupJoinAnswerPush),
    Presence(pb::PresencePush),
    Typing(pb::TypingPush),
    Other(u16, Bytes),
}

fn decode_push(cmd: u16, body: Bytes) -> Result<Push, prost::DecodeError> {
    Ok(match Command::from_id(cmd) {
        Some(Command::MessagePush) => Push::Message(pb::MessagePush::decode(body)?),
        Some(Command::ReceiptPush) => Push::Receipt(pb::ReceiptPush::decode(body)?),
        Some(Command::Kick) => Push::Kick(pb::KickPush::decode(body)?),
        Some(Command::FriendRequestPush) => {
            Push::FriendRequest(pb::FriendRequestPush::decode(body)?)
        }
        Some(Command::FriendAnswerPush) => Push::FriendAnswer(pb::FriendAnswerPush::decode(body)?),
        Some(Command::FriendRemovedPush) => {
            Push::FriendRemoved(pb::FriendRemovedPush::decode(body)?)
        }
        Some(Command::GroupMembershipPush) => {
            Push::GroupMembership(pb::GroupMembershipPush::decode(body)?)
        }
        Some(Command::GroupJoinRequestPush) => {
            Push::GroupJoinRequest(pb::GroupJoinRequestPush::decode(body)?)
        }
        Some(Command::GroupJoinAnswerPush) => {
            Push::GroupJoinAnswer(pb::GroupJoinAnswerPush::decode(body)?)
        }
        Some(Command::PresencePush) => Push::Presence(pb::PresencePush::decode(body)?),
        Some(Command::TypingPush) => Push::Typing(pb::TypingPush::decode(body)?),
        _ => Push::Other(cmd, body),
    })
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
    /// Speak TLS (to the server's `tls.listen`); None: plain TCP.
    pub tls: Option<TlsOptions>,
}

/// How to reach a server's TLS listener.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// PEM file of the certificate authorities to trust. None: the system's bundle
    /// (`$SSL_CERT_FILE`, else /etc/ssl/certs/ca-certificates.crt).
    pub ca_file: Option<std::path::PathBuf>,
    /// The name the certificate must carry. None: the host part of the address.
    pub server_name: Option<String>,
}

impl TlsOptions {
    fn connector(&self) -> Result<tokio_rustls::TlsConnector, ClientError> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::CertificateDer;
        let path = match &self.ca_file {
            Some(p) => p.clone(),
            None => std::env::var_os("SSL_CERT_FILE")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into()),
        };
        let tls_err = |m: String| ClientError::Io(format!("tls: {m}"));
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&path)
            .map_err(|e| tls_err(format!("{}: {e}", path.display())))?;
        for c in certs {
            let c = c.map_err(|e| tls_err(format!("{}: {e}", path.display())))?;
            roots
                .add(c)
                .map_err(|e| tls_err(format!("{}: {e}", path.display())))?;
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let cfg = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    }
}

type BoxRead = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            max_frame_len: mychat_codec::DEFAULT_MAX_FRAME_LEN,
            heartbeat: Some(Duration::from_secs(30)),
            request_timeout: Duration::from_secs(30),
            push_buffer: 4096,
            tls: None,
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
        let (r, w): (BoxRead, BoxWrite) = match &opts.tls {
            None => {
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
            Some(t) => {
                let host = t.server_name.clone().unwrap_or_else(|| {
                    let h = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
                    h.trim_start_matches('[').trim_end_matches(']').to_string()
                });
                let name = rustls_pki_types::ServerName::try_from(host)
                    .map_err(|e| ClientError::Io(format!("tls: server name: {e}")))?;
                let s = t
                    .connector()?
                    .connect(name, stream)
                    .await
                    .map_err(|e| ClientError::Io(format!("tls: {e}")))?;
                let (r, w) = tokio::io::split(s);
                (Box::new(r), Box::new(w))
            }
        };
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
                    let push = decode_push(h.command, f.body);
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
            group_id: 0,
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

impl Client {
    // --- users ---
    pub async fn update_profile(
        &self,
        req: pb::UpdateProfileRequest,
    ) -> Result<pb::User, ClientError> {
        let r: pb::UpdateProfileResponse = self.call(Command::UpdateProfile, &req).await?;
        r.user.ok_or_else(|| ClientError::Decode("no user".into()))
    }
    pub async fn search_users(
        &self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<pb::SearchUsersResponse, ClientError> {
        self.call(
            Command::SearchUsers,
            &pb::SearchUsersRequest {
                prefix: prefix.into(),
                after_username: after.into(),
                limit,
            },
        )
        .await
    }

    // --- friends ---
    /// Ok(true) when the other side had asked first: now friends.
    pub async fn friend_request(&self, user_id: u64, message: &str) -> Result<bool, ClientError> {
        let r: pb::FriendRequestResponse = self
            .call(
                Command::FriendRequest,
                &pb::FriendRequestRequest {
                    user_id,
                    message: message.into(),
                },
            )
            .await?;
        Ok(r.accepted)
    }
    pub async fn friend_accept(&self, user_id: u64) -> Result<(), ClientError> {
        let _: pb::FriendAnswerResponse = self
            .call(Command::FriendAccept, &pb::FriendAnswerRequest { user_id })
            .await?;
        Ok(())
    }
    pub async fn friend_reject(&self, user_id: u64) -> Result<(), ClientError> {
        let _: pb::FriendAnswerResponse = self
            .call(Command::FriendReject, &pb::FriendAnswerRequest { user_id })
            .await?;
        Ok(())
    }
    pub async fn friend_remove(&self, user_id: u64) -> Result<(), ClientError> {
        let _: pb::FriendRemoveResponse = self
            .call(Command::FriendRemove, &pb::FriendRemoveRequest { user_id })
            .await?;
        Ok(())
    }
    pub async fn friend_remark(&self, user_id: u64, remark: &str) -> Result<(), ClientError> {
        let _: pb::FriendRemarkResponse = self
            .call(
                Command::FriendRemark,
                &pb::FriendRemarkRequest {
                    user_id,
                    remark: remark.into(),
                },
            )
            .await?;
        Ok(())
    }
    pub async fn category_create(&self, name: &str) -> Result<u64, ClientError> {
        let r: pb::CategoryCreateResponse = self
            .call(
                Command::CategoryCreate,
                &pb::CategoryCreateRequest { name: name.into() },
            )
            .await?;
        Ok(r.category_id)
    }
    pub async fn category_rename(&self, category_id: u64, name: &str) -> Result<(), ClientError> {
        let _: pb::CategoryRenameResponse = self
            .call(
                Command::CategoryRename,
                &pb::CategoryRenameRequest {
                    category_id,
                    name: name.into(),
                },
            )
            .await?;
        Ok(())
    }
    pub async fn category_delete(&self, category_id: u64) -> Result<(), ClientError> {
        let _: pb::CategoryDeleteResponse = self
            .call(
                Command::CategoryDelete,
                &pb::CategoryDeleteRequest { category_id },
            )
            .await?;
        Ok(())
    }
    pub async fn categories(&self) -> Result<Vec<pb::Category>, ClientError> {
        let r: pb::CategoryListResponse = self
            .call(Command::CategoryList, &pb::CategoryListRequest {})
            .await?;
        Ok(r.categories)
    }
    pub async fn friend_move(&self, user_id: u64, category_id: u64) -> Result<(), ClientError> {
        let _: pb::FriendMoveResponse = self
            .call(
                Command::FriendMove,
                &pb::FriendMoveRequest {
                    user_id,
                    category_id,
                },
            )
            .await?;
        Ok(())
    }
    pub async fn block(&self, user_id: u64) -> Result<(), ClientError> {
        let _: pb::BlockResponse = self
            .call(Command::Block, &pb::BlockRequest { user_id })
            .await?;
        Ok(())
    }
    pub async fn unblock(&self, user_id: u64) -> Result<(), ClientError> {
        let _: pb::BlockResponse = self
            .call(Command::Unblock, &pb::BlockRequest { user_id })
            .await?;
        Ok(())
    }
    pub async fn blocked(&self) -> Result<Vec<pb::User>, ClientError> {
        let r: pb::BlockListResponse = self
            .call(Command::BlockList, &pb::BlockListRequest {})
            .await?;
        Ok(r.users)
    }
    pub async fn friends(
        &self,
        offset: u32,
        limit: u32,
    ) -> Result<pb::FriendListResponse, ClientError> {
        self.call(
            Command::FriendList,
            &pb::FriendListRequest { offset, limit },
        )
        .await
    }
    pub async fn friend_requests(&self) -> Result<Vec<pb::PendingFriendRequest>, ClientError> {
        let r: pb::FriendRequestsResponse = self
            .call(Command::FriendRequests, &pb::FriendRequestsRequest {})
            .await?;
        Ok(r.requests)
    }

    // --- groups ---
    pub async fn group_create(
        &self,
        name: &str,
        member_ids: Vec<u64>,
        policy: pb::JoinPolicy,
    ) -> Result<pb::Group, ClientError> {
        let r: pb::GroupCreateResponse = self
            .call(
                Command::GroupCreate,
                &pb::GroupCreateRequest {
                    name: name.into(),
                    member_ids,
                    join_policy: policy as i32,
                },
            )
            .await?;
        r.group
            .ok_or_else(|| ClientError::Decode("no group".into()))
    }
    pub async fn group_info(&self, group_id: u64) -> Result<pb::GroupInfoResponse, ClientError> {
        self.call(Command::GroupInfo, &pb::GroupInfoRequest { group_id })
            .await
    }
    pub async fn group_update(
        &self,
        req: pb::GroupUpdateRequest,
    ) -> Result<pb::Group, ClientError> {
        let r: pb::GroupUpdateResponse = self.call(Command::GroupUpdate, &req).await?;
        r.group
            .ok_or_else(|| ClientError::Decode("no group".into()))
    }
    async fn group_ok<M: prost::Message>(&self, cmd: Command, m: &M) -> Result<(), ClientError> {
        let _: pb::GroupOkResponse = self.call(cmd, m).await?;
        Ok(())
    }
    pub async fn group_dissolve(&self, group_id: u64) -> Result<(), ClientError> {
        self.group_ok(Command::GroupDissolve, &pb::GroupRef { group_id })
            .await
    }
    pub async fn group_leave(&self, group_id: u64) -> Result<(), ClientError> {
        self.group_ok(Command::GroupLeave, &pb::GroupRef { group_id })
            .await
    }
    pub async fn group_invite(&self, group_id: u64, user_ids: Vec<u64>) -> Result<(), ClientError> {
        self.group_ok(
            Command::GroupInvite,
            &pb::GroupUsersRequest { group_id, user_ids },
        )
        .await
    }
    /// Ok(true): joined; Ok(false): waiting for approval.
    pub async fn group_join(&self, group_id: u64, message: &str) -> Result<bool, ClientError> {
        let r: pb::GroupJoinResponse = self
            .call(
                Command::GroupJoin,
                &pb::GroupJoinRequest {
                    group_id,
                    message: message.into(),
                },
            )
            .await?;
        Ok(r.joined)
    }
    pub async fn group_approve(&self, group_id: u64, user_id: u64) -> Result<(), ClientError> {
        self.group_ok(
            Command::GroupJoinApprove,
            &pb::GroupUserRequest { group_id, user_id },
        )
        .await
    }
    pub async fn group_reject(&self, group_id: u64, user_id: u64) -> Result<(), ClientError> {
        self.group_ok(
            Command::GroupJoinReject,
            &pb::GroupUserRequest { group_id, user_id },
        )
        .await
    }
    pub async fn group_kick(&self, group_id: u64, user_id: u64) -> Result<(), ClientError> {
        self.group_ok(
            Command::GroupKick,
            &pb::GroupUserRequest { group_id, user_id },
        )
        .await
    }
    pub async fn group_transfer(&self, group_id: u64, user_id: u64) -> Result<(), ClientError> {
        self.group_ok(
            Command::GroupTransfer,
            &pb::GroupUserRequest { group_id, user_id },
        )
        .await
    }
    pub async fn group_set_role(
        &self,
        group_id: u64,
        user_id: u64,
        role: pb::GroupRole,
    ) -> Result<(), ClientError> {
        self.group_ok(
            Command::GroupSetRole,
            &pb::GroupSetRoleRequest {
                group_id,
                user_id,
                role: role as i32,
            },
        )
        .await
    }
    pub async fn group_mute(
        &self,
        group_id: u64,
        user_id: u64,
        seconds: u32,
    ) -> Result<(), ClientError> {
        self.group_ok(
            Command::GroupMute,
            &pb::GroupMuteRequest {
                group_id,
                user_id,
                seconds,
            },
        )
        .await
    }
    pub async fn group_members(
        &self,
        group_id: u64,
        offset: u32,
        limit: u32,
    ) -> Result<pb::GroupMembersResponse, ClientError> {
        self.call(
            Command::GroupMembers,
            &pb::GroupMembersRequest {
                group_id,
                offset,
                limit,
            },
        )
        .await
    }
    pub async fn groups(&self) -> Result<Vec<pb::Group>, ClientError> {
        let r: pb::GroupListResponse = self
            .call(Command::GroupList, &pb::GroupListRequest {})
            .await?;
        Ok(r.groups)
    }
    pub async fn group_join_requests(
        &self,
        group_id: u64,
    ) -> Result<Vec<pb::GroupJoinRequestPush>, ClientError> {
        let r: pb::GroupJoinRequestsResponse = self
            .call(Command::GroupJoinRequests, &pb::GroupRef { group_id })
            .await?;
        Ok(r.requests)
    }
    /// Sends a text to a group with a fresh client message id.
    pub async fn send_group_text(
        &self,
        group_id: u64,
        text: &str,
    ) -> Result<pb::SendMessageResponse, ClientError> {
        self.send(pb::SendMessageRequest {
            to_user_id: 0,
            group_id,
            client_msg_id: new_client_msg_id(),
            kind: pb::MessageKind::Text as i32,
            text: text.into(),
            payload: Bytes::new(),
        })
        .await
    }

    // --- recall, delete ---
    pub async fn recall(&self, message_id: u64) -> Result<u64, ClientError> {
        let r: pb::RecallResponse = self
            .call(Command::Recall, &pb::RecallRequest { message_id })
            .await?;
        Ok(r.notice_seq)
    }
    pub async fn delete_for_me(&self, message_ids: Vec<u64>) -> Result<(), ClientError> {
        let _: pb::DeleteForMeResponse = self
            .call(
                Command::DeleteForMe,
                &pb::DeleteForMeRequest { message_ids },
            )
            .await?;
        Ok(())
    }

    // --- presence ---
    pub async fn presence_set(&self, status: pb::PresenceStatus) -> Result<(), ClientError> {
        let _: pb::PresenceSetResponse = self
            .call(
                Command::PresenceSet,
                &pb::PresenceSetRequest {
                    status: status as i32,
                },
            )
            .await?;
        Ok(())
    }
    pub async fn presence(&self, user_ids: Vec<u64>) -> Result<Vec<pb::UserPresence>, ClientError> {
        let r: pb::PresenceGetResponse = self
            .call(Command::PresenceGet, &pb::PresenceGetRequest { user_ids })
            .await?;
        Ok(r.presences)
    }
    pub async fn presence_subscribe(
        &self,
        user_ids: Vec<u64>,
    ) -> Result<Vec<pb::UserPresence>, ClientError> {
        let r: pb::PresenceSubscribeResponse = self
            .call(
                Command::PresenceSubscribe,
                &pb::PresenceSubscribeRequest { user_ids },
            )
            .await?;
        Ok(r.presences)
    }
    pub async fn typing(
        &self,
        to_user_id: u64,
        group_id: u64,
        typing: bool,
    ) -> Result<(), ClientError> {
        let _: pb::TypingResponse = self
            .call(
                Command::Typing,
                &pb::TypingRequest {
                    to_user_id,
                    group_id,
                    typing,
                },
            )
            .await?;
        Ok(())
    }
}

/// A random client message id (128 bits, hex).
pub fn new_client_msg_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// What a [`Session`] yields.
#[derive(Debug, Clone)]
pub enum Event {
    /// A message (1:1 in the order of the user's stream; group messages in each
    /// group's seq order), live or caught up by sync.
    Message(pb::Message),
    Receipt(pb::Receipt),
    Friend(pb::FriendEvent),
    /// This user joined or left a group.
    Group(pb::GroupMembership),
    GroupJoinRequest(pb::GroupJoinRequestPush),
    GroupJoinAnswer(pb::GroupJoinAnswerPush),
    Presence(pb::UserPresence),
    Typing(pb::TypingPush),
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
    /// Per group, the last seq this device already holds (a client keeps these with
    /// its local messages); groups not listed start from the user's read mark.
    pub group_cursors: HashMap<u64, u64>,
}

/// A logged-in device that reconnects and re-syncs by itself. See the crate docs.
pub struct Session {
    opts: SessionOptions,
    client: Option<Arc<Client>>,
    pushes: Option<mpsc::Receiver<Push>>,
    /// The last pts this device holds, once known.
    pts: Option<u64>,
    acked: Option<u64>,
    /// Per group: the last seq this device holds.
    group_seqs: HashMap<u64, u64>,
    queue: VecDeque<Event>,
    pub user_id: u64,
}

impl Session {
    /// Connects, logs in and syncs (the first events are what the device missed).
    pub async fn start(opts: SessionOptions) -> Result<Session, ClientError> {
        let group_seqs = opts.group_cursors.clone();
        let mut s = Session {
            opts,
            client: None,
            pushes: None,
            pts: None,
            acked: None,
            group_seqs,
            queue: VecDeque::new(),
            user_id: 0,
        };
        s.connect_once().await?;
        Ok(s)
    }

    /// Per group, the last seq this device holds (to keep for the next session).
    pub fn group_cursors(&self) -> &HashMap<u64, u64> {
        &self.group_seqs
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
        let c = Arc::new(c);
        self.client = Some(c.clone());
        self.pushes = pushes;
        self.catch_up(&c).await
    }

    fn stream_event(&mut self, ev: pb::update::Event) {
        match ev {
            pb::update::Event::Message(m) => {
                if m.group_id != 0 {
                    let last = self.group_seqs.entry(m.group_id).or_insert(0);
                    *last = (*last).max(m.seq);
                }
                self.queue.push_back(Event::Message(m))
            }
            pb::update::Event::Receipt(r) => self.queue.push_back(Event::Receipt(r)),
            pb::update::Event::Friend(f) => self.queue.push_back(Event::Friend(f)),
            pb::update::Event::Group(g) => {
                if !g.member {
                    self.group_seqs.remove(&g.group_id);
                }
                self.queue.push_back(Event::Group(g))
            }
        }
    }

    /// Syncs from what this device holds (the server's cursor the first time), then
    /// pulls the groups that moved on.
    async fn catch_up(&mut self, c: &Client) -> Result<(), ClientError> {
        let mut since = self.pts;
        loop {
            let page = c.sync(since, 0).await?;
            for u in page.updates {
                if u.pts != 0 && self.pts.is_some_and(|p| u.pts <= p) {
                    continue;
                }
                if let Some(ev) = u.event {
                    self.stream_event(ev);
                }
                if u.pts != 0 {
                    self.pts = Some(u.pts);
                }
            }
            self.pts = Some(self.pts.unwrap_or(0).max(page.pts));
            since = self.pts;
            if !page.has_more {
                for h in page.groups {
                    let from = self
                        .group_seqs
                        .get(&h.group_id)
                        .copied()
                        .unwrap_or(h.read_seq)
                        .max(h.read_seq);
                    if from < h.last_seq {
                        self.pull_group(c, h.group_id, from).await?;
                    }
                }
                return Ok(());
            }
        }
    }

    /// Fetches a group's messages after `from` into the queue.
    async fn pull_group(
        &mut self,
        c: &Client,
        group: u64,
        mut from: u64,
    ) -> Result<(), ClientError> {
        loop {
            let h = c
                .history(pb::HistoryRequest {
                    group_id: group,
                    after_seq: from,
                    limit: 0,
                    ..Default::default()
                })
                .await?;
            for m in h.messages {
                from = from.max(m.seq);
                self.group_seqs.insert(group, from);
                self.queue.push_back(Event::Message(m));
            }
            if !h.has_more {
                return Ok(());
            }
        }
    }

    /// A live group message: in order → yield; old → drop; gap → pull.
    async fn on_group(&mut self, m: pb::Message) -> Result<(), ClientError> {
        let g = m.group_id;
        let last = self.group_seqs.get(&g).copied();
        match last {
            Some(l) if m.seq <= l => Ok(()),
            Some(l) if m.seq > l + 1 => {
                let c = self.client.clone().ok_or(ClientError::Disconnected)?;
                self.pull_group(&c, g, l).await
            }
            _ => {
                self.group_seqs.insert(g, m.seq);
                self.queue.push_back(Event::Message(m));
                Ok(())
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
            let r = match next {
                None => {
                    // Disconnected.
                    self.client = None;
                    self.pushes = None;
                    Ok(())
                }
                Some(Push::Message(mp)) => match mp.message {
                    Some(m) if m.group_id != 0 && mp.pts == 0 => self.on_group(m).await,
                    Some(m) => self.on_stream(mp.pts, pb::update::Event::Message(m)).await,
                    None => Ok(()),
                },
                Some(Push::Receipt(rp)) => match rp.receipt {
                    Some(r) if rp.pts == 0 => {
                        self.queue.push_back(Event::Receipt(r));
                        Ok(())
                    }
                    Some(r) => self.on_stream(rp.pts, pb::update::Event::Receipt(r)).await,
                    None => Ok(()),
                },
                Some(Push::FriendRequest(p)) => {
                    let ev = pb::FriendEvent {
                        kind: pb::friend_event::Kind::RequestReceived as i32,
                        user: p.from.map(|u| u.id).unwrap_or(0),
                        message: p.message,
                        time_ms: p.time_ms,
                    };
                    self.on_stream(p.pts, pb::update::Event::Friend(ev)).await
                }
                Some(Push::FriendAnswer(p)) => {
                    let kind = if p.accepted {
                        pb::friend_event::Kind::Accepted
                    } else {
                        pb::friend_event::Kind::Rejected
                    };
                    let ev = pb::FriendEvent {
                        kind: kind as i32,
                        user: p.user_id,
                        message: String::new(),
                        time_ms: 0,
                    };
                    self.on_stream(p.pts, pb::update::Event::Friend(ev)).await
                }
                Some(Push::FriendRemoved(p)) => {
                    let ev = pb::FriendEvent {
                        kind: pb::friend_event::Kind::Removed as i32,
                        user: p.user_id,
                        message: String::new(),
                        time_ms: 0,
                    };
                    self.on_stream(p.pts, pb::update::Event::Friend(ev)).await
                }
                Some(Push::GroupMembership(p)) => match p.membership {
                    Some(m) => self.on_stream(p.pts, pb::update::Event::Group(m)).await,
                    None => Ok(()),
                },
                Some(Push::GroupJoinRequest(p)) => {
                    self.queue.push_back(Event::GroupJoinRequest(p));
                    Ok(())
                }
                Some(Push::GroupJoinAnswer(p)) => {
                    self.queue.push_back(Event::GroupJoinAnswer(p));
                    Ok(())
                }
                Some(Push::Presence(p)) => {
                    if let Some(p) = p.presence {
                        self.queue.push_back(Event::Presence(p));
                    }
                    Ok(())
                }
                Some(Push::Typing(t)) => {
                    self.queue.push_back(Event::Typing(t));
                    Ok(())
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
                    Ok(())
                }
                Some(Push::Other(..)) => Ok(()),
            };
            match r {
                Ok(()) => {}
                Err(ClientError::Disconnected) | Err(ClientError::Timeout) => {
                    self.client = None;
                    self.pushes = None;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A stream event with its pts: in order → yield; old → drop; gap → sync.
    async fn on_stream(&mut self, pts: u64, ev: pb::update::Event) -> Result<(), ClientError> {
        let have = self.pts.unwrap_or(0);
        if pts <= have {
            return Ok(());
        }
        if pts == have + 1 {
            self.pts = Some(pts);
            self.stream_event(ev);
            return Ok(());
        }
        let c = self.client.clone().ok_or(ClientError::Disconnected)?;
        self.catch_up(&c).await
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

//! Starting and stopping a server: the shared state, the acceptor thread and the shard
//! threads.
//!
//! Threads: `mychat-acceptor` (accepts, places each socket on the least-loaded shard),
//! `mychat-shard-N` (each a current-thread tokio runtime owning its connections), and
//! the store's own threads. Shutdown: stop accepting → every shard kicks its clients
//! (SERVER_SHUTDOWN) after their in-flight requests finish → shards exit (or are
//! abandoned at the deadline) → the store commits what is queued and checkpoints.

use crate::auth::{PasswordHasherCfg, Throttle, TokenKey};
use crate::directory::Directory;
use crate::ids::{ConnId, ShardId};
use crate::metrics::Metrics;
use crate::shard::{self, ShardMsg};
use crate::store::{sqlite::SqliteStore, Store};
use mychat_config::Config;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// State shared by every thread of one server.
pub struct Shared {
    pub cfg: Config,
    pub store: Arc<dyn Store>,
    pub dir: Directory,
    pub shards: Vec<ShardHandle>,
    pub tokens: TokenKey,
    pub hasher: PasswordHasherCfg,
    /// A valid hash of nothing anyone knows: verified against when a login names an
    /// unknown user, so that case costs as much as a wrong password.
    pub dummy_hash: String,
    pub login_failures: Throttle,
    pub registrations: Throttle,
    /// Connections open now (all shards).
    pub connections: AtomicUsize,
    next_conn: AtomicU64,
    pub shutting_down: AtomicBool,
    /// Sessions subscribed to users' presence.
    pub watchers: crate::presence::Watchers,
    pub last_seen: crate::presence::LastSeen,
    /// Counters of limits hit (and the metrics endpoint's source).
    pub metrics: crate::metrics::Metrics,
    /// Connections open per source address (`server.max_connections_per_addr`).
    pub per_addr: crate::limits::PerAddr,
    /// SEND_MESSAGE buckets per user (`messages.sends_per_sec`).
    pub send_buckets: crate::limits::UserBuckets,
    /// The TLS listener's rustls config, when `[tls]` sets one up.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Shared {
    /// Gives back the slots an accepted connection held (global, shard, address).
    pub fn conn_closed(&self, shard: usize, ip: std::net::IpAddr) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
        self.shards[shard].load.fetch_sub(1, Ordering::Relaxed);
        self.per_addr.release(ip);
    }

    pub fn next_conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }
}

/// Another thread's view of a shard: its inbox and how many connections it holds.
pub struct ShardHandle {
    pub tx: mpsc::Sender<ShardMsg>,
    pub load: AtomicUsize,
    /// Bytes queued on this shard's connections, unwritten (written by the shard only).
    pub out_bytes: AtomicUsize,
}

/// A running server. Dropping it does not stop it: call [`ServerHandle::shutdown`].
pub struct ServerHandle {
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    /// To stop the dispatcher (an empty batch) once the store is flushed.
    dispatch_tx: crate::batchq::Sender<Vec<crate::store::Publication>>,
    shared: Arc<Shared>,
    stop_accept: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS listener's address, when `[tls]` configures one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Graceful stop, within `server.shutdown_deadline_ms`. Safe to call from inside
    /// or outside a tokio runtime.
    pub async fn shutdown(self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            self.shutdown_blocking();
            let _ = tx.send(());
        });
        let _ = rx.await;
    }

    /// Graceful stop from a thread that is not a runtime's.
    pub fn shutdown_blocking(self) {
        let deadline = std::time::Instant::now()
            + Duration::from_millis(self.shared.cfg.server.shutdown_deadline_ms);
        self.shared.shutting_down.store(true, Ordering::Release);
        let _ = self.stop_accept.send(true);
        for s in &self.shared.shards {
            // blocking_send: we are on a plain thread; the shard drains its inbox.
            let _ = s.tx.blocking_send(ShardMsg::Shutdown);
        }
        for t in self.threads {
            // Shards bound their own wait by the deadline.
            let _ = t.join();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let store = self.shared.store.clone();
        let left = deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_secs(1));
        let flushed = rt.block_on(async { tokio::time::timeout(left, store.shutdown()).await });
        match flushed {
            Ok(Ok(())) => tracing::info!("store flushed; stopped"),
            Ok(Err(e)) => tracing::error!(error = %e, "store shutdown failed"),
            Err(_) => tracing::error!("store flush passed the shutdown deadline"),
        }
        let _ = self.dispatch_tx.send(Vec::new());
    }
}

/// Opens the store, binds the listener and starts every thread.
pub fn start(cfg: Config) -> anyhow::Result<ServerHandle> {
    let data_dir = cfg.server.data_dir.clone();
    let store: Arc<dyn Store> = match cfg.store.backend {
        mychat_config::Backend::Embedded => SqliteStore::open(&data_dir, &cfg.store)
            .map_err(|e| anyhow::anyhow!("opening the store in {}: {e}", data_dir.display()))?,
    };
    let tokens = TokenKey::load(&cfg.auth.token_key, &data_dir)?;
    let hasher = PasswordHasherCfg::new(&cfg.auth)?;
    let dummy_hash = hasher
        .hash("mychat-dummy-password-never-valid")
        .map_err(|e| anyhow::anyhow!(e))?;
    let listener = bind(
        "server.listen",
        cfg.server.listen,
        cfg.server.listen_backlog,
    )?;
    let addr = listener.local_addr()?;
    let (tls, tls_listener) = match cfg.tls.listen_addr() {
        Some(a) => (
            Some(crate::tls::server_config(&cfg.tls)?),
            Some(bind("tls.listen", a, cfg.server.listen_backlog)?),
        ),
        None => (None, None),
    };
    let tls_addr = match &tls_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let n = cfg.shard_count();
    let mut inboxes = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = mpsc::channel(cfg.server.shard_queue_depth);
        handles.push(ShardHandle {
            tx,
            load: AtomicUsize::new(0),
            out_bytes: AtomicUsize::new(0),
        });
        inboxes.push(rx);
    }
    let window = Duration::from_secs(cfg.auth.failed_login_window_secs);
    let shared = Arc::new(Shared {
        dir: Directory::new(cfg.auth.multi_device, cfg.auth.max_sessions_per_user),
        store,
        shards: handles,
        tokens,
        hasher,
        dummy_hash,
        login_failures: Throttle::new(window, 100_000),
        registrations: Throttle::new(Duration::from_secs(60), 100_000),
        connections: AtomicUsize::new(0),
        next_conn: AtomicU64::new(1),
        shutting_down: AtomicBool::new(false),
        watchers: Default::default(),
        last_seen: Default::default(),
        tls,
        metrics: Default::default(),
        per_addr: Default::default(),
        send_buckets: crate::limits::UserBuckets::new(
            cfg.messages.sends_per_sec,
            cfg.messages.send_burst,
        ),
        cfg,
    });
    let mut threads = Vec::with_capacity(n + 1);
    for (i, rx) in inboxes.into_iter().enumerate() {
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("mychat-shard-{i}"))
                .spawn(move || shard::run(ShardId(i), sh, rx))?,
        );
    }
    let (dispatch_tx, dispatch_rx) = crate::batchq::bounded(crate::dispatch::QUEUE);
    let publish_tx = dispatch_tx.clone();
    shared.store.set_publisher(Arc::new(move |pubs| {
        // Blocks the writer while the dispatcher is behind: back-pressure.
        let _ = publish_tx.send(pubs);
    }));
    let sh = shared.clone();
    std::thread::Builder::new()
        .name("mychat-dispatch".into())
        .spawn(move || crate::dispatch::run(sh, dispatch_rx))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let sh = shared.clone();
    threads.push(
        std::thread::Builder::new()
            .name("mychat-acceptor".into())
            .spawn({
                let stop_rx = stop_rx.clone();
                move || accept_loop(sh, listener, stop_rx, false)
            })?,
    );
    if let Some(tl) = tls_listener {
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("mychat-acceptor-tls".into())
                .spawn(move || accept_loop(sh, tl, stop_rx, true))?,
        );
    }
    if let Ok(maddr) = shared
        .cfg
        .server
        .metrics_listen
        .trim()
        .parse::<SocketAddr>()
    {
        let ml = std::net::TcpListener::bind(maddr)
            .map_err(|e| anyhow::anyhow!("server.metrics_listen: cannot bind {maddr}: {e}"))?;
        tracing::info!(addr = %ml.local_addr()?, "metrics at /metrics");
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("mychat-metrics".into())
            .spawn(move || crate::metrics::serve(sh, ml))?;
    }
    tracing::info!(%addr, tls = ?tls_addr, shards = n, "mychat listening");
    Ok(ServerHandle {
        addr,
        tls_addr,
        dispatch_tx,
        shared,
        stop_accept: stop_tx,
        threads,
    })
}

/// Binds a listener with the configured backlog (std's bind uses 128, and bursts of
/// connects past it are dropped); errors name the config key.
fn bind(key: &str, at: SocketAddr, backlog: u32) -> anyhow::Result<std::net::TcpListener> {
    let bind_err = |e: std::io::Error| anyhow::anyhow!("{key}: cannot bind {at}: {e}");
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(at),
        socket2::Type::STREAM,
        None,
    )
    .map_err(bind_err)?;
    sock.set_reuse_address(true).map_err(bind_err)?;
    sock.bind(&at.into()).map_err(bind_err)?;
    sock.listen(backlog as i32).map_err(bind_err)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Accepts connections and hands each to the shard holding the fewest (`tls`: they
/// came to the TLS listener).
fn accept_loop(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    mut stop: watch::Receiver<bool>,
    tls: bool,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("acceptor runtime");
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "acceptor: cannot register the listener");
                return;
            }
        };
        let max = shared.cfg.server.max_connections;
        let per_addr = shared.cfg.server.max_connections_per_addr;
        let sndbuf = shared.cfg.server.socket_send_buffer_bytes;
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stop.changed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            if sndbuf > 0 {
                let _ = socket2::SockRef::from(&stream).set_send_buffer_size(sndbuf);
            }
            if shared.connections.load(Ordering::Acquire) >= max {
                Metrics::inc(&shared.metrics.connections_refused_max_total);
                refuse(stream, "too many connections").await;
                continue;
            }
            if !shared.per_addr.acquire(peer.ip(), per_addr) {
                Metrics::inc(&shared.metrics.connections_refused_addr_total);
                refuse(stream, "too many connections from this address").await;
                continue;
            }
            Metrics::inc(&shared.metrics.connections_accepted_total);
            shared.connections.fetch_add(1, Ordering::AcqRel);
            let target = shared
                .shards
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.load.load(Ordering::Relaxed))
                .map(|(i, _)| i)
                .unwrap_or(0);
            shared.shards[target].load.fetch_add(1, Ordering::Relaxed);
            let std_stream = match stream.into_std() {
                Ok(s) => s,
                Err(_) => {
                    shared.conn_closed(target, peer.ip());
                    continue;
                }
            };
            if shared.shards[target]
                .tx
                .send(ShardMsg::NewConn(std_stream, peer, tls))
                .await
                .is_err()
            {
                shared.conn_closed(target, peer.ip());
                return;
            }
        }
    });
}

/// Best effort: an UNAVAILABLE error frame (command 0, seq 0), then close.
async fn refuse(stream: tokio::net::TcpStream, why: &str) {
    use prost::Message as _;
    let body = mychat_proto::Error {
        code: mychat_proto::ErrorCode::Unavailable as u32,
        message: why.into(),
    }
    .encode_to_vec();
    let frame = mychat_codec::frame_bytes(mychat_codec::Header::error(0, 0), &body);
    let _ = stream.try_write(&frame);
}

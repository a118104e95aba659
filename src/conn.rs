//! One client connection: its read loop, its coalesced writes, its timers and its
//! session state. One task per connection; requests run as futures inside that task
//! (at most `server.max_inflight_per_conn` at once), never as tasks of their own.
//!
//! Lifecycle: accepted → (HELLO, REGISTER, LOGIN …) → logged in (registered in the
//! directory) → closing (kicked, timed out, bad frame, peer gone) → in-flight requests
//! answered → KICK push (if kicked) flushed → closed. The drop guard unregisters the
//! session and gives the connection slot back, however the task ends (a panic too).
//!
//! Writes: responses and pushes are appended to one `BytesMut`; each wakeup writes as
//! much of it as the socket takes (one write for many frames). Its size is bounded by
//! `server.outbound_buffer_bytes`: past it the connection is closed as a slow consumer
//! (its messages are stored; it re-syncs when it comes back). The shard's connections
//! together are bounded by their share of `server.outbound_total_bytes`: while the
//! shard is past it, a push to a connection already holding [`FAIR_SHARE`] unread bytes
//! closes that connection the same way. So however many readers stall, what they pin
//! is at most the total budget plus one fair share each (bounded by max_connections).
//!
//! Requests: each connection has a token bucket (`server.requests_per_sec`,
//! `server.request_burst`); a request finding it empty is answered RATE_LIMITED
//! without being served, and the connection stays open (PROTOCOL.md).

use crate::directory::SessionRef;
use crate::ids::{ConnId, UserId};
use crate::limits::TokenBucket;
use crate::metrics::Metrics;
use crate::router;
use crate::shard::ShardCtx;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use mychat_codec::{FrameCodec, FrameError, Header};
use mychat_proto::{Command, ErrorCode, KickPush, KickReason, Platform};
use prost::Message as _;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::codec::Decoder;

/// Unread bytes a connection may hold even while its shard is over its outbound budget.
pub const FAIR_SHARE: usize = 64 * 1024;

/// The logged-in identity of a connection.
#[derive(Clone, Debug)]
pub struct Session {
    pub user: UserId,
    pub username: String,
    pub device_id: Arc<str>,
    pub platform: Platform,
    /// This device's sync cursor as last stored (None: never synced).
    pub cursor: Option<u64>,
}

/// Why a connection is closing.
#[derive(Clone, Debug)]
pub enum Closing {
    /// Send a KICK push with this reason, then close.
    Kick(KickReason, &'static str),
    /// An error frame (command 0, seq 0) is already queued; close after it.
    FrameError,
}

/// The part of a connection other tasks of its shard touch: its outbound buffer, its
/// wakeup, its session and its closing state.
pub struct ConnShared {
    pub id: ConnId,
    pub peer: SocketAddr,
    out: RefCell<BytesMut>,
    /// Bytes left of the frame at the front of `out` whose writing has begun (0: `out`
    /// starts at a frame boundary). Lets a slow consumer's queue be dropped down to a
    /// frame boundary, so its KICK goes out next instead of behind megabytes.
    head_left: Cell<usize>,
    wake: Notify,
    pub session: RefCell<Option<Session>>,
    closing: RefCell<Option<Closing>>,
    /// Set once a LOGIN succeeded on this connection (for login_timeout).
    logged_in_once: Cell<bool>,
    /// Users whose presence this session subscribed to.
    pub watching: RefCell<Vec<UserId>>,
    /// TYPING token bucket: tokens and when it was last filled.
    typing: Cell<(f64, std::time::Instant)>,
}

impl ConnShared {
    /// Appends an encoded frame unless the connection is closing; closes it as a slow
    /// consumer when the outbound bound would be passed.
    pub fn push(&self, frame: &[u8], ctx: &ShardCtx) {
        if self.closing.borrow().is_some() {
            return;
        }
        let bound = ctx.shared.cfg.server.outbound_buffer_bytes;
        let mut out = self.out.borrow_mut();
        if out.len() + frame.len() > bound || (out.len() >= FAIR_SHARE && ctx.out_over_budget()) {
            // It is cut off: drop what it has not read (all of it is stored, and it
            // re-syncs), keeping the rest of a frame already half written, so that the
            // KICK is the next thing it reads and the memory is free at once.
            let keep = self.head_left.get().min(out.len());
            ctx.out_sub(out.len() - keep);
            out.truncate(keep);
            drop(out);
            self.kick(
                KickReason::SlowConsumer,
                "outbound buffer full: reconnect and sync",
            );
            return;
        }
        let was_empty = out.is_empty();
        out.extend_from_slice(frame);
        ctx.out_add(frame.len());
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Appends a response frame; responses are never refused (they are bounded by the
    /// in-flight limit) but a closing connection drops them.
    fn push_response(&self, frame: &[u8], ctx: &ShardCtx) {
        self.out.borrow_mut().extend_from_slice(frame);
        ctx.out_add(frame.len());
    }

    /// Removes `n` written bytes from the front of `out`, tracking frame boundaries.
    fn consumed(&self, out: &mut BytesMut, mut n: usize) {
        while n > 0 {
            let mut left = self.head_left.get();
            if left == 0 {
                // At a boundary: this frame's size is its length field plus 4.
                left = u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize + 4;
            }
            let take = n.min(left);
            out.advance(take);
            n -= take;
            self.head_left.set(left - take);
        }
    }

    /// Starts closing with a KICK push (the first reason wins).
    pub fn kick(&self, reason: KickReason, why: &'static str) {
        let mut c = self.closing.borrow_mut();
        if c.is_none() {
            *c = Some(Closing::Kick(reason, why));
            self.wake.notify_one();
        }
    }

    pub fn session(&self) -> Option<Session> {
        self.session.borrow().clone()
    }

    pub fn user(&self) -> Option<UserId> {
        self.session.borrow().as_ref().map(|s| s.user)
    }

    pub fn set_cursor(&self, pts: u64) {
        if let Some(s) = self.session.borrow_mut().as_mut() {
            s.cursor = Some(s.cursor.unwrap_or(0).max(pts));
        }
    }

    /// Takes one TYPING token (`rate` per second, burst twice that); false when none.
    pub fn take_typing_token(&self, rate: u32) -> bool {
        let (tokens, at) = self.typing.get();
        let now = std::time::Instant::now();
        let burst = 2.0 * rate as f64;
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * rate as f64).min(burst);
        if tokens >= 1.0 {
            self.typing.set((tokens - 1.0, now));
            true
        } else {
            self.typing.set((tokens, now));
            false
        }
    }

    pub fn mark_logged_in(&self) {
        self.logged_in_once.set(true);
    }

    pub fn session_ref(&self, ctx: &ShardCtx) -> Option<SessionRef> {
        self.session.borrow().as_ref().map(|s| SessionRef {
            shard: ctx.id,
            conn: self.id,
            platform: s.platform,
            device_id: s.device_id.clone(),
            away: false,
        })
    }
}

/// Gives back what a connection held, however its task ends.
struct Guard {
    ctx: Rc<ShardCtx>,
    conn: Rc<ConnShared>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let session = self.conn.session.borrow_mut().take();
        if let Some(s) = session {
            let (before, after) = self
                .ctx
                .shared
                .dir
                .unregister(s.user, self.ctx.id, self.conn.id);
            self.ctx.presence_changed(s.user, before, after);
        }
        for u in self.conn.watching.borrow_mut().drain(..) {
            self.ctx
                .shared
                .watchers
                .remove(u, (self.ctx.id, self.conn.id));
        }
        self.ctx.conns.borrow_mut().remove(&self.conn.id);
        let unwritten = std::mem::take(&mut *self.conn.out.borrow_mut());
        self.ctx.out_sub(unwritten.len());
        self.ctx
            .shared
            .conn_closed(self.ctx.id.0, self.conn.peer.ip());
    }
}

type Reply = Pin<Box<dyn Future<Output = (Bytes, bool)>>>;

/// A connection's byte stream: the socket, and rustls over it for a TLS connection.
/// Both are driven the same way: readiness from tokio, then non-blocking reads and
/// writes until WouldBlock.
struct Io {
    stream: TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
}

/// `std::io` over a tokio socket's non-blocking calls (WouldBlock passes through): what
/// rustls reads TLS records from and writes them to.
struct SockIo<'a>(&'a TcpStream);

impl std::io::Read for SockIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl std::io::Write for SockIo<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a read found.
enum ReadOutcome {
    Data,
    WouldBlock,
    Eof,
}

impl Io {
    /// Reads what is available (plaintext, for TLS) into `rbuf`.
    fn read_into(&mut self, rbuf: &mut BytesMut) -> ReadOutcome {
        use std::io::{ErrorKind, Read as _};
        let Some(tls) = self.tls.as_mut() else {
            if rbuf.capacity() - rbuf.len() < 1024 {
                rbuf.reserve(4096);
            }
            // One read per wakeup, as tokio's own `poll_read` does: a read that leaves
            // part of the buffer unfilled has drained the socket, so its readiness is
            // cleared here instead of by a second read that returns WouldBlock (that
            // was one `recvfrom` in two, measured at one-to-one 20,000 msgs/s). Safe
            // against a race: tokio clears readiness only if no new event arrived
            // since it was observed, and never clears a seen end of stream.
            let stream = &self.stream;
            let mut drained = false;
            let r = stream.try_io(Interest::READABLE, || {
                let spare = rbuf.spare_capacity_mut();
                let room = spare.len();
                let n = socket2::SockRef::from(stream).recv(spare)?;
                // SAFETY: recv initialised the first n bytes of the spare capacity.
                unsafe { rbuf.set_len(rbuf.len() + n) };
                if n > 0 && n < room {
                    drained = true;
                    return Err(ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            return match r {
                _ if drained => ReadOutcome::Data,
                Ok(0) => ReadOutcome::Eof,
                Ok(_) => ReadOutcome::Data,
                Err(e) if e.kind() == ErrorKind::WouldBlock => ReadOutcome::WouldBlock,
                Err(_) => ReadOutcome::Eof,
            };
        };
        let mut eof = false;
        match tls.read_tls(&mut SockIo(&self.stream)) {
            Ok(0) => eof = true,
            Ok(_) => {
                if tls.process_new_packets().is_err() {
                    // Send the alert rustls prepared, then give up on the peer.
                    let _ = tls.write_tls(&mut SockIo(&self.stream));
                    return ReadOutcome::Eof;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return ReadOutcome::WouldBlock,
            Err(_) => return ReadOutcome::Eof,
        }
        let mut got = false;
        let mut tmp = [0u8; 4096];
        loop {
            match tls.reader().read(&mut tmp) {
                Ok(0) => {
                    eof = true; // close_notify
                    break;
                }
                Ok(n) => {
                    rbuf.extend_from_slice(&tmp[..n]);
                    got = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        // Handshake messages (and anything else rustls owes the peer) go out now.
        while tls.wants_write() {
            if tls.write_tls(&mut SockIo(&self.stream)).is_err() {
                break;
            }
        }
        match (got, eof) {
            (true, _) => ReadOutcome::Data,
            (false, true) => ReadOutcome::Eof,
            (false, false) => ReadOutcome::WouldBlock,
        }
    }

    /// Whether bytes wait to be written below the outbound buffer (TLS records).
    fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }
}

/// Takes a socket handed to this shard and starts its task.
pub fn spawn(ctx: Rc<ShardCtx>, stream: std::net::TcpStream, peer: SocketAddr, tls: bool) {
    let id = ctx.shared.next_conn_id();
    let conn = Rc::new(ConnShared {
        id,
        peer,
        out: RefCell::new(BytesMut::new()),
        head_left: Cell::new(0),
        wake: Notify::new(),
        session: RefCell::new(None),
        closing: RefCell::new(None),
        logged_in_once: Cell::new(false),
        watching: RefCell::new(Vec::new()),
        typing: Cell::new((
            2.0 * ctx.shared.cfg.presence.typing_per_sec as f64,
            std::time::Instant::now(),
        )),
    });
    ctx.conns.borrow_mut().insert(id, conn.clone());
    let guard = Guard {
        ctx: ctx.clone(),
        conn: conn.clone(),
    };
    tokio::task::spawn_local(async move {
        let stream = match stream
            .set_nonblocking(true)
            .and_then(|_| TcpStream::from_std(stream))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register a connection");
                drop(guard);
                return;
            }
        };
        let tls = match (tls, ctx.shared.tls.as_ref()) {
            (true, Some(cfg)) => match rustls::ServerConnection::new(cfg.clone()) {
                Ok(c) => Some(Box::new(c)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a TLS session");
                    drop(guard);
                    return;
                }
            },
            _ => None,
        };
        run(guard, Io { stream, tls }).await;
    });
}

fn error_frame(command: u16, seq: u32, code: ErrorCode, message: &str) -> Bytes {
    let body = mychat_proto::Error {
        code: code as u32,
        message: message.to_string(),
    }
    .encode_to_vec();
    mychat_codec::frame_bytes(Header::error(command, seq), &body)
}

async fn run(guard: Guard, mut io: Io) {
    let ctx = guard.ctx.clone();
    let conn = guard.conn.clone();
    let cfg = &ctx.shared.cfg.server;
    let max_inflight = cfg.max_inflight_per_conn;
    let login_deadline = Instant::now() + Duration::from_millis(cfg.login_timeout_ms);
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    let mut last_frame = Instant::now();
    let mut codec = FrameCodec::new(cfg.max_frame_len);
    let mut rbuf = BytesMut::new();
    let mut inflight: FuturesUnordered<Reply> = FuturesUnordered::new();
    // A LOGIN or LOGOUT in flight: nothing else starts until it is answered.
    let mut barrier = false;
    // A LOGIN/LOGOUT decoded while other requests were in flight, waiting for them.
    let mut held: Option<mychat_codec::Frame> = None;
    let mut eof = false;
    let (rate, burst) = (cfg.requests_per_sec, cfg.request_burst);
    let mut bucket = TokenBucket::full(burst, std::time::Instant::now());
    let timer = tokio::time::sleep_until(login_deadline.min(last_frame + idle));
    tokio::pin!(timer);

    loop {
        // 1. Start requests from what is buffered.
        while conn.closing.borrow().is_none() && !barrier && inflight.len() < max_inflight {
            let (next, fresh) = match held.take() {
                Some(frame) => (Ok(Some(frame)), false),
                None => (codec.decode(&mut rbuf), true),
            };
            match next {
                Ok(Some(frame)) => {
                    // One clock read per frame serves the idle timer and the bucket.
                    last_frame = Instant::now();
                    if fresh && !bucket.take(rate, burst, last_frame.into_std()) {
                        Metrics::inc(&ctx.shared.metrics.requests_rate_limited_total);
                        let h = frame.header;
                        conn.push_response(
                            &error_frame(
                                h.command,
                                h.seq,
                                ErrorCode::RateLimited,
                                "too many requests on this connection: slow down",
                            ),
                            &ctx,
                        );
                        continue;
                    }
                    let is_barrier = matches!(
                        Command::from_id(frame.header.command),
                        Some(Command::Login | Command::Logout)
                    ) && frame.header.flags == 0;
                    if is_barrier && !inflight.is_empty() {
                        // It runs alone: hold it until the others are answered.
                        held = Some(frame);
                        break;
                    }
                    barrier = is_barrier;
                    inflight.push(Box::pin(router::dispatch(ctx.clone(), conn.clone(), frame)));
                }
                Ok(None) => break,
                Err(e) => {
                    let (code, msg) = match &e {
                        FrameError::TooLarge { .. } => (ErrorCode::FrameTooLarge, e.to_string()),
                        _ => (ErrorCode::BadFrame, e.to_string()),
                    };
                    Metrics::inc(&ctx.shared.metrics.frame_errors_total);
                    conn.push_response(&error_frame(0, 0, code, &msg), &ctx);
                    *conn.closing.borrow_mut() = Some(Closing::FrameError);
                    rbuf = BytesMut::new();
                    break;
                }
            }
        }
        // An idle connection holds no read buffer: most are idle most of the time, and
        // memory per connection is what bounds how many one server holds.
        if rbuf.is_empty() && rbuf.capacity() > 0 {
            rbuf = BytesMut::new();
        }

        // 2. Closing and nothing in flight: say goodbye and go.
        let closing = conn.closing.borrow().clone();
        if (closing.is_some() || eof) && inflight.is_empty() {
            tracing::debug!(conn = conn.id.0, ?closing, eof, "closing");
            if let Some(Closing::Kick(reason, why)) = closing {
                let m = &ctx.shared.metrics;
                Metrics::inc(match reason {
                    KickReason::SlowConsumer => &m.kicks_slow_consumer_total,
                    KickReason::LoginTimeout => &m.kicks_login_timeout_total,
                    KickReason::IdleTimeout => &m.kicks_idle_timeout_total,
                    _ => &m.kicks_other_total,
                });
                let body = KickPush {
                    reason: reason as i32,
                    message: why.to_string(),
                }
                .encode_to_vec();
                let frame = mychat_codec::frame_bytes(Header::push(Command::Kick.id()), &body);
                // Queued after what is pending (a frame may be half written).
                conn.push_response(&frame, &ctx);
            }
            if !eof {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), flush_all(&mut io, &conn, &ctx))
                        .await;
            }
            return;
        }
        if eof && closing.is_none() {
            // The peer is gone: answers cannot be delivered; in-flight writes still
            // complete in the store. Wait for them so nothing is cut mid-way.
            while inflight.next().await.is_some() {}
            return;
        }

        // 3. Write what is pending.
        if !write_some(&mut io, &conn, &ctx) {
            return;
        }

        // 4. Wait for something to do.
        let want_read = !eof
            && closing.is_none()
            && !barrier
            && held.is_none()
            && inflight.len() < max_inflight
            && conn.out.borrow().len() < ctx.shared.cfg.server.outbound_buffer_bytes;
        let want_write = !conn.out.borrow().is_empty() || io.wants_write();
        let interest = match (want_read, want_write) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        };
        let logged_in = conn.logged_in_once.get();
        let next = if logged_in {
            last_frame + idle
        } else {
            login_deadline.min(last_frame + idle)
        };
        if timer.deadline() != next {
            timer.as_mut().reset(next);
        }
        tokio::select! {
            biased;
            Some((frame, was_barrier)) = inflight.next(), if !inflight.is_empty() => {
                conn.push_response(&frame, &ctx);
                if was_barrier {
                    barrier = false;
                }
            }
            r = async { io.stream.ready(interest.unwrap()).await }, if interest.is_some() => {
                match r {
                    Ok(ready) => {
                        if ready.is_readable() && want_read {
                            match io.read_into(&mut rbuf) {
                                ReadOutcome::Eof => eof = true,
                                ReadOutcome::Data | ReadOutcome::WouldBlock => {}
                            }
                        }
                    }
                    Err(_) => eof = true,
                }
            }
            _ = conn.wake.notified() => {}
            _ = &mut timer => {
                let now = Instant::now();
                if !conn.logged_in_once.get() && now >= login_deadline {
                    conn.kick(KickReason::LoginTimeout, "no login within login_timeout");
                } else if now >= last_frame + idle {
                    conn.kick(KickReason::IdleTimeout, "nothing received within idle_timeout");
                }
            }
        }
    }
}

/// Writes as much of the outbound buffer as the socket takes now. False: the socket
/// failed.
fn write_some(io: &mut Io, conn: &ConnShared, ctx: &ShardCtx) -> bool {
    let mut out = conn.out.borrow_mut();
    if let Some(tls) = io.tls.as_mut() {
        use std::io::Write as _;
        // Plaintext into rustls (it holds at most its buffer limit, 64 KiB), records
        // out to the socket; what neither takes stays in the outbound buffer.
        loop {
            while !out.is_empty() {
                match tls.writer().write(&out) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        conn.consumed(&mut out, n);
                        ctx.out_sub(n);
                    }
                }
            }
            let mut progressed = false;
            while tls.wants_write() {
                match tls.write_tls(&mut SockIo(&io.stream)) {
                    Ok(_) => progressed = true,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => return false,
                }
            }
            if out.is_empty() || tls.wants_write() || !progressed {
                break;
            }
        }
    } else {
        while !out.is_empty() {
            match io.stream.try_write(&out) {
                Ok(n) => {
                    conn.consumed(&mut out, n);
                    ctx.out_sub(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
    }
    if out.is_empty() && out.capacity() > 2048 {
        *out = BytesMut::new();
    }
    true
}

async fn flush_all(io: &mut Io, conn: &ConnShared, ctx: &ShardCtx) {
    if let Some(tls) = io.tls.as_mut() {
        tls.send_close_notify();
    }
    loop {
        if !write_some(io, conn, ctx) || (conn.out.borrow().is_empty() && !io.wants_write()) {
            return;
        }
        if io.stream.writable().await.is_err() {
            return;
        }
    }
}

//! A shard: one thread, one current-thread runtime, and the connections it owns.
//!
//! Invariants:
//! - a connection is touched only by its shard's thread (`Rc`, `RefCell`, no locks);
//! - other threads reach a shard only through its bounded inbox ([`ShardMsg`]); a full
//!   inbox makes the sender wait (back-pressure), it never grows;
//! - deliveries to other shards are gathered in a per-destination outbox during one
//!   turn of the event loop and sent as one batch per destination shard.

use crate::conn::{self, ConnShared};
use crate::directory::{Aggregate, SessionRef};
use crate::ids::{ConnId, ShardId, UserId};
use crate::server::Shared;
use bytes::Bytes;
use mychat_proto::KickReason;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// What other threads send a shard.
pub enum ShardMsg {
    /// A freshly accepted socket placed on this shard (true: from the TLS listener).
    NewConn(std::net::TcpStream, std::net::SocketAddr, bool),
    /// Encoded frames for connections of this shard.
    Deliver(Vec<(ConnId, Bytes)>),
    /// Close a connection with a KICK push.
    Kick(ConnId, KickReason, &'static str),
    /// Stop: kick every client once its in-flight requests are answered, then exit.
    Shutdown,
}

/// A shard's own state, shared by its tasks (never across threads).
pub struct ShardCtx {
    pub id: ShardId,
    pub shared: Arc<Shared>,
    pub conns: RefCell<HashMap<ConnId, Rc<ConnShared>>>,
    outbox: RefCell<Vec<Vec<(ConnId, Bytes)>>>,
    outbox_ready: Notify,
    pub shutting_down: Cell<bool>,
    /// Presence changes seen on this shard, waiting for the presence task.
    presence_changes: RefCell<Vec<(UserId, Aggregate)>>,
    presence_ready: Notify,
    /// This shard's share of `server.outbound_total_bytes`.
    out_budget: usize,
}

impl ShardCtx {
    /// Queues `frame` for every live session of `user`, except the connection `skip`.
    pub fn deliver_to_user(&self, user: UserId, frame: &Bytes, skip: Option<ConnId>) {
        let mut remote = false;
        self.shared.dir.with_sessions(user, |sessions| {
            for s in sessions {
                if Some(s.conn) == skip && s.shard == self.id {
                    continue;
                }
                if s.shard == self.id {
                    self.push_local(s.conn, frame.clone());
                } else {
                    self.outbox.borrow_mut()[s.shard.0].push((s.conn, frame.clone()));
                    remote = true;
                }
            }
        });
        if remote {
            self.outbox_ready.notify_one();
        }
    }

    /// Queues `frame` for every live session of each user in `users` (a group's
    /// members): one batch per destination shard, the frame shared, not copied.
    pub fn deliver_to_users(&self, users: &[UserId], frame: &Bytes, skip: Option<ConnId>) {
        for u in users {
            self.deliver_to_user(*u, frame, skip);
        }
    }

    /// Queues `frame` for one connection anywhere.
    pub fn deliver_to_conn(&self, shard: ShardId, conn: ConnId, frame: &Bytes) {
        if shard == self.id {
            self.push_local(conn, frame.clone());
        } else {
            self.outbox.borrow_mut()[shard.0].push((conn, frame.clone()));
            self.outbox_ready.notify_one();
        }
    }

    /// Notes a user's presence change for the presence task.
    pub fn presence_changed(&self, user: UserId, before: Aggregate, after: Aggregate) {
        if before != after {
            self.presence_changes.borrow_mut().push((user, after));
            self.presence_ready.notify_one();
        }
    }

    /// Appends a frame to a local connection's outbound buffer.
    pub fn push_local(&self, conn: ConnId, frame: Bytes) {
        let c = self.conns.borrow().get(&conn).cloned();
        if let Some(c) = c {
            c.push(&frame, self);
        }
    }

    /// Notes `n` more bytes queued on this shard's connections.
    pub(crate) fn out_add(&self, n: usize) {
        let b = &self.shared.shards[self.id.0].out_bytes;
        // Only this shard's thread writes it: no read-modify-write needed.
        b.store(b.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }

    /// Notes `n` queued bytes written or dropped.
    pub(crate) fn out_sub(&self, n: usize) {
        let b = &self.shared.shards[self.id.0].out_bytes;
        b.store(
            b.load(Ordering::Relaxed).saturating_sub(n),
            Ordering::Relaxed,
        );
    }

    /// Whether this shard's connections hold more unwritten bytes than its share of
    /// `server.outbound_total_bytes`.
    pub(crate) fn out_over_budget(&self) -> bool {
        self.shared.shards[self.id.0]
            .out_bytes
            .load(Ordering::Relaxed)
            > self.out_budget
    }

    /// Kicks a session wherever it lives.
    pub async fn kick(&self, s: &SessionRef, reason: KickReason, why: &'static str) {
        if s.shard == self.id {
            if let Some(c) = self.conns.borrow().get(&s.conn) {
                c.kick(reason, why);
            }
        } else {
            let _ = self.shared.shards[s.shard.0]
                .tx
                .send(ShardMsg::Kick(s.conn, reason, why))
                .await;
        }
    }
}

/// Pushes presence changes to friends and watchers, and records last-seen times.
async fn presence_task(ctx: Rc<ShardCtx>) {
    use mychat_proto::{Command, PresencePush, PresenceStatus, UserPresence};
    use prost::Message as _;
    loop {
        ctx.presence_ready.notified().await;
        let changes = std::mem::take(&mut *ctx.presence_changes.borrow_mut());
        let mut pushes = Vec::with_capacity(changes.len());
        let mut seen = Vec::new();
        for (user, status) in changes {
            let now = crate::router::now_ms();
            let (st, last_seen) = match status {
                Aggregate::Online => (PresenceStatus::Online, 0),
                Aggregate::Away => (PresenceStatus::Away, 0),
                Aggregate::Offline => {
                    ctx.shared.last_seen.set(user, now);
                    seen.push((user, now));
                    (PresenceStatus::Offline, now)
                }
            };
            // The status may have moved on while we waited: push what holds now.
            if ctx.shared.dir.presence(user) != status {
                continue;
            }
            let push = PresencePush {
                presence: Some(UserPresence {
                    user_id: user.0,
                    status: st as i32,
                    last_seen_ms: last_seen,
                }),
            };
            let frame = mychat_codec::frame_bytes(
                mychat_codec::Header::push(Command::PresencePush.id()),
                &push.encode_to_vec(),
            );
            pushes.push((user, frame));
        }
        // One write for the burst (a disconnect storm is thousands), not one each.
        if !seen.is_empty() {
            let _ = ctx.shared.store.set_last_seen(seen).await;
        }
        if pushes.is_empty() {
            continue;
        }
        // One store round trip for the whole burst (a login storm is thousands).
        let users: Vec<UserId> = pushes.iter().map(|(u, _)| *u).collect();
        let friends = ctx
            .shared
            .store
            .friend_ids_many(users)
            .await
            .unwrap_or_default();
        for (i, (user, frame)) in pushes.iter().enumerate() {
            if let Some(f) = friends.get(i) {
                ctx.deliver_to_users(f, frame, None);
            }
            for (shard, conn) in ctx.shared.watchers.of(*user) {
                ctx.deliver_to_conn(shard, conn, frame);
            }
        }
    }
}

/// Sends the gathered cross-shard deliveries, one batch per destination, once per
/// event-loop turn.
async fn flush_outbox(ctx: Rc<ShardCtx>) {
    loop {
        ctx.outbox_ready.notified().await;
        // Let the other tasks of this turn add to the batches first.
        tokio::task::yield_now().await;
        let batches: Vec<Vec<(ConnId, Bytes)>> = {
            let mut ob = ctx.outbox.borrow_mut();
            ob.iter_mut().map(std::mem::take).collect()
        };
        for (dest, items) in batches.into_iter().enumerate() {
            if !items.is_empty() {
                let _ = ctx.shared.shards[dest]
                    .tx
                    .send(ShardMsg::Deliver(items))
                    .await;
            }
        }
    }
}

/// The shard thread's body.
pub fn run(id: ShardId, shared: Arc<Shared>, mut rx: mpsc::Receiver<ShardMsg>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(shared.cfg.server.blocking_threads)
        .thread_name(format!("mychat-shard-{}-blocking", id.0))
        .build()
        .expect("shard runtime");
    let local = tokio::task::LocalSet::new();
    let n = shared.shards.len();
    let shared_budget = shared.cfg.server.outbound_total_bytes / n.max(1);
    let ctx = Rc::new(ShardCtx {
        id,
        shared,
        conns: RefCell::new(HashMap::new()),
        outbox: RefCell::new(vec![Vec::new(); n]),
        outbox_ready: Notify::new(),
        shutting_down: Cell::new(false),
        presence_changes: RefCell::new(Vec::new()),
        presence_ready: Notify::new(),
        out_budget: shared_budget,
    });
    local.block_on(&rt, async move {
        tokio::task::spawn_local(flush_outbox(ctx.clone()));
        tokio::task::spawn_local(presence_task(ctx.clone()));
        let mut buf = Vec::with_capacity(256);
        let mut deadline: Option<Instant> = None;
        loop {
            let got = tokio::select! {
                n = rx.recv_many(&mut buf, 256) => n,
                _ = tokio::time::sleep(Duration::from_millis(20)), if deadline.is_some() => 0,
            };
            if got == 0 && deadline.is_none() {
                return; // every sender is gone
            }
            for msg in buf.drain(..) {
                match msg {
                    ShardMsg::NewConn(stream, peer, tls) => {
                        if ctx.shutting_down.get() {
                            ctx.shared.conn_closed(id.0, peer.ip());
                            continue;
                        }
                        conn::spawn(ctx.clone(), stream, peer, tls);
                    }
                    ShardMsg::Deliver(items) => {
                        for (c, frame) in items {
                            ctx.push_local(c, frame);
                        }
                    }
                    ShardMsg::Kick(c, reason, why) => {
                        if let Some(c) = ctx.conns.borrow().get(&c) {
                            c.kick(reason, why);
                        }
                    }
                    ShardMsg::Shutdown => {
                        ctx.shutting_down.set(true);
                        deadline = Some(
                            Instant::now()
                                + Duration::from_millis(ctx.shared.cfg.server.shutdown_deadline_ms),
                        );
                        for c in ctx.conns.borrow().values() {
                            c.kick(KickReason::ServerShutdown, "the server is shutting down");
                        }
                    }
                }
            }
            if let Some(d) = deadline {
                if ctx.conns.borrow().is_empty() || Instant::now() >= d {
                    if !ctx.conns.borrow().is_empty() {
                        tracing::warn!(
                            shard = id.0,
                            left = ctx.conns.borrow().len(),
                            "shutdown deadline reached with connections open"
                        );
                    }
                    return;
                }
            }
        }
    });
}

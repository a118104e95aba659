//! One process's share of a run: its devices' connections, the traffic they send, and
//! the verification of everything they receive.
//!
//! Each device is one task owning its socket: it logs in, then sends what the pacer
//! hands it (over a small bounded channel) and reads responses and pushes. Every
//! message's text starts with its send time (µs since the epoch), so the receiving
//! device measures send → delivery latency. Per device and conversation it remembers
//! the last seq: the same seq again is a duplicate, a smaller one out of order. The
//! sender adds the deliveries a message must make (recipient devices, sender's other
//! devices, or group members' devices) once it is acked; lost = expected - delivered
//! after the drain.

use crate::push::{self, Got};
use crate::scenario::{Mode, Scenario};
use crate::setup::{State, PLATFORMS};
use crate::wire::{code_name, connect};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use mychat_codec::{FrameCodec, Header};
use mychat_proto::*;
use parking_lot::Mutex;
use prost::Message as _;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::Decoder;

/// How long a refused send keeps its closed-loop slot before the window sends again.
const ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Which server the traffic goes to.
#[derive(Clone, Debug)]
pub enum Target {
    MyChat(SocketAddr),
    /// NATS core pub/sub: a subject per user (`u.<id>`) and per group (`g.<id>`).
    Nats(SocketAddr),
}

/// Counters shared by this process's tasks.
#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub logins: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub expected: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicated: AtomicU64,
    pub out_of_order: AtomicU64,
    pub measuring: AtomicBool,
    pub acked_window: AtomicU64,
    pub delivered_window: AtomicU64,
    pub errors: Mutex<BTreeMap<String, u64>>,
    /// KICK pushes received, by reason (scenarios that reconnect).
    pub kicks: Mutex<BTreeMap<String, u64>>,
    /// Connections lost without a KICK (scenarios that reconnect), by cause.
    pub disconnects: Mutex<BTreeMap<String, u64>>,
    pub reconnects: AtomicU64,
    /// Messages a device got by re-syncing after a reconnect.
    pub synced: AtomicU64,
    /// Devices that stopped reading (faults.stall_share).
    pub stalls: AtomicU64,
    /// Traffic and drain are over: devices stop reconnecting.
    pub stopping: AtomicBool,
    pub hist: Mutex<Option<Histogram<u64>>>,
    pub rolling: Mutex<Option<Histogram<u64>>>,
    /// NATS closed loop: message number → its window slot, freed at first delivery.
    pub nats_inflight: Mutex<HashMap<u64, OwnedSemaphorePermit>>,
}

impl Stats {
    pub fn new() -> Stats {
        let s = Stats::default();
        *s.hist.lock() = Some(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap());
        *s.rolling.lock() = Some(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap());
        s
    }
    pub fn error(&self, name: String) {
        *self.errors.lock().entry(name).or_default() += 1;
    }
    pub fn disconnect(&self, name: String) {
        *self.disconnects.lock().entry(name).or_default() += 1;
    }
    fn latency(&self, us: u64) {
        let us = us.max(1);
        if self.measuring.load(Relaxed) {
            if let Some(h) = self.hist.lock().as_mut() {
                let _ = h.record(us);
            }
        }
        if let Some(h) = self.rolling.lock().as_mut() {
            let _ = h.record(us);
        }
    }
}

/// What a device sends next.
pub struct Cmd {
    to_user: u64,
    group: u64,
    expected: u64,
    permit: Option<OwnedSemaphorePermit>,
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A device this process runs.
pub struct Device {
    pub user: usize,
    pub tx: mpsc::Sender<Cmd>,
}

/// Everything a process needs for its share.
pub struct Plan {
    pub scenario: Scenario,
    pub target: Target,
    pub src_ips: Vec<IpAddr>,
    pub worker: usize,
    pub procs: usize,
    pub state: Arc<State>,
    /// `--ack-log`: one line per acknowledged message, appended as acks arrive.
    pub ack_log: Option<Mutex<std::fs::File>>,
}

/// A message text: send time (µs, 20 digits), a tag (16 hex digits: the NATS baseline's
/// message number), then padding to `size`.
fn text_for(size: usize, tag: u64) -> String {
    let mut t = format!("{:020}|{tag:016x}|", now_us());
    while t.len() < size {
        t.push('x');
    }
    t
}

/// Connects and logs in every device of this process (at `login_rate` per second in
/// all, split among processes); returns them once all are logged in.
pub async fn connect_all(
    plan: &Arc<Plan>,
    stats: &Arc<Stats>,
    run_id: u64,
) -> anyhow::Result<Vec<Device>> {
    let s = &plan.scenario;
    let per_user = s.devices_per_user;
    let total = s.users * per_user;
    let mine: Vec<usize> = (0..total)
        .filter(|k| k % plan.procs == plan.worker)
        .collect();
    let rate = if s.login_rate == 0 {
        0.0
    } else {
        s.login_rate as f64 / plan.procs as f64
    };
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(512));
    let mut devices = Vec::with_capacity(mine.len());
    let mut ready = Vec::with_capacity(mine.len());
    for (n, k) in mine.into_iter().enumerate() {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let (user, d) = (k / per_user, k % per_user);
        let (tx, rx) = mpsc::channel(64);
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        let src = if plan.src_ips.is_empty() {
            None
        } else {
            Some(plan.src_ips[k % plan.src_ips.len()])
        };
        let permit = gate.clone().acquire_owned().await?;
        let (plan2, stats2, stats3) = (plan.clone(), stats.clone(), stats.clone());
        tokio::spawn(async move {
            let r = match plan2.target.clone() {
                Target::MyChat(addr) => {
                    mychat_device(plan2, stats2, addr, src, user, d, rx, rtx, permit, run_id).await
                }
                Target::Nats(addr) => {
                    nats_device(plan2, stats2, addr, src, user, rx, rtx, permit).await
                }
            };
            if let Err(e) = r {
                stats3.error(format!("i/o: {e}"));
            }
        });
        devices.push(Device { user, tx });
        ready.push(rrx);
    }
    // A device that could not connect or log in is left out (its error is counted,
    // which fails the run); the others go on, so the report says what happened.
    let mut live = Vec::with_capacity(devices.len());
    for (dev, r) in devices.into_iter().zip(ready) {
        if matches!(r.await, Ok(true)) {
            live.push(dev);
        }
    }
    Ok(live)
}

/// How one connection of a device ended.
enum Ended {
    /// The server closed it (after a KICK or not) or it failed.
    Lost,
    /// The pacer is done with this device (its channel closed) and nothing is pending.
    Done,
}

/// What a device has received: the last seq per conversation, and the messages its
/// latest re-sync returned (a push of one of them may still follow).
#[derive(Default)]
struct Seen {
    last_seq: HashMap<u64, u64>,
    synced: std::collections::HashSet<(u64, u64)>,
}

/// What a device keeps across its connections.
struct DevState {
    ready: Option<tokio::sync::oneshot::Sender<bool>>,
    gate: Option<OwnedSemaphorePermit>,
    counter: u64,
    /// What this device has received (verification).
    seen: Seen,
    /// Highest pts seen: where a re-sync starts after a reconnect.
    last_pts: u64,
    /// Stop reading at this time, for `stall_secs` (a stalled device).
    stall_at: Option<Instant>,
    open: bool,
}

/// A device: connects, logs in by token, sends what the pacer hands it, verifies what
/// it receives. With `faults.reconnect`, a lost connection is reopened (backing off
/// while the server is down) and the device re-syncs from the last pts it saw, so a
/// slow consumer cut by the server, or a server killed and restarted, loses nothing.
#[allow(clippy::too_many_arguments)]
async fn mychat_device(
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    addr: SocketAddr,
    src: Option<IpAddr>,
    user: usize,
    d: usize,
    mut rx: mpsc::Receiver<Cmd>,
    ready: tokio::sync::oneshot::Sender<bool>,
    gate: OwnedSemaphorePermit,
    run_id: u64,
) -> anyhow::Result<()> {
    let f = &plan.scenario.faults;
    let stalled = plan.scenario.is_stalled(user);
    let mut st = DevState {
        ready: Some(ready),
        gate: Some(gate),
        counter: 0,
        seen: Seen::default(),
        last_pts: 0,
        stall_at: stalled.then(|| Instant::now() + Duration::from_secs(f.stall_after_secs)),
        open: true,
    };
    let mut first = true;
    loop {
        let stream = match connect(addr, src).await {
            Ok(s) => s,
            Err(e) => {
                if first || !f.reconnect {
                    stats.error(format!("connect: {}", e.kind()));
                    if let Some(r) = st.ready.take() {
                        let _ = r.send(false);
                    }
                    return Ok(());
                }
                // The server is down (killed, restarting): try again shortly.
                if !st.open && rx.is_closed() && stats.stopping.load(Relaxed) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if stalled {
            // A small receive window: the server's queue, not the kernel, fills up.
            let _ = socket2::SockRef::from(&stream).set_recv_buffer_size(256 * 1024);
        }
        if first {
            stats.connections.fetch_add(1, Relaxed);
        } else {
            stats.reconnects.fetch_add(1, Relaxed);
        }
        let r = device_conn(
            &plan, &stats, stream, user, d, &mut rx, &mut st, run_id, first,
        )
        .await;
        first = false;
        let again = f.reconnect && st.ready.is_none();
        match r {
            Ok(Ended::Done) => return Ok(()),
            Ok(Ended::Lost) if !again => return Ok(()),
            Err(e) if !again => return Err(e),
            Err(e) => stats.disconnect(format!("i/o: {}", e.root_cause())),
            Ok(Ended::Lost) => {}
        }
        if stats.stopping.load(Relaxed) && !st.open {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One connection of a device, until it is lost or the device is done.
#[allow(clippy::too_many_arguments)]
async fn device_conn(
    plan: &Arc<Plan>,
    stats: &Arc<Stats>,
    mut stream: tokio::net::TcpStream,
    user: usize,
    d: usize,
    rx: &mut mpsc::Receiver<Cmd>,
    st: &mut DevState,
    run_id: u64,
    first: bool,
) -> anyhow::Result<Ended> {
    let s = &plan.scenario;
    let reconnect = s.faults.reconnect;
    let dev = &plan.state.users[user].devices[d];
    let username = &plan.state.users[user].name;
    let my_id = plan.state.users[user].id;
    let mut codec = FrameCodec::new(u32::MAX);
    let mut rbuf = BytesMut::with_capacity(4096);
    let mut wbuf = BytesMut::with_capacity(256);
    let login = LoginRequest {
        credential: Some(login_request::Credential::AccessToken(dev.access.clone())),
        device_id: dev.device.clone(),
        platform: PLATFORMS[d] as i32,
    };
    mychat_codec::encode_frame(
        Header::request(Command::Login.id(), 1),
        &login.encode_to_vec(),
        &mut wbuf,
    );
    stream.write_all(&wbuf).await?;
    wbuf.clear();
    let mut logged_in = false;
    let mut seq: u32 = 1;
    // Requests in flight: seq → (deliveries expected, window slot, client id).
    let mut pending: HashMap<u32, (u64, Option<OwnedSemaphorePermit>, String)> = HashMap::new();
    // A re-sync in flight (its request seq).
    let mut syncing: Option<u32> = None;
    // A heartbeat well inside the server's idle timeout keeps idle devices connected.
    let mut beat = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(20),
        Duration::from_secs(20),
    );
    let mut kicked = false;
    // Pushes that arrive while a re-sync is in flight: counted after it, in order.
    let mut held: Vec<Got> = Vec::new();
    loop {
        if let Some(at) = st.stall_at {
            if Instant::now() >= at && logged_in {
                // Stop reading (and sending) for a while: the server sees a reader that
                // stalled with a full socket.
                st.stall_at = None;
                stats.stalls.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_secs(s.faults.stall_secs)).await;
            }
        }
        if !st.open && pending.is_empty() && syncing.is_none() && logged_in {
            return Ok(Ended::Done);
        }
        let stall_wait = async {
            match st.stall_at {
                Some(at) if logged_in => tokio::time::sleep_until(at.into()).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stall_wait => {}
            _ = beat.tick() => {
                mychat_codec::encode_frame(Header::request(Command::Heartbeat.id(), 0), &[], &mut wbuf);
                stream.write_all(&wbuf).await?;
                wbuf.clear();
            }
            cmd = rx.recv(), if st.open && logged_in && syncing.is_none() => {
                let Some(cmd) = cmd else { st.open = false; continue };
                // This one and whatever else is queued for this device: one write.
                let mut next = Some(cmd);
                while let Some(c) = next.take() {
                    seq = seq.wrapping_add(1).max(2);
                    st.counter += 1;
                    let client_msg_id = format!("{run_id:x}-{}-{}", dev.device, st.counter);
                    let req = SendMessageRequest {
                        to_user_id: c.to_user,
                        group_id: c.group,
                        client_msg_id: client_msg_id.clone(),
                        kind: MessageKind::Text as i32,
                        text: text_for(s.traffic.message_size, 0),
                        payload: Default::default(),
                    };
                    mychat_codec::encode_frame(Header::request(Command::SendMessage.id(), seq), &req.encode_to_vec(), &mut wbuf);
                    pending.insert(seq, (c.expected, c.permit, client_msg_id));
                    stats.sent.fetch_add(1, Relaxed);
                    next = rx.try_recv().ok();
                }
                stream.write_all(&wbuf).await?;
                wbuf.clear();
            }
            r = stream.read_buf(&mut rbuf) => {
                if r? == 0 {
                    // Unanswered sends: not acked, so not expected anywhere.
                    if !reconnect {
                        stats.error("closed by server".into());
                    } else if !kicked {
                        stats.disconnect("closed by server".into());
                    }
                    return Ok(Ended::Lost);
                }
                let mut acks = String::new();
                while let Some(f) = codec.decode(&mut rbuf)? {
                    let h = f.header;
                    if h.is_response() {
                        if h.command == Command::Login.id() {
                            if h.is_error() {
                                let e = mychat_proto::Error::decode(f.body)?;
                                stats.error(format!("login {}", code_name(e.code)));
                                if let Some(r) = st.ready.take() { let _ = r.send(false); }
                                return Ok(Ended::Lost);
                            }
                            logged_in = true;
                            if first {
                                stats.logins.fetch_add(1, Relaxed);
                            }
                            st.gate.take();
                            if let Some(r) = st.ready.take() { let _ = r.send(true); }
                            if !first {
                                // Catch up on what was pushed while away.
                                seq = seq.wrapping_add(1).max(2);
                                syncing = Some(seq);
                                st.seen.synced.clear();
                                let req = SyncRequest { since_pts: Some(st.last_pts), limit: 0 };
                                mychat_codec::encode_frame(Header::request(Command::Sync.id(), seq), &req.encode_to_vec(), &mut wbuf);
                            }
                            continue;
                        }
                        if Some(h.seq) == syncing && h.command == Command::Sync.id() {
                            if h.is_error() {
                                let e = mychat_proto::Error::decode(f.body)?;
                                stats.error(format!("sync {}", code_name(e.code)));
                                syncing = None;
                                for g in held.drain(..) {
                                    receive(stats, &mut st.seen, &g, false);
                                }
                                continue;
                            }
                            let p = SyncResponse::decode(f.body)?;
                            for u in p.updates {
                                if let Some(update::Event::Message(m)) = u.event {
                                    if m.sender_id == my_id && s.devices_per_user == 1 {
                                        continue; // this device's own sends
                                    }
                                    if receive(stats, &mut st.seen, &Got::of(&m), true) {
                                        stats.synced.fetch_add(1, Relaxed);
                                    }
                                }
                            }
                            st.last_pts = st.last_pts.max(p.pts);
                            if !p.has_more {
                                for g in held.drain(..) {
                                    receive(stats, &mut st.seen, &g, true);
                                }
                            }
                            if p.has_more {
                                seq = seq.wrapping_add(1).max(2);
                                syncing = Some(seq);
                                let req = SyncRequest { since_pts: Some(st.last_pts), limit: 0 };
                                mychat_codec::encode_frame(Header::request(Command::Sync.id(), seq), &req.encode_to_vec(), &mut wbuf);
                            } else {
                                syncing = None;
                            }
                            continue;
                        }
                        let Some((expected, permit, client_msg_id)) = pending.remove(&h.seq) else { continue };
                        if h.is_error() {
                            let e = mychat_proto::Error::decode(f.body)?;
                            stats.error(code_name(e.code));
                            // A refused send (RATE_LIMITED, UNAVAILABLE …) holds its slot of
                            // the closed-loop window a while, as a client backs off: freed at
                            // once, the window would resend in a tight loop against a server
                            // that just said it is overloaded.
                            if let Some(p) = permit {
                                tokio::spawn(async move {
                                    tokio::time::sleep(ERROR_BACKOFF).await;
                                    drop(p);
                                });
                            }
                        } else {
                            drop(permit);
                            stats.acked.fetch_add(1, Relaxed);
                            stats.expected.fetch_add(expected, Relaxed);
                            if stats.measuring.load(Relaxed) {
                                stats.acked_window.fetch_add(1, Relaxed);
                            }
                            if plan.ack_log.is_some() {
                                let a = SendMessageResponse::decode(f.body)?;
                                st.last_pts = st.last_pts.max(a.pts);
                                use std::fmt::Write as _;
                                let _ = writeln!(acks, "{username}\t{}\t{}\t{}\t{client_msg_id}", a.conversation_id, a.seq, a.message_id);
                            }
                        }
                    } else if h.is_push() && h.command == Command::MessagePush.id() {
                        let (got, pts) = push::parse(&f.body)?;
                        st.last_pts = st.last_pts.max(pts);
                        let Some(g) = got else { continue };
                        if syncing.is_some() {
                            held.push(g);
                        } else {
                            receive(stats, &mut st.seen, &g, false);
                        }
                    } else if h.is_push() && h.command == Command::Kick.id() {
                        let k = KickPush::decode(f.body)?;
                        if reconnect {
                            kicked = true;
                            let reason = KickReason::try_from(k.reason)
                                .map(|r| r.as_str_name().to_string())
                                .unwrap_or_else(|_| k.reason.to_string());
                            *stats.kicks.lock().entry(reason).or_default() += 1;
                        } else {
                            stats.error(format!("kicked: {}", k.message));
                        }
                    }
                }
                if !acks.is_empty() {
                    if let Some(log) = &plan.ack_log {
                        let mut w = log.lock();
                        w.write_all(acks.as_bytes())?;
                        w.flush()?;
                    }
                }
                if !wbuf.is_empty() {
                    stream.write_all(&wbuf).await?;
                    wbuf.clear();
                }
                if rbuf.capacity() > 1 << 20 && rbuf.is_empty() {
                    rbuf = BytesMut::with_capacity(4096);
                }
            }
        }
    }
}

/// Counts one received message (push or sync) against the verification: true when it
/// was new. A re-sync may return what a push already brought (`from_sync`): that is
/// not a duplicate.
fn receive(stats: &Stats, st: &mut Seen, m: &Got, from_sync: bool) -> bool {
    if m.kind != MessageKind::Text as i32 {
        return false; // notices of the setup
    }
    let Some(sent) = m.sent else {
        return false;
    };
    let last = st.last_seq.entry(m.conversation_id).or_insert(0);
    if m.seq <= *last {
        // A push of a message a re-sync already returned (its push was still on the
        // way when the sync read the store) is an overlap, not a duplicate.
        let overlap = st.synced.remove(&(m.conversation_id, m.seq));
        if !from_sync && !overlap {
            if m.seq == *last {
                stats.duplicated.fetch_add(1, Relaxed);
            } else {
                stats.out_of_order.fetch_add(1, Relaxed);
            }
        }
        return false;
    }
    *last = m.seq;
    if from_sync {
        st.synced.insert((m.conversation_id, m.seq));
    }
    stats.delivered.fetch_add(1, Relaxed);
    if stats.measuring.load(Relaxed) {
        stats.delivered_window.fetch_add(1, Relaxed);
    }
    if !from_sync {
        stats.latency(now_us().saturating_sub(sent));
    }
    true
}

#[allow(clippy::too_many_arguments)]
async fn nats_device(
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    addr: SocketAddr,
    src: Option<IpAddr>,
    user: usize,
    mut rx: mpsc::Receiver<Cmd>,
    ready: tokio::sync::oneshot::Sender<bool>,
    gate: OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let s = &plan.scenario;
    let mut stream = match connect(addr, src).await {
        Ok(st) => st,
        Err(e) => {
            stats.error(format!("connect: {}", e.kind()));
            let _ = ready.send(false);
            return Ok(());
        }
    };
    stats.connections.fetch_add(1, Relaxed);
    let uid = plan.state.users[user].id;
    let mut hello = String::from("CONNECT {\"verbose\":false,\"pedantic\":false}\r\n");
    hello.push_str(&format!("SUB u.{uid} 1\r\n"));
    for (g, gid) in plan.state.groups.iter().enumerate() {
        if s.group_members(g).contains(&user) {
            hello.push_str(&format!("SUB g.{gid} {}\r\n", g + 2));
        }
    }
    hello.push_str("PING\r\n");
    stream.write_all(hello.as_bytes()).await?;
    let mut rbuf = BytesMut::with_capacity(4096);
    let mut wbuf = BytesMut::with_capacity(256);
    let mut ready = Some(ready);
    let mut gate = Some(gate);
    let mut counter = 0u64;
    let mut open = true;
    loop {
        tokio::select! {
            cmd = rx.recv(), if open && ready.is_none() => {
                let Some(mut cmd) = cmd else { open = false; continue };
                loop {
                    counter += 1;
                    let msgno = ((user as u64) << 32) | counter;
                    let payload = text_for(s.traffic.message_size, msgno);
                    let subject = if cmd.group != 0 { format!("g.{}", cmd.group) } else { format!("u.{}", cmd.to_user) };
                    wbuf.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes());
                    wbuf.extend_from_slice(payload.as_bytes());
                    wbuf.extend_from_slice(b"\r\n");
                    stats.sent.fetch_add(1, Relaxed);
                    stats.acked.fetch_add(1, Relaxed);
                    stats.expected.fetch_add(cmd.expected, Relaxed);
                    if stats.measuring.load(Relaxed) {
                        stats.acked_window.fetch_add(1, Relaxed);
                    }
                    if let Some(p) = cmd.permit.take() {
                        stats.nats_inflight.lock().insert(msgno, p);
                    }
                    match rx.try_recv() {
                        Ok(c) => cmd = c,
                        Err(_) => break,
                    }
                }
                stream.write_all(&wbuf).await?;
                wbuf.clear();
            }
            r = stream.read_buf(&mut rbuf) => {
                if r? == 0 {
                    stats.error("nats closed".into());
                    return Ok(());
                }
                while let Some(eol) = rbuf.windows(2).position(|w| w == b"\r\n") {
                    let line = std::str::from_utf8(&rbuf[..eol]).unwrap_or("").to_string();
                    if let Some(rest) = line.strip_prefix("MSG ") {
                        let len: usize = rest.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
                        if rbuf.len() < eol + 2 + len + 2 {
                            break;
                        }
                        let payload = rbuf[eol + 2..eol + 2 + len].to_vec();
                        rbuf.advance(eol + 2 + len + 2);
                        if let Some(sent) = push::parse_sent(&payload) {
                            stats.delivered.fetch_add(1, Relaxed);
                            if stats.measuring.load(Relaxed) {
                                stats.delivered_window.fetch_add(1, Relaxed);
                            }
                            stats.latency(now_us().saturating_sub(sent));
                            if payload.len() >= 37 {
                                if let Some(n) = std::str::from_utf8(&payload[21..37]).ok().and_then(|h| u64::from_str_radix(h, 16).ok()) {
                                    stats.nats_inflight.lock().remove(&n);
                                }
                            }
                        }
                        continue;
                    }
                    rbuf.advance(eol + 2);
                    if line == "PING" {
                        stream.write_all(b"PONG\r\n").await?;
                    } else if line == "PONG" {
                        if ready.is_some() {
                            stats.logins.fetch_add(1, Relaxed);
                            gate.take();
                            if let Some(r) = ready.take() { let _ = r.send(true); }
                        }
                    } else if line.starts_with("-ERR") {
                        stats.error(format!("nats {line}"));
                    }
                }
            }
        }
    }
}

/// Sends the scenario's traffic from this process's devices until `stop` is set.
pub async fn pace(
    plan: Arc<Plan>,
    devices: Arc<Vec<Device>>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
    let s = &plan.scenario;
    let t = &s.traffic;
    if devices.is_empty() || t.mode == Mode::None {
        return;
    }
    let users = &plan.state.users;
    let per_user = s.devices_per_user as u64;
    // Each user's groups.
    let mut user_groups: Vec<Vec<usize>> = vec![Vec::new(); s.users];
    for g in 0..t.groups {
        for m in s.group_members(g) {
            user_groups[m].push(g);
        }
    }
    let nats = matches!(plan.target, Target::Nats(_));
    let stalled: Vec<usize> = (0..s.users).filter(|u| s.is_stalled(*u)).collect();
    let to_stalled = s.faults.to_stalled_share;
    // Stalled users' devices do not send (they stop reading and writing).
    let senders: Vec<usize> = (0..devices.len())
        .filter(|i| !s.is_stalled(devices[*i].user))
        .collect();
    if senders.is_empty() {
        return;
    }
    let offsets = s.contact_offsets();
    let make = |dev: &Device, rng: &mut rand::rngs::SmallRng| -> Cmd {
        let u = dev.user;
        let groups = &user_groups[u];
        if !groups.is_empty() && rng.random::<f64>() >= t.direct_share {
            let g = groups[rng.random_range(0..groups.len())];
            let members = t.group_size as u64 * per_user;
            // MyChat: every member device but the sending one; NATS: every subscriber.
            let expected = if nats { members } else { members - 1 };
            Cmd {
                to_user: 0,
                group: plan.state.groups[g],
                expected,
                permit: None,
            }
        } else {
            let v = if !stalled.is_empty() && rng.random::<f64>() < to_stalled {
                stalled[rng.random_range(0..stalled.len())]
            } else if offsets.is_empty() {
                (u + 1 + rng.random_range(0..s.users - 1)) % s.users
            } else {
                s.contact(&offsets, u, rng.random_range(0..offsets.len() * 2))
            };
            // MyChat: the recipient's devices and the sender's other devices.
            let expected = if nats {
                per_user
            } else {
                per_user + per_user - 1
            };
            Cmd {
                to_user: users[v].id,
                group: 0,
                expected,
                permit: None,
            }
        }
    };
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::from_rng(&mut rand::rng());
    let mut next = 0usize;
    match t.mode {
        Mode::Open => {
            let rate = t.rate as f64 / plan.procs as f64;
            let start = Instant::now();
            let mut done = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while !stop.load(Relaxed) {
                tick.tick().await;
                let due = (start.elapsed().as_secs_f64() * rate) as u64;
                while done < due {
                    let mut tries = 0;
                    loop {
                        let dev = &devices[senders[next % senders.len()]];
                        next += 1;
                        let cmd = make(dev, &mut rng);
                        match dev.tx.try_send(cmd) {
                            Ok(()) => break,
                            Err(_) if tries < 8 => tries += 1,
                            Err(_) => {
                                stats.error("loadtest backlog".into());
                                break;
                            }
                        }
                    }
                    done += 1;
                }
            }
        }
        Mode::Closed => {
            let window = Arc::new(Semaphore::new((t.window / plan.procs).max(1)));
            while !stop.load(Relaxed) {
                let Ok(permit) = tokio::time::timeout(
                    Duration::from_millis(100),
                    window.clone().acquire_owned(),
                )
                .await
                else {
                    continue;
                };
                let permit = permit.expect("semaphore open");
                let dev = &devices[senders[next % senders.len()]];
                next += 1;
                let mut cmd = make(dev, &mut rng);
                cmd.permit = Some(permit);
                if dev.tx.send(cmd).await.is_err() {
                    stats.error("device gone".into());
                }
            }
        }
        Mode::None => {}
    }
}

/// A process's final numbers, as sent from a worker to the parent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Partial {
    pub connections: u64,
    pub logins: u64,
    pub login_secs: f64,
    pub sent: u64,
    pub acked: u64,
    pub expected: u64,
    pub delivered: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub acked_window: u64,
    pub delivered_window: u64,
    pub window_secs: f64,
    pub errors: BTreeMap<String, u64>,
    #[serde(default)]
    pub kicks: BTreeMap<String, u64>,
    #[serde(default)]
    pub disconnects: BTreeMap<String, u64>,
    #[serde(default)]
    pub reconnects: u64,
    #[serde(default)]
    pub synced: u64,
    #[serde(default)]
    pub stalls: u64,
    pub cpu_us: u64,
    /// The latency histogram (µs), V2-serialized, base64.
    pub hist: String,
}

pub fn hist_encode(h: &Histogram<u64>) -> String {
    use base64::Engine;
    let mut buf = Vec::new();
    use hdrhistogram::serialization::Serializer as _;
    let _ = hdrhistogram::serialization::V2Serializer::new().serialize(h, &mut buf);
    base64::engine::general_purpose::STANDARD.encode(buf)
}

pub fn hist_decode(s: &str) -> Option<Histogram<u64>> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut &bytes[..])
        .ok()
}

/// This process's CPU time so far (user + system), µs.
pub fn own_cpu_us() -> u64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

pub fn rng_u64() -> u64 {
    rand::rng().random()
}

//! The checkpointer thread, and the once-a-second pass it hands to the writer so that
//! the WAL can start over with (almost) no database sync left on the writer's path.
//!
//! Before this, two database syncs stood on the writer's path. SQLite starts the WAL
//! over at the first write transaction that finds every frame copied into the
//! database (and no reader using the WAL); walbuf must sync the database first (the
//! checkpointer copies without syncing, see the store), and whenever the checkpointer
//! caught up on its own that sync fell on the writer, with everything copied since
//! the last sync still to write: on this machine, one-to-one at 6,000 msgs/s, 4.6 such
//! syncs a second, 3.5 ms median, 10 ms max. And the writer's own finishing pass
//! (once a second, see `Writer::run`) synced everything the checkpointer had copied
//! in that second: 5 ms on a fresh database, 64 ms median on a 1.6 GB one, where it
//! set p99.
//!
//! What this module does instead:
//! - **a pin**: the checkpointer keeps a read transaction open on a connection of its
//!   own whose snapshot ends inside the WAL. SQLite will not start the WAL over while
//!   a reader holds such a snapshot (`walRestartLog` needs every reader mark free), so
//!   catching up no longer lets the writer's next transaction start it over, and the
//!   sync before that never falls on the writer. The pin also caps what a pass can copy
//!   (no frame past a reader's mark), so before a pass with frames to copy a second
//!   connection begins a read transaction at the WAL's end, and only then is the
//!   first one's ended: there is always a pin, and it moves on with the writer. A read
//!   transaction that starts with every frame copied ignores the WAL and does not
//!   block a restart (it blocks copying instead); that happens only when nothing is
//!   left to copy, and the next move, once frames arrive, replaces it;
//! - **the database synced off the writer's path**: once a second the writer asks
//!   for its finishing pass ([`Finish::writer_may_finish`]); the checkpointer then
//!   moves the pin to the WAL's end, copies up to it and syncs the database itself,
//!   again for what arrived meanwhile while a sync is long (up to three rounds), ends
//!   its pins and tells the writer it may go. The writer's pass copies and syncs only
//!   the frames that arrived since, the WAL starts over at its next transaction, and
//!   walbuf's sync before that finds a clean file.
//! - **a lower priority** (`store.checkpointer_nice`): the thread's copying is
//!   background work, about a fifth of a core under load, nearly all of it in the
//!   kernel; lowered, it gives way to the threads a message waits on, and returns to
//!   level when it falls behind, when a pass runs long, and while it prepares the
//!   writer's pass ([`runs_lowered`], [`Priority`]).
//!
//! Durability does not rest on any of this: walbuf still syncs the database before
//! any WAL content is overwritten, truncated or deleted; the pin and the early sync
//! only decide on which thread, and with how much left to write, that happens. A
//! database sync of the checkpointer's that fails stops the store as a failed WAL sync
//! does (see the durable module): after a failed fsync the kernel may report the next
//! one clean, so the WAL must not start over again in this process; the checkpointer
//! keeps its pin and copies nothing more, and the writer refuses every write.

use super::durable::Gate;
use super::{internal, StoreError};
use rusqlite::Connection;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The writer's finishing pass is not wanted (the checkpointer runs its passes).
const IDLE: u8 = 0;
/// The writer wants its finishing pass; the checkpointer is preparing it.
const WANTED: u8 = 1;
/// The database is synced and no pin is held: the writer may run its pass.
const READY: u8 = 2;
/// The writer is running its pass; the checkpointer waits.
const RUNNING: u8 = 3;

/// At most this many copy-and-sync rounds before the writer's finishing pass.
const PRESYNC_ROUNDS: usize = 3;
/// A database sync shorter than this leaves too little behind for another round.
const PRESYNC_SHORT: Duration = Duration::from_millis(2);

/// The hand-over of the finishing pass between the writer and the checkpointer. Only
/// the writer moves IDLE -> WANTED, READY -> RUNNING and RUNNING -> IDLE; only the
/// checkpointer moves WANTED -> READY.
#[derive(Default)]
pub(super) struct Finish {
    state: AtomicU8,
    /// The checkpointer's thread, woken when the writer moves the state.
    checkpointer: OnceLock<std::thread::Thread>,
}

impl Finish {
    /// Called by the writer between batches when its second is up: whether it may run
    /// its finishing pass now. The first call asks for it; the checkpointer makes it
    /// ready (a sync of the database, usually a few milliseconds) and a later call
    /// answers yes.
    pub(super) fn writer_may_finish(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            IDLE => {
                self.state.store(WANTED, Ordering::Release);
                self.wake();
                false
            }
            READY => {
                self.state.store(RUNNING, Ordering::Release);
                true
            }
            RUNNING => true,
            _ => false,
        }
    }

    /// Called by the writer once its finishing pass ran: the checkpointer goes on.
    pub(super) fn writer_finished(&self) {
        self.state.store(IDLE, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        if let Some(t) = self.checkpointer.get() {
            t.unpark();
        }
    }

    fn get(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
}

/// Tests: the checkpointer's database syncs ("sync") and the writer's finishing
/// passes ("finish"), in order, by database.
#[cfg(test)]
pub(super) static EVENTS: std::sync::Mutex<Vec<(std::path::PathBuf, &'static str)>> =
    std::sync::Mutex::new(Vec::new());

#[cfg(test)]
pub(super) fn note(db: &std::path::Path, what: &'static str) {
    EVENTS.lock().unwrap().push((db.to_path_buf(), what));
}

/// Tests: database syncs of the checkpointer's that fail.
#[cfg(test)]
static FAIL_SYNCS: super::walbuf::FailUnder = super::walbuf::FailUnder::new();

/// Tests: makes the checkpointer's database syncs under `dir` fail (`on`), or stops it.
#[cfg(test)]
pub(super) fn fail_syncs_under(dir: &std::path::Path, on: bool) {
    FAIL_SYNCS.set(dir, on);
}

/// Frames left in the WAL after a pass past which a lowered checkpointer has fallen
/// behind and returns to the server's priority ([`runs_lowered`]).
const BEHIND_FRAMES: i64 = 65_536;
/// Frames left after a pass below which it has caught up and lowers itself again.
const CAUGHT_UP_FRAMES: i64 = 16_384;

/// Whether the checkpointer runs lowered (`store.checkpointer_nice`) for its next
/// pass, given whether it runs lowered now and the frames its last pass left. Lowered,
/// the thread gives way to the ones a message waits on (shards, writer, syncer,
/// dispatcher); on a saturated machine it would then get almost no CPU and the WAL
/// would grow without bound. Two guards: a lowered pass that runs longer than
/// [`LOWERED_PASS_MAX`] returns to level at once ([`on_database_write`]), and once a
/// pass has left more than [`BEHIND_FRAMES`] it runs level until its passes leave at
/// most [`CAUGHT_UP_FRAMES`] (the gap keeps it from flapping).
pub(super) fn runs_lowered(lowered: bool, left: i64) -> bool {
    if lowered {
        left <= BEHIND_FRAMES
    } else {
        left <= CAUGHT_UP_FRAMES
    }
}

/// A lowered pass still copying after this long returns to level for the rest of it.
const LOWERED_PASS_MAX: Duration = Duration::from_millis(100);

/// The checkpointer thread's watch over its current pass ([`Priority::run`]).
#[derive(Clone, Copy)]
enum Watch {
    /// No lowered pass running.
    Off,
    /// A lowered pass is running: at this instant it returns to this nice value.
    Until(Instant, i32),
    /// The running pass has returned to level.
    Returned,
}

thread_local! {
    static WATCH: std::cell::Cell<Watch> = const { std::cell::Cell::new(Watch::Off) };
}

/// Called by walbuf before each write to a database file (on any thread): during a
/// lowered pass that has run past [`LOWERED_PASS_MAX`], returns its thread to level.
/// SQLite's checkpoint copies page by page, so this looks in between the copies.
pub(super) fn on_database_write() {
    WATCH.with(|w| {
        if let Watch::Until(until, base) = w.get() {
            if Instant::now() >= until {
                w.set(if set_own_nice(base) {
                    Watch::Returned
                } else {
                    Watch::Off
                });
            }
        }
    });
}

/// The calling thread's scheduling priority: its nice value at [`Priority::new`], or
/// that plus `by` (at most 19) while lowered. Only used where returning is allowed
/// (raising a priority needs CAP_SYS_NICE or RLIMIT_NICE): a thread lowered for good
/// would starve on a busy machine. That is probed at `new` on a throwaway thread, which
/// starts at the caller's priority.
pub(super) struct Priority {
    base: i32,
    low: i32,
    lowered: bool,
    enabled: bool,
}

impl Priority {
    pub(super) fn new(by: i32) -> Priority {
        let base = own_nice();
        let low = base.saturating_add(by).min(19);
        #[cfg(test)]
        let refuse = REFUSE_RAISE.with(|r| r.get());
        let enabled = low > base
            && std::thread::scope(|s| {
                s.spawn(|| {
                    #[cfg(test)]
                    REFUSE_RAISE.with(|r| r.set(refuse));
                    set_own_nice(low) && set_own_nice(base)
                })
                .join()
                .unwrap_or(false)
            });
        Priority {
            base,
            low,
            lowered: false,
            enabled,
        }
    }

    /// False: lowering is off (`by` 0) or returning is not allowed here.
    pub(super) fn enabled(&self) -> bool {
        self.enabled
    }

    pub(super) fn lowered(&self) -> bool {
        self.lowered
    }

    /// Runs `f` (a pass), returning to level in the middle of it if it runs long
    /// while lowered ([`on_database_write`]).
    pub(super) fn run<T>(&mut self, f: impl FnOnce() -> T) -> T {
        if !self.lowered {
            return f();
        }
        WATCH.with(|w| w.set(Watch::Until(Instant::now() + LOWERED_PASS_MAX, self.base)));
        let out = f();
        if matches!(WATCH.with(|w| w.replace(Watch::Off)), Watch::Returned) {
            self.lowered = false;
        }
        out
    }

    /// Lowers or restores the calling thread (the one that made it).
    pub(super) fn set(&mut self, lowered: bool) {
        if !self.enabled || lowered == self.lowered {
            return;
        }
        if set_own_nice(if lowered { self.low } else { self.base }) {
            self.lowered = lowered;
        } else if !lowered {
            // Allowed at the probe, refused now (a limit changed): stay as it is.
            self.enabled = false;
            tracing::error!("store: the checkpointer cannot return to the server's priority");
        }
    }
}

/// The calling thread's nice value.
#[cfg(target_os = "linux")]
pub(super) fn own_nice() -> i32 {
    // SAFETY: plain system calls on the calling thread; -1 is a valid nice value, so
    // errno tells an error from it.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t);
        if n == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            n
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn own_nice() -> i32 {
    0
}

/// Sets the calling thread's nice value (Linux: per thread). False: refused.
#[cfg(target_os = "linux")]
fn set_own_nice(n: i32) -> bool {
    #[cfg(test)]
    if n < own_nice() && REFUSE_RAISE.with(|r| r.get()) {
        return false;
    }
    // SAFETY: a plain system call on the calling thread.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, n) == 0 }
}

#[cfg(test)]
thread_local! {
    /// Tests: raising this thread's priority is refused, as without CAP_SYS_NICE.
    static REFUSE_RAISE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(not(target_os = "linux"))]
fn set_own_nice(_: i32) -> bool {
    false
}

/// Tests: each store's checkpointer thread (database path, thread id).
#[cfg(test)]
pub(super) static THREADS: std::sync::Mutex<Vec<(std::path::PathBuf, i32)>> =
    std::sync::Mutex::new(Vec::new());

/// The read transaction that keeps the WAL from starting over, on one of two
/// connections: the next one begins before the held one ends.
pub(super) struct Pin {
    conns: [Connection; 2],
    held: Option<usize>,
}

impl Pin {
    pub(super) fn new(conns: [Connection; 2]) -> Pin {
        Pin { conns, held: None }
    }

    /// Begins a read transaction at the WAL's end on the connection not held, then
    /// ends the held one.
    pub(super) fn advance(&mut self) -> rusqlite::Result<()> {
        let next = self.held.map_or(0, |h| 1 - h);
        let c = &self.conns[next];
        c.execute_batch("BEGIN")?;
        // A deferred transaction takes its snapshot at its first read.
        if let Err(e) = c.query_row("SELECT COUNT(*) FROM meta", [], |_| Ok(())) {
            let _ = c.execute_batch("ROLLBACK");
            return Err(e);
        }
        self.release();
        self.held = Some(next);
        Ok(())
    }

    /// Ends the held read transaction, if any.
    pub(super) fn release(&mut self) {
        if let Some(h) = self.held.take() {
            let _ = self.conns[h].execute_batch("COMMIT");
        }
    }

    pub(super) fn held(&self) -> bool {
        self.held.is_some()
    }
}

/// What a PASSIVE checkpoint reports.
#[derive(Debug)]
pub(super) struct Pass {
    /// Another connection held the checkpoint lock: nothing was done.
    pub(super) busy: bool,
    /// Frames in the WAL.
    pub(super) log: i64,
    /// Of them, copied into the database.
    pub(super) copied: i64,
}

/// A PASSIVE checkpoint (the checkpointer's passes, the writer's finishing pass).
pub(super) fn pass(c: &Connection) -> rusqlite::Result<Pass> {
    c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok(Pass {
            busy: r.get::<_, i64>(0)? != 0,
            log: r.get(1)?,
            copied: r.get(2)?,
        })
    })
}

/// Starts writing the database file's dirty pages to disk without waiting for them
/// (Linux: `sync_file_range`), so that the sync before the WAL starts over finds little
/// left to write. Elsewhere it syncs, which waits.
pub(super) fn start_writeback(f: &std::fs::File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor; the call only schedules writeback. Its result
        // is advice: a failure leaves the pages to the sync before the WAL starts over.
        unsafe {
            libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = f.sync_data();
    }
}

/// Makes the database file durable (data and size).
fn sync_database(db: &std::fs::File, path: &std::path::Path) -> std::io::Result<()> {
    #[cfg(test)]
    if FAIL_SYNCS.hits(&path.to_string_lossy()) {
        return Err(std::io::Error::other("injected sync failure"));
    }
    db.sync_data()?;
    #[cfg(test)]
    note(path, "sync");
    #[cfg(not(test))]
    let _ = path;
    Ok(())
}

/// The checkpointer's connections and files.
pub(super) struct Checkpointer {
    pub(super) conn: Connection,
    pub(super) pin: Pin,
    /// The database file, for the syncs and the early writeback.
    pub(super) db: std::fs::File,
    pub(super) path: std::path::PathBuf,
    pub(super) finish: Arc<Finish>,
    pub(super) closing: Arc<AtomicBool>,
    pub(super) gate: Arc<Gate>,
    /// `store.checkpointer_nice`.
    pub(super) nice: i32,
}

impl Checkpointer {
    /// The thread's loop, until the store closes.
    pub(super) fn run(mut self) {
        let _ = self.finish.checkpointer.set(std::thread::current());
        super::walbuf::skipping_database_syncs();
        let mut seen = (-1i64, -1i64);
        let mut priority = Priority::new(self.nice);
        if self.nice > 0 && !priority.enabled() {
            tracing::info!(
                "store: the checkpointer runs level with the other threads \
                 (store.checkpointer_nice needs CAP_SYS_NICE or RLIMIT_NICE to return)"
            );
        }
        #[cfg(all(test, target_os = "linux"))]
        THREADS
            .lock()
            .unwrap()
            .push((self.path.clone(), unsafe { libc::gettid() }));
        while !self.closing.load(Ordering::Acquire) {
            match self.finish.get() {
                WANTED => {
                    // Level: what this leaves, the writer's pass copies and syncs
                    // while every write waits.
                    priority.set(false);
                    if let Err(e) = self.presync() {
                        self.stop(e);
                        return;
                    }
                    self.pin.release();
                    self.finish.state.store(READY, Ordering::Release);
                    continue;
                }
                READY | RUNNING => {
                    // The writer's turn; it wakes us when done.
                    std::thread::park_timeout(Duration::from_millis(50));
                    continue;
                }
                _ => {}
            }
            priority.set(runs_lowered(priority.lowered(), seen.0 - seen.1));
            if !self.pin.held() || seen.0 > seen.1 {
                // Frames past the last pass's copies: the pin moves to the WAL's end
                // first, so that this pass may copy them. (A failure leaves the WAL
                // free to start over: walbuf syncs the database then, on the writer.)
                let _ = self.pin.advance();
            }
            // PASSIVE never blocks the writer; errors (busy) retry next round.
            let now = priority
                .run(|| pass(&self.conn))
                .map_or(seen, |p| (p.log, p.copied));
            let busy = now != seen;
            if now.1 != seen.1 {
                start_writeback(&self.db);
            }
            seen = now;
            // Back to back while frames arrive (5 ms apart), so that the pass before
            // the hand-over, and then the writer's, find little to copy, and the
            // database's writeback is spread over the second. (Before the hand-over
            // existed the writer's pass copied whatever these left: one-to-one at
            // 5,000 msgs/s, p99 194 ms with a pass every 200 ms, 17 ms every 5 ms.
            // Passes 50 ms apart, tried with it, saved no CPU: under load a pass
            // takes longer than the pause.) With nothing new it looks every 50 ms.
            std::thread::park_timeout(Duration::from_millis(if busy { 5 } else { 50 }));
        }
    }

    /// Copies up to the WAL's end and syncs the database, in rounds while a sync is
    /// long (what arrived during one is copied and synced in the next). The later
    /// rounds' syncs are hardly shorter on this disk (5.1 / 5.4 / 5.1 ms; 16 / 32 / 40
    /// ms on a 700 MB database), yet against a single round, three alternating pairs
    /// at one-to-one 4,000 msgs/s, the writer's finishing pass synced the database in
    /// 2.7 / 3.7 / 2.9 ms against 4.4 / 3.9 / 4.5 (medians) and p99 was 22 / 27 / 30
    /// against 34 / 31 / 129 ms.
    fn presync(&mut self) -> Result<(), StoreError> {
        for _ in 0..PRESYNC_ROUNDS {
            let _ = self.pin.advance();
            let _ = pass(&self.conn);
            let t = Instant::now();
            sync_database(&self.db, &self.path).map_err(internal)?;
            if t.elapsed() < PRESYNC_SHORT {
                break;
            }
        }
        Ok(())
    }

    /// A database sync failed: the store stops (see the module's docs). The pin
    /// stays held until the store closes, so the WAL never starts over.
    fn stop(&mut self, e: StoreError) {
        tracing::error!(db = %self.path.display(), error = %e,
            "store: the database cannot be synced; writes stop (restart the server)");
        self.gate.fail();
        super::walbuf::keep_wal(&self.path, true);
        if !self.pin.held() {
            let _ = self.pin.advance();
        }
        while !self.closing.load(Ordering::Acquire) {
            std::thread::park_timeout(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lowered it stays lowered up to the "behind" mark; level it stays level until
    /// under the "caught up" mark.
    #[test]
    fn lowered_until_behind_level_until_caught_up() {
        assert!(runs_lowered(true, 0));
        assert!(runs_lowered(true, BEHIND_FRAMES));
        assert!(!runs_lowered(true, BEHIND_FRAMES + 1));
        assert!(runs_lowered(false, 0));
        assert!(runs_lowered(false, CAUGHT_UP_FRAMES));
        assert!(!runs_lowered(false, CAUGHT_UP_FRAMES + 1));
        assert!(!runs_lowered(false, BEHIND_FRAMES));
    }

    /// The thread's nice value follows `set`, and a lowered pass running past
    /// `LOWERED_PASS_MAX` returns to level at its next database write. Where returning
    /// is not allowed (no CAP_SYS_NICE, RLIMIT_NICE 0) nothing is ever lowered.
    #[test]
    fn a_priority_lowers_restores_and_returns_a_long_pass() {
        std::thread::spawn(|| {
            let base = own_nice();
            let mut p = Priority::new(7);
            let low = (base + 7).min(19);
            if !p.enabled() {
                eprintln!("notice: this process may not raise a priority: checked that nothing is lowered");
                p.set(true);
                assert_eq!((own_nice(), p.lowered()), (base, false));
                return;
            }
            assert!(low > base, "the test runs at nice {base}");
            assert_eq!(own_nice(), base);
            p.set(true);
            assert_eq!((own_nice(), p.lowered()), (low, true));
            p.set(false);
            assert_eq!((own_nice(), p.lowered()), (base, false));
            // Outside a pass a database write changes nothing.
            p.set(true);
            on_database_write();
            assert_eq!(own_nice(), low);
            // A short pass stays lowered; a long one returns at its next write.
            p.run(on_database_write);
            assert_eq!((own_nice(), p.lowered()), (low, true));
            p.run(|| {
                on_database_write();
                assert_eq!(own_nice(), low);
                std::thread::sleep(LOWERED_PASS_MAX + Duration::from_millis(5));
                on_database_write();
                assert_eq!(own_nice(), base, "a long pass still lowered");
            });
            assert!(!p.lowered());
            // The next one may be lowered again.
            p.set(true);
            assert_eq!(own_nice(), low);
        })
        .join()
        .unwrap();
    }

    /// Where raising a priority is refused (no CAP_SYS_NICE, RLIMIT_NICE 0: any
    /// unprivileged server) the probe says so and nothing is ever lowered, so the
    /// thread cannot be stranded at a low priority.
    #[cfg(target_os = "linux")]
    #[test]
    fn without_the_right_to_return_nothing_is_lowered() {
        std::thread::spawn(|| {
            let base = own_nice();
            REFUSE_RAISE.with(|r| r.set(true));
            let mut p = Priority::new(5);
            assert!(!p.enabled());
            p.set(true);
            assert_eq!((own_nice(), p.lowered()), (base, false));
            p.run(on_database_write);
            assert_eq!(own_nice(), base);
        })
        .join()
        .unwrap();
    }

    /// Returning refused after the probe allowed it (a limit changed while running):
    /// the thread stays as it is, says so, and lowers nothing any more.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_refused_return_stops_lowering() {
        std::thread::spawn(|| {
            let base = own_nice();
            let mut p = Priority::new(5);
            if !p.enabled() {
                eprintln!("notice: this process may not raise a priority: nothing to refuse");
                return;
            }
            let low = (base + 5).min(19);
            p.set(true);
            REFUSE_RAISE.with(|r| r.set(true));
            p.set(false);
            assert_eq!((own_nice(), p.lowered(), p.enabled()), (low, true, false));
            REFUSE_RAISE.with(|r| r.set(false));
            // Off for good: nothing is lowered or raised from here on.
            p.set(false);
            assert_eq!(own_nice(), low);
            assert!(set_own_nice(base));
            p.set(true);
            assert_eq!(own_nice(), base);
        })
        .join()
        .unwrap();
    }
}

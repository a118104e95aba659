//! The WAL's fsync off the writer's path: the writer commits a batch with the WAL
//! written but not synced (walbuf's [`deferring_wal_syncs`]), goes on to the next
//! batch at once, and this module's syncer thread syncs the WAL and only then
//! publishes the batch's messages and answers its writes. One sync covers every batch
//! committed before it, so while one sync runs the writer may commit several batches
//! and the next sync takes them all (group commit of the syncs themselves).
//!
//! Why: with the sync inside the COMMIT the writer stood still for it, and at
//! one-to-one 20,000 msgs/s the commit was 70 % of the writer's busy time (the
//! fsync's median 286 µs, its tail tens of ms on this shared disk), so every message
//! queued behind the previous batch's sync. Measured on a 10,000-user snapshot
//! restored before every run, one-to-one open loop at 20,000 msgs/s, two alternating
//! pairs: p50 11 / 10 -> 6.5 / 5.3 ms, p99 38 / 29 -> 19 / 15 ms (server CPU 63 -> 65-67
//! µs/msg: the extra thread, the checkpointer's WAL syncs); saturate-10k 23,690 /
//! 23,230 -> 24,422 / 24,634 delivered/s.
//!
//! What keeps it exact:
//! - acknowledged means durable: answers and publications leave only from here, after
//!   a sync that began after their batch's COMMIT returned;
//! - nobody reads what is not durable: a committed batch is visible to the readers'
//!   connections (and the stream overlay) before its sync, so every read waits, before
//!   it answers, until everything committed when it finished is durable
//!   ([`Gate::wait_durable`]; at most one sync, only while writes arrive, and without
//!   holding a thread: the wait is a future on the caller's runtime). Without
//!   this a device could fetch a message that a power cut then takes back, and see
//!   its seq reused by another;
//! - the checkpointer copies no frame that is not durable: its connection syncs the
//!   WAL before each pass (`synchronous=NORMAL` there; its database syncs are skipped,
//!   see the store). The writer's own finishing checkpoint syncs for real;
//! - a WAL that cannot be synced stops the store: SQLite has already made the batch
//!   visible and cannot take it back, and after a failed fsync the kernel may have
//!   dropped the pages and report the next one clean, so no later write could be
//!   acknowledged honestly. Every write waiting for the sync, and every write and read
//!   after it, fails with UNAVAILABLE and the error is logged; the operator restarts
//!   the server, whose recovery keeps what reached the disk (unacknowledged writes
//!   either survive or not; clients resend them by their ids). Until then nothing
//!   discards the WAL, not the shutdown's checkpoint nor the last connection's close
//!   (walbuf's `keep_wal`).
//!
//! [`deferring_wal_syncs`]: super::walbuf::deferring_wal_syncs

use super::{Done, Publication, Publisher, StoreError};
use parking_lot::RwLock;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where the commits stand: the last one begun, and the last one made durable.
pub(super) struct Gate {
    begun: AtomicU64,
    /// Watched by the reads that wait (asynchronously: a read holds no thread while
    /// it waits for a sync).
    state: tokio::sync::watch::Sender<State>,
}

#[derive(Clone, Copy, Default)]
struct State {
    durable: u64,
    failed: bool,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            begun: AtomicU64::new(0),
            state: tokio::sync::watch::Sender::new(State::default()),
        }
    }
}

/// A committed batch, waiting for its sync.
pub(super) struct Committed {
    pub(super) commit: u64,
    pub(super) publications: Vec<Publication>,
    pub(super) done: Vec<Done>,
}

/// What every write and read answers once a sync failed.
pub(super) fn sync_failed() -> StoreError {
    StoreError::Unavailable("storage failed: a sync to disk failed".into())
}

impl Gate {
    /// Numbers the commit about to run. Called before its COMMIT starts, so that a
    /// reader that could see the commit also sees its number.
    pub(super) fn begin_commit(&self) -> u64 {
        self.begun.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Resolves once every commit begun before the call is durable; an error once
    /// the WAL failed to sync.
    pub(super) fn wait_durable(
        &self,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let upto = self.begun.load(Ordering::SeqCst);
        let mut rx = self.state.subscribe();
        async move {
            let s = *rx
                .wait_for(|s| s.durable >= upto || s.failed)
                .await
                .map_err(|_| StoreError::Unavailable("storage is stopped".into()))?;
            if s.failed {
                Err(sync_failed())
            } else {
                Ok(())
            }
        }
    }

    /// The store has stopped writing (the WAL, or the database before the WAL could
    /// start over, failed to sync).
    pub(super) fn check(&self) -> Result<(), StoreError> {
        if self.state.borrow().failed {
            Err(sync_failed())
        } else {
            Ok(())
        }
    }

    fn durable(&self, upto: u64) {
        self.state.send_modify(|s| s.durable = s.durable.max(upto));
    }

    /// Stops the store: every waiting and later read and write fails.
    pub(super) fn fail(&self) {
        self.state.send_modify(|s| s.failed = true);
    }
}

/// Tests: WAL syncs of the syncer that fail, and WAL syncs held until released.
#[cfg(test)]
static FAIL_SYNCS: super::walbuf::FailUnder = super::walbuf::FailUnder::new();
#[cfg(test)]
static HOLD_SYNCS: super::walbuf::FailUnder = super::walbuf::FailUnder::new();

/// Tests: makes the syncer's WAL syncs under `dir` fail (`on`), or stops it.
#[cfg(test)]
pub(super) fn fail_syncs_under(dir: &std::path::Path, on: bool) {
    FAIL_SYNCS.set(dir, on);
}

/// Tests: the syncer's WAL syncs under `dir` wait while this is on.
#[cfg(test)]
pub(super) fn hold_syncs_under(dir: &std::path::Path, on: bool) {
    HOLD_SYNCS.set(dir, on);
}

fn sync_wal(wal: &std::path::Path, file: &mut Option<std::fs::File>) -> std::io::Result<()> {
    #[cfg(test)]
    {
        let p = wal.to_string_lossy();
        while HOLD_SYNCS.hits(&p) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if FAIL_SYNCS.hits(&p) {
            return Err(std::io::Error::other("injected sync failure"));
        }
    }
    if let Some(f) = file {
        return f.sync_data();
    }
    file.insert(std::fs::File::open(wal)?).sync_data()
}

/// Starts the syncer thread for the WAL at `wal`. It ends when every sender of `rx`
/// is gone, after answering everything sent.
pub(super) fn spawn_syncer(
    wal: PathBuf,
    gate: Arc<Gate>,
    publisher: Arc<RwLock<Option<Publisher>>>,
    rx: crossbeam_channel::Receiver<Committed>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("mychat-store-sync".into())
        .spawn(move || {
            let mut file = None;
            let mut batches = Vec::new();
            // The database this WAL belongs to.
            let wal_name = wal.to_string_lossy();
            let db = PathBuf::from(super::walbuf::database_of_wal(&wal_name).unwrap_or_default());
            while let Ok(first) = rx.recv() {
                batches.push(first);
                batches.extend(rx.try_iter());
                let upto = batches.last().map_or(0, |c| c.commit);
                let failed = gate
                    .check()
                    .and_then(|()| {
                        sync_wal(&wal, &mut file).map_err(|e| {
                            tracing::error!(wal = %wal.display(), error = %e,
                                "store: the write-ahead log cannot be synced; writes stop (restart the server)");
                            gate.fail();
                            super::walbuf::keep_wal(&db, true);
                            sync_failed()
                        })
                    })
                    .err();
                if failed.is_none() {
                    gate.durable(upto);
                }
                for c in batches.drain(..) {
                    if failed.is_none() && !c.publications.is_empty() {
                        if let Some(p) = publisher.read().as_ref() {
                            p(c.publications);
                        }
                    }
                    for d in c.done {
                        (d.send)(failed.clone());
                    }
                }
            }
        })
}

//! The embedded backend: SQLite (bundled, so nothing is installed) in the data
//! directory.
//!
//! Why SQLite: measured on this kind of machine (2 shared cores, fsync ≈ 150 µs),
//! durable commits of ~120-byte chat messages in batches of 64 / 512 ran at 37k / 85k
//! inserts/s with a rowid table and a unique (conversation, seq) index, in WAL mode with
//! synchronous=FULL; reads (history pages, sync ranges, lookups by id) took 5-20 µs at
//! the median. fjall (LSM) wrote faster (121k / 260k) but SQLite recovers from kill -9 in
//! milliseconds with the best-documented durability. If the load benchmark shows the
//! store bounding throughput, the alternatives go behind the same trait.
//!
//! Measured here with this schema (`cargo bench --bench store`: whole 1:1 sends of
//! 120-byte texts between 1,000 users, each = message row + 2 index entries + 2
//! stream rows + read/unread marks (the unread set is gone since: migration 3), fsync
//! per commit), median of 20 samples:
//! 1 in flight 2.4k msgs/s (every send pays its own fsync, ~410 µs), 64 in flight
//! 9.6k msgs/s, 512 in flight 15.4k msgs/s — group commit buys 6×. At 512 the writer
//! spends ~65 µs per message in SQLite's b-trees: that, not fsync, is the bound now.
//!
//! Page size 1 KiB, not SQLite's 4 KiB: a profile under load (perf, saturate-10k)
//! showed the writer's time going to WAL frames — every dirty page is written whole to
//! the WAL and checksummed, and a 1:1 message dirties pages in several b-trees keyed by
//! user (the stream, read marks, unread set). Smaller pages cut those bytes: the store
//! bench at 512 in flight went from 9.4-10.4k to 16-22.5k msgs/s in the same session
//! (two runs each). New databases only; an existing file keeps its page size.
//!
//! Shape:
//! - one writer thread (`mychat-store-writer`) owns the only write connection. It
//!   blocks for the first queued write, drains whatever else is queued (up to
//!   `store.max_batch`), runs each inside its own SAVEPOINT (one failing write does not
//!   sink the batch) and commits once (group commit). The commit's WAL fsync runs on a
//!   syncer thread while the writer goes on to the next batch; only after it are the
//!   batch's messages published and its callers answered, and a read answers only
//!   once what it may have seen is synced (the `durable` module);
//! - the writer caches each conversation's last seq and each user's last pts; it is the
//!   only writer, so the caches are exact. A write's changes go to a batch overlay when
//!   its savepoint is released (later writes of the batch read through it), into the
//!   caches when the batch commits, and are dropped whole if the commit fails;
//! - users' update-stream events go to an append-only log table (a one-to-one
//!   message's two events: its own row, which carries both pts) and an in-memory copy
//!   of it, and are merged into the per-user index many at a time, a step inside
//!   each write batch's transaction while a merge runs (the `recent` module says why
//!   and how readers stay exact; `Writer::merge_in_batch` why inside the batch); the
//!   read marks one-to-one sends imply are held in memory and flushed into `members`
//!   the same way (the `marks` module);
//! - reads run on the caller runtime's blocking pool with a pooled read-only connection
//!   (WAL: readers never wait for the writer and see every committed write);
//! - a checkpointer thread runs PASSIVE WAL checkpoints, back to back while frames
//!   arrive and every 50 ms when idle, so the ack path rarely pays for copying
//!   (`wal_autocheckpoint` is off on the writer); once a second the writer finishes
//!   the checkpoint itself between batches (see `Writer::run`), which lets the WAL
//!   rewind: without it, steady writes kept it growing forever. The checkpointer
//!   holds a read transaction inside the WAL so that it never rewinds at any other
//!   time, and syncs the database before handing the writer its pass, so the sync
//!   before a rewind finds little to write (the `checkpoint` module).
//!
//! Durability: `journal_mode=WAL`; a write is acknowledged after the WAL holding its
//! commit is fsynced (by the syncer thread, see the `durable` module), so an
//! acknowledged write survives kill -9 and power loss.

use super::*;
use crate::batchq::{Receiver, Sender, TrySendError};
use mychat_proto::Message;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

mod checkpoint;
mod client_ids;
mod durable;
mod marks;
pub mod pcache;
mod recent;
mod social;
mod walbuf;

/// Schema migrations, applied in order; the index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE users(
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE devices(
    user_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    platform INTEGER NOT NULL,
    cursor INTEGER,
    token_epoch INTEGER NOT NULL DEFAULT 0,
    last_login_ms INTEGER NOT NULL,
    PRIMARY KEY(user_id, device_id)
) WITHOUT ROWID;
CREATE TABLE refresh_tokens(
    hash BLOB PRIMARY KEY,
    user_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    platform INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX refresh_tokens_device ON refresh_tokens(user_id, device_id);
CREATE TABLE conversations(
    id INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    user_a INTEGER NOT NULL,
    user_b INTEGER NOT NULL
);
CREATE UNIQUE INDEX conversations_pair ON conversations(user_a, user_b);
CREATE TABLE members(
    user_id INTEGER NOT NULL,
    conv_id INTEGER NOT NULL,
    read_seq INTEGER NOT NULL DEFAULT 0,
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(user_id, conv_id)
) WITHOUT ROWID;
CREATE TABLE messages(
    id INTEGER PRIMARY KEY,
    conv_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    sender_id INTEGER NOT NULL,
    recipient_id INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    text TEXT NOT NULL,
    payload BLOB,
    client_msg_id TEXT NOT NULL,
    time_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX messages_conv_seq ON messages(conv_id, seq);
CREATE UNIQUE INDEX messages_client ON messages(sender_id, client_msg_id);
-- A user's update stream. kind 1: message msg_id; kind 2: read receipt (conv_id,
-- actor read up to seq).
CREATE TABLE updates(
    user_id INTEGER NOT NULL,
    pts INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    conv_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    msg_id INTEGER NOT NULL,
    actor INTEGER NOT NULL,
    PRIMARY KEY(user_id, pts)
) WITHOUT ROWID;
-- Conversations in which the user has unread messages (for a new device's snapshot).
CREATE TABLE unread(
    user_id INTEGER NOT NULL,
    conv_id INTEGER NOT NULL,
    PRIMARY KEY(user_id, conv_id)
) WITHOUT ROWID;
"#,
    r#"
-- 2: profiles, friends, blocks, categories, groups, recall, delete-for-me.
ALTER TABLE users ADD COLUMN nickname TEXT NOT NULL DEFAULT '';
ALTER TABLE users ADD COLUMN avatar TEXT NOT NULL DEFAULT '';
ALTER TABLE users ADD COLUMN signature TEXT NOT NULL DEFAULT '';
ALTER TABLE users ADD COLUMN last_seen_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN group_id INTEGER NOT NULL DEFAULT 0;
DROP INDEX conversations_pair;
CREATE UNIQUE INDEX conversations_direct ON conversations(user_a, user_b) WHERE group_id = 0;
ALTER TABLE messages ADD COLUMN group_id INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN recalled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE updates ADD COLUMN data TEXT NOT NULL DEFAULT '';
CREATE TABLE friends(
    user_id INTEGER NOT NULL,
    friend_id INTEGER NOT NULL,
    remark TEXT NOT NULL DEFAULT '',
    category_id INTEGER NOT NULL DEFAULT 0,
    since_ms INTEGER NOT NULL,
    PRIMARY KEY(user_id, friend_id)
) WITHOUT ROWID;
CREATE TABLE friend_requests(
    from_id INTEGER NOT NULL,
    to_id INTEGER NOT NULL,
    message TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    PRIMARY KEY(from_id, to_id)
) WITHOUT ROWID;
CREATE INDEX friend_requests_to ON friend_requests(to_id);
CREATE TABLE categories(
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL,
    name TEXT NOT NULL
);
CREATE INDEX categories_user ON categories(user_id);
CREATE TABLE blocks(
    user_id INTEGER NOT NULL,
    blocked_id INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    PRIMARY KEY(user_id, blocked_id)
) WITHOUT ROWID;
CREATE TABLE chat_groups(
    id INTEGER PRIMARY KEY,
    conv_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    owner_id INTEGER NOT NULL,
    join_policy INTEGER NOT NULL,
    mute_all INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    dissolved INTEGER NOT NULL DEFAULT 0
);
-- joined_ms holds ms x 1000 + the order within one operation (join order).
CREATE TABLE group_members(
    group_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    role INTEGER NOT NULL,
    joined_ms INTEGER NOT NULL,
    muted_until_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(group_id, user_id)
) WITHOUT ROWID;
CREATE INDEX group_members_user ON group_members(user_id);
CREATE TABLE group_join_requests(
    group_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    message TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    PRIMARY KEY(group_id, user_id)
) WITHOUT ROWID;
CREATE TABLE hidden(
    user_id INTEGER NOT NULL,
    msg_id INTEGER NOT NULL,
    PRIMARY KEY(user_id, msg_id)
) WITHOUT ROWID;
"#,
    r#"
-- 3: no unread set. It cost a b-tree page write per 1:1 message (the recipient's
-- entry, the sender's removal); a new device's snapshot now finds unread direct
-- conversations from the read marks (members) and each conversation's last seq.
DROP TABLE unread;
"#,
    r#"
-- 4: stream events are appended here first and merged into updates in (user, pts)
-- order, many at a time (see the recent module).
CREATE TABLE updates_log(
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL,
    pts INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    conv_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    msg_id INTEGER NOT NULL,
    actor INTEGER NOT NULL,
    data TEXT NOT NULL DEFAULT ''
);
"#,
    r#"
-- 5: the resend index leaves the messages table and is written many entries at a
-- time (see the client_ids module); messages past client_ids_upto are not in it yet.
CREATE TABLE client_ids(
    sender_id INTEGER NOT NULL,
    client_msg_id TEXT NOT NULL,
    msg_id INTEGER NOT NULL,
    PRIMARY KEY(sender_id, client_msg_id)
) WITHOUT ROWID;
INSERT INTO client_ids(sender_id, client_msg_id, msg_id)
    SELECT sender_id, client_msg_id, id FROM messages ORDER BY sender_id, client_msg_id;
DROP INDEX messages_client;
INSERT OR REPLACE INTO meta(key, value)
    VALUES('client_ids_upto', (SELECT COALESCE(MAX(id), 0) FROM messages));
"#,
    r#"
-- 6: the read marks one-to-one sends imply are written many at a time (see the marks
-- module); those of messages past read_marks_upto may not be in members yet.
INSERT OR REPLACE INTO meta(key, value)
    VALUES('read_marks_upto', (SELECT COALESCE(MAX(id), 0) FROM messages));
"#,
    r#"
-- 7: a one-to-one message carries both users' pts, and its two stream events are not
-- logged: those of the messages past stream_msgs_upto may not be in updates yet.
ALTER TABLE messages ADD COLUMN sender_pts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN recipient_pts INTEGER NOT NULL DEFAULT 0;
INSERT OR REPLACE INTO meta(key, value)
    VALUES('stream_msgs_upto', (SELECT COALESCE(MAX(id), 0) FROM messages));
"#,
];

const UPDATE_MESSAGE: i64 = 1;
const UPDATE_READ: i64 = 2;
/// One device row (read by `device_row`).
const DEVICE_BY_KEY: &str =
    "SELECT user_id, device_id, platform, cursor, token_epoch FROM devices WHERE user_id=?1 AND device_id=?2";
const CONV_DIRECT: i64 = 1;
/// Tests: how many conversations each opening of a database put in the pair cache.
#[cfg(test)]
static PRELOADED: std::sync::Mutex<Vec<(PathBuf, usize)>> = std::sync::Mutex::new(Vec::new());

/// For tests: the database of each probe of `client_ids` by a resend lookup.
#[cfg(test)]
static RESEND_PROBES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Prepared statements each connection keeps.
const STATEMENT_CACHE: usize = 128;
/// Bound on the writer's caches; past it they are dropped and refilled lazily.
const CACHE_MAX: usize = 1 << 20;
/// Bound on the number of groups whose state the writer keeps in memory.
const GROUP_CACHE_MAX: usize = 10_000;

/// A write: runs on the writer thread inside its own savepoint, and returns how to
/// answer its caller once the batch's fate is known.
type Job = Box<dyn FnOnce(&mut Writer, &mut CacheDelta) -> Done + Send>;

/// The answer of one write, held until its batch commits. `ok`: the write succeeded
/// (its savepoint is kept). `send(None)` delivers its result; `send(Some(e))` delivers
/// `e` instead (the commit failed, so nothing of it is durable).
struct Done {
    ok: bool,
    send: Box<dyn FnOnce(Option<StoreError>) + Send>,
}

/// How a write's failure is undone.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Undo {
    /// The write runs in a savepoint of its own: a failed one is rolled back alone and
    /// the rest of its batch commits.
    Savepoint,
    /// No savepoint: the write makes every check that can refuse it before it writes
    /// anything, so a refusal leaves nothing to undo; a failure after it wrote (an
    /// error of SQLite's own) rolls the whole batch back and refuses all of it, as a
    /// failed commit does. The 1:1 send only: its savepoint (the two statements, and
    /// SQLite copying the original of every page the send touched into the savepoint's
    /// journal) was 5-7 % of the writer's samples under saturate-10k.
    Batch,
}

enum WriteOp {
    Job(Job, Undo),
    /// Commit what came before, checkpoint, and stop.
    Stop,
}

/// The embedded store. Cheap to share (`Arc`).
pub struct SqliteStore {
    writes: Sender<WriteOp>,
    readers: (
        crossbeam_channel::Sender<Connection>,
        crossbeam_channel::Receiver<Connection>,
    ),
    closing: Arc<AtomicBool>,
    writer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    checkpointer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
    publisher: Arc<parking_lot::RwLock<Option<Publisher>>>,
    /// Stream events logged and committed but not merged into `updates` yet.
    recent: Arc<parking_lot::RwLock<recent::Recent>>,
    /// Makes a snapshot and `recent` agree (a new device's first sync).
    commits: Arc<recent::CommitLock>,
    /// Read marks implied by one-to-one sends, not in `members` yet.
    marks: Arc<parking_lot::RwLock<marks::Marks>>,
    /// Which commits are durable (reads wait for what they may have seen).
    gate: Arc<durable::Gate>,
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

/// Turns off SQLite's allocation statistics (once per process, before SQLite
/// initializes; afterwards the call is refused and changes nothing). With them on,
/// every allocation and free of SQLite's takes a process-wide mutex to keep counts
/// that nothing here reads (`sqlite3_status`, `sqlite3_memory_used`), on connections
/// otherwise opened without any (NO_MUTEX). SQLite's documentation recommends this
/// setting for speed. With SQLite built without SQLITE_ENABLE_MEMORY_MANAGEMENT
/// (`.cargo/config.toml`), the writer's pthread mutex calls went from 5.7 % to 0.2 % of
/// its samples under saturate-10k (the statistics' share alone was not measured).
fn memstatus_off() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config is called before initialization (or refused after it
        // with SQLITE_MISUSE); the option takes one int.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS,
                0 as std::ffi::c_int,
            )
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(
                rc,
                "SQLite was initialized before the store: its allocation statistics stay on"
            );
        }
    });
}

fn open(
    path: &Path,
    read_only: bool,
    cache_mib: u32,
    mmap_mib: u32,
) -> Result<Connection, StoreError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    // Before anything initializes SQLite (the VFS registration does).
    memstatus_off();
    if !pcache::install() {
        tracing::debug!("SQLite was initialized before the store: its default page cache stays");
    }
    walbuf::register().map_err(StoreError::Internal)?;
    let c = Connection::open_with_flags_and_vfs(path, flags, walbuf::VFS_NAME).map_err(internal)?;
    c.busy_timeout(Duration::from_secs(10)).map_err(internal)?;
    // Every statement the writer runs stays prepared: rusqlite keeps 16 by default, the
    // writer's hot path alone runs about 20, and under saturate-10k re-preparing the
    // evicted ones (the merge steps', `seq_of`'s, the conversation lookup's) was 2 % of
    // the writer's time. A prepared statement is a few KiB.
    c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    c.execute_batch(&format!(
        "PRAGMA cache_size = -{}; PRAGMA mmap_size = {};",
        cache_mib as u64 * 1024,
        mmap_mib as u64 * 1024 * 1024
    ))
    .map_err(internal)?;
    Ok(c)
}

impl SqliteStore {
    /// Opens (creating and migrating as needed) `dir/mychat.db`.
    pub fn open(
        dir: &Path,
        cfg: &mychat_config::StoreConfig,
    ) -> Result<Arc<SqliteStore>, StoreError> {
        std::fs::create_dir_all(dir).map_err(internal)?;
        // Absolute and without symlinks, as SQLite names the file to walbuf.
        let path = std::fs::canonicalize(dir)
            .map_err(internal)?
            .join("mychat.db");
        // Opened again after a failed sync (in this process): recovery takes it from here.
        walbuf::keep_wal(&path, false);
        let mut w = open(&path, false, cfg.cache_mib, cfg.mmap_mib)?;
        // page_size applies to a new file only (before its first table); journal_mode=WAL
        // persists in the file; synchronous and autocheckpoint are per connection.
        w.execute_batch("PRAGMA page_size=1024; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit=67108864; PRAGMA foreign_keys=OFF;")
            .map_err(internal)?;
        migrate(&mut w)?;
        // What a previous run left in the stream log (all of it after a crash).
        merge_all(&w)?;
        // The writer's statement and savepoint journals in memory, not in a temp file:
        // every write runs under a savepoint, and on a grown database (1.2 GB, 3.4M
        // messages) the merge steps' savepoints outgrew SQLite's 64 KiB in-memory
        // journal and spilled to a temp file page by page: 14,000 `pwrite` calls a
        // second at one-to-one 15,000 msgs/s, 85 % of the writer's write calls
        // (32,500-35,800 -> 5,200-5,300 a second with this; writer CPU 49 -> 46-47 %).
        // A journal holds the original of each page a statement or savepoint
        // changes, so it is bounded by one batch's pages. Set after the migrations and
        // the merge above, whose single statements can touch far more pages, and
        // reset before the merge at shutdown for the same reason.
        w.execute_batch("PRAGMA temp_store=MEMORY")
            .map_err(internal)?;
        let (rtx, rrx) = crossbeam_channel::bounded(cfg.read_connections);
        for _ in 0..cfg.read_connections {
            let r = open(&path, true, cfg.cache_mib, cfg.mmap_mib)?;
            rtx.send(r).map_err(internal)?;
        }
        let (wtx, wrx) = crate::batchq::bounded(cfg.write_queue);
        let closing = Arc::new(AtomicBool::new(false));
        let max_batch = cfg.max_batch;
        let publisher: Arc<parking_lot::RwLock<Option<Publisher>>> =
            Arc::new(parking_lot::RwLock::new(None));
        let recent = Arc::new(parking_lot::RwLock::new(recent::Recent::default()));
        let wrecent = recent.clone();
        let commits = Arc::new(recent::CommitLock::default());
        let wcommits = commits.clone();
        let marks = Arc::new(parking_lot::RwLock::new(marks::Marks::default()));
        let wmarks = marks.clone();
        let wcfg = cfg.clone();
        // The hand-over of the writer's finishing checkpoint (see the checkpoint module).
        let finish = Arc::new(checkpoint::Finish::default());
        let wfinish = finish.clone();
        let gate = Arc::new(durable::Gate::default());
        let (committed, to_sync) = crossbeam_channel::bounded(cfg.unsynced_batches);
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        let syncer = durable::spawn_syncer(wal.into(), gate.clone(), publisher.clone(), to_sync)
            .map_err(internal)?;
        let wgate = gate.clone();
        let writer = std::thread::Builder::new()
            .name("mychat-store-writer".into())
            .spawn(move || {
                Writer::new(w, (wrecent, wcommits), wmarks, &wcfg, wgate, committed)
                    .run(wrx, max_batch, wfinish);
                // The writer is gone, and with it the syncer's queue: everything
                // committed is answered before the store reports stopped.
                let _ = syncer.join();
            })
            .map_err(internal)?;
        let cp = checkpoint::Checkpointer {
            conn: open_checkpointer(&path)?,
            pin: checkpoint::Pin::new([open(&path, true, 1, 0)?, open(&path, true, 1, 0)?]),
            db: std::fs::File::open(&path).map_err(internal)?,
            path: path.clone(),
            finish,
            closing: closing.clone(),
            gate: gate.clone(),
            nice: cfg.checkpointer_nice,
        };
        let checkpointer = std::thread::Builder::new()
            .name("mychat-store-checkpoint".into())
            .spawn(move || cp.run())
            .map_err(internal)?;
        Ok(Arc::new(SqliteStore {
            writes: wtx,
            readers: (rtx, rrx),
            closing,
            writer: parking_lot::Mutex::new(Some(writer)),
            checkpointer: parking_lot::Mutex::new(Some(checkpointer)),
            path,
            publisher,
            recent,
            commits,
            marks,
            gate,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stream events logged and not merged yet (for tests of the bound).
    #[doc(hidden)]
    pub fn logged_events(&self) -> usize {
        self.recent.read().rows()
    }

    /// Queues a write for the writer thread; resolves once its batch committed.
    fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Writer, &mut CacheDelta) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFut<T> {
        self.write_undone_by(Undo::Savepoint, f)
    }

    fn write_undone_by<T: Send + 'static>(
        &self,
        undo: Undo,
        f: impl FnOnce(&mut Writer, &mut CacheDelta) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFut<T> {
        let (tx, rx) = oneshot::channel::<Result<T, StoreError>>();
        let job: Job = Box::new(move |w, d| {
            let r = if w.poisoned {
                // Its batch is refused whole (see `Writer::poisoned`): not run.
                Err(StoreError::Internal("refused with its batch".into()))
            } else {
                f(w, d)
            };
            Done {
                ok: r.is_ok(),
                send: Box::new(move |failed| {
                    let _ = tx.send(match failed {
                        Some(e) => Err(e),
                        None => r,
                    });
                }),
            }
        });
        let sent = if self.closing.load(Ordering::Acquire) {
            Err(StoreError::Unavailable(
                "the server is shutting down".into(),
            ))
        } else if let Err(e) = self.gate.check() {
            Err(e)
        } else {
            match self.writes.try_send(WriteOp::Job(job, undo)) {
                Ok(()) => Ok(()),
                Err(TrySendError::Full(_)) => Err(StoreError::Unavailable(
                    "storage write queue is full".into(),
                )),
                Err(TrySendError::Disconnected(_)) => {
                    Err(StoreError::Unavailable("storage is stopped".into()))
                }
            }
        };
        Box::pin(async move {
            sent?;
            rx.await
                .map_err(|_| StoreError::Unavailable("storage writer stopped".into()))?
        })
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFut<T> {
        let pool = self.readers.clone();
        let gate = self.gate.clone();
        Box::pin(async move {
            gate.check()?;
            let (r, durable) = tokio::task::spawn_blocking(move || {
                let conn = pool.1.recv().map_err(internal)?;
                let r = f(&conn);
                let _ = pool.0.send(conn);
                // Taken after the read: it covers every commit the read could see.
                Ok::<_, StoreError>((r, gate.wait_durable()))
            })
            .await
            .map_err(internal)??;
            // What it read may include a commit not synced yet: not before it is.
            durable.await?;
            r
        })
    }
}

/// The checkpointer's connection. Its thread calls `walbuf::skipping_database_syncs`
/// first: its passes copy frames into the database without syncing it; the kernel is
/// told to start writing them out after each pass (`checkpoint::start_writeback`), and the
/// database is synced before the WAL starts over (the checkpointer itself just before
/// the writer's finishing checkpoint, which syncs what it copied; and walbuf makes
/// sure: it syncs the database before any WAL content is overwritten, truncated or
/// deleted). Until then every copied frame is still in the WAL, which recovery
/// replays.
///
/// Why: on a grown database each pass ended in an fsync writing back thousands of
/// scattered pages, passes took hundreds of milliseconds, and the frames written
/// meanwhile were left to the writer's finishing pass, which stopped the writes
/// 40-170 ms once a second. One-to-one at 15,000 msgs/s on a 1.2 GB database (3.4M
/// messages), five alternating pairs: p99 134 / 113 / 106 / 98 / 220 -> 54 / 52 / 97
/// / 45 / 71 ms (median 113 -> 54), p90 median 21 -> 12 ms; in the two instrumented
/// pairs the finishing pass median 49 / 27 -> 26 / 24 ms and max 136 / 173 -> 58 /
/// 52 ms. Without the early writeback the finishing pass, left to write out
/// everything, took 190-280 ms.
///
/// `synchronous=NORMAL`, not OFF: a pass then syncs the WAL before it copies frames.
/// The writer leaves its commits' WAL sync to the syncer thread (the durable module),
/// so a committed frame the checkpointer sees may not be durable yet, and a frame
/// copied into the database before it is would survive a power cut that took its
/// transaction's other frames.
fn open_checkpointer(path: &Path) -> Result<Connection, StoreError> {
    let c = open(path, false, 1, 0)?;
    c.execute_batch("PRAGMA synchronous=NORMAL")
        .map_err(internal)?;
    Ok(c)
}

/// Moves every event of the stream log, and both events of every one-to-one message
/// past `stream_msgs_upto` (not logged: the message row carries both pts), into
/// `updates` and empties the log, every
/// resend entry of the messages past `client_ids_upto` into `client_ids`, and the read
/// marks of the one-to-one messages past `read_marks_upto` (each sender's newest there
/// per conversation, the marks module) into `members`, in one transaction. A merge
/// step that committed before a crash left rows in both places: `OR IGNORE` keeps the
/// copy already there (the same row), and a mark only moves forward.
fn merge_all(c: &Connection) -> Result<(), StoreError> {
    const SYSTEM: i32 = mychat_proto::MessageKind::System as i32;
    c.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         INSERT OR IGNORE INTO updates(user_id, pts, kind, conv_id, seq, msg_id, actor, data)
             SELECT user_id, pts, kind, conv_id, seq, msg_id, actor, data FROM updates_log
             UNION ALL
             SELECT sender_id, sender_pts, {UPDATE_MESSAGE}, conv_id, seq, id, sender_id, ''
             FROM messages
             WHERE id > (SELECT value FROM meta WHERE key = 'stream_msgs_upto') AND sender_pts > 0
             UNION ALL
             SELECT recipient_id, recipient_pts, {UPDATE_MESSAGE}, conv_id, seq, id, sender_id, ''
             FROM messages
             WHERE id > (SELECT value FROM meta WHERE key = 'stream_msgs_upto') AND sender_pts > 0
             ORDER BY 1, 2;
         DELETE FROM updates_log;
         UPDATE meta SET value = (SELECT COALESCE(MAX(id), 0) FROM messages)
             WHERE key = 'stream_msgs_upto';
         INSERT OR IGNORE INTO client_ids(sender_id, client_msg_id, msg_id)
             SELECT sender_id, client_msg_id, id FROM messages
             WHERE id > (SELECT value FROM meta WHERE key = 'client_ids_upto')
             ORDER BY sender_id, client_msg_id;
         UPDATE meta SET value = (SELECT COALESCE(MAX(id), 0) FROM messages)
             WHERE key = 'client_ids_upto';
         UPDATE members SET read_seq = x.seq FROM (
             SELECT m.sender_id AS u, m.conv_id AS c, MAX(m.seq) AS seq FROM messages m
             JOIN conversations cv ON cv.id = m.conv_id AND cv.group_id = 0
             WHERE m.id > (SELECT value FROM meta WHERE key = 'read_marks_upto')
                 AND m.kind != {SYSTEM}
             GROUP BY m.sender_id, m.conv_id) AS x
             WHERE members.user_id = x.u AND members.conv_id = x.c AND members.read_seq < x.seq;
         UPDATE meta SET value = (SELECT COALESCE(MAX(id), 0) FROM messages)
             WHERE key = 'read_marks_upto';
         COMMIT;",
    ))
    .map_err(|e| {
        let _ = c.execute_batch("ROLLBACK");
        internal(e)
    })
}

fn migrate(c: &mut Connection) -> Result<(), StoreError> {
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    )
    .map_err(internal)?;
    let version: i64 = c
        .query_row(
            "SELECT value FROM meta WHERE key='schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(internal)?
        .unwrap_or(0);
    if version as usize > MIGRATIONS.len() {
        return Err(StoreError::Internal(format!(
            "database schema version {version} is newer than this server knows ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = c.transaction().map_err(internal)?;
        tx.execute_batch(sql).map_err(internal)?;
        tx.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES('schema_version', ?1)",
            [i as i64 + 1],
        )
        .map_err(internal)?;
        tx.commit().map_err(internal)?;
    }
    Ok(())
}

fn platform_of(v: i64) -> Platform {
    Platform::try_from(v as i32).unwrap_or(Platform::Unspecified)
}

const MESSAGE_COLS: &str = "m.id, m.conv_id, m.seq, m.sender_id, m.recipient_id, m.kind, m.text, m.payload, m.client_msg_id, m.time_ms, m.group_id, m.recalled";
const USER_COLS: &str =
    "id, username, password_hash, created_ms, nickname, avatar, signature, last_seen_ms";
const CONV_COLS: &str = "id, user_a, user_b, group_id";

fn message_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Message> {
    let payload: Option<Vec<u8>> = r.get(at + 7)?;
    Ok(Message {
        id: r.get::<_, i64>(at)? as u64,
        conversation_id: r.get::<_, i64>(at + 1)? as u64,
        seq: r.get::<_, i64>(at + 2)? as u64,
        sender_id: r.get::<_, i64>(at + 3)? as u64,
        recipient_id: r.get::<_, i64>(at + 4)? as u64,
        group_id: r.get::<_, i64>(at + 10)? as u64,
        kind: r.get::<_, i64>(at + 5)? as i32,
        text: r.get(at + 6)?,
        payload: payload.map(bytes::Bytes::from).unwrap_or_default(),
        client_msg_id: r.get(at + 8)?,
        time_ms: r.get(at + 9)?,
        recalled: r.get::<_, i64>(at + 11)? != 0,
    })
}

fn user_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        id: UserId(r.get::<_, i64>(0)? as u64),
        username: r.get(1)?,
        password_hash: r.get(2)?,
        created_ms: r.get(3)?,
        nickname: r.get(4)?,
        avatar: r.get(5)?,
        signature: r.get(6)?,
        last_seen_ms: r.get(7)?,
    })
}

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        user: UserId(r.get::<_, i64>(0)? as u64),
        device_id: r.get(1)?,
        platform: platform_of(r.get(2)?),
        cursor: r.get::<_, Option<i64>>(3)?.map(|c| c as u64),
        token_epoch: r.get::<_, i64>(4)? as u64,
    })
}

fn conv_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConvRecord> {
    Ok(ConvRecord {
        id: ConvId(r.get::<_, i64>(0)? as u64),
        user_a: UserId(r.get::<_, i64>(1)? as u64),
        user_b: UserId(r.get::<_, i64>(2)? as u64),
        group_id: r.get::<_, i64>(3)? as u64,
    })
}

/// What the merge parts of a batch wrote, for memory once the batch commits.
#[derive(Default)]
struct MergeWork {
    stream: Option<StreamStep>,
    /// The log trim reached its end.
    trimmed: bool,
    cids: Option<client_ids::Step>,
    marks: Option<marks::Step>,
}

/// A stream merge step written: the merge's start, the users it moved, and where the
/// next step starts (None: it was the merge's last).
struct StreamStep {
    upto: i64,
    users: Vec<UserId>,
    next: Option<Option<UserId>>,
}

/// The writer thread's state: the one write connection and the exact caches.
struct Writer {
    conn: Connection,
    /// The database file, as SQLite names it (walbuf's marks and the tests' events).
    db: PathBuf,
    last_seq: HashMap<ConvId, u64>,
    last_pts: HashMap<UserId, u64>,
    pairs: HashMap<(UserId, UserId), ConvRecord>,
    /// Changes made by the released writes of the batch being built, not yet
    /// committed: consulted before the caches, merged into them on commit.
    batch_seq: HashMap<ConvId, u64>,
    batch_pts: HashMap<UserId, u64>,
    pairs_pending: HashMap<(UserId, UserId), ConvRecord>,
    /// Group state (settings and members), loaded on demand; exact (one writer).
    groups: HashMap<u64, social::GroupState>,
    /// Groups changed by the batch being built (dropped from `groups` if their write
    /// fails or the commit does).
    groups_dirty: Vec<u64>,
    /// Messages of the batch being built, to publish once it commits.
    publications: Vec<Publication>,
    /// The batch being built cannot commit: a write without a savepoint failed after
    /// it wrote, or SQLite rolled the transaction back. Its remaining writes are not
    /// run, and all of it is refused as a failed commit is.
    poisoned: bool,
    /// Committed batches go here to be synced, then published and answered.
    committed: crossbeam_channel::Sender<durable::Committed>,
    gate: Arc<durable::Gate>,
    recent: Arc<parking_lot::RwLock<recent::Recent>>,
    /// Held from a batch's COMMIT until `recent` shows it (see `recent::CommitLock`).
    commits: Arc<recent::CommitLock>,
    /// Stream events of the released writes of the batch being built.
    batch_updates: Vec<(UserId, recent::Entry)>,
    /// The merge under way: (its start, the last user moved so far).
    merge: Option<(i64, Option<UserId>)>,
    /// The newest message committed when the merge under way started: once it ends,
    /// the events of every message up to it are in `updates` (`stream_msgs_upto`).
    merge_msgs_upto: u64,
    /// Log rows up to this id are merged and wait to be deleted (0: none).
    log_trim: i64,
    /// After a failed merge step, none is tried before this.
    merge_pause: Option<std::time::Instant>,
    /// Resend index entries not merged into `client_ids` yet.
    cids: client_ids::ClientIds,
    stream_log_rows: usize,
    stream_merge_rows: usize,
    /// Stream events and resend entries committed since the last merge step of each:
    /// a step takes at least as many, so that a merge always gains on what arrives
    /// while it runs (one write can log hundreds of events: a group's creation), and
    /// what waits stays under about twice `stream_log_rows`.
    logged_since_step: usize,
    cids_since_step: usize,
    /// The next stream log row id. Assigned here, not by SQLite: a merge deletes the
    /// log's rows up to where it started, and SQLite would hand out ids from the
    /// largest left, reusing deleted ones once the log is empty; a merge compares ids
    /// with its start, so they must only grow.
    next_log_id: i64,
    /// Read marks implied by one-to-one sends, not in `members` yet (the marks module).
    marks: Arc<parking_lot::RwLock<marks::Marks>>,
    /// Marks of the released writes of the batch being built.
    batch_marks: Vec<(UserId, ConvId, u64)>,
    /// The flush of `marks` under way, and the marks committed since its last step.
    marks_flush: Option<marks::Flush>,
    marks_since_step: usize,
}

/// One row of the `updates` table, minus its user, pts and text.
#[derive(Clone, Copy, Debug)]
struct StreamEvent {
    kind: i64,
    conv: ConvId,
    seq: u64,
    msg_id: u64,
    actor: UserId,
}

/// Cache changes of one write, applied only once its savepoint is released.
#[derive(Default)]
struct CacheDelta {
    seqs: Vec<(ConvId, u64)>,
    pts: Vec<(UserId, u64)>,
    pair: Option<ConvRecord>,
    /// Stream events logged by the write, for [`recent::Recent`] once committed.
    updates: Vec<(UserId, recent::Entry)>,
    /// Resend index entries of the messages the write stored.
    cids: Vec<client_ids::Entry>,
    /// Read marks its sends imply (sender, conversation, seq).
    marks: Vec<(UserId, ConvId, u64)>,
}

impl CacheDelta {
    fn clear(&mut self) {
        self.seqs.clear();
        self.pts.clear();
        self.pair = None;
        self.updates.clear();
        self.cids.clear();
        self.marks.clear();
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

impl Writer {
    fn new(
        conn: Connection,
        (recent, commits): (
            Arc<parking_lot::RwLock<recent::Recent>>,
            Arc<recent::CommitLock>,
        ),
        marks: Arc<parking_lot::RwLock<marks::Marks>>,
        cfg: &mychat_config::StoreConfig,
        gate: Arc<durable::Gate>,
        committed: crossbeam_channel::Sender<durable::Committed>,
    ) -> Writer {
        Writer {
            committed,
            gate,
            recent,
            commits,
            batch_updates: Vec::new(),
            merge: None,
            merge_msgs_upto: 0,
            log_trim: 0,
            merge_pause: None,
            cids: client_ids::ClientIds::default(),
            stream_log_rows: cfg.stream_log_rows,
            stream_merge_rows: cfg.stream_merge_rows,
            logged_since_step: 0,
            cids_since_step: 0,
            next_log_id: conn
                .query_row(
                    "SELECT COALESCE(MAX(id), 0) + 1 FROM updates_log",
                    [],
                    |r| r.get(0),
                )
                .unwrap_or(1),
            db: PathBuf::from(conn.path().unwrap_or_default()),
            conn,
            last_seq: HashMap::new(),
            last_pts: HashMap::new(),
            pairs: HashMap::new(),
            batch_seq: HashMap::new(),
            batch_pts: HashMap::new(),
            pairs_pending: HashMap::new(),
            groups: HashMap::new(),
            groups_dirty: Vec::new(),
            publications: Vec::new(),
            poisoned: false,
            marks,
            batch_marks: Vec::new(),
            marks_flush: None,
            marks_since_step: 0,
        }
    }

    /// Fills the pair cache with the newest direct conversations (up to half its
    /// bound), in the writer's thread before its first batch. Without it, after a
    /// restart the first message between each pair looked its conversation up: under
    /// saturate-10k (100,000 pairs, each existing) on a freshly started server that
    /// lookup was 6 % of the writer's samples. Conversations never change or go, so
    /// the cache stays exact. About 50 ms and 6 MB per 100,000 conversations.
    fn preload_pairs(&mut self) {
        let started = std::time::Instant::now();
        let loaded = self
            .conn
            .prepare(&format!(
                "SELECT {CONV_COLS} FROM conversations WHERE group_id=0 ORDER BY id DESC LIMIT ?1"
            ))
            .and_then(|mut s| {
                s.query_map([(CACHE_MAX / 2) as i64], conv_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            });
        match loaded {
            Ok(convs) => {
                let n = convs.len();
                self.pairs
                    .extend(convs.into_iter().map(|c| ((c.user_a, c.user_b), c)));
                #[cfg(test)]
                PRELOADED.lock().unwrap().push((self.db.clone(), n));
                tracing::debug!(
                    conversations = n,
                    ms = started.elapsed().as_millis() as u64,
                    "store: conversation cache filled"
                );
            }
            // The cache fills lazily instead.
            Err(e) => tracing::warn!(error = %e, "store: cannot fill the conversation cache"),
        }
    }

    fn run(mut self, rx: Receiver<WriteOp>, max_batch: usize, finish: Arc<checkpoint::Finish>) {
        self.preload_pairs();
        let mut batch = Vec::with_capacity(max_batch);
        let mut stop = false;
        let mut last_checkpoint = std::time::Instant::now();
        let mut taken = Vec::with_capacity(max_batch);
        while !stop {
            // Whatever is queued, up to a batch, under one lock of the queue.
            if rx.recv_batch(&mut taken, max_batch).is_err() {
                break;
            }
            for op in taken.drain(..) {
                if matches!(op, WriteOp::Stop) {
                    // Anything queued behind it is dropped: its caller sees the
                    // writer gone (nothing is queued after Stop but a write racing
                    // the shutdown, which is refused either way).
                    stop = true;
                    break;
                }
                batch.push(op);
            }
            if !batch.is_empty() {
                self.commit_batch(&mut batch);
            }
            // Finish the checkpoint from here, between batches, once a second: the
            // checkpointer thread copies most frames off the ack path, but under steady
            // writes it never catches the writer (new frames land while it copies), so
            // the WAL could never start over and grew by gigabytes. Run by the only
            // writer, with no frame added meanwhile, the checkpoint completes (unless a
            // reader still holds an old snapshot: then next time), and the next
            // transaction rewinds the WAL; journal_size_limit trims the file.
            // The checkpointer first copies up to here and syncs the database, off this
            // path, and holds no pass or pin while ours runs (the checkpoint module):
            // this pass copies and syncs only what arrived since. (Without the
            // hand-over, on an 886 MB database under saturate-10k the checkpointer's
            // passes held the checkpoint lock at nearly every attempt of ours: the WAL
            // reached 1.3 GB in 20 s and every pass grew longer.)
            // (None once a sync failed and the store stopped: the WAL stays as it is.)
            if last_checkpoint.elapsed() >= Duration::from_secs(1)
                && self.gate.check().is_ok()
                && finish.writer_may_finish()
            {
                // An error is not the lock: don't hold the checkpointer back on it.
                let busy = checkpoint::pass(&self.conn).is_ok_and(|p| p.busy);
                #[cfg(test)]
                checkpoint::note(&self.db, "finish");
                if !busy {
                    last_checkpoint = std::time::Instant::now();
                    finish.writer_finished();
                }
            }
        }
        if self.gate.check().is_err() {
            // A sync failed (the durable and checkpoint modules): the WAL stays as
            // it is, for the next start's recovery.
            return;
        }
        // Shutting down: merge the stream log, then fold the WAL back into the
        // database file.
        let _ = self.conn.execute_batch("PRAGMA temp_store=DEFAULT");
        let held = self.commits.write();
        match merge_all(&self.conn) {
            Ok(()) => {
                self.recent.write().clear();
                self.marks.write().clear();
            }
            Err(e) => tracing::error!(error = %e, "store: cannot merge the stream log"),
        }
        drop(held);
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }

    /// Runs a parameterless statement kept prepared (the savepoint of every job would
    /// otherwise be parsed twice per write).
    fn exec_cached(&self, sql: &str) -> rusqlite::Result<usize> {
        self.conn.prepare_cached(sql)?.execute([])
    }

    fn commit_batch(&mut self, batch: &mut Vec<WriteOp>) {
        let mut done: Vec<Done> = Vec::with_capacity(batch.len());
        if self.gate.check().is_err() {
            // The WAL failed to sync: nothing more is written (see the durable
            // module). The jobs are dropped unrun: their callers get UNAVAILABLE.
            batch.clear();
            return;
        }
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let err = internal(e);
            tracing::error!(error = %err, "store: cannot begin a write transaction");
            // The jobs are dropped unrun: their callers get UNAVAILABLE.
            batch.clear();
            return;
        }
        self.batch_seq.clear();
        self.batch_pts.clear();
        self.pairs_pending.clear();
        self.batch_updates.clear();
        self.cids.batch_failed();
        self.batch_marks.clear();
        self.poisoned = false;
        // One delta for every write of the batch, emptied before each: its lists keep
        // their room, so a write allocates none of them.
        let mut delta = CacheDelta::default();
        for op in batch.drain(..) {
            let WriteOp::Job(job, undo) = op else {
                continue;
            };
            let savepoint = undo == Undo::Savepoint;
            if savepoint && self.exec_cached("SAVEPOINT op").is_err() {
                continue; // the job is dropped: its caller sees "writer stopped"
            }
            let changes = self.conn.total_changes();
            delta.clear();
            let groups_before = self.groups_dirty.len();
            let pubs_before = self.publications.len();
            let d = job(self, &mut delta);
            if self.poisoned {
                // Refused with the rest below; nothing of it is kept.
            } else if d.ok {
                if savepoint {
                    let _ = self.exec_cached("RELEASE op");
                }
                self.batch_seq.extend(delta.seqs.drain(..));
                self.batch_pts.extend(delta.pts.drain(..));
                self.batch_updates.append(&mut delta.updates);
                self.cids.add_to_batch(delta.cids.drain(..));
                self.batch_marks.append(&mut delta.marks);
                if let Some(c) = delta.pair.take() {
                    self.pairs_pending.insert((c.user_a, c.user_b), c);
                }
            } else {
                if savepoint {
                    let _ = self.exec_cached("ROLLBACK TO op");
                    let _ = self.exec_cached("RELEASE op");
                } else if self.conn.total_changes() != changes {
                    tracing::error!("store: a write failed after it wrote; its batch is refused");
                    self.poisoned = true;
                }
                if self.conn.is_autocommit() {
                    // SQLite rolled the whole transaction back (an I/O error, a full
                    // disk): what the batch's earlier writes did is gone, and a later
                    // write would commit on its own.
                    tracing::error!(
                        "store: the batch's transaction was rolled back; its batch is refused"
                    );
                    self.poisoned = true;
                }
                self.publications.truncate(pubs_before);
                // A failed write may have touched cached group state: reload it.
                for g in self.groups_dirty.drain(groups_before..).collect::<Vec<_>>() {
                    self.groups.remove(&g);
                }
            }
            done.push(d);
        }
        let merges = if self.poisoned {
            MergeWork::default()
        } else {
            self.merge_in_batch()
        };
        // Before the COMMIT, so that no snapshot holds a message whose mark is neither
        // here nor in `members` (the marks module says how readers stay exact).
        let marks_before = if self.poisoned || self.batch_marks.is_empty() {
            Vec::new()
        } else {
            self.marks.write().add(&self.batch_marks)
        };
        let commit = self.gate.begin_commit();
        // Until `recent` shows this commit, no reader may begin the snapshot it reads
        // `recent` beside (see `recent::CommitLock`).
        let commits = Arc::clone(&self.commits);
        let held = commits.write();
        // The WAL's sync is left to the syncer thread (the durable module says why).
        let committed = if self.poisoned {
            Err("a write failed after it wrote".to_string())
        } else {
            walbuf::deferring_wal_syncs(|| self.conn.execute_batch("COMMIT"))
                .map_err(|e| e.to_string())
        };
        match committed {
            Ok(()) => {
                self.marks_since_step += self.batch_marks.len();
                self.merges_committed(merges);
                if self.last_pts.len() > CACHE_MAX
                    || self.last_seq.len() > CACHE_MAX
                    || self.pairs.len() > CACHE_MAX
                {
                    self.last_pts.clear();
                    self.last_seq.clear();
                    self.pairs.clear();
                }
                if self.groups.len() > GROUP_CACHE_MAX {
                    self.groups.clear();
                }
                self.groups_dirty.clear();
                self.last_seq.extend(self.batch_seq.drain());
                self.last_pts.extend(self.batch_pts.drain());
                self.pairs.extend(self.pairs_pending.drain());
                // Before anyone hears of the commit: a device that is pushed an event
                // and syncs must find it.
                self.logged_since_step += self.batch_updates.len();
                #[cfg(test)]
                tests::pause_after_commit(&self.db);
                if !self.batch_updates.is_empty() {
                    self.recent.write().add(self.batch_updates.drain(..));
                }
                drop(held);
                self.cids_since_step += self.cids.batch_len();
                self.cids.batch_committed();
                // Once the WAL is synced: published in commit order, then answered.
                let _ = self.committed.send(durable::Committed {
                    commit,
                    publications: std::mem::take(&mut self.publications),
                    done,
                });
            }
            Err(e) => {
                drop(held);
                tracing::error!(error = %e, "store: commit failed; the batch is refused");
                let _ = self.conn.execute_batch("ROLLBACK");
                self.marks.write().undo(marks_before);
                let stopped = walbuf::wal_kept(&self.db);
                if stopped {
                    // A sync failed (walbuf's, before the WAL would start over): from
                    // here on every write and read fails, as after a failed WAL sync.
                    self.gate.fail();
                }
                self.merges_failed(merges);
                self.batch_seq.clear();
                self.batch_pts.clear();
                self.pairs_pending.clear();
                self.batch_updates.clear();
                self.cids.batch_failed();
                self.last_pts.clear();
                self.last_seq.clear();
                self.pairs.clear();
                self.groups.clear();
                self.groups_dirty.clear();
                self.publications.clear();
                let refused = if stopped {
                    durable::sync_failed()
                } else {
                    StoreError::Internal("commit failed".into())
                };
                for d in done {
                    (d.send)(Some(refused.clone()));
                }
                // Nothing of it to sync, but readers wait until its number is passed.
                let _ = self.committed.send(durable::Committed {
                    commit,
                    publications: Vec::new(),
                    done: Vec::new(),
                });
            }
        }
    }

    fn create_user(
        &mut self,
        username: String,
        hash: String,
        now: i64,
    ) -> Result<UserRecord, StoreError> {
        let r = self
            .conn
            .prepare_cached(
                "INSERT INTO users(username, password_hash, created_ms) VALUES(?1, ?2, ?3)",
            )
            .and_then(|mut s| s.execute(params![username, hash, now]));
        match r {
            Ok(_) => Ok(UserRecord {
                id: UserId(self.conn.last_insert_rowid() as u64),
                username,
                password_hash: hash,
                created_ms: now,
                nickname: String::new(),
                avatar: String::new(),
                signature: String::new(),
                last_seen_ms: 0,
            }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict),
            Err(e) => Err(internal(e)),
        }
    }

    fn register_device(
        &mut self,
        user: UserId,
        device: String,
        platform: Platform,
        now: i64,
    ) -> Result<DeviceRecord, StoreError> {
        let c = &self.conn;
        c.prepare_cached(
            "INSERT INTO devices(user_id, device_id, platform, cursor, token_epoch, last_login_ms) VALUES(?1, ?2, ?3, NULL, 0, ?4)
             ON CONFLICT(user_id, device_id) DO UPDATE SET platform = excluded.platform, last_login_ms = excluded.last_login_ms",
        )
        .and_then(|mut s| s.execute(params![user.0 as i64, device, platform as i64, now]))
        .map_err(internal)?;
        c.prepare_cached(DEVICE_BY_KEY)
            .and_then(|mut s| s.query_row(params![user.0 as i64, device], device_row))
            .map_err(internal)
    }

    fn token_login(
        &mut self,
        user: UserId,
        device: &str,
        epoch: u64,
        platform: Platform,
        now: i64,
    ) -> Result<Option<(DeviceRecord, UserRecord)>, StoreError> {
        let c = &self.conn;
        let dev = c
            .prepare_cached(DEVICE_BY_KEY)
            .and_then(|mut s| {
                s.query_row(params![user.0 as i64, device], device_row)
                    .optional()
            })
            .map_err(internal)?;
        let Some(mut dev) = dev.filter(|d| d.token_epoch == epoch) else {
            return Ok(None);
        };
        let u = c
            .prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE id=?1"))
            .and_then(|mut s| s.query_row([user.0 as i64], user_row).optional())
            .map_err(internal)?;
        let Some(u) = u else { return Ok(None) };
        c.prepare_cached(
            "UPDATE devices SET platform=?3, last_login_ms=?4 WHERE user_id=?1 AND device_id=?2",
        )
        .and_then(|mut s| s.execute(params![user.0 as i64, device, platform as i64, now]))
        .map_err(internal)?;
        dev.platform = platform;
        Ok(Some((dev, u)))
    }

    fn logout(&mut self, user: UserId, device: &str) -> Result<(), StoreError> {
        let c = &self.conn;
        c.prepare_cached(
            "UPDATE devices SET token_epoch = token_epoch + 1 WHERE user_id=?1 AND device_id=?2",
        )
        .and_then(|mut s| s.execute(params![user.0 as i64, device]))
        .map_err(internal)?;
        c.prepare_cached("DELETE FROM refresh_tokens WHERE user_id=?1 AND device_id=?2")
            .and_then(|mut s| s.execute(params![user.0 as i64, device]))
            .map_err(internal)?;
        Ok(())
    }

    fn set_cursor(&mut self, user: UserId, device: &str, pts: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE devices SET cursor = MAX(COALESCE(cursor, 0), ?3) WHERE user_id=?1 AND device_id=?2")
            .and_then(|mut s| s.execute(params![user.0 as i64, device, pts as i64]))
            .map_err(internal)?;
        Ok(())
    }

    fn put_refresh(&mut self, r: &RefreshRecord) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO refresh_tokens(hash, user_id, device_id, platform, expires_ms) VALUES(?1, ?2, ?3, ?4, ?5)")
            .and_then(|mut s| s.execute(params![&r.hash[..], r.user.0 as i64, r.device_id, r.platform as i64, r.expires_ms]))
            .map_err(|e| if is_unique_violation(&e) { StoreError::Conflict } else { internal(e) })?;
        Ok(())
    }

    fn take_refresh(
        &mut self,
        hash: [u8; 32],
        new_hash: [u8; 32],
        new_expires: i64,
        now: i64,
    ) -> Result<TakeRefresh, StoreError> {
        let old = self
            .conn
            .prepare_cached(
                "SELECT user_id, device_id, platform, expires_ms FROM refresh_tokens WHERE hash=?1",
            )
            .and_then(|mut s| {
                s.query_row(params![&hash[..]], |r| {
                    Ok(RefreshRecord {
                        hash,
                        user: UserId(r.get::<_, i64>(0)? as u64),
                        device_id: r.get(1)?,
                        platform: platform_of(r.get(2)?),
                        expires_ms: r.get(3)?,
                    })
                })
                .optional()
            })
            .map_err(internal)?;
        let Some(old) = old else {
            return Ok(TakeRefresh::Unknown);
        };
        self.conn
            .prepare_cached("DELETE FROM refresh_tokens WHERE hash=?1")
            .and_then(|mut s| s.execute(params![&hash[..]]))
            .map_err(internal)?;
        if old.expires_ms <= now {
            return Ok(TakeRefresh::Expired);
        }
        let new = RefreshRecord {
            hash: new_hash,
            expires_ms: new_expires,
            ..old
        };
        self.put_refresh(&new)?;
        Ok(TakeRefresh::Rotated(new))
    }

    fn pts_of(&mut self, u: UserId, d: &CacheDelta) -> Result<u64, StoreError> {
        if let Some((_, p)) = d.pts.iter().rev().find(|(x, _)| *x == u) {
            return Ok(*p);
        }
        if let Some(p) = self.batch_pts.get(&u) {
            return Ok(*p);
        }
        if let Some(p) = self.last_pts.get(&u) {
            return Ok(*p);
        }
        // Logged events are newer than any merged one.
        if let Some(p) = self.recent.read().last_pts(u) {
            return Ok(p);
        }
        let p: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(pts), 0) FROM updates WHERE user_id=?1")
            .and_then(|mut s| s.query_row([u.0 as i64], |r| r.get(0)))
            .map_err(internal)?;
        Ok(p as u64)
    }

    fn seq_of(&mut self, c: ConvId) -> Result<u64, StoreError> {
        if let Some(s) = self.batch_seq.get(&c) {
            return Ok(*s);
        }
        if let Some(s) = self.last_seq.get(&c) {
            return Ok(*s);
        }
        let s: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE conv_id=?1")
            .and_then(|mut s| s.query_row([c.0 as i64], |r| r.get(0)))
            .map_err(internal)?;
        Ok(s as u64)
    }

    /// Appends an event (with its text, usually empty) to `user`'s stream; returns its
    /// pts. It goes to the stream log (see the recent module).
    fn push_update(
        &mut self,
        user: UserId,
        ev: StreamEvent,
        data: &str,
        d: &mut CacheDelta,
    ) -> Result<u64, StoreError> {
        let StreamEvent {
            kind,
            conv,
            seq,
            msg_id,
            actor,
        } = ev;
        let pts = self.pts_of(user, d)? + 1;
        self.conn
            .prepare_cached("INSERT INTO updates_log(id, user_id, pts, kind, conv_id, seq, msg_id, actor, data) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)")
            .and_then(|mut s| s.execute(params![self.next_log_id, user.0 as i64, pts as i64, kind, conv.0 as i64, seq as i64, msg_id as i64, actor.0 as i64, data]))
            .map_err(internal)?;
        self.hold_update(user, pts, ev, data.to_owned(), d);
        Ok(pts)
    }

    /// Puts an event at `pts` of `user`'s stream in memory (for [`recent::Recent`] once
    /// committed) with the next log id: after [`Writer::push_update`] logged it, or for
    /// a one-to-one message, whose row carries both events' pts instead of two log
    /// rows (a restart derives them from it: `merge_all`).
    fn hold_update(
        &mut self,
        user: UserId,
        pts: u64,
        ev: StreamEvent,
        data: String,
        d: &mut CacheDelta,
    ) {
        let log_id = self.next_log_id;
        self.next_log_id += 1;
        d.pts.push((user, pts));
        d.updates.push((
            user,
            recent::Entry {
                pts,
                log_id,
                ev,
                data,
            },
        ));
    }

    /// The merges' share of a write batch, run inside the batch's transaction just
    /// before its COMMIT: the next step of the stream log's merge, the next chunk of
    /// merged log rows to delete, the next step of the resend index's merge. Each
    /// takes at least `stream_merge_rows` rows and what the previous batch logged, so
    /// a merge keeps pace with what arrives while it runs and its work is spread
    /// thinly over the batches instead of stopping the writes in bursts. Why inside
    /// the batch: a step in a transaction of its own paid its own commit and fsync,
    /// and a merge of the whole log ran as ~30 such steps back to back, each 3-13 ms,
    /// between the batches, with every write of those ~300 ms waiting behind them
    /// (one-to-one at 5,000 msgs/s: p99 9-11 ms, set by those bursts). Each part has
    /// a savepoint: a failed one is rolled back alone, the batch commits without it,
    /// and no merge is tried for a second. What a part did to memory waits for the
    /// batch's commit ([`Writer::merges_committed`]).
    fn merge_in_batch(&mut self) -> MergeWork {
        let mut work = MergeWork::default();
        if self.merge_paused() {
            self.logged_since_step = 0;
            self.cids_since_step = 0;
            self.marks_since_step = 0;
            return work;
        }
        let rows = self.stream_merge_rows.max(self.logged_since_step);
        self.logged_since_step = 0;
        if self.log_trim > 0 {
            let (upto, n) = (self.log_trim, rows as i64);
            let deleted = self.merge_savepoint("stream log trim", |c| {
                // The oldest `n` rows up to `upto`, by count: the ids have gaps (a
                // one-to-one message's events take ids but have no rows).
                c.prepare_cached(
                    "DELETE FROM updates_log WHERE id IN (SELECT id FROM updates_log WHERE id <= ?1 ORDER BY id LIMIT ?2)",
                )?
                .execute([upto, n])
            });
            match deleted {
                // Fewer than asked: none is left up to `upto`.
                Some(d) => work.trimmed = d < rows,
                None => return work,
            }
        }
        if self.merge.is_none() && self.recent.read().rows() >= self.stream_log_rows {
            self.merge = Some((self.recent.read().last_log_id(), None));
            // Every message committed so far has its events here or in `updates`.
            self.merge_msgs_upto = self.cids.newest();
        }
        if let Some((upto, after)) = self.merge {
            let step = self.recent.read().step(after, upto, rows);
            let msgs_upto = self.merge_msgs_upto;
            let written = self.merge_savepoint("stream", |c| {
                let mut ins = c.prepare_cached(
                    "INSERT INTO updates(user_id, pts, kind, conv_id, seq, msg_id, actor, data) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                for (u, e) in &step.entries {
                    let ev = &e.ev;
                    ins.execute(params![
                        u.0 as i64,
                        e.pts as i64,
                        ev.kind,
                        ev.conv.0 as i64,
                        ev.seq as i64,
                        ev.msg_id as i64,
                        ev.actor.0 as i64,
                        e.data
                    ])?;
                }
                if step.done {
                    c.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'stream_msgs_upto'")?
                        .execute([msgs_upto as i64])?;
                }
                Ok(0)
            });
            if written.is_none() {
                // This step's events are still here. A new merge starts over from the
                // first user; the log rows of the steps that did commit are deleted
                // after it ends (their events left memory, and are in `updates`).
                self.merge = None;
                return work;
            }
            let mut users: Vec<UserId> = step.entries.iter().map(|(u, _)| *u).collect();
            users.dedup();
            work.stream = Some(StreamStep {
                upto,
                users,
                next: (!step.done).then_some(step.last_user),
            });
        }
        let rows = self.stream_merge_rows.max(self.cids_since_step);
        self.cids_since_step = 0;
        if !self.cids.merging() && self.cids.len() >= self.stream_log_rows {
            self.cids.start_merge();
        }
        if let Some(step) = self.cids.next_step(rows) {
            let written = self.merge_savepoint("resend index", |c| {
                let mut ins = c.prepare_cached(
                    "INSERT OR IGNORE INTO client_ids(sender_id, client_msg_id, msg_id) VALUES(?1, ?2, ?3)",
                )?;
                for (u, cid, id) in &step.entries {
                    ins.execute(params![u.0 as i64, cid, *id as i64])?;
                }
                if step.last {
                    c.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'client_ids_upto'")?
                        .execute([step.upto as i64])?;
                }
                Ok(0)
            });
            if written.is_some() {
                work.cids = Some(step);
            } else {
                // What this step held is still in the map: a later merge takes it.
                self.cids.merge_failed();
                return work;
            }
        }
        let rows = self.stream_merge_rows.max(self.marks_since_step);
        self.marks_since_step = 0;
        if self.marks_flush.is_none() && self.marks.read().len() >= self.stream_log_rows {
            // Every message committed so far has its mark held or in `members`.
            self.marks_flush = Some(self.marks.read().start_flush(self.cids.newest()));
        }
        if let Some(f) = &self.marks_flush {
            let step = self.marks.read().next_step(f, rows);
            let upto = f.upto;
            let written = self.merge_savepoint("read marks", |c| {
                let mut up = c.prepare_cached(
                    "UPDATE members SET read_seq = MAX(read_seq, ?3) WHERE user_id=?1 AND conv_id=?2",
                )?;
                for ((u, conv), seq) in &step.marks {
                    up.execute(params![u.0 as i64, conv.0 as i64, *seq as i64])?;
                }
                if step.last {
                    c.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'read_marks_upto'")?
                        .execute([upto as i64])?;
                }
                Ok(0)
            });
            // A failed step is taken again (its marks are still held).
            if written.is_some() {
                work.marks = Some(step);
            }
        }
        work
    }

    /// The batch that ran `work` committed: its merge steps leave memory.
    fn merges_committed(&mut self, work: MergeWork) {
        if work.trimmed {
            self.log_trim = 0;
        }
        if let Some(st) = work.stream {
            self.recent.write().remove_merged(st.users, st.upto);
            match st.next {
                Some(after) => self.merge = Some((st.upto, after)),
                None => {
                    self.merge = None;
                    // Every event up to `upto` is in `updates`: its log rows can go.
                    self.log_trim = self.log_trim.max(st.upto);
                }
            }
        }
        if let Some(step) = work.cids {
            self.cids.step_committed(&step);
        }
        if let (Some(step), Some(f)) = (work.marks, self.marks_flush.as_mut()) {
            if self.marks.write().step_committed(f, step) {
                self.marks_flush = None;
            }
        }
    }

    /// The batch that ran `work` failed to commit: nothing it wrote is there. The
    /// stream merge redoes its step; the resend index's merge starts over (its
    /// entries are all still in the map).
    fn merges_failed(&mut self, work: MergeWork) {
        if work.cids.is_some() {
            self.cids.merge_failed();
        }
    }

    /// Whether a merge step failed less than a second ago (no step is tried then).
    fn merge_paused(&self) -> bool {
        self.merge_pause
            .is_some_and(|t| t > std::time::Instant::now())
    }

    /// Runs one merge part's statements under a savepoint of the batch's transaction;
    /// the count `body` returns, or None when it failed: then it is rolled back and
    /// logged, and no merge part is tried for a second.
    fn merge_savepoint(
        &mut self,
        what: &str,
        body: impl FnOnce(&Connection) -> rusqlite::Result<usize>,
    ) -> Option<usize> {
        let r = self
            .exec_cached("SAVEPOINT merge")
            .and_then(|_| body(&self.conn));
        match r {
            Ok(n) => {
                let _ = self.exec_cached("RELEASE merge");
                Some(n)
            }
            Err(e) => {
                let _ = self.exec_cached("ROLLBACK TO merge");
                let _ = self.exec_cached("RELEASE merge");
                tracing::error!(error = %e, "store: a {what} merge step failed; retrying in a second");
                self.merge_pause = Some(std::time::Instant::now() + Duration::from_secs(1));
                None
            }
        }
    }

    /// The direct conversation of a and b, created (with both member rows) if needed.
    fn direct(
        &mut self,
        a: UserId,
        b: UserId,
        d: &mut CacheDelta,
    ) -> Result<ConvRecord, StoreError> {
        let (a, b) = if a <= b { (a, b) } else { (b, a) };
        if let Some(c) = self.pairs.get(&(a, b)) {
            return Ok(c.clone());
        }
        if let Some(c) = self.pairs_pending.get(&(a, b)) {
            return Ok(c.clone());
        }
        let found = self
            .conn
            .prepare_cached(
                &format!("SELECT {CONV_COLS} FROM conversations WHERE user_a=?1 AND user_b=?2 AND group_id=0"),
            )
            .and_then(|mut s| {
                s.query_row(params![a.0 as i64, b.0 as i64], conv_row)
                    .optional()
            })
            .map_err(internal)?;
        if let Some(c) = found {
            d.pair = Some(c.clone());
            return Ok(c);
        }
        let exists: Option<i64> = self
            .conn
            .prepare_cached("SELECT id FROM users WHERE id=?1")
            .and_then(|mut s| s.query_row([b.0 as i64], |r| r.get(0)).optional())
            .map_err(internal)?;
        let exists_a: Option<i64> = self
            .conn
            .prepare_cached("SELECT id FROM users WHERE id=?1")
            .and_then(|mut s| s.query_row([a.0 as i64], |r| r.get(0)).optional())
            .map_err(internal)?;
        if exists.is_none() || exists_a.is_none() {
            return Err(StoreError::NotFound);
        }
        self.conn
            .prepare_cached("INSERT INTO conversations(kind, user_a, user_b) VALUES(?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![CONV_DIRECT, a.0 as i64, b.0 as i64]))
            .map_err(internal)?;
        let id = ConvId(self.conn.last_insert_rowid() as u64);
        // A new conversation has no message yet: the first insert needs no MAX(seq) probe.
        self.batch_seq.insert(id, 0);
        for u in [a, b] {
            self.conn
                .prepare_cached("INSERT INTO members(user_id, conv_id) VALUES(?1, ?2)")
                .and_then(|mut s| s.execute(params![u.0 as i64, id.0 as i64]))
                .map_err(internal)?;
        }
        let c = ConvRecord {
            id,
            user_a: a,
            user_b: b,
            group_id: 0,
        };
        d.pair = Some(c.clone());
        Ok(c)
    }

    fn send(&mut self, i: SendInput, d: &mut CacheDelta) -> Result<SendOutcome, StoreError> {
        if let Some(message) = self.find_client_msg(i.sender, &i.client_msg_id)? {
            return Ok(SendOutcome {
                message,
                sender_pts: 0,
                duplicate: true,
            });
        }
        if self.blocked(i.recipient, i.sender)? {
            return Err(StoreError::Forbidden("this user has blocked you".into()));
        }
        if i.require_friend && !self.are_friends(i.sender, i.recipient)? {
            return Err(StoreError::Forbidden(
                "this server lets only friends message each other".into(),
            ));
        }
        let conv = self.direct(i.sender, i.recipient, d)?;
        // The message row carries both users' pts: its stream events are not logged
        // (`Writer::hold_update`).
        let sender_pts = self.pts_of(i.sender, d)? + 1;
        let recipient_pts = if i.recipient == i.sender {
            sender_pts + 1
        } else {
            self.pts_of(i.recipient, d)? + 1
        };
        let message = self.insert_message(
            conv.id,
            i.sender,
            i.recipient,
            0,
            i.kind,
            i.text,
            i.payload,
            i.client_msg_id,
            i.now_ms,
            (sender_pts, recipient_pts),
            d,
        )?;
        let msg_event = StreamEvent {
            kind: UPDATE_MESSAGE,
            conv: conv.id,
            seq: message.seq,
            msg_id: message.id,
            actor: i.sender,
        };
        self.hold_update(i.sender, sender_pts, msg_event, String::new(), d);
        self.hold_update(i.recipient, recipient_pts, msg_event, String::new(), d);
        // Sending implies having read the conversation up to one's own message: the
        // mark goes to `members` later, with many others (the marks module).
        d.marks.push((i.sender, conv.id, message.seq));
        self.publications.push(Publication::Direct {
            message: message.clone(),
            sender_pts,
            recipient_pts,
            origin: i.origin,
        });
        Ok(SendOutcome {
            message,
            sender_pts,
            duplicate: false,
        })
    }

    /// The read mark `user`'s sends imply in `conv` and `members` may not hold yet
    /// (0: none): this write's, its batch's, or one committed (the marks module).
    fn pending_mark(&self, user: UserId, conv: ConvId, d: &CacheDelta) -> u64 {
        let mine = |m: &[(UserId, ConvId, u64)]| {
            m.iter()
                .filter(|(u, c, _)| (*u, *c) == (user, conv))
                .map(|x| x.2)
                .max()
        };
        mine(&d.marks)
            .or_else(|| mine(&self.batch_marks))
            .or_else(|| self.marks.read().get(user, conv))
            .unwrap_or(0)
    }

    fn conv(&mut self, conv: ConvId) -> Result<ConvRecord, StoreError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {CONV_COLS} FROM conversations WHERE id=?1"
            ))
            .and_then(|mut s| s.query_row([conv.0 as i64], conv_row).optional())
            .map_err(internal)?
            .ok_or(StoreError::NotFound)
    }

    fn read(
        &mut self,
        user: UserId,
        conv: ConvId,
        seq: u64,
        origin: Option<Origin>,
        d: &mut CacheDelta,
    ) -> Result<u64, StoreError> {
        let c = self.conv(conv)?;
        let current: i64 = self
            .conn
            .prepare_cached("SELECT read_seq FROM members WHERE user_id=?1 AND conv_id=?2")
            .and_then(|mut s| {
                s.query_row(params![user.0 as i64, conv.0 as i64], |r| r.get(0))
                    .optional()
            })
            .map_err(internal)?
            .ok_or(StoreError::NotFound)?;
        let current = (current as u64).max(self.pending_mark(user, conv, d));
        let last = self.seq_of(conv)?;
        let target = seq.min(last);
        if target <= current {
            return Ok(current);
        }
        self.conn
            .prepare_cached("UPDATE members SET read_seq=?3 WHERE user_id=?1 AND conv_id=?2")
            .and_then(|mut s| s.execute(params![user.0 as i64, conv.0 as i64, target as i64]))
            .map_err(internal)?;
        let read_event = StreamEvent {
            kind: UPDATE_READ,
            conv,
            seq: target,
            msg_id: 0,
            actor: user,
        };
        let reader_pts = self.push_update(user, read_event, "", d)?;
        let (peer, peer_pts) = if c.is_group() {
            (None, 0)
        } else {
            let peer = c.peer_of(user);
            (Some(peer), self.push_update(peer, read_event, "", d)?)
        };
        self.publications.push(Publication::Read {
            conv,
            reader: user,
            seq: target,
            reader_pts,
            peer: peer.map(|p| (p, peer_pts)),
            origin,
        });
        Ok(target)
    }

    fn delivered(
        &mut self,
        user: UserId,
        conv: ConvId,
        seq: u64,
    ) -> Result<(u64, UserId), StoreError> {
        let c = self.conv(conv)?;
        let member = self
            .conn
            .prepare_cached("SELECT 1 FROM members WHERE user_id=?1 AND conv_id=?2")
            .and_then(|mut s| s.exists(params![user.0 as i64, conv.0 as i64]))
            .map_err(internal)?;
        if !member {
            return Err(StoreError::NotFound);
        }
        let last = self.seq_of(conv)?;
        let target = seq.min(last) as i64;
        self.conn
            .prepare_cached("UPDATE members SET delivered_seq = MAX(delivered_seq, ?3) WHERE user_id=?1 AND conv_id=?2")
            .and_then(|mut s| s.execute(params![user.0 as i64, conv.0 as i64, target]))
            .map_err(internal)?;
        let now: i64 = self
            .conn
            .prepare_cached("SELECT delivered_seq FROM members WHERE user_id=?1 AND conv_id=?2")
            .and_then(|mut s| s.query_row(params![user.0 as i64, conv.0 as i64], |r| r.get(0)))
            .map_err(internal)?;
        Ok((now as u64, c.peer_of(user)))
    }
}

/// A stream row as the sync returns it (`message`: the row's message, for a message
/// event).
fn update_event(ev: StreamEvent, data: String, message: Option<Message>) -> UpdateEvent {
    match (ev.kind, message) {
        (UPDATE_MESSAGE, Some(m)) => UpdateEvent::Message(m),
        (UPDATE_READ, _) => UpdateEvent::Read {
            conv: ev.conv,
            reader: ev.actor,
            seq: ev.seq,
        },
        (social::UPDATE_FRIEND, _) => UpdateEvent::Friend {
            kind: ev.seq as i32,
            user: ev.actor,
            message: data,
            time_ms: 0,
        },
        _ => UpdateEvent::Group {
            group: ev.msg_id,
            conv: ev.conv,
            member: ev.seq == 1,
        },
    }
}

fn read_err(e: rusqlite::Error) -> StoreError {
    internal(e)
}

impl Store for SqliteStore {
    fn create_user(
        &self,
        username: String,
        password_hash: String,
        now_ms: i64,
    ) -> StoreFut<UserRecord> {
        self.write(move |w, _| w.create_user(username, password_hash, now_ms))
    }

    fn user_by_name(&self, username: String) -> StoreFut<Option<UserRecord>> {
        self.read(move |c| {
            c.prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE username=?1"))
                .and_then(|mut s| s.query_row([username], user_row).optional())
                .map_err(read_err)
        })
    }

    fn users_by_ids(&self, ids: Vec<UserId>) -> StoreFut<Vec<UserRecord>> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE id=?1"))
                .map_err(read_err)?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(u) = s
                    .query_row([id.0 as i64], user_row)
                    .optional()
                    .map_err(read_err)?
                {
                    out.push(u);
                }
            }
            Ok(out)
        })
    }

    fn users_by_names(&self, names: Vec<String>) -> StoreFut<Vec<UserRecord>> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE username=?1"))
                .map_err(read_err)?;
            let mut out = Vec::with_capacity(names.len());
            for n in names {
                if let Some(u) = s.query_row([n], user_row).optional().map_err(read_err)? {
                    out.push(u);
                }
            }
            Ok(out)
        })
    }

    fn register_device(
        &self,
        user: UserId,
        device_id: String,
        platform: Platform,
        now_ms: i64,
    ) -> StoreFut<(DeviceRecord, u64)> {
        self.write(move |w, d| {
            let dev = w.register_device(user, device_id, platform, now_ms)?;
            Ok((dev, w.pts_of(user, d)?))
        })
    }

    fn device(&self, user: UserId, device_id: String) -> StoreFut<Option<DeviceRecord>> {
        self.read(move |c| {
            c.prepare_cached(DEVICE_BY_KEY)
                .and_then(|mut s| {
                    s.query_row(params![user.0 as i64, device_id], device_row)
                        .optional()
                })
                .map_err(read_err)
        })
    }

    fn logout_device(&self, user: UserId, device_id: String) -> StoreFut<()> {
        self.write(move |w, _| w.logout(user, &device_id))
    }

    fn set_cursor(&self, user: UserId, device_id: String, pts: u64) -> StoreFut<()> {
        self.write(move |w, _| w.set_cursor(user, &device_id, pts))
    }

    fn put_refresh(&self, rec: RefreshRecord) -> StoreFut<()> {
        self.write(move |w, _| w.put_refresh(&rec))
    }

    fn take_refresh(
        &self,
        hash: [u8; 32],
        replacement_hash: [u8; 32],
        replacement_expires_ms: i64,
        now_ms: i64,
    ) -> StoreFut<TakeRefresh> {
        self.write(move |w, _| {
            w.take_refresh(hash, replacement_hash, replacement_expires_ms, now_ms)
        })
    }

    fn user_pts(&self, user: UserId) -> StoreFut<u64> {
        let recent = self.recent.clone();
        self.read(move |c| {
            // Logged events are newer than merged ones. With none logged, `updates`
            // held all of the user's events at that moment, and holds them later.
            if let Some(p) = recent.read().last_pts(user) {
                return Ok(p);
            }
            c.prepare_cached("SELECT COALESCE(MAX(pts), 0) FROM updates WHERE user_id=?1")
                .and_then(|mut s| s.query_row([user.0 as i64], |r| r.get::<_, i64>(0)))
                .map(|p| p as u64)
                .map_err(read_err)
        })
    }

    fn send_direct(&self, input: SendInput) -> StoreFut<SendOutcome> {
        // Every refusal of `Writer::send` comes before its first write (`Undo::Batch`).
        self.write_undone_by(Undo::Batch, move |w, d| w.send(input, d))
    }

    fn mark_read(
        &self,
        user: UserId,
        conv: ConvId,
        seq: u64,
        origin: Option<Origin>,
    ) -> StoreFut<u64> {
        self.write(move |w, d| w.read(user, conv, seq, origin, d))
    }

    fn mark_delivered(&self, user: UserId, conv: ConvId, seq: u64) -> StoreFut<(u64, UserId)> {
        self.write(move |w, _| w.delivered(user, conv, seq))
    }

    fn sync(&self, user: UserId, since_pts: u64, limit: u32) -> StoreFut<SyncPage> {
        let recent = self.recent.clone();
        self.read(move |c| {
            // The logged events first, `updates` second (why: the recent module).
            let logged = recent.read().after(user, since_pts, limit as usize + 1);
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT u.pts, u.kind, u.conv_id, u.seq, u.actor, u.msg_id, u.data,
                            EXISTS(SELECT 1 FROM hidden h WHERE h.user_id = u.user_id AND h.msg_id = u.msg_id AND u.kind = {UPDATE_MESSAGE}),
                            {MESSAGE_COLS}
                     FROM updates u LEFT JOIN messages m ON m.id = u.msg_id AND u.kind = {UPDATE_MESSAGE}
                     WHERE u.user_id=?1 AND u.pts>?2 ORDER BY u.pts LIMIT ?3"
                ))
                .map_err(read_err)?;
            let rows = s
                .query_map(params![user.0 as i64, since_pts as i64, limit as i64 + 1], |r| {
                    let pts = r.get::<_, i64>(0)? as u64;
                    let kind: i64 = r.get(1)?;
                    let conv = ConvId(r.get::<_, i64>(2)? as u64);
                    let seq = r.get::<_, i64>(3)? as u64;
                    let actor = UserId(r.get::<_, i64>(4)? as u64);
                    if r.get::<_, i64>(7)? != 0 {
                        return Ok((pts, None)); // deleted for this user
                    }
                    let message = if kind == UPDATE_MESSAGE {
                        Some(message_at(r, 8)?)
                    } else {
                        None
                    };
                    let ev = StreamEvent {
                        kind,
                        conv,
                        seq,
                        msg_id: r.get::<_, i64>(5)? as u64,
                        actor,
                    };
                    Ok((pts, Some(update_event(ev, r.get(6)?, message))))
                })
                .map_err(read_err)?;
            let mut raw = Vec::new();
            for row in rows {
                raw.push(row.map_err(read_err)?);
            }
            if !logged.is_empty() {
                let mut m = c
                    .prepare_cached(&format!(
                        "SELECT EXISTS(SELECT 1 FROM hidden h WHERE h.user_id = ?1 AND h.msg_id = m.id), {MESSAGE_COLS}
                         FROM messages m WHERE m.id = ?2"
                    ))
                    .map_err(read_err)?;
                // The index's rows, in pts order.
                let indexed = raw.len();
                for e in logged {
                    // Merged since it was copied: `updates` gave it already.
                    if raw[..indexed]
                        .binary_search_by_key(&e.pts, |(p, _)| *p)
                        .is_ok()
                    {
                        continue;
                    }
                    let message = if e.ev.kind == UPDATE_MESSAGE {
                        let (hidden, message) = m
                            .query_row(params![user.0 as i64, e.ev.msg_id as i64], |r| {
                                Ok((r.get::<_, i64>(0)? != 0, message_at(r, 1)?))
                            })
                            .map_err(read_err)?;
                        if hidden {
                            raw.push((e.pts, None));
                            continue;
                        }
                        Some(message)
                    } else {
                        None
                    };
                    raw.push((e.pts, Some(update_event(e.ev, e.data, message))));
                }
                raw.sort_by_key(|(p, _)| *p);
            }
            let has_more = raw.len() > limit as usize;
            raw.truncate(limit as usize);
            let scanned_to = raw.last().map(|(p, _)| *p).unwrap_or(since_pts);
            let updates = raw.into_iter().filter_map(|(p, e)| e.map(|e| (p, e))).collect();
            Ok(SyncPage { updates, has_more, scanned_to })
        })
    }

    fn unread_snapshot(
        &self,
        user: UserId,
        max_convs: u32,
        per_conv: u32,
    ) -> StoreFut<UnreadSnapshot> {
        let marks = self.marks.clone();
        let (recent, commits) = (self.recent.clone(), self.commits.clone());
        self.read(move |c| marks::read_with(&marks, |view| {
            // One read transaction: the pts and the messages are one snapshot.
            c.execute_batch("BEGIN").map_err(read_err)?;
            let r = (|| {
                // The pts must be exactly the snapshot's: the merged events' newest
                // (the snapshot begins with this read) or the held ones', with no
                // commit in between (`recent::CommitLock`). Until the tenth session
                // this scanned the stream log and the messages past the last merge,
                // 18-26 ms under load.
                let pts = {
                    let _agree = commits.read();
                    let merged: i64 = c
                        .prepare_cached("SELECT COALESCE(MAX(pts), 0) FROM updates WHERE user_id=?1")
                        .and_then(|mut s| s.query_row([user.0 as i64], |r| r.get(0)))
                        .map_err(read_err)?;
                    #[cfg(test)]
                    tests::pause_in_first_sync(Path::new(c.path().unwrap_or_default()));
                    (merged as u64).max(recent.read().last_pts(user).unwrap_or(0))
                };
                let mut convs: Vec<(i64, i64, i64)> = Vec::new(); // conv, read_seq, last_seq
                {
                    let mut s = c
                        .prepare_cached(
                            "SELECT mb.conv_id, mb.read_seq, (SELECT MAX(seq) FROM messages WHERE conv_id = mb.conv_id)
                             FROM members mb JOIN conversations c ON c.id = mb.conv_id
                             WHERE mb.user_id=?1 AND c.group_id = 0",
                        )
                        .map_err(read_err)?;
                    let rows = s
                        .query_map([user.0 as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, Option<i64>>(2)?.unwrap_or(0))))
                        .map_err(read_err)?;
                    for row in rows {
                        convs.push(row.map_err(read_err)?);
                    }
                }
                // With the marks sends imply (the marks module).
                let mut unread = Vec::with_capacity(convs.len());
                for (conv, read, last) in convs {
                    let read = view
                        .mark(c, user, ConvId(conv as u64), read as u64, last as u64)
                        .map_err(read_err)? as i64;
                    if last > read {
                        unread.push((conv, read, last));
                    }
                }
                let convs = unread;
                // Most recent activity first (message ids grow with time).
                let mut last_ids = Vec::with_capacity(convs.len());
                for (conv, _, last) in &convs {
                    let id: i64 = c
                        .prepare_cached("SELECT id FROM messages WHERE conv_id=?1 AND seq=?2")
                        .and_then(|mut s| s.query_row(params![conv, last], |r| r.get(0)))
                        .map_err(read_err)?;
                    last_ids.push(id);
                }
                let mut order: Vec<usize> = (0..convs.len()).collect();
                order.sort_by_key(|i| std::cmp::Reverse(last_ids[*i]));
                order.truncate(max_convs as usize);
                let mut messages = Vec::new();
                let mut s = c
                    .prepare_cached(&format!(
                        "SELECT {MESSAGE_COLS} FROM messages m WHERE m.conv_id=?1 AND m.seq>?2 ORDER BY m.seq DESC LIMIT ?3"
                    ))
                    .map_err(read_err)?;
                for i in order {
                    let (conv, read, _) = convs[i];
                    let mut page: Vec<Message> = s
                        .query_map(params![conv, read, per_conv as i64], |r| message_at(r, 0))
                        .map_err(read_err)?
                        .collect::<Result<_, _>>()
                        .map_err(read_err)?;
                    page.reverse();
                    messages.extend(page);
                }
                Ok(UnreadSnapshot { messages, pts })
            })();
            let _ = c.execute_batch("COMMIT");
            r
        }))
    }

    fn conversation(&self, conv: ConvId) -> StoreFut<Option<ConvRecord>> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {CONV_COLS} FROM conversations WHERE id=?1"
            ))
            .and_then(|mut s| s.query_row([conv.0 as i64], conv_row).optional())
            .map_err(read_err)
        })
    }

    fn direct_conversation(&self, a: UserId, b: UserId) -> StoreFut<Option<ConvRecord>> {
        let (a, b) = if a <= b { (a, b) } else { (b, a) };
        self.read(move |c| {
            c.prepare_cached(
                &format!("SELECT {CONV_COLS} FROM conversations WHERE user_a=?1 AND user_b=?2 AND group_id=0"),
            )
            .and_then(|mut s| {
                s.query_row(params![a.0 as i64, b.0 as i64], conv_row)
                    .optional()
            })
            .map_err(read_err)
        })
    }

    fn history(
        &self,
        viewer: UserId,
        conv: ConvId,
        before_seq: u64,
        after_seq: u64,
        limit: u32,
    ) -> StoreFut<(Vec<Message>, bool)> {
        self.read(move |c| {
            let hidden = "NOT EXISTS(SELECT 1 FROM hidden h WHERE h.user_id=?4 AND h.msg_id=m.id)";
            let (sql, bound) = if after_seq > 0 {
                (
                    format!("SELECT {MESSAGE_COLS} FROM messages m WHERE m.conv_id=?1 AND m.seq>?2 AND {hidden} ORDER BY m.seq ASC LIMIT ?3"),
                    after_seq as i64,
                )
            } else {
                let before = if before_seq == 0 { i64::MAX } else { before_seq as i64 };
                (
                    format!("SELECT {MESSAGE_COLS} FROM messages m WHERE m.conv_id=?1 AND m.seq<?2 AND {hidden} ORDER BY m.seq DESC LIMIT ?3"),
                    before,
                )
            };
            let mut s = c.prepare_cached(&sql).map_err(read_err)?;
            let mut msgs: Vec<Message> = s
                .query_map(params![conv.0 as i64, bound, limit as i64 + 1, viewer.0 as i64], |r| message_at(r, 0))
                .map_err(read_err)?
                .collect::<Result<_, _>>()
                .map_err(read_err)?;
            let has_more = msgs.len() > limit as usize;
            msgs.truncate(limit as usize);
            if after_seq == 0 {
                msgs.reverse();
            }
            Ok((msgs, has_more))
        })
    }

    fn conversations(
        &self,
        user: UserId,
        offset: u32,
        limit: u32,
    ) -> StoreFut<(Vec<ConvSummary>, bool)> {
        let marks = self.marks.clone();
        self.read(move |c| marks::read_with(&marks, |view| {
            c.execute_batch("BEGIN").map_err(read_err)?;
            let r = (|| {
                let mut s = c
                    .prepare_cached(&format!(
                        "SELECT cv.id, cv.user_a, cv.user_b, cv.group_id, mb.read_seq, COALESCE(pm.read_seq, 0), COALESCE(pm.delivered_seq, 0), {MESSAGE_COLS}
                         FROM members mb
                         JOIN conversations cv ON cv.id = mb.conv_id
                         LEFT JOIN members pm ON cv.group_id = 0 AND pm.conv_id = cv.id AND pm.user_id = (CASE WHEN cv.user_a = ?1 THEN cv.user_b ELSE cv.user_a END)
                         JOIN messages m ON m.conv_id = cv.id AND m.seq = (SELECT MAX(seq) FROM messages WHERE conv_id = cv.id)
                         WHERE mb.user_id = ?1
                         ORDER BY m.id DESC LIMIT ?2 OFFSET ?3"
                    ))
                    .map_err(read_err)?;
                let rows = s
                    .query_map(params![user.0 as i64, limit as i64 + 1, offset as i64], |r| {
                        let conv = conv_row(r)?;
                        let last = message_at(r, 7)?;
                        Ok(ConvSummary {
                            conv,
                            last_seq: last.seq,
                            last_message: Some(last),
                            read_seq: r.get::<_, i64>(4)? as u64,
                            peer_read_seq: r.get::<_, i64>(5)? as u64,
                            peer_delivered_seq: r.get::<_, i64>(6)? as u64,
                        })
                    })
                    .map_err(read_err)?;
                let mut out: Vec<ConvSummary> = rows.collect::<Result<_, _>>().map_err(read_err)?;
                let has_more = out.len() > limit as usize;
                out.truncate(limit as usize);
                // With the marks sends imply (the marks module).
                for s in &mut out {
                    let (conv, last) = (s.conv.id, s.last_seq);
                    s.read_seq = view.mark(c, user, conv, s.read_seq, last).map_err(read_err)?;
                    if !s.conv.is_group() {
                        let peer = s.conv.peer_of(user);
                        s.peer_read_seq = view
                            .mark(c, peer, conv, s.peer_read_seq, last)
                            .map_err(read_err)?;
                    }
                }
                Ok((out, has_more))
            })();
            let _ = c.execute_batch("COMMIT");
            r
        }))
    }

    fn update_profile(&self, user: UserId, patch: ProfilePatch) -> StoreFut<UserRecord> {
        self.write(move |w, _| w.update_profile(user, patch))
    }

    fn search_users(
        &self,
        prefix: String,
        after: String,
        limit: u32,
    ) -> StoreFut<(Vec<UserRecord>, bool)> {
        self.read(move |c| {
            // Usernames are ASCII: every one with the prefix sorts below prefix + DEL.
            let upper = format!("{prefix}\u{7f}");
            let lower = if after.as_str() > prefix.as_str() { after.clone() } else { prefix.clone() };
            let strict = if after.as_str() > prefix.as_str() { ">" } else { ">=" };
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT {USER_COLS} FROM users WHERE username {strict} ?1 AND username < ?2 ORDER BY username LIMIT ?3"
                ))
                .map_err(read_err)?;
            let mut out: Vec<UserRecord> = s
                .query_map(params![lower, upper, limit as i64 + 1], user_row)
                .map_err(read_err)?
                .collect::<Result<_, _>>()
                .map_err(read_err)?;
            let more = out.len() > limit as usize;
            out.truncate(limit as usize);
            Ok((out, more))
        })
    }

    fn set_last_seen(&self, seen: Vec<(UserId, i64)>) -> StoreFut<()> {
        self.write(move |w, _| w.set_last_seen(&seen))
    }

    fn friend_request(
        &self,
        from: UserId,
        to: UserId,
        message: String,
        now_ms: i64,
    ) -> StoreFut<FriendRequestOutcome> {
        self.write(move |w, d| w.friend_request(from, to, message, now_ms, d))
    }

    fn friend_answer(
        &self,
        me: UserId,
        requester: UserId,
        accept: bool,
        now_ms: i64,
    ) -> StoreFut<FriendPts> {
        self.write(move |w, d| w.friend_answer(me, requester, accept, now_ms, d))
    }

    fn friend_remove(&self, me: UserId, other: UserId, _now_ms: i64) -> StoreFut<FriendPts> {
        self.write(move |w, d| w.friend_remove(me, other, d))
    }

    fn friend_remark(&self, me: UserId, other: UserId, remark: String) -> StoreFut<()> {
        self.write(move |w, _| w.friend_remark(me, other, remark))
    }

    fn category_create(&self, me: UserId, name: String) -> StoreFut<u64> {
        self.write(move |w, _| w.category_create(me, name))
    }

    fn category_rename(&self, me: UserId, id: u64, name: String) -> StoreFut<()> {
        self.write(move |w, _| w.category_rename(me, id, name))
    }

    fn category_delete(&self, me: UserId, id: u64) -> StoreFut<()> {
        self.write(move |w, _| w.category_delete(me, id))
    }

    fn friend_move(&self, me: UserId, friend: UserId, category: u64) -> StoreFut<()> {
        self.write(move |w, _| w.friend_move(me, friend, category))
    }

    fn block(&self, me: UserId, other: UserId, now_ms: i64) -> StoreFut<()> {
        self.write(move |w, _| w.block(me, other, now_ms))
    }

    fn unblock(&self, me: UserId, other: UserId) -> StoreFut<()> {
        self.write(move |w, _| w.unblock(me, other))
    }

    fn friends(&self, me: UserId, offset: u32, limit: u32) -> StoreFut<(Vec<FriendRec>, bool)> {
        self.read(move |c| social::friends(c, me, offset, limit))
    }

    fn friend_ids_many(&self, users: Vec<UserId>) -> StoreFut<Vec<Vec<UserId>>> {
        self.read(move |c| {
            users
                .into_iter()
                .map(|u| {
                    social::ids(
                        c,
                        "SELECT friend_id FROM friends WHERE user_id=?1",
                        u.0 as i64,
                    )
                })
                .collect()
        })
    }

    fn token_login(
        &self,
        user: UserId,
        device_id: String,
        epoch: u64,
        platform: Platform,
        now_ms: i64,
    ) -> StoreFut<Option<(DeviceRecord, UserRecord, u64)>> {
        self.write(move |w, d| {
            let Some((dev, u)) = w.token_login(user, &device_id, epoch, platform, now_ms)? else {
                return Ok(None);
            };
            Ok(Some((dev, u, w.pts_of(user, d)?)))
        })
    }

    fn friend_ids(&self, me: UserId) -> StoreFut<Vec<UserId>> {
        self.read(move |c| {
            social::ids(
                c,
                "SELECT friend_id FROM friends WHERE user_id=?1",
                me.0 as i64,
            )
        })
    }

    fn categories(&self, me: UserId) -> StoreFut<Vec<(u64, String)>> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached("SELECT id, name FROM categories WHERE user_id=?1 ORDER BY id")
                .map_err(read_err)?;
            let rows = s
                .query_map([me.0 as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
                })
                .map_err(read_err)?;
            rows.collect::<Result<_, _>>().map_err(read_err)
        })
    }

    fn blocked_users(&self, me: UserId) -> StoreFut<Vec<UserRecord>> {
        self.read(move |c| {
            social::users_where(
                c,
                "JOIN blocks b ON b.blocked_id = u.id WHERE b.user_id=?1 ORDER BY u.username",
                me.0 as i64,
            )
        })
    }

    fn friend_requests(&self, me: UserId) -> StoreFut<Vec<PendingFriend>> {
        self.read(move |c| social::friend_requests(c, me))
    }

    fn is_blocked(&self, by: UserId, who: UserId) -> StoreFut<bool> {
        self.read(move |c| {
            c.prepare_cached("SELECT 1 FROM blocks WHERE user_id=?1 AND blocked_id=?2")
                .and_then(|mut s| s.exists([by.0 as i64, who.0 as i64]))
                .map_err(read_err)
        })
    }

    fn group_create(
        &self,
        owner: UserId,
        name: String,
        members: Vec<UserId>,
        join_policy: i32,
        now_ms: i64,
        max_members: u32,
    ) -> StoreFut<GroupChange> {
        self.write(move |w, d| {
            w.group_create(owner, name, members, join_policy, now_ms, max_members, d)
        })
    }

    fn group_op(
        &self,
        actor: UserId,
        group: u64,
        op: GroupOp,
        now_ms: i64,
        max_members: u32,
    ) -> StoreFut<GroupChange> {
        self.write(move |w, d| w.group_op(actor, group, op, now_ms, max_members, d))
    }

    fn group_join(
        &self,
        user: UserId,
        group: u64,
        message: String,
        now_ms: i64,
        max_members: u32,
    ) -> StoreFut<JoinOutcome> {
        self.write(move |w, d| w.group_join(user, group, message, now_ms, max_members, d))
    }

    fn send_group(&self, group: u64, input: SendInput) -> StoreFut<SendOutcome> {
        self.write(move |w, d| w.send_group(group, input, d))
    }

    fn group_info(&self, group: u64) -> StoreFut<Option<GroupInfo>> {
        self.read(move |c| social::group_info(c, group))
    }

    fn group_role(&self, group: u64, user: UserId) -> StoreFut<Option<i32>> {
        self.read(move |c| {
            c.prepare_cached("SELECT role FROM group_members WHERE group_id=?1 AND user_id=?2")
                .and_then(|mut s| {
                    s.query_row([group as i64, user.0 as i64], |r| r.get::<_, i64>(0))
                        .optional()
                })
                .map(|r| r.map(|x| x as i32))
                .map_err(read_err)
        })
    }

    fn group_members(
        &self,
        group: u64,
        offset: u32,
        limit: u32,
    ) -> StoreFut<(Vec<GroupMemberRec>, bool)> {
        self.read(move |c| social::group_members(c, group, offset, limit))
    }

    fn group_member_ids(&self, group: u64) -> StoreFut<Vec<UserId>> {
        self.read(move |c| {
            social::ids(
                c,
                "SELECT user_id FROM group_members WHERE group_id=?1",
                group as i64,
            )
        })
    }

    fn user_groups(&self, user: UserId) -> StoreFut<Vec<GroupInfo>> {
        self.read(move |c| social::user_groups(c, user))
    }

    fn group_join_requests(&self, group: u64) -> StoreFut<Vec<(UserId, String, i64)>> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached("SELECT user_id, message, time_ms FROM group_join_requests WHERE group_id=?1 ORDER BY time_ms")
                .map_err(read_err)?;
            let rows = s
                .query_map([group as i64], |r| {
                    Ok((UserId(r.get::<_, i64>(0)? as u64), r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
                })
                .map_err(read_err)?;
            rows.collect::<Result<_, _>>().map_err(read_err)
        })
    }

    fn group_heads(&self, user: UserId) -> StoreFut<Vec<(u64, ConvId, u64, u64)>> {
        self.read(move |c| social::group_heads(c, user))
    }

    fn is_member(&self, conv: ConvId, user: UserId) -> StoreFut<bool> {
        self.read(move |c| {
            c.prepare_cached("SELECT 1 FROM members WHERE user_id=?1 AND conv_id=?2")
                .and_then(|mut s| s.exists([user.0 as i64, conv.0 as i64]))
                .map_err(read_err)
        })
    }

    fn recall(
        &self,
        user: UserId,
        message_id: u64,
        now_ms: i64,
        window_ms: i64,
    ) -> StoreFut<Message> {
        self.write(move |w, d| w.recall(user, message_id, now_ms, window_ms, d))
    }

    fn hide(&self, user: UserId, message_ids: Vec<u64>) -> StoreFut<()> {
        self.write(move |w, _| w.hide(user, message_ids))
    }

    fn set_publisher(&self, publisher: Publisher) {
        *self.publisher.write() = Some(publisher);
    }

    fn shutdown(&self) -> StoreFut<()> {
        self.closing.store(true, Ordering::Release);
        let writer = self.writer.lock().take();
        let cp = self.checkpointer.lock().take();
        let writes = self.writes.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                // The checkpointer first (it ends within a pass and a 50 ms nap): a
                // pass of its own still running would make the writer's last
                // checkpoint, which folds the WAL back, fail busy and leave the WAL
                // whole for the next start to read (1.6 GB after a saturate run on an
                // 886 MB database).
                if let Some(cp) = cp {
                    let _ = cp.join();
                }
                // FIFO: everything queued before Stop is committed first.
                if writer.is_some() {
                    let _ = writes.send(WriteOp::Stop);
                }
                if let Some(w) = writer {
                    let _ = w.join();
                }
            })
            .await
            .map_err(internal)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(sender: UserId, recipient: UserId, n: u64) -> SendInput {
        SendInput {
            sender,
            recipient,
            client_msg_id: format!("c{n}"),
            kind: 1,
            text: format!("message {n}"),
            payload: bytes::Bytes::new(),
            now_ms: n as i64,
            require_friend: false,
            origin: None,
        }
    }

    /// Stores (by the directory their database is in) whose thread pauses at a
    /// test hook, how long, and whether one has reached it.
    struct Pauses(std::sync::Mutex<Vec<(PathBuf, Duration, Arc<AtomicBool>)>>);

    /// A pause in place for one store until dropped.
    struct Paused<'a> {
        list: &'a Pauses,
        dir: PathBuf,
        reached: Arc<AtomicBool>,
    }

    impl Pauses {
        const fn new() -> Pauses {
            Pauses(std::sync::Mutex::new(Vec::new()))
        }

        /// Pauses the hook for `d` in the store under `dir` until the result drops.
        fn hold(&self, dir: &Path, d: Duration) -> Paused<'_> {
            let reached = Arc::new(AtomicBool::new(false));
            let entry = (dir.to_path_buf(), d, reached.clone());
            self.0.lock().unwrap().push(entry);
            Paused {
                list: self,
                dir: dir.to_path_buf(),
                reached,
            }
        }

        /// Called by the hook: sleeps if the store of `db` is listed.
        fn hit(&self, db: &Path) {
            let pause = self
                .0
                .lock()
                .unwrap()
                .iter()
                .find(|(dir, _, _)| db.starts_with(dir))
                .map(|(_, d, reached)| (*d, reached.clone()));
            if let Some((d, reached)) = pause {
                reached.store(true, Ordering::SeqCst);
                std::thread::sleep(d);
            }
        }
    }

    impl Paused<'_> {
        /// Waits (up to 10 s) until the hook is reached.
        async fn reached(&self) {
            let waited = std::time::Instant::now();
            while !self.reached.load(Ordering::SeqCst) {
                assert!(
                    waited.elapsed() < Duration::from_secs(10),
                    "no pause reached"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    impl Drop for Paused<'_> {
        fn drop(&mut self) {
            if let Ok(mut l) = self.list.0.lock() {
                l.retain(|(d, _, _)| d != &self.dir);
            }
        }
    }

    /// The writer, between a batch's COMMIT and `recent` showing it.
    static AFTER_COMMIT: Pauses = Pauses::new();
    /// A new device's first sync, between its snapshot's first read and its read of
    /// `recent`.
    static IN_FIRST_SYNC: Pauses = Pauses::new();

    pub(super) fn pause_after_commit(db: &Path) {
        AFTER_COMMIT.hit(db)
    }

    pub(super) fn pause_in_first_sync(db: &Path) {
        IN_FIRST_SYNC.hit(db)
    }

    /// The other half of the agreement: a merge that moves the user's events into
    /// `updates` and drops them from `recent` must not commit between a first sync's
    /// snapshot (which does not hold the merge) and its read of `recent` (which would
    /// no longer hold the events). Bob's four events wait in `recent`; the first sync
    /// pauses 300 ms after its snapshot began while other users' sends start a merge
    /// whose first step takes Bob's (the lowest user id).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_sync_keeps_the_events_a_merge_moves_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = mychat_config::StoreConfig {
            stream_log_rows: 10,
            stream_merge_rows: 1,
            ..Default::default()
        };
        let (store, ids) = users_with(dir.path(), &cfg, &["bob", "alice", "carol", "dave"]).await;
        let (bob, alice, carol, dave) = (ids[0], ids[1], ids[2], ids[3]);
        for n in 0..4 {
            store.send_direct(text(alice, bob, n)).await.unwrap();
        }
        assert_eq!(store.recent.read().last_pts(bob), Some(4));
        let paused = IN_FIRST_SYNC.hold(dir.path(), Duration::from_millis(300));
        let reading = store.clone();
        let snapshot = tokio::spawn(async move { reading.unread_snapshot(bob, 100, 100).await });
        paused.reached().await;
        for n in 10..14 {
            store.send_direct(text(carol, dave, n)).await.unwrap();
        }
        drop(paused);
        // The merge did move Bob's events (else this test shows nothing).
        assert_eq!(store.recent.read().last_pts(bob), None);
        let snapshot = snapshot.await.unwrap().unwrap();
        assert_eq!((snapshot.messages.len(), snapshot.pts), (4, 4));
        store.shutdown().await.unwrap();
    }

    /// A new device's first sync reads its pts in the snapshot it reads its messages
    /// from: a message committed before that snapshot counts in both, even while the
    /// writer has not shown its events in `recent` yet (here it pauses 300 ms there).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_sync_counts_a_message_whose_events_are_not_shown_yet() {
        let dir = tempfile::tempdir().unwrap();
        let (store, alice, bob) = two_users_with(dir.path(), &Default::default()).await;
        let first = store.send_direct(text(alice, bob, 0)).await.unwrap();
        let paused = AFTER_COMMIT.hold(dir.path(), Duration::from_millis(300));
        let sending = store.clone();
        let second = tokio::spawn(async move { sending.send_direct(text(alice, bob, 1)).await });
        paused.reached().await;
        assert_eq!(store.recent.read().last_pts(bob), Some(1));
        let snapshot = store.unread_snapshot(bob, 100, 100).await.unwrap();
        drop(paused);
        let second = second.await.unwrap().unwrap();
        let got: Vec<u64> = snapshot.messages.iter().map(|m| m.id).collect();
        assert_eq!(
            (got, snapshot.pts),
            (vec![first.message.id, second.message.id], 2)
        );
        store.shutdown().await.unwrap();
    }

    /// Bob's stream as (pts, message text).
    async fn stream_of(store: &SqliteStore, bob: UserId) -> Vec<(u64, String)> {
        let page = store.sync(bob, 0, 1000).await.unwrap();
        page.updates
            .into_iter()
            .map(|(pts, ev)| match ev {
                UpdateEvent::Message(m) => (pts, m.text),
                other => panic!("unexpected event {other:?}"),
            })
            .collect()
    }

    /// Write batches whose commit fails (the WAL write fails, as on a failing disk)
    /// while merges run: every write of them is refused and none is seen; the write
    /// after takes the next seq and pts as if they never were (the writer's caches and
    /// the merges' progress went back with the batch), and a restart right after finds
    /// every acknowledged message, by its stream and by its client id.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_refuses_its_writes_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        // Merges start at 4 waiting entries: after 12 sends the resend index holds 4,
        // so each failing batch carries the first (and last) step of its merge.
        let cfg = mychat_config::StoreConfig {
            stream_log_rows: 4,
            stream_merge_rows: 2,
            ..Default::default()
        };
        let (store, alice, bob) = two_users_with(dir.path(), &cfg).await;
        let (mut want, mut acked) = (Vec::new(), Vec::new());
        let mut send_acked = async |n: u64, seq: u64| {
            let o = store.send_direct(text(alice, bob, n)).await.unwrap();
            assert_eq!((o.message.seq, o.duplicate), (seq, false));
            want.push((seq, format!("message {n}")));
            acked.push((n, o.message.id));
        };
        for n in 0..12u64 {
            send_acked(n, n + 1).await;
        }
        walbuf::fail_flushes_under(dir.path(), true);
        for n in 100..103u64 {
            assert!(
                store.send_direct(text(alice, bob, n)).await.is_err(),
                "a write of a failed commit was acknowledged"
            );
        }
        walbuf::fail_flushes_under(dir.path(), false);
        // A read waits for every commit begun before it, failed ones too: theirs are
        // passed at once, so it answers with no later commit to carry it.
        let read = tokio::time::timeout(Duration::from_secs(10), stream_of(&store, bob));
        let stored: Vec<_> = (0..12u64)
            .map(|n| (n + 1, format!("message {n}")))
            .collect();
        assert_eq!(
            read.await.expect("a read waited on a failed commit"),
            stored
        );
        // The read marks the refused sends implied went back with them.
        let resent = store.send_direct(text(alice, bob, 0)).await.unwrap();
        let conv = ConvId(resent.message.conversation_id);
        assert_eq!(store.mark_read(alice, conv, 99, None).await.unwrap(), 12);
        send_acked(12, 13).await;
        assert_eq!(stream_of(&store, bob).await, want);
        store.shutdown().await.unwrap();
        drop(store);
        let store = SqliteStore::open(dir.path(), &cfg).unwrap();
        assert_eq!(stream_of(&store, bob).await, want);
        for (n, id) in acked {
            let o = store.send_direct(text(alice, bob, n)).await.unwrap();
            assert_eq!((o.duplicate, o.message.id), (true, id), "resend of {n}");
        }
        // A refused write's client id was never taken: sent again, it is new.
        let o = store.send_direct(text(alice, bob, 100)).await.unwrap();
        assert_eq!((o.message.seq, o.duplicate), (14, false));
        store.shutdown().await.unwrap();
    }

    /// A 1:1 send runs without a savepoint. One that fails after it wrote (a first
    /// contact's: a trigger refuses its message row once the new conversation's rows
    /// are in) takes its batch down: it and every send batched with it are refused,
    /// nothing of them is stored, and the conversations' next messages take the seqs
    /// they would have taken. Sends beside
    /// it either are acknowledged and stored with gap-free seqs or refused and absent.
    /// A send refused before it writes (a block) leaves its batch alone. Treating the
    /// failure after a write like a clean refusal stores the half-written message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_failing_after_it_wrote_leaves_nothing_of_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, alice, bob) = two_users(dir.path()).await;
        let mut others = Vec::new();
        for name in ["carol", "dave", "erin"] {
            let u = store.create_user(name.into(), "x".into(), 0).await;
            others.push(u.unwrap().id);
        }
        let (carol, dave, erin) = (others[0], others[1], others[2]);
        // Alice to Bob: the seq it was stored at.
        let seq_of = async |n: u64| {
            let o = store.send_direct(text(alice, bob, n)).await.unwrap();
            o.message.seq
        };
        assert_eq!(seq_of(1).await, 1);
        let c = Connection::open(dir.path().join("mychat.db")).unwrap();
        let count = |text: &str| -> i64 {
            c.query_row(
                "SELECT COUNT(*) FROM messages WHERE text = ?1",
                [text],
                |r| r.get(0),
            )
            .unwrap()
        };
        c.execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.text = 'message 2'
             BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
        )
        .unwrap();
        // The poisoned send, with carol's sends racing it into the same batches.
        let racing: Vec<_> = (100..140u64)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move { (n, store.send_direct(text(carol, dave, n)).await) })
            })
            .collect();
        let poisoned = store.send_direct(text(alice, erin, 2)).await;
        assert!(
            matches!(poisoned, Err(StoreError::Internal(_))),
            "{poisoned:?}"
        );
        let mut acked = Vec::new();
        for r in racing {
            let (n, r) = r.await.unwrap();
            match r {
                Ok(o) => acked.push((o.message.seq, format!("message {n}"))),
                Err(e) => {
                    assert!(matches!(e, StoreError::Internal(_)), "{e:?}");
                    assert_eq!(count(&format!("message {n}")), 0, "refused {n} stored");
                }
            }
        }
        c.execute_batch("DROP TRIGGER poison").unwrap();
        assert_eq!(count("message 2"), 0, "the failed send's message is stored");
        let with_erin: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM conversations WHERE ?1 IN (user_a, user_b)",
                [erin.0 as i64],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(with_erin, 0, "the failed send's conversation is stored");
        // Carol's acknowledged sends: stored, seqs 1.. without a gap.
        acked.sort();
        let seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=acked.len() as u64).collect::<Vec<_>>());
        for (_, t) in &acked {
            assert_eq!(count(t), 1, "{t}");
        }
        // Alice's next message to Bob takes seq 2; her refused one, sent again, is new.
        assert_eq!(seq_of(3).await, 2);
        let again = store.send_direct(text(alice, erin, 2)).await.unwrap();
        assert_eq!((again.duplicate, again.message.seq), (false, 1));
        // Refused before writing: its batch commits.
        store.block(bob, alice, 0).await.unwrap();
        let (blocked, fine) = tokio::join!(
            store.send_direct(text(alice, bob, 4)),
            store.send_direct(text(carol, dave, 200))
        );
        assert!(
            matches!(blocked, Err(StoreError::Forbidden(_))),
            "{blocked:?}"
        );
        assert_eq!(fine.unwrap().message.seq, acked.len() as u64 + 1);
        store.shutdown().await.unwrap();
    }

    /// When SQLite rolls a batch's transaction back under a write (an I/O error or a
    /// full disk can; here the write does it itself), the whole batch is refused and
    /// nothing of it is stored: the writes before it lost their rows with the
    /// transaction, and the ones after it are not run (run, each would commit on its
    /// own and still be refused). Every acknowledged send is stored, seqs without gaps.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_rolled_back_under_a_write_refuses_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, alice, bob) = two_users(dir.path()).await;
        let send = |n: u64| {
            let store = store.clone();
            tokio::spawn(async move { (n, store.send_direct(text(alice, bob, n)).await) })
        };
        let before: Vec<_> = (0..30).map(send).collect();
        let rolled_back = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(|w, _| {
                        w.conn.execute_batch("ROLLBACK").map_err(internal)?;
                        Err::<(), _>(StoreError::Internal("rolled back".into()))
                    })
                    .await
            })
        };
        let after: Vec<_> = (30..60).map(send).collect();
        assert!(rolled_back.await.unwrap().is_err());
        let c = Connection::open(dir.path().join("mychat.db")).unwrap();
        let mut acked = Vec::new();
        for r in before.into_iter().chain(after) {
            let (n, r) = r.await.unwrap();
            let stored: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM messages WHERE text = ?1",
                    [format!("message {n}")],
                    |r| r.get(0),
                )
                .unwrap();
            match r {
                Ok(o) => {
                    assert_eq!(stored, 1, "acknowledged {n} not stored");
                    acked.push(o.message.seq);
                }
                Err(e) => {
                    assert!(matches!(e, StoreError::Internal(_)), "{e:?}");
                    assert_eq!(stored, 0, "refused {n} stored");
                }
            }
        }
        acked.sort();
        assert_eq!(acked, (1..=acked.len() as u64).collect::<Vec<_>>());
        let next = store.send_direct(text(alice, bob, 100)).await.unwrap();
        assert_eq!(next.message.seq, acked.len() as u64 + 1);
        store.shutdown().await.unwrap();
    }

    /// Alice and Bob in a fresh store under `dir`.
    async fn two_users(dir: &Path) -> (Arc<SqliteStore>, UserId, UserId) {
        two_users_with(dir, &Default::default()).await
    }

    /// Users named `names` (ids in that order) in a fresh store under `dir` opened
    /// with `cfg`.
    async fn users_with(
        dir: &Path,
        cfg: &mychat_config::StoreConfig,
        names: &[&str],
    ) -> (Arc<SqliteStore>, Vec<UserId>) {
        let store = SqliteStore::open(dir, cfg).unwrap();
        let mut ids = Vec::new();
        for name in names {
            let u = store.create_user((*name).into(), "x".into(), 0).await;
            ids.push(u.unwrap().id);
        }
        (store, ids)
    }

    /// Alice and Bob in a fresh store under `dir` opened with `cfg`.
    async fn two_users_with(
        dir: &Path,
        cfg: &mychat_config::StoreConfig,
    ) -> (Arc<SqliteStore>, UserId, UserId) {
        let (store, ids) = users_with(dir, cfg, &["alice", "bob"]).await;
        (store, ids[0], ids[1])
    }

    /// With the syncer's WAL sync held, a message is committed (another connection
    /// sees it in the file) but neither acknowledged nor readable through the store;
    /// released, both come. Answering at commit, or a read not waiting for the sync,
    /// fails this.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_is_answered_and_read_only_once_its_wal_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let (store, alice, bob) = two_users(dir.path()).await;
        store.send_direct(text(alice, bob, 1)).await.unwrap();
        durable::hold_syncs_under(dir.path(), true);
        // Released on a failed assertion too: a held sync keeps the syncer thread,
        // and whatever waits for it, waiting.
        struct Release<'a>(&'a Path);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                durable::hold_syncs_under(self.0, false);
            }
        }
        let held = Release(dir.path());
        let s = store.clone();
        let send = tokio::spawn(async move { s.send_direct(text(alice, bob, 2)).await });
        let raw = Connection::open(dir.path().join("mychat.db")).unwrap();
        let count = || -> i64 {
            raw.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
                .unwrap()
        };
        while count() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let s = store.clone();
        let read = tokio::spawn(async move { stream_of(&s, bob).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !send.is_finished(),
            "acknowledged before its WAL was synced"
        );
        assert!(
            !read.is_finished(),
            "a read answered with an unsynced commit"
        );
        drop(held);
        let o = send.await.unwrap().unwrap();
        assert_eq!((o.message.seq, o.duplicate), (2, false));
        let want = vec![(1, "message 1".to_string()), (2, "message 2".to_string())];
        assert_eq!(read.await.unwrap(), want);
        store.shutdown().await.unwrap();
    }

    /// A WAL that cannot be synced stops the store: the write waiting for that sync,
    /// every later write and every read fail with UNAVAILABLE, even once syncs would
    /// work again; the WAL is kept through the shutdown. Restarted, the store has what
    /// reached the file: the refused message (the process never crashed), which a
    /// resend by its client id finds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wal_that_cannot_be_synced_stops_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (store, alice, bob) = two_users(dir.path()).await;
        store.send_direct(text(alice, bob, 1)).await.unwrap();
        durable::fail_syncs_under(dir.path(), true);
        let unavailable = |e: Option<StoreError>| matches!(e, Some(StoreError::Unavailable(_)));
        assert!(unavailable(
            store.send_direct(text(alice, bob, 2)).await.err()
        ));
        durable::fail_syncs_under(dir.path(), false);
        assert!(unavailable(
            store.send_direct(text(alice, bob, 3)).await.err()
        ));
        assert!(unavailable(store.sync(bob, 0, 10).await.err()));
        store.shutdown().await.unwrap();
        drop(store);
        assert_wal_kept(dir.path());
        let store = SqliteStore::open(dir.path(), &Default::default()).unwrap();
        let o = store.send_direct(text(alice, bob, 2)).await.unwrap();
        assert_eq!((o.message.seq, o.duplicate), (2, true));
        let o = store.send_direct(text(alice, bob, 3)).await.unwrap();
        assert_eq!((o.message.seq, o.duplicate), (3, false));
        store.shutdown().await.unwrap();
    }

    /// The writer's COMMIT leaves the WAL unsynced, and a checkpointer pass syncs it
    /// before copying its frames into the database. A checkpointer that skipped the
    /// WAL sync (`synchronous=OFF`) fails this.
    #[test]
    fn a_checkpointer_pass_syncs_the_wal_before_copying() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mychat.db");
        let w = open(&path, false, 1, 0).unwrap();
        w.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x);")
            .unwrap();
        let before = walbuf::wal_syncs_under(dir.path());
        walbuf::deferring_wal_syncs(|| {
            w.execute_batch("BEGIN; INSERT INTO t VALUES(1); INSERT INTO t VALUES(2); COMMIT;")
        })
        .unwrap();
        assert_eq!(
            walbuf::wal_syncs_under(dir.path()),
            before,
            "COMMIT synced the WAL"
        );
        let cp = open_checkpointer(&path).unwrap();
        let done = std::thread::spawn(move || {
            walbuf::skipping_database_syncs();
            checkpoint::pass(&cp).unwrap()
        })
        .join()
        .unwrap();
        assert!(
            !done.busy && done.log > 0 && done.log == done.copied,
            "{done:?}"
        );
        assert_eq!(walbuf::wal_syncs_under(dir.path()), before + 1);
    }

    /// After a failed sync and the store's shutdown (every connection closed), the
    /// WAL is still there with its frames: neither the shutdown nor the checkpoint
    /// SQLite runs at the last close discarded it.
    fn assert_wal_kept(dir: &Path) {
        let wal = dir.join("mychat.db-wal");
        let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        // A 32-byte header, then frames of a 24-byte header and a 1 KiB page.
        assert!(
            len >= 32 + 24 + 1024,
            "the WAL was discarded ({len} bytes left)"
        );
    }

    /// With syncs failing (`fail` turns the injection on and off under a directory),
    /// writes go on until one is refused with UNAVAILABLE; from then on writes and
    /// reads get UNAVAILABLE even once syncs work again; the WAL is kept through the
    /// shutdown; and after a restart every acknowledged message is there.
    async fn a_failed_sync_stops_the_store(fail: fn(&Path, bool)) {
        let dir = tempfile::tempdir().unwrap();
        let (store, alice, bob) = two_users(dir.path()).await;
        fail(dir.path(), true);
        let start = std::time::Instant::now();
        let mut acked = 0;
        let refused = loop {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "still writing after 5 s"
            );
            match store.send_direct(text(alice, bob, acked + 1)).await {
                Ok(o) => {
                    acked += 1;
                    assert_eq!(o.message.seq, acked);
                }
                Err(e) => break e,
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        fail(dir.path(), false);
        assert!(matches!(refused, StoreError::Unavailable(_)), "{refused:?}");
        let later = store.send_direct(text(alice, bob, acked + 2)).await.err();
        assert!(
            matches!(later, Some(StoreError::Unavailable(_))),
            "{later:?}"
        );
        let read = store.sync(bob, 0, 10).await.err();
        assert!(matches!(read, Some(StoreError::Unavailable(_))), "{read:?}");
        store.shutdown().await.unwrap();
        drop(store);
        assert_wal_kept(dir.path());
        let store = SqliteStore::open(dir.path(), &Default::default()).unwrap();
        for n in 1..=acked {
            let o = store.send_direct(text(alice, bob, n)).await.unwrap();
            assert_eq!((o.message.seq, o.duplicate), (n, true));
        }
        store.shutdown().await.unwrap();
    }

    /// A database sync failing just before the WAL would start over (walbuf's) stops
    /// the store (see `a_failed_sync_stops_the_store`; the batch that would have
    /// started the WAL over is the one refused). Answering INTERNAL, not stopping, or
    /// not keeping the WAL fails this.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_before_a_wal_restart_stops_the_store() {
        a_failed_sync_stops_the_store(walbuf::fail_db_syncs_under).await;
    }

    /// A PASSIVE checkpoint on `c`: (frames in the WAL, frames copied).
    fn frames(c: &Connection) -> (i64, i64) {
        let p = checkpoint::pass(c).unwrap();
        (p.log, p.copied)
    }

    /// While the checkpointer's pin holds a snapshot inside the WAL, a write after a
    /// pass that copied every frame appends to the WAL instead of starting it over
    /// (and so needs no database sync first); moved to the WAL's end, the pin lets a
    /// pass copy everything; released, the next write starts the WAL over, after a
    /// database sync. A pin that takes no snapshot (no read after its BEGIN) fails
    /// this.
    #[test]
    fn a_pin_keeps_the_wal_from_starting_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mychat.db");
        let w = open(&path, false, 1, 0).unwrap();
        w.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=0; CREATE TABLE meta(key, value); CREATE TABLE t(x);")
            .unwrap();
        let write = |n: i64| {
            w.execute("INSERT INTO t VALUES(?1)", [n]).unwrap();
        };
        write(1);
        let cp = open_checkpointer(&path).unwrap();
        let mut pin = checkpoint::Pin::new([
            open(&path, true, 1, 0).unwrap(),
            open(&path, true, 1, 0).unwrap(),
        ]);
        pin.advance().unwrap();
        let (log, copied) = frames(&cp);
        assert!(log > 0 && copied == log, "{log} frames, {copied} copied");
        let synced = walbuf::db_syncs(&path);
        write(2);
        let (log2, copied2) = frames(&cp);
        assert!(
            log2 > log,
            "the WAL started over under a pin ({log} -> {log2} frames)"
        );
        assert_eq!(walbuf::db_syncs(&path), synced);
        // Capped at the pin's snapshot: the frames of write 2 stay until it moves.
        assert_eq!(copied2, log);
        pin.advance().unwrap();
        assert_eq!(frames(&cp), (log2, log2));
        pin.release();
        write(3);
        assert_eq!(walbuf::db_syncs(&path), synced + 1);
        let (log3, _) = frames(&cp);
        assert!(log3 < log2, "the WAL did not start over ({log3} frames)");
        let n: i64 = w
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
    }

    /// Under a trickle of writes (the checkpointer catches up between them) the WAL
    /// starts over only after the writer's once-a-second finishing pass, and the
    /// checkpointer syncs the database before each such pass: the syncs walbuf makes
    /// before a restart (on the writer's path) are about one per finishing pass, not
    /// one per catch-up. Without the pin, or without the checkpointer's sync, this
    /// fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_only_after_the_finishing_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mychat.db");
        let (store, alice, bob) = two_users(dir.path()).await;
        store.send_direct(text(alice, bob, 1)).await.unwrap();
        let synced = walbuf::db_syncs(&path);
        let start = std::time::Instant::now();
        let mut n = 1;
        while start.elapsed() < Duration::from_millis(2600) {
            n += 1;
            store.send_direct(text(alice, bob, n)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let restarts = walbuf::db_syncs(&path) - synced;
        let events: Vec<&str> = checkpoint::EVENTS
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| *p == path)
            .map(|(_, e)| *e)
            .collect();
        let finishes = events.iter().filter(|e| **e == "finish").count();
        assert!(finishes >= 2, "{events:?}");
        // A batch may commit between the checkpointer's sync and the writer's pass:
        // then the WAL starts over once before that pass and once after it.
        assert!(
            restarts <= 2 * finishes,
            "{restarts} database syncs before a restart, {finishes} finishing passes, {n} writes"
        );
        let mut synced_since = false;
        for e in &events {
            match *e {
                "sync" => synced_since = true,
                _ => {
                    assert!(
                        synced_since,
                        "a finishing pass with no sync before it: {events:?}"
                    );
                    synced_since = false;
                }
            }
        }
        store.shutdown().await.unwrap();
    }

    /// A database sync of the checkpointer's that fails (before the writer's
    /// finishing pass) stops the store as a failed WAL sync does (see
    /// `a_failed_sync_stops_the_store`). Not stopping the store, or letting the
    /// shutdown discard the WAL, fails this.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_that_cannot_be_synced_stops_the_store() {
        a_failed_sync_stops_the_store(checkpoint::fail_syncs_under).await;
    }

    /// A restarted store fills its conversation cache from the database, and the
    /// first messages after the restart land in the conversations of before, whichever
    /// side sends. Not filling it fails this.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_store_knows_its_conversations() {
        let dir = tempfile::tempdir().unwrap();
        let (store, alice, bob) = two_users(dir.path()).await;
        let carol = store
            .create_user("carol".into(), "x".into(), 0)
            .await
            .unwrap()
            .id;
        let ab = store
            .send_direct(text(alice, bob, 1))
            .await
            .unwrap()
            .message;
        let ca = store
            .send_direct(text(carol, alice, 2))
            .await
            .unwrap()
            .message;
        assert_ne!(ab.conversation_id, ca.conversation_id);
        store.shutdown().await.unwrap();
        drop(store);
        let store = SqliteStore::open(dir.path(), &Default::default()).unwrap();
        let ba = store
            .send_direct(text(bob, alice, 3))
            .await
            .unwrap()
            .message;
        let ac = store
            .send_direct(text(alice, carol, 4))
            .await
            .unwrap()
            .message;
        assert_eq!((ba.conversation_id, ba.seq), (ab.conversation_id, 2));
        assert_eq!((ac.conversation_id, ac.seq), (ca.conversation_id, 2));
        let path = dir.path().canonicalize().unwrap().join("mychat.db");
        let filled: Vec<usize> = PRELOADED
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| *p == path)
            .map(|(_, n)| *n)
            .collect();
        // The first open found none, the second both.
        assert_eq!(filled, [0, 2]);
        store.shutdown().await.unwrap();
    }

    /// A new message's resend lookup is ruled out by its sender's filter without a
    /// probe of `client_ids`, and every resend still finds its original: entries the
    /// merges wrote before the filter was built, while it was rebuilt past its
    /// capacity (some then still in the writer's map), and after a restart, when the
    /// filter is built from the table alone. A filter missing any of those entries
    /// answers such a resend as a new message; no filter at all probes every time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resend_filters_skip_the_index_and_miss_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = mychat_config::StoreConfig {
            stream_log_rows: 4,
            stream_merge_rows: 2,
            ..Default::default()
        };
        let path = dir.path().canonicalize().unwrap().join("mychat.db");
        let probes = || resend_probes(&path);
        let (store, alice, bob) = two_users_with(dir.path(), &cfg).await;
        let mut ids = Vec::new();
        // 300 messages: alice's filter is built at her first and rebuilt twice.
        for n in 0..300 {
            let o = store.send_direct(text(alice, bob, n)).await.unwrap();
            assert!(!o.duplicate);
            ids.push(o.message.id);
        }
        assert_eq!(probes(), 0, "lookups of new messages probed the index");
        let resend_all = |store: Arc<SqliteStore>, ids: Vec<u64>| async move {
            for (n, id) in ids.iter().enumerate() {
                let o = store.send_direct(text(alice, bob, n as u64)).await.unwrap();
                assert_eq!((o.duplicate, o.message.id), (true, *id), "resend of {n}");
            }
        };
        resend_all(store.clone(), ids.clone()).await;
        let merged: i64 = store
            .read(|c| {
                c.query_row("SELECT COUNT(*) FROM client_ids", [], |r| r.get(0))
                    .map_err(internal)
            })
            .await
            .unwrap();
        assert!(merged > 250, "only {merged} entries merged");
        store.shutdown().await.unwrap();
        drop(store);
        let store = SqliteStore::open(dir.path(), &cfg).unwrap();
        resend_all(store.clone(), ids.clone()).await;
        let before = probes();
        for n in 300..350 {
            assert!(
                !store
                    .send_direct(text(alice, bob, n))
                    .await
                    .unwrap()
                    .duplicate
            );
        }
        assert_eq!(probes(), before, "lookups of new messages probed the index");
        store.shutdown().await.unwrap();
    }

    /// How many times the resend index of the store at `path` was probed.
    fn resend_probes(path: &Path) -> usize {
        let all = RESEND_PROBES.lock().unwrap();
        all.iter().filter(|p| *p == path).count()
    }

    /// Alice and Bob of [`two_users_with`], Alice's first three messages to Bob (their
    /// ids), and the store shut down.
    async fn three_sent_and_stopped(
        dir: &Path,
        cfg: &mychat_config::StoreConfig,
    ) -> (UserId, UserId, Vec<u64>) {
        let (store, alice, bob) = two_users_with(dir, cfg).await;
        let mut ids = Vec::new();
        for n in 0..3 {
            ids.push(
                store
                    .send_direct(text(alice, bob, n))
                    .await
                    .unwrap()
                    .message
                    .id,
            );
        }
        store.shutdown().await.unwrap();
        (alice, bob, ids)
    }

    /// On the store reopened after [`three_sent_and_stopped`]: Bob's new messages are
    /// ruled out by his filter (no probe); each send of Alice's probes the index and
    /// finds what it must (her three resends, then new messages with the next seqs).
    async fn alice_probes_and_bob_does_not(
        store: &Arc<SqliteStore>,
        alice: UserId,
        bob: UserId,
        ids: &[u64],
        path: &Path,
    ) {
        let before = resend_probes(path);
        for n in 0..2 {
            assert!(
                !store
                    .send_direct(text(bob, alice, n))
                    .await
                    .unwrap()
                    .duplicate
            );
        }
        assert_eq!(
            resend_probes(path),
            before,
            "bob's new messages probed the index"
        );
        for (n, id) in ids.iter().enumerate() {
            let o = store.send_direct(text(alice, bob, n as u64)).await.unwrap();
            assert_eq!((o.duplicate, o.message.id), (true, *id), "resend of {n}");
        }
        for n in 3..6 {
            let o = store.send_direct(text(alice, bob, n)).await.unwrap();
            assert!(!o.duplicate, "new message {n} taken for a resend");
            assert_eq!(o.message.seq, n + 3, "new message {n}");
        }
        assert_eq!(
            resend_probes(path),
            before + 6,
            "one probe per send of alice's"
        );
        store.shutdown().await.unwrap();
    }

    /// A sender with more stored entries than a filter may hold gets none: every
    /// lookup of its sends probes the index, so its resends are still found and its
    /// new messages stored, while a sender with few entries keeps skipping the index.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sender_past_the_filter_bound_probes_and_still_finds_resends() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = mychat_config::StoreConfig::default();
        let path = dir.path().canonicalize().unwrap().join("mychat.db");
        let (alice, bob, ids) = three_sent_and_stopped(dir.path(), &cfg).await;
        // Alice's entries past the bound, written straight into the table (ids of
        // messages that do not exist: no lookup below asks for them).
        {
            let mut c = Connection::open(&path).unwrap();
            let t = c.transaction().unwrap();
            {
                let mut ins = t
                    .prepare("INSERT INTO client_ids(sender_id, client_msg_id, msg_id) VALUES(?1, ?2, ?3)")
                    .unwrap();
                for n in 0..client_ids::FILTER_MAX_ENTRIES as i64 {
                    ins.execute(params![alice.0 as i64, format!("pad{n}"), 1_000_000 + n])
                        .unwrap();
                }
            }
            t.commit().unwrap();
        }
        let store = SqliteStore::open(dir.path(), &cfg).unwrap();
        alice_probes_and_bob_does_not(&store, alice, bob, &ids, &path).await;
    }

    /// A sender whose resend entries cannot be read (here a row that is not text, as
    /// a damaged file could hold) gets no filter: each of its sends probes the index
    /// and goes on (before, each was refused with INTERNAL until a restart), its
    /// resends are found and its new messages stored; another sender keeps its filter.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sender_whose_resend_entries_cannot_be_read_probes_and_still_sends() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = mychat_config::StoreConfig::default();
        let path = dir.path().canonicalize().unwrap().join("mychat.db");
        let (alice, bob, ids) = three_sent_and_stopped(dir.path(), &cfg).await;
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO client_ids(sender_id, client_msg_id, msg_id) VALUES(?1, X'01', 1000000)",
                [alice.0 as i64],
            )
            .unwrap();
        let store = SqliteStore::open(dir.path(), &cfg).unwrap();
        alice_probes_and_bob_does_not(&store, alice, bob, &ids, &path).await;
    }

    /// A store's checkpointer thread runs lowered by `store.checkpointer_nice` while
    /// it keeps up (here, with nothing to copy), and level with the server's other
    /// threads at 0; where raising a priority is not allowed, level either way.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checkpointer_runs_lowered_while_it_keeps_up() {
        fn nice_of(tid: i32) -> i32 {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
            // After the name in parentheses: state is field 3, nice field 19.
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            rest.split_whitespace().nth(16).unwrap().parse().unwrap()
        }
        let base = checkpoint::own_nice();
        let allowed = std::thread::spawn(|| checkpoint::Priority::new(19).enabled())
            .join()
            .unwrap();
        if !allowed {
            eprintln!(
                "notice: this process may not raise a priority: the checkpointer must stay level"
            );
        }
        for (nice, want) in [(19, if allowed { 19 } else { base }), (0, base)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().canonicalize().unwrap().join("mychat.db");
            let cfg = mychat_config::StoreConfig {
                checkpointer_nice: nice,
                ..Default::default()
            };
            let store = SqliteStore::open(dir.path(), &cfg).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let tid = loop {
                let found = checkpoint::THREADS
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(p, _)| *p == path)
                    .map(|(_, t)| *t);
                if let Some(t) = found {
                    break t;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no checkpointer thread"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            while nice_of(tid) != want && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Several of its loops later, still so.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(nice_of(tid), want, "checkpointer_nice {nice}");
            store.shutdown().await.unwrap();
        }
    }

    /// The resend index's rows: (sender, client message id, message id), in key order.
    fn client_id_rows(c: &Connection) -> Vec<(i64, String, i64)> {
        c.prepare("SELECT sender_id, client_msg_id, msg_id FROM client_ids ORDER BY 1, 2")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// A database of schema 4 (resend index on the messages table) migrates to 5: its
    /// messages' entries move to `client_ids`, the old index goes, and nothing is left
    /// for the merge at open.
    #[test]
    fn schema_4_database_moves_its_resend_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Connection::open(dir.path().join("mychat.db")).unwrap();
        c.execute_batch(
            "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO meta VALUES('schema_version', 4);",
        )
        .unwrap();
        for m in &MIGRATIONS[..4] {
            c.execute_batch(m).unwrap();
        }
        c.execute_batch(
            "INSERT INTO messages(id, conv_id, seq, sender_id, recipient_id, kind, text, client_msg_id, time_ms)
                 VALUES(1, 1, 1, 7, 8, 1, 'a', 'x', 0), (2, 1, 2, 8, 7, 1, 'b', 'x', 0),
                       (3, 1, 3, 7, 8, 1, 'c', 'y', 0);",
        )
        .unwrap();
        migrate(&mut c).unwrap();
        merge_all(&c).unwrap();
        assert_eq!(
            client_id_rows(&c),
            vec![(7, "x".into(), 1), (7, "y".into(), 3), (8, "x".into(), 2)]
        );
        let (index, upto): (i64, i64) = c
            .query_row(
                "SELECT (SELECT COUNT(*) FROM sqlite_master WHERE name = 'messages_client'),
                        (SELECT value FROM meta WHERE key = 'client_ids_upto')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((index, upto), (0, 3));
    }

    /// A restart after a crash in the middle of a merge finds events in the log that
    /// a committed step already put in `updates`, and resend entries already in
    /// `client_ids`: the merge at open keeps one of each and empties the log.
    #[test]
    fn merge_at_open_takes_each_event_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Connection::open(dir.path().join("mychat.db")).unwrap();
        migrate(&mut c).unwrap();
        c.execute_batch(
            "INSERT INTO updates(user_id, pts, kind, conv_id, seq, msg_id, actor, data)
                 VALUES(1, 1, 1, 5, 1, 10, 2, ''), (1, 2, 1, 5, 2, 11, 2, '');
             INSERT INTO updates_log(user_id, pts, kind, conv_id, seq, msg_id, actor, data)
                 VALUES(1, 2, 1, 5, 2, 11, 2, ''), (2, 1, 4, 0, 1, 0, 1, 'hi'),
                       (1, 3, 2, 5, 2, 0, 2, '');",
        )
        .unwrap();
        // A resend index step wrote messages 1 and 2 before the crash; the merge's
        // last step, which moves client_ids_upto (still 0), never ran.
        c.execute_batch(
            "INSERT INTO messages(id, conv_id, seq, sender_id, recipient_id, kind, text, client_msg_id, time_ms)
                 VALUES(1, 5, 1, 2, 1, 1, 'a', 'p', 0), (2, 5, 2, 2, 1, 1, 'b', 'q', 0),
                       (3, 5, 3, 1, 2, 1, 'c', 'p', 0);
             INSERT INTO client_ids VALUES(2, 'p', 1), (2, 'q', 2);",
        )
        .unwrap();
        merge_all(&c).unwrap();
        assert_eq!(
            client_id_rows(&c),
            vec![(1, "p".into(), 3), (2, "p".into(), 1), (2, "q".into(), 2)]
        );
        let rows: Vec<(i64, i64, i64, String)> = c
            .prepare("SELECT user_id, pts, kind, data FROM updates ORDER BY user_id, pts")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (1, 1, 1, String::new()),
                (1, 2, 1, String::new()),
                (1, 3, 2, String::new()),
                (2, 1, 4, "hi".to_string()),
            ]
        );
        let left: i64 = c
            .query_row("SELECT COUNT(*) FROM updates_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
    }

    /// A database written by a server of schema 2 (with an unread set holding rows)
    /// opens under this one: migration 3 runs on it and drops the set.
    #[test]
    fn schema_2_database_migrates_to_3() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mychat.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO meta VALUES('schema_version', 2);",
            )
            .unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.execute_batch(MIGRATIONS[1]).unwrap();
            c.execute("INSERT INTO unread(user_id, conv_id) VALUES(1, 1)", [])
                .unwrap();
        }
        let mut c = Connection::open(&path).unwrap();
        migrate(&mut c).unwrap();
        let version: i64 = c
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let unread_tables: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name='unread'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(unread_tables, 0);
    }
}

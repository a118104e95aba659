//! A thin SQLite VFS over the platform's default one that coalesces the writes to a
//! write-ahead log: a few 64 KiB writes per transaction instead of two per page.
//!
//! SQLite appends a WAL frame as two writes, the 24-byte frame header and the page,
//! so a group commit that dirties 2,000 one-KiB pages makes 4,000 `pwrite` calls
//! before its one `fsync`; on the message path that was about half the writer
//! thread's kernel time (README, "where the time goes"). This shim keeps a WAL
//! file's contiguous writes in a buffer and hands them to the real file as few large writes
//! when SQLite next syncs, reads, sizes, truncates or closes that file, when a write
//! lands elsewhere, or when the buffer reaches [`FLUSH_BYTES`].
//!
//! Why this is safe: SQLite never relies on an unsynced write being visible to
//! anyone but the connection that made it, and that connection reads its own WAL
//! only through `xRead`, which flushes first. Other connections (readers, the
//! checkpointer) read only frames up to the last commit's mark in the shared
//! wal-index, which SQLite publishes after the commit's `xSync`, and `xSync` flushes
//! before it syncs. A process killed with unflushed frames loses exactly what a
//! power cut before the sync would lose: frames of a transaction that never
//! committed, which recovery discards by their checksums. Files other than WALs
//! (the database, its shared-memory index) pass straight through.
//!
//! Measured (saturate-10k on a 514 MB database restored before every run, three
//! alternating pairs): the writer thread's write calls fell from 20.7 to 1.8 per
//! message, delivered msgs/s rose 7,167 -> 7,920 (medians, +10.5%) and server CPU per
//! message fell 156 -> 140 µs.
//!
//! It also keeps the database durable wherever SQLite discards WAL content: before a
//! WAL file gets a new header (the WAL starts over and its old frames will be
//! overwritten), is truncated or is deleted, the database file is synced
//! ([`sync_database`]). The store's checkpointer copies frames into the database
//! without syncing it (its thread skips database syncs, [`skipping_database_syncs`]);
//! until the WAL starts over those frames are still in the WAL, which recovery
//! replays, so nothing is lost before the sync here, and after it the database
//! holds them durably.
//!
//! And it lets a thread change what a sync does ([`deferring_wal_syncs`] for the
//! writer's COMMIT, whose WAL the store's syncer thread fsyncs;
//! [`skipping_database_syncs`] for the checkpointer).
//!
//! Writing a VFS by hand rather than taking a crate: the crates that exist build a
//! whole VFS in Rust (files, locks, shared memory); this one delegates every call
//! to SQLite's own unix VFS and changes one thing.

use rusqlite::ffi;
use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

/// The name connections pass to `open_with_flags_and_vfs`.
pub const VFS_NAME: &CStr = c"mychat-walbuf";

/// A buffered WAL write goes out once this many bytes are waiting.
pub const FLUSH_BYTES: usize = 1 << 20;

/// The unix VFS writes at most 128 KiB - 1 bytes per call (it masks the length), so
/// a flush hands the real file pieces of this size.
const WRITE_BYTES: usize = 64 << 10;

/// Our file: SQLite allocates `szOsFile` bytes for it; the real file follows.
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    /// Set for WAL files only.
    wal: *mut WalBuf,
}

struct WalBuf {
    /// The file offset of `data[0]`.
    start: i64,
    data: Vec<u8>,
    /// The database file this WAL belongs to.
    db: std::path::PathBuf,
    /// The file's path, for the tests' write failures.
    #[cfg(test)]
    path: String,
}

/// Tests: the directories under which one kind of I/O fails, as a full or failing
/// disk would make it. One entry per test that wants failures: tests run in parallel.
#[cfg(test)]
pub(super) struct FailUnder(std::sync::Mutex<Vec<String>>);

#[cfg(test)]
impl FailUnder {
    pub(super) const fn new() -> FailUnder {
        FailUnder(std::sync::Mutex::new(Vec::new()))
    }

    pub(super) fn set(&self, dir: &std::path::Path, on: bool) {
        let dir = dir.to_string_lossy().into_owned();
        let mut f = self.0.lock().unwrap();
        f.retain(|d| *d != dir);
        if on {
            f.push(dir);
        }
    }

    pub(super) fn hits(&self, path: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .any(|d| path.contains(d.as_str()))
    }
}

/// Tests: WAL flushes that fail (the buffered bytes are dropped, the call returns an
/// error).
#[cfg(test)]
static FAIL_FLUSHES: FailUnder = FailUnder::new();

/// Tests: makes every flush of a WAL file under `dir` fail (`on`), or stops it.
#[cfg(test)]
pub(super) fn fail_flushes_under(dir: &std::path::Path, on: bool) {
    FAIL_FLUSHES.set(dir, on);
}

/// Tests: each database file [`sync_database`] synced, once per sync.
#[cfg(test)]
static DB_SYNCS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Tests: how many times the database at `db` was synced before WAL content was
/// discarded.
#[cfg(test)]
pub(super) fn db_syncs(db: &std::path::Path) -> usize {
    DB_SYNCS.lock().unwrap().iter().filter(|p| *p == db).count()
}

/// Tests: the WAL files SQLite's syncs reached (not deferred), once per sync.
#[cfg(test)]
static WAL_SYNCS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Tests: how many syncs SQLite made of WAL files under `dir` that reached the file.
#[cfg(test)]
pub(super) fn wal_syncs_under(dir: &std::path::Path) -> usize {
    let dir = dir.to_string_lossy();
    WAL_SYNCS
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.contains(dir.as_ref()))
        .count()
}

/// Tests: database syncs ([`sync_database`]) that fail.
#[cfg(test)]
static FAIL_DB_SYNCS: FailUnder = FailUnder::new();

/// Tests: makes every database sync under `dir` fail (`on`), or stops it.
#[cfg(test)]
pub(super) fn fail_db_syncs_under(dir: &std::path::Path, on: bool) {
    FAIL_DB_SYNCS.set(dir, on);
}

/// Makes the database file `db` durable (its data and size), before SQLite discards
/// content of its WAL; an error fails the SQLite call that would have discarded it,
/// and keeps the WAL from then on ([`keep_wal`]: the store stops). Once a second
/// under steady writes (the writer's finishing checkpoint lets the WAL start over;
/// the store's checkpointer keeps it from starting over at other times), right after
/// that checkpoint's own sync: little is left to write.
fn sync_database(db: &std::path::Path) -> c_int {
    if wal_kept(db) {
        tracing::warn!(db = %db.display(), "store: a sync failed earlier; the WAL is kept for the next start's recovery");
        return ffi::SQLITE_IOERR_FSYNC;
    }
    let synced = std::fs::File::open(db).and_then(|f| f.sync_all());
    #[cfg(test)]
    let synced = if FAIL_DB_SYNCS.hits(&db.to_string_lossy()) {
        Err(std::io::Error::other("injected sync failure"))
    } else {
        synced
    };
    match synced {
        Ok(()) => {
            #[cfg(test)]
            DB_SYNCS.lock().unwrap().push(db.to_path_buf());
            ffi::SQLITE_OK
        }
        Err(e) => {
            tracing::error!(db = %db.display(), error = %e, "store: cannot sync the database before the WAL starts over; the WAL is kept and writes stop (restart the server)");
            keep_wal(db, true);
            ffi::SQLITE_IOERR_FSYNC
        }
    }
}

/// The databases whose WAL nothing may discard until the store opens them again.
static KEPT_WALS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// After a failed sync (of the WAL, of the database before the WAL could start over,
/// here or in the checkpointer) the store stops; this keeps the WAL of `db` from then
/// on (`on`): no restart, truncation or deletion of it, not even by the checkpoint
/// SQLite runs when the last connection closes, since [`sync_database`] refuses. Why: after a failed fsync the
/// kernel may have marked the pages clean without writing them and report the next
/// fsync clean, so the database file cannot be trusted to hold what the WAL holds;
/// the next start's recovery reads the WAL and copies every frame again. Cleared
/// when the store opens the database again (`on` false).
pub(super) fn keep_wal(db: &std::path::Path, on: bool) {
    let mut kept = KEPT_WALS.lock().unwrap_or_else(|e| e.into_inner());
    kept.retain(|p| p != db);
    if on {
        kept.push(db.to_path_buf());
    }
}

pub(super) fn wal_kept(db: &std::path::Path) -> bool {
    let kept = KEPT_WALS.lock().unwrap_or_else(|e| e.into_inner());
    kept.iter().any(|p| p == db)
}

/// The database a WAL file name belongs to (SQLite names it `<database>-wal`).
pub(super) fn database_of_wal(wal: &str) -> Option<&str> {
    wal.strip_suffix("-wal")
}

/// The real file's part of our allocation starts here (8-byte aligned).
const REAL_OFFSET: usize = std::mem::size_of::<ShimFile>().next_multiple_of(8);

struct Registered {
    real: *mut ffi::sqlite3_vfs,
}
// SAFETY: the pointer is to SQLite's static default VFS, never freed.
unsafe impl Send for Registered {}
unsafe impl Sync for Registered {}

static REGISTERED: OnceLock<Result<Registered, String>> = OnceLock::new();

/// Registers the VFS (once per process); connections then open with [`VFS_NAME`].
pub fn register() -> Result<(), String> {
    REGISTERED
        .get_or_init(|| unsafe {
            let real = ffi::sqlite3_vfs_find(std::ptr::null());
            if real.is_null() {
                return Err("SQLite has no default VFS".into());
            }
            let mut ours: ffi::sqlite3_vfs = *real;
            ours.szOsFile = (REAL_OFFSET + (*real).szOsFile as usize) as c_int;
            ours.zName = VFS_NAME.as_ptr();
            ours.pNext = std::ptr::null_mut();
            ours.xOpen = Some(x_open);
            ours.xDelete = Some(x_delete);
            // Leaked on purpose: SQLite keeps the pointer for the life of the process.
            let ours = Box::into_raw(Box::new(ours));
            let rc = ffi::sqlite3_vfs_register(ours, 0);
            if rc != ffi::SQLITE_OK {
                return Err(format!("sqlite3_vfs_register failed: {rc}"));
            }
            Ok(Registered { real })
        })
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

fn real_vfs() -> *mut ffi::sqlite3_vfs {
    match REGISTERED.get() {
        Some(Ok(r)) => r.real,
        _ => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real_vfs = real_vfs();
    // SAFETY: SQLite hands us `szOsFile` writable bytes at `file`; the real file's
    // part starts at REAL_OFFSET and is as large as the real VFS asks.
    unsafe {
        let shim = file as *mut ShimFile;
        let real = (file as *mut u8).add(REAL_OFFSET) as *mut ffi::sqlite3_file;
        (*real).pMethods = std::ptr::null();
        let open = match (*real_vfs).xOpen {
            Some(f) => f,
            None => return ffi::SQLITE_CANTOPEN,
        };
        let rc = open(real_vfs, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK || (*real).pMethods.is_null() {
            // SQLite calls xClose only when pMethods is set.
            (*shim).base.pMethods = std::ptr::null();
            return rc;
        }
        let wal = if flags & ffi::SQLITE_OPEN_WAL != 0 {
            let db = if name.is_null() {
                std::path::PathBuf::new()
            } else {
                std::path::PathBuf::from(
                    CStr::from_ptr(ffi::sqlite3_filename_database(name))
                        .to_string_lossy()
                        .into_owned(),
                )
            };
            Box::into_raw(Box::new(WalBuf {
                start: 0,
                data: Vec::new(),
                db,
                #[cfg(test)]
                path: if name.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(name).to_string_lossy().into_owned()
                },
            }))
        } else {
            std::ptr::null_mut()
        };
        std::ptr::write(
            shim,
            ShimFile {
                base: ffi::sqlite3_file { pMethods: &METHODS },
                real,
                wal,
            },
        );
        ffi::SQLITE_OK
    }
}

/// Deletes a file; a WAL only once its database is synced (the last connection to
/// close checkpoints and deletes the WAL, and its checkpoint may not have synced).
unsafe extern "C" fn x_delete(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const std::ffi::c_char,
    sync_dir: c_int,
) -> c_int {
    let real_vfs = real_vfs();
    unsafe {
        if !name.is_null() {
            if let Some(db) = database_of_wal(&CStr::from_ptr(name).to_string_lossy()) {
                let rc = sync_database(std::path::Path::new(db));
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
            }
        }
        match (*real_vfs).xDelete {
            Some(d) => d(real_vfs, name, sync_dir),
            None => ffi::SQLITE_IOERR_DELETE,
        }
    }
}

/// The real file's methods.
///
/// SAFETY (for all helpers below): `f` is a file our `x_open` opened successfully.
unsafe fn real(
    f: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, &'static ffi::sqlite3_io_methods) {
    unsafe {
        let real = (*(f as *mut ShimFile)).real;
        (real, &*(*real).pMethods)
    }
}

/// Flushes the waiting WAL bytes, then gives the real file and its methods; returns
/// the flush's error from the calling method instead.
macro_rules! flushed {
    ($f:expr) => {{
        let rc = flush($f);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        real($f)
    }};
}

/// Writes out whatever WAL bytes are waiting.
unsafe fn flush(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let shim = f as *mut ShimFile;
        let wal = (*shim).wal;
        if wal.is_null() || (*wal).data.is_empty() {
            return ffi::SQLITE_OK;
        }
        let (real, m) = real(f);
        #[cfg(test)]
        if FAIL_FLUSHES.hits(&(*wal).path) {
            (*wal).data.clear();
            return ffi::SQLITE_IOERR_WRITE;
        }
        let data = &mut (*wal).data;
        let Some(w) = m.xWrite else {
            data.clear();
            return ffi::SQLITE_IOERR_WRITE;
        };
        let mut rc = ffi::SQLITE_OK;
        let mut at = (*wal).start;
        for chunk in data.chunks(WRITE_BYTES) {
            rc = w(
                real,
                chunk.as_ptr() as *const c_void,
                chunk.len() as c_int,
                at,
            );
            if rc != ffi::SQLITE_OK {
                break;
            }
            at += chunk.len() as i64;
        }
        data.clear();
        rc
    }
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let rc = flush(f);
        let (real, m) = real(f);
        let rc2 = m.xClose.map_or(ffi::SQLITE_OK, |c| c(real));
        let shim = f as *mut ShimFile;
        if !(*shim).wal.is_null() {
            drop(Box::from_raw((*shim).wal));
            (*shim).wal = std::ptr::null_mut();
        }
        if rc != ffi::SQLITE_OK {
            rc
        } else {
            rc2
        }
    }
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amt: c_int,
    off: i64,
) -> c_int {
    unsafe {
        let (real, m) = flushed!(f);
        m.xRead
            .map_or(ffi::SQLITE_IOERR_READ, |r| r(real, buf, amt, off))
    }
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    off: i64,
) -> c_int {
    unsafe {
        let wal = (*(f as *mut ShimFile)).wal;
        if wal.is_null() || amt <= 0 {
            super::checkpoint::on_database_write();
            let (real, m) = real(f);
            return m
                .xWrite
                .map_or(ffi::SQLITE_IOERR_WRITE, |w| w(real, buf, amt, off));
        }
        if off == 0 {
            // A new header: the WAL starts over, and the frames that follow overwrite
            // ones the database may hold only unsynced.
            let rc = sync_database(&(*wal).db);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        let bytes = std::slice::from_raw_parts(buf as *const u8, amt as usize);
        let w = &mut *wal;
        let end = w.start + w.data.len() as i64;
        if !w.data.is_empty() && off >= w.start && off + amt as i64 <= end {
            // Rewriting bytes still waiting (SQLite rewrites a frame of the open
            // transaction in place when the same page changes again).
            let at = (off - w.start) as usize;
            w.data[at..at + bytes.len()].copy_from_slice(bytes);
            return ffi::SQLITE_OK;
        }
        if !w.data.is_empty() && off != end {
            let rc = flush(f);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        let w = &mut *wal;
        if w.data.is_empty() {
            w.start = off;
        }
        w.data.extend_from_slice(bytes);
        if w.data.len() >= FLUSH_BYTES {
            return flush(f);
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    unsafe {
        let wal = (*(f as *mut ShimFile)).wal;
        if !wal.is_null() {
            let rc = sync_database(&(*wal).db);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        let (real, m) = flushed!(f);
        m.xTruncate
            .map_or(ffi::SQLITE_IOERR_TRUNCATE, |t| t(real, size))
    }
}

/// What a sync asked of this thread's connection does (see [`deferring_wal_syncs`]
/// and [`skipping_database_syncs`]); every other thread syncs for real.
#[derive(Clone, Copy)]
enum SyncPolicy {
    Real,
    /// A WAL sync writes the WAL's buffered frames to the file and returns: the
    /// writer's COMMIT, whose WAL the store's syncer thread fsyncs before anyone
    /// hears of the commit.
    DeferWal,
    /// A database file sync returns at once: the checkpointer's passes (the database
    /// is synced before WAL content is discarded, see [`sync_database`]).
    SkipDatabase,
}

thread_local! {
    static SYNC_POLICY: std::cell::Cell<SyncPolicy> = const { std::cell::Cell::new(SyncPolicy::Real) };
}

/// Runs `f` (the writer's COMMIT) with this thread's WAL syncs reduced to writing the
/// buffered frames to the file: the frames are in the kernel, and visible to the other
/// connections once SQLite publishes the commit, but not durable until the caller
/// syncs the WAL itself. Safe only if nothing of the commit is told to anyone before
/// that sync, and no reader's answer leaves before it (the store's `durable` module).
pub fn deferring_wal_syncs<T>(f: impl FnOnce() -> T) -> T {
    SYNC_POLICY.with(|p| p.set(SyncPolicy::DeferWal));
    let r = f();
    SYNC_POLICY.with(|p| p.set(SyncPolicy::Real));
    r
}

/// From now on this thread's database file syncs return at once (the checkpointer's
/// thread: its passes copy WAL frames into the database and leave them there unsynced;
/// its WAL syncs stay real, so that it never copies a frame that is not durable).
pub fn skipping_database_syncs() {
    SYNC_POLICY.with(|p| p.set(SyncPolicy::SkipDatabase));
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe {
        let (real, m) = flushed!(f);
        let is_wal = !(*(f as *mut ShimFile)).wal.is_null();
        match SYNC_POLICY.with(|p| p.get()) {
            SyncPolicy::DeferWal if is_wal => return ffi::SQLITE_OK,
            SyncPolicy::SkipDatabase if !is_wal => return ffi::SQLITE_OK,
            _ => {}
        }
        #[cfg(test)]
        if is_wal {
            WAL_SYNCS
                .lock()
                .unwrap()
                .push((*(*(f as *mut ShimFile)).wal).path.clone());
        }
        m.xSync.map_or(ffi::SQLITE_IOERR_FSYNC, |s| s(real, flags))
    }
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    unsafe {
        let (real, m) = flushed!(f);
        m.xFileSize
            .map_or(ffi::SQLITE_IOERR_FSTAT, |s| s(real, size))
    }
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe {
        let (real, m) = real(f);
        m.xLock.map_or(ffi::SQLITE_IOERR_LOCK, |l| l(real, level))
    }
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe {
        let (real, m) = real(f);
        m.xUnlock
            .map_or(ffi::SQLITE_IOERR_UNLOCK, |l| l(real, level))
    }
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    unsafe {
        let (real, m) = real(f);
        m.xCheckReservedLock
            .map_or(ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, |l| l(real, out))
    }
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    unsafe {
        // Whatever the control does (size hints, persistence, VFS queries), it sees
        // the file as SQLite wrote it.
        let (real, m) = flushed!(f);
        m.xFileControl
            .map_or(ffi::SQLITE_NOTFOUND, |c| c(real, op, arg))
    }
}

unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (real, m) = real(f);
        m.xSectorSize.map_or(4096, |s| s(real))
    }
}

unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (real, m) = real(f);
        m.xDeviceCharacteristics.map_or(0, |d| d(real))
    }
}

unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    unsafe {
        let (real, m) = real(f);
        match m.xShmMap {
            Some(s) if m.iVersion >= 2 => s(real, region, size, extend, out),
            _ => ffi::SQLITE_IOERR_SHMMAP,
        }
    }
}

unsafe extern "C" fn x_shm_lock(
    f: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    unsafe {
        let (real, m) = real(f);
        match m.xShmLock {
            Some(s) if m.iVersion >= 2 => s(real, offset, n, flags),
            _ => ffi::SQLITE_IOERR_SHMLOCK,
        }
    }
}

unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    unsafe {
        let (real, m) = real(f);
        if let Some(s) = m.xShmBarrier {
            if m.iVersion >= 2 {
                s(real)
            }
        }
    }
}

unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    unsafe {
        let (real, m) = real(f);
        match m.xShmUnmap {
            Some(s) if m.iVersion >= 2 => s(real, delete),
            _ => ffi::SQLITE_OK,
        }
    }
}

unsafe extern "C" fn x_fetch(
    f: *mut ffi::sqlite3_file,
    off: i64,
    amt: c_int,
    out: *mut *mut c_void,
) -> c_int {
    unsafe {
        // Memory-mapped reads are for the database file, which is never buffered;
        // flush anyway so a mapping never shows bytes older than a write.
        let (real, m) = flushed!(f);
        match m.xFetch {
            Some(x) if m.iVersion >= 3 => x(real, off, amt, out),
            _ => {
                *out = std::ptr::null_mut();
                ffi::SQLITE_OK
            }
        }
    }
}

unsafe extern "C" fn x_unfetch(f: *mut ffi::sqlite3_file, off: i64, p: *mut c_void) -> c_int {
    unsafe {
        let (real, m) = real(f);
        match m.xUnfetch {
            Some(x) if m.iVersion >= 3 => x(real, off, p),
            _ => ffi::SQLITE_OK,
        }
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

#[cfg(test)]
mod tests {
    use rusqlite::{params, Connection};

    fn row(i: i64, round: i64) -> Vec<u8> {
        (0..2048).map(|k| (i * 31 + k * 7 + round) as u8).collect()
    }

    /// Inserts rows `first .. first + n` of `round` into `t` (no transaction of its own).
    fn insert(w: &Connection, round: i64, first: i64, n: i64) -> rusqlite::Result<()> {
        for id in first..first + n {
            w.execute(
                "INSERT INTO t(id, round, b) VALUES(?1, ?2, ?3)",
                params![id, round, row(id, round)],
            )?;
        }
        Ok(())
    }

    /// A database in `dir` with table `t`, WAL mode, no automatic checkpoints: its
    /// path, a write connection and a read-only one (both through the shim).
    fn wal_db(dir: &std::path::Path) -> (std::path::PathBuf, Connection, Connection) {
        let path = dir.join("t.db");
        let w = super::super::open(&path, false, 1, 0).unwrap();
        w.execute_batch(
            "PRAGMA page_size=1024; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             PRAGMA wal_autocheckpoint=0;
             CREATE TABLE t(id INTEGER PRIMARY KEY, round INTEGER NOT NULL, b BLOB NOT NULL);",
        )
        .unwrap();
        let r = super::super::open(&path, true, 1, 0).unwrap();
        (path, w, r)
    }

    /// Transactions larger than the buffer (so it flushes mid-transaction) and a
    /// cache small enough to spill (so SQLite rewrites frames of the open
    /// transaction) read back exactly, from a second connection after each commit,
    /// across a WAL reset, and from the default VFS after close.
    #[test]
    fn buffered_wal_reads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (path, w, r) = wal_db(dir.path());
        for round in 0..6i64 {
            if round == 3 {
                let busy: i64 = w
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
                    .unwrap();
                assert_eq!(busy, 0);
            }
            w.execute_batch("BEGIN").unwrap();
            insert(&w, round, round * 400, 400).unwrap();
            // The first rows of this round change again: their pages were spilled to
            // the WAL earlier in this transaction.
            for i in 0..50 {
                let id = round * 400 + i;
                w.execute(
                    "UPDATE t SET b=?2 WHERE id=?1",
                    params![id, row(id, round + 100)],
                )
                .unwrap();
            }
            w.execute_batch("COMMIT").unwrap();
            let n: i64 = r
                .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, (round + 1) * 400);
            let first: Vec<u8> = r
                .query_row("SELECT b FROM t WHERE id=?1", [round * 400], |r| r.get(0))
                .unwrap();
            assert_eq!(first, row(round * 400, round + 100));
            let last: Vec<u8> = r
                .query_row("SELECT b FROM t WHERE id=?1", [round * 400 + 399], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(last, row(round * 400 + 399, round));
        }
        let c = closed_and_reopened(path, w, r);
        let mut s = c.prepare("SELECT id, round, b FROM t ORDER BY id").unwrap();
        let rows = s
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .unwrap();
        let mut n = 0;
        for x in rows {
            let (id, round, b) = x.unwrap();
            let want = if id % 400 < 50 { round + 100 } else { round };
            assert_eq!(b, row(id, want), "row {id}");
            n += 1;
        }
        assert_eq!(n, 2400);
    }

    /// A checkpointer that copies frames without syncing the database (here
    /// `synchronous=OFF`; the store's skips its database syncs on its thread, the same
    /// for the database): the database is synced before WAL content is discarded,
    /// when the WAL starts over, is truncated, or is deleted by the last connection to
    /// close, and every row is there after that.
    #[test]
    fn the_database_is_synced_before_wal_content_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let (path, w, r) = wal_db(dir.path());
        let cp = unsynced_checkpointer(&path);
        commit_round(&w, 0).unwrap();
        // The checkpointer copies every frame, and syncs nothing.
        let (busy, log, copied) = checkpoint(&cp, "PASSIVE");
        assert_eq!(busy, 0);
        assert!(log > 0 && copied == log, "{log} frames, {copied} copied");
        let synced = super::db_syncs(&path);
        // The next transaction starts the WAL over: the database is synced first.
        commit_round(&w, 1).unwrap();
        assert_eq!(super::db_syncs(&path), synced + 1);
        let (_, log_after, _) = checkpoint(&cp, "PASSIVE");
        assert!(
            log_after < log,
            "the WAL did not start over ({log_after} frames)"
        );
        // A truncation.
        let synced = super::db_syncs(&path);
        assert_eq!(checkpoint(&w, "TRUNCATE").0, 0);
        assert_eq!(super::db_syncs(&path), synced + 1);
        commit_round(&w, 2).unwrap();
        checkpoint(&cp, "PASSIVE");
        // The last connection to close (the checkpointer's) checkpoints without a
        // sync and deletes the WAL: the database is synced before the deletion.
        drop(r);
        drop(w);
        let synced = super::db_syncs(&path);
        drop(cp);
        assert!(!dir.path().join("t.db-wal").exists());
        assert_eq!(super::db_syncs(&path), synced + 1);
        assert_eq!(count(&reopened(&path)), 300);
    }

    /// A kept WAL (after a failed sync) is neither started over, nor truncated, nor
    /// deleted by the last connection's close, and every row is there after a reopen;
    /// once no longer kept, the WAL starts over again. Ignoring the mark fails this.
    #[test]
    fn a_kept_wal_is_never_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let (path, w, r) = wal_db(dir.path());
        let cp = unsynced_checkpointer(&path);
        commit_round(&w, 0).unwrap();
        let (_, log, copied) = checkpoint(&cp, "PASSIVE");
        assert!(log > 0 && copied == log, "{log} frames, {copied} copied");
        super::keep_wal(&path, true);
        assert!(commit_round(&w, 1).is_err(), "the kept WAL started over");
        let _ = w.execute_batch("ROLLBACK");
        assert!(
            w.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").is_err(),
            "the kept WAL was truncated"
        );
        drop(r);
        drop(cp);
        drop(w);
        let wal_file = dir.path().join("t.db-wal");
        let len = std::fs::metadata(&wal_file).map(|m| m.len()).unwrap_or(0);
        assert!(
            len > 32,
            "the kept WAL was discarded at close ({len} bytes)"
        );
        super::keep_wal(&path, false);
        let w = super::super::open(&path, false, 1, 0).unwrap();
        w.execute_batch("PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=0;")
            .unwrap();
        assert_eq!(count(&w), 100);
        commit_round(&w, 1).unwrap();
        assert_eq!(count(&w), 200);
        drop(w);
        assert_eq!(count(&reopened(&path)), 200);
    }

    /// A database sync that fails refuses what would discard WAL content: the commit
    /// that would start the WAL over fails and nothing of it is seen, and the WAL is
    /// kept from then on, even once syncs work again (after a failed fsync the next
    /// may report clean with the pages unwritten); once the store would open it again
    /// the next commit starts it over, and every row is there after a reopen.
    #[test]
    fn a_failed_database_sync_keeps_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let (path, w, r) = wal_db(dir.path());
        let cp = unsynced_checkpointer(&path);
        commit_round(&w, 0).unwrap();
        let backfill = || {
            let (busy, log, copied) = checkpoint(&cp, "PASSIVE");
            assert!(busy == 0 && copied == log, "{log} frames, {copied} copied");
            log
        };
        let log = backfill();
        let wal_file = dir.path().join("t.db-wal");
        let header = || std::fs::read(&wal_file).unwrap()[..32].to_vec();
        let before = header();
        super::fail_db_syncs_under(dir.path(), true);
        assert!(
            commit_round(&w, 1).is_err(),
            "the WAL started over unsynced"
        );
        super::fail_db_syncs_under(dir.path(), false);
        let _ = w.execute_batch("ROLLBACK");
        assert_eq!((count(&w), count(&r)), (100, 100));
        // The file still holds the old header, so the first round's frames, which
        // recovery would replay.
        assert_eq!(header(), before);
        assert!(super::wal_kept(&path));
        assert!(commit_round(&w, 1).is_err(), "a failed sync was retried");
        let _ = w.execute_batch("ROLLBACK");
        assert_eq!(header(), before);
        super::keep_wal(&path, false);
        commit_round(&w, 1).unwrap();
        assert_ne!(header(), before);
        assert_eq!((count(&w), count(&r)), (200, 200));
        assert!(backfill() < log, "the WAL did not start over");
        // A truncation and the last close's deletion are refused the same way: the
        // WAL file stays whole, and recovery finds every row in it.
        let wal_len = || std::fs::metadata(&wal_file).unwrap().len();
        let len = wal_len();
        super::fail_db_syncs_under(dir.path(), true);
        assert!(
            w.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r
                .get::<_, i64>(0))
                .is_err(),
            "the WAL was truncated unsynced"
        );
        assert_eq!(wal_len(), len);
        super::fail_db_syncs_under(dir.path(), false);
        drop(cp);
        drop(r);
        drop(w);
        assert!(wal_file.exists(), "the WAL was deleted unsynced");
        super::keep_wal(&path, false);
        assert_eq!(count(&reopened(&path)), 200);
    }

    /// A connection that checkpoints like the store's checkpointer: without syncing.
    fn unsynced_checkpointer(path: &std::path::Path) -> Connection {
        let cp = super::super::open(path, false, 1, 0).unwrap();
        cp.execute_batch("PRAGMA synchronous=OFF").unwrap();
        cp
    }

    /// Rows `round * 100 ..` (100 of them) in one transaction.
    fn commit_round(w: &Connection, round: i64) -> rusqlite::Result<()> {
        w.execute_batch("BEGIN")?;
        insert(w, round, round * 100, 100)?;
        w.execute_batch("COMMIT")
    }

    /// `PRAGMA wal_checkpoint(mode)`: (busy, frames in the WAL, frames copied).
    fn checkpoint(c: &Connection, mode: &str) -> (i64, i64, i64) {
        c.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap()
    }

    /// Closes both connections and opens the database with SQLite's default VFS;
    /// checks its integrity.
    fn closed_and_reopened(path: std::path::PathBuf, w: Connection, r: Connection) -> Connection {
        drop(r);
        drop(w);
        reopened(&path)
    }

    /// The database opened with SQLite's default VFS, its integrity checked.
    fn reopened(path: &std::path::Path) -> Connection {
        let c = Connection::open(path).unwrap();
        let ok: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        c
    }

    fn count(c: &Connection) -> i64 {
        c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    /// A WAL flush that fails (at the commit's sync, or mid-transaction once the
    /// buffer is full) fails the statement that caused it: the transaction is not
    /// committed, nothing of it is seen, and the next transactions commit and read back
    /// exactly, on this connection, another one, and after a reopen.
    #[test]
    fn a_failed_flush_fails_the_transaction_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (path, w, r) = wal_db(dir.path());
        let insert = |round: i64, n: i64| insert(&w, round, round * 1000, n);
        let fail = |on: bool| super::fail_flushes_under(dir.path(), on);
        w.execute_batch("BEGIN").unwrap();
        insert(0, 10).unwrap();
        w.execute_batch("COMMIT").unwrap();
        // Fails at the commit: 10 rows stay below the buffer's size.
        w.execute_batch("BEGIN").unwrap();
        insert(1, 10).unwrap();
        fail(true);
        assert!(w.execute_batch("COMMIT").is_err(), "the commit succeeded");
        fail(false);
        let _ = w.execute_batch("ROLLBACK");
        assert_eq!((count(&w), count(&r)), (10, 10));
        // Fails mid-transaction: 2 KiB rows pass the 1 MiB buffer well before 900.
        w.execute_batch("BEGIN").unwrap();
        fail(true);
        assert!(insert(2, 900).is_err(), "no write failed");
        fail(false);
        let _ = w.execute_batch("ROLLBACK");
        assert_eq!((count(&w), count(&r)), (10, 10));
        w.execute_batch("BEGIN").unwrap();
        insert(3, 700).unwrap();
        w.execute_batch("COMMIT").unwrap();
        assert_eq!((count(&w), count(&r)), (710, 710));
        let c = closed_and_reopened(path, w, r);
        let rounds: Vec<(i64, i64)> = c
            .prepare("SELECT round, COUNT(*) FROM t GROUP BY round ORDER BY round")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(|x| x.unwrap())
            .collect();
        assert_eq!(rounds, vec![(0, 10), (3, 700)]);
        let last: Vec<u8> = c
            .query_row("SELECT b FROM t WHERE id = 3699", [], |r| r.get(0))
            .unwrap();
        assert_eq!(last, row(3699, 3));
    }
}

//! SQLite's own page cache, with one key changed: the temporary page number a b-tree
//! rebalance parks a page under while it swaps two pages' numbers.
//!
//! Why: when a rebalance leaves its new sibling pages out of order, SQLite renumbers
//! them through a temporary number, the locking page (the page holding byte
//! 0x40000000 of the file: 1,048,577 with 1 KiB pages), never a real page. The page
//! cache remembers the largest number it has held, and every commit drops the cached
//! pages past the end of the database; when that largest number is more than a hash
//! table's length past the end, the cache walks its whole hash table to find them. So
//! in a database under 1 GiB, every transaction that split a page in a way needing the
//! swap paid a walk over all 32,768+ slots of the writer's 64 MiB cache: profiled at
//! one-to-one 5,000 msgs/s on a fresh database, `pcache1TruncateUnsafe` was 18.7 % of
//! the server's CPU samples (36 % of the writer thread's), and there was nothing to
//! drop. (Past 1 GiB the locking page lies inside the file and the walk stops.)
//!
//! Measured against the build before it (which also lacked the parking queues of
//! src/batchq.rs), fresh store restored before each run, two alternating pairs:
//! one-to-one at 5,000 msgs/s, server CPU 225 and 224 -> 185 and 187 µs per message,
//! p99 34.0 and 20.8 -> 19.7 and 10.6 ms (the queues alone, earlier the same day:
//! 212 and 215 µs, p99 37.6 and 16.8 ms); saturate-10k 10,965 and 11,655 -> 11,955
//! and 13,524 delivered/s.
//!
//! Here the locking page's number is stored under key 0, which SQLite never uses (page
//! numbers start at 1) and which no truncation reaches (they drop keys >= 1), so the
//! cache's largest key stays at the database's size. Nothing else changes: every call
//! goes to SQLite's default cache (pcache1). A page lives under the temporary key only
//! between two of the three renames of one swap (three calls with no other in
//! between), and SQLite never fetches the locking page for content (a fetch of it is a
//! corruption error, and stays one).
//!
//! It must be installed before SQLite initializes (`sqlite3_config` refuses after);
//! [`install`] runs before the store's first connection. If something in the process
//! initialized SQLite earlier, the default cache stays, and only the speed differs.

use rusqlite::ffi;
use std::ffi::{c_int, c_uint};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// SQLite's PENDING_BYTE: the locking page is the page holding this byte.
const PENDING_BYTE: u32 = 0x4000_0000;

/// Our cache: SQLite's, and the key this cache's locking page is stored under.
#[repr(C)]
struct Cache {
    /// [`MAGIC`]: tells our caches from SQLite's own (below).
    magic: u64,
    inner: *mut ffi::sqlite3_pcache,
    lock_key: c_uint,
}

/// Marks our caches. `sqlite3_config` is not thread-safe: if another thread of the
/// process initialized SQLite and opened a connection in the instant between our
/// check and our install, that connection's cache is SQLite's own, made before our
/// methods were in place, and our methods would then be handed it. Its first word is
/// a pointer (pcache1's group), never this non-canonical address, so such a cache is
/// passed to SQLite's methods untouched.
const MAGIC: u64 = 0xfeed_6d79_6368_6174;

struct Base(ffi::sqlite3_pcache_methods2);
// SAFETY: function pointers and SQLite's static argument, never freed or mutated.
unsafe impl Send for Base {}
unsafe impl Sync for Base {}

static BASE: OnceLock<Option<Base>> = OnceLock::new();

/// How many times a page was stored under key 0 instead of the locking page.
static REDIRECTED: AtomicU64 = AtomicU64::new(0);

/// Installs the cache (once per process). False when SQLite was already initialized
/// (the default cache stays) or refused.
pub fn install() -> bool {
    BASE.get_or_init(|| unsafe {
        let mut base: ffi::sqlite3_pcache_methods2 = std::mem::zeroed();
        if ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_GETPCACHE2,
            &mut base as *mut ffi::sqlite3_pcache_methods2,
        ) != ffi::SQLITE_OK
            || base.xCreate.is_none()
            || base.xCachesize.is_none()
            || base.xPagecount.is_none()
            || base.xFetch.is_none()
            || base.xUnpin.is_none()
            || base.xRekey.is_none()
            || base.xTruncate.is_none()
            || base.xDestroy.is_none()
            || base.xShrink.is_none()
        {
            return None;
        }
        let ours = ffi::sqlite3_pcache_methods2 {
            xCreate: Some(x_create),
            xCachesize: Some(x_cachesize),
            xPagecount: Some(x_pagecount),
            xFetch: Some(x_fetch),
            xUnpin: Some(x_unpin),
            xRekey: Some(x_rekey),
            xTruncate: Some(x_truncate),
            xDestroy: Some(x_destroy),
            xShrink: Some(x_shrink),
            ..base
        };
        // SQLite copies the struct, so a local is enough.
        if ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_PCACHE2,
            &ours as *const ffi::sqlite3_pcache_methods2,
        ) != ffi::SQLITE_OK
        {
            return None;
        }
        Some(Base(base))
    })
    .is_some()
}

/// Pages stored under key 0 instead of the locking page so far (for tests).
pub fn redirected() -> u64 {
    REDIRECTED.load(Ordering::Relaxed)
}

fn base() -> &'static ffi::sqlite3_pcache_methods2 {
    match BASE.get() {
        Some(Some(b)) => &b.0,
        // Our methods are installed only after BASE is set.
        _ => unreachable!("page cache called before it was installed"),
    }
}

/// SQLite's cache behind `p`, and the key its locking page is stored under.
unsafe fn cache(p: *mut ffi::sqlite3_pcache) -> Cache {
    let ours = p as *const Cache;
    if (*ours).magic == MAGIC {
        Cache {
            magic: MAGIC,
            inner: (*ours).inner,
            lock_key: (*ours).lock_key,
        }
    } else {
        Cache {
            magic: 0,
            inner: p,
            lock_key: 0, // key 0 is never asked for: no redirect
        }
    }
}

fn key(c: &Cache, k: c_uint) -> c_uint {
    if k == c.lock_key && k != 0 {
        REDIRECTED.fetch_add(1, Ordering::Relaxed);
        0
    } else {
        k
    }
}

unsafe extern "C" fn x_create(
    sz_page: c_int,
    sz_extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let inner = (base().xCreate.unwrap())(sz_page, sz_extra, purgeable);
    if inner.is_null() {
        return inner;
    }
    let lock_key = if sz_page > 0 {
        PENDING_BYTE / sz_page as u32 + 1
    } else {
        c_uint::MAX
    };
    Box::into_raw(Box::new(Cache {
        magic: MAGIC,
        inner,
        lock_key,
    })) as *mut ffi::sqlite3_pcache
}

unsafe extern "C" fn x_cachesize(p: *mut ffi::sqlite3_pcache, n: c_int) {
    (base().xCachesize.unwrap())(cache(p).inner, n)
}

unsafe extern "C" fn x_pagecount(p: *mut ffi::sqlite3_pcache) -> c_int {
    (base().xPagecount.unwrap())(cache(p).inner)
}

unsafe extern "C" fn x_fetch(
    p: *mut ffi::sqlite3_pcache,
    k: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    let c = cache(p);
    (base().xFetch.unwrap())(c.inner, key(&c, k), create)
}

unsafe extern "C" fn x_unpin(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    (base().xUnpin.unwrap())(cache(p).inner, page, discard)
}

unsafe extern "C" fn x_rekey(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    let c = cache(p);
    (base().xRekey.unwrap())(c.inner, page, key(&c, old), key(&c, new))
}

unsafe extern "C" fn x_truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    (base().xTruncate.unwrap())(cache(p).inner, limit)
}

unsafe extern "C" fn x_destroy(p: *mut ffi::sqlite3_pcache) {
    let c = cache(p);
    (base().xDestroy.unwrap())(c.inner);
    if c.magic == MAGIC {
        drop(Box::from_raw(p as *mut Cache));
    }
}

unsafe extern "C" fn x_shrink(p: *mut ffi::sqlite3_pcache) {
    (base().xShrink.unwrap())(cache(p).inner)
}

/// For tests: a cache made by SQLite's own `xCreate` (as in the install race above),
/// handed to our methods, behaves as SQLite's: a page fetched, counted, truncated,
/// and the cache destroyed without being taken for ours. False if the cache is not
/// installed or a step misbehaves.
#[doc(hidden)]
pub fn foreign_cache_passes_through() -> bool {
    let Some(Some(b)) = BASE.get() else {
        return false;
    };
    unsafe {
        let p = (b.0.xCreate.unwrap())(1024, 64, 1);
        if p.is_null() {
            return false;
        }
        x_cachesize(p, 100);
        let page = x_fetch(p, 5, 2);
        let fetched = !page.is_null();
        let counted = x_pagecount(p) == 1;
        if fetched {
            x_unpin(p, page, 0);
        }
        x_truncate(p, 1);
        let dropped = x_pagecount(p) == 0;
        x_destroy(p);
        fetched && counted && dropped
    }
}

//! The store's page cache (src/store/sqlite/pcache.rs) parks pages that a b-tree
//! rebalance renumbers under key 0 instead of the locking page; this checks it does
//! so, and that a database written through it holds exactly what was written. Its
//! own test binary: the cache must be installed before anything initializes SQLite.

use mychat::store::sqlite::pcache;
use rusqlite::{params, Connection};
use std::collections::BTreeMap;

fn rows(c: &Connection) -> BTreeMap<i64, Vec<u8>> {
    let mut s = c.prepare("SELECT k, v FROM t ORDER BY k").unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn check(c: &Connection, model: &BTreeMap<i64, Vec<u8>>) {
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    assert_eq!(&rows(c), model);
    // The index agrees with the table.
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM t INDEXED BY t_v", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n as usize, model.len());
}

#[test]
fn rebalanced_pages_are_parked_off_the_locking_page_and_nothing_is_lost() {
    assert!(
        pcache::install(),
        "the cache installs: nothing in this process touched SQLite before"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let mut model = BTreeMap::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    {
        let mut c = Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA page_size=1024; PRAGMA journal_mode=WAL; PRAGMA cache_size=-8192;
             CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB NOT NULL);
             CREATE INDEX t_v ON t(v);",
        )
        .unwrap();
        // Random keys and values in many small transactions: pages split everywhere,
        // and new siblings often come out of order, which is what the swap is for.
        for round in 0..200 {
            let tx = c.transaction().unwrap();
            for _ in 0..100 {
                let k = (next() % 1_000_000) as i64;
                let len = 20 + (next() % 200) as usize;
                let v: Vec<u8> = (0..len).map(|i| (next() as u8) ^ (i as u8)).collect();
                tx.execute(
                    "INSERT OR REPLACE INTO t(k, v) VALUES(?1, ?2)",
                    params![k, v],
                )
                .unwrap();
                model.insert(k, v);
            }
            if round % 10 == 9 {
                // Deletes merge pages back.
                let cut = (next() % 1_000_000) as i64;
                tx.execute(
                    "DELETE FROM t WHERE k BETWEEN ?1 AND ?1 + 20000",
                    params![cut],
                )
                .unwrap();
                model.retain(|k, _| !(cut..=cut + 20000).contains(k));
            }
            tx.commit().unwrap();
        }
        check(&c, &model);
    }
    assert!(
        pcache::redirected() > 0,
        "the workload renumbered pages through the locking page"
    );
    // Read back by a new connection, from the file.
    let c = Connection::open(&path).unwrap();
    check(&c, &model);
    // A cache SQLite made itself (had another thread opened a connection while the
    // cache was being installed) goes through our methods untouched.
    assert!(pcache::foreign_cache_passes_through());
}

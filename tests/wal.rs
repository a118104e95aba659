//! The store folds its WAL back into the database at a clean stop, even when the
//! stop lands while the background checkpointer is copying: the checkpointer is
//! stopped first, so the writer's last checkpoint is never refused for a pass of its
//! (a refused one left the whole WAL for the next start to read).

use mychat::store::{sqlite::SqliteStore, Store};

#[path = "support/direct_sends.rs"]
mod direct_sends;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_under_writes_leaves_no_wal() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            SqliteStore::open(dir.path(), &mychat_config::StoreConfig::default()).unwrap();
        let mut users = Vec::new();
        for i in 0..100 {
            users.push(
                store
                    .create_user(format!("u{i}"), "x".into(), 0)
                    .await
                    .unwrap()
                    .id,
            );
        }
        // Writes without a pause, so that the checkpointer is busy when the stop comes.
        let text = "x".repeat(120);
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_millis(1500) {
            direct_sends::send_round(store.as_ref(), &users, n, 128, &text).await;
            n += 128;
        }
        store.shutdown().await.unwrap();
        let wal = dir.path().join("mychat.db-wal");
        let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        assert_eq!(
            len, 0,
            "round {round}: {n} messages, the WAL was left at {len} bytes"
        );
    }
}

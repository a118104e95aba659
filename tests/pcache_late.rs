//! When something in the process initialized SQLite before the store opened, the
//! store's page cache cannot be installed: the store keeps SQLite's default cache and
//! works as before. Its own test binary, so that SQLite is initialized here first.

use mychat::ids::UserId;
use mychat::store::{sqlite::pcache, sqlite::SqliteStore, Store};

#[tokio::test]
async fn a_store_opened_after_sqlite_initialized_keeps_the_default_cache() {
    let dir = tempfile::tempdir().unwrap();
    // Initializes SQLite.
    let c = rusqlite::Connection::open(dir.path().join("other.db")).unwrap();
    c.execute_batch("CREATE TABLE t(x)").unwrap();
    let store = SqliteStore::open(dir.path(), &mychat_config::StoreConfig::default()).unwrap();
    assert!(!pcache::install(), "too late to install");
    assert!(!pcache::foreign_cache_passes_through(), "not installed");
    let u = store
        .create_user("late".into(), "x".into(), 0)
        .await
        .unwrap();
    assert_eq!(store.users_by_ids(vec![u.id]).await.unwrap()[0].id, u.id);
    assert_ne!(u.id, UserId(0));
    store.shutdown().await.unwrap();
}

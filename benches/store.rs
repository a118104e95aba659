//! Question answered: how many 1:1 messages per second does the embedded store persist
//! durably (fsync per commit), and how much does group commit buy? K sends are in
//! flight at once (K = 1: every message pays its own fsync; K = 64 / 512: the writer
//! commits them in shared batches). Each message is ~120 bytes between random pairs of
//! 1,000 users, as the chat load would write it.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mychat::ids::UserId;
use mychat::store::{sqlite::SqliteStore, Store};

#[path = "../tests/support/direct_sends.rs"]
mod direct_sends;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        SqliteStore::open(dir.path(), &mychat_config::StoreConfig::default()).unwrap();
    let users: Vec<UserId> = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..1000 {
            v.push(
                store
                    .create_user(format!("user{i}"), "x".into(), 0)
                    .await
                    .unwrap()
                    .id,
            );
        }
        v
    });
    let counter = Arc::new(AtomicU64::new(0));
    let text = "x".repeat(120);
    let mut g = c.benchmark_group("store_send_direct");
    g.sample_size(20);
    for k in [1usize, 64, 512] {
        g.throughput(Throughput::Elements(k as u64));
        g.bench_function(format!("in_flight_{k}"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let first = counter.fetch_add(k as u64, Ordering::Relaxed);
                    direct_sends::send_round(store.as_ref(), &users, first, k as u64, &text).await
                })
            })
        });
    }
    g.finish();
    rt.block_on(store.shutdown()).unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! The embedded store alone under the one-to-one write set, for the writer's CPU per
//! message without the network, the shards or the loadtest beside it.
//!
//! 10,000 users, each writing to 20 fixed contacts (as `one-to-one-10k.toml`), 120-byte
//! texts, 1,024 sends in flight (or IN_FLIGHT), the store's defaults (fsync per batch). Prints msgs/s
//! and the process's CPU per message every 100,000 messages and for the whole run.
//!
//! ```sh
//! cargo run --release --example store_write_set -- [MESSAGES] [DIR] [IN_FLIGHT]
//! ```
//! (defaults 300,000, /tmp/mychat-write-set and 1,024; DIR is deleted first). A small
//! IN_FLIGHT gives the small batches of an open loop at a modest rate, where each
//! batch's fixed costs (commit, sync hand-off, merge steps) weigh on every message.
use mychat::ids::UserId;
use mychat::store::{sqlite::SqliteStore, SendInput, Store};
use std::sync::Arc;

/// User + system CPU seconds of this process so far.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let total: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("MESSAGES: a number"))
        .unwrap_or(300_000);
    let dir = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "/tmp/mychat-write-set".into());
    let _ = std::fs::remove_dir_all(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let store: Arc<dyn Store> = SqliteStore::open(
        std::path::Path::new(&dir),
        &mychat_config::StoreConfig::default(),
    )
    .expect("store opens");
    const USERS: u64 = 10_000;
    let users: Vec<UserId> = rt.block_on(async {
        let futs: Vec<_> = (0..USERS)
            .map(|i| store.create_user(format!("u{i}"), "x".into(), 0))
            .collect();
        let mut ids = Vec::new();
        for f in futs {
            ids.push(f.await.expect("user").id);
        }
        ids
    });
    let text = "x".repeat(120);
    let in_flight: u64 = std::env::args()
        .nth(3)
        .map(|a| a.parse().expect("IN_FLIGHT: a number"))
        .unwrap_or(1024);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let (start, cpu0) = (std::time::Instant::now(), cpu_secs());
    let (mut mark, mut mark_cpu, mut mark_n) = (start, cpu0, 0);
    let mut sent = 0;
    while sent < total {
        rt.block_on(async {
            let futs: Vec<_> = (sent..sent + in_flight)
                .map(|n| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let a = rng % USERS;
                    let contact = (rng >> 20) % 20 + 1;
                    let b = (a + contact * 397) % USERS;
                    store.send_direct(SendInput {
                        sender: users[a as usize],
                        recipient: users[b as usize],
                        client_msg_id: format!("c{n}"),
                        kind: 1,
                        text: text.clone(),
                        payload: bytes::Bytes::new(),
                        now_ms: n as i64,
                        require_friend: false,
                        origin: None,
                    })
                })
                .collect();
            for f in futs {
                f.await.expect("stored");
            }
        });
        sent += in_flight;
        if sent - mark_n >= 100_000 {
            let n = (sent - mark_n) as f64;
            eprintln!(
                "  at {sent}: {:.0} msgs/s, {:.1} us cpu/msg",
                n / mark.elapsed().as_secs_f64(),
                (cpu_secs() - mark_cpu) * 1e6 / n
            );
            (mark, mark_cpu, mark_n) = (std::time::Instant::now(), cpu_secs(), sent);
        }
    }
    println!(
        "total {sent}: {:.0} msgs/s, {:.1} us cpu/msg",
        sent as f64 / start.elapsed().as_secs_f64(),
        (cpu_secs() - cpu0) * 1e6 / sent as f64
    );
    rt.block_on(store.shutdown()).expect("shutdown");
}

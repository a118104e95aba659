//! Question answered: how fast is the session directory read on every delivery, from
//! several shard threads at once? 100,000 users with a session each; each iteration
//! looks 1,000 users up, from 1 and from 4 threads at the same time (the directory is
//! 64 striped RwLocks, so readers should not slow each other).
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mychat::directory::{Directory, SessionRef};
use mychat::ids::{ConnId, ShardId, UserId};
use mychat_proto::Platform;
use std::sync::Arc;
use std::time::{Duration, Instant};

const USERS: u64 = 100_000;
const PER_ITER: u64 = 1_000;

fn bench(c: &mut Criterion) {
    let dir = Arc::new(Directory::new(mychat_config::MultiDevice::PerPlatform, 8));
    for u in 0..USERS {
        let s = SessionRef {
            shard: ShardId((u % 4) as usize),
            conn: ConnId(u),
            platform: Platform::Desktop,
            device_id: "d".into(),
            away: false,
        };
        dir.register(UserId(u), s);
    }
    let mut g = c.benchmark_group("directory_lookup");
    for threads in [1usize, 4] {
        g.throughput(Throughput::Elements(PER_ITER * threads as u64));
        g.bench_function(format!("{threads}_threads_x_1000_users"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                let hs: Vec<_> = (0..threads)
                    .map(|t| {
                        let dir = dir.clone();
                        std::thread::spawn(move || {
                            let mut found = 0usize;
                            for i in 0..iters {
                                for k in 0..PER_ITER {
                                    let u = (i * 7919 + k * 104_729 + t as u64 * 13) % USERS;
                                    found += dir.with_sessions(UserId(u), |s| s.len());
                                }
                            }
                            std::hint::black_box(found)
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().unwrap();
                }
                let d: Duration = start.elapsed();
                d
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

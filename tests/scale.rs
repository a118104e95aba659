//! 1,000 concurrent clients against one server: each logs in, sends one message to the
//! next user and gets exactly the one from the previous user. Prints the wall time.
mod common;
use common::*;
use mychat_client::Push;
use std::sync::Arc;
use std::time::{Duration, Instant};

const N: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thousand_concurrent_clients() {
    let s = TestServer::start().await;
    let addr = Arc::new(s.addr.clone());
    let t0 = Instant::now();
    let ids = Arc::new(register_many(&addr, "user", N).await);
    // 1,000 clients connected and logged in at once.
    let clients = login_many(&addr, "user", N).await;
    let t_login = t0.elapsed();
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let (ids, barrier) = (ids.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let mut pushes = c.take_pushes().unwrap();
            barrier.wait().await;
            let to = ids[(i + 1) % N];
            let ack = c.send_text(to, &format!("from {i}")).await.unwrap();
            assert_eq!(ack.seq, 1);
            let p = loop {
                match tokio::time::timeout(Duration::from_secs(30), pushes.recv())
                    .await
                    .unwrap()
                    .unwrap()
                {
                    Push::Message(m) => break m,
                    _ => continue,
                }
            };
            let m = p.message.unwrap();
            assert_eq!(m.sender_id, ids[(i + N - 1) % N]);
            assert_eq!(m.text, format!("from {}", (i + N - 1) % N));
            // Exactly one.
            if let Ok(Some(Push::Message(extra))) =
                tokio::time::timeout(Duration::from_millis(200), pushes.recv()).await
            {
                panic!("client {i} got a second message {extra:?}");
            }
            c
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    let total = t0.elapsed();
    println!(
        "1000 clients: registered+logged in {:.2?}, all delivered at {:.2?}",
        t_login, total
    );
    assert_eq!(s.handle.as_ref().unwrap().shared().dir.session_count(), N);
}

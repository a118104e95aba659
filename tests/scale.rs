//! 1,000 concurrent clients against one server: each logs in, sends one message to the
//! next user and gets exactly the one from the previous user. Prints the wall time.
mod common;
use common::*;
use mychat_client::{Client, Push};
use std::sync::Arc;
use std::time::{Duration, Instant};

const N: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thousand_concurrent_clients() {
    let s = TestServer::start().await;
    let addr = Arc::new(s.addr.clone());
    let t0 = Instant::now();
    // Register everyone (concurrently, 50 connections).
    let mut regs = Vec::new();
    for chunk in 0..50 {
        let addr = addr.clone();
        regs.push(tokio::spawn(async move {
            let c = Client::connect(&addr).await.unwrap();
            let mut ids = Vec::new();
            for i in (chunk..N).step_by(50) {
                ids.push((
                    i,
                    c.register(&format!("user{i}"), &format!("password-user{i}"))
                        .await
                        .unwrap(),
                ));
            }
            ids
        }));
    }
    let mut ids = vec![0u64; N];
    for r in regs {
        for (i, id) in r.await.unwrap() {
            ids[i] = id;
        }
    }
    let ids = Arc::new(ids);
    // 1,000 clients connected and logged in at once.
    let mut logins = Vec::new();
    for i in 0..N {
        let addr = addr.clone();
        logins.push(tokio::spawn(async move {
            let c = Client::connect(&addr).await.unwrap();
            c.login_password(
                &format!("user{i}"),
                &format!("password-user{i}"),
                "d",
                mychat_client::proto::Platform::Desktop,
            )
            .await
            .unwrap();
            c
        }));
    }
    let mut clients = Vec::new();
    for l in logins {
        clients.push(l.await.unwrap());
    }
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

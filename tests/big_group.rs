//! A 2,000-member group with every member online in this process: each message
//! reaches every member exactly once, in seq order. Prints how long one message took
//! to reach all 2,000 (send → last member's receipt), per message and the median.
mod common;
use common::*;
use mychat_client::proto as pb;
use mychat_client::Push;
use std::sync::Arc;
use std::time::{Duration, Instant};

const N: usize = 2000;
const MESSAGES: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_members_get_every_message_once_in_order() {
    // 2,000 registrations from one address pass the default per-address rate.
    // 2,000 clients from one address: past the default per-address connection cap.
    let s = TestServer::start_with(|c| {
        c.auth.registrations_per_addr_per_min = 10_000;
        c.server.max_connections_per_addr = 4096;
    })
    .await;
    let addr = Arc::new(s.addr.clone());
    // Register and log in 2,000 users.
    let ids = register_many(&addr, "member", N).await;
    let clients = login_many(&addr, "member", N).await;
    // Every member (the owner too) collects group messages: (seq, when).
    let mut collectors = Vec::new();
    for c in &clients {
        let mut rx = c.take_pushes().unwrap();
        collectors.push(tokio::spawn(async move {
            let mut got: Vec<(u64, Instant)> = Vec::new();
            while got.len() < (MESSAGES + 1) as usize {
                match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                    Ok(Some(Push::Message(m))) => {
                        let m = m.message.unwrap();
                        got.push((m.seq, Instant::now()));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            // Nothing more may come.
            if let Ok(Some(Push::Message(extra))) =
                tokio::time::timeout(Duration::from_millis(300), rx.recv()).await
            {
                panic!("a duplicate or extra message: {extra:?}");
            }
            got
        }));
    }
    let owner = &clients[0];
    let g = owner
        .group_create("two thousand", ids[1..].to_vec(), pb::JoinPolicy::Approval)
        .await
        .unwrap();
    assert_eq!(g.member_count as usize, N);
    // A second device of the owner sends, so the owner's first connection receives too.
    let (sender, _) = s
        .login("member0", "sender-device", pb::Platform::Mobile)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sent_at = Vec::new();
    for k in 0..MESSAGES {
        let t = Instant::now();
        let ack = sender
            .send_group_text(g.id, &format!("broadcast {k}"))
            .await
            .unwrap();
        assert_eq!(ack.seq, k + 2);
        sent_at.push((ack.seq, t));
        // Let each message land before the next, so each is timed alone.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut last_arrival = vec![sent_at[0].1; MESSAGES as usize];
    for (i, c) in collectors.into_iter().enumerate() {
        let got = c.await.unwrap();
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=MESSAGES + 1).collect::<Vec<_>>(),
            "member {i} got {seqs:?}"
        );
        for (seq, at) in got.into_iter().skip(1) {
            let k = (seq - 2) as usize;
            if at > last_arrival[k] {
                last_arrival[k] = at;
            }
        }
    }
    let mut ms: Vec<f64> = sent_at
        .iter()
        .zip(&last_arrival)
        .map(|((_, sent), last)| last.duration_since(*sent).as_secs_f64() * 1000.0)
        .collect();
    println!("2000-member fan-out, send -> last member received, ms per message: {ms:.1?}");
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("median {:.1} ms", ms[ms.len() / 2]);
}

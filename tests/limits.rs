//! Limits: connections per source address, the per-connection request bucket, the
//! per-user send bucket, a slowloris after login, the shard-wide outbound budget
//! against many stalled readers, and the metrics that count each of them.

mod common;

use common::*;
use mychat_client::proto as pb;
use mychat_proto::{Command, ErrorCode};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn login_body(user: &str, device: &str) -> bytes::Bytes {
    body(&pb::LoginRequest {
        credential: Some(pb::login_request::Credential::Password(
            pb::PasswordCredential {
                username: user.into(),
                password: format!("password-{user}"),
            },
        )),
        device_id: device.into(),
        platform: pb::Platform::Desktop as i32,
    })
}

fn metrics(s: &TestServer) -> &mychat::metrics::Metrics {
    &s.handle.as_ref().unwrap().shared().metrics
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    let s = TestServer::start_with(|c| c.server.max_connections_per_addr = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let c = s.client().await;
        c.heartbeat().await.unwrap();
        held.push(c);
    }
    let mut r = Raw::connect(&s.addr).await;
    let f = r.frame().await.expect("an error frame");
    assert_eq!((f.header.command, f.header.seq), (0, 0));
    let e = error_of(&f);
    assert_eq!(e.code, ErrorCode::Unavailable as u32);
    assert!(e.message.contains("this address"), "{}", e.message);
    r.expect_closed().await;
    assert_eq!(
        metrics(&s)
            .connections_refused_addr_total
            .load(Ordering::Relaxed),
        1
    );
    // Another source address is not affected by 127.0.0.1's count.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut o = Raw::from_stream(other.connect(s.addr.parse().unwrap()).await.unwrap());
    o.request(Command::Heartbeat.id(), 7, &[]).await;
    let f = o.frame().await.unwrap();
    assert!(!f.header.is_error());
    // A slot frees when a client leaves.
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.client().await.heartbeat().await.unwrap();
}

#[tokio::test]
async fn requests_past_the_connection_bucket_are_rate_limited() {
    let s = TestServer::start_with(|c| {
        c.server.requests_per_sec = 2;
        c.server.request_burst = 5;
    })
    .await;
    let mut r = Raw::connect(&s.addr).await;
    // Ten pipelined at once: the burst of five is served, the rest refused.
    let mut all = Vec::new();
    for seq in 1..=10u32 {
        all.extend_from_slice(&mychat_codec::frame_bytes(
            mychat_codec::Header::request(Command::Heartbeat.id(), seq),
            &[],
        ));
    }
    r.send_bytes(&all).await;
    let mut ok = Vec::new();
    let mut limited = Vec::new();
    for _ in 0..10 {
        let f = r.frame().await.expect("an answer");
        assert_eq!(f.header.command, Command::Heartbeat.id());
        if f.header.is_error() {
            assert_eq!(error_of(&f).code, ErrorCode::RateLimited as u32);
            limited.push(f.header.seq);
        } else {
            ok.push(f.header.seq);
        }
    }
    ok.sort();
    limited.sort();
    assert_eq!(ok, vec![1, 2, 3, 4, 5]);
    assert_eq!(limited, vec![6, 7, 8, 9, 10]);
    assert_eq!(
        metrics(&s)
            .requests_rate_limited_total
            .load(Ordering::Relaxed),
        5
    );
    // The connection stays open, and the bucket refills at its rate.
    tokio::time::sleep(Duration::from_millis(600)).await;
    r.request(Command::Heartbeat.id(), 11, &[]).await;
    let f = r.frame().await.unwrap();
    assert!(!f.header.is_error(), "refilled after 600 ms at 2/s");
    assert_eq!(f.header.seq, 11);
}

#[tokio::test]
async fn sends_past_the_user_bucket_are_rate_limited_across_devices() {
    let s = TestServer::start_with(|c| {
        c.messages.sends_per_sec = 1;
        c.messages.send_burst = 3;
        c.auth.multi_device = mychat_config::MultiDevice::Multi;
    })
    .await;
    s.register("alice").await;
    let bob = s.register("bob").await;
    let (a1, _) = s.login("alice", "one", pb::Platform::Desktop).await;
    let (a2, _) = s.login("alice", "two", pb::Platform::Mobile).await;
    a1.send_text(bob, "1").await.unwrap();
    a2.send_text(bob, "2").await.unwrap();
    a1.send_text(bob, "3").await.unwrap();
    // The bucket is the user's, not the device's.
    let e = a2.send_text(bob, "4").await.unwrap_err();
    assert_eq!(code(e), ErrorCode::RateLimited);
    let e = a1.send_text(bob, "5").await.unwrap_err();
    assert_eq!(code(e), ErrorCode::RateLimited);
    assert_eq!(
        metrics(&s).sends_rate_limited_total.load(Ordering::Relaxed),
        2
    );
    // Refused sends were not stored: bob's history holds exactly the three.
    let (b, _) = s.login("bob", "b", pb::Platform::Desktop).await;
    let h = b
        .history(pb::HistoryRequest {
            peer_user_id: a1.user_id("alice").await.unwrap(),
            limit: 50,
            ..Default::default()
        })
        .await
        .unwrap();
    let texts: Vec<&str> = h.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, vec!["1", "2", "3"]);
    // Other users are not affected.
    b.send_text(a1.user_id("alice").await.unwrap(), "hi")
        .await
        .unwrap();
}

#[tokio::test]
async fn slowloris_after_login_is_dropped_at_idle_timeout() {
    let s = TestServer::start_with(|c| {
        c.server.idle_timeout_ms = 1000;
        c.server.heartbeat_interval_ms = 500;
    })
    .await;
    s.register("slow").await;
    let mut r = Raw::connect(&s.addr).await;
    r.request(Command::Login.id(), 1, &login_body("slow", "d"))
        .await;
    assert!(!r.frame().await.unwrap().header.is_error());
    // A frame header promising a body, then one byte every 300 ms: never a frame.
    let started = std::time::Instant::now();
    let head = mychat_codec::frame_bytes(
        mychat_codec::Header::request(Command::Heartbeat.id(), 2),
        &[0u8; 100],
    );
    for b in &head[..12] {
        if r.s.try_write(&[*b]).is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if started.elapsed() > Duration::from_millis(2500) {
            break;
        }
    }
    let f = r.frame().await.expect("a kick push");
    assert_eq!(f.header.command, Command::Kick.id());
    use prost::Message as _;
    let k = pb::KickPush::decode(f.body).unwrap();
    assert_eq!(k.reason, pb::KickReason::IdleTimeout as i32);
    r.expect_closed().await;
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(
        metrics(&s).kicks_idle_timeout_total.load(Ordering::Relaxed),
        1
    );
}

/// Many receivers stop reading while a sender floods them: each is closed as a slow
/// consumer long before its own 4 MiB bound, because the shards' shared budget (1 MiB
/// here) is passed; the queued bytes return to zero; each re-syncs everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_are_cut_at_the_shared_budget() {
    const STALLED: usize = 8;
    let s = TestServer::start_with(|c| {
        c.server.outbound_total_bytes = 1 << 20;
        c.server.outbound_buffer_bytes = 4 << 20;
        c.messages.max_text_len = 8192;
        unlimited(c);
    })
    .await;
    s.register("sender").await;
    let mut ids = Vec::new();
    for i in 0..STALLED {
        ids.push(s.register(&format!("rcv{i}")).await);
    }
    // Each receiver logs in over a raw socket with a small receive buffer, then never
    // reads again.
    let mut raws = Vec::new();
    for i in 0..STALLED {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut r = Raw::from_stream(sock.connect(s.addr.parse().unwrap()).await.unwrap());
        r.request(Command::Login.id(), 1, &login_body(&format!("rcv{i}"), "d"))
            .await;
        assert!(!r.frame().await.unwrap().header.is_error());
        raws.push(r);
    }
    let (a, _) = s.login("sender", "a", pb::Platform::Desktop).await;
    let a = std::sync::Arc::new(a);
    let text = "y".repeat(8000);
    let mut sent = [0u64; STALLED];
    let shared = s.handle.as_ref().unwrap().shared().clone();
    let mut max_queued = 0usize;
    // Until all are cut (each round sends one message to each receiver).
    for _round in 0..2000 {
        let mut batch = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let (a, text, id) = (a.clone(), text.clone(), *id);
            batch.push(tokio::spawn(async move {
                (i, a.send_text(id, &text).await.unwrap().seq)
            }));
        }
        for t in batch {
            let (i, seq) = t.await.unwrap();
            sent[i] = sent[i].max(seq);
        }
        let queued: usize = shared
            .shards
            .iter()
            .map(|s| s.out_bytes.load(Ordering::Relaxed))
            .sum();
        max_queued = max_queued.max(queued);
        if shared
            .metrics
            .kicks_slow_consumer_total
            .load(Ordering::Relaxed)
            == STALLED as u64
        {
            break;
        }
    }
    assert_eq!(
        shared
            .metrics
            .kicks_slow_consumer_total
            .load(Ordering::Relaxed),
        STALLED as u64,
        "every stalled reader was cut"
    );
    // Bounded by the budget plus one fair share (and one frame) per connection.
    let bound = (1 << 20) + STALLED * (64 * 1024 + 8100) + 64 * 1024;
    assert!(max_queued <= bound, "queued {max_queued} > {bound}");
    // Their sockets are closed server-side and their queues released.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let queued: usize = shared
        .shards
        .iter()
        .map(|s| s.out_bytes.load(Ordering::Relaxed))
        .sum();
    assert!(queued < 64 * 1024, "still queued: {queued}");
    drop(raws);
    // Each re-syncs everything it was sent, in order.
    for (i, n) in sent.iter().enumerate() {
        let (c, _) = s
            .login(&format!("rcv{i}"), "d", pb::Platform::Desktop)
            .await;
        let seqs = synced_message_seqs(&c).await;
        assert_eq!(seqs, (1..=*n).collect::<Vec<u64>>(), "receiver {i}");
    }
}

#[tokio::test]
async fn metrics_endpoint_serves_the_counters() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = TestServer::start_with(|c| {
        c.server.metrics_listen = format!("127.0.0.1:{port}");
        c.server.requests_per_sec = 1;
        c.server.request_burst = 1;
    })
    .await;
    let c = s.client().await;
    c.heartbeat().await.unwrap();
    assert_eq!(
        code(c.heartbeat().await.unwrap_err()),
        ErrorCode::RateLimited
    );
    let text = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut h = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        h.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        h.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.contains("\nmychat_requests_rate_limited_total 1\n"),
        "{text}"
    );
    assert!(text.contains("\nmychat_connections_open 1\n"), "{text}");
    assert!(
        text.contains("# TYPE mychat_kicks_slow_consumer_total counter"),
        "{text}"
    );
    // Any other path: 404, and the endpoint keeps serving.
    let other = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut h = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        h.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        h.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
}

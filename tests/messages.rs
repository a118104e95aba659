//! 1:1 messages: ack, push to every device, idempotent resend, ordering and gap-free
//! seqs under concurrent senders, receipts, sync (snapshot, cursor, paging), history,
//! the conversation list, and their refusals.
mod common;
use bytes::Bytes;
use common::*;
use mychat_client::proto as pb;
use mychat_client::{new_client_msg_id, Push};
use pb::{ErrorCode, Platform};
use std::collections::HashSet;

fn text(to: u64, id: &str, t: &str) -> pb::SendMessageRequest {
    pb::SendMessageRequest {
        group_id: 0,
        to_user_id: to,
        client_msg_id: id.into(),
        kind: pb::MessageKind::Text as i32,
        text: t.into(),
        payload: Bytes::new(),
    }
}

#[tokio::test]
async fn send_acks_and_pushes_to_every_device() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let (a1, _) = s.login("alice", "a-desktop", Platform::Desktop).await;
    let (a2, _) = s.login("alice", "a-mobile", Platform::Mobile).await;
    let (b1, _) = s.login("bob", "b-desktop", Platform::Desktop).await;
    let (b2, _) = s.login("bob", "b-mobile", Platform::Mobile).await;
    let (mut pa1, mut pa2, mut pb1, mut pb2) = (
        a1.take_pushes().unwrap(),
        a2.take_pushes().unwrap(),
        b1.take_pushes().unwrap(),
        b2.take_pushes().unwrap(),
    );
    let ack = a1.send_text(bob, "hello bob").await.unwrap();
    assert_eq!(ack.seq, 1);
    assert!(!ack.duplicate);
    assert!(ack.message_id > 0 && ack.conversation_id > 0 && ack.time_ms > 0);
    assert_eq!(ack.pts, 1);
    for rx in [&mut pb1, &mut pb2] {
        let p = next_message(rx).await;
        let m = p.message.unwrap();
        assert_eq!(
            (m.id, m.seq, m.sender_id, m.recipient_id, m.text.as_str()),
            (ack.message_id, 1, alice, bob, "hello bob")
        );
        assert_eq!(p.pts, 1);
    }
    // The sender's other device gets it too; the sending device does not.
    let p = next_message(&mut pa2).await;
    assert_eq!(p.message.unwrap().id, ack.message_id);
    no_push(&mut pa1, 200).await;
}

#[tokio::test]
async fn resend_with_same_client_id_is_idempotent() {
    let s = TestServer::start().await;
    s.register("alice").await;
    let bob = s.register("bob").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    let mut pb_ = b.take_pushes().unwrap();
    let first = a.send(text(bob, "cid-1", "once")).await.unwrap();
    let again = a.send(text(bob, "cid-1", "once")).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (
            again.message_id,
            again.seq,
            again.conversation_id,
            again.time_ms
        ),
        (
            first.message_id,
            first.seq,
            first.conversation_id,
            first.time_ms
        )
    );
    next_message(&mut pb_).await;
    no_push(&mut pb_, 200).await; // not pushed twice
    let h = a
        .history(pb::HistoryRequest {
            peer_user_id: bob,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(h.messages.len(), 1);
    let next = a.send(text(bob, "cid-2", "twice")).await.unwrap();
    assert_eq!(next.seq, 2);
}

/// A retry gets its stored message even when the recipient has blocked the sender
/// since, and when the id is reused for another peer (nothing reaches that peer); a
/// fresh id to the blocker is refused.
#[tokio::test]
async fn retry_is_answered_after_a_block_and_for_another_peer() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let carol = s.register("carol").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    let first = a.send(text(bob, "cid-r", "hi")).await.unwrap();
    b.block(alice).await.unwrap();
    let again = a.send(text(bob, "cid-r", "hi")).await.unwrap();
    assert_eq!(
        (again.duplicate, again.message_id, again.seq),
        (true, first.message_id, first.seq)
    );
    let e = a.send(text(bob, "cid-new", "hi")).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::Forbidden);
    let other = a.send(text(carol, "cid-r", "hi carol")).await.unwrap();
    assert_eq!(
        (other.duplicate, other.message_id, other.conversation_id),
        (true, first.message_id, first.conversation_id)
    );
    // Nothing reached carol: no conversation with alice was opened.
    let (c, _) = s.login("carol", "c", Platform::Desktop).await;
    let e = c
        .history(pb::HistoryRequest {
            peer_user_id: alice,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::NotFound);
}

#[tokio::test]
async fn send_refusals() {
    let s = TestServer::start_with(|c| {
        c.messages.max_text_len = 100;
        c.messages.max_payload_len = 50;
    })
    .await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    assert_eq!(
        code(a.send(text(999_999, "c1", "x")).await.unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(a.send(text(alice, "c2", "x")).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(a.send(text(0, "c3", "x")).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(a.send(text(bob, "", "x")).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(a.send(text(bob, &"c".repeat(65), "x")).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(a.send(text(bob, "c4", "")).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(a.send(text(bob, "c5", &"x".repeat(101))).await.unwrap_err()),
        ErrorCode::PayloadTooLarge
    );
    let mut img = text(bob, "c6", "x");
    img.kind = pb::MessageKind::Image as i32;
    assert_eq!(code(a.send(img).await.unwrap_err()), ErrorCode::BadRequest);
    let mut sys = text(bob, "c7", "x");
    sys.kind = pb::MessageKind::System as i32;
    assert_eq!(code(a.send(sys).await.unwrap_err()), ErrorCode::BadRequest);
    let mut custom = text(bob, "c8", "");
    custom.kind = pb::MessageKind::Custom as i32;
    custom.payload = Bytes::from(vec![1u8; 51]);
    assert_eq!(
        code(a.send(custom.clone()).await.unwrap_err()),
        ErrorCode::PayloadTooLarge
    );
    custom.payload = Bytes::from(vec![1u8; 50]);
    let ok = a.send(custom).await.unwrap();
    assert_eq!(ok.seq, 1); // nothing refused was stored
    let h = a
        .history(pb::HistoryRequest {
            peer_user_id: bob,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(h.messages.len(), 1);
    assert_eq!(h.messages[0].payload.len(), 50);
    assert_eq!(h.messages[0].kind, pb::MessageKind::Custom as i32);
}

#[tokio::test]
async fn concurrent_senders_get_gap_free_ordered_seqs() {
    let s = TestServer::start_with(|c| {
        c.auth.multi_device = mychat_config::MultiDevice::Multi;
        common::unlimited(c);
    })
    .await;
    s.register("alice").await;
    let bob = s.register("bob").await;
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    let mut bp = b.take_pushes().unwrap();
    // 8 connections of alice send 50 messages each, pipelined, at once.
    let mut tasks = Vec::new();
    for d in 0..8 {
        let (c, _) = s.login("alice", &format!("a{d}"), Platform::Desktop).await;
        tasks.push(tokio::spawn(async move {
            let c = std::sync::Arc::new(c);
            let mut sends = Vec::new();
            for i in 0..50 {
                let c = c.clone();
                sends.push(tokio::spawn(async move {
                    c.send_text(bob, &format!("{d}-{i}")).await.unwrap()
                }));
            }
            let mut seqs = Vec::new();
            for t in sends {
                seqs.push(t.await.unwrap().seq);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    assert_eq!(all, (1..=400).collect::<Vec<u64>>());
    // Bob saw all 400, each once; pts is his stream, gap-free.
    let mut seen = HashSet::new();
    let mut pts = Vec::new();
    while seen.len() < 400 {
        let p = next_message(&mut bp).await;
        assert!(seen.insert(p.message.unwrap().seq));
        pts.push(p.pts);
    }
    // In arrival order: pushes come in commit order, whatever shard each sender is on.
    assert_eq!(pts, (1..=400).collect::<Vec<u64>>());
    // History in seq order, no gap.
    let mut got = Vec::new();
    let mut before = 0;
    loop {
        let h = b
            .history(pb::HistoryRequest {
                peer_user_id: s_alice(&b).await,
                before_seq: before,
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut page: Vec<u64> = h.messages.iter().map(|m| m.seq).collect();
        assert!(page.windows(2).all(|w| w[1] == w[0] + 1));
        before = page[0];
        page.extend(got);
        got = page;
        if !h.has_more {
            break;
        }
    }
    assert_eq!(got, (1..=400).collect::<Vec<u64>>());
}

async fn s_alice(c: &mychat_client::Client) -> u64 {
    c.user_id("alice").await.unwrap()
}

#[tokio::test]
async fn receipts_flow_back_to_the_sender() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    let (b2, _) = s.login("bob", "b2", Platform::Mobile).await;
    let mut ap = a.take_pushes().unwrap();
    let mut bp = b.take_pushes().unwrap();
    let mut b2p = b2.take_pushes().unwrap();
    let ack1 = a.send_text(bob, "one").await.unwrap();
    let ack2 = a.send_text(bob, "two").await.unwrap();
    let conv = ack1.conversation_id;
    b.delivered(conv, ack2.seq).await.unwrap();
    match next_push(&mut ap).await {
        Push::Receipt(r) => {
            let rc = r.receipt.unwrap();
            assert_eq!(
                (rc.kind, rc.user_id, rc.seq, rc.conversation_id),
                (pb::ReceiptKind::ReceiptDelivered as i32, bob, 2, conv)
            );
            assert_eq!(r.pts, 0);
        }
        p => panic!("{p:?}"),
    }
    assert_eq!(b.read(conv, 1).await.unwrap(), 1);
    match next_push(&mut ap).await {
        Push::Receipt(r) => {
            let rc = r.receipt.unwrap();
            assert_eq!(
                (rc.kind, rc.user_id, rc.seq),
                (pb::ReceiptKind::ReceiptRead as i32, bob, 1)
            );
            assert_eq!(r.pts, 3); // alice: 2 sends, then this receipt
        }
        p => panic!("{p:?}"),
    }
    // Bob's other device learns it too (after the two messages).
    next_message(&mut b2p).await;
    next_message(&mut b2p).await;
    match next_push(&mut b2p).await {
        Push::Receipt(r) => assert_eq!(r.receipt.unwrap().seq, 1),
        p => panic!("{p:?}"),
    }
    // The reading connection itself gets the two messages and no receipt of its read.
    next_message(&mut bp).await;
    next_message(&mut bp).await;
    no_push(&mut bp, 200).await;
    // A read mark never moves back; past the end it is clamped.
    assert_eq!(b.read(conv, 0).await.unwrap(), 1);
    assert_eq!(b.read(conv, 99).await.unwrap(), 2);
    let list = a.conversations(0, 0).await.unwrap();
    assert_eq!(list.conversations.len(), 1);
    let c = &list.conversations[0];
    assert_eq!(
        (
            c.peer_user_id,
            c.last_seq,
            c.peer_read_seq,
            c.peer_delivered_seq,
            c.unread
        ),
        (bob, 2, 2, 2, 0)
    );
    let list = b.conversations(0, 0).await.unwrap();
    assert_eq!(
        (
            list.conversations[0].peer_user_id,
            list.conversations[0].unread
        ),
        (alice, 0)
    );
    // Receipts on someone else's conversation: NOT_FOUND.
    s.register("eve").await;
    let (e, _) = s.login("eve", "e", Platform::Desktop).await;
    assert_eq!(
        code(e.read(conv, 1).await.unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(e.delivered(conv, 1).await.unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(
            e.history(pb::HistoryRequest {
                conversation_id: conv,
                ..Default::default()
            })
            .await
            .unwrap_err()
        ),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(e.history(pb::HistoryRequest::default()).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(code(e.read(0, 1).await.unwrap_err()), ErrorCode::BadRequest);
}

/// The unread snapshot comes from read marks: a reply marks the conversation read up to
/// the reply, and one's own messages are never unread to oneself.
#[tokio::test]
async fn snapshot_follows_read_marks_moved_by_replies() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    a.send_text(bob, "hello").await.unwrap();
    a.send_text(bob, "are you there").await.unwrap();
    b.send_text(alice, "yes").await.unwrap();
    let texts = |snap: &pb::SyncResponse| -> Vec<String> {
        assert!(snap.unread_snapshot);
        snap.updates
            .iter()
            .map(|u| match &u.event {
                Some(pb::update::Event::Message(m)) => m.text.clone(),
                e => panic!("{e:?}"),
            })
            .collect()
    };
    // Bob's reply read alice's two messages; alice has not read the reply.
    let (b2, _) = s.login("bob", "b2", Platform::Mobile).await;
    assert_eq!(
        texts(&b2.sync(None, 0).await.unwrap()),
        Vec::<String>::new()
    );
    let (a2, _) = s.login("alice", "a2", Platform::Mobile).await;
    assert_eq!(
        texts(&a2.sync(None, 0).await.unwrap()),
        vec!["yes".to_string()]
    );
}

#[tokio::test]
async fn new_device_gets_unread_then_syncs_by_cursor() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    s.register("carol").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    let (c, _) = s.login("carol", "c", Platform::Desktop).await;
    for i in 0..3 {
        a.send_text(bob, &format!("a{i}")).await.unwrap();
    }
    let from_carol = c.send_text(bob, "c0").await.unwrap();
    // Bob reads carol's conversation on one device…
    let (b1, _) = s.login("bob", "b1", Platform::Desktop).await;
    b1.read(from_carol.conversation_id, 1).await.unwrap();
    // …so a brand-new device gets only alice's three unread messages.
    let (b2, login) = s.login("bob", "b2", Platform::Mobile).await;
    assert!(!login.has_cursor);
    let snap = b2.sync(None, 0).await.unwrap();
    assert!(snap.unread_snapshot);
    let texts: Vec<&str> = snap
        .updates
        .iter()
        .map(|u| match &u.event {
            Some(pb::update::Event::Message(m)) => m.text.as_str(),
            _ => panic!("snapshot holds messages only"),
        })
        .collect();
    assert_eq!(texts, vec!["a0", "a1", "a2"]);
    assert!(snap.updates.iter().all(|u| u.pts == 0));
    assert_eq!(snap.pts, login.pts);
    // More arrives; the device now syncs from its cursor, kept by the server.
    a.send_text(bob, "a3").await.unwrap();
    drop(b2);
    let (b2, login) = s.login("bob", "b2", Platform::Mobile).await;
    assert!(login.has_cursor);
    assert_eq!(login.device_cursor, snap.pts);
    let page = b2.sync(None, 0).await.unwrap();
    assert!(!page.unread_snapshot);
    assert_eq!(page.updates.len(), 1);
    match &page.updates[0].event {
        Some(pb::update::Event::Message(m)) => {
            assert_eq!((m.text.as_str(), m.sender_id), ("a3", alice))
        }
        e => panic!("{e:?}"),
    }
    // Acknowledge; the next session resumes after it.
    b2.sync_ack(page.pts).await.unwrap();
    assert_eq!(
        code(b2.sync_ack(page.pts + 100).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(b2.sync(Some(page.pts + 100), 0).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    drop(b2);
    let (b2, login) = s.login("bob", "b2", Platform::Mobile).await;
    assert_eq!(login.device_cursor, page.pts);
    assert!(b2.sync(None, 0).await.unwrap().updates.is_empty());
}

#[tokio::test]
async fn sync_pages_in_order() {
    let s = TestServer::start().await;
    s.register("alice").await;
    let bob = s.register("bob").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    for i in 0..25 {
        a.send_text(bob, &format!("m{i}")).await.unwrap();
    }
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    let mut since = 0;
    let mut texts = Vec::new();
    let mut pages = 0;
    loop {
        let p = b.sync(Some(since), 10).await.unwrap();
        pages += 1;
        for u in &p.updates {
            assert_eq!(u.pts, since + 1);
            since = u.pts;
            if let Some(pb::update::Event::Message(m)) = &u.event {
                texts.push(m.text.clone());
            }
        }
        assert_eq!(p.pts, since);
        if !p.has_more {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(texts, (0..25).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn history_pages_backward_and_conversations_order() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let carol = s.register("carol").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    for i in 1..=7 {
        a.send_text(bob, &format!("b{i}")).await.unwrap();
    }
    a.send_text(carol, "c1").await.unwrap();
    let h = a
        .history(pb::HistoryRequest {
            peer_user_id: bob,
            before_seq: 0,
            limit: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![5, 6, 7]
    );
    assert!(h.has_more);
    let h = a
        .history(pb::HistoryRequest {
            conversation_id: h.conversation_id,
            before_seq: 5,
            limit: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    let h = a
        .history(pb::HistoryRequest {
            conversation_id: h.conversation_id,
            before_seq: 2,
            limit: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1]
    );
    assert!(!h.has_more);
    // Most recent first.
    let list = a.conversations(0, 0).await.unwrap();
    let peers: Vec<u64> = list.conversations.iter().map(|c| c.peer_user_id).collect();
    assert_eq!(peers, vec![carol, bob]);
    let page = a.conversations(1, 1).await.unwrap();
    assert_eq!(page.conversations.len(), 1);
    assert_eq!(page.conversations[0].peer_user_id, bob);
    assert!(!page.has_more);
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    let list = b.conversations(0, 0).await.unwrap();
    assert_eq!(
        (
            list.conversations[0].peer_user_id,
            list.conversations[0].unread
        ),
        (alice, 7)
    );
    assert_eq!(
        list.conversations[0].last_message.as_ref().unwrap().text,
        "b7"
    );
    // History with a user one never talked to: NOT_FOUND.
    let (c, _) = s.login("carol", "c", Platform::Desktop).await;
    assert_eq!(
        code(
            c.history(pb::HistoryRequest {
                peer_user_id: bob,
                ..Default::default()
            })
            .await
            .unwrap_err()
        ),
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn sync_after_restart_and_seq_continues() {
    let mut s = TestServer::start().await;
    s.register("alice").await;
    let bob = s.register("bob").await;
    let mut acks = Vec::new();
    {
        let (a, _) = s.login("alice", "a", Platform::Desktop).await;
        for i in 0..5 {
            acks.push(a.send_text(bob, &format!("m{i}")).await.unwrap());
        }
    }
    s.stop().await;
    let dir = s.dir;
    let mut cfg = test_config(dir.path());
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    let h = mychat::start(cfg).unwrap();
    let s2 = TestServer {
        addr: h.local_addr().to_string(),
        handle: Some(h),
        dir,
    };
    let (b, _) = s2.login("bob", "b", Platform::Desktop).await;
    let snap = b.sync(None, 0).await.unwrap();
    let ids: Vec<u64> = snap
        .updates
        .iter()
        .filter_map(|u| match &u.event {
            Some(pb::update::Event::Message(m)) => Some(m.id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, acks.iter().map(|a| a.message_id).collect::<Vec<_>>());
    let (a, _) = s2.login("alice", "a", Platform::Desktop).await;
    let next = a
        .send(pb::SendMessageRequest {
            group_id: 0,
            to_user_id: bob,
            client_msg_id: new_client_msg_id(),
            kind: 1,
            text: "after".into(),
            payload: Bytes::new(),
        })
        .await
        .unwrap();
    assert_eq!(next.seq, 6);
    assert_eq!(next.pts, 6);
    // A resend of a pre-restart client id is still recognised.
    let again = a
        .send(pb::SendMessageRequest {
            group_id: 0,
            to_user_id: bob,
            client_msg_id: "never-used".into(),
            kind: 1,
            text: "x".into(),
            payload: Bytes::new(),
        })
        .await
        .unwrap();
    let dup = a
        .send(pb::SendMessageRequest {
            group_id: 0,
            to_user_id: bob,
            client_msg_id: "never-used".into(),
            kind: 1,
            text: "x".into(),
            payload: Bytes::new(),
        })
        .await
        .unwrap();
    assert_eq!((again.seq, dup.duplicate, dup.seq), (7, true, 7));
}

#[tokio::test]
async fn slow_consumer_is_disconnected_and_loses_nothing() {
    let s = TestServer::start_with(|c| {
        c.server.max_frame_len = 8 * 1024;
        c.server.outbound_buffer_bytes = 16 * 1024;
        c.messages.max_text_len = 4096;
        c.messages.max_payload_len = 1024;
        common::unlimited(c);
    })
    .await;
    s.register("alice").await;
    let bob = s.register("bob").await;
    // Bob logs in over a raw socket and then never reads.
    let mut raw = Raw::connect(&s.addr).await;
    let login = pb::LoginRequest {
        credential: Some(pb::login_request::Credential::Password(
            pb::PasswordCredential {
                username: "bob".into(),
                password: "password-bob".into(),
            },
        )),
        device_id: "slow".into(),
        platform: Platform::Desktop as i32,
    };
    raw.request(pb::Command::Login.id(), 1, &body(&login)).await;
    let f = raw.frame().await.unwrap();
    assert!(!f.header.is_error());
    // Shrink the socket buffers' effect by sending far more than they hold.
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    let big = "x".repeat(4000);
    let a = std::sync::Arc::new(a);
    let mut acked = Vec::new();
    for _ in 0..40 {
        let mut batch = Vec::new();
        for _ in 0..50 {
            let (a, big) = (a.clone(), big.clone());
            batch.push(tokio::spawn(async move {
                a.send_text(bob, &big).await.unwrap().seq
            }));
        }
        for t in batch {
            acked.push(t.await.unwrap());
        }
    }
    acked.sort();
    assert_eq!(acked, (1..=2000).collect::<Vec<u64>>());
    // The server closed bob's connection (its buffer passed the bound): reading now
    // yields some pushes, then the end.
    let mut closed = false;
    for _ in 0..5000 {
        match raw.frame().await {
            Some(_) => continue,
            None => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the slow consumer was disconnected");
    // Reconnected, bob syncs everything.
    let (b, _) = s.login("bob", "slow", Platform::Desktop).await;
    assert_eq!(synced_message_seqs(&b).await, acked);
}

/// A full write queue refuses with UNAVAILABLE, and what was refused is not stored:
/// history holds exactly the acknowledged messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_write_queue_refuses_and_stores_only_what_it_acked() {
    let s = TestServer::start_with(|c| {
        c.store.write_queue = 1;
        c.store.max_batch = 1;
    })
    .await;
    s.register("alice").await;
    let bob = s.register("bob").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    let a = std::sync::Arc::new(a);
    let mut sends = Vec::new();
    for i in 0..64 {
        let a = a.clone();
        sends.push(tokio::spawn(async move {
            a.send_text(bob, &format!("m{i}")).await
        }));
    }
    let (mut acked, mut refused) = (Vec::new(), 0);
    for t in sends {
        match t.await.unwrap() {
            Ok(ack) => acked.push(ack.message_id),
            Err(e) => {
                assert_eq!(code(e), ErrorCode::Unavailable);
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "a queue of one refused nothing");
    let h = a
        .history(pb::HistoryRequest {
            peer_user_id: bob,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stored: Vec<u64> = h.messages.iter().map(|m| m.id).collect();
    stored.sort();
    acked.sort();
    assert_eq!(stored, acked);
    assert_eq!(
        h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=acked.len() as u64).collect::<Vec<_>>()
    );
}

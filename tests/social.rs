//! Users, friends, blocks, categories, presence and typing.
mod common;
use common::*;
use mychat_client::proto as pb;
use mychat_client::Push;
use pb::{ErrorCode, Platform};
use std::time::Duration;

#[tokio::test]
async fn profile_and_search() {
    let s = TestServer::start().await;
    for n in ["alice", "alina", "albert", "bob"] {
        s.register(n).await;
    }
    let (c, _) = s.login("alice", "a", Platform::Desktop).await;
    let u = c
        .update_profile(pb::UpdateProfileRequest {
            nickname: Some("Alice A.".into()),
            avatar: Some("file:42".into()),
            signature: None,
        })
        .await
        .unwrap();
    assert_eq!(
        (u.nickname.as_str(), u.avatar.as_str(), u.signature.as_str()),
        ("Alice A.", "file:42", "")
    );
    let u = c
        .update_profile(pb::UpdateProfileRequest {
            signature: Some("hi".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (u.nickname.as_str(), u.signature.as_str()),
        ("Alice A.", "hi")
    );
    let e = c
        .update_profile(pb::UpdateProfileRequest {
            nickname: Some("x".repeat(65)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::PayloadTooLarge);
    assert_eq!(
        code(
            c.update_profile(pb::UpdateProfileRequest::default())
                .await
                .unwrap_err()
        ),
        ErrorCode::BadRequest
    );
    let got = c.get_users(vec![], vec!["alice".into()]).await.unwrap();
    assert_eq!(got[0].nickname, "Alice A.");
    // Prefix search with paging.
    let p1 = c.search_users("al", "", 2).await.unwrap();
    let names: Vec<&str> = p1.users.iter().map(|u| u.username.as_str()).collect();
    assert_eq!(names, vec!["albert", "alice"]);
    assert!(p1.has_more);
    let p2 = c.search_users("al", "alice", 2).await.unwrap();
    assert_eq!(
        p2.users
            .iter()
            .map(|u| u.username.as_str())
            .collect::<Vec<_>>(),
        vec!["alina"]
    );
    assert!(!p2.has_more);
    assert!(c.search_users("zz", "", 0).await.unwrap().users.is_empty());
    assert_eq!(
        code(c.search_users("", "", 0).await.unwrap_err()),
        ErrorCode::BadRequest
    );
}

#[tokio::test]
async fn friend_request_accept_remark_categories_remove() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    let mut ap = a.take_pushes().unwrap();
    let mut bp = b.take_pushes().unwrap();
    assert!(!a.friend_request(bob, "hi, it's alice").await.unwrap());
    match next_push(&mut bp).await {
        Push::FriendRequest(p) => {
            assert_eq!(p.from.unwrap().id, alice);
            assert_eq!(p.message, "hi, it's alice");
            assert!(p.pts > 0);
        }
        p => panic!("{p:?}"),
    }
    let reqs = b.friend_requests().await.unwrap();
    assert_eq!(reqs.len(), 1);
    assert!(reqs[0].incoming);
    // Errors.
    assert_eq!(
        code(a.friend_request(alice, "").await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(a.friend_request(99_999, "").await.unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(a.friend_accept(bob).await.unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(a.friend_request(bob, &"x".repeat(257)).await.unwrap_err()),
        ErrorCode::PayloadTooLarge
    );
    b.friend_accept(alice).await.unwrap();
    match next_push(&mut ap).await {
        Push::FriendAnswer(p) => assert_eq!((p.user_id, p.accepted), (bob, true)),
        p => panic!("{p:?}"),
    }
    assert_eq!(
        code(a.friend_request(bob, "again").await.unwrap_err()),
        ErrorCode::Conflict
    );
    // Lists, remark, categories.
    let fl = a.friends(0, 0).await.unwrap();
    assert_eq!(fl.friends.len(), 1);
    let f = &fl.friends[0];
    assert_eq!(f.user.as_ref().unwrap().id, bob);
    assert_eq!(f.presence, pb::PresenceStatus::Online as i32);
    a.friend_remark(bob, "Bobby").await.unwrap();
    let cat = a.category_create("work").await.unwrap();
    a.friend_move(bob, cat).await.unwrap();
    let f = a.friends(0, 0).await.unwrap().friends.remove(0);
    assert_eq!((f.remark.as_str(), f.category_id), ("Bobby", cat));
    a.category_rename(cat, "colleagues").await.unwrap();
    assert_eq!(
        a.categories().await.unwrap(),
        vec![pb::Category {
            id: cat,
            name: "colleagues".into()
        }]
    );
    assert_eq!(
        code(a.category_rename(cat + 100, "x").await.unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(a.category_rename(0, "x").await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(a.friend_move(bob, cat + 100).await.unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(b.category_delete(cat).await.unwrap_err()),
        ErrorCode::NotFound
    ); // not bob's
    a.category_delete(cat).await.unwrap();
    assert_eq!(a.friends(0, 0).await.unwrap().friends[0].category_id, 0);
    assert_eq!(
        code(a.friend_remark(99_999, "x").await.unwrap_err()),
        ErrorCode::NotFound
    );
    // Remove: both sides told, both lists empty.
    a.friend_remove(bob).await.unwrap();
    match next_push(&mut bp).await {
        Push::FriendRemoved(p) => assert_eq!(p.user_id, alice),
        p => panic!("{p:?}"),
    }
    assert!(b.friends(0, 0).await.unwrap().friends.is_empty());
    assert_eq!(
        code(a.friend_remove(bob).await.unwrap_err()),
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn crossed_requests_befriend_and_reject_is_told() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let carol = s.register("carol").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    let (c, _) = s.login("carol", "c", Platform::Desktop).await;
    let mut cp = c.take_pushes().unwrap();
    assert!(!a.friend_request(bob, "").await.unwrap());
    assert!(
        b.friend_request(alice, "").await.unwrap(),
        "bob's request meets alice's"
    );
    assert_eq!(a.friends(0, 0).await.unwrap().friends.len(), 1);
    c.friend_request(alice, "hello").await.unwrap();
    a.friend_reject(carol).await.unwrap();
    match next_push(&mut cp).await {
        Push::FriendAnswer(p) => assert_eq!((p.user_id, p.accepted), (alice, false)),
        p => panic!("{p:?}"),
    }
    assert!(c.friends(0, 0).await.unwrap().friends.is_empty());
}

#[tokio::test]
async fn offline_user_finds_friend_request_on_sync() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    a.friend_request(bob, "see this later").await.unwrap();
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    let page = b.sync(Some(0), 0).await.unwrap();
    let ev = page.updates.iter().find_map(|u| match &u.event {
        Some(pb::update::Event::Friend(f)) => Some(f.clone()),
        _ => None,
    });
    let f = ev.expect("a friend event in the stream");
    assert_eq!(
        (f.kind, f.user, f.message.as_str()),
        (
            pb::friend_event::Kind::RequestReceived as i32,
            alice,
            "see this later"
        )
    );
}

#[tokio::test]
async fn blocked_user_can_neither_message_nor_befriend() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    b.send_text(alice, "before").await.unwrap();
    a.block(bob).await.unwrap();
    a.block(bob).await.unwrap(); // idempotent
    assert_eq!(
        a.blocked()
            .await
            .unwrap()
            .iter()
            .map(|u| u.id)
            .collect::<Vec<_>>(),
        vec![bob]
    );
    let e = b.send_text(alice, "after").await.unwrap_err();
    assert_eq!(code(e.clone()), ErrorCode::Forbidden);
    assert_eq!(
        code(b.friend_request(alice, "").await.unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(b.typing(alice, 0, true).await.unwrap_err()),
        ErrorCode::Forbidden
    );
    // The blocker may still write; befriending needs an unblock first.
    a.send_text(bob, "I can still write").await.unwrap();
    assert_eq!(
        code(a.friend_request(bob, "").await.unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(a.block(alice).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(a.block(99_999).await.unwrap_err()),
        ErrorCode::NotFound
    );
    a.unblock(bob).await.unwrap();
    assert_eq!(code(a.unblock(bob).await.unwrap_err()), ErrorCode::NotFound);
    b.send_text(alice, "after unblock").await.unwrap();
}

#[tokio::test]
async fn strangers_policy_off_needs_friendship() {
    let s = TestServer::start_with(|c| c.friends.strangers_may_message = false).await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    assert_eq!(
        code(a.send_text(bob, "hi").await.unwrap_err()),
        ErrorCode::Forbidden
    );
    a.friend_request(bob, "").await.unwrap();
    b.friend_accept(alice).await.unwrap();
    a.send_text(bob, "hi friend").await.unwrap();
}

async fn presence_push(rx: &mut tokio::sync::mpsc::Receiver<Push>) -> pb::UserPresence {
    loop {
        if let Push::Presence(p) = next_push(rx).await {
            return p.presence.unwrap();
        }
    }
}

async fn no_presence(rx: &mut tokio::sync::mpsc::Receiver<Push>, ms: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    while let Ok(Some(p)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        if let Push::Presence(p) = p {
            panic!("unexpected presence push {p:?}");
        }
    }
}

#[tokio::test]
async fn presence_reaches_friends_and_subscribers_only() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    s.register("carol").await;
    s.register("dave").await;
    {
        let (a, _) = s.login("alice", "a0", Platform::Desktop).await;
        a.friend_request(bob, "").await.unwrap();
        let (b, _) = s.login("bob", "b0", Platform::Desktop).await;
        b.friend_accept(alice).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await; // friend of bob
    let (c, _) = s.login("carol", "c", Platform::Desktop).await; // stranger
    let (d, _) = s.login("dave", "d", Platform::Desktop).await; // subscribes to bob
    let mut ap = a.take_pushes().unwrap();
    let mut cp = c.take_pushes().unwrap();
    let mut dp = d.take_pushes().unwrap();
    let now = d.presence_subscribe(vec![bob]).await.unwrap();
    assert_eq!(now[0].status, pb::PresenceStatus::Offline as i32);
    assert!(now[0].last_seen_ms > 0);
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    for rx in [&mut ap, &mut dp] {
        let p = presence_push(rx).await;
        assert_eq!(
            (p.user_id, p.status),
            (bob, pb::PresenceStatus::Online as i32)
        );
    }
    b.presence_set(pb::PresenceStatus::Away).await.unwrap();
    for rx in [&mut ap, &mut dp] {
        assert_eq!(
            presence_push(rx).await.status,
            pb::PresenceStatus::Away as i32
        );
    }
    assert_eq!(
        a.presence(vec![bob]).await.unwrap()[0].status,
        pb::PresenceStatus::Away as i32
    );
    assert_eq!(
        code(
            b.presence_set(pb::PresenceStatus::Offline)
                .await
                .unwrap_err()
        ),
        ErrorCode::BadRequest
    );
    drop(b);
    for rx in [&mut ap, &mut dp] {
        let p = presence_push(rx).await;
        assert_eq!(p.status, pb::PresenceStatus::Offline as i32);
        assert!(p.last_seen_ms > 0);
    }
    no_presence(&mut cp, 300).await;
    // Unsubscribed: no more pushes to dave.
    d.presence_subscribe(vec![]).await.unwrap();
    let (_b2, _) = s.login("bob", "b", Platform::Desktop).await;
    assert_eq!(
        presence_push(&mut ap).await.status,
        pb::PresenceStatus::Online as i32
    );
    no_presence(&mut dp, 300).await;
    let e = d.presence_subscribe((1..=501).collect()).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::PayloadTooLarge);
}

#[tokio::test]
async fn typing_is_pushed_and_rate_limited() {
    let s = TestServer::start_with(|c| c.presence.typing_per_sec = 2).await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let (a, _) = s.login("alice", "a", Platform::Desktop).await;
    let (b, _) = s.login("bob", "b", Platform::Desktop).await;
    let mut bp = b.take_pushes().unwrap();
    a.typing(bob, 0, true).await.unwrap();
    match next_push(&mut bp).await {
        Push::Typing(t) => assert_eq!((t.user_id, t.group_id, t.typing), (alice, 0, true)),
        p => panic!("{p:?}"),
    }
    // Burst of 4 (2 × rate): the 5th in a row is refused.
    let mut refused = 0;
    for _ in 0..6 {
        if let Err(e) = a.typing(bob, 0, true).await {
            assert_eq!(code(e), ErrorCode::RateLimited);
            refused += 1;
        }
    }
    assert!(refused >= 2, "refused {refused}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    a.typing(bob, 0, false).await.unwrap();
    assert_eq!(
        code(a.typing(0, 0, true).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        code(a.typing(99_999, 0, true).await.unwrap_err()),
        ErrorCode::NotFound
    );
    // Never stored: bob's stream holds nothing from it.
    assert!(b.sync(Some(0), 0).await.unwrap().updates.is_empty());
}

//! Authorization: no request reads, receipts, recalls or syncs another user's
//! conversation, acts in a group as a non-member or above its role, or acts as another
//! user. Each attempt must get exactly the code named (FORBIDDEN where the target is
//! visible to the caller, NOT_FOUND where even its existence is not), and must change
//! nothing the victims can see.

mod common;

use common::{code, TestServer};
use mychat_client::proto as pb;
use pb::ErrorCode::{Forbidden, InvalidCredentials, NotFound};

#[track_caller]
fn expect_err<T: std::fmt::Debug>(r: Result<T, mychat_client::ClientError>, want: pb::ErrorCode) {
    match r {
        Ok(v) => panic!("expected {want:?}, the request succeeded: {v:?}"),
        Err(e) => assert_eq!(code(e), want),
    }
}

fn hist(conversation_id: u64, group_id: u64) -> pb::HistoryRequest {
    pb::HistoryRequest {
        conversation_id,
        peer_user_id: 0,
        before_seq: 0,
        limit: 50,
        group_id,
        after_seq: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_reaches_what_is_not_theirs() {
    let s = TestServer::start().await;
    let alice_id = s.register("alice").await;
    let bob_id = s.register("bob").await;
    let carol_id = s.register("carol").await;
    let eve_id = s.register("eve").await;
    let (alice, _) = s.login("alice", "a1", pb::Platform::Desktop).await;
    let (bob, _) = s.login("bob", "b1", pb::Platform::Desktop).await;
    let (carol, _) = s.login("carol", "c1", pb::Platform::Desktop).await;
    let (eve, _) = s.login("eve", "e1", pb::Platform::Desktop).await;

    // A 1:1 conversation of alice and bob.
    let m = alice.send_text(bob_id, "for bob only").await.unwrap();
    let conv = m.conversation_id;

    // --- another user's conversation ---
    expect_err(eve.history(hist(conv, 0)).await, NotFound);
    // Naming the peer gives eve her own conversation with alice (empty), never theirs.
    let own = eve
        .history(pb::HistoryRequest {
            peer_user_id: alice_id,
            ..hist(0, 0)
        })
        .await;
    if let Ok(h) = own {
        assert!(h.messages.is_empty(), "eve read {:?}", h.messages);
        assert_ne!(h.conversation_id, conv);
    }
    expect_err(eve.delivered(conv, m.seq).await, NotFound);
    expect_err(eve.read(conv, m.seq).await, NotFound);
    expect_err(eve.recall(m.message_id).await, NotFound);
    expect_err(eve.delete_for_me(vec![m.message_id]).await, NotFound);
    // The recipient may not recall the sender's message.
    expect_err(bob.recall(m.message_id).await, Forbidden);
    // Eve's sync holds nothing of their conversation.
    let sync = eve.sync(None, 500).await.unwrap();
    let leaked: Vec<_> = sync
        .updates
        .iter()
        .filter(|u| format!("{u:?}").contains("for bob only"))
        .collect();
    assert!(leaked.is_empty(), "eve's sync carries {leaked:?}");
    // And nothing changed for them: bob's read mark is untouched, the message is there.
    let h = bob.history(hist(conv, 0)).await.unwrap();
    assert_eq!(h.messages.len(), 1);
    assert!(!h.messages[0].recalled);

    // --- a group: alice owner, carol admin, bob member, eve outside ---
    let g = alice
        .group_create("crew", vec![bob_id, carol_id], pb::JoinPolicy::Approval)
        .await
        .unwrap();
    let gid = g.id;
    alice
        .group_set_role(gid, carol_id, pb::GroupRole::Admin)
        .await
        .unwrap();
    let gm = bob.send_group_text(gid, "members only").await.unwrap();
    let gconv = gm.conversation_id;

    // Eve, a non-member.
    expect_err(eve.send_group_text(gid, "let me in").await, Forbidden);
    // Its conversation is invisible to her, whether named by group or by id.
    expect_err(eve.history(hist(0, gid)).await, NotFound);
    expect_err(eve.history(hist(gconv, 0)).await, NotFound);
    expect_err(eve.read(gconv, gm.seq).await, NotFound);
    expect_err(eve.delivered(gconv, gm.seq).await, NotFound);
    expect_err(eve.recall(gm.message_id).await, NotFound);
    expect_err(eve.group_members(gid, 0, 50).await, Forbidden);
    expect_err(eve.group_invite(gid, vec![eve_id]).await, Forbidden);
    expect_err(eve.group_kick(gid, bob_id).await, Forbidden);
    expect_err(eve.group_mute(gid, bob_id, 60).await, Forbidden);
    expect_err(eve.group_dissolve(gid).await, Forbidden);
    expect_err(eve.group_leave(gid).await, Forbidden);
    expect_err(eve.group_approve(gid, eve_id).await, Forbidden);
    expect_err(eve.group_join_requests(gid).await, Forbidden);
    expect_err(
        eve.group_set_role(gid, eve_id, pb::GroupRole::Owner).await,
        Forbidden,
    );
    expect_err(eve.group_transfer(gid, eve_id).await, Forbidden);
    expect_err(
        eve.group_update(pb::GroupUpdateRequest {
            group_id: gid,
            name: Some("mine".into()),
            join_policy: None,
            mute_all: None,
        })
        .await,
        Forbidden,
    );

    // Bob, a plain member, above his role.
    expect_err(bob.group_kick(gid, carol_id).await, Forbidden);
    expect_err(bob.group_kick(gid, alice_id).await, Forbidden);
    expect_err(bob.group_mute(gid, carol_id, 60).await, Forbidden);
    expect_err(
        bob.group_set_role(gid, bob_id, pb::GroupRole::Admin).await,
        Forbidden,
    );
    expect_err(bob.group_transfer(gid, bob_id).await, Forbidden);
    expect_err(bob.group_dissolve(gid).await, Forbidden);
    expect_err(bob.group_join_requests(gid).await, Forbidden);
    expect_err(
        bob.group_update(pb::GroupUpdateRequest {
            group_id: gid,
            name: None,
            join_policy: None,
            mute_all: Some(true),
        })
        .await,
        Forbidden,
    );
    let carol_msg = carol.send_group_text(gid, "from the admin").await.unwrap();
    expect_err(bob.recall(carol_msg.message_id).await, Forbidden);

    // Carol, an admin, above hers: not over the owner, not the owner's powers.
    expect_err(carol.group_kick(gid, alice_id).await, Forbidden);
    expect_err(carol.group_mute(gid, alice_id, 60).await, Forbidden);
    expect_err(
        carol
            .group_set_role(gid, carol_id, pb::GroupRole::Owner)
            .await,
        Forbidden,
    );
    expect_err(
        carol
            .group_set_role(gid, bob_id, pb::GroupRole::Admin)
            .await,
        Forbidden,
    );
    expect_err(carol.group_transfer(gid, carol_id).await, Forbidden);
    expect_err(carol.group_dissolve(gid).await, Forbidden);

    // The group is as alice made it: same name, same three members and roles.
    let info = alice.group_info(gid).await.unwrap();
    assert_eq!(info.group.as_ref().unwrap().name, "crew");
    let members = alice.group_members(gid, 0, 50).await.unwrap();
    let mut roles: Vec<(u64, i32)> = members
        .members
        .iter()
        .map(|m| (m.user_id, m.role))
        .collect();
    roles.sort();
    let mut want = vec![
        (alice_id, pb::GroupRole::Owner as i32),
        (bob_id, pb::GroupRole::Member as i32),
        (carol_id, pb::GroupRole::Admin as i32),
    ];
    want.sort();
    assert_eq!(roles, want);
    // Bob can still speak (nobody muted him).
    bob.send_group_text(gid, "still here").await.unwrap();

    // --- acting as another user ---
    // Alice's password is not eve's way in.
    let c = s.client().await;
    expect_err(
        c.login_password("alice", "password-eve", "e2", pb::Platform::Web)
            .await,
        InvalidCredentials,
    );
    // A token with alice's id spliced into eve's payload fails its signature.
    let (c2, eve_login) = s.login("eve", "e3", pb::Platform::Web).await;
    drop(c2);
    let token = eve_login.tokens.unwrap().access_token;
    let forged = forge_user(&token, alice_id);
    let c = s.client().await;
    expect_err(
        c.login(
            pb::login_request::Credential::AccessToken(forged),
            "e3",
            pb::Platform::Web,
        )
        .await,
        InvalidCredentials,
    );
    // Eve's own token for another device id does not open that device.
    let c = s.client().await;
    expect_err(
        c.login(
            pb::login_request::Credential::AccessToken(token.clone()),
            "a1",
            pb::Platform::Web,
        )
        .await,
        InvalidCredentials,
    );
    // A refresh token is good once, for its owner: a made-up one is refused.
    expect_err(
        s.client()
            .await
            .refresh("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
            .await,
        InvalidCredentials,
    );
    // Nothing eve did reached alice's conversation list.
    let convs = alice.conversations(0, 50).await.unwrap();
    assert!(
        !format!("{convs:?}").contains("let me in"),
        "a non-member's text was stored"
    );
    let _ = eve_id;
}

/// Replaces the user id (first 8 bytes of the payload) of a `payload.tag` token.
fn forge_user(token: &str, user: u64) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (p, t) = token.split_once('.').unwrap();
    let mut payload = b64.decode(p).unwrap();
    payload[0..8].copy_from_slice(&user.to_be_bytes());
    format!("{}.{t}", b64.encode(payload))
}

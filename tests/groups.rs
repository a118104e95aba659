//! Groups: creation, group messages (push, sync by head, history), the role
//! permission matrix, joins, mutes, leave/kick/dissolve, limits, recall and
//! delete-for-me.
mod common;
use bytes::Bytes;
use common::*;
use mychat_client::proto as pb;
use mychat_client::{Client, Push};
use pb::{ErrorCode, GroupRole, JoinPolicy, Platform};
use prost::Message as _;

async fn users(s: &TestServer, names: &[&str]) -> Vec<(u64, Client)> {
    let mut out = Vec::new();
    for n in names {
        let id = s.register(n).await;
        let (c, _) = s.login(n, &format!("{n}-dev"), Platform::Desktop).await;
        out.push((id, c));
    }
    out
}

fn event(m: &pb::Message) -> pb::SystemEvent {
    assert_eq!(
        m.kind,
        pb::MessageKind::System as i32,
        "not a system message: {m:?}"
    );
    pb::SystemEvent::decode(m.payload.clone()).unwrap()
}

async fn join_answer(rx: &mut tokio::sync::mpsc::Receiver<Push>) -> pb::GroupJoinAnswerPush {
    loop {
        if let Push::GroupJoinAnswer(a) = next_push(rx).await {
            return a;
        }
    }
}

async fn group_message(rx: &mut tokio::sync::mpsc::Receiver<Push>) -> pb::Message {
    next_message(rx).await.message.unwrap()
}

#[tokio::test]
async fn create_send_push_sync_history() {
    let s = TestServer::start().await;
    let mut u = users(&s, &["owner", "amy", "ben"]).await;
    let (ben_id, ben) = u.pop().unwrap();
    let (amy_id, amy) = u.pop().unwrap();
    let (owner_id, owner) = u.pop().unwrap();
    let mut amy_p = amy.take_pushes().unwrap();
    drop(ben); // offline
    let g = owner
        .group_create("trio", vec![amy_id, ben_id], JoinPolicy::Approval)
        .await
        .unwrap();
    assert_eq!((g.member_count, g.owner_id, g.last_seq), (3, owner_id, 1));
    // amy: membership event, then the creation notice.
    let mut created = None;
    while created.is_none() {
        match next_push(&mut amy_p).await {
            Push::GroupMembership(m) => assert!(m.membership.unwrap().member),
            Push::Message(m) => created = m.message,
            p => panic!("{p:?}"),
        }
    }
    let created = created.unwrap();
    assert_eq!((created.group_id, created.seq), (g.id, 1));
    assert_eq!(
        event(&created).kind,
        pb::system_event::Kind::GroupCreated as i32
    );
    // A group message: acked with the group's seq, pushed to online members.
    let ack = owner.send_group_text(g.id, "hello group").await.unwrap();
    assert_eq!((ack.seq, ack.conversation_id), (2, g.conversation_id));
    let m = group_message(&mut amy_p).await;
    assert_eq!(
        (m.text.as_str(), m.group_id, m.seq, m.sender_id),
        ("hello group", g.id, 2, owner_id)
    );
    // Idempotent resend.
    let req = pb::SendMessageRequest {
        to_user_id: 0,
        group_id: g.id,
        client_msg_id: "g-1".into(),
        kind: 1,
        text: "once".into(),
        payload: Bytes::new(),
    };
    let first = amy.send(req.clone()).await.unwrap();
    let again = amy.send(req).await.unwrap();
    assert!(again.duplicate && again.seq == first.seq && again.message_id == first.message_id);
    // ben was offline: his sync lists the group's head; history after his read mark.
    let (ben, _) = s.login("ben", "ben-dev2", Platform::Mobile).await;
    let snap = ben.sync(None, 0).await.unwrap();
    let head = snap
        .groups
        .iter()
        .find(|h| h.group_id == g.id)
        .expect("group head");
    assert_eq!((head.last_seq, head.read_seq), (3, 0));
    let h = ben
        .history(pb::HistoryRequest {
            group_id: g.id,
            after_seq: head.read_seq,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(h.messages[2].text, "once");
    // Read mark: the head disappears.
    ben.read(g.conversation_id, 3).await.unwrap();
    assert!(ben.sync(Some(0), 0).await.unwrap().groups.is_empty());
    // Conversation list shows the group.
    let conv = ben
        .conversations(0, 0)
        .await
        .unwrap()
        .conversations
        .into_iter()
        .find(|c| c.group_id == g.id)
        .unwrap();
    assert_eq!(
        (conv.r#type, conv.last_seq, conv.unread),
        (pb::ConversationType::Group as i32, 3, 0)
    );
    // Non-members: FORBIDDEN to send, NOT_FOUND for its history; unknown group NOT_FOUND.
    let (_, eve) = users(&s, &["eve"]).await.pop().unwrap();
    assert_eq!(
        code(eve.send_group_text(g.id, "let me in").await.unwrap_err()),
        ErrorCode::Forbidden
    );
    let e = eve
        .history(pb::HistoryRequest {
            group_id: g.id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::NotFound);
    assert_eq!(
        code(eve.send_group_text(99_999, "x").await.unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(eve.group_members(g.id, 0, 0).await.unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(eve.group_info(g.id).await.unwrap().my_role, 0);
    let members = owner.group_members(g.id, 0, 0).await.unwrap().members;
    let roles: Vec<(u64, i32)> = members.iter().map(|m| (m.user_id, m.role)).collect();
    assert_eq!(
        roles,
        vec![
            (owner_id, GroupRole::Owner as i32),
            (amy_id, GroupRole::Member as i32),
            (ben_id, GroupRole::Member as i32)
        ]
    );
    let page = owner.group_members(g.id, 1, 1).await.unwrap();
    assert_eq!(
        (page.members.len(), page.members[0].user_id, page.has_more),
        (1, amy_id, true)
    );
}

/// Who may do what: each row is (actor role, action on a target of some role) →
/// allowed or FORBIDDEN. Roles are set up fresh for each row.
#[tokio::test]
async fn permission_matrix() {
    let s = TestServer::start().await;
    let all = users(&s, &["own", "adm", "adm2", "mem", "mem2"]).await;
    let id = |i: usize| all[i].0;
    let c = |i: usize| &all[i].1;
    let (own, adm, adm2, mem, mem2) = (0, 1, 2, 3, 4);
    let fresh = || async {
        let g = c(own)
            .group_create(
                "m",
                vec![id(adm), id(adm2), id(mem), id(mem2)],
                JoinPolicy::Approval,
            )
            .await
            .unwrap();
        c(own)
            .group_set_role(g.id, id(adm), GroupRole::Admin)
            .await
            .unwrap();
        c(own)
            .group_set_role(g.id, id(adm2), GroupRole::Admin)
            .await
            .unwrap();
        g.id
    };
    let allowed = |r: Result<(), mychat_client::ClientError>| match r {
        Ok(()) => true,
        Err(e) => {
            assert_eq!(code(e), ErrorCode::Forbidden);
            false
        }
    };
    // kick
    for (actor, target, ok) in [
        (own, adm, true),
        (own, mem, true),
        (adm, mem, true),
        (adm, adm2, false),
        (adm, own, false),
        (mem, mem2, false),
        (mem, adm, false),
    ] {
        let g = fresh().await;
        assert_eq!(
            allowed(c(actor).group_kick(g, id(target)).await),
            ok,
            "kick {actor}->{target}"
        );
    }
    // mute
    for (actor, target, ok) in [
        (own, adm, true),
        (adm, mem, true),
        (adm, adm2, false),
        (adm, own, false),
        (mem, mem2, false),
    ] {
        let g = fresh().await;
        assert_eq!(
            allowed(c(actor).group_mute(g, id(target), 60).await),
            ok,
            "mute {actor}->{target}"
        );
    }
    // set role, transfer, dissolve: owner only
    for (actor, ok) in [(own, true), (adm, false), (mem, false)] {
        let g = fresh().await;
        assert_eq!(
            allowed(c(actor).group_set_role(g, id(mem2), GroupRole::Admin).await),
            ok,
            "set_role by {actor}"
        );
        let g = fresh().await;
        assert_eq!(
            allowed(c(actor).group_transfer(g, id(mem2)).await),
            ok,
            "transfer by {actor}"
        );
        let g = fresh().await;
        assert_eq!(
            allowed(c(actor).group_dissolve(g).await),
            ok,
            "dissolve by {actor}"
        );
    }
    // update and invite (approval group): owner and admins
    let extra = s.register("extra").await;
    for (actor, ok) in [(own, true), (adm, true), (mem, false)] {
        let g = fresh().await;
        let r = c(actor)
            .group_update(pb::GroupUpdateRequest {
                group_id: g,
                name: Some("renamed".into()),
                ..Default::default()
            })
            .await
            .map(|_| ());
        assert_eq!(allowed(r), ok, "update by {actor}");
        let g = fresh().await;
        assert_eq!(
            allowed(c(actor).group_invite(g, vec![extra]).await),
            ok,
            "invite by {actor}"
        );
    }
    // In an OPEN group any member may invite.
    let g = c(own)
        .group_create("open", vec![id(mem)], JoinPolicy::Open)
        .await
        .unwrap();
    c(mem).group_invite(g.id, vec![extra]).await.unwrap();
    // Roles that cannot be set, and the owner cannot leave.
    let g = fresh().await;
    assert_eq!(
        code(
            c(own)
                .group_set_role(g, id(mem), GroupRole::Owner)
                .await
                .unwrap_err()
        ),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(c(own).group_leave(g).await.unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(c(own).group_kick(g, id(own)).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(c(own).group_kick(g, extra).await.unwrap_err()),
        ErrorCode::NotFound
    );
    // Transfer: the new owner has the owner's powers, the old one is an admin.
    c(own).group_transfer(g, id(mem)).await.unwrap();
    let info = c(mem).group_info(g).await.unwrap();
    assert_eq!(
        (info.group.unwrap().owner_id, info.my_role),
        (id(mem), GroupRole::Owner as i32)
    );
    assert_eq!(
        c(own).group_info(g).await.unwrap().my_role,
        GroupRole::Admin as i32
    );
    c(own).group_leave(g).await.unwrap();
}

#[tokio::test]
async fn mutes_and_mute_all() {
    let s = TestServer::start().await;
    let all = users(&s, &["own", "adm", "mem"]).await;
    let (own, adm, mem) = (&all[0].1, &all[1].1, &all[2].1);
    let g = own
        .group_create("m", vec![all[1].0, all[2].0], JoinPolicy::Approval)
        .await
        .unwrap()
        .id;
    own.group_set_role(g, all[1].0, GroupRole::Admin)
        .await
        .unwrap();
    adm.group_mute(g, all[2].0, 3600).await.unwrap();
    let e = mem.send_group_text(g, "can I talk?").await.unwrap_err();
    assert_eq!(code(e.clone()), ErrorCode::Forbidden);
    assert!(
        e.to_string().contains("muted in this group until") && e.to_string().contains("UTC"),
        "{e}"
    );
    let members = own.group_members(g, 0, 0).await.unwrap().members;
    assert!(
        members
            .iter()
            .find(|m| m.user_id == all[2].0)
            .unwrap()
            .muted_until_ms
            > 0
    );
    adm.group_mute(g, all[2].0, 0).await.unwrap();
    mem.send_group_text(g, "I can talk").await.unwrap();
    own.group_update(pb::GroupUpdateRequest {
        group_id: g,
        mute_all: Some(true),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = mem.send_group_text(g, "still?").await.unwrap_err();
    assert!(
        code(e.clone()) == ErrorCode::Forbidden && e.to_string().contains("muted"),
        "{e}"
    );
    adm.send_group_text(g, "admins may speak").await.unwrap();
    own.send_group_text(g, "owners too").await.unwrap();
    // The history holds every change as a system message.
    let h = own
        .history(pb::HistoryRequest {
            group_id: g,
            ..Default::default()
        })
        .await
        .unwrap();
    let kinds: Vec<i32> = h
        .messages
        .iter()
        .filter(|m| m.kind == pb::MessageKind::System as i32)
        .map(|m| event(m).kind)
        .collect();
    use pb::system_event::Kind as K;
    assert_eq!(
        kinds,
        vec![
            K::GroupCreated as i32,
            K::RoleChanged as i32,
            K::MemberMuted as i32,
            K::MemberMuted as i32,
            K::MuteAllChanged as i32
        ]
    );
}

#[tokio::test]
async fn joining_open_and_by_approval() {
    let s = TestServer::start().await;
    let all = users(&s, &["own", "adm", "joe", "kim"]).await;
    let (own, adm, joe, kim) = (&all[0].1, &all[1].1, &all[2].1, &all[3].1);
    let (joe_id, kim_id) = (all[2].0, all[3].0);
    let mut adm_p = adm.take_pushes().unwrap();
    let mut joe_p = joe.take_pushes().unwrap();
    let mut kim_p = kim.take_pushes().unwrap();
    let open = own
        .group_create("open", vec![], JoinPolicy::Open)
        .await
        .unwrap()
        .id;
    assert!(joe.group_join(open, "").await.unwrap());
    assert_eq!(
        code(joe.group_join(open, "").await.unwrap_err()),
        ErrorCode::Conflict
    );
    let closed = own
        .group_create("closed", vec![all[1].0], JoinPolicy::Approval)
        .await
        .unwrap()
        .id;
    own.group_set_role(closed, all[1].0, GroupRole::Admin)
        .await
        .unwrap();
    assert!(!joe.group_join(closed, "please").await.unwrap());
    assert!(!kim.group_join(closed, "me too").await.unwrap());
    // The admin is told of both. (In either order: each request's push leaves from
    // its requester's shard, and one handed to another shard can be overtaken by one
    // delivered on the admin's own.)
    let mut told = Vec::new();
    while told.len() < 2 {
        if let Push::GroupJoinRequest(r) = next_push(&mut adm_p).await {
            told.push((r.group_id, r.user_id, r.message));
        }
    }
    told.sort();
    assert_eq!(
        told,
        [
            (closed, joe_id, "please".to_string()),
            (closed, kim_id, "me too".to_string())
        ]
    );
    assert_eq!(own.group_join_requests(closed).await.unwrap().len(), 2);
    assert_eq!(
        code(joe.group_join_requests(closed).await.unwrap_err()),
        ErrorCode::Forbidden
    );
    // Not a member yet.
    assert_eq!(
        code(joe.send_group_text(closed, "hi").await.unwrap_err()),
        ErrorCode::Forbidden
    );
    adm.group_approve(closed, joe_id).await.unwrap();
    own.group_reject(closed, kim_id).await.unwrap();
    assert!(join_answer(&mut joe_p).await.approved);
    assert!(!join_answer(&mut kim_p).await.approved);
    joe.send_group_text(closed, "thanks").await.unwrap();
    assert_eq!(
        code(kim.send_group_text(closed, "hi").await.unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(own.group_approve(closed, kim_id).await.unwrap_err()),
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn leave_kick_dissolve() {
    let s = TestServer::start().await;
    let all = users(&s, &["own", "amy", "ben"]).await;
    let (own, amy, ben) = (&all[0].1, &all[1].1, &all[2].1);
    let (amy_id, ben_id) = (all[1].0, all[2].0);
    let mut ben_p = ben.take_pushes().unwrap();
    let g = own
        .group_create("g", vec![amy_id, ben_id], JoinPolicy::Approval)
        .await
        .unwrap();
    own.group_kick(g.id, ben_id).await.unwrap();
    // Ben hears of it (membership event and the notice), then is out.
    let mut saw_notice = false;
    let mut saw_membership = false;
    while !(saw_notice && saw_membership) {
        match next_push(&mut ben_p).await {
            Push::GroupMembership(m) if !m.membership.as_ref().unwrap().member => {
                saw_membership = true
            }
            Push::Message(m)
                if m.message.as_ref().is_some_and(|m| {
                    m.kind == pb::MessageKind::System as i32
                        && event(m).kind == pb::system_event::Kind::MemberKicked as i32
                }) =>
            {
                saw_notice = true
            }
            _ => {}
        }
    }
    assert_eq!(
        code(ben.send_group_text(g.id, "x").await.unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(
            ben.history(pb::HistoryRequest {
                group_id: g.id,
                ..Default::default()
            })
            .await
            .unwrap_err()
        ),
        ErrorCode::NotFound
    );
    own.send_group_text(g.id, "without ben").await.unwrap();
    no_push(&mut ben_p, 200).await;
    amy.group_leave(g.id).await.unwrap();
    assert_eq!(
        own.group_info(g.id)
            .await
            .unwrap()
            .group
            .unwrap()
            .member_count,
        1
    );
    assert!(amy.groups().await.unwrap().is_empty());
    own.group_dissolve(g.id).await.unwrap();
    assert_eq!(
        code(own.group_info(g.id).await.unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(own.send_group_text(g.id, "x").await.unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(own.group_invite(g.id, vec![amy_id]).await.unwrap_err()),
        ErrorCode::NotFound
    );
    // Its history stays readable to the owner who saw it.
    let h = own
        .history(pb::HistoryRequest {
            group_id: 0,
            conversation_id: g.conversation_id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        event(h.messages.last().unwrap()).kind,
        pb::system_event::Kind::GroupDissolved as i32
    );
}

#[tokio::test]
async fn group_size_limit() {
    let s = TestServer::start_with(|c| c.groups.max_members = 3).await;
    let all = users(&s, &["own", "aaa", "bbb", "ccc"]).await;
    let ids: Vec<u64> = all.iter().map(|x| x.0).collect();
    let own = &all[0].1;
    let e = own
        .group_create("big", ids[1..].to_vec(), JoinPolicy::Open)
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::PayloadTooLarge);
    let g = own
        .group_create("ok", ids[1..3].to_vec(), JoinPolicy::Open)
        .await
        .unwrap();
    assert_eq!(
        code(own.group_invite(g.id, vec![ids[3]]).await.unwrap_err()),
        ErrorCode::PayloadTooLarge
    );
    assert_eq!(
        code(all[3].1.group_join(g.id, "").await.unwrap_err()),
        ErrorCode::PayloadTooLarge
    );
    assert_eq!(
        code(
            own.group_create("", vec![], JoinPolicy::Open)
                .await
                .unwrap_err()
        ),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(
            own.group_create("x", vec![99_999], JoinPolicy::Open)
                .await
                .unwrap_err()
        ),
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn recall_direct_and_group() {
    let s = TestServer::start_with(|c| c.messages.recall_window_secs = 1).await;
    let all = users(&s, &["amy", "ben"]).await;
    let (amy, ben) = (&all[0].1, &all[1].1);
    let ben_id = all[1].0;
    let mut ben_p = ben.take_pushes().unwrap();
    let ack = amy.send_text(ben_id, "oops").await.unwrap();
    next_message(&mut ben_p).await;
    assert_eq!(
        code(ben.recall(ack.message_id).await.unwrap_err()),
        ErrorCode::Forbidden
    );
    let notice_seq = amy.recall(ack.message_id).await.unwrap();
    assert_eq!(notice_seq, 2);
    let p = next_message(&mut ben_p).await;
    let n = p.message.unwrap();
    let ev = event(&n);
    assert_eq!(
        (ev.kind, ev.message_id, ev.message_seq),
        (
            pb::system_event::Kind::MessageRecalled as i32,
            ack.message_id,
            1
        )
    );
    // History and sync show it recalled.
    let h = ben
        .history(pb::HistoryRequest {
            peer_user_id: all[0].0,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(h.messages[0].recalled && h.messages[0].text.is_empty());
    let sync = ben.sync(Some(0), 0).await.unwrap();
    let first = sync.updates.iter().find_map(|u| match &u.event {
        Some(pb::update::Event::Message(m)) if m.id == ack.message_id => Some(m.clone()),
        _ => None,
    });
    assert!(first.unwrap().recalled);
    assert_eq!(
        code(amy.recall(ack.message_id).await.unwrap_err()),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(amy.recall(99_999).await.unwrap_err()),
        ErrorCode::NotFound
    );
    // Past the window.
    let late = amy.send_text(ben_id, "too late").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let e = amy.recall(late.message_id).await.unwrap_err();
    assert!(
        code(e.clone()) == ErrorCode::Forbidden && e.to_string().contains("window"),
        "{e}"
    );
    // A group message.
    let g = amy
        .group_create("g", vec![ben_id], JoinPolicy::Open)
        .await
        .unwrap();
    let gm = amy.send_group_text(g.id, "group oops").await.unwrap();
    amy.recall(gm.message_id).await.unwrap();
    let h = ben
        .history(pb::HistoryRequest {
            group_id: g.id,
            ..Default::default()
        })
        .await
        .unwrap();
    let orig = h.messages.iter().find(|m| m.id == gm.message_id).unwrap();
    assert!(orig.recalled && orig.text.is_empty());
    assert_eq!(
        event(h.messages.last().unwrap()).kind,
        pb::system_event::Kind::MessageRecalled as i32
    );
}

#[tokio::test]
async fn delete_for_me_hides_only_mine() {
    let s = TestServer::start().await;
    let all = users(&s, &["amy", "ben", "cat"]).await;
    let (amy, ben, cat) = (&all[0].1, &all[1].1, &all[2].1);
    let (amy_id, ben_id) = (all[0].0, all[1].0);
    let m1 = amy.send_text(ben_id, "keep").await.unwrap();
    let m2 = amy.send_text(ben_id, "hide").await.unwrap();
    ben.delete_for_me(vec![m2.message_id]).await.unwrap();
    let h = ben
        .history(pb::HistoryRequest {
            peer_user_id: amy_id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        h.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![m1.message_id]
    );
    let h = amy
        .history(pb::HistoryRequest {
            peer_user_id: ben_id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(h.messages.len(), 2);
    let sync = ben.sync(Some(0), 0).await.unwrap();
    let ids: Vec<u64> = sync
        .updates
        .iter()
        .filter_map(|u| match &u.event {
            Some(pb::update::Event::Message(m)) => Some(m.id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, vec![m1.message_id]);
    assert_eq!(sync.pts, 2, "the cursor moves past what was hidden");
    assert_eq!(
        code(cat.delete_for_me(vec![m1.message_id]).await.unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(cat.delete_for_me(vec![]).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(cat.delete_for_me((1..=101).collect()).await.unwrap_err()),
        ErrorCode::PayloadTooLarge
    );
}

/// Members on both shards send at once; every member receives the group's messages in
/// strictly increasing seq, each exactly once (its own are acked, not pushed back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_group_senders_arrive_in_seq_order() {
    let s = TestServer::start().await;
    let all = users(&s, &["mem0", "mem1", "mem2", "mem3", "mem4", "mem5"]).await;
    let ids: Vec<u64> = all.iter().map(|x| x.0).collect();
    let g = all[0]
        .1
        .group_create("busy", ids[1..].to_vec(), JoinPolicy::Open)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for (id, c) in all {
        let c = std::sync::Arc::new(c);
        let mut rx = c.take_pushes().unwrap();
        let gid = g.id;
        tasks.push(tokio::spawn(async move {
            let mut sends = Vec::new();
            for k in 0..50 {
                let c = c.clone();
                sends.push(tokio::spawn(async move {
                    c.send_group_text(gid, &format!("{id}-{k}"))
                        .await
                        .unwrap()
                        .seq
                }));
            }
            let mut mine = Vec::new();
            for t in sends {
                mine.push(t.await.unwrap());
            }
            // Everyone else's 250 messages (plus the creation notice for members).
            let mut got = Vec::new();
            while got.len() < 250 {
                let m = next_message(&mut rx).await.message.unwrap();
                if m.kind == pb::MessageKind::Text as i32 {
                    got.push(m.seq);
                }
            }
            (mine, got)
        }));
    }
    for t in tasks {
        let (mine, got) = t.await.unwrap();
        assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
        let mut expected: Vec<u64> = (2..=301).filter(|s| !mine.contains(s)).collect();
        expected.sort();
        assert_eq!(got, expected);
    }
}

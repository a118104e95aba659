//! The embedded backend's social half: profiles, friends, blocks, categories, groups,
//! group messages, recall and delete-for-me. Writes run on the writer thread (the
//! `impl Writer` below), reads on the pooled read connections (the free functions).
//!
//! Groups: the writer keeps each touched group's state (settings and members) in
//! memory, exact because it is the only writer; a failed write or commit drops it and
//! it is reloaded. A group message is one row, whatever the group's size: members learn
//! of it by push and, on sync, by the group's head (its last seq against their read
//! mark), and pull it by seq. Only membership changes go into members' own streams.

use super::*;
use mychat_proto::{system_event, GroupRole, JoinPolicy, MessageKind, SystemEvent};
use prost::Message as _;

pub(super) const UPDATE_FRIEND: i64 = 3;
const UPDATE_GROUP: i64 = 4;
const CONV_GROUP: i64 = 2;
const ROLE_MEMBER: i32 = GroupRole::Member as i32;
const ROLE_ADMIN: i32 = GroupRole::Admin as i32;
const ROLE_OWNER: i32 = GroupRole::Owner as i32;

#[derive(Clone, Debug)]
pub(super) struct MemberState {
    role: i32,
    joined_ms: i64,
    muted_until_ms: i64,
}

/// A group as the writer holds it.
#[derive(Clone, Debug)]
pub(super) struct GroupState {
    id: u64,
    conv: ConvId,
    name: String,
    owner: UserId,
    policy: i32,
    mute_all: bool,
    created_ms: i64,
    members: HashMap<UserId, MemberState>,
    /// Members in join order, shared with the handlers for fan-out.
    list: Arc<Vec<UserId>>,
}

impl GroupState {
    fn info(&self, last_seq: u64) -> GroupInfo {
        GroupInfo {
            id: self.id,
            conv: self.conv,
            name: self.name.clone(),
            owner: self.owner,
            member_count: self.members.len() as u32,
            join_policy: self.policy,
            mute_all: self.mute_all,
            created_ms: self.created_ms,
            last_seq,
        }
    }
    fn role(&self, u: UserId) -> Option<i32> {
        self.members.get(&u).map(|m| m.role)
    }
    fn rebuild_list(&mut self) {
        let mut v: Vec<(i64, UserId)> = self
            .members
            .iter()
            .map(|(u, m)| (m.joined_ms, *u))
            .collect();
        v.sort();
        self.list = Arc::new(v.into_iter().map(|(_, u)| u).collect());
    }
}

fn forbidden(m: impl Into<String>) -> StoreError {
    StoreError::Forbidden(m.into())
}

/// "2026-11-29 19:42:38 UTC" for ms since the epoch.
pub(crate) fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn role_name(r: i32) -> &'static str {
    match r {
        ROLE_OWNER => "owner",
        ROLE_ADMIN => "admin",
        _ => "member",
    }
}

impl Writer {
    fn exec(&self, sql: &str, p: impl rusqlite::Params) -> Result<usize, StoreError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(p))
            .map_err(internal)
    }

    fn user_exists(&self, u: UserId) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached("SELECT 1 FROM users WHERE id=?1")
            .and_then(|mut s| s.exists([u.0 as i64]))
            .map_err(internal)
    }

    pub(super) fn blocked(&self, by: UserId, who: UserId) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached("SELECT 1 FROM blocks WHERE user_id=?1 AND blocked_id=?2")
            .and_then(|mut s| s.exists([by.0 as i64, who.0 as i64]))
            .map_err(internal)
    }

    pub(super) fn are_friends(&self, a: UserId, b: UserId) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached("SELECT 1 FROM friends WHERE user_id=?1 AND friend_id=?2")
            .and_then(|mut s| s.exists([a.0 as i64, b.0 as i64]))
            .map_err(internal)
    }

    /// Appends an event to `user`'s stream, with optional text (`data`).
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &mut self,
        user: UserId,
        kind: i64,
        conv: ConvId,
        seq: u64,
        msg_id: u64,
        actor: UserId,
        data: &str,
        d: &mut CacheDelta,
    ) -> Result<u64, StoreError> {
        let pts = self.push_update(
            user,
            StreamEvent {
                kind,
                conv,
                seq,
                msg_id,
                actor,
            },
            data,
            d,
        )?;
        Ok(pts)
    }

    /// Inserts a message at the conversation's next seq. `pts`: the sender's and the
    /// recipient's pts of a one-to-one message's stream events, which are then not
    /// logged ((0, 0): none, or logged).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn insert_message(
        &mut self,
        conv: ConvId,
        sender: UserId,
        recipient: UserId,
        group: u64,
        kind: i32,
        text: String,
        payload: bytes::Bytes,
        client_msg_id: String,
        now: i64,
        pts: (u64, u64),
        d: &mut CacheDelta,
    ) -> Result<Message, StoreError> {
        let seq = self.seq_of(conv)? + 1;
        let p: Option<&[u8]> = if payload.is_empty() {
            None
        } else {
            Some(&payload)
        };
        self.exec(
            "INSERT INTO messages(conv_id, seq, sender_id, recipient_id, kind, text, payload, client_msg_id, time_ms, group_id, sender_pts, recipient_pts)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![conv.0 as i64, seq as i64, sender.0 as i64, recipient.0 as i64, kind as i64, text, p, client_msg_id, now, group as i64, pts.0 as i64, pts.1 as i64],
        )?;
        let id = self.conn.last_insert_rowid() as u64;
        d.seqs.push((conv, seq));
        d.cids.push((sender, client_msg_id.clone(), id));
        self.batch_seq.insert(conv, seq);
        Ok(Message {
            id,
            conversation_id: conv.0,
            seq,
            sender_id: sender.0,
            recipient_id: recipient.0,
            group_id: group,
            kind,
            text,
            payload,
            client_msg_id,
            time_ms: now,
            recalled: false,
        })
    }

    /// A SYSTEM message in a conversation.
    #[allow(clippy::too_many_arguments)]
    fn system_message(
        &mut self,
        conv: ConvId,
        actor: UserId,
        recipient: UserId,
        group: u64,
        ev: SystemEvent,
        text: String,
        now: i64,
        d: &mut CacheDelta,
    ) -> Result<Message, StoreError> {
        let seq = self.seq_of(conv)? + 1;
        let cid = format!("sys:{}:{seq}", conv.0);
        self.insert_message(
            conv,
            actor,
            recipient,
            group,
            MessageKind::System as i32,
            text,
            bytes::Bytes::from(ev.encode_to_vec()),
            cid,
            now,
            (0, 0),
            d,
        )
    }

    // --- users ---

    pub(super) fn update_profile(
        &mut self,
        user: UserId,
        p: ProfilePatch,
    ) -> Result<UserRecord, StoreError> {
        self.exec(
            "UPDATE users SET nickname=COALESCE(?2, nickname), avatar=COALESCE(?3, avatar), signature=COALESCE(?4, signature) WHERE id=?1",
            params![user.0 as i64, p.nickname, p.avatar, p.signature],
        )?;
        self.conn
            .prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE id=?1"))
            .and_then(|mut s| s.query_row([user.0 as i64], user_row).optional())
            .map_err(internal)?
            .ok_or(StoreError::NotFound)
    }

    pub(super) fn set_last_seen(&mut self, seen: &[(UserId, i64)]) -> Result<(), StoreError> {
        for (user, ms) in seen {
            self.exec(
                "UPDATE users SET last_seen_ms=?2 WHERE id=?1",
                params![user.0 as i64, ms],
            )?;
        }
        Ok(())
    }

    // --- friends ---

    fn friend_event(
        &mut self,
        to: UserId,
        kind: i32,
        about: UserId,
        message: &str,
        d: &mut CacheDelta,
    ) -> Result<u64, StoreError> {
        self.stream(
            to,
            UPDATE_FRIEND,
            ConvId(0),
            kind as u64,
            0,
            about,
            message,
            d,
        )
    }

    /// Makes `a` and `b` friends (clearing requests either way) and writes the
    /// ACCEPTED event into both streams; returns each side's pts for it.
    fn befriend(
        &mut self,
        a: UserId,
        b: UserId,
        now: i64,
        d: &mut CacheDelta,
    ) -> Result<FriendPts, StoreError> {
        use mychat_proto::friend_event::Kind;
        for (x, y) in [(a, b), (b, a)] {
            self.exec(
                "INSERT OR IGNORE INTO friends(user_id, friend_id, since_ms) VALUES(?1, ?2, ?3)",
                params![x.0 as i64, y.0 as i64, now],
            )?;
            self.exec(
                "DELETE FROM friend_requests WHERE from_id=?1 AND to_id=?2",
                params![x.0 as i64, y.0 as i64],
            )?;
        }
        let me = self.friend_event(a, Kind::Accepted as i32, b, "", d)?;
        let them = self.friend_event(b, Kind::Accepted as i32, a, "", d)?;
        Ok(FriendPts { me, them })
    }

    pub(super) fn friend_request(
        &mut self,
        from: UserId,
        to: UserId,
        message: String,
        now: i64,
        d: &mut CacheDelta,
    ) -> Result<FriendRequestOutcome, StoreError> {
        use mychat_proto::friend_event::Kind;
        if from == to {
            return Err(StoreError::Invalid("cannot befriend yourself".into()));
        }
        if !self.user_exists(to)? {
            return Err(StoreError::NotFound);
        }
        if self.blocked(to, from)? {
            return Err(forbidden("this user has blocked you"));
        }
        if self.blocked(from, to)? {
            return Err(forbidden("you have blocked this user: unblock first"));
        }
        if self.are_friends(from, to)? {
            return Err(StoreError::Conflict);
        }
        let reverse = self
            .conn
            .prepare_cached("SELECT 1 FROM friend_requests WHERE from_id=?1 AND to_id=?2")
            .and_then(|mut s| s.exists([to.0 as i64, from.0 as i64]))
            .map_err(internal)?;
        if reverse {
            let pts = self.befriend(from, to, now, d)?;
            return Ok(FriendRequestOutcome::Accepted {
                my_pts: pts.me,
                their_pts: pts.them,
            });
        }
        self.exec(
            "INSERT INTO friend_requests(from_id, to_id, message, time_ms) VALUES(?1, ?2, ?3, ?4)
             ON CONFLICT(from_id, to_id) DO UPDATE SET message=excluded.message, time_ms=excluded.time_ms",
            params![from.0 as i64, to.0 as i64, message, now],
        )?;
        let to_pts = self.friend_event(to, Kind::RequestReceived as i32, from, &message, d)?;
        Ok(FriendRequestOutcome::Requested { to_pts })
    }

    pub(super) fn friend_answer(
        &mut self,
        me: UserId,
        requester: UserId,
        accept: bool,
        now: i64,
        d: &mut CacheDelta,
    ) -> Result<FriendPts, StoreError> {
        use mychat_proto::friend_event::Kind;
        let n = self.exec(
            "DELETE FROM friend_requests WHERE from_id=?1 AND to_id=?2",
            params![requester.0 as i64, me.0 as i64],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        if !accept {
            let them = self.friend_event(requester, Kind::Rejected as i32, me, "", d)?;
            return Ok(FriendPts { me: 0, them });
        }
        if self.blocked(me, requester)? || self.blocked(requester, me)? {
            return Err(forbidden("blocked"));
        }
        self.befriend(me, requester, now, d)
    }

    pub(super) fn friend_remove(
        &mut self,
        me: UserId,
        other: UserId,
        d: &mut CacheDelta,
    ) -> Result<FriendPts, StoreError> {
        use mychat_proto::friend_event::Kind;
        let n = self.exec(
            "DELETE FROM friends WHERE user_id=?1 AND friend_id=?2",
            params![me.0 as i64, other.0 as i64],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        self.exec(
            "DELETE FROM friends WHERE user_id=?1 AND friend_id=?2",
            params![other.0 as i64, me.0 as i64],
        )?;
        let mine = self.friend_event(me, Kind::Removed as i32, other, "", d)?;
        let them = self.friend_event(other, Kind::Removed as i32, me, "", d)?;
        Ok(FriendPts { me: mine, them })
    }

    pub(super) fn friend_remark(
        &mut self,
        me: UserId,
        other: UserId,
        remark: String,
    ) -> Result<(), StoreError> {
        let n = self.exec(
            "UPDATE friends SET remark=?3 WHERE user_id=?1 AND friend_id=?2",
            params![me.0 as i64, other.0 as i64, remark],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub(super) fn category_create(&mut self, me: UserId, name: String) -> Result<u64, StoreError> {
        self.exec(
            "INSERT INTO categories(user_id, name) VALUES(?1, ?2)",
            params![me.0 as i64, name],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    pub(super) fn category_rename(
        &mut self,
        me: UserId,
        id: u64,
        name: String,
    ) -> Result<(), StoreError> {
        let n = self.exec(
            "UPDATE categories SET name=?3 WHERE id=?2 AND user_id=?1",
            params![me.0 as i64, id as i64, name],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub(super) fn category_delete(&mut self, me: UserId, id: u64) -> Result<(), StoreError> {
        let n = self.exec(
            "DELETE FROM categories WHERE id=?2 AND user_id=?1",
            params![me.0 as i64, id as i64],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        self.exec(
            "UPDATE friends SET category_id=0 WHERE user_id=?1 AND category_id=?2",
            params![me.0 as i64, id as i64],
        )?;
        Ok(())
    }

    pub(super) fn friend_move(
        &mut self,
        me: UserId,
        friend: UserId,
        category: u64,
    ) -> Result<(), StoreError> {
        if category != 0 {
            let ok = self
                .conn
                .prepare_cached("SELECT 1 FROM categories WHERE id=?1 AND user_id=?2")
                .and_then(|mut s| s.exists([category as i64, me.0 as i64]))
                .map_err(internal)?;
            if !ok {
                return Err(StoreError::NotFound);
            }
        }
        let n = self.exec(
            "UPDATE friends SET category_id=?3 WHERE user_id=?1 AND friend_id=?2",
            params![me.0 as i64, friend.0 as i64, category as i64],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub(super) fn block(&mut self, me: UserId, other: UserId, now: i64) -> Result<(), StoreError> {
        if me == other {
            return Err(StoreError::Invalid("cannot block yourself".into()));
        }
        if !self.user_exists(other)? {
            return Err(StoreError::NotFound);
        }
        self.exec(
            "INSERT OR IGNORE INTO blocks(user_id, blocked_id, time_ms) VALUES(?1, ?2, ?3)",
            params![me.0 as i64, other.0 as i64, now],
        )?;
        self.exec(
            "DELETE FROM friend_requests WHERE from_id=?1 AND to_id=?2",
            params![other.0 as i64, me.0 as i64],
        )?;
        Ok(())
    }

    pub(super) fn unblock(&mut self, me: UserId, other: UserId) -> Result<(), StoreError> {
        let n = self.exec(
            "DELETE FROM blocks WHERE user_id=?1 AND blocked_id=?2",
            params![me.0 as i64, other.0 as i64],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    // --- groups ---

    fn group(&mut self, id: u64) -> Result<&mut GroupState, StoreError> {
        if !self.groups.contains_key(&id) {
            let row = self
                .conn
                .prepare_cached("SELECT conv_id, name, owner_id, join_policy, mute_all, created_ms FROM chat_groups WHERE id=?1 AND dissolved=0")
                .and_then(|mut s| {
                    s.query_row([id as i64], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?, r.get::<_, i64>(4)?, r.get::<_, i64>(5)?))
                    })
                    .optional()
                })
                .map_err(internal)?;
            let Some((conv, name, owner, policy, mute_all, created_ms)) = row else {
                return Err(StoreError::NotFound);
            };
            let mut members = HashMap::new();
            {
                let mut s = self
                    .conn
                    .prepare_cached("SELECT user_id, role, joined_ms, muted_until_ms FROM group_members WHERE group_id=?1")
                    .map_err(internal)?;
                let rows = s
                    .query_map([id as i64], |r| {
                        Ok((
                            UserId(r.get::<_, i64>(0)? as u64),
                            MemberState {
                                role: r.get::<_, i64>(1)? as i32,
                                joined_ms: r.get(2)?,
                                muted_until_ms: r.get(3)?,
                            },
                        ))
                    })
                    .map_err(internal)?;
                for row in rows {
                    let (u, m) = row.map_err(internal)?;
                    members.insert(u, m);
                }
            }
            let mut g = GroupState {
                id,
                conv: ConvId(conv as u64),
                name,
                owner: UserId(owner as u64),
                policy: policy as i32,
                mute_all: mute_all != 0,
                created_ms,
                members,
                list: Arc::new(Vec::new()),
            };
            g.rebuild_list();
            self.groups.insert(id, g);
        }
        Ok(self.groups.get_mut(&id).expect("just loaded"))
    }

    fn touch(&mut self, id: u64) {
        self.groups_dirty.push(id);
    }

    fn add_members(
        &mut self,
        gid: u64,
        users: &[UserId],
        now: i64,
        d: &mut CacheDelta,
    ) -> Result<Vec<(UserId, u64, bool)>, StoreError> {
        let conv = self.group(gid)?.conv;
        let mut events = Vec::with_capacity(users.len());
        for (i, u) in users.iter().enumerate() {
            // Distinct joined_ms keeps join order stable within one call.
            let joined = now * 1000 + i as i64;
            self.exec(
                "INSERT INTO group_members(group_id, user_id, role, joined_ms) VALUES(?1, ?2, ?3, ?4)",
                params![gid as i64, u.0 as i64, ROLE_MEMBER as i64, joined],
            )?;
            self.exec(
                "INSERT OR IGNORE INTO members(user_id, conv_id, read_seq) VALUES(?1, ?2, 0)",
                params![u.0 as i64, conv.0 as i64],
            )?;
            self.exec(
                "DELETE FROM group_join_requests WHERE group_id=?1 AND user_id=?2",
                params![gid as i64, u.0 as i64],
            )?;
            let g = self.group(gid)?;
            g.members.insert(
                *u,
                MemberState {
                    role: ROLE_MEMBER,
                    joined_ms: joined,
                    muted_until_ms: 0,
                },
            );
            let pts = self.stream(*u, UPDATE_GROUP, conv, 1, gid, *u, "", d)?;
            events.push((*u, pts, true));
        }
        self.group(gid)?.rebuild_list();
        Ok(events)
    }

    fn remove_member(
        &mut self,
        gid: u64,
        u: UserId,
        d: &mut CacheDelta,
    ) -> Result<(UserId, u64, bool), StoreError> {
        let conv = self.group(gid)?.conv;
        self.exec(
            "DELETE FROM group_members WHERE group_id=?1 AND user_id=?2",
            params![gid as i64, u.0 as i64],
        )?;
        self.exec(
            "DELETE FROM members WHERE user_id=?1 AND conv_id=?2",
            params![u.0 as i64, conv.0 as i64],
        )?;
        let g = self.group(gid)?;
        g.members.remove(&u);
        g.rebuild_list();
        let pts = self.stream(u, UPDATE_GROUP, conv, 0, gid, u, "", d)?;
        Ok((u, pts, false))
    }

    fn change(
        &mut self,
        gid: u64,
        notice: Option<Message>,
        removed: Vec<UserId>,
        membership: Vec<(UserId, u64, bool)>,
    ) -> Result<GroupChange, StoreError> {
        let conv = self.group(gid)?.conv;
        let last = self.seq_of(conv)?;
        let g = self.group(gid)?;
        let (info, members) = (g.info(last), g.list.clone());
        if let Some(message) = notice {
            self.publications.push(Publication::Group {
                message,
                members,
                extra: removed,
                origin: None,
            });
        }
        Ok(GroupChange { info, membership })
    }

    fn group_notice(
        &mut self,
        gid: u64,
        actor: UserId,
        ev: SystemEvent,
        text: String,
        now: i64,
        d: &mut CacheDelta,
    ) -> Result<Message, StoreError> {
        let conv = self.group(gid)?.conv;
        self.system_message(conv, actor, UserId(0), gid, ev, text, now, d)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn group_create(
        &mut self,
        owner: UserId,
        name: String,
        members: Vec<UserId>,
        policy: i32,
        now: i64,
        max: u32,
        d: &mut CacheDelta,
    ) -> Result<GroupChange, StoreError> {
        let mut seen = std::collections::HashSet::new();
        seen.insert(owner);
        let members: Vec<UserId> = members.into_iter().filter(|u| seen.insert(*u)).collect();
        if members.len() + 1 > max as usize {
            return Err(StoreError::Limit(format!(
                "a group holds at most {max} members"
            )));
        }
        for u in &members {
            if !self.user_exists(*u)? {
                return Err(StoreError::NotFound);
            }
        }
        let policy = if policy == JoinPolicy::Open as i32 {
            policy
        } else {
            JoinPolicy::Approval as i32
        };
        self.exec(
            "INSERT INTO chat_groups(conv_id, name, owner_id, join_policy, created_ms) VALUES(0, ?1, ?2, ?3, ?4)",
            params![name, owner.0 as i64, policy as i64, now],
        )?;
        let gid = self.conn.last_insert_rowid() as u64;
        self.exec(
            "INSERT INTO conversations(kind, user_a, user_b, group_id) VALUES(?1, 0, 0, ?2)",
            params![CONV_GROUP, gid as i64],
        )?;
        let conv = ConvId(self.conn.last_insert_rowid() as u64);
        self.exec(
            "UPDATE chat_groups SET conv_id=?2 WHERE id=?1",
            params![gid as i64, conv.0 as i64],
        )?;
        self.exec(
            "INSERT INTO group_members(group_id, user_id, role, joined_ms) VALUES(?1, ?2, ?3, ?4)",
            params![
                gid as i64,
                owner.0 as i64,
                ROLE_OWNER as i64,
                now * 1000 - 1
            ],
        )?;
        self.exec(
            "INSERT INTO members(user_id, conv_id, read_seq) VALUES(?1, ?2, 0)",
            params![owner.0 as i64, conv.0 as i64],
        )?;
        self.touch(gid);
        let owner_pts = self.stream(owner, UPDATE_GROUP, conv, 1, gid, owner, "", d)?;
        let mut membership = vec![(owner, owner_pts, true)];
        membership.extend(self.add_members(gid, &members, now, d)?);
        let ev = SystemEvent {
            kind: system_event::Kind::GroupCreated as i32,
            actor: owner.0,
            targets: members.iter().map(|u| u.0).collect(),
            ..Default::default()
        };
        let notice = self.group_notice(
            gid,
            owner,
            ev,
            format!(
                "group \"{name}\" created with {} members",
                members.len() + 1
            ),
            now,
            d,
        )?;
        // The creator has read the group up to its own notice.
        self.exec(
            "UPDATE members SET read_seq=?3 WHERE user_id=?1 AND conv_id=?2",
            params![owner.0 as i64, conv.0 as i64, notice.seq as i64],
        )?;
        self.change(gid, Some(notice), Vec::new(), membership)
    }

    pub(super) fn group_op(
        &mut self,
        actor: UserId,
        gid: u64,
        op: GroupOp,
        now: i64,
        max: u32,
        d: &mut CacheDelta,
    ) -> Result<GroupChange, StoreError> {
        use system_event::Kind as K;
        self.touch(gid);
        let g = self.group(gid)?;
        let Some(my_role) = g.role(actor) else {
            return Err(forbidden("you are not a member of this group"));
        };
        let policy = g.policy;
        let need_admin = |what: &str| -> Result<(), StoreError> {
            if my_role >= ROLE_ADMIN {
                Ok(())
            } else {
                Err(forbidden(format!("only the owner and admins may {what}")))
            }
        };
        let ev = |kind: K| SystemEvent {
            kind: kind as i32,
            actor: actor.0,
            ..Default::default()
        };
        match op {
            GroupOp::Update {
                name,
                join_policy,
                mute_all,
            } => {
                need_admin("change the group")?;
                let g = self.group(gid)?;
                let mut parts = Vec::new();
                if let Some(n) = &name {
                    g.name = n.clone();
                    parts.push(format!("name \"{n}\""));
                }
                if let Some(p) = join_policy {
                    g.policy = if p == JoinPolicy::Open as i32 {
                        p
                    } else {
                        JoinPolicy::Approval as i32
                    };
                    parts.push(if g.policy == JoinPolicy::Open as i32 {
                        "open joining".to_string()
                    } else {
                        "joining by approval".to_string()
                    });
                }
                let mut event = ev(K::GroupUpdated);
                if let Some(m) = mute_all {
                    g.mute_all = m;
                    parts.push(if m {
                        "everyone muted".to_string()
                    } else {
                        "mute-all lifted".to_string()
                    });
                    event.flag = m;
                    if name.is_none() && join_policy.is_none() {
                        event.kind = K::MuteAllChanged as i32;
                    }
                }
                if parts.is_empty() {
                    return Err(StoreError::Invalid("nothing to change".into()));
                }
                let (n, p, m) = (g.name.clone(), g.policy, g.mute_all);
                self.exec(
                    "UPDATE chat_groups SET name=?2, join_policy=?3, mute_all=?4 WHERE id=?1",
                    params![gid as i64, n, p as i64, m as i64],
                )?;
                let notice = self.group_notice(
                    gid,
                    actor,
                    event,
                    format!("group changed: {}", parts.join(", ")),
                    now,
                    d,
                )?;
                self.change(gid, Some(notice), Vec::new(), Vec::new())
            }
            GroupOp::Dissolve => {
                if my_role != ROLE_OWNER {
                    return Err(forbidden("only the owner may dissolve the group"));
                }
                let notice = self.group_notice(
                    gid,
                    actor,
                    ev(K::GroupDissolved),
                    "group dissolved".into(),
                    now,
                    d,
                )?;
                let list: Vec<UserId> = self.group(gid)?.list.to_vec();
                let conv = self.group(gid)?.conv;
                let last = self.seq_of(conv)?;
                let info = self.group(gid)?.info(last);
                let mut membership = Vec::new();
                for u in &list {
                    // History stays readable to former members (their conversation
                    // membership is kept); the group is gone.
                    self.exec(
                        "DELETE FROM group_members WHERE group_id=?1 AND user_id=?2",
                        params![gid as i64, u.0 as i64],
                    )?;
                    let pts = self.stream(*u, UPDATE_GROUP, conv, 0, gid, *u, "", d)?;
                    membership.push((*u, pts, false));
                }
                self.exec(
                    "UPDATE chat_groups SET dissolved=1 WHERE id=?1",
                    [gid as i64],
                )?;
                self.exec(
                    "DELETE FROM group_join_requests WHERE group_id=?1",
                    [gid as i64],
                )?;
                self.groups.remove(&gid);
                self.publications.push(Publication::Group {
                    message: notice,
                    members: Arc::new(Vec::new()),
                    extra: list,
                    origin: None,
                });
                Ok(GroupChange {
                    info: GroupInfo {
                        member_count: 0,
                        ..info
                    },
                    membership,
                })
            }
            GroupOp::Invite(users) => {
                if policy != JoinPolicy::Open as i32 {
                    need_admin("invite (the group joins by approval)")?;
                }
                let g = self.group(gid)?;
                let mut seen = std::collections::HashSet::new();
                let new: Vec<UserId> = users
                    .into_iter()
                    .filter(|u| !g.members.contains_key(u) && seen.insert(*u))
                    .collect();
                if new.is_empty() {
                    return Err(StoreError::Conflict);
                }
                if g.members.len() + new.len() > max as usize {
                    return Err(StoreError::Limit(format!(
                        "a group holds at most {max} members"
                    )));
                }
                for u in &new {
                    if !self.user_exists(*u)? {
                        return Err(StoreError::NotFound);
                    }
                }
                let membership = self.add_members(gid, &new, now, d)?;
                let mut e = ev(K::MembersJoined);
                e.targets = new.iter().map(|u| u.0).collect();
                let notice = self.group_notice(
                    gid,
                    actor,
                    e,
                    format!("{} member(s) invited", new.len()),
                    now,
                    d,
                )?;
                self.change(gid, Some(notice), Vec::new(), membership)
            }
            GroupOp::Leave => {
                if my_role == ROLE_OWNER {
                    return Err(forbidden(
                        "the owner cannot leave: transfer ownership or dissolve the group",
                    ));
                }
                let mut e = ev(K::MemberLeft);
                e.targets = vec![actor.0];
                let notice = self.group_notice(gid, actor, e, "a member left".into(), now, d)?;
                let m = self.remove_member(gid, actor, d)?;
                self.change(gid, Some(notice), vec![actor], vec![m])
            }
            GroupOp::Kick(target) => {
                need_admin("remove members")?;
                if target == actor {
                    return Err(StoreError::Invalid("use GROUP_LEAVE to leave".into()));
                }
                let Some(their) = self.group(gid)?.role(target) else {
                    return Err(StoreError::NotFound);
                };
                if their >= my_role {
                    return Err(forbidden(format!(
                        "an {} cannot remove an {}",
                        role_name(my_role),
                        role_name(their)
                    )));
                }
                let mut e = ev(K::MemberKicked);
                e.targets = vec![target.0];
                let notice =
                    self.group_notice(gid, actor, e, "a member was removed".into(), now, d)?;
                let m = self.remove_member(gid, target, d)?;
                self.change(gid, Some(notice), vec![target], vec![m])
            }
            GroupOp::SetRole(target, role) => {
                if my_role != ROLE_OWNER {
                    return Err(forbidden("only the owner may change roles"));
                }
                if role != ROLE_ADMIN && role != ROLE_MEMBER {
                    return Err(StoreError::Invalid(
                        "role must be ADMIN or MEMBER (use GROUP_TRANSFER for OWNER)".into(),
                    ));
                }
                let Some(their) = self.group(gid)?.role(target) else {
                    return Err(StoreError::NotFound);
                };
                if their == ROLE_OWNER {
                    return Err(StoreError::Invalid(
                        "the owner's role changes only by transfer".into(),
                    ));
                }
                self.exec(
                    "UPDATE group_members SET role=?3 WHERE group_id=?1 AND user_id=?2",
                    params![gid as i64, target.0 as i64, role as i64],
                )?;
                if let Some(m) = self.group(gid)?.members.get_mut(&target) {
                    m.role = role;
                }
                let mut e = ev(K::RoleChanged);
                e.targets = vec![target.0];
                e.role = role;
                let notice = self.group_notice(
                    gid,
                    actor,
                    e,
                    format!("a member is now {}", role_name(role)),
                    now,
                    d,
                )?;
                self.change(gid, Some(notice), Vec::new(), Vec::new())
            }
            GroupOp::Transfer(target) => {
                if my_role != ROLE_OWNER {
                    return Err(forbidden("only the owner may transfer ownership"));
                }
                if target == actor {
                    return Err(StoreError::Invalid("you already own the group".into()));
                }
                if self.group(gid)?.role(target).is_none() {
                    return Err(StoreError::NotFound);
                }
                self.exec(
                    "UPDATE group_members SET role=?3 WHERE group_id=?1 AND user_id=?2",
                    params![gid as i64, target.0 as i64, ROLE_OWNER as i64],
                )?;
                self.exec(
                    "UPDATE group_members SET role=?3 WHERE group_id=?1 AND user_id=?2",
                    params![gid as i64, actor.0 as i64, ROLE_ADMIN as i64],
                )?;
                self.exec(
                    "UPDATE chat_groups SET owner_id=?2 WHERE id=?1",
                    params![gid as i64, target.0 as i64],
                )?;
                let g = self.group(gid)?;
                g.owner = target;
                if let Some(m) = g.members.get_mut(&target) {
                    m.role = ROLE_OWNER;
                }
                if let Some(m) = g.members.get_mut(&actor) {
                    m.role = ROLE_ADMIN;
                }
                let mut e = ev(K::OwnerTransferred);
                e.targets = vec![target.0];
                let notice =
                    self.group_notice(gid, actor, e, "ownership transferred".into(), now, d)?;
                self.change(gid, Some(notice), Vec::new(), Vec::new())
            }
            GroupOp::Mute(target, until) => {
                need_admin("mute members")?;
                let Some(their) = self.group(gid)?.role(target) else {
                    return Err(StoreError::NotFound);
                };
                if their >= my_role {
                    return Err(forbidden(format!(
                        "an {} cannot mute an {}",
                        role_name(my_role),
                        role_name(their)
                    )));
                }
                self.exec(
                    "UPDATE group_members SET muted_until_ms=?3 WHERE group_id=?1 AND user_id=?2",
                    params![gid as i64, target.0 as i64, until],
                )?;
                if let Some(m) = self.group(gid)?.members.get_mut(&target) {
                    m.muted_until_ms = until;
                }
                let mut e = ev(K::MemberMuted);
                e.targets = vec![target.0];
                e.until_ms = until;
                let text = if until == 0 {
                    "a member was unmuted".to_string()
                } else {
                    format!("a member is muted until {}", utc(until))
                };
                let notice = self.group_notice(gid, actor, e, text, now, d)?;
                self.change(gid, Some(notice), Vec::new(), Vec::new())
            }
            GroupOp::Answer(user, approve) => {
                need_admin("answer join requests")?;
                let n = self.exec(
                    "DELETE FROM group_join_requests WHERE group_id=?1 AND user_id=?2",
                    params![gid as i64, user.0 as i64],
                )?;
                if n == 0 {
                    return Err(StoreError::NotFound);
                }
                if !approve {
                    return self.change(gid, None, Vec::new(), Vec::new());
                }
                if self.group(gid)?.members.contains_key(&user) {
                    return self.change(gid, None, Vec::new(), Vec::new());
                }
                if self.group(gid)?.members.len() + 1 > max as usize {
                    return Err(StoreError::Limit(format!(
                        "a group holds at most {max} members"
                    )));
                }
                let membership = self.add_members(gid, &[user], now, d)?;
                let mut e = ev(K::MembersJoined);
                e.targets = vec![user.0];
                let notice = self.group_notice(gid, actor, e, "a member joined".into(), now, d)?;
                self.change(gid, Some(notice), Vec::new(), membership)
            }
        }
    }

    pub(super) fn group_join(
        &mut self,
        user: UserId,
        gid: u64,
        message: String,
        now: i64,
        max: u32,
        d: &mut CacheDelta,
    ) -> Result<JoinOutcome, StoreError> {
        self.touch(gid);
        let g = self.group(gid)?;
        if g.members.contains_key(&user) {
            return Err(StoreError::Conflict);
        }
        if g.policy == JoinPolicy::Open as i32 {
            if g.members.len() + 1 > max as usize {
                return Err(StoreError::Limit(format!(
                    "a group holds at most {max} members"
                )));
            }
            let membership = self.add_members(gid, &[user], now, d)?;
            let e = SystemEvent {
                kind: system_event::Kind::MembersJoined as i32,
                actor: user.0,
                targets: vec![user.0],
                ..Default::default()
            };
            let notice = self.group_notice(gid, user, e, "a member joined".into(), now, d)?;
            let change = self.change(gid, Some(notice), Vec::new(), membership)?;
            return Ok(JoinOutcome::Joined(Box::new(change)));
        }
        let approvers = g
            .members
            .iter()
            .filter(|(_, m)| m.role >= ROLE_ADMIN)
            .map(|(u, _)| *u)
            .collect();
        self.exec(
            "INSERT INTO group_join_requests(group_id, user_id, message, time_ms) VALUES(?1, ?2, ?3, ?4)
             ON CONFLICT(group_id, user_id) DO UPDATE SET message=excluded.message, time_ms=excluded.time_ms",
            params![gid as i64, user.0 as i64, message, now],
        )?;
        Ok(JoinOutcome::Requested { approvers })
    }

    pub(super) fn send_group(
        &mut self,
        gid: u64,
        i: SendInput,
        d: &mut CacheDelta,
    ) -> Result<SendOutcome, StoreError> {
        let g = self.group(gid)?;
        let Some(m) = g.members.get(&i.sender) else {
            return Err(forbidden("you are not a member of this group"));
        };
        if m.muted_until_ms > i.now_ms {
            return Err(forbidden(format!(
                "you are muted in this group until {}",
                utc(m.muted_until_ms)
            )));
        }
        if g.mute_all && m.role < ROLE_ADMIN {
            return Err(forbidden(
                "the group is muted: only the owner and admins may speak",
            ));
        }
        let (conv, members) = (g.conv, g.list.clone());
        if let Some(message) = self.find_client_msg(i.sender, &i.client_msg_id)? {
            return Ok(SendOutcome {
                message,
                sender_pts: 0,
                duplicate: true,
            });
        }
        let message = self.insert_message(
            conv,
            i.sender,
            UserId(0),
            gid,
            i.kind,
            i.text,
            i.payload,
            i.client_msg_id,
            i.now_ms,
            (0, 0),
            d,
        )?;
        self.exec(
            "UPDATE members SET read_seq=?3 WHERE user_id=?1 AND conv_id=?2",
            params![i.sender.0 as i64, conv.0 as i64, message.seq as i64],
        )?;
        self.publications.push(Publication::Group {
            message: message.clone(),
            members,
            extra: Vec::new(),
            origin: i.origin,
        });
        Ok(SendOutcome {
            message,
            sender_pts: 0,
            duplicate: false,
        })
    }

    /// The message `sender` stored under `cid`, if any: the writer's map of entries
    /// not merged yet, then `client_ids` (see the client_ids module).
    pub(super) fn find_client_msg(
        &mut self,
        sender: UserId,
        cid: &str,
    ) -> Result<Option<Message>, StoreError> {
        if self.cids.needs_filter(sender) {
            self.load_resend_filter(sender);
        }
        let id = match self.cids.get(sender, cid) {
            Some(id) => Some(id as i64),
            None if self.cids.surely_not_stored(sender, cid) => None,
            None => {
                #[cfg(test)]
                RESEND_PROBES.lock().unwrap().push(self.db.clone());
                self.conn
                    .prepare_cached(
                        "SELECT msg_id FROM client_ids WHERE sender_id=?1 AND client_msg_id=?2",
                    )
                    .and_then(|mut s| {
                        s.query_row(params![sender.0 as i64, cid], |r| r.get(0))
                            .optional()
                    })
                    .map_err(internal)?
            }
        };
        let Some(id) = id else { return Ok(None) };
        self.conn
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages m WHERE m.id=?1"
            ))
            .and_then(|mut s| s.query_row([id], |r| message_at(r, 0)).optional())
            .map_err(internal)
    }

    /// Builds `sender`'s resend filter from its entries in `client_ids` (the
    /// client_ids module). Entries that cannot be read (an I/O error, a row that is
    /// not text) leave the sender without a filter, as past the bound: every lookup
    /// of theirs then probes the index, which is what decides, and the send goes on.
    /// Refusing it instead refused every send of that sender until a restart.
    fn load_resend_filter(&mut self, sender: UserId) {
        let max = client_ids::FILTER_MAX_ENTRIES;
        // Hashed from the rows' bytes: no `String` per entry.
        let stored: Result<Vec<u64>, rusqlite::Error> = self
            .conn
            .prepare_cached("SELECT client_msg_id FROM client_ids WHERE sender_id=?1 LIMIT ?2")
            .and_then(|mut s| {
                s.query_map(params![sender.0 as i64, max as i64 + 1], |r| {
                    match r.get_ref(0)? {
                        rusqlite::types::ValueRef::Text(t) => Ok(client_ids::cid_hash(t)),
                        v => Err(rusqlite::Error::InvalidColumnType(
                            0,
                            "client_msg_id".into(),
                            v.data_type(),
                        )),
                    }
                })?
                .collect()
            });
        let filter = match stored {
            Ok(stored) => (stored.len() <= max).then_some(stored),
            Err(e) => {
                tracing::warn!(error = %e, user = sender.0, "store: cannot read a sender's resend entries; its sends probe the index");
                None
            }
        };
        self.cids.set_filter(sender, filter);
    }

    fn visible(&mut self, user: UserId, m: &Message) -> Result<bool, StoreError> {
        if m.group_id == 0 {
            return Ok(m.sender_id == user.0 || m.recipient_id == user.0);
        }
        self.conn
            .prepare_cached("SELECT 1 FROM members WHERE user_id=?1 AND conv_id=?2")
            .and_then(|mut s| s.exists([user.0 as i64, m.conversation_id as i64]))
            .map_err(internal)
    }

    fn message_by_id(&self, id: u64) -> Result<Option<Message>, StoreError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages m WHERE m.id=?1"
            ))
            .and_then(|mut s| s.query_row([id as i64], |r| message_at(r, 0)).optional())
            .map_err(internal)
    }

    pub(super) fn recall(
        &mut self,
        user: UserId,
        id: u64,
        now: i64,
        window: i64,
        d: &mut CacheDelta,
    ) -> Result<Message, StoreError> {
        let Some(m) = self.message_by_id(id)? else {
            return Err(StoreError::NotFound);
        };
        if !self.visible(user, &m)? {
            return Err(StoreError::NotFound);
        }
        if m.sender_id != user.0 || m.kind == MessageKind::System as i32 {
            return Err(forbidden("only the sender may recall a message"));
        }
        if m.recalled {
            return Err(StoreError::Conflict);
        }
        if now - m.time_ms > window {
            return Err(forbidden(format!(
                "the recall window ({} s) has passed",
                window / 1000
            )));
        }
        self.exec(
            "UPDATE messages SET recalled=1, text='', payload=NULL WHERE id=?1",
            [id as i64],
        )?;
        let ev = SystemEvent {
            kind: system_event::Kind::MessageRecalled as i32,
            actor: user.0,
            message_id: id,
            message_seq: m.seq,
            ..Default::default()
        };
        let conv = ConvId(m.conversation_id);
        if m.group_id != 0 {
            let members = self
                .group(m.group_id)
                .map(|g| g.list.clone())
                .unwrap_or_default();
            let notice = self.system_message(
                conv,
                user,
                UserId(0),
                m.group_id,
                ev,
                "a message was recalled".into(),
                now,
                d,
            )?;
            self.publications.push(Publication::Group {
                message: notice.clone(),
                members,
                extra: Vec::new(),
                origin: None,
            });
            return Ok(notice);
        }
        let peer = UserId(m.recipient_id);
        let notice = self.system_message(
            conv,
            user,
            peer,
            0,
            ev,
            "a message was recalled".into(),
            now,
            d,
        )?;
        let mut pts = [0u64; 2];
        for (k, u) in [user, peer].into_iter().enumerate() {
            pts[k] = self.push_update(
                u,
                StreamEvent {
                    kind: UPDATE_MESSAGE,
                    conv,
                    seq: notice.seq,
                    msg_id: notice.id,
                    actor: user,
                },
                "",
                d,
            )?;
        }
        self.publications.push(Publication::Direct {
            message: notice.clone(),
            sender_pts: pts[0],
            recipient_pts: pts[1],
            origin: None,
        });
        Ok(notice)
    }

    pub(super) fn hide(&mut self, user: UserId, ids: Vec<u64>) -> Result<(), StoreError> {
        for id in ids {
            let Some(m) = self.message_by_id(id)? else {
                return Err(StoreError::NotFound);
            };
            if !self.visible(user, &m)? {
                return Err(StoreError::NotFound);
            }
            self.exec(
                "INSERT OR IGNORE INTO hidden(user_id, msg_id) VALUES(?1, ?2)",
                params![user.0 as i64, id as i64],
            )?;
        }
        Ok(())
    }
}

// --- reads ---

fn group_info_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GroupInfo> {
    Ok(GroupInfo {
        id: r.get::<_, i64>(0)? as u64,
        conv: ConvId(r.get::<_, i64>(1)? as u64),
        name: r.get(2)?,
        owner: UserId(r.get::<_, i64>(3)? as u64),
        join_policy: r.get::<_, i64>(4)? as i32,
        mute_all: r.get::<_, i64>(5)? != 0,
        created_ms: r.get(6)?,
        member_count: r.get::<_, i64>(7)? as u32,
        last_seq: r.get::<_, Option<i64>>(8)?.unwrap_or(0) as u64,
    })
}

const GROUP_INFO_SQL: &str =
    "SELECT g.id, g.conv_id, g.name, g.owner_id, g.join_policy, g.mute_all, g.created_ms,
       (SELECT COUNT(*) FROM group_members WHERE group_id = g.id),
       (SELECT MAX(seq) FROM messages WHERE conv_id = g.conv_id)
     FROM chat_groups g";

pub(super) fn group_info(c: &Connection, gid: u64) -> Result<Option<GroupInfo>, StoreError> {
    c.prepare_cached(&format!("{GROUP_INFO_SQL} WHERE g.id=?1 AND g.dissolved=0"))
        .and_then(|mut s| s.query_row([gid as i64], group_info_row).optional())
        .map_err(internal)
}

pub(super) fn user_groups(c: &Connection, user: UserId) -> Result<Vec<GroupInfo>, StoreError> {
    let mut s = c
        .prepare_cached(&format!("{GROUP_INFO_SQL} JOIN group_members gm ON gm.group_id = g.id WHERE gm.user_id=?1 AND g.dissolved=0 ORDER BY g.id"))
        .map_err(internal)?;
    let rows = s
        .query_map([user.0 as i64], group_info_row)
        .map_err(internal)?;
    rows.collect::<Result<_, _>>().map_err(internal)
}

pub(super) fn group_heads(
    c: &Connection,
    user: UserId,
) -> Result<Vec<(u64, ConvId, u64, u64)>, StoreError> {
    let mut s = c
        .prepare_cached(
            "SELECT g.id, g.conv_id, (SELECT MAX(seq) FROM messages WHERE conv_id = g.conv_id), mb.read_seq
             FROM group_members gm JOIN chat_groups g ON g.id = gm.group_id
             JOIN members mb ON mb.user_id = gm.user_id AND mb.conv_id = g.conv_id
             WHERE gm.user_id=?1",
        )
        .map_err(internal)?;
    let rows = s
        .query_map([user.0 as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                ConvId(r.get::<_, i64>(1)? as u64),
                r.get::<_, Option<i64>>(2)?.unwrap_or(0) as u64,
                r.get::<_, i64>(3)? as u64,
            ))
        })
        .map_err(internal)?;
    let mut out = Vec::new();
    for row in rows {
        let row = row.map_err(internal)?;
        if row.2 > row.3 {
            out.push(row);
        }
    }
    Ok(out)
}

pub(super) fn friends(
    c: &Connection,
    me: UserId,
    offset: u32,
    limit: u32,
) -> Result<(Vec<FriendRec>, bool), StoreError> {
    let cols: String = USER_COLS
        .split(", ")
        .map(|c| format!("u.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = c
        .prepare_cached(&format!(
            "SELECT {cols}, f.remark, f.category_id, f.since_ms FROM friends f JOIN users u ON u.id = f.friend_id
             WHERE f.user_id=?1 ORDER BY u.username LIMIT ?2 OFFSET ?3"
        ))
        .map_err(internal)?;
    let rows = s
        .query_map(params![me.0 as i64, limit as i64 + 1, offset as i64], |r| {
            Ok(FriendRec {
                user: user_row(r)?,
                remark: r.get(8)?,
                category: r.get::<_, i64>(9)? as u64,
                since_ms: r.get(10)?,
            })
        })
        .map_err(internal)?;
    let mut out: Vec<FriendRec> = rows.collect::<Result<_, _>>().map_err(internal)?;
    let more = out.len() > limit as usize;
    out.truncate(limit as usize);
    Ok((out, more))
}

pub(super) fn ids(c: &Connection, sql: &str, key: i64) -> Result<Vec<UserId>, StoreError> {
    let mut s = c.prepare_cached(sql).map_err(internal)?;
    let rows = s
        .query_map([key], |r| Ok(UserId(r.get::<_, i64>(0)? as u64)))
        .map_err(internal)?;
    rows.collect::<Result<_, _>>().map_err(internal)
}

pub(super) fn users_where(
    c: &Connection,
    sql_tail: &str,
    key: i64,
) -> Result<Vec<UserRecord>, StoreError> {
    let cols: String = USER_COLS
        .split(", ")
        .map(|c| format!("u.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = c
        .prepare_cached(&format!("SELECT {cols} FROM users u {sql_tail}"))
        .map_err(internal)?;
    let rows = s.query_map([key], user_row).map_err(internal)?;
    rows.collect::<Result<_, _>>().map_err(internal)
}

pub(super) fn friend_requests(
    c: &Connection,
    me: UserId,
) -> Result<Vec<PendingFriend>, StoreError> {
    let cols: String = USER_COLS
        .split(", ")
        .map(|c| format!("u.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = Vec::new();
    for (incoming, sql) in [
        (true, format!("SELECT {cols}, r.message, r.time_ms FROM friend_requests r JOIN users u ON u.id = r.from_id WHERE r.to_id=?1 ORDER BY r.time_ms")),
        (false, format!("SELECT {cols}, r.message, r.time_ms FROM friend_requests r JOIN users u ON u.id = r.to_id WHERE r.from_id=?1 ORDER BY r.time_ms")),
    ] {
        let mut s = c.prepare_cached(&sql).map_err(internal)?;
        let rows = s
            .query_map([me.0 as i64], |r| Ok(PendingFriend { user: user_row(r)?, message: r.get(8)?, time_ms: r.get(9)?, incoming }))
            .map_err(internal)?;
        for row in rows {
            out.push(row.map_err(internal)?);
        }
    }
    Ok(out)
}

pub(super) fn group_members(
    c: &Connection,
    gid: u64,
    offset: u32,
    limit: u32,
) -> Result<(Vec<GroupMemberRec>, bool), StoreError> {
    let mut s = c
        .prepare_cached("SELECT user_id, role, joined_ms, muted_until_ms FROM group_members WHERE group_id=?1 ORDER BY joined_ms, user_id LIMIT ?2 OFFSET ?3")
        .map_err(internal)?;
    let rows = s
        .query_map(params![gid as i64, limit as i64 + 1, offset as i64], |r| {
            Ok(GroupMemberRec {
                user: UserId(r.get::<_, i64>(0)? as u64),
                role: r.get::<_, i64>(1)? as i32,
                joined_ms: r.get::<_, i64>(2)? / 1000,
                muted_until_ms: r.get(3)?,
            })
        })
        .map_err(internal)?;
    let mut out: Vec<GroupMemberRec> = rows.collect::<Result<_, _>>().map_err(internal)?;
    let more = out.len() > limit as usize;
    out.truncate(limit as usize);
    Ok((out, more))
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(1_795_980_406_683), "2026-11-29 19:26:46 UTC");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}

//! Groups module (5000-5999). The store checks roles and limits inside its
//! transaction (it is the one writer, so checks and changes cannot interleave); this
//! module validates input and tells people: each change's SYSTEM notice goes to the
//! members (and to whoever it removed), membership events to the users concerned.
use super::me;
use super::users::too_long;
use super::{need_user, push_frame};
use crate::conn::ConnShared;
use crate::error::{ApiError, ApiResult};
use crate::ids::UserId;
use crate::router::{decode, encode, now_ms};
use crate::shard::ShardCtx;
use crate::store::{GroupChange, GroupInfo, GroupOp, JoinOutcome, StoreError};
use bytes::Bytes;
use mychat_proto::*;
use std::rc::Rc;

pub fn group_pb(g: &GroupInfo) -> Group {
    Group {
        id: g.id,
        conversation_id: g.conv.0,
        name: g.name.clone(),
        owner_id: g.owner.0,
        member_count: g.member_count,
        join_policy: g.join_policy,
        mute_all: g.mute_all,
        created_ms: g.created_ms,
        last_seq: g.last_seq,
    }
}

fn nf(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => ApiError::not_found("no such group, or no such member"),
        StoreError::Conflict => ApiError::new(ErrorCode::Conflict, "already a member"),
        e => e.into(),
    }
}

fn need_group(id: u64) -> ApiResult<u64> {
    if id == 0 {
        return Err(ApiError::bad_request("group_id is required"));
    }
    Ok(id)
}

/// Tells the users whose membership changed (their own streams).
fn publish(ctx: &ShardCtx, change: &GroupChange) {
    // The notice itself is pushed by the dispatcher (crate::dispatch), in commit order.
    for (u, pts, member) in &change.membership {
        let m = GroupMembershipPush {
            membership: Some(GroupMembership {
                group_id: change.info.id,
                conversation_id: change.info.conv.0,
                member: *member,
            }),
            pts: *pts,
        };
        ctx.deliver_to_user(*u, &push_frame(Command::GroupMembershipPush, &m), None);
    }
}

async fn check_group_count(ctx: &ShardCtx, user: UserId) -> ApiResult<()> {
    let max = ctx.shared.cfg.groups.max_groups_per_user;
    if ctx.shared.store.user_groups(user).await?.len() >= max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("a user belongs to at most {max} groups"),
        ));
    }
    Ok(())
}

fn check_name(ctx: &ShardCtx, name: &str) -> ApiResult<()> {
    if name.trim().is_empty() {
        return Err(ApiError::bad_request("a group needs a name"));
    }
    too_long("name", name, ctx.shared.cfg.groups.max_name_len)
}

pub async fn create(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: GroupCreateRequest = decode(body)?;
    check_name(ctx, &req.name)?;
    let max = ctx.shared.cfg.groups.max_members;
    if req.member_ids.len() >= max as usize {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("a group holds at most {max} members"),
        ));
    }
    check_group_count(ctx, s.user).await?;
    let members = req.member_ids.into_iter().map(UserId).collect();
    let change = ctx
        .shared
        .store
        .group_create(s.user, req.name, members, req.join_policy, now_ms(), max)
        .await
        .map_err(|e| {
            if e == StoreError::NotFound {
                ApiError::not_found("no such user among member_ids")
            } else {
                e.into()
            }
        })?;
    publish(ctx, &change);
    encode(&GroupCreateResponse {
        group: Some(group_pb(&change.info)),
    })
}

pub async fn info(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: GroupInfoRequest = decode(body)?;
    let gid = need_group(req.group_id)?;
    let g = ctx
        .shared
        .store
        .group_info(gid)
        .await?
        .ok_or_else(|| ApiError::not_found("no such group"))?;
    let role = ctx.shared.store.group_role(gid, s.user).await?.unwrap_or(0);
    encode(&GroupInfoResponse {
        group: Some(group_pb(&g)),
        my_role: role,
    })
}

async fn op(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    gid: u64,
    op: GroupOp,
) -> ApiResult<GroupChange> {
    let s = me(conn)?;
    let max = ctx.shared.cfg.groups.max_members;
    let change = ctx
        .shared
        .store
        .group_op(s.user, gid, op, now_ms(), max)
        .await
        .map_err(nf)?;
    publish(ctx, &change);
    Ok(change)
}

pub async fn update(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let req: GroupUpdateRequest = decode(body)?;
    let gid = need_group(req.group_id)?;
    if let Some(n) = &req.name {
        check_name(ctx, n)?;
    }
    if let Some(p) = req.join_policy {
        if JoinPolicy::try_from(p).is_err() {
            return Err(ApiError::bad_request("unknown join policy"));
        }
    }
    let change = op(
        ctx,
        conn,
        gid,
        GroupOp::Update {
            name: req.name,
            join_policy: req.join_policy,
            mute_all: req.mute_all,
        },
    )
    .await?;
    encode(&GroupUpdateResponse {
        group: Some(group_pb(&change.info)),
    })
}

pub async fn simple(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
    dissolve: bool,
) -> ApiResult<Bytes> {
    let req: GroupRef = decode(body)?;
    let gid = need_group(req.group_id)?;
    op(
        ctx,
        conn,
        gid,
        if dissolve {
            GroupOp::Dissolve
        } else {
            GroupOp::Leave
        },
    )
    .await?;
    encode(&GroupOkResponse {})
}

pub async fn invite(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let req: GroupUsersRequest = decode(body)?;
    let gid = need_group(req.group_id)?;
    if req.user_ids.is_empty() || req.user_ids.contains(&0) {
        return Err(ApiError::bad_request("user_ids are required"));
    }
    let max = ctx.shared.cfg.groups.max_members as usize;
    if req.user_ids.len() > max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("a group holds at most {max} members"),
        ));
    }
    op(
        ctx,
        conn,
        gid,
        GroupOp::Invite(req.user_ids.into_iter().map(UserId).collect()),
    )
    .await?;
    encode(&GroupOkResponse {})
}

pub async fn join(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: GroupJoinRequest = decode(body)?;
    let gid = need_group(req.group_id)?;
    too_long(
        "message",
        &req.message,
        ctx.shared.cfg.friends.max_request_message_len,
    )?;
    check_group_count(ctx, s.user).await?;
    let max = ctx.shared.cfg.groups.max_members;
    match ctx
        .shared
        .store
        .group_join(s.user, gid, req.message.clone(), now_ms(), max)
        .await
        .map_err(nf)?
    {
        JoinOutcome::Joined(change) => {
            publish(ctx, &change);
            encode(&GroupJoinResponse { joined: true })
        }
        JoinOutcome::Requested { approvers } => {
            let p = GroupJoinRequestPush {
                group_id: gid,
                user_id: s.user.0,
                message: req.message,
            };
            ctx.deliver_to_users(
                &approvers,
                &push_frame(Command::GroupJoinRequestPush, &p),
                None,
            );
            encode(&GroupJoinResponse { joined: false })
        }
    }
}

pub async fn answer(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
    approve: bool,
) -> ApiResult<Bytes> {
    let req: GroupUserRequest = decode(body)?;
    let gid = need_group(req.group_id)?;
    let user = need_user(req.user_id)?;
    op(ctx, conn, gid, GroupOp::Answer(user, approve)).await?;
    ctx.deliver_to_user(
        user,
        &push_frame(
            Command::GroupJoinAnswerPush,
            &GroupJoinAnswerPush {
                group_id: gid,
                approved: approve,
            },
        ),
        None,
    );
    encode(&GroupOkResponse {})
}

pub async fn kick(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let req: GroupUserRequest = decode(body)?;
    op(
        ctx,
        conn,
        need_group(req.group_id)?,
        GroupOp::Kick(need_user(req.user_id)?),
    )
    .await?;
    encode(&GroupOkResponse {})
}

pub async fn transfer(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let req: GroupUserRequest = decode(body)?;
    op(
        ctx,
        conn,
        need_group(req.group_id)?,
        GroupOp::Transfer(need_user(req.user_id)?),
    )
    .await?;
    encode(&GroupOkResponse {})
}

pub async fn set_role(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let req: GroupSetRoleRequest = decode(body)?;
    op(
        ctx,
        conn,
        need_group(req.group_id)?,
        GroupOp::SetRole(need_user(req.user_id)?, req.role),
    )
    .await?;
    encode(&GroupOkResponse {})
}

pub async fn mute(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let req: GroupMuteRequest = decode(body)?;
    let until = if req.seconds == 0 {
        0
    } else {
        now_ms() + req.seconds as i64 * 1000
    };
    op(
        ctx,
        conn,
        need_group(req.group_id)?,
        GroupOp::Mute(need_user(req.user_id)?, until),
    )
    .await?;
    encode(&GroupOkResponse {})
}

pub async fn members(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: GroupMembersRequest = decode(body)?;
    let gid = need_group(req.group_id)?;
    if ctx.shared.store.group_info(gid).await?.is_none() {
        return Err(ApiError::not_found("no such group"));
    }
    if ctx.shared.store.group_role(gid, s.user).await?.is_none() {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "you are not a member of this group",
        ));
    }
    let max = ctx.shared.cfg.groups.members_max_page;
    let limit = if req.limit == 0 {
        max
    } else {
        req.limit.min(max)
    };
    let (list, has_more) = ctx
        .shared
        .store
        .group_members(gid, req.offset, limit)
        .await?;
    let members = list
        .into_iter()
        .map(|m| GroupMember {
            user_id: m.user.0,
            role: m.role,
            joined_ms: m.joined_ms,
            muted_until_ms: m.muted_until_ms,
        })
        .collect();
    encode(&GroupMembersResponse { members, has_more })
}

pub async fn list(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let _req: GroupListRequest = decode(body)?;
    let groups = ctx.shared.store.user_groups(s.user).await?;
    encode(&GroupListResponse {
        groups: groups.iter().map(group_pb).collect(),
    })
}

pub async fn join_requests(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: GroupRef = decode(body)?;
    let gid = need_group(req.group_id)?;
    if ctx.shared.store.group_info(gid).await?.is_none() {
        return Err(ApiError::not_found("no such group"));
    }
    match ctx.shared.store.group_role(gid, s.user).await? {
        Some(r) if r >= GroupRole::Admin as i32 => {}
        _ => {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "only the owner and admins see join requests",
            ))
        }
    }
    let reqs = ctx.shared.store.group_join_requests(gid).await?;
    encode(&GroupJoinRequestsResponse {
        requests: reqs
            .into_iter()
            .map(|(u, message, _)| GroupJoinRequestPush {
                group_id: gid,
                user_id: u.0,
                message,
            })
            .collect(),
    })
}

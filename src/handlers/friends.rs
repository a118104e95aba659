//! Friends module (4000-4999): requests and answers (pushed, and in the streams for
//! sync), removal, remarks, categories, blocking, the friend list with presence.
use super::me;
use super::users::{too_long, user_pb};
use super::{need_user, push_frame};
use crate::conn::ConnShared;
use crate::directory::Aggregate;
use crate::error::{ApiError, ApiResult};
use crate::ids::UserId;
use crate::router::{decode, encode, now_ms};
use crate::shard::ShardCtx;
use crate::store::{FriendRequestOutcome, StoreError};
use bytes::Bytes;
use mychat_proto::*;
use std::rc::Rc;

fn map_nf(what: &'static str) -> impl Fn(StoreError) -> ApiError {
    move |e| match e {
        StoreError::NotFound => ApiError::not_found(what),
        StoreError::Conflict => ApiError::new(ErrorCode::Conflict, "already friends"),
        e => e.into(),
    }
}

/// The presence of a user as a status and last-seen time.
pub fn presence_of(ctx: &ShardCtx, u: UserId, stored_last_seen: i64) -> (PresenceStatus, i64) {
    match ctx.shared.dir.presence(u) {
        Aggregate::Online => (PresenceStatus::Online, 0),
        Aggregate::Away => (PresenceStatus::Away, 0),
        Aggregate::Offline => (
            PresenceStatus::Offline,
            ctx.shared.last_seen.get(u).unwrap_or(stored_last_seen),
        ),
    }
}

pub async fn request(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: FriendRequestRequest = decode(body)?;
    let to = need_user(req.user_id)?;
    too_long(
        "message",
        &req.message,
        ctx.shared.cfg.friends.max_request_message_len,
    )?;
    let now = now_ms();
    let out = ctx
        .shared
        .store
        .friend_request(s.user, to, req.message.clone(), now)
        .await
        .map_err(map_nf("no such user"))?;
    match out {
        FriendRequestOutcome::Requested { to_pts } => {
            let me_rec = ctx.shared.store.users_by_ids(vec![s.user]).await?;
            let p = FriendRequestPush {
                from: me_rec.first().map(user_pb),
                message: req.message,
                time_ms: now,
                pts: to_pts,
            };
            ctx.deliver_to_user(to, &push_frame(Command::FriendRequestPush, &p), None);
            encode(&FriendRequestResponse { accepted: false })
        }
        FriendRequestOutcome::Accepted { my_pts, their_pts } => {
            ctx.deliver_to_user(
                to,
                &push_frame(
                    Command::FriendAnswerPush,
                    &FriendAnswerPush {
                        user_id: s.user.0,
                        accepted: true,
                        pts: their_pts,
                    },
                ),
                None,
            );
            ctx.deliver_to_user(
                s.user,
                &push_frame(
                    Command::FriendAnswerPush,
                    &FriendAnswerPush {
                        user_id: to.0,
                        accepted: true,
                        pts: my_pts,
                    },
                ),
                Some(conn.id),
            );
            encode(&FriendRequestResponse { accepted: true })
        }
    }
}

pub async fn answer(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
    accept: bool,
) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: FriendAnswerRequest = decode(body)?;
    let requester = need_user(req.user_id)?;
    let pts = ctx
        .shared
        .store
        .friend_answer(s.user, requester, accept, now_ms())
        .await
        .map_err(map_nf("no pending request from this user"))?;
    ctx.deliver_to_user(
        requester,
        &push_frame(
            Command::FriendAnswerPush,
            &FriendAnswerPush {
                user_id: s.user.0,
                accepted: accept,
                pts: pts.them,
            },
        ),
        None,
    );
    if accept {
        ctx.deliver_to_user(
            s.user,
            &push_frame(
                Command::FriendAnswerPush,
                &FriendAnswerPush {
                    user_id: requester.0,
                    accepted: true,
                    pts: pts.me,
                },
            ),
            Some(conn.id),
        );
    }
    encode(&FriendAnswerResponse {})
}

pub async fn remove(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: FriendRemoveRequest = decode(body)?;
    let other = need_user(req.user_id)?;
    let pts = ctx
        .shared
        .store
        .friend_remove(s.user, other, now_ms())
        .await
        .map_err(map_nf("not a friend"))?;
    ctx.deliver_to_user(
        other,
        &push_frame(
            Command::FriendRemovedPush,
            &FriendRemovedPush {
                user_id: s.user.0,
                pts: pts.them,
            },
        ),
        None,
    );
    ctx.deliver_to_user(
        s.user,
        &push_frame(
            Command::FriendRemovedPush,
            &FriendRemovedPush {
                user_id: other.0,
                pts: pts.me,
            },
        ),
        Some(conn.id),
    );
    encode(&FriendRemoveResponse {})
}

pub async fn remark(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: FriendRemarkRequest = decode(body)?;
    let other = need_user(req.user_id)?;
    too_long("remark", &req.remark, ctx.shared.cfg.users.max_nickname_len)?;
    ctx.shared
        .store
        .friend_remark(s.user, other, req.remark)
        .await
        .map_err(map_nf("not a friend"))?;
    encode(&FriendRemarkResponse {})
}

fn category_name(ctx: &ShardCtx, name: &str) -> ApiResult<()> {
    if name.is_empty() {
        return Err(ApiError::bad_request("a category needs a name"));
    }
    too_long("name", name, ctx.shared.cfg.users.max_nickname_len)
}

pub async fn category_create(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: CategoryCreateRequest = decode(body)?;
    category_name(ctx, &req.name)?;
    let max = ctx.shared.cfg.friends.max_categories;
    if ctx.shared.store.categories(s.user).await?.len() >= max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("at most {max} categories"),
        ));
    }
    let id = ctx.shared.store.category_create(s.user, req.name).await?;
    encode(&CategoryCreateResponse { category_id: id })
}

pub async fn category_rename(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: CategoryRenameRequest = decode(body)?;
    category_name(ctx, &req.name)?;
    if req.category_id == 0 {
        return Err(ApiError::bad_request(
            "the default category cannot be renamed",
        ));
    }
    ctx.shared
        .store
        .category_rename(s.user, req.category_id, req.name)
        .await
        .map_err(map_nf("no such category"))?;
    encode(&CategoryRenameResponse {})
}

pub async fn category_delete(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: CategoryDeleteRequest = decode(body)?;
    if req.category_id == 0 {
        return Err(ApiError::bad_request(
            "the default category cannot be deleted",
        ));
    }
    ctx.shared
        .store
        .category_delete(s.user, req.category_id)
        .await
        .map_err(map_nf("no such category"))?;
    encode(&CategoryDeleteResponse {})
}

pub async fn category_list(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let _req: CategoryListRequest = decode(body)?;
    let cats = ctx.shared.store.categories(s.user).await?;
    encode(&CategoryListResponse {
        categories: cats
            .into_iter()
            .map(|(id, name)| Category { id, name })
            .collect(),
    })
}

pub async fn move_friend(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: FriendMoveRequest = decode(body)?;
    let friend = need_user(req.user_id)?;
    ctx.shared
        .store
        .friend_move(s.user, friend, req.category_id)
        .await
        .map_err(map_nf("no such friend or category"))?;
    encode(&FriendMoveResponse {})
}

pub async fn block(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
    on: bool,
) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: BlockRequest = decode(body)?;
    let other = need_user(req.user_id)?;
    if on {
        ctx.shared
            .store
            .block(s.user, other, now_ms())
            .await
            .map_err(map_nf("no such user"))?;
    } else {
        ctx.shared
            .store
            .unblock(s.user, other)
            .await
            .map_err(map_nf("this user is not blocked"))?;
    }
    encode(&BlockResponse {})
}

pub async fn block_list(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let _req: BlockListRequest = decode(body)?;
    let users = ctx.shared.store.blocked_users(s.user).await?;
    encode(&BlockListResponse {
        users: users.iter().map(user_pb).collect(),
    })
}

pub async fn list(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: FriendListRequest = decode(body)?;
    let max = ctx.shared.cfg.friends.list_max_page;
    let limit = if req.limit == 0 {
        max
    } else {
        req.limit.min(max)
    };
    let (friends, has_more) = ctx.shared.store.friends(s.user, req.offset, limit).await?;
    let friends = friends
        .into_iter()
        .map(|f| {
            let (st, seen) = presence_of(ctx, f.user.id, f.user.last_seen_ms);
            Friend {
                user: Some(user_pb(&f.user)),
                remark: f.remark,
                category_id: f.category,
                since_ms: f.since_ms,
                presence: st as i32,
                last_seen_ms: seen,
            }
        })
        .collect();
    encode(&FriendListResponse { friends, has_more })
}

pub async fn requests(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let _req: FriendRequestsRequest = decode(body)?;
    let reqs = ctx.shared.store.friend_requests(s.user).await?;
    encode(&FriendRequestsResponse {
        requests: reqs
            .into_iter()
            .map(|r| PendingFriendRequest {
                user: Some(user_pb(&r.user)),
                message: r.message,
                time_ms: r.time_ms,
                incoming: r.incoming,
            })
            .collect(),
    })
}

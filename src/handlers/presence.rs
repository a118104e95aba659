//! Presence and typing (6000-6999). Status pushes are made by each shard's presence
//! task (see `crate::presence`); this module serves the requests.
use super::friends::presence_of;
use super::{me, push_frame};
use crate::conn::ConnShared;
use crate::error::{ApiError, ApiResult};
use crate::ids::UserId;
use crate::router::{decode, encode};
use crate::shard::ShardCtx;
use bytes::Bytes;
use mychat_proto::*;
use std::rc::Rc;

pub async fn set(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: PresenceSetRequest = decode(body)?;
    let away = match PresenceStatus::try_from(req.status) {
        Ok(PresenceStatus::Online) => false,
        Ok(PresenceStatus::Away) => true,
        _ => return Err(ApiError::bad_request("status must be ONLINE or AWAY")),
    };
    let (before, after) = ctx.shared.dir.set_away(s.user, ctx.id, conn.id, away);
    ctx.presence_changed(s.user, before, after);
    encode(&PresenceSetResponse {})
}

async fn lookup(ctx: &ShardCtx, ids: &[u64]) -> ApiResult<Vec<UserPresence>> {
    let users = ctx
        .shared
        .store
        .users_by_ids(ids.iter().map(|i| UserId(*i)).collect())
        .await?;
    Ok(users
        .iter()
        .map(|u| {
            let (st, seen) = presence_of(ctx, u.id, u.last_seen_ms);
            UserPresence {
                user_id: u.id.0,
                status: st as i32,
                last_seen_ms: seen,
            }
        })
        .collect())
}

fn check_count(ctx: &ShardCtx, n: usize) -> ApiResult<()> {
    let max = ctx.shared.cfg.presence.max_subscriptions;
    if n > max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("at most {max} users"),
        ));
    }
    Ok(())
}

pub async fn get(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    me(conn)?;
    let req: PresenceGetRequest = decode(body)?;
    check_count(ctx, req.user_ids.len())?;
    encode(&PresenceGetResponse {
        presences: lookup(ctx, &req.user_ids).await?,
    })
}

pub async fn subscribe(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    me(conn)?;
    let req: PresenceSubscribeRequest = decode(body)?;
    check_count(ctx, req.user_ids.len())?;
    let me_at = (ctx.id, conn.id);
    let old = std::mem::take(&mut *conn.watching.borrow_mut());
    for u in old {
        ctx.shared.watchers.remove(u, me_at);
    }
    let mut ids: Vec<u64> = req.user_ids.clone();
    ids.sort_unstable();
    ids.dedup();
    for u in &ids {
        ctx.shared.watchers.add(UserId(*u), me_at);
    }
    *conn.watching.borrow_mut() = ids.iter().map(|u| UserId(*u)).collect();
    encode(&PresenceSubscribeResponse {
        presences: lookup(ctx, &ids).await?,
    })
}

pub async fn typing(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: TypingRequest = decode(body)?;
    let store = &ctx.shared.store;
    let push = TypingPush {
        user_id: s.user.0,
        group_id: req.group_id,
        typing: req.typing,
    };
    let frame = push_frame(Command::TypingPush, &push);
    if req.group_id == 0 && (req.to_user_id == 0 || req.to_user_id == s.user.0) {
        return Err(ApiError::bad_request(
            "to_user_id (another user) or group_id is required",
        ));
    }
    if !conn.take_typing_token(ctx.shared.cfg.presence.typing_per_sec) {
        crate::metrics::Metrics::inc(&ctx.shared.metrics.typing_rate_limited_total);
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many typing notices; slow down",
        ));
    }
    match (req.to_user_id, req.group_id) {
        (to, 0) => {
            if store.users_by_ids(vec![UserId(to)]).await?.is_empty() {
                return Err(ApiError::not_found("no such user"));
            }
            if store.is_blocked(UserId(to), s.user).await? {
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    "this user has blocked you",
                ));
            }
            ctx.deliver_to_user(UserId(to), &frame, None);
            encode(&TypingResponse {})
        }
        (_, g) => {
            if store.group_role(g, s.user).await?.is_none() {
                if store.group_info(g).await?.is_none() {
                    return Err(ApiError::not_found("no such group"));
                }
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    "you are not a member of this group",
                ));
            }
            let members = store.group_member_ids(g).await?;
            let others: Vec<UserId> = members.into_iter().filter(|u| *u != s.user).collect();
            ctx.deliver_to_users(&others, &frame, None);
            encode(&TypingResponse {})
        }
    }
}

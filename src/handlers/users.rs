//! Users (2000-2999, beside auth): profiles and search.
use super::me;
use crate::conn::ConnShared;
use crate::error::{ApiError, ApiResult};
use crate::router::{decode, encode};
use crate::shard::ShardCtx;
use crate::store::{ProfilePatch, UserRecord};
use bytes::Bytes;
use mychat_proto::{
    ErrorCode, SearchUsersRequest, SearchUsersResponse, UpdateProfileRequest,
    UpdateProfileResponse, User,
};
use std::rc::Rc;

/// The public view of a user (never the password hash).
pub fn user_pb(u: &UserRecord) -> User {
    User {
        id: u.id.0,
        username: u.username.clone(),
        created_ms: u.created_ms,
        nickname: u.nickname.clone(),
        avatar: u.avatar.clone(),
        signature: u.signature.clone(),
    }
}

pub(crate) fn too_long(field: &str, v: &str, max: usize) -> ApiResult<()> {
    if v.len() > max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("{field} is over {max} bytes"),
        ));
    }
    Ok(())
}

pub async fn update_profile(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: UpdateProfileRequest = decode(body)?;
    let lim = &ctx.shared.cfg.users;
    if let Some(n) = &req.nickname {
        too_long("nickname", n, lim.max_nickname_len)?;
    }
    if let Some(a) = &req.avatar {
        too_long("avatar", a, lim.max_avatar_len)?;
    }
    if let Some(g) = &req.signature {
        too_long("signature", g, lim.max_signature_len)?;
    }
    if req.nickname.is_none() && req.avatar.is_none() && req.signature.is_none() {
        return Err(ApiError::bad_request("nothing to change"));
    }
    let patch = ProfilePatch {
        nickname: req.nickname,
        avatar: req.avatar,
        signature: req.signature,
    };
    let u = ctx.shared.store.update_profile(s.user, patch).await?;
    encode(&UpdateProfileResponse {
        user: Some(user_pb(&u)),
    })
}

pub async fn search(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    me(conn)?;
    let req: SearchUsersRequest = decode(body)?;
    if req.prefix.is_empty() || req.prefix.len() > 32 || req.after_username.len() > 64 {
        return Err(ApiError::bad_request("prefix must be 1-32 bytes"));
    }
    let max = ctx.shared.cfg.users.search_max_page;
    let limit = if req.limit == 0 {
        max
    } else {
        req.limit.min(max)
    };
    let (users, has_more) = ctx
        .shared
        .store
        .search_users(req.prefix, req.after_username, limit)
        .await?;
    encode(&SearchUsersResponse {
        users: users.iter().map(user_pb).collect(),
        has_more,
    })
}

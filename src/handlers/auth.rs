//! Auth and users module (2000-2999): REGISTER, LOGIN, REFRESH, LOGOUT, GET_USERS.
use crate::auth::{new_refresh_token, refresh_hash, AccessClaims, TokenError};
use crate::conn::{ConnShared, Session};
use crate::error::{ApiError, ApiResult};
use crate::ids::UserId;
use crate::router::{decode, encode, now_ms};
use crate::shard::ShardCtx;
use crate::store::{DeviceRecord, RefreshRecord, TakeRefresh, UserRecord};
use bytes::Bytes;
use mychat_proto::{
    login_request::Credential, ErrorCode, GetUsersRequest, GetUsersResponse, KickReason,
    LoginRequest, LoginResponse, LogoutRequest, LogoutResponse, Platform, RefreshRequest,
    RefreshResponse, RegisterRequest, RegisterResponse, Tokens, User,
};
use std::rc::Rc;
use std::sync::Arc;

/// Username rules: 3-32 bytes of [a-z0-9_.-], starting with a letter.
pub fn valid_username(u: &str) -> bool {
    (3..=32).contains(&u.len())
        && u.as_bytes()[0].is_ascii_lowercase()
        && u.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.' || b == b'-'
        })
}

fn check_password(ctx: &ShardCtx, p: &str) -> ApiResult<()> {
    let a = &ctx.shared.cfg.auth;
    if p.len() < a.min_password_len || p.len() > a.max_password_len {
        return Err(ApiError::bad_request(format!(
            "password must be {}-{} bytes",
            a.min_password_len, a.max_password_len
        )));
    }
    Ok(())
}

fn addr_key(conn: &ConnShared) -> String {
    format!("a:{}", conn.peer.ip())
}

pub async fn register(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let req: RegisterRequest = decode(body)?;
    if !valid_username(&req.username) {
        return Err(ApiError::bad_request(
            "username: 3-32 bytes of a-z, 0-9, _ . -, starting with a letter",
        ));
    }
    check_password(ctx, &req.password)?;
    let key = addr_key(conn);
    if ctx.shared.registrations.hit(&key) > ctx.shared.cfg.auth.registrations_per_addr_per_min {
        crate::metrics::Metrics::inc(&ctx.shared.metrics.registrations_throttled_total);
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many registrations from this address; try later",
        ));
    }
    let shared = ctx.shared.clone();
    let password = req.password;
    let hash = tokio::task::spawn_blocking(move || shared.hasher.hash(&password))
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(|e| {
            tracing::error!(error = %e, "password hashing failed");
            ApiError::internal()
        })?;
    let user = ctx
        .shared
        .store
        .create_user(req.username, hash, now_ms())
        .await
        .map_err(|e| match e {
            crate::store::StoreError::Conflict => {
                ApiError::new(ErrorCode::Conflict, "username is taken")
            }
            e => e.into(),
        })?;
    encode(&RegisterResponse { user_id: user.id.0 })
}

fn platform_of(p: i32) -> ApiResult<Platform> {
    match Platform::try_from(p) {
        Ok(Platform::Unspecified) | Err(_) => Err(ApiError::bad_request(
            "platform: desktop, mobile, web or tablet",
        )),
        Ok(p) => Ok(p),
    }
}

fn invalid() -> ApiError {
    ApiError::new(
        ErrorCode::InvalidCredentials,
        "invalid username, password or token",
    )
}

/// Signs an access token and stores a new refresh token for the device.
fn issue_access(ctx: &ShardCtx, user: UserId, device: &str, epoch: u64, now: i64) -> (String, i64) {
    let exp = now + ctx.shared.cfg.auth.access_token_ttl_secs as i64 * 1000;
    let t = ctx.shared.tokens.sign(&AccessClaims {
        user,
        epoch,
        expires_ms: exp,
        device_id: device.to_string(),
    });
    (t, exp)
}

pub async fn login(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let req: LoginRequest = decode(body)?;
    if req.device_id.is_empty() || req.device_id.len() > 64 {
        return Err(ApiError::bad_request("device_id must be 1-64 bytes"));
    }
    let platform = platform_of(req.platform)?;
    if ctx
        .shared
        .shutting_down
        .load(std::sync::atomic::Ordering::Acquire)
    {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "the server is shutting down",
        ));
    }
    let store = ctx.shared.store.clone();
    let now = now_ms();
    let refresh_ttl = ctx.shared.cfg.auth.refresh_token_ttl_secs as i64 * 1000;
    let (new_refresh, new_hash) = new_refresh_token();
    let user: UserRecord;
    let mut refresh_stored = false;
    // An access-token login keeps the refresh token the device already holds.
    let mut issue_refresh = true;
    // A token login refreshes its device row in the same writer call that checks it.
    let mut registered: Option<(DeviceRecord, u64)> = None;
    match req.credential {
        None => return Err(ApiError::bad_request("credential is missing")),
        Some(Credential::Password(p)) => {
            let auth = &ctx.shared.cfg.auth;
            let ukey = format!("u:{}", p.username);
            let akey = addr_key(conn);
            if ctx
                .shared
                .login_failures
                .blocked(&ukey, auth.failed_logins_per_user)
                || ctx
                    .shared
                    .login_failures
                    .blocked(&akey, auth.failed_logins_per_addr)
            {
                crate::metrics::Metrics::inc(&ctx.shared.metrics.logins_throttled_total);
                return Err(ApiError::new(
                    ErrorCode::RateLimited,
                    "too many failed logins; try again later",
                ));
            }
            if p.password.len() > auth.max_password_len || p.username.len() > 64 {
                return Err(invalid());
            }
            let found = store.user_by_name(p.username.clone()).await?;
            let shared: Arc<_> = ctx.shared.clone();
            let phc = found
                .as_ref()
                .map(|u| u.password_hash.clone())
                .unwrap_or_else(|| shared.dummy_hash.clone());
            let password = p.password;
            let ok = tokio::task::spawn_blocking(move || shared.hasher.verify(&password, &phc))
                .await
                .map_err(|_| ApiError::internal())?;
            match found {
                Some(u) if ok => {
                    ctx.shared.login_failures.clear(&ukey);
                    user = u;
                }
                _ => {
                    ctx.shared.login_failures.hit(&ukey);
                    ctx.shared.login_failures.hit(&akey);
                    return Err(invalid());
                }
            }
        }
        Some(Credential::RefreshToken(t)) => {
            if t.len() > 128 {
                return Err(invalid());
            }
            match store
                .take_refresh(refresh_hash(&t), new_hash, now + refresh_ttl, now)
                .await?
            {
                TakeRefresh::Unknown => return Err(invalid()),
                TakeRefresh::Expired => {
                    return Err(ApiError::new(
                        ErrorCode::TokenExpired,
                        "refresh token expired",
                    ))
                }
                TakeRefresh::Rotated(rec) => {
                    // A token presented by another device is burnt, not honoured.
                    if rec.device_id != req.device_id {
                        return Err(invalid());
                    }
                    refresh_stored = true;
                    user = store
                        .users_by_ids(vec![rec.user])
                        .await?
                        .pop()
                        .ok_or_else(invalid)?;
                }
            }
        }
        Some(Credential::AccessToken(t)) => {
            let claims = ctx.shared.tokens.verify(&t, now).map_err(|e| match e {
                TokenError::Expired => {
                    ApiError::new(ErrorCode::TokenExpired, "access token expired")
                }
                TokenError::Invalid => invalid(),
            })?;
            if claims.device_id != req.device_id {
                return Err(invalid());
            }
            let (dev, u, pts) = store
                .token_login(claims.user, claims.device_id, claims.epoch, platform, now)
                .await?
                .ok_or_else(invalid)?;
            issue_refresh = false;
            registered = Some((dev, pts));
            user = u;
        }
    }
    let (device, pts) = match registered {
        Some(r) => r,
        None => {
            store
                .register_device(user.id, req.device_id.clone(), platform, now)
                .await?
        }
    };
    if !refresh_stored && issue_refresh {
        store
            .put_refresh(RefreshRecord {
                hash: new_hash,
                user: user.id,
                device_id: req.device_id.clone(),
                platform,
                expires_ms: now + refresh_ttl,
            })
            .await?;
    }
    let (access, access_exp) = issue_access(ctx, user.id, &req.device_id, device.token_epoch, now);

    // A re-login on a logged-in connection replaces its session.
    let old = conn.session.borrow_mut().take();
    if let Some(old) = old {
        let (before, after) = ctx.shared.dir.unregister(old.user, ctx.id, conn.id);
        ctx.presence_changed(old.user, before, after);
    }
    let session = Session {
        user: user.id,
        username: user.username.clone(),
        device_id: req.device_id.as_str().into(),
        platform,
        cursor: device.cursor,
    };
    *conn.session.borrow_mut() = Some(session);
    conn.mark_logged_in();
    let me = conn.session_ref(ctx).expect("session just set");
    let (displaced, before, after) = ctx.shared.dir.register(user.id, me);
    ctx.presence_changed(user.id, before, after);
    for s in displaced {
        ctx.kick(
            &s,
            KickReason::LoggedInElsewhere,
            "logged in on another device of the same platform",
        )
        .await;
    }
    tracing::debug!(conn = conn.id.0, user = user.id.0, "logged in");
    encode(&LoginResponse {
        user_id: user.id.0,
        username: user.username,
        tokens: Some(Tokens {
            access_token: access,
            access_expires_ms: access_exp,
            refresh_token: if issue_refresh {
                new_refresh
            } else {
                String::new()
            },
            refresh_expires_ms: if issue_refresh { now + refresh_ttl } else { 0 },
        }),
        pts,
        has_cursor: device.cursor.is_some(),
        device_cursor: device.cursor.unwrap_or(0),
        server_time_ms: now,
    })
}

pub async fn refresh(ctx: &Rc<ShardCtx>, body: Bytes) -> ApiResult<Bytes> {
    let req: RefreshRequest = decode(body)?;
    if req.refresh_token.len() > 128 {
        return Err(invalid());
    }
    let now = now_ms();
    let ttl = ctx.shared.cfg.auth.refresh_token_ttl_secs as i64 * 1000;
    let (token, hash) = new_refresh_token();
    let store = &ctx.shared.store;
    match store
        .take_refresh(refresh_hash(&req.refresh_token), hash, now + ttl, now)
        .await?
    {
        TakeRefresh::Unknown => Err(invalid()),
        TakeRefresh::Expired => Err(ApiError::new(
            ErrorCode::TokenExpired,
            "refresh token expired",
        )),
        TakeRefresh::Rotated(rec) => {
            let dev = store
                .device(rec.user, rec.device_id.clone())
                .await?
                .ok_or_else(invalid)?;
            let (access, exp) = issue_access(ctx, rec.user, &rec.device_id, dev.token_epoch, now);
            encode(&RefreshResponse {
                tokens: Some(Tokens {
                    access_token: access,
                    access_expires_ms: exp,
                    refresh_token: token,
                    refresh_expires_ms: now + ttl,
                }),
            })
        }
    }
}

pub async fn logout(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let _req: LogoutRequest = decode(body)?;
    let s = conn
        .session()
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthenticated, "log in first"))?;
    ctx.shared
        .store
        .logout_device(s.user, s.device_id.to_string())
        .await?;
    let old = conn.session.borrow_mut().take();
    if let Some(s) = old {
        let (before, after) = ctx.shared.dir.unregister(s.user, ctx.id, conn.id);
        ctx.presence_changed(s.user, before, after);
    }
    encode(&LogoutResponse {})
}

pub async fn get_users(ctx: &Rc<ShardCtx>, body: Bytes) -> ApiResult<Bytes> {
    let req: GetUsersRequest = decode(body)?;
    if req.user_ids.len() + req.usernames.len() > 100 {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            "at most 100 users per request",
        ));
    }
    let store = &ctx.shared.store;
    let mut out: Vec<User> = Vec::new();
    let to_user = |u: UserRecord| super::users::user_pb(&u);
    if !req.user_ids.is_empty() {
        out.extend(
            store
                .users_by_ids(req.user_ids.into_iter().map(UserId).collect())
                .await?
                .into_iter()
                .map(to_user),
        );
    }
    let names: Vec<String> = req
        .usernames
        .into_iter()
        .filter(|n| n.len() <= 64)
        .collect();
    if !names.is_empty() {
        out.extend(store.users_by_names(names).await?.into_iter().map(to_user));
    }
    encode(&GetUsersResponse { users: out })
}

#[cfg(test)]
mod tests {
    #[test]
    fn username_rules() {
        for ok in ["alice", "bob_2", "a.b-c", "abc"] {
            assert!(super::valid_username(ok), "{ok}");
        }
        for bad in [
            "",
            "ab",
            "Alice",
            "1abc",
            "_abc",
            "a b c",
            "ab\u{e9}c",
            &"a".repeat(33),
        ] {
            assert!(!super::valid_username(bad), "{bad}");
        }
    }
}

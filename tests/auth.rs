//! REGISTER, LOGIN (password, refresh token, access token), REFRESH, LOGOUT,
//! GET_USERS, throttling, and the multi-device policy.
mod common;
use common::*;
use mychat_client::proto as pb;
use mychat_client::{Client, Push};
use pb::login_request::Credential;
use pb::{ErrorCode, Platform};

#[tokio::test]
async fn register_rules_and_conflict() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let id = c.register("alice", "password-alice").await.unwrap();
    assert!(id > 0);
    assert_eq!(
        code(c.register("alice", "another-password").await.unwrap_err()),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(c.register("Al", "password-x").await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(c.register("Alice", "password-x").await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(c.register("bob", "short").await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(c.register("bob", &"x".repeat(129)).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(c.register("bob", "password-bob").await.unwrap(), id + 1);
}

#[tokio::test]
async fn login_errors() {
    let s = TestServer::start().await;
    s.register("alice").await;
    let c = s.client().await;
    let e = c
        .login_password("alice", "wrong-password", "d1", Platform::Desktop)
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::InvalidCredentials);
    let e = c
        .login_password("nobody", "password-x", "d1", Platform::Desktop)
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::InvalidCredentials);
    let e = c
        .login_password("alice", "password-alice", "", Platform::Desktop)
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::BadRequest);
    let e = c
        .login_password("alice", "password-alice", "d1", Platform::Unspecified)
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::BadRequest);
    let e: mychat_client::ClientError = c
        .call::<_, pb::LoginResponse>(
            pb::Command::Login,
            &pb::LoginRequest {
                credential: None,
                device_id: "d".into(),
                platform: 1,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::BadRequest);
    let e = c
        .login(
            Credential::AccessToken("forged.token".into()),
            "d1",
            Platform::Desktop,
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::InvalidCredentials);
    let e = c
        .login(
            Credential::RefreshToken("unknown".into()),
            "d1",
            Platform::Desktop,
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::InvalidCredentials);
    // Still unauthenticated after failures.
    assert_eq!(
        code(c.sync(None, 0).await.unwrap_err()),
        ErrorCode::Unauthenticated
    );
    let r = c
        .login_password("alice", "password-alice", "d1", Platform::Desktop)
        .await
        .unwrap();
    assert_eq!(r.username, "alice");
    assert!(!r.has_cursor);
}

#[tokio::test]
async fn failed_logins_are_throttled_per_user() {
    let s = TestServer::start_with(|c| c.auth.failed_logins_per_user = 3).await;
    s.register("alice").await;
    let c = s.client().await;
    for _ in 0..3 {
        let e = c
            .login_password("alice", "wrong-password", "d1", Platform::Desktop)
            .await
            .unwrap_err();
        assert_eq!(code(e), ErrorCode::InvalidCredentials);
    }
    // Even the right password is refused while throttled.
    let e = c
        .login_password("alice", "password-alice", "d1", Platform::Desktop)
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::RateLimited);
    // Another user is not affected.
    s.register("bob").await;
    c.login_password("bob", "password-bob", "d1", Platform::Desktop)
        .await
        .unwrap();
}

#[tokio::test]
async fn failed_logins_are_throttled_per_address() {
    let s = TestServer::start_with(|c| c.auth.failed_logins_per_addr = 2).await;
    s.register("carol").await;
    let c = s.client().await;
    for u in ["x1", "x2"] {
        let e = c
            .login_password(u, "wrong-password", "d1", Platform::Desktop)
            .await
            .unwrap_err();
        assert_eq!(code(e), ErrorCode::InvalidCredentials);
    }
    let e = c
        .login_password("carol", "password-carol", "d1", Platform::Desktop)
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::RateLimited);
}

#[tokio::test]
async fn refresh_rotates_and_tokens_log_in() {
    let s = TestServer::start().await;
    s.register("alice").await;
    let (_c, r) = s.login("alice", "dev-a", Platform::Desktop).await;
    let t = r.tokens.unwrap();
    let anon = s.client().await;
    // REFRESH before login is allowed; it rotates.
    let t2 = anon.refresh(&t.refresh_token).await.unwrap();
    assert_ne!(t2.refresh_token, t.refresh_token);
    assert_eq!(
        code(anon.refresh(&t.refresh_token).await.unwrap_err()),
        ErrorCode::InvalidCredentials
    );
    // Login by refresh token (consumes it) on the same device.
    let c2 = s.client().await;
    let r2 = c2
        .login(
            Credential::RefreshToken(t2.refresh_token.clone()),
            "dev-a",
            Platform::Desktop,
        )
        .await
        .unwrap();
    assert_eq!(r2.username, "alice");
    let c3 = s.client().await;
    let e = c3
        .login(
            Credential::RefreshToken(t2.refresh_token),
            "dev-a",
            Platform::Desktop,
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::InvalidCredentials);
    // Login by access token; another device cannot use it.
    let access = r2.tokens.unwrap().access_token;
    let e = c3
        .login(
            Credential::AccessToken(access.clone()),
            "dev-b",
            Platform::Mobile,
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::InvalidCredentials);
    let r3 = c3
        .login(Credential::AccessToken(access), "dev-a", Platform::Desktop)
        .await
        .unwrap();
    assert_eq!(r3.user_id, r.user_id);
    // An access-token login leaves the device's refresh token as it is.
    assert!(r3.tokens.as_ref().unwrap().refresh_token.is_empty());
}

#[tokio::test]
async fn expired_access_token_is_token_expired() {
    let key = "ab".repeat(32);
    let k2 = key.clone();
    let s = TestServer::start_with(move |c| c.auth.token_key = k2).await;
    let alice = s.register("alice").await;
    let (_c, r) = s.login("alice", "dev-a", Platform::Desktop).await;
    assert_eq!(
        r.tokens.as_ref().unwrap().access_expires_ms - r.server_time_ms,
        3_600_000
    );
    let signer = mychat::auth::TokenKey::load(&key, s.dir.path()).unwrap();
    let claims = |expires_ms| mychat::auth::AccessClaims {
        user: mychat::ids::UserId(alice),
        epoch: 0,
        expires_ms,
        device_id: "dev-a".into(),
    };
    let c = s.client().await;
    let e = c
        .login(
            Credential::AccessToken(signer.sign(&claims(r.server_time_ms - 1))),
            "dev-a",
            Platform::Desktop,
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::TokenExpired);
    // The same key and an expiry ahead: accepted (the format is what the server signs).
    let ok = c
        .login(
            Credential::AccessToken(signer.sign(&claims(r.server_time_ms + 60_000))),
            "dev-a",
            Platform::Desktop,
        )
        .await
        .unwrap();
    assert_eq!(ok.user_id, alice);
}

#[tokio::test]
async fn logout_revokes_tokens() {
    let s = TestServer::start().await;
    s.register("alice").await;
    let (c, r) = s.login("alice", "dev-a", Platform::Desktop).await;
    let t = r.tokens.unwrap();
    c.logout().await.unwrap();
    assert_eq!(
        code(c.sync(None, 0).await.unwrap_err()),
        ErrorCode::Unauthenticated
    );
    let c2 = s.client().await;
    let e = c2
        .login(
            Credential::AccessToken(t.access_token),
            "dev-a",
            Platform::Desktop,
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::InvalidCredentials);
    let e = c2.refresh(&t.refresh_token).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::InvalidCredentials);
    // The password still works.
    c2.login_password("alice", "password-alice", "dev-a", Platform::Desktop)
        .await
        .unwrap();
}

#[tokio::test]
async fn same_platform_login_kicks_the_older_session() {
    let s = TestServer::start().await;
    s.register("alice").await;
    let (old, _) = s.login("alice", "dev-1", Platform::Desktop).await;
    let mut old_push = old.take_pushes().unwrap();
    let (mobile, _) = s.login("alice", "dev-2", Platform::Mobile).await;
    let mut mobile_push = mobile.take_pushes().unwrap();
    let (_new, _) = s.login("alice", "dev-3", Platform::Desktop).await;
    match next_push(&mut old_push).await {
        Push::Kick(k) => assert_eq!(k.reason, pb::KickReason::LoggedInElsewhere as i32),
        p => panic!("expected a kick, got {p:?}"),
    }
    // Then the connection closes.
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(5), old_push.recv())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        old.heartbeat().await,
        Err(mychat_client::ClientError::Disconnected)
    );
    // The mobile session was not touched.
    no_push(&mut mobile_push, 200).await;
    mobile.heartbeat().await.unwrap();
}

#[tokio::test]
async fn multi_policy_keeps_both_same_platform_sessions() {
    let s =
        TestServer::start_with(|c| c.auth.multi_device = mychat_config::MultiDevice::Multi).await;
    s.register("alice").await;
    let (a, _) = s.login("alice", "dev-1", Platform::Desktop).await;
    let mut ap = a.take_pushes().unwrap();
    let (_b, _) = s.login("alice", "dev-2", Platform::Desktop).await;
    no_push(&mut ap, 300).await;
    a.heartbeat().await.unwrap();
}

#[tokio::test]
async fn get_users_by_id_and_name() {
    let s = TestServer::start().await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let (c, _) = s.login("alice", "d", Platform::Desktop).await;
    let users = c
        .get_users(vec![b, 999_999], vec!["alice".into(), "nobody".into()])
        .await
        .unwrap();
    let got: Vec<(u64, String)> = users.into_iter().map(|u| (u.id, u.username)).collect();
    assert_eq!(got, vec![(b, "bob".to_string()), (a, "alice".to_string())]);
    let e = c.get_users((0..101).collect(), vec![]).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::PayloadTooLarge);
    let anon: Client = s.client().await;
    assert_eq!(
        code(anon.get_users(vec![a], vec![]).await.unwrap_err()),
        ErrorCode::Unauthenticated
    );
}

#[tokio::test]
async fn expired_refresh_token_is_token_expired() {
    let s = TestServer::start_with(|c| {
        c.auth.refresh_token_ttl_secs = 1;
        c.auth.access_token_ttl_secs = 1;
    })
    .await;
    s.register("alice").await;
    let (_c, r) = s.login("alice", "dev-a", Platform::Desktop).await;
    let t = r.tokens.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let c = s.client().await;
    assert_eq!(
        code(c.refresh(&t.refresh_token).await.unwrap_err()),
        ErrorCode::TokenExpired
    );
    let e = c
        .login(
            Credential::AccessToken(t.access_token),
            "dev-a",
            Platform::Desktop,
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::TokenExpired);
    // An expired refresh token is gone for good.
    assert_eq!(
        code(c.refresh(&t.refresh_token).await.unwrap_err()),
        ErrorCode::InvalidCredentials
    );
}

//! Request dispatch: frame → command → handler → response frame. The login gate
//! (PROTOCOL.md: before login only HEARTBEAT, HELLO, REGISTER, LOGIN, REFRESH) is
//! enforced here, once, and a handler panic becomes an INTERNAL answer instead of
//! taking the connection or the shard down.

use crate::conn::ConnShared;
use crate::error::{ApiError, ApiResult};
use crate::handlers;
use crate::shard::ShardCtx;
use bytes::Bytes;
use futures_util::FutureExt;
use mychat_codec::{flags, Frame, Header};
use mychat_proto::{Command, ErrorCode};
use prost::Message as _;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;

/// Serves one request; returns its encoded response frame and whether it was a
/// LOGIN/LOGOUT (which the connection runs alone).
pub async fn dispatch(ctx: Rc<ShardCtx>, conn: Rc<ConnShared>, frame: Frame) -> (Bytes, bool) {
    let Header {
        flags: f,
        command,
        seq,
    } = frame.header;
    let cmd = Command::from_id(command);
    let barrier = f == 0 && matches!(cmd, Some(Command::Login | Command::Logout));
    // An Rc clone (no atomic): the counters below are read through it afterwards.
    let result = AssertUnwindSafe(route(ctx.clone(), conn.clone(), f, cmd, frame.body))
        .catch_unwind()
        .await;
    let result = match result {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(conn = conn.id.0, command, panic = %what, "handler panicked");
            Err(ApiError::internal())
        }
    };
    let frame = match result {
        Ok(body) => mychat_codec::frame_bytes(Header::response(command, seq), &body),
        Err(e) => {
            match e.code {
                ErrorCode::Internal => {
                    crate::metrics::Metrics::inc(&ctx.shared.metrics.internal_total);
                    tracing::warn!(conn = conn.id.0, command, "answered INTERNAL");
                }
                ErrorCode::Unavailable => {
                    crate::metrics::Metrics::inc(&ctx.shared.metrics.unavailable_total)
                }
                _ => {}
            }
            let body = mychat_proto::Error {
                code: e.code as u32,
                message: e.message,
            }
            .encode_to_vec();
            mychat_codec::frame_bytes(Header::error(command, seq), &body)
        }
    };
    (frame, barrier)
}

async fn route(
    ctx: Rc<ShardCtx>,
    conn: Rc<ConnShared>,
    f: u8,
    cmd: Option<Command>,
    body: Bytes,
) -> ApiResult<Bytes> {
    if f & (flags::RESPONSE | flags::PUSH | flags::ERROR) != 0 {
        return Err(ApiError::bad_request("a request carries flags 0"));
    }
    let Some(cmd) = cmd else {
        return Err(ApiError::new(ErrorCode::UnknownCommand, "unknown command"));
    };
    if cmd.is_push_only() {
        return Err(ApiError::new(
            ErrorCode::UnknownCommand,
            "push-only command",
        ));
    }
    if !cmd.allowed_before_login() && conn.user().is_none() {
        return Err(ApiError::new(ErrorCode::Unauthenticated, "log in first"));
    }
    use handlers::{auth, friends, groups, messages, presence, system, users};
    match cmd {
        Command::Heartbeat => Ok(Bytes::new()),
        Command::Hello => system::hello(&ctx, body),
        Command::Register => auth::register(&ctx, &conn, body).await,
        Command::Login => auth::login(&ctx, &conn, body).await,
        Command::Refresh => auth::refresh(&ctx, body).await,
        Command::Logout => auth::logout(&ctx, &conn, body).await,
        Command::GetUsers => auth::get_users(&ctx, body).await,
        Command::UpdateProfile => users::update_profile(&ctx, &conn, body).await,
        Command::SearchUsers => users::search(&ctx, &conn, body).await,
        Command::SendMessage => messages::send(&ctx, &conn, body).await,
        Command::Delivered => messages::delivered(&ctx, &conn, body).await,
        Command::Read => messages::read(&ctx, &conn, body).await,
        Command::Sync => messages::sync(&ctx, &conn, body).await,
        Command::SyncAck => messages::sync_ack(&ctx, &conn, body).await,
        Command::History => messages::history(&ctx, &conn, body).await,
        Command::Conversations => messages::conversations(&ctx, &conn, body).await,
        Command::Recall => messages::recall(&ctx, &conn, body).await,
        Command::DeleteForMe => messages::delete_for_me(&ctx, &conn, body).await,
        Command::FriendRequest => friends::request(&ctx, &conn, body).await,
        Command::FriendAccept => friends::answer(&ctx, &conn, body, true).await,
        Command::FriendReject => friends::answer(&ctx, &conn, body, false).await,
        Command::FriendRemove => friends::remove(&ctx, &conn, body).await,
        Command::FriendRemark => friends::remark(&ctx, &conn, body).await,
        Command::CategoryCreate => friends::category_create(&ctx, &conn, body).await,
        Command::CategoryRename => friends::category_rename(&ctx, &conn, body).await,
        Command::CategoryDelete => friends::category_delete(&ctx, &conn, body).await,
        Command::FriendMove => friends::move_friend(&ctx, &conn, body).await,
        Command::CategoryList => friends::category_list(&ctx, &conn, body).await,
        Command::Block => friends::block(&ctx, &conn, body, true).await,
        Command::Unblock => friends::block(&ctx, &conn, body, false).await,
        Command::BlockList => friends::block_list(&ctx, &conn, body).await,
        Command::FriendList => friends::list(&ctx, &conn, body).await,
        Command::FriendRequests => friends::requests(&ctx, &conn, body).await,
        Command::GroupCreate => groups::create(&ctx, &conn, body).await,
        Command::GroupInfo => groups::info(&ctx, &conn, body).await,
        Command::GroupUpdate => groups::update(&ctx, &conn, body).await,
        Command::GroupDissolve => groups::simple(&ctx, &conn, body, true).await,
        Command::GroupLeave => groups::simple(&ctx, &conn, body, false).await,
        Command::GroupInvite => groups::invite(&ctx, &conn, body).await,
        Command::GroupJoin => groups::join(&ctx, &conn, body).await,
        Command::GroupJoinApprove => groups::answer(&ctx, &conn, body, true).await,
        Command::GroupJoinReject => groups::answer(&ctx, &conn, body, false).await,
        Command::GroupKick => groups::kick(&ctx, &conn, body).await,
        Command::GroupSetRole => groups::set_role(&ctx, &conn, body).await,
        Command::GroupTransfer => groups::transfer(&ctx, &conn, body).await,
        Command::GroupMute => groups::mute(&ctx, &conn, body).await,
        Command::GroupMembers => groups::members(&ctx, &conn, body).await,
        Command::GroupList => groups::list(&ctx, &conn, body).await,
        Command::GroupJoinRequests => groups::join_requests(&ctx, &conn, body).await,
        Command::PresenceSet => presence::set(&ctx, &conn, body).await,
        Command::PresenceGet => presence::get(&ctx, &conn, body).await,
        Command::PresenceSubscribe => presence::subscribe(&ctx, &conn, body).await,
        Command::Typing => presence::typing(&ctx, &conn, body).await,
        Command::Kick
        | Command::MessagePush
        | Command::ReceiptPush
        | Command::FriendRequestPush
        | Command::FriendAnswerPush
        | Command::FriendRemovedPush
        | Command::GroupJoinRequestPush
        | Command::GroupJoinAnswerPush
        | Command::GroupMembershipPush
        | Command::PresencePush
        | Command::TypingPush
        | Command::Unspecified => Err(ApiError::new(
            ErrorCode::UnknownCommand,
            "push-only command",
        )),
    }
}

/// Decodes a request body.
pub fn decode<M: prost::Message + Default>(body: Bytes) -> ApiResult<M> {
    Ok(M::decode(body)?)
}

/// Encodes a response body.
pub fn encode<M: prost::Message>(m: &M) -> ApiResult<Bytes> {
    Ok(Bytes::from(m.encode_to_vec()))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

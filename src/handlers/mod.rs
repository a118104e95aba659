//! One module per domain. A handler takes the shard context, the connection and the
//! request body, and returns the response body or an [`crate::error::ApiError`].
pub mod auth;
pub mod friends;
pub mod groups;
pub mod messages;
pub mod presence;
pub mod system;
pub mod users;

use crate::conn::{ConnShared, Session};
use crate::error::{ApiError, ApiResult};
use crate::ids::UserId;
use bytes::Bytes;
use mychat_proto::{Command, ErrorCode};

/// The caller's session, or UNAUTHENTICATED.
pub(crate) fn me(conn: &ConnShared) -> ApiResult<Session> {
    conn.session()
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthenticated, "log in first"))
}

/// An encoded PUSH frame of `cmd` carrying `m`.
pub(crate) fn push_frame<M: prost::Message>(cmd: Command, m: &M) -> Bytes {
    mychat_codec::frame_bytes(mychat_codec::Header::push(cmd.id()), &m.encode_to_vec())
}

/// A required user id (0 is "missing": BAD_REQUEST).
pub(crate) fn need_user(id: u64) -> ApiResult<UserId> {
    if id == 0 {
        return Err(ApiError::bad_request("user_id is required"));
    }
    Ok(UserId(id))
}

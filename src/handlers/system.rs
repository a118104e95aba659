//! System module (1000-1999): HELLO. HEARTBEAT is answered by the router.
use crate::error::{ApiError, ApiResult};
use crate::router::{decode, encode};
use crate::shard::ShardCtx;
use bytes::Bytes;
use mychat_proto::{HelloRequest, HelloResponse};

pub fn hello(ctx: &ShardCtx, body: Bytes) -> ApiResult<Bytes> {
    let req: HelloRequest = decode(body)?;
    if req.client_name.len() > 64 || req.client_version.len() > 64 {
        return Err(ApiError::bad_request(
            "client_name and client_version are at most 64 bytes",
        ));
    }
    let s = &ctx.shared.cfg.server;
    encode(&HelloResponse {
        server_version: env!("CARGO_PKG_VERSION").into(),
        protocol_version: mychat_proto::PROTOCOL_VERSION as u32,
        max_frame_len: s.max_frame_len,
        heartbeat_interval_ms: s.heartbeat_interval_ms as u32,
        idle_timeout_ms: s.idle_timeout_ms as u32,
        login_timeout_ms: s.login_timeout_ms as u32,
        max_text_len: ctx.shared.cfg.messages.max_text_len as u32,
    })
}

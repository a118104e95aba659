//! The one place where every failure a client can see becomes a PROTOCOL.md code.

use crate::store::StoreError;
use mychat_proto::ErrorCode;

/// An error answer to a request: a code from PROTOCOL.md and a human message (never
/// secrets or internals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, m)
    }
    pub fn internal() -> ApiError {
        ApiError::new(ErrorCode::Internal, "internal error")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Conflict => ApiError::new(ErrorCode::Conflict, "already exists"),
            StoreError::NotFound => ApiError::not_found("not found"),
            StoreError::Forbidden(m) => ApiError::new(ErrorCode::Forbidden, m),
            StoreError::Limit(m) => ApiError::new(ErrorCode::PayloadTooLarge, m),
            StoreError::Invalid(m) => ApiError::bad_request(m),
            StoreError::Unavailable(m) => ApiError::new(ErrorCode::Unavailable, m),
            StoreError::Internal(m) => {
                tracing::error!(error = %m, "storage failure");
                ApiError::internal()
            }
        }
    }
}

impl From<prost::DecodeError> for ApiError {
    fn from(e: prost::DecodeError) -> ApiError {
        ApiError::bad_request(format!("body does not decode: {e}"))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

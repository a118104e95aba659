//! One module per domain. A handler takes the shard context, the connection and the
//! request body, and returns the response body or an [`crate::error::ApiError`].
pub mod auth;
pub mod friends;
pub mod groups;
pub mod messages;
pub mod presence;
pub mod system;
pub mod users;

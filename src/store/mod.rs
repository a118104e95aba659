//! Storage: the [`Store`] trait the handlers call, and its backends.
//!
//! Invariants every backend keeps:
//! - a write is acknowledged (its future resolves `Ok`) only after it is durable;
//! - each conversation's `seq` is 1, 2, 3 … with no gap, assigned inside the store's
//!   transaction; each user's `pts` likewise;
//! - a message is stored once per (sender, client_msg_id): a resend returns the
//!   original with `duplicate = true`;
//! - reads see every acknowledged write.
//!
//! The embedded backend ([`sqlite::SqliteStore`]) is the default and the only one so
//! far; the trait is what a PostgreSQL backend for the cluster will implement.

pub mod sqlite;

use crate::ids::{ConvId, UserId};
use mychat_proto::{Message, Platform};
use std::future::Future;
use std::pin::Pin;

/// What storage calls return: boxed so the trait can be used as `dyn Store`.
pub type StoreFut<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("already exists")]
    Conflict,
    #[error("not found")]
    NotFound,
    /// The write queue is full or the store is shutting down.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A backend failure (I/O, corruption); logged, shown to clients as INTERNAL.
    #[error("storage failure: {0}")]
    Internal(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    pub id: UserId,
    pub username: String,
    pub password_hash: String,
    pub created_ms: i64,
}

/// One device of a user as the server remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    pub user: UserId,
    pub device_id: String,
    pub platform: Platform,
    /// The device's sync cursor; `None` until it first syncs.
    pub cursor: Option<u64>,
    /// Bumped by logout: access tokens carry the epoch they were issued in.
    pub token_epoch: u64,
}

/// A stored refresh token (only its SHA-256 is kept).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshRecord {
    pub hash: [u8; 32],
    pub user: UserId,
    pub device_id: String,
    pub platform: Platform,
    pub expires_ms: i64,
}

/// Outcome of taking (consuming) a refresh token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TakeRefresh {
    /// Valid: it is gone and the replacement is stored.
    Rotated(RefreshRecord),
    Expired,
    Unknown,
}

#[derive(Clone, Debug)]
pub struct SendInput {
    pub sender: UserId,
    pub recipient: UserId,
    pub client_msg_id: String,
    pub kind: i32,
    pub text: String,
    pub payload: bytes::Bytes,
    pub now_ms: i64,
}

#[derive(Clone, Debug)]
pub struct SendOutcome {
    pub message: Message,
    /// The sender's and the recipient's pts for this message (0 on a duplicate).
    pub sender_pts: u64,
    pub recipient_pts: u64,
    pub duplicate: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadOutcome {
    pub read_seq: u64,
    /// Set when the mark moved: the peer, and each side's pts for the receipt.
    pub moved: Option<ReadMoved>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadMoved {
    pub peer: UserId,
    pub reader_pts: u64,
    pub peer_pts: u64,
}

/// One entry of a user's update stream.
#[derive(Clone, Debug)]
pub enum UpdateEvent {
    Message(Message),
    Read {
        conv: ConvId,
        reader: UserId,
        seq: u64,
    },
}

#[derive(Clone, Debug)]
pub struct SyncPage {
    pub updates: Vec<(u64, UpdateEvent)>,
    pub has_more: bool,
}

#[derive(Clone, Debug)]
pub struct UnreadSnapshot {
    pub messages: Vec<Message>,
    /// The user's pts when the snapshot was taken.
    pub pts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvRecord {
    pub id: ConvId,
    /// The two members of a direct conversation, smaller id first.
    pub user_a: UserId,
    pub user_b: UserId,
}

impl ConvRecord {
    pub fn has_member(&self, u: UserId) -> bool {
        self.user_a == u || self.user_b == u
    }
    pub fn peer_of(&self, u: UserId) -> UserId {
        if self.user_a == u {
            self.user_b
        } else {
            self.user_a
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConvSummary {
    pub conv: ConvRecord,
    pub last_message: Option<Message>,
    pub last_seq: u64,
    pub read_seq: u64,
    pub peer_read_seq: u64,
    pub peer_delivered_seq: u64,
}

/// The storage interface the handlers use. Every method is async and never blocks the
/// calling (shard) thread.
pub trait Store: Send + Sync + 'static {
    /// Conflict when the username is taken.
    fn create_user(
        &self,
        username: String,
        password_hash: String,
        now_ms: i64,
    ) -> StoreFut<UserRecord>;
    fn user_by_name(&self, username: String) -> StoreFut<Option<UserRecord>>;
    fn users_by_ids(&self, ids: Vec<UserId>) -> StoreFut<Vec<UserRecord>>;
    fn users_by_names(&self, names: Vec<String>) -> StoreFut<Vec<UserRecord>>;

    /// Creates or refreshes a device row (platform, last login); returns it.
    fn register_device(
        &self,
        user: UserId,
        device_id: String,
        platform: Platform,
        now_ms: i64,
    ) -> StoreFut<DeviceRecord>;
    fn device(&self, user: UserId, device_id: String) -> StoreFut<Option<DeviceRecord>>;
    /// Revokes the device's tokens: bumps its token epoch and deletes its refresh tokens.
    fn logout_device(&self, user: UserId, device_id: String) -> StoreFut<()>;
    /// Moves the device's cursor forward to `pts` (never backward).
    fn set_cursor(&self, user: UserId, device_id: String, pts: u64) -> StoreFut<()>;

    fn put_refresh(&self, rec: RefreshRecord) -> StoreFut<()>;
    /// Consumes `hash` if valid at `now_ms`, storing `replacement` (same user, device
    /// and platform as the consumed one; only its hash and expiry are taken).
    fn take_refresh(
        &self,
        hash: [u8; 32],
        replacement_hash: [u8; 32],
        replacement_expires_ms: i64,
        now_ms: i64,
    ) -> StoreFut<TakeRefresh>;

    /// The user's current pts.
    fn user_pts(&self, user: UserId) -> StoreFut<u64>;

    /// Stores a 1:1 message (idempotent on sender + client_msg_id). NotFound when the
    /// recipient does not exist.
    fn send_direct(&self, input: SendInput) -> StoreFut<SendOutcome>;
    /// Moves `user`'s read mark in `conv` up to `seq` (clamped to the last seq).
    /// NotFound when the conversation does not exist or `user` is not in it.
    fn mark_read(&self, user: UserId, conv: ConvId, seq: u64) -> StoreFut<ReadOutcome>;
    /// Moves `user`'s delivered mark; returns the mark after, and the peer.
    fn mark_delivered(&self, user: UserId, conv: ConvId, seq: u64) -> StoreFut<(u64, UserId)>;

    fn sync(&self, user: UserId, since_pts: u64, limit: u32) -> StoreFut<SyncPage>;
    fn unread_snapshot(
        &self,
        user: UserId,
        max_convs: u32,
        per_conv: u32,
    ) -> StoreFut<UnreadSnapshot>;
    fn conversation(&self, conv: ConvId) -> StoreFut<Option<ConvRecord>>;
    fn direct_conversation(&self, a: UserId, b: UserId) -> StoreFut<Option<ConvRecord>>;
    /// Up to `limit` messages with seq < before_seq (0 = newest), ascending; has_more.
    fn history(&self, conv: ConvId, before_seq: u64, limit: u32) -> StoreFut<(Vec<Message>, bool)>;
    fn conversations(
        &self,
        user: UserId,
        offset: u32,
        limit: u32,
    ) -> StoreFut<(Vec<ConvSummary>, bool)>;

    /// Stops taking writes, commits what is queued, checkpoints. Idempotent.
    fn shutdown(&self) -> StoreFut<()>;
}

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
    /// Not allowed (not a member, the role does not allow it, blocked, muted …); the
    /// text says why and is shown to the client.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A configured bound would be passed (group size …); shown to the client.
    #[error("over a limit: {0}")]
    Limit(String),
    /// The request contradicts the data (asking oneself, a role that cannot be set …).
    #[error("invalid: {0}")]
    Invalid(String),
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
    pub nickname: String,
    pub avatar: String,
    pub signature: String,
    /// When the user's last session ended (0: never, or not recorded yet).
    pub last_seen_ms: i64,
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
    /// Refuse unless sender and recipient are friends (friends.strangers_may_message
    /// off). A recipient who blocked the sender is always refused.
    pub require_friend: bool,
    /// The sending connection (left out of the push).
    pub origin: Option<Origin>,
}

#[derive(Clone, Debug)]
pub struct SendOutcome {
    pub message: Message,
    /// The sender's pts for this message (0 on a duplicate and for groups).
    pub sender_pts: u64,
    pub duplicate: bool,
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
    /// A friend event: `kind` is `FriendEvent.Kind`.
    Friend {
        kind: i32,
        user: UserId,
        message: String,
        time_ms: i64,
    },
    /// The user joined (`member`) or left a group.
    Group {
        group: u64,
        conv: ConvId,
        member: bool,
    },
}

#[derive(Clone, Debug)]
pub struct SyncPage {
    pub updates: Vec<(u64, UpdateEvent)>,
    pub has_more: bool,
    /// The pts of the last stream entry this page covered (entries deleted for the
    /// user are skipped, but the cursor moves past them).
    pub scanned_to: u64,
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
    /// The group of a GROUP conversation (0 for direct; then user_a/user_b are 0).
    pub group_id: u64,
}

impl ConvRecord {
    pub fn is_group(&self) -> bool {
        self.group_id != 0
    }
    /// Membership of a DIRECT conversation (groups: ask the store).
    pub fn has_member(&self, u: UserId) -> bool {
        !self.is_group() && (self.user_a == u || self.user_b == u)
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

/// A group as the handlers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    pub id: u64,
    pub conv: ConvId,
    pub name: String,
    pub owner: UserId,
    pub member_count: u32,
    pub join_policy: i32,
    pub mute_all: bool,
    pub created_ms: i64,
    pub last_seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMemberRec {
    pub user: UserId,
    pub role: i32,
    pub joined_ms: i64,
    pub muted_until_ms: i64,
}

/// A change to a group, as committed. Its SYSTEM notice is published (see
/// [`Publication`]) to the members and to whoever it removed.
#[derive(Clone, Debug)]
pub struct GroupChange {
    pub info: GroupInfo,
    /// Membership events written to users' streams: (user, pts, member now).
    pub membership: Vec<(UserId, u64, bool)>,
}

/// What a group operation does (the actor and the group are given beside it).
#[derive(Clone, Debug)]
pub enum GroupOp {
    Update {
        name: Option<String>,
        join_policy: Option<i32>,
        mute_all: Option<bool>,
    },
    Dissolve,
    Invite(Vec<UserId>),
    Leave,
    Kick(UserId),
    SetRole(UserId, i32),
    Transfer(UserId),
    Mute(UserId, i64),
    Answer(UserId, bool),
}

#[derive(Clone, Debug)]
pub enum JoinOutcome {
    Joined(Box<GroupChange>),
    /// Waiting for approval; the owner and admins to tell.
    Requested {
        approvers: Vec<UserId>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FriendRequestOutcome {
    /// Stored; the receiver's pts for the request event.
    Requested { to_pts: u64 },
    /// They had asked first: now friends. Each side's pts for the ACCEPTED event.
    Accepted { my_pts: u64, their_pts: u64 },
}

/// Each side's pts for a friend event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FriendPts {
    pub me: u64,
    pub them: u64,
}

#[derive(Clone, Debug)]
pub struct FriendRec {
    pub user: UserRecord,
    pub remark: String,
    pub category: u64,
    pub since_ms: i64,
}

#[derive(Clone, Debug)]
pub struct PendingFriend {
    pub user: UserRecord,
    pub message: String,
    pub time_ms: i64,
    pub incoming: bool,
}

/// The connection a write came from (its own push is left out: it gets the ack).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Origin {
    pub shard: crate::ids::ShardId,
    pub conn: crate::ids::ConnId,
}

/// A committed message to push, handed to the [`Publisher`] in commit order.
///
/// Why here and not in the handlers: two senders on two shards get their acks for
/// seq 5 and seq 6 in some order and would push in whatever order their tasks run; a
/// recipient could see 6 before 5. Publishing in the writer's commit order, through one
/// dispatcher and FIFO shard inboxes, gives every device each conversation's messages in
/// seq order (and each user's stream in pts order).
#[derive(Clone, Debug)]
pub enum Publication {
    /// A DIRECT message (or notice): to the recipient's sessions with `recipient_pts`,
    /// to the sender's other sessions with `sender_pts`.
    Direct {
        message: Message,
        sender_pts: u64,
        recipient_pts: u64,
        origin: Option<Origin>,
    },
    /// A GROUP message or notice: one encoding for `members` and `extra` (users it
    /// removed, who still get the notice).
    Group {
        message: Message,
        members: std::sync::Arc<Vec<UserId>>,
        extra: Vec<UserId>,
        origin: Option<Origin>,
    },
    /// A read mark moved: a read receipt to the reader's other sessions with
    /// `reader_pts` and, in a DIRECT conversation, to the peer's with `peer_pts`.
    /// Published with the commit, like messages, so that a device gets its pushes in
    /// pts order (a receipt pushed from the handler could overtake the message push
    /// before it, and the device would see its pts jump and sync for nothing).
    Read {
        conv: ConvId,
        reader: UserId,
        seq: u64,
        reader_pts: u64,
        peer: Option<(UserId, u64)>,
        origin: Option<Origin>,
    },
}

/// Receives each commit's publications, in commit order. Runs on the writer thread:
/// it must only hand them on (a bounded queue to a dispatcher), not do the fan-out.
pub type Publisher = std::sync::Arc<dyn Fn(Vec<Publication>) + Send + Sync>;

/// The profile fields to change.
#[derive(Clone, Debug, Default)]
pub struct ProfilePatch {
    pub nickname: Option<String>,
    pub avatar: Option<String>,
    pub signature: Option<String>,
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

    /// Creates or refreshes a device row (platform, last login); returns it and the
    /// user's pts now (one round trip for a login).
    fn register_device(
        &self,
        user: UserId,
        device_id: String,
        platform: Platform,
        now_ms: i64,
    ) -> StoreFut<(DeviceRecord, u64)>;
    fn device(&self, user: UserId, device_id: String) -> StoreFut<Option<DeviceRecord>>;
    /// A login by access token, in one round trip to the writer: when the device
    /// exists with token epoch `epoch`, refreshes its platform and last login and
    /// returns it, its user and the user's pts; `None` when the token no longer
    /// holds (device gone or logged out since). No read connection is involved: on
    /// a store taking writes, a read transaction starts with a reset page cache.
    fn token_login(
        &self,
        user: UserId,
        device_id: String,
        epoch: u64,
        platform: Platform,
        now_ms: i64,
    ) -> StoreFut<Option<(DeviceRecord, UserRecord, u64)>>;
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
    /// Returns the mark after. When it moves, the receipt is published with the commit
    /// ([`Publication::Read`]; `origin`, the reading connection, is left out of it).
    fn mark_read(
        &self,
        user: UserId,
        conv: ConvId,
        seq: u64,
        origin: Option<Origin>,
    ) -> StoreFut<u64>;
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
    /// With after_seq > 0: seq > after_seq, oldest first. Messages `viewer` deleted
    /// for themself are left out.
    fn history(
        &self,
        viewer: UserId,
        conv: ConvId,
        before_seq: u64,
        after_seq: u64,
        limit: u32,
    ) -> StoreFut<(Vec<Message>, bool)>;
    fn conversations(
        &self,
        user: UserId,
        offset: u32,
        limit: u32,
    ) -> StoreFut<(Vec<ConvSummary>, bool)>;

    // --- users ---
    fn update_profile(&self, user: UserId, patch: ProfilePatch) -> StoreFut<UserRecord>;
    /// Usernames starting with `prefix`, after `after`, in order; has_more.
    fn search_users(
        &self,
        prefix: String,
        after: String,
        limit: u32,
    ) -> StoreFut<(Vec<UserRecord>, bool)>;
    /// Records when users' last sessions ended (one write for a burst of them).
    fn set_last_seen(&self, seen: Vec<(UserId, i64)>) -> StoreFut<()>;

    // --- friends ---
    fn friend_request(
        &self,
        from: UserId,
        to: UserId,
        message: String,
        now_ms: i64,
    ) -> StoreFut<FriendRequestOutcome>;
    /// Accept or reject `requester`'s pending request to `me`.
    fn friend_answer(
        &self,
        me: UserId,
        requester: UserId,
        accept: bool,
        now_ms: i64,
    ) -> StoreFut<FriendPts>;
    fn friend_remove(&self, me: UserId, other: UserId, now_ms: i64) -> StoreFut<FriendPts>;
    fn friend_remark(&self, me: UserId, other: UserId, remark: String) -> StoreFut<()>;
    fn category_create(&self, me: UserId, name: String) -> StoreFut<u64>;
    fn category_rename(&self, me: UserId, id: u64, name: String) -> StoreFut<()>;
    fn category_delete(&self, me: UserId, id: u64) -> StoreFut<()>;
    fn friend_move(&self, me: UserId, friend: UserId, category: u64) -> StoreFut<()>;
    fn block(&self, me: UserId, other: UserId, now_ms: i64) -> StoreFut<()>;
    fn unblock(&self, me: UserId, other: UserId) -> StoreFut<()>;
    fn friends(&self, me: UserId, offset: u32, limit: u32) -> StoreFut<(Vec<FriendRec>, bool)>;
    fn friend_ids(&self, me: UserId) -> StoreFut<Vec<UserId>>;
    /// Friends of each user, in one round trip (presence changes come in bursts).
    fn friend_ids_many(&self, users: Vec<UserId>) -> StoreFut<Vec<Vec<UserId>>>;
    fn categories(&self, me: UserId) -> StoreFut<Vec<(u64, String)>>;
    fn blocked_users(&self, me: UserId) -> StoreFut<Vec<UserRecord>>;
    fn friend_requests(&self, me: UserId) -> StoreFut<Vec<PendingFriend>>;
    /// Whether `by` blocked `who`.
    fn is_blocked(&self, by: UserId, who: UserId) -> StoreFut<bool>;

    // --- groups ---
    fn group_create(
        &self,
        owner: UserId,
        name: String,
        members: Vec<UserId>,
        join_policy: i32,
        now_ms: i64,
        max_members: u32,
    ) -> StoreFut<GroupChange>;
    fn group_op(
        &self,
        actor: UserId,
        group: u64,
        op: GroupOp,
        now_ms: i64,
        max_members: u32,
    ) -> StoreFut<GroupChange>;
    fn group_join(
        &self,
        user: UserId,
        group: u64,
        message: String,
        now_ms: i64,
        max_members: u32,
    ) -> StoreFut<JoinOutcome>;
    /// Stores a group message (sender must be a member and not muted).
    fn send_group(&self, group: u64, input: SendInput) -> StoreFut<SendOutcome>;
    fn group_info(&self, group: u64) -> StoreFut<Option<GroupInfo>>;
    /// The user's role in the group, if a member.
    fn group_role(&self, group: u64, user: UserId) -> StoreFut<Option<i32>>;
    fn group_members(
        &self,
        group: u64,
        offset: u32,
        limit: u32,
    ) -> StoreFut<(Vec<GroupMemberRec>, bool)>;
    fn group_member_ids(&self, group: u64) -> StoreFut<Vec<UserId>>;
    fn user_groups(&self, user: UserId) -> StoreFut<Vec<GroupInfo>>;
    fn group_join_requests(&self, group: u64) -> StoreFut<Vec<(UserId, String, i64)>>;
    /// The user's groups with messages past the user's read mark:
    /// (group, conversation, last_seq, read_seq).
    fn group_heads(&self, user: UserId) -> StoreFut<Vec<(u64, ConvId, u64, u64)>>;
    /// Whether `user` is a member of the conversation (either kind).
    fn is_member(&self, conv: ConvId, user: UserId) -> StoreFut<bool>;

    // --- recall, delete for me ---
    fn recall(
        &self,
        user: UserId,
        message_id: u64,
        now_ms: i64,
        window_ms: i64,
    ) -> StoreFut<Message>;
    fn hide(&self, user: UserId, message_ids: Vec<u64>) -> StoreFut<()>;

    /// Where committed messages go to be pushed (set once at start; before it is set,
    /// nothing is pushed).
    fn set_publisher(&self, publisher: Publisher);

    /// Stops taking writes, commits what is queued, checkpoints. Idempotent.
    fn shutdown(&self) -> StoreFut<()>;
}

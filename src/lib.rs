//! MyChat: an instant-messaging server over length-prefixed protobuf on TCP.
//!
//! Code map (a request's path, top to bottom):
//! - [`server`]: start/stop; the shared state; the acceptor thread that places each
//!   socket on the least-loaded shard.
//! - [`shard`]: one thread + current-thread runtime per shard, owning its connections;
//!   a bounded inbox; cross-shard deliveries batched per destination.
//! - [`conn`]: one task per connection: reads frames (codec crate), runs requests as
//!   bounded in-flight futures, coalesces writes, enforces timeouts and the outbound
//!   bound.
//! - [`router`]: command → handler, the login gate, panics → INTERNAL.
//! - [`handlers`]: one module per domain (system, auth, users, messages, friends,
//!   groups, presence).
//! - [`presence`]: presence watchers and last-seen times (aggregation lives in the
//!   directory; pushes in each shard's presence task).
//! - [`dispatch`]: pushes committed messages in commit order (one thread, batches per
//!   destination shard).
//! - [`directory`]: user → live sessions, striped locks, read on every delivery.
//! - [`auth`]: argon2id, signed access tokens, refresh tokens, throttling.
//! - [`store`]: the `Store` trait and the embedded SQLite backend (group commit).
//! - [`limits`]: token buckets (per connection, per user) and connections per
//!   address; [`metrics`]: counters of every limit hit, served to Prometheus.
//! - [`error`]: every client-visible failure → one PROTOCOL.md code.
//!
//! Invariants:
//! - a connection is touched only by its shard thread; other threads reach it through
//!   the shard's bounded inbox;
//! - a message is acknowledged only after the store committed it (fsync); pushes go
//!   out after that, so a pushed message is always in the store;
//! - every queue and buffer is bounded (shard inbox, store write queue, outbound bytes,
//!   in-flight requests per connection);
//! - nothing blocks a shard thread: storage reads run on a blocking pool, writes on the
//!   store's writer thread, password hashing on a blocking pool.
//! - errors: handlers return `ApiError` (PROTOCOL.md code + message); `anyhow` only at
//!   start-up and in `main`.

pub mod auth;
pub mod batchq;
pub mod conn;
pub mod directory;
pub mod dispatch;
pub mod error;
pub mod handlers;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod presence;
pub mod router;
pub mod server;
pub mod shard;
pub mod store;
pub mod tls;

pub use mychat_config::Config;
pub use server::{start, ServerHandle};

//! Shared by `benches/store.rs` and `tests/wal.rs` (each includes this file with
//! `#[path]`): a round of 1:1 text messages written straight to a store.

use mychat::ids::UserId;
use mychat::store::{SendInput, Store};

/// Sends `k` messages numbered `first..first + k` between pairs of `users` (message n
/// goes from user n to user 7n + 1, mod the user count, never to oneself) and waits
/// for every ack.
pub async fn send_round(store: &dyn Store, users: &[UserId], first: u64, k: u64, text: &str) {
    let len = users.len() as u64;
    let mut futs = Vec::with_capacity(k as usize);
    for n in first..first + k {
        let a = users[(n % len) as usize];
        let b = users[((n * 7 + 1) % len) as usize];
        let b = if a == b {
            users[((n + 1) % len) as usize]
        } else {
            b
        };
        futs.push(store.send_direct(SendInput {
            sender: a,
            recipient: b,
            client_msg_id: format!("c{n}"),
            kind: 1,
            text: text.to_string(),
            payload: bytes::Bytes::new(),
            now_ms: n as i64,
            require_friend: false,
            origin: None,
        }));
    }
    for f in futs {
        f.await.unwrap();
    }
}

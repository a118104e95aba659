//! Presence: who is online, away or offline, and who is told.
//!
//! A user's status is aggregated over their sessions by the [`crate::directory`]
//! (ONLINE if any session is online, AWAY if all are away, OFFLINE with none). When a
//! login, logout, disconnect or PRESENCE_SET changes it, the shard where it happened
//! queues the change; one task per shard then pushes it to the user's friends (their
//! online sessions) and to the sessions that subscribed to the user — no one else.
//! Last-seen times are kept in memory and written to the store.

use crate::ids::{ConnId, ShardId, UserId};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;

const STRIPES: usize = 64;

fn stripe_of(u: UserId) -> usize {
    (u.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % STRIPES
}

/// A subscribed session: its shard and connection.
type Subscriber = (ShardId, ConnId);

/// Who watches whom: watched user → subscribed sessions.
pub struct Watchers {
    stripes: Vec<RwLock<HashMap<UserId, Vec<Subscriber>>>>,
}

impl Default for Watchers {
    fn default() -> Self {
        Watchers {
            stripes: (0..STRIPES).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }
}

impl Watchers {
    pub fn add(&self, watched: UserId, by: (ShardId, ConnId)) {
        let mut m = self.stripes[stripe_of(watched)].write();
        let v = m.entry(watched).or_default();
        if !v.contains(&by) {
            v.push(by);
        }
    }

    pub fn remove(&self, watched: UserId, by: (ShardId, ConnId)) {
        let mut m = self.stripes[stripe_of(watched)].write();
        if let Some(v) = m.get_mut(&watched) {
            v.retain(|x| *x != by);
            if v.is_empty() {
                m.remove(&watched);
            }
        }
    }

    pub fn of(&self, watched: UserId) -> Vec<(ShardId, ConnId)> {
        self.stripes[stripe_of(watched)]
            .read()
            .get(&watched)
            .cloned()
            .unwrap_or_default()
    }
}

/// Last-seen times of users who went offline while this server ran.
pub struct LastSeen {
    stripes: Vec<Mutex<HashMap<UserId, i64>>>,
}

impl Default for LastSeen {
    fn default() -> Self {
        LastSeen {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl LastSeen {
    pub fn set(&self, u: UserId, ms: i64) {
        self.stripes[stripe_of(u)].lock().insert(u, ms);
    }
    pub fn get(&self, u: UserId) -> Option<i64> {
        self.stripes[stripe_of(u)].lock().get(&u).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_add_remove() {
        let w = Watchers::default();
        w.add(UserId(1), (ShardId(0), ConnId(5)));
        w.add(UserId(1), (ShardId(0), ConnId(5)));
        w.add(UserId(1), (ShardId(1), ConnId(6)));
        assert_eq!(w.of(UserId(1)).len(), 2);
        w.remove(UserId(1), (ShardId(0), ConnId(5)));
        assert_eq!(w.of(UserId(1)), vec![(ShardId(1), ConnId(6))]);
        w.remove(UserId(1), (ShardId(1), ConnId(6)));
        assert!(w.of(UserId(1)).is_empty());
    }
}

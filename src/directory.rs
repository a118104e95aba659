//! The session directory: user → that user's live sessions, wherever they are.
//!
//! Read on every delivery from every shard, so it is striped: `STRIPES` independent
//! `RwLock`ed maps chosen by user id. A read takes one stripe's read lock for the time
//! of a small copy; no lock is ever held across an `.await`.
//!
//! Invariant: an entry exists exactly while its connection is logged in. The
//! connection registers at login (taking out the sessions the multi-device policy
//! displaces, which the caller then kicks) and unregisters at logout or when it ends
//! (its drop guard), by (conn, shard) so a newer session is never removed by an older.

use crate::ids::{ConnId, ShardId, UserId};
use mychat_config::MultiDevice;
use mychat_proto::Platform;
use parking_lot::RwLock;
use std::collections::HashMap;

const STRIPES: usize = 64;

/// One live session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRef {
    pub shard: ShardId,
    pub conn: ConnId,
    pub platform: Platform,
    pub device_id: std::sync::Arc<str>,
}

pub struct Directory {
    stripes: Vec<RwLock<HashMap<UserId, Vec<SessionRef>>>>,
    policy: MultiDevice,
    max_sessions: usize,
}

impl Directory {
    pub fn new(policy: MultiDevice, max_sessions: usize) -> Directory {
        Directory {
            stripes: (0..STRIPES).map(|_| RwLock::new(HashMap::new())).collect(),
            policy,
            max_sessions,
        }
    }

    fn stripe(&self, user: UserId) -> &RwLock<HashMap<UserId, Vec<SessionRef>>> {
        // Multiplicative hashing spreads sequential ids over the stripes.
        let h = user.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
        &self.stripes[h as usize % STRIPES]
    }

    /// Adds a session and returns the sessions the policy displaces (to be kicked).
    /// The same device logging in again always displaces its older session.
    pub fn register(&self, user: UserId, s: SessionRef) -> Vec<SessionRef> {
        let mut map = self.stripe(user).write();
        let list = map.entry(user).or_default();
        let mut kicked = Vec::new();
        list.retain(|o| {
            let displace = o.device_id == s.device_id
                || match self.policy {
                    MultiDevice::PerPlatform => o.platform == s.platform,
                    MultiDevice::Single => true,
                    MultiDevice::Multi => false,
                };
            if displace {
                kicked.push(o.clone());
            }
            !displace
        });
        while list.len() >= self.max_sessions {
            kicked.push(list.remove(0));
        }
        list.push(s);
        kicked
    }

    /// Removes the session of `conn` on `shard`, if still registered.
    pub fn unregister(&self, user: UserId, shard: ShardId, conn: ConnId) {
        let mut map = self.stripe(user).write();
        if let Some(list) = map.get_mut(&user) {
            list.retain(|o| !(o.conn == conn && o.shard == shard));
            if list.is_empty() {
                map.remove(&user);
            }
        }
    }

    /// Calls `f` with the user's sessions (under the stripe's read lock: keep it short).
    pub fn with_sessions<R>(&self, user: UserId, f: impl FnOnce(&[SessionRef]) -> R) -> R {
        let map = self.stripe(user).read();
        f(map.get(&user).map(Vec::as_slice).unwrap_or(&[]))
    }

    pub fn session_count(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.read().values().map(Vec::len).sum::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(shard: usize, conn: u64, p: Platform, dev: &str) -> SessionRef {
        SessionRef {
            shard: ShardId(shard),
            conn: ConnId(conn),
            platform: p,
            device_id: dev.into(),
        }
    }

    #[test]
    fn per_platform_kicks_same_platform_only() {
        let d = Directory::new(MultiDevice::PerPlatform, 8);
        let u = UserId(7);
        assert!(d.register(u, s(0, 1, Platform::Desktop, "a")).is_empty());
        assert!(d.register(u, s(1, 2, Platform::Mobile, "b")).is_empty());
        let k = d.register(u, s(1, 3, Platform::Desktop, "c"));
        assert_eq!(k, vec![s(0, 1, Platform::Desktop, "a")]);
        assert_eq!(d.with_sessions(u, |l| l.len()), 2);
        // An old connection's unregister does not remove the new one.
        d.unregister(u, ShardId(0), ConnId(1));
        assert_eq!(d.with_sessions(u, |l| l.len()), 2);
        d.unregister(u, ShardId(1), ConnId(3));
        d.unregister(u, ShardId(1), ConnId(2));
        assert_eq!(d.session_count(), 0);
    }

    #[test]
    fn single_and_multi() {
        let d = Directory::new(MultiDevice::Single, 8);
        d.register(UserId(1), s(0, 1, Platform::Desktop, "a"));
        assert_eq!(
            d.register(UserId(1), s(0, 2, Platform::Mobile, "b")).len(),
            1
        );
        let d = Directory::new(MultiDevice::Multi, 2);
        d.register(UserId(1), s(0, 1, Platform::Desktop, "a"));
        assert!(d
            .register(UserId(1), s(0, 2, Platform::Desktop, "b"))
            .is_empty());
        let k = d.register(UserId(1), s(0, 3, Platform::Desktop, "c"));
        assert_eq!(k, vec![s(0, 1, Platform::Desktop, "a")]);
        // same device re-login displaces even under multi
        let k = d.register(UserId(1), s(0, 4, Platform::Desktop, "c"));
        assert_eq!(k, vec![s(0, 3, Platform::Desktop, "c")]);
    }
}

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
    /// The session set itself AWAY (PRESENCE_SET).
    pub away: bool,
}

/// A user's presence aggregated over their sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregate {
    Offline,
    Online,
    Away,
}

fn aggregate(list: Option<&Vec<SessionRef>>) -> Aggregate {
    match list {
        None => Aggregate::Offline,
        Some(l) if l.is_empty() => Aggregate::Offline,
        Some(l) if l.iter().any(|s| !s.away) => Aggregate::Online,
        Some(_) => Aggregate::Away,
    }
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

    /// Adds a session and returns the sessions the policy displaces (to be kicked),
    /// and the user's presence before and after. The same device logging in again
    /// always displaces its older session.
    pub fn register(&self, user: UserId, s: SessionRef) -> (Vec<SessionRef>, Aggregate, Aggregate) {
        let mut map = self.stripe(user).write();
        let before = aggregate(map.get(&user));
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
        let after = aggregate(Some(list));
        (kicked, before, after)
    }

    /// Removes the session of `conn` on `shard`, if still registered; returns the
    /// user's presence before and after.
    pub fn unregister(&self, user: UserId, shard: ShardId, conn: ConnId) -> (Aggregate, Aggregate) {
        let mut map = self.stripe(user).write();
        let before = aggregate(map.get(&user));
        if let Some(list) = map.get_mut(&user) {
            list.retain(|o| !(o.conn == conn && o.shard == shard));
            if list.is_empty() {
                map.remove(&user);
            }
        }
        (before, aggregate(map.get(&user)))
    }

    /// Marks a session away or back; returns the user's presence before and after.
    pub fn set_away(
        &self,
        user: UserId,
        shard: ShardId,
        conn: ConnId,
        away: bool,
    ) -> (Aggregate, Aggregate) {
        let mut map = self.stripe(user).write();
        let before = aggregate(map.get(&user));
        if let Some(list) = map.get_mut(&user) {
            for s in list
                .iter_mut()
                .filter(|s| s.conn == conn && s.shard == shard)
            {
                s.away = away;
            }
        }
        (before, aggregate(map.get(&user)))
    }

    /// The user's presence now.
    pub fn presence(&self, user: UserId) -> Aggregate {
        aggregate(self.stripe(user).read().get(&user))
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
            away: false,
        }
    }

    #[test]
    fn per_platform_kicks_same_platform_only() {
        let d = Directory::new(MultiDevice::PerPlatform, 8);
        let u = UserId(7);
        let (k, before, after) = d.register(u, s(0, 1, Platform::Desktop, "a"));
        assert!(k.is_empty());
        assert_eq!((before, after), (Aggregate::Offline, Aggregate::Online));
        assert!(d.register(u, s(1, 2, Platform::Mobile, "b")).0.is_empty());
        let (k, _, _) = d.register(u, s(1, 3, Platform::Desktop, "c"));
        assert_eq!(k, vec![s(0, 1, Platform::Desktop, "a")]);
        assert_eq!(d.with_sessions(u, |l| l.len()), 2);
        // An old connection's unregister does not remove the new one.
        d.unregister(u, ShardId(0), ConnId(1));
        assert_eq!(d.with_sessions(u, |l| l.len()), 2);
        d.unregister(u, ShardId(1), ConnId(3));
        assert_eq!(
            d.unregister(u, ShardId(1), ConnId(2)),
            (Aggregate::Online, Aggregate::Offline)
        );
        assert_eq!(d.session_count(), 0);
    }

    #[test]
    fn away_aggregates_over_sessions() {
        let d = Directory::new(MultiDevice::PerPlatform, 8);
        let u = UserId(1);
        d.register(u, s(0, 1, Platform::Desktop, "a"));
        d.register(u, s(0, 2, Platform::Mobile, "b"));
        assert_eq!(
            d.set_away(u, ShardId(0), ConnId(1), true),
            (Aggregate::Online, Aggregate::Online)
        );
        assert_eq!(
            d.set_away(u, ShardId(0), ConnId(2), true),
            (Aggregate::Online, Aggregate::Away)
        );
        assert_eq!(d.presence(u), Aggregate::Away);
        assert_eq!(
            d.set_away(u, ShardId(0), ConnId(1), false),
            (Aggregate::Away, Aggregate::Online)
        );
        assert_eq!(d.presence(UserId(2)), Aggregate::Offline);
    }

    #[test]
    fn single_and_multi() {
        let d = Directory::new(MultiDevice::Single, 8);
        d.register(UserId(1), s(0, 1, Platform::Desktop, "a"));
        assert_eq!(
            d.register(UserId(1), s(0, 2, Platform::Mobile, "b"))
                .0
                .len(),
            1
        );
        let d = Directory::new(MultiDevice::Multi, 2);
        d.register(UserId(1), s(0, 1, Platform::Desktop, "a"));
        assert!(d
            .register(UserId(1), s(0, 2, Platform::Desktop, "b"))
            .0
            .is_empty());
        let (k, _, _) = d.register(UserId(1), s(0, 3, Platform::Desktop, "c"));
        assert_eq!(k, vec![s(0, 1, Platform::Desktop, "a")]);
        // same device re-login displaces even under multi
        let (k, _, _) = d.register(UserId(1), s(0, 4, Platform::Desktop, "c"));
        assert_eq!(k, vec![s(0, 3, Platform::Desktop, "c")]);
    }
}

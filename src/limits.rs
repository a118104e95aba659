//! Rate limits: a token bucket (per connection, owned by its task) and per-user buckets
//! shared by all shards (a user's devices may sit on different shards), and the count
//! of connections per source address.

use crate::ids::UserId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// A token bucket: `rate` tokens per second, holding at most `burst`; starts full.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn full(burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst as f64,
            at: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate as f64).min(burst as f64);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full again by `now` (so forgetting it changes
    /// nothing).
    fn refilled(&self, rate: u32, burst: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * rate as f64 >= burst as f64
    }
}

const STRIPES: usize = 16;

/// One token bucket per user, in striped maps. Bounded: a stripe that grows past its
/// share forgets the buckets that have refilled (they would start full anyway), so
/// only users actually sending at the limit are remembered (and past 4,096 of those in
/// one stripe, all of the stripe's are forgotten: a bound over precision).
pub struct UserBuckets {
    rate: u32,
    burst: u32,
    stripes: Vec<Mutex<HashMap<UserId, TokenBucket>>>,
}

impl UserBuckets {
    pub fn new(rate: u32, burst: u32) -> UserBuckets {
        UserBuckets {
            rate,
            burst,
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes one token from `user`'s bucket; false when it is empty.
    pub fn take(&self, user: UserId) -> bool {
        let now = Instant::now();
        let mut m = self.stripes[(user.0 as usize) % STRIPES].lock();
        if m.len() >= 4096 && !m.contains_key(&user) {
            let (rate, burst) = (self.rate, self.burst);
            m.retain(|_, b| !b.refilled(rate, burst, now));
            if m.len() >= 4096 {
                // Thousands of users at their limit in one stripe at once: forget them
                // (each gets a full bucket again) rather than grow without bound.
                m.clear();
            }
        }
        m.entry(user)
            .or_insert_with(|| TokenBucket::full(self.burst, now))
            .take(self.rate, self.burst, now)
    }
}

/// Connections open per source address.
#[derive(Default)]
pub struct PerAddr {
    map: Mutex<HashMap<IpAddr, u32>>,
}

impl PerAddr {
    /// Counts one more connection from `ip` unless it already holds `limit`.
    pub fn acquire(&self, ip: IpAddr, limit: usize) -> bool {
        let mut m = self.map.lock();
        let n = m.entry(ip).or_insert(0);
        if *n as usize >= limit {
            return false;
        }
        *n += 1;
        true
    }

    pub fn release(&self, ip: IpAddr) {
        let mut m = self.map.lock();
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }

    pub fn count(&self, ip: IpAddr) -> u32 {
        self.map.lock().get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3, t0);
        assert!(b.take(2, 3, t0));
        assert!(b.take(2, 3, t0));
        assert!(b.take(2, 3, t0));
        assert!(!b.take(2, 3, t0));
        // Half a second at 2/s: one token.
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.take(2, 3, t1));
        assert!(!b.take(2, 3, t1));
        // Long idle: back to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.take(2, 3, t2));
        }
        assert!(!b.take(2, 3, t2));
    }

    #[test]
    fn user_buckets_are_per_user_and_bounded() {
        let u = UserBuckets::new(1, 2);
        assert!(u.take(UserId(1)));
        assert!(u.take(UserId(1)));
        assert!(!u.take(UserId(1)));
        assert!(u.take(UserId(2)));
        for i in 0..100_000u64 {
            u.take(UserId(1000 + i));
        }
        let held: usize = u.stripes.iter().map(|s| s.lock().len()).sum();
        assert!(held <= STRIPES * 4096 + STRIPES, "held {held}");
    }

    #[test]
    fn per_addr_counts_and_releases() {
        let p = PerAddr::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(p.acquire(ip, 2));
        assert!(p.acquire(ip, 2));
        assert!(!p.acquire(ip, 2));
        p.release(ip);
        assert!(p.acquire(ip, 2));
        p.release(ip);
        p.release(ip);
        assert_eq!(p.count(ip), 0);
        assert!(p.map.lock().is_empty());
    }
}

//! Scenarios: what a load test does, as a TOML file under `config/loadtest/`. Every key
//! is optional except `name`; the defaults are below. Unknown keys are refused.
//!
//! ```toml
//! name = "smoke"              # shown in reports
//! users = 200                 # simulated users: <prefix>0 .. <prefix>N-1
//! devices_per_user = 1        # sessions per user (platforms desktop, mobile, web, tablet)
//! user_prefix = "lt"          # usernames; the state file keeps their tokens
//! password = "loadtest-pass"  # used once, at registration and token renewal
//! login_rate = 0              # logins per second during the ramp; 0 = as fast as it goes
//! idle_secs = 0               # hold every connection idle this long after login
//!
//! [traffic]
//! mode = "open"               # "open" (fixed total rate), "closed" (fixed window in
//!                             # flight: a message is in flight until acked) or "none"
//! rate = 1000                 # open loop: messages per second, all senders together
//! window = 256                # closed loop: messages in flight
//! direct_share = 1.0          # share of 1:1 messages; the rest go to groups
//! contacts = 0                # 1:1 peers per user (a fixed, symmetric set: user u
//!                             # talks to u ± k_1, u ± k_2 … mod users, the same in
//!                             # every process); 0 = any other user, uniformly, so
//!                             # nearly every message opens a new conversation
//! message_size = 120          # text bytes per message (at least 40)
//! groups = 0                  # groups created for the run …
//! group_size = 50             # … each with this many members (consecutive users)
//! warmup_secs = 1             # traffic before measuring
//! duration_secs = 10          # measured traffic
//! drain_secs = 10             # after traffic: wait at most this long for deliveries
//!
//! [faults]
//! stall_share = 0.0           # share of users whose devices stop reading (and sending)
//! stall_after_secs = 2        # … this long after login …
//! stall_secs = 10             # … for this long
//! to_stalled_share = 0.0      # share of 1:1 messages sent to stalled users
//! reconnect = false           # reconnect + re-sync when the server closes a connection
//! check_deliveries = true     # undelivered messages ("lost") fail the run
//! ```

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default = "d_users")]
    pub users: usize,
    #[serde(default = "d_one")]
    pub devices_per_user: usize,
    #[serde(default = "d_prefix")]
    pub user_prefix: String,
    #[serde(default = "d_password")]
    pub password: String,
    #[serde(default)]
    pub login_rate: u64,
    #[serde(default)]
    pub idle_secs: u64,
    #[serde(default)]
    pub traffic: Traffic,
    #[serde(default)]
    pub faults: Faults,
}

/// Faults a scenario injects, and how devices ride them out.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Share of users (the first ones) whose devices stop reading and sending.
    pub stall_share: f64,
    /// Seconds after login before they stop …
    pub stall_after_secs: u64,
    /// … and for how long.
    pub stall_secs: u64,
    /// Share of 1:1 messages addressed to stalled users (to flood them).
    pub to_stalled_share: f64,
    /// A device whose connection is closed or fails reconnects (retrying while the
    /// server is down) and re-syncs from the last pts it saw; KICKs and lost
    /// connections are then reported, not errors.
    pub reconnect: bool,
    /// Whether undelivered messages fail the run. `durability.toml` turns it off: the
    /// server is meant to die under it, and `verify` checks the acks instead.
    pub check_deliveries: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            stall_share: 0.0,
            stall_after_secs: 2,
            stall_secs: 10,
            to_stalled_share: 0.0,
            reconnect: false,
            check_deliveries: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Open,
    Closed,
    None,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Traffic {
    pub mode: Mode,
    pub rate: u64,
    pub window: usize,
    pub direct_share: f64,
    pub contacts: usize,
    pub message_size: usize,
    pub groups: usize,
    pub group_size: usize,
    pub warmup_secs: u64,
    pub duration_secs: u64,
    pub drain_secs: u64,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            mode: Mode::Open,
            rate: 1000,
            window: 256,
            direct_share: 1.0,
            contacts: 0,
            message_size: 120,
            groups: 0,
            group_size: 50,
            warmup_secs: 1,
            duration_secs: 10,
            drain_secs: 10,
        }
    }
}

fn d_users() -> usize {
    200
}
fn d_one() -> usize {
    1
}
fn d_prefix() -> String {
    "lt".into()
}
fn d_password() -> String {
    "loadtest-pass".into()
}

impl Scenario {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let s: Scenario =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.users >= 2, "users: at least 2");
        anyhow::ensure!(
            (1..=4).contains(&self.devices_per_user),
            "devices_per_user: 1 to 4 (one per platform)"
        );
        anyhow::ensure!(
            !self.user_prefix.is_empty() && self.user_prefix.as_bytes()[0].is_ascii_lowercase(),
            "user_prefix: starts with a-z"
        );
        let t = &self.traffic;
        anyhow::ensure!(
            (0.0..=1.0).contains(&t.direct_share),
            "traffic.direct_share: 0.0 to 1.0"
        );
        anyhow::ensure!(t.message_size >= 40, "traffic.message_size: at least 40");
        anyhow::ensure!(
            t.contacts.div_ceil(2) <= (self.users - 1) / 2,
            "traffic.contacts: at most the other users (rounded up to even)"
        );
        anyhow::ensure!(
            t.direct_share >= 1.0 || t.groups > 0,
            "traffic: group messages need traffic.groups > 0"
        );
        anyhow::ensure!(
            t.groups == 0 || (2..=self.users).contains(&t.group_size),
            "traffic.group_size: 2 to users"
        );
        anyhow::ensure!(
            t.mode != Mode::Closed || t.window > 0,
            "traffic.window: at least 1"
        );
        anyhow::ensure!(
            t.mode != Mode::Open || t.rate > 0,
            "traffic.rate: at least 1"
        );
        let f = &self.faults;
        anyhow::ensure!(
            (0.0..1.0).contains(&f.stall_share),
            "faults.stall_share: 0.0 up to (not including) 1.0"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&f.to_stalled_share),
            "faults.to_stalled_share: 0.0 to 1.0"
        );
        anyhow::ensure!(
            f.stall_share == 0.0 || f.reconnect,
            "faults.stall_share needs faults.reconnect = true (the server cuts stalled readers)"
        );
        anyhow::ensure!(
            !f.reconnect || (t.direct_share >= 1.0 && self.devices_per_user == 1),
            "faults.reconnect: re-sync is verified for 1:1 traffic with one device per user"
        );
        Ok(())
    }

    /// The 1:1 peer offsets: user u talks to u + k and u - k (mod users) for each k,
    /// so `contacts` rounds up to even. Fixed (a hash of the index), so every worker
    /// process draws the same contact sets; empty when `contacts` is 0.
    pub fn contact_offsets(&self) -> Vec<usize> {
        let n = self.traffic.contacts.div_ceil(2);
        let mut out: Vec<usize> = Vec::with_capacity(n);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while out.len() < n {
            // splitmix64
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let off = 1 + (z % (self.users as u64 - 1)) as usize;
            // Two distinct peers per offset: not users/2 (u + k = u - k), not a repeat
            // or the mirror of an earlier offset.
            if 2 * off != self.users && !out.iter().any(|o| *o == off || *o == self.users - off) {
                out.push(off);
            }
        }
        out
    }

    /// User `u`'s contact number `k` (0 .. 2 × offsets): u + offset, u - offset.
    pub fn contact(&self, offsets: &[usize], u: usize, k: usize) -> usize {
        let off = offsets[k / 2];
        if k.is_multiple_of(2) {
            (u + off) % self.users
        } else {
            (u + self.users - off) % self.users
        }
    }

    /// Whether user `u` is one of the stalled ones.
    pub fn is_stalled(&self, u: usize) -> bool {
        (u as f64) < (self.users as f64 * self.faults.stall_share).ceil()
    }

    /// Members (user indexes) of group `g`: `group_size` consecutive users, wrapping.
    pub fn group_members(&self, g: usize) -> Vec<usize> {
        let t = &self.traffic;
        let start = (g * t.group_size) % self.users;
        (0..t.group_size)
            .map(|k| (start + k) % self.users)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(users: usize, contacts: usize) -> Scenario {
        let mut s: Scenario = toml::from_str("name = \"t\"").unwrap();
        s.users = users;
        s.traffic.contacts = contacts;
        s
    }

    /// Each user gets exactly `contacts` distinct peers, never itself, the relation is
    /// symmetric (u talks to v iff v talks to u), and every process draws the same.
    #[test]
    fn contact_sets_are_distinct_symmetric_and_fixed() {
        let s = with(1000, 20);
        s.validate().unwrap();
        let offs = s.contact_offsets();
        assert_eq!(offs, s.contact_offsets());
        assert_eq!(offs.len(), 10);
        let peers = |u: usize| -> std::collections::BTreeSet<usize> {
            (0..offs.len() * 2)
                .map(|k| s.contact(&offs, u, k))
                .collect()
        };
        for u in [0, 1, 499, 999] {
            let p = peers(u);
            assert_eq!(p.len(), 20, "user {u}");
            assert!(!p.contains(&u));
            for v in p {
                assert!(peers(v).contains(&u));
            }
        }
        assert!(with(1000, 0).contact_offsets().is_empty());
        // At most every other user, rounded up to even: 11 users talk to all 10
        // others; with 10 users, u + 5 = u - 5, so 8 is the most.
        with(11, 10).validate().unwrap();
        assert!(with(11, 11).validate().is_err());
        assert_eq!(with(11, 10).contact_offsets().len(), 5);
        with(10, 8).validate().unwrap();
        assert!(with(10, 9).validate().is_err());
        assert_eq!(with(10, 8).contact_offsets().len(), 4);
        assert!(!with(10, 8).contact_offsets().contains(&5));
    }
}

//! The (sender, client message id) → message index, written many entries at a time.
//!
//! Why: a resend must find its original (the idempotence key is unique per sender), so
//! every message needs an entry in an index ordered by sender: one more random page per
//! message, like the update streams (see `recent`). Measured on the writer alone (1:1
//! sends between 10,000 users with 20 contacts each, 1,024 in flight, two alternating
//! pairs of 300,000 messages): without the index and its lookup, 15-20 % less CPU per
//! message.
//!
//! How: `messages` is append-only by id, so it is its own log: the entries of messages
//! with ids above `meta.client_ids_upto` are not in `client_ids` yet, and the writer
//! (the only one that reads this index) holds them in a map. Once the map holds
//! `store.stream_log_rows` entries, a merge sorts them and writes them to `client_ids`
//! a step in each write batch's transaction (whole senders, at least
//! `store.stream_merge_rows` entries and what the previous batch added); its last step moves
//! `client_ids_upto` to the merge's start. A restart merges the messages past it (`OR
//! IGNORE`: a step that committed before a crash already wrote some).
//!
//! A lookup that misses the map went to `client_ids`, and for a new message (almost
//! every send) it always missed there too: one probe of a b-tree keyed by random
//! strings, 9 % of the writer's samples under saturate-10k. So each sender also gets a
//! Bloom filter over its entries in `client_ids` ([`Filter`]), built from them (and
//! from the map's, which merges will move there) at the sender's first lookup, and
//! kept up to date from then on by every entry the writer stores; a lookup the filter
//! rules out skips the probe. A filter can only say "maybe" wrongly (about 1 % of the
//! time at ten bits per entry), never "no", so a resend always finds its original.

use crate::ids::UserId;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hasher};

/// A sender with more entries than this gets no filter (its lookups probe the index as
/// before): building one reads all of them, in the writer's thread.
pub(super) const FILTER_MAX_ENTRIES: usize = 16_384;

/// All filters together hold at most this many 64-bit words (16 MiB); past it they are
/// dropped and rebuilt as senders come back. (Tests use a small budget, so that the
/// store's tests drop and rebuild filters too.)
#[cfg(not(test))]
const FILTER_BUDGET_WORDS: usize = 2 << 20;
#[cfg(test)]
const FILTER_BUDGET_WORDS: usize = 256;

/// Bits of the filter per entry it is sized for, and probes per lookup: about 1 %
/// false "maybe"s when full.
const BITS_PER_ENTRY: usize = 10;
const PROBES: u64 = 7;

/// The hash a filter places a client message id by (its bytes, as the database holds
/// them: a filter is built from rows without making a `String` of each).
pub(super) fn cid_hash(cid: &[u8]) -> u64 {
    // DefaultHasher::new() has fixed keys: the same positions every time.
    let mut h = DefaultHasher::new();
    h.write(cid);
    h.finish()
}

/// One sender's Bloom filter over client message ids.
pub(super) enum Filter {
    Bits {
        words: Box<[u64]>,
        /// Entries added, and how many it is sized for: past that it is dropped (and
        /// rebuilt twice as large at the sender's next lookup).
        count: usize,
        capacity: usize,
    },
    /// More than [`FILTER_MAX_ENTRIES`], or entries that could not be read: no filter
    /// (every lookup probes the index).
    TooMany,
}

impl Filter {
    /// A filter for `n` entries and as many again before it must grow.
    fn sized_for(n: usize) -> Filter {
        let bits = (2 * n)
            .max(64)
            .saturating_mul(BITS_PER_ENTRY)
            .next_power_of_two();
        Filter::Bits {
            words: vec![0u64; bits / 64].into_boxed_slice(),
            count: 0,
            capacity: bits / BITS_PER_ENTRY,
        }
    }

    /// The bit positions of a client id's [`cid_hash`] (double hashing).
    fn positions(h: u64, bits: usize) -> impl Iterator<Item = usize> {
        let (a, b) = (h & 0xffff_ffff, (h >> 32) | 1);
        let mask = bits as u64 - 1;
        (0..PROBES).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) & mask) as usize)
    }

    /// Adds a client id by its [`cid_hash`]; false once the filter holds more than it
    /// was sized for.
    fn add(&mut self, hash: u64) -> bool {
        match self {
            Filter::Bits {
                words,
                count,
                capacity,
            } => {
                for p in Self::positions(hash, words.len() * 64) {
                    words[p / 64] |= 1 << (p % 64);
                }
                *count += 1;
                *count <= *capacity
            }
            Filter::TooMany => true,
        }
    }

    /// False only when `cid` was never added.
    fn may_hold(&self, cid: &str) -> bool {
        match self {
            Filter::Bits { words, .. } => {
                let h = cid_hash(cid.as_bytes());
                Self::positions(h, words.len() * 64).all(|p| words[p / 64] & (1 << (p % 64)) != 0)
            }
            Filter::TooMany => true,
        }
    }

    fn words(&self) -> usize {
        match self {
            Filter::Bits { words, .. } => words.len(),
            Filter::TooMany => 0,
        }
    }
}

/// One resend entry: sender, client message id, message id.
pub(super) type Entry = (UserId, String, u64);

/// A step of a merge: its entries, the newest message id the merge covers, and
/// whether the step is its last.
pub(super) struct Step {
    pub entries: Vec<Entry>,
    pub upto: u64,
    pub last: bool,
}

/// Entries by sender, then client message id (two levels, so that a lookup by `&str`
/// allocates nothing).
#[derive(Default)]
struct Map {
    by_sender: HashMap<UserId, HashMap<String, u64>>,
    len: usize,
}

impl Map {
    fn get(&self, sender: UserId, cid: &str) -> Option<u64> {
        self.by_sender.get(&sender)?.get(cid).copied()
    }

    fn insert(&mut self, sender: UserId, cid: String, id: u64) {
        if self
            .by_sender
            .entry(sender)
            .or_default()
            .insert(cid, id)
            .is_none()
        {
            self.len += 1;
        }
    }

    /// Removes the entry if it still names message `id`.
    fn remove(&mut self, sender: UserId, cid: &str, id: u64) {
        if let Some(m) = self.by_sender.get_mut(&sender) {
            if m.get(cid) == Some(&id) {
                m.remove(cid);
                self.len -= 1;
                if m.is_empty() {
                    self.by_sender.remove(&sender);
                }
            }
        }
    }

    fn drain(&mut self) -> impl Iterator<Item = Entry> + '_ {
        self.len = 0;
        self.by_sender
            .drain()
            .flat_map(|(u, m)| m.into_iter().map(move |(c, id)| (u, c, id)))
    }

    fn clear(&mut self) {
        self.by_sender.clear();
        self.len = 0;
    }
}

/// Entries of messages not merged into `client_ids`, and the merge under way.
#[derive(Default)]
pub(super) struct ClientIds {
    /// Committed messages' entries.
    recent: Map,
    /// The batch being built's entries (its released writes); into `recent` when it
    /// commits, dropped when it fails.
    batch: Map,
    /// The newest message id among committed entries.
    newest: u64,
    /// The merge under way.
    merging: Option<Merging>,
    /// Senders' filters over their entries in `client_ids` (see the module's docs).
    filters: HashMap<UserId, Filter>,
    /// Words the filters hold together.
    filter_words: usize,
}

/// A merge: the newest message id it covers, and its senders in order, from the next
/// one to write. Each step copies and sorts its own senders' entries: sorting all of
/// them at the start (65,536 cloned strings) held one batch up for ~20 ms.
struct Merging {
    upto: u64,
    senders: Vec<UserId>,
    next: usize,
}

impl ClientIds {
    /// The message id of an entry not in `client_ids` yet.
    pub fn get(&self, sender: UserId, cid: &str) -> Option<u64> {
        self.batch
            .get(sender, cid)
            .or_else(|| self.recent.get(sender, cid))
    }

    pub fn add_to_batch(&mut self, entries: impl IntoIterator<Item = Entry>) {
        for (u, c, id) in entries {
            // Every entry passes here before a merge can write it to `client_ids`,
            // so a filter, once built, sees all of its sender's. (A batch that fails
            // leaves its entries in the filter: a false "maybe", nothing worse.)
            self.filter_add(u, &c);
            self.batch.insert(u, c, id);
        }
    }

    fn filter_add(&mut self, u: UserId, cid: &str) {
        if let Some(f) = self.filters.get_mut(&u) {
            if !f.add(cid_hash(cid.as_bytes())) {
                // Full: dropped, and rebuilt at the sender's next lookup.
                self.filter_words -= f.words();
                self.filters.remove(&u);
            }
        }
    }

    /// Whether `sender` has no filter yet (neither one nor a "too many" mark).
    pub fn needs_filter(&self, sender: UserId) -> bool {
        !self.filters.contains_key(&sender)
    }

    /// Builds `sender`'s filter from its entries in `client_ids`, as [`cid_hash`]es
    /// (`None`: more than [`FILTER_MAX_ENTRIES`], or they could not be read), and its
    /// entries here, which merges will write there.
    pub fn set_filter(&mut self, sender: UserId, stored: Option<Vec<u64>>) {
        let mine = |m: &Map| m.by_sender.get(&sender).map_or(0, |x| x.len());
        let f = match stored {
            None => Filter::TooMany,
            Some(stored) => {
                let mut f =
                    Filter::sized_for(stored.len() + mine(&self.batch) + mine(&self.recent));
                let here = [&self.batch, &self.recent]
                    .into_iter()
                    .filter_map(|m| m.by_sender.get(&sender))
                    .flat_map(|x| x.keys())
                    .map(|c| cid_hash(c.as_bytes()));
                for h in stored.into_iter().chain(here) {
                    f.add(h);
                }
                f
            }
        };
        if self.filter_words + f.words() > FILTER_BUDGET_WORDS {
            self.filters.clear();
            self.filter_words = 0;
        }
        self.filter_words += f.words();
        if let Some(old) = self.filters.insert(sender, f) {
            self.filter_words -= old.words();
        }
    }

    /// True when `sender`'s filter rules out that `cid` is in `client_ids`.
    pub fn surely_not_stored(&self, sender: UserId, cid: &str) -> bool {
        self.filters.get(&sender).is_some_and(|f| !f.may_hold(cid))
    }

    /// Entries of the batch being built.
    pub fn batch_len(&self) -> usize {
        self.batch.len
    }

    pub fn batch_committed(&mut self) {
        for (u, c, id) in self.batch.drain() {
            self.newest = self.newest.max(id);
            self.recent.insert(u, c, id);
        }
    }

    /// The newest message committed (0 before the first since the start).
    pub fn newest(&self) -> u64 {
        self.newest
    }

    pub fn batch_failed(&mut self) {
        self.batch.clear();
    }

    pub fn len(&self) -> usize {
        self.recent.len
    }

    /// Starts a merge of every committed entry (they are all of messages up to the
    /// newest id among them).
    pub fn start_merge(&mut self) {
        let mut senders: Vec<UserId> = self.recent.by_sender.keys().copied().collect();
        senders.sort_unstable();
        self.merging = Some(Merging {
            upto: self.newest,
            senders,
            next: 0,
        });
    }

    pub fn merging(&self) -> bool {
        self.merging.is_some()
    }

    /// The next entries of the merge under way, sorted: whole senders, until `max` or
    /// more are taken.
    pub fn next_step(&mut self, max: usize) -> Option<Step> {
        let m = self.merging.as_mut()?;
        let mut entries = Vec::new();
        while entries.len() < max && m.next < m.senders.len() {
            let u = m.senders[m.next];
            m.next += 1;
            if let Some(by_cid) = self.recent.by_sender.get(&u) {
                let from = entries.len();
                let upto = m.upto;
                entries.extend(
                    by_cid
                        .iter()
                        .filter(|(_, id)| **id <= upto)
                        .map(|(c, id)| (u, c.clone(), *id)),
                );
                entries[from..].sort_unstable();
            }
        }
        Some(Step {
            entries,
            upto: m.upto,
            last: m.next == m.senders.len(),
        })
    }

    /// A step committed: its entries are in `client_ids` now.
    pub fn step_committed(&mut self, step: &Step) {
        for (u, c, id) in &step.entries {
            self.recent.remove(*u, c, *id);
        }
        if step.last {
            self.merging = None;
        }
    }

    /// A step failed: the merge is dropped (its entries not written stay here; a
    /// later merge takes them again).
    pub fn merge_failed(&mut self) {
        self.merging = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(cids: &[String]) -> Vec<u64> {
        cids.iter().map(|c| cid_hash(c.as_bytes())).collect()
    }

    /// A filter never rules out what was added (built from the stored entries and the
    /// map's, or added later), rules out most of what was not, and is dropped once it
    /// holds more than it was sized for.
    #[test]
    fn a_filter_never_rules_out_a_stored_entry() {
        let mut c = ClientIds::default();
        let (u, other) = (UserId(7), UserId(8));
        // In the map when the filter is built: a merge will write it to the table.
        c.add_to_batch([(u, "mapped".to_string(), 1)]);
        c.batch_committed();
        assert!(c.needs_filter(u));
        let stored: Vec<String> = (0..100).map(|i| format!("s{i}")).collect();
        c.set_filter(u, Some(hashes(&stored)));
        assert!(!c.needs_filter(u));
        for cid in stored.iter().map(String::as_str).chain(["mapped"]) {
            assert!(!c.surely_not_stored(u, cid), "{cid}");
        }
        // Stored after the filter was built.
        c.add_to_batch([(u, "later".to_string(), 2)]);
        assert!(!c.surely_not_stored(u, "later"));
        let ruled_out = (0..1000)
            .filter(|i| c.surely_not_stored(u, &format!("new{i}")))
            .count();
        assert!(ruled_out >= 950, "only {ruled_out} of 1000 ruled out");
        // No filter, no verdict; too many, no verdict.
        assert!(!c.surely_not_stored(other, "s1"));
        c.set_filter(other, None);
        assert!(!c.needs_filter(other) && !c.surely_not_stored(other, "new1"));
        // Sized for 2 x 101 entries and up to 1,024 bits: past its capacity it goes.
        let Some(Filter::Bits {
            capacity, count, ..
        }) = c.filters.get(&u)
        else {
            panic!("no filter")
        };
        let room = capacity - count;
        for i in 0..room {
            c.add_to_batch([(u, format!("more{i}"), 10 + i as u64)]);
        }
        assert!(!c.needs_filter(u));
        c.add_to_batch([(u, "one too many".to_string(), 1 << 40)]);
        assert!(c.needs_filter(u));
        assert_eq!(c.filter_words, 0);
    }

    /// Past their budget all filters are dropped at once (senders rebuild theirs at
    /// their next lookup), and the one being set stays.
    #[test]
    fn filters_past_their_budget_are_dropped_together() {
        let mut c = ClientIds::default();
        // 200 entries: sized for 400, 4,096 bits, 64 words; four fit in the test
        // budget of 256.
        let stored: Vec<String> = (0..200).map(|i| format!("s{i}")).collect();
        for u in 1..=4 {
            c.set_filter(UserId(u), Some(hashes(&stored)));
        }
        assert_eq!(c.filter_words, 256);
        assert!((1..=4).all(|u| !c.needs_filter(UserId(u))));
        c.set_filter(UserId(5), Some(hashes(&stored)));
        assert_eq!(c.filter_words, 64);
        assert!((1..=4).all(|u| c.needs_filter(UserId(u))));
        assert!(!c.needs_filter(UserId(5)) && !c.surely_not_stored(UserId(5), "s7"));
        // Set again for the same sender: the old one's words are given back.
        c.set_filter(UserId(5), Some(hashes(&stored)));
        assert_eq!(c.filter_words, 64);
    }

    #[test]
    fn batches_commit_or_vanish_and_merges_take_what_was_committed() {
        let mut c = ClientIds::default();
        c.add_to_batch([(UserId(2), "b".to_string(), 5)]);
        assert_eq!(c.get(UserId(2), "b"), Some(5));
        c.batch_failed();
        assert_eq!(c.get(UserId(2), "b"), None);
        c.add_to_batch([
            (UserId(2), "b".to_string(), 6),
            (UserId(1), "z".to_string(), 7),
            (UserId(1), "a".to_string(), 8),
        ]);
        c.batch_committed();
        assert_eq!((c.len(), c.get(UserId(1), "z")), (3, Some(7)));
        c.start_merge();
        // Logged while the merge runs: not part of it.
        c.add_to_batch([(UserId(1), "m".to_string(), 9)]);
        c.batch_committed();
        let step = c.next_step(2).unwrap();
        assert_eq!(
            step.entries,
            vec![
                (UserId(1), "a".to_string(), 8),
                (UserId(1), "z".to_string(), 7)
            ]
        );
        assert_eq!((step.upto, step.last), (8, false));
        c.step_committed(&step);
        assert_eq!(c.get(UserId(1), "a"), None);
        let step = c.next_step(2).unwrap();
        assert_eq!(step.entries, vec![(UserId(2), "b".to_string(), 6)]);
        assert!(step.last);
        c.step_committed(&step);
        assert!(!c.merging());
        assert_eq!((c.len(), c.get(UserId(1), "m")), (1, Some(9)));
    }
}

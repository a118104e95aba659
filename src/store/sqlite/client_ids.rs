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

use crate::ids::UserId;
use std::collections::HashMap;

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
            self.batch.insert(u, c, id);
        }
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

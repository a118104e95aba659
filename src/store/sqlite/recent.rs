//! The newest part of every user's update stream, kept out of the stream's index until
//! many of its events can be written there together.
//!
//! Why: the `updates` index is ordered by (user, pts), so each event lands at the end
//! of its user's range: with 10,000 active users that is 10,000 different pages, and a
//! 1:1 message (two events) dirtied two of them. Every dirty page costs a b-tree
//! insert, a whole page written to the WAL and checksummed, and the checkpoint's read
//! and write of it again. Measured on the writer alone (1:1 sends between 10,000 users
//! with 20 contacts each, 1,024 in flight, fsync per batch; two alternating pairs of
//! runs of 300,000 messages): taking the two inserts out entirely saved 23 % of the CPU
//! per message.
//!
//! How: an event is appended to `updates_log` (rowid order: always the same last page)
//! in the write's own transaction, so it is exactly as durable as before; once the
//! batch commits, the writer adds it to [`Recent`], the in-memory copy of the log that
//! readers consult beside the index. When the log holds `store.stream_log_rows`
//! events, a merge moves them into `updates` in (user, pts) order, a step in each
//! write batch's transaction, each step at least as large as what the previous batch
//! logged: each user's last page is written once for all of that user's events since
//! the previous merge. Once the last step has moved every event up to the merge's
//! start, the log rows up to there are deleted, a chunk per batch; a restart merges
//! whatever is left (`INSERT OR IGNORE`: merged rows may still be in the log).
//!
//! A one-to-one message's two events are not logged: its row in `messages` carries
//! both users' pts, written in the same transaction, so it is as durable as a log row
//! would be. They come here like the others; the merge's last step records in
//! `meta.stream_msgs_upto` the newest message committed at the merge's start (every
//! message up to it has its events in `updates` then), and a restart derives the
//! events of the messages past it from their rows. Measured on the store alone
//! (`examples/store_write_set.rs`, six alternating pairs): 37.9-43.8 against
//! 44.1-53.1 µs of CPU per message, 0.78-0.91 x (two log inserts and two deletes per
//! message, and their pages, gone).
//!
//! Why readers never miss an event: the writer adds events here only after their
//! commit, and removes them only after the commit that put them in `updates`. A reader
//! copies its user's events from here first and queries `updates` second. Per user,
//! `updates` holds the pts up to some P and this holds (P, Q]; a later snapshot of
//! `updates` holds up to some P' >= P. The union of the copy and the later snapshot is
//! everything up to max(P', Q), with no gap; events in both (merged in between) are
//! taken once, by pts.

use super::StreamEvent;
use crate::ids::UserId;
use std::collections::BTreeMap;
use std::ops::Bound;

/// What a reader needs to read a user's pts exactly as of its snapshot: `updates` in
/// the snapshot and [`Recent`] must hold the same commits. Events enter `Recent` just
/// after their COMMIT and leave it just after the COMMIT that merged them, so a
/// snapshot begun in between would see a commit that `Recent` does not show yet (a
/// pts too low: a new device would be sent again what its snapshot gave it) or miss
/// one whose events `Recent` already dropped. The writer holds this exclusively from a
/// batch's COMMIT until `Recent` shows it (events added, merged ones removed); a
/// reader holds it shared from its snapshot's first read until it has read `Recent`
/// (a few microseconds: one index lookup). Nothing else changes `Recent` (the
/// shutdown's final merge takes it too), so the two never disagree for such a
/// reader. Other readers (sync pages) need no agreement (the module's doc says why).
pub(super) type CommitLock = parking_lot::RwLock<()>;

/// One event of a user's stream, as logged.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub pts: u64,
    /// Its row in `updates_log`.
    pub log_id: i64,
    pub ev: StreamEvent,
    /// The event's text (a friend request's message), usually empty.
    pub data: String,
}

/// The logged events not yet merged, by user, each user's in pts order.
#[derive(Default)]
pub(super) struct Recent {
    users: BTreeMap<UserId, Vec<Entry>>,
    rows: usize,
    last_log_id: i64,
}

/// A step of a merge: the events it moves, and where the next step starts.
pub(super) struct Step {
    pub entries: Vec<(UserId, Entry)>,
    /// The last user the step covers (the next step starts after it).
    pub last_user: Option<UserId>,
    /// No user after `last_user` has events up to the merge's start.
    pub done: bool,
}

impl Recent {
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The newest log row held (0 when none ever was).
    pub fn last_log_id(&self) -> i64 {
        self.last_log_id
    }

    /// The user's newest pts here, if any event of theirs is here.
    pub fn last_pts(&self, user: UserId) -> Option<u64> {
        self.users.get(&user).and_then(|v| v.last()).map(|e| e.pts)
    }

    /// Up to `max` of the user's events with pts > `since`, oldest first.
    pub fn after(&self, user: UserId, since: u64, max: usize) -> Vec<Entry> {
        let Some(v) = self.users.get(&user) else {
            return Vec::new();
        };
        let start = v.partition_point(|e| e.pts <= since);
        v[start..].iter().take(max).cloned().collect()
    }

    /// Adds committed events (in commit order).
    pub fn add(&mut self, entries: impl IntoIterator<Item = (UserId, Entry)>) {
        for (u, e) in entries {
            self.last_log_id = self.last_log_id.max(e.log_id);
            self.users.entry(u).or_default().push(e);
            self.rows += 1;
        }
    }

    /// The next step of a merge that started when the log's newest row was `upto`:
    /// whole users after `after`, each with their events up to `upto`, until at least
    /// `max` events are taken.
    pub fn step(&self, after: Option<UserId>, upto: i64, max: usize) -> Step {
        let lower = match after {
            Some(u) => Bound::Excluded(u),
            None => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        let mut last_user = after;
        let mut iter = self.users.range((lower, Bound::Unbounded)).peekable();
        while entries.len() < max {
            let Some((u, v)) = iter.next() else { break };
            let n = v.partition_point(|e| e.log_id <= upto);
            entries.extend(v[..n].iter().map(|e| (*u, e.clone())));
            last_user = Some(*u);
        }
        Step {
            entries,
            last_user,
            done: iter.peek().is_none(),
        }
    }

    /// Drops the events a committed merge step moved: each named user's up to `upto`.
    pub fn remove_merged(&mut self, users: impl IntoIterator<Item = UserId>, upto: i64) {
        for u in users {
            if let Some(v) = self.users.get_mut(&u) {
                let n = v.partition_point(|e| e.log_id <= upto);
                v.drain(..n);
                self.rows -= n;
                if v.is_empty() {
                    self.users.remove(&u);
                }
            }
        }
    }

    pub fn clear(&mut self) {
        self.users.clear();
        self.rows = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ConvId;

    fn entry(pts: u64, log_id: i64) -> Entry {
        Entry {
            pts,
            log_id,
            ev: StreamEvent {
                kind: 1,
                conv: ConvId(1),
                seq: pts,
                msg_id: log_id as u64,
                actor: UserId(1),
            },
            data: String::new(),
        }
    }

    fn filled() -> Recent {
        let mut r = Recent::default();
        // Log order interleaves users 1, 2 and 3.
        r.add([
            (UserId(2), entry(1, 1)),
            (UserId(1), entry(7, 2)),
            (UserId(3), entry(4, 3)),
            (UserId(2), entry(2, 4)),
            (UserId(1), entry(8, 5)),
        ]);
        r
    }

    #[test]
    fn reads_a_users_events_after_a_pts() {
        let r = filled();
        assert_eq!(r.rows(), 5);
        assert_eq!(r.last_log_id(), 5);
        assert_eq!(r.last_pts(UserId(1)), Some(8));
        assert_eq!(r.last_pts(UserId(9)), None);
        let pts = |v: Vec<Entry>| v.into_iter().map(|e| e.pts).collect::<Vec<_>>();
        assert_eq!(pts(r.after(UserId(1), 0, 10)), vec![7, 8]);
        assert_eq!(pts(r.after(UserId(1), 7, 10)), vec![8]);
        assert_eq!(pts(r.after(UserId(1), 0, 1)), vec![7]);
        assert!(r.after(UserId(1), 8, 10).is_empty());
        assert!(r.after(UserId(4), 0, 10).is_empty());
    }

    #[test]
    fn a_merge_takes_whole_users_up_to_its_start_and_leaves_later_events() {
        let mut r = filled();
        let upto = r.last_log_id();
        // Events logged after the merge started stay for the next one.
        r.add([(UserId(1), entry(9, 6)), (UserId(4), entry(1, 7))]);
        let s = r.step(None, upto, 1);
        let got: Vec<_> = s.entries.iter().map(|(u, e)| (u.0, e.pts)).collect();
        assert_eq!(got, vec![(1, 7), (1, 8)]);
        assert_eq!((s.last_user, s.done), (Some(UserId(1)), false));
        r.remove_merged([UserId(1)], upto);
        assert_eq!(r.rows(), 5);
        assert_eq!(r.last_pts(UserId(1)), Some(9));
        let s = r.step(s.last_user, upto, 3);
        let got: Vec<_> = s.entries.iter().map(|(u, e)| (u.0, e.pts)).collect();
        assert_eq!(got, vec![(2, 1), (2, 2), (3, 4)]);
        assert_eq!(s.last_user, Some(UserId(3)));
        // User 4 is still to look at (its only event is too new: the step is empty).
        assert!(!s.done);
        r.remove_merged([UserId(2), UserId(3)], upto);
        let s = r.step(Some(UserId(3)), upto, 3);
        assert!(s.entries.is_empty());
        assert_eq!((s.last_user, s.done), (Some(UserId(4)), true));
        assert_eq!(r.rows(), 2);
        assert_eq!(r.last_pts(UserId(2)), None);
        assert_eq!(r.last_pts(UserId(4)), Some(1));
    }
}

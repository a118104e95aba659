//! The read marks that one-to-one sends imply, kept out of `members` until many of
//! them can be written there together.
//!
//! Why: sending a message means having read the conversation up to it, so every
//! one-to-one send moved the sender's `read_seq` in `members`, a row keyed by (user,
//! conversation): with 10,000 users writing to 20 contacts each that is a different
//! page for nearly every message, each a b-tree update, a whole page written to the
//! WAL and checksummed, and the checkpoint's read and write of it again.
//!
//! How: a send puts (sender, conversation) -> seq here instead, in the batch that
//! stores the message, just before its COMMIT. When `store.stream_log_rows` marks are
//! here a flush starts: the keys held then, sorted as `members` is, are written a step
//! per write batch (`read_seq = MAX(read_seq, mark)`), so each page of `members` is
//! written once for all of its marks; the flush's last step records, in the same
//! transaction, that the mark of every message up to the newest one committed at its
//! start is in `members` (`meta.read_marks_upto`); after that commit the marks it wrote
//! leave memory (unless a later send moved them meanwhile). After a crash the marks of
//! the messages past `read_marks_upto` are derived again from the messages themselves
//! (the store's `merge_all`): a one-to-one message's sender has read up to it.
//!
//! Measured on the store alone (`examples/store_write_set.rs`, nine alternating
//! pairs): 50.5-58.6 against 50.8-66.4 µs of CPU per message, 0.86-1.01 x (median
//! 0.93); skipping the update altogether would have given 0.77-1.01 x (median 0.89).
//!
//! How readers stay exact: a mark here is the seq of the sender's newest message in
//! that conversation as the writer knows it, which may be committed after the
//! reader's snapshot (marks are added before the COMMIT that stores their messages,
//! so that no snapshot holds a message whose mark is neither here nor in `members`).
//! A reader takes the mark only when its snapshot holds that message (the seq is at
//! most the conversation's last seq in the snapshot: seqs become visible in order);
//! otherwise it asks the snapshot for the sender's newest message there. Marks leave
//! only after the commit that wrote them to `members`, and each time some leave
//! `generation` moves: a reader that saw it move while it read its snapshot reads
//! again (a flush ends every few seconds at most).

use crate::ids::{ConvId, UserId};
use crate::store::StoreError;
use parking_lot::RwLock;
use rusqlite::Connection;
use std::collections::HashMap;

#[derive(Default)]
pub(super) struct Marks {
    marks: HashMap<(UserId, ConvId), u64>,
    /// Moves each time marks leave (after a flush's last commit).
    generation: u64,
}

/// A flush under way: the keys held at its start, sorted, and how far it got.
pub(super) struct Flush {
    keys: Vec<(UserId, ConvId)>,
    next: usize,
    /// The newest message committed at its start (`read_marks_upto` once the last step
    /// commits): the mark of every message up to it is held then or in `members`.
    pub upto: u64,
    /// What the committed steps wrote (each leaves memory after the last step, unless
    /// a later send moved it).
    written: Vec<((UserId, ConvId), u64)>,
}

/// One step of a flush: the marks it writes, and where the next starts.
pub(super) struct Step {
    pub marks: Vec<((UserId, ConvId), u64)>,
    next: usize,
    pub last: bool,
}

impl Marks {
    pub fn len(&self) -> usize {
        self.marks.len()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn get(&self, user: UserId, conv: ConvId) -> Option<u64> {
        self.marks.get(&(user, conv)).copied()
    }

    /// Puts a batch's marks in (each only moving forward); returns what they replaced,
    /// for [`Marks::undo`] if the batch does not commit.
    pub fn add(&mut self, batch: &[(UserId, ConvId, u64)]) -> Vec<((UserId, ConvId), Option<u64>)> {
        let mut before = Vec::with_capacity(batch.len());
        for &(u, c, seq) in batch {
            let slot = self.marks.entry((u, c));
            match slot {
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    if *o.get() < seq {
                        before.push(((u, c), Some(*o.get())));
                        o.insert(seq);
                    }
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    before.push(((u, c), None));
                    v.insert(seq);
                }
            }
        }
        before
    }

    /// The batch of [`Marks::add`] did not commit: its marks go, in reverse order.
    pub fn undo(&mut self, before: Vec<((UserId, ConvId), Option<u64>)>) {
        for (k, v) in before.into_iter().rev() {
            match v {
                Some(seq) => {
                    self.marks.insert(k, seq);
                }
                None => {
                    self.marks.remove(&k);
                }
            }
        }
    }

    /// A flush of every mark held now; `upto`: the newest message committed.
    pub fn start_flush(&self, upto: u64) -> Flush {
        let mut keys: Vec<(UserId, ConvId)> = self.marks.keys().copied().collect();
        keys.sort_unstable();
        Flush {
            keys,
            next: 0,
            upto,
            written: Vec::new(),
        }
    }

    /// The next `max` marks of `flush` (their values now; marks gone meanwhile are
    /// skipped), or none left.
    pub fn next_step(&self, flush: &Flush, max: usize) -> Step {
        let end = (flush.next + max.max(1)).min(flush.keys.len());
        let marks = flush.keys[flush.next..end]
            .iter()
            .filter_map(|k| self.marks.get(k).map(|s| (*k, *s)))
            .collect();
        Step {
            marks,
            next: end,
            last: end == flush.keys.len(),
        }
    }

    /// `step` of `flush` committed; after the last, the marks the flush wrote leave
    /// (those no later send moved). Returns whether the flush is over.
    pub fn step_committed(&mut self, flush: &mut Flush, step: Step) -> bool {
        flush.next = step.next;
        flush.written.extend(step.marks);
        if !step.last {
            return false;
        }
        for (k, seq) in flush.written.drain(..) {
            if self.marks.get(&k) == Some(&seq) {
                self.marks.remove(&k);
            }
        }
        self.generation += 1;
        true
    }

    /// Everything is in `members` (the store merged it all).
    pub fn clear(&mut self) {
        self.marks.clear();
        self.generation += 1;
    }
}

/// How a read finds the marks of its snapshot: `members`' value, or one held here
/// that the snapshot's messages bear out (see the module's doc).
pub(super) struct View<'a> {
    marks: &'a RwLock<Marks>,
    /// Ask the snapshot for every mark (the last attempt of [`read_with`]).
    exact: bool,
}

impl View<'_> {
    /// `user`'s read mark in `conv` as of the snapshot `c` is reading: `stored` is
    /// `members`' value there, `last` the conversation's last seq there.
    pub fn mark(
        &self,
        c: &Connection,
        user: UserId,
        conv: ConvId,
        stored: u64,
        last: u64,
    ) -> rusqlite::Result<u64> {
        let held = if self.exact {
            Some(u64::MAX)
        } else {
            self.marks.read().get(user, conv)
        };
        match held {
            None => Ok(stored),
            Some(seq) if seq <= last => Ok(stored.max(seq)),
            // Its message came after the snapshot: the sender's newest there.
            Some(_) => {
                let newest: i64 = c
                    .prepare_cached(&format!(
                        "SELECT COALESCE(MAX(seq), 0) FROM messages
                         WHERE conv_id=?1 AND seq > ?3 AND sender_id=?2 AND kind != {}",
                        mychat_proto::MessageKind::System as i32
                    ))?
                    .query_row(
                        rusqlite::params![conv.0 as i64, user.0 as i64, stored as i64],
                        |r| r.get(0),
                    )?;
                Ok(stored.max(newest as u64))
            }
        }
    }
}

/// Runs `read` (which begins its own read transaction) until no mark left memory
/// while it ran; the fourth attempt asks the snapshot for every mark instead.
pub(super) fn read_with<T>(
    marks: &RwLock<Marks>,
    mut read: impl FnMut(&View<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut attempt = 0;
    loop {
        let generation = marks.read().generation();
        let view = View {
            marks,
            exact: attempt == 3,
        };
        let r = read(&view)?;
        if view.exact || marks.read().generation() == generation {
            return Ok(r);
        }
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marks only move forward, a failed batch's go back to what they were, and a
    /// flush removes what it wrote except what moved meanwhile.
    #[test]
    fn marks_move_forward_undo_and_leave_after_their_flush() {
        let (a, b, c1, c2) = (UserId(1), UserId(2), ConvId(10), ConvId(11));
        let mut m = Marks::default();
        m.add(&[(a, c1, 3), (b, c1, 4)]);
        let before = m.add(&[(a, c1, 5), (a, c1, 2), (a, c2, 1)]);
        assert_eq!((m.get(a, c1), m.get(a, c2)), (Some(5), Some(1)));
        m.undo(before);
        assert_eq!(
            (m.get(a, c1), m.get(a, c2), m.get(b, c1)),
            (Some(3), None, Some(4))
        );
        m.add(&[(a, c2, 7)]);
        let mut f = m.start_flush(99);
        assert_eq!(f.keys, vec![(a, c1), (a, c2), (b, c1)]);
        let s = m.next_step(&f, 2);
        assert_eq!(s.marks, vec![((a, c1), 3), ((a, c2), 7)]);
        let g = m.generation();
        assert!(!m.step_committed(&mut f, s));
        assert_eq!(
            (m.len(), m.generation()),
            (3, g),
            "nothing leaves before the last step"
        );
        // A send moves (a, c1) after its step wrote it: it stays.
        m.add(&[(a, c1, 8)]);
        let s = m.next_step(&f, 2);
        assert_eq!(s.marks, vec![((b, c1), 4)]);
        assert!(m.step_committed(&mut f, s));
        assert_eq!((m.len(), m.get(a, c1), m.generation()), (1, Some(8), g + 1));
    }

    /// A held mark counts when the snapshot holds its message; past the snapshot the
    /// sender's newest message there does (system messages do not count), and so it
    /// does for every mark in the exact view.
    #[test]
    fn a_mark_past_the_snapshot_is_read_from_its_messages() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE messages(conv_id INTEGER, seq INTEGER, sender_id INTEGER, kind INTEGER);
             CREATE UNIQUE INDEX messages_conv_seq ON messages(conv_id, seq);",
        )
        .unwrap();
        let system = mychat_proto::MessageKind::System as i32;
        // Conversation 10: a, b, a, b (system, sent as a), b.
        for (seq, sender, kind) in [(1, 1, 1), (2, 2, 1), (3, 1, 1), (4, 1, system), (5, 2, 1)] {
            c.execute(
                "INSERT INTO messages VALUES(10, ?1, ?2, ?3)",
                [seq, sender, kind],
            )
            .unwrap();
        }
        let (a, b, conv) = (UserId(1), UserId(2), ConvId(10));
        let marks = RwLock::new(Marks::default());
        marks.write().add(&[(a, conv, 7), (b, conv, 5)]);
        let view = View {
            marks: &marks,
            exact: false,
        };
        // The snapshot ends at 5: b's mark is in it, a's (7) is not: a's newest is 3.
        assert_eq!(view.mark(&c, b, conv, 0, 5).unwrap(), 5);
        assert_eq!(view.mark(&c, a, conv, 0, 5).unwrap(), 3);
        // What members holds wins when it is further; no mark held: members' value.
        assert_eq!(view.mark(&c, a, conv, 4, 5).unwrap(), 4);
        assert_eq!(view.mark(&c, UserId(3), conv, 2, 5).unwrap(), 2);
        let exact = View {
            marks: &marks,
            exact: true,
        };
        assert_eq!(exact.mark(&c, b, conv, 0, 5).unwrap(), 5);
        assert_eq!(exact.mark(&c, a, conv, 1, 5).unwrap(), 3);
        assert_eq!(exact.mark(&c, UserId(3), conv, 2, 5).unwrap(), 2);
    }

    /// A read during which marks left memory is read again; the fourth attempt reads
    /// every mark from the snapshot and is kept.
    #[test]
    fn a_read_that_saw_marks_leave_is_read_again() {
        let marks = RwLock::new(Marks::default());
        let mut runs = Vec::new();
        let r = read_with(&marks, |view| {
            runs.push(view.exact);
            if runs.len() == 1 {
                marks.write().clear();
            }
            Ok(runs.len())
        });
        assert_eq!((r, runs.clone()), (Ok(2), vec![false, false]));
        runs.clear();
        let r = read_with(&marks, |view| {
            runs.push(view.exact);
            marks.write().clear();
            Ok(runs.len())
        });
        assert_eq!((r, runs), (Ok(4), vec![false, false, false, true]));
    }
}

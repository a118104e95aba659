//! The update streams' log (src/store/sqlite/recent.rs): events wait in memory and in
//! an append-only table, and are merged into the per-user index in steps. Whatever the
//! merge is doing, a reader must see exactly the stream it would see without it.

use mychat::ids::{ConvId, UserId};
use mychat::store::{sqlite::SqliteStore, SendInput, Store, SyncPage};
use std::sync::Arc;

fn config(log_rows: usize, merge_rows: usize) -> mychat_config::StoreConfig {
    mychat_config::StoreConfig {
        stream_log_rows: log_rows,
        stream_merge_rows: merge_rows,
        ..Default::default()
    }
}

fn text(sender: UserId, recipient: UserId, n: u64) -> SendInput {
    SendInput {
        sender,
        recipient,
        client_msg_id: format!("c{n}"),
        kind: 1,
        text: format!("message {n}"),
        payload: bytes::Bytes::new(),
        now_ms: n as i64,
        require_friend: false,
        origin: None,
    }
}

/// Creates a user; its id.
async fn user(store: &dyn Store, name: &str) -> UserId {
    store
        .create_user(name.into(), "x".into(), 0)
        .await
        .unwrap()
        .id
}

/// `n` users named `{prefix}0`, `{prefix}1` …
async fn users_named(store: &dyn Store, prefix: &str, n: usize) -> Vec<UserId> {
    let mut users = Vec::with_capacity(n);
    for i in 0..n {
        users.push(user(store, &format!("{prefix}{i}")).await);
    }
    users
}

/// Counts the rows of the stream log table of the store in `dir`, on a connection of
/// its own.
fn log_rows(dir: &std::path::Path) -> impl Fn() -> usize {
    let db = rusqlite::Connection::open(dir.join("mychat.db")).unwrap();
    move || {
        db.query_row("SELECT COUNT(*) FROM updates_log", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as usize
    }
}

/// Each of `users`' whole streams reads the same from `is` as from `was`, and none is
/// empty.
async fn same_streams(was: &dyn Store, is: &dyn Store, users: &[UserId]) {
    for &u in users {
        let (was, is) = (was.sync(u, 0, 10_000), is.sync(u, 0, 10_000));
        let (was, is) = (was.await.unwrap(), is.await.unwrap());
        assert!(!was.updates.is_empty(), "{u:?} has no stream");
        assert_eq!(
            format!("{:?}", is.updates),
            format!("{:?}", was.updates),
            "{u:?}"
        );
    }
}

/// A sync page as comparable text.
fn shown(p: &SyncPage) -> String {
    format!("{:?} more={} to={}", p.updates, p.has_more, p.scanned_to)
}

/// xorshift: the same sequence for both stores.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Asserts two stream dumps are equal, showing the first line that differs.
fn same(a: &[String], b: &[String], what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x, y, "{what}: line {i}");
    }
    assert_eq!(a.len(), b.len(), "{what}");
}

/// Every user's stream, read whole and in small pages from a few places.
async fn streams(store: &dyn Store, users: &[UserId]) -> Vec<String> {
    let mut out = Vec::new();
    for &u in users {
        let pts = store.user_pts(u).await.unwrap();
        out.push(format!("{u:?} pts {pts}"));
        for (since, limit) in [
            (0, 100_000),
            (0, 3),
            (pts / 2, 2),
            (pts.saturating_sub(1), 5),
        ] {
            out.push(shown(&store.sync(u, since, limit).await.unwrap()));
        }
        let snapshot = store.unread_snapshot(u, 100, 100).await.unwrap();
        let unread: Vec<u64> = snapshot.messages.iter().map(|m| m.id).collect();
        out.push(format!("snapshot pts {} unread {unread:?}", snapshot.pts));
        // Read marks, one's own and the peer's (sends imply them: the marks module).
        let (convs, more) = store.conversations(u, 0, 1000).await.unwrap();
        assert!(!more);
        for c in convs {
            out.push(format!(
                "conversation {:?} last {} read {} peer read {}",
                c.conv.id, c.last_seq, c.read_seq, c.peer_read_seq
            ));
        }
    }
    out
}

/// The same writes go to a store that merges every few events and to one that never
/// merges while running; after every few writes, and after both restart, every stream
/// reads the same from both (messages, read receipts, friend events with their text,
/// messages deleted for one user), and so do the read marks (those sends imply are
/// written to `members` the same way) and what is unread; resends find their
/// originals (the resend index is merged the same way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_and_logged_streams_read_alike() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let configs = [config(1 << 24, 1 << 20), config(5, 3)];
    let open = |i: usize| SqliteStore::open(dirs[i].path(), &configs[i]).unwrap();
    let stores: Vec<Arc<dyn Store>> = vec![open(0), open(1)];
    let mut users = Vec::new();
    for i in 0..12 {
        let a = user(stores[0].as_ref(), &format!("u{i}")).await;
        let b = user(stores[1].as_ref(), &format!("u{i}")).await;
        assert_eq!(a, b);
        users.push(a);
    }
    let mut rng = Rng(0x9e3779b97f4a7c15);
    // (sender, recipient, conversation, seq, message id, the write that sent it)
    let mut sent: Vec<(UserId, UserId, ConvId, u64, u64, u64)> = Vec::new();
    for n in 0..600u64 {
        let op = rng.below(100);
        let a = users[rng.below(users.len() as u64) as usize];
        let b = users[rng.below(users.len() as u64) as usize];
        let pick = if sent.is_empty() {
            None
        } else {
            Some(sent[rng.below(sent.len() as u64) as usize])
        };
        let mut results = Vec::new();
        for s in &stores {
            let r = match (op, pick) {
                (0..=74, _) if a != b => {
                    let o = s.send_direct(text(a, b, n)).await.unwrap();
                    let m = &o.message;
                    sent.push((a, b, ConvId(m.conversation_id), m.seq, m.id, n));
                    format!("sent {:?}", (m.id, m.seq, o.sender_pts))
                }
                (75..=84, Some((_, reader, conv, seq, _, _))) => {
                    format!("{:?}", s.mark_read(reader, conv, seq, None).await)
                }
                (85..=92, _) if a != b => format!(
                    "{:?}",
                    s.friend_request(a, b, format!("hello from {n}"), n as i64)
                        .await
                ),
                (93..=95, Some((sender, _, _, _, id, _))) => {
                    format!("{:?}", s.hide(sender, vec![id]).await)
                }
                // A resend: the original comes back, whether its resend entry is
                // still in memory or merged.
                (96..=99, Some((sender, recipient, _, _, id, k))) => {
                    let o = s.send_direct(text(sender, recipient, k)).await.unwrap();
                    assert_eq!((o.duplicate, o.message.id), (true, id), "resend at {n}");
                    format!("resent {:?}", o.message)
                }
                _ => "nothing".into(),
            };
            results.push(r);
        }
        // Both stores were sent the message: keep one record of it.
        if results[0].starts_with("sent") {
            sent.pop();
        }
        assert_eq!(results[0], results[1], "write {n}");
        if n % 50 == 49 {
            same(
                &streams(stores[0].as_ref(), &users).await,
                &streams(stores[1].as_ref(), &users).await,
                &format!("after write {n}"),
            );
        }
    }
    let before = streams(stores[1].as_ref(), &users).await;
    for s in &stores {
        s.shutdown().await.unwrap();
    }
    drop(stores);
    // The restart merges what was logged; a store that never merged reads the same.
    let reopened: Vec<Arc<dyn Store>> = vec![open(0), open(1)];
    same(
        &streams(reopened[1].as_ref(), &users).await,
        &before,
        "merging store reopened",
    );
    same(
        &streams(reopened[0].as_ref(), &users).await,
        &before,
        "other store reopened",
    );
    // Every message's resend still finds it after the restart's merge.
    for &(a, b, _, _, id, k) in &sent {
        for s in &reopened {
            let o = s.send_direct(text(a, b, k)).await.unwrap();
            assert_eq!((o.duplicate, o.message.id), (true, id), "resend of {k}");
        }
    }
    for s in &reopened {
        s.shutdown().await.unwrap();
    }
}

/// Readers racing a merge that runs every few events: every sync of the recipient's
/// stream is gap-free from where it starts, and never shorter than an earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_sees_no_gap_while_merging() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = SqliteStore::open(dir.path(), &config(8, 4)).unwrap();
    let alice = user(store.as_ref(), "alice").await;
    let bob = user(store.as_ref(), "bob").await;
    const MESSAGES: u64 = 3_000;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for round in 0..MESSAGES / 20 {
                let futs: Vec<_> = (0..20)
                    .map(|k| store.send_direct(text(alice, bob, round * 20 + k)))
                    .collect();
                for f in futs {
                    f.await.unwrap();
                }
            }
        })
    };
    let mut seen = 0u64;
    let mut reads = 0;
    loop {
        let done = writer.is_finished();
        let page = store.sync(bob, 0, 1_000_000).await.unwrap();
        let pts: Vec<u64> = page.updates.iter().map(|(p, _)| *p).collect();
        assert_eq!(
            pts,
            (1..=pts.len() as u64).collect::<Vec<_>>(),
            "read {reads}"
        );
        assert!(pts.len() as u64 >= seen, "read {reads} went back");
        seen = pts.len() as u64;
        let head = store.user_pts(bob).await.unwrap();
        assert!(
            head >= seen,
            "user_pts {head} behind a sync that saw {seen}"
        );
        let since = seen / 2;
        let part = store.sync(bob, since, 50).await.unwrap();
        let got: Vec<u64> = part.updates.iter().map(|(p, _)| *p).collect();
        let want: Vec<u64> = (since + 1..=since + got.len() as u64).collect();
        assert_eq!(got, want, "page read {reads}");
        assert!(got.len() == 50 || since + got.len() as u64 >= seen);
        reads += 1;
        if done {
            break;
        }
    }
    writer.await.unwrap();
    assert_eq!(seen, MESSAGES);
    assert!(reads > 10, "the reader raced the writer only {reads} times");
    store.shutdown().await.unwrap();
}

/// Writes that log many events each (a group's creation: one per member) against
/// merge steps of one event: each step still takes at least twice what arrived since
/// the last one, so the events in memory stay under about twice the bound plus one
/// write's events, and the log table (those plus the merged rows still to delete, a
/// chunk per batch) under about three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_stays_bounded_when_writes_log_more_than_a_step() {
    let dir = tempfile::tempdir().unwrap();
    const LOG_ROWS: usize = 20;
    let store = SqliteStore::open(dir.path(), &config(LOG_ROWS, 1)).unwrap();
    let users = users_named(store.as_ref(), "g", 41).await;
    let table = log_rows(dir.path());
    let (mut most, mut most_table) = (0, 0);
    for n in 0..60 {
        let change = store
            .group_create(
                users[0],
                format!("group {n}"),
                users[1..].to_vec(),
                0,
                n,
                100,
            )
            .await
            .unwrap();
        assert_eq!(change.membership.len(), 41);
        most = most.max(store.logged_events());
        most_table = most_table.max(table());
    }
    assert!(most <= 2 * (LOG_ROWS + 41), "the log held {most} events");
    assert!(
        most_table <= 3 * (LOG_ROWS + 41),
        "the log table held {most_table} rows"
    );
    assert!(most_table > most, "no merged row waited to be deleted");
    assert!(most > LOG_ROWS, "no merge was needed: this checked nothing");
    store.shutdown().await.unwrap();
}

/// A store that merges every 4 events (steps of 2), with users alice and bob, and a
/// second connection to its database on which `trigger` (SQL with `{bob}` for bob's
/// id) was created: it makes some merge step fail.
struct Refusing {
    store: Arc<SqliteStore>,
    alice: UserId,
    bob: UserId,
    db: rusqlite::Connection,
    /// Messages alice sent bob, in order (message n has client id "c{n}").
    sent: Vec<u64>,
}

impl Refusing {
    async fn new(dir: &std::path::Path, trigger: &str) -> Refusing {
        let store = SqliteStore::open(dir, &config(4, 2)).unwrap();
        let alice = user(store.as_ref(), "alice").await;
        let bob = user(store.as_ref(), "bob").await;
        let db = rusqlite::Connection::open(dir.join("mychat.db")).unwrap();
        db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        db.execute_batch(&trigger.replace("{bob}", &bob.0.to_string()))
            .unwrap();
        Refusing {
            store,
            alice,
            bob,
            db,
            sent: Vec::new(),
        }
    }

    async fn send(&mut self) {
        let n = self.sent.len() as u64;
        let o = self.store.send_direct(text(self.alice, self.bob, n)).await;
        self.sent.push(o.unwrap().message.id);
    }

    fn count(&self, sql: &str, p: impl rusqlite::Params) -> i64 {
        self.db.query_row(sql, p, |r| r.get(0)).unwrap()
    }

    /// Drops the trigger, waits out the second's pause after a failed step, and sends
    /// (merges run after write batches) until `done` holds or 200 messages were sent.
    async fn repair_until(&mut self, done: impl Fn(&Refusing) -> bool) {
        self.db.execute_batch("DROP TRIGGER refuse").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        while !done(self) && self.sent.len() < 200 {
            self.send().await;
        }
        assert!(done(self), "the refused row was never merged");
    }

    /// Bob's sync returns his whole stream (an event per message sent), and so it
    /// does after a stop and a restart on `dir`, which left nothing logged.
    async fn whole_stream_now_and_after_restart(self, dir: &std::path::Path) {
        let (bob, n) = (self.bob, self.sent.len() as u64);
        let all: Vec<u64> = (1..=n).collect();
        assert_eq!(pts_of(self.store.sync(bob, 0, 1000).await.unwrap()), all);
        self.store.shutdown().await.unwrap();
        drop(self);
        let store = SqliteStore::open(dir, &config(4, 2)).unwrap();
        assert_eq!(store.logged_events(), 0);
        assert_eq!(pts_of(store.sync(bob, 0, 1000).await.unwrap()), all);
        store.shutdown().await.unwrap();
    }
}

fn pts_of(page: SyncPage) -> Vec<u64> {
    page.updates.iter().map(|(p, _)| *p).collect()
}

/// A merge step that fails (here a trigger refuses one of bob's events) is rolled
/// back: nothing is lost, syncs still see every event, and once the cause is gone a
/// later merge moves it; a restart finds the whole stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_merge_step_loses_nothing_and_is_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Refusing::new(
        dir.path(),
        "CREATE TRIGGER refuse BEFORE INSERT ON updates WHEN NEW.user_id = {bob} AND NEW.pts = 3
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .await;
    let merged = |t: &Refusing| {
        let sql = "SELECT COUNT(*) FROM updates WHERE user_id = ?1 AND pts = 3";
        t.count(sql, [t.bob.0 as i64]) == 1
    };
    for _ in 0..10 {
        t.send().await;
    }
    assert!(!merged(&t), "the trigger did not refuse the merge");
    assert!(
        t.store.logged_events() >= 8,
        "bob's events from 3 on are still logged"
    );
    let bob = t.bob;
    assert_eq!(
        pts_of(t.store.sync(bob, 0, 100).await.unwrap()),
        (1..=10).collect::<Vec<_>>()
    );
    t.repair_until(merged).await;
    t.whole_stream_now_and_after_restart(dir.path()).await;
}

/// The resend index's merge step failing (a trigger refuses one entry) keeps the
/// entry in the writer's map: the resend still finds its original; once the cause is
/// gone a later merge writes the entry, and after a restart the resend finds it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_resend_index_step_keeps_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Refusing::new(
        dir.path(),
        "CREATE TRIGGER refuse BEFORE INSERT ON client_ids WHEN NEW.client_msg_id = 'c2'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .await;
    let written = |t: &Refusing| {
        t.count(
            "SELECT COUNT(*) FROM client_ids WHERE client_msg_id = 'c2'",
            [],
        ) == 1
    };
    for _ in 0..10 {
        t.send().await;
    }
    assert!(!written(&t), "the trigger did not refuse the merge");
    let again = t.store.send_direct(text(t.alice, t.bob, 2)).await.unwrap();
    assert_eq!((again.duplicate, again.message.id), (true, t.sent[2]));
    t.repair_until(written).await;
    t.store.shutdown().await.unwrap();
    let (alice, bob, sent) = (t.alice, t.bob, std::mem::take(&mut t.sent));
    drop(t);
    let store = SqliteStore::open(dir.path(), &config(4, 2)).unwrap();
    for (k, id) in sent.iter().enumerate() {
        let o = store.send_direct(text(alice, bob, k as u64)).await.unwrap();
        assert_eq!((o.duplicate, o.message.id), (true, *id), "resend of {k}");
    }
    store.shutdown().await.unwrap();
}

/// Deleting merged log rows failing (a trigger refuses it) leaves them in the table:
/// the merges go on, every sync sees the whole stream, and once the cause is gone the
/// rows are deleted; a restart finds the whole stream. (The logged events are bob's
/// read receipts, one for him and one for alice each: a message's are not logged.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_trim_loses_nothing_and_is_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Refusing::new(
        dir.path(),
        "CREATE TRIGGER refuse BEFORE DELETE ON updates_log
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .await;
    let bob = t.bob;
    for seq in 1..=10 {
        t.send().await;
        let conv = t.store.conversations(bob, 0, 1).await.unwrap().0[0].conv.id;
        assert_eq!(t.store.mark_read(bob, conv, seq, None).await.unwrap(), seq);
    }
    let merged = "SELECT COUNT(*) FROM updates WHERE user_id = ?1";
    let logged = "SELECT COUNT(*) FROM updates_log";
    assert!(t.count(merged, [bob.0 as i64]) > 0, "nothing was merged");
    assert_eq!(
        t.count(logged, []),
        20,
        "the trigger did not refuse the trim"
    );
    let whole: Vec<u64> = (1..=20).collect();
    assert_eq!(pts_of(t.store.sync(bob, 0, 100).await.unwrap()), whole);
    // The rows the trigger kept are deleted once it is gone.
    let kept = t.count("SELECT MAX(id) FROM updates_log", []);
    t.repair_until(|t| t.count("SELECT COUNT(*) FROM updates_log WHERE id <= ?1", [kept]) == 0)
        .await;
    // Ten receipts and every message, now and after a restart.
    let whole: Vec<u64> = (1..=10 + t.sent.len() as u64).collect();
    assert_eq!(pts_of(t.store.sync(bob, 0, 1000).await.unwrap()), whole);
    t.store.shutdown().await.unwrap();
    drop(t);
    let store = SqliteStore::open(dir.path(), &config(4, 2)).unwrap();
    assert_eq!(store.logged_events(), 0);
    assert_eq!(pts_of(store.sync(bob, 0, 1000).await.unwrap()), whole);
    store.shutdown().await.unwrap();
}

/// The store's files in `dir` copied while it runs (nothing being written), as a
/// power cut would leave them: the database and its WAL, without the WAL's index.
fn crashed_copy(dir: &std::path::Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for f in ["mychat.db", "mychat.db-wal", "token.key"] {
        let from = dir.join(f);
        if from.exists() {
            std::fs::copy(&from, copy.path().join(f)).unwrap();
        }
    }
    copy
}

/// `user`'s (read mark, peer's read mark) in `conv` as `conversations` shows them.
async fn marks_in(store: &dyn Store, user: UserId, conv: ConvId) -> (u64, u64) {
    let (convs, _) = store.conversations(user, 0, 100).await.unwrap();
    let c = convs
        .iter()
        .find(|c| c.conv.id == conv)
        .expect("the conversation");
    (c.read_seq, c.peer_read_seq)
}

/// Read marks that sends imply reach `members` in flushes (here once 4 are held, in
/// steps of 2) and never move a mark back: alice's explicit read past her own last
/// message survives the flush of her older implied mark. Readers see every mark
/// before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_marks_reach_members_in_flushes_and_never_move_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), &config(4, 2)).unwrap();
    let alice = user(store.as_ref(), "alice").await;
    let bob = user(store.as_ref(), "bob").await;
    let others = users_named(store.as_ref(), "o", 6).await;
    let db = rusqlite::Connection::open(dir.path().join("mychat.db")).unwrap();
    let upto = || -> u64 {
        db.query_row(
            "SELECT value FROM meta WHERE key = 'read_marks_upto'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64
    };
    let stored = |u: UserId, conv: ConvId| -> u64 {
        db.query_row(
            "SELECT read_seq FROM members WHERE user_id = ?1 AND conv_id = ?2",
            [u.0 as i64, conv.0 as i64],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64
    };
    let first = store
        .send_direct(text(alice, bob, 0))
        .await
        .unwrap()
        .message;
    let conv = ConvId(first.conversation_id);
    let mut last = first.id;
    for n in 1..3 {
        last = store
            .send_direct(text(bob, alice, n))
            .await
            .unwrap()
            .message
            .id;
    }
    assert_eq!(marks_in(store.as_ref(), alice, conv).await, (1, 3));
    // Bob's sends read the conversation up to 3: an older mark is no move.
    assert_eq!(store.mark_read(bob, conv, 2, None).await.unwrap(), 3);
    assert_eq!(store.mark_read(alice, conv, 3, None).await.unwrap(), 3);
    assert_eq!(marks_in(store.as_ref(), bob, conv).await, (3, 3));
    // Others write until a flush has taken every mark held so far.
    let mut n = 10;
    while upto() < last {
        assert!(n < 10_000, "no flush ended");
        let (a, b) = (others[n % 6], others[(n + 1) % 6]);
        store.send_direct(text(a, b, n as u64)).await.unwrap();
        n += 1;
    }
    assert_eq!(
        (stored(alice, conv), stored(bob, conv)),
        (3, 3),
        "members after the flush"
    );
    assert_eq!(marks_in(store.as_ref(), alice, conv).await, (3, 3));
    assert_eq!(marks_in(store.as_ref(), bob, conv).await, (3, 3));
    // Each of the others' marks is its last message in each conversation.
    for (i, &o) in others.iter().enumerate() {
        let (convs, _) = store.conversations(o, 0, 100).await.unwrap();
        for c in convs {
            let peer = c.conv.peer_of(o);
            let sent_last = |who: UserId| {
                // o_i writes to o_{i+1}: in each conversation the one who wrote last
                // has read all of it.
                let writer = c.last_message.as_ref().unwrap().sender_id;
                (writer == who.0).then_some(c.last_seq)
            };
            if let Some(seq) = sent_last(o) {
                assert_eq!(c.read_seq, seq, "o{i}'s own mark");
            }
            if let Some(seq) = sent_last(peer) {
                assert_eq!(c.peer_read_seq, seq, "o{i}'s peer's mark");
            }
        }
    }
    store.shutdown().await.unwrap();
}

/// After a crash (the files copied while the store runs, as a power cut would leave
/// them) the read marks not yet in `members` come back at the next open from the
/// messages themselves: each sender's newest in each one-to-one conversation; and so
/// do the messages' stream events, which are not logged (the row carries both pts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_marks_come_back_from_the_messages_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), &config(1 << 20, 1 << 20)).unwrap();
    let alice = user(store.as_ref(), "alice").await;
    let bob = user(store.as_ref(), "bob").await;
    let carol = user(store.as_ref(), "carol").await;
    let mut conv = ConvId(0);
    for (n, (a, b)) in [(alice, bob), (alice, bob), (bob, alice), (alice, bob)]
        .into_iter()
        .enumerate()
    {
        conv = ConvId(
            store
                .send_direct(text(a, b, n as u64))
                .await
                .unwrap()
                .message
                .conversation_id,
        );
    }
    let other = ConvId(
        store
            .send_direct(text(carol, alice, 9))
            .await
            .unwrap()
            .message
            .conversation_id,
    );
    assert_eq!(marks_in(store.as_ref(), alice, conv).await, (4, 3));
    let copy = crashed_copy(dir.path());
    let crashed = SqliteStore::open(copy.path(), &config(1 << 20, 1 << 20)).unwrap();
    // The messages' stream events, never logged and never merged, come back too.
    same_streams(store.as_ref(), crashed.as_ref(), &[alice, bob, carol]).await;
    assert_eq!(
        pts_of(crashed.sync(alice, 0, 100).await.unwrap()),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(marks_in(crashed.as_ref(), alice, conv).await, (4, 3));
    assert_eq!(marks_in(crashed.as_ref(), bob, conv).await, (3, 4));
    assert_eq!(marks_in(crashed.as_ref(), alice, other).await, (0, 1));
    let db = rusqlite::Connection::open(copy.path().join("mychat.db")).unwrap();
    let stored: Vec<(i64, i64, i64)> = db
        .prepare("SELECT user_id, conv_id, read_seq FROM members ORDER BY user_id, conv_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let (a, b, c) = (alice.0 as i64, bob.0 as i64, carol.0 as i64);
    let (cv, ot) = (conv.0 as i64, other.0 as i64);
    assert_eq!(stored, vec![(a, cv, 4), (a, ot, 0), (b, cv, 3), (c, ot, 1)]);
    crashed.shutdown().await.unwrap();
    store.shutdown().await.unwrap();
}

/// A read-mark flush step that fails (a trigger refuses bob's mark) is rolled back:
/// the flush cannot end, the mark stays held and readers still see it; once the cause
/// is gone a later flush writes it, and after a restart it is in `members`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_mark_step_keeps_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Refusing::new(
        dir.path(),
        "CREATE TRIGGER refuse BEFORE UPDATE OF read_seq ON members WHEN NEW.user_id = {bob}
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .await;
    let (alice, bob) = (t.alice, t.bob);
    let mut others = Vec::new();
    for name in ["carol", "dave", "erin"] {
        others.push(user(t.store.as_ref(), name).await);
    }
    let mut conv = ConvId(0);
    for n in 0..2 {
        let m = t
            .store
            .send_direct(text(bob, alice, n))
            .await
            .unwrap()
            .message;
        conv = ConvId(m.conversation_id);
    }
    // Enough marks for several flushes of four, had none been refused.
    for n in 0..30 {
        let (a, b) = (others[n % 3], others[(n + 1) % 3]);
        t.store
            .send_direct(text(a, b, 100 + n as u64))
            .await
            .unwrap();
    }
    let sql = "SELECT value FROM meta WHERE key = 'read_marks_upto'";
    assert_eq!(t.count(sql, []), 0, "the trigger did not refuse the flush");
    let stored = |t: &Refusing| {
        let sql = "SELECT read_seq FROM members WHERE user_id = ?1 AND conv_id = ?2";
        t.count(sql, [bob.0 as i64, conv.0 as i64])
    };
    assert_eq!(stored(&t), 0);
    assert_eq!(marks_in(t.store.as_ref(), bob, conv).await, (2, 0));
    assert_eq!(marks_in(t.store.as_ref(), alice, conv).await, (0, 2));
    t.repair_until(|t| stored(t) == 2).await;
    // Alice's messages of the repair moved her own mark, not bob's.
    let last = 2 + t.sent.len() as u64;
    assert_eq!(marks_in(t.store.as_ref(), bob, conv).await, (2, last));
    t.store.shutdown().await.unwrap();
    drop(t);
    let store = SqliteStore::open(dir.path(), &config(4, 2)).unwrap();
    assert_eq!(marks_in(store.as_ref(), bob, conv).await, (2, last));
    assert_eq!(marks_in(store.as_ref(), alice, conv).await, (last, 2));
    store.shutdown().await.unwrap();
}

/// A crash while merges run (every 4 events, steps of 2; the files copied while the
/// store runs): the next open finds every user's whole stream, the events merged
/// before it and the messages' events that were only in memory alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_come_back_after_a_crash_while_merging() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), &config(4, 2)).unwrap();
    let users = users_named(store.as_ref(), "u", 5).await;
    let mut rng = Rng(0x2545f4914f6cdd1d);
    for n in 0..203u64 {
        let a = rng.below(5) as usize;
        let (a, b) = (users[a], users[(a + 1 + rng.below(4) as usize) % 5]);
        store.send_direct(text(a, b, n)).await.unwrap();
        if n % 7 == 0 {
            let conv = store.conversations(b, 0, 1).await.unwrap().0[0].conv.id;
            store.mark_read(b, conv, 1_000, None).await.unwrap();
        }
    }
    assert!(
        store.logged_events() > 0,
        "every event was merged: this checked less"
    );
    let copy = crashed_copy(dir.path());
    let crashed = SqliteStore::open(copy.path(), &config(4, 2)).unwrap();
    same_streams(store.as_ref(), crashed.as_ref(), &users).await;
    crashed.shutdown().await.unwrap();
    store.shutdown().await.unwrap();
}

/// Logged events between messages' (which take log ids but no log rows: the ids in
/// the table have gaps) are still deleted once merged: the table stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_log_rows_are_deleted_between_unlogged_events() {
    let dir = tempfile::tempdir().unwrap();
    const LOG_ROWS: usize = 64;
    // Steps of 5: a chunk of ids to delete ends inside a gap or a pair of rows.
    let store = SqliteStore::open(dir.path(), &config(LOG_ROWS, 5)).unwrap();
    let users = users_named(store.as_ref(), "u", 40).await;
    let table = log_rows(dir.path());
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut most = 0;
    for n in 0..600u64 {
        // A message (two unlogged events), then its read receipt (two logged).
        let a = rng.below(40) as usize;
        let b = (a + 1 + rng.below(39) as usize) % 40;
        let m = store
            .send_direct(text(users[a], users[b], n))
            .await
            .unwrap()
            .message;
        let conv = ConvId(m.conversation_id);
        store.mark_read(users[b], conv, m.seq, None).await.unwrap();
        most = most.max(table());
    }
    // Merged rows wait for their deletion a chunk per batch: about three times the
    // bound at most (as for a log without gaps).
    assert!(most <= 3 * LOG_ROWS, "the log table held {most} rows");
    store.shutdown().await.unwrap();
}

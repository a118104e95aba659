//! A bounded multi-producer, single-consumer queue between threads whose consumer
//! sleeps without spinning.
//!
//! The store's writer and the dispatcher each wait on such a queue. With
//! crossbeam-channel they did, but its blocking `recv` spins and then calls
//! `sched_yield` up to four times before it parks, and on this two-core machine,
//! shared by two shard threads, the writer, the dispatcher and the load generator,
//! every yield is a context switch: at 10,000 one-to-one messages per second the writer
//! and the dispatcher made 7,100 of them a second (involuntary switches in
//! /proc/PID/task/TID/status), more than both shard threads' wakeups together. Here the
//! consumer parks at once on a condition variable, and a producer signals only when
//! the consumer is asleep, so a busy consumer costs its producers no system call.
//! One-to-one at 5,000 msgs/s on a fresh store, two alternating pairs (crossbeam ->
//! this): p50 12.3 -> 9.8 and 4.8 -> 2.9 ms, p99 55.9 -> 37.6 and 24.9 -> 16.8 ms, the
//! dispatcher's involuntary switches 1,609 -> 252 and 4,412 -> 813 per 5 s; server
//! CPU per message the same within noise (the store's own work dominates it). With
//! the store's writes taken out (an experiment measuring the rest of the path), at
//! 10,000 msgs/s, two pairs: server CPU 104.8 -> 83.9 and 82.2 -> 66.8 µs per message,
//! p99 24.0 -> 12.3 and 12.5 -> 3.2 ms, the dispatcher's involuntary switches 13,192
//! -> 308 and 15,612 -> 398 per 5 s, the writer's 10,041 -> 5,809 and 20,933 -> 3,234.
//!
//! The surface is the part of crossbeam-channel's the server used: `bounded`,
//! `try_send`, a `send` that waits for room (back-pressure), `recv`, `try_recv`;
//! `recv` fails once every sender is gone and the queue is empty, and sends fail once
//! the receiver is gone.

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::Arc;

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    receiver: bool,
    /// The receiver is parked in `recv`.
    rx_waiting: bool,
    /// Senders parked in `send`, waiting for room.
    tx_waiting: usize,
}

struct Queue<T> {
    state: Mutex<State<T>>,
    not_empty: Condvar,
    not_full: Condvar,
    cap: usize,
}

/// The sending half; clone it for more producers.
pub struct Sender<T> {
    q: Arc<Queue<T>>,
}

/// The receiving half (one consumer).
pub struct Receiver<T> {
    q: Arc<Queue<T>>,
}

/// Why `try_send` did not queue its item (given back).
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    Full(T),
    Disconnected(T),
}

/// `send` failed: the receiver is gone (the item is given back).
#[derive(Debug, PartialEq, Eq)]
pub struct SendError<T>(pub T);

/// `recv` failed: every sender is gone and nothing is left.
#[derive(Debug, PartialEq, Eq)]
pub struct RecvError;

/// Why `try_recv` returned nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum TryRecvError {
    Empty,
    Disconnected,
}

/// A queue holding at most `cap` items (at least 1).
pub fn bounded<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let q = Arc::new(Queue {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receiver: true,
            rx_waiting: false,
            tx_waiting: 0,
        }),
        not_empty: Condvar::new(),
        not_full: Condvar::new(),
        cap: cap.max(1),
    });
    (Sender { q: q.clone() }, Receiver { q })
}

impl<T> Sender<T> {
    /// Queues `item` unless the queue is full or the receiver gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let s = self.q.state.lock();
        if !s.receiver {
            return Err(TrySendError::Disconnected(item));
        }
        if s.items.len() >= self.q.cap {
            return Err(TrySendError::Full(item));
        }
        self.push(s, item);
        Ok(())
    }

    /// Queues `item`, waiting for room while the queue is full.
    pub fn send(&self, item: T) -> Result<(), SendError<T>> {
        let mut s = self.q.state.lock();
        loop {
            if !s.receiver {
                return Err(SendError(item));
            }
            if s.items.len() < self.q.cap {
                break;
            }
            s.tx_waiting += 1;
            self.q.not_full.wait(&mut s);
            s.tx_waiting -= 1;
        }
        self.push(s, item);
        Ok(())
    }

    fn push(&self, mut s: parking_lot::MutexGuard<'_, State<T>>, item: T) {
        s.items.push_back(item);
        let wake = s.rx_waiting;
        drop(s);
        if wake {
            self.q.not_empty.notify_one();
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.q.state.lock().senders += 1;
        Sender { q: self.q.clone() }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut s = self.q.state.lock();
        s.senders -= 1;
        let wake = s.senders == 0 && s.rx_waiting;
        drop(s);
        if wake {
            self.q.not_empty.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// The queue, locked, once it holds an item: the receiver parks (it does not spin)
    /// until then. Fails once every sender is gone and the queue is empty.
    fn ready(&self) -> Result<parking_lot::MutexGuard<'_, State<T>>, RecvError> {
        let mut s = self.q.state.lock();
        while s.items.is_empty() {
            if s.senders == 0 {
                return Err(RecvError);
            }
            s.rx_waiting = true;
            self.q.not_empty.wait(&mut s);
            s.rx_waiting = false;
        }
        Ok(s)
    }

    /// The oldest item, waiting until there is one; fails once every sender is gone
    /// and the queue is empty.
    pub fn recv(&self) -> Result<T, RecvError> {
        let mut s = self.ready()?;
        let item = s.items.pop_front().expect("ready() holds an item");
        self.made_room(s, 1);
        Ok(item)
    }

    /// Moves up to `max` (at least 1) of the oldest items to `out` under one lock,
    /// waiting as `recv` does until there is one; fails as `recv` does. The writer
    /// takes its batch this way: one lock per batch on its side instead of one per
    /// write.
    pub fn recv_batch(&self, out: &mut Vec<T>, max: usize) -> Result<usize, RecvError> {
        let mut s = self.ready()?;
        let n = s.items.len().min(max.max(1));
        out.extend(s.items.drain(..n));
        self.made_room(s, n);
        Ok(n)
    }

    /// The oldest item if there is one.
    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        let mut s = self.q.state.lock();
        match s.items.pop_front() {
            Some(item) => {
                self.made_room(s, 1);
                Ok(item)
            }
            None if s.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// `n` items were taken: wakes up to `n` senders waiting for room.
    fn made_room(&self, s: parking_lot::MutexGuard<'_, State<T>>, n: usize) {
        let wake = s.tx_waiting.min(n);
        drop(s);
        for _ in 0..wake {
            self.q.not_full.notify_one();
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut s = self.q.state.lock();
        s.receiver = false;
        let wake = s.tx_waiting > 0;
        drop(s);
        if wake {
            self.q.not_full.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bounded_refuses_past_capacity_and_keeps_order() {
        let (tx, rx) = bounded(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.recv(), Ok(1));
        assert_eq!(tx.try_send(4), Ok(()));
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Ok(4));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn a_batch_takes_the_oldest_up_to_max_and_frees_room_for_waiting_senders() {
        let (tx, rx) = bounded(3);
        for i in 0..3 {
            tx.try_send(i).unwrap();
        }
        let waiting: Vec<_> = (3..5)
            .map(|i| {
                let tx = tx.clone();
                std::thread::spawn(move || tx.send(i))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50)); // both senders wait for room
        let mut out = Vec::new();
        assert_eq!(rx.recv_batch(&mut out, 2), Ok(2));
        assert_eq!(out, vec![0, 1]);
        for w in waiting {
            assert_eq!(w.join().unwrap(), Ok(()));
        }
        out.clear();
        assert_eq!(rx.recv_batch(&mut out, 0), Ok(1)); // max 0 counts as 1
        assert_eq!(rx.recv_batch(&mut out, 10), Ok(2));
        out.sort(); // the two senders raced each other
        assert_eq!(out, vec![2, 3, 4]);
        drop(tx);
        assert_eq!(rx.recv_batch(&mut out, 10), Err(RecvError));
    }

    #[test]
    fn receiver_drains_then_sees_the_senders_gone() {
        let (tx, rx) = bounded(4);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        drop(tx);
        tx2.try_send(2).unwrap();
        drop(tx2);
        assert_eq!(rx.recv(), Ok(1));
        assert_eq!(rx.recv(), Ok(2));
        assert_eq!(rx.recv(), Err(RecvError));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn sends_fail_once_the_receiver_is_gone() {
        let (tx, rx) = bounded(1);
        drop(rx);
        assert_eq!(tx.try_send(1), Err(TrySendError::Disconnected(1)));
        assert_eq!(tx.send(2), Err(SendError(2)));
    }

    #[test]
    fn a_parked_receiver_wakes_for_an_item_and_for_the_last_sender() {
        let (tx, rx) = bounded(1);
        let t = std::thread::spawn(move || {
            let first = rx.recv();
            let second = rx.recv();
            (first, second)
        });
        std::thread::sleep(Duration::from_millis(50)); // let it park
        tx.try_send(7).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(tx);
        assert_eq!(t.join().unwrap(), (Ok(7), Err(RecvError)));
    }

    #[test]
    fn a_blocked_send_goes_through_when_room_is_made_or_fails_when_the_receiver_goes() {
        let (tx, rx) = bounded(1);
        tx.try_send(1).unwrap();
        let t = std::thread::spawn(move || {
            let sent = tx.send(2);
            let refused = tx.send(3);
            (sent, refused)
        });
        std::thread::sleep(Duration::from_millis(50)); // the sender waits for room
        assert_eq!(rx.recv(), Ok(1));
        assert_eq!(rx.recv(), Ok(2));
        // 2 took the room 1 left; 3 waited for the room 2 left.
        assert_eq!(rx.recv(), Ok(3));
        drop(rx);
        let (sent, refused) = t.join().unwrap();
        assert_eq!(sent, Ok(()));
        assert_eq!(refused, Ok(()));
    }

    #[test]
    fn a_send_waiting_for_room_fails_when_the_receiver_is_dropped() {
        let (tx, rx) = bounded(1);
        tx.try_send(1).unwrap();
        let t = std::thread::spawn(move || tx.send(2));
        std::thread::sleep(Duration::from_millis(50));
        drop(rx);
        assert_eq!(t.join().unwrap(), Err(SendError(2)));
    }

    #[test]
    fn many_producers_lose_nothing() {
        let (tx, rx) = bounded(8);
        let producers: Vec<_> = (0..4u64)
            .map(|p| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        tx.send(p * 1_000_000 + i).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        let mut last = [None::<u64>; 4];
        let mut n = 0;
        while let Ok(v) = rx.recv() {
            let p = (v / 1_000_000) as usize;
            let i = v % 1_000_000;
            // Each producer's items arrive in its order.
            assert_eq!(last[p].map_or(0, |x| x + 1), i);
            last[p] = Some(i);
            n += 1;
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(n, 40_000);
    }
}

//! The dispatcher: pushes committed messages to their recipients' connections in
//! commit order.
//!
//! The store's writer hands each commit's [`Publication`]s to a bounded queue (a full
//! queue makes the writer wait: back-pressure on storage, never growth). This one
//! thread (`mychat-dispatch`) encodes each push once, looks the recipients up in the
//! directory, and sends batches (at most [`BATCH`] frames) per destination shard to the
//! shards' bounded FIFO inboxes; a full inbox stops it, which stops the writer, which
//! fills the write queue, which answers senders UNAVAILABLE: memory stays bounded when
//! fan-out cannot keep up.
//! Since one thread sends in commit order and inboxes are FIFO, every connection gets a
//! conversation's messages in seq order, whatever shards the senders were on, and its
//! user's stream events (messages, read receipts) in pts order.

use crate::batchq::Receiver;
use crate::handlers::push_frame;
use crate::ids::{ConnId, UserId};
use crate::server::Shared;
use crate::shard::ShardMsg;
use crate::store::{Origin, Publication};
use bytes::Bytes;
use mychat_codec::Header;
use mychat_proto::Command;
use prost::Message as _;
use std::sync::Arc;

/// Capacity of the queue from the writer, in commits.
pub const QUEUE: usize = 256;
/// Frames in one batch to a shard at most: with bounded shard inboxes this bounds the
/// memory pushes can hold while connections write them out.
pub const BATCH: usize = 256;

/// `MessagePush.message` (field 1) encoded once, for every push of that message.
fn message_field(m: &mychat_proto::Message) -> Vec<u8> {
    let mut b = Vec::with_capacity(m.encoded_len() + 8);
    prost::encoding::message::encode(1, m, &mut b);
    b
}

/// A MESSAGE_PUSH frame from the encoded message field and the receiver's pts: the
/// message is neither cloned nor encoded again per receiver.
fn frame(message_field: &[u8], pts: u64) -> Bytes {
    let mut body = Vec::with_capacity(message_field.len() + 11);
    body.extend_from_slice(message_field);
    if pts != 0 {
        prost::encoding::uint64::encode(2, &pts, &mut body);
    }
    mychat_codec::frame_bytes(Header::push(Command::MessagePush.id()), &body)
}

struct Batches<'a> {
    shared: &'a Shared,
    per_shard: Vec<Vec<(ConnId, Bytes)>>,
}

impl Batches<'_> {
    fn for_user(&mut self, user: UserId, f: &Bytes, skip: Option<Origin>) {
        let per_shard = &mut self.per_shard;
        let mut full = Vec::new();
        self.shared.dir.with_sessions(user, |sessions| {
            for s in sessions {
                if skip.is_some_and(|o| o.shard == s.shard && o.conn == s.conn) {
                    continue;
                }
                per_shard[s.shard.0].push((s.conn, f.clone()));
                if per_shard[s.shard.0].len() >= BATCH {
                    full.push(s.shard.0);
                }
            }
        });
        for shard in full {
            self.send(shard);
        }
    }

    /// Sends one shard's gathered frames; blocks while its inbox is full.
    fn send(&mut self, shard: usize) {
        if self.per_shard[shard].is_empty() {
            return;
        }
        let items = std::mem::take(&mut self.per_shard[shard]);
        let _ = self.shared.shards[shard]
            .tx
            .blocking_send(ShardMsg::Deliver(items));
    }

    fn add(&mut self, p: Publication) {
        match p {
            Publication::Direct {
                message,
                sender_pts,
                recipient_pts,
                origin,
            } => {
                let sender = UserId(message.sender_id);
                let recipient = UserId(message.recipient_id);
                let field = message_field(&message);
                let to_recipient = frame(&field, recipient_pts);
                self.for_user(recipient, &to_recipient, None);
                let to_sender = frame(&field, sender_pts);
                self.for_user(sender, &to_sender, origin);
            }
            Publication::Group {
                message,
                members,
                extra,
                origin,
            } => {
                let f = frame(&message_field(&message), 0);
                for u in members.iter().chain(extra.iter()) {
                    self.for_user(*u, &f, origin);
                }
            }
            Publication::Read {
                conv,
                reader,
                seq,
                reader_pts,
                peer,
                origin,
            } => {
                let receipt = mychat_proto::Receipt {
                    conversation_id: conv.0,
                    user_id: reader.0,
                    kind: mychat_proto::ReceiptKind::ReceiptRead as i32,
                    seq,
                };
                let push = |pts| {
                    push_frame(
                        Command::ReceiptPush,
                        &mychat_proto::ReceiptPush {
                            receipt: Some(receipt),
                            pts,
                        },
                    )
                };
                if let Some((peer, peer_pts)) = peer {
                    self.for_user(peer, &push(peer_pts), None);
                }
                self.for_user(reader, &push(reader_pts), origin);
            }
        }
    }

    fn flush(&mut self) {
        for (i, items) in self.per_shard.iter_mut().enumerate() {
            if !items.is_empty() {
                let items = std::mem::take(items);
                // Blocks while the shard's inbox is full (back-pressure).
                let _ = self.shared.shards[i]
                    .tx
                    .blocking_send(ShardMsg::Deliver(items));
            }
        }
    }
}

/// The dispatcher thread's body. An empty batch is the signal to stop.
pub fn run(shared: Arc<Shared>, rx: Receiver<Vec<Publication>>) {
    let n = shared.shards.len();
    let mut b = Batches {
        shared: &shared,
        per_shard: vec![Vec::new(); n],
    };
    while let Ok(first) = rx.recv() {
        if first.is_empty() {
            return;
        }
        let mut stop = false;
        for p in first {
            b.add(p);
        }
        // Coalesce whatever else is already queued into the same batches.
        while let Ok(more) = rx.try_recv() {
            if more.is_empty() {
                stop = true;
                break;
            }
            for p in more {
                b.add(p);
            }
        }
        b.flush();
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mychat_proto::MessagePush;

    /// The assembled push is byte for byte what prost encodes for MessagePush.
    #[test]
    fn assembled_push_equals_prost_encoding() {
        let m = mychat_proto::Message {
            id: 7,
            conversation_id: 3,
            seq: 9,
            text: "hi".into(),
            ..Default::default()
        };
        for pts in [0u64, 1, 300, u64::MAX] {
            let expected = MessagePush {
                message: Some(m.clone()),
                pts,
            }
            .encode_to_vec();
            let f = frame(&message_field(&m), pts);
            assert_eq!(&f[12..], &expected[..], "pts {pts}");
        }
    }
}

//! Messages module (3000-3999): send (ack after the durable store, then push), receipts,
//! sync, history, the conversation list.
use crate::conn::ConnShared;
use crate::error::{ApiError, ApiResult};
use crate::ids::{ConvId, UserId};
use crate::router::{decode, encode, now_ms};
use crate::shard::ShardCtx;
use crate::store::{ConvRecord, SendInput, UpdateEvent};
use bytes::Bytes;
use mychat_codec::Header;
use mychat_proto::{
    update, Command, Conversation, ConversationType, ConversationsRequest, ConversationsResponse,
    DeliveredRequest, DeliveredResponse, ErrorCode, HistoryRequest, HistoryResponse, MessageKind,
    MessagePush, ReadRequest, ReadResponse, Receipt, ReceiptKind, ReceiptPush, SendMessageRequest,
    SendMessageResponse, SyncAckRequest, SyncAckResponse, SyncRequest, SyncResponse, Update,
};
use std::rc::Rc;

/// Room for a response's repeated field in one frame: max_frame_len minus the header
/// and a margin for the response's other fields.
fn budget(ctx: &ShardCtx) -> usize {
    (ctx.shared.cfg.server.max_frame_len as usize).saturating_sub(8 + 256)
}

/// How many of `items` (taken from the front) fit in `budget` bytes as a repeated
/// field; at least one is always allowed (config validation guarantees one message fits).
fn fitting<T: prost::Message>(items: impl Iterator<Item = T>, budget: usize) -> usize {
    let mut used = 0;
    let mut n = 0;
    for it in items {
        let len = it.encoded_len();
        used += len + 1 + prost::encoding::encoded_len_varint(len as u64);
        if used > budget && n > 0 {
            break;
        }
        n += 1;
    }
    n
}

fn me(conn: &ConnShared) -> ApiResult<crate::conn::Session> {
    conn.session()
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthenticated, "log in first"))
}

fn push_frame<M: prost::Message>(cmd: Command, m: &M) -> Bytes {
    mychat_codec::frame_bytes(Header::push(cmd.id()), &m.encode_to_vec())
}

pub async fn send(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: SendMessageRequest = decode(body)?;
    let lim = &ctx.shared.cfg.messages;
    if req.client_msg_id.is_empty() || req.client_msg_id.len() > lim.max_client_msg_id_len {
        return Err(ApiError::bad_request(format!(
            "client_msg_id must be 1-{} bytes",
            lim.max_client_msg_id_len
        )));
    }
    if req.to_user_id == 0 {
        return Err(ApiError::bad_request("to_user_id is missing"));
    }
    if req.to_user_id == s.user.0 {
        return Err(ApiError::bad_request("cannot send a message to yourself"));
    }
    let kind = match MessageKind::try_from(req.kind) {
        Ok(MessageKind::KindUnspecified | MessageKind::Text) => MessageKind::Text,
        Ok(MessageKind::Custom) => MessageKind::Custom,
        Ok(MessageKind::System) => {
            return Err(ApiError::bad_request(
                "system messages are written by the server only",
            ))
        }
        Ok(MessageKind::Image | MessageKind::File) => {
            return Err(ApiError::bad_request(
                "image and file messages need the files module, not served by this server",
            ))
        }
        Err(_) => return Err(ApiError::bad_request("unknown message kind")),
    };
    if req.text.len() > lim.max_text_len {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("text is over {} bytes", lim.max_text_len),
        ));
    }
    if req.payload.len() > lim.max_payload_len {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("payload is over {} bytes", lim.max_payload_len),
        ));
    }
    match kind {
        MessageKind::Text if req.text.is_empty() => {
            return Err(ApiError::bad_request("text is empty"))
        }
        MessageKind::Text if !req.payload.is_empty() => {
            return Err(ApiError::bad_request("a text message has no payload"))
        }
        MessageKind::Custom if req.payload.is_empty() && req.text.is_empty() => {
            return Err(ApiError::bad_request(
                "a custom message needs a payload or text",
            ))
        }
        _ => {}
    }
    let out = ctx
        .shared
        .store
        .send_direct(SendInput {
            sender: s.user,
            recipient: UserId(req.to_user_id),
            client_msg_id: req.client_msg_id,
            kind: kind as i32,
            text: req.text,
            payload: req.payload,
            now_ms: now_ms(),
        })
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound => ApiError::not_found("no such user"),
            e => e.into(),
        })?;
    let m = &out.message;
    if !out.duplicate {
        let to_recipient = push_frame(
            Command::MessagePush,
            &MessagePush {
                message: Some(m.clone()),
                pts: out.recipient_pts,
            },
        );
        ctx.deliver_to_user(UserId(m.recipient_id), &to_recipient, None);
        let to_sender = push_frame(
            Command::MessagePush,
            &MessagePush {
                message: Some(m.clone()),
                pts: out.sender_pts,
            },
        );
        ctx.deliver_to_user(s.user, &to_sender, Some(conn.id));
    }
    encode(&SendMessageResponse {
        message_id: m.id,
        conversation_id: m.conversation_id,
        seq: m.seq,
        time_ms: m.time_ms,
        duplicate: out.duplicate,
        pts: out.sender_pts,
    })
}

fn not_found_conv() -> ApiError {
    ApiError::not_found("no such conversation")
}

pub async fn delivered(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: DeliveredRequest = decode(body)?;
    if req.conversation_id == 0 || req.seq == 0 {
        return Err(ApiError::bad_request(
            "conversation_id and seq are required",
        ));
    }
    let (seq, peer) = ctx
        .shared
        .store
        .mark_delivered(s.user, ConvId(req.conversation_id), req.seq)
        .await
        .map_err(|e| {
            if e == crate::store::StoreError::NotFound {
                not_found_conv()
            } else {
                e.into()
            }
        })?;
    let receipt = Receipt {
        conversation_id: req.conversation_id,
        user_id: s.user.0,
        kind: ReceiptKind::ReceiptDelivered as i32,
        seq,
    };
    ctx.deliver_to_user(
        peer,
        &push_frame(
            Command::ReceiptPush,
            &ReceiptPush {
                receipt: Some(receipt),
                pts: 0,
            },
        ),
        None,
    );
    encode(&DeliveredResponse {})
}

pub async fn read(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: ReadRequest = decode(body)?;
    if req.conversation_id == 0 {
        return Err(ApiError::bad_request("conversation_id is required"));
    }
    let out = ctx
        .shared
        .store
        .mark_read(s.user, ConvId(req.conversation_id), req.seq)
        .await
        .map_err(|e| {
            if e == crate::store::StoreError::NotFound {
                not_found_conv()
            } else {
                e.into()
            }
        })?;
    if let Some(mv) = &out.moved {
        let receipt = Receipt {
            conversation_id: req.conversation_id,
            user_id: s.user.0,
            kind: ReceiptKind::ReceiptRead as i32,
            seq: out.read_seq,
        };
        let to_peer = push_frame(
            Command::ReceiptPush,
            &ReceiptPush {
                receipt: Some(receipt),
                pts: mv.peer_pts,
            },
        );
        ctx.deliver_to_user(mv.peer, &to_peer, None);
        let to_me = push_frame(
            Command::ReceiptPush,
            &ReceiptPush {
                receipt: Some(receipt),
                pts: mv.reader_pts,
            },
        );
        ctx.deliver_to_user(s.user, &to_me, Some(conn.id));
    }
    encode(&ReadResponse {
        read_seq: out.read_seq,
    })
}

fn to_update(pts: u64, ev: UpdateEvent) -> Update {
    let event = match ev {
        UpdateEvent::Message(m) => update::Event::Message(m),
        UpdateEvent::Read { conv, reader, seq } => update::Event::Receipt(Receipt {
            conversation_id: conv.0,
            user_id: reader.0,
            kind: ReceiptKind::ReceiptRead as i32,
            seq,
        }),
    };
    Update {
        pts,
        event: Some(event),
    }
}

pub async fn sync(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: SyncRequest = decode(body)?;
    let cfg = &ctx.shared.cfg.sync;
    let limit = if req.limit == 0 {
        cfg.max_page
    } else {
        req.limit.min(cfg.max_page)
    };
    let store = &ctx.shared.store;
    let since = match req.since_pts.or(s.cursor) {
        Some(p) => p,
        None => {
            // Never synced: the unread snapshot, and a cursor from now on.
            let snap = store
                .unread_snapshot(
                    s.user,
                    cfg.unread_conversations,
                    cfg.unread_per_conversation,
                )
                .await?;
            store
                .set_cursor(s.user, s.device_id.to_string(), snap.pts)
                .await?;
            conn.set_cursor(snap.pts);
            let mut updates: Vec<Update> = snap
                .messages
                .into_iter()
                .map(|m| Update {
                    pts: 0,
                    event: Some(update::Event::Message(m)),
                })
                .collect();
            // What does not fit one frame stays reachable through HISTORY.
            updates.truncate(fitting(updates.iter().cloned(), budget(ctx)));
            return encode(&SyncResponse {
                updates,
                pts: snap.pts,
                has_more: false,
                unread_snapshot: true,
            });
        }
    };
    let head = store.user_pts(s.user).await?;
    if since > head {
        return Err(ApiError::bad_request(format!(
            "since_pts {since} is ahead of the stream ({head})"
        )));
    }
    if req.since_pts.is_some() && s.cursor.is_none_or(|c| since > c) {
        store
            .set_cursor(s.user, s.device_id.to_string(), since)
            .await?;
        conn.set_cursor(since);
    }
    let page = store.sync(s.user, since, limit).await?;
    let mut updates: Vec<Update> = page
        .updates
        .into_iter()
        .map(|(p, e)| to_update(p, e))
        .collect();
    // A page never outgrows one frame: what does not fit is the next page.
    let n = fitting(updates.iter().cloned(), budget(ctx));
    let has_more = page.has_more || n < updates.len();
    updates.truncate(n);
    let pts = updates.last().map(|u| u.pts).unwrap_or(since);
    encode(&SyncResponse {
        updates,
        pts,
        has_more,
        unread_snapshot: false,
    })
}

pub async fn sync_ack(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: SyncAckRequest = decode(body)?;
    let store = &ctx.shared.store;
    let head = store.user_pts(s.user).await?;
    if req.pts > head {
        return Err(ApiError::bad_request(format!(
            "pts {} is ahead of the stream ({head})",
            req.pts
        )));
    }
    if s.cursor.is_none_or(|c| req.pts > c) {
        store
            .set_cursor(s.user, s.device_id.to_string(), req.pts)
            .await?;
        conn.set_cursor(req.pts);
    }
    encode(&SyncAckResponse {})
}

async fn conv_of(
    ctx: &ShardCtx,
    user: UserId,
    conversation_id: u64,
    peer: u64,
) -> ApiResult<ConvRecord> {
    let store = &ctx.shared.store;
    let c = match (conversation_id, peer) {
        (0, 0) => {
            return Err(ApiError::bad_request(
                "conversation_id or peer_user_id is required",
            ))
        }
        (0, p) => store.direct_conversation(user, UserId(p)).await?,
        (c, _) => store.conversation(ConvId(c)).await?,
    };
    // Not visible to non-members: NOT_FOUND, as if it did not exist.
    c.filter(|c| c.has_member(user)).ok_or_else(not_found_conv)
}

pub async fn history(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: HistoryRequest = decode(body)?;
    let conv = conv_of(ctx, s.user, req.conversation_id, req.peer_user_id).await?;
    let max = ctx.shared.cfg.sync.history_max_page;
    let limit = if req.limit == 0 {
        max
    } else {
        req.limit.min(max)
    };
    let (mut messages, mut has_more) = ctx
        .shared
        .store
        .history(conv.id, req.before_seq, limit)
        .await?;
    // Keep the newest that fit one frame; the older ones are the next page.
    let n = fitting(messages.iter().rev().cloned(), budget(ctx));
    if n < messages.len() {
        messages.drain(..messages.len() - n);
        has_more = true;
    }
    encode(&HistoryResponse {
        conversation_id: conv.id.0,
        messages,
        has_more,
    })
}

pub async fn conversations(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: ConversationsRequest = decode(body)?;
    let max = ctx.shared.cfg.sync.conversations_max_page;
    let limit = if req.limit == 0 {
        max
    } else {
        req.limit.min(max)
    };
    let (list, has_more) = ctx
        .shared
        .store
        .conversations(s.user, req.offset, limit)
        .await?;
    let mut conversations: Vec<Conversation> = list
        .into_iter()
        .map(|c| Conversation {
            id: c.conv.id.0,
            r#type: ConversationType::Direct as i32,
            peer_user_id: c.conv.peer_of(s.user).0,
            last_message: c.last_message,
            last_seq: c.last_seq,
            read_seq: c.read_seq,
            unread: c.last_seq.saturating_sub(c.read_seq),
            peer_read_seq: c.peer_read_seq,
            peer_delivered_seq: c.peer_delivered_seq,
        })
        .collect();
    let n = fitting(conversations.iter().cloned(), budget(ctx));
    let has_more = has_more || n < conversations.len();
    conversations.truncate(n);
    encode(&ConversationsResponse {
        conversations,
        has_more,
    })
}

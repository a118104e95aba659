//! Messages module (3000-3999): send (ack after the durable store, then push), receipts,
//! sync, history, the conversation list.
use super::{me, push_frame};
use crate::conn::ConnShared;
use crate::error::{ApiError, ApiResult};
use crate::ids::{ConvId, UserId};
use crate::router::{decode, encode, now_ms};
use crate::shard::ShardCtx;
use crate::store::{ConvRecord, Origin, SendInput, UpdateEvent};
use bytes::Bytes;
use mychat_proto::{
    update, Command, Conversation, ConversationType, ConversationsRequest, ConversationsResponse,
    DeleteForMeRequest, DeleteForMeResponse, DeliveredRequest, DeliveredResponse, ErrorCode,
    FriendEvent, GroupHead, GroupMembership, HistoryRequest, HistoryResponse, MessageKind,
    ReadRequest, ReadResponse, RecallRequest, RecallResponse, Receipt, ReceiptKind, ReceiptPush,
    SendMessageRequest, SendMessageResponse, SyncAckRequest, SyncAckResponse, SyncRequest,
    SyncResponse, Update,
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
    if req.to_user_id == 0 && req.group_id == 0 {
        return Err(ApiError::bad_request("to_user_id or group_id is required"));
    }
    if req.to_user_id != 0 && req.group_id != 0 {
        return Err(ApiError::bad_request(
            "give to_user_id or group_id, not both",
        ));
    }
    if req.to_user_id == s.user.0 {
        return Err(ApiError::bad_request("cannot send a message to yourself"));
    }
    if !ctx.shared.send_buckets.take(s.user) {
        crate::metrics::Metrics::inc(&ctx.shared.metrics.sends_rate_limited_total);
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many messages from this user: slow down",
        ));
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
    // Pushes to the recipients (and the sender's other devices) are made by the
    // dispatcher once the store committed, in commit order: see crate::dispatch.
    let input = SendInput {
        sender: s.user,
        recipient: UserId(req.to_user_id),
        client_msg_id: req.client_msg_id,
        kind: kind as i32,
        text: req.text,
        payload: req.payload,
        now_ms: now_ms(),
        require_friend: !ctx.shared.cfg.friends.strangers_may_message,
        origin: Some(Origin {
            shard: ctx.id,
            conn: conn.id,
        }),
    };
    if req.group_id != 0 {
        let out = ctx
            .shared
            .store
            .send_group(req.group_id, input)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::NotFound => ApiError::not_found("no such group"),
                e => e.into(),
            })?;
        let m = &out.message;
        return encode(&SendMessageResponse {
            message_id: m.id,
            conversation_id: m.conversation_id,
            seq: m.seq,
            time_ms: m.time_ms,
            duplicate: out.duplicate,
            pts: 0,
        });
    }
    let out = ctx
        .shared
        .store
        .send_direct(input)
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound => ApiError::not_found("no such user"),
            e => e.into(),
        })?;
    let m = &out.message;
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
    if peer.0 == 0 {
        // A group: the mark is kept, not pushed to every member.
        return encode(&DeliveredResponse {});
    }
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
    // The receipts (to the peer and the reader's other devices) are pushed by the
    // dispatcher with the commit, in pts order with the messages: see crate::dispatch.
    let origin = Some(Origin {
        shard: ctx.id,
        conn: conn.id,
    });
    let read_seq = ctx
        .shared
        .store
        .mark_read(s.user, ConvId(req.conversation_id), req.seq, origin)
        .await
        .map_err(|e| {
            if e == crate::store::StoreError::NotFound {
                not_found_conv()
            } else {
                e.into()
            }
        })?;
    encode(&ReadResponse { read_seq })
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
        UpdateEvent::Friend {
            kind,
            user,
            message,
            time_ms,
        } => update::Event::Friend(FriendEvent {
            kind,
            user: user.0,
            message,
            time_ms,
        }),
        UpdateEvent::Group {
            group,
            conv,
            member,
        } => update::Event::Group(GroupMembership {
            group_id: group,
            conversation_id: conv.0,
            member,
        }),
    };
    Update {
        pts,
        event: Some(event),
    }
}

/// The caller's groups with messages past their read mark (sent with the last page).
async fn heads(ctx: &ShardCtx, user: UserId) -> ApiResult<Vec<GroupHead>> {
    let heads = ctx.shared.store.group_heads(user).await?;
    Ok(heads
        .into_iter()
        .map(|(g, conv, last, read)| GroupHead {
            group_id: g,
            conversation_id: conv.0,
            last_seq: last,
            read_seq: read,
        })
        .collect())
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
                groups: heads(ctx, s.user).await?,
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
    let trimmed = n < updates.len();
    let has_more = page.has_more || trimmed;
    updates.truncate(n);
    let pts = if trimmed {
        updates.last().map(|u| u.pts).unwrap_or(since)
    } else {
        page.scanned_to
    };
    let groups = if has_more {
        Vec::new()
    } else {
        heads(ctx, s.user).await?
    };
    encode(&SyncResponse {
        updates,
        pts,
        has_more,
        unread_snapshot: false,
        groups,
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
    group: u64,
) -> ApiResult<ConvRecord> {
    let store = &ctx.shared.store;
    let c = match (conversation_id, peer, group) {
        (0, 0, 0) => {
            return Err(ApiError::bad_request(
                "conversation_id, peer_user_id or group_id is required",
            ))
        }
        (0, 0, g) => match store.group_info(g).await? {
            Some(info) => store.conversation(info.conv).await?,
            None => None,
        },
        (0, p, _) => store.direct_conversation(user, UserId(p)).await?,
        (c, _, _) => store.conversation(ConvId(c)).await?,
    };
    let Some(c) = c else {
        return Err(not_found_conv());
    };
    // Not visible to non-members: NOT_FOUND, as if it did not exist.
    let visible = if c.is_group() {
        store.is_member(c.id, user).await?
    } else {
        c.has_member(user)
    };
    if !visible {
        return Err(not_found_conv());
    }
    Ok(c)
}

pub async fn history(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: HistoryRequest = decode(body)?;
    let conv = conv_of(
        ctx,
        s.user,
        req.conversation_id,
        req.peer_user_id,
        req.group_id,
    )
    .await?;
    let max = ctx.shared.cfg.sync.history_max_page;
    let limit = if req.limit == 0 {
        max
    } else {
        req.limit.min(max)
    };
    let (mut messages, mut has_more) = ctx
        .shared
        .store
        .history(s.user, conv.id, req.before_seq, req.after_seq, limit)
        .await?;
    if req.after_seq > 0 {
        // Forward: keep the oldest that fit; the rest is the next page.
        let n = fitting(messages.iter().cloned(), budget(ctx));
        if n < messages.len() {
            messages.truncate(n);
            has_more = true;
        }
    } else {
        // Backward: keep the newest that fit; the older ones are the next page.
        let n = fitting(messages.iter().rev().cloned(), budget(ctx));
        if n < messages.len() {
            messages.drain(..messages.len() - n);
            has_more = true;
        }
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
            r#type: if c.conv.is_group() {
                ConversationType::Group
            } else {
                ConversationType::Direct
            } as i32,
            peer_user_id: if c.conv.is_group() {
                0
            } else {
                c.conv.peer_of(s.user).0
            },
            group_id: c.conv.group_id,
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

pub async fn recall(ctx: &Rc<ShardCtx>, conn: &Rc<ConnShared>, body: Bytes) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: RecallRequest = decode(body)?;
    if req.message_id == 0 {
        return Err(ApiError::bad_request("message_id is required"));
    }
    let window = ctx.shared.cfg.messages.recall_window_secs as i64 * 1000;
    let out = ctx
        .shared
        .store
        .recall(s.user, req.message_id, now_ms(), window)
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound => ApiError::not_found("no such message"),
            crate::store::StoreError::Conflict => {
                ApiError::new(ErrorCode::Conflict, "already recalled")
            }
            e => e.into(),
        })?;
    // The notice is pushed by the dispatcher (crate::dispatch), in commit order.
    encode(&RecallResponse {
        notice_seq: out.seq,
    })
}

pub async fn delete_for_me(
    ctx: &Rc<ShardCtx>,
    conn: &Rc<ConnShared>,
    body: Bytes,
) -> ApiResult<Bytes> {
    let s = me(conn)?;
    let req: DeleteForMeRequest = decode(body)?;
    let max = ctx.shared.cfg.messages.max_delete_ids;
    if req.message_ids.is_empty() || req.message_ids.contains(&0) {
        return Err(ApiError::bad_request("message_ids are required"));
    }
    if req.message_ids.len() > max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("at most {max} ids"),
        ));
    }
    ctx.shared
        .store
        .hide(s.user, req.message_ids)
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound => ApiError::not_found("no such message"),
            e => e.into(),
        })?;
    encode(&DeleteForMeResponse {})
}

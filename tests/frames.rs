//! PROTOCOL.md's frame rules, byte by byte, against a real server.
mod common;
use common::*;
use mychat_client::proto as pb;
use mychat_codec::flags;
use pb::{Command, ErrorCode};
use proptest::prelude::*;

#[tokio::test]
async fn heartbeat_before_login_and_exact_response() {
    let s = TestServer::start().await;
    let mut r = Raw::connect(&s.addr).await;
    r.send_bytes(&[0, 0, 0, 8, 1, 0, 0x03, 0xE9, 0, 0, 0, 42])
        .await;
    let f = r.frame().await.unwrap();
    assert_eq!(f.header.flags, flags::RESPONSE);
    assert_eq!(f.header.command, 1001);
    assert_eq!(f.header.seq, 42);
    assert!(f.body.is_empty());
}

async fn expect_frame_error(addr: &str, bytes: &[u8], code: ErrorCode) {
    let mut r = Raw::connect(addr).await;
    r.send_bytes(bytes).await;
    let f = r.frame().await.expect("an error frame");
    assert_eq!(f.header.flags, flags::RESPONSE | flags::ERROR);
    assert_eq!((f.header.command, f.header.seq), (0, 0));
    assert_eq!(error_of(&f).code, code as u32);
    r.expect_closed().await;
}

#[tokio::test]
async fn bad_frames_get_error_then_close() {
    let s = TestServer::start().await;
    // wrong version
    expect_frame_error(
        &s.addr,
        &[0, 0, 0, 8, 2, 0, 0x03, 0xE9, 0, 0, 0, 1],
        ErrorCode::BadFrame,
    )
    .await;
    // reserved flag bits
    expect_frame_error(
        &s.addr,
        &[0, 0, 0, 8, 1, 0x08, 0x03, 0xE9, 0, 0, 0, 1],
        ErrorCode::BadFrame,
    )
    .await;
    expect_frame_error(
        &s.addr,
        &[0, 0, 0, 8, 1, 0x80, 0x03, 0xE9, 0, 0, 0, 1],
        ErrorCode::BadFrame,
    )
    .await;
    // length below 8
    expect_frame_error(
        &s.addr,
        &[0, 0, 0, 7, 1, 0, 0, 0, 0, 0, 0],
        ErrorCode::BadFrame,
    )
    .await;
    expect_frame_error(&s.addr, &[0, 0, 0, 0], ErrorCode::BadFrame).await;
    // over max_frame_len: refused from the prefix alone, the body is never sent
    let too_big = (1024 * 1024 + 9u32).to_be_bytes();
    expect_frame_error(&s.addr, &too_big, ErrorCode::FrameTooLarge).await;
    expect_frame_error(&s.addr, &[0xFF, 0xFF, 0xFF, 0xFF], ErrorCode::FrameTooLarge).await;
}

#[tokio::test]
async fn max_frame_len_is_config() {
    let s = TestServer::start_with(|c| c.server.max_frame_len = 1000).await;
    let mut r = Raw::connect(&s.addr).await;
    // exactly 1000: accepted (an unknown command, answered and kept open)
    r.request(999, 1, &vec![0u8; 992]).await;
    let f = r.frame().await.unwrap();
    assert_eq!(error_of(&f).code, ErrorCode::UnknownCommand as u32);
    expect_frame_error(&s.addr, &1001u32.to_be_bytes(), ErrorCode::FrameTooLarge).await;
}

#[tokio::test]
async fn request_level_errors_keep_the_connection() {
    let s = TestServer::start().await;
    let mut r = Raw::connect(&s.addr).await;
    // unknown command
    r.request(65000, 1, b"").await;
    let f = r.frame().await.unwrap();
    assert_eq!((f.header.command, f.header.seq), (65000, 1));
    assert_eq!(error_of(&f).code, ErrorCode::UnknownCommand as u32);
    // needs login
    r.request(Command::SendMessage.id(), 2, b"").await;
    assert_eq!(
        error_of(&r.frame().await.unwrap()).code,
        ErrorCode::Unauthenticated as u32
    );
    r.request(Command::Sync.id(), 3, b"").await;
    assert_eq!(
        error_of(&r.frame().await.unwrap()).code,
        ErrorCode::Unauthenticated as u32
    );
    // body that does not decode
    r.request(Command::Register.id(), 4, &[0xFF, 0xFF, 0xFF])
        .await;
    let f = r.frame().await.unwrap();
    assert_eq!(f.header.seq, 4);
    assert_eq!(error_of(&f).code, ErrorCode::BadRequest as u32);
    // invalid UTF-8 in a string field
    r.request(Command::Register.id(), 5, &[0x0A, 2, 0xC3, 0x28])
        .await;
    assert_eq!(
        error_of(&r.frame().await.unwrap()).code,
        ErrorCode::BadRequest as u32
    );
    // a "request" that carries RESPONSE/PUSH flags
    let f = mychat_codec::frame_bytes(
        mychat_codec::Header {
            flags: flags::PUSH,
            command: 1001,
            seq: 6,
        },
        b"",
    );
    r.send_bytes(&f).await;
    assert_eq!(
        error_of(&r.frame().await.unwrap()).code,
        ErrorCode::BadRequest as u32
    );
    // push-only ids are not requests
    r.request(Command::MessagePush.id(), 7, b"").await;
    assert_eq!(
        error_of(&r.frame().await.unwrap()).code,
        ErrorCode::UnknownCommand as u32
    );
    // still open
    r.request(1001, 8, b"").await;
    let f = r.frame().await.unwrap();
    assert_eq!((f.header.flags, f.header.seq), (flags::RESPONSE, 8));
}

#[tokio::test]
async fn pipelined_requests_all_answered_with_their_seq() {
    let s = TestServer::start().await;
    let mut r = Raw::connect(&s.addr).await;
    heartbeats_in_one_write_all_answered(&mut r, 50).await;
}

/// Sends heartbeats with seq 1..=n in one write; each is answered with its seq.
async fn heartbeats_in_one_write_all_answered(r: &mut Raw, n: u32) {
    let mut wire = Vec::new();
    for seq in 1..=n {
        wire.extend_from_slice(&mychat_codec::frame_bytes(
            mychat_codec::Header::request(1001, seq),
            b"",
        ));
    }
    r.send_bytes(&wire).await;
    let mut seen = Vec::new();
    for _ in 0..n {
        seen.push(r.frame().await.expect("every frame answered").header.seq);
    }
    seen.sort();
    assert_eq!(seen, (1..=n).collect::<Vec<_>>());
}

#[tokio::test]
async fn hello_reports_limits() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let h = c.hello().await.unwrap();
    assert_eq!(h.protocol_version, 1);
    assert_eq!(h.max_frame_len, 1024 * 1024 + 8);
    assert_eq!(h.max_text_len, 16 * 1024);
}

#[tokio::test]
async fn login_timeout_closes_with_kick() {
    let s = TestServer::start_with(|c| c.server.login_timeout_ms = 300).await;
    let mut r = Raw::connect(&s.addr).await;
    let f = r.frame().await.expect("a kick push");
    assert_eq!(f.header.flags, flags::PUSH);
    assert_eq!(f.header.command, Command::Kick.id());
    use prost::Message as _;
    let k = pb::KickPush::decode(f.body).unwrap();
    assert_eq!(k.reason, pb::KickReason::LoginTimeout as i32);
    r.expect_closed().await;
}

#[tokio::test]
async fn slowloris_is_dropped_at_idle_timeout() {
    let s = TestServer::start_with(|c| {
        c.server.idle_timeout_ms = 1000;
        c.server.heartbeat_interval_ms = 500;
    })
    .await;
    let mut r = Raw::connect(&s.addr).await;
    // A partial frame, one byte at a time: bytes without a frame do not count.
    let started = std::time::Instant::now();
    for b in [0u8, 0, 0] {
        r.send_bytes(&[b]).await;
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    let f = r.frame().await.expect("a kick push");
    assert_eq!(f.header.command, Command::Kick.id());
    r.expect_closed().await;
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    /// Whatever bytes a client sends, the server answers with frames only (never
    /// garbage), or closes; and it keeps serving other connections.
    #[test]
    fn any_bytes_never_break_the_server(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..6)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let s = TestServer::start().await;
            let mut r = Raw::connect(&s.addr).await;
            for c in &chunks {
                let _ = tokio::io::AsyncWriteExt::write_all(&mut r.s, c).await;
            }
            // Read whatever comes for a moment; decoding as frames must not fail.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), r.frame()).await;
            let c = s.client().await;
            c.heartbeat().await.unwrap();
        });
    }
}

#[tokio::test]
async fn connections_past_the_limit_are_refused() {
    let s = TestServer::start_with(|c| c.server.max_connections = 2).await;
    let a = s.client().await;
    let b = s.client().await;
    a.heartbeat().await.unwrap();
    b.heartbeat().await.unwrap();
    let mut r = Raw::connect(&s.addr).await;
    let f = r.frame().await.expect("an error frame");
    assert_eq!((f.header.command, f.header.seq), (0, 0));
    assert_eq!(error_of(&f).code, ErrorCode::Unavailable as u32);
    r.expect_closed().await;
    // A slot frees when a client leaves.
    drop(a);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let c = s.client().await;
    c.heartbeat().await.unwrap();
}

/// LOGIN runs alone: pipelined behind another request and ahead of one that needs the
/// session (all in one write), it waits for the first and the last waits for it.
#[tokio::test]
async fn pipelined_login_is_a_barrier() {
    let s = TestServer::start().await;
    s.register("alice").await;
    let login = pb::LoginRequest {
        credential: Some(pb::login_request::Credential::Password(
            pb::PasswordCredential {
                username: "alice".into(),
                password: "password-alice".into(),
            },
        )),
        device_id: "d".into(),
        platform: pb::Platform::Desktop as i32,
    };
    let mut wire = Vec::new();
    wire.extend_from_slice(&mychat_codec::frame_bytes(
        mychat_codec::Header::request(1001, 1),
        b"",
    ));
    wire.extend_from_slice(&mychat_codec::frame_bytes(
        mychat_codec::Header::request(Command::Login.id(), 2),
        &body(&login),
    ));
    let sync = pb::SyncRequest {
        since_pts: Some(0),
        limit: 0,
    };
    wire.extend_from_slice(&mychat_codec::frame_bytes(
        mychat_codec::Header::request(Command::Sync.id(), 3),
        &body(&sync),
    ));
    let mut r = Raw::connect(&s.addr).await;
    r.send_bytes(&wire).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let f = r.frame().await.unwrap();
        assert!(
            !f.header.is_error(),
            "seq {} refused: {:?}",
            f.header.seq,
            error_of(&f)
        );
        got.push(f.header.seq);
    }
    assert_eq!(got, vec![1, 2, 3]);
}

/// The server reads once per wakeup and takes a short read as "drained" (conn.rs):
/// frames that arrive in pieces, a burst larger than one read, and an end of stream
/// right behind the last bytes must each still be seen.
#[tokio::test]
async fn pieces_bursts_and_a_close_behind_data_are_all_read() {
    use tokio::io::AsyncWriteExt as _;
    let s = TestServer::start().await;
    let mut r = Raw::connect(&s.addr).await;
    // One frame in three pieces, each its own read on the server.
    let hb = mychat_codec::frame_bytes(mychat_codec::Header::request(1001, 7), b"");
    for piece in [&hb[..3], &hb[3..9], &hb[9..]] {
        r.send_bytes(piece).await;
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    assert_eq!(r.frame().await.unwrap().header.seq, 7);
    // 2,000 frames (24,000 bytes) in one write: more than one read's buffer.
    heartbeats_in_one_write_all_answered(&mut r, 2000).await;
    // A piece of a frame and the end of stream right behind it: the server notices
    // the close at once (not at the idle timeout, 30 s by default) and closes too.
    r.send_bytes(&hb[..5]).await;
    r.s.shutdown().await.unwrap();
    let started = std::time::Instant::now();
    r.expect_closed().await;
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

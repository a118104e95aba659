//! Property: for any byte sequence fed in any chunking, the decoder never panics,
//! never yields a frame longer than max_frame_len, never holds more than one frame's
//! worth of unread bytes past a valid prefix, and re-encoding a decoded frame gives
//! back exactly the bytes it came from.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mychat_codec::{encode_frame, FrameCodec, HEADER_LEN, LEN_PREFIX};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let max = 8 + (data[0] as u32) * 4;
    let chunk = 1 + (data.len() % 7);
    let input = &data[1..];
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let mut consumed = 0usize;
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => {
                    assert!(f.body.len() + HEADER_LEN <= max as usize);
                    let mut again = BytesMut::new();
                    encode_frame(f.header, &f.body, &mut again);
                    assert_eq!(&again[..], &input[consumed..consumed + again.len()]);
                    consumed += again.len();
                }
                Ok(None) => {
                    assert!(buf.len() < LEN_PREFIX + max as usize);
                    break;
                }
                Err(_) => return,
            }
        }
    }
});

//! MyChat framing, exactly as PROTOCOL.md fixes it, and nothing else: no protobuf here,
//! so the codec can be fuzzed alone and a body (`Bytes`) can be forwarded to many
//! connections without re-encoding.
//!
//! ```text
//!  0       4       5       6       8       12              4 + length
//!  +-------+-------+-------+-------+-------+---------------+
//!  | length|version| flags |command|  seq  |     body      |
//!  |  u32  |  u8   |  u8   |  u16  |  u32  | length-8 bytes|
//!  +-------+-------+-------+-------+-------+---------------+
//!  all integers big-endian; 8 <= length <= max_frame_len
//! ```
//!
//! The decoder checks the length against the maximum before it buffers anything of
//! the body (it reserves room for one frame only once the prefix is known good), and
//! "not enough bytes yet" is a state, never an error. A frame error (bad version,
//! reserved flag bits, length out of range) is final: the caller answers it with an
//! error frame (command 0, seq 0) and closes the connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// The version byte this codec speaks.
pub const VERSION: u8 = 1;
/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Header bytes counted by `length` (version, flags, command, seq).
pub const HEADER_LEN: usize = 8;
/// PROTOCOL.md's default `max_frame_len`: 1 MiB of body plus the header.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 1024 * 1024 + 8;

/// Flag bits of the header's flags byte.
pub mod flags {
    pub const RESPONSE: u8 = 0b001;
    pub const PUSH: u8 = 0b010;
    pub const ERROR: u8 = 0b100;
    /// Bits 3-7 must be zero.
    pub const RESERVED: u8 = 0b1111_1000;
}

/// The fixed part of a frame after its length prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub flags: u8,
    pub command: u16,
    pub seq: u32,
}

impl Header {
    pub fn request(command: u16, seq: u32) -> Header {
        Header {
            flags: 0,
            command,
            seq,
        }
    }
    pub fn response(command: u16, seq: u32) -> Header {
        Header {
            flags: flags::RESPONSE,
            command,
            seq,
        }
    }
    pub fn error(command: u16, seq: u32) -> Header {
        Header {
            flags: flags::RESPONSE | flags::ERROR,
            command,
            seq,
        }
    }
    pub fn push(command: u16) -> Header {
        Header {
            flags: flags::PUSH,
            command,
            seq: 0,
        }
    }
    pub fn is_response(&self) -> bool {
        self.flags & flags::RESPONSE != 0
    }
    pub fn is_push(&self) -> bool {
        self.flags & flags::PUSH != 0
    }
    pub fn is_error(&self) -> bool {
        self.flags & flags::ERROR != 0
    }
}

/// One decoded frame: the header and the body, split out of the read buffer without
/// a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub body: Bytes,
}

/// Why a byte stream is not a valid frame sequence. Both are final for the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// PROTOCOL.md BAD_FRAME (code 1).
    #[error("bad frame: {0}")]
    BadFrame(&'static str),
    /// PROTOCOL.md FRAME_TOO_LARGE (code 2).
    #[error("frame length {len} exceeds the maximum {max}")]
    TooLarge { len: u32, max: u32 },
    /// The transport failed.
    #[error("i/o: {0}")]
    Io(String),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Io(e.to_string())
    }
}

/// tokio-util codec for MyChat frames. Decodes [`Frame`]s; encodes [`Frame`]s and
/// header + body pairs.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    max_frame_len: u32,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME_LEN)
    }
}

impl FrameCodec {
    /// `max_frame_len` bounds the length field (header + body). Values below the
    /// header size are raised to it.
    pub fn new(max_frame_len: u32) -> FrameCodec {
        FrameCodec {
            max_frame_len: max_frame_len.max(HEADER_LEN as u32),
        }
    }

    pub fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// Checks a length prefix and the header that follows it, if present.
    fn check(&self, src: &[u8]) -> Result<Option<(usize, Header)>, FrameError> {
        if src.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        if len > self.max_frame_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        if (len as usize) < HEADER_LEN {
            return Err(FrameError::BadFrame("length below the 8-byte header"));
        }
        // Version and flags are checked as soon as they arrive, not after the body.
        if src.len() > 4 && src[4] != VERSION {
            return Err(FrameError::BadFrame("unsupported version"));
        }
        if src.len() > 5 && src[5] & flags::RESERVED != 0 {
            return Err(FrameError::BadFrame("reserved flag bits set"));
        }
        if src.len() < LEN_PREFIX + HEADER_LEN {
            return Ok(None);
        }
        let header = Header {
            flags: src[5],
            command: u16::from_be_bytes([src[6], src[7]]),
            seq: u32::from_be_bytes([src[8], src[9], src[10], src[11]]),
        };
        Ok(Some((len as usize, header)))
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some((len, header)) = self.check(src)? else {
            return Ok(None);
        };
        let total = LEN_PREFIX + len;
        if src.len() < total {
            // The length is known good: reserve for this frame once.
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(LEN_PREFIX + HEADER_LEN);
        let body = src.split_to(len - HEADER_LEN).freeze();
        Ok(Some(Frame { header, body }))
    }
}

/// Appends one frame to `dst`. The caller guarantees the body fits `max_frame_len`
/// (the server's own frames always do; see [`FrameCodec`]'s `Encoder`, which checks).
pub fn encode_frame(header: Header, body: &[u8], dst: &mut BytesMut) {
    dst.reserve(LEN_PREFIX + HEADER_LEN + body.len());
    dst.put_u32((HEADER_LEN + body.len()) as u32);
    dst.put_u8(VERSION);
    dst.put_u8(header.flags);
    dst.put_u16(header.command);
    dst.put_u32(header.seq);
    dst.put_slice(body);
}

/// Encodes a whole frame into a fresh buffer (for sharing one encoding among many
/// recipients).
pub fn frame_bytes(header: Header, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(LEN_PREFIX + HEADER_LEN + body.len());
    encode_frame(header, body, &mut b);
    b.freeze()
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;
    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode((item.header, &item.body[..]), dst)
    }
}

impl Encoder<(Header, &[u8])> for FrameCodec {
    type Error = FrameError;
    fn encode(
        &mut self,
        (header, body): (Header, &[u8]),
        dst: &mut BytesMut,
    ) -> Result<(), FrameError> {
        let len = HEADER_LEN + body.len();
        if len > self.max_frame_len as usize {
            return Err(FrameError::TooLarge {
                len: len.min(u32::MAX as usize) as u32,
                max: self.max_frame_len,
            });
        }
        if header.flags & flags::RESERVED != 0 {
            return Err(FrameError::BadFrame("reserved flag bits set"));
        }
        encode_frame(header, body, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(h: Header, body: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_frame(h, body, &mut b);
        b.to_vec()
    }

    #[test]
    fn heartbeat_bytes_are_exact() {
        let bytes = enc(Header::request(1001, 7), b"");
        assert_eq!(bytes, vec![0, 0, 0, 8, 1, 0, 0x03, 0xE9, 0, 0, 0, 7]);
        let mut c = FrameCodec::default();
        let mut buf = BytesMut::from(&bytes[..]);
        let f = c.decode(&mut buf).unwrap().unwrap();
        assert_eq!(f.header, Header::request(1001, 7));
        assert!(f.body.is_empty());
        assert!(buf.is_empty());
    }

    #[test]
    fn byte_at_a_time() {
        let bytes = enc(Header::response(3001, 0xDEADBEEF), b"hello world");
        let mut c = FrameCodec::default();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.put_u8(*b);
            let r = c.decode(&mut buf).unwrap();
            if i + 1 < bytes.len() {
                assert!(r.is_none(), "frame early at byte {i}");
            } else {
                let f = r.unwrap();
                assert_eq!(f.header.seq, 0xDEADBEEF);
                assert_eq!(&f.body[..], b"hello world");
            }
        }
    }

    #[test]
    fn too_large_is_refused_from_the_prefix_alone() {
        let mut c = FrameCodec::new(100);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 101][..]);
        assert_eq!(
            c.decode(&mut buf),
            Err(FrameError::TooLarge { len: 101, max: 100 })
        );
        // Nothing was reserved for the oversized body.
        assert!(buf.capacity() < 101);
        let mut buf = BytesMut::from(&[0xFFu8, 0xFF, 0xFF, 0xFF][..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn exactly_max_is_accepted() {
        let mut c = FrameCodec::new(20);
        let bytes = enc(Header::request(1, 1), &[7u8; 12]);
        let f = c.decode(&mut BytesMut::from(&bytes[..])).unwrap().unwrap();
        assert_eq!(f.body.len(), 12);
        let bytes = enc(Header::request(1, 1), &[7u8; 13]);
        assert!(matches!(
            c.decode(&mut BytesMut::from(&bytes[..])),
            Err(FrameError::TooLarge { len: 21, .. })
        ));
    }

    #[test]
    fn short_length_bad_version_reserved_flags() {
        let mut c = FrameCodec::default();
        for len in 0u8..8 {
            let mut buf = BytesMut::from(&[0u8, 0, 0, len][..]);
            assert_eq!(
                c.decode(&mut buf),
                Err(FrameError::BadFrame("length below the 8-byte header"))
            );
        }
        let mut buf = BytesMut::from(&[0u8, 0, 0, 8, 2][..]);
        assert_eq!(
            c.decode(&mut buf),
            Err(FrameError::BadFrame("unsupported version"))
        );
        for bit in 3..8 {
            let mut buf = BytesMut::from(&[0u8, 0, 0, 8, 1, 1 << bit][..]);
            assert_eq!(
                c.decode(&mut buf),
                Err(FrameError::BadFrame("reserved flag bits set"))
            );
        }
    }

    #[test]
    fn encoder_refuses_oversized_and_reserved() {
        let mut c = FrameCodec::new(10);
        let mut dst = BytesMut::new();
        assert!(c
            .encode((Header::request(1, 1), &[0u8; 3][..]), &mut dst)
            .is_err());
        assert!(c
            .encode(
                (
                    Header {
                        flags: 0x80,
                        command: 1,
                        seq: 1
                    },
                    &[][..]
                ),
                &mut dst
            )
            .is_err());
        assert!(dst.is_empty());
        c.encode((Header::push(3002), &[1u8, 2][..]), &mut dst)
            .unwrap();
        assert_eq!(dst.len(), 14);
    }

    fn arb_frame() -> impl Strategy<Value = (u8, u16, u32, Vec<u8>)> {
        (
            0u8..8,
            any::<u16>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
    }

    proptest! {
        /// Any sequence of valid frames, split anywhere, decodes to the same frames.
        #[test]
        fn split_anywhere(frames in proptest::collection::vec(arb_frame(), 1..8), cuts in proptest::collection::vec(any::<usize>(), 0..10)) {
            let mut wire = Vec::new();
            for (f, cmd, seq, body) in &frames {
                wire.extend(enc(Header { flags: *f, command: *cmd, seq: *seq }, body));
            }
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            points.push(wire.len());
            points.sort();
            let mut c = FrameCodec::default();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut at = 0;
            for p in points {
                buf.extend_from_slice(&wire[at..p]);
                at = p;
                while let Some(fr) = c.decode(&mut buf).unwrap() {
                    out.push(fr);
                }
            }
            prop_assert_eq!(out.len(), frames.len());
            for (fr, (f, cmd, seq, body)) in out.iter().zip(&frames) {
                prop_assert_eq!(fr.header, Header { flags: *f, command: *cmd, seq: *seq });
                prop_assert_eq!(&fr.body[..], &body[..]);
            }
            prop_assert!(buf.is_empty());
        }

        /// Arbitrary bytes never panic, never yield a frame longer than the maximum, and
        /// once an error is returned it is one of the two frame errors.
        #[test]
        fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..2048), max in 8u32..512) {
            let mut c = FrameCodec::new(max);
            let mut buf = BytesMut::from(&data[..]);
            loop {
                match c.decode(&mut buf) {
                    Ok(Some(f)) => prop_assert!(f.body.len() + HEADER_LEN <= max as usize),
                    Ok(None) => { prop_assert!(buf.len() < LEN_PREFIX + max as usize); break }
                    Err(FrameError::Io(_)) => prop_assert!(false, "no i/o here"),
                    Err(_) => break,
                }
            }
        }
    }
}

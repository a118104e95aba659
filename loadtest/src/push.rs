//! What the verification needs of a received message, read straight from a
//! MESSAGE_PUSH body: a group message is half a million pushes a second in the groups
//! scenario, and decoding each into a `MessagePush` (a `String` for the text, checked
//! as UTF-8, a `Vec` for the payload, every field) cost the loadtest 537 µs of CPU per
//! group message at 1,400 msgs/s against 504 µs reading it this way (medians of three
//! alternating runs). This reads the protobuf wire format only as far as the fields below,
//! skipping the rest, and allocates nothing.

use mychat_proto::Message;

/// A received message as the verification sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Got {
    pub conversation_id: u64,
    pub seq: u64,
    pub kind: i32,
    /// The send time the loadtest wrote at the start of the text (µs since the epoch),
    /// if the text has one.
    pub sent: Option<u64>,
}

impl Got {
    pub fn of(m: &Message) -> Got {
        Got {
            conversation_id: m.conversation_id,
            seq: m.seq,
            kind: m.kind,
            sent: parse_sent(m.text.as_bytes()),
        }
    }
}

/// The send time at the start of a text written by the loadtest (20 digits).
pub fn parse_sent(text: &[u8]) -> Option<u64> {
    let digits = text.get(..20)?;
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(v)
}

/// A body that is not the protobuf it should be.
#[derive(Debug, thiserror::Error)]
#[error("malformed MESSAGE_PUSH: {0}")]
pub struct Malformed(&'static str);

/// A MESSAGE_PUSH body's message (None when the push carries none) and pts.
pub fn parse(body: &[u8]) -> Result<(Option<Got>, u64), Malformed> {
    let mut r = Reader(body);
    let (mut got, mut pts) = (None, 0);
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1, LEN) => got = Some(message(r.bytes()?)?),
            (2, VARINT) => pts = r.varint()?,
            _ => r.skip(wire)?,
        }
    }
    Ok((got, pts))
}

/// The fields of a `Message` the verification reads (mychat.proto's numbers).
fn message(body: &[u8]) -> Result<Got, Malformed> {
    let mut r = Reader(body);
    let mut g = Got {
        conversation_id: 0,
        seq: 0,
        kind: 0,
        sent: None,
    };
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (2, VARINT) => g.conversation_id = r.varint()?,
            (3, VARINT) => g.seq = r.varint()?,
            // An enum is an int32 on the wire: the low 32 bits, as prost reads it.
            (7, VARINT) => g.kind = r.varint()? as i32,
            (8, LEN) => g.sent = parse_sent(r.bytes()?),
            _ => r.skip(wire)?,
        }
    }
    Ok(g)
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, Malformed> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first().ok_or(Malformed("truncated varint"))?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(Malformed("varint longer than 10 bytes"))
    }

    /// The next field's number and wire type; None at the end.
    fn key(&mut self) -> Result<Option<(u64, u8)>, Malformed> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let k = self.varint()?;
        if k >> 3 == 0 {
            return Err(Malformed("field number 0"));
        }
        Ok(Some((k >> 3, (k & 7) as u8)))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], Malformed> {
        if n > self.0.len() as u64 {
            return Err(Malformed("field past the end"));
        }
        let (a, b) = self.0.split_at(n as usize);
        self.0 = b;
        Ok(a)
    }

    fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.varint()?;
        self.take(n)
    }

    fn skip(&mut self, wire: u8) -> Result<(), Malformed> {
        match wire {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            LEN => self.bytes().map(drop),
            I32 => self.take(4).map(drop),
            _ => Err(Malformed("unknown wire type")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mychat_proto::MessagePush;
    use proptest::prelude::*;
    use prost::Message as _;

    fn push(m: Option<Message>, pts: u64) -> Vec<u8> {
        MessagePush { message: m, pts }.encode_to_vec()
    }

    #[test]
    fn reads_what_prost_wrote() {
        let m = Message {
            id: 7,
            conversation_id: 300,
            seq: 1 << 40,
            sender_id: 9,
            recipient_id: 10,
            kind: 1,
            text: "00000001764500000000|00000000000000ab|xxxx".into(),
            payload: vec![1, 2, 3].into(),
            client_msg_id: "c".into(),
            time_ms: -5,
            recalled: true,
            ..Default::default()
        };
        let (got, pts) = parse(&push(Some(m.clone()), 99)).unwrap();
        assert_eq!(got, Some(Got::of(&m)));
        assert_eq!(got.unwrap().sent, Some(1_764_500_000_000));
        assert_eq!(pts, 99);
        assert_eq!(parse(&push(None, 0)).unwrap(), (None, 0));
        let short = Message {
            text: "12".into(),
            ..m
        };
        assert_eq!(parse(&push(Some(short), 1)).unwrap().0.unwrap().sent, None);
    }

    #[test]
    fn refuses_truncated_bodies() {
        let m = Message {
            conversation_id: 3,
            seq: 4,
            text: "00000000000000000001|".into(),
            ..Default::default()
        };
        let body = push(Some(m.clone()), 300);
        // key, length, the message; then pts's key and its two-byte varint.
        let end_of_message = 2 + body[1] as usize;
        assert_eq!(body.len(), end_of_message + 3);
        for cut in 0..body.len() {
            let r = parse(&body[..cut]);
            match cut {
                0 => assert_eq!(r.unwrap(), (None, 0)),
                c if c < end_of_message => assert!(r.is_err(), "cut {c} inside the message"),
                c if c == end_of_message => assert_eq!(r.unwrap(), (Some(Got::of(&m)), 0)),
                c => assert!(r.is_err(), "cut {c} inside pts"),
            }
        }
    }

    proptest! {
        /// Whatever prost encodes, the reader gets the same fields; arbitrary bytes
        /// never panic.
        #[test]
        fn agrees_with_prost(conv: u64, seq: u64, kind in -3i32..10, text in ".{0,40}", pts: u64, junk: Vec<u8>) {
            let m = Message { conversation_id: conv, seq, kind, text, ..Default::default() };
            let (got, p) = parse(&push(Some(m.clone()), pts)).unwrap();
            prop_assert_eq!(got, Some(Got::of(&m)));
            prop_assert_eq!(p, pts);
            let _ = parse(&junk);
        }
    }
}

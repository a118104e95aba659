//! MyChat's protobuf messages and command ids: the source of truth for every body.
//!
//! The `.proto` files under `proto/` are compiled at build time by protox (pure Rust)
//! and prost; everything lands in this crate's root (`mychat_proto::LoginRequest` …).
//! Framing is not here: see `mychat-codec`. What PROTOCOL.md fixes lives here too:
//! [`ErrorCode`], whose numbers are never renumbered, and [`Command`] ids.

#![allow(clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/mychat.rs"));
}
pub use generated::*;

/// The protocol version carried in every frame header.
pub const PROTOCOL_VERSION: u8 = 1;

/// PROTOCOL.md's error codes, the `code` of an [`Error`] body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    BadFrame = 1,
    FrameTooLarge = 2,
    BadRequest = 3,
    UnknownCommand = 4,
    Unauthenticated = 5,
    Forbidden = 6,
    NotFound = 7,
    Conflict = 8,
    RateLimited = 9,
    PayloadTooLarge = 10,
    InvalidCredentials = 11,
    TokenExpired = 12,
    Unavailable = 13,
    Internal = 14,
}

impl ErrorCode {
    /// Every code, in table order.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::BadRequest,
        ErrorCode::UnknownCommand,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::RateLimited,
        ErrorCode::PayloadTooLarge,
        ErrorCode::InvalidCredentials,
        ErrorCode::TokenExpired,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn from_u32(code: u32) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| *c as u32 == code)
    }

    /// The name PROTOCOL.md gives the code (`NOT_FOUND` …).
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "BAD_FRAME",
            ErrorCode::FrameTooLarge => "FRAME_TOO_LARGE",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::UnknownCommand => "UNKNOWN_COMMAND",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::InvalidCredentials => "INVALID_CREDENTIALS",
            ErrorCode::TokenExpired => "TOKEN_EXPIRED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Command {
    /// The command for a frame's u16 id, if the protocol defines it.
    pub fn from_id(id: u16) -> Option<Command> {
        Command::try_from(i32::from(id))
            .ok()
            .filter(|c| *c != Command::Unspecified)
    }

    /// The id carried in the frame header.
    pub fn id(self) -> u16 {
        self as i32 as u16
    }

    /// Commands the server only pushes; as requests they are unknown.
    pub fn is_push_only(self) -> bool {
        matches!(
            self,
            Command::Kick
                | Command::MessagePush
                | Command::ReceiptPush
                | Command::FriendRequestPush
                | Command::FriendAnswerPush
                | Command::FriendRemovedPush
                | Command::GroupJoinRequestPush
                | Command::GroupJoinAnswerPush
                | Command::GroupMembershipPush
                | Command::PresencePush
                | Command::TypingPush
        )
    }

    /// Whether a connection that has not logged in may use it (PROTOCOL.md).
    pub fn allowed_before_login(self) -> bool {
        matches!(
            self,
            Command::Heartbeat
                | Command::Hello
                | Command::Register
                | Command::Login
                | Command::Refresh
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn error_body_has_protocol_field_numbers() {
        let e = Error {
            code: 7,
            message: "x".into(),
        };
        // field 1 varint 7, field 2 length-delimited "x"
        assert_eq!(e.encode_to_vec(), vec![0x08, 7, 0x12, 1, b'x']);
    }

    #[test]
    fn heartbeat_is_1001_and_ids_fit_ranges() {
        assert_eq!(Command::Heartbeat.id(), 1001);
        assert_eq!(Command::from_id(1001), Some(Command::Heartbeat));
        assert_eq!(Command::from_id(0), None);
        assert_eq!(Command::from_id(65535), None);
        for c in [Command::Register, Command::Login, Command::GetUsers] {
            assert!((2000..3000).contains(&c.id()));
        }
        for c in [Command::SendMessage, Command::Sync, Command::Conversations] {
            assert!((3000..4000).contains(&c.id()));
        }
    }

    #[test]
    fn error_codes_round_trip() {
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32 + 1);
            assert_eq!(ErrorCode::from_u32(*c as u32), Some(*c));
        }
        assert_eq!(ErrorCode::from_u32(0), None);
        assert_eq!(ErrorCode::NotFound.name(), "NOT_FOUND");
    }
}

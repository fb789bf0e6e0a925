//! Frame layout. Every message on every QUIC stream is one frame:
//!
//! ```text
//!  off size field
//!    0    2 magic        b"AB"
//!    2    1 version      PROTOCOL_VERSION
//!    3    1 direction    1: client to broker, 2: broker to client
//!    4    4 control_len  u32 LE, 1..=MAX_CONTROL_BYTES
//!    8    4 body_len     u32 LE, 0..=MAX_BODY_BYTES
//!   12    4 reserved     must be zero
//!   16      control      rkyv-encoded ClientMessage / ServerMessage
//!    .      body         raw bytes: a batch (header + Arrow IPC) or nothing
//! ```
//!
//! Lengths are checked against the limits before anything is allocated, so a
//! hostile length prefix costs the receiver nothing.

use thiserror::Error;

use crate::limits::{MAX_BODY_BYTES, MAX_CONTROL_BYTES};

pub const FRAME_HEADER_BYTES: usize = 16;
pub const FRAME_MAGIC: [u8; 2] = *b"AB";
/// Protocol version. rkyv has no schema evolution: any change of a message
/// type bumps this, and peers refuse versions they do not speak.
pub const PROTOCOL_VERSION: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Direction {
    ClientToBroker = 1,
    BrokerToClient = 2,
    /// Node-to-node requests (Raft RPCs), on connections with the peer ALPN.
    PeerRequest = 3,
    PeerResponse = 4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub direction: Direction,
    pub control_len: u32,
    pub body_len: u32,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    #[error("bad frame magic {found:02x?}: the peer does not speak the arrowbus protocol")]
    Magic { found: [u8; 2] },
    #[error("protocol version {found} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version { found: u8 },
    #[error("frame direction {found} is invalid here (expected {expected})")]
    Direction { found: u8, expected: u8 },
    #[error("control section of {len} bytes is outside 1..={MAX_CONTROL_BYTES}")]
    ControlLen { len: u32 },
    #[error("frame body of {len} bytes exceeds the limit of {MAX_BODY_BYTES}")]
    BodyTooLarge { len: u32 },
    #[error("reserved frame header bytes are not zero")]
    Reserved,
    #[error("control section does not decode: {0}")]
    Control(String),
    #[error("frame ended early: expected {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut b = [0u8; FRAME_HEADER_BYTES];
        b[0..2].copy_from_slice(&FRAME_MAGIC);
        b[2] = PROTOCOL_VERSION;
        b[3] = self.direction as u8;
        b[4..8].copy_from_slice(&self.control_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        b
    }

    /// Decode a header and check it against the limits and the expected
    /// direction.
    pub fn decode(b: &[u8; FRAME_HEADER_BYTES], expected: Direction) -> Result<Self, FrameError> {
        if b[0..2] != FRAME_MAGIC {
            return Err(FrameError::Magic {
                found: [b[0], b[1]],
            });
        }
        if b[2] != PROTOCOL_VERSION {
            return Err(FrameError::Version { found: b[2] });
        }
        if b[3] != expected as u8 {
            return Err(FrameError::Direction {
                found: b[3],
                expected: expected as u8,
            });
        }
        let control_len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let body_len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if b[12..16] != [0, 0, 0, 0] {
            return Err(FrameError::Reserved);
        }
        if control_len == 0 || control_len > MAX_CONTROL_BYTES {
            return Err(FrameError::ControlLen { len: control_len });
        }
        if body_len > MAX_BODY_BYTES {
            return Err(FrameError::BodyTooLarge { len: body_len });
        }
        Ok(Self {
            direction: expected,
            control_len,
            body_len,
        })
    }
}

const _: () = assert!(FRAME_HEADER_BYTES == 16);
const _: () = assert!(crate::batch::BATCH_HEADER_BYTES == 80);

/// TLS ALPN protocol id; carries the protocol version so that incompatible
/// peers fail the handshake with a clear reason instead of a decode error.
pub const ALPN: &[u8] = b"arrowbus/2";

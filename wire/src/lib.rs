//! The arrowbus wire format: a pure codec. It owns frame and batch layouts,
//! the control messages, error codes and protocol limits. It must never do
//! I/O, spawn tasks or know about Arrow types: brokers and clients in any
//! language implement the same bytes from this crate's docs.
//!
//! See [`frame`] for the frame layout and [`batch`] for the batch header that
//! is identical on the wire and on disk.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod batch;
pub mod codec;
pub mod error;
pub mod frame;
pub mod limits;
pub mod msg;
pub mod peer;

pub use batch::{BatchError, BatchHeader, BatchKind, LogId, BATCH_HEADER_BYTES};
pub use codec::{decode_control, encode_frame, Frame};
pub use error::ErrorCode;
pub use frame::{Direction, FrameError, FrameHeader, FRAME_HEADER_BYTES, PROTOCOL_VERSION};
pub use msg::*;

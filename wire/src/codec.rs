//! Encoding and validated decoding of whole frames. The async readers in the
//! broker and client use [`FrameHeader::decode`] and [`decode_control`]
//! directly so that they can read the body straight into its final buffer;
//! [`decode_frame`] does the same on a byte slice (tests, fuzzing).

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::frame::{Direction, FrameError, FrameHeader, FRAME_HEADER_BYTES};
use crate::limits::{MAX_BODY_BYTES, MAX_CONTROL_BYTES};
use crate::msg::{ClientMessage, ServerMessage};
use crate::peer::{PeerRequest, PeerResponse};

/// A message type that travels in a frame's control section.
pub trait Message: Sized {
    /// The direction this message type travels in.
    const DIRECTION: Direction;
    fn to_control(&self) -> Result<AlignedVec, FrameError>;
    /// Validate (rkyv `bytecheck`) and deserialize. Never trusts the bytes.
    fn from_control(bytes: &[u8]) -> Result<Self, FrameError>;
}

macro_rules! impl_message {
    ($t:ty, $dir:expr) => {
        impl Message for $t {
            const DIRECTION: Direction = $dir;
            fn to_control(&self) -> Result<AlignedVec, FrameError> {
                rkyv::to_bytes::<rancor::Error>(self)
                    .map_err(|e| FrameError::Control(e.to_string()))
            }
            fn from_control(bytes: &[u8]) -> Result<Self, FrameError> {
                // rkyv's default format needs aligned input; received bytes are
                // not, so copy them (control sections are small).
                let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
                aligned.extend_from_slice(bytes);
                rkyv::from_bytes::<$t, rancor::Error>(&aligned)
                    .map_err(|e| FrameError::Control(e.to_string()))
            }
        }
    };
}

impl_message!(ClientMessage, Direction::ClientToBroker);
impl_message!(ServerMessage, Direction::BrokerToClient);
impl_message!(PeerRequest, Direction::PeerRequest);
impl_message!(PeerResponse, Direction::PeerResponse);

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame<M> {
    pub msg: M,
    pub body: Vec<u8>,
}

/// Frame header plus control section for `msg`, to be followed on the stream
/// by `body_len` bytes of body. Keeping the body out of this buffer lets
/// callers send a stored batch without copying it.
pub fn encode_frame<M: Message>(msg: &M, body_len: usize) -> Result<Vec<u8>, FrameError> {
    let control = msg.to_control()?;
    let control_len = u32::try_from(control.len())
        .ok()
        .filter(|l| *l <= MAX_CONTROL_BYTES)
        .ok_or(FrameError::ControlLen {
            len: u32::try_from(control.len()).unwrap_or(u32::MAX),
        })?;
    let body_len = u32::try_from(body_len)
        .ok()
        .filter(|l| *l <= MAX_BODY_BYTES)
        .ok_or(FrameError::BodyTooLarge {
            len: u32::try_from(body_len).unwrap_or(u32::MAX),
        })?;
    let header = FrameHeader {
        direction: M::DIRECTION,
        control_len,
        body_len,
    };
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + control.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&control);
    Ok(out)
}

/// Decode the control section of a frame whose header has been checked.
pub fn decode_control<M: Message>(bytes: &[u8]) -> Result<M, FrameError> {
    M::from_control(bytes)
}

/// Decode one whole frame from the front of `buf`; returns it and the number
/// of bytes it used.
pub fn decode_frame<M: Message>(buf: &[u8]) -> Result<(Frame<M>, usize), FrameError> {
    let head: &[u8; FRAME_HEADER_BYTES] = buf
        .get(..FRAME_HEADER_BYTES)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::Truncated {
            expected: FRAME_HEADER_BYTES,
            got: buf.len(),
        })?;
    let header = FrameHeader::decode(head, M::DIRECTION)?;
    let control_end = FRAME_HEADER_BYTES + header.control_len as usize;
    let end = control_end + header.body_len as usize;
    if buf.len() < end {
        return Err(FrameError::Truncated {
            expected: end,
            got: buf.len(),
        });
    }
    let msg = decode_control::<M>(&buf[FRAME_HEADER_BYTES..control_end])?;
    Ok((
        Frame {
            msg,
            body: buf[control_end..end].to_vec(),
        },
        end,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::*;
    use rand::{Rng, RngCore, SeedableRng};

    fn whole<M: Message>(msg: &M, body: &[u8]) -> Vec<u8> {
        let mut f = encode_frame(msg, body.len()).unwrap();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn client_and_server_messages_round_trip() {
        let msgs = vec![
            ClientMessage::CreateTopic(CreateTopic {
                name: "ticks".into(),
                partitions: 3,
                replication_factor: 1,
                retention_ms: Some(60_000),
                retention_bytes: None,
                schema_ipc: Some(vec![1, 2, 3]),
            }),
            ClientMessage::Publish(Publish {
                request_id: 77,
                topic: "ticks".into(),
                partition: 2,
            }),
            ClientMessage::Subscribe(Subscribe {
                topic: "ticks".into(),
                partition: 1,
                start: StartAt::Offset(1234),
                isolation: Isolation::ReadCommitted,
                credit: Credit {
                    bytes: 1 << 20,
                    batches: 16,
                },
            }),
            ClientMessage::ListTopics,
        ];
        for m in msgs {
            let bytes = whole(&m, b"body bytes");
            let (f, used) = decode_frame::<ClientMessage>(&bytes).unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(f.msg, m);
            assert_eq!(f.body, b"body bytes");
        }
        let s = ServerMessage::Error(ErrorReply::new(
            crate::ErrorCode::SchemaMismatch,
            "field price: topic has float64, batch has utf8",
        ));
        let bytes = whole(&s, &[]);
        assert_eq!(decode_frame::<ServerMessage>(&bytes).unwrap().0.msg, s);
    }

    #[test]
    fn wrong_direction_version_and_lengths_are_refused() {
        let bytes = whole(&ClientMessage::ListTopics, &[]);
        assert!(matches!(
            decode_frame::<ServerMessage>(&bytes),
            Err(FrameError::Direction { .. })
        ));
        let mut v = bytes.clone();
        v[2] = 99;
        assert_eq!(
            decode_frame::<ClientMessage>(&v).unwrap_err(),
            FrameError::Version { found: 99 }
        );
        let mut v = bytes.clone();
        v[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_frame::<ClientMessage>(&v).unwrap_err(),
            FrameError::ControlLen { len: u32::MAX }
        );
        let mut v = bytes.clone();
        v[8..12].copy_from_slice(&(MAX_BODY_BYTES + 1).to_le_bytes());
        assert_eq!(
            decode_frame::<ClientMessage>(&v).unwrap_err(),
            FrameError::BodyTooLarge {
                len: MAX_BODY_BYTES + 1
            }
        );
        assert!(matches!(
            decode_frame::<ClientMessage>(&bytes[..bytes.len() - 1]),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn random_and_mutated_bytes_never_panic_and_never_decode_garbage_lengths() {
        let seed: u64 = std::env::var("ARROWBUS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| rand::rng().random());
        println!("seed = {seed} (replay with ARROWBUS_TEST_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let good = whole(
            &ClientMessage::Subscribe(Subscribe {
                topic: "t".into(),
                partition: 0,
                start: StartAt::Earliest,
                isolation: Isolation::ReadUncommitted,
                credit: Credit::default(),
            }),
            b"xyz",
        );
        let mut decoded_ok = 0;
        for _ in 0..20_000 {
            let mut v = good.clone();
            let flips = rng.random_range(1..4);
            for _ in 0..flips {
                let i = rng.random_range(FRAME_HEADER_BYTES..v.len());
                v[i] = rng.random();
            }
            if let Ok((f, used)) = decode_frame::<ClientMessage>(&v) {
                decoded_ok += 1;
                assert!(used <= v.len());
                assert!(f.body.len() <= MAX_BODY_BYTES as usize);
            }
            let mut r = vec![0u8; rng.random_range(0..64)];
            rng.fill_bytes(&mut r);
            let _ = decode_frame::<ClientMessage>(&r);
        }
        // Mutations of the body alone still decode, so some must succeed; the
        // control section is validated, so not all of them can.
        assert!(
            decoded_ok > 0 && decoded_ok < 20_000,
            "decoded {decoded_ok}"
        );
    }
}

//! Frames from the network: arbitrary bytes → `decode_frame` for both
//! directions. Property: a decoded frame re-encodes (`encode_frame` + body) to
//! bytes that decode to an equal frame, using exactly the re-encoded length.
#![no_main]

use std::fmt::Debug;

use arrowbus_wire::codec::{decode_frame, encode_frame, Message};
use arrowbus_wire::limits::{MAX_BODY_BYTES, MAX_CONTROL_BYTES};
use arrowbus_wire::{ClientMessage, ServerMessage, FRAME_HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fn check<M: Message + PartialEq + Debug>(data: &[u8]) {
    let Ok((frame, used)) = decode_frame::<M>(data) else {
        return;
    };
    // The lengths the decoder used are the ones in the header, within limits.
    let control_len = u32::from_le_bytes(data[4..8].try_into().unwrap()) as usize;
    let body_len = u32::from_le_bytes(data[8..12].try_into().unwrap()) as usize;
    assert!(control_len >= 1 && control_len <= MAX_CONTROL_BYTES as usize);
    assert!(body_len <= MAX_BODY_BYTES as usize);
    assert_eq!(used, FRAME_HEADER_BYTES + control_len + body_len);
    assert!(used <= data.len());
    assert_eq!(frame.body, &data[used - body_len..used]);

    let mut enc = encode_frame(&frame.msg, frame.body.len())
        .unwrap_or_else(|e| panic!("decoded message {:?} does not re-encode: {e}", frame.msg));
    enc.extend_from_slice(&frame.body);
    let (again, used2) = decode_frame::<M>(&enc)
        .unwrap_or_else(|e| panic!("re-encoded {:?} does not decode: {e}", frame.msg));
    assert_eq!(used2, enc.len());
    assert_eq!(again, frame);
}

fuzz_target!(|data: &[u8]| {
    check::<ClientMessage>(data);
    check::<ServerMessage>(data);
});

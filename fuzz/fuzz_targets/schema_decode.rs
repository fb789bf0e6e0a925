//! Topic schemas from clients (CreateTopic / SetSchemaIfAbsent): arbitrary
//! bytes → `canonical_schema`. Properties: the canonical form is a fixed
//! point (decoding it again gives the same schema and the same bytes), and a
//! body decoder can be set up against it (garbage bodies are refused, never
//! a panic).
//!
//! `canonical_schema` does not catch panics of the Arrow reader (see README,
//! finding 1). ARROWBUS_FUZZ_TOLERATE_CAUGHT_PANICS=1 wraps it in
//! `catch_unwind` here, as the proposed fix does, so that a run can go on
//! looking for other bugs past that known one.
#![no_main]

use arrowbus_broker::ipc::{canonical_schema, decode_body};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn tolerate_panics() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| {
        let t = std::env::var_os("ARROWBUS_FUZZ_TOLERATE_CAUGHT_PANICS").is_some();
        if t {
            std::panic::set_hook(Box::new(|info| {
                if std::env::var_os("ARROWBUS_FUZZ_PRINT_PANICS").is_some() {
                    eprintln!("caught panic: {info}");
                }
            }));
        }
        t
    })
}

fuzz_target!(|data: &[u8]| {
    let res = if tolerate_panics() {
        match std::panic::catch_unwind(|| canonical_schema(7, data)) {
            Ok(r) => r,
            Err(_) => return,
        }
    } else {
        canonical_schema(7, data)
    };
    let Ok(ts) = res else {
        return;
    };
    let again = canonical_schema(7, &ts.ipc)
        .unwrap_or_else(|e| panic!("canonical form of {:?} does not decode: {e}", ts.schema));
    assert_eq!(again.schema, ts.schema);
    assert_eq!(again.ipc, ts.ipc, "canonical form is not a fixed point");
    assert_eq!(again.id, 7);
    // The stored schema must work as the prefix of a body decoder.
    for body in [&b""[..], &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0], &data[..data.len().min(64)]] {
        let _ = decode_body(&ts, Bytes::copy_from_slice(body));
    }
});

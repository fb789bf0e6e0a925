//! The broker's publish validation: arbitrary bytes → `ipc::decode_body`
//! against a topic schema, as `validate_and_enqueue` does after the header and
//! CRC checks (which a client passes trivially: it computes the CRCs itself).
//!
//! Input: `selector, rest`. `selector % (N + 1) < N` picks one of the N fixed
//! topic schemas of `arrowbus_fuzz::sample_batches` and `rest` is the body.
//! Otherwise the topic schema is attacker-chosen as well (a client fixes a
//! topic's schema with SetSchemaIfAbsent): `rest` = u16 LE schema length,
//! schema bytes (through `canonical_schema`), body.
//!
//! Properties: never panics; no single allocation larger than
//! `max(1 MiB, 16 × body length)` (override: ARROWBUS_FUZZ_MAX_ALLOC_BYTES);
//! on Ok the batch has exactly the topic schema's fields, passes Arrow's full
//! validation, a plain Arrow stream reader over `schema ++ body ++ EOS` (what
//! a subscriber in any language does with the stored bytes) reads exactly
//! this batch, and it re-encodes to a body that decodes to the same batch.
//!
//! Panics: libfuzzer-sys aborts on every panic, including those that
//! `decode_body` catches with `catch_unwind` (Arrow reader bugs). Set
//! ARROWBUS_FUZZ_TOLERATE_CAUGHT_PANICS=1 to accept caught panics and keep
//! fuzzing for the other properties; uncaught panics still abort.
#![no_main]

use std::sync::OnceLock;

use arrow_array::RecordBatch;
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;
use arrowbus_broker::ipc::{canonical_schema, decode_body, TopicSchema};
use arrowbus_fuzz::{topic_schemas, AllocTracker};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: AllocTracker = AllocTracker;

fn alloc_limit(body_len: usize) -> usize {
    static FIXED: OnceLock<Option<usize>> = OnceLock::new();
    let fixed = FIXED.get_or_init(|| {
        std::env::var("ARROWBUS_FUZZ_MAX_ALLOC_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    fixed.unwrap_or_else(|| (1 << 20usize).max(body_len.saturating_mul(16)))
}

fn encode_body(ts: &TopicSchema, batch: &RecordBatch) -> Option<Vec<u8>> {
    let mut w = StreamWriter::try_new(Vec::new(), &ts.schema).ok()?;
    let schema_len = w.get_ref().len();
    w.write(batch).ok()?;
    Some(w.get_ref()[schema_len..].to_vec())
}

/// The batches a strict Arrow stream reader reads from `schema ++ body ++ EOS`.
fn strict_read(ts: &TopicSchema, body: &[u8]) -> Result<Vec<RecordBatch>, String> {
    let mut all = ts.ipc.to_vec();
    all.extend_from_slice(body);
    all.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]);
    let r = StreamReader::try_new(std::io::Cursor::new(all), None).map_err(|e| e.to_string())?;
    r.collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())
}

fn setup() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if std::env::var_os("ARROWBUS_FUZZ_TOLERATE_CAUGHT_PANICS").is_some() {
            // Replaces libfuzzer-sys's abort-on-panic hook; a panic that
            // escapes the target still aborts (libfuzzer-sys checks).
            std::panic::set_hook(Box::new(|info| {
                if std::env::var_os("ARROWBUS_FUZZ_PRINT_PANICS").is_some() {
                    eprintln!("caught panic: {info}");
                }
            }));
        }
    });
}

fuzz_target!(|data: &[u8]| {
    setup();
    let schemas = topic_schemas();
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let pick = sel as usize % (schemas.len() + 1);
    let owned;
    let (ts, body) = if pick < schemas.len() {
        (&schemas[pick], rest)
    } else {
        let Some((len, rest)) = rest.split_first_chunk::<2>() else {
            return;
        };
        let (schema, body) = rest.split_at((u16::from_le_bytes(*len) as usize).min(rest.len()));
        let schema = if std::env::var_os("ARROWBUS_FUZZ_TOLERATE_CAUGHT_PANICS").is_some() {
            // canonical_schema does not catch Arrow reader panics (README, finding 1).
            match std::panic::catch_unwind(|| canonical_schema(99, schema)) {
                Ok(r) => r,
                Err(_) => return,
            }
        } else {
            canonical_schema(99, schema)
        };
        match schema {
            Ok(t) => {
                owned = t;
                (&owned, body)
            }
            Err(_) => return,
        }
    };

    AllocTracker::reset();
    let res = decode_body(ts, Bytes::copy_from_slice(body));
    let largest = AllocTracker::largest();
    assert!(
        largest <= alloc_limit(body.len()),
        "decode_body of a {}-byte body made a {largest}-byte allocation ({:?})",
        body.len(),
        res.as_ref().map(|b| b.num_rows()),
    );
    let Ok(batch) = res else {
        return;
    };
    assert_eq!(batch.schema().fields(), ts.schema.fields());
    for c in batch.columns() {
        assert_eq!(c.len(), batch.num_rows());
        if let Err(e) = c.to_data().validate_full() {
            panic!("decode_body accepted a column that fails full validation: {e}");
        }
    }
    match strict_read(ts, body) {
        Ok(v) if v.len() == 1 && v[0] == batch => {}
        Ok(v) if v.len() == 1 && encode_body(ts, &v[0]) == encode_body(ts, &batch) => {}
        // Finding 2 (README): decode_body pads a short body with the 4 bytes of
        // its continuation marker. ARROWBUS_FUZZ_KNOWN_SHORT_BODY=1 tolerates
        // exactly that case so that a run can go on past it.
        Err(_)
            if std::env::var_os("ARROWBUS_FUZZ_KNOWN_SHORT_BODY").is_some()
                && matches!(
                    strict_read(ts, &[body, &[0xFF; 4][..]].concat()),
                    Ok(v) if v.len() == 1 && v[0].num_rows() == batch.num_rows()
                ) => {}
        other => panic!(
            "decode_body accepted a body that a plain Arrow stream reader reads differently: {:?}",
            other.map(|v| v.iter().map(|b| b.num_rows()).collect::<Vec<_>>())
        ),
    }
    // What a client would send for the same batch must be accepted too, and
    // decode to the same thing (compared as bytes: NaN != NaN).
    if let Some(re) = encode_body(ts, &batch) {
        let again = decode_body(ts, Bytes::from(re.clone()))
            .unwrap_or_else(|e| panic!("re-encoded accepted batch is refused: {e}"));
        assert_eq!(encode_body(ts, &again).as_deref(), Some(&re[..]));
    }
});

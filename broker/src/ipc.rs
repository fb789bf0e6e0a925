//! Arrow IPC checks on the write path. Every published body is decoded and
//! fully validated against the topic schema before it is stored: a batch a
//! subscriber cannot read is never stored. Bodies are untrusted bytes; arrow
//! 60's reader is hardened against malformed input and we never skip its
//! validation.
//!
//! A topic's schema is kept in canonical form: the Arrow IPC schema message as
//! arrow-rs encodes it. Clients encode batch bodies with the same dictionary
//! id assignment, so a body decodes against the stored schema alone.

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::reader::StreamDecoder;
use arrow_ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions};
use arrow_schema::{ArrowError, Schema, SchemaRef};
use bytes::Bytes;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IpcError {
    /// The bytes are not valid Arrow IPC for this schema.
    #[error("{0}")]
    Invalid(String),
    /// Valid IPC of a type this build cannot decode.
    #[error("{0}")]
    Unsupported(String),
}

impl IpcError {
    fn from_arrow(context: &str, e: ArrowError) -> Self {
        match e {
            ArrowError::NotYetImplemented(m) => {
                IpcError::Unsupported(format!("{context}: unsupported Arrow type or feature: {m}"))
            }
            other => {
                let text = other.to_string();
                // The IPC reader reports types it does not know as parse or
                // invalid-argument errors; surface them with the type named.
                if text.contains("Unsupported") || text.contains("not supported") {
                    IpcError::Unsupported(format!("{context}: {text}"))
                } else {
                    IpcError::Invalid(format!("{context}: {text}"))
                }
            }
        }
    }
}

/// A topic's schema: decoded, and its canonical IPC schema message.
#[derive(Debug, Clone)]
pub struct TopicSchema {
    pub id: u32,
    pub schema: SchemaRef,
    pub ipc: Bytes,
}

/// Encode a schema as a single canonical IPC schema message.
pub fn encode_schema(schema: &Schema) -> Result<Vec<u8>, IpcError> {
    let opts = IpcWriteOptions::default();
    let mut tracker = DictionaryTracker::new(false);
    let encoded = IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
        schema,
        &mut tracker,
        &opts,
    );
    let mut out = Vec::new();
    arrow_ipc::writer::write_message(&mut out, encoded, &opts)
        .map_err(|e| IpcError::from_arrow("encoding schema", e))?;
    Ok(out)
}

/// Decode a schema sent by a client (a schema message, optionally followed by
/// the end-of-stream marker) and return it in canonical form.
pub fn canonical_schema(id: u32, bytes: &[u8]) -> Result<TopicSchema, IpcError> {
    if bytes.len() > arrowbus_wire::limits::MAX_SCHEMA_BYTES as usize {
        return Err(IpcError::Invalid(format!(
            "schema of {} bytes exceeds the limit of {} bytes",
            bytes.len(),
            arrowbus_wire::limits::MAX_SCHEMA_BYTES
        )));
    }
    let mut decoder = StreamDecoder::new();
    let mut buf = Buffer::from(bytes.to_vec());
    while !buf.is_empty() {
        if decoder
            .decode(&mut buf)
            .map_err(|e| IpcError::from_arrow("decoding schema", e))?
            .is_some()
        {
            return Err(IpcError::Invalid(
                "schema bytes must hold only a schema message, found a record batch".into(),
            ));
        }
    }
    if decoder.schema().is_none() {
        // The decoder completes a message with an empty body (the schema)
        // only when the next bytes arrive; a lone continuation marker makes
        // it finish without starting another message.
        decoder
            .decode(&mut Buffer::from(vec![0xFFu8; 4]))
            .map_err(|e| IpcError::from_arrow("decoding schema", e))?;
    }
    let schema = decoder.schema().ok_or_else(|| {
        IpcError::Invalid("no complete schema message in the schema bytes".into())
    })?;
    let ipc = encode_schema(&schema)?;
    Ok(TopicSchema {
        id,
        schema,
        ipc: Bytes::from(ipc),
    })
}

/// Decode and validate a batch body (dictionary messages, then exactly one
/// record batch message) against the topic schema. Returns the batch.
///
/// A panic inside the Arrow reader (a reader bug on hostile input) is caught
/// and reported as invalid IPC: one bad body must not take down the stream
/// or the node.
pub fn decode_body(schema: &TopicSchema, body: Bytes) -> Result<RecordBatch, IpcError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_body_inner(schema, body)
    })) {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(IpcError::Invalid(format!(
                "batch body: the Arrow reader rejected it ({what})"
            )))
        }
    }
}

fn decode_body_inner(schema: &TopicSchema, body: Bytes) -> Result<RecordBatch, IpcError> {
    let mut decoder = StreamDecoder::new();
    let mut head = Buffer::from(schema.ipc.clone());
    while !head.is_empty() {
        decoder
            .decode(&mut head)
            .map_err(|e| IpcError::from_arrow("topic schema", e))?;
    }
    let complete_empty_tail = ends_with_empty_body_message(&body);
    let mut buf = Buffer::from(body);
    let mut batch = None;
    while !buf.is_empty() {
        match decoder
            .decode(&mut buf)
            .map_err(|e| IpcError::from_arrow("batch body", e))?
        {
            Some(b) if batch.is_none() => batch = Some(b),
            Some(_) => {
                return Err(IpcError::Invalid(
                    "batch body holds more than one record batch; send one batch per publish"
                        .into(),
                ))
            }
            None => {}
        }
        if batch.is_some() && !buf.is_empty() {
            return Err(IpcError::Invalid(format!(
                "{} bytes follow the record batch in the body",
                buf.len()
            )));
        }
    }
    if batch.is_none() && complete_empty_tail {
        // A record batch message with an empty body (no buffers: zero rows,
        // or only Null columns) is completed by the decoder only when more
        // bytes arrive: a lone continuation marker completes it.
        batch = decoder
            .decode(&mut Buffer::from(vec![0xFFu8; 4]))
            .map_err(|e| IpcError::from_arrow("batch body", e))?;
    }
    let batch = batch.ok_or_else(|| {
        IpcError::Invalid("batch body ended before a complete record batch message".into())
    })?;
    if batch.schema().fields() != schema.schema.fields() {
        // Cannot happen with a body decoded against `schema`; kept as a guard
        // because a mismatch here would store a batch subscribers misread.
        return Err(IpcError::Invalid(
            "decoded batch schema differs from the topic schema".into(),
        ));
    }
    Ok(batch)
}

/// Whether `bytes` is a whole sequence of encapsulated IPC messages whose
/// last message declares an empty body. Only then may a decoder still be
/// holding that message incomplete (it completes a message on the next
/// bytes); for any other input, feeding it more bytes would make it read
/// them as message content. Lengths are untrusted: every step is bounded.
fn ends_with_empty_body_message(bytes: &[u8]) -> bool {
    let mut at = 0usize;
    let mut last_empty = false;
    while at < bytes.len() {
        let Some(word) = bytes.get(at..at + 4) else {
            return false;
        };
        if word == [0xFF; 4] {
            at += 4;
        }
        let Some(len) = bytes
            .get(at..at + 4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
        else {
            return false;
        };
        at += 4;
        let Some(meta) = bytes.get(at..at.saturating_add(len)) else {
            return false;
        };
        let Ok(message) = arrow_ipc::root_as_message(meta) else {
            return false;
        };
        let Ok(body_len) = usize::try_from(message.bodyLength()) else {
            return false;
        };
        at = at.saturating_add(len).saturating_add(body_len);
        last_empty = body_len == 0;
    }
    at == bytes.len() && last_empty
}

/// The schema a topic reports when it has none yet.
pub fn empty_schema() -> SchemaRef {
    Arc::new(Schema::empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Float64Array, Int64Array, StringArray};
    use arrow_schema::{DataType, Field};

    fn sample() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Int64, false),
            Field::new("sym", DataType::Utf8, true),
            Field::new("px", DataType::Float64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3])),
                Arc::new(StringArray::from(vec![Some("a"), None, Some("c")])),
                Arc::new(Float64Array::from(vec![1.5, 2.5, 3.5])),
            ],
        )
        .unwrap()
    }

    /// Body as the client encodes it: the stream bytes after the schema message.
    fn body_of(batch: &RecordBatch) -> Vec<u8> {
        let mut w = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &batch.schema()).unwrap();
        let schema_len = w.get_ref().len();
        w.write(batch).unwrap();
        w.get_ref()[schema_len..].to_vec()
    }

    #[test]
    fn body_round_trips_against_canonical_schema() {
        let b = sample();
        let ts = canonical_schema(1, &encode_schema(&b.schema()).unwrap()).unwrap();
        let got = decode_body(&ts, Bytes::from(body_of(&b))).unwrap();
        assert_eq!(got, b);
    }

    #[test]
    fn truncated_extended_and_garbage_bodies_are_refused() {
        let b = sample();
        let ts = canonical_schema(1, &encode_schema(&b.schema()).unwrap()).unwrap();
        let body = body_of(&b);
        for cut in [0, 1, 4, 8, body.len() / 2, body.len() - 1] {
            assert!(
                decode_body(&ts, Bytes::from(body[..cut].to_vec())).is_err(),
                "cut at {cut} accepted"
            );
        }
        let mut two = body.clone();
        two.extend_from_slice(&body);
        assert!(matches!(
            decode_body(&ts, Bytes::from(two)),
            Err(IpcError::Invalid(m)) if m.contains("more than one") || m.contains("follow")
        ));
        assert!(decode_body(&ts, Bytes::from(vec![0xFFu8; 64])).is_err());
    }

    #[test]
    fn bodies_without_buffers_decode() {
        // Zero rows, and a Null column: record batch messages with an empty body.
        let b = sample().slice(0, 0);
        let ts = canonical_schema(1, &encode_schema(&b.schema()).unwrap()).unwrap();
        assert_eq!(
            decode_body(&ts, Bytes::from(body_of(&b)))
                .unwrap()
                .num_rows(),
            0
        );
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Null, true)]));
        let nulls = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(arrow_array::NullArray::new(3))],
        )
        .unwrap();
        let ts = canonical_schema(1, &encode_schema(&schema).unwrap()).unwrap();
        assert_eq!(
            decode_body(&ts, Bytes::from(body_of(&nulls))).unwrap(),
            nulls
        );
    }

    #[test]
    fn schema_bytes_with_a_batch_are_refused() {
        let b = sample();
        let mut w = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &b.schema()).unwrap();
        w.write(&b).unwrap();
        w.finish().unwrap();
        let e = canonical_schema(1, &w.into_inner().unwrap()).unwrap_err();
        assert!(matches!(e, IpcError::Invalid(m) if m.contains("only a schema")));
    }
}

//! Arrow IPC checks on the write path. Every published body is decoded and
//! fully validated against the topic schema before it is stored: a batch a
//! subscriber cannot read is never stored. Bodies are untrusted bytes; arrow
//! 60's reader is hardened against malformed input and we never skip its
//! validation.
//!
//! A topic's schema is kept in canonical form: the Arrow IPC schema message as
//! arrow-rs encodes it. Clients encode batch bodies with the same dictionary
//! id assignment, so a body decodes against the stored schema alone.

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::reader::StreamDecoder;
use arrow_ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions};
use arrow_ipc::MessageHeader;
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
    let spans = walk_messages(bytes)?;
    if spans.len() != 1 || spans[0].kind != MessageHeader::Schema || spans[0].body_len != 0 {
        return Err(IpcError::Invalid(format!(
            "schema bytes must hold only a schema message; found {} messages ({:?})",
            spans.len(),
            spans.iter().map(|m| m.kind).collect::<Vec<_>>()
        )));
    }
    contain("schema", || canonical_schema_inner(id, bytes))
}

fn canonical_schema_inner(id: u32, bytes: &[u8]) -> Result<TopicSchema, IpcError> {
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
pub fn decode_body(schema: &TopicSchema, body: Bytes) -> Result<RecordBatch, IpcError> {
    let spans = walk_messages(&body)?;
    let batches = spans
        .iter()
        .filter(|m| m.kind == MessageHeader::RecordBatch)
        .count();
    let last = spans.last().copied();
    if batches != 1 || last.map(|m| m.kind) != Some(MessageHeader::RecordBatch) {
        return Err(IpcError::Invalid(format!(
            "a batch body is dictionary messages followed by exactly one record batch message; this one has {} messages, {batches} of them record batches{}",
            spans.len(),
            if last.is_some_and(|m| m.kind != MessageHeader::RecordBatch) { ", and does not end with one" } else { "" }
        )));
    }
    if let Some(m) = spans.iter().find(|m| {
        !matches!(
            m.kind,
            MessageHeader::RecordBatch | MessageHeader::DictionaryBatch
        )
    }) {
        return Err(IpcError::Invalid(format!(
            "a batch body may not hold a {:?} message",
            m.kind
        )));
    }
    let empty_tail = last.is_some_and(|m| m.body_len == 0);
    contain("batch body", || decode_body_inner(schema, body, empty_tail))
}

fn decode_body_inner(
    schema: &TopicSchema,
    body: Bytes,
    complete_empty_tail: bool,
) -> Result<RecordBatch, IpcError> {
    let mut decoder = StreamDecoder::new();
    let mut head = Buffer::from(schema.ipc.clone());
    while !head.is_empty() {
        decoder
            .decode(&mut head)
            .map_err(|e| IpcError::from_arrow("topic schema", e))?;
    }
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

/// Most IPC messages one body may hold (dictionaries plus the batch): a
/// bound on the walk below, far above any real schema's dictionary count.
const MAX_MESSAGES_PER_BODY: usize = 65_536;

/// One encapsulated IPC message as declared by its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MessageSpan {
    kind: MessageHeader,
    body_len: usize,
}

/// Walk the framing of a sequence of encapsulated IPC messages (optionally
/// ended by the end-of-stream marker) without decoding any of them. Every
/// declared length is checked against the bytes actually present, so the
/// Arrow decoder that runs afterwards never reserves memory for, or slices
/// at, a length the input does not back.
fn walk_messages(bytes: &[u8]) -> Result<Vec<MessageSpan>, IpcError> {
    let bad = |m: String| IpcError::Invalid(m);
    let mut at = 0usize;
    let mut out = Vec::new();
    while at < bytes.len() {
        if out.len() >= MAX_MESSAGES_PER_BODY {
            return Err(bad(format!(
                "more than {MAX_MESSAGES_PER_BODY} IPC messages"
            )));
        }
        if bytes.get(at..at + 4) == Some(&[0xFF; 4][..]) {
            at += 4;
        }
        let word = bytes
            .get(at..at + 4)
            .ok_or_else(|| bad(format!("IPC message length cut off at byte {at}")))?;
        let meta_len = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) as usize;
        at += 4;
        if meta_len == 0 {
            if at != bytes.len() {
                return Err(bad(format!(
                    "{} bytes follow the end-of-stream marker",
                    bytes.len() - at
                )));
            }
            break;
        }
        let meta = bytes.get(at..at.saturating_add(meta_len)).ok_or_else(|| {
            bad(format!(
                "IPC message declares {meta_len} bytes of metadata, {} remain",
                bytes.len() - at
            ))
        })?;
        let message = arrow_ipc::root_as_message(meta)
            .map_err(|e| bad(format!("IPC message metadata is invalid: {e}")))?;
        at += meta_len;
        let body_len = usize::try_from(message.bodyLength())
            .ok()
            .filter(|l| *l <= bytes.len() - at)
            .ok_or_else(|| {
                bad(format!(
                    "IPC message declares a body of {} bytes, {} remain",
                    message.bodyLength(),
                    bytes.len() - at
                ))
            })?;
        check_buffers(&message, body_len)?;
        at += body_len;
        out.push(MessageSpan {
            kind: message.header_type(),
            body_len,
        });
    }
    Ok(out)
}

/// Every buffer a batch or dictionary message declares must lie inside its
/// body. (The Arrow reader slices at these offsets unchecked; out-of-range
/// ones made it panic under fuzzing.)
fn check_buffers(message: &arrow_ipc::Message<'_>, body_len: usize) -> Result<(), IpcError> {
    let batch = match message.header_type() {
        MessageHeader::RecordBatch => message.header_as_record_batch(),
        MessageHeader::DictionaryBatch => {
            message.header_as_dictionary_batch().and_then(|d| d.data())
        }
        _ => None,
    };
    let Some(buffers) = batch.and_then(|b| b.buffers()) else {
        return Ok(());
    };
    for (i, b) in buffers.iter().enumerate() {
        let end = u64::try_from(b.offset())
            .ok()
            .zip(u64::try_from(b.length()).ok())
            .and_then(|(o, l)| o.checked_add(l));
        if end.is_none_or(|e| e > body_len as u64) {
            return Err(IpcError::Invalid(format!(
                "buffer {i} at offset {} with length {} lies outside the {body_len}-byte message body",
                b.offset(),
                b.length()
            )));
        }
    }
    Ok(())
}

/// Run an Arrow decode, turning a panic inside the Arrow reader (a reader bug
/// on hostile input) into an error: one bad input must not take down the
/// stream, a lock it runs under, or the node.
fn contain<T>(what: &str, f: impl FnOnce() -> Result<T, IpcError>) -> Result<T, IpcError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(IpcError::Invalid(format!(
                "{what}: the Arrow reader rejected it ({why})"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Float64Array, Int64Array, StringArray};
    use arrow_schema::{DataType, Field};
    use std::sync::Arc;

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
    fn bodies_cut_short_by_one_to_four_bytes_are_refused() {
        let b = sample();
        let ts = canonical_schema(1, &encode_schema(&b.schema()).unwrap()).unwrap();
        let body = body_of(&b);
        for cut in 1..=4 {
            assert!(
                decode_body(&ts, Bytes::from(body[..body.len() - cut].to_vec())).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn declared_lengths_beyond_the_input_are_refused_before_decoding() {
        let ts = canonical_schema(1, &encode_schema(&sample().schema()).unwrap()).unwrap();
        // 16 bytes that declare 16 bytes of metadata: the decoder would
        // reserve memory for a message that is not there.
        let e = decode_body(
            &ts,
            Bytes::from_static(b"\xff\xff\xff\xff\x10\x00\x00\x00abcdefgh"),
        )
        .unwrap_err();
        assert!(
            matches!(&e, IpcError::Invalid(m) if m.contains("declares 16 bytes")),
            "{e:?}"
        );
        let e =
            decode_body(&ts, Bytes::from_static(b"\xff\xff\xff\xff\xff\xff\xff\x7f")).unwrap_err();
        assert!(
            matches!(&e, IpcError::Invalid(m) if m.contains("declares")),
            "{e:?}"
        );
    }

    #[test]
    fn schema_bytes_with_a_hostile_batch_are_refused_not_panicking() {
        // A record batch whose first buffer offset points 2^40 bytes away:
        // the Arrow reader would slice out of bounds. (Found by fuzzing.)
        let b = sample();
        let mut w = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &b.schema()).unwrap();
        w.write(&b).unwrap();
        let mut bytes = w.into_inner().unwrap();
        let s = encode_schema(&b.schema()).unwrap().len();
        let pat = [0i64.to_le_bytes(), 24i64.to_le_bytes()].concat();
        let i = s + bytes[s..].windows(16).position(|w| w == pat).unwrap();
        bytes[i..i + 8].copy_from_slice(&(1i64 << 40).to_le_bytes());
        assert!(canonical_schema(1, &bytes).is_err());
        let ts = canonical_schema(1, &bytes[..s]).unwrap();
        assert!(decode_body(&ts, Bytes::from(bytes[s..bytes.len() - 8].to_vec())).is_err());
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

//! Topic schemas on the client: conforming batches to them, and the Arrow IPC
//! encoding of batch bodies.
//!
//! Equivalent physical types are cast to the topic's: the string family
//! (`Utf8`, `LargeUtf8`, `Utf8View`), the binary family (`Binary`,
//! `LargeBinary`, `BinaryView`), dictionary-encoded versus plain values, and
//! `List` versus `LargeList` of equivalent items (recursively, also inside
//! structs). pyarrow, polars and pandas produce different members of these
//! families for the same data. Anything else that differs is a
//! `SchemaMismatch` naming every differing field.

use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_ipc::reader::StreamDecoder;
use arrow_ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions, StreamWriter};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;

use crate::error::{Error, Result};

/// A topic schema as the broker holds it: id and canonical IPC bytes.
#[derive(Debug, Clone)]
pub struct TopicSchema {
    pub id: u32,
    pub schema: SchemaRef,
    pub ipc: Bytes,
}

impl TopicSchema {
    pub fn from_ipc(id: u32, ipc: Vec<u8>) -> Result<Self> {
        let schema = decode_schema(&ipc)?;
        Ok(Self {
            id,
            schema,
            ipc: Bytes::from(ipc),
        })
    }
}

/// Encode a schema as one IPC schema message (what the broker stores).
pub fn encode_schema(schema: &Schema) -> Result<Vec<u8>> {
    let opts = IpcWriteOptions::default();
    let mut tracker = DictionaryTracker::new(false);
    let encoded = IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
        schema,
        &mut tracker,
        &opts,
    );
    let mut out = Vec::new();
    arrow_ipc::writer::write_message(&mut out, encoded, &opts)?;
    Ok(out)
}

/// Decode an IPC schema message (or the schema at the head of an IPC stream).
pub fn decode_schema(ipc: &[u8]) -> Result<SchemaRef> {
    let mut decoder = StreamDecoder::new();
    let mut buf = arrow_buffer_from(ipc.to_vec());
    while !buf.is_empty() && decoder.schema().is_none() {
        decoder.decode(&mut buf)?;
    }
    flush_schema(&mut decoder)?;
    decoder
        .schema()
        .ok_or_else(|| Error::Protocol("schema bytes hold no complete schema message".into()))
}

/// The decoder completes a message with an empty body (the schema) only
/// when the next bytes arrive; a lone continuation marker makes it finish
/// without starting another message.
fn flush_schema(decoder: &mut StreamDecoder) -> Result<()> {
    if decoder.schema().is_none() {
        decoder.decode(&mut arrow_buffer::Buffer::from(vec![0xFFu8; 4]))?;
    }
    Ok(())
}

fn arrow_buffer_from(v: Vec<u8>) -> arrow_buffer::Buffer {
    arrow_buffer::Buffer::from(v)
}

/// Encode a batch body: its dictionary messages, then the record batch
/// message (the IPC stream minus the schema message and end marker).
pub fn encode_body(batch: &RecordBatch) -> Result<Bytes> {
    let mut w = StreamWriter::try_new(
        Vec::with_capacity(batch.get_array_memory_size() + 1024),
        &batch.schema(),
    )?;
    let schema_len = w.get_ref().len();
    w.write(batch)?;
    let all = std::mem::take(w.get_mut());
    Ok(Bytes::from(all).slice(schema_len..))
}

/// Decodes batch bodies against a topic schema. Every body carries its own
/// dictionaries, so each is decoded by a fresh Arrow decoder primed with the
/// schema: no state leaks from one batch to the next.
pub struct BodyDecoder {
    schema: Bytes,
}

impl BodyDecoder {
    pub fn new(schema: &TopicSchema) -> Result<Self> {
        Ok(Self {
            schema: schema.ipc.clone(),
        })
    }

    pub fn decode(&mut self, body: Bytes) -> Result<RecordBatch> {
        let mut decoder = StreamDecoder::new();
        let mut head = arrow_buffer::Buffer::from(self.schema.clone());
        while !head.is_empty() {
            decoder.decode(&mut head)?;
        }
        let complete_empty_tail = ends_with_empty_body_message(&body);
        let mut buf = arrow_buffer::Buffer::from(body);
        let mut out = None;
        while !buf.is_empty() {
            if let Some(b) = decoder.decode(&mut buf)? {
                out = Some(b);
            }
        }
        if out.is_none() && complete_empty_tail {
            // A record batch message with an empty body (zero rows, or only
            // Null columns) completes only when more bytes arrive.
            out = decoder.decode(&mut arrow_buffer::Buffer::from(vec![0xFFu8; 4]))?;
        }
        out.ok_or_else(|| Error::Protocol("batch body held no record batch".into()))
    }
}

// The broker has the same check (crates may not share code with Arrow in it).
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

/// Return `batch` with exactly the topic schema: same fields (by name, in the
/// topic's order), equivalent types cast, the topic's metadata.
pub fn conform(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch> {
    let src = batch.schema();
    if src.fields() == target.fields() {
        if src.metadata() == target.metadata() {
            return Ok(batch.clone());
        }
        return Ok(RecordBatch::try_new_with_options(
            target.clone(),
            batch.columns().to_vec(),
            &arrow_array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )?);
    }
    let mut problems = Vec::new();
    let same_names = src.fields().len() == target.fields().len()
        && src
            .fields()
            .iter()
            .zip(target.fields())
            .all(|(a, b)| a.name() == b.name());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
    for (i, tf) in target.fields().iter().enumerate() {
        let col = if same_names {
            Some(batch.column(i).clone())
        } else {
            src.index_of(tf.name())
                .ok()
                .map(|j| batch.column(j).clone())
        };
        let Some(col) = col else {
            problems.push(format!(
                "field '{}' ({}) is missing from the batch",
                tf.name(),
                tf.data_type()
            ));
            continue;
        };
        match conform_column(&col, tf) {
            Ok(c) => columns.push(c),
            Err(p) => problems.push(p),
        }
    }
    if !same_names {
        for f in src.fields() {
            if target.field_with_name(f.name()).is_err() {
                problems.push(format!(
                    "field '{}' ({}) is not in the topic schema",
                    f.name(),
                    f.data_type()
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(Error::SchemaMismatch(format!(
            "batch does not match the topic schema: {}",
            problems.join("; ")
        )));
    }
    Ok(RecordBatch::try_new_with_options(
        target.clone(),
        columns,
        &arrow_array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?)
}

fn conform_column(col: &ArrayRef, tf: &Field) -> std::result::Result<ArrayRef, String> {
    let from = col.data_type();
    let to = tf.data_type();
    let out = if from == to {
        col.clone()
    } else if equivalent(from, to) {
        arrow_cast::cast(col, to)
            .map_err(|e| format!("field '{}': cannot convert {from} to {to}: {e}", tf.name()))?
    } else {
        return Err(format!(
            "field '{}': topic has {to}, batch has {from}",
            tf.name()
        ));
    };
    if !tf.is_nullable() && out.null_count() > 0 {
        return Err(format!(
            "field '{}': the topic declares it non-nullable, the batch has {} nulls",
            tf.name(),
            out.null_count()
        ));
    }
    Ok(out)
}

/// Types that hold the same values in a different physical layout.
pub fn equivalent(a: &DataType, b: &DataType) -> bool {
    use DataType::*;
    fn family(t: &DataType) -> Option<u8> {
        match t {
            Utf8 | LargeUtf8 | Utf8View => Some(1),
            Binary | LargeBinary | BinaryView => Some(2),
            _ => None,
        }
    }
    if a == b {
        return true;
    }
    match (a, b) {
        (Dictionary(_, va), Dictionary(_, vb)) => equivalent(va, vb),
        (Dictionary(_, va), other) | (other, Dictionary(_, va)) => equivalent(va, other),
        (List(fa) | LargeList(fa), List(fb) | LargeList(fb)) => {
            equivalent(fa.data_type(), fb.data_type())
        }
        (Struct(fa), Struct(fb)) => {
            fa.len() == fb.len()
                && fa
                    .iter()
                    .zip(fb.iter())
                    .all(|(x, y)| x.name() == y.name() && equivalent(x.data_type(), y.data_type()))
        }
        _ => matches!((family(a), family(b)), (Some(x), Some(y)) if x == y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::types::Int32Type;
    use arrow_array::{
        DictionaryArray, Float64Array, Int64Array, LargeStringArray, StringArray, StringViewArray,
    };
    use std::sync::Arc;

    fn topic() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("sym", DataType::Utf8, true),
            Field::new("px", DataType::Float64, false),
        ]))
    }

    #[test]
    fn string_family_and_dictionaries_are_cast_to_the_topic_type() {
        let variants: Vec<ArrayRef> = vec![
            Arc::new(LargeStringArray::from(vec!["a", "b"])),
            Arc::new(StringViewArray::from(vec!["a", "b"])),
            Arc::new(
                vec!["a", "b"]
                    .into_iter()
                    .collect::<DictionaryArray<Int32Type>>(),
            ),
        ];
        for col in variants {
            let dt = col.data_type().clone();
            let schema = Arc::new(Schema::new(vec![
                Field::new("sym", dt.clone(), true),
                Field::new("px", DataType::Float64, false),
            ]));
            let b = RecordBatch::try_new(
                schema,
                vec![col, Arc::new(Float64Array::from(vec![1.0, 2.0]))],
            )
            .unwrap();
            let out = conform(&b, &topic()).unwrap();
            assert_eq!(out.schema(), topic(), "from {dt}");
            let s = out
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            assert_eq!(s.value(0), "a");
            assert_eq!(s.value(1), "b");
        }
    }

    #[test]
    fn columns_are_matched_by_name_and_reordered() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("px", DataType::Float64, false),
            Field::new("sym", DataType::Utf8, true),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Float64Array::from(vec![3.0])),
                Arc::new(StringArray::from(vec!["z"])),
            ],
        )
        .unwrap();
        let out = conform(&b, &topic()).unwrap();
        assert_eq!(
            out.column(1)
                .as_any()
                .downcast_ref::<Float64Array>()
                .unwrap()
                .value(0),
            3.0
        );
    }

    #[test]
    fn mismatches_name_every_differing_field() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("sym", DataType::Int64, true),
            Field::new("qty", DataType::Float64, false),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1])),
                Arc::new(Float64Array::from(vec![1.0])),
            ],
        )
        .unwrap();
        let Error::SchemaMismatch(m) = conform(&b, &topic()).unwrap_err() else {
            panic!("wrong error kind")
        };
        assert!(
            m.contains("field 'sym': topic has Utf8, batch has Int64"),
            "{m}"
        );
        assert!(m.contains("field 'px' (Float64) is missing"), "{m}");
        assert!(
            m.contains("field 'qty' (Float64) is not in the topic schema"),
            "{m}"
        );
    }

    #[test]
    fn nulls_in_a_non_nullable_topic_field_are_refused() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("sym", DataType::Utf8, true),
            Field::new("px", DataType::Float64, true),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["a"])),
                Arc::new(Float64Array::from(vec![None::<f64>])),
            ],
        )
        .unwrap();
        let Error::SchemaMismatch(m) = conform(&b, &topic()).unwrap_err() else {
            panic!("wrong error kind")
        };
        assert!(m.contains("'px'") && m.contains("non-nullable"), "{m}");
    }

    #[test]
    fn body_encoding_round_trips() {
        let b = RecordBatch::try_new(
            topic(),
            vec![
                Arc::new(StringArray::from(vec![Some("a"), None])),
                Arc::new(Float64Array::from(vec![1.0, 2.0])),
            ],
        )
        .unwrap();
        let ts = TopicSchema::from_ipc(1, encode_schema(&topic()).unwrap()).unwrap();
        let mut d = BodyDecoder::new(&ts).unwrap();
        assert_eq!(d.decode(encode_body(&b).unwrap()).unwrap(), b);
        assert_eq!(
            d.decode(encode_body(&b.slice(1, 1)).unwrap()).unwrap(),
            b.slice(1, 1)
        );
    }
}

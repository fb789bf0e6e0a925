//! Shared pieces of the arrowbus fuzz targets: the fixed set of topic schemas
//! the `publish_body` target decodes against (each with a real sample batch,
//! which the seed generator turns into valid bodies), the body encoding a
//! client uses, and an allocation tracker for the "never allocate absurdly"
//! property.
//!
//! Test-only code: `unwrap` is fine here, the inputs are our own constants.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arrow_array::builder::{Int64Builder, MapBuilder, StringBuilder};
use arrow_array::types::{Int16Type, Int32Type, IntervalMonthDayNano, UInt8Type};
use arrow_array::*;
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema, UnionFields};
use arrowbus_broker::ipc::{canonical_schema, encode_schema, TopicSchema};

/// One sample batch per topic schema. Index = schema selector in `publish_body`.
pub fn sample_batches() -> Vec<(&'static str, RecordBatch)> {
    vec![
        ("primitives", primitives()),
        ("strings", strings()),
        ("dictionary", dictionary()),
        ("nested", nested()),
        ("union", union()),
    ]
}

/// The topic schemas, canonicalized exactly as the broker stores them.
pub fn topic_schemas() -> &'static [TopicSchema] {
    static S: OnceLock<Vec<TopicSchema>> = OnceLock::new();
    S.get_or_init(|| {
        sample_batches()
            .iter()
            .enumerate()
            .map(|(i, (_, b))| {
                canonical_schema(i as u32 + 1, &encode_schema(&b.schema()).unwrap()).unwrap()
            })
            .collect()
    })
}

/// Body as a client encodes it: the IPC stream bytes after the schema
/// message (dictionaries, then the record batch), no end-of-stream marker.
/// Same as `body_of` in broker/src/ipc.rs tests.
pub fn body_of(batch: &RecordBatch) -> Vec<u8> {
    let mut w = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &batch.schema()).unwrap();
    let schema_len = w.get_ref().len();
    w.write(batch).unwrap();
    w.get_ref()[schema_len..].to_vec()
}

fn batch(fields: Vec<(Field, ArrayRef)>) -> RecordBatch {
    let (f, c): (Vec<Field>, Vec<ArrayRef>) = fields.into_iter().unzip();
    RecordBatch::try_new(Arc::new(Schema::new(f)), c).unwrap()
}

fn primitives() -> RecordBatch {
    let n = |name: &str, a: ArrayRef| (Field::new(name, a.data_type().clone(), true), a);
    batch(vec![
        n("b", Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)]))),
        n("i8", Arc::new(Int8Array::from(vec![1, -2, 3]))),
        n("i16", Arc::new(Int16Array::from(vec![Some(1), None, Some(-3)]))),
        n("i32", Arc::new(Int32Array::from(vec![i32::MIN, 0, i32::MAX]))),
        n("i64", Arc::new(Int64Array::from(vec![Some(i64::MIN), None, Some(7)]))),
        n("u8", Arc::new(UInt8Array::from(vec![0, 128, 255]))),
        n("u64", Arc::new(UInt64Array::from(vec![0, 1, u64::MAX]))),
        n("f32", Arc::new(Float32Array::from(vec![1.5, f32::NAN, -0.0]))),
        n("f64", Arc::new(Float64Array::from(vec![Some(2.5), None, Some(f64::INFINITY)]))),
        n("d32", Arc::new(Date32Array::from(vec![0, 19000, -1]))),
        n("d64", Arc::new(Date64Array::from(vec![0, 1_700_000_000_000, -1]))),
        n(
            "ts",
            Arc::new(
                TimestampMicrosecondArray::from(vec![Some(1), None, Some(3)]).with_timezone("UTC"),
            ),
        ),
        n("t64", Arc::new(Time64NanosecondArray::from(vec![0, 1, 86_399_999_999_999]))),
        n("dur", Arc::new(DurationMillisecondArray::from(vec![-5, 0, 5]))),
        n(
            "iv",
            Arc::new(IntervalMonthDayNanoArray::from(vec![
                IntervalMonthDayNano::new(1, 2, 3),
                IntervalMonthDayNano::new(0, 0, 0),
                IntervalMonthDayNano::new(-1, -2, -3),
            ])),
        ),
        n(
            "dec",
            Arc::new(
                Decimal128Array::from(vec![Some(12345), None, Some(-1)])
                    .with_precision_and_scale(38, 10)
                    .unwrap(),
            ),
        ),
        n(
            "fsb",
            Arc::new(
                FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                    vec![Some(b"abcd".to_vec()), None, Some(b"wxyz".to_vec())].into_iter(),
                    4,
                )
                .unwrap(),
            ),
        ),
        n("null", Arc::new(NullArray::new(3))),
    ])
}

fn strings() -> RecordBatch {
    let n = |name: &str, a: ArrayRef| (Field::new(name, a.data_type().clone(), true), a);
    batch(vec![
        n("s", Arc::new(StringArray::from(vec![Some("a"), None, Some("ünï")]))),
        n("ls", Arc::new(LargeStringArray::from(vec!["x", "", "zz"]))),
        n("bin", Arc::new(BinaryArray::from(vec![&b"\x00\xff"[..], b"", b"b"]))),
        n(
            "lbin",
            Arc::new(LargeBinaryArray::from(vec![Some(&b"q"[..]), None, Some(b"")])),
        ),
        n(
            "sv",
            Arc::new(StringViewArray::from(vec![
                Some("short"),
                None,
                Some("a string longer than twelve bytes"),
            ])),
        ),
        n(
            "bv",
            Arc::new(BinaryViewArray::from(vec![
                &b"b"[..],
                b"",
                b"another binary longer than twelve",
            ])),
        ),
    ])
}

fn dictionary() -> RecordBatch {
    let d1: DictionaryArray<Int32Type> = vec![Some("a"), None, Some("b"), Some("a")]
        .into_iter()
        .collect();
    let d2 = DictionaryArray::<UInt8Type>::try_new(
        UInt8Array::from(vec![1, 0, 1, 1]),
        Arc::new(Int64Array::from(vec![10, 20])),
    )
    .unwrap();
    // A dictionary nested in a list.
    let inner: DictionaryArray<Int16Type> =
        vec!["x", "y", "x", "z", "y"].into_iter().collect();
    let inner_field = Arc::new(Field::new("item", inner.data_type().clone(), true));
    let list = ListArray::new(
        inner_field,
        OffsetBuffer::new(ScalarBuffer::from(vec![0, 2, 2, 4, 5])),
        Arc::new(inner),
        None,
    );
    let n = |name: &str, a: ArrayRef| (Field::new(name, a.data_type().clone(), true), a);
    batch(vec![
        n("d_str", Arc::new(d1)),
        n("d_i64", Arc::new(d2)),
        n("l_dict", Arc::new(list)),
    ])
}

fn nested() -> RecordBatch {
    let list = ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
        Some(vec![Some(1), None, Some(3)]),
        None,
        Some(vec![]),
    ]);
    let lvals = StringArray::from(vec!["a", "b", "c", "d"]);
    let large_list = LargeListArray::new(
        Arc::new(Field::new("item", DataType::Utf8, true)),
        OffsetBuffer::new(ScalarBuffer::from(vec![0i64, 1, 1, 4])),
        Arc::new(lvals),
        None,
    );
    let fsl = FixedSizeListArray::new(
        Arc::new(Field::new("item", DataType::Float32, true)),
        2,
        Arc::new(Float32Array::from(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
        None,
    );
    // struct { a: i32, b: list<struct { c: utf8 }> }
    let inner_struct = StructArray::from(vec![(
        Arc::new(Field::new("c", DataType::Utf8, true)),
        Arc::new(StringArray::from(vec![Some("p"), None, Some("r")])) as ArrayRef,
    )]);
    let inner_list = ListArray::new(
        Arc::new(Field::new("item", inner_struct.data_type().clone(), true)),
        OffsetBuffer::new(ScalarBuffer::from(vec![0, 1, 3, 3])),
        Arc::new(inner_struct),
        None,
    );
    let st = StructArray::from(vec![
        (
            Arc::new(Field::new("a", DataType::Int32, false)),
            Arc::new(Int32Array::from(vec![1, 2, 3])) as ArrayRef,
        ),
        (
            Arc::new(Field::new("b", inner_list.data_type().clone(), true)),
            Arc::new(inner_list) as ArrayRef,
        ),
    ]);
    let mut mb = MapBuilder::new(None, StringBuilder::new(), Int64Builder::new());
    mb.keys().append_value("k1");
    mb.values().append_value(1);
    mb.append(true).unwrap();
    mb.append(false).unwrap();
    mb.keys().append_value("k2");
    mb.values().append_null();
    mb.keys().append_value("k3");
    mb.values().append_value(3);
    mb.append(true).unwrap();
    let map = mb.finish();
    let ree = RunArray::<Int32Type>::try_new(
        &Int32Array::from(vec![2, 3]),
        &StringArray::from(vec!["run", "end"]),
    )
    .unwrap();
    let lv = ListViewArray::try_new(
        Arc::new(Field::new("item", DataType::Int64, true)),
        ScalarBuffer::from(vec![0, 1, 0]),
        ScalarBuffer::from(vec![2, 1, 0]),
        Arc::new(Int64Array::from(vec![7, 8])),
        None,
    )
    .unwrap();
    let n = |name: &str, a: ArrayRef| (Field::new(name, a.data_type().clone(), true), a);
    batch(vec![
        n("list", Arc::new(list)),
        n("llist", Arc::new(large_list)),
        n("fsl", Arc::new(fsl)),
        n("st", Arc::new(st)),
        n("map", Arc::new(map)),
        n("ree", Arc::new(ree)),
        n("lv", Arc::new(lv)),
    ])
}

fn union() -> RecordBatch {
    let sparse_fields = UnionFields::try_new(
        vec![0, 5],
        vec![
            Field::new("i", DataType::Int32, true),
            Field::new("s", DataType::Utf8, true),
        ],
    )
    .unwrap();
    let sparse = UnionArray::try_new(
        sparse_fields,
        ScalarBuffer::from(vec![0i8, 5, 0]),
        None,
        vec![
            Arc::new(Int32Array::from(vec![Some(1), None, Some(3)])),
            Arc::new(StringArray::from(vec!["x", "y", "z"])),
        ],
    )
    .unwrap();
    let dense_fields = UnionFields::try_new(
        vec![1, 2],
        vec![
            Field::new("n", DataType::Int64, true),
            Field::new(
                "l",
                DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
                true,
            ),
        ],
    )
    .unwrap();
    let dense = UnionArray::try_new(
        dense_fields,
        ScalarBuffer::from(vec![1i8, 2, 1]),
        Some(ScalarBuffer::from(vec![0i32, 0, 1])),
        vec![
            Arc::new(Int64Array::from(vec![10, 11])),
            Arc::new(ListArray::from_iter_primitive::<arrow_array::types::Float64Type, _, _>(
                vec![Some(vec![Some(0.5)])],
            )),
        ],
    )
    .unwrap();
    let n = |name: &str, a: ArrayRef| (Field::new(name, a.data_type().clone(), false), a);
    batch(vec![n("sparse", Arc::new(sparse)), n("dense", Arc::new(dense))])
}

/// Global allocator wrapper that remembers the largest single allocation
/// request since the last [`AllocTracker::reset`]. A fuzz target installs it
/// with `#[global_allocator]`.
pub struct AllocTracker;

static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

impl AllocTracker {
    pub fn reset() {
        LARGEST_ALLOC.store(0, Ordering::Relaxed);
    }
    pub fn largest() -> usize {
        LARGEST_ALLOC.load(Ordering::Relaxed)
    }
    fn note(size: usize) {
        LARGEST_ALLOC.fetch_max(size, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for AllocTracker {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

//! Arrow data across the Python boundary, without copying, through the
//! Arrow PyCapsule interface: `__arrow_c_stream__` (C Stream interface) and
//! `__arrow_c_array__` / `__arrow_c_schema__` (C Data interface).
//!
//! Imported batches point at the buffers the Python producer (pyarrow,
//! polars, pandas, DuckDB, nanoarrow) owns; the producer's release callback
//! runs when the last Rust reference is dropped. Exported batches hand the
//! Rust buffers (the received network bytes) to Python the same way.
//!
//! Capsules are consumed by moving the C struct out and leaving a released
//! one behind, as the interface requires, so the capsule's own destructor
//! frees nothing twice.

use std::ffi::CStr;
use std::sync::Arc;

use arrow_array::ffi::{from_ffi, FFI_ArrowArray, FFI_ArrowSchema};
use arrow_array::ffi_stream::{FFI_ArrowArrayStream, RecordBatchStreamReader};
use arrow_array::{Array, RecordBatch, RecordBatchOptions, RecordBatchReader, StructArray};
use arrow_schema::{DataType, Schema, SchemaRef};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyCapsuleMethods, PyTuple};

use crate::errors::BusError;

const STREAM_CAPSULE: &CStr = c"arrow_array_stream";
const ARRAY_CAPSULE: &CStr = c"arrow_array";
const SCHEMA_CAPSULE: &CStr = c"arrow_schema";

/// Schema metadata key pandas adds (index and dtype bookkeeping of one
/// DataFrame). It describes a frame, not the topic's data, and would
/// otherwise become part of the topic schema on a first publish.
const PANDAS_METADATA_KEY: &str = "pandas";

/// Batches imported from a Python object, read lazily: a stream is pulled
/// batch by batch, so publishing a large reader holds one batch at a time.
pub enum Source {
    Stream(RecordBatchStreamReader, SchemaRef),
    Batches(std::vec::IntoIter<RecordBatch>, SchemaRef),
}

impl Source {
    /// The schema of every batch this source yields.
    pub fn schema(&self) -> SchemaRef {
        match self {
            Source::Stream(_, s) | Source::Batches(_, s) => s.clone(),
        }
    }

    /// The next batch. For a stream this calls the producer's `get_next`,
    /// which may take the GIL itself (pyarrow readers over Python
    /// iterators do): never call it while holding the GIL and waiting for
    /// something that needs it.
    pub fn next_batch(&mut self) -> Result<Option<RecordBatch>, BusError> {
        let (next, schema) = match self {
            Source::Stream(r, s) => (r.next(), s),
            Source::Batches(b, s) => (b.next().map(Ok), s),
        };
        match next {
            None => Ok(None),
            Some(Err(e)) => Err(BusError::new(
                "arrow",
                format!("reading the input's next batch: {e}"),
            )),
            Some(Ok(b)) => Ok(Some(with_schema(b, schema)?)),
        }
    }
}

/// The batch with `schema` (same fields, pandas metadata dropped): a new
/// header around the same column arrays.
fn with_schema(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, BusError> {
    if Arc::ptr_eq(&batch.schema(), schema) || batch.schema().as_ref() == schema.as_ref() {
        return Ok(batch);
    }
    let rows = batch.num_rows();
    RecordBatch::try_new_with_options(
        schema.clone(),
        batch.columns().to_vec(),
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )
    .map_err(BusError::arrow)
}

fn strip_frame_metadata(schema: SchemaRef) -> SchemaRef {
    if !schema.metadata().contains_key(PANDAS_METADATA_KEY) {
        return schema;
    }
    let mut meta = schema.metadata().clone();
    meta.remove(PANDAS_METADATA_KEY);
    Arc::new(Schema::new_with_metadata(schema.fields().clone(), meta))
}

fn is_pandas_frame(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let ty = obj.get_type();
    let module: String = ty.getattr("__module__")?.extract()?;
    Ok(module.starts_with("pandas") && ty.name()?.to_cow()? == "DataFrame")
}

/// Import anything that speaks the Arrow PyCapsule interface.
pub fn import(obj: &Bound<'_, PyAny>) -> PyResult<Source> {
    let py = obj.py();
    // One batch (pyarrow RecordBatch, nanoarrow array): the C Data
    // interface is cheaper than a one-batch stream (no stream callbacks).
    if obj.hasattr("__arrow_c_array__")? {
        let pair = obj.call_method0("__arrow_c_array__")?;
        let pair = pair.cast::<PyTuple>().map_err(|_| {
            PyTypeError::new_err("__arrow_c_array__ must return a (schema, array) tuple")
        })?;
        if pair.len() != 2 {
            return Err(PyTypeError::new_err(
                "__arrow_c_array__ must return a (schema, array) tuple",
            ));
        }
        let batch = import_array(&pair.get_item(0)?, &pair.get_item(1)?)?;
        let schema = strip_frame_metadata(batch.schema());
        return Ok(Source::Batches(vec![batch].into_iter(), schema));
    }
    if obj.hasattr("__arrow_c_stream__")? {
        let capsule = obj.call_method0("__arrow_c_stream__")?;
        return import_stream(&capsule);
    }
    // pandas before 2.2 has no capsule methods: pyarrow converts the frame
    // (index dropped, as pandas' own `__arrow_c_stream__` does).
    if is_pandas_frame(obj)? {
        let table = py
            .import("pyarrow")?
            .getattr("Table")?
            .call_method1("from_pandas", (obj, py.None(), false))?;
        return import(&table);
    }
    Err(PyTypeError::new_err(format!(
        "expected Arrow data: an object with __arrow_c_stream__ or __arrow_c_array__ \
         (pyarrow Table / RecordBatch / RecordBatchReader, polars or pandas DataFrame, \
         DuckDB relation, nanoarrow array), got {}",
        obj.get_type().name()?
    )))
}

fn capsule<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    name: &CStr,
) -> PyResult<&'a Bound<'py, PyCapsule>> {
    let cap = obj.cast::<PyCapsule>().map_err(|_| {
        PyTypeError::new_err(format!(
            "expected a PyCapsule named {name:?}, got {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    Ok(cap)
}

fn import_stream(obj: &Bound<'_, PyAny>) -> PyResult<Source> {
    let cap = capsule(obj, STREAM_CAPSULE)?;
    let ptr = cap.pointer_checked(Some(STREAM_CAPSULE))?;
    // SAFETY: the capsule is named "arrow_array_stream", so by the PyCapsule
    // interface it points at a valid FFI_ArrowArrayStream. `from_raw` moves
    // the struct out and leaves a released one, which the capsule's
    // destructor then leaves alone.
    let reader = unsafe { RecordBatchStreamReader::from_raw(ptr.as_ptr().cast()) }
        .map_err(|e| PyValueError::new_err(format!("importing an Arrow stream: {e}")))?;
    let schema = strip_frame_metadata(reader.schema());
    Ok(Source::Stream(reader, schema))
}

fn import_array(schema: &Bound<'_, PyAny>, array: &Bound<'_, PyAny>) -> PyResult<RecordBatch> {
    let schema_cap = capsule(schema, SCHEMA_CAPSULE)?;
    let array_cap = capsule(array, ARRAY_CAPSULE)?;
    let schema_ptr = schema_cap.pointer_checked(Some(SCHEMA_CAPSULE))?;
    let array_ptr = array_cap.pointer_checked(Some(ARRAY_CAPSULE))?;
    // SAFETY: named capsules of the PyCapsule interface point at a valid
    // FFI_ArrowSchema / FFI_ArrowArray. The schema is only borrowed (its
    // capsule keeps owning it); the array is moved out, leaving a released
    // struct behind.
    let ffi_schema: &FFI_ArrowSchema = unsafe { &*schema_ptr.as_ptr().cast::<FFI_ArrowSchema>() };
    let ffi_array = unsafe { FFI_ArrowArray::from_raw(array_ptr.as_ptr().cast()) };
    let data = unsafe { from_ffi(ffi_array, ffi_schema) }
        .map_err(|e| PyValueError::new_err(format!("importing an Arrow array: {e}")))?;
    let DataType::Struct(_) = data.data_type() else {
        return Err(PyTypeError::new_err(format!(
            "a record batch is needed (a struct array); got an array of {}",
            data.data_type()
        )));
    };
    let schema = Schema::try_from(ffi_schema)
        .map_err(|e| PyValueError::new_err(format!("importing an Arrow schema: {e}")))?;
    let rows = data.len();
    let columns = StructArray::from(data).into_parts().1;
    RecordBatch::try_new_with_options(
        Arc::new(schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )
    .map_err(|e| PyValueError::new_err(format!("importing an Arrow record batch: {e}")))
}

/// Import a schema from anything with `__arrow_c_schema__` (pyarrow Schema,
/// polars Schema, nanoarrow), or from Arrow data (its schema).
pub fn import_schema(obj: &Bound<'_, PyAny>) -> PyResult<Schema> {
    if obj.hasattr("__arrow_c_schema__")? {
        let cap = obj.call_method0("__arrow_c_schema__")?;
        let cap = capsule(&cap, SCHEMA_CAPSULE)?;
        let ptr = cap.pointer_checked(Some(SCHEMA_CAPSULE))?;
        // SAFETY: a capsule named "arrow_schema" points at a valid
        // FFI_ArrowSchema; it is only borrowed here.
        let ffi: &FFI_ArrowSchema = unsafe { &*ptr.as_ptr().cast::<FFI_ArrowSchema>() };
        let schema = Schema::try_from(ffi)
            .map_err(|e| PyValueError::new_err(format!("importing an Arrow schema: {e}")))?;
        return Ok(strip_frame_metadata(Arc::new(schema)).as_ref().clone());
    }
    Ok(import(obj)?.schema().as_ref().clone())
}

/// The C Data interface pair `(schema capsule, array capsule)` of a batch.
/// No data is copied: the exported array holds references to the batch's
/// buffers until Python releases it.
pub fn export_batch<'py>(
    py: Python<'py>,
    batch: &RecordBatch,
) -> PyResult<(Bound<'py, PyCapsule>, Bound<'py, PyCapsule>)> {
    let schema = export_schema(py, batch.schema().as_ref())?;
    let data = StructArray::from(batch.clone()).into_data();
    let array = FFI_ArrowArray::new(&data);
    let array = PyCapsule::new_with_value(py, array, ARRAY_CAPSULE)?;
    Ok((schema, array))
}

pub fn export_schema<'py>(py: Python<'py>, schema: &Schema) -> PyResult<Bound<'py, PyCapsule>> {
    let ffi = FFI_ArrowSchema::try_from(schema)
        .map_err(|e| PyValueError::new_err(format!("exporting an Arrow schema: {e}")))?;
    PyCapsule::new_with_value(py, ffi, SCHEMA_CAPSULE)
}

/// A C Stream interface capsule over a Rust reader.
pub fn export_stream<'py>(
    py: Python<'py>,
    reader: Box<dyn RecordBatchReader + Send>,
) -> PyResult<Bound<'py, PyCapsule>> {
    let stream = FFI_ArrowArrayStream::new(reader);
    PyCapsule::new_with_value(py, stream, STREAM_CAPSULE)
}

/// A schema as a Python object: implements `__arrow_c_schema__`;
/// `to_pyarrow()` gives a `pyarrow.Schema`.
#[pyclass(module = "arrowbus._arrowbus", frozen)]
pub struct ArrowSchema {
    pub schema: SchemaRef,
}

#[pymethods]
impl ArrowSchema {
    fn __arrow_c_schema__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyCapsule>> {
        export_schema(py, &self.schema)
    }

    pub fn to_pyarrow<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py().import("pyarrow")?.call_method1("schema", (slf,))
    }

    fn __repr__(&self) -> String {
        format!("ArrowSchema({})", self.schema)
    }
}

/// Test support: import `data` exactly as `Producer.publish` does and return,
/// per batch and column, the addresses of the buffers Rust reads (validity
/// buffer first when present, then the data buffers). Equal addresses on the
/// Python side prove the import copied nothing.
#[pyfunction]
pub fn imported_buffer_addresses(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
) -> PyResult<Vec<Vec<Vec<usize>>>> {
    let mut source = import(data)?;
    let batches = py
        .detach(move || {
            let mut out = Vec::new();
            while let Some(b) = source.next_batch()? {
                out.push(b);
            }
            Ok::<_, BusError>(out)
        })
        .map_err(PyErr::from)?;
    Ok(batches
        .iter()
        .map(|b| {
            b.columns()
                .iter()
                .map(|c| {
                    let data = c.to_data();
                    data.nulls()
                        .map(|n| n.buffer().as_ptr() as usize)
                        .into_iter()
                        .chain(data.buffers().iter().map(|buf| buf.as_ptr() as usize))
                        .collect()
                })
                .collect()
        })
        .collect())
}

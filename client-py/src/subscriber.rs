//! `Subscription` (an iterator, async iterator, or Arrow stream of
//! delivered batches) and `Batch` (one delivered batch, exported to Python
//! without copying).
//!
//! Nothing is read ahead here: the Rust subscriber returns credit to the
//! broker only when a batch is taken, so a slow Python consumer stops the
//! broker instead of filling memory.

use std::sync::Arc;

use arrow_array::{Array, RecordBatch, RecordBatchReader};
use arrow_schema::{ArrowError, SchemaRef};
use futures::StreamExt;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyTuple};
use tokio::sync::watch;

use crate::arrow_io::{export_batch, export_schema, export_stream};
use crate::errors::BusError;
use crate::rt::{runtime, to_asyncio, wait};

type Shared = Arc<tokio::sync::Mutex<Option<arrowbus::Subscriber>>>;

async fn next(sub: Shared, mut closed: watch::Receiver<bool>) -> Result<Option<Batch>, BusError> {
    let mut guard = sub.lock().await;
    let Some(s) = guard.as_mut() else {
        return Ok(None);
    };
    let got = tokio::select! {
        // `close()` from another thread or task ends a waiting `next`.
        _ = closed.wait_for(|c| *c) => None,
        got = s.next() => got,
    };
    match got {
        Some(Ok(d)) => Ok(Some(Batch::from(d))),
        Some(Err(e)) => Err(e.into()),
        None => {
            // Ended (until_end reached, or closed): free the streams now.
            *guard = None;
            Ok(None)
        }
    }
}

/// A subscription to a topic.
#[pyclass(module = "arrowbus._arrowbus", frozen)]
pub struct Subscription {
    topic: String,
    schema: Option<SchemaRef>,
    inner: Shared,
    closed: watch::Sender<bool>,
}

impl Subscription {
    pub fn new(topic: String, sub: arrowbus::Subscriber) -> Self {
        Self {
            topic,
            schema: sub.schema(),
            inner: Arc::new(tokio::sync::Mutex::new(Some(sub))),
            closed: watch::channel(false).0,
        }
    }

    fn take(&self, py: Python<'_>) -> PyResult<Option<arrowbus::Subscriber>> {
        let inner = self.inner.clone();
        wait(py, async move { Ok(inner.lock().await.take()) })
    }
}

#[pymethods]
impl Subscription {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Batch>> {
        wait(py, next(self.inner.clone(), self.closed.subscribe()))
    }

    /// The next batch as an asyncio future; resolves to None at the end.
    fn next_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_asyncio(py, next(self.inner.clone(), self.closed.subscribe()))
    }

    #[getter]
    fn topic(&self) -> &str {
        &self.topic
    }

    /// The topic schema when the subscription started (None: no schema yet).
    #[getter]
    fn schema<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(s) = &self.schema else {
            return Ok(None);
        };
        let holder = Bound::new(py, crate::arrow_io::ArrowSchema { schema: s.clone() })?;
        Ok(Some(crate::arrow_io::ArrowSchema::to_pyarrow(&holder)?))
    }

    /// Stop the subscription: its streams are closed, a waiting `next`
    /// ends the iteration. Never blocks.
    fn close(&self) {
        self.closed.send_replace(true);
        if let Ok(mut guard) = self.inner.try_lock() {
            guard.take();
        }
    }

    /// The subscription as an Arrow C stream (PyCapsule interface). This
    /// consumes the subscription: batches then come only from the stream.
    /// Partition and offsets are not part of an Arrow stream; iterate the
    /// subscription itself to get them.
    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        // The topic schema is the only one offered; a consumer asking for
        // another casts on its side (the interface allows ignoring it).
        let _ = requested_schema;
        let schema = self.schema.clone().ok_or_else(|| {
            BusError::new(
                "protocol",
                format!(
                    "topic '{}' has no schema yet (nothing published): there is no Arrow stream to read",
                    self.topic
                ),
            )
        })?;
        let sub = self.take(py)?.ok_or_else(|| {
            PyValueError::new_err("the subscription is closed or already consumed")
        })?;
        export_stream(py, Box::new(StreamReader { schema, sub }))
    }

    /// A `pyarrow.RecordBatchReader` over this subscription (consumes it).
    fn to_reader<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py()
            .import("pyarrow")?
            .getattr("RecordBatchReader")?
            .call_method1("from_stream", (slf,))
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        let _ = py;
        self.close();
        Ok(false)
    }
}

/// The subscription behind an exported Arrow C stream. `get_next` blocks on
/// the runtime; it holds no GIL (pyarrow calls it with the GIL released).
struct StreamReader {
    schema: SchemaRef,
    sub: arrowbus::Subscriber,
}

impl Iterator for StreamReader {
    type Item = Result<RecordBatch, ArrowError>;
    fn next(&mut self) -> Option<Self::Item> {
        let rt = match runtime() {
            Ok(rt) => rt,
            Err(e) => return Some(Err(ArrowError::ExternalError(e.message.into()))),
        };
        match rt.block_on(self.sub.next()) {
            None => None,
            Some(Ok(d)) => Some(Ok(d.batch)),
            // The error's name and code stay in the message: the C stream
            // interface carries only text.
            Some(Err(e)) => Some(Err(ArrowError::ExternalError(Box::new(e)))),
        }
    }
}

impl RecordBatchReader for StreamReader {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

/// One delivered batch with where it came from.
#[pyclass(module = "arrowbus._arrowbus", frozen)]
pub struct Batch {
    batch: RecordBatch,
    #[pyo3(get)]
    partition: u32,
    /// Offset of the first row.
    #[pyo3(get)]
    offset: u64,
    /// Append time, ms since the Unix epoch.
    #[pyo3(get)]
    timestamp_ms: i64,
    /// The partition's high watermark when the batch was sent.
    #[pyo3(get)]
    high_watermark: u64,
}

impl From<arrowbus::Delivery> for Batch {
    fn from(d: arrowbus::Delivery) -> Self {
        Self {
            batch: d.batch,
            partition: d.partition,
            offset: d.offset,
            timestamp_ms: d.timestamp_ms,
            high_watermark: d.high_watermark,
        }
    }
}

#[pymethods]
impl Batch {
    #[getter]
    fn num_rows(&self) -> usize {
        self.batch.num_rows()
    }

    fn __len__(&self) -> usize {
        self.batch.num_rows()
    }

    /// The offset after this batch: where to resume.
    #[getter]
    fn next_offset(&self) -> u64 {
        self.offset + self.batch.num_rows() as u64
    }

    #[getter]
    fn schema<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py().import("pyarrow")?.call_method1("schema", (slf,))
    }

    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_array__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<(Bound<'py, PyCapsule>, Bound<'py, PyCapsule>)> {
        // Offered as is; the interface lets a consumer cast if it asked
        // for something else.
        let _ = requested_schema;
        export_batch(py, &self.batch)
    }

    fn __arrow_c_schema__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyCapsule>> {
        export_schema(py, self.batch.schema().as_ref())
    }

    /// A `pyarrow.RecordBatch` over the same buffers (no copy).
    fn to_pyarrow<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py()
            .import("pyarrow")?
            .call_method1("record_batch", (slf,))
    }

    /// A `polars.DataFrame` (polars imports the Arrow buffers; it copies only
    /// where its own layout differs).
    fn to_polars<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let pa = Self::to_pyarrow(slf)?;
        slf.py().import("polars")?.call_method1("from_arrow", (pa,))
    }

    /// A `pandas.DataFrame` (via pyarrow; pandas has its own memory layout).
    fn to_pandas<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Self::to_pyarrow(slf)?.call_method0("to_pandas")
    }

    /// Test support: addresses of each column's buffers (validity first when
    /// present), as Rust holds them; equal to pyarrow's after `to_pyarrow`
    /// when nothing was copied.
    fn _buffer_addresses(&self) -> Vec<Vec<usize>> {
        self.batch
            .columns()
            .iter()
            .map(|c| {
                let data = c.to_data();
                data.nulls()
                    .map(|n| n.buffer().as_ptr() as usize)
                    .into_iter()
                    .chain(data.buffers().iter().map(|b| b.as_ptr() as usize))
                    .collect()
            })
            .collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "Batch(partition={}, offset={}, rows={}, columns={:?})",
            self.partition,
            self.offset,
            self.batch.num_rows(),
            self.batch
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
        )
    }
}

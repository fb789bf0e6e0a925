//! `Producer`: publishes anything Arrow from Python.
//!
//! One `publish` call takes a whole frame (a table, a DataFrame, a reader):
//! its batches are imported without copying, large ones are sliced into
//! pieces under the batch limit, and all of them go to one partition, in
//! order, pipelined on the Rust producer's window (5 batches / 64 MiB per
//! partition). When the window is full the call waits: that is
//! backpressure, reaching Python as a blocked call or a suspended `await`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arrow_array::RecordBatch;
use arrowbus::{slice_by_memory, ProducerConfig, LINGER_BYTES_MAX};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::arrow_io::{import, Source};
use crate::errors::BusError;
use crate::rt::{shielded, to_asyncio, wait, wait_shielded};

/// Frames larger than this (Arrow memory of the rows, which is close to
/// their IPC size) are sliced by rows before encoding. Well under the
/// broker's 16 MiB batch limit so that slicing rarely has to be redone by
/// `send_split`, and small enough that several pieces share the 64 MiB
/// in-flight window, keeping the pipeline full.
pub const PIECE_TARGET_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct LingerOptions {
    pub linger: Duration,
    pub bytes: usize,
}

impl LingerOptions {
    pub fn new(linger_ms: f64, bytes: usize) -> PyResult<Option<Self>> {
        if !(linger_ms.is_finite() && linger_ms >= 0.0) {
            return Err(PyValueError::new_err(format!(
                "linger_ms must be >= 0, got {linger_ms}"
            )));
        }
        if bytes == 0 || bytes > LINGER_BYTES_MAX {
            return Err(PyValueError::new_err(format!(
                "linger_bytes must be 1..={LINGER_BYTES_MAX}, got {bytes}"
            )));
        }
        if linger_ms == 0.0 {
            return Ok(None);
        }
        Ok(Some(Self {
            linger: Duration::from_secs_f64(linger_ms / 1000.0),
            bytes,
        }))
    }
}

/// One stored batch (or the part of one that a coalesced publish owns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub partition: u32,
    pub base_offset: u64,
    pub rows: u32,
    pub timestamp_ms: i64,
}

impl From<arrowbus::Ack> for Piece {
    fn from(a: arrowbus::Ack) -> Self {
        Self {
            partition: a.partition,
            base_offset: a.base_offset,
            rows: a.rows,
            timestamp_ms: a.timestamp_ms,
        }
    }
}

pub struct Core {
    client: arrowbus::Client,
    /// With linger on, this producer coalesces (`ProducerConfig::linger`).
    producer: arrowbus::Producer,
    partition_counts: Mutex<HashMap<String, u32>>,
    round_robin: AtomicU32,
    linger: Option<LingerOptions>,
}

impl Core {
    async fn partition_for(&self, topic: &str, explicit: Option<u32>) -> Result<u32, BusError> {
        if let Some(p) = explicit {
            return Ok(p);
        }
        let cached = self
            .partition_counts
            .lock()
            .ok()
            .and_then(|m| m.get(topic).copied());
        let count = match cached {
            Some(c) => c,
            None => {
                let info = self
                    .client
                    .admin()
                    .describe_topic(topic)
                    .await
                    .map_err(BusError::from)?;
                let c = info.partitions.len() as u32;
                if let Ok(mut m) = self.partition_counts.lock() {
                    m.insert(topic.to_owned(), c);
                }
                c
            }
        };
        Ok(self.round_robin.fetch_add(1, Ordering::Relaxed) % count.max(1))
    }

    /// Put every batch of `source` in flight (or in the linger queue) to one
    /// partition, in order. Returns once the last one is admitted, with the
    /// acks that already came in resolved and the rest still to await.
    pub async fn send_all(
        self: Arc<Self>,
        topic: String,
        mut source: Source,
        partition: Option<u32>,
    ) -> Result<AckState, BusError> {
        let partition = self.partition_for(&topic, partition).await?;
        let mut state = AckState::default();
        let mut any = false;
        while let Some(batch) = source.next_batch()? {
            any = true;
            for piece in slice_by_memory(&batch, PIECE_TARGET_BYTES) {
                self.send_piece(&topic, partition, piece, &mut state)
                    .await?;
            }
        }
        if !any {
            // An input without batches still fixes the topic schema, as
            // `busctl produce` does for an empty file: one empty batch.
            let empty = RecordBatch::new_empty(source.schema());
            self.send_piece(&topic, partition, empty, &mut state)
                .await?;
        }
        Ok(state)
    }

    async fn send_piece(
        &self,
        topic: &str,
        partition: u32,
        piece: RecordBatch,
        state: &mut AckState,
    ) -> Result<(), BusError> {
        // With linger on, the piece goes through the partition's linger
        // queue (`send_split` then slices by Arrow memory up front).
        let sent = self
            .producer
            .send_split(topic, Some(partition), &piece)
            .await
            .map_err(BusError::from)?;
        state.waits.extend(sent);
        // An unawaited ack keeps its batch's encoded body (a retry resends
        // it). Resolving the acks that are in as the stream goes keeps a
        // long reader's memory at the window, not at everything it sent.
        state.resolve_ready()
    }

    async fn flush(&self) -> Result<(), BusError> {
        self.producer.flush().await;
        Ok(())
    }
}

/// Await every wait in order; the acks of one publish as one `Ack`.
async fn gather(state: &mut AckState) -> Result<Ack, BusError> {
    if let Some(out) = &state.outcome {
        return out.clone();
    }
    // Restartable: a wait is removed only once it has completed, so a
    // cancelled `result()` (Ctrl-C, asyncio timeout) can be called again.
    while let Some(w) = state.waits.front_mut() {
        match w.await {
            Ok(a) => {
                state.done.push(Piece::from(a));
                state.waits.pop_front();
            }
            Err(e) => {
                let e = BusError::from(e);
                state.waits.clear();
                state.outcome = Some(Err(e.clone()));
                return Err(e);
            }
        }
    }
    let ack = Ack::from_pieces(&state.done);
    state.outcome = Some(Ok(ack.clone()));
    Ok(ack)
}

#[derive(Default)]
pub struct AckState {
    waits: VecDeque<arrowbus::PendingAck>,
    done: Vec<Piece>,
    outcome: Option<Result<Ack, BusError>>,
}

impl AckState {
    /// Move the acks at the front that have completed into `done`, without
    /// waiting. The first failure is the publish's outcome.
    fn resolve_ready(&mut self) -> Result<(), BusError> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while let Some(w) = self.waits.front_mut() {
            match std::pin::Pin::new(w).poll(&mut cx) {
                Poll::Ready(Ok(a)) => {
                    self.done.push(Piece::from(a));
                    self.waits.pop_front();
                }
                Poll::Ready(Err(e)) => {
                    let e = BusError::from(e);
                    self.waits.clear();
                    return Err(e);
                }
                Poll::Pending => break,
            }
        }
        Ok(())
    }
}

/// Publishes Arrow data; see the Python docstrings in `arrowbus`.
#[pyclass(module = "arrowbus._arrowbus", frozen)]
pub struct Producer {
    core: Arc<Core>,
}

impl Producer {
    pub fn new(
        client: &arrowbus::Client,
        linger: Option<LingerOptions>,
        max_inflight_batches: usize,
    ) -> PyResult<Self> {
        let cfg = ProducerConfig {
            max_inflight_batches,
            linger: linger.map(|l| l.linger),
            linger_bytes: linger.map_or(ProducerConfig::default().linger_bytes, |l| l.bytes),
            ..ProducerConfig::default()
        };
        let producer = client.producer_with(cfg);
        Ok(Self {
            core: Arc::new(Core {
                client: client.clone(),
                producer,
                partition_counts: Mutex::default(),
                round_robin: AtomicU32::new(0),
                linger,
            }),
        })
    }
}

#[pymethods]
impl Producer {
    /// Publish `data` (anything with the Arrow PyCapsule interface) and
    /// wait until it is durable; returns an `Ack`. All of its batches go to
    /// one partition in order (round-robin per call unless `partition`);
    /// batches over the size limit are split. The GIL is released while
    /// encoding and waiting.
    #[pyo3(signature = (topic, data, partition=None))]
    fn publish(
        &self,
        py: Python<'_>,
        topic: String,
        data: &Bound<'_, PyAny>,
        partition: Option<u32>,
    ) -> PyResult<Ack> {
        let source = import(data)?;
        let core = self.core.clone();
        wait_shielded(py, async move {
            let mut state = core.send_all(topic, source, partition).await?;
            gather(&mut state).await
        })
    }

    /// `publish` as an asyncio future.
    #[pyo3(signature = (topic, data, partition=None))]
    fn publish_async<'py>(
        &self,
        py: Python<'py>,
        topic: String,
        data: &Bound<'py, PyAny>,
        partition: Option<u32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let source = import(data)?;
        let core = self.core.clone();
        let sent = shielded(core.send_all(topic, source, partition))?;
        to_asyncio(py, async move {
            let mut state = sent.await?;
            gather(&mut state).await
        })
    }

    /// Put `data` in flight and return a `PendingAck` at once; blocks only
    /// while the partition's window (5 batches / 64 MiB) is full.
    #[pyo3(signature = (topic, data, partition=None))]
    fn send(
        &self,
        py: Python<'_>,
        topic: String,
        data: &Bound<'_, PyAny>,
        partition: Option<u32>,
    ) -> PyResult<PendingAck> {
        let source = import(data)?;
        let core = self.core.clone();
        let state = wait_shielded(py, core.send_all(topic, source, partition))?;
        Ok(PendingAck::new(state))
    }

    /// `send` as an asyncio future (suspended while the window is full).
    #[pyo3(signature = (topic, data, partition=None))]
    fn send_async<'py>(
        &self,
        py: Python<'py>,
        topic: String,
        data: &Bound<'py, PyAny>,
        partition: Option<u32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let source = import(data)?;
        let core = self.core.clone();
        let sent = shielded(core.send_all(topic, source, partition))?;
        to_asyncio(py, async move { Ok(PendingAck::new(sent.await?)) })
    }

    /// Send what linger holds now; return once everything sent before is acked.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let core = self.core.clone();
        wait(py, async move { core.flush().await })
    }

    /// `flush` as an asyncio future.
    fn flush_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let core = self.core.clone();
        to_asyncio(py, async move { core.flush().await })
    }

    #[getter]
    fn linger_ms(&self) -> f64 {
        self.core
            .linger
            .as_ref()
            .map_or(0.0, |l| l.linger.as_secs_f64() * 1000.0)
    }
}

/// A publish in flight; `result()` waits for its `Ack`.
#[pyclass(module = "arrowbus._arrowbus", frozen)]
pub struct PendingAck {
    state: Arc<tokio::sync::Mutex<AckState>>,
}

impl PendingAck {
    /// The outcome if it is known now; never blocks.
    fn poll_now(&self) -> Option<Result<Ack, BusError>> {
        let mut s = self.state.try_lock().ok()?;
        if let Some(out) = &s.outcome {
            return Some(out.clone());
        }
        // Poll once with a no-op waker: completes the state when every ack
        // is in; otherwise the waits stay registered for a later real wait.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let fut = gather(&mut s);
        let mut fut = std::pin::pin!(fut);
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(out) => Some(out),
            Poll::Pending => None,
        }
    }

    fn new(state: AckState) -> Self {
        Self {
            state: Arc::new(tokio::sync::Mutex::new(state)),
        }
    }
}

#[pymethods]
impl PendingAck {
    /// Wait until the publish is durable and return its `Ack`, or raise
    /// its error. May be called again (also after Ctrl-C).
    fn result(&self, py: Python<'_>) -> PyResult<Ack> {
        // Pipelined loops mostly ask for acks that are already in: answer
        // those without releasing the GIL and entering the runtime.
        if let Some(ready) = self.poll_now() {
            return ready.map_err(PyErr::from);
        }
        let state = self.state.clone();
        wait(py, async move { gather(&mut *state.lock().await).await })
    }

    /// `result` as an asyncio future.
    fn result_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        to_asyncio(py, async move { gather(&mut *state.lock().await).await })
    }

    /// Whether the outcome is known (acked or failed) without waiting.
    fn done(&self) -> bool {
        self.poll_now().is_some()
    }
}

/// Where a publish was stored: the partition, the offset of its first row,
/// and its row count. A frame published as several batches (large, or
/// multi-chunk) lists each stored batch in `batches` as
/// `(partition, offset, rows)`; they are in order in one partition, but
/// other producers' batches may sit between them.
#[pyclass(module = "arrowbus._arrowbus", frozen, get_all, eq)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub partition: u32,
    pub offset: u64,
    pub rows: u64,
    /// Broker append time of the first batch, ms since the Unix epoch.
    pub timestamp_ms: i64,
    pub batches: Vec<(u32, u64, u32)>,
}

impl Ack {
    fn from_pieces(pieces: &[Piece]) -> Self {
        let first = pieces.first().copied().unwrap_or(Piece {
            partition: 0,
            base_offset: 0,
            rows: 0,
            timestamp_ms: 0,
        });
        Self {
            partition: first.partition,
            offset: first.base_offset,
            rows: pieces.iter().map(|p| u64::from(p.rows)).sum(),
            timestamp_ms: first.timestamp_ms,
            batches: pieces
                .iter()
                .map(|p| (p.partition, p.base_offset, p.rows))
                .collect(),
        }
    }
}

#[pymethods]
impl Ack {
    #[new]
    #[pyo3(signature = (partition, offset, rows, timestamp_ms=0, batches=None))]
    fn py_new(
        partition: u32,
        offset: u64,
        rows: u64,
        timestamp_ms: i64,
        batches: Option<Vec<(u32, u64, u32)>>,
    ) -> Self {
        Self {
            partition,
            offset,
            rows,
            timestamp_ms,
            batches: batches.unwrap_or_default(),
        }
    }

    /// The offset after the last row, when the frame was stored as one
    /// contiguous run (always for a single batch).
    #[getter]
    fn next_offset(&self) -> u64 {
        self.offset + self.rows
    }

    fn __repr__(&self) -> String {
        format!(
            "Ack(partition={}, offset={}, rows={})",
            self.partition, self.offset, self.rows
        )
    }
}

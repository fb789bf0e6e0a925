//! `Client` (one QUIC connection), `Admin` and the topic descriptions.
//! Every blocking method has an `_async` twin returning an asyncio future;
//! `arrowbus.aio` wraps those into coroutines.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrowbus::{ClientConfig, NewTopic, StartAt, SubscribeOptions};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::arrow_io::{import_schema, ArrowSchema};
use crate::errors::BusError;
use crate::producer::{LingerOptions, Producer};
use crate::rt::{to_asyncio, wait};
use crate::subscriber::Subscription;

fn config(
    broker: Option<String>,
    ca: Option<PathBuf>,
    server_name: Option<String>,
    timeout: Option<f64>,
) -> PyResult<ClientConfig> {
    let mut cfg = ClientConfig::resolve(broker, ca).map_err(BusError::from)?;
    if let Some(name) = server_name {
        cfg.server_name = Some(name);
    }
    if let Some(t) = timeout {
        if !(t.is_finite() && t > 0.0) {
            return Err(PyValueError::new_err(format!(
                "timeout must be a positive number of seconds, got {t}"
            )));
        }
        cfg.request_timeout = Duration::from_secs_f64(t);
    }
    Ok(cfg)
}

/// Connect to a broker; see `arrowbus.connect`.
#[pyfunction]
#[pyo3(signature = (broker=None, ca=None, server_name=None, timeout=None))]
pub fn connect(
    py: Python<'_>,
    broker: Option<String>,
    ca: Option<PathBuf>,
    server_name: Option<String>,
    timeout: Option<f64>,
) -> PyResult<Client> {
    let cfg = config(broker, ca, server_name, timeout)?;
    let inner = wait(py, async move {
        arrowbus::Client::connect(cfg).await.map_err(BusError::from)
    })?;
    Ok(Client { inner })
}

/// `connect` as an asyncio future.
#[pyfunction]
#[pyo3(signature = (broker=None, ca=None, server_name=None, timeout=None))]
pub fn connect_async(
    py: Python<'_>,
    broker: Option<String>,
    ca: Option<PathBuf>,
    server_name: Option<String>,
    timeout: Option<f64>,
) -> PyResult<Bound<'_, PyAny>> {
    let cfg = config(broker, ca, server_name, timeout)?;
    to_asyncio(py, async move {
        let inner = arrowbus::Client::connect(cfg)
            .await
            .map_err(BusError::from)?;
        Ok(Client { inner })
    })
}

/// Where a subscription starts: "earliest", "latest", a row offset (int),
/// or a `datetime` (the first batch appended at or after it).
fn start_at(start: &Bound<'_, PyAny>) -> PyResult<StartAt> {
    if let Ok(s) = start.extract::<String>() {
        return match s.as_str() {
            "earliest" => Ok(StartAt::Earliest),
            "latest" => Ok(StartAt::Latest),
            other => Err(PyValueError::new_err(format!(
                "start must be 'earliest', 'latest', an offset (int) or a datetime; got {other:?}"
            ))),
        };
    }
    if start.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err("start must not be a bool"));
    }
    if let Ok(offset) = start.extract::<u64>() {
        return Ok(StartAt::Offset(offset));
    }
    if start.hasattr("timestamp")? {
        let secs: f64 = start.call_method0("timestamp")?.extract()?;
        return Ok(StartAt::Timestamp((secs * 1000.0).floor() as i64));
    }
    Err(PyTypeError::new_err(format!(
        "start must be 'earliest', 'latest', an offset (int) or a datetime; got {}",
        start.get_type().name()?
    )))
}

fn subscribe_options(
    start: &Bound<'_, PyAny>,
    partitions: Option<Vec<u32>>,
    until_end: bool,
    credit_bytes: u64,
    credit_batches: u32,
) -> PyResult<SubscribeOptions> {
    let mut opts = SubscribeOptions::default()
        .from(start_at(start)?)
        .credit(credit_bytes, credit_batches);
    opts.partitions = partitions;
    opts.until_end = until_end;
    Ok(opts)
}

/// One connection to an arrowbus broker. Thread-safe: share it between
/// threads and tasks.
#[pyclass(module = "arrowbus._arrowbus", frozen)]
pub struct Client {
    pub inner: arrowbus::Client,
}

#[pymethods]
impl Client {
    #[getter]
    fn admin(&self) -> Admin {
        Admin {
            inner: self.inner.admin(),
        }
    }

    /// A producer. `linger_ms` > 0 coalesces small frames sent to the same
    /// partition within that time into one batch of up to `linger_bytes`
    /// (like Kafka's linger.ms). `max_inflight_batches`: 1..5 per partition.
    #[pyo3(signature = (linger_ms=0.0, linger_bytes=1024 * 1024, max_inflight_batches=5))]
    fn producer(
        &self,
        linger_ms: f64,
        linger_bytes: usize,
        max_inflight_batches: usize,
    ) -> PyResult<Producer> {
        let linger = LingerOptions::new(linger_ms, linger_bytes)?;
        Producer::new(&self.inner, linger, max_inflight_batches)
    }

    /// Subscribe to `topic`. `start`: "latest" (default), "earliest", a row
    /// offset, or a datetime. `until_end`: stop at the current end instead of
    /// tailing. `credit_bytes`/`credit_batches`: how far the broker may send
    /// ahead of what the application has taken.
    // One parameter per Python keyword argument.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (topic, start=None, partitions=None, until_end=false, credit_bytes=8*1024*1024, credit_batches=256))]
    fn subscribe(
        &self,
        py: Python<'_>,
        topic: String,
        start: Option<&Bound<'_, PyAny>>,
        partitions: Option<Vec<u32>>,
        until_end: bool,
        credit_bytes: u64,
        credit_batches: u32,
    ) -> PyResult<Subscription> {
        let latest = pyo3::types::PyString::new(py, "latest");
        let opts = subscribe_options(
            start.unwrap_or(&latest),
            partitions,
            until_end,
            credit_bytes,
            credit_batches,
        )?;
        let client = self.inner.clone();
        let t = topic.clone();
        let sub = wait(py, async move {
            client.subscribe(&t, opts).await.map_err(BusError::from)
        })?;
        Ok(Subscription::new(topic, sub))
    }

    // One parameter per Python keyword argument.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (topic, start=None, partitions=None, until_end=false, credit_bytes=8*1024*1024, credit_batches=256))]
    fn subscribe_async<'py>(
        &self,
        py: Python<'py>,
        topic: String,
        start: Option<&Bound<'py, PyAny>>,
        partitions: Option<Vec<u32>>,
        until_end: bool,
        credit_bytes: u64,
        credit_batches: u32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let latest = pyo3::types::PyString::new(py, "latest");
        let opts = subscribe_options(
            start.unwrap_or(&latest),
            partitions,
            until_end,
            credit_bytes,
            credit_batches,
        )?;
        let client = self.inner.clone();
        to_asyncio(py, async move {
            let sub = client
                .subscribe(&topic, opts)
                .await
                .map_err(BusError::from)?;
            Ok(Subscription::new(topic, sub))
        })
    }

    /// Close the connection. Await outstanding acks first: what is still
    /// unsent is dropped.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let c = self.inner.clone();
        wait(py, async move {
            c.close().await;
            Ok(())
        })
    }

    #[getter]
    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }
}

/// Topic administration.
#[pyclass(module = "arrowbus._arrowbus", frozen)]
pub struct Admin {
    inner: arrowbus::Admin,
}

fn new_topic(
    name: String,
    partitions: u32,
    schema: Option<&Bound<'_, PyAny>>,
    replication_factor: u16,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
) -> PyResult<NewTopic> {
    let mut t = NewTopic::new(name)
        .partitions(partitions)
        .replication_factor(replication_factor);
    t.retention_ms = retention_ms;
    t.retention_bytes = retention_bytes;
    if let Some(s) = schema {
        t = t.schema(import_schema(s)?);
    }
    Ok(t)
}

#[pymethods]
impl Admin {
    // One parameter per Python keyword argument.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (name, partitions=1, schema=None, replication_factor=1, retention_ms=None, retention_bytes=None))]
    /// Create a topic; `schema` is any Arrow schema (pyarrow, polars) or
    /// Arrow data. Without one, the first publish fixes it.
    fn create_topic(
        &self,
        py: Python<'_>,
        name: String,
        partitions: u32,
        schema: Option<&Bound<'_, PyAny>>,
        replication_factor: u16,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
    ) -> PyResult<TopicInfo> {
        let t = new_topic(
            name,
            partitions,
            schema,
            replication_factor,
            retention_ms,
            retention_bytes,
        )?;
        let a = self.inner.clone();
        let info = wait(py, async move {
            a.create_topic(t).await.map_err(BusError::from)
        })?;
        TopicInfo::from_wire(info)
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (name, partitions=1, schema=None, replication_factor=1, retention_ms=None, retention_bytes=None))]
    fn create_topic_async<'py>(
        &self,
        py: Python<'py>,
        name: String,
        partitions: u32,
        schema: Option<&Bound<'py, PyAny>>,
        replication_factor: u16,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let t = new_topic(
            name,
            partitions,
            schema,
            replication_factor,
            retention_ms,
            retention_bytes,
        )?;
        let a = self.inner.clone();
        to_asyncio(py, async move {
            let info = a.create_topic(t).await.map_err(BusError::from)?;
            TopicInfo::from_wire(info).map_err(|e| BusError::new("protocol", e.to_string()))
        })
    }

    /// Every topic with its partitions and schema.
    fn list_topics(&self, py: Python<'_>) -> PyResult<Vec<TopicInfo>> {
        let a = self.inner.clone();
        let infos = wait(
            py,
            async move { a.list_topics().await.map_err(BusError::from) },
        )?;
        infos.into_iter().map(TopicInfo::from_wire).collect()
    }

    fn list_topics_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let a = self.inner.clone();
        to_asyncio(py, async move {
            let infos = a.list_topics().await.map_err(BusError::from)?;
            infos
                .into_iter()
                .map(TopicInfo::from_wire)
                .collect::<PyResult<Vec<_>>>()
                .map_err(|e| BusError::new("protocol", e.to_string()))
        })
    }

    /// One topic: partitions (offsets, batches, bytes) and schema.
    fn describe_topic(&self, py: Python<'_>, name: String) -> PyResult<TopicInfo> {
        let a = self.inner.clone();
        let info = wait(py, async move {
            a.describe_topic(&name).await.map_err(BusError::from)
        })?;
        TopicInfo::from_wire(info)
    }

    fn describe_topic_async<'py>(
        &self,
        py: Python<'py>,
        name: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let a = self.inner.clone();
        to_asyncio(py, async move {
            let info = a.describe_topic(&name).await.map_err(BusError::from)?;
            TopicInfo::from_wire(info).map_err(|e| BusError::new("protocol", e.to_string()))
        })
    }

    /// Delete a topic and its data.
    fn delete_topic(&self, py: Python<'_>, name: String) -> PyResult<()> {
        let a = self.inner.clone();
        wait(py, async move {
            a.delete_topic(&name).await.map_err(BusError::from)
        })
    }

    fn delete_topic_async<'py>(
        &self,
        py: Python<'py>,
        name: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let a = self.inner.clone();
        to_asyncio(py, async move {
            a.delete_topic(&name).await.map_err(BusError::from)
        })
    }
}

/// A topic as the broker describes it.
#[pyclass(module = "arrowbus._arrowbus", frozen)]
pub struct TopicInfo {
    #[pyo3(get)]
    pub name: String,
    #[pyo3(get)]
    pub replication_factor: u16,
    #[pyo3(get)]
    pub retention_ms: Option<u64>,
    #[pyo3(get)]
    pub retention_bytes: Option<u64>,
    /// 0 while the topic has no schema.
    #[pyo3(get)]
    pub schema_id: u32,
    #[pyo3(get)]
    pub created_ms: i64,
    #[pyo3(get)]
    pub partitions: Vec<PartitionInfo>,
    schema: Option<Arc<arrow_schema::Schema>>,
}

impl TopicInfo {
    fn from_wire(info: arrowbus::TopicInfo) -> PyResult<Self> {
        let schema = if info.schema_id == 0 {
            None
        } else {
            let s = arrowbus::schema::decode_schema(&info.schema_ipc).map_err(BusError::from)?;
            Some(s)
        };
        Ok(Self {
            name: info.name,
            replication_factor: info.replication_factor,
            retention_ms: info.retention_ms,
            retention_bytes: info.retention_bytes,
            schema_id: info.schema_id,
            created_ms: info.created_ms,
            partitions: info
                .partitions
                .into_iter()
                .map(|p| PartitionInfo {
                    partition: p.partition,
                    leader: p.leader,
                    replicas: p.replicas,
                    earliest_offset: p.earliest_offset,
                    latest_offset: p.latest_offset,
                    bytes: p.bytes,
                    batches: p.batches,
                })
                .collect(),
            schema,
        })
    }
}

#[pymethods]
impl TopicInfo {
    /// The topic schema as a `pyarrow.Schema`, or None before the first
    /// publish of a topic created without one.
    #[getter]
    fn schema<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(s) = &self.schema else {
            return Ok(None);
        };
        let holder = Bound::new(py, ArrowSchema { schema: s.clone() })?;
        Ok(Some(ArrowSchema::to_pyarrow(&holder)?))
    }

    /// Rows retained over all partitions.
    #[getter]
    fn rows(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| p.latest_offset.saturating_sub(p.earliest_offset))
            .sum()
    }

    fn __repr__(&self) -> String {
        format!(
            "TopicInfo(name={:?}, partitions={}, rows={}, schema_id={})",
            self.name,
            self.partitions.len(),
            self.rows(),
            self.schema_id
        )
    }
}

/// One partition of a topic.
#[pyclass(module = "arrowbus._arrowbus", frozen, get_all)]
#[derive(Clone)]
pub struct PartitionInfo {
    pub partition: u32,
    pub leader: u64,
    pub replicas: Vec<u64>,
    /// First retained offset.
    pub earliest_offset: u64,
    /// Next offset to be assigned.
    pub latest_offset: u64,
    pub bytes: u64,
    pub batches: u64,
}

#[pymethods]
impl PartitionInfo {
    fn __repr__(&self) -> String {
        format!(
            "PartitionInfo(partition={}, earliest_offset={}, latest_offset={}, batches={}, bytes={})",
            self.partition, self.earliest_offset, self.latest_offset, self.batches, self.bytes
        )
    }
}

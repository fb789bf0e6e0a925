"""Type stubs of the native module. Import from `arrowbus`, not from here."""

import datetime
from collections.abc import Iterator
from typing import Any, Literal, Optional, Protocol, Union

import pyarrow as pa

MAX_BATCH_BYTES: int

class ArrowStreamExportable(Protocol):
    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object: ...

class ArrowArrayExportable(Protocol):
    def __arrow_c_array__(self, requested_schema: object | None = None) -> tuple[object, object]: ...

class ArrowSchemaExportable(Protocol):
    def __arrow_c_schema__(self) -> object: ...

#: Anything publishable: pyarrow Table / RecordBatch / RecordBatchReader,
#: polars DataFrame, pandas DataFrame, DuckDB relation, nanoarrow array...
ArrowData = Union[ArrowStreamExportable, ArrowArrayExportable, Any]

#: Where a subscription starts: "earliest", "latest", a row offset, or the
#: first batch appended at or after a time.
Start = Union[Literal["earliest", "latest"], int, datetime.datetime]

def connect(
    broker: Optional[str] = None,
    ca: Optional[str] = None,
    server_name: Optional[str] = None,
    timeout: Optional[float] = None,
) -> Client: ...
def connect_async(
    broker: Optional[str] = None,
    ca: Optional[str] = None,
    server_name: Optional[str] = None,
    timeout: Optional[float] = None,
) -> Any: ...
def imported_buffer_addresses(data: ArrowData) -> list[list[list[int]]]:
    """Test support: buffer addresses Rust reads after importing `data`."""

class Client:
    """One QUIC connection to a broker. Share it between threads."""

    @property
    def admin(self) -> Admin: ...
    @property
    def is_connected(self) -> bool: ...
    def producer(
        self,
        linger_ms: float = 0.0,
        linger_bytes: int = 1048576,
        max_inflight_batches: int = 5,
    ) -> Producer:
        """A producer.

        linger_ms: when > 0, small frames published to the same partition
            within this many milliseconds are coalesced into one batch (up to
            linger_bytes), like Kafka's linger.ms. Use it with `send()`,
            threads or asyncio: a blocking `publish()` waits for its ack.
        linger_bytes: target size of a coalesced batch (at most 8 MiB).
        max_inflight_batches: batches in flight per partition (1..5).
        """
    def subscribe(
        self,
        topic: str,
        start: Optional[Start] = None,
        partitions: Optional[list[int]] = None,
        until_end: bool = False,
        credit_bytes: int = 8388608,
        credit_batches: int = 256,
    ) -> Subscription:
        """Subscribe to `topic` (all partitions unless `partitions`).

        start: "latest" (default), "earliest", a row offset, or a datetime.
        until_end: stop at the end of each partition as of now instead of
            tailing new data.
        credit_bytes / credit_batches: how far the broker may send ahead of
            what you have taken (at most 64 MiB / 4096 batches).
        """
    def subscribe_async(
        self,
        topic: str,
        start: Optional[Start] = None,
        partitions: Optional[list[int]] = None,
        until_end: bool = False,
        credit_bytes: int = 8388608,
        credit_batches: int = 256,
    ) -> Any: ...
    def close(self) -> None:
        """Close the connection; await outstanding acks first."""

class Admin:
    """Topic administration."""

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        schema: Optional[ArrowSchemaExportable | ArrowData] = None,
        replication_factor: int = 1,
        retention_ms: Optional[int] = None,
        retention_bytes: Optional[int] = None,
    ) -> TopicInfo:
        """Create a topic. Without `schema` the first publish fixes it.
        `schema` is a pyarrow/polars schema or any Arrow data (its schema).
        Raises TopicExists, InvalidTopicName, TooManyPartitions."""
    def create_topic_async(
        self,
        name: str,
        partitions: int = 1,
        schema: Optional[ArrowSchemaExportable | ArrowData] = None,
        replication_factor: int = 1,
        retention_ms: Optional[int] = None,
        retention_bytes: Optional[int] = None,
    ) -> Any: ...
    def list_topics(self) -> list[TopicInfo]: ...
    def list_topics_async(self) -> Any: ...
    def describe_topic(self, name: str) -> TopicInfo:
        """Partitions (offsets, batches, bytes) and schema. Raises TopicNotFound."""
    def describe_topic_async(self, name: str) -> Any: ...
    def delete_topic(self, name: str) -> None:
        """Delete a topic and its data. Raises TopicNotFound."""
    def delete_topic_async(self, name: str) -> Any: ...

class PartitionInfo:
    """One partition as its leader reports it. Offsets count rows;
    `latest_offset - earliest_offset` rows are retained. `bytes` and
    `batches` describe the partition's log: `batches` counts log entries,
    the data batches plus Raft's own entries (two when a single-node
    partition is created, one more per leader election), so count rows to
    count data."""

    partition: int
    leader: int
    replicas: list[int]
    earliest_offset: int
    latest_offset: int
    bytes: int
    batches: int

class TopicInfo:
    name: str
    replication_factor: int
    retention_ms: Optional[int]
    retention_bytes: Optional[int]
    schema_id: int
    created_ms: int
    partitions: list[PartitionInfo]
    @property
    def schema(self) -> Optional[pa.Schema]: ...
    @property
    def rows(self) -> int: ...

class Ack:
    """Where a publish was stored: partition, offset of its first row, rows.
    `batches` lists each stored batch as (partition, offset, rows)."""

    partition: int
    offset: int
    rows: int
    timestamp_ms: int
    batches: list[tuple[int, int, int]]
    def __init__(
        self,
        partition: int,
        offset: int,
        rows: int,
        timestamp_ms: int = 0,
        batches: Optional[list[tuple[int, int, int]]] = None,
    ) -> None: ...
    @property
    def next_offset(self) -> int: ...

class PendingAck:
    """A publish in flight."""

    def result(self) -> Ack:
        """Wait until the publish is durable; raises its error otherwise."""
    def result_async(self) -> Any: ...
    def done(self) -> bool: ...

class Producer:
    """Publishes Arrow data. Thread-safe; one producer can serve many threads."""

    @property
    def linger_ms(self) -> float: ...
    def publish(self, topic: str, data: ArrowData, partition: Optional[int] = None) -> Ack:
        """Publish `data` and wait until it is durable (fsynced).

        All of its batches go to one partition (round-robin per call unless
        `partition`), in order; batches over the size limit are split. The
        GIL is released while encoding and waiting. Raises SchemaMismatch
        (naming the fields), TopicNotFound, BatchTooLarge, TransportError
        (outcome unknown)...
        """
    def publish_async(self, topic: str, data: ArrowData, partition: Optional[int] = None) -> Any: ...
    def send(self, topic: str, data: ArrowData, partition: Optional[int] = None) -> PendingAck:
        """Put `data` in flight and return at once; blocks only while the
        partition's window (5 batches / 64 MiB) is full."""
    def send_async(self, topic: str, data: ArrowData, partition: Optional[int] = None) -> Any: ...
    def flush(self) -> None:
        """Send what linger holds; return when everything sent is acked."""
    def flush_async(self) -> Any: ...

class Batch:
    """One delivered batch. Implements the Arrow PyCapsule interface
    (`__arrow_c_array__`, `__arrow_c_schema__`): consumers read the
    received buffers in place."""

    partition: int
    offset: int
    timestamp_ms: int
    high_watermark: int
    @property
    def num_rows(self) -> int: ...
    @property
    def next_offset(self) -> int: ...
    @property
    def schema(self) -> pa.Schema: ...
    def __len__(self) -> int: ...
    def __arrow_c_array__(self, requested_schema: object | None = None) -> tuple[object, object]: ...
    def __arrow_c_schema__(self) -> object: ...
    def to_pyarrow(self) -> pa.RecordBatch: ...
    def to_polars(self) -> Any: ...
    def to_pandas(self) -> Any: ...
    def _buffer_addresses(self) -> list[list[int]]: ...

class Subscription(Iterator[Batch]):
    """Delivered batches, in order within each partition. Iterate it, read
    it as a pyarrow.RecordBatchReader (`to_reader()`), or use `with`."""

    @property
    def topic(self) -> str: ...
    @property
    def schema(self) -> Optional[pa.Schema]: ...
    def __iter__(self) -> Subscription: ...
    def __next__(self) -> Batch: ...
    def next_async(self) -> Any: ...
    def close(self) -> None: ...
    def to_reader(self) -> pa.RecordBatchReader:
        """The rest of the subscription as a RecordBatchReader (consumes it)."""
    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object: ...
    def __enter__(self) -> Subscription: ...
    def __exit__(self, *args: object) -> bool: ...

class ArrowSchema:
    def __arrow_c_schema__(self) -> object: ...
    def to_pyarrow(self) -> pa.Schema: ...

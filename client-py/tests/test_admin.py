"""Topic administration from Python."""

from __future__ import annotations

import pyarrow as pa
import pytest

import arrowbus


def test_create_list_describe_delete(bus: arrowbus.Client, topic: str) -> None:
    schema = pa.schema([("ts", pa.timestamp("us", tz="UTC")), ("v", pa.float64())])
    info = bus.admin.create_topic(topic, partitions=3, schema=schema, retention_ms=3_600_000)
    assert info.name == topic
    assert len(info.partitions) == 3
    assert info.schema == schema
    assert info.retention_ms == 3_600_000
    assert topic in {t.name for t in bus.admin.list_topics()}
    # `batches` counts log entries, including the partition's Raft entries
    # (election, membership): measure what the publish adds.
    raft_entries = bus.admin.describe_topic(topic).partitions[1].batches

    bus.producer().publish(topic, pa.table({"ts": pa.array([0, 1], schema.field("ts").type), "v": [1.0, 2.0]}), partition=1)
    d = bus.admin.describe_topic(topic)
    p1 = d.partitions[1]
    assert (p1.partition, p1.earliest_offset, p1.latest_offset, p1.batches - raft_entries) == (1, 0, 2, 1)
    assert d.rows == 2 and p1.bytes > 0

    bus.admin.delete_topic(topic)
    assert topic not in {t.name for t in bus.admin.list_topics()}
    with pytest.raises(arrowbus.TopicNotFound):
        bus.admin.delete_topic(topic)


def test_schema_from_polars_and_first_publish(bus: arrowbus.Client, topic: str) -> None:
    bus.admin.create_topic(topic)
    assert bus.admin.describe_topic(topic).schema is None
    bus.producer().publish(topic, pa.table({"a": pa.array([1], pa.int16())}))
    assert bus.admin.describe_topic(topic).schema == pa.schema([("a", pa.int16())])
    pl = pytest.importorskip("polars")
    t2 = topic + "-pl"
    info = bus.admin.create_topic(t2, schema=pl.DataFrame({"x": [1.5]}))
    assert info.schema == pa.schema([("x", pa.float64())])


def test_version_is_the_workspace_version() -> None:
    # The wheel's version comes from the crates' (maturin reads Cargo.toml);
    # `arrowbus.__version__` must report the installed one.
    import re
    from pathlib import Path

    cargo = (Path(__file__).resolve().parents[2] / "Cargo.toml").read_text()
    workspace_version = re.search(r'^version = "([^"]+)"', cargo, re.M)
    assert workspace_version is not None
    assert arrowbus.__version__ == workspace_version.group(1)

"""Broker error codes reach Python as the arrowbus exception hierarchy, with
code, name and the broker's message; nothing is a bare RuntimeError."""

from __future__ import annotations

import pyarrow as pa
import pytest

import arrowbus


def test_hierarchy() -> None:
    for name in ["SchemaMismatch", "TopicNotFound", "TopicExists", "NotLeader", "Timeout",
                 "Unauthorized", "ProducerFenced", "BatchTooLarge", "StorageFull", "Busy"]:
        cls = getattr(arrowbus, name)
        assert issubclass(cls, arrowbus.Error) and not issubclass(cls, RuntimeError), name
    assert arrowbus.TopicAlreadyExists is arrowbus.TopicExists
    assert issubclass(arrowbus.Timeout, TimeoutError)
    assert issubclass(arrowbus.TransportError, ConnectionError)
    codes = {cls.code for cls in arrowbus.BrokerError.__subclasses__()}
    assert {10, 11, 20, 50, 52, 60, 70} <= codes
    assert str(arrowbus.NotLeader("go to node 2", code=50, leader_hint=2)) == "NotLeader (50): go to node 2"


def test_topic_not_found_names_the_topic(bus: arrowbus.Client, topic: str) -> None:
    with pytest.raises(arrowbus.TopicNotFound) as e:
        bus.admin.describe_topic(topic)
    assert e.value.code == 10 and e.value.name == "TopicNotFound"
    assert topic in e.value.message
    with pytest.raises(arrowbus.TopicNotFound):
        bus.producer().publish(topic, pa.table({"a": [1]}))
    with pytest.raises(arrowbus.TopicNotFound):
        bus.subscribe(topic)


def test_topic_exists(bus: arrowbus.Client, topic: str) -> None:
    bus.admin.create_topic(topic)
    with pytest.raises(arrowbus.TopicExists) as e:
        bus.admin.create_topic(topic)
    assert e.value.code == 11 and topic in str(e.value)


def test_invalid_topic_name_and_partition(bus: arrowbus.Client, topic: str) -> None:
    with pytest.raises(arrowbus.InvalidTopicName) as e:
        bus.admin.create_topic("no spaces allowed")
    assert e.value.code == 13
    bus.admin.create_topic(topic, partitions=2)
    with pytest.raises(arrowbus.PartitionNotFound) as e2:
        bus.producer().publish(topic, pa.table({"a": [1]}), partition=5)
    assert e2.value.code == 12 and "partition 5" in e2.value.message


def test_schema_mismatch_names_every_differing_field(bus: arrowbus.Client, topic: str) -> None:
    bus.admin.create_topic(topic, schema=pa.schema([("sym", pa.string()), ("px", pa.float64())]))
    with pytest.raises(arrowbus.SchemaMismatch) as e:
        bus.producer().publish(topic, pa.table({"sym": [1], "qty": [2.0]}))
    msg = e.value.message
    assert e.value.code == 20
    assert "field 'sym': topic has Utf8, batch has Int64" in msg
    assert "field 'px' (Float64) is missing" in msg
    assert "field 'qty' (Float64) is not in the topic schema" in msg
    # Nothing was stored.
    assert bus.admin.describe_topic(topic).rows == 0
    # Equivalent types are cast, not refused.
    ack = bus.producer().publish(
        topic, pa.table({"sym": pa.array(["x"], pa.large_string()), "px": [1.0]})
    )
    assert ack.rows == 1


def test_credit_limits_are_config_errors(bus: arrowbus.Client, topic: str) -> None:
    bus.admin.create_topic(topic)
    with pytest.raises(arrowbus.ConfigError, match="credit"):
        bus.subscribe(topic, credit_bytes=0)


def test_connect_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ARROWBUS_CONFIG_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.delenv("ARROWBUS_BROKER", raising=False)
    with pytest.raises(arrowbus.ConfigError, match="no broker given"):
        arrowbus.connect()
    with pytest.raises(arrowbus.ConfigError):
        arrowbus.connect("127.0.0.1:1", ca=tmp_path / "missing.pem")
    with pytest.raises(ValueError):
        arrowbus.connect("127.0.0.1:1", timeout=-1)


def test_connect_to_nobody_times_out_as_connect_error(busd, tmp_path) -> None:
    with pytest.raises(arrowbus.ConnectError) as e:
        arrowbus.connect("127.0.0.1:9", ca=busd.ca, timeout=0.5)
    assert isinstance(e.value, ConnectionError)
    assert "127.0.0.1:9" in str(e.value)

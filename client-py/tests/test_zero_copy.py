"""Arrow data crosses the Python boundary without copying, both ways: the
Rust side reads the buffers pyarrow (or polars) owns, and pyarrow reads the
buffers the client received from the network."""

from __future__ import annotations

import pyarrow as pa
import pytest

import arrowbus
from arrowbus import _arrowbus


def pyarrow_addresses(arr: pa.Array) -> list[int]:
    """Validity buffer (when present) then data buffers, as Rust lists them."""
    bufs = arr.buffers()
    out = [bufs[0].address] if bufs[0] is not None else []
    return out + [b.address for b in bufs[1:] if b is not None]


def test_import_reads_the_python_owned_buffers_in_place() -> None:
    table = pa.table(
        {
            "i": pa.array(range(100_000), pa.int64()),
            "f": pa.array([None if k % 7 == 0 else k * 0.5 for k in range(100_000)]),
            "s": pa.array([f"v{k}" for k in range(100_000)], pa.string()),
        }
    )
    table = table.combine_chunks()
    # Through __arrow_c_stream__ (Table) and __arrow_c_array__ (RecordBatch).
    for data in (table, table.to_batches()[0]):
        rust = _arrowbus.imported_buffer_addresses(data)
        assert len(rust) == 1
        for col, addrs in zip(table.columns, rust[0]):
            assert addrs == pyarrow_addresses(col.chunk(0)), col.type


def test_import_of_a_polars_frame_reads_polars_memory() -> None:
    pl = pytest.importorskip("polars")
    df = pl.DataFrame({"x": list(range(50_000))})
    rust = _arrowbus.imported_buffer_addresses(df)
    # polars exports its own buffers; pyarrow importing the same frame
    # sees the same addresses.
    again = pa.table(df)
    assert rust[0][0] == pyarrow_addresses(again.column("x").chunk(0))


def test_delivered_batches_export_the_received_buffers(bus: arrowbus.Client, topic: str) -> None:
    bus.admin.create_topic(topic)
    bus.producer().publish(
        topic, pa.table({"i": pa.array(range(10_000), pa.int64()), "s": [f"s{k}" for k in range(10_000)]})
    )
    batch = next(iter(bus.subscribe(topic, start="earliest", until_end=True)))
    rust = batch._buffer_addresses()
    pa_batch = batch.to_pyarrow()
    for col, addrs in zip(pa_batch.columns, rust):
        assert pyarrow_addresses(col) == addrs
    # The capsule protocol itself, as any consumer uses it.
    assert pa.record_batch(batch).column(0).buffers()[1].address == rust[0][-1]
    assert pa.schema(batch) == pa_batch.schema


def test_polars_reads_a_delivered_batch_through_the_capsule(bus: arrowbus.Client, topic: str) -> None:
    pl = pytest.importorskip("polars")
    bus.admin.create_topic(topic)
    bus.producer().publish(topic, pa.table({"x": [1, 2, 3], "s": ["a", None, "c"]}))
    batch = next(iter(bus.subscribe(topic, start="earliest", until_end=True)))
    df = pl.DataFrame(batch)  # __arrow_c_array__, no pyarrow in between
    assert df.equals(batch.to_polars())
    assert df["x"].to_list() == [1, 2, 3] and df["s"].to_list() == ["a", None, "c"]

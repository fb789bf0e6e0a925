"""Data published from Python comes back identical: every golden Arrow IPC
stream of the Arrow project's integration corpus, and frames from pyarrow,
polars, pandas, DuckDB and nanoarrow with nulls, nested types, dictionaries,
time zones and string views."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pytest

import arrowbus

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "data" / "arrow-ipc" / "golden"
GOLDEN_FILES = sorted(GOLDEN.glob("*.stream"))


def read_back(bus: arrowbus.Client, topic: str) -> pa.Table:
    """Everything in the topic, partitions in order, as one table."""
    batches = list(bus.subscribe(topic, start="earliest", until_end=True))
    batches.sort(key=lambda b: (b.partition, b.offset))
    schema = bus.admin.describe_topic(topic).schema
    return pa.Table.from_batches([b.to_pyarrow() for b in batches], schema=schema)


def test_the_golden_corpus_is_all_there() -> None:
    assert len(GOLDEN_FILES) == 32, GOLDEN_FILES


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_ipc_stream_round_trips_through_python(
    bus: arrowbus.Client, topic: str, path: Path
) -> None:
    expected = pa.ipc.open_stream(path).read_all()
    bus.admin.create_topic(topic)
    # A RecordBatchReader goes in through the C stream interface, batch by batch.
    ack = bus.producer().publish(topic, pa.ipc.open_stream(path))
    assert ack.rows == expected.num_rows
    assert ack.partition == 0 and ack.offset == 0

    got = read_back(bus, topic)
    assert got.schema.equals(expected.schema, check_metadata=True), (
        f"{got.schema}\n!=\n{expected.schema}"
    )
    assert got.num_rows == expected.num_rows
    assert got.equals(expected), f"{path.name}: values differ"
    info = bus.admin.describe_topic(topic)
    assert info.rows == expected.num_rows
    bus.admin.delete_topic(topic)


def rich_table() -> pa.Table:
    """Nulls, nested, dictionary, timestamps with a time zone, string views."""
    return pa.table(
        {
            "id": pa.array([1, 2, None, 4], pa.int64()),
            "ts": pa.array(
                [dt.datetime(2026, 1, 1, 12, 0, i, tzinfo=dt.timezone.utc) for i in range(3)]
                + [None],
                pa.timestamp("us", tz="Europe/Paris"),
            ),
            "name": pa.array(["a", None, "ccc", "d" * 40], pa.string_view()),
            "tags": pa.array([["x"], [], None, ["y", None]], pa.list_(pa.string())),
            "point": pa.array(
                [{"x": 1.0, "y": None}, None, {"x": 3.0, "y": 4.0}, {"x": None, "y": 0.5}],
                pa.struct([("x", pa.float64()), ("y", pa.float64())]),
            ),
            "side": pa.array(["B", "S", None, "B"]).dictionary_encode(),
            "price": pa.array([1.5, None, 3.25, -2.0], pa.float64()),
        }
    )


def test_pyarrow_table_with_nulls_nested_dictionary_tz_and_views(
    bus: arrowbus.Client, topic: str
) -> None:
    t = rich_table()
    bus.admin.create_topic(topic)
    ack = bus.producer().publish(topic, t)
    assert (ack.partition, ack.offset, ack.rows) == (0, 0, 4)
    got = read_back(bus, topic)
    assert got.schema == t.schema
    assert got.equals(t)
    assert got.column("ts").type == pa.timestamp("us", tz="Europe/Paris")
    assert got.column("side").type == pa.dictionary(pa.int32(), pa.string())
    assert got.column("name").type == pa.string_view()


def test_pyarrow_record_batch_and_reader_inputs(bus: arrowbus.Client, topic: str) -> None:
    t = rich_table()
    bus.admin.create_topic(topic)
    p = bus.producer()
    a1 = p.publish(topic, t.to_batches()[0])  # __arrow_c_array__
    a2 = p.publish(topic, pa.RecordBatchReader.from_batches(t.schema, t.to_batches()))
    assert (a1.offset, a1.rows) == (0, 4)
    assert (a2.offset, a2.rows) == (4, 4)
    got = read_back(bus, topic)
    assert got.equals(pa.concat_tables([t, t]))


def test_polars_frame_string_views_are_cast_to_a_utf8_topic(
    bus: arrowbus.Client, topic: str
) -> None:
    pl = pytest.importorskip("polars")
    schema = pa.schema([("sym", pa.string()), ("px", pa.float64()), ("n", pa.int32())])
    bus.admin.create_topic(topic, schema=schema)
    df = pl.DataFrame(
        {"sym": ["AAPL", None, "MSFT"], "px": [1.5, 2.5, None], "n": [1, 2, 3]},
        schema={"sym": pl.String, "px": pl.Float64, "n": pl.Int32},
    )
    ack = bus.producer().publish(topic, df)
    assert ack.rows == 3
    got = read_back(bus, topic)
    assert got.schema == schema  # string_view from polars became the topic's string
    assert got.to_pydict() == {"sym": ["AAPL", None, "MSFT"], "px": [1.5, 2.5, None], "n": [1, 2, 3]}
    back = next(iter(bus.subscribe(topic, start="earliest", until_end=True))).to_polars()
    assert back.equals(df)


def test_polars_nested_and_categorical(bus: arrowbus.Client, topic: str) -> None:
    pl = pytest.importorskip("polars")
    df = pl.DataFrame(
        {
            "ts": pl.Series([dt.datetime(2026, 1, 1), None]).dt.replace_time_zone("Asia/Tokyo"),
            "lst": [[1, 2], None],
            "st": [{"a": 1, "b": "x"}, {"a": None, "b": None}],
            "cat": pl.Series(["u", "v"], dtype=pl.Categorical),
        }
    )
    bus.admin.create_topic(topic)
    bus.producer().publish(topic, df)
    out = next(iter(bus.subscribe(topic, start="earliest", until_end=True))).to_polars()
    assert out["ts"].dtype == pl.Datetime("us", "Asia/Tokyo")
    assert out["lst"].to_list() == [[1, 2], None]
    assert out["st"].to_list() == [{"a": 1, "b": "x"}, {"a": None, "b": None}]
    assert out["cat"].cast(pl.String).to_list() == ["u", "v"]


def test_pandas_frame_strings_and_metadata(bus: arrowbus.Client, topic: str) -> None:
    pd = pytest.importorskip("pandas")
    schema = pa.schema([("sym", pa.string()), ("px", pa.float64()), ("ts", pa.timestamp("us", tz="UTC"))])
    bus.admin.create_topic(topic, schema=schema)
    df = pd.DataFrame(
        {
            "sym": ["a", None, "c"],
            "px": [1.0, None, 3.0],
            "ts": pd.to_datetime(["2026-01-01", None, "2026-01-03"], utc=True).as_unit("us"),
        }
    )
    ack = bus.producer().publish(topic, df)
    assert ack.rows == 3
    info = bus.admin.describe_topic(topic)
    assert info.schema == schema
    assert b"pandas" not in (info.schema.metadata or {})  # frame bookkeeping is not topic schema
    out = next(iter(bus.subscribe(topic, start="earliest", until_end=True))).to_pandas()
    assert out["sym"].tolist()[0] == "a" and out["sym"].isna().tolist() == [False, True, False]
    assert out["px"].isna().tolist() == [False, True, False]
    assert str(out["ts"].dt.tz) == "UTC"
    assert out["ts"].iloc[2] == pd.Timestamp("2026-01-03", tz="UTC")

    # As in pandas' own Arrow export, a non-default index is a column.
    with pytest.raises(arrowbus.SchemaMismatch, match="__index_level_0__"):
        bus.producer().publish(topic, df.set_index(pd.Index([10, 30, 20])))
    assert bus.producer().publish(topic, df.set_index(pd.Index([10, 30, 20])).reset_index(drop=True)).rows == 3


def test_duckdb_relation(bus: arrowbus.Client, topic: str) -> None:
    duckdb = pytest.importorskip("duckdb")
    rel = duckdb.sql("select range::BIGINT as i, 'v' || range::VARCHAR as s from range(1000)")
    bus.admin.create_topic(topic)
    ack = bus.producer().publish(topic, rel)
    assert ack.rows == 1000
    got = read_back(bus, topic)
    assert got.column("i").to_pylist() == list(range(1000))
    assert got.column("s")[999].as_py() == "v999"


def test_nanoarrow_array(bus: arrowbus.Client, topic: str) -> None:
    na = pytest.importorskip("nanoarrow")
    batch = pa.record_batch({"x": [1, 2, 3]})
    arr = na.Array(batch)
    bus.admin.create_topic(topic)
    ack = bus.producer().publish(topic, arr)
    assert ack.rows == 3
    assert read_back(bus, topic).column("x").to_pylist() == [1, 2, 3]


def test_not_arrow_data_is_a_type_error(bus: arrowbus.Client, topic: str) -> None:
    with pytest.raises(TypeError, match="Arrow PyCapsule|__arrow_c_stream__"):
        bus.producer().publish(topic, [1, 2, 3])


def test_start_positions(bus: arrowbus.Client, topic: str) -> None:
    bus.admin.create_topic(topic)
    p = bus.producer()
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    for i in range(3):
        p.publish(topic, pa.table({"i": [i * 10 + k for k in range(10)]}))
    def rows(start):
        return [
            v
            for b in bus.subscribe(topic, start=start, until_end=True)
            for v in b.to_pyarrow().column("i").to_pylist()
        ]
    assert rows("earliest") == list(range(30))
    assert rows(15) == list(range(15, 30))  # a batch containing 15 is sliced
    assert rows(before) == list(range(30))
    first = next(iter(bus.subscribe(topic, start=15, until_end=True)))
    assert (first.offset, first.num_rows, first.next_offset) == (15, 5, 20)
    with pytest.raises(ValueError):
        bus.subscribe(topic, start="middle")


def test_subscription_as_record_batch_reader(bus: arrowbus.Client, topic: str) -> None:
    t = rich_table()
    bus.admin.create_topic(topic)
    bus.producer().publish(topic, t)
    bus.producer().publish(topic, t)
    sub = bus.subscribe(topic, start="earliest", until_end=True)
    reader = sub.to_reader()
    assert isinstance(reader, pa.RecordBatchReader)
    assert reader.schema == t.schema
    assert reader.read_all().equals(pa.concat_tables([t, t]))
    with pytest.raises(ValueError, match="consumed"):
        sub.to_reader()  # single use, like any RecordBatchReader


def test_latest_start_then_tail(bus: arrowbus.Client, topic: str) -> None:
    bus.admin.create_topic(topic, schema=pa.schema([("i", pa.int64())]))
    bus.producer().publish(topic, pa.table({"i": [1]}))
    with bus.subscribe(topic) as sub:  # start="latest"
        bus.producer().publish(topic, pa.table({"i": [2, 3]}))
        b = next(sub)
        assert b.offset == 1 and b.to_pyarrow().column("i").to_pylist() == [2, 3]

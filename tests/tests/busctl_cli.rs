//! `busctl` against a real `busd`: every command with table and JSON output,
//! files written here with known values published and read back, offsets
//! and row limits, and the exit code and one-line message of each failure.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use arrow_array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{DataType, Field, Schema};
use arrowbus_tests::{seqs, ticks, Busd};
use serde_json::{json, Value};

fn run(b: &Busd, args: &[&str]) -> Output {
    b.busctl()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running busctl {args:?}: {e}"))
}

/// Run and require success; returns stdout.
fn ok(b: &Busd, args: &[&str]) -> Vec<u8> {
    let out = run(b, args);
    assert!(
        out.status.success(),
        "busctl {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn ok_text(b: &Busd, args: &[&str]) -> String {
    String::from_utf8(ok(b, args))
        .unwrap_or_else(|e| panic!("busctl {args:?}: stdout is not UTF-8: {e}"))
}

fn ok_json(b: &Busd, args: &[&str]) -> Value {
    let text = ok_text(b, args);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("busctl {args:?}: not JSON ({e}): {text}"))
}

/// JSON lines output of `consume`.
fn json_lines(b: &Busd, args: &[&str]) -> Vec<Value> {
    ok_text(b, args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// Run and require failure with `code`; returns the single stderr line.
fn fails(b: &Busd, args: &[&str], code: i32) -> String {
    let out = run(b, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "busctl {args:?}: stderr {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "busctl {args:?}: expected one line on stderr, got {stderr:?}"
    );
    assert!(lines[0].starts_with("busctl: "), "{stderr}");
    lines[0].to_owned()
}

fn arrow_stream(bytes: Vec<u8>) -> (Arc<Schema>, Vec<RecordBatch>) {
    let r = StreamReader::try_new(Cursor::new(bytes), None)
        .unwrap_or_else(|e| panic!("not an Arrow IPC stream: {e}"));
    let schema = r.schema();
    let batches = r
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("bad batch in the Arrow stream: {e}"));
    (schema, batches)
}

fn write_stream(path: &Path, batches: &[RecordBatch]) {
    let f = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut w = StreamWriter::try_new(f, &batches[0].schema()).unwrap_or_else(|e| panic!("{e}"));
    for b in batches {
        w.write(b).unwrap_or_else(|e| panic!("{e}"));
    }
    w.finish().unwrap_or_else(|e| panic!("{e}"));
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

fn p(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 temp path"))
}

fn find<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|t| t["name"] == name)
}

#[test]
fn topics_create_list_describe_delete_in_table_and_json() {
    let b = Busd::start();
    let out = ok_text(
        &b,
        &[
            "topics",
            "create",
            "orders",
            "--partitions",
            "3",
            "--retention-ms",
            "60000",
            "--retention-bytes",
            "1000000",
        ],
    );
    assert!(
        out.contains("orders") && out.contains("3 partition"),
        "{out}"
    );

    // List, table: header and one row with its values.
    let table = ok_text(&b, &["topics"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "PARTITIONS", "ROWS", "BYTES", "SCHEMA"]);
    let row = lines
        .find(|l| l.starts_with("orders"))
        .unwrap_or_else(|| panic!("no orders row: {table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..3], ["orders", "3", "0"], "{row}");
    assert!(row.ends_with("(none yet)"), "{row}");
    assert_eq!(ok_text(&b, &["topics", "list"]), table);

    // List, JSON.
    let list = ok_json(&b, &["--output", "json", "topics"]);
    let t = find(&list, "orders").unwrap_or_else(|| panic!("orders not listed: {list}"));
    assert_eq!(t["partitions"], 3);
    assert_eq!(t["rows"], 0);
    assert_eq!(t["retention_ms"], 60000);
    assert_eq!(t["retention_bytes"], 1_000_000);
    assert_eq!(t["schema"], Value::Null);

    // Describe, JSON and table.
    let d = ok_json(&b, &["topics", "describe", "orders", "--output", "json"]);
    assert_eq!(d["name"], "orders");
    assert_eq!(d["retention_ms"], 60000);
    let parts = d["partitions"]
        .as_array()
        .unwrap_or_else(|| panic!("no partitions: {d}"));
    assert_eq!(parts.len(), 3);
    for (i, part) in parts.iter().enumerate() {
        assert_eq!(part["partition"], i);
        assert_eq!(part["earliest_offset"], 0);
        assert_eq!(part["latest_offset"], 0);
        assert_eq!(part["rows"], 0);
        // Log entries: none of data, only Raft's own (election, membership).
        assert!(part["batches"].as_u64().is_some_and(|b| b <= 3), "{part}");
        assert!(
            part["replicas"].is_array() && part["leader"].is_u64(),
            "{part}"
        );
    }
    let text = ok_text(&b, &["topics", "describe", "orders"]);
    assert!(
        text.contains("60000 ms") && text.contains("1000000 bytes"),
        "{text}"
    );
    let header = text
        .lines()
        .find(|l| l.starts_with("PARTITION"))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "PARTITION",
            "LEADER",
            "REPLICAS",
            "IN-SYNC",
            "MOVING-TO",
            "EARLIEST",
            "LATEST",
            "ROWS",
            "BYTES",
            "BATCHES"
        ]
    );

    // Creating it twice is a broker error with name and code.
    let err = fails(&b, &["topics", "create", "orders"], 1);
    assert!(err.contains("TopicAlreadyExists"), "{err}");

    // Delete.
    let out = ok_text(&b, &["topics", "delete", "orders"]);
    assert!(out.contains("orders"), "{out}");
    let list = ok_json(&b, &["topics", "--output", "json"]);
    assert!(find(&list, "orders").is_none(), "{list}");
    let err = fails(&b, &["topics", "describe", "orders"], 1);
    assert!(err.contains("TopicNotFound") && err.contains("10"), "{err}");
}

#[test]
fn csv_file_round_trips_through_json_output() {
    let b = Busd::start();
    let dir = tmp();
    let csv = dir.path().join("prices.csv");
    std::fs::write(&csv, "id,name,price\n1,apple,1.5\n2,,2.25\n3,cherry,\n")
        .unwrap_or_else(|e| panic!("{e}"));
    ok(&b, &["topics", "create", "prices"]);
    let res = ok_json(
        &b,
        &["produce", "prices", "--file", p(&csv), "--output", "json"],
    );
    assert_eq!(res["rows"], 3, "{res}");
    assert_eq!(res["batches"], 1, "{res}");
    assert_eq!(
        res["partitions"],
        json!([{"partition": 0, "first_offset": 0, "last_offset": 2, "rows": 3}])
    );

    let rows = json_lines(&b, &["consume", "prices", "--output", "json"]);
    assert_eq!(
        rows,
        vec![
            json!({"_partition": 0, "_offset": 0, "id": 1, "name": "apple", "price": 1.5}),
            json!({"_partition": 0, "_offset": 1, "id": 2, "name": null, "price": 2.25}),
            json!({"_partition": 0, "_offset": 2, "id": 3, "name": "cherry", "price": null}),
        ]
    );

    // The listing now shows the rows and the inferred schema.
    let list = ok_json(&b, &["topics", "--output", "json"]);
    let t = find(&list, "prices").unwrap_or_else(|| panic!("{list}"));
    assert_eq!(t["rows"], 3);
    assert!(t["bytes"].as_u64().unwrap_or(0) > 0, "{t}");
    assert_eq!(
        t["schema"],
        json!([
            {"name": "id", "type": "Int64", "nullable": true},
            {"name": "name", "type": "Utf8", "nullable": true},
            {"name": "price", "type": "Float64", "nullable": true},
        ])
    );
    let table = ok_text(&b, &["topics"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("prices"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.ends_with("id:Int64, name:Utf8, +1 more"), "{row}");

    // Table output shows the values with their partition and offset.
    let text = ok_text(&b, &["consume", "prices"]);
    assert!(
        text.contains("_partition") && text.contains("_offset"),
        "{text}"
    );
    assert!(text.contains("cherry") && text.contains("2.25"), "{text}");
}

#[test]
fn parquet_file_round_trips_through_json_output() {
    use parquet::arrow::ArrowWriter;
    let b = Busd::start();
    let dir = tmp();
    let path = dir.path().join("trades.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("sym", DataType::Utf8, false),
        Field::new("qty", DataType::Int64, true),
        Field::new("px", DataType::Float64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["AAPL", "MSFT", "NVDA", "AMZN"])),
            Arc::new(Int64Array::from(vec![Some(10), None, Some(30), Some(40)])),
            Arc::new(Float64Array::from(vec![1.0, 2.5, 3.25, 4.0])),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{e}"));
    let mut w = ArrowWriter::try_new(f, schema.clone(), None).unwrap_or_else(|e| panic!("{e}"));
    // Two row groups, so the file is read as more than one batch.
    w.write(&batch.slice(0, 2))
        .unwrap_or_else(|e| panic!("{e}"));
    w.flush().unwrap_or_else(|e| panic!("{e}"));
    w.write(&batch.slice(2, 2))
        .unwrap_or_else(|e| panic!("{e}"));
    w.close().unwrap_or_else(|e| panic!("{e}"));

    let out = ok_text(
        &b,
        &["topics", "create", "trades", "--schema-from", p(&path)],
    );
    assert!(out.contains("Parquet") && out.contains("sym:Utf8"), "{out}");
    let res = ok_json(
        &b,
        &["produce", "trades", "--file", p(&path), "--output", "json"],
    );
    assert_eq!(res["rows"], 4, "{res}");
    assert_eq!(res["partitions"][0]["first_offset"], 0, "{res}");
    assert_eq!(res["partitions"][0]["last_offset"], 3, "{res}");

    let rows = json_lines(&b, &["consume", "trades", "--output", "json"]);
    assert_eq!(
        rows,
        vec![
            json!({"_partition": 0, "_offset": 0, "sym": "AAPL", "qty": 10, "px": 1.0}),
            json!({"_partition": 0, "_offset": 1, "sym": "MSFT", "qty": null, "px": 2.5}),
            json!({"_partition": 0, "_offset": 2, "sym": "NVDA", "qty": 30, "px": 3.25}),
            json!({"_partition": 0, "_offset": 3, "sym": "AMZN", "qty": 40, "px": 4.0}),
        ]
    );
    // The topic kept the file's non-nullable fields.
    let (got_schema, batches) = arrow_stream(ok(&b, &["consume", "trades", "--output", "arrow"]));
    assert_eq!(got_schema.fields(), schema.fields());
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 4);
}

/// A topic of 20 ticks in two batches of 10 on one partition.
fn two_tick_batches(b: &Busd, dir: &Path, topic: &str) -> PathBuf {
    let file = dir.join(format!("{topic}.arrows"));
    write_stream(&file, &[ticks(0, 10), ticks(10, 10)]);
    ok(b, &["topics", "create", topic]);
    let res = ok_json(
        b,
        &["--output", "json", "produce", topic, "--file", p(&file)],
    );
    assert_eq!(res["rows"], 20, "{res}");
    assert_eq!(res["batches"], 2, "{res}");
    file
}

fn json_seqs(rows: &[Value]) -> Vec<i64> {
    rows.iter()
        .map(|r| r["seq"].as_i64().unwrap_or(-1))
        .collect()
}

#[test]
fn arrow_output_is_one_stream_with_exactly_the_topic_schema() {
    let b = Busd::start();
    let dir = tmp();
    two_tick_batches(&b, dir.path(), "ticks");
    let (schema, batches) = arrow_stream(ok(&b, &["consume", "ticks", "--output", "arrow"]));
    assert_eq!(schema, ticks(0, 1).schema());
    assert_eq!(
        batches.iter().flat_map(seqs).collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );
    for batch in &batches {
        assert_eq!(
            batch.schema(),
            schema,
            "no columns may be added in arrow mode"
        );
    }

    // An empty topic whose schema came from a file: the schema, no batches.
    let file = dir.path().join("schema.arrows");
    let mut schema_md = (*ticks(0, 1).schema()).clone();
    schema_md.metadata.insert("source", "busctl-test");
    let empty = RecordBatch::new_empty(Arc::new(schema_md.clone()));
    write_stream(&file, &[empty]);
    ok(
        &b,
        &["topics", "create", "empty", "--schema-from", p(&file)],
    );
    let (schema, batches) = arrow_stream(ok(&b, &["consume", "empty", "--output", "arrow"]));
    assert_eq!(*schema, schema_md, "schema and its metadata");
    assert!(batches.is_empty(), "{batches:?}");
    assert_eq!(ok_text(&b, &["consume", "empty"]).trim(), "(0 rows)");
    assert_eq!(ok_text(&b, &["consume", "empty", "--output", "json"]), "");

    // A topic without a schema has no Arrow stream to write.
    ok(&b, &["topics", "create", "schemaless"]);
    let err = fails(&b, &["consume", "schemaless", "--output", "arrow"], 1);
    assert!(err.contains("no schema"), "{err}");
}

#[test]
fn from_offset_slices_mid_batch_and_max_rows_slices_the_last_batch() {
    let b = Busd::start();
    let dir = tmp();
    two_tick_batches(&b, dir.path(), "ticks");

    let rows = json_lines(
        &b,
        &["consume", "ticks", "--from", "15", "--output", "json"],
    );
    assert_eq!(json_seqs(&rows), (15..20).collect::<Vec<_>>());
    assert_eq!(rows[0]["_offset"], 15);
    assert_eq!(rows[0]["_partition"], 0);

    // Mid first batch, in Arrow: the first batch starts at the offset.
    let (_, batches) = arrow_stream(ok(
        &b,
        &["consume", "ticks", "--from", "5", "--output", "arrow"],
    ));
    assert_eq!(
        batches.iter().map(|b| b.num_rows()).collect::<Vec<_>>(),
        [5, 10]
    );
    assert_eq!(
        batches.iter().flat_map(seqs).collect::<Vec<_>>(),
        (5..20).collect::<Vec<_>>()
    );

    // --max-rows cuts the second batch.
    let rows = json_lines(
        &b,
        &["consume", "ticks", "--max-rows", "12", "--output", "json"],
    );
    assert_eq!(json_seqs(&rows), (0..12).collect::<Vec<_>>());
    let (_, batches) = arrow_stream(ok(
        &b,
        &[
            "consume",
            "ticks",
            "--from",
            "3",
            "--max-rows",
            "9",
            "--output",
            "arrow",
        ],
    ));
    assert_eq!(
        batches.iter().flat_map(seqs).collect::<Vec<_>>(),
        (3..12).collect::<Vec<_>>()
    );
    let (_, batches) = arrow_stream(ok(
        &b,
        &["consume", "ticks", "--max-rows", "0", "--output", "arrow"],
    ));
    assert!(batches.is_empty());

    // latest: nothing new yet; an offset at the end: nothing.
    assert!(json_lines(
        &b,
        &["consume", "ticks", "--from", "latest", "--output", "json"]
    )
    .is_empty());
    assert!(json_lines(
        &b,
        &["consume", "ticks", "--from", "20", "--output", "json"]
    )
    .is_empty());

    // A second produce continues the offsets; --partition reads that partition.
    let more = dir.path().join("more.arrows");
    write_stream(&more, &[ticks(20, 5)]);
    let res = ok_json(
        &b,
        &[
            "produce",
            "ticks",
            "--file",
            p(&more),
            "--partition",
            "0",
            "--output",
            "json",
        ],
    );
    assert_eq!(
        res["partitions"],
        json!([{"partition": 0, "first_offset": 20, "last_offset": 24, "rows": 5}])
    );
    let rows = json_lines(
        &b,
        &[
            "consume",
            "ticks",
            "--partition",
            "0",
            "--from",
            "18",
            "--output",
            "json",
        ],
    );
    assert_eq!(json_seqs(&rows), (18..25).collect::<Vec<_>>());
    let d = ok_json(&b, &["topics", "describe", "ticks", "--output", "json"]);
    assert_eq!(d["partitions"][0]["latest_offset"], 25, "{d}");
    // Three data batches plus Raft's own entries (election, membership).
    let entries = d["partitions"][0]["batches"].as_u64().unwrap_or(0);
    assert!((3..=6).contains(&entries), "{d}");
}

#[test]
fn produce_spreads_over_partitions_and_reports_each_range() {
    let b = Busd::start();
    let dir = tmp();
    let file = dir.path().join("t.arrows");
    write_stream(
        &file,
        &[ticks(0, 4), ticks(4, 4), ticks(8, 4), ticks(12, 0)],
    );
    ok(&b, &["topics", "create", "spread", "--partitions", "2"]);
    let res = ok_json(
        &b,
        &["produce", "spread", "--file", p(&file), "--output", "json"],
    );
    assert_eq!(res["rows"], 12, "{res}");
    assert_eq!(res["batches"], 4, "a 0-row batch publishes too: {res}");
    let parts = res["partitions"]
        .as_array()
        .unwrap_or_else(|| panic!("{res}"));
    let total: u64 = parts
        .iter()
        .map(|p| {
            p["last_offset"].as_u64().unwrap_or(0) + 1 - p["first_offset"].as_u64().unwrap_or(0)
        })
        .sum();
    assert_eq!(total, 12, "{res}");
    let rows = json_lines(&b, &["consume", "spread", "--output", "json"]);
    let mut got = json_seqs(&rows);
    got.sort_unstable();
    assert_eq!(got, (0..12).collect::<Vec<_>>());
    let text = ok_text(&b, &["produce", "spread", "--file", p(&file)]);
    assert!(
        text.contains("12 rows") && text.contains("partition"),
        "{text}"
    );
}

#[test]
fn a_file_without_batches_sets_the_schema_of_a_topic_without_one() {
    let b = Busd::start();
    let dir = tmp();
    let file = dir.path().join("none.arrows");
    let schema = ticks(0, 1).schema();
    let f = std::fs::File::create(&file).unwrap_or_else(|e| panic!("{e}"));
    let mut w = StreamWriter::try_new(f, &schema).unwrap_or_else(|e| panic!("{e}"));
    w.finish().unwrap_or_else(|e| panic!("{e}"));
    drop(w);
    ok(&b, &["topics", "create", "fresh"]);
    let res = ok_json(
        &b,
        &["produce", "fresh", "--file", p(&file), "--output", "json"],
    );
    assert_eq!(res["rows"], 0, "{res}");
    let (got, batches) = arrow_stream(ok(&b, &["consume", "fresh", "--output", "arrow"]));
    assert_eq!(got, schema);
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
}

#[test]
fn failures_exit_non_zero_with_one_line() {
    let b = Busd::start();
    let dir = tmp();

    let err = fails(&b, &["consume", "nope"], 1);
    assert!(err.contains("TopicNotFound"), "{err}");
    let err = fails(&b, &["consume", "nope", "--output", "arrow"], 1);
    assert!(err.contains("TopicNotFound"), "{err}");
    let err = fails(&b, &["topics", "delete", "nope"], 1);
    assert!(err.contains("TopicNotFound"), "{err}");

    ok(&b, &["topics", "create", "t"]);
    let csv = dir.path().join("ok.csv");
    std::fs::write(&csv, "a\n1\n").unwrap_or_else(|e| panic!("{e}"));
    let err = fails(&b, &["produce", "nope", "--file", p(&csv)], 1);
    assert!(err.contains("TopicNotFound"), "{err}");

    // Bad files: missing, wrong magic for the extension, truncated IPC, empty.
    let missing = dir.path().join("missing.csv");
    let err = fails(&b, &["produce", "t", "--file", p(&missing)], 1);
    assert!(
        err.contains("cannot open") && err.contains("missing.csv"),
        "{err}"
    );
    let fake = dir.path().join("fake.parquet");
    std::fs::write(&fake, "a,b\n1,2\n").unwrap_or_else(|e| panic!("{e}"));
    let err = fails(&b, &["produce", "t", "--file", p(&fake)], 1);
    assert!(
        err.contains("PAR1") && err.contains("fake.parquet"),
        "{err}"
    );
    let err = fails(
        &b,
        &["topics", "create", "t2", "--schema-from", p(&fake)],
        1,
    );
    assert!(err.contains("PAR1"), "{err}");
    let good = dir.path().join("good.arrows");
    write_stream(&good, &[ticks(0, 100)]);
    let bytes = std::fs::read(&good).unwrap_or_else(|e| panic!("{e}"));
    let cut = dir.path().join("cut.arrows");
    std::fs::write(&cut, &bytes[..bytes.len() - 200]).unwrap_or_else(|e| panic!("{e}"));
    let err = fails(&b, &["produce", "t", "--file", p(&cut)], 1);
    assert!(
        err.contains("cut.arrows") && err.contains("Arrow IPC stream"),
        "{err}"
    );
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "").unwrap_or_else(|e| panic!("{e}"));
    let err = fails(&b, &["produce", "t", "--file", p(&empty)], 1);
    assert!(err.contains("empty"), "{err}");
    // Nothing of the bad files was stored.
    let d = ok_json(&b, &["topics", "describe", "t", "--output", "json"]);
    assert_eq!(d["rows"], 0, "{d}");

    // A file that does not match the topic's schema: the broker's code.
    ok(&b, &["produce", "t", "--file", p(&csv)]);
    let err = fails(&b, &["produce", "t", "--file", p(&good)], 1);
    assert!(err.contains("SchemaMismatch"), "{err}");
    let err = fails(
        &b,
        &["produce", "t", "--file", p(&csv), "--partition", "7"],
        1,
    );
    assert!(err.contains("partition 7"), "{err}");

    // Usage errors: exit 2, one line.
    let err = fails(&b, &["topics", "create"], 2);
    assert!(err.to_lowercase().contains("required"), "{err}");
    let err = fails(&b, &["consume", "t", "--from", "yesterday"], 2);
    assert!(err.contains("yesterday"), "{err}");
    fails(&b, &["topics", "--output", "arrow"], 2);

    // No broker reachable: exit 1, one line.
    let out = std::process::Command::new(arrowbus_tests::busctl_path())
        .args(["--broker", "127.0.0.1:1", "--ca", p(&b.ca()), "topics"])
        .env("ARROWBUS_CONFIG_DIR", dir.path())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);

    // --help documents the exit codes.
    let help = ok_text(&b, &["--help"]);
    assert!(help.contains("Exit codes"), "{help}");
}

//! Every golden Arrow IPC stream of the Arrow integration corpus round-trips
//! through arrowbus unchanged: `busctl topics create --schema-from`,
//! `busctl produce`, `busctl consume --output arrow`, then the schema (with
//! its metadata) and all rows must equal the file's. A file whose type the
//! Arrow crate cannot decode must instead fail with an error naming the type,
//! and be listed in `UNDECODABLE` (so a new failure fails this test).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Output;

use arrow_array::{Array, RecordBatch};
use arrow_ipc::reader::StreamReader;
use arrow_schema::SchemaRef;
use arrowbus_tests::Busd;

/// Golden files arrow-rs cannot decode, with the type name their error must
/// mention. Keep in sync with the known gaps in tests/data/arrow-ipc/README.md.
const UNDECODABLE: &[(&str, &str)] = &[];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/arrow-ipc/golden")
}

fn read_stream(bytes: &[u8]) -> Result<(SchemaRef, Vec<RecordBatch>), String> {
    let r = StreamReader::try_new(Cursor::new(bytes), None).map_err(|e| e.to_string())?;
    let schema = r.schema();
    let batches = r
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok((schema, batches))
}

fn busctl(b: &Busd, args: &[&str]) -> Output {
    b.busctl()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running busctl {args:?}: {e}"))
}

/// Compare the rows of two batch sequences as if each were concatenated:
/// walk both with a cursor and compare overlapping slices column by column.
/// Array equality is logical, so dictionary arrays compare by value.
fn same_rows(expected: &[RecordBatch], got: &[RecordBatch]) -> Result<(), String> {
    let total = |bs: &[RecordBatch]| bs.iter().map(RecordBatch::num_rows).sum::<usize>();
    if total(expected) != total(got) {
        return Err(format!(
            "{} rows in the file, {} read back",
            total(expected),
            total(got)
        ));
    }
    let non_empty = |bs: &[RecordBatch]| {
        bs.iter()
            .filter(|b| b.num_rows() > 0)
            .cloned()
            .collect::<Vec<_>>()
    };
    let (e, g) = (non_empty(expected), non_empty(got));
    let (mut i, mut io, mut j, mut jo, mut row) = (0, 0, 0, 0, 0);
    while i < e.len() && j < g.len() {
        let n = (e[i].num_rows() - io).min(g[j].num_rows() - jo);
        if e[i].num_columns() != g[j].num_columns() {
            return Err(format!(
                "{} columns in the file, {} read back",
                e[i].num_columns(),
                g[j].num_columns()
            ));
        }
        for c in 0..e[i].num_columns() {
            let a = e[i].column(c).slice(io, n);
            let b = g[j].column(c).slice(jo, n);
            if a.as_ref() != b.as_ref() {
                return Err(format!(
                    "column {c} ({}) differs in rows {row}..{}: file {a:?}, read back {b:?}",
                    e[i].schema().field(c).name(),
                    row + n
                ));
            }
        }
        row += n;
        io += n;
        jo += n;
        if io == e[i].num_rows() {
            i += 1;
            io = 0;
        }
        if jo == g[j].num_rows() {
            j += 1;
            jo = 0;
        }
    }
    Ok(())
}

/// Publish one golden file and read it back; `Err` carries the failing step
/// and busctl's message.
fn round_trip(b: &Busd, path: &Path, topic: &str) -> Result<(), String> {
    let file = path.to_str().ok_or("non-UTF-8 path")?;
    let steps: [&[&str]; 2] = [
        &["topics", "create", topic, "--schema-from", file],
        &["produce", topic, "--file", file],
    ];
    for args in steps {
        let out = busctl(b, args);
        if !out.status.success() {
            return Err(format!(
                "busctl {}: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let out = busctl(
        b,
        &["consume", topic, "--from", "earliest", "--output", "arrow"],
    );
    if !out.status.success() {
        return Err(format!(
            "busctl consume: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let (want_schema, want) =
        read_stream(&bytes).map_err(|e| format!("reading the file here: {e}"))?;
    let (got_schema, got) =
        read_stream(&out.stdout).map_err(|e| format!("reading consume's output: {e}"))?;
    if got_schema != want_schema {
        return Err(format!(
            "schema differs:\n file:      {want_schema:?}\n read back: {got_schema:?}"
        ));
    }
    same_rows(&want, &got)
}

#[test]
fn every_golden_stream_round_trips_or_names_its_unsupported_type() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .unwrap_or_else(|e| panic!("{}: {e}", golden_dir().display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "stream"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 30,
        "golden corpus incomplete: {} files",
        files.len()
    );

    let b = Busd::start();
    let mut failures = Vec::new();
    let mut passed = 0;
    for path in &files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let topic = name.trim_end_matches(".stream").to_owned();
        match (
            round_trip(&b, path, &topic),
            UNDECODABLE.iter().find(|(f, _)| *f == name),
        ) {
            (Ok(()), None) => passed += 1,
            (Ok(()), Some(_)) => failures.push(format!(
                "{name}: round-trips now; remove it from UNDECODABLE"
            )),
            (Err(e), Some((_, ty))) if e.contains(ty) && e.lines().count() == 1 => {}
            (Err(e), Some((_, ty))) => {
                failures.push(format!("{name}: expected an error naming {ty}, got: {e}"))
            }
            (Err(e), None) => failures.push(format!("{name}: {e}")),
        }
    }
    println!("{passed} of {} golden streams round-trip", files.len());
    assert!(
        failures.is_empty(),
        "{} golden files failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        b.log().lines().all(|l| !l.contains("panicked")),
        "busd panicked:\n{}",
        b.log()
    );
}

#[test]
fn row_comparison_can_fail() {
    use arrow_array::Int32Array;
    use std::sync::Arc;
    let batch = |v: Vec<i32>| {
        RecordBatch::try_from_iter([("x", Arc::new(Int32Array::from(v)) as Arc<dyn Array>)])
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let a = [batch(vec![1, 2, 3]), batch(vec![4])];
    assert_eq!(
        same_rows(&a, &[batch(vec![1]), batch(vec![2, 3, 4])]),
        Ok(())
    );
    assert_eq!(
        same_rows(&a, &[batch(vec![]), batch(vec![1, 2, 3, 4])]),
        Ok(())
    );
    assert!(same_rows(&a, &[batch(vec![1, 2, 3, 5])]).is_err());
    assert!(same_rows(&a, &[batch(vec![1, 2, 3])]).is_err());
}

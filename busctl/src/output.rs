//! Rendering for humans and scripts: aligned text tables, byte sizes, schema
//! summaries and their JSON forms. Pure functions of their inputs; callers
//! decide where the text goes.

use std::fmt::Write as _;

use arrow_schema::Schema;
use serde_json::{json, Value};

/// `1536` → `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Fields shown by name before `+N more`: enough to recognise a topic while
/// the listing stays one line per topic.
const SCHEMA_SUMMARY_FIELDS: usize = 2;

/// `ts:Timestamp(ms), sym:Utf8, +3 more`, or `(none yet)`.
pub fn schema_summary(schema: Option<&Schema>) -> String {
    let Some(s) = schema else {
        return "(none yet)".into();
    };
    let fields = s.fields();
    if fields.is_empty() {
        return "(no fields)".into();
    }
    let mut out: Vec<String> = fields
        .iter()
        .take(SCHEMA_SUMMARY_FIELDS)
        .map(|f| format!("{}:{}", f.name(), f.data_type()))
        .collect();
    if fields.len() > SCHEMA_SUMMARY_FIELDS {
        out.push(format!("+{} more", fields.len() - SCHEMA_SUMMARY_FIELDS));
    }
    out.join(", ")
}

/// `[{name, type, nullable}]`, or `null` without a schema.
pub fn schema_json(schema: Option<&Schema>) -> Value {
    match schema {
        None => Value::Null,
        Some(s) => Value::Array(
            s.fields()
                .iter()
                .map(|f| json!({"name": f.name(), "type": f.data_type().to_string(), "nullable": f.is_nullable()}))
                .collect(),
        ),
    }
}

/// A left-aligned text table with a header row, columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

/// Print a JSON value on stdout, pretty.
pub fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::{DataType, Field, TimeUnit};

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1_258_291), "1.2 MiB");
    }

    #[test]
    fn schema_summary_names_two_fields() {
        let f = |n: &str, t: DataType| Field::new(n, t, true);
        let s = Schema::new(vec![
            f("ts", DataType::Timestamp(TimeUnit::Millisecond, None)),
            f("sym", DataType::Utf8),
            f("a", DataType::Int64),
            f("b", DataType::Int64),
            f("c", DataType::Int64),
        ]);
        assert_eq!(
            schema_summary(Some(&s)),
            "ts:Timestamp(ms), sym:Utf8, +3 more"
        );
        assert_eq!(schema_summary(None), "(none yet)");
        assert_eq!(schema_json(None), Value::Null);
        assert_eq!(
            schema_json(Some(&s))[1],
            json!({"name": "sym", "type": "Utf8", "nullable": true})
        );
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
    }
}

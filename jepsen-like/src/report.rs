//! Reports of a checked history: a text summary for people, JSON for
//! machines, and the timeline PNG. Pure functions of the history, the check
//! result and the run's metadata, plus one function that writes the files.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value as Json};

use crate::checker::{CheckResult, CLASSES};
use crate::history::{MicroOp, Op, OpType, Process};

/// Faults the nemesis injected: each completed nemesis op with its time.
pub fn faults(history: &[Op]) -> Vec<Json> {
    history
        .iter()
        .filter(|o| o.process == Process::Nemesis && o.kind != OpType::Invoke)
        .map(|o| {
            let mut j = json!({
                "time_s": (o.time as f64 / 1e6).round() / 1e3,
                "f": o.f,
                "value": crate::history::Op::to_json(o)["value"],
            });
            if let Some(e) = &o.error {
                j["error"] = json!(e);
            }
            j
        })
        .collect()
}

/// Latency percentiles (ms) of `ok` operations by `f`.
pub fn latencies(history: &[Op]) -> BTreeMap<String, Json> {
    let mut open: HashMap<u64, &Op> = HashMap::new();
    let mut per: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for op in history {
        let Process::Client(p) = op.process else {
            continue;
        };
        if op.kind == OpType::Invoke {
            open.insert(p, op);
        } else if let Some(inv) = open.remove(&p) {
            if op.kind == OpType::Ok && !inv.final_read {
                per.entry(inv.f.clone())
                    .or_default()
                    .push(op.time.saturating_sub(inv.time) as f64 / 1e6);
            }
        }
    }
    per.into_iter()
        .map(|(f, mut v)| {
            v.sort_by(|a, b| a.total_cmp(b));
            let q = |p: f64| {
                let i = ((v.len() as f64 - 1.0) * p).round() as usize;
                (v.get(i).copied().unwrap_or(0.0) * 100.0).round() / 100.0
            };
            (
                f,
                json!({"count": v.len(), "p50_ms": q(0.5), "p95_ms": q(0.95),
                       "p99_ms": q(0.99), "max_ms": q(1.0)}),
            )
        })
        .collect()
}

/// Liveness: how long acknowledged values took to reach a consumer (ack
/// completion to the completion of the first non-final `ok` poll that read
/// them), and how many no consumer read before the final reads.
pub fn read_lag(history: &[Op]) -> Json {
    let mut acked: HashMap<(u32, i64), u64> = HashMap::new();
    let mut first_read: HashMap<(u32, i64), u64> = HashMap::new();
    for op in history {
        if op.kind != OpType::Ok || op.final_read || op.process == Process::Nemesis {
            continue;
        }
        for m in op.mops() {
            match m {
                MicroOp::Send {
                    key,
                    value,
                    offset: Some(_),
                } => {
                    acked.insert((*key, *value), op.time);
                }
                MicroOp::Poll { reads: Some(r) } => {
                    for (k, pairs) in r {
                        for (_, v) in pairs {
                            first_read.entry((*k, *v)).or_insert(op.time);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut lags: Vec<f64> = acked
        .iter()
        .filter_map(|(kv, t)| {
            first_read
                .get(kv)
                .map(|r| r.saturating_sub(*t) as f64 / 1e6)
        })
        .collect();
    lags.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        let i = ((lags.len() as f64 - 1.0) * p).round() as usize;
        (lags.get(i).copied().unwrap_or(0.0) * 10.0).round() / 10.0
    };
    json!({
        "read_by_consumers": lags.len(),
        "only_in_final_reads": acked.len() - lags.len(),
        "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": q(1.0),
    })
}

/// Number of fault starts by kind.
pub fn fault_counts(history: &[Op]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for o in history {
        if o.process != Process::Nemesis || o.kind != OpType::Invoke {
            continue;
        }
        if let Some(k) = crate::schedule::FaultKind::started_by(&o.f) {
            *m.entry(k.to_string()).or_default() += 1;
        }
    }
    m
}

pub fn report_json(meta: &Json, history: &[Op], result: &CheckResult) -> Json {
    json!({
        "run": meta,
        "valid": result.valid,
        "check": result,
        "faults_injected": fault_counts(history),
        "faults": faults(history),
        "latency": latencies(history),
        "read_lag": read_lag(history),
    })
}

pub fn summary_text(meta: &Json, history: &[Op], result: &CheckResult) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "jepsen-like report");
    if !meta.is_null() {
        let _ = writeln!(s, "run: {meta}");
    }
    let _ = writeln!(s, "\noperations (by outcome):");
    for (f, m) in &result.ops {
        let get = |k: &str| m.get(k).copied().unwrap_or(0);
        let _ = writeln!(
            s,
            "  {f:<6} attempted {:>7}  ok {:>7}  info {:>6}  fail {:>6}",
            get("invoke"),
            get("ok"),
            get("info"),
            get("fail")
        );
    }
    let _ = writeln!(
        s,
        "  distinct values acknowledged {}, read {}",
        result.acknowledged_values, result.read_values
    );
    let _ = writeln!(s, "\nlatency of ok operations (ms):");
    for (f, l) in latencies(history) {
        let _ = writeln!(
            s,
            "  {f:<6} n={} p50={} p95={} p99={} max={}",
            l["count"], l["p50_ms"], l["p95_ms"], l["p99_ms"], l["max_ms"]
        );
    }
    let lag = read_lag(history);
    let _ = writeln!(
        s,
        "  ack -> first consumer read: p50={} p99={} max={} ms; {} acknowledged values first read by the final reads",
        lag["p50_ms"], lag["p99_ms"], lag["max_ms"], lag["only_in_final_reads"]
    );
    let counts = fault_counts(history);
    let _ = writeln!(
        s,
        "\nfaults injected: {}",
        if counts.is_empty() {
            "none".into()
        } else {
            counts
                .iter()
                .map(|(k, v)| format!("{k} x{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    for f in faults(history) {
        let err = f
            .get("error")
            .map(|e| format!("  ERROR {e}"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "  {:>8.3} s  {:<10} {}{err}",
            f["time_s"].as_f64().unwrap_or(0.0),
            f["f"].as_str().unwrap_or(""),
            f["value"]
        );
    }
    let _ = writeln!(s, "\nanomalies:");
    for class in CLASSES {
        let n = result.anomaly_counts.get(*class).copied().unwrap_or(0);
        if n == 0 {
            continue;
        }
        let _ = writeln!(s, "  {class}: {n}");
        for ex in result.anomalies.get(*class).into_iter().flatten().take(5) {
            let _ = writeln!(s, "    {ex}");
        }
    }
    if result.anomaly_counts.values().all(|c| *c == 0) {
        let _ = writeln!(s, "  none (checked: {})", CLASSES.join(", "));
    }
    for w in &result.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    let _ = writeln!(
        s,
        "\n{}",
        if result.valid {
            "VALID: no anomalies"
        } else {
            "INVALID: anomalies found"
        }
    );
    s
}

/// Write `results.json`, `summary.txt` and `timeline.png` into `dir`.
pub fn write_reports(
    dir: &Path,
    meta: &Json,
    history: &[Op],
    result: &CheckResult,
    title: &str,
) -> Result<String> {
    let text = summary_text(meta, history, result);
    std::fs::write(dir.join("summary.txt"), &text).context("writing summary.txt")?;
    let j = report_json(meta, history, result);
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&j).context("encoding results.json")?,
    )
    .context("writing results.json")?;
    std::fs::write(
        dir.join("timeline.png"),
        crate::plot::timeline(history, title),
    )
    .context("writing timeline.png")?;
    Ok(text)
}

//! The harness end to end against real busd processes: a run under kill -9
//! is clean, and a run whose nemesis rolls a node's data back (a disk that
//! lost acknowledged writes, as a broker that acks before fsync/commit and
//! then dies would) is reported with lost writes and inconsistent offsets
//! and a non-zero exit code. Partitions need root and iptables; they run in
//! the `scripts/test` smoke instead.

use std::path::Path;
use std::process::Command;

use jepsen_like::checker::{check, CheckOptions};
use jepsen_like::history::read_history;

fn jepsen_like(
    dir: &Path,
    seed: u64,
    nemesis: &str,
    instance: &str,
    extra: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_jepsen-like"))
        .args([
            "run",
            "--time-limit",
            "20",
            "--rate",
            "100",
            "--interval",
            "6",
            "--recovery",
            "2",
        ])
        .args([
            "--nemesis",
            nemesis,
            "--seed",
            &seed.to_string(),
            "--instance",
            instance,
        ])
        .arg("--busd")
        .arg(arrowbus_tests::busd_path())
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("running jepsen-like: {e}"))
}

fn stdout(o: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn recheck(dir: &Path) -> jepsen_like::checker::CheckResult {
    let f = std::fs::File::open(dir.join("history.jsonl"))
        .unwrap_or_else(|e| panic!("history.jsonl: {e}"));
    let ops = read_history(std::io::BufReader::new(f)).unwrap_or_else(|e| panic!("{e}"));
    check(&ops, &CheckOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn kill_run_is_clean_and_rollback_run_reports_lost_writes() {
    let seed = arrowbus_tests::seed();
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));

    let clean = tmp.path().join("kill");
    let out = jepsen_like(&clean, seed, "kill", "150", &[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "kill run not valid:\n{text}");
    let r = recheck(&clean);
    assert!(r.valid);
    assert!(
        r.acknowledged_values > 200,
        "too few acknowledged writes:\n{text}"
    );
    assert!(
        r.ops["send"]["info"] >= 1,
        "the kill was never noticed:\n{text}"
    );
    assert!(text.contains("kill x"), "{text}");
    for f in ["summary.txt", "results.json", "timeline.png"] {
        assert!(clean.join(f).exists(), "{f} missing");
    }

    let lossy = tmp.path().join("rollback");
    let out = jepsen_like(&lossy, seed, "rollback", "151", &[]);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "rollback must be reported:\n{text}"
    );
    let r = recheck(&lossy);
    // A rollback hands the lost writes' offsets to new values, so the loss
    // always shows as inconsistent offsets. It is also a lost write when no
    // poll read the rolled-back value before the rollback; with consumers
    // that keep up, they usually did.
    assert!(r.anomaly_counts["inconsistent-offsets"] > 0, "{text}");
    // `--expect` turns the same finding into success (the self-test mode).
    let out = Command::new(env!("CARGO_BIN_EXE_jepsen-like"))
        .args(["check", "--expect", "inconsistent-offsets"])
        .arg(lossy.join("history.jsonl"))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

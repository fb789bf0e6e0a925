//! Results as a markdown report and a JSON twin, with everything needed to
//! reproduce and judge them: the exact command line, date, machine, git
//! commit, fsync setting and the disk's own limits. Targets are reported
//! against, never asserted.
//!
//! Rendering is pure; only [`Report::write`] and [`Environment::probe`]
//! touch the file system or run commands.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{json, Value};

use crate::disk::{DdResult, DiskReport, SyncResult};
use crate::latency::Summary;
use crate::run::PhaseResult;

/// Target: 1 MiB batches at this fraction of the disk's fdatasync bandwidth.
const TARGET_1MIB_FRACTION_OF_DD: f64 = 0.70;
/// Target: p99 publish→deliver at 1,000 batches/s of 1,000 rows, in µs.
const TARGET_P99_US: f64 = 1000.0;
/// Target: broker peak RSS with a 10 GB backlog and a slow subscriber, in MB.
const TARGET_BACKLOG_RSS_MB: f64 = 256.0;
/// The backlog the RSS target is stated for, in GB.
const TARGET_BACKLOG_GB: f64 = 10.0;

/// Where and on what the run happened.
#[derive(Debug, Clone)]
pub struct Environment {
    pub command_line: String,
    pub date_utc: String,
    pub nproc: usize,
    pub mem_total_kb: Option<u64>,
    pub kernel: String,
    pub cpu_model: String,
    pub git_commit: String,
    /// `/proc/loadavg` (1, 5, 15 min) when the run started: other work on
    /// the machine shows up in every number.
    pub loadavg: String,
}

impl Environment {
    pub fn probe() -> Self {
        let args: Vec<String> = std::env::args().map(|a| shell_quote(&a)).collect();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
        let dirty = git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
        Self {
            command_line: args.join(" "),
            date_utc: utc_timestamp(SystemTime::now()),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem_total_kb: crate::spawn::status_field_kb(&meminfo, "MemTotal"),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| {
                    l.strip_prefix("model name")
                        .and_then(|r| r.split(':').nth(1))
                })
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|| "unknown".into()),
            loadavg: load_average(),
            git_commit: if dirty {
                format!("{commit} (with uncommitted changes)")
            } else {
                commit
            },
        }
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// What was measured about the broker as a process.
#[derive(Debug, Clone, Default)]
pub struct BrokerInfo {
    /// How busbench reached the broker (the spawn command or the address).
    pub how: String,
    pub fsync: String,
    pub pid: Option<u32>,
    /// VmHWM at the end of the run, in kB.
    pub peak_rss_kb: Option<u64>,
    /// Largest VmRSS sampled during the run, in kB.
    pub max_sampled_rss_kb: Option<u64>,
    /// RSS timeline: (seconds since start, kB), thinned for the report.
    pub rss_samples: Vec<(f64, u64)>,
    pub stop: Option<String>,
}

/// The backlog mode's summary.
#[derive(Debug, Clone)]
pub struct BacklogInfo {
    pub gb_requested: f64,
    pub subscriber_delay_ms: f64,
    pub data_dir_bytes: Option<u64>,
}

pub struct Report {
    pub title: String,
    pub env: Environment,
    pub broker: BrokerInfo,
    pub disk: Option<DiskReport>,
    pub phases: Vec<PhaseResult>,
    pub backlog: Option<BacklogInfo>,
    pub notes: Vec<String>,
}

impl Report {
    /// Write `<stem>.md` and `<stem>.json`; returns both paths.
    pub fn write(&self, md_path: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
        if let Some(dir) = md_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json_path = md_path.with_extension("json");
        std::fs::write(md_path, self.markdown())
            .with_context(|| format!("writing {}", md_path.display()))?;
        let json =
            serde_json::to_string_pretty(&self.json()).context("encoding the JSON report")?;
        std::fs::write(&json_path, json + "\n")
            .with_context(|| format!("writing {}", json_path.display()))?;
        Ok((md_path.to_path_buf(), json_path))
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let e = &self.env;
        let _ = writeln!(s, "# {}\n", self.title);
        let _ = writeln!(s, "```\n{}\n```\n", e.command_line);
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| date (UTC) | {} |", e.date_utc);
        let _ = writeln!(s, "| git commit | {} |", e.git_commit);
        let _ = writeln!(
            s,
            "| machine | {} CPUs ({}), {} RAM, Linux {} |",
            e.nproc,
            e.cpu_model,
            mem(e.mem_total_kb),
            e.kernel
        );
        let _ = writeln!(s, "| load average at start (1/5/15 min) | {} |", e.loadavg);
        let _ = writeln!(s, "| broker | {} |", self.broker.how);
        let _ = writeln!(s, "| fsync | {} |", self.broker.fsync);
        if let Some(d) = &self.disk {
            let fs = d.filesystem.as_ref().map_or("unknown".to_owned(), |m| {
                format!(
                    "{} on {} (mounted at {})",
                    m.fs_type, m.source, m.mount_point
                )
            });
            let _ = writeln!(s, "| data directory | {} — {} |", d.dir.display(), fs);
        }
        let _ = writeln!(
            s,
            "\nbusbench and busd share this machine's CPUs; MB = 10^6 bytes; batch bytes are the Arrow IPC body (each stored batch adds an 80-byte header).\n"
        );

        let targets = self.targets();
        if !targets.is_empty() {
            let _ = writeln!(s, "## Targets (reported, not asserted)\n");
            let _ = writeln!(s, "| target | measured | verdict |\n|---|---|---|");
            for (t, m, v) in &targets {
                let _ = writeln!(s, "| {t} | {m} | {v} |");
            }
            s.push('\n');
        }

        if let Some(d) = &self.disk {
            let _ = writeln!(
                s,
                "## Disk baseline (same file system as the broker's data)\n"
            );
            let _ = writeln!(s, "| measurement | result |\n|---|---|");
            match &d.dd {
                Ok(dd) => {
                    let _ = writeln!(
                        s,
                        "| `{}` | {:.1} MB/s ({} MiB in {:.2} s) |",
                        dd.command, dd.mb_per_s, dd.mib, dd.seconds
                    );
                }
                Err(e) => {
                    let _ = writeln!(
                        s,
                        "| dd oflag=direct conv=fdatasync | failed: {} |",
                        one_line(e)
                    );
                }
            }
            for (name, r) in [
                ("4 KiB append + fdatasync", &d.sync_4k),
                ("1 MiB append + fdatasync", &d.sync_1m),
            ] {
                match r {
                    Ok(r) => {
                        let _ = writeln!(s, "| {name} | {} |", sync_cell(r));
                    }
                    Err(e) => {
                        let _ = writeln!(s, "| {name} | failed: {} |", one_line(e));
                    }
                }
            }
            s.push('\n');
        }

        let closed: Vec<&PhaseResult> = self
            .phases
            .iter()
            .filter(|p| p.offered_rate.is_none())
            .collect();
        if !closed.is_empty() {
            let title = if self.backlog.is_some() {
                "Backlog publish"
            } else {
                "Publish throughput (closed loop, producer window full)"
            };
            let _ = writeln!(s, "## {title}\n");
            let _ = writeln!(
                s,
                "| batch | rows/batch | bytes/batch | partitions | acked batches/s | acked MB/s | acked rows/s | delivered MB/s | ack p50 / p99 (µs) | busd CPU | busbench CPU | busd max RSS | lost / errors |"
            );
            let _ = writeln!(
                s,
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
            );
            for p in closed {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.0} | {:.1} | {:.0} | {:.1} | {} | {} | {} | {} | {} |",
                    p.size_label,
                    p.rows_per_batch,
                    p.bytes_per_batch,
                    p.partitions,
                    p.acked_batches_per_s(),
                    p.acked_mb_per_s(),
                    p.acked_rows_per_s(),
                    p.delivered_mb_per_s(),
                    pcts(p.ack_latency),
                    cpu(p.broker_cpu_s, p.wall_secs),
                    cpu(p.client_cpu_s, p.wall_secs),
                    p.broker_rss_max_kb.map_or("—".into(), |k| mem(Some(k))),
                    health(p),
                );
            }
            s.push('\n');
        }

        let paced: Vec<&PhaseResult> = self
            .phases
            .iter()
            .filter(|p| p.offered_rate.is_some())
            .collect();
        if !paced.is_empty() {
            let _ = writeln!(s, "## Publish→deliver latency at fixed offered rates (from intended send time, no coordinated omission)\n");
            let _ = writeln!(
                s,
                "| batch | rows/batch | offered batches/s | achieved/s | offered MB/s | e2e p50 | e2e p99 | e2e p99.9 | e2e max | ack p50 / p99 | pacer lag p99 | busd CPU | lost / errors |"
            );
            let _ = writeln!(
                s,
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
            );
            for p in paced {
                let rate = p.offered_rate.unwrap_or(0.0);
                let e2e = p.e2e_latency;
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    p.size_label,
                    p.rows_per_batch,
                    rate,
                    p.achieved_send_rate(),
                    rate * p.bytes_per_batch as f64 / 1e6,
                    us(e2e.map(|l| l.p50_us)),
                    us(e2e.map(|l| l.p99_us)),
                    us(e2e.map(|l| l.p999_us)),
                    us(e2e.map(|l| l.max_us)),
                    pcts(p.ack_latency),
                    us(p.send_lag.map(|l| l.p99_us)),
                    cpu(p.broker_cpu_s, p.wall_secs),
                    health(p),
                );
            }
            let _ = writeln!(
                s,
                "\nLatencies in µs unless marked ms. *ack*: intended send → durable ack at the producer. *pacer lag*: how late busbench started a send (a full producer window or a busy machine; included in the latencies).\n"
            );
        }

        let _ = writeln!(s, "## Broker memory\n");
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(
            s,
            "| peak RSS (VmHWM at end of run) | {} |",
            self.broker
                .peak_rss_kb
                .map_or("not measured".into(), |k| mem(Some(k)))
        );
        let _ = writeln!(
            s,
            "| largest sampled VmRSS | {} |",
            self.broker
                .max_sampled_rss_kb
                .map_or("not measured".into(), |k| mem(Some(k)))
        );
        if let Some(b) = &self.backlog {
            let _ = writeln!(
                s,
                "| backlog requested | {} GB, subscriber pausing {} ms per batch |",
                b.gb_requested, b.subscriber_delay_ms
            );
            if let Some(bytes) = b.data_dir_bytes {
                let _ = writeln!(
                    s,
                    "| data directory size at end | {:.2} GB |",
                    bytes as f64 / 1e9
                );
            }
        }
        if let Some(stop) = &self.broker.stop {
            let _ = writeln!(s, "| busd shutdown | {stop} |");
        }
        let timeline = thin(&self.broker.rss_samples, 20);
        if !timeline.is_empty() {
            let cells: Vec<String> = timeline
                .iter()
                .map(|(t, k)| format!("{t:.0}s: {}", mem(Some(*k))))
                .collect();
            let _ = writeln!(s, "\nRSS timeline: {}", cells.join(", "));
        }

        let errors: Vec<&PhaseResult> = self
            .phases
            .iter()
            .filter(|p| !p.errors.is_empty())
            .collect();
        if !errors.is_empty() || !self.notes.is_empty() {
            let _ = writeln!(s, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
            for p in errors {
                for e in &p.errors {
                    let _ = writeln!(s, "- {}: {}", p.name, one_line(e));
                }
            }
        }
        s
    }

    /// (target, measured, verdict) for every target this run measured.
    pub fn targets(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let dd = self.disk.as_ref().and_then(|d| d.dd.as_ref().ok());
        if let Some(p) = self
            .phases
            .iter()
            .find(|p| p.offered_rate.is_none() && p.size_label == "1 MiB" && self.backlog.is_none())
        {
            let t = "1 MiB batches ≥ 70 % of fdatasync bandwidth".to_owned();
            let sync_1m = self.disk.as_ref().and_then(|d| d.sync_1m.as_ref().ok());
            let vs_loop = sync_1m.map_or(String::new(), |l| {
                format!(
                    "; {:.0} % of the 1 MiB append+fdatasync loop's {:.1} MB/s",
                    p.acked_mb_per_s() / l.mb_per_s * 100.0,
                    l.mb_per_s
                )
            });
            match dd {
                Some(dd) => {
                    let frac = p.acked_mb_per_s() / dd.mb_per_s;
                    out.push((
                        t,
                        format!(
                            "{:.1} MB/s = {:.0} % of dd's {:.1} MB/s{vs_loop}",
                            p.acked_mb_per_s(),
                            frac * 100.0,
                            dd.mb_per_s
                        ),
                        verdict(frac >= TARGET_1MIB_FRACTION_OF_DD),
                    ));
                }
                None => out.push((
                    t,
                    format!("{:.1} MB/s; no dd baseline", p.acked_mb_per_s()),
                    "not judged".into(),
                )),
            }
        }
        if let Some(p) = self.phases.iter().find(|p| {
            p.rows_per_batch == 1000
                && p.size_label == "1000 rows"
                && p.offered_rate == Some(1000.0)
        }) {
            let t = "p99 publish→deliver ≤ 1 ms at 1,000 batches/s of 1,000 rows".to_owned();
            match p.e2e_latency {
                Some(l) => out.push((
                    t,
                    format!("p99 {}", us(Some(l.p99_us))),
                    verdict(l.p99_us <= TARGET_P99_US),
                )),
                None => out.push((t, "nothing delivered".into(), "not met".into())),
            }
        }
        if let Some(b) = &self.backlog {
            let t = "busd RSS ≤ 256 MB with a 10 GB backlog and a slow subscriber".to_owned();
            match self.broker.peak_rss_kb {
                Some(k) => {
                    let mb = k as f64 * 1024.0 / 1e6;
                    let scope = if b.gb_requested < TARGET_BACKLOG_GB {
                        format!(" (backlog of {} GB only: indicative)", b.gb_requested)
                    } else {
                        String::new()
                    };
                    out.push((
                        t,
                        format!("peak {mb:.0} MB{scope}"),
                        verdict(mb <= TARGET_BACKLOG_RSS_MB),
                    ));
                }
                None => out.push((
                    t,
                    "busd RSS not measurable (external broker without --busd-pid)".into(),
                    "not judged".into(),
                )),
            }
        }
        out
    }

    pub fn json(&self) -> Value {
        let e = &self.env;
        json!({
            "title": self.title,
            "command_line": e.command_line,
            "date_utc": e.date_utc,
            "git_commit": e.git_commit,
            "machine": {
                "nproc": e.nproc,
                "mem_total_kb": e.mem_total_kb,
                "kernel": e.kernel,
                "cpu_model": e.cpu_model,
                "loadavg_at_start": e.loadavg,
            },
            "broker": {
                "how": self.broker.how,
                "fsync": self.broker.fsync,
                "pid": self.broker.pid,
                "peak_rss_kb": self.broker.peak_rss_kb,
                "max_sampled_rss_kb": self.broker.max_sampled_rss_kb,
                "rss_samples": self.broker.rss_samples.iter().map(|(t, k)| json!([t, k])).collect::<Vec<_>>(),
                "stop": self.broker.stop,
            },
            "disk": self.disk.as_ref().map(disk_json),
            "phases": self.phases.iter().map(phase_json).collect::<Vec<_>>(),
            "backlog": self.backlog.as_ref().map(|b| json!({
                "gb_requested": b.gb_requested,
                "subscriber_delay_ms": b.subscriber_delay_ms,
                "data_dir_bytes": b.data_dir_bytes,
            })),
            "targets": self.targets().into_iter().map(|(t, m, v)| json!({"target": t, "measured": m, "verdict": v})).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }
}

pub fn phase_json(p: &PhaseResult) -> Value {
    json!({
        "name": p.name,
        "batch": p.size_label,
        "rows_per_batch": p.rows_per_batch,
        "bytes_per_batch": p.bytes_per_batch,
        "partitions": p.partitions,
        "offered_batches_per_s": p.offered_rate,
        "achieved_send_batches_per_s": p.achieved_send_rate(),
        "sent": p.sent,
        "acked": p.acked,
        "delivered": p.delivered,
        "duplicates": p.duplicates,
        "reordered": p.reordered,
        "subscriber_failed": p.subscriber_failed,
        "lost": p.lost,
        "unacked_outstanding": p.unacked_outstanding,
        "errors_total": p.errors_total,
        "errors": p.errors,
        "acked_batches_per_s": p.acked_batches_per_s(),
        "acked_mb_per_s": p.acked_mb_per_s(),
        "acked_rows_per_s": p.acked_rows_per_s(),
        "delivered_mb_per_s": p.delivered_mb_per_s(),
        "send_lag": p.send_lag.map(Summary::to_json),
        "ack_latency": p.ack_latency.map(Summary::to_json),
        "e2e_latency": p.e2e_latency.map(Summary::to_json),
        "broker_rss_max_kb": p.broker_rss_max_kb,
        "broker_cpu_s": p.broker_cpu_s,
        "client_cpu_s": p.client_cpu_s,
        "wall_s": p.wall_secs,
    })
}

pub fn disk_json(d: &DiskReport) -> Value {
    let dd = |r: &Result<DdResult, String>| match r {
        Ok(d) => {
            json!({"command": d.command, "bytes": d.bytes, "seconds": d.seconds, "mb_per_s": d.mb_per_s})
        }
        Err(e) => json!({"error": e}),
    };
    let sync = |r: &Result<SyncResult, String>| match r {
        Ok(s) => json!({
            "block_bytes": s.block_bytes, "rounds": s.rounds, "seconds": s.seconds,
            "syncs_per_s": s.syncs_per_s, "mb_per_s": s.mb_per_s,
            "latency": s.latency.map(Summary::to_json),
        }),
        Err(e) => json!({"error": e}),
    };
    json!({
        "dir": d.dir.display().to_string(),
        "filesystem": d.filesystem.as_ref().map(|m| json!({"mount_point": m.mount_point, "fs_type": m.fs_type, "source": m.source})),
        "dd": dd(&d.dd),
        "append_fdatasync_4k": sync(&d.sync_4k),
        "append_fdatasync_1m": sync(&d.sync_1m),
    })
}

fn sync_cell(r: &SyncResult) -> String {
    let lat = r.latency.map_or(String::new(), |l| {
        format!(
            ", latency p50 {} p99 {}",
            us(Some(l.p50_us)),
            us(Some(l.p99_us))
        )
    });
    format!("{:.0} syncs/s, {:.1} MB/s{lat}", r.syncs_per_s, r.mb_per_s)
}

fn verdict(met: bool) -> String {
    if met { "met" } else { "NOT met" }.to_owned()
}

fn health(p: &PhaseResult) -> String {
    let mut s = format!("{} / {}", p.lost, p.errors_total);
    if p.unacked_outstanding > 0 {
        let _ = write!(s, ", {} unacked", p.unacked_outstanding);
    }
    if p.duplicates > 0 {
        let _ = write!(s, ", {} dup", p.duplicates);
    }
    if p.reordered > 0 {
        let _ = write!(s, ", {} out of order", p.reordered);
    }
    s
}

/// A latency in µs, switching to ms above 10 ms for readability.
fn us(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(v) if v >= 10_000.0 => format!("{:.1} ms", v / 1000.0),
        Some(v) => format!("{v:.0}"),
    }
}

fn pcts(l: Option<Summary>) -> String {
    match l {
        None => "—".into(),
        Some(l) => format!("{} / {}", us(Some(l.p50_us)), us(Some(l.p99_us))),
    }
}

fn cpu(s: Option<f64>, wall: f64) -> String {
    match s {
        Some(s) if wall > 0.0 => format!("{:.0} %", s / wall * 100.0),
        _ => "—".into(),
    }
}

pub fn mem(kb: Option<u64>) -> String {
    match kb {
        None => "unknown".into(),
        Some(k) if k >= 1024 * 1024 => format!("{:.1} GiB", k as f64 / (1024.0 * 1024.0)),
        Some(k) => format!("{:.0} MiB", k as f64 / 1024.0),
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '|'], " ")
}

/// At most `n` evenly spaced samples, always including the largest.
fn thin(samples: &[(f64, u64)], n: usize) -> Vec<(f64, u64)> {
    if samples.len() <= n {
        return samples.to_vec();
    }
    let step = samples.len().div_ceil(n);
    let mut out: Vec<(f64, u64)> = samples.iter().step_by(step).copied().collect();
    if let Some(max) = samples.iter().max_by_key(|(_, k)| *k) {
        if !out.contains(max) {
            out.push(*max);
            out.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
    out
}

fn shell_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        a.to_owned()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// `2024-05-01T12:34:56Z` for a time.
pub fn utc_timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let r = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        r / 3600,
        r % 3600 / 60,
        r % 60
    )
}

/// `2024-05-01` for a time: the default results file name.
pub fn utc_date(t: SystemTime) -> String {
    utc_timestamp(t)[..10].to_owned()
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_format() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            utc_timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            utc_timestamp(UNIX_EPOCH + Duration::from_secs(1_735_689_599)),
            "2024-12-31T23:59:59Z"
        );
        assert_eq!(
            utc_date(UNIX_EPOCH + Duration::from_secs(1_735_689_600)),
            "2025-01-01"
        );
    }

    #[test]
    fn thinning_keeps_the_peak() {
        let samples: Vec<(f64, u64)> = (0..100)
            .map(|i| (i as f64, if i == 37 { 999 } else { 10 }))
            .collect();
        let t = thin(&samples, 10);
        assert!(t.len() <= 11);
        assert!(t.contains(&(37.0, 999)));
    }

    #[test]
    fn quoting_is_shell_safe() {
        assert_eq!(shell_quote("--sizes=1,1000"), "--sizes=1,1000");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}

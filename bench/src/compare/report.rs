//! The comparison's results: a markdown report with medians over the
//! repetitions (every number beside its durability setting), a JSON twin
//! with every phase of every repetition, and PNG plots drawn from the JSON
//! by `bench/peers/plot.py`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use super::{Contender, Measured, ServerInfo, System};
use crate::disk::DiskReport;
use crate::report::{self as base, Environment};
use crate::run::PhaseResult;
use crate::workload::SizeSpec;

/// Target: arrowbus (fsync always) throughput over Kafka's (default
/// durability) for 64 KiB and 1 MiB batches, with 3 replicas.
const TARGET_THROUGHPUT_X_KAFKA: f64 = 2.0;
/// Target: arrowbus p99 at 50 % load as a fraction of Kafka's, 3 replicas.
const TARGET_P99_FRACTION_OF_KAFKA: f64 = 0.5;
/// The load level the p99 target is stated at, in percent.
const TARGET_P99_LOAD_PCT: f64 = 50.0;
/// Target (issue 3): arrowbus with 3 replicas at this fraction of the
/// disk's fdatasync bandwidth divided by 3 (the three replicas share one
/// disk on a one-machine cluster).
const TARGET_R3_FRACTION_OF_DISK_SHARE: f64 = 0.80;
/// The batch size that target is judged at: the largest, where fsync
/// latency no longer dominates.
const TARGET_R3_SIZE: SizeSpec = SizeSpec::Bytes(1024 * 1024);

pub struct ArgsSummary {
    pub sizes: Vec<SizeSpec>,
    pub load: Vec<f64>,
    pub duration: Duration,
    pub warmup: Duration,
    pub reps: usize,
    pub window: usize,
    /// The arrowbus producer's linger, ms (`None`: off).
    pub arrowbus_linger_ms: Option<f64>,
    /// Module versions of the Python producers' interpreter; `None` when
    /// that row was not measured.
    pub python: Option<Vec<(String, String)>>,
}

pub struct CompareReport {
    pub env: Environment,
    pub args: ArgsSummary,
    pub contenders: Vec<Contender>,
    pub infos: Vec<(Contender, ServerInfo)>,
    pub measured: Vec<Measured>,
    /// The disk baseline in the servers' work directory, one per repetition.
    pub disks: Vec<DiskReport>,
    /// (row, why it was not measured).
    pub unavailable: Vec<(String, String)>,
    pub notes: Vec<String>,
}

/// Medians over repetitions of one contender's closed-loop phase at one size.
#[derive(Debug, Clone, Copy)]
pub struct MaxStat {
    pub reps: usize,
    pub mb_per_s: f64,
    pub mb_min: f64,
    pub mb_max: f64,
    pub rows_per_s: f64,
    pub batches_per_s: f64,
    pub bytes_per_batch: usize,
    pub server_cpu_s_per_gb: Option<f64>,
    pub client_cpu_s_per_gb: Option<f64>,
    pub server_rss_kb: Option<f64>,
    pub lost: u64,
    pub errors: u64,
}

/// Medians over repetitions of one contender's paced phase.
#[derive(Debug, Clone, Copy)]
pub struct LatStat {
    pub reps: usize,
    pub offered: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub lost: u64,
    pub errors: u64,
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Throughput as a fraction of each replica's share of the disk: `replicas`
/// copies of every byte are fdatasynced to one disk of `disk_mb_per_s`.
pub fn disk_share_fraction(mb_per_s: f64, disk_mb_per_s: f64, replicas: usize) -> Option<f64> {
    let share = disk_mb_per_s / replicas.max(1) as f64;
    (share > 0.0 && mb_per_s.is_finite()).then(|| mb_per_s / share)
}

/// Acknowledged batches and what became of them, summed over every
/// measured phase (closed loop and paced) of one contender.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accounting {
    pub phases: usize,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    /// Acked, never delivered, in phases whose subscriber read to the end.
    pub lost: u64,
    /// Acked, not delivered, in phases whose subscriber failed early: not
    /// checked (the subscriber's error is in the notes).
    pub unchecked: u64,
    pub reordered: u64,
    pub duplicates: u64,
    pub unacked: u64,
    pub errors: u64,
}

impl Accounting {
    pub fn add(&mut self, p: &PhaseResult) {
        self.phases += 1;
        self.sent += p.sent;
        self.acked += p.acked;
        self.delivered += p.delivered;
        if p.subscriber_failed {
            self.unchecked += p.lost;
        } else {
            self.lost += p.lost;
        }
        self.reordered += p.reordered;
        self.duplicates += p.duplicates;
        self.unacked += p.unacked_outstanding;
        self.errors += p.errors_total;
    }
}

fn per_gb(cpu: Option<f64>, p: &PhaseResult) -> Option<f64> {
    let gb = (p.acked * p.bytes_per_batch as u64) as f64 / 1e9;
    cpu.filter(|_| gb > 0.0).map(|c| c / gb)
}

impl CompareReport {
    /// The Rust driver's phases (`python`: the Python producers').
    fn phases_of(
        &self,
        c: Contender,
        size: SizeSpec,
        load: Option<f64>,
        python: bool,
    ) -> Vec<&PhaseResult> {
        self.measured
            .iter()
            .filter(|m| {
                !m.warmup
                    && m.python == python
                    && m.contender == c
                    && m.size == size
                    && m.load_pct == load
            })
            .map(|m| &m.phase)
            .collect()
    }

    fn phases(&self, c: Contender, size: SizeSpec, load: Option<f64>) -> Vec<&PhaseResult> {
        self.phases_of(c, size, load, false)
    }

    pub fn max_stat(&self, c: Contender, size: SizeSpec) -> Option<MaxStat> {
        max_stat_of(&self.phases(c, size, None))
    }

    /// The Python producer's closed-loop phases of `c` at `size`.
    pub fn python_stat(&self, c: Contender, size: SizeSpec) -> Option<MaxStat> {
        max_stat_of(&self.phases_of(c, size, None, true))
    }

    /// Contenders with a Python row.
    fn python_rows(&self) -> Vec<Contender> {
        self.rows()
            .into_iter()
            .filter(|c| self.measured.iter().any(|m| m.python && m.contender == *c))
            .collect()
    }
}

fn max_stat_of(ps: &[&PhaseResult]) -> Option<MaxStat> {
    let first = ps.first()?;
    let mbs: Vec<f64> = ps.iter().map(|p| p.acked_mb_per_s()).collect();
    Some(MaxStat {
        reps: ps.len(),
        mb_per_s: median(mbs.clone())?,
        mb_min: mbs.iter().copied().fold(f64::INFINITY, f64::min),
        mb_max: mbs.iter().copied().fold(0.0, f64::max),
        rows_per_s: median(ps.iter().map(|p| p.acked_rows_per_s()).collect())?,
        batches_per_s: median(ps.iter().map(|p| p.acked_batches_per_s()).collect())?,
        bytes_per_batch: first.bytes_per_batch,
        server_cpu_s_per_gb: median(
            ps.iter()
                .filter_map(|p| per_gb(p.broker_cpu_s, p))
                .collect(),
        ),
        client_cpu_s_per_gb: median(
            ps.iter()
                .filter_map(|p| per_gb(p.client_cpu_s, p))
                .collect(),
        ),
        server_rss_kb: median(
            ps.iter()
                .filter_map(|p| p.broker_rss_max_kb.map(|k| k as f64))
                .collect(),
        ),
        lost: ps.iter().map(|p| p.lost).sum(),
        errors: ps.iter().map(|p| p.errors_total).sum(),
    })
}

impl CompareReport {
    pub fn lat_stat(&self, c: Contender, size: SizeSpec, load: f64) -> Option<LatStat> {
        let ps = self.phases(c, size, Some(load));
        let lats: Vec<_> = ps.iter().filter_map(|p| p.e2e_latency).collect();
        Some(LatStat {
            reps: ps.len(),
            offered: median(ps.iter().filter_map(|p| p.offered_rate).collect())?,
            p50_us: median(lats.iter().map(|l| l.p50_us).collect())?,
            p99_us: median(lats.iter().map(|l| l.p99_us).collect())?,
            p999_us: median(lats.iter().map(|l| l.p999_us).collect())?,
            lost: ps.iter().map(|p| p.lost).sum(),
            errors: ps.iter().map(|p| p.errors_total).sum(),
        })
    }

    /// Contenders with at least one measured phase (the others are listed
    /// as unavailable or in the notes).
    fn rows(&self) -> Vec<Contender> {
        self.contenders
            .iter()
            .copied()
            .filter(|c| self.measured.iter().any(|m| m.contender == *c))
            .collect()
    }

    fn info(&self, c: Contender) -> Option<&ServerInfo> {
        self.infos.iter().find(|(k, _)| *k == c).map(|(_, i)| i)
    }

    pub fn accounting(&self, c: Contender) -> Accounting {
        let mut a = Accounting::default();
        for m in self.measured.iter().filter(|m| m.contender == c) {
            a.add(&m.phase);
        }
        a
    }

    /// Median over repetitions of the dd bandwidth (`oflag=direct
    /// conv=fdatasync`) and of the 1 MiB append+fdatasync loop, MB/s.
    pub fn disk_medians(&self) -> (Option<f64>, Option<f64>) {
        let dd = self
            .disks
            .iter()
            .filter_map(|d| d.dd.as_ref().ok().map(|r| r.mb_per_s))
            .collect();
        let sync = self
            .disks
            .iter()
            .filter_map(|d| d.sync_1m.as_ref().ok().map(|r| r.mb_per_s))
            .collect();
        (median(dd), median(sync))
    }

    /// The measured arrowbus contender with `replicas`.
    fn arrowbus(&self, replicas: usize) -> Option<Contender> {
        self.rows()
            .into_iter()
            .find(|c| c.system == System::Arrowbus && c.replicas == replicas)
    }

    /// The disk baseline of every repetition.
    fn disk_markdown(&self, s: &mut String) {
        let Some(first) = self.disks.first() else {
            return;
        };
        let _ = writeln!(
            s,
            "## Disk baseline (the servers' work directory, at the start of each repetition)\n"
        );
        let fs = first.filesystem.as_ref().map_or(String::new(), |m| {
            format!(
                " — {} on {} (mounted at {})",
                m.fs_type, m.source, m.mount_point
            )
        });
        let _ = writeln!(s, "Directory: `{}`{fs}.", first.dir.display());
        if let Ok(dd) = &first.dd {
            let _ = writeln!(
                s,
                "dd: `{}` (sequential bandwidth with fdatasync: what the targets call the disk's fdatasync bandwidth).",
                dd.command
            );
        }
        let _ = writeln!(
            s,
            "\n| repetition | dd MB/s | 1 MiB append + fdatasync | 4 KiB append + fdatasync |\n|---|---:|---:|---:|"
        );
        let sync = |r: &Result<crate::disk::SyncResult, String>| match r {
            Ok(x) => format!(
                "{:.0} syncs/s, {:.1} MB/s, p50 {}",
                x.syncs_per_s,
                x.mb_per_s,
                x.latency
                    .map_or("—".into(), |l| format!("{} ms", ms(l.p50_us)))
            ),
            Err(e) => format!("failed: {}", one_line(e)),
        };
        for (i, d) in self.disks.iter().enumerate() {
            let dd = match &d.dd {
                Ok(x) => format!("{:.1}", x.mb_per_s),
                Err(e) => format!("failed: {}", one_line(e)),
            };
            let _ = writeln!(
                s,
                "| {} | {dd} | {} | {} |",
                i + 1,
                sync(&d.sync_1m),
                sync(&d.sync_4k)
            );
        }
        let (dd, loop_1m) = self.disk_medians();
        let _ = writeln!(s, "| median | {} | {} MB/s | |\n", opt1(dd), opt1(loop_1m));
    }

    /// arrowbus R1 against R3 side by side, read against the disk.
    fn replication_markdown(&self, s: &mut String) {
        let Some(r3) = self.arrowbus(3) else {
            return;
        };
        let r1 = self.arrowbus(1);
        let (dd, loop_1m) = self.disk_medians();
        let _ = writeln!(
            s,
            "## arrowbus: 1 replica versus 3 replicas (fsync always)\n"
        );
        let _ = writeln!(
            s,
            "R3: three `busd` processes (`busd dev --nodes 3`) on this machine, one topic with `--replicas 3`: a batch is acked once fdatasynced on 2 of 3 nodes, and all three write it to the same disk, so the disk's bandwidth ÷ 3 is each replica's share. The three nodes and busbench share {} CPUs. Medians over repetitions; *disk share* = R3 MB/s ÷ (disk MB/s ÷ 3).\n",
            self.env.nproc
        );
        let _ = writeln!(
            s,
            "| batch | R1 MB/s | R3 MB/s | R3 / R1 | R3 share of dd ÷ 3 | R3 share of 1 MiB fdatasync loop ÷ 3 |\n|---|---:|---:|---:|---:|---:|"
        );
        let pct = |v: Option<f64>| v.map_or("—".into(), |v| format!("{:.0} %", v * 100.0));
        for z in &self.args.sizes {
            let a = r1.and_then(|c| self.max_stat(c, *z));
            let b = self.max_stat(r3, *z);
            let b_mb = b.map(|m| m.mb_per_s);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                z.label(),
                opt1(a.map(|m| m.mb_per_s)),
                opt1(b_mb),
                a.zip(b).map_or("—".into(), |(a, b)| format!(
                    "{:.2}",
                    b.mb_per_s / a.mb_per_s
                )),
                pct(b_mb.zip(dd).and_then(|(m, d)| disk_share_fraction(m, d, 3))),
                pct(b_mb
                    .zip(loop_1m)
                    .and_then(|(m, d)| disk_share_fraction(m, d, 3))),
            );
        }
        let _ = writeln!(
            s,
            "\nPublish→deliver p50 / p99 / p99.9 (ms) at a fixed fraction of each one's own maximum:\n"
        );
        let _ = writeln!(s, "| batch | load | R1 | R3 |\n|---|---:|---:|---:|");
        let cell = |l: Option<LatStat>| {
            l.map_or("—".into(), |l| {
                format!(
                    "{} / {} / {} @{:.0}/s",
                    ms(l.p50_us),
                    ms(l.p99_us),
                    ms(l.p999_us),
                    l.offered
                )
            })
        };
        for z in &self.args.sizes {
            for &load in &self.args.load {
                let _ = writeln!(
                    s,
                    "| {} | {load:.0} % | {} | {} |",
                    z.label(),
                    cell(r1.and_then(|c| self.lat_stat(c, *z, load))),
                    cell(self.lat_stat(r3, *z, load))
                );
            }
        }
        s.push('\n');
    }

    /// Issue 3's target: R3 throughput against the disk's fdatasync
    /// bandwidth ÷ 3, judged at 1 MiB batches (the largest size measured
    /// when 1 MiB was not).
    fn disk_share_target(&self) -> Option<(String, String, String)> {
        let r3 = self.arrowbus(3)?;
        let z = if self.args.sizes.contains(&TARGET_R3_SIZE) {
            TARGET_R3_SIZE
        } else {
            *self.args.sizes.last()?
        };
        let m = self.max_stat(r3, z)?;
        let t = format!(
            "arrowbus R3 throughput ≥ {:.0} % of the disk's fdatasync bandwidth ÷ 3 ({} batches)",
            TARGET_R3_FRACTION_OF_DISK_SHARE * 100.0,
            z.label()
        );
        let (dd, loop_1m) = self.disk_medians();
        let Some(dd) = dd else {
            return Some((
                t,
                format!("{:.1} MB/s; no disk baseline in this run", m.mb_per_s),
                "not judged".into(),
            ));
        };
        let frac = disk_share_fraction(m.mb_per_s, dd, 3)?;
        let vs_loop = loop_1m
            .and_then(|l| disk_share_fraction(m.mb_per_s, l, 3).map(|f| (l, f)))
            .map_or(String::new(), |(l, f)| {
                format!(
                    "; {:.0} % of the 1 MiB append+fdatasync loop's {l:.1} MB/s ÷ 3",
                    f * 100.0
                )
            });
        Some((
            t,
            format!(
                "{:.1} MB/s = {:.0} % of dd's {dd:.1} MB/s ÷ 3 = {:.1} MB/s (target {:.1} MB/s){vs_loop}",
                m.mb_per_s,
                frac * 100.0,
                dd / 3.0,
                dd / 3.0 * TARGET_R3_FRACTION_OF_DISK_SHARE
            ),
            verdict(frac >= TARGET_R3_FRACTION_OF_DISK_SHARE),
        ))
    }

    fn systems_title(&self) -> String {
        let mut names: Vec<&str> = Vec::new();
        for c in &self.contenders {
            let n = match c.system {
                System::Arrowbus => "arrowbus",
                System::Kafka => "Apache Kafka",
                System::Nats => "NATS JetStream",
                System::Redis => "Redis Streams",
            };
            if !names.contains(&n) {
                names.push(n);
            }
        }
        let mut reps: Vec<String> = self
            .contenders
            .iter()
            .map(|c| format!("R{}", c.replicas))
            .collect();
        reps.dedup();
        format!("{} ({})", names.join(", "), reps.join(", "))
    }

    /// Write `<stem>.md`, `<stem>.json` and, when `python` has matplotlib,
    /// `<stem>-throughput.png` and `<stem>-latency.png`.
    pub fn write(&self, md_path: &Path, python: Option<&Path>) -> anyhow::Result<Vec<PathBuf>> {
        if let Some(dir) = md_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json_path = md_path.with_extension("json");
        let json =
            serde_json::to_string_pretty(&self.json()).context("encoding the JSON report")?;
        std::fs::write(&json_path, json + "\n")
            .with_context(|| format!("writing {}", json_path.display()))?;
        let mut written = vec![md_path.to_path_buf(), json_path.clone()];
        let stem = md_path.with_extension("");
        let mut plot_note = None;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/plot.py");
        let python = python
            .filter(|p| p.exists())
            .map_or_else(|| PathBuf::from("python3"), Path::to_path_buf);
        match std::process::Command::new(&python)
            .arg(&script)
            .arg(&json_path)
            .arg(&stem)
            .output()
        {
            Ok(o) if o.status.success() => {
                for suffix in ["-throughput.png", "-latency.png"] {
                    let p = PathBuf::from(format!("{}{suffix}", stem.display()));
                    if p.exists() {
                        written.push(p);
                    }
                }
            }
            Ok(o) => {
                plot_note = Some(format!(
                    "plots not drawn: {} failed: {}",
                    script.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => {
                plot_note = Some(format!(
                    "plots not drawn: running {}: {e}",
                    python.display()
                ))
            }
        }
        let mut md = self.markdown();
        let pngs: Vec<String> = written
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        if !pngs.is_empty() {
            md.push_str("\n## Plots\n\n");
            for p in pngs {
                let _ = writeln!(md, "![{p}]({p})\n");
            }
        }
        if let Some(n) = plot_note {
            eprintln!("busbench: {n}");
            let _ = writeln!(md, "\n- {n}");
        }
        std::fs::write(md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
        Ok(written)
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let e = &self.env;
        let a = &self.args;
        let _ = writeln!(s, "# busbench compare: {}\n", self.systems_title());
        let _ = writeln!(s, "```\n{}\n```\n", e.command_line);
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| date (UTC) | {} |", e.date_utc);
        let _ = writeln!(s, "| git commit | {} |", e.git_commit);
        let _ = writeln!(
            s,
            "| machine | {} CPUs ({}), {} RAM, Linux {} — servers and load generator share it |",
            e.nproc,
            e.cpu_model,
            base::mem(e.mem_total_kb),
            e.kernel
        );
        let _ = writeln!(s, "| load average at start (1/5/15 min) | {} |", e.loadavg);
        let _ = writeln!(
            s,
            "| method | {} repetitions, systems alternated (order rotated each repetition), fresh servers per system and repetition, {:?} warm-up excluded, {:?} per phase; medians over repetitions |",
            a.reps, a.warmup, a.duration
        );
        let linger = match a.arrowbus_linger_ms {
            None => "no linger (every send is its own stored batch)".to_owned(),
            Some(0.0) => "linger 0: the sends that queue up while the window is full are coalesced into one stored batch (as librdkafka batches while its requests are in flight)".to_owned(),
            Some(ms) => format!("linger {ms} ms: sends within {ms} ms are coalesced into one stored batch"),
        };
        let _ = writeln!(
            s,
            "| producer window | arrowbus: its client's 5 batches / 64 MiB in flight, {linger}; peers: {} batches and 64 MiB unacknowledged |",
            a.window
        );
        let _ = writeln!(
            s,
            "\nEvery system receives the same bytes: the Arrow IPC body (dictionary + record batch messages) of the same tick batches, encoded per send; every subscriber decodes them back to a `RecordBatch`. One partition / stream, one producer, one subscriber from the start, in one busbench process. Transport: arrowbus always runs QUIC with TLS 1.3 (encryption on both sides is part of its cost); the peers run plaintext TCP on loopback, their usual loopback setup. MB = 10^6 bytes of Arrow body. Latency is publish→deliver from the *intended* send time (no coordinated omission).\n"
        );

        // Systems.
        let _ = writeln!(s, "## Systems and durability\n");
        let _ = writeln!(
            s,
            "| system | version | when the ack is sent | load average when it started, per repetition |\n|---|---|---|---|"
        );
        for c in &self.rows() {
            let v = self.info(*c).map_or("—".into(), |i| i.version.clone());
            let loads = self.info(*c).map_or("—".into(), |i| i.loads.join("; "));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {loads} |",
                c.label(),
                one_line(&v),
                c.durability()
            );
        }
        for (row, why) in &self.unavailable {
            let _ = writeln!(s, "| {row} | — | {why} | |");
        }
        s.push('\n');

        self.disk_markdown(&mut s);
        self.replication_markdown(&mut s);

        // Summary table: MB/s by size.
        let _ = writeln!(
            s,
            "## Maximum publish throughput (closed loop), median MB/s (rows/s)\n"
        );
        let _ = write!(s, "| system | durability |");
        for z in &a.sizes {
            let _ = write!(s, " {} |", z.label());
        }
        let _ = write!(s, "\n|---|---|");
        for _ in &a.sizes {
            s.push_str("---:|");
        }
        s.push('\n');
        for c in &self.rows() {
            let _ = write!(s, "| {} | {} |", c.label(), short_durability(c));
            for z in &a.sizes {
                match self.max_stat(*c, *z) {
                    Some(m) => {
                        let _ = write!(s, " {:.1} ({}) |", m.mb_per_s, rows(m.rows_per_s));
                    }
                    None => s.push_str(" — |"),
                }
            }
            s.push('\n');
        }
        s.push('\n');

        self.python_markdown(&mut s);

        // p99 summary at each load.
        for &load in &a.load {
            let _ = writeln!(
                s,
                "## Publish→deliver p50 / p99 / p99.9 at {load:.0} % of each system's maximum\n"
            );
            let _ = write!(s, "| system | durability |");
            for z in &a.sizes {
                let _ = write!(s, " {} |", z.label());
            }
            let _ = write!(s, "\n|---|---|");
            for _ in &a.sizes {
                s.push_str("---:|");
            }
            s.push('\n');
            for c in &self.rows() {
                let _ = write!(s, "| {} | {} |", c.label(), short_durability(c));
                for z in &a.sizes {
                    match self.lat_stat(*c, *z, load) {
                        Some(l) => {
                            let _ = write!(
                                s,
                                " {} / {} / {} @{:.0}/s |",
                                ms(l.p50_us),
                                ms(l.p99_us),
                                ms(l.p999_us),
                                l.offered
                            );
                        }
                        None => s.push_str(" — |"),
                    }
                }
                s.push('\n');
            }
            let _ = writeln!(
                s,
                "\nms; `@N/s`: the offered rate in batches/s (median over repetitions).\n"
            );
        }

        // Targets.
        let targets = self.targets();
        if !targets.is_empty() {
            let _ = writeln!(s, "## Targets (reported, not asserted)\n");
            let _ = writeln!(s, "| target | measured | verdict |\n|---|---|---|");
            for (t, m, v) in &targets {
                let _ = writeln!(s, "| {t} | {m} | {v} |");
            }
            s.push('\n');
        }

        // Details per size.
        let _ = writeln!(s, "## Details per batch size\n");
        for z in &a.sizes {
            let bytes = self
                .rows()
                .iter()
                .find_map(|c| self.max_stat(*c, *z))
                .map_or(0, |m| m.bytes_per_batch);
            let _ = writeln!(
                s,
                "### {} ({bytes} bytes of Arrow IPC per batch)\n",
                z.label()
            );
            let _ = writeln!(
                s,
                "| system | durability | max MB/s (min–max) | rows/s | batches/s | server CPU s/GB | client CPU s/GB | server RSS | lost / errors |"
            );
            let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---|");
            for c in &self.rows() {
                let Some(m) = self.max_stat(*c, *z) else {
                    continue;
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} ({:.1}–{:.1}) | {} | {:.0} | {} | {} | {} | {} / {} |",
                    c.label(),
                    short_durability(c),
                    m.mb_per_s,
                    m.mb_min,
                    m.mb_max,
                    rows(m.rows_per_s),
                    m.batches_per_s,
                    opt1(m.server_cpu_s_per_gb),
                    opt1(m.client_cpu_s_per_gb),
                    m.server_rss_kb
                        .map_or("—".into(), |k| base::mem(Some(k as u64))),
                    m.lost,
                    m.errors
                );
            }
            let _ = writeln!(
                s,
                "\n| system | load | offered batches/s | e2e p50 | e2e p99 | e2e p99.9 | lost / errors |\n|---|---:|---:|---:|---:|---:|---|"
            );
            for c in &self.rows() {
                for &load in &a.load {
                    let Some(l) = self.lat_stat(*c, *z, load) else {
                        continue;
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {load:.0} % | {:.0} | {} | {} | {} | {} / {} |",
                        c.label(),
                        l.offered,
                        ms(l.p50_us),
                        ms(l.p99_us),
                        ms(l.p999_us),
                        l.lost,
                        l.errors
                    );
                }
            }
            s.push('\n');
        }

        // Acknowledged batches.
        let _ = writeln!(s, "## Acknowledged batches: none lost?\n");
        let _ = writeln!(
            s,
            "Every phase (warm-up, closed loop and paced), summed over repetitions. *lost*: acknowledged, never delivered to the subscriber reading the topic from its start; *out of order*: delivered after a batch published later (one partition, one producer: the log order is the publish order).\n"
        );
        let _ = writeln!(
            s,
            "| system | phases | sent | acked | delivered | lost | not checked (subscriber failed) | out of order | duplicates | unacked at the end | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for c in &self.rows() {
            let x = self.accounting(*c);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | **{}** | {} | {} | {} | {} | {} |",
                c.label(),
                x.phases,
                x.sent,
                x.acked,
                x.delivered,
                x.lost,
                x.unchecked,
                x.reordered,
                x.duplicates,
                x.unacked,
                x.errors
            );
        }
        s.push('\n');

        // Server memory.
        let _ = writeln!(s, "## Server memory\n");
        let _ = writeln!(s, "| system | largest summed RSS of the server processes over a run (median of repetitions) |\n|---|---:|");
        for c in &self.rows() {
            if let Some(i) = self.info(*c) {
                let peak = median(i.peak_rss_kb.iter().map(|&k| k as f64).collect());
                let _ = writeln!(
                    s,
                    "| {} | {} |",
                    c.label(),
                    peak.map_or("—".into(), |k| base::mem(Some(k as u64)))
                );
            }
        }
        let _ = writeln!(s, "\nRedis keeps every stream in memory (each phase deletes its stream); Kafka's JVM heap is fixed at 1 GiB per node (kafka-server-start's default), so its RSS is mostly heap and page-cache-independent.\n");

        // Configurations.
        let _ = writeln!(s, "## Server configuration (as run)\n");
        for (c, i) in &self.infos {
            let _ = writeln!(s, "<details><summary>{}</summary>\n", c.label());
            for cmd in &i.commands {
                let _ = writeln!(s, "```\n{cmd}\n```");
            }
            for (name, content) in &i.configs {
                let _ = writeln!(s, "\n`{name}`:\n```\n{}```", content);
            }
            let _ = writeln!(s, "\n</details>\n");
        }
        let _ = writeln!(s, "Client settings: {}\n", CLIENT_SETTINGS);

        let errs: Vec<&Measured> = self
            .measured
            .iter()
            .filter(|m| !m.phase.errors.is_empty())
            .collect();
        if !self.notes.is_empty() || !errs.is_empty() {
            let _ = writeln!(s, "## Notes\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {}", one_line(n));
            }
            for m in errs.iter().take(40) {
                for e in m.phase.errors.iter().take(2) {
                    let _ = writeln!(
                        s,
                        "- {} rep {} {}: {}",
                        m.contender.label(),
                        m.rep + 1,
                        m.phase.name,
                        one_line(e)
                    );
                }
            }
        }
        s
    }

    /// The Python producers row: throughput of each system's Python client
    /// beside its Rust driver's, on the same servers.
    fn python_markdown(&self, s: &mut String) {
        let contenders = self.python_rows();
        if contenders.is_empty() {
            return;
        }
        let a = &self.args;
        let _ = writeln!(
            s,
            "## Python producers (closed loop), median MB/s (rows/s) and their share of the Rust producer's\n"
        );
        let versions = a.python.as_ref().map_or(String::new(), |v| {
            v.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        });
        let _ = writeln!(
            s,
            "The same servers, right after each system's Rust phases: arrowbus's Python client (`Producer.send`: the record batches are imported through the Arrow C data interface and encoded by the client, 5 batches in flight), confluent-kafka (`produce` + `poll`, the Rust driver's producer settings) and nats-py (JetStream `publish_async`), the last two publishing the same IPC bodies as the Rust drivers, encoded once before the run (so their rows carry no Arrow encoding, while arrowbus's client encodes every frame it is given, as it must); peers held to {} unacknowledged batches and 64 MiB. The Rust drivers above encode every send, so a Python peer can come out ahead of its own Rust row. One Python process, one thread, `bench/python/compare_publish.py`; the batches cycle through 32 distinct ones and busbench's Rust subscriber checks each arrives as often as it was acknowledged. Interpreter: {versions}.\n",
            a.window
        );
        let _ = write!(s, "| system | client | durability |");
        for z in &a.sizes {
            let _ = write!(s, " {} |", z.label());
        }
        let _ = write!(s, "\n|---|---|---|");
        for _ in &a.sizes {
            s.push_str("---:|");
        }
        s.push('\n');
        for c in &contenders {
            let client = self
                .info(*c)
                .and_then(|i| i.python_client.clone())
                .unwrap_or_else(|| "—".into());
            let _ = write!(s, "| {} | {client} | {} |", c.label(), short_durability(c));
            for z in &a.sizes {
                match self.python_stat(*c, *z) {
                    Some(m) => {
                        let share = self
                            .max_stat(*c, *z)
                            .filter(|r| r.mb_per_s > 0.0)
                            .map_or(String::new(), |r| {
                                format!(", {:.0} %", 100.0 * m.mb_per_s / r.mb_per_s)
                            });
                        let _ = write!(s, " {:.1} ({}){share} |", m.mb_per_s, rows(m.rows_per_s));
                    }
                    None => s.push_str(" — |"),
                }
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "\n*N %*: the Python producer's median MB/s as a share of the same system's Rust producer (busbench's driver above, same run).\n"
        );
        let _ = writeln!(
            s,
            "| system | batch | Python MB/s (min–max) | batches/s | Python client CPU s/GB | server CPU s/GB | lost / errors |\n|---|---|---:|---:|---:|---:|---|"
        );
        for c in &contenders {
            for z in &a.sizes {
                let Some(m) = self.python_stat(*c, *z) else {
                    continue;
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} ({:.1}–{:.1}) | {:.0} | {} | {} | {} / {} |",
                    c.label(),
                    z.label(),
                    m.mb_per_s,
                    m.mb_min,
                    m.mb_max,
                    m.batches_per_s,
                    opt1(m.client_cpu_s_per_gb),
                    opt1(m.server_cpu_s_per_gb),
                    m.lost,
                    m.errors
                );
            }
        }
        s.push('\n');
    }

    /// (target, measured, verdict).
    pub fn targets(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        if let Some(t) = self.disk_share_target() {
            out.push(t);
        }
        let find = |sys: System, strong: bool, r: usize| {
            self.contenders
                .iter()
                .copied()
                .find(|c| c.system == sys && c.strong == strong && c.replicas == r)
        };
        for r in [3, 1] {
            let ab = find(System::Arrowbus, true, r);
            let kafka = find(System::Kafka, false, r);
            let scope = if r == 3 {
                "3 replicas (the target's scope)"
            } else {
                "1 replica (indicative: the target is for 3)"
            };
            let Some(k) = kafka else { continue };
            let ab_measured = ab.filter(|c| self.measured.iter().any(|m| m.contender == *c));
            for z in [SizeSpec::Bytes(64 * 1024), SizeSpec::Bytes(1024 * 1024)] {
                let t = format!("{}: arrowbus ≥ {TARGET_THROUGHPUT_X_KAFKA}× Kafka (default durability) throughput, {scope}", z.label());
                match (
                    ab_measured.and_then(|a| self.max_stat(a, z)),
                    self.max_stat(k, z),
                ) {
                    (Some(a), Some(kk)) => {
                        let x = a.mb_per_s / kk.mb_per_s;
                        out.push((
                            t,
                            format!("{:.1} vs {:.1} MB/s = {x:.2}×", a.mb_per_s, kk.mb_per_s),
                            verdict(x >= TARGET_THROUGHPUT_X_KAFKA),
                        ));
                    }
                    _ if r == 3 && ab_measured.is_none() => out.push((
                        t,
                        "arrowbus R3 not available in this build".into(),
                        "not judged".into(),
                    )),
                    _ => {}
                }
            }
            let t = format!("p99 at {TARGET_P99_LOAD_PCT:.0} % load ≤ {TARGET_P99_FRACTION_OF_KAFKA}× Kafka's, {scope}");
            let mut cells = Vec::new();
            let mut all_met = true;
            for z in &self.args.sizes {
                if let (Some(a), Some(kk)) = (
                    ab_measured.and_then(|a| self.lat_stat(a, *z, TARGET_P99_LOAD_PCT)),
                    self.lat_stat(k, *z, TARGET_P99_LOAD_PCT),
                ) {
                    let x = a.p99_us / kk.p99_us;
                    all_met &= x <= TARGET_P99_FRACTION_OF_KAFKA;
                    cells.push(format!(
                        "{}: {} vs {} ms = {x:.2}×",
                        z.label(),
                        ms(a.p99_us),
                        ms(kk.p99_us)
                    ));
                }
            }
            if !cells.is_empty() {
                out.push((t, cells.join("; "), verdict(all_met)));
            } else if r == 3 && ab_measured.is_none() {
                out.push((
                    t,
                    "arrowbus R3 not available in this build".into(),
                    "not judged".into(),
                ));
            }
        }
        // Ahead of NATS R3 and Redis at equal or stronger durability: arrowbus
        // (fsync always) against every row with weaker or equal durability.
        for (sys, r) in [(System::Nats, 3), (System::Nats, 1), (System::Redis, 1)] {
            let ab_r = if sys == System::Redis { 1 } else { r };
            let ab = find(System::Arrowbus, true, ab_r)
                .filter(|c| self.measured.iter().any(|m| m.contender == *c));
            for strong in [true, false] {
                let Some(p) = find(sys, strong, r) else {
                    continue;
                };
                if !self.measured.iter().any(|m| m.contender == p) {
                    continue;
                }
                let t = format!(
                    "arrowbus R{ab_r} ahead of {} ({}) on every row",
                    p.label(),
                    short_durability(&p)
                );
                let Some(a) = ab else {
                    out.push((
                        t,
                        format!("arrowbus R{ab_r} not available in this build"),
                        "not judged".into(),
                    ));
                    continue;
                };
                let mut behind = Vec::new();
                let mut rows_n = 0;
                for z in &self.args.sizes {
                    if let (Some(x), Some(y)) = (self.max_stat(a, *z), self.max_stat(p, *z)) {
                        rows_n += 1;
                        if x.mb_per_s < y.mb_per_s {
                            behind.push(format!(
                                "{} throughput {:.1} < {:.1} MB/s",
                                z.label(),
                                x.mb_per_s,
                                y.mb_per_s
                            ));
                        }
                    }
                    for &load in &self.args.load {
                        if let (Some(x), Some(y)) =
                            (self.lat_stat(a, *z, load), self.lat_stat(p, *z, load))
                        {
                            rows_n += 1;
                            if x.p99_us > y.p99_us {
                                behind.push(format!(
                                    "{} p99 at {load:.0} % {} > {} ms",
                                    z.label(),
                                    ms(x.p99_us),
                                    ms(y.p99_us)
                                ));
                            }
                        }
                    }
                }
                let m = if behind.is_empty() {
                    format!("ahead on all {rows_n} rows")
                } else {
                    format!(
                        "behind on {} of {rows_n} rows: {}",
                        behind.len(),
                        behind.join("; ")
                    )
                };
                out.push((t, m, verdict(behind.is_empty())));
            }
        }
        out
    }

    pub fn json(&self) -> Value {
        let e = &self.env;
        let a = &self.args;
        let mut summary = Vec::new();
        for c in &self.rows() {
            for z in &a.sizes {
                let m = self.max_stat(*c, *z);
                let lat: Vec<Value> = a
                    .load
                    .iter()
                    .filter_map(|&l| {
                        self.lat_stat(*c, *z, l).map(|s| {
                            json!({"load_pct": l, "offered_batches_per_s": s.offered, "p50_us": s.p50_us,
                                   "p99_us": s.p99_us, "p999_us": s.p999_us, "lost": s.lost, "errors": s.errors, "reps": s.reps})
                        })
                    })
                    .collect();
                summary.push(json!({
                    "system": c.label(),
                    "replicas": c.replicas,
                    "durability": c.durability(),
                    "fsync_per_write": c.strong,
                    "batch": z.label(),
                    "max": m.map(|m| json!({
                        "reps": m.reps, "mb_per_s": m.mb_per_s, "mb_per_s_min": m.mb_min, "mb_per_s_max": m.mb_max,
                        "rows_per_s": m.rows_per_s, "batches_per_s": m.batches_per_s, "bytes_per_batch": m.bytes_per_batch,
                        "server_cpu_s_per_gb": m.server_cpu_s_per_gb, "client_cpu_s_per_gb": m.client_cpu_s_per_gb,
                        "server_rss_kb": m.server_rss_kb, "lost": m.lost, "errors": m.errors,
                    })),
                    "latency": lat,
                    "python_max": self.python_stat(*c, *z).map(|m| json!({
                        "reps": m.reps, "mb_per_s": m.mb_per_s, "mb_per_s_min": m.mb_min, "mb_per_s_max": m.mb_max,
                        "rows_per_s": m.rows_per_s, "batches_per_s": m.batches_per_s,
                        "server_cpu_s_per_gb": m.server_cpu_s_per_gb, "client_cpu_s_per_gb": m.client_cpu_s_per_gb,
                        "lost": m.lost, "errors": m.errors,
                        "client": self.info(*c).and_then(|i| i.python_client.clone()),
                    })),
                }));
            }
        }
        json!({
            "title": "busbench compare",
            "command_line": e.command_line,
            "date_utc": e.date_utc,
            "git_commit": e.git_commit,
            "machine": {"nproc": e.nproc, "mem_total_kb": e.mem_total_kb, "kernel": e.kernel,
                        "cpu_model": e.cpu_model, "loadavg_at_start": e.loadavg},
            "method": {"reps": a.reps, "duration_s": a.duration.as_secs_f64(), "warmup_s": a.warmup.as_secs_f64(),
                       "load_pct": a.load, "peer_window_batches": a.window, "arrowbus_linger_ms": a.arrowbus_linger_ms,
                       "python": a.python.as_ref().map(|v| v.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()),
                       "sizes": a.sizes.iter().map(|z| z.label()).collect::<Vec<_>>()},
            "systems": self.contenders.iter().map(|c| {
                let i = self.info(*c);
                json!({"system": c.label(), "replicas": c.replicas, "durability": c.durability(),
                       "version": i.map(|i| i.version.clone()),
                       "commands": i.map(|i| i.commands.clone()),
                       "configs": i.map(|i| i.configs.iter().map(|(n, t)| json!({"name": n, "content": t})).collect::<Vec<_>>()),
                       "peak_rss_kb": i.map(|i| i.peak_rss_kb.clone()),
                       "stops": i.map(|i| i.stops.clone())})
            }).collect::<Vec<_>>(),
            "unavailable": self.unavailable.iter().map(|(r, w)| json!({"system": r, "why": w})).collect::<Vec<_>>(),
            "disk": self.disks.iter().map(base::disk_json).collect::<Vec<_>>(),
            "disk_median_mb_per_s": {"dd_direct_fdatasync": self.disk_medians().0, "append_fdatasync_1m": self.disk_medians().1},
            "accounting": self.rows().iter().map(|c| {
                let x = self.accounting(*c);
                json!({"system": c.label(), "phases": x.phases, "sent": x.sent, "acked": x.acked,
                       "delivered": x.delivered, "lost": x.lost, "unchecked_subscriber_failed": x.unchecked, "reordered": x.reordered,
                       "duplicates": x.duplicates, "unacked": x.unacked, "errors": x.errors})
            }).collect::<Vec<_>>(),
            "loads": self.rows().iter().map(|c| json!({"system": c.label(), "loadavg_at_start": self.info(*c).map(|i| i.loads.clone())})).collect::<Vec<_>>(),
            "summary": summary,
            "targets": self.targets().into_iter().map(|(t, m, v)| json!({"target": t, "measured": m, "verdict": v})).collect::<Vec<_>>(),
            "phases": self.measured.iter().map(|m| json!({
                "system": m.contender.label(), "rep": m.rep + 1, "load_pct": m.load_pct, "warmup": m.warmup, "python": m.python,
                "phase": base::phase_json(&m.phase),
            })).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }
}

/// The peer client settings, quoted in the report.
const CLIENT_SETTINGS: &str = "arrowbus: `arrowbus-client` (5 batches / 64 MiB in flight, credit 8 MiB / 256 batches), producer linger as the *producer window* row above states (`--arrowbus-linger`). \
Kafka: rdkafka (librdkafka 2.12.1) producer `acks=all`, `enable.idempotence=true`, `linger.ms=0` (batching still happens while 5 requests are in flight), `compression.type=none`, `message.max.bytes=16777216`; consumer (`BaseConsumer::poll` on its own thread) assigned to partition 0 from the beginning, live before the phase starts (a start marker is produced and awaited), `fetch.min.bytes=1`, `fetch.wait.max.ms=10` and `fetch.error.backoff.ms=10` (librdkafka's low-latency advice; both default to 500 ms), `max.partition.fetch.bytes=16777216`, no group commits. \
NATS: async-nats JetStream publish (ack per message), pull consumer with `AckPolicy::None` from the first message. \
Redis: redis-rs multiplexed connection, `XADD key * d <body>` per batch (pipelined), subscriber `XREAD COUNT 64 BLOCK 100` on its own connection.";

fn short_durability(c: &Contender) -> &'static str {
    match (c.system, c.strong) {
        (System::Arrowbus, _) => "fsync always",
        (System::Kafka, false) => "acks=all, no fsync",
        (System::Kafka, true) => "acks=all, flush.messages=1",
        (System::Nats, false) => "sync 2 min",
        (System::Nats, true) => "sync always",
        (System::Redis, false) => "fsync everysec",
        (System::Redis, true) => "fsync always",
    }
}

fn verdict(met: bool) -> String {
    if met { "met" } else { "NOT met" }.to_owned()
}

fn rows(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1} k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

fn ms(us: f64) -> String {
    let m = us / 1000.0;
    if m >= 100.0 {
        format!("{m:.0}")
    } else if m >= 10.0 {
        format!("{m:.1}")
    } else {
        format!("{m:.2}")
    }
}

fn opt1(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.1}"))
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '|'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0]), Some(3.0));
        assert_eq!(median(vec![5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN, 2.0]), Some(2.0));
    }

    #[test]
    fn disk_share() {
        // 150 MB/s on a 1500 MB/s disk shared by 3 replicas: 30 % of 500.
        let f = disk_share_fraction(150.0, 1500.0, 3).map(|f| (f * 1000.0).round());
        assert_eq!(f, Some(300.0));
        assert_eq!(disk_share_fraction(400.0, 1500.0, 3), Some(0.8));
        assert_eq!(disk_share_fraction(100.0, 0.0, 3), None);
        assert_eq!(disk_share_fraction(100.0, 200.0, 1), Some(0.5));
    }

    #[test]
    fn accounting_sums_phases() {
        let mut p = PhaseResult {
            name: "x".into(),
            size_label: "1 row".into(),
            rows_per_batch: 1,
            bytes_per_batch: 1088,
            partitions: 1,
            offered_rate: None,
            sent: 10,
            acked: 9,
            delivered: 8,
            duplicates: 1,
            reordered: 2,
            lost: 1,
            subscriber_failed: false,
            unacked_outstanding: 1,
            errors_total: 3,
            errors: Vec::new(),
            send_secs: 1.0,
            ack_secs: 1.0,
            deliver_secs: 1.0,
            send_lag: None,
            ack_latency: None,
            e2e_latency: None,
            broker_rss_max_kb: None,
            broker_cpu_s: None,
            client_cpu_s: None,
            wall_secs: 1.0,
        };
        let mut a = Accounting::default();
        a.add(&p);
        p.subscriber_failed = true;
        p.lost = 5;
        a.add(&p);
        assert_eq!(
            a,
            Accounting {
                phases: 2,
                sent: 20,
                acked: 18,
                delivered: 16,
                lost: 1,
                unchecked: 5,
                reordered: 4,
                duplicates: 2,
                unacked: 2,
                errors: 6,
            }
        );
    }

    #[test]
    fn units() {
        assert_eq!(ms(1234.0), "1.23");
        assert_eq!(ms(12_345.0), "12.3");
        assert_eq!(ms(123_456.0), "123");
        assert_eq!(rows(2_500_000.0), "2.50 M");
        assert_eq!(rows(1500.0), "1.5 k");
    }
}

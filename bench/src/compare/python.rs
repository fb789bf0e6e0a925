//! The Python row of `busbench compare`: arrowbus's Python producer against
//! confluent-kafka and nats-py, publishing the same Arrow IPC batches.
//!
//! For each contender (except Redis, which has no Python driver here) and
//! batch size, once the Rust phases are done and with the same servers,
//! busbench creates a fresh topic, subscribes to it with its own Rust
//! subscriber, writes the batches to files and runs
//! `bench/python/compare_publish.py` for `--duration`, closed loop. The
//! script prints what it sent and what was acknowledged; busbench then waits
//! until the subscriber has every acknowledged batch and counts, per
//! batch, what is missing or extra.
//!
//! The script cycles through [`DISTINCT_BATCHES`] batches whose sequence
//! numbers are 0..K, send *i* carrying batch *i mod K*. When every send was
//! acknowledged, the acknowledged sends are exactly 0..acked, so the
//! subscriber knows how often each of the K batches must arrive: loss and
//! duplicates are exact. When some sends failed, only the totals are
//! compared.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use super::{Contender, System};
use crate::bus::Bus;
use crate::run::{BrokerWatch, PhaseResult};
use crate::spawn::group_stats;
use crate::workload::{identify, SizeSpec, Template};

/// Distinct batches the script cycles through.
const DISTINCT_BATCHES: u64 = 32;
/// Poll interval while waiting for the subscriber to catch up.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// The script, in this source tree.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/compare_publish.py");

/// A Python interpreter with every module the script needs.
#[derive(Clone, Debug)]
pub struct PythonDriver {
    pub python: PathBuf,
    /// Module versions as the script reports them (python, pyarrow,
    /// arrowbus, confluent_kafka, nats).
    pub versions: Vec<(String, String)>,
}

impl PythonDriver {
    /// Ask the interpreter for the script's modules. `Err` says which one
    /// is missing (for the report's "not measured" list).
    pub fn probe(python: &Path) -> Result<Self, String> {
        let out = std::process::Command::new(python)
            .args([SCRIPT, "--probe"])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| {
                format!(
                    "{} {SCRIPT} --probe printed no result ({}): {}",
                    python.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })?;
        if let Some(m) = v.get("missing").and_then(Value::as_str) {
            return Err(format!(
                "{} has no Python module `{m}` (bench/peers/fetch.sh installs it)",
                python.display()
            ));
        }
        let versions = v
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("?").to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            python: python.to_owned(),
            versions,
        })
    }
}

/// Where the script connects, per contender.
pub struct Target {
    pub system: System,
    /// `host:port[,host:port...]`.
    pub servers: String,
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
}

/// What the script reports.
#[derive(Debug, Default)]
struct ScriptResult {
    sent: u64,
    acked: u64,
    errors: u64,
    first_error: Option<String>,
    send_secs: f64,
    ack_secs: f64,
    cpu_s: f64,
    client: String,
}

impl ScriptResult {
    fn parse(line: &str) -> anyhow::Result<Self> {
        let v: Value = serde_json::from_str(line).context("the script's result is not JSON")?;
        let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let f = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        if v.get("acked").is_none() {
            bail!("the script's result has no `acked`: {line}");
        }
        Ok(Self {
            sent: u("sent"),
            acked: u("acked"),
            errors: u("errors"),
            first_error: v
                .get("first_error")
                .and_then(Value::as_str)
                .map(str::to_owned),
            send_secs: f("send_secs"),
            ack_secs: f("ack_secs"),
            cpu_s: f("cpu_s"),
            client: v
                .get("client")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned(),
        })
    }
}

/// Deliveries counted per batch of the cycle.
#[derive(Default)]
struct Seen {
    per_batch: Vec<u64>,
    delivered: u64,
    foreign: u64,
    last: Option<Instant>,
    error: Option<String>,
}

/// How often each of the K batches must arrive when sends 0..acked were
/// all acknowledged.
fn expected_per_batch(acked: u64, k: u64) -> Vec<u64> {
    (0..k)
        .map(|s| {
            if acked > s {
                (acked - s).div_ceil(k)
            } else {
                0
            }
        })
        .collect()
}

/// How the script runs.
pub struct Settings<'a> {
    pub duration: Duration,
    /// After the script ends, how long the subscriber may take to get
    /// every acknowledged batch.
    pub drain_timeout: Duration,
    /// Unacknowledged batches the script allows Kafka and NATS.
    pub window: usize,
    /// Where the batch files go.
    pub files_dir: &'a Path,
}

/// Run the script once for `size` against the contender's servers; the
/// result reads like a closed-loop phase (no latency: the script measures
/// throughput only). `client_cpu_s` is the Python process's CPU. Also
/// returns the client library the script used, with its version.
pub async fn run_phase(
    driver: &PythonDriver,
    bus: &dyn Bus,
    watch: &BrokerWatch,
    target: &Target,
    c: Contender,
    size: SizeSpec,
    set: &Settings<'_>,
) -> anyhow::Result<(PhaseResult, String)> {
    let template = Arc::new(tokio::task::spawn_blocking(move || Template::new(size)).await??);
    let (frames, bodies) = write_frames(&template, set.files_dir, &size.slug())?;
    let name = format!(
        "py-r{}-{:?}{}-{}",
        c.replicas,
        c.system,
        if c.strong { "s" } else { "d" },
        size.slug()
    )
    .to_ascii_lowercase();
    let topic = format!("busbench-{}-{name}", std::process::id()).replace('.', "_");
    bus.create(&topic, &template.schema(), 1).await?;
    let files = Files {
        frames: &frames,
        bodies: &bodies,
    };
    let result = measure(
        driver, bus, watch, target, &topic, &template, &files, set, name, size,
    )
    .await;
    if let Err(e) = bus.delete(&topic).await {
        eprintln!("busbench: could not delete topic {topic}: {e:#}");
    }
    result
}

/// The batches, written for the script.
struct Files<'a> {
    frames: &'a Path,
    bodies: &'a Path,
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    driver: &PythonDriver,
    bus: &dyn Bus,
    watch: &BrokerWatch,
    target: &Target,
    topic: &str,
    template: &Template,
    files: &Files<'_>,
    set: &Settings<'_>,
    name: String,
    size: SizeSpec,
) -> anyhow::Result<(PhaseResult, String)> {
    let (duration, drain_timeout) = (set.duration, set.drain_timeout);
    let mut deliveries = bus.subscribe(topic, &template.schema()).await?;
    let seen = Arc::new(Mutex::new(Seen {
        per_batch: vec![0; DISTINCT_BATCHES as usize],
        ..Seen::default()
    }));
    let delivered = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let sub_task = {
        let (seen, delivered) = (seen.clone(), delivered.clone());
        tokio::spawn(async move {
            while let Some(d) = deliveries.next().await {
                let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                match d.and_then(|b| identify(&b)) {
                    Ok((seq, _)) => {
                        match s.per_batch.get_mut(seq as usize) {
                            Some(n) => *n += 1,
                            None => s.foreign += 1,
                        }
                        s.delivered += 1;
                        s.last = Some(Instant::now());
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        s.error = Some(format!("{e:#}"));
                        break;
                    }
                }
            }
        })
    };
    let broker_before = group_stats(&watch.pids);
    watch.rss.reset_phase(&watch.pids);

    let mut cmd = tokio::process::Command::new(&driver.python);
    cmd.arg(SCRIPT)
        .args(["--system", system_arg(target.system)?])
        .args(["--servers", &target.servers])
        .args(["--topic", topic])
        .arg("--frames")
        .arg(files.frames)
        .arg("--bodies")
        .arg(files.bodies)
        .args(["--duration", &format!("{}", duration.as_secs_f64())])
        .args(["--window", &set.window.to_string()])
        .args(["--window-bytes", &crate::bus::WINDOW_BYTES.to_string()])
        .kill_on_drop(true);
    if let Some(ca) = &target.ca {
        cmd.arg("--ca").arg(ca);
    }
    if let Some(n) = &target.server_name {
        cmd.args(["--server-name", n]);
    }
    // The script's own drain takes up to a minute; more means it hangs.
    let limit = duration + drain_timeout + Duration::from_secs(90);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("the Python driver did not finish within {limit:?}"))?
        .context("running the Python driver")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        sub_task.abort();
        bail!(
            "the Python driver failed ({}): {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr))
        );
    }
    let r = ScriptResult::parse(stdout.lines().last().unwrap_or_default())?;

    // Wait for every acknowledged batch at the subscriber.
    let deadline = Instant::now() + drain_timeout;
    while delivered.load(Ordering::Relaxed) < r.acked && Instant::now() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let broker_after = group_stats(&watch.pids);
    sub_task.abort();
    let _ = sub_task.await;
    let wall_secs = start.elapsed().as_secs_f64();
    let s = seen.lock().unwrap_or_else(|p| p.into_inner());
    let (lost, duplicates) = if r.errors == 0 && r.acked == r.sent {
        let want = expected_per_batch(r.acked, DISTINCT_BATCHES);
        want.iter()
            .zip(&s.per_batch)
            .fold((0, s.foreign), |(l, d), (&w, &g)| {
                (l + w.saturating_sub(g), d + g.saturating_sub(w))
            })
    } else {
        // Failed sends may or may not be stored: compare totals only.
        (r.acked.saturating_sub(s.delivered), 0)
    };
    let mut errors = Vec::new();
    if let Some(e) = &r.first_error {
        errors.push(e.clone());
    }
    if let Some(e) = &s.error {
        errors.push(format!("subscriber: {e}"));
    }
    let since_start = |t: Option<Instant>| t.map_or(0.0, |t| (t - start).as_secs_f64());
    Ok((
        PhaseResult {
            name,
            size_label: size.label(),
            rows_per_batch: template.rows(),
            bytes_per_batch: template.encoded_bytes,
            partitions: 1,
            offered_rate: None,
            sent: r.sent,
            acked: r.acked,
            delivered: s.delivered,
            duplicates,
            reordered: 0,
            lost,
            subscriber_failed: s.error.is_some(),
            unacked_outstanding: r.sent.saturating_sub(r.acked + r.errors),
            errors_total: r.errors + u64::from(s.error.is_some()),
            errors,
            send_secs: r.send_secs,
            ack_secs: r.ack_secs,
            deliver_secs: since_start(s.last),
            send_lag: None,
            ack_latency: None,
            e2e_latency: None,
            broker_rss_max_kb: Some(watch.rss.phase_max_kb.load(Ordering::Relaxed)),
            broker_cpu_s: Some(broker_after.cpu_s - broker_before.cpu_s),
            client_cpu_s: Some(r.cpu_s),
            wall_secs,
        },
        r.client,
    ))
}

fn system_arg(s: System) -> anyhow::Result<&'static str> {
    Ok(match s {
        System::Arrowbus => "arrowbus",
        System::Kafka => "kafka",
        System::Nats => "nats",
        System::Redis => bail!("no Python driver for Redis"),
    })
}

/// The K batches as an Arrow IPC stream file (arrowbus's Python producer
/// publishes its record batches) and as the bodies the Rust drivers send
/// (u32 LE length + bytes; Kafka and NATS publish those bytes).
fn write_frames(t: &Template, dir: &Path, slug: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let frames = dir.join(format!("python-{slug}.arrows"));
    let bodies = dir.join(format!("python-{slug}.bodies"));
    let mut fw = std::io::BufWriter::new(
        std::fs::File::create(&frames).with_context(|| format!("creating {}", frames.display()))?,
    );
    let mut bw = std::io::BufWriter::new(
        std::fs::File::create(&bodies).with_context(|| format!("creating {}", bodies.display()))?,
    );
    {
        let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut fw, &t.schema())
            .context("starting the frames file")?;
        for seq in 0..DISTINCT_BATCHES {
            let b = t.stamp(seq, 0)?;
            w.write(&b).context("writing the frames file")?;
            let body = crate::bus::body_of(&b)?;
            let len = u32::try_from(body.len()).context("a body over 4 GiB")?;
            bw.write_all(&len.to_le_bytes())?;
            bw.write_all(&body)?;
        }
        w.finish().context("finishing the frames file")?;
    }
    fw.flush()?;
    bw.flush()?;
    Ok((frames, bodies))
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_counts_follow_the_cycle() {
        assert_eq!(expected_per_batch(0, 4), vec![0, 0, 0, 0]);
        assert_eq!(expected_per_batch(3, 4), vec![1, 1, 1, 0]);
        assert_eq!(expected_per_batch(4, 4), vec![1, 1, 1, 1]);
        assert_eq!(expected_per_batch(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(expected_per_batch(10, 4).iter().sum::<u64>(), 10);
    }

    #[test]
    fn script_results_parse() -> anyhow::Result<()> {
        let r = ScriptResult::parse(
            r#"{"sent": 12, "acked": 11, "errors": 1, "first_error": "KafkaError: x", "send_secs": 1.5, "ack_secs": 1.75, "cpu_s": 0.5, "client": "confluent-kafka 2.16.1"}"#,
        )?;
        assert_eq!((r.sent, r.acked, r.errors), (12, 11, 1));
        assert_eq!(r.first_error.as_deref(), Some("KafkaError: x"));
        assert_eq!((r.send_secs, r.ack_secs, r.cpu_s), (1.5, 1.75, 0.5));
        assert_eq!(r.client, "confluent-kafka 2.16.1");
        assert!(ScriptResult::parse("{}").is_err());
        assert!(ScriptResult::parse("Traceback").is_err());
        Ok(())
    }

    #[test]
    fn frame_files_hold_the_same_batches() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let t = Template::with_rows(10)?;
        let (frames, bodies) = write_frames(&t, dir.path(), "10r")?;
        let r = arrow_ipc::reader::StreamReader::try_new(std::fs::File::open(&frames)?, None)?;
        let batches: Vec<_> = r.collect::<Result<_, _>>()?;
        assert_eq!(batches.len() as u64, DISTINCT_BATCHES);
        let raw = std::fs::read(&bodies)?;
        let mut at = 0;
        let mut decoder = crate::bus::PeerDecoder::new(&t.schema())?;
        for (i, b) in batches.iter().enumerate() {
            assert_eq!(identify(b)?.0, i as u64);
            let len = u32::from_le_bytes(raw[at..at + 4].try_into()?) as usize;
            at += 4;
            let body = bytes::Bytes::copy_from_slice(&raw[at..at + len]);
            at += len;
            assert_eq!(len, t.encoded_bytes);
            assert_eq!(&decoder.decode(body)?, b);
        }
        assert_eq!(at, raw.len());
        Ok(())
    }
}

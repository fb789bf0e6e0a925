//! A `busd dev` process owned by busbench: started in a fresh directory on a
//! free port with `--fsync always`, watched (RSS, CPU) through `/proc`, and
//! stopped with SIGTERM (SIGKILL if it does not exit in time) — also when
//! busbench fails half-way, through `Drop`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long busd may take to write its profile (certificates are generated
/// on first start) before busbench gives up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long busd may take to exit after SIGTERM before it is killed.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);
/// RSS sampling period. /proc reads cost ~20 µs; 10 Hz is invisible to the broker.
pub const RSS_SAMPLE_PERIOD: Duration = Duration::from_millis(100);
/// Most RSS samples kept for the report (one hour at 10 Hz); later samples
/// still update the maxima.
const MAX_RSS_SAMPLES: usize = 36_000;
/// Lines of busd's log quoted when it fails.
const LOG_TAIL_LINES: usize = 20;
/// Linux reports /proc/<pid>/stat times in USER_HZ, which is 100 on every
/// architecture the kernel supports today.
const USER_HZ: f64 = 100.0;

pub struct Busd {
    child: Option<Child>,
    pub pid: u32,
    /// Working directory holding `data/`, `profile.toml` and `busd.log`.
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub addr: String,
    pub ca: PathBuf,
    pub server_name: Option<String>,
    pub log: PathBuf,
    pub command: String,
}

impl Busd {
    /// Start `busd dev` under `base` (a fresh sub-directory is created there).
    pub fn start(busd: &Path, base: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("busbench-")
            .tempdir_in(base)
            .with_context(|| format!("creating a work directory in {}", base.display()))?;
        let data_dir = dir.path().join("data");
        let profile = dir.path().join("profile.toml");
        let log = dir.path().join("busd.log");
        let port = free_udp_port()?;
        let listen = format!("127.0.0.1:{port}");
        let args: Vec<String> = vec![
            "dev".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            listen.clone(),
            "--fsync".into(),
            "always".into(),
            "--profile".into(),
            profile.display().to_string(),
        ];
        let command = format!("{} {}", busd.display(), args.join(" "));
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .context("duplicating the log file handle")?;
        let child = Command::new(busd)
            .args(&args)
            .env(
                "ARROWBUS_LOG",
                std::env::var("ARROWBUS_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting `{command}`"))?;
        let mut me = Self {
            pid: child.id(),
            child: Some(child),
            dir,
            data_dir,
            addr: listen,
            ca: PathBuf::new(),
            server_name: None,
            log,
            command,
        };
        me.wait_for_profile(&profile)?;
        Ok(me)
    }

    fn wait_for_profile(&mut self, profile: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("polling busd")? {
                    self.child = None;
                    bail!(
                        "busd exited during startup ({status}); its log:\n{}",
                        self.log_tail()
                    );
                }
            }
            if profile.exists() {
                let p =
                    arrowbus::Profile::load(profile).context("reading the profile busd wrote")?;
                if let Some(addr) = p.brokers.first() {
                    self.addr = addr.clone();
                }
                self.ca = p.ca.context("busd's profile names no CA certificate")?;
                self.server_name = p.server_name;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "busd wrote no profile within {:?}; its log:\n{}",
                    STARTUP_TIMEOUT,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client_config(&self) -> arrowbus::ClientConfig {
        let cfg = arrowbus::ClientConfig::new(self.addr.clone()).with_ca(self.ca.clone());
        match &self.server_name {
            Some(n) => cfg.with_server_name(n.clone()),
            None => cfg,
        }
    }

    /// The last lines of busd's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// Whether busd is still running.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, wait, SIGKILL if needed. Returns how busd exited.
    pub fn stop(&mut self) -> anyhow::Result<String> {
        match self.child.take() {
            Some(child) => terminate(child, SHUTDOWN_TIMEOUT),
            None => Ok("already exited".into()),
        }
    }
}

/// SIGTERM a child of ours, wait up to `timeout`, then SIGKILL. Returns how
/// it exited.
pub fn terminate(mut child: Child, timeout: Duration) -> anyhow::Result<String> {
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
    // own child, which has not been reaped (we still hold its Child), so
    // it cannot have been recycled for another process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc != 0 {
        let _ = child.kill();
        let status = child.wait().context("waiting for the process")?;
        return Ok(format!("SIGTERM failed, killed ({status})"));
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for the process")? {
            return Ok(format!("exited after SIGTERM ({status})"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().context("waiting for the process")?;
            return Ok(format!(
                "did not exit within {timeout:?} of SIGTERM; killed ({status})"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Busd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A UDP port that was free a moment ago (bind to port 0, read, release).
pub fn free_udp_port() -> anyhow::Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("finding a free UDP port")?;
    Ok(s.local_addr().context("reading the bound port")?.port())
}

/// Memory and CPU of a process, read from `/proc/<pid>/status` and `stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcStats {
    pub vm_rss_kb: u64,
    pub vm_hwm_kb: u64,
    /// User + system CPU time, in seconds.
    pub cpu_s: f64,
}

pub fn proc_stats(pid: u32) -> anyhow::Result<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(ProcStats {
        vm_rss_kb: status_field_kb(&status, "VmRSS").unwrap_or(0),
        vm_hwm_kb: status_field_kb(&status, "VmHWM").unwrap_or(0),
        cpu_s: stat_cpu_ticks(&stat).map_or(0.0, |t| t as f64 / USER_HZ),
    })
}

/// `VmRSS:    12345 kB` → 12345.
pub fn status_field_kb(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The process `pid` and all its descendants (a `busd dev --nodes 3`
/// parent and its nodes; a wrapper script and its server). Best effort: a
/// process that exits meanwhile is skipped.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    // Bounded: a tree larger than this is not one of our servers.
    while i < out.len() && out.len() < 4096 {
        let p = out[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// RSS, peak RSS and CPU summed over `pids` and their descendants: the
/// server side of a run, whether one process or a three-node cluster.
pub fn group_stats(pids: &[u32]) -> ProcStats {
    let mut all: Vec<u32> = pids.iter().flat_map(|&p| process_tree(p)).collect();
    all.sort_unstable();
    all.dedup();
    all.iter()
        .filter_map(|&p| proc_stats(p).ok())
        .fold(ProcStats::default(), |a, s| ProcStats {
            vm_rss_kb: a.vm_rss_kb + s.vm_rss_kb,
            vm_hwm_kb: a.vm_hwm_kb + s.vm_hwm_kb,
            cpu_s: a.cpu_s + s.cpu_s,
        })
}

/// utime + stime (fields 14 and 15) from `/proc/<pid>/stat`. The command
/// name (field 2) may contain spaces and parentheses, so count from the last ')'.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Samples a process's RSS in the background. `phase_max_kb` is reset by
/// whoever measures a phase; `samples` feeds the report's RSS timeline.
#[derive(Default)]
pub struct RssWatch {
    pub phase_max_kb: AtomicU64,
    pub run_max_kb: AtomicU64,
    pub samples: Mutex<Vec<(f64, u64)>>,
}

impl RssWatch {
    /// Sample the summed RSS of `pids` (and their descendants) every
    /// [`RSS_SAMPLE_PERIOD`] until the returned handle is aborted or the
    /// processes are gone.
    pub fn spawn(pids: Vec<u32>, start: Instant) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let watch = Arc::new(Self::default());
        let w = watch.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(RSS_SAMPLE_PERIOD);
            loop {
                tick.tick().await;
                let s = group_stats(&pids);
                if s.vm_rss_kb == 0 {
                    return;
                }
                w.phase_max_kb.fetch_max(s.vm_rss_kb, Ordering::Relaxed);
                w.run_max_kb.fetch_max(s.vm_rss_kb, Ordering::Relaxed);
                if let Ok(mut v) = w.samples.lock() {
                    if v.len() < MAX_RSS_SAMPLES {
                        v.push((start.elapsed().as_secs_f64(), s.vm_rss_kb));
                    }
                }
            }
        });
        (watch, task)
    }

    pub fn reset_phase(&self, pids: &[u32]) {
        let now = group_stats(pids).vm_rss_kb;
        self.phase_max_kb.store(now, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_parse() {
        let s = "Name:\tbusd\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        assert_eq!(status_field_kb(s, "VmRSS"), Some(102_400));
        assert_eq!(status_field_kb(s, "VmHWM"), Some(204_800));
        assert_eq!(status_field_kb(s, "VmSwap"), None);
    }

    #[test]
    fn stat_cpu_parses_past_odd_names() {
        let s =
            "1234 (bu sd) (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 0 0";
        assert_eq!(stat_cpu_ticks(s), Some(300));
    }

    #[test]
    fn own_process_stats_are_readable() -> anyhow::Result<()> {
        let s = proc_stats(std::process::id())?;
        assert!(s.vm_rss_kb > 0 && s.vm_hwm_kb >= s.vm_rss_kb, "{s:?}");
        Ok(())
    }
}

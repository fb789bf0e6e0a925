//! The machine's storage limits, measured in the directory the broker writes
//! to, so broker numbers can be read against them:
//!
//! - sequential write bandwidth with `dd ... oflag=direct conv=fdatasync`;
//! - append + `fdatasync` rate for small (4 KiB) and large (1 MiB) writes,
//!   which is what a broker with `fsync = always` does per group commit.
//!
//! Every file created here is removed before returning.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::latency::{Latency, Summary};

/// Largest single `dd` run, in MiB: enough to leave caches behind, small
/// enough not to fill a CI disk.
const MAX_DD_MIB: u64 = 16 * 1024;
/// Most write+fdatasync rounds in one measurement; bounds the loop when the
/// disk is a RAM-backed fake that syncs in nanoseconds.
const MAX_SYNC_ROUNDS: u64 = 10_000_000;

#[derive(Debug, Clone)]
pub struct DdResult {
    pub mib: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub command: String,
}

#[derive(Debug, Clone)]
pub struct SyncResult {
    pub block_bytes: usize,
    pub rounds: u64,
    pub seconds: f64,
    pub syncs_per_s: f64,
    pub mb_per_s: f64,
    pub latency: Option<Summary>,
}

#[derive(Debug, Clone)]
pub struct DiskReport {
    pub dir: PathBuf,
    pub filesystem: Option<Mount>,
    pub dd: Result<DdResult, String>,
    pub sync_4k: Result<SyncResult, String>,
    pub sync_1m: Result<SyncResult, String>,
}

/// Measure everything in `dir`.
pub fn measure(dir: &Path, dd_mib: u64, sync_for: Duration) -> DiskReport {
    DiskReport {
        dir: dir.to_path_buf(),
        filesystem: mount_of(dir),
        dd: dd_write(dir, dd_mib).map_err(|e| format!("{e:#}")),
        sync_4k: sync_loop(dir, 4096, sync_for).map_err(|e| format!("{e:#}")),
        sync_1m: sync_loop(dir, 1024 * 1024, sync_for).map_err(|e| format!("{e:#}")),
    }
}

/// `dd if=/dev/zero of=DIR/busbench-dd.tmp bs=1M count=N oflag=direct conv=fdatasync`.
pub fn dd_write(dir: &Path, mib: u64) -> anyhow::Result<DdResult> {
    if mib == 0 || mib > MAX_DD_MIB {
        bail!("dd size {mib} MiB: use 1..={MAX_DD_MIB}");
    }
    let file = dir.join(format!("busbench-dd-{}.tmp", std::process::id()));
    let args = [
        "if=/dev/zero".to_owned(),
        format!("of={}", file.display()),
        "bs=1M".to_owned(),
        format!("count={mib}"),
        "oflag=direct".to_owned(),
        "conv=fdatasync".to_owned(),
    ];
    let command = format!("dd {}", args.join(" "));
    let out = Command::new("dd")
        .args(&args)
        .output()
        .context("running dd");
    let _ = std::fs::remove_file(&file);
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("`{command}` failed ({}): {}", out.status, stderr.trim());
    }
    let (bytes, seconds) = parse_dd_summary(&stderr)
        .with_context(|| format!("cannot read dd's summary from {:?}", stderr.trim()))?;
    Ok(DdResult {
        mib,
        bytes,
        seconds,
        mb_per_s: bytes as f64 / seconds / 1e6,
        command,
    })
}

/// Bytes and seconds from dd's last line, e.g.
/// `268435456 bytes (268 MB, 256 MiB) copied, 0.52 s, 516 MB/s`.
pub fn parse_dd_summary(stderr: &str) -> Option<(u64, f64)> {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains(" bytes") && l.contains("copied"))?;
    let bytes: u64 = line.split_whitespace().next()?.parse().ok()?;
    let after = line.split("copied,").nth(1)?;
    let seconds: f64 = after
        .split_whitespace()
        .next()?
        .replace(',', ".")
        .parse()
        .ok()?;
    (seconds > 0.0).then_some((bytes, seconds))
}

/// Append `block` bytes and `fdatasync`, over and over, for `dur`.
pub fn sync_loop(dir: &Path, block: usize, dur: Duration) -> anyhow::Result<SyncResult> {
    let path = dir.join(format!("busbench-sync-{}-{block}.tmp", std::process::id()));
    let res = sync_loop_at(&path, block, dur);
    let _ = std::fs::remove_file(&path);
    res
}

fn sync_loop_at(path: &Path, block: usize, dur: Duration) -> anyhow::Result<SyncResult> {
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let buf = vec![0xA5u8; block];
    let mut lat = Latency::new()?;
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < dur && rounds < MAX_SYNC_ROUNDS {
        let t = Instant::now();
        f.write_all(&buf)
            .with_context(|| format!("writing {}", path.display()))?;
        f.sync_data()
            .with_context(|| format!("fdatasync {}", path.display()))?;
        lat.record(t.elapsed());
        rounds += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(SyncResult {
        block_bytes: block,
        rounds,
        seconds,
        syncs_per_s: rounds as f64 / seconds,
        mb_per_s: (rounds * block as u64) as f64 / seconds / 1e6,
        latency: lat.summary(),
    })
}

/// The mount a path lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
}

/// Look `dir` up in `/proc/self/mountinfo`.
pub fn mount_of(dir: &Path) -> Option<Mount> {
    let canon = std::fs::canonicalize(dir).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    longest_mount(&info, &canon.to_string_lossy())
}

/// The mountinfo entry whose mount point is the longest prefix of `path`.
/// Line format: `id parent maj:min root mount_point opts... - fstype source superopts`.
pub fn longest_mount(mountinfo: &str, path: &str) -> Option<Mount> {
    let mut best: Option<Mount> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(mp) = fields.get(4) else { continue };
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(fs_type), Some(source)) = (fields.get(dash + 1), fields.get(dash + 2)) else {
            continue;
        };
        let under = *mp == "/" || path == *mp || path.starts_with(&format!("{mp}/"));
        if under
            && best
                .as_ref()
                .is_none_or(|b| mp.len() >= b.mount_point.len())
        {
            best = Some(Mount {
                mount_point: (*mp).to_owned(),
                fs_type: (*fs_type).to_owned(),
                source: (*source).to_owned(),
            });
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dd_summary_parses() {
        let s = "256+0 records in\n256+0 records out\n268435456 bytes (268 MB, 256 MiB) copied, 0.5 s, 537 MB/s\n";
        assert_eq!(parse_dd_summary(s), Some((268_435_456, 0.5)));
        let de = "268435456 Bytes (268 MB, 256 MiB) kopiert, 0,5 s, 537 MB/s";
        assert_eq!(parse_dd_summary(de), None);
        assert_eq!(parse_dd_summary("dd: failed to open"), None);
    }

    #[test]
    fn longest_mount_wins() {
        let info = "22 1 252:0 / / rw - ext4 /dev/vda rw\n\
                    30 22 0:25 / /tmp rw - tmpfs tmpfs rw\n\
                    31 22 0:26 / /tmpfoo rw - xfs /dev/vdb rw\n";
        let m = longest_mount(info, "/tmp/x/y").map(|m| m.fs_type);
        assert_eq!(m.as_deref(), Some("tmpfs"));
        let m = longest_mount(info, "/tmpfoo").map(|m| m.fs_type);
        assert_eq!(m.as_deref(), Some("xfs"));
        let m = longest_mount(info, "/work/main").map(|m| m.fs_type);
        assert_eq!(m.as_deref(), Some("ext4"));
    }

    #[test]
    fn sync_loop_measures_and_cleans_up() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let r = sync_loop(dir.path(), 4096, Duration::from_millis(50))?;
        assert!(r.rounds > 0);
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
        Ok(())
    }
}

/// The disk baseline's flags, shared by the commands that measure it.
#[derive(clap::Args, Clone)]
pub struct DiskBaselineArgs {
    /// Skip the disk baseline (dd and append+fdatasync in --work-dir, measured
    /// at the start of every repetition).
    #[arg(long)]
    pub no_disk: bool,
    /// MiB written by the dd baseline.
    #[arg(long, default_value_t = 1024)]
    pub dd_mib: u64,
    /// Length of each append+fdatasync loop of the disk baseline.
    #[arg(long, value_parser = crate::latency::parse_duration, default_value = "3s")]
    pub sync_for: std::time::Duration,
}

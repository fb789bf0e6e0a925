//! A local three-node cluster for the cluster benchmarks: `busd dev
//! --nodes 3` (one supervisor, three `busd run` children sharing a dev CA)
//! in a scratch directory, plus restarts of single nodes after a kill.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct DevCluster {
    dir: PathBuf,
    supervisor: Child,
    restarted: Vec<Child>,
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        // SAFETY: signalling our own child has no memory effects.
        unsafe {
            libc::kill(self.supervisor.id() as libc::pid_t, libc::SIGTERM);
        }
        for c in &mut self.restarted {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.supervisor.wait();
    }
}

impl DevCluster {
    /// Wipe `dir`, start three nodes on `port`, `port + 1`, `port + 2` and
    /// connect a client through the profile they write.
    pub async fn start(
        busd: &Path,
        dir: &Path,
        port: u16,
    ) -> anyhow::Result<(Self, arrowbus::Client)> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).context("creating the work dir")?;
        let profile = dir.join("profile.toml");
        let log = std::fs::File::create(dir.join("cluster.log"))?;
        let supervisor = Command::new(busd)
            .args(["dev", "--nodes", "3", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir)
            .arg("--profile")
            .arg(&profile)
            .env("ARROWBUS_LOG", busd_log_filter())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting busd dev --nodes 3")?;
        let cluster = Self {
            dir: dir.to_owned(),
            supervisor,
            restarted: Vec::new(),
        };
        let start = Instant::now();
        while !profile.exists() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the cluster did not start in 30 s (see {}/cluster.log)",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let prof = arrowbus::Profile::load(&profile)?;
        let first = prof
            .brokers
            .first()
            .cloned()
            .context("the profile lists no broker")?;
        let mut cfg = arrowbus::ClientConfig::new(first);
        cfg.brokers = prof.brokers.clone();
        cfg.ca = prof.ca.clone();
        cfg.server_name = prof.server_name.clone();
        let client = arrowbus::Client::connect(cfg).await?;
        Ok((cluster, client))
    }

    /// Pid of the `busd run` process of node `id` (started by the
    /// supervisor or restarted by us), found by its config path.
    pub fn node_pid(&self, id: u64) -> Option<i32> {
        let needle = self.dir.join(format!("node-{id}")).join("busd.toml");
        let needle = needle.to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd);
            let mut args = cmd.split('\0');
            if args.any(|a| a == "run") && cmd.split('\0').any(|a| a == needle) {
                return Some(pid);
            }
        }
        None
    }

    /// Start node `id` again (`busd run` on its config) after a kill.
    pub fn restart(&mut self, busd: &Path, id: u64) -> anyhow::Result<()> {
        let config = self.dir.join(format!("node-{id}")).join("busd.toml");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{id}.restart.log")))?;
        let child = Command::new(busd)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("ARROWBUS_LOG", busd_log_filter())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("restarting the killed node")?;
        self.restarted.push(child);
        Ok(())
    }
}

/// The nodes' log filter: warnings, unless `BUSBENCH_BUSD_LOG` asks for more
/// (e.g. `openraft=info,warn` to see elections next to the kill times).
fn busd_log_filter() -> String {
    std::env::var("BUSBENCH_BUSD_LOG").unwrap_or_else(|_| "warn".to_owned())
}

//! Harness for integration tests: real `busd` processes on loopback, each
//! with its own data directory, port, certificate and client profile.
//!
//! The binaries are built on first use (`cargo build --bins` for the broker
//! and busctl, in the same profile as the tests), so `cargo test` alone is
//! enough.

pub mod acked;
pub mod cluster;
pub mod membership;
pub mod netns;
pub mod tmpfs;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a starting busd may take to answer (recovery of large logs
/// included) before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(60);

static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Directory holding the built `busd` and `busctl` (built once per test process).
pub fn bin_dir() -> PathBuf {
    let r = BUILT.get_or_init(|| {
        // scripts/test builds the whole workspace first and points here, so
        // the binaries are not rebuilt with a different feature set.
        if let Some(dir) = std::env::var_os("ARROWBUS_TEST_BIN_DIR") {
            return Ok(PathBuf::from(dir));
        }
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // target/<profile>/deps/<test-binary>
        let dir = exe
            .parent()
            .and_then(|d| d.parent())
            .ok_or("cannot locate the target directory")?
            .to_path_buf();
        let profile = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_owned();
        let profile_arg = if profile == "debug" {
            "dev".to_owned()
        } else {
            profile
        };
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "--profile",
                &profile_arg,
                "-p",
                "arrowbus-broker",
                "-p",
                "arrowbus-busctl",
                "--bins",
            ])
            .status()
            .map_err(|e| format!("running cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build of busd/busctl failed: {status}"));
        }
        Ok(dir)
    });
    match r {
        Ok(d) => d.clone(),
        Err(e) => panic!("{e}"),
    }
}

pub fn busd_path() -> PathBuf {
    bin_dir().join("busd")
}

pub fn busctl_path() -> PathBuf {
    bin_dir().join("busctl")
}

/// A free UDP port on 127.0.0.1 (the OS picks; released before busd binds it).
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free UDP port: {e}"))
}

/// A running `busd dev` node.
pub struct Busd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    extra: Vec<String>,
}

impl Busd {
    /// Start a node with the embedded dev defaults (fsync always).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Start with extra `busd dev` arguments (e.g. `["--fsync", "interval"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("arrowbus-test-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        Self::start_in(dir, extra)
    }

    /// Start in a given directory (which the node owns from now on).
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let mut b = Busd {
            child: None,
            dir,
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let data = self.data_dir();
        std::fs::create_dir_all(&data)
            .unwrap_or_else(|e| panic!("creating {}: {e}", data.display()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("busd.log"))
            .unwrap_or_else(|e| panic!("busd.log: {e}"));
        let log2 = log.try_clone().unwrap_or_else(|e| panic!("busd.log: {e}"));
        let child = Command::new(busd_path())
            .arg("dev")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg(self.addr())
            .arg("--profile")
            .arg(self.dir.path().join("profile.toml"))
            .args(&self.extra)
            .env("ARROWBUS_LOG", "info")
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", busd_path().display()));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Wait until the node writes its profile (it does so once it listens).
    fn wait_ready(&mut self) {
        let profile = self.dir.path().join("profile.toml");
        let start = Instant::now();
        loop {
            if profile.exists() && self.ca().exists() {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "busd exited during start with {status}; log:\n{}",
                        self.log()
                    );
                }
            }
            if start.elapsed() > START_TIMEOUT {
                panic!(
                    "busd did not start within {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn ca(&self) -> PathBuf {
        self.data_dir().join("tls").join("ca.pem")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The node's combined stdout/stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("busd.log")).unwrap_or_default()
    }

    pub fn client_config(&self) -> arrowbus::ClientConfig {
        arrowbus::ClientConfig::new(self.addr()).with_ca(self.ca())
    }

    pub async fn client(&self) -> arrowbus::Client {
        arrowbus::Client::connect(self.client_config())
            .await
            .unwrap_or_else(|e| panic!("connecting to busd at {}: {e}", self.addr()))
    }

    /// A `busctl` command aimed at this node.
    pub fn busctl(&self) -> Command {
        let mut c = Command::new(busctl_path());
        c.arg("--broker")
            .arg(self.addr())
            .arg("--ca")
            .arg(self.ca());
        // Keep the user's real profile out of tests.
        c.env("ARROWBUS_CONFIG_DIR", self.dir.path().join("no-profile"));
        c.env_remove("ARROWBUS_BROKER").env_remove("ARROWBUS_CA");
        c
    }

    /// SIGKILL: no shutdown code runs, like a crash or power cut of the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: sending a signal to our own child's pid has no memory effects.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        c.wait().ok().and_then(|s| s.code())
    }

    /// Start again on the same data directory and port.
    pub fn restart(&mut self) {
        self.kill9();
        let _ = std::fs::remove_file(self.dir.path().join("profile.toml"));
        self.spawn();
    }

    /// Resident set size of the busd process in KiB (VmRSS), and its peak (VmHWM).
    pub fn rss_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Busd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Seed for randomized tests: `ARROWBUS_TEST_SEED` or a fresh one, printed
/// so a failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("ARROWBUS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed = {seed} (replay with ARROWBUS_TEST_SEED={seed})");
    seed
}

/// A batch of the tick schema used across tests: `n` rows starting at `first`
/// (values derive from the row number, so any row can be checked).
pub fn ticks(first: i64, n: usize) -> arrow_array::RecordBatch {
    use arrow_array::{Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow_schema::{DataType, Field, Schema, TimeUnit};
    use std::sync::Arc;
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("symbol", DataType::Utf8, false),
        Field::new("price", DataType::Float64, false),
        Field::new("size", DataType::Int64, false),
        Field::new("seq", DataType::Int64, false),
    ]));
    let seq: Vec<i64> = (first..first + n as i64).collect();
    const SYMBOLS: [&str; 4] = ["AAPL", "MSFT", "NVDA", "AMZN"];
    arrow_array::RecordBatch::try_new(
        schema,
        vec![
            Arc::new(
                TimestampMicrosecondArray::from(
                    seq.iter()
                        .map(|s| 1_700_000_000_000_000 + s)
                        .collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from(
                seq.iter()
                    .map(|s| SYMBOLS[(*s as usize) % 4])
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                seq.iter()
                    .map(|s| 100.0 + (*s % 1000) as f64 / 8.0)
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                seq.iter().map(|s| s % 500 + 1).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(seq)),
        ],
    )
    .unwrap_or_else(|e| panic!("building ticks: {e}"))
}

/// The `seq` column of a tick batch.
pub fn seqs(batch: &arrow_array::RecordBatch) -> Vec<i64> {
    use arrow_array::Array;
    let col = batch
        .column_by_name("seq")
        .unwrap_or_else(|| panic!("batch has no seq column"));
    let a = col
        .as_any()
        .downcast_ref::<arrow_array::Int64Array>()
        .unwrap_or_else(|| panic!("seq is not Int64"));
    (0..a.len()).map(|i| a.value(i)).collect()
}

/// Every delivery of `topic` from `opts`' start to the end of each partition
/// as it is now.
pub async fn read_all(
    client: &arrowbus::Client,
    topic: &str,
    opts: arrowbus::SubscribeOptions,
) -> Vec<arrowbus::Delivery> {
    use futures::StreamExt;
    let mut sub = client
        .subscribe(topic, opts.until_end())
        .await
        .unwrap_or_else(|e| panic!("subscribing to {topic}: {e}"));
    let mut out = Vec::new();
    while let Some(d) = sub.next().await {
        out.push(d.unwrap_or_else(|e| panic!("reading {topic}: {e}")));
    }
    out
}

/// The `seq` values of every row of a tick topic, from the earliest offset
/// to the current end, partition after partition as delivered.
pub async fn read_seqs(client: &arrowbus::Client, topic: &str) -> Vec<i64> {
    let opts = arrowbus::SubscribeOptions::default().from(arrowbus::StartAt::Earliest);
    read_all(client, topic, opts)
        .await
        .iter()
        .flat_map(|d| seqs(&d.batch))
        .collect()
}

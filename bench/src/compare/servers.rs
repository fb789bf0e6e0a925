//! Starting and stopping the real servers of a comparison, each on loopback
//! in a fresh temporary directory: Apache Kafka (KRaft, combined
//! broker+controller nodes), NATS JetStream (file storage), Redis (AOF), and
//! arrowbus (`busd dev`). Every configuration written here is quoted in the
//! results file, so a reader can check it is what a careful operator runs.
//!
//! Servers are stopped with SIGTERM (SIGKILL after a timeout), also when
//! busbench fails half-way, through `Drop`.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::spawn::{self, Busd};

/// How long a server may take to accept connections. Kafka's JVM, KRaft
/// election and log recovery take ~10 s on this 2-core machine; a busy
/// machine doubles that.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a server may take to exit after SIGTERM (Kafka's controlled
/// shutdown moves leadership first).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Log lines quoted when a server fails.
const LOG_TAIL_LINES: usize = 15;
/// Largest message any peer is configured to take: 1 MiB batches plus
/// headroom. Kafka's and NATS's defaults (~1 MB) are below a 1 MiB Arrow
/// body, so an operator storing such batches raises them.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Where `bench/peers/fetch.sh` put the peers (its `peers.env`).
#[derive(Debug, Clone, Default)]
pub struct PeerPaths {
    pub kafka_version: String,
    pub kafka_libs: PathBuf,
    pub java: PathBuf,
    pub redis_server: PathBuf,
    pub nats_server: PathBuf,
    pub nats_note: String,
    pub plot_python: PathBuf,
    /// The virtualenv of the Python producers row (empty in a peers.env
    /// written before it existed).
    pub bench_python: PathBuf,
}

impl PeerPaths {
    pub fn load(env_file: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(env_file)
            .with_context(|| format!("reading {}", env_file.display()))?;
        let vars: BTreeMap<&str, &str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let get = |k: &str| vars.get(k).copied().unwrap_or_default().to_owned();
        Ok(Self {
            kafka_version: get("KAFKA_VERSION"),
            kafka_libs: get("KAFKA_LIBS").into(),
            java: get("JAVA").into(),
            redis_server: get("REDIS_SERVER").into(),
            nats_server: get("NATS_SERVER").into(),
            nats_note: get("NATS_NOTE"),
            plot_python: get("PLOT_PYTHON").into(),
            bench_python: get("BENCH_PYTHON").into(),
        })
    }
}

/// A set of server processes (one, or a three-node cluster) and the
/// directory holding their data, configuration and logs.
pub struct Servers {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
    pub dir: tempfile::TempDir,
    /// Client address(es): `host:port`, one per node.
    pub addrs: Vec<String>,
    /// Exact command lines, for the report.
    pub commands: Vec<String>,
    /// The configuration files written, (name, content), for the report.
    pub configs: Vec<(String, String)>,
    /// Set when the servers are a `busd dev` (single node reuses `Busd`).
    pub busd: Option<Busd>,
}

impl Servers {
    fn new(base: &Path, prefix: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(base)
            .with_context(|| format!("creating a work directory in {}", base.display()))?;
        Ok(Self {
            children: Vec::new(),
            logs: Vec::new(),
            dir,
            addrs: Vec::new(),
            commands: Vec::new(),
            configs: Vec::new(),
            busd: None,
        })
    }

    pub fn pids(&self) -> Vec<u32> {
        let mut p: Vec<u32> = self.children.iter().map(Child::id).collect();
        if let Some(b) = &self.busd {
            p.push(b.pid);
        }
        p
    }

    fn write_config(&mut self, name: &str, content: String) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, &content).with_context(|| format!("writing {}", path.display()))?;
        self.configs.push((name.to_owned(), content));
        Ok(path)
    }

    fn spawn(&mut self, program: &Path, args: &[String], log_name: &str) -> anyhow::Result<()> {
        self.spawn_env(program, args, log_name, &[])
    }

    fn spawn_env(
        &mut self,
        program: &Path,
        args: &[String],
        log_name: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let log = self.dir.path().join(log_name);
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating a log handle")?;
        let command = format!("{} {}", program.display(), args.join(" "));
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting `{command}`"))?;
        self.children.push(child);
        self.logs.push(log);
        self.commands.push(command);
        Ok(())
    }

    /// Wait until every address accepts TCP connections; fail early when a
    /// process exits.
    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for addr in self.addrs.clone() {
            loop {
                for (i, c) in self.children.iter_mut().enumerate() {
                    if let Some(status) = c.try_wait().context("polling a server")? {
                        bail!(
                            "`{}` exited during startup ({status}); its log:\n{}",
                            self.commands.get(i).map_or("", |s| s.as_str()),
                            self.logs.get(i).map_or(String::new(), |l| tail(l))
                        );
                    }
                }
                if TcpStream::connect_timeout(
                    &addr.parse().with_context(|| format!("address {addr}"))?,
                    Duration::from_millis(200),
                )
                .is_ok()
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{addr} did not accept connections within {STARTUP_TIMEOUT:?}; log:\n{}",
                        self.log_tail()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let mut s: Vec<String> = self.logs.iter().map(|l| tail(l)).collect();
        if let Some(b) = &self.busd {
            s.push(b.log_tail());
        }
        s.join("\n---\n")
    }

    /// Stop every process; returns how each exited.
    pub fn stop(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for c in self.children.drain(..) {
            out.push(spawn::terminate(c, SHUTDOWN_TIMEOUT).unwrap_or_else(|e| format!("{e:#}")));
        }
        if let Some(b) = self.busd.as_mut() {
            out.push(b.stop().unwrap_or_else(|e| format!("{e:#}")));
        }
        out
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// A TCP port that was free a moment ago.
fn free_tcp_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free TCP port")?;
    Ok(l.local_addr().context("reading the bound port")?.port())
}

/// Kafka's broker JVM options: the heap and GC flags that
/// `kafka-server-start.sh` / `kafka-run-class.sh` pass by default.
const KAFKA_JVM_OPTS: &[&str] = &[
    "-Xmx1G",
    "-Xms1G",
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
];

/// Start `nodes` Kafka nodes in KRaft combined mode (each broker and
/// controller, all voters), formatted with one cluster id.
pub fn start_kafka(p: &PeerPaths, base: &Path, nodes: usize) -> anyhow::Result<Servers> {
    if !p.kafka_libs.is_dir() {
        bail!(
            "no Kafka jars at {} (run bench/peers/fetch.sh)",
            p.kafka_libs.display()
        );
    }
    let mut s = Servers::new(base, "kafka-")?;
    let classpath = format!("{}/*", p.kafka_libs.display());
    let log4j = s.write_config(
        "log4j2.properties",
        "rootLogger.level = WARN\nrootLogger.appenderRef.stdout.ref = STDOUT\n\
         appender.stdout.type = Console\nappender.stdout.name = STDOUT\n\
         appender.stdout.layout.type = PatternLayout\n\
         appender.stdout.layout.pattern = [%d] %p %m (%c)%n\n"
            .into(),
    )?;
    let ports: Vec<(u16, u16)> = (0..nodes)
        .map(|_| Ok((free_tcp_port()?, free_tcp_port()?)))
        .collect::<anyhow::Result<_>>()?;
    let voters: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
        .collect();
    // A fixed cluster id: every run formats fresh directories anyway.
    let cluster_id = "YnVzYmVuY2gtY29tcGFyZQ";
    let min_isr = if nodes >= 3 { 2 } else { 1 };
    for (i, (port, cport)) in ports.iter().enumerate() {
        let id = i + 1;
        let data = s.dir.path().join(format!("data-{id}"));
        let props = format!(
            "# KRaft combined node {id} of {nodes}\n\
             process.roles=broker,controller\n\
             node.id={id}\n\
             controller.quorum.voters={voters}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             inter.broker.listener.name=PLAINTEXT\n\
             log.dirs={data}\n\
             # Durability: Kafka's default leaves fsync to the OS (log.flush.interval.messages unset);\n\
             # the flush variant sets flush.messages=1 on its topics (fsync after every append).\n\
             default.replication.factor={nodes}\n\
             min.insync.replicas={min_isr}\n\
             unclean.leader.election.enable=false\n\
             offsets.topic.replication.factor={nodes}\n\
             transaction.state.log.replication.factor={nodes}\n\
             transaction.state.log.min.isr={min_isr}\n\
             # 1 MiB Arrow batches exceed the ~1 MB default message size.\n\
             message.max.bytes={MAX_MESSAGE_BYTES}\n\
             replica.fetch.max.bytes={MAX_MESSAGE_BYTES}\n\
             group.initial.rebalance.delay.ms=0\n",
            voters = voters.join(","),
            data = data.display(),
        );
        let props_path = s.write_config(&format!("server-{id}.properties"), props)?;
        let fmt = Command::new(&p.java)
            .arg("-cp")
            .arg(&classpath)
            .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
            .args(["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c"])
            .arg(&props_path)
            .output()
            .context("running Kafka's StorageTool")?;
        if !fmt.status.success() {
            bail!(
                "formatting Kafka node {id} failed: {}",
                String::from_utf8_lossy(&fmt.stderr)
            );
        }
        let mut args: Vec<String> = KAFKA_JVM_OPTS.iter().map(|s| s.to_string()).collect();
        args.push(format!("-Dlog4j2.configurationFile={}", log4j.display()));
        args.extend(["-cp".into(), classpath.clone(), "kafka.Kafka".into()]);
        args.push(props_path.display().to_string());
        s.spawn(&p.java, &args, &format!("kafka-{id}.log"))?;
        s.addrs.push(format!("127.0.0.1:{port}"));
    }
    s.wait_listening()?;
    Ok(s)
}

/// Start `nodes` nats-servers with JetStream file storage (a cluster when
/// more than one).
pub fn start_nats(
    p: &PeerPaths,
    base: &Path,
    nodes: usize,
    sync_always: bool,
) -> anyhow::Result<Servers> {
    let mut s = Servers::new(base, "nats-")?;
    let ports: Vec<(u16, u16)> = (0..nodes)
        .map(|_| Ok((free_tcp_port()?, free_tcp_port()?)))
        .collect::<anyhow::Result<_>>()?;
    for (i, (port, cport)) in ports.iter().enumerate() {
        let id = i + 1;
        let store = s.dir.path().join(format!("js-{id}"));
        // Default: JetStream fsyncs every 2 minutes (and on close); `always`
        // fsyncs every write before the ack.
        let sync = if sync_always {
            "  sync_interval: always\n"
        } else {
            "  # sync_interval: default (2m)\n"
        };
        let cluster = if nodes > 1 {
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, (_, c))| format!("nats-route://127.0.0.1:{c}"))
                .collect();
            format!(
                "cluster {{\n  name: busbench\n  listen: 127.0.0.1:{cport}\n  routes: [{}]\n}}\n",
                routes.join(", ")
            )
        } else {
            String::new()
        };
        let conf = format!(
            "server_name: n{id}\n\
             listen: 127.0.0.1:{port}\n\
             # 1 MiB Arrow batches exceed the 1 MB default payload limit.\n\
             max_payload: {MAX_MESSAGE_BYTES}\n\
             jetstream {{\n  store_dir: \"{}\"\n{sync}}}\n{cluster}",
            store.display()
        );
        let path = s.write_config(&format!("nats-{id}.conf"), conf)?;
        s.spawn(
            &p.nats_server,
            &["-c".into(), path.display().to_string()],
            &format!("nats-{id}.log"),
        )?;
        s.addrs.push(format!("127.0.0.1:{port}"));
    }
    s.wait_listening()?;
    Ok(s)
}

/// Start a redis-server with the append-only file on and the given
/// `appendfsync` policy.
pub fn start_redis(p: &PeerPaths, base: &Path, appendfsync: &str) -> anyhow::Result<Servers> {
    let mut s = Servers::new(base, "redis-")?;
    let port = free_tcp_port()?;
    let conf = format!(
        "bind 127.0.0.1\n\
         port {port}\n\
         protected-mode no\n\
         daemonize no\n\
         dir {}\n\
         appendonly yes\n\
         appendfsync {appendfsync}\n\
         # The AOF is the durability mechanism here; periodic RDB snapshots\n\
         # would only add fork()s of a multi-GB process in the middle of a run.\n\
         save \"\"\n",
        s.dir.path().display()
    );
    let path = s.write_config("redis.conf", conf)?;
    s.spawn(&p.redis_server, &[path.display().to_string()], "redis.log")?;
    s.addrs.push(format!("127.0.0.1:{port}"));
    s.wait_listening()?;
    Ok(s)
}

/// A single-node `busd dev --fsync always`, as `busbench run` starts it.
pub fn start_arrowbus(
    busd: &Path,
    base: &Path,
) -> anyhow::Result<(Servers, arrowbus::ClientConfig)> {
    let mut s = Servers::new(base, "arrowbus-")?;
    let b = Busd::start(busd, s.dir.path())?;
    s.addrs.push(b.addr.clone());
    s.commands.push(b.command.clone());
    let cfg = b.client_config();
    s.busd = Some(b);
    Ok((s, cfg))
}

/// Why a three-replica arrowbus cannot be measured by this build.
#[derive(Debug)]
pub struct NotAvailable(pub String);

/// A three-node arrowbus: `busd dev --nodes 3 --data-dir D --listen ADDR`
/// starts three local busd processes on ADDR's port and the next two and
/// writes a profile listing all of them; topics are then created with
/// replication factor 3. A busd without `--nodes` (before replication) is
/// reported as "not available in this build".
pub fn start_arrowbus_cluster(
    busd: &Path,
    base: &Path,
) -> anyhow::Result<Result<(Servers, arrowbus::ClientConfig), NotAvailable>> {
    if let Err(na) = start_arrowbus_cluster_probe(busd)? {
        return Ok(Err(na));
    }
    let mut s = Servers::new(base, "arrowbus3-")?;
    // Three consecutive free UDP ports are likely when the first is free
    // and high; busd reports a bind failure (exit 4) otherwise.
    let port = spawn::free_udp_port()?;
    let listen = format!("127.0.0.1:{port}");
    let data = s.dir.path().join("data");
    let profile = s.dir.path().join("profile.toml");
    let args: Vec<String> = vec![
        "dev".into(),
        "--nodes".into(),
        "3".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--listen".into(),
        listen,
        "--fsync".into(),
        "always".into(),
        "--profile".into(),
        profile.display().to_string(),
    ];
    s.spawn_env(
        busd,
        &args,
        "busd.log",
        &[(
            "ARROWBUS_LOG",
            std::env::var("ARROWBUS_LOG").unwrap_or_else(|_| "warn".into()),
        )],
    )?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while !profile.exists() {
        if let Some(status) = s.children[0].try_wait().context("polling busd")? {
            bail!(
                "busd dev --nodes 3 exited during startup ({status}); log:\n{}",
                s.log_tail()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "busd dev --nodes 3 wrote no profile within {STARTUP_TIMEOUT:?}; log:\n{}",
                s.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let p = arrowbus::Profile::load(&profile).context("reading the profile busd wrote")?;
    let first = p
        .brokers
        .first()
        .context("busd's profile lists no broker")?;
    let mut cfg = arrowbus::ClientConfig::new(first.clone());
    cfg.brokers = p.brokers.clone();
    if let Some(ca) = p.ca {
        cfg = cfg.with_ca(ca);
    }
    if let Some(n) = p.server_name {
        cfg = cfg.with_server_name(n);
    }
    s.addrs = p.brokers;
    Ok(Ok((s, cfg)))
}

/// Whether this busd can start a three-node cluster (`busd dev --nodes`).
pub fn start_arrowbus_cluster_probe(busd: &Path) -> anyhow::Result<Result<(), NotAvailable>> {
    let help = Command::new(busd)
        .args(["dev", "--help"])
        .output()
        .with_context(|| format!("running `{} dev --help`", busd.display()))?;
    if String::from_utf8_lossy(&help.stdout).contains("--nodes") {
        Ok(Ok(()))
    } else {
        Ok(Err(NotAvailable(format!(
            "not available in this build: `{} dev` has no --nodes (replication is being built)",
            busd.display()
        ))))
    }
}

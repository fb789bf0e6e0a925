//! The cluster under test: real `busd` processes, and the faults done to
//! them (signals, network namespaces with iptables rules, data rollback).
//!
//! [`Cluster::spawn`] is the one place that turns a [`NodeSpec`] into a
//! process. Today a one-node cluster is `busd dev`; a multi-node cluster
//! (issue 3) is bootstrapped once with `busd dev --nodes N`, whose
//! per-node `node-<i>/busd.toml` files are rewritten to the nodes'
//! addresses and then run one process each with `busd run --config`, so
//! every node can be killed, paused and partitioned on its own.
//!
//! Network isolation: with `netns`, node `i` runs inside its own network
//! namespace `jl<id>-n<i>` with address `10.241.<id>.(10+i)` on a veth
//! pair whose other end sits on bridge `jl<id>br`, which holds the clients'
//! address `10.241.<id>.1`. Partitions are iptables DROP rules inside the
//! node namespaces. Nothing ever routes beyond the bridge: before any client
//! traffic, every node address must route via the bridge, and the
//! namespaces have no default route. Stale namespaces of the same instance
//! id (a killed earlier run) are removed, with their processes, at start.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::schedule::End;

/// How long a node may take to start answering (log recovery included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// First port of nodes inside namespaces (each has its own address, so all
/// use the same port).
const NETNS_PORT: u16 = 7447;

#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// 1-based; equals the broker's node id.
    pub id: u32,
    pub addr: SocketAddr,
    /// The node's own directory (data, config, log).
    pub dir: PathBuf,
    pub netns: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub busd: PathBuf,
    pub nodes: u32,
    /// Run directory; nodes live in `<dir>/node-<i>`.
    pub dir: PathBuf,
    /// Put every node in its own network namespace (needed for partitions).
    pub netns: bool,
    /// Distinguishes concurrent harness instances (names and subnet).
    pub instance: u8,
    /// Extra environment for every busd (e.g. the unsafe ack mode).
    pub env: Vec<(String, String)>,
}

struct Node {
    spec: NodeSpec,
    child: Option<Child>,
    paused: bool,
}

pub struct Cluster {
    cfg: ClusterConfig,
    nodes: Vec<Node>,
    net: Option<Net>,
    ca: PathBuf,
}

impl Cluster {
    pub fn start(cfg: ClusterConfig) -> Result<Self> {
        std::fs::create_dir_all(&cfg.dir)
            .with_context(|| format!("creating {}", cfg.dir.display()))?;
        let net = if cfg.netns {
            Some(Net::setup(cfg.instance, cfg.nodes)?)
        } else {
            None
        };
        let mut specs = Vec::new();
        for id in 1..=cfg.nodes {
            let (addr, netns) = match &net {
                Some(n) => (
                    SocketAddr::new(n.node_ip(id).into(), NETNS_PORT),
                    Some(n.ns(id)),
                ),
                None => (
                    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), free_port()?),
                    None,
                ),
            };
            specs.push(NodeSpec {
                id,
                addr,
                dir: cfg.dir.join(format!("node-{id}")),
                netns,
            });
        }
        let ca = if cfg.nodes == 1 {
            specs[0].dir.join("data").join("tls").join("ca.pem")
        } else {
            bootstrap_multi_node(&cfg, &specs)?
        };
        let mut c = Cluster {
            nodes: specs
                .into_iter()
                .map(|spec| Node {
                    spec,
                    child: None,
                    paused: false,
                })
                .collect(),
            cfg,
            net,
            ca,
        };
        for id in 1..=c.cfg.nodes {
            c.spawn(id)?;
        }
        Ok(c)
    }

    pub fn ids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.spec.id).collect()
    }

    pub fn spec(&self, id: u32) -> Option<&NodeSpec> {
        self.node(id).map(|n| &n.spec)
    }

    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// Client config for every node (the client uses the first that answers).
    pub fn client_config(&self, only: Option<u32>, timeout: Duration) -> arrowbus::ClientConfig {
        let mut addrs: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| only.is_none_or(|o| o == n.spec.id))
            .map(|n| n.spec.addr.to_string())
            .collect();
        let first = if addrs.is_empty() {
            String::new()
        } else {
            addrs.remove(0)
        };
        let mut c = arrowbus::ClientConfig::new(first)
            .with_ca(&self.ca)
            // Every dev certificate carries SAN "localhost": any node
            // address verifies against it, netns addresses included.
            .with_server_name("localhost");
        c.brokers.extend(addrs);
        c.request_timeout = timeout;
        c
    }

    fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.iter().find(|n| n.spec.id == id)
    }

    fn node_mut(&mut self, id: u32) -> Result<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.spec.id == id)
            .with_context(|| format!("no node {id}"))
    }

    /// The one place a node spec becomes a process.
    fn spawn(&mut self, id: u32) -> Result<()> {
        let busd = self.cfg.busd.clone();
        let env = self.cfg.env.clone();
        let multi = self.cfg.nodes > 1;
        let node = self.node_mut(id)?;
        let spec = node.spec.clone();
        std::fs::create_dir_all(&spec.dir)?;
        let profile = spec.dir.join("profile.toml");
        let _ = std::fs::remove_file(&profile);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.dir.join("busd.log"))
            .context("opening busd.log")?;
        let log2 = log.try_clone()?;
        let mut cmd = match &spec.netns {
            Some(ns) => {
                // `ip netns exec` enters the namespace and then execs busd
                // itself, so the child's pid is busd's (signals reach it).
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&busd);
                c
            }
            None => Command::new(&busd),
        };
        if multi {
            cmd.arg("run")
                .arg("--config")
                .arg(spec.dir.join("busd.toml"));
        } else {
            cmd.arg("dev")
                .arg("--data-dir")
                .arg(spec.dir.join("data"))
                .arg("--listen")
                .arg(spec.addr.to_string())
                .arg("--profile")
                .arg(&profile);
        }
        cmd.env("ARROWBUS_LOG", "info")
            .env("ARROWBUS_CONFIG_DIR", spec.dir.join("no-profile"))
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", busd.display()))?;
        node.child = Some(child);
        node.paused = false;
        self.wait_ready(id)
    }

    /// Ready when the node wrote its profile (busd dev does once it
    /// listens) or, for `busd run`, when its UDP port is bound.
    fn wait_ready(&mut self, id: u32) -> Result<()> {
        let start = Instant::now();
        let multi = self.cfg.nodes > 1;
        loop {
            let node = self.node_mut(id)?;
            let ready = if multi {
                udp_port_bound(&node.spec)
            } else {
                node.spec.dir.join("profile.toml").exists()
            };
            if ready {
                return Ok(());
            }
            if let Some(c) = node.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "busd node {id} exited during start with {status}; see {}",
                        node.spec.dir.join("busd.log").display()
                    );
                }
            }
            if start.elapsed() > START_TIMEOUT {
                bail!("busd node {id} did not start within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self, id: u32) -> Option<u32> {
        self.node(id).and_then(|n| n.child.as_ref().map(Child::id))
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self, id: u32) -> Result<()> {
        let node = self.node_mut(id)?;
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        node.paused = false;
        Ok(())
    }

    /// Start a killed node again on the same data and address.
    pub fn restart(&mut self, id: u32) -> Result<()> {
        if self.node(id).is_some_and(|n| n.child.is_some()) {
            return Ok(());
        }
        self.spawn(id)
    }

    pub fn pause(&mut self, id: u32) -> Result<()> {
        self.signal(id, libc::SIGSTOP)?;
        self.node_mut(id)?.paused = true;
        Ok(())
    }

    pub fn resume(&mut self, id: u32) -> Result<()> {
        self.signal(id, libc::SIGCONT)?;
        self.node_mut(id)?.paused = false;
        Ok(())
    }

    fn signal(&self, id: u32, sig: libc::c_int) -> Result<()> {
        let Some(pid) = self.pid(id) else {
            return Ok(()); // not running: nothing to stop or continue
        };
        let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            bail!(
                "signal {sig} to node {id}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Wait (up to `timeout`) for node `id` to exit on its own (a node
    /// removed from the cluster stops by itself); its exit status.
    pub fn reap(&mut self, id: u32, timeout: Duration) -> Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            let node = self.node_mut(id)?;
            let Some(c) = node.child.as_mut() else {
                bail!("node {id} is not running");
            };
            if let Some(status) = c.try_wait()? {
                node.child = None;
                node.paused = false;
                return Ok(status);
            }
            if start.elapsed() > timeout {
                bail!("node {id} did not stop within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Node `id` as a brand-new node: stopped if running, its data wiped,
    /// started with `cluster.join = true` (empty, waiting for `add-node`).
    pub fn restart_empty_joining(&mut self, id: u32) -> Result<()> {
        self.kill(id)?;
        let dir = self.node_mut(id)?.spec.dir.clone();
        let data = dir.join("data");
        // Keep the TLS files every node shares; wipe everything else.
        for entry in
            std::fs::read_dir(&data).with_context(|| format!("reading {}", data.display()))?
        {
            let entry = entry?;
            if entry.file_name() == "tls" {
                continue;
            }
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            }
            .with_context(|| format!("removing {}", path.display()))?;
        }
        let config = dir.join("busd.toml");
        let text = std::fs::read_to_string(&config)
            .with_context(|| format!("reading {}", config.display()))?;
        let mut doc: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
        if let Some(toml::Value::Table(t)) = doc.get_mut("cluster") {
            t.remove("peers");
            t.insert("join".into(), toml::Value::Boolean(true));
        }
        std::fs::write(&config, toml::to_string(&doc)?)
            .with_context(|| format!("writing {}", config.display()))?;
        self.spawn(id)
    }

    /// Copy a node's data directory aside while the node is stopped, so
    /// the copy is one consistent state of its files.
    pub fn snapshot_data(&mut self, id: u32) -> Result<()> {
        self.pause(id)?;
        let dir = self.node_mut(id)?.spec.dir.clone();
        let snap = dir.join("snapshot");
        let _ = std::fs::remove_dir_all(&snap);
        // SIGSTOP is asynchronous: until every thread has stopped, files may
        // still be renamed under the copy (a `*.tmp` vanished mid-copy once).
        let r = match self.pid(id) {
            Some(pid) => wait_stopped(pid, Duration::from_secs(5)),
            None => Ok(()),
        }
        .and_then(|()| copy_dir(&dir.join("data"), &snap));
        if r.is_err() {
            // A partial copy must never be rolled back to.
            let _ = std::fs::remove_dir_all(&snap);
        }
        self.resume(id)?;
        r
    }

    /// Kill the node, put its snapshot back in place of its data, restart:
    /// everything it acknowledged since the snapshot is gone.
    pub fn rollback_data(&mut self, id: u32) -> Result<()> {
        self.kill(id)?;
        let dir = self.node_mut(id)?.spec.dir.clone();
        let snap = dir.join("snapshot");
        if snap.exists() {
            std::fs::remove_dir_all(dir.join("data"))?;
            std::fs::rename(&snap, dir.join("data"))?;
        }
        self.spawn(id)
    }

    /// Cut the given links (replacing any current partition).
    pub fn partition(&mut self, links: &[(End, End)]) -> Result<()> {
        let Some(net) = &self.net else {
            bail!("partitions need network namespaces (run as root; --nemesis partition turns them on)");
        };
        net.heal(self.cfg.nodes)?;
        for (a, b) in links {
            net.block(*a, *b)?;
        }
        Ok(())
    }

    pub fn heal_network(&self) -> Result<()> {
        match &self.net {
            Some(net) => net.heal(self.cfg.nodes),
            None => Ok(()),
        }
    }

    /// Undo every fault: heal the network, continue paused nodes, restart
    /// dead ones.
    pub fn heal_all(&mut self) -> Result<()> {
        self.heal_network()?;
        for id in self.ids() {
            if self.node(id).is_some_and(|n| n.paused) {
                self.resume(id)?;
            }
            if self.node(id).is_some_and(|n| n.child.is_none()) {
                self.restart(id)?;
            }
        }
        Ok(())
    }

    /// A node's data directory (where its `topics/` are).
    pub fn data_dir(&self, id: u32) -> Option<PathBuf> {
        self.spec(id).map(|s| s.dir.join("data"))
    }

    /// Stop every node: SIGTERM (a graceful stop syncs and closes its
    /// logs), SIGKILL for any still running after `grace`. Continues paused
    /// nodes first so they can act on the SIGTERM.
    pub fn stop_all(&mut self, grace: Duration) {
        for n in &mut self.nodes {
            if let Some(c) = &n.child {
                if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe {
                        libc::kill(pid, libc::SIGCONT);
                        libc::kill(pid, libc::SIGTERM);
                    }
                }
            }
            n.paused = false;
        }
        let deadline = Instant::now() + grace;
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Nodes that are down (killed and not yet restarted).
    pub fn down(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_none())
            .map(|n| n.spec.id)
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                // SIGKILL also ends a stopped process.
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // `net` drops after this and removes the namespaces.
    }
}

/// Wait until every thread of `pid` is stopped (state `T` in
/// /proc/PID/task/*/stat).
fn wait_stopped(pid: u32, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("listing the threads of {pid}"))?;
        let mut all = true;
        for t in tasks {
            let stat = std::fs::read_to_string(t?.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next());
            if !matches!(state, Some('T' | 't') | None) {
                all = false;
                break;
            }
        }
        if all {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("process {pid} did not stop within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether a UDP socket is bound on the node's port (its namespace's
/// /proc view when it has one).
fn udp_port_bound(spec: &NodeSpec) -> bool {
    let port_hex = format!(":{:04X}", spec.addr.port());
    let out = match &spec.netns {
        Some(ns) => Command::new("ip")
            .args(["netns", "exec", ns, "cat", "/proc/net/udp"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned()),
        None => std::fs::read_to_string("/proc/net/udp").ok(),
    };
    out.is_some_and(|t| {
        t.lines().skip(1).any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(&port_hex))
        })
    })
}

/// Multi-node: run `busd dev --nodes N` once, in `<dir>/bootstrap`, to
/// generate the dev CA, node certificates and per-node configs, stop it,
/// and write each node a config pointing at its own address and a fresh
/// data directory `<node dir>/data`. The bootstrap cluster's data is not
/// reused: its controller log already holds a membership with the
/// bootstrap's loopback addresses, which the nodes would keep dialling
/// whatever their configs say. Returns the CA path.
fn bootstrap_multi_node(cfg: &ClusterConfig, specs: &[NodeSpec]) -> Result<PathBuf> {
    let boot = cfg.dir.join("bootstrap");
    let dev = boot.join("dev");
    std::fs::create_dir_all(&boot)?;
    let port = free_port()?;
    let log = std::fs::File::create(boot.join("busd.log"))?;
    let mut child = Command::new(&cfg.busd)
        .args(["dev", "--nodes", &cfg.nodes.to_string(), "--data-dir"])
        .arg(&dev)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--profile")
        .arg(boot.join("profile.toml"))
        .env("ARROWBUS_CONFIG_DIR", boot.join("no-profile"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("starting {} dev --nodes", cfg.busd.display()))?;
    let start = Instant::now();
    let outcome = loop {
        if boot.join("profile.toml").exists() {
            break Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(anyhow::anyhow!(
                "`busd dev --nodes {}` exited with {status}: see {}",
                cfg.nodes,
                boot.join("busd.log").display()
            ));
        }
        if start.elapsed() > START_TIMEOUT {
            break Err(anyhow::anyhow!("`busd dev --nodes` did not start in time"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: kill(2) on our own child's pid; SIGTERM lets it stop its nodes.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let _ = child.wait();
    outcome?;
    let peers: Vec<String> = specs
        .iter()
        .map(|s| format!("{}@{}", s.id, s.addr))
        .collect();
    for s in specs {
        let path = dev.join(format!("node-{}", s.id)).join("busd.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the generated {}", path.display()))?;
        let mut doc: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        doc.insert("listen".into(), toml::Value::String(s.addr.to_string()));
        doc.insert(
            "advertised_addr".into(),
            toml::Value::String(s.addr.to_string()),
        );
        doc.insert(
            "data_dir".into(),
            toml::Value::String(s.dir.join("data").display().to_string()),
        );
        let cluster = doc
            .entry("cluster")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = cluster {
            t.insert(
                "peers".into(),
                toml::Value::Array(peers.iter().cloned().map(toml::Value::String).collect()),
            );
        }
        std::fs::create_dir_all(s.dir.join("data"))
            .with_context(|| format!("creating {}", s.dir.display()))?;
        let dest = s.dir.join("busd.toml");
        std::fs::write(&dest, toml::to_string(&doc)?)
            .with_context(|| format!("writing {}", dest.display()))?;
    }
    Ok(dev.join("tls").join("ca.pem"))
}

/// Network namespaces, veth pairs and a bridge for one harness instance.
pub struct Net {
    instance: u8,
    nodes: u32,
    /// Held for the run: a second run of the same instance would remove
    /// this one's namespaces (and kill its nodes) when it sets up.
    _lock: std::fs::File,
}

/// Claim harness instance `instance` for this process (an exclusive lock
/// on a file in the temp directory, released when the file is dropped or
/// the process dies).
pub fn lock_instance(instance: u8) -> Result<std::fs::File> {
    let path = std::env::temp_dir().join(format!("jepsen-like-instance-{instance}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "harness instance {instance} is in use by another jepsen-like run (lock {}); \
             pick another --instance",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

impl Net {
    fn bridge(instance: u8) -> String {
        format!("jl{instance}br")
    }
    pub fn ns(&self, id: u32) -> String {
        format!("jl{}-n{id}", self.instance)
    }
    fn veth(&self, id: u32) -> String {
        format!("jl{}v{id}", self.instance)
    }
    pub fn clients_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 241, self.instance, 1)
    }
    pub fn node_ip(&self, id: u32) -> Ipv4Addr {
        Ipv4Addr::new(10, 241, self.instance, 10 + id as u8)
    }

    /// Remove what an earlier run of this instance left behind, then build
    /// the bridge and one namespace per node.
    pub fn setup(instance: u8, nodes: u32) -> Result<Self> {
        if nodes == 0 || nodes > 200 {
            bail!("{nodes} nodes: use 1 to 200");
        }
        let lock = lock_instance(instance)?;
        cleanup_instance(instance);
        let net = Net {
            instance,
            nodes,
            _lock: lock,
        };
        let br = Self::bridge(instance);
        let subnet = format!("{}/24", net.clients_ip());
        sh("ip", &["link", "add", &br, "type", "bridge"])?;
        sh("ip", &["addr", "add", &subnet, "dev", &br])?;
        sh("ip", &["link", "set", &br, "up"])?;
        for id in 1..=nodes {
            let ns = net.ns(id);
            let veth = net.veth(id);
            sh("ip", &["netns", "add", &ns])?;
            sh(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            sh("ip", &["link", "set", &veth, "master", &br, "up"])?;
            let addr = format!("{}/24", net.node_ip(id));
            sh("ip", &["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        // The safety check: every node address must route over our bridge,
        // never out of the machine.
        for id in 1..=nodes {
            let ip = net.node_ip(id).to_string();
            let out = Command::new("ip").args(["route", "get", &ip]).output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !text.contains(&format!("dev {br}")) {
                bail!("refusing to run: {ip} routes as {text:?}, not over bridge {br}");
            }
        }
        Ok(net)
    }

    fn ip_of(&self, e: End) -> IpAddr {
        match e {
            End::Node(id) => self.node_ip(id).into(),
            End::Clients => self.clients_ip().into(),
        }
    }

    /// Drop packets between a and b, in both directions, with rules inside
    /// the node namespaces only.
    fn block(&self, a: End, b: End) -> Result<()> {
        for (me, peer) in [(a, b), (b, a)] {
            let End::Node(id) = me else {
                continue;
            };
            let ns = self.ns(id);
            let peer_ip = self.ip_of(peer).to_string();
            sh(
                "ip",
                &[
                    "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &peer_ip, "-j", "DROP",
                ],
            )?;
            sh(
                "ip",
                &[
                    "netns", "exec", &ns, "iptables", "-A", "OUTPUT", "-d", &peer_ip, "-j", "DROP",
                ],
            )?;
        }
        Ok(())
    }

    fn heal(&self, nodes: u32) -> Result<()> {
        for id in 1..=nodes {
            sh("ip", &["netns", "exec", &self.ns(id), "iptables", "-F"])?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = self.nodes;
        cleanup_instance(self.instance);
    }
}

/// Kill processes left in this instance's namespaces, delete the
/// namespaces (their veth ends go with them) and the bridge. Only names
/// of this instance are touched.
pub fn cleanup_instance(instance: u8) {
    let prefix = format!("jl{instance}-n");
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if !name.starts_with(&prefix) {
            continue;
        }
        let pids = Command::new("ip")
            .args(["netns", "pids", name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in pids
            .lines()
            .filter_map(|p| p.trim().parse::<libc::pid_t>().ok())
        {
            // SAFETY: kill(2) of a process inside a namespace this harness
            // instance created; no memory effects.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
    let _ = Command::new("ip")
        .args(["link", "del", &Net::bridge(instance)])
        .stderr(Stdio::null())
        .status();
}

fn sh(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| {
        format!("running {cmd} (is it installed? partitions need iproute2 and iptables)")
    })?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod instance_lock_tests {
    use super::lock_instance;

    #[test]
    fn a_second_run_of_an_instance_is_refused_until_the_first_ends() {
        // 198: not an instance the scripts use.
        let first = lock_instance(198).expect("first lock");
        let err = lock_instance(198).expect_err("second lock must fail");
        assert!(
            err.to_string().contains("instance 198 is in use"),
            "unexpected error: {err:#}"
        );
        drop(first);
        let again = lock_instance(198).expect("free again once the first ends");
        drop(again);
    }
}

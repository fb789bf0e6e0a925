//! A cluster of real `busd run` processes, one per node, sharing one dev
//! CA; nodes can be killed, stopped and restarted one by one. They listen on
//! loopback, or each in its own network namespace ([`crate::netns`]).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{busd_path, free_port};

/// How long a node may take to start listening.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a node listens, and the network namespace it runs in (if any).
#[derive(Clone, Debug)]
pub struct Placement {
    pub ip: IpAddr,
    pub port: u16,
    pub netns: Option<String>,
}

impl Placement {
    /// Node `id` of `net`, inside its namespace.
    pub fn in_netns(net: &crate::netns::Netns, id: u32) -> Self {
        Placement {
            ip: net.node_ip(id).into(),
            port: 7447,
            netns: Some(net.ns(id)),
        }
    }
}

pub struct Node {
    pub id: u64,
    pub port: u16,
    ip: IpAddr,
    netns: Option<String>,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn addr(&self) -> String {
        std::net::SocketAddr::new(self.ip, self.port).to_string()
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("busd.log")).unwrap_or_default()
    }
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

pub struct Cluster {
    root: tempfile::TempDir,
    pub nodes: Vec<Node>,
    /// Appended to every node's config (see [`Cluster::start_with`]).
    extra_toml: String,
}

impl Cluster {
    /// Start `n` nodes (ids 1..=n) on loopback, all initial controller voters.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, "")
    }

    /// Like [`Cluster::start`], with `extra_toml` appended to every node's
    /// config (after its `[cluster]` table), e.g. a `[log]` table with small
    /// segments and a fast retention check.
    pub fn start_with(n: usize, extra_toml: &str) -> Self {
        Self::start_placed_with(
            (0..n)
                .map(|_| Placement {
                    ip: Ipv4Addr::LOCALHOST.into(),
                    port: free_port(),
                    netns: None,
                })
                .collect(),
            extra_toml,
        )
    }

    /// Start one node per placement (ids 1..=n), all initial controller voters.
    pub fn start_placed(places: Vec<Placement>) -> Self {
        Self::start_placed_with(places, "")
    }

    fn start_placed_with(places: Vec<Placement>, extra_toml: &str) -> Self {
        let n = places.len();
        let root = tempfile::Builder::new()
            .prefix("arrowbus-cluster-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let tls_dir = root.path().join("tls");
        // Clients verify the address they dial; nodes verify "localhost".
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        names.extend(places.iter().map(|p| p.ip.to_string()));
        names.dedup();
        arrowbus_broker::tls::ensure_dev_certificates(&tls_dir, &names)
            .unwrap_or_else(|e| panic!("dev certificates: {e}"));
        let peers: Vec<String> = places
            .iter()
            .enumerate()
            .map(|(i, p)| format!("\"{}@{}\"", i + 1, std::net::SocketAddr::new(p.ip, p.port)))
            .collect();
        let mut nodes = Vec::new();
        for (i, place) in places.iter().enumerate() {
            let dir = root.path().join(format!("node-{}", i + 1));
            std::fs::create_dir_all(dir.join("data")).unwrap_or_else(|e| panic!("mkdir: {e}"));
            let cluster_toml = format!("peers = [{}]", peers.join(", "));
            write_config(&dir, i + 1, place, &tls_dir, &cluster_toml, extra_toml);
            nodes.push(Node {
                id: (i + 1) as u64,
                port: place.port,
                ip: place.ip,
                netns: place.netns.clone(),
                dir,
                child: None,
            });
        }
        let mut c = Cluster {
            root,
            nodes,
            extra_toml: extra_toml.to_owned(),
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_listening(i, 0);
        }
        c
    }

    /// Start node `nodes.len() + 1` on loopback with `cluster.join = true`:
    /// empty, waiting for `busctl cluster add-node`. Returns its id.
    pub fn start_joining_node(&mut self) -> u64 {
        let id = self.nodes.len() + 1;
        let place = Placement {
            ip: Ipv4Addr::LOCALHOST.into(),
            port: free_port(),
            netns: None,
        };
        let dir = self.root.path().join(format!("node-{id}"));
        std::fs::create_dir_all(dir.join("data")).unwrap_or_else(|e| panic!("mkdir: {e}"));
        let tls_dir = self.root.path().join("tls");
        write_config(&dir, id, &place, &tls_dir, "join = true", &self.extra_toml);
        self.nodes.push(Node {
            id: id as u64,
            port: place.port,
            ip: place.ip,
            netns: None,
            dir,
            child: None,
        });
        self.spawn(id - 1);
        self.wait_listening(id - 1, 0);
        id as u64
    }

    /// A `busctl` command aimed at every node of the cluster.
    pub fn busctl(&self) -> Command {
        let mut c = Command::new(crate::busctl_path());
        let brokers: Vec<String> = self.nodes.iter().map(|n| n.addr()).collect();
        c.arg("--broker")
            .arg(brokers.join(","))
            .arg("--ca")
            .arg(self.ca());
        // Keep the user's real profile out of tests.
        c.env("ARROWBUS_CONFIG_DIR", self.root.path().join("no-profile"));
        c.env_remove("ARROWBUS_BROKER").env_remove("ARROWBUS_CA");
        c
    }

    pub fn ca(&self) -> PathBuf {
        self.root.path().join("tls").join("ca.pem")
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Node with id `id`.
    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[(id - 1) as usize]
    }

    /// A client that knows every node.
    pub fn client_config(&self) -> arrowbus::ClientConfig {
        let mut cfg = arrowbus::ClientConfig::new(self.nodes[0].addr()).with_ca(self.ca());
        cfg.brokers = self.nodes.iter().map(|n| n.addr()).collect();
        cfg
    }

    pub async fn client(&self) -> arrowbus::Client {
        arrowbus::Client::connect(self.client_config())
            .await
            .unwrap_or_else(|e| panic!("connecting to the cluster: {e}"))
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("busd.log"))
            .unwrap_or_else(|e| panic!("busd.log: {e}"));
        let log2 = log.try_clone().unwrap_or_else(|e| panic!("busd.log: {e}"));
        let mut cmd = match &node.netns {
            Some(ns) => {
                // `ip netns exec` execs busd itself: the child's pid is busd's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(busd_path());
                c
            }
            None => Command::new(busd_path()),
        };
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(node.dir.join("busd.toml"))
            .env("ARROWBUS_LOG", "info")
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .unwrap_or_else(|e| panic!("starting busd: {e}"));
        node.child = Some(child);
    }

    /// Wait until node `i` (index) has logged `busd listening` more than
    /// `before` times (a restarted node appends to the same log).
    fn wait_listening(&mut self, i: usize, before: usize) {
        let start = Instant::now();
        loop {
            let node = &mut self.nodes[i];
            let log = node.log();
            if log.matches("busd listening").count() > before {
                return;
            }
            if let Some(c) = node.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "node {} exited during start with {status}; log:\n{log}",
                        node.id
                    );
                }
            }
            if start.elapsed() > NODE_START_TIMEOUT {
                panic!(
                    "node {} did not start in {NODE_START_TIMEOUT:?}; log:\n{log}",
                    node.id
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL node `id`: no shutdown code runs.
    pub fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.nodes[(id - 1) as usize].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait (up to `timeout`) for node `id` to exit on its own; its exit
    /// code, or None if it is still running (or was not).
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let node = &mut self.nodes[(id - 1) as usize];
        loop {
            let c = node.child.as_mut()?;
            if let Ok(Some(status)) = c.try_wait() {
                node.child = None;
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Create topic `name` with `partitions` partitions, each replicated on
    /// three nodes; panics with the nodes' logs if the cluster refuses.
    pub async fn create_replicated_topic(
        &self,
        client: &arrowbus::Client,
        name: &str,
        partitions: u32,
    ) {
        client
            .admin()
            .create_topic(
                arrowbus::NewTopic::new(name)
                    .partitions(partitions)
                    .replication_factor(3),
            )
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}\n{}", self.logs()));
    }

    /// SIGTERM node `id` and wait; its exit code.
    pub fn terminate(&mut self, id: u64) -> Option<i32> {
        let mut c = self.nodes[(id - 1) as usize].child.take()?;
        // SAFETY: signalling our own child has no memory effects.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        c.wait().ok().and_then(|s| s.code())
    }

    /// Start node `id` again on its data directory and port, without
    /// waiting for it to serve (it may be expected to stop by itself).
    pub fn respawn(&mut self, id: u64) {
        self.kill9(id);
        self.spawn((id - 1) as usize);
    }

    /// Start node `id` again on its data directory and port.
    pub fn restart(&mut self, id: u64) {
        self.kill9(id);
        let i = (id - 1) as usize;
        let before = self.nodes[i].log().matches("busd listening").count();
        self.spawn(i);
        self.wait_listening(i, before);
    }

    /// Wait (up to 60 s) until every node's replica of `topic`/`partition`
    /// has applied the same last entry and names the same leader; returns
    /// that leader. `what` says in the failure message when this was.
    pub async fn await_converged(
        &self,
        client: &arrowbus::Client,
        topic: &str,
        partition: u32,
        what: &str,
    ) -> u64 {
        let all: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        self.await_converged_on(client, topic, partition, &all, what)
            .await
    }

    /// [`Cluster::await_converged`] over the replicas on nodes `ids`.
    pub async fn await_converged_on(
        &self,
        client: &arrowbus::Client,
        topic: &str,
        partition: u32,
        ids: &[u64],
        what: &str,
    ) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // (leader, last log index, applied index) per node.
            let mut seen = Vec::new();
            for n in self.nodes.iter().filter(|n| ids.contains(&n.id)) {
                if let Ok(s) = client.admin().node_status(n.id).await {
                    if let Some(g) = s
                        .partitions
                        .iter()
                        .find(|g| g.topic == topic && g.partition == partition)
                    {
                        seen.push((g.leader, g.last_log_index, g.applied));
                    }
                }
            }
            let converged = seen.len() == ids.len()
                && seen
                    .iter()
                    .all(|s| s.0 != 0 && s.0 == seen[0].0 && s.1 == s.2 && s.1 == seen[0].1);
            if converged {
                return seen[0].0;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: replicas of {topic}/{partition} did not converge in 60 s: \
                 (leader, last, applied) {seen:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The nodes' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let log = n.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                format!(
                    "---- node {} (last 40 lines) ----\n{}",
                    n.id,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Write node `id`'s `busd.toml` in `dir`: `cluster_toml` goes in its
/// `[cluster]` table, `extra_toml` after it.
fn write_config(
    dir: &Path,
    id: usize,
    place: &Placement,
    tls_dir: &Path,
    cluster_toml: &str,
    extra_toml: &str,
) {
    let config = format!(
        "node_id = {id}\ndata_dir = {data:?}\nlisten = \"{listen}\"\n\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\nca = {ca:?}\n\n\
         [cluster]\n{cluster_toml}\n\n{extra_toml}",
        listen = std::net::SocketAddr::new(place.ip, place.port),
        data = dir.join("data").display().to_string(),
        cert = tls_dir.join("node.pem").display().to_string(),
        key = tls_dir.join("node.key").display().to_string(),
        ca = tls_dir.join("ca.pem").display().to_string(),
    );
    std::fs::write(dir.join("busd.toml"), config).unwrap_or_else(|e| panic!("config: {e}"));
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Partition `p`'s directory of the topic whose directory name starts with
/// `topic_dir_prefix` (e.g. `"ticks-"`) on `node`.
pub fn partition_dir(node: &Node, topic_dir_prefix: &str, p: u32) -> PathBuf {
    partition_dir_in(&node.data_dir(), topic_dir_prefix, p)
}

/// Partition `p`'s directory of the topic whose directory name starts with
/// `topic_dir_prefix`, in the node data directory `data_dir`.
pub fn partition_dir_in(data_dir: &Path, topic_dir_prefix: &str, p: u32) -> PathBuf {
    let topics = data_dir.join("topics");
    std::fs::read_dir(&topics)
        .unwrap_or_else(|e| panic!("{}: {e}", topics.display()))
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(topic_dir_prefix)
        })
        .unwrap_or_else(|| panic!("{} has no {topic_dir_prefix}* directory", topics.display()))
        .path()
        .join(format!("p-{p}"))
}

/// The data records of a partition log on disk (a stopped node's):
/// (base offset, rows, body CRC) in log order.
pub fn data_records(partition_dir: &Path) -> Vec<(u64, u32, u32)> {
    data_headers(partition_dir)
        .into_iter()
        .map(|h| (h.base_offset, h.row_count, h.body_crc))
        .collect()
}

/// The headers of the data records of a partition log on disk (a stopped
/// node's), in log order: with their Raft log ids.
pub fn data_headers(partition_dir: &Path) -> Vec<arrowbus_wire::BatchHeader> {
    use arrowbus_raft::log::{LogConfig, PartitionLog};
    let (log, _) = PartitionLog::open(partition_dir, LogConfig::default())
        .unwrap_or_else(|e| panic!("opening {}: {e}", partition_dir.display()));
    let mut cursor = log
        .seek_offset(log.start_offset())
        .unwrap_or_else(|e| panic!("seek: {e}"));
    let mut out = Vec::new();
    while let Some(b) = log
        .read(&mut cursor, u64::MAX)
        .unwrap_or_else(|e| panic!("reading {}: {e}", partition_dir.display()))
    {
        if b.header.kind == arrowbus_wire::BatchKind::Data {
            out.push(b.header);
        }
    }
    log.close();
    out
}

//! `busbench transport`: the ceiling the transport alone sets on this
//! machine, measured with the broker taken out.
//!
//! A publish→deliver in arrowbus crosses QUIC twice (producer → busd →
//! subscriber), each way TLS-encrypted, with every party on the same
//! cores. This mode keeps exactly that and removes everything else: a
//! *relay* process (this binary, `transport-relay`) binds busd's own QUIC
//! endpoint (`arrowbus_broker::server::bind_endpoint` with `busd dev`'s
//! settings and certificates); busbench connects a producer and a
//! subscriber with the client's own settings
//! (`arrowbus::quic_client_config`). The relay reads each message whole
//! into memory, as busd reads a publish, hands it to the subscriber's
//! stream through a bounded queue (where busd has its log), and acks it to
//! the producer. No Arrow encode or decode, no validation, no CRC, no log,
//! no Raft, no disk.
//!
//! So its throughput is an upper bound for `busbench run`'s closed-loop
//! phases, and its latency a lower bound for the paced ones, at the same
//! message sizes and rates. Quote the two side by side from one session.
//!
//! Message framing on the streams: `[u64 LE length][payload]`; the payload
//! starts with the sequence number and the intended send time (µs on the
//! process clock, see `latency::Clock`). Acks are the 8-byte sequence.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use tokio::sync::{mpsc, Semaphore};

use crate::latency::{intended_offset, parse_duration, Clock, Latency, Summary};
use crate::report::{load_average, Environment};
use crate::spawn::{proc_stats, terminate};

/// Messages a producer keeps in flight: the arrowbus producer's window.
const WINDOW: usize = arrowbus_wire::limits::MAX_INFLIGHT_BATCHES_PER_PRODUCER;
/// Messages the relay holds for its subscriber before the publishing side
/// waits: where busd has its log and the subscriber's credit.
const RELAY_QUEUE: usize = 16;
/// The largest message either side accepts: a batch's limit.
const MAX_MESSAGE_BYTES: u64 = arrowbus_wire::limits::MAX_BATCH_BYTES as u64;
/// Sequence number and intended send time at the start of every payload.
const STAMP_BYTES: usize = 16;
/// The sequence number of the message that ends a phase (stamp only).
const END_OF_PHASE: u64 = u64::MAX;
const ROLE_PRODUCER: u8 = b'P';
const ROLE_SUBSCRIBER: u8 = b'S';
/// The line the relay prints once it listens: `READY <port>`.
const READY: &str = "READY";
/// How long the relay may take to start, and the phases to drain.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Clone)]
pub struct TransportArgs {
    /// Message sizes in bytes (suffix k or m for KiB and MiB). The defaults
    /// are the Arrow bodies of `busbench run`'s 1,000-row, 64 KiB and 1 MiB
    /// batches.
    #[arg(long, value_delimiter = ',', value_parser = parse_bytes, default_value = "33664,65408,1050240")]
    pub sizes: Vec<usize>,
    /// Length of each closed-loop phase (after the warm-up).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Excluded from every phase's numbers.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Paced phases: offered messages per second, each at --latency-size.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub rates: Vec<f64>,
    /// Message size of the paced phases (default: a 1,000-row batch).
    #[arg(long, value_parser = parse_bytes, default_value = "33664")]
    pub latency_size: usize,
    /// Replication factors to measure: with N > 1 the relay also sends each
    /// message to N - 1 follower relays (busd's peer-link settings) and
    /// acks once one of them has acked it (a quorum of 2 counting itself,
    /// as a 3-replica partition acks).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub replicas: Vec<usize>,
    /// Make every relay append each message to a file in this directory
    /// with `O_DIRECT` and `fdatasync` (group commit, as busd's log writer
    /// with `fsync = always`) before it counts toward the commit: the
    /// floor of a durable broker. Unset: held in memory only.
    #[arg(long)]
    pub sync_dir: Option<PathBuf>,
    /// Publish alone: no subscriber, throughput and latency from the acks
    /// (the relay only stores and acks; one QUIC hop instead of two).
    #[arg(long)]
    pub no_subscriber: bool,
    /// Scratch directory for the relay's certificates and reset key.
    #[arg(long, default_value = "/tmp/busbench-transport")]
    pub work_dir: PathBuf,
    /// Markdown report path (default: print only).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The relay process (started by `busbench transport`, not by hand).
#[derive(Args, Clone)]
pub struct RelayArgs {
    /// Where to keep the certificates (created like `busd dev`'s).
    #[arg(long)]
    pub dir: PathBuf,
    /// Follower relays (`HOST:PORT`) every message is also sent to.
    #[arg(long, value_delimiter = ',')]
    pub followers: Vec<String>,
    /// Append every message to a file here (O_DIRECT, fdatasync, group
    /// commit) before it counts as held.
    #[arg(long)]
    pub sync_dir: Option<PathBuf>,
}

pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = t.strip_suffix('k') {
        (n, 1024)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 1024 * 1024)
    } else {
        (t.as_str(), 1)
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("'{s}' is not a byte count (e.g. 33664, 64k, 1m)"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes < STAMP_BYTES || bytes as u64 > MAX_MESSAGE_BYTES {
        return Err(format!(
            "'{s}': messages are {STAMP_BYTES}..={MAX_MESSAGE_BYTES} bytes"
        ));
    }
    Ok(bytes)
}

// ---------------------------------------------------------------- relay

pub fn cmd_relay(a: RelayArgs) -> anyhow::Result<()> {
    let rt = crate::runtime()?;
    rt.block_on(async move {
        let listen: SocketAddr = "127.0.0.1:0".parse().context("listen address")?;
        let config = arrowbus_broker::BrokerConfig::dev(a.dir.clone(), listen);
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let files = arrowbus_broker::tls::ensure_dev_certificates(&a.dir.join("tls"), &names)
            .context("creating certificates")?;
        let ca = files.ca.clone().context("dev certificates have a CA")?;
        // As busd: peers authenticate with certificates of the same CA.
        let crypto = arrowbus_broker::tls::server_crypto(&files, Some(&ca))
            .context("loading the certificate")?;
        let endpoint = arrowbus_broker::server::bind_endpoint(&config, crypto)?;
        let repl = Replication::connect(&files, &ca, &a.followers, a.sync_dir.as_deref()).await?;
        let port = endpoint.local_addr().context("bound address")?.port();
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{READY} {port}").context("writing the ready line")?;
            out.flush().context("writing the ready line")?;
        }
        let subscriber: Arc<Mutex<Option<mpsc::Sender<Bytes>>>> = Arc::new(Mutex::new(None));
        while let Some(incoming) = endpoint.accept().await {
            let subscriber = subscriber.clone();
            let repl = repl.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let subscriber = subscriber.clone();
                    let repl = repl.clone();
                    tokio::spawn(async move {
                        if let Err(e) = relay_stream(send, recv, subscriber, repl).await {
                            eprintln!("transport-relay: stream ended: {e:#}");
                        }
                    });
                }
            });
        }
        Ok(())
    })
}

async fn relay_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    subscriber: Arc<Mutex<Option<mpsc::Sender<Bytes>>>>,
    repl: Arc<Replication>,
) -> anyhow::Result<()> {
    let mut role = [0u8; 1];
    recv.read_exact(&mut role)
        .await
        .context("reading the role")?;
    match role[0] {
        ROLE_SUBSCRIBER => {
            let (tx, mut rx) = mpsc::channel::<Bytes>(RELAY_QUEUE);
            *lock(&subscriber) = Some(tx);
            while let Some(m) = rx.recv().await {
                let len = len_prefix(m.len());
                send.write_all_chunks(&mut [len, m])
                    .await
                    .context("writing to the subscriber")?;
            }
            Ok(())
        }
        ROLE_PRODUCER => {
            // Once a message is committed (durable on a quorum) it is acked
            // and handed to the subscriber, in order, by its own task while
            // the next messages are read: busd pipelines a producer's
            // batches the same way and delivers only what is committed.
            let (commit_tx, mut commit_rx) = mpsc::unbounded_channel::<(u64, Bytes)>();
            let committed = repl.committed.clone();
            let committer = tokio::spawn(async move {
                let mut committed = committed.subscribe();
                while let Some((n, body)) = commit_rx.recv().await {
                    if committed.wait_for(|c| *c > n).await.is_err() {
                        break;
                    }
                    if send.write_all(&body[..8]).await.is_err() {
                        break;
                    }
                    let to = lock(&subscriber).clone();
                    if let Some(to) = to {
                        // A gone subscriber only means nobody is measuring.
                        let _ = to.send(body).await;
                    }
                }
            });
            loop {
                let Some(len) = read_len(&mut recv).await? else {
                    break;
                };
                // Read whole into one buffer, as busd reads a publish.
                let body = Bytes::from(
                    arrowbus_quic::read_exact_vec(&mut recv, len)
                        .await
                        .context("reading a message")?,
                );
                let n = repl.append(&body).await?;
                let _ = commit_tx.send((n, body));
            }
            drop(commit_tx);
            let _ = committer.await;
            Ok(())
        }
        other => bail!("unknown role byte {other}"),
    }
}

/// A relay's copy of the messages and its links to followers.
/// `counts[0]` is how many messages this relay holds (durably, with a sync
/// directory), `counts[i]` how many follower `i` has acked; `committed`
/// is how many are on a majority of the replicas (over the relay's life).
struct Replication {
    links: Vec<tokio::sync::Mutex<quinn::SendStream>>,
    _conns: Vec<quinn::Connection>,
    disk: Option<std::sync::mpsc::Sender<Bytes>>,
    appended: AtomicU64,
    counts: Mutex<Vec<u64>>,
    committed: tokio::sync::watch::Sender<u64>,
}

impl Replication {
    async fn connect(
        files: &arrowbus_broker::tls::TlsFiles,
        ca: &Path,
        addrs: &[String],
        sync_dir: Option<&Path>,
    ) -> anyhow::Result<Arc<Self>> {
        let mut links = Vec::new();
        let mut conns = Vec::new();
        let mut ack_streams = Vec::new();
        if !addrs.is_empty() {
            let peer = arrowbus_broker::tls::peer_client_config(files, ca)
                .context("peer client settings")?;
            let bind: SocketAddr = "127.0.0.1:0".parse().context("bind address")?;
            let (socket, _) =
                arrowbus_quic::bind_udp(bind, arrowbus_quic::DEFAULT_SOCKET_BUFFER_BYTES)
                    .context("binding the peer socket")?;
            let mut endpoint = arrowbus_quic::client_endpoint(socket).context("peer endpoint")?;
            endpoint.set_default_client_config(peer);
            for a in addrs {
                let addr: SocketAddr = a.parse().with_context(|| format!("follower {a}"))?;
                let conn = endpoint.connect(addr, "localhost")?.await?;
                let (mut send, recv) = conn.open_bi().await?;
                send.write_all(&[ROLE_PRODUCER]).await?;
                links.push(tokio::sync::Mutex::new(send));
                ack_streams.push(recv);
                conns.push(conn);
            }
        }
        let (disk, disk_rx) = match sync_dir {
            Some(_) => {
                let (tx, rx) = std::sync::mpsc::channel::<Bytes>();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let repl = Arc::new(Self {
            links,
            _conns: conns,
            disk,
            appended: AtomicU64::new(0),
            counts: Mutex::new(vec![0; addrs.len() + 1]),
            committed: tokio::sync::watch::Sender::new(0),
        });
        for (i, mut recv) in ack_streams.into_iter().enumerate() {
            let repl = repl.clone();
            tokio::spawn(async move {
                let mut a = [0u8; 8];
                while recv.read_exact(&mut a).await.is_ok() {
                    repl.held(i + 1, 1);
                }
            });
        }
        if let (Some(dir), Some(rx)) = (sync_dir, disk_rx) {
            let file = crate::transport_disk::DirectFile::create(dir)?;
            let repl = repl.clone();
            std::thread::Builder::new()
                .name("relay-log-writer".into())
                .spawn(move || {
                    if let Err(e) =
                        crate::transport_disk::write_loop(file, &rx, |n| repl.held(0, n))
                    {
                        eprintln!("transport-relay: disk writer stopped: {e:#}");
                    }
                })
                .context("starting the disk writer")?;
        }
        Ok(repl)
    }

    /// Replica `who` holds `more` further messages: recompute the commit.
    fn held(&self, who: usize, more: u64) {
        let c = {
            let mut counts = lock(&self.counts);
            counts[who] += more;
            majority_holds(&counts)
        };
        self.committed.send_if_modified(|q| {
            let more = c > *q;
            if more {
                *q = c;
            }
            more
        });
    }

    /// Store `body` here and send it to every follower (all links written
    /// before returning, as a Raft leader appends to every follower).
    /// Returns its number: committed once `committed` exceeds it.
    async fn append(&self, body: &Bytes) -> anyhow::Result<u64> {
        let n = self.appended.fetch_add(1, Ordering::AcqRel);
        match &self.disk {
            Some(d) => d
                .send(body.clone())
                .map_err(|_| anyhow::anyhow!("the disk writer stopped"))?,
            None => self.held(0, 1),
        }
        let len = len_prefix(body.len());
        for l in &self.links {
            l.lock()
                .await
                .write_all_chunks(&mut [len.clone(), body.clone()])
                .await
                .context("sending to a follower")?;
        }
        Ok(n)
    }
}

/// How many messages a majority of the replicas hold, given how many each
/// holds: the (n/2 + 1)-th largest count.
fn majority_holds(counts: &[u64]) -> u64 {
    let mut sorted = counts.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.get(counts.len() / 2).copied().unwrap_or(0)
}

/// The 8-byte length that precedes a message of `len` bytes.
fn len_prefix(len: usize) -> Bytes {
    Bytes::copy_from_slice(&(len as u64).to_le_bytes())
}

/// The next message's length; `None` at a clean end of the stream.
async fn read_len(recv: &mut quinn::RecvStream) -> anyhow::Result<Option<usize>> {
    let mut l = [0u8; 8];
    match recv.read_exact(&mut l).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e).context("reading a length"),
    }
    let len = u64::from_le_bytes(l);
    if !(STAMP_BYTES as u64..=MAX_MESSAGE_BYTES).contains(&len) {
        bail!("message length {len} outside {STAMP_BYTES}..={MAX_MESSAGE_BYTES}");
    }
    usize::try_from(len).map(Some).context("message length")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------- measurement

struct Relay {
    child: Option<Child>,
    pid: u32,
    addr: String,
    ca: PathBuf,
    /// Its follower relays (they stop with it).
    followers: Vec<Relay>,
}

impl Relay {
    fn start(dir: &Path, followers: &[String], sync_dir: Option<&Path>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let exe = std::env::current_exe().context("locating busbench")?;
        let mut cmd = Command::new(exe);
        cmd.arg("transport-relay").arg("--dir").arg(dir);
        if !followers.is_empty() {
            cmd.arg("--followers").arg(followers.join(","));
        }
        if let Some(d) = sync_dir {
            cmd.arg("--sync-dir").arg(d);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the relay")?;
        let pid = child.id();
        let stdout = child.stdout.take().context("relay stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let _ = terminate(child, Duration::from_secs(2));
                bail!("the relay did not start within {START_TIMEOUT:?}");
            }
        };
        let port: u16 = match line.trim().strip_prefix(READY).map(|p| p.trim().parse()) {
            Some(Ok(p)) => p,
            _ => {
                let _ = terminate(child, Duration::from_secs(2));
                bail!("the relay said {line:?} instead of its port");
            }
        };
        Ok(Self {
            child: Some(child),
            pid,
            addr: format!("127.0.0.1:{port}"),
            ca: dir.join("tls").join("ca.pem"),
            followers: Vec::new(),
        })
    }

    /// CPU seconds of the relay and its followers.
    fn cpu_s(&self) -> f64 {
        cpu_s(self.pid) + self.followers.iter().map(Relay::cpu_s).sum::<f64>()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            let _ = terminate(c, Duration::from_secs(5));
        }
    }
}

/// A connected producer and, unless publishing alone, a subscriber.
struct Pair {
    _endpoint: quinn::Endpoint,
    _conns: Vec<quinn::Connection>,
    psend: quinn::SendStream,
    precv: quinn::RecvStream,
    sub: Option<(quinn::SendStream, quinn::RecvStream)>,
}

async fn connect(relay: &Relay, subscribe: bool) -> anyhow::Result<Pair> {
    let cfg = arrowbus::ClientConfig::new(relay.addr.clone()).with_ca(&relay.ca);
    let client = arrowbus::quic_client_config(&cfg).context("client QUIC settings")?;
    let bind: SocketAddr = "127.0.0.1:0".parse().context("bind address")?;
    let (socket, _) = arrowbus_quic::bind_udp(bind, arrowbus_quic::DEFAULT_SOCKET_BUFFER_BYTES)
        .context("binding the client socket")?;
    let mut endpoint = arrowbus_quic::client_endpoint(socket).context("client endpoint")?;
    endpoint.set_default_client_config(client);
    let addr: SocketAddr = relay.addr.parse().context("relay address")?;
    // Two connections, as a producer and a subscriber in two processes
    // would have (the client opens one per node and shares it; busbench's
    // `run` shares one: this is the stricter setup for the relay).
    let mut conns = Vec::new();
    let mut sub = None;
    if subscribe {
        let sconn = endpoint.connect(addr, "localhost")?.await?;
        let (mut ssend, srecv) = sconn.open_bi().await?;
        ssend.write_all(&[ROLE_SUBSCRIBER]).await?;
        // The relay registers the subscriber when it reads the role byte.
        tokio::time::sleep(Duration::from_millis(100)).await;
        conns.push(sconn);
        sub = Some((ssend, srecv));
    }
    let pconn = endpoint.connect(addr, "localhost")?.await?;
    let (mut psend, precv) = pconn.open_bi().await?;
    psend.write_all(&[ROLE_PRODUCER]).await?;
    conns.push(pconn);
    Ok(Pair {
        _endpoint: endpoint,
        _conns: conns,
        psend,
        precv,
        sub,
    })
}

/// What one phase measured.
struct PhaseOut {
    name: String,
    replicas: usize,
    size: usize,
    rate: Option<f64>,
    /// Messages acked inside the measured window, and their latency
    /// (intended send → ack).
    acked: u64,
    ack: Option<Summary>,
    /// Bytes delivered inside the measured window (0 when publishing alone).
    delivered_bytes: u64,
    window: Duration,
    e2e: Option<Summary>,
    lag: Option<Summary>,
    relay_cpu_pct: f64,
    busbench_cpu_pct: f64,
}

impl PhaseOut {
    fn mb_per_s(&self) -> f64 {
        self.delivered_bytes as f64 / self.window.as_secs_f64() / 1e6
    }

    fn acked_mb_per_s(&self) -> f64 {
        (self.acked * self.size as u64) as f64 / self.window.as_secs_f64() / 1e6
    }
}

/// Run one phase on a fresh producer/subscriber pair: closed loop with the
/// producer window full (`rate` None) or paced at `rate` messages/s.
#[allow(clippy::too_many_arguments)]
async fn phase(
    relay: &Relay,
    replicas: usize,
    size: usize,
    rate: Option<f64>,
    warmup: Duration,
    duration: Duration,
    subscribe: bool,
) -> anyhow::Result<PhaseOut> {
    let pair = connect(relay, subscribe).await?;
    let Pair {
        _endpoint,
        _conns,
        mut psend,
        mut precv,
        sub,
    } = pair;
    let clock = Clock::now();
    let measure_from = clock.start + warmup;
    let end = measure_from + duration;

    // Subscriber: every delivery after the warm-up counts.
    let sub = sub.map(|(_ssend, mut srecv)| {
        tokio::spawn(async move {
            let _ssend = _ssend;
            let mut e2e = Latency::new()?;
            let (mut n, mut bytes, mut last_seq) = (0u64, 0u64, None::<u64>);
            loop {
                let Some(len) = read_len(&mut srecv).await? else {
                    break;
                };
                let m = arrowbus_quic::read_exact_vec(&mut srecv, len).await?;
                let now = Instant::now();
                let (seq, intended_us) = stamp_of(&m);
                if seq == END_OF_PHASE {
                    break;
                }
                if let Some(l) = last_seq {
                    if seq != l + 1 {
                        bail!("delivery {seq} after {l}: the relay lost or reordered a message");
                    }
                }
                last_seq = Some(seq);
                if now >= measure_from && now < end {
                    n += 1;
                    bytes += m.len() as u64;
                    let lat_us = clock.micros_of(now) - intended_us;
                    e2e.record(Duration::from_micros(lat_us.max(0) as u64));
                }
            }
            anyhow::Ok((n, bytes, e2e, last_seq.map_or(0, |l| l + 1)))
        })
    });

    // Acks release the window, in order; each is timed from its message's
    // intended send time (queued by the pacer before the send).
    let window = Arc::new(Semaphore::new(WINDOW));
    let intended_q = Arc::new(Mutex::new(std::collections::VecDeque::<Instant>::new()));
    let acks = {
        let window = window.clone();
        let intended_q = intended_q.clone();
        tokio::spawn(async move {
            let mut lat = Latency::new()?;
            let (mut next, mut in_window) = (0u64, 0u64);
            let mut a = [0u8; 8];
            while precv.read_exact(&mut a).await.is_ok() {
                let now = Instant::now();
                let seq = u64::from_le_bytes(a);
                if seq == END_OF_PHASE {
                    break;
                }
                if seq != next {
                    bail!("ack {seq} where {next} was due");
                }
                let intended = lock(&intended_q).pop_front();
                if let (Some(t), true) = (intended, now >= measure_from && now < end) {
                    in_window += 1;
                    lat.record(now.saturating_duration_since(t));
                }
                next += 1;
                window.add_permits(1);
            }
            anyhow::Ok((next, in_window, lat))
        })
    };

    // Producer: a plain thread paces (sub-100 µs sleeps, as `run` does)
    // and drives each send on the runtime.
    let handle = tokio::runtime::Handle::current();
    let template = Bytes::from(vec![0x5au8; size]);
    let (cpu0_relay, cpu0_self) = (relay.cpu_s(), cpu_s(std::process::id()));
    let t0 = Instant::now();
    let producer = std::thread::Builder::new()
        .name("busbench-transport-pacer".into())
        .spawn(
            move || -> anyhow::Result<(quinn::SendStream, Latency, u64)> {
                let mut lag = Latency::new()?;
                let mut seq = 0u64;
                loop {
                    let intended = match rate {
                        Some(r) => clock.start + intended_offset(seq, r),
                        None => Instant::now(),
                    };
                    if intended >= end {
                        break;
                    }
                    let now = Instant::now();
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    if rate.is_some() {
                        lag.record(Instant::now().saturating_duration_since(intended));
                    }
                    // A fresh buffer per send, as a producer encodes each batch.
                    let mut m = template.to_vec();
                    m[..8].copy_from_slice(&seq.to_le_bytes());
                    m[8..16].copy_from_slice(&clock.micros_of(intended).to_le_bytes());
                    let len = len_prefix(m.len());
                    handle.block_on(async {
                        window.acquire().await.context("window closed")?.forget();
                        lock(&intended_q).push_back(intended);
                        psend
                            .write_all_chunks(&mut [len, Bytes::from(m)])
                            .await
                            .context("sending")
                    })?;
                    seq += 1;
                }
                let mut last = vec![0u8; STAMP_BYTES];
                last[..8].copy_from_slice(&END_OF_PHASE.to_le_bytes());
                let len = len_prefix(STAMP_BYTES);
                handle.block_on(psend.write_all_chunks(&mut [len, Bytes::from(last)]))?;
                Ok((psend, lag, seq))
            },
        )
        .context("starting the pacer")?;
    let (mut psend, lag, sent) = tokio::task::spawn_blocking(move || producer.join())
        .await
        .context("pacer")?
        .map_err(|_| anyhow::anyhow!("the pacer panicked"))??;
    let _ = psend.finish();
    let (acked_total, acked, ack) = tokio::time::timeout(DRAIN_TIMEOUT, acks)
        .await
        .context("the acks did not reach the end of the phase")???;
    if acked_total != sent {
        bail!("{sent} messages sent, {acked_total} acked: the transport lost acks");
    }
    if acked == 0 {
        bail!("nothing was acked inside the measured window (is --duration too short?)");
    }
    let (delivered_bytes, e2e) = match sub {
        Some(sub) => {
            let (delivered, bytes, e2e, received) = tokio::time::timeout(DRAIN_TIMEOUT, sub)
                .await
                .context("the subscriber did not reach the end of the phase")???;
            if received != sent {
                bail!("{sent} messages sent, {received} delivered: the transport lost messages");
            }
            if delivered == 0 {
                bail!("nothing was delivered inside the measured window");
            }
            (bytes, e2e.summary())
        }
        None => (0, None),
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1_relay, cpu1_self) = (relay.cpu_s(), cpu_s(std::process::id()));
    Ok(PhaseOut {
        name: match rate {
            Some(r) => format!("R{replicas} {size} B @ {r}/s"),
            None => format!("R{replicas} {size} B closed loop"),
        },
        replicas,
        size,
        rate,
        acked,
        ack: ack.summary(),
        delivered_bytes,
        window: duration,
        e2e,
        lag: rate.and_then(|_| lag.summary()),
        relay_cpu_pct: 100.0 * (cpu1_relay - cpu0_relay) / elapsed,
        busbench_cpu_pct: 100.0 * (cpu1_self - cpu0_self) / elapsed,
    })
}

fn stamp_of(m: &[u8]) -> (u64, i64) {
    let mut s = [0u8; 8];
    s.copy_from_slice(&m[..8]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&m[8..16]);
    (u64::from_le_bytes(s), i64::from_le_bytes(t))
}

fn cpu_s(pid: u32) -> f64 {
    proc_stats(pid).map_or(0.0, |s| s.cpu_s)
}

pub fn cmd_transport(a: TransportArgs) -> anyhow::Result<()> {
    let env = Environment::probe();
    let rt = crate::runtime()?;
    let mut phases = Vec::new();
    for &r in &a.replicas {
        if r == 0 {
            bail!("--replicas: a replication factor is at least 1");
        }
        // Followers first: the leader connects to them when it starts.
        let mut followers = Vec::new();
        for _ in 1..r {
            followers.push(Relay::start(&a.work_dir, &[], a.sync_dir.as_deref())?);
        }
        let addrs: Vec<String> = followers.iter().map(|f| f.addr.clone()).collect();
        let mut relay = Relay::start(&a.work_dir, &addrs, a.sync_dir.as_deref())?;
        relay.followers = followers;
        measure(&rt, &a, &relay, r, &mut phases)?;
    }
    let md = markdown(&a, &env, &phases);
    match &a.out {
        Some(path) => {
            std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("report: {}", path.display());
        }
        None => print!("{md}"),
    }
    Ok(())
}

fn measure(
    rt: &tokio::runtime::Runtime,
    a: &TransportArgs,
    relay: &Relay,
    replicas: usize,
    phases: &mut Vec<PhaseOut>,
) -> anyhow::Result<()> {
    for &size in &a.sizes {
        let p = rt.block_on(phase(
            relay,
            replicas,
            size,
            None,
            a.warmup,
            a.duration,
            !a.no_subscriber,
        ))?;
        eprintln!(
            "{}: {:.1} MB/s acked, {:.1} MB/s delivered, relay CPU {:.0} %, busbench CPU {:.0} %",
            p.name,
            p.acked_mb_per_s(),
            p.mb_per_s(),
            p.relay_cpu_pct,
            p.busbench_cpu_pct
        );
        phases.push(p);
    }
    for &rate in &a.rates {
        let p = rt.block_on(phase(
            relay,
            replicas,
            a.latency_size,
            Some(rate),
            a.warmup,
            a.duration,
            !a.no_subscriber,
        ))?;
        for (what, s) in [("ack", p.ack), ("e2e", p.e2e)] {
            if let Some(s) = s {
                eprintln!(
                    "{} {what}: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs",
                    p.name, s.p50_us, s.p99_us, s.p999_us
                );
            }
        }
        phases.push(p);
    }
    Ok(())
}

fn markdown(a: &TransportArgs, env: &Environment, phases: &[PhaseOut]) -> String {
    let mut md = format!(
        "# busbench transport: producer → relay → subscriber over QUIC, no broker\n\n\
         ```\n{}\n```\n\n\
         | | |\n|---|---|\n\
         | date (UTC) | {} |\n| git commit | {} |\n\
         | machine | {} CPUs ({}), Linux {} |\n\
         | load average at start / end | {} / {} |\n\n\
         The relay is a separate process with busd's QUIC endpoint (`bind_endpoint`, `busd dev` \
         settings and certificates, TLS 1.3); the producer and the subscriber use the Rust \
         client's QUIC settings, one connection each, in this process. The relay reads each \
         message whole, queues it for the subscriber ({RELAY_QUEUE} messages) and acks it; the \
         producer keeps {WINDOW} messages in flight. With replicas N > 1 the relay also sends \
         every message to N - 1 follower relays (separate processes, busd's peer-link TLS \
         settings with client certificates) and acks once one follower has acked it, as a \
         3-replica partition acks on 2 of 3; *relays' CPU* is then all of them together. \
         A message is acked and delivered once it is committed: held by a majority of the \
         relays (held = in memory, or written and fdatasynced with --sync-dir). Nothing else: no Arrow, no CRC, no log, no \
         Raft, no disk. Everything shares this machine's CPUs. Warm-up {:?} excluded; \
         {:?} measured per phase. MB = 10^6 bytes.\n\n",
        env.command_line,
        env.date_utc,
        env.git_commit,
        env.nproc,
        env.cpu_model,
        env.kernel,
        env.loadavg,
        load_average(),
        a.warmup,
        a.duration,
    );
    md.push_str(&format!(
        "Durability: {}. Subscriber: {}.\n\n",
        match &a.sync_dir {
            Some(d) => format!("every relay writes each message to a file in `{}` with O_DIRECT and fdatasyncs it (group commit) before it counts", d.display()),
            None => "none (held in memory)".into(),
        },
        if a.no_subscriber { "none (publish alone; latency is intended send → ack)" } else { "one, reading as it goes" },
    ));
    let f = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
    let pair = |s: Option<Summary>| match s {
        Some(s) => format!("{:.0} / {:.0}", s.p50_us, s.p99_us),
        None => "–".into(),
    };
    md.push_str(
        "## Closed loop (producer window full)\n\n\
         | replicas | message bytes | acked msgs/s | acked MB/s | delivered MB/s | ack p50 / p99 (µs) | e2e p50 / p99 (µs) | relays' CPU | busbench CPU |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in phases.iter().filter(|p| p.rate.is_none()) {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {} | {} | {} | {:.0} % | {:.0} % |\n",
            p.replicas,
            p.size,
            p.acked as f64 / p.window.as_secs_f64(),
            p.acked_mb_per_s(),
            if p.e2e.is_some() {
                format!("{:.1}", p.mb_per_s())
            } else {
                "–".into()
            },
            pair(p.ack),
            pair(p.e2e),
            p.relay_cpu_pct,
            p.busbench_cpu_pct,
        ));
    }
    md.push_str(
        "\n## Paced (latency from the intended send time)\n\n\
         | replicas | message bytes | offered/s | acked/s | ack p50 / p99 | e2e p50 | p90 | p99 | p99.9 | max | pacer lag p99 | relays' CPU |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in phases.iter().filter(|p| p.rate.is_some()) {
        let s = p.e2e;
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.0} % |\n",
            p.replicas,
            p.size,
            p.rate.unwrap_or(0.0),
            p.acked as f64 / p.window.as_secs_f64(),
            pair(p.ack),
            f(s.map(|s| s.p50_us)),
            f(s.map(|s| s.p90_us)),
            f(s.map(|s| s.p99_us)),
            f(s.map(|s| s.p999_us)),
            f(s.map(|s| s.max_us)),
            f(p.lag.map(|s| s.p99_us)),
            p.relay_cpu_pct,
        ));
    }
    md.push_str("\nLatencies in µs.\n");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_with_suffixes_and_limits() {
        assert_eq!(parse_bytes("33664"), Ok(33_664));
        assert_eq!(parse_bytes("64k"), Ok(65_536));
        assert_eq!(parse_bytes("1M"), Ok(1_048_576));
        assert!(parse_bytes("8").is_err(), "below the stamp");
        assert!(parse_bytes("17m").is_err(), "over the batch limit");
        assert!(parse_bytes("ten").is_err());
    }

    #[test]
    fn a_majority_is_the_middle_count() {
        assert_eq!(majority_holds(&[5]), 5, "one replica: itself");
        assert_eq!(majority_holds(&[5, 3, 9]), 5, "2 of 3 hold 5");
        assert_eq!(majority_holds(&[0, 3, 2]), 2, "the leader may lag");
        assert_eq!(majority_holds(&[4, 4, 1, 0, 9]), 4, "3 of 5 hold 4");
        assert_eq!(majority_holds(&[]), 0);
    }

    #[test]
    fn a_stamp_reads_back() {
        let mut m = vec![0u8; 32];
        m[..8].copy_from_slice(&7u64.to_le_bytes());
        m[8..16].copy_from_slice(&(-5i64).to_le_bytes());
        assert_eq!(stamp_of(&m), (7, -5));
    }
}

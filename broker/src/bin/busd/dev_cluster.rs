//! `busd dev --nodes N`: a local cluster of N busd processes for development
//! and tests. This process only prepares and supervises: it writes one dev
//! CA and node certificate shared by the nodes, a config per node, and a
//! client profile listing every node; it starts `busd run` for each and
//! stops them all (SIGTERM, then SIGKILL after a grace period) on Ctrl-C or
//! SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use arrowbus_broker::{profile, tls};

/// How long nodes get to shut down gracefully before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

pub fn run(
    data_dir: &Path,
    listen: SocketAddr,
    nodes: u16,
    fsync: &str,
    profile_path: &Path,
) -> ExitCode {
    match start(data_dir, listen, nodes, fsync, profile_path) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("busd dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(
    data_dir: &Path,
    listen: SocketAddr,
    nodes: u16,
    fsync: &str,
    profile_path: &Path,
) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    if !matches!(fsync, "always" | "interval") {
        anyhow::bail!("--fsync {fsync:?}: expected always or interval");
    }
    let base_port = listen.port();
    if u32::from(base_port) + u32::from(nodes) - 1 > u32::from(u16::MAX) || base_port == 0 {
        anyhow::bail!("--listen port {base_port} leaves no room for {nodes} consecutive ports");
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if !listen.ip().is_unspecified() && !names.contains(&listen.ip().to_string()) {
        names.push(listen.ip().to_string());
    }
    let tls_files = tls::ensure_dev_certificates(&data_dir.join("tls"), &names)
        .context("creating development certificates")?;
    let ca = tls_files
        .ca
        .clone()
        .context("dev certificates without a CA")?;
    let addrs: Vec<SocketAddr> = (0..nodes)
        .map(|i| SocketAddr::new(listen.ip(), base_port + i))
        .collect();
    let client_addrs: Vec<String> = addrs
        .iter()
        .map(|a| {
            if a.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], a.port())).to_string()
            } else {
                a.to_string()
            }
        })
        .collect();
    let peers: Vec<toml::Value> = client_addrs
        .iter()
        .enumerate()
        .map(|(i, a)| toml::Value::String(format!("{}@{a}", i + 1)))
        .collect();
    let exe = std::env::current_exe().context("locating the busd executable")?;
    let mut children: Vec<(u16, Child)> = Vec::new();
    for i in 1..=nodes {
        let dir = data_dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = node_config(
            i,
            &dir,
            addrs[usize::from(i - 1)],
            &client_addrs[usize::from(i - 1)],
            &tls_files.cert,
            &tls_files.key,
            &ca,
            Some(&peers),
            fsync,
        )?;
        let path = dir.join("busd.toml");
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let child = Command::new(&exe)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .spawn()
            .with_context(|| format!("starting node {i}"));
        match child {
            Ok(c) => children.push((i, c)),
            Err(e) => {
                stop_all(&mut children);
                return Err(e);
            }
        }
    }
    profile::write_profile(profile_path, &client_addrs, &ca, "localhost")
        .with_context(|| format!("writing client profile {}", profile_path.display()))?;
    eprintln!(
        "arrowbus dev cluster: {nodes} nodes on {} (data in {}).\nClient profile: {} (busctl and the clients use it).\nTry: busctl cluster; busctl topics create ticks --partitions 6 --replicas 3\nStop with Ctrl-C.",
        client_addrs.join(", "),
        data_dir.display(),
        profile_path.display()
    );
    let code = supervise(&mut children);
    Ok(code)
}

/// `busd dev --join ID`: one more node for a running `busd dev --nodes N`
/// cluster in the same data directory, on port `listen + ID - 1`, started
/// empty with `cluster.join = true`; `busctl cluster add-node` then adds it.
pub fn join(data_dir: &Path, listen: SocketAddr, id: u16, fsync: &str) -> ExitCode {
    match start_joining(data_dir, listen, id, fsync) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("busd dev --join: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start_joining(
    data_dir: &Path,
    listen: SocketAddr,
    id: u16,
    fsync: &str,
) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    if !matches!(fsync, "always" | "interval") {
        anyhow::bail!("--fsync {fsync:?}: expected always or interval");
    }
    let tls_dir = data_dir.join("tls");
    let (cert, key, ca) = (
        tls_dir.join("node.pem"),
        tls_dir.join("node.key"),
        tls_dir.join("ca.pem"),
    );
    if !ca.exists() || !cert.exists() {
        anyhow::bail!(
            "no dev cluster certificates in {}: start the cluster first with `busd dev --nodes N --data-dir {}`",
            tls_dir.display(),
            data_dir.display()
        );
    }
    let port = u32::from(listen.port()) + u32::from(id) - 1;
    let port = u16::try_from(port).context("--listen port plus the node id exceeds 65535")?;
    let addr = SocketAddr::new(listen.ip(), port);
    let advertised = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], port)).to_string()
    } else {
        addr.to_string()
    };
    let dir = data_dir.join(format!("node-{id}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = node_config(id, &dir, addr, &advertised, &cert, &key, &ca, None, fsync)?;
    let path = dir.join("busd.toml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let exe = std::env::current_exe().context("locating the busd executable")?;
    let child = Command::new(&exe)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .spawn()
        .with_context(|| format!("starting node {id}"))?;
    eprintln!(
        "arrowbus dev node {id} on {advertised} (data in {}), waiting to join.
Add it: busctl cluster add-node {id} {advertised}
Stop with Ctrl-C.",
        dir.display()
    );
    let mut children = vec![(id, child)];
    Ok(supervise(&mut children))
}

#[allow(clippy::too_many_arguments)]
fn node_config(
    id: u16,
    dir: &Path,
    listen: SocketAddr,
    advertised: &str,
    cert: &Path,
    key: &Path,
    ca: &Path,
    peers: Option<&[toml::Value]>,
    fsync: &str,
) -> anyhow::Result<String> {
    let path = |p: &Path| toml::Value::String(p.display().to_string());
    let mut tls_t = toml::Table::new();
    tls_t.insert("cert".into(), path(cert));
    tls_t.insert("key".into(), path(key));
    tls_t.insert("ca".into(), path(ca));
    let mut cluster = toml::Table::new();
    match peers {
        Some(peers) => {
            cluster.insert("peers".into(), toml::Value::Array(peers.to_vec()));
        }
        // No peers: the node joins a running cluster (`busctl cluster add-node`).
        None => {
            cluster.insert("join".into(), toml::Value::Boolean(true));
        }
    }
    let mut log = toml::Table::new();
    log.insert("fsync".into(), toml::Value::String(fsync.into()));
    let mut t = toml::Table::new();
    t.insert("node_id".into(), toml::Value::Integer(i64::from(id)));
    t.insert("data_dir".into(), path(dir));
    t.insert("listen".into(), toml::Value::String(listen.to_string()));
    t.insert(
        "advertised_addr".into(),
        toml::Value::String(advertised.into()),
    );
    t.insert("tls".into(), toml::Value::Table(tls_t));
    t.insert("log".into(), toml::Value::Table(log));
    t.insert("cluster".into(), toml::Value::Table(cluster));
    Ok(format!(
        "# Written by `busd dev --nodes`; rewritten on every start.\n{}",
        toml::to_string(&t)?
    ))
}

/// Wait for Ctrl-C / SIGTERM, then stop every node. A node that exits on
/// its own is reported; the others keep running.
fn supervise(children: &mut [(u16, Child)]) -> ExitCode {
    let stop = signal_flag();
    let mut reported = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        for (id, c) in children.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                if !reported.contains(id) {
                    eprintln!(
                        "busd dev: node {id} exited ({status}); the other nodes keep running"
                    );
                    reported.push(*id);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("busd dev: stopping {} nodes", children.len());
    stop_all(children);
    ExitCode::SUCCESS
}

fn stop_all(children: &mut [(u16, Child)]) {
    for (_, c) in children.iter() {
        // SIGTERM: each node hands over leadership and drains.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for (id, c) in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    eprintln!("busd dev: node {id} did not stop in {STOP_GRACE:?}; killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
            }
        }
    }
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn signal_flag() -> &'static std::sync::atomic::AtomicBool {
    // SAFETY: the handler only stores to an atomic, which is signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    &STOP
}

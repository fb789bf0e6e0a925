//! Network namespaces for partition tests: each node in its own namespace,
//! all linked by one bridge that also holds the test process's (the host's)
//! address, and partitions made of iptables DROP rules inside the node
//! namespaces, so packets are really dropped.
//!
//! Each [`Netns`] claims a free slot `s` (0..250): bridge `abtb<s>`,
//! namespaces `abt<s>-n<i>`, veths `abt<s>v<i>`, subnet `10.242.<s>.0/24`
//! (host `.1`, node `i` at `.(10+i)`). Creating the bridge is the claim (it
//! fails if the name exists), so tests running side by side, in one process
//! or several, never share names or addresses. Traffic only ever targets
//! these addresses: before use, every node address must route over the
//! claimed bridge, and the namespaces have no default route. Dropping the
//! guard (panics included) kills whatever still runs in the namespaces and
//! removes them and the bridge.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// Slots (subnets 10.242.<slot>.0/24) a test may claim.
const SLOTS: u32 = 250;

pub struct Netns {
    slot: u32,
    nodes: u32,
}

impl Netns {
    /// Namespaces for nodes `1..=nodes`. Panics with what is missing when
    /// the test cannot create them (not root, no `ip` or `iptables`):
    /// partition tests must not pass by skipping.
    pub fn create(nodes: u32) -> Self {
        preflight();
        assert!((1..=200).contains(&nodes), "{nodes} nodes: use 1 to 200");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let first = (std::process::id() ^ nanos) % SLOTS;
        let slot = (0..SLOTS)
            .map(|i| (first + i) % SLOTS)
            .find(|s| try_sh("ip", &["link", "add", &bridge(*s), "type", "bridge"]).is_ok())
            .unwrap_or_else(|| panic!("no free network slot: {SLOTS} bridges abtb* exist"));
        // From here on the guard owns the slot and cleans up on any panic.
        let net = Netns { slot, nodes };
        let br = bridge(slot);
        sh(
            "ip",
            &["addr", "add", &format!("{}/24", net.host_ip()), "dev", &br],
        );
        sh("ip", &["link", "set", &br, "up"]);
        for id in 1..=nodes {
            let ns = net.ns(id);
            let veth = format!("abt{slot}v{id}");
            sh("ip", &["netns", "add", &ns]);
            sh(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            );
            sh("ip", &["link", "set", &veth, "master", &br, "up"]);
            let addr = format!("{}/24", net.node_ip(id));
            sh("ip", &["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        for id in 1..=nodes {
            let ip = net.node_ip(id).to_string();
            let route = sh("ip", &["route", "get", &ip]);
            assert!(
                route.contains(&format!("dev {br}")),
                "refusing to run: {ip} routes as {route:?}, not over bridge {br}"
            );
        }
        net
    }

    pub fn ns(&self, id: u32) -> String {
        format!("abt{}-n{id}", self.slot)
    }

    /// The test process's address on the bridge.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 242, self.slot as u8, 1)
    }

    pub fn node_ip(&self, id: u32) -> Ipv4Addr {
        Ipv4Addr::new(10, 242, self.slot as u8, (10 + id) as u8)
    }

    /// Drop every packet between node `id` and each of `peers`, both ways
    /// (rules inside node `id`'s namespace, so they also hold for anything
    /// else running in that namespace).
    pub fn cut(&self, id: u32, peers: &[Ipv4Addr]) {
        let ns = self.ns(id);
        for p in peers {
            let p = p.to_string();
            sh(
                "ip",
                &[
                    "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &p, "-j", "DROP",
                ],
            );
            sh(
                "ip",
                &[
                    "netns", "exec", &ns, "iptables", "-A", "OUTPUT", "-d", &p, "-j", "DROP",
                ],
            );
        }
    }

    /// Remove every DROP rule.
    pub fn heal(&self) {
        for id in 1..=self.nodes {
            sh("ip", &["netns", "exec", &self.ns(id), "iptables", "-F"]);
        }
    }

    /// Run `f` on a new thread inside node `id`'s namespace: sockets it
    /// creates (a client's, say) see exactly what that node sees, so a
    /// partition that isolates the node isolates them too.
    pub fn run_in<T: Send + 'static>(&self, id: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.ns(id));
        let handle = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns(2) with a namespace fd we hold open; it changes
            // only this thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        });
        match handle.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for id in 1..=self.nodes {
            let ns = self.ns(id);
            let pids = Command::new("ip")
                .args(["netns", "pids", &ns])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for pid in pids
                .lines()
                .filter_map(|p| p.trim().parse::<libc::pid_t>().ok())
            {
                // SAFETY: kill(2) of a process inside a namespace this guard
                // created; no memory effects.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &bridge(self.slot)])
            .stderr(Stdio::null())
            .status();
    }
}

fn bridge(slot: u32) -> String {
    format!("abtb{slot}")
}

/// Fail loudly, naming what is missing.
fn preflight() {
    // SAFETY: geteuid(2) has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "partition tests need root (network namespaces and iptables); CI runs them as root"
    );
    for (tool, arg, pkg) in [
        ("ip", "-V", "iproute2"),
        ("iptables", "--version", "iptables"),
    ] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "partition tests need `{tool}` (Debian: apt-get install {pkg})"
        );
    }
}

fn try_sh(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("running {cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    try_sh(cmd, args).unwrap_or_else(|e| panic!("{e}"))
}

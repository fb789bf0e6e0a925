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

#[cfg(test)]
mod tests {
    use super::*;

    fn exists(what: &[&str], name: &str) -> bool {
        Command::new("ip")
            .args(what)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .any(|w| w.trim_end_matches(':') == name)
            })
            .unwrap_or(false)
    }

    #[test]
    fn a_panic_removes_the_namespaces_the_bridge_and_their_processes() {
        let (ns, br) = {
            let net = Netns::create(2);
            (net.ns(2), bridge(net.slot))
        };
        assert!(!exists(&["netns", "list"], &ns), "{ns} left behind");
        assert!(
            !exists(&["-br", "link", "show", "type", "bridge"], &br),
            "{br} left behind"
        );
        let r = std::panic::catch_unwind(|| {
            let net = Netns::create(2);
            // A process in the namespace, as a busd would be.
            let child = Command::new("ip")
                .args(["netns", "exec", &net.ns(1), "sleep", "60"])
                .spawn()
                .unwrap_or_else(|e| panic!("spawning sleep: {e}"));
            // `ip netns exec` enters the namespace after spawn returns:
            // wait until it is in there, or the guard could miss it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !sh("ip", &["netns", "pids", &net.ns(1)])
                .lines()
                .any(|p| p.trim() == child.id().to_string())
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "sleep never entered the namespace"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let names = (net.ns(1), bridge(net.slot), Some(child));
            // Hand the names and the child out through the panic payload.
            std::panic::panic_any(names);
        });
        let mut payload = r.expect_err("the closure panics");
        let (ns, br2, child) = payload
            .downcast_mut::<(String, String, Option<std::process::Child>)>()
            .unwrap_or_else(|| panic!("unexpected panic payload"));
        assert!(!exists(&["netns", "list"], ns), "{ns} left after a panic");
        assert!(
            !exists(&["-br", "link", "show", "type", "bridge"], br2),
            "{br2} left after a panic"
        );
        // The sleep was killed: waiting for it must not take its 60 s.
        let start = std::time::Instant::now();
        if let Some(mut c) = child.take() {
            let _ = c.wait();
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the process in the namespace survived the guard"
        );
    }
}

//! The fleet's local network: one network namespace per node, each with a veth into a bridge
//! in the root namespace, where the pull-through cache listens.
//!
//! ```text
//! node namespaces (ocifs daemons)                   root namespace
//!   ocifs-fleet-PID-I eth0 198.18.M.(10+I) ── veth ── ofnPID-I ─┐
//!   ...                                                          bridge ofbPID 198.18.M.1
//!                                                                (pull-through cache, mirrors)
//!                                                                └─ forwarded to the link's
//!                                                                   root end (the origin)
//! ```
//!
//! Between the nodes and the bridge there is no delay and no rate limit: a data centre's
//! network, where a pull-through cache sits. The nodes reach the origin through the packet
//! link (`crate::link::PacketLink::route_from`): the bridge forwards their packets (forwarding
//! on the bridge and the link's root end only, not the machine's `ip_forward`). Only the
//! network is the node's own: `nsenter --net` keeps the mount namespace, so a node's FUSE
//! mount is visible to the workload run from the root namespace, and its control socket
//! (a path under /run/ocifs) to `ocifs stats`. Torn down on drop; namespaces and bridges left
//! by a killed run are swept by the next.

use crate::link::{forward_on, free_subnet, ip, remove_namespace};
use std::path::Path;
use std::process::Command;

/// Prefix of the node namespaces: `ocifs-fleet-PID-I`.
const PREFIX: &str = "ocifs-fleet-";
/// Prefix of the bridge: `ofbPID` (interface names have at most 15 characters).
const BRIDGE: &str = "ofb";

/// The nodes' network; torn down on drop.
pub struct Lan {
    bridge: Option<String>,
    /// The bridge's address, where the nodes find the cache.
    pub gateway: String,
    /// The nodes' subnet (`198.18.M.0/24`).
    pub cidr: String,
    nodes: Vec<String>,
}

impl Lan {
    /// A network of `n` node namespaces.
    pub fn start(n: usize) -> Lan {
        sweep_stale();
        let pid = std::process::id();
        let m = free_subnet(pid + 97);
        let mut lan = Lan {
            bridge: None,
            gateway: format!("198.18.{m}.1"),
            cidr: format!("198.18.{m}.0/24"),
            nodes: Vec::new(),
        };
        // From here on a failed step panics and the drop removes what exists.
        let bridge = format!("{BRIDGE}{pid}");
        ip(&["link", "add", &bridge, "type", "bridge"]);
        lan.bridge = Some(bridge.clone());
        ip(&[
            "addr",
            "add",
            &format!("{}/24", lan.gateway),
            "dev",
            &bridge,
        ]);
        ip(&["link", "set", &bridge, "up"]);
        forward_on(&bridge);
        for i in 0..n {
            let ns = format!("{PREFIX}{pid}-{i}");
            ip(&["netns", "add", &ns]);
            lan.nodes.push(ns.clone());
            let root_end = format!("ofn{pid}-{i}");
            ip(&[
                "link", "add", &root_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &root_end, "master", &bridge]);
            ip(&["link", "set", &root_end, "up"]);
            let addr = format!("198.18.{m}.{}/24", 10 + i);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "route", "add", "default", "via", &lan.gateway]);
        }
        lan
    }

    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// A command running `program` in node `i`'s network namespace (and nothing else of it:
    /// see the module doc).
    pub fn command(&self, i: usize, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.nodes[i]))
            .arg("--")
            .arg(program);
        cmd
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in &self.nodes {
            remove_namespace(ns);
        }
        if let Some(b) = &self.bridge {
            let _ = Command::new("ip").args(["link", "del", b]).output();
        }
    }
}

/// Whether the process named in a name after `prefix` (`PREFIX` + PID + ...) is gone.
fn orphan(name: &str, prefix: &str) -> bool {
    let pid: String = name[prefix.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    !pid.is_empty() && !Path::new("/proc").join(&pid).exists()
}

/// Removes the node namespaces and bridges of fleets whose process is gone.
fn sweep_stale() {
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    for ns in names("/run/netns") {
        if ns.starts_with(PREFIX) && orphan(&ns, PREFIX) {
            eprintln!("fleet: removing {ns}, left by a killed run");
            remove_namespace(&ns);
        }
    }
    for dev in names("/sys/class/net") {
        if dev.starts_with(BRIDGE) && orphan(&dev, BRIDGE) {
            eprintln!("fleet: removing bridge {dev}, left by a killed run");
            let _ = Command::new("ip").args(["link", "del", &dev]).output();
        }
    }
}

//! A packet-level WAN link for the benchmarks: a second registry process, over the storage of
//! a [`Registry`], in a network namespace of its own, reached through a router namespace that
//! delays and rate-limits packets.
//!
//! ```text
//! root namespace (ocifs, skopeo)      router namespace                  server namespace
//!   oclPID-K 198.18.N.1/30 ── veth ── cli 198.18.N.2  srv 198.18.N.5 ── veth ── 198.18.N.6:5000
//!                                        FORWARD: NFQUEUE -> wan-delay (RTT/2 each way)
//!                                        tbf on cli and srv (the rate, a BDP of buffer)
//! ```
//!
//! This kernel has no `netem`, so the delay is `tests/tools/wan-delay` (built by scripts/setup)
//! holding each forwarded packet for half the round trip. It sits in a namespace between the
//! ends on purpose: a packet crossing a veth into another namespace is no longer charged to
//! its sending socket, whereas one held in the sender's own namespace is, and TCP Small
//! Queues then stalls the sender (measured: 0.3 MB/s instead of 25). Real TCP runs end to
//! end (slow start, the window collapsing after idle, the server's congestion control), which
//! the HTTP-level emulator ([`crate::harness::Proxy::with_link`]) cannot show.
//!
//! Addresses come from 198.18.0.0/15, the range set aside for benchmarking network devices
//! (RFC 2544): nothing on a real network answers there. Everything lives in namespaces this
//! module creates, except the root end of one veth (and its route to the server's /30); deleting the namespaces removes the veths, qdiscs and
//! iptables rules. [`PacketLink`] tears down on drop (also while a panic unwinds); its
//! processes die with the process that started them (`setpriv --pdeathsig`, and the delay
//! program also when its standard input closes), and [`sweep_stale`] removes namespaces
//! left by a process that was killed.

use crate::harness::{Registry, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Prefix of the namespaces a link creates: `ocifs-link-PID-K-r` (router), `-s` (server).
const PREFIX: &str = "ocifs-link-";

/// Where scripts/setup builds the delay program.
pub fn delay_tool() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tools/wan-delay/wan-delay")
}

/// The commands a link needs (for `require`), the delay program included.
pub fn link_tools() -> Vec<String> {
    let mut tools: Vec<String> = ["ip", "tc", "iptables", "nsenter", "setpriv"]
        .iter()
        .map(|t| t.to_string())
        .collect();
    tools.push(delay_tool().display().to_string());
    tools
}

/// A registry behind an emulated WAN link; torn down on drop.
pub struct PacketLink {
    /// `IP:PORT` of the registry over the link (plain HTTP: clients need `--insecure`; with
    /// TLS a self-signed certificate: `--tls-verify=false`).
    pub addr: String,
    /// Whether the registry speaks TLS (HTTP/2 to clients that offer it, as Go's server does).
    pub tls: bool,
    /// Namespaces created so far (router, server), deleted on drop.
    namespaces: Vec<String>,
    /// The root namespace's end of the link: its counters are what crossed the link.
    root_veth: String,
    children: Vec<Child>,
    /// The delay program's standard input: closing it stops the program.
    lifeline: Option<ChildStdin>,
    /// The server-side registry's directory (config, access log).
    dir: TempDir,
    /// The link's addresses are 198.18.`subnet`.0/24.
    #[allow(dead_code)] // read by route_from, which only the fleet benchmark uses
    subnet: u32,
}

/// Runs a setup command; panics with its output when it fails.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// A command run in namespace `ns` that dies with the thread that spawned it.
fn in_namespace(ns: &str, program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "nsenter"])
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(program);
    cmd
}

/// Kills what runs in namespace `ns`, then deletes it (errors ignored: teardown goes on).
pub fn remove_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        let pids = String::from_utf8_lossy(&out.stdout).into_owned();
        let pids: Vec<&str> = pids.split_whitespace().collect();
        if !pids.is_empty() {
            let _ = Command::new("kill").arg("-KILL").args(&pids).output();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// The namespaces on this machine that a link created.
fn link_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the namespaces (and their processes) of links whose process is gone.
pub fn sweep_stale() {
    for ns in link_namespaces() {
        let pid = ns[PREFIX.len()..].split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            eprintln!("link: removing {ns}, left by process {pid}");
            remove_namespace(&ns);
        }
    }
}

/// A /24 under 198.18.0.0/16 that nothing in the root namespace uses, searched from `start`
/// (modulo 250).
pub fn free_subnet(start: u32) -> u32 {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let routes = Command::new("ip")
        .args(["-4", "route"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    (0..250)
        .map(|i| (start + i) % 250)
        .find(|n| {
            let net = format!("198.18.{n}.");
            !out.contains(&net) && !routes.contains(&net)
        })
        .expect("no free 198.18.N.0/24 for the link")
}

impl PacketLink {
    /// Starts a registry serving `reg`'s storage behind a link of round trip `rtt` and
    /// `rate` bytes per second in each direction.
    pub fn start(reg: &Registry, rtt: Duration, rate: u64) -> PacketLink {
        PacketLink::start_with(reg, rtt, rate, false)
    }

    /// [`PacketLink::start`], the registry speaking TLS when `tls`.
    pub fn start_with(reg: &Registry, rtt: Duration, rate: u64, tls: bool) -> PacketLink {
        static K: AtomicU64 = AtomicU64::new(0);
        sweep_stale();
        let pid = std::process::id();
        let k = K.fetch_add(1, Ordering::Relaxed);
        let router = format!("{PREFIX}{pid}-{k}-r");
        let server = format!("{PREFIX}{pid}-{k}-s");
        let root_veth = format!("ocl{pid}-{k}");
        let n = free_subnet(pid + k as u32);
        let net = |host: u32| format!("198.18.{n}.{host}");
        let mut link = PacketLink {
            addr: format!("{}:5000", net(6)),
            tls,
            namespaces: Vec::new(),
            root_veth: root_veth.clone(),
            children: Vec::new(),
            lifeline: None,
            dir: TempDir::new("link"),
            subnet: n,
        };
        // From here on a failed step panics and the drop removes what exists.
        for ns in [&router, &server] {
            ip(&["netns", "add", ns]);
            link.namespaces.push(ns.clone());
        }
        ip(&[
            "link", "add", &root_veth, "type", "veth", "peer", "name", "cli", "netns", &router,
        ]);
        ip(&[
            "-n", &router, "link", "add", "srv", "type", "veth", "peer", "name", "reg", "netns",
            &server,
        ]);
        ip(&["addr", "add", &format!("{}/30", net(1)), "dev", &root_veth]);
        ip(&["link", "set", &root_veth, "up"]);
        ip(&[
            "route",
            "add",
            &format!("{}/30", net(4)),
            "via",
            &net(2),
            "dev",
            &root_veth,
        ]);
        for (dev, host) in [("cli", 2), ("srv", 5)] {
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("{}/30", net(host)),
                "dev",
                dev,
            ]);
            ip(&["-n", &router, "link", "set", dev, "up"]);
        }
        ip(&[
            "-n",
            &server,
            "addr",
            "add",
            &format!("{}/30", net(6)),
            "dev",
            "reg",
        ]);
        ip(&["-n", &server, "link", "set", "reg", "up"]);
        ip(&["-n", &server, "link", "set", "lo", "up"]);
        ip(&["-n", &server, "route", "add", "default", "via", &net(5)]);
        run(Command::new("ip").args([
            "netns",
            "exec",
            &router,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]));
        // The rate on the router's egress both ways, with a bandwidth-delay product of buffer
        // (the usual sizing of a bottleneck's queue), at least 64 KiB.
        let bits = (rate * 8).to_string();
        let buffer = ((rate as f64 * rtt.as_secs_f64()) as u64).max(64 << 10);
        let burst = (rate / 1000).max(32 << 10);
        for dev in ["cli", "srv"] {
            run(Command::new("tc").args([
                "-n",
                &router,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &format!("{bits}bit"),
                "burst",
                &burst.to_string(),
                "limit",
                &buffer.to_string(),
            ]));
        }
        if !rtt.is_zero() {
            link.start_delay(&router, rtt / 2);
        }
        link.start_registry(&server, reg);
        link
    }

    /// Starts the delay program in `router` and sends every forwarded packet through it.
    fn start_delay(&mut self, router: &str, each_way: Duration) {
        let mut child = in_namespace(router, &delay_tool())
            .args(["0", &each_way.as_micros().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("wan-delay (scripts/setup builds it)");
        self.lifeline = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        self.children.push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "wan-delay did not start");
        run(Command::new("ip").args([
            "netns",
            "exec",
            router,
            "iptables",
            "-t",
            "mangle",
            "-A",
            "FORWARD",
            "-j",
            "NFQUEUE",
            "--queue-num",
            "0",
        ]));
    }

    /// Starts a docker-registry over `reg`'s storage in `server` and waits until it answers.
    fn start_registry(&mut self, server: &str, reg: &Registry) {
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}/data\nhttp:\n  addr: {}\n",
            reg.dir.path().display(),
            self.addr
        );
        if self.tls {
            // A self-signed certificate for the server's address.
            let ip = self.addr.split(':').next().unwrap();
            let (key, crt) = (
                self.dir.path().join("tls.key"),
                self.dir.path().join("tls.crt"),
            );
            let san = format!("subjectAltName=IP:{ip}");
            crate::harness::self_signed(&key, &crt, "/CN=ocifs-bench", &[&san]);
            cfg += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                crt.display(),
                key.display()
            );
        }
        let cfg_path = self.dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = in_namespace(server, Path::new("docker-registry"))
            .arg("serve")
            .arg(&cfg_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry");
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry behind the link did not start: {}",
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Lets the hosts of `cidr`, a subnet behind another interface of the root namespace (a
    /// benchmark's own node namespaces), reach the server through the link: the router sends
    /// their packets' answers back to the root end, which forwards them on. Forwarding is
    /// switched on for the packets arriving on the root end only ([`forward_on`]), not for
    /// the machine; the interface on the subnet's side needs the same. (The fleet benchmark's.)
    #[allow(dead_code)]
    pub fn route_from(&self, cidr: &str) {
        let root_end = format!("198.18.{}.1", self.subnet);
        ip(&[
            "-n",
            &self.namespaces[0],
            "route",
            "add",
            cidr,
            "via",
            &root_end,
        ]);
        forward_on(&self.root_veth);
    }

    /// The processes the link started (the delay program, the registry).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// The server's TCP settings that shape a transfer: its congestion control, and whether
    /// a connection idle for a retransmission timeout starts slow again.
    pub fn server_tcp(&self) -> String {
        let get = |key: &str| {
            Command::new("ip")
                .args(["netns", "exec", &self.namespaces[1], "sysctl", "-n", key])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        };
        format!(
            "congestion control {}, tcp_slow_start_after_idle {}",
            get("net.ipv4.tcp_congestion_control"),
            get("net.ipv4.tcp_slow_start_after_idle")
        )
    }

    /// The server-side registry's access log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Bytes that crossed the link towards the root namespace so far (Ethernet frames:
    /// payload plus about 4% of headers).
    pub fn rx_bytes(&self) -> u64 {
        let p = format!("/sys/class/net/{}/statistics/rx_bytes", self.root_veth);
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Where the registry's access log is now; [`PacketLink::requests_since`] counts after it.
    pub fn log_mark(&self) -> u64 {
        std::fs::metadata(self.log_path()).map_or(0, |m| m.len())
    }

    /// Requests the registry has completed since `mark`, and the blob bytes it wrote for them.
    pub fn requests_since(&self, mark: u64) -> (u64, u64) {
        let mut log = Vec::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path()) {
            use std::io::Seek;
            let _ = f.seek(std::io::SeekFrom::Start(mark));
            let _ = f.read_to_end(&mut log);
        }
        let mut requests = 0;
        let mut blob_bytes = 0;
        for line in String::from_utf8_lossy(&log).lines() {
            if !line.contains("msg=\"response completed\"") {
                continue;
            }
            requests += 1;
            if line.contains("http.request.method=GET") && line.contains("/blobs/") {
                blob_bytes += field(line, "http.response.written=").unwrap_or(0);
            }
        }
        (requests, blob_bytes)
    }
}

/// Lets packets that arrive on interface `dev` of the root namespace be forwarded
/// (`net.ipv4.conf.DEV.forwarding`: that interface only, unlike `net.ipv4.ip_forward`; the
/// setting goes with the interface).
#[allow(dead_code)] // the fleet benchmark's
pub fn forward_on(dev: &str) {
    run(Command::new("sysctl").args(["-qw", &format!("net.ipv4.conf.{dev}.forwarding=1")]));
}

/// The number after `key` in a logfmt line.
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

impl Drop for PacketLink {
    fn drop(&mut self) {
        self.lifeline = None;
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            remove_namespace(ns);
        }
        // Gone with the router namespace; only a setup that failed before may leave it.
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_veth])
            .stderr(Stdio::null())
            .output();
    }
}

/// What a link delivers, measured with plain HTTP/1.1 against a registry blob.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// TCP connect (one SYN, SYN-ACK round trip), the median of five.
    pub connect: Duration,
    /// A small GET (`/v2/`) on a fresh connection, connect included, the median of five.
    pub small: Duration,
    /// A large transfer on a fresh connection: bytes, and time from request to last byte.
    pub large: (u64, Duration),
    /// A 2 MiB range on a fresh connection, connect included: slow start shows here.
    pub range_fresh: Duration,
    /// The next 2 MiB range on the same connection after it has been idle for a second
    /// (`None` when the server closed it): the window collapsing after idle shows here.
    pub range_idle: Option<Duration>,
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "TCP connect {:.1} ms; a small GET on a fresh connection {:.1} ms; {:.0} MiB in one GET at {:.1} MB/s; a 2 MiB range on a fresh connection {:.0} ms",
            ms(self.connect),
            ms(self.small),
            self.large.0 as f64 / 1048576.0,
            self.large.0 as f64 / self.large.1.as_secs_f64() / 1e6,
            ms(self.range_fresh),
        )?;
        match self.range_idle {
            Some(d) => write!(f, ", the next after 1 s idle {:.0} ms", ms(d)),
            None => write!(f, " (the server closes connections: no idle case)"),
        }
    }
}

/// One HTTP/1.1 GET on `conn`; the body's length (read and dropped). `None` when the
/// server closed the connection before answering.
fn get(conn: &mut TcpStream, host: &str, path: &str, range: Option<(u64, u64)>) -> Option<u64> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\n");
    if let Some((from, len)) = range {
        req += &format!("Range: bytes={from}-{}\r\n", from + len - 1);
    }
    req += "\r\n";
    conn.write_all(req.as_bytes()).ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut left = len;
    let mut buf = vec![0u8; 256 << 10];
    while left > 0 {
        let n = conn.read(&mut buf[..left.min(256 << 10) as usize]).ok()?;
        if n == 0 {
            return None;
        }
        left -= n as u64;
    }
    Some(len)
}

/// A probe connection: reads give up after 30 s rather than hang on a broken link.
fn open(addr: &str) -> TcpStream {
    let c = TcpStream::connect(addr).expect("probe connect");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c
}

/// Measures the link to the registry at `addr` with the blob `digest` of `repo` (`size`
/// bytes; the large transfer takes up to 32 MiB of it, the ranges 2 MiB each).
pub fn probe(addr: &str, repo: &str, digest: &str, size: u64) -> Probe {
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let connect = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let _c = TcpStream::connect(addr).expect("probe connect");
                t.elapsed()
            })
            .collect(),
    );
    let small = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let mut c = open(addr);
                get(&mut c, addr, "/v2/", None).expect("probe GET /v2/");
                t.elapsed()
            })
            .collect(),
    );
    let blob = format!("/v2/{repo}/blobs/{digest}");
    let big = size.min(32 << 20);
    let mut c = open(addr);
    let t = Instant::now();
    let got = get(&mut c, addr, &blob, Some((0, big))).expect("probe large GET");
    let large = (got, t.elapsed());
    let two = (2u64 << 20).min(size / 2);
    let t = Instant::now();
    let mut c = open(addr);
    get(&mut c, addr, &blob, Some((0, two))).expect("probe 2 MiB range");
    let range_fresh = t.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let range_idle = get(&mut c, addr, &blob, Some((two, two))).map(|_| t.elapsed());
    Probe {
        connect,
        small,
        large,
        range_fresh,
        range_idle,
    }
}

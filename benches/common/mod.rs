//! Helpers the benchmarks share: cache dropping, settings, the emulated link, a measured
//! mount, and the realistic image ([`debian`]).

#![allow(dead_code)]

pub mod debian;

use crate::harness::{Proxy, Registry, TempDir, ocifs};
use crate::link::{PacketLink, probe};
use ocifs::stats::{LayerFigures, MountStats};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// Extra flags for every measured mount (`OCIFS_BENCH_FLAGS`, split at spaces): for trying a
/// setting without a rebuild.
pub fn extra_flags() -> Vec<String> {
    std::env::var("OCIFS_BENCH_FLAGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Whether the part or variant `key` runs: all of them unless `OCIFS_BENCH_ONLY` lists keys
/// (comma-separated).
pub fn selected(key: &str) -> bool {
    match std::env::var("OCIFS_BENCH_ONLY") {
        Ok(only) if !only.trim().is_empty() => only.split(',').any(|k| k.trim() == key),
        _ => true,
    }
}

/// How the WAN link is emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Packets: the registry in a network namespace behind a router namespace that delays
    /// each packet half the round trip each way and rate-limits with `tbf` (tests/it/link.rs).
    /// Real TCP: slow start, windows collapsing after idle.
    Packet,
    /// Requests: the harness proxy delays each request one round trip and paces response
    /// bytes through one token bucket (`Proxy::with_link`). Fast to set up, no TCP dynamics.
    Http,
}

impl LinkMode {
    /// The modes to run, from `OCIFS_BENCH_LINK`: `packet` (the default), `http`, or both
    /// comma-separated, in that order.
    pub fn from_env() -> Vec<LinkMode> {
        let v = std::env::var("OCIFS_BENCH_LINK").unwrap_or_else(|_| "packet".into());
        let modes: Vec<LinkMode> = v
            .split(',')
            .map(|m| match m.trim() {
                "packet" => LinkMode::Packet,
                "http" => LinkMode::Http,
                other => panic!("OCIFS_BENCH_LINK: {other:?} is neither packet nor http"),
            })
            .collect();
        assert!(!modes.is_empty(), "OCIFS_BENCH_LINK names no mode");
        modes
    }

    pub fn name(self) -> &'static str {
        match self {
            LinkMode::Packet => "packet-level",
            LinkMode::Http => "HTTP-level",
        }
    }
}

/// The emulated link in front of a registry, in either mode, with counters the benchmarks
/// reset before each measurement.
pub struct BenchLink {
    pub mode: LinkMode,
    /// The registry's address through the link.
    pub addr: String,
    proxy: Option<Proxy>,
    packet: Option<PacketLink>,
    /// Packet mode: link bytes and log position at the last reset.
    mark: Mutex<(u64, u64)>,
    rtt: Duration,
    rate: u64,
}

impl BenchLink {
    /// A link of round trip `rtt` and `rate` bytes per second to `reg`.
    pub fn start(mode: LinkMode, reg: &Registry, rtt: Duration, rate: u64) -> BenchLink {
        let (proxy, packet, addr) = match mode {
            LinkMode::Http => {
                let p = Proxy::with_link(&reg.addr, None, Some((rtt, rate)));
                let addr = p.addr.clone();
                (Some(p), None, addr)
            }
            LinkMode::Packet => {
                let tls = std::env::var("OCIFS_BENCH_TLS").is_ok_and(|v| v == "1");
                let l = PacketLink::start_with(reg, rtt, rate, tls);
                let addr = l.addr.clone();
                (None, Some(l), addr)
            }
        };
        let link = BenchLink {
            mode,
            addr,
            proxy,
            packet,
            mark: Mutex::new((0, 0)),
            rtt,
            rate,
        };
        link.reset();
        link
    }

    /// One line saying what the link is.
    pub fn describe(&self) -> String {
        let base = format!(
            "{} link, {} ms RTT, {} Mbit/s",
            self.mode.name(),
            self.rtt.as_millis(),
            self.rate * 8 / 1_000_000
        );
        match &self.packet {
            Some(l) => format!(
                "{base} (registry in a network namespace{}; packets delayed by wan-delay in a router namespace, rate by tbf; the registry's {})",
                if l.tls { ", speaking TLS" } else { "" },
                l.server_tcp()
            ),
            None => format!(
                "{base} (the test proxy: each request waits one round trip, bodies paced by one token bucket)"
            ),
        }
    }

    /// Starts counting from zero.
    pub fn reset(&self) {
        if let Some(p) = &self.proxy {
            p.reset();
        }
        if let Some(l) = &self.packet {
            *self.mark.lock().unwrap() = (l.rx_bytes(), l.log_mark());
        }
    }

    /// Bytes fetched since the reset: over the HTTP-level link the blob bytes the proxy sent;
    /// over the packet-level link everything that crossed it towards the client (frames,
    /// headers included: about 4% more than the payload).
    pub fn fetched(&self) -> u64 {
        match (&self.proxy, &self.packet) {
            (Some(p), _) => p.blob_bytes.load(Ordering::SeqCst),
            (_, Some(l)) => l.rx_bytes() - self.mark.lock().unwrap().0,
            _ => 0,
        }
    }

    /// Requests since the reset (packet level: those the registry has completed).
    pub fn requests(&self) -> u64 {
        match (&self.proxy, &self.packet) {
            (Some(p), _) => p.requests.load(Ordering::SeqCst),
            (_, Some(l)) => l.requests_since(self.mark.lock().unwrap().1).0,
            _ => 0,
        }
    }

    /// Measures the link with blob `digest` of `repo` (`size` bytes); the probe speaks plain
    /// HTTP, so a registry speaking TLS is not probed.
    pub fn probe(&self, repo: &str, digest: &str, size: u64) -> String {
        match &self.packet {
            Some(l) if l.tls => "not taken (the registry speaks TLS; the probe plain HTTP)".into(),
            _ => probe(&self.addr, repo, digest, size).to_string(),
        }
    }
}

/// A mount made for one measurement, unmounted on drop.
pub struct BenchMount {
    dir: TempDir,
    cache: TempDir,
}

impl BenchMount {
    pub fn new(reference: &str, flags: &[&str]) -> (BenchMount, Duration) {
        let dir = TempDir::new("bmnt");
        let cache = TempDir::new("bcache");
        // Plain HTTP: the packet-level link's registry is not on localhost.
        let mut args = vec![
            "mount",
            "--insecure",
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ];
        // Whole-blob verification is off unless a variant asks for it (it fetches everything).
        if !flags.contains(&"--verify") {
            args.extend(["--verify", "off"]);
        }
        args.extend_from_slice(flags);
        let extra = extra_flags();
        args.extend(extra.iter().map(String::as_str));
        args.push(reference);
        let mp = dir.path().to_str().unwrap().to_string();
        args.push(&mp);
        let t = Instant::now();
        let (ok, _, err) = ocifs(&args, &[]);
        assert!(ok, "{err}");
        (BenchMount { dir, cache }, t.elapsed())
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    /// The mount's figures (`ocifs stats --json`).
    pub fn stats(&self) -> MountStats {
        let (ok, out, err) = ocifs(&["stats", "--json", self.path().to_str().unwrap()], &[]);
        assert!(ok, "stats: {err}");
        serde_json::from_slice(&out).unwrap()
    }
    /// The daemon's resident memory, from /proc: every ocifs process serving this mount
    /// (as root, the supervisor and the serving process it relays to).
    pub fn rss_kib(&self) -> u64 {
        let me = self.dir.path().to_str().unwrap();
        let mut total = 0;
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            let serving = cmd.contains("--daemon-child") || cmd.contains("--serve-fd");
            if serving && cmd.split('\0').any(|a| a == me) {
                let status = std::fs::read_to_string(p.path().join("status")).unwrap_or_default();
                let line = status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .unwrap_or("VmRSS: 0 kB");
                total += line
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
            }
        }
        total
    }
}

impl Drop for BenchMount {
    fn drop(&mut self) {
        let _ = ocifs(&["umount", self.dir.path().to_str().unwrap()], &[]);
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What users do today: `skopeo copy` the image (cold caches) into `pulled`, then extract its
/// layers in order into `rootfs`. Returns (pull time, extraction time).
pub fn full_pull(reference: &str, pulled: &Path, rootfs: &Path) -> (Duration, Duration) {
    drop_caches();
    let t = Instant::now();
    let st = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:v1", pulled.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let pull = t.elapsed();
    std::fs::create_dir_all(rootfs).unwrap();
    let t = Instant::now();
    let blob = |d: &str| pulled.join("blobs/sha256").join(&d[7..]);
    let json = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let index = json(pulled.join("index.json"));
    let manifest = json(blob(index["manifests"][0]["digest"].as_str().unwrap()));
    for l in manifest["layers"].as_array().unwrap() {
        let st = Command::new("tar")
            .arg("-xzf")
            .arg(blob(l["digest"].as_str().unwrap()))
            .arg("-C")
            .arg(rootfs)
            .status()
            .unwrap();
        assert!(st.success());
    }
    (pull, t.elapsed())
}

/// Records `workload` on a mount of `recorded` into `profile`, then converts `source` to an
/// eStargz image `destination` ordered by that profile.
pub fn record_and_convert(
    recorded: &str,
    profile: &Path,
    workload: impl FnOnce(&Path),
    source: &str,
    destination: &str,
    cache: &Path,
) {
    {
        let (m, _) = BenchMount::new(recorded, &["--record", profile.to_str().unwrap()]);
        workload(m.path());
    }
    // The daemon writes the profile as it unmounts.
    std::thread::sleep(Duration::from_millis(500));
    let (ok, _, err) = ocifs(
        &[
            "convert",
            "--estargz",
            "--profile",
            profile.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            source,
            destination,
        ],
        &[],
    );
    assert!(ok, "{err}");
}

/// Polls `ocifs stats --json` (60 s at most) until each of the mount's first `layers` layers
/// is copied locally (`copied`) or verified.
pub fn wait_converged(m: &BenchMount, layers: usize, copied: bool) {
    for _ in 0..600 {
        let (ok, out, err) = ocifs(&["stats", "--json", m.path().to_str().unwrap()], &[]);
        assert!(ok, "stats: {err}");
        let v: MountStats = serde_json::from_slice(&out).unwrap();
        let done = |l: &LayerFigures| match copied {
            true => l.local_copy,
            false => l.verification == "verified",
        };
        if (0..layers).all(|i| v.layers.get(i).is_some_and(done)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the mount did not converge within 60 s");
}

//! Helpers the benchmarks share: cache dropping, settings, and a measured mount.

#![allow(dead_code)]

use crate::harness::{TempDir, ocifs};
use ocifs::stats::{LayerFigures, MountStats};
use std::path::Path;
use std::process::Command;
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

/// A mount made for one measurement, unmounted on drop.
pub struct BenchMount {
    dir: TempDir,
    cache: TempDir,
}

impl BenchMount {
    pub fn new(reference: &str, flags: &[&str]) -> (BenchMount, Duration) {
        let dir = TempDir::new("bmnt");
        let cache = TempDir::new("bcache");
        let mut args = vec!["mount", "--cache-dir", cache.path().to_str().unwrap()];
        // Whole-blob verification is off unless a variant asks for it (it fetches everything).
        if !flags.contains(&"--verify") {
            args.extend(["--verify", "off"]);
        }
        args.extend_from_slice(flags);
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
    /// The daemon's resident memory, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let me = self.dir.path().to_str().unwrap();
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("--daemon-child") && cmd.contains(me) {
                let status = std::fs::read_to_string(p.path().join("status")).unwrap_or_default();
                let line = status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .unwrap_or("VmRSS: 0 kB");
                return line.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        0
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

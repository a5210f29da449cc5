//! `cargo bench --bench startup` (or `scripts/bench`): cold start of an image through an
//! emulated WAN link, per layer format, against a full pull; plus sequential read throughput.
//! Figures are printed as a Markdown table for docs/BENCHMARKS.md. Link settings:
//! OCIFS_BENCH_RTT_MS (default 40) and OCIFS_BENCH_MBIT (default 200).

#![allow(dead_code)]

#[path = "../tests/it/builder.rs"]
mod builder;
#[path = "../tests/it/harness.rs"]
mod harness;

use builder::{Enc, Item, encode, file, layout, noise, push};
use harness::{Proxy, Registry, TempDir, ocifs};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const SMALL: usize = 2000;
const WORKLOAD: usize = 60;
const BIG: usize = 64 << 20;

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Small files that compress like text, one big incompressible file.
fn app_layer() -> Vec<u8> {
    let mut items = vec![Item::Dir("app", 0o755), Item::Dir("app/lib", 0o755)];
    for i in 0..SMALL {
        let mut body = format!("# module {i}\n")
            .repeat(200 + (i % 50) * 20)
            .into_bytes();
        body.extend_from_slice(&noise(512, i as u64));
        items.push(file(&format!("app/lib/mod{i:04}.py"), body));
    }
    items.push(file("app/big.bin", noise(BIG, 99)));
    builder::tar(&items)
}

fn workload_paths() -> Vec<String> {
    (0..WORKLOAD)
        .map(|i| format!("app/lib/mod{:04}.py", i * (SMALL / WORKLOAD)))
        .collect()
}

fn read_workload(root: &std::path::Path) -> Duration {
    let t = Instant::now();
    for p in workload_paths() {
        std::fs::read(root.join(p)).unwrap();
    }
    t.elapsed()
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rtt = Duration::from_millis(env_u64("OCIFS_BENCH_RTT_MS", 40));
    let rate = env_u64("OCIFS_BENCH_MBIT", 200) * 1_000_000 / 8;
    let reg = Registry::start(None);
    let proxy = Proxy::with_link(&reg.addr, None, Some((rtt, rate)));
    let work = TempDir::new("bench");

    // Probe the emulated link.
    let t = Instant::now();
    let _ = Command::new("curl")
        .args(["-fs", &format!("http://{}/v2/", proxy.addr)])
        .output();
    let probe_rtt = t.elapsed();

    let tar = app_layer();
    let formats = [
        ("gzip", Enc::Gzip),
        ("estargz", Enc::Estargz),
        ("tar", Enc::Tar),
    ];
    let mut images = Vec::new();
    for (name, enc) in formats {
        let layer = encode(tar.clone(), enc);
        let size = layer.blob.len();
        let dir = layout(
            &work.path().join(name),
            "v1",
            &[("linux", "amd64", None, &[layer])],
        );
        push(&dir, "v1", &reg.addr, &format!("bench/{name}"), None);
        images.push((name, size));
    }

    // Baseline: full pull through the same link, extraction, then the workload from disk.
    let pulled = work.path().join("pulled");
    drop_caches();
    let t = Instant::now();
    let st = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{}/bench/gzip:v1", proxy.addr))
        .arg(format!("oci:{}:v1", pulled.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let pull = t.elapsed();
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let t = Instant::now();
    let blobs: Vec<_> = std::fs::read_dir(pulled.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .collect();
    let biggest = blobs
        .iter()
        .max_by_key(|b| b.metadata().unwrap().len())
        .unwrap()
        .path();
    assert!(
        Command::new("tar")
            .arg("-xzf")
            .arg(&biggest)
            .arg("-C")
            .arg(&rootfs)
            .status()
            .unwrap()
            .success()
    );
    let extract = t.elapsed();
    drop_caches();
    let local_workload = read_workload(&rootfs);
    let _ = std::fs::read(rootfs.join("app/big.bin")).unwrap();
    let t = Instant::now();
    let _ = std::fs::read(rootfs.join("app/big.bin")).unwrap();
    let local_warm = t.elapsed();
    let full = pull + extract + local_workload;

    println!(
        "\nLink: {} ms RTT, {} Mbit/s (probe: one request {:.1} ms); machine: {} cores",
        rtt.as_millis(),
        rate * 8 / 1_000_000,
        probe_rtt.as_secs_f64() * 1e3,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "Image: one layer, {SMALL} small files + one {} MiB file; workload reads {WORKLOAD} small files.\n",
        BIG >> 20
    );
    println!(
        "| format | blob MiB | mount ready s | workload s | ready+workload s | vs full pull | blob bytes fetched | % of blob | requests | big file cold MB/s | warm MB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, size) in &images {
        drop_caches();
        proxy.reset();
        let req0 = proxy.requests.load(Ordering::SeqCst);
        let mnt = TempDir::new("bmnt");
        let cache = TempDir::new("bcache");
        let r = format!("{}/bench/{name}:v1", proxy.addr);
        let t = Instant::now();
        let (ok, _, err) = ocifs(
            &[
                "mount",
                "--verify",
                "off",
                "--cache-dir",
                cache.path().to_str().unwrap(),
                &r,
                mnt.path().to_str().unwrap(),
            ],
            &[],
        );
        assert!(ok, "{err}");
        let ready = t.elapsed();
        let wl = read_workload(mnt.path());
        let fetched = proxy.blob_bytes.load(Ordering::SeqCst);
        let requests = proxy.requests.load(Ordering::SeqCst) - req0;
        let t = Instant::now();
        let big = std::fs::read(mnt.path().join("app/big.bin")).unwrap();
        let cold = t.elapsed();
        let t = Instant::now();
        let _ = std::fs::read(mnt.path().join("app/big.bin")).unwrap();
        let warm = t.elapsed();
        assert_eq!(big.len(), BIG);
        let total = ready + wl;
        println!(
            "| {name} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1}x faster | {} | {:.1}% | {} | {:.0} | {:.0} |",
            *size as f64 / 1048576.0,
            ready.as_secs_f64(),
            wl.as_secs_f64(),
            total.as_secs_f64(),
            full.as_secs_f64() / total.as_secs_f64(),
            fetched,
            fetched as f64 * 100.0 / *size as f64,
            requests,
            mbps(BIG, cold),
            mbps(BIG, warm)
        );
        let _ = ocifs(&["umount", mnt.path().to_str().unwrap()], &[]);
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "| full pull (skopeo + tar -xz) | {:.1} | pull {:.2} + extract {:.2} | {:.2} | {:.2} | 1.0x | | | | | local warm {:.0} |",
        images[0].1 as f64 / 1048576.0,
        pull.as_secs_f64(),
        extract.as_secs_f64(),
        local_workload.as_secs_f64(),
        full.as_secs_f64(),
        mbps(BIG, local_warm)
    );
}

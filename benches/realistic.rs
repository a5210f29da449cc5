//! `cargo bench --bench realistic` (part of `scripts/bench`): a process starting from a lazily
//! mounted Debian image over the emulated WAN link, per format, against pull + extract + run.
//!
//! The image is built here: a bookworm minbase root file system with python3 made by
//! debootstrap from deb.debian.org (cached under target/bench-rootfs), split into three
//! layers (the base system, the Python standard library, a small app that imports a dozen
//! stdlib modules). The workload is `chroot MOUNT python3 /app/main.py`. Link settings as in
//! the startup benchmark (OCIFS_BENCH_RTT_MS, OCIFS_BENCH_MBIT).

#![allow(dead_code)]

#[path = "../tests/it/builder.rs"]
mod builder;
mod common;
#[path = "../tests/it/harness.rs"]
mod harness;

use builder::{Enc, encode, push};
use common::{BenchMount, drop_caches, env_u64, full_pull, record_and_convert, wait_converged};
use harness::{Proxy, Registry, TempDir, ocifs, push_index};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const APP: &str = r#"import argparse, asyncio, csv, datetime, decimal, email.message, hashlib, http.client
import json, logging, re, sqlite3, unittest, xml.etree.ElementTree as ET
db = sqlite3.connect(":memory:")
db.execute("create table t (x)")
print("ok", json.dumps({"n": len(re.findall("a", "banana"))}), decimal.Decimal("1.1") + 1)
"#;

/// The debootstrapped root file system, made once and kept under target/.
fn rootfs() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-rootfs");
    if !dir.join("usr/bin/python3").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("realistic: debootstrap bookworm minbase + python3 (once; about a minute)");
        let st = Command::new("debootstrap")
            .args(["--variant=minbase", "--include=python3", "bookworm"])
            .arg(&dir)
            .arg("http://deb.debian.org/debian")
            .stdout(std::process::Stdio::null())
            .status()
            .expect("debootstrap (scripts/setup installs it)");
        assert!(st.success(), "debootstrap failed");
    }
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::write(dir.join("app/main.py"), APP).unwrap();
    dir
}

/// GNU tar of `paths` under `root` (numeric owners), minus `exclude` patterns.
fn tar_of(root: &Path, paths: &[&str], exclude: &[&str]) -> Vec<u8> {
    let mut cmd = Command::new("tar");
    cmd.args(["--numeric-owner", "--xattrs", "-C"]).arg(root);
    for e in exclude {
        cmd.arg(format!("--exclude={e}"));
    }
    cmd.args(["-cf", "-"]).args(paths);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn run_app(root: &Path) -> Duration {
    let t = Instant::now();
    let out = Command::new("/usr/sbin/chroot")
        .arg(root)
        .args(["/usr/bin/python3", "/app/main.py"])
        .env_clear()
        .env("PYTHONHASHSEED", "0")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stdout.starts_with(b"ok"),
        "app: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rtt = Duration::from_millis(env_u64("OCIFS_BENCH_RTT_MS", 40));
    let rate = env_u64("OCIFS_BENCH_MBIT", 200) * 1_000_000 / 8;
    let root = rootfs();
    let layers = [
        tar_of(
            &root,
            &["."],
            &[
                "./usr/lib/python3*",
                "./app",
                "./proc/*",
                "./var/cache/apt/archives/*.deb",
                "./var/lib/apt/lists/*",
                "./sys/*",
                "./dev/*",
            ],
        ),
        tar_of(&root, &["./usr/lib/python3", "./usr/lib/python3.11"], &[]),
        tar_of(&root, &["./app"], &[]),
    ];
    let reg = Registry::start(None);
    let proxy = Proxy::with_link(&reg.addr, None, Some((rtt, rate)));
    let work = TempDir::new("realistic");
    let via = |name: &str| format!("{}/real/{name}:v1", proxy.addr);
    let mut sizes = std::collections::HashMap::new();
    for (name, enc) in [("gzip", Enc::Gzip), ("estargz", Enc::Estargz)] {
        let encoded: Vec<_> = layers.iter().cloned().map(|t| encode(t, enc)).collect();
        sizes.insert(name, encoded.iter().map(|l| l.blob.len()).sum::<usize>());
        // The config names the command, as a real image's would.
        let dir = builder::layout_with_command(
            &work.path().join(name),
            "v1",
            &[("linux", "amd64", None, &encoded)],
            &["python3", "/app/main.py"],
        );
        push(&dir, "v1", &reg.addr, &format!("real/{name}"), None);
        if name == "gzip" {
            // The same image where no index is published: a first mount builds one.
            push(&dir, "v1", &reg.addr, "real/plain", None);
        }
    }

    // Full pull through the link, extraction of the three layers, the app from local disk;
    // the round with the median total is reported (each round into fresh directories).
    let rounds = env_u64("OCIFS_BENCH_ROUNDS", 3).max(1) as usize;
    let mut pulls: Vec<_> = (0..rounds)
        .map(|i| {
            let extracted = work.path().join(format!("extracted{i}"));
            let pulled = work.path().join(format!("pulled{i}"));
            let (pull, extract) = full_pull(&via("gzip"), &pulled, &extracted);
            drop_caches();
            let local_run = run_app(&extracted);
            (pull + extract + local_run, pull, extract, local_run)
        })
        .collect();
    pulls.sort();
    let full_range = (pulls[0].0, pulls[rounds - 1].0);
    let (full, pull, extract, local_run) = pulls[rounds / 2];

    // A recorded profile of the app, for the profile-ordered eStargz variant.
    let profile = work.path().join("app.profile");
    let conv = TempDir::new("rconv");
    record_and_convert(
        &via("estargz"),
        &profile,
        |root| {
            run_app(root);
        },
        &format!("{}/real/gzip:v1", reg.addr),
        &format!("{}/real/profiled:v1", reg.addr),
        conv.path(),
    );
    // The gzip image's indexes, published next to it (not timed).
    push_index(&format!("{}/real/gzip:v1", reg.addr), &[]);
    // For experiments by hand: keep the registry and the link up for a while.
    let hold = env_u64("OCIFS_BENCH_HOLD_S", 0);
    if hold > 0 {
        eprintln!(
            "holding {hold} s: images {} (gzip, estargz, profiled), profile {}",
            via("NAME"),
            profile.display()
        );
        std::thread::sleep(Duration::from_secs(hold));
    }

    println!(
        "\nRealistic startup: Debian bookworm minbase + python3 ({:.0} MiB gzip in 3 layers); workload `chroot MOUNT python3 /app/main.py` importing 15 stdlib modules.",
        sizes["gzip"] as f64 / 1048576.0
    );
    println!(
        "Link: {} ms RTT, {} Mbit/s. Each row is the median (by total) of {rounds} cold rounds; the range of their totals is in brackets.\n",
        rtt.as_millis(),
        rate * 8 / 1_000_000
    );
    println!(
        "| variant | mount ready s | app run s | total s | vs full pull | blob bytes fetched | % of image | requests |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let variants: [(&str, &str, &[&str], usize); 14] = [
        (
            "gzip, first mount (index built by the mount)",
            "plain",
            &[],
            sizes["gzip"],
        ),
        ("gzip, index from registry", "gzip", &[], sizes["gzip"]),
        (
            "gzip, index from registry, without mark windows (--no-mark-windows)",
            "gzip",
            &["--no-mark-windows"],
            sizes["gzip"],
        ),
        ("eStargz", "estargz", &[], sizes["estargz"]),
        (
            "eStargz, background verification on (it yields to reads, fetches the rest later)",
            "estargz",
            &["--verify", "background"],
            sizes["estargz"],
        ),
        (
            "eStargz ordered by profile",
            "profiled",
            &[],
            sizes["estargz"],
        ),
        (
            "eStargz ordered by profile, background verification on",
            "profiled",
            &["--verify", "background"],
            sizes["estargz"],
        ),
        (
            "gzip, --prefetch with the recorded profile",
            "gzip",
            &["--prefetch"],
            sizes["gzip"],
        ),
        (
            "eStargz (not reordered), --prefetch with the recorded profile",
            "estargz",
            &["--prefetch"],
            sizes["estargz"],
        ),
        // Ablations: each mechanism switched off once.
        (
            "gzip, index from registry, small layers not fetched whole (--small-layers 0)",
            "gzip",
            &["--small-layers", "0"],
            sizes["gzip"],
        ),
        (
            "eStargz, small layers not fetched whole (--small-layers 0)",
            "estargz",
            &["--small-layers", "0"],
            sizes["estargz"],
        ),
        (
            "eStargz without streamed runs (1 MiB blocks, one block per request)",
            "estargz",
            &["--block-size", "1MiB", "--fetch-size", "1MiB"],
            sizes["estargz"],
        ),
        (
            "eStargz without whole-file fetch or library prediction (--no-whole-files)",
            "estargz",
            &["--no-whole-files"],
            sizes["estargz"],
        ),
        (
            "eStargz ordered by profile without prefetch (--no-prefetch)",
            "profiled",
            &["--no-prefetch"],
            sizes["estargz"],
        ),
    ];
    for (label, name, flags, size) in variants {
        let mut f: Vec<&str> = flags.to_vec();
        if f.contains(&"--prefetch") {
            f.push(profile.to_str().unwrap());
        }
        let mut runs: Vec<_> = (0..rounds)
            .map(|_| {
                drop_caches();
                proxy.reset();
                let (m, ready) = BenchMount::new(&via(name), &f);
                let run = run_app(m.path());
                let fetched = proxy.blob_bytes.load(Ordering::SeqCst);
                let requests = proxy.requests.load(Ordering::SeqCst);
                (ready + run, ready, run, fetched, requests)
            })
            .collect();
        runs.sort();
        let range = (runs[0].0, runs[rounds - 1].0);
        let (total, ready, run, fetched, requests) = runs[rounds / 2];
        println!(
            "| {label} | {:.2} | {:.2} | {:.2} ({:.2}-{:.2}) | {:.1}x | {fetched} | {:.1}% | {requests} |",
            ready.as_secs_f64(),
            run.as_secs_f64(),
            total.as_secs_f64(),
            range.0.as_secs_f64(),
            range.1.as_secs_f64(),
            full.as_secs_f64() / total.as_secs_f64(),
            fetched as f64 * 100.0 / size as f64
        );
    }
    println!(
        "| full pull (skopeo copy + tar -xz + run) | pull {:.2} + extract {:.2} | {:.2} | {:.2} ({:.2}-{:.2}) | 1.0x | all | 100% | |",
        pull.as_secs_f64(),
        extract.as_secs_f64(),
        local_run.as_secs_f64(),
        full.as_secs_f64(),
        full_range.0.as_secs_f64(),
        full_range.1.as_secs_f64()
    );

    // Starts on a converged mount (every layer fetched, verified and copied locally): what a
    // container restarted from the same mount costs, each start after the page caches were
    // dropped, alternating with the same start from local disk.
    let local_root = work.path().join("extracted0");
    let starts = rounds.max(5);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let mut lines = Vec::new();
    for name in ["estargz", "gzip"] {
        let (m, _) = BenchMount::new(&via(name), &["--verify", "background"]);
        wait_converged(&m, 3, true);
        let pairs: Vec<(f64, f64)> = (0..starts)
            .map(|_| {
                drop_caches();
                let local = run_app(&local_root).as_secs_f64();
                drop_caches();
                (local, run_app(m.path()).as_secs_f64())
            })
            .collect();
        let (local, llo, lhi) = median(pairs.iter().map(|p| p.0).collect());
        let (mounted, mlo, mhi) = median(pairs.iter().map(|p| p.1).collect());
        let (ratio, rlo, rhi) = median(pairs.iter().map(|p| p.1 / p.0).collect());
        lines.push(format!(
            "{name} {mounted:.2} s ({mlo:.2}-{mhi:.2}) against {local:.2} s ({llo:.2}-{lhi:.2}) from local disk: {ratio:.2}x ({rlo:.2}-{rhi:.2}x)"
        ));
    }
    println!(
        "\nCold app starts once the mount has converged (layers copied locally, read-ahead raised), medians of {starts} alternating with local disk: {}.",
        lines.join("; ")
    );

    // A first answer: `ocifs cat` of one file of the gzip image (published index), a new
    // process with an empty cache each time, with and without mark windows, alternating.
    let files = [
        "/usr/lib/python3.11/email/utils.py",
        "/usr/lib/python3.11/json/decoder.py",
        "/usr/lib/python3.11/http/client.py",
        "/usr/lib/python3.11/xml/dom/minidom.py",
        "/usr/lib/python3.11/zipfile.py",
        "/usr/lib/python3.11/tarfile.py",
        "/usr/lib/python3.11/logging/handlers.py",
        "/usr/lib/python3.11/unittest/mock.py",
        "/etc/passwd",
        "/usr/share/doc/bash/copyright",
    ];
    let cat = |file: &str, flags: &[&str]| {
        let cache = TempDir::new("bcat");
        let mut args = vec!["cat", "--cache-dir", cache.path().to_str().unwrap()];
        args.extend_from_slice(flags);
        let reference = via("gzip");
        args.extend([reference.as_str(), file]);
        let t = Instant::now();
        let (ok, _, err) = ocifs(&args, &[]);
        assert!(ok, "cat {file}: {err}");
        t.elapsed().as_secs_f64()
    };
    let pairs: Vec<(f64, f64)> = files
        .iter()
        .map(|f| (cat(f, &[]), cat(f, &["--no-mark-windows"])))
        .collect();
    let (with, wlo, whi) = median(pairs.iter().map(|p| p.0).collect());
    let (without, olo, ohi) = median(pairs.iter().map(|p| p.1).collect());
    let better = pairs.iter().filter(|p| p.0 < p.1).count();
    println!(
        "\nFirst answer, `ocifs cat` of one file of the gzip image with a published index (new process, empty cache; {} files): with mark windows {with:.3} s ({wlo:.3}-{whi:.3}), without {without:.3} s ({olo:.3}-{ohi:.3}); faster with them for {better} of {} files.",
        files.len(),
        files.len()
    );
}

//! `cargo bench --bench realistic` (part of `scripts/bench`): a process starting from a lazily
//! mounted Debian image over the emulated WAN link, per format, against pull + extract + run.
//!
//! The image is `common::debian`'s: a bookworm minbase root file system with python3 made by
//! debootstrap from deb.debian.org (cached under target/bench-rootfs), split into three
//! layers (the base system, the Python standard library, a small app that imports a dozen
//! stdlib modules). The workload is `chroot MOUNT python3 /app/main.py`. Link settings as in
//! the startup benchmark (OCIFS_BENCH_RTT_MS, OCIFS_BENCH_MBIT); OCIFS_BENCH_LINK chooses the
//! emulation (`packet`, the default, `http`, or `packet,http` for both in one run; see
//! `common::LinkMode`), OCIFS_BENCH_ROUNDS the cold rounds per row, OCIFS_BENCH_ONLY a
//! comma-separated list of row and part keys to run (the keys are in `main`), and
//! OCIFS_BENCH_FLAGS extra flags for every mount. OCIFS_BENCH_TLS=1 has the packet-level link's
//! registry speak TLS with a self-signed certificate (mount with
//! OCIFS_BENCH_FLAGS=--tls-verify=false).

#![allow(dead_code)]

#[path = "../tests/it/builder.rs"]
mod builder;
mod common;
#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "../tests/it/link.rs"]
mod link;

use common::debian::{self, run_app};
use common::{
    BenchLink, BenchMount, LinkMode, drop_caches, env_u64, full_pull, selected, wait_converged,
};
use harness::{Registry, TempDir, ocifs};
use std::path::Path;
use std::time::{Duration, Instant};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rtt = Duration::from_millis(env_u64("OCIFS_BENCH_RTT_MS", 40));
    let rate = env_u64("OCIFS_BENCH_MBIT", 200) * 1_000_000 / 8;
    let modes = LinkMode::from_env();
    let reg = Registry::start(None);
    let work = TempDir::new("realistic");
    let published = debian::publish(&reg, &work, false);
    let (sizes, profile) = (&published.sizes, &published.profile);
    let probe_blob = &published.probe_blob;

    let rounds = env_u64("OCIFS_BENCH_ROUNDS", 3).max(1) as usize;
    for mode in modes {
        let link = BenchLink::start(mode, &reg, rtt, rate);
        let via = |name: &str| format!("{}/real/{name}:v1", link.addr);
        println!("\n#### Realistic startup over the {}", link.describe());
        println!(
            "\nProbe: {}.",
            link.probe("real/gzip", &probe_blob.0, probe_blob.1)
        );
        // For experiments by hand: keep the registry and the link up for a while.
        let hold = env_u64("OCIFS_BENCH_HOLD_S", 0);
        if hold > 0 {
            eprintln!(
                "holding {hold} s: images {} (gzip, estargz, profiled, plain), profile {}",
                via("NAME"),
                profile.display()
            );
            std::thread::sleep(Duration::from_secs(hold));
        }
        measure(&link, &via, sizes, profile, rounds, &work);
    }
}

/// The table, the first small-file reads, converged starts and first answers over one link.
fn measure(
    link: &BenchLink,
    via: &dyn Fn(&str) -> String,
    sizes: &std::collections::HashMap<&str, usize>,
    profile: &Path,
    rounds: usize,
    work: &TempDir,
) {
    // Full pull through the link, extraction of the three layers, the app from local disk;
    // the round with the median total is reported (each round into fresh directories).
    let tag = link.mode.name();
    let mut pulls: Vec<_> = (0..rounds)
        .map(|i| {
            let extracted = work.path().join(format!("extracted-{tag}-{i}"));
            let pulled = work.path().join(format!("pulled-{tag}-{i}"));
            let (pull, extract) = full_pull(&via("gzip"), &pulled, &extracted);
            drop_caches();
            let local_run = run_app(&extracted);
            (pull + extract + local_run, pull, extract, local_run)
        })
        .collect();
    pulls.sort();
    let full_range = (pulls[0].0, pulls[rounds - 1].0);
    let (full, pull, extract, local_run) = pulls[rounds / 2];
    let local_root = work.path().join(format!("extracted-{tag}-0"));

    println!(
        "\nRealistic startup: Debian bookworm minbase + python3 ({:.0} MiB gzip in 3 layers); workload `chroot MOUNT python3 /app/main.py` importing 15 stdlib modules.",
        sizes["gzip"] as f64 / 1048576.0
    );
    println!(
        "Each row is the median (by total) of {rounds} cold rounds; the range of their totals is in brackets. `read by the app`: bytes the mount's FUSE reads returned.\n"
    );
    println!(
        "| variant | mount ready s | app run s | total s | vs full pull | bytes fetched | % of image | read by the app | fetched / read | requests |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let variants: [(&str, &str, &str, &[&str], usize); 14] = [
        (
            "plain",
            "gzip, first mount (index built by the mount)",
            "plain",
            &[],
            sizes["gzip"],
        ),
        (
            "gzip",
            "gzip, index from registry",
            "gzip",
            &[],
            sizes["gzip"],
        ),
        (
            "gzip-no-windows",
            "gzip, index from registry, without mark windows (--no-mark-windows)",
            "gzip",
            &["--no-mark-windows"],
            sizes["gzip"],
        ),
        ("estargz", "eStargz", "estargz", &[], sizes["estargz"]),
        (
            "estargz-verify",
            "eStargz, background verification on (it yields to reads, fetches the rest later)",
            "estargz",
            &["--verify", "background"],
            sizes["estargz"],
        ),
        (
            "profiled",
            "eStargz ordered by profile",
            "profiled",
            &[],
            sizes["profiled"],
        ),
        (
            "profiled-verify",
            "eStargz ordered by profile, background verification on",
            "profiled",
            &["--verify", "background"],
            sizes["profiled"],
        ),
        (
            "gzip-prefetch",
            "gzip, --prefetch with the recorded profile",
            "gzip",
            &["--prefetch"],
            sizes["gzip"],
        ),
        (
            "estargz-prefetch",
            "eStargz (not reordered), --prefetch with the recorded profile",
            "estargz",
            &["--prefetch"],
            sizes["estargz"],
        ),
        // Ablations: each mechanism switched off once.
        (
            "gzip-no-small",
            "gzip, index from registry, small layers not fetched whole (--small-layers 0)",
            "gzip",
            &["--small-layers", "0"],
            sizes["gzip"],
        ),
        (
            "estargz-no-small",
            "eStargz, small layers not fetched whole (--small-layers 0)",
            "estargz",
            &["--small-layers", "0"],
            sizes["estargz"],
        ),
        (
            "estargz-no-runs",
            "eStargz without streamed runs (1 MiB blocks, one block per request)",
            "estargz",
            &["--block-size", "1MiB", "--fetch-size", "1MiB"],
            sizes["estargz"],
        ),
        (
            "estargz-no-whole",
            "eStargz without whole-file fetch or library prediction (--no-whole-files)",
            "estargz",
            &["--no-whole-files"],
            sizes["estargz"],
        ),
        (
            "profiled-no-prefetch",
            "eStargz ordered by profile without prefetch (--no-prefetch)",
            "profiled",
            &["--no-prefetch"],
            sizes["profiled"],
        ),
    ];
    for (key, label, name, flags, size) in variants {
        if !selected(key) {
            continue;
        }
        let mut f: Vec<&str> = flags.to_vec();
        if f.contains(&"--prefetch") {
            f.push(profile.to_str().unwrap());
        }
        let mut runs: Vec<_> = (0..rounds)
            .map(|_| {
                drop_caches();
                link.reset();
                let (m, ready) = BenchMount::new(&via(name), &f);
                let run = run_app(m.path());
                let fetched = link.fetched();
                let read = m.stats().reads.bytes;
                drop(m);
                (ready + run, ready, run, fetched, read, link.requests())
            })
            .collect();
        runs.sort();
        let range = (runs[0].0, runs[rounds - 1].0);
        let (total, ready, run, fetched, read, requests) = runs[rounds / 2];
        println!(
            "| {label} | {:.2} | {:.2} | {:.2} ({:.2}-{:.2}) | {:.1}x | {fetched} | {:.1}% | {read} | {:.2} | {requests} |",
            ready.as_secs_f64(),
            run.as_secs_f64(),
            total.as_secs_f64(),
            range.0.as_secs_f64(),
            range.1.as_secs_f64(),
            full.as_secs_f64() / total.as_secs_f64(),
            fetched as f64 * 100.0 / size as f64,
            fetched as f64 / read.max(1) as f64
        );
    }
    println!(
        "| full pull (skopeo copy + tar -xz + run) | pull {:.2} + extract {:.2} | {:.2} | {:.2} ({:.2}-{:.2}) | 1.0x | all | 100% | | | |",
        pull.as_secs_f64(),
        extract.as_secs_f64(),
        local_run.as_secs_f64(),
        full.as_secs_f64(),
        full_range.0.as_secs_f64(),
        full_range.1.as_secs_f64()
    );

    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    if selected("first-read") {
        first_reads(link, via);
    }

    // Starts on a converged mount (every layer fetched, verified and copied locally): what a
    // container restarted from the same mount costs, each start after the page caches were
    // dropped, alternating with the same start from local disk.
    if selected("converged") {
        let starts = rounds.max(5);
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
    }

    // A first answer: `ocifs cat` of one file of the gzip image (published index), a new
    // process with an empty cache each time, with and without mark windows, alternating.
    if selected("cat") {
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
            let mut args = vec![
                "cat",
                "--insecure",
                "--cache-dir",
                cache.path().to_str().unwrap(),
            ];
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
}

/// Small files of the base layer, each read once right after a fresh mount of the unordered
/// eStargz image: the first small-file read, which one round trip plus its transfer bounds.
fn first_reads(link: &BenchLink, via: &dyn Fn(&str) -> String) {
    let files = [
        "etc/debian_version",
        "etc/host.conf",
        "etc/nsswitch.conf",
        "etc/issue",
        "usr/lib/os-release",
    ];
    let mut times = Vec::new();
    for f in files {
        drop_caches();
        link.reset();
        let (m, _) = BenchMount::new(&via("estargz"), &[]);
        let t = Instant::now();
        let len = std::fs::read(m.path().join(f)).unwrap().len();
        times.push((t.elapsed().as_secs_f64() * 1e3, len, link.fetched()));
    }
    let mut sorted: Vec<f64> = times.iter().map(|t| t.0).collect();
    sorted.sort_by(f64::total_cmp);
    println!(
        "\nFirst small-file read right after mount (eStargz, a fresh mount each): median {:.0} ms; {}.",
        sorted[sorted.len() / 2],
        files
            .iter()
            .zip(&times)
            .map(|(f, (ms, len, fetched))| format!(
                "/{f} ({len} B) {ms:.0} ms, {fetched} bytes fetched by then (mount included)"
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

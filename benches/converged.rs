//! `cargo bench --bench converged` (or `scripts/bench`): bulk sequential reads once a mount
//! has converged — its layer fetched whole in the background, verified and copied locally
//! (see `image::local`) — next to the same file read from local disk, cold and warm; and the
//! same mount with `--no-local-copy`, whose reads decode the cached compressed blocks.
//!
//! The image has one layer holding one 200 MiB file made of this machine's libraries and
//! programs (so it compresses like the binaries in real images), pushed as gzip with a
//! published checkpoint index and as eStargz to the real registry on 127.0.0.1. Reads are
//! 1 MiB; page caches are dropped before each cold read; a warm figure is the median of three
//! reads back to back. `OCIFS_BENCH_ROUNDS` rounds (default 3); each round measures local
//! disk and every mount back to back, and each figure is the median of the rounds (ratios: of
//! each round's own ratios). Prints Markdown.

#![allow(dead_code)]

#[path = "../tests/it/builder.rs"]
mod builder;
mod common;
#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "../tests/it/link.rs"]
mod link;

use builder::{Enc, encode, file, layout, push};
use common::{BenchMount, drop_caches, env_u64, mbps, wait_converged};
use harness::{Registry, TempDir, push_index};
use std::io::Read;
use std::path::Path;
use std::time::Instant;

const SIZE: usize = 200 << 20;

/// `SIZE` bytes of this machine's shared libraries and programs, in a stable order.
fn binaries() -> Vec<u8> {
    let mut paths = Vec::new();
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            paths.extend(entries.flatten().map(|e| e.path()));
        }
    }
    paths.sort();
    let mut out = Vec::with_capacity(SIZE);
    while out.len() < SIZE {
        let before = out.len();
        for p in &paths {
            let is_file = std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file());
            if let (true, Ok(bytes)) = (is_file, std::fs::read(p)) {
                out.extend_from_slice(&bytes);
            }
            if out.len() >= SIZE {
                break;
            }
        }
        assert!(out.len() > before, "no files to build the image from");
    }
    out.truncate(SIZE);
    out
}

/// MB/s of reading `path` front to back in 1 MiB reads.
fn read_1m(path: &Path) -> f64 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut n = 0;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k;
    }
    assert_eq!(n, SIZE);
    mbps(n, t.elapsed())
}

/// MB/s of a warm read of `path`: the median of three back to back (the first re-read after
/// a cold one moves a lot, for local disk and FUSE alike).
fn warm_1m(path: &Path) -> f64 {
    let mut v = [read_1m(path), read_1m(path), read_1m(path)];
    v.sort_by(f64::total_cmp);
    v[1]
}

fn main() {
    let rounds = env_u64("OCIFS_BENCH_ROUNDS", 3).max(1) as usize;
    let reg = Registry::start(None);
    let work = TempDir::new("converged");
    let content = binaries();
    let local = work.path().join("local.bin");
    std::fs::write(&local, &content).unwrap();
    let tar = builder::tar(&[file("big.bin", content)]);
    let mut images = Vec::new();
    for (name, enc) in [("gzip", Enc::Gzip), ("estargz", Enc::Estargz)] {
        let layers = [encode(tar.clone(), enc)];
        let blob_mib = layers[0].blob.len() as f64 / 1048576.0;
        let dir = layout(
            &work.path().join(name),
            "v1",
            &[("linux", "amd64", None, &layers)],
        );
        push(&dir, "v1", &reg.addr, &format!("converged/{name}"), None);
        let reference = format!("{}/converged/{name}:v1", reg.addr);
        if name == "gzip" {
            push_index(&reference, &[]);
        }
        images.push((name, reference, blob_mib));
    }
    let variants: Vec<(String, &str, bool)> = images
        .iter()
        .flat_map(|(name, reference, mib)| {
            let what = match *name {
                "gzip" => format!("gzip with a published index ({mib:.1} MiB blob)"),
                _ => format!("eStargz ({mib:.1} MiB blob)"),
            };
            [
                (
                    format!("{what}, converged: served from the local copy"),
                    reference.as_str(),
                    true,
                ),
                (
                    format!("{what}, verified, `--no-local-copy`: decoded from cached blocks"),
                    reference.as_str(),
                    false,
                ),
            ]
        })
        .collect();

    // Per round: local cold, local warm, then (cold, warm) of each variant.
    let mut measured: Vec<Vec<f64>> = Vec::new();
    for _ in 0..rounds {
        drop_caches();
        let mut row = vec![read_1m(&local), warm_1m(&local)];
        for (_, reference, copied) in &variants {
            let flags: &[&str] = match copied {
                true => &["--verify", "background"],
                false => &["--verify", "background", "--no-local-copy"],
            };
            let (m, _) = BenchMount::new(reference, flags);
            wait_converged(&m, 1, *copied);
            // The copy was just written: drop it from the page cache too.
            let _ = std::process::Command::new("sync").status();
            drop_caches();
            row.push(read_1m(&m.path().join("big.bin")));
            row.push(warm_1m(&m.path().join("big.bin")));
        }
        measured.push(row);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let col = |k: usize| median(measured.iter().map(|r| r[k]).collect());
    println!(
        "Bulk sequential reads (1 MiB) of a 200 MiB file of this machine's libraries and programs; registry on 127.0.0.1; medians of {rounds} rounds (range).\n"
    );
    println!("| read | cold MB/s | warm MB/s | cold, local disk / this |");
    println!("|---|---|---|---|");
    let (c, clo, chi) = col(0);
    let (w, wlo, whi) = col(1);
    println!(
        "| local disk (the file written to {}) | {c:.0} ({clo:.0}-{chi:.0}) | {w:.0} ({wlo:.0}-{whi:.0}) | 1.0x |",
        work.path().display()
    );
    for (i, (what, _, _)) in variants.iter().enumerate() {
        let (c, clo, chi) = col(2 + 2 * i);
        let (w, wlo, whi) = col(3 + 2 * i);
        let (x, xlo, xhi) = median(measured.iter().map(|r| r[0] / r[2 + 2 * i]).collect());
        println!(
            "| {what} | {c:.0} ({clo:.0}-{chi:.0}) | {w:.0} ({wlo:.0}-{whi:.0}) | {x:.2}x ({xlo:.2}-{xhi:.2}x) |"
        );
    }
    println!(
        "\nMachine: {} cores.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

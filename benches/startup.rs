//! `cargo bench --bench startup` (or `scripts/bench`): how fast a process can start from a
//! lazily mounted image over an emulated WAN link, per layer format, against a full pull;
//! plus read throughput, concurrency and the daemon's memory for a 50k-file image.
//!
//! The link is the test proxy in front of the real registry: each request waits one round
//! trip, and all response bytes share one token bucket. Settings: OCIFS_BENCH_RTT_MS
//! (default 40) and OCIFS_BENCH_MBIT (default 200). Prints Markdown for docs/BENCHMARKS.md.

#![allow(dead_code)]

#[path = "../tests/it/builder.rs"]
mod builder;
mod common;
#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "../tests/it/link.rs"]
mod link;

use builder::{Enc, Item, encode, file, layout, noise, push};
use common::{BenchMount, drop_caches, env_u64, full_pull, mbps, record_and_convert};
use harness::{Proxy, Registry, TempDir, ocifs, push_index};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const SMALL: usize = 2000;
const WORKLOAD: usize = 60;
const BIG: usize = 64 << 20;
const PAR: usize = 16;

/// Small files that compress like text, 16 one-MiB files, one big incompressible file.
fn app_layer() -> Vec<u8> {
    let mut items = vec![
        Item::Dir("app", 0o755),
        Item::Dir("app/lib", 0o755),
        Item::Dir("app/par", 0o755),
    ];
    for i in 0..SMALL {
        let mut body = format!("# module {i}\n")
            .repeat(200 + (i % 50) * 20)
            .into_bytes();
        body.extend_from_slice(&noise(512, i as u64));
        items.push(file(&format!("app/lib/mod{i:04}.py"), body));
    }
    for i in 0..PAR {
        items.push(file(
            &format!("app/par/p{i:02}.bin"),
            noise(1 << 20, 1000 + i as u64),
        ));
    }
    items.push(file("app/big.bin", noise(BIG, 99)));
    builder::tar(&items)
}

fn workload_paths() -> Vec<String> {
    (0..WORKLOAD)
        .map(|i| format!("app/lib/mod{:04}.py", i * (SMALL / WORKLOAD)))
        .collect()
}

fn read_workload(root: &Path) -> Duration {
    let t = Instant::now();
    for p in workload_paths() {
        std::fs::read(root.join(p)).unwrap();
    }
    t.elapsed()
}

struct Row {
    name: String,
    blob: usize,
    ready: Duration,
    workload: Duration,
    fetched: u64,
    requests: u64,
    cold: f64,
    warm: f64,
}

fn run(proxy: &Proxy, name: &str, reference: &str, blob: usize, flags: &[&str]) -> Row {
    drop_caches();
    proxy.reset();
    let (m, ready) = BenchMount::new(reference, flags);
    let workload = read_workload(m.path());
    let fetched = proxy.blob_bytes.load(Ordering::SeqCst);
    let requests = proxy.requests.load(Ordering::SeqCst);
    let t = Instant::now();
    assert_eq!(
        std::fs::read(m.path().join("app/big.bin")).unwrap().len(),
        BIG
    );
    let cold = mbps(BIG, t.elapsed());
    let t = Instant::now();
    std::fs::read(m.path().join("app/big.bin")).unwrap();
    let warm = mbps(BIG, t.elapsed());
    Row {
        name: name.into(),
        blob,
        ready,
        workload,
        fetched,
        requests,
        cold,
        warm,
    }
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
    let via = |name: &str| format!("{}/bench/{name}:v1", proxy.addr);

    // Probe the emulated link: one small request, and one 8 MiB blob read.
    let probe = encode(builder::tar(&[file("p", noise(8 << 20, 5))]), Enc::Tar);
    let pdir = layout(
        &work.path().join("probe"),
        "v1",
        &[("linux", "amd64", None, &[probe])],
    );
    push(&pdir, "v1", &reg.addr, "bench/probe", None);
    let t = Instant::now();
    let _ = ocifs(&["fetch", &via("probe")], &[]);
    let small_req = t.elapsed();
    let t = Instant::now();
    let (_, out, _) = ocifs(
        &[
            "cat",
            "--cache-dir",
            work.path().join("pc").to_str().unwrap(),
            &via("probe"),
            "p",
        ],
        &[],
    );
    let probe_mbps = mbps(out.len(), t.elapsed());

    let tar = app_layer();
    let mut sizes = std::collections::HashMap::new();
    for (name, enc) in [
        ("gzip", Enc::Gzip),
        ("estargz", Enc::Estargz),
        ("tar", Enc::Tar),
    ] {
        let layer = encode(tar.clone(), enc);
        sizes.insert(name, layer.blob.len());
        let dir = layout(
            &work.path().join(name),
            "v1",
            &[("linux", "amd64", None, &[layer])],
        );
        push(&dir, "v1", &reg.addr, &format!("bench/{name}"), None);
    }

    // Baseline: full pull through the same link, extraction, then the workload from disk.
    let rootfs = work.path().join("rootfs");
    let (pull, extract) = full_pull(&via("gzip"), &work.path().join("pulled"), &rootfs);
    drop_caches();
    let local_workload = read_workload(&rootfs);
    std::fs::read(rootfs.join("app/big.bin")).unwrap();
    let t = Instant::now();
    std::fs::read(rootfs.join("app/big.bin")).unwrap();
    let local_warm = mbps(BIG, t.elapsed());
    let full = pull + extract + local_workload;

    let mut rows = vec![run(
        &proxy,
        "gzip, first mount (index built)",
        &via("gzip"),
        sizes["gzip"],
        &[],
    )];
    // Publish the gzip index (not timed), then a clean mount finds it.
    push_index(&format!("{}/bench/gzip:v1", reg.addr), &[]);
    rows.push(run(
        &proxy,
        "gzip, index from registry",
        &via("gzip"),
        sizes["gzip"],
        &[],
    ));
    rows.push(run(
        &proxy,
        "eStargz",
        &via("estargz"),
        sizes["estargz"],
        &[],
    ));
    rows.push(run(
        &proxy,
        "tar (uncompressed)",
        &via("tar"),
        sizes["tar"],
        &[],
    ));
    // Record the workload once, convert with that profile, start again.
    let profile = work.path().join("startup.profile");
    let conv_cache = TempDir::new("conv");
    record_and_convert(
        &via("estargz"),
        &profile,
        |root| {
            read_workload(root);
        },
        &format!("{}/bench/gzip:v1", reg.addr),
        &format!("{}/bench/profiled:v1", reg.addr),
        conv_cache.path(),
    );
    rows.push(run(
        &proxy,
        "eStargz ordered by profile",
        &via("profiled"),
        sizes["estargz"],
        &[],
    ));

    println!(
        "\nLink: {} ms RTT, {} Mbit/s. Probe: a manifest fetch (process start + 3 requests) {:.0} ms; an 8 MiB lazy cat {:.1} MB/s. Machine: {} cores.",
        rtt.as_millis(),
        rate * 8 / 1_000_000,
        small_req.as_secs_f64() * 1e3,
        probe_mbps,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "Image: one layer, {SMALL} small files, {PAR} one-MiB files, one {} MiB file; the workload reads {WORKLOAD} small files.\n",
        BIG >> 20
    );
    println!(
        "| variant | blob MiB | mount ready s | workload s | ready+workload s | vs full pull | blob bytes fetched | % of blob | requests | 64 MiB file cold MB/s | warm MB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let total = r.ready + r.workload;
        println!(
            "| {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1}x | {} | {:.1}% | {} | {:.0} | {:.0} |",
            r.name,
            r.blob as f64 / 1048576.0,
            r.ready.as_secs_f64(),
            r.workload.as_secs_f64(),
            total.as_secs_f64(),
            full.as_secs_f64() / total.as_secs_f64(),
            r.fetched,
            r.fetched as f64 * 100.0 / r.blob as f64,
            r.requests,
            r.cold,
            r.warm
        );
    }
    println!(
        "| full pull (skopeo copy + tar -xz) | {:.1} | pull {:.2} + extract {:.2} | {:.2} | {:.2} | 1.0x | all | 100% | | local warm {:.0} | |",
        sizes["gzip"] as f64 / 1048576.0,
        pull.as_secs_f64(),
        extract.as_secs_f64(),
        local_workload.as_secs_f64(),
        full.as_secs_f64(),
        local_warm
    );

    // The gzip checkpoint index: size, build speed next to `gzip -dc`, and one small read.
    let gz_layer = work.path().join("gzip");
    let gz_blob = std::fs::read_dir(gz_layer.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .max_by_key(|b| b.metadata().unwrap().len())
        .unwrap()
        .path();
    drop_caches();
    let t = Instant::now();
    assert!(
        Command::new("sh")
            .arg("-c")
            .arg(format!("gzip -dc < {} > /dev/null", gz_blob.display()))
            .status()
            .unwrap()
            .success()
    );
    let gunzip = t.elapsed();
    let ic = TempDir::new("ic");
    drop_caches();
    let t = Instant::now();
    let (ok, _, err) = ocifs(
        &[
            "index",
            "--cache-dir",
            ic.path().to_str().unwrap(),
            &format!("oci:{}:v1", gz_layer.display()),
        ],
        &[],
    );
    assert!(ok, "{err}");
    let build = t.elapsed();
    let idx_file = std::fs::read_dir(ic.path().join("indexes"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let idx_size = std::fs::metadata(&idx_file).unwrap().len();
    drop_caches();
    proxy.reset();
    let (m, _) = BenchMount::new(&via("gzip"), &[]);
    std::fs::read(m.path().join("app/lib/mod1000.py")).unwrap();
    let one_read = proxy.blob_bytes.load(Ordering::SeqCst);
    let one_requests = proxy.blob_requests.load(Ordering::SeqCst);
    drop(m);
    println!(
        "\nGzip checkpoint index (4 MiB spans) of the {:.1} MiB layer ({:.1} MiB uncompressed): {} KiB = {:.2}% of the uncompressed layer; \
         built in {:.2} s (`ocifs index` from a local OCI layout, including process start) against `gzip -dc` {:.2} s ({:.2}x); \
         reading one small file after a clean mount with the published index fetched {} blob bytes in {} requests.",
        sizes["gzip"] as f64 / 1048576.0,
        tar.len() as f64 / 1048576.0,
        idx_size / 1024,
        idx_size as f64 * 100.0 / tar.len() as f64,
        build.as_secs_f64(),
        gunzip.as_secs_f64(),
        build.as_secs_f64() / gunzip.as_secs_f64(),
        one_read,
        one_requests
    );

    // Each figure below is the median of OCIFS_BENCH_ROUNDS rounds, each on fresh mounts with
    // cold caches (for concurrency: one read alone, then sixteen at once).
    let rounds = env_u64("OCIFS_BENCH_ROUNDS", 3).max(1) as usize;
    loopback_vs_inflate(&reg, &work, rounds);

    // 16 concurrent cold reads of different 1 MiB files against one alone (eStargz): over
    // the link, where 16 MiB cannot arrive faster than the link rate, and over loopback,
    // where the ratio shows how well ocifs overlaps them.
    let concurrent = |reference: &str| {
        drop_caches();
        let (m, _) = BenchMount::new(reference, &["--no-prefetch"]);
        let t = Instant::now();
        std::fs::read(m.path().join("app/par/p00.bin")).unwrap();
        let one = t.elapsed();
        let t = Instant::now();
        std::thread::scope(|s| {
            for i in 1..=PAR {
                let p = m.path().join(format!("app/par/p{:02}.bin", i % PAR));
                s.spawn(move || std::fs::read(p).unwrap());
            }
        });
        (one, t.elapsed())
    };
    for (label, reference) in [
        ("over the link", via("estargz")),
        (
            "over loopback (no link emulation)",
            format!("{}/bench/estargz:v1", reg.addr),
        ),
    ] {
        let rounds: Vec<_> = (0..rounds).map(|_| concurrent(&reference)).collect();
        println!(
            "\n16 concurrent cold reads of different 1 MiB files (eStargz) {label}: {}",
            ratio_rounds(&rounds)
        );
    }

    // 16 concurrent cold reads of different 64 KiB files, each followed in the layer by 2 MiB
    // that nobody reads (so no fetch run brings one along with another): the latency-bound
    // case, where the link has room for all 16 and the figure shows whether ocifs overlaps
    // their round trips. Each case on a fresh mount.
    let mut items = vec![Item::Dir("spread", 0o755), Item::Dir("spread/fill", 0o755)];
    for i in 0..PAR {
        items.push(file(
            &format!("spread/s{i:02}.bin"),
            noise(64 << 10, 2000 + i as u64),
        ));
        items.push(file(
            &format!("spread/fill/f{i:02}.bin"),
            noise((2 << 20) + 4096, 3000 + i as u64),
        ));
    }
    let dir = layout(
        &work.path().join("spread"),
        "v1",
        &[(
            "linux",
            "amd64",
            None,
            &[encode(builder::tar(&items), Enc::Estargz)],
        )],
    );
    push(&dir, "v1", &reg.addr, "bench/spread", None);
    let cold_reads = |n: usize| {
        drop_caches();
        let (m, _) = BenchMount::new(&via("spread"), &["--no-prefetch"]);
        let t = Instant::now();
        std::thread::scope(|s| {
            for i in 0..n {
                let p = m.path().join(format!("spread/s{i:02}.bin"));
                s.spawn(move || assert_eq!(std::fs::read(p).unwrap().len(), 64 << 10));
            }
        });
        t.elapsed()
    };
    let rounds: Vec<_> = (0..rounds)
        .map(|_| (cold_reads(1), cold_reads(PAR)))
        .collect();
    println!(
        "\n16 concurrent cold reads of different 64 KiB files (eStargz, 2 MiB apart) over the link: {}",
        ratio_rounds(&rounds)
    );

    // A 50k-file image: metadata walk and daemon memory (local registry, no link emulation).
    let mut items = Vec::new();
    for d in 0..50 {
        items.push(Item::Dir(
            Box::leak(format!("d{d:02}").into_boxed_str()),
            0o755,
        ));
        for f in 0..1000 {
            items.push(file(&format!("d{d:02}/f{f:04}.txt"), format!("{d} {f}\n")));
        }
    }
    let many = builder::tar(&items);
    let layer = encode(many.clone(), Enc::Estargz);
    let dir = layout(
        &work.path().join("many"),
        "v1",
        &[("linux", "amd64", None, &[layer])],
    );
    push(&dir, "v1", &reg.addr, "bench/many", None);
    let local = work.path().join("many-local");
    std::fs::create_dir_all(&local).unwrap();
    let tarfile = work.path().join("many.tar");
    std::fs::write(&tarfile, &many).unwrap();
    assert!(
        Command::new("tar")
            .arg("-xf")
            .arg(&tarfile)
            .arg("-C")
            .arg(&local)
            .status()
            .unwrap()
            .success()
    );
    let walk = |root: &Path| -> (Duration, usize) {
        let t = Instant::now();
        let mut n = 0;
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let md = std::fs::symlink_metadata(e.path()).unwrap();
                n += 1;
                if md.is_dir() {
                    stack.push(e.path());
                }
            }
        }
        (t.elapsed(), n)
    };
    // The walk and the daemon's memory, as in earlier sessions: without the small layer
    // fetched whole at mount (its blocks would be in the figure).
    let (m, ready) = BenchMount::new(
        &format!("{}/bench/many:v1", reg.addr),
        &["--small-layers", "0"],
    );
    drop_caches();
    let (fuse_walk, n) = walk(m.path());
    let (fuse_walk_warm, _) = walk(m.path());
    drop_caches();
    let (local_walk, n2) = walk(&local);
    assert_eq!(n, n2);
    println!(
        "\n50k-file image (eStargz): mount ready {:.2} s; walk + stat of {n} entries: {:.0} ms cold, {:.0} ms warm, local disk {:.0} ms cold; daemon RSS {} MiB.",
        ready.as_secs_f64(),
        fuse_walk.as_secs_f64() * 1e3,
        fuse_walk_warm.as_secs_f64() * 1e3,
        local_walk.as_secs_f64() * 1e3,
        m.rss_kib() / 1024
    );
}

/// Cold sequential reads of a compressible 64 MiB file straight from the registry on
/// 127.0.0.1 (no link emulation), next to single-core inflate (`gzip -dc`) of the same blob:
/// what the read path costs when the network is not the limit. Each of `OCIFS_BENCH_ROUNDS`
/// rounds measures the three back to back, so a moment of a busy machine weighs on the
/// reference and the reads alike; each ratio is the median of the rounds' own ratios.
fn loopback_vs_inflate(reg: &Registry, work: &TempDir, rounds: usize) {
    let mut text = Vec::with_capacity(64 << 20);
    let mut i: u64 = 0;
    while text.len() < 64 << 20 {
        text.extend_from_slice(
            format!(
                "{i:>10} record {} of a compressible log line\n",
                i * 7919 % 10007
            )
            .as_bytes(),
        );
        i += 1;
    }
    text.truncate(64 << 20);
    let tar = builder::tar(&[file("big.log", text)]);
    let mut references = Vec::new();
    for (name, enc) in [("gzip", Enc::Gzip), ("estargz", Enc::Estargz)] {
        let layers = [encode(tar.clone(), enc)];
        let dir = layout(
            &work.path().join(format!("lb-{name}")),
            "v1",
            &[("linux", "amd64", None, &layers)],
        );
        let reference = format!("{}/loopback/{name}:v1", reg.addr);
        push(&dir, "v1", &reg.addr, &format!("loopback/{name}"), None);
        if name == "gzip" {
            push_index(&reference, &[]);
            std::fs::write(work.path().join("lb-gzip.blob"), &layers[0].blob).unwrap();
        }
        references.push(reference);
    }
    let blob = work.path().join("lb-gzip.blob");
    // Per round: MB/s of single-core inflate, then of ocifs on each image.
    let mut measured: Vec<[f64; 3]> = Vec::new();
    for _ in 0..rounds {
        drop_caches();
        let t = Instant::now();
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("gzip -dc < {} > /dev/null", blob.display()))
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let mut row = [mbps(64 << 20, t.elapsed()), 0.0, 0.0];
        for (k, reference) in references.iter().enumerate() {
            drop_caches();
            let (m, _) = BenchMount::new(reference, &[]);
            let t = Instant::now();
            let n = std::fs::read(m.path().join("big.log")).unwrap().len();
            row[k + 1] = mbps(n, t.elapsed());
        }
        measured.push(row);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (inflate, lo, hi) = median(measured.iter().map(|r| r[0]).collect());
    let mut listed = vec![format!(
        "single-core inflate (`gzip -dc`) {inflate:.0} MB/s ({lo:.0}-{hi:.0})"
    )];
    for (k, what) in ["ocifs, gzip with a published index", "ocifs, eStargz"]
        .iter()
        .enumerate()
    {
        let (v, _, _) = median(measured.iter().map(|r| r[k + 1]).collect());
        let (ratio, lo, hi) = median(measured.iter().map(|r| r[k + 1] / r[0]).collect());
        listed.push(format!(
            "{what} {v:.0} MB/s ({ratio:.2}x; {lo:.2}-{hi:.2}x)"
        ));
    }
    println!(
        "\nCold sequential read of a 64 MiB compressible file over loopback (no link emulation), MB/s of file bytes, medians of {rounds} rounds (each round: inflate, then both reads), ratios to the same round's inflate: {}.",
        listed.join(", ")
    );
}

/// "16 at once N ms; one alone M ms (Rx)" for the round with the median ratio, and the range
/// of the ratios over all rounds.
fn ratio_rounds(rounds: &[(Duration, Duration)]) -> String {
    let mut r: Vec<(f64, Duration, Duration)> = rounds
        .iter()
        .map(|&(one, sixteen)| (sixteen.as_secs_f64() / one.as_secs_f64(), one, sixteen))
        .collect();
    r.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, one, sixteen) = r[r.len() / 2];
    format!(
        "{:.0} ms; one alone {:.0} ms ({ratio:.1}x; median of {} rounds, {:.1}-{:.1}x).",
        sixteen.as_secs_f64() * 1e3,
        one.as_secs_f64() * 1e3,
        r.len(),
        r[0].0,
        r[r.len() - 1].0
    )
}

//! `cargo bench --bench podman` (part of `scripts/bench`): `podman run` of the realistic
//! image (`common::debian`: Debian bookworm minbase + python3 in three layers, command
//! `python3 /app/main.py`) over the emulated WAN link, per format, done the ordinary way
//! (`podman pull` + `podman run --rm`, podman downloading and unpacking every layer) against
//! a podman whose storage.conf names a fresh `ocifs store` as its additional layer store
//! (`podman run --rm` alone: podman pulls the manifest and config, and takes every layer
//! from the store, which fetches what the container reads).
//!
//! Each round uses a fresh podman storage root and, for the lazy run, a fresh store with an
//! empty cache directory; page caches are dropped before each measurement; the two ways
//! alternate, round after round. A run counts only if the container printed the app's line
//! and, lazily, if all three layers came from the store (a failed lookup would make podman
//! pull the layer itself). Settings: OCIFS_BENCH_RTT_MS, OCIFS_BENCH_MBIT, OCIFS_BENCH_LINK
//! (`packet`, the default, `http`, or both), OCIFS_BENCH_ROUNDS (default 3), OCIFS_BENCH_ONLY
//! (comma-separated keys: the formats `gzip estargz profiled plain zstd-chunked`, and
//! `overhead` for the breakdown of where the lazy run's time goes), OCIFS_BENCH_FLAGS (extra
//! flags for the store). podman needs runc, conmon and the settings this machine needs (see
//! tests/it/podman_env.rs).

#![allow(dead_code)]

#[path = "../tests/it/builder.rs"]
mod builder;
mod common;
#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "../tests/it/link.rs"]
mod link;
#[path = "../tests/it/podman_env.rs"]
mod podman_env;
#[path = "../tests/it/stats.rs"]
mod stats;

use common::debian::{self, APP_OUTPUT};
use common::{BenchLink, LinkMode, drop_caches, env_u64, extra_flags, selected};
use harness::{Registry, TempDir};
use podman_env::{LayerStore, Podman, podman_available};
use std::time::{Duration, Instant};

/// One format of the image: its key (the repository `real/KEY`, and the OCIFS_BENCH_ONLY
/// key), the row's label, and the speed-up issue 18 asks for.
struct Format {
    key: &'static str,
    label: &'static str,
    goal: Option<f64>,
}

const FORMATS: [Format; 5] = [
    Format {
        key: "gzip",
        label: "gzip, index published beside the image",
        goal: Some(3.0),
    },
    Format {
        key: "estargz",
        label: "eStargz",
        goal: Some(3.0),
    },
    Format {
        key: "profiled",
        label: "eStargz ordered by the recorded profile",
        goal: Some(5.0),
    },
    Format {
        key: "plain",
        label: "gzip without an index (the store builds it)",
        goal: None,
    },
    Format {
        key: "zstd-chunked",
        label: "zstd:chunked",
        goal: None,
    },
];

/// One ordinary round: `podman pull`, then `podman run --rm`.
#[derive(Clone, Copy)]
struct Ordinary {
    pull: Duration,
    run: Duration,
    /// Bytes over the link during the pull.
    fetched: u64,
    /// `/bin/true` in a container of the pulled image, after the run (podman and runc alone).
    true_run: Duration,
}

/// One lazy round: `podman run --rm` through a fresh store.
#[derive(Clone, Copy)]
struct Lazy {
    /// `ocifs store` until ready (once per machine in practice: not in the total).
    store_start: Duration,
    total: Duration,
    /// Bytes over the link during the run, and the layer bytes the store says it fetched.
    fetched: u64,
    store_fetched: u64,
    /// The longest time the store took to open one layer.
    slowest_open_ms: u64,
}

/// Checks what a container printed: the app's line, or the run does not count.
fn check_output(what: &str, out: &str) {
    assert_eq!(out, APP_OUTPUT, "{what}: the container printed {out:?}");
}

/// `podman pull` + `podman run --rm` of `reference` into a fresh storage root.
fn ordinary(link: &BenchLink, reference: &str) -> Ordinary {
    let podman = Podman::with_store(None, &[&link.addr], &[]);
    drop_caches();
    link.reset();
    let t = Instant::now();
    podman.ok(&["pull", "-q", reference]);
    let pull = t.elapsed();
    let fetched = link.fetched();
    let t = Instant::now();
    let out = podman.ok(&["run", "--rm", reference]);
    let run = t.elapsed();
    check_output("ordinary run", &out);
    let t = Instant::now();
    podman.ok(&["run", "--rm", reference, "/bin/true"]);
    let true_run = t.elapsed();
    Ordinary {
        pull,
        run,
        fetched,
        true_run,
    }
}

/// The store's flags: whole-blob verification off, as in the realistic benchmark (with it a
/// store fetches every layer whole in the background), then OCIFS_BENCH_FLAGS.
fn store_flags(extra: &[String]) -> Vec<&str> {
    let mut flags = vec!["--insecure", "--verify", "off"];
    flags.extend(extra.iter().map(String::as_str));
    flags
}

/// A fresh `ocifs store` and a podman using it: `podman run --rm` of `reference`.
fn lazy(link: &BenchLink, reference: &str, extra: &[String]) -> Lazy {
    let t = Instant::now();
    let store = LayerStore::start(&store_flags(extra), &[]);
    let store_start = t.elapsed();
    let podman = Podman::with_store(Some(store.path()), &[&link.addr], &[]);
    drop_caches();
    link.reset();
    let t = Instant::now();
    let out = podman.ok(&["run", "--rm", reference]);
    let total = t.elapsed();
    let fetched = link.fetched();
    check_output("lazy run", &out);
    assert_eq!(
        podman.layers_from(store.path()),
        3,
        "every layer from the store (a failed lookup makes podman pull it)"
    );
    let stats = store.stats();
    let layers = stats.layers.iter().flat_map(|l| &l.layers);
    let store_fetched = layers.map(|l| l.fetched_bytes).sum();
    let slowest_open_ms = stats.layers.iter().map(|l| l.ready_ms).max().unwrap_or(0);
    drop(podman);
    Lazy {
        store_start,
        total,
        fetched,
        store_fetched,
        slowest_open_ms,
    }
}

/// Where a lazy start's time goes, one round: a fresh store and podman pull, then run (the
/// two halves of the measured `podman run`); then a second fresh podman over the same store,
/// which now holds every byte the app reads, pulls and runs the same way (the floor: podman's
/// own work and metadata round trips, the store's cached answers), runs again with warm page
/// caches, and runs `/bin/true` in the container (podman and runc alone).
#[derive(Clone, Copy)]
struct Overhead {
    pull: Duration,
    run: Duration,
    warm_store_pull: Duration,
    warm_store_run: Duration,
    warm: Duration,
    true_run: Duration,
}

fn overhead(link: &BenchLink, reference: &str, extra: &[String]) -> Overhead {
    let store = LayerStore::start(&store_flags(extra), &[]);
    let timed = |podman: &Podman, args: &[&str]| {
        let t = Instant::now();
        let out = podman.ok(args);
        (t.elapsed(), out)
    };
    let first = Podman::with_store(Some(store.path()), &[&link.addr], &[]);
    drop_caches();
    let (pull, _) = timed(&first, &["pull", "-q", reference]);
    let (run, out) = timed(&first, &["run", "--rm", reference]);
    check_output("lazy run after pull", &out);
    drop(first);
    let second = Podman::with_store(Some(store.path()), &[&link.addr], &[]);
    drop_caches();
    let (warm_store_pull, _) = timed(&second, &["pull", "-q", reference]);
    let (warm_store_run, out) = timed(&second, &["run", "--rm", reference]);
    check_output("run over a warm store", &out);
    let (warm, out) = timed(&second, &["run", "--rm", reference]);
    check_output("run again", &out);
    let (true_run, _) = timed(&second, &["run", "--rm", reference, "/bin/true"]);
    assert_eq!(second.layers_from(store.path()), 3, "layers from the store");
    Overhead {
        pull,
        run,
        warm_store_pull,
        warm_store_run,
        warm,
        true_run,
    }
}

/// The median and the range of `v`.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn mib(bytes: f64) -> f64 {
    bytes / 1048576.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !podman_available() {
        eprintln!("podman benchmark skipped: podman, runc or conmon missing");
        return;
    }
    let rtt = Duration::from_millis(env_u64("OCIFS_BENCH_RTT_MS", 40));
    let rate = env_u64("OCIFS_BENCH_MBIT", 200) * 1_000_000 / 8;
    let rounds = env_u64("OCIFS_BENCH_ROUNDS", 3).max(1) as usize;
    let modes = LinkMode::from_env();
    let extra = extra_flags();
    let reg = Registry::start(None);
    let work = TempDir::new("podbench");
    let t = Instant::now();
    let published = debian::publish(&reg, &work, selected("zstd-chunked"));
    eprintln!(
        "podman: image built and published in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let sizes = &published.sizes;

    for mode in modes {
        let link = BenchLink::start(mode, &reg, rtt, rate);
        let via = |name: &str| format!("{}/real/{name}:v1", link.addr);
        println!("\n#### podman over the {}", link.describe());
        let (digest, size) = &published.probe_blob;
        println!("\nProbe: {}.", link.probe("real/gzip", digest, *size));
        // For experiments by hand: keep the registry and the link up for a while.
        let hold = env_u64("OCIFS_BENCH_HOLD_S", 0);
        if hold > 0 {
            eprintln!(
                "holding {hold} s: images {} (gzip, estargz, profiled, plain, zstd-chunked)",
                via("NAME")
            );
            std::thread::sleep(Duration::from_secs(hold));
        }
        println!(
            "\nEach figure is the median of {rounds} cold rounds (range in brackets); ordinary and lazy rounds alternate. Ordinary: `podman pull` then `podman run --rm` into a fresh storage root. Lazy: `podman run --rm` with a fresh `ocifs store {}` (empty cache) as additional layer store; its start is not in the total (a store serves every image once running). Link bytes: everything that crossed the link towards podman and the store during the pull (ordinary) or the run (lazy); store bytes: the layer bytes `ocifs stats --json` counts.\n",
            store_flags(&extra).join(" ")
        );
        println!(
            "| format | image MiB | ordinary pull s | ordinary run s | ordinary total s | lazy total s | speed-up | goal | link MiB ordinary | link MiB lazy | lazy % of image | store MiB | slowest layer open ms | store start s |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let mut ordinary_true = Vec::new();
        for f in FORMATS.iter().filter(|f| selected(f.key)) {
            let reference = via(f.key);
            let pairs: Vec<(Ordinary, Lazy)> = (0..rounds)
                .map(|_| (ordinary(&link, &reference), lazy(&link, &reference, &extra)))
                .collect();
            let o = |g: fn(&Ordinary) -> f64| spread(pairs.iter().map(|p| g(&p.0)).collect());
            let l = |g: fn(&Lazy) -> f64| spread(pairs.iter().map(|p| g(&p.1)).collect());
            let pull = o(|o| o.pull.as_secs_f64());
            let run = o(|o| o.run.as_secs_f64());
            let total = o(|o| (o.pull + o.run).as_secs_f64());
            let ofetched = o(|o| o.fetched as f64);
            let ltotal = l(|l| l.total.as_secs_f64());
            let lfetched = l(|l| l.fetched as f64);
            let sfetched = l(|l| l.store_fetched as f64);
            let slowest = l(|l| l.slowest_open_ms as f64);
            let start = l(|l| l.store_start.as_secs_f64());
            let ratios = spread(
                pairs
                    .iter()
                    .map(|(o, l)| (o.pull + o.run).as_secs_f64() / l.total.as_secs_f64())
                    .collect(),
            );
            ordinary_true.extend(pairs.iter().map(|p| p.0.true_run.as_secs_f64()));
            let size = sizes[f.key] as f64;
            let goal = match f.goal {
                Some(g) if total.0 / ltotal.0 >= g => format!(">= {g:.0}x: met"),
                Some(g) => format!(">= {g:.0}x: missed"),
                None => "-".to_string(),
            };
            println!(
                "| {} | {:.1} | {:.2} ({:.2}-{:.2}) | {:.2} ({:.2}-{:.2}) | {:.2} ({:.2}-{:.2}) | {:.2} ({:.2}-{:.2}) | {:.1}x (rounds {:.1}-{:.1}x) | {goal} | {:.1} | {:.1} ({:.1}-{:.1}) | {:.1}% | {:.1} | {:.0} | {:.2} |",
                f.label,
                mib(size),
                pull.0,
                pull.1,
                pull.2,
                run.0,
                run.1,
                run.2,
                total.0,
                total.1,
                total.2,
                ltotal.0,
                ltotal.1,
                ltotal.2,
                total.0 / ltotal.0,
                ratios.1,
                ratios.2,
                mib(ofetched.0),
                mib(lfetched.0),
                mib(lfetched.1),
                mib(lfetched.2),
                lfetched.0 * 100.0 / size,
                mib(sfetched.0),
                slowest.0,
                start.0,
            );
        }
        if selected("overhead") {
            let mut lines = Vec::new();
            if !ordinary_true.is_empty() {
                let (m, lo, hi) = spread(ordinary_true);
                lines.push(format!(
                    "an ordinary podman's `/bin/true` in the image it pulled (layers on local disk, after the run) {m:.2} s ({lo:.2}-{hi:.2})"
                ));
            }
            for key in ["estargz", "profiled"] {
                let runs: Vec<Overhead> = (0..rounds)
                    .map(|_| overhead(&link, &via(key), &extra))
                    .collect();
                let s = |g: fn(&Overhead) -> Duration| {
                    let (m, lo, hi) = spread(runs.iter().map(|o| g(o).as_secs_f64()).collect());
                    format!("{m:.2} s ({lo:.2}-{hi:.2})")
                };
                lines.push(format!(
                    "{key}: `podman pull` through a fresh store {}, then `podman run` {}; a fresh podman over the same store, now holding what the app reads: pull {}, run {}; its run again with warm page caches {}; `/bin/true` in the container {}",
                    s(|o| o.pull),
                    s(|o| o.run),
                    s(|o| o.warm_store_pull),
                    s(|o| o.warm_store_run),
                    s(|o| o.warm),
                    s(|o| o.true_run),
                ));
            }
            println!(
                "\nWhere the lazy start's time goes (medians of {rounds} rounds; page caches dropped before each fresh podman's pull): {}.",
                lines.join("; ")
            );
        }
    }
}

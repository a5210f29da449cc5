//! `cargo bench --bench fleet` (part of `scripts/bench`): issue 21's fleet benchmark. N nodes
//! (each its own network namespace, daemon, cache directory and mount; `lan.rs`) start the
//! realistic image's workload (`common::debian`: `chroot MOUNT python3 /app/main.py`) at
//! once, through a pull-through cache (distribution 2.8 in `proxy:` mode on the nodes' bridge;
//! `caches.rs`) in front of the origin behind the packet-level WAN link (tests/it/link.rs),
//! cold (a fresh cache) and then warm (the same cache again, fresh node caches), and the same
//! N against the origin directly; one more row with a mirror that answers 503 in front of the
//! origin. Reported per row: time until all N are done, bytes that crossed the link (origin
//! bytes), the origin's GETs of each layer blob, what the nodes received from the cache and
//! from the origin, errors.
//!
//! Settings: OCIFS_BENCH_RTT_MS, OCIFS_BENCH_MBIT (the link, as in the other benchmarks),
//! OCIFS_BENCH_FLEET (node counts, default `1,2,4,8,16`), OCIFS_BENCH_ONLY (comma-separated:
//! formats `estargz`, `gzip` (with a published index); paths `direct`, `cold` (cold and
//! warm), `unavailable`; each group defaults to all of it), OCIFS_BENCH_FLAGS (extra flags for
//! every mount), OCIFS_BENCH_KEEP_LOGS (a directory to copy the nodes' daemon logs and the cache's log into),
//! OCIFS_BENCH_ORIGIN (`token`, the default: the cache reaches the origin through a proxy
//! that asks for Bearer tokens, as public registries do, `harness::Proxy` on this side of the
//! link, so its challenges and tokens cost no round trip; `open`: no credentials asked, which
//! makes distribution ping the origin before each miss and store some blobs twice).
//! Needs root (namespaces, FUSE); never run by CI (`cargo bench` only).

#![allow(dead_code)]

#[path = "../../tests/it/builder.rs"]
mod builder;
mod caches;
#[path = "../common/mod.rs"]
mod common;
#[path = "../../tests/it/harness.rs"]
mod harness;
mod lan;
#[path = "../../tests/it/link.rs"]
mod link;
mod report;

use builder::{Enc, encode, push};
use caches::{PullThrough, Unavailable, blob_gets, log_mark};
use common::debian::{self, rootfs, try_run_app};
use common::{drop_caches, env_u64, extra_flags};
use harness::{Proxy, Registry, TempDir, ocifs, push_index};
use lan::Lan;
use link::PacketLink;
use ocifs::stats::MountStats;
use report::{Image, Row, UNAVAILABLE, cpu_ticks, other_load, print_table};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// The keys of `group` that OCIFS_BENCH_ONLY names, or all of them when it names none.
fn chosen<'a>(group: &[&'a str]) -> Vec<&'a str> {
    let only = std::env::var("OCIFS_BENCH_ONLY").unwrap_or_default();
    let named: Vec<&str> = only.split(',').map(str::trim).collect();
    let picked: Vec<&str> = group
        .iter()
        .copied()
        .filter(|k| named.contains(k))
        .collect();
    if picked.is_empty() {
        group.to_vec()
    } else {
        picked
    }
}

/// One node of a run: its mount and cache directories.
struct Node {
    mnt: TempDir,
    cache: TempDir,
}

/// How one node's start went: when its mount was ready and its workload done, or why not.
struct NodeEnd {
    ready: Option<Instant>,
    done: Instant,
    error: Option<String>,
}

/// One node: mount (in its namespace), then the workload.
fn run_node(lan: &Lan, i: usize, node: &Node, reference: &str, flags: &[String]) -> NodeEnd {
    let mut cmd = lan.command(i, Path::new(env!("CARGO_BIN_EXE_ocifs")));
    cmd.args(["mount", "--insecure", "--cache-dir"])
        .arg(node.cache.path())
        .args(["--verify", "off"])
        .args(flags)
        .arg(reference)
        .arg(node.mnt.path())
        .env("HOME", std::env::temp_dir())
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("DOCKER_CONFIG");
    let out = cmd.output().expect("nsenter ocifs mount");
    if !out.status.success() {
        return NodeEnd {
            ready: None,
            done: Instant::now(),
            error: Some(format!(
                "node {i}: mount: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        };
    }
    let ready = Some(Instant::now());
    let error = try_run_app(node.mnt.path())
        .err()
        .map(|e| format!("node {i}: {e}"));
    NodeEnd {
        ready,
        done: Instant::now(),
        error,
    }
}

/// What one run of N nodes came to.
struct Outcome {
    n: usize,
    /// From the common start until the last workload ended.
    all_done: Duration,
    /// The latest mount ready, from the start.
    slowest_ready: Duration,
    /// Bytes that crossed the link towards the root namespace (frames), until it was quiet.
    origin_bytes: u64,
    /// The origin's blob GETs: digest -> (GETs, bytes written).
    origin_gets: HashMap<String, (u64, u64)>,
    /// What the nodes received from mirrors, and from the origin directly.
    from_mirror: u64,
    from_origin: u64,
    /// Whole streams the nodes took from mirrors (a range answered with the whole blob).
    whole_streams: u64,
    /// Blobs the nodes waited for a mirror to store (it answered whole, then by range).
    waited_for_store: u64,
    /// Failed requests at mirrors (each followed by a fallback to the next host).
    mirror_failures: u64,
    /// The mirrors' last errors as the nodes saw them, each once.
    mirror_errors: Vec<String>,
    /// Failed mounts, failed workloads, and reads the mounts failed.
    errors: Vec<String>,
    /// Share of the machine's CPU time used at nice 0, niced, and stolen, during the run.
    cpu: (f64, f64, f64),
}

/// Copies node `i`'s daemon logs from `logs` into OCIFS_BENCH_KEEP_LOGS (if set), under
/// `run-K-node-I-NAME`, K counting runs.
fn keep_logs(logs: &Path, i: usize) {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Ok(keep) = std::env::var("OCIFS_BENCH_KEEP_LOGS") else {
        return;
    };
    if i == 0 {
        RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let run = RUN.load(std::sync::atomic::Ordering::Relaxed);
    let _ = std::fs::create_dir_all(&keep);
    for f in std::fs::read_dir(logs).into_iter().flatten().flatten() {
        let name = format!("run-{run}-node-{i}-{}", f.file_name().to_string_lossy());
        let _ = std::fs::copy(f.path(), Path::new(&keep).join(name));
    }
}

/// Waits until no byte has crossed the link for `quiet` (at most `limit`).
fn wait_quiet(link: &PacketLink, quiet: Duration, limit: Duration) {
    let start = (Instant::now(), link.rx_bytes());
    let deadline = start.0 + limit;
    let mut last = start.1;
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = link.rx_bytes();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    let (took, bytes) = (start.0.elapsed(), link.rx_bytes() - start.1);
    if took > Duration::from_secs(10) {
        progress(&format!(
            "the link was quiet only after {:.0} s ({bytes} bytes meanwhile{})",
            took.as_secs_f64(),
            if took >= limit {
                "; gave up waiting"
            } else {
                ""
            }
        ));
    }
}

/// N nodes start `reference` at once with `flags`; measured until the link is quiet again.
fn run_fleet(lan: &Lan, link: &PacketLink, reference: &str, n: usize, flags: &[String]) -> Outcome {
    let nodes: Vec<Node> = (0..n)
        .map(|_| Node {
            mnt: TempDir::new("fleet-mnt"),
            cache: TempDir::new("fleet-cache"),
        })
        .collect();
    drop_caches();
    let rx0 = link.rx_bytes();
    let log0 = log_mark(&link.log_path());
    let barrier = Arc::new(Barrier::new(n + 1));
    let cpu0 = cpu_ticks();
    let (start, ends) = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let barrier = barrier.clone();
                s.spawn(move || {
                    barrier.wait();
                    run_node(lan, i, node, reference, flags)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let ends: Vec<NodeEnd> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (start, ends)
    });
    let cpu1 = cpu_ticks();
    let all_done = ends.iter().map(|e| e.done - start).max().unwrap();
    let slowest_ready = ends
        .iter()
        .filter_map(|e| e.ready.map(|r| r - start))
        .max()
        .unwrap_or_default();
    let mut errors: Vec<String> = ends.iter().filter_map(|e| e.error.clone()).collect();
    // Whatever the run set going (a cache storing a blob, a node's stream finishing) ends
    // before the counters are read.
    wait_quiet(link, Duration::from_millis(1500), Duration::from_secs(180));
    let mut out = Outcome {
        n,
        all_done,
        slowest_ready,
        origin_bytes: link.rx_bytes() - rx0,
        origin_gets: blob_gets(&link.log_path(), log0),
        from_mirror: 0,
        from_origin: 0,
        whole_streams: 0,
        waited_for_store: 0,
        mirror_failures: 0,
        mirror_errors: Vec::new(),
        errors: Vec::new(),
        cpu: (0.0, 0.0, 0.0),
    };
    let all = (cpu1.3 - cpu0.3).max(1) as f64;
    out.cpu = (
        (cpu1.0 - cpu0.0) as f64 / all,
        (cpu1.1 - cpu0.1) as f64 / all,
        (cpu1.2 - cpu0.2) as f64 / all,
    );
    for (i, (node, end)) in nodes.iter().zip(&ends).enumerate() {
        if end.ready.is_none() {
            continue;
        }
        let mp = node.mnt.path().to_str().unwrap();
        let (ok, json, err) = ocifs(&["stats", "--json", mp], &[]);
        if !ok {
            errors.push(format!("node {i}: stats: {}", err.trim()));
        } else {
            let v: MountStats = serde_json::from_slice(&json).unwrap();
            for h in &v.hosts {
                if h.role == "mirror" {
                    out.from_mirror += h.bytes;
                    out.mirror_failures += h.failures;
                    if let Some(e) = &h.last_error
                        && !out.mirror_errors.contains(e)
                    {
                        out.mirror_errors.push(e.clone());
                    }
                    out.whole_streams += h.whole_streams;
                    out.waited_for_store += h.waited_for_store;
                } else {
                    out.from_origin += h.bytes;
                }
            }
            if v.reads.errors > 0 {
                errors.push(format!("node {i}: {} reads failed", v.reads.errors));
            }
        }
        let _ = ocifs(&["umount", mp], &[]);
        keep_logs(&node.cache.path().join("logs"), i);
    }
    out.errors = errors;
    out
}

/// A hosts directory under `work` sending pulls from `registry` to `mirror` (a URL) first.
fn hosts_dir(work: &Path, registry: &str, mirror: &str) -> String {
    let (host, port) = registry.rsplit_once(':').unwrap();
    let root = work.join(format!(
        "certs.d-{}",
        mirror.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    ));
    let dir = root.join(format!("{host}_{port}_"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!("[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )
    .unwrap();
    root.to_str().unwrap().to_string()
}

/// A progress line on standard error, with the time since the benchmark started.
fn progress(what: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed();
    eprintln!("fleet: [{:.0} s] {what}", t.as_secs_f64());
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut tools = vec!["docker-registry", "skopeo", "nsenter", "chroot"];
    let link_tools = link::link_tools();
    tools.extend(link_tools.iter().map(String::as_str));
    assert!(
        harness::require(&tools, true),
        "the fleet benchmark needs {tools:?}"
    );
    let rtt = Duration::from_millis(env_u64("OCIFS_BENCH_RTT_MS", 40));
    let rate = env_u64("OCIFS_BENCH_MBIT", 200) * 1_000_000 / 8;
    let counts: Vec<usize> = std::env::var("OCIFS_BENCH_FLEET")
        .unwrap_or_else(|_| "1,2,4,8,16".into())
        .split(',')
        .map(|n| n.trim().parse().expect("OCIFS_BENCH_FLEET: node counts"))
        .collect();
    let formats = chosen(&["estargz", "gzip"]);
    let paths = chosen(&["direct", "cold", "unavailable"]);
    let flags = extra_flags();
    progress("building the images");

    // The images, at the origin.
    let root = rootfs();
    let tars = debian::layers(&root, true);
    let origin_auth = match std::env::var("OCIFS_BENCH_ORIGIN").as_deref() {
        Ok("open") => false,
        Ok("token") | Err(_) => true,
        Ok(other) => panic!("OCIFS_BENCH_ORIGIN: {other:?} is neither `token` nor `open`"),
    };
    let reg = Registry::start(None);
    let work = TempDir::new("fleet");
    let mut images = Vec::new();
    for key in formats {
        let (enc, repo, label) = match key {
            "estargz" => (Enc::Estargz, "real/estargz", "eStargz"),
            _ => (Enc::Gzip, "real/gzip", "gzip with a published index"),
        };
        let encoded: Vec<_> = tars.iter().cloned().map(|t| encode(t, enc)).collect();
        let dir = builder::layout_with_command(
            &work.path().join(key),
            "v1",
            &[("linux", "amd64", None, &encoded)],
            &["python3", "/app/main.py"],
        );
        push(&dir, "v1", &reg.addr, repo, None);
        if key == "gzip" {
            push_index(&format!("{}/{repo}:v1", reg.addr), &[]);
        }
        let mut layers: Vec<(String, usize)> = encoded
            .iter()
            .map(|l| (ocifs::digest::sha256(&l.blob), l.blob.len()))
            .collect();
        layers.sort_by_key(|l| std::cmp::Reverse(l.1));
        images.push((key, label, repo, layers));
    }

    progress("images pushed");
    let max = counts.iter().copied().max().unwrap_or(1);
    let link = PacketLink::start(&reg, rtt, rate);
    let lan = Lan::start(max);
    link.route_from(&lan.cidr);
    // With a link (of no delay and no rate limit) the proxy streams bodies as they come
    // instead of reading them whole first, so a cache hanging up stops the origin's send.
    let unlimited = Some((Duration::ZERO, 1 << 40));
    let tokens =
        origin_auth.then(|| Proxy::with_link(&link.addr, Some(("fleet", "fleet")), unlimited));
    println!(
        "\n### Fleets through a pull-through cache: {} nodes, each in its own network namespace; origin behind a packet-level link of {} ms RTT, {} Mbit/s",
        counts
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        rtt.as_millis(),
        rate * 8 / 1_000_000
    );
    println!(
        "\nThe origin {}.",
        match origin_auth {
            true =>
                "asks the cache for Bearer tokens (through `harness::Proxy`; OCIFS_BENCH_ORIGIN=token)",
            false => "asks for no credentials (OCIFS_BENCH_ORIGIN=open)",
        }
    );
    println!("\nAt the start: {}.", other_load());

    let mut port = 5000;
    for (key, label, repo, layers) in images {
        let image = Image {
            key,
            label,
            reference: format!("{}/{repo}:v1", link.addr),
            layers,
        };
        let digests: Vec<String> = image.layers.iter().map(|l| l.0.clone()).collect();
        let mut rows = Vec::new();
        let none = ["--hosts-dir", "none", "--registries-conf", "none"].map(String::from);
        let with = |hosts: &str| -> Vec<String> {
            let mut f = vec![
                "--hosts-dir".to_string(),
                hosts.to_string(),
                "--registries-conf".into(),
                "none".into(),
            ];
            f.extend(flags.iter().cloned());
            f
        };
        let run = |path: &'static str, n: usize, f: &[String], note: &dyn Fn() -> String| {
            let out = run_fleet(&lan, &link, &image.reference, n, f);
            progress(&format!(
                "{key} {path} N={n}: {:.2} s {} {}",
                out.all_done.as_secs_f64(),
                note(),
                out.mirror_errors.join(" | ")
            ));
            let mut note = note();
            if !out.mirror_errors.is_empty() {
                if !note.is_empty() {
                    note += "; ";
                }
                note += &format!(
                    "the mirror's last errors: {}",
                    out.mirror_errors.join(" | ")
                );
            }
            Row { path, out, note }
        };
        let nothing = || String::new();
        if paths.contains(&"direct") {
            let mut f = none.to_vec();
            f.extend(flags.iter().cloned());
            for &n in &counts {
                rows.push(run("direct", n, &f, &nothing));
            }
        }
        if paths.contains(&"cold") {
            let mut warm = Vec::new();
            for &n in &counts {
                port += 1;
                let cache = PullThrough::start(
                    &format!("{}:{port}", lan.gateway),
                    tokens.as_ref().map_or(&link.addr, |t| &t.addr),
                    tokens.as_ref().map(|_| ("fleet", "fleet")),
                );
                let hosts = hosts_dir(work.path(), &link.addr, &format!("http://{}", cache.addr));
                let f = with(&hosts);
                rows.push(run("cache, cold", n, &f, &nothing));
                if !cache.wait_stored(&digests, Duration::from_secs(60)) {
                    progress("the cache has not stored every layer after 60 s");
                }
                warm.push(run("cache, warm", n, &f, &nothing));
            }
            rows.extend(warm);
        }
        if paths.contains(&"unavailable") {
            port += 1;
            let mirror = Unavailable::start(&format!("{}:{port}", lan.gateway));
            let hosts = hosts_dir(work.path(), &link.addr, &format!("http://{}", mirror.addr));
            let asked = || {
                let n = mirror.requests.load(std::sync::atomic::Ordering::SeqCst);
                format!("{n} requests to the mirror")
            };
            rows.push(run(UNAVAILABLE, 1, &with(&hosts), &asked));
        }
        print_table(&image, &rows);
    }
    println!("\nAt the end: {}.", other_load());
}

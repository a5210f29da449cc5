//! Reads under a hostile network: one mount, every fault kind of [`Fault`] in turn (plus a
//! fault that lasts, and the registry killed and restarted), each on files not read before,
//! of an eStargz layer (chunk digests) and a gzip layer (span digests). For each: no wrong
//! byte, no read past its deadline (a generous bound: three times `--read-timeout`), the
//! daemon up, and the file read right once the fault has cleared, without a remount. The
//! time each read took is printed (docs/RELIABILITY.md quotes them).

use crate::builder::{self, Enc, Item, encode, file, noise};
use crate::faults::{Fault, FaultProxy};
use crate::harness::{self, Env, Mount, Proxy, TempDir};
use crate::stats::stats;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Files per layer. Each fault case reads a new one of each layer, an even one among the
/// first `2 * USED`: what a read fetches past its file (the rest of a span, of a block) never
/// reaches the next even file, and the last files lie in the tail a mount reads for the
/// eStargz TOC.
const FILES: u64 = 42;
/// Fault cases at most (a prime, so that steps of 7 visit them all).
const USED: u64 = 19;
/// Bytes per file.
const LEN: usize = 200_000;
/// `--read-timeout` of the mount.
const READ_TIMEOUT: Duration = Duration::from_secs(4);

/// What a read under a fault may do.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Read right (the fault is retried, resumed or healed within the read).
    Right,
    /// Read right, or fail with EIO (never a wrong byte).
    RightOrEio,
    /// Fail with EIO at its deadline (the fault outlasts it).
    Eio,
}

/// A fault case: its name, the fault and for how many blob requests, what a read may do.
type Case = (&'static str, Option<(Fault, u32)>, Expect);

/// The contents of file `i` of layer `layer` ("e" or "g").
fn content(layer: &str, i: u64) -> Vec<u8> {
    noise(LEN, if layer == "e" { 100 + i } else { 300 + i })
}

fn layer(name: &'static str) -> Vec<u8> {
    let mut items = vec![Item::Dir(name, 0o755)];
    for i in 0..FILES {
        items.push(file(&format!("{name}/f{i:02}"), content(name, i)));
    }
    builder::tar(&items)
}

/// Reads `path` on a thread of its own; panics if no answer comes within `bound` (a hung
/// read must fail the test, not hang it).
fn timed_read(path: &Path, bound: Duration) -> (std::io::Result<Vec<u8>>, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(p));
    });
    let got = rx
        .recv_timeout(bound)
        .unwrap_or_else(|_| panic!("read of {} not answered within {bound:?}", path.display()));
    (got, start.elapsed())
}

/// The mount's daemon log (in its cache directory).
fn daemon_log(cache: &Path) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(cache.join("logs")).unwrap().flatten() {
        all += &std::fs::read_to_string(e.path()).unwrap_or_default();
    }
    all
}

#[test]
fn every_fault_kind_is_survived_without_a_wrong_byte_or_a_remount() {
    let Some(Env { mut reg, work }) = Env::new("hostile") else {
        return;
    };
    let layers = vec![
        encode(layer("e"), Enc::Estargz),
        encode(layer("g"), Enc::Gzip),
    ];
    builder::push_one(work.path(), &layers, &reg.addr, "hostile/image");
    // Registry <- token server <- fault proxy <- ocifs: a 401 mid-mount then has a realm.
    let tokens = Proxy::start(&reg.addr, Some(("alice", "pw")));
    let proxy = FaultProxy::start(&tokens.addr);
    let config = work.path().join("config.json");
    harness::write_docker_config(&config, &proxy.addr, "alice:pw");
    let env = [("REGISTRY_AUTH_FILE", config.to_str().unwrap())];
    let timeout = format!("{}s", READ_TIMEOUT.as_secs());
    // No background work that would take the faults meant for the reads; a miss fetches
    // its own blocks only.
    let flags = [
        "--verify",
        "off",
        "--no-prefetch",
        "--no-whole-files",
        "--no-local-copy",
        "--fetch-size",
        "64KiB",
        "--span",
        "64KiB",
        "--read-timeout",
        &timeout,
        "--idle-timeout",
        "1s",
        "--min-rate",
        "8KiB",
    ];
    let reference = format!("{}/hostile/image:v1", proxy.addr);
    // The first mount builds the gzip layer's index (reading the layer whole, into its
    // cache directory's blocks); the mount under test starts from that index alone, so
    // that its reads fetch.
    let first = TempDir::new("hostile-first");
    let with = |dir: &TempDir| {
        let cd = dir.path().to_str().unwrap().to_string();
        [&["--cache-dir", cd.as_str()][..], &flags[..]]
            .concat()
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    let args = with(&first);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    drop(Mount::new(&reference, &args, &env));
    let cache = TempDir::new("hostile-cache");
    let indexes = cache.path().join("indexes");
    std::fs::create_dir_all(&indexes).unwrap();
    for e in std::fs::read_dir(first.path().join("indexes"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), indexes.join(e.file_name())).unwrap();
    }
    let args = with(&cache);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let m = Mount::new(&reference, &args, &env);
    let challenge = format!(
        "Bearer realm=\"http://{}/token\",service=\"test\",scope=\"repository:x:pull\"",
        tokens.addr
    );
    let cases: Vec<Case> = vec![
        ("clean", None, Expect::Right),
        (
            "reset before headers",
            Some((Fault::ResetBeforeHeaders, 1)),
            Expect::Right,
        ),
        (
            "reset mid-body",
            Some((Fault::ResetMidBody, 1)),
            Expect::Right,
        ),
        ("body cut short", Some((Fault::CutShort, 1)), Expect::Right),
        (
            "no headers (stall)",
            Some((Fault::StallBeforeHeaders, 1)),
            Expect::Right,
        ),
        ("stall mid-body", Some((Fault::Stall, 1)), Expect::Right),
        (
            "trickle 1 KiB/s",
            Some((Fault::Trickle(1024), 1)),
            Expect::Right,
        ),
        ("503", Some((Fault::Status(503), 2)), Expect::Right),
        ("500", Some((Fault::Status(500), 1)), Expect::Right),
        (
            "429 Retry-After: 1",
            Some((Fault::TooMany { retry_after: 1 }, 1)),
            Expect::Right,
        ),
        (
            "shifted Content-Range",
            Some((Fault::ShiftedRange, 1)),
            Expect::Right,
        ),
        (
            "lying Content-Range",
            Some((Fault::LyingRange, 1)),
            Expect::Right,
        ),
        (
            "200 to a Range request",
            Some((Fault::IgnoreRange, 1)),
            Expect::Right,
        ),
        ("flipped byte", Some((Fault::FlipByte, 1)), Expect::Right),
        (
            "401 mid-mount",
            Some((Fault::Unauthorized(challenge), 1)),
            Expect::Right,
        ),
        (
            "redirect loop",
            Some((Fault::RedirectLoop, 1)),
            Expect::RightOrEio,
        ),
        (
            "stall that lasts",
            Some((Fault::Stall, 10_000)),
            Expect::Eio,
        ),
        (
            "503 that lasts",
            Some((Fault::Status(503), 10_000)),
            Expect::Eio,
        ),
        ("registry killed", None, Expect::RightOrEio),
    ];
    assert!(cases.len() as u64 <= USED);
    let bound = READ_TIMEOUT * 3;
    for (case, (name, fault, expect)) in cases.iter().enumerate() {
        // Files in an order that never reads two neighbours in a row: a streak of
        // sequential reads would start read-ahead, which would meet the faults first.
        let i = 2 * (case as u64 * 7 % USED);
        for layer in ["e", "g"] {
            let path: PathBuf = m.path().join(format!("{layer}/f{i:02}"));
            let want = content(layer, i);
            if let Some((f, n)) = fault {
                proxy.inject(f.clone(), *n);
            }
            if *name == "registry killed" {
                reg.kill();
            }
            let faulted = proxy.faulted();
            let (got, took) = timed_read(&path, bound);
            let outcome = match &got {
                Ok(data) => {
                    assert!(*data == want, "{name} ({layer}): a wrong byte was served");
                    "right".to_string()
                }
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name} ({layer}): {e}");
                    "EIO".to_string()
                }
            };
            eprintln!("fault {name:24} layer {layer}: {outcome} in {took:.2?}");
            match expect {
                Expect::Right => assert_eq!(outcome, "right", "{name} ({layer})"),
                Expect::Eio => assert_eq!(outcome, "EIO", "{name} ({layer})"),
                Expect::RightOrEio => {}
            }
            if fault.is_some() && proxy.faulted() == faulted {
                let log = daemon_log(cache.path());
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "{name} ({layer}): the fault was not met; log:\n{}",
                    tail.join("\n")
                );
            }
            // The fault clears: the same file reads right, on the same mount (after a
            // fault that lasted, a fetch may still be waiting out its backoff: a read or
            // two may fail before).
            proxy.clear();
            if *name == "registry killed" {
                reg.restart();
            }
            let tries = if *expect == Expect::Right { 1 } else { 3 };
            let mut right = false;
            for _ in 0..tries {
                let (again, took) = timed_read(&path, bound);
                match again {
                    Ok(data) => {
                        assert!(
                            data == want,
                            "{name} ({layer}) after: a wrong byte was served"
                        );
                        eprintln!("  cleared: right in {took:.2?}");
                        right = true;
                        break;
                    }
                    Err(e) => eprintln!("  cleared: {e} in {took:.2?}"),
                }
            }
            assert!(
                right,
                "{name} ({layer}): not read right once the fault cleared"
            );
        }
    }
    // A read that failed at its deadline said why in the daemon's log.
    let log = daemon_log(cache.path());
    assert!(
        log.contains("--read-timeout"),
        "no log line for a timed-out read"
    );
    // The daemon is up and every file reads right.
    let v = stats(m.path());
    assert!(v.reads.errors > 0, "{v:?}");
    for layer in ["e", "g"] {
        for i in 0..FILES {
            let got = std::fs::read(m.path().join(format!("{layer}/f{i:02}"))).unwrap();
            assert!(got == content(layer, i), "{layer}/f{i:02}");
        }
    }
}

//! The packet-level link of the benchmarks (`link.rs`): images read through it are right,
//! its counters see the traffic, and it leaves nothing behind, also when a panic unwinds
//! through it or its process was killed.

use crate::builder::{self, Enc, encode, file, layout, noise, push};
use crate::harness::{Env, Mount, require};
use crate::link::{PacketLink, link_tools, probe, sweep_stale};
use std::process::Command;
use std::time::Duration;

/// Whether this machine can build a link (root, the tools, the delay program); panics
/// under CI when it cannot.
fn can_link() -> bool {
    let tools = link_tools();
    let tools: Vec<&str> = tools.iter().map(String::as_str).collect();
    require(&tools, true)
}

fn namespaces() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn links() -> String {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The tests here look for this process's namespaces, so they run one at a time: another's
/// link would be taken for one left behind.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn mine() -> String {
    format!("ocifs-link-{}-", std::process::id())
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_mount_through_the_packet_link_reads_right_and_the_link_leaves_nothing_behind() {
    if !can_link() {
        return;
    }
    let _one = one_at_a_time();
    let Some(Env { reg, work }) = Env::new("plink") else {
        return;
    };
    let big = noise(3 << 20, 11);
    let layers = vec![encode(
        builder::tar(&[file("small.txt", "over the link\n"), file("big.bin", big)]),
        Enc::Estargz,
    )];
    let digest = ocifs::digest::sha256(&layers[0].blob);
    let size = layers[0].blob.len() as u64;
    let dir = layout(work.path(), "v1", &[("linux", "amd64", None, &layers)]);
    push(&dir, "v1", &reg.addr, "plink/image", None);

    let link = PacketLink::start(&reg, Duration::from_millis(10), 100 << 20);
    assert!(namespaces().contains(&mine()));
    let pids: Vec<u32> = link.pids();
    assert_eq!(pids.len(), 2, "the delay program and the registry");
    let before = link.rx_bytes();
    let mark = link.log_mark();
    {
        let m = Mount::new(
            &format!("{}/plink/image:v1", link.addr),
            &["--insecure", "--verify", "off"],
            &[],
        );
        assert_eq!(
            std::fs::read_to_string(m.path().join("small.txt")).unwrap(),
            "over the link\n"
        );
        assert_eq!(
            builder::sha(&std::fs::read(m.path().join("big.bin")).unwrap()),
            builder::sha(&noise(3 << 20, 11))
        );
    }
    // The big file crossed the link, and the registry behind it logged the requests.
    assert!(link.rx_bytes() - before > 3 << 20);
    let (requests, blob_bytes) = link.requests_since(mark);
    assert!(requests >= 3 && blob_bytes > 0, "{requests} {blob_bytes}");
    // The probe runs against it (its figures are timings: printed, not asserted).
    let p = probe(&link.addr, "plink/image", &digest, size);
    assert!(p.large.0 > 0 && p.range_idle.is_some(), "{p}");
    eprintln!("probe: {p}; the server's {}", link.server_tcp());

    drop(link);
    assert!(!namespaces().contains(&mine()), "{}", namespaces());
    assert!(
        !links().contains(&format!("ocl{}-", std::process::id())),
        "{}",
        links()
    );
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the link");
    }
}

#[test]
fn a_panic_while_the_link_is_up_still_tears_it_down() {
    if !can_link() {
        return;
    }
    let _one = one_at_a_time();
    let Some(Env { reg, .. }) = Env::without_fuse("plink-panic") else {
        return;
    };
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let link = PacketLink::start(&reg, Duration::from_millis(2), 10 << 20);
        let pids = link.pids();
        assert!(namespaces().contains(&mine()));
        panic_with(pids);
    }));
    let pids = *caught
        .expect_err("the closure panics")
        .downcast::<Vec<u32>>()
        .unwrap();
    assert!(!namespaces().contains(&mine()), "{}", namespaces());
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the link");
    }
}

fn panic_with(pids: Vec<u32>) -> ! {
    std::panic::panic_any(pids)
}

#[test]
fn namespaces_of_a_killed_benchmark_are_swept() {
    if !can_link() {
        return;
    }
    let _one = one_at_a_time();
    // A namespace as a link of a process that no longer exists would have left it, with a
    // process in it. Another test's link may sweep it first, even before the process is in
    // it: then try again.
    let mut dead = 4_000_000;
    while alive(dead) {
        dead += 1;
    }
    let (ns, mut sleeper) = (0..5)
        .find_map(|attempt| {
            let ns = format!("ocifs-link-{dead}-{attempt}-r");
            let ok = Command::new("ip").args(["netns", "add", &ns]).status();
            assert!(ok.unwrap().success());
            let mut sleeper = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{ns}"))
                .args(["sleep", "600"])
                .spawn()
                .unwrap();
            for _ in 0..100 {
                let pids = Command::new("ip").args(["netns", "pids", &ns]).output();
                let pids = String::from_utf8_lossy(&pids.unwrap().stdout).into_owned();
                if pids
                    .split_whitespace()
                    .any(|p| p == sleeper.id().to_string())
                {
                    return Some((ns, sleeper));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = sleeper.kill();
            let _ = sleeper.wait();
            None
        })
        .expect("a process in a namespace of our making");
    sweep_stale();
    assert!(!namespaces().contains(&ns), "{}", namespaces());
    // The sweep killed what ran in it.
    let mut exited = None;
    for _ in 0..250 {
        exited = sleeper.try_wait().unwrap();
        if exited.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if exited.is_none() {
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        panic!("the process in the stale namespace was left running");
    }
}

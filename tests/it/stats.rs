//! Reading a mount's `ocifs stats --json` (an [`ocifs::stats::MountStats`]) while its
//! background work settles.

use crate::harness::{Mount, ocifs};
use ocifs::stats::MountStats;

/// One reading of `ocifs stats --json`.
pub fn stats(mountpoint: &std::path::Path) -> MountStats {
    let (ok, out, err) = ocifs(&["stats", "--json", mountpoint.to_str().unwrap()], &[]);
    assert!(ok, "stats: {err}");
    serde_json::from_slice(&out).unwrap()
}

/// Polls `ocifs stats --json` (for up to 10 s) until `done` says so; returns the last answer.
pub fn poll_stats(mountpoint: &std::path::Path, done: impl Fn(&MountStats) -> bool) -> MountStats {
    poll(|| stats(mountpoint), done)
}

/// Asks `get` (for up to 10 s) until `done` says so; returns the last answer.
pub fn poll<T>(get: impl Fn() -> T, done: impl Fn(&T) -> bool) -> T {
    let mut v = get();
    for _ in 1..200 {
        if done(&v) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        v = get();
    }
    v
}

/// Each layer's verification state from `ocifs stats` once none is pending (up to 20 s).
pub fn wait_for_verification(m: &Mount, layers: usize) -> Vec<String> {
    for _ in 0..400 {
        let v = stats(m.path());
        let states: Vec<String> = (0..layers)
            .map(|i| {
                v.layers
                    .get(i)
                    .map(|l| l.verification.clone())
                    .unwrap_or_default()
            })
            .collect();
        if states.iter().all(|s| s != "pending") {
            return states;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("verification still pending after 20 s");
}

//! Reading a mount's `ocifs stats --json` while its background work settles.

use crate::harness::{Mount, ocifs};

/// Polls `ocifs stats --json` (for up to 10 s) until `done` says so; returns the last answer.
pub fn poll_stats(
    mountpoint: &std::path::Path,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut v = serde_json::Value::Null;
    for _ in 0..200 {
        let (ok, out, err) = ocifs(&["stats", "--json", mountpoint.to_str().unwrap()], &[]);
        assert!(ok, "stats: {err}");
        v = serde_json::from_slice(&out).unwrap();
        if done(&v) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    v
}

/// Each layer's verification state from `ocifs stats` once none is pending (up to 20 s).
pub fn wait_for_verification(m: &Mount, layers: usize) -> Vec<String> {
    for _ in 0..400 {
        let (ok, out, _) = ocifs(&["stats", "--json", m.path().to_str().unwrap()], &[]);
        assert!(ok);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let states: Vec<String> = (0..layers)
            .map(|i| {
                v["layers"][i]["verification"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        if states.iter().all(|s| s != "pending") {
            return states;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("verification still pending after 20 s");
}

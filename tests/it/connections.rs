//! Connections: a mount opens a few to the registry while its manifest is on its way
//! (`Registry::warm`), so the requests that follow it find them open.

use crate::builder::{self, Enc, encode, file, layout, noise, push};
use crate::harness::{Env, Mount, Proxy};
use ocifs::registry::WARM_CONNECTIONS;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The `GET /v2/`s a mount of a local registry opens connections with: one connection of
/// the `WARM_CONNECTIONS` is the TLS question's, which asks for the manifest itself.
pub const WARM_PINGS: u64 = WARM_CONNECTIONS as u64 - 1;

/// Waits (up to 10 s) until the proxy has seen the `GET /v2/`s that open connections ahead;
/// returns how many (they are sent in the background as a mount starts).
pub fn all_warm(proxy: &Proxy) -> u64 {
    for _ in 0..500 {
        if proxy.pings.load(Ordering::SeqCst) >= WARM_PINGS {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.pings.load(Ordering::SeqCst)
}

#[test]
fn a_mount_opens_connections_while_its_manifest_is_fetched() {
    let Some(Env { reg, work }) = Env::new("warm") else {
        return;
    };
    let layers = vec![encode(
        builder::tar(&[file("a.txt", "warm\n"), file("b.bin", noise(1 << 20, 3))]),
        Enc::Estargz,
    )];
    let dir = layout(work.path(), "v1", &[("linux", "amd64", None, &layers)]);
    push(&dir, "v1", &reg.addr, "warm/image", None);
    // An emulated round trip per request: the manifest's answer comes well after the
    // connections have been asked for.
    let proxy = Proxy::with_link(
        &reg.addr,
        None,
        Some((Duration::from_millis(20), 100 << 20)),
    );
    let m = Mount::new(
        &format!("{}/warm/image:v1", proxy.addr),
        &["--verify", "off"],
        &[],
    );
    // Beside the command's own check of whether the registry speaks TLS (the manifest's GET).
    let pings = all_warm(&proxy);
    assert!(pings >= WARM_PINGS, "{pings} pings: {}", m.ready);
    assert_eq!(
        std::fs::read_to_string(m.path().join("a.txt")).unwrap(),
        "warm\n"
    );
}

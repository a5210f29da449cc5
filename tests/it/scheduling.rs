//! Speculation scheduled against the link: what a plan brings for several layers shares the
//! link at once rather than one layer after another.

use crate::builder::{self, Enc, Item, file, layout, noise, push};
use crate::harness::{Env, Mount, Proxy};
use crate::stats::poll_stats;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[test]
fn the_prioritized_files_of_every_layer_are_fetched_at_once() {
    let Some(Env { reg, work }) = Env::new("sched") else {
        return;
    };
    // Two layers with 2 MiB of prioritized files each, over a link slow enough (4 MB/s) that
    // a layer's prefetch lasts half a second: one after the other, never two at once.
    let layer = |name: &'static str, seed: u64| {
        let tar = builder::tar(&[
            Item::Dir(name, 0o755),
            file(&format!("{name}/first.bin"), noise(2 << 20, seed)),
            file(&format!("{name}/later.bin"), noise(1 << 20, seed + 1)),
        ]);
        builder::encode_prioritized(tar, Enc::Estargz, &[&format!("{name}/first.bin")])
    };
    let layers = vec![layer("a", 1), layer("b", 3)];
    let dir = layout(work.path(), "v1", &[("linux", "amd64", None, &layers)]);
    push(&dir, "v1", &reg.addr, "sched/image", None);
    let proxy = Proxy::with_link(&reg.addr, None, Some((Duration::from_millis(20), 4 << 20)));
    let m = Mount::new(
        &format!("{}/sched/image:v1", proxy.addr),
        &["--verify", "off"],
        &[],
    );
    // Counting from the mount being ready (its tail reads are over).
    proxy.reset();
    let done = poll_stats(m.path(), |v| {
        v.prefetch.total_bytes > 0 && v.prefetch.done_bytes >= v.prefetch.total_bytes
    });
    assert!(done.prefetch.done_bytes >= 4 << 20, "{done:?}");
    assert_eq!(
        proxy.blob_in_flight_max.load(Ordering::SeqCst),
        2,
        "both layers' prioritized files under way at once"
    );
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("b/first.bin")).unwrap()),
        builder::sha(&noise(2 << 20, 3))
    );
}

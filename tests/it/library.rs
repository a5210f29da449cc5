//! The library entry point drives a mount in process, as the CLI does (`ocifs::daemon::open`,
//! `start`, `Mount::run`): the mounted tree equals the oracle, the typed statistics count the
//! reads, and the shutdown future unmounts.

use crate::builder::{Enc, encode, layout};
use crate::conformance::expected_tree;
use crate::fixtures::base_layers;
use crate::harness::Env;
use crate::oracle;
use ocifs::config::{OpenConfig, Platform, VerifyMode};
use ocifs::daemon::MountOptions;
use ocifs::image::Source;
use ocifs::speculate::SpeculateConfig;
use std::sync::Arc;

#[test]
fn the_library_mounts_serves_and_unmounts_an_image() {
    let Some(env) = Env::new("library") else {
        return;
    };
    let layers: Vec<_> = base_layers()
        .into_iter()
        .zip([Enc::Estargz, Enc::Gzip])
        .map(|(t, e)| encode(t, e))
        .collect();
    let work = env.work.path();
    let dir = layout(
        &work.join("layout"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    let (_, expected) = expected_tree(&env.work, &layers);
    let mountpoint = work.join("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let cfg = OpenConfig {
        platform: Platform::parse("linux/amd64").unwrap(),
        cache_size: 64 << 20,
        block_size: 64 << 10,
        fetch_size: 2 << 20,
        disk_cache_size: 1 << 30,
        cache_dir: work.join("cache"),
        verify: VerifyMode::Background,
        span: 4 << 20,
        mark_windows: true,
        read_timeout: std::time::Duration::from_secs(30),
        copy_first_pass: true,
        fetch_announced_front: true,
        fetch_small_layers: 16 << 20,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (actual, stats) = rt.block_on(async {
        let source = Source::Layout { dir };
        let spec = SpeculateConfig::default();
        let progress = Arc::new(|_: &str, _: u64, _: u64| {});
        let served = ocifs::daemon::open(&source, "v1", &cfg, spec, None, false, progress)
            .await
            .expect("opening the layout");
        let opts = MountOptions {
            mountpoint: mountpoint.clone(),
            fsname: "ocifs:library-test".into(),
            control: None,
            local_copies: None,
        };
        let mount = ocifs::daemon::start(served, cfg.verify, opts)
            .await
            .expect("mounting");
        let served = mount.served().clone();
        // The walk runs beside the mount; its end (or its failure) is the shutdown signal.
        let (done, walked) = tokio::sync::oneshot::channel();
        let root = mountpoint.clone();
        tokio::task::spawn_blocking(move || {
            let _ = done.send(oracle::snapshot(&root));
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            let _ = tx.send(walked.await);
        };
        mount.run(shutdown).await.expect("serving until shut down");
        let actual = rx.await.unwrap().expect("the walk of the mount failed");
        (actual, served.stats())
    });
    oracle::assert_same(&expected, &actual);
    assert!(stats.reads.count > 0, "{stats:?}");
    assert_eq!(stats.layers.len(), 2, "{stats:?}");
    assert_eq!(stats.layers[0].format, "estargz", "{stats:?}");
    let left: Vec<_> = std::fs::read_dir(&mountpoint).unwrap().collect();
    assert!(left.is_empty(), "the shutdown future unmounts: {left:?}");
}

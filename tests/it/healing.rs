//! Self-healing: bytes that arrived damaged, or were damaged on disk, are dropped and fetched
//! again instead of failing every later read, and a remount with the same cache directory
//! after a fault works, `--verify strict` included.

use crate::builder::{self, Enc, encode, file, noise};
use crate::faults::{Fault, FaultProxy};
use crate::harness::{Env, Mount, Proxy, TempDir};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The block files of the cache directory `cache` (`blocks/<blob>/<size>-<index>`).
fn block_files(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for blob in std::fs::read_dir(cache.join("blocks"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for f in std::fs::read_dir(blob.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if !f.file_name().to_string_lossy().contains(".tmp") {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

fn log_of(cache: &Path) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(cache.join("logs")).unwrap().flatten() {
        all += &std::fs::read_to_string(e.path()).unwrap_or_default();
    }
    all
}

#[test]
fn a_block_damaged_on_disk_is_dropped_and_fetched_again() {
    let Some(Env { reg, work }) = Env::new("disk-flip") else {
        return;
    };
    // A plain tar layer: nothing but the cache's checksum stands between a damaged block
    // and the reader.
    let data = noise(1 << 20, 7);
    let layers = vec![encode(
        builder::tar(&[file("data", data.clone())]),
        Enc::Tar,
    )];
    builder::push_one(work.path(), &layers, &reg.addr, "heal/disk");
    let proxy = Proxy::start(&reg.addr, None);
    let cache = TempDir::new("disk-flip-cache");
    let cd = cache.path().to_str().unwrap();
    let reference = format!("{}/heal/disk:v1", proxy.addr);
    let flags = ["--cache-dir", cd, "--verify", "off", "--no-local-copy"];
    let m = Mount::new(&reference, &flags, &[]);
    assert!(std::fs::read(m.path().join("data")).unwrap() == data);
    drop(m);
    // Every block of the 1 MiB file (and the tar around it) is on disk.
    let mut blocks = block_files(cache.path());
    for _ in 0..100 {
        if blocks.len() >= 17 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        blocks = block_files(cache.path());
    }
    assert!(blocks.len() >= 17, "{blocks:?}");
    // Flip a byte in the middle of the file's data, as a disk or an editor might.
    let victim = blocks
        .iter()
        .find(|p| p.ends_with("65536-8"))
        .unwrap()
        .clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[1000] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();

    proxy.reset();
    let m = Mount::new(&reference, &flags, &[]);
    assert!(
        std::fs::read(m.path().join("data")).unwrap() == data,
        "a damaged block was served"
    );
    assert!(
        proxy.blob_requests.load(Ordering::SeqCst) >= 1,
        "the damaged block was fetched again"
    );
    drop(m);
    assert!(log_of(cache.path()).contains("does not match its checksum"));
    // The block on disk is whole again (written back from the fresh fetch).
    let mut healed = false;
    for _ in 0..100 {
        if std::fs::read(&victim).is_ok_and(|b| b != bytes) {
            healed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(healed, "the block file was not written again");
}

#[test]
fn a_damaged_response_heals_and_strict_remounts_with_the_same_cache() {
    let Some(Env { reg, work }) = Env::new("strict-heal") else {
        return;
    };
    // One large file, so that the byte flipped in the middle of the first answer lands in
    // its data, not in a tar header.
    let data = noise(3 << 20, 9);
    let tar = builder::tar(&[file("big", data.clone())]);
    for (repo, enc) in [
        ("heal/tar", Enc::Tar),
        ("heal/gzip", Enc::Gzip),
        ("heal/zstd", Enc::Zstd),
    ] {
        let layer = encode(tar.clone(), enc);
        let digest = builder::sha(&layer.blob);
        builder::push_one(work.path(), &[layer], &reg.addr, repo);
        let proxy = FaultProxy::start(&reg.addr);
        let cache = TempDir::new("strict-heal-cache");
        let cd = cache.path().to_str().unwrap();
        let reference = format!("{}/{repo}:v1", proxy.addr);
        // tar: `--verify strict` hashes the layer before the mount is ready; gzip: the first
        // mount's index pass reads the layer whole; zstd (one frame): it is unpacked whole
        // once. Each reads the damaged answer first.
        proxy.inject_matching(Fault::FlipByte, 1, &digest);
        let m = Mount::new(&reference, &["--cache-dir", cd, "--verify", "strict"], &[]);
        assert_eq!(proxy.faulted(), 1, "{repo}: the fault was not met");
        assert!(
            std::fs::read(m.path().join("big")).unwrap() == data,
            "{repo}"
        );
        drop(m);
        // The same cache directory: strict verification passes again, reads are right.
        let m = Mount::new(&reference, &["--cache-dir", cd, "--verify", "strict"], &[]);
        assert!(
            std::fs::read(m.path().join("big")).unwrap() == data,
            "{repo}"
        );
        drop(m);
        let log = log_of(cache.path());
        assert!(log.contains("fetching them again"), "{repo}: {log}");
    }
}

/// A single-frame zstd layer is unpacked whole into a local tar. When that tar is gone (the
/// disk bound pruned it) but the layer's index is kept, the next mount unpacks it again
/// without an index pass before it: a damaged answer then fails the unpack's digest, and
/// is fetched once more instead of failing that mount and every later one.
#[test]
fn a_zstd_layer_unpacked_again_heals_a_damaged_answer() {
    let Some(Env { reg, work }) = Env::new("zstd-heal") else {
        return;
    };
    let data = noise(3 << 20, 10);
    let layer = encode(builder::tar(&[file("big", data.clone())]), Enc::Zstd);
    let digest = builder::sha(&layer.blob);
    builder::push_one(work.path(), &[layer], &reg.addr, "heal/zstd-again");
    let proxy = FaultProxy::start(&reg.addr);
    let cache = TempDir::new("zstd-heal-cache");
    let cd = cache.path().to_str().unwrap();
    let reference = format!("{}/heal/zstd-again:v1", proxy.addr);
    let m = Mount::new(&reference, &["--cache-dir", cd], &[]);
    assert!(std::fs::read(m.path().join("big")).unwrap() == data);
    drop(m);
    // The tar and the blocks go; the index stays.
    std::fs::remove_dir_all(cache.path().join("tars")).unwrap();
    let _ = std::fs::remove_dir_all(cache.path().join("blocks"));
    assert!(cache.path().join("indexes").exists());
    proxy.inject_matching(Fault::FlipByte, 1, &digest);
    let m = Mount::new(&reference, &["--cache-dir", cd], &[]);
    assert_eq!(proxy.faulted(), 1, "the fault was not met");
    assert!(std::fs::read(m.path().join("big")).unwrap() == data);
    drop(m);
    let log = log_of(cache.path());
    assert!(log.contains("unpacking layer"), "{log}");
}

//! `cargo bench --bench entries` (part of `scripts/bench`): a layer of a million tar entries
//! in one directory — the shape that once took 276 s and 1 GiB to list — mounted from the
//! local registry (no link emulation: this measures the index and the tree, not the network).
//!
//! Prints, for a plain gzip layer with no published index (the first mount reads the whole
//! layer once to build its index and tree): time to ready, the daemon's memory and the bytes
//! per entry it stands for, a `readdir` of the directory and a `stat` of every entry, cold
//! and warm; next to them, measured in the same run, the same on the layer extracted to local
//! disk by GNU tar (and the extraction's own time). OCIFS_BENCH_ENTRIES sets the count
//! (default 1,000,000).

#![allow(dead_code)]

#[path = "../tests/it/builder.rs"]
mod builder;
mod common;
#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "../tests/it/link.rs"]
mod link;

use builder::{Enc, Item, encode, layout, push};
use common::{BenchMount, drop_caches, env_u64};
use harness::{Registry, TempDir};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Reads the directory's names (no `stat`); returns the time and the count.
fn list(dir: &Path) -> (Duration, usize) {
    let t = Instant::now();
    let n = std::fs::read_dir(dir).unwrap().count();
    (t.elapsed(), n)
}

/// Reads the directory and `lstat`s every entry.
fn list_and_stat(dir: &Path) -> (Duration, usize) {
    let t = Instant::now();
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        std::fs::symlink_metadata(e.path()).unwrap();
        n += 1;
    }
    (t.elapsed(), n)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let count = env_u64("OCIFS_BENCH_ENTRIES", 1_000_000) as usize;
    let mut items = Vec::with_capacity(count + 1);
    items.push(Item::Dir("d", 0o755));
    for i in 0..count {
        items.push(Item::File(format!("d/f{i:07}"), Vec::new(), 0o644));
    }
    let tar = builder::tar(&items);
    drop(items);
    let tar_len = tar.len();
    let layer = encode(tar.clone(), Enc::Gzip);
    let gz_len = layer.blob.len();
    let reg = Registry::start(None);
    let work = TempDir::new("entries");
    let dir = layout(
        &work.path().join("image"),
        "v1",
        &[("linux", "amd64", None, &[layer])],
    );
    push(&dir, "v1", &reg.addr, "bench/entries", None);

    // The reference: GNU tar extracting the same layer to local disk, then the same reads.
    let tarfile = work.path().join("layer.tar");
    std::fs::write(&tarfile, &tar).unwrap();
    drop(tar);
    let local = work.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    drop_caches();
    let t = Instant::now();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&tarfile)
        .arg("-C")
        .arg(&local)
        .status()
        .unwrap();
    assert!(st.success());
    let extract = t.elapsed();
    drop_caches();
    let (local_list, n_local) = list(&local.join("d"));
    let (local_stat, _) = list_and_stat(&local.join("d"));
    assert_eq!(n_local, count);

    // ocifs: `--small-layers 0` so the layer is not fetched whole into the block cache as
    // well (its bytes would be in the memory figure); no verification pass.
    let (m, ready) = BenchMount::new(
        &format!("{}/bench/entries:v1", reg.addr),
        &["--small-layers", "0"],
    );
    let rss_ready = m.rss_kib();
    drop_caches();
    let (cold_list, n) = list(&m.path().join("d"));
    assert_eq!(n, count, "entries listed");
    let (warm_list, _) = list(&m.path().join("d"));
    drop_caches();
    let (cold_stat, _) = list_and_stat(&m.path().join("d"));
    let (warm_stat, _) = list_and_stat(&m.path().join("d"));
    let rss_after = m.rss_kib();
    println!(
        "\n#### A layer of {count} entries in one directory (plain gzip, {:.1} MiB; tar {:.0} MiB)\n",
        gz_len as f64 / 1048576.0,
        tar_len as f64 / 1048576.0
    );
    println!("| | ocifs mount | local disk (GNU tar) |\n|---|---|---|");
    println!(
        "| ready / extracted | {} (one pass builds the index and tree) | {} |",
        ms(ready),
        ms(extract)
    );
    println!(
        "| readdir of the directory, cold / warm | {} / {} | {} (cold) |",
        ms(cold_list),
        ms(warm_list),
        ms(local_list)
    );
    println!(
        "| readdir + lstat of every entry, cold / warm | {} / {} | {} (after the readdir) |",
        ms(cold_stat),
        ms(warm_stat),
        ms(local_stat)
    );
    println!(
        "| daemon RSS when ready / after the listings | {} MiB / {} MiB ({} / {} bytes per entry) | |",
        rss_ready / 1024,
        rss_after / 1024,
        rss_ready * 1024 / count as u64,
        rss_after * 1024 / count as u64
    );
}

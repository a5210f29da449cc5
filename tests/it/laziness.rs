//! Lazy reads: a small file of a large layer costs a fraction of the blob (eStargz,
//! zstd:chunked, multi-frame zstd); small layers are fetched whole at mount.

use crate::builder::{self, Enc, Item, encode, file, layout, noise, push};
use crate::conformance::conformance_with;
use crate::fixtures::{base_layers, span_layers};
use crate::harness::{Env, Mount, Proxy, ocifs, push_index};
use crate::oracle;
use crate::stats::{poll_stats, stats};
use ocifs::stats::MountStats;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[test]
fn estargz_reads_are_lazy() {
    let Some(Env { reg, work }) = Env::new("lazy") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, None);
    let big = noise(16 << 20, 7);
    let layers = vec![encode(
        builder::tar(&[file("small.txt", "just this\n"), file("big.bin", big)]),
        Enc::Estargz,
    )];
    let blob_size = layers[0].blob.len() as u64;
    let dir = layout(work.path(), "lazy", &[("linux", "amd64", None, &layers)]);
    push(&dir, "lazy", &reg.addr, "lazy/image", None);
    proxy.reset();
    let m = Mount::new(
        &format!("{}/lazy/image:lazy", proxy.addr),
        &["--verify", "off", "--platform", "linux/amd64"],
        &[],
    );
    // Ready after the manifest, then the config alongside the blob's tail (footer and TOC),
    // asked for as a few ranges at once; the `GET /v2/`s that opened connections meanwhile
    // are not counted as requests.
    crate::connections::all_warm(&proxy);
    // One large tail: it has every warm connection to itself, and the most ranges.
    let tail_start = blob_size.saturating_sub(ocifs::blob::TAIL_READ);
    let most = ocifs::blob::SPREAD_PIECES;
    let tail_ranges = ocifs::blob::spread(tail_start, blob_size - tail_start, most).len() as u64;
    assert_eq!(tail_ranges, 4);
    assert_eq!(
        proxy.requests.load(Ordering::SeqCst),
        2 + tail_ranges,
        "{}",
        m.ready
    );
    assert_eq!(
        std::fs::read_to_string(m.path().join("small.txt")).unwrap(),
        "just this\n"
    );
    let fetched = proxy.blob_bytes.load(Ordering::SeqCst);
    assert!(fetched > 0);
    assert!(
        fetched * 5 < blob_size,
        "fetched {fetched} of a {blob_size}-byte blob for one small file"
    );
    // And the big file is right, fetched on demand.
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("big.bin")).unwrap()),
        builder::sha(&noise(16 << 20, 7))
    );
}

/// A small layer is fetched whole as soon as it is opened (one streamed request beside its
/// tail), so every read of it is then local; a large layer beside it stays lazy; `--small-layers 0`
/// fetches nothing ahead.
#[test]
fn small_layers_are_fetched_whole_at_open_and_large_ones_stay_lazy() {
    let Some(Env { reg, work }) = Env::new("small") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, None);
    let modules: Vec<_> = (0..40u64)
        .map(|i| (format!("lib/m{i}.py"), noise(50_000, i)))
        .collect();
    let mut items = vec![Item::Dir("lib", 0o755)];
    items.extend(modules.iter().map(|(p, d)| file(p, d.clone())));
    let small = encode(builder::tar(&items), Enc::Estargz);
    let big = encode(
        builder::tar(&[file("big.bin", noise(16 << 20, 7))]),
        Enc::Estargz,
    );
    let (small_size, big_size) = (small.blob.len() as u64, big.blob.len() as u64);
    let layers = vec![big, small];
    let dir = layout(work.path(), "v1", &[("linux", "amd64", None, &layers)]);
    push(&dir, "v1", &reg.addr, "small/image", None);
    let r = format!("{}/small/image:v1", proxy.addr);

    let m = Mount::new(&r, &["--verify", "off", "--small-layers", "4MiB"], &[]);
    let fetched_whole = |v: &MountStats| v.layers[1].fetched_bytes >= small_size;
    let v = poll_stats(m.path(), fetched_whole);
    assert!(fetched_whole(&v), "the small layer was not fetched: {v:?}");
    assert_eq!(v.prefetch.small_layer_bytes, small_size, "{v:?}");
    let big_fetched = v.layers[0].fetched_bytes;
    assert!(
        big_fetched * 5 < big_size,
        "the large layer was fetched too: {big_fetched} of {big_size}"
    );
    proxy.reset();
    for (p, d) in &modules {
        assert_eq!(std::fs::read(m.path().join(p)).unwrap(), *d, "{p}");
    }
    assert_eq!(
        proxy.blob_bytes.load(Ordering::SeqCst),
        0,
        "reads of the small layer went to the registry"
    );
    drop(m);

    let m = Mount::new(&r, &["--verify", "off", "--small-layers", "0"], &[]);
    std::thread::sleep(Duration::from_millis(500));
    let v = stats(m.path());
    assert_eq!(v.prefetch.small_layer_bytes, 0, "{v:?}");
    assert!(
        v.layers[1].fetched_bytes < small_size,
        "fetched ahead with --small-layers 0: {v:?}"
    );
}

#[test]
fn multi_frame_zstd_is_lazy_through_a_frame_index() {
    // pzstd frames are large: give it a layer with a big file so it makes several.
    let mut tars = span_layers();
    tars.push(builder::tar(&[
        Item::Dir("big", 0o755),
        file("big/blob", noise(24 << 20, 11)),
    ]));
    conformance_with(&[Enc::Pzstd], tars, &["--span", "64KiB"], false);
    conformance_with(
        &[Enc::ZstdFrames],
        span_layers(),
        &["--span", "64KiB"],
        false,
    );
    // Lazy: one small file costs a fraction of the blob once the index exists.
    let Some(Env { reg, work }) = Env::new("zstdlazy") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, None);
    let tar = builder::tar(&[
        file("small.txt", "small\n"),
        file("big.bin", noise(8 << 20, 12)),
        file("tail.txt", "tail\n"),
    ]);
    let layers = vec![encode(tar, Enc::ZstdFrames)];
    let blob_size = layers[0].blob.len() as u64;
    builder::push_one(work.path(), &layers, &reg.addr, "zl/image");
    let r = format!("{}/zl/image:v1", proxy.addr);
    let out = push_index(&r, &["--span", "256KiB"]);
    assert!(out.contains("pushed 1 index"), "{out}");
    proxy.reset();
    let m = Mount::new(&r, &["--verify", "off"], &[]);
    assert!(
        m.ready.contains("zstd (index from registry)"),
        "{}",
        m.ready
    );
    assert_eq!(
        std::fs::read_to_string(m.path().join("tail.txt")).unwrap(),
        "tail\n"
    );
    let fetched = proxy.blob_bytes.load(Ordering::SeqCst);
    assert!(fetched * 4 < blob_size, "fetched {fetched} of {blob_size}");
}

#[test]
fn zstd_chunked_from_containers_image_is_lazy_through_its_toc() {
    let Some(Env { reg, work }) = Env::new("zchunked") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, None);
    let mut tars = base_layers();
    // containers/storage cuts a run of zeros out of a file as a `zeros` chunk, and leaves a
    // file with no cut point (all zeros) as one chunk: both here are larger than a chunk
    // decoded in memory may be.
    const HOLE: usize = 70 << 20;
    let mut sparse = noise(100_000, 32);
    sparse.resize(100_000 + HOLE, 0);
    sparse.extend(noise(100_000, 33));
    tars.push(builder::tar(&[
        Item::Dir("big", 0o755),
        file("big/blob", noise(12 << 20, 31)),
        file("big/small", "small\n"),
        file("big/sparse", sparse),
        file("big/zeros", vec![0u8; HOLE]),
    ]));
    let layers: Vec<_> = tars.iter().cloned().map(|t| encode(t, Enc::Tar)).collect();
    let dir = layout(
        &work.path().join("layout"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    builder::push_recompressed(&dir, "v1", &reg.addr, "zc/image", "zstd:chunked");
    let expected_root = work.path().join("expected");
    let tar_refs: Vec<&[u8]> = tars.iter().map(Vec::as_slice).collect();
    oracle::extract(&tar_refs, &expected_root);

    let r = format!("{}/zc/image:v1", proxy.addr);
    let (ok, out, err) = ocifs(&["inspect", "--json", &r], &[]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["format"] == "zstd:chunked"),
        "{v}"
    );
    proxy.reset();
    let m = Mount::new(&r, &["--verify", "off"], &[]);
    assert!(m.ready.contains("zstd:chunked"), "{}", m.ready);
    assert_eq!(
        std::fs::read_to_string(m.path().join("big/small")).unwrap(),
        "small\n"
    );
    let blob_total: u64 = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    let fetched = proxy.blob_bytes.load(Ordering::SeqCst);
    assert!(
        fetched * 4 < blob_total,
        "fetched {fetched} of {blob_total}"
    );
    // The middle of the hole comes from no request at all.
    let mut hole = vec![1u8; 1 << 20];
    let f = std::fs::File::open(m.path().join("big/sparse")).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut hole, 30 << 20).unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    assert_eq!(proxy.blob_bytes.load(Ordering::SeqCst), fetched);
    oracle::assert_same(
        &oracle::snapshot(&expected_root),
        &oracle::snapshot(m.path()),
    );
}

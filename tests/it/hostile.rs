//! Layers as real producers write them, where they differ from what our own encoders make:
//! files sized only by a PAX `size` record (Go's archive/tar and Python's tarfile past
//! 8 GiB), zstd:chunked from stargz-snapshotter's compressor (no `endOffset`, no size on a
//! file's last chunk, eStargz landmarks), and a directory of a quarter of a million files.
//! Each image is pushed to the registry and mounted; the smaller ones are compared with GNU
//! tar's extraction of the same tars.

use crate::builder::{self, Enc, EncodedLayer, Item, encode, file, noise};
use crate::harness::{Mount, Registry, TempDir, ocifs, require};
use crate::oracle;
use std::process::Command;

const TOOLS: &[&str] = &["docker-registry", "skopeo", "tar", "zstd", "go"];

/// Pushes `layers` as one image, mounts it with `flags` and checks it against the oracle.
/// Returns the mount (and what must outlive it).
fn mount_and_compare(layers: &[EncodedLayer], flags: &[&str]) -> (Mount, Registry, TempDir) {
    let reg = Registry::start(None);
    let work = TempDir::new("hostile");
    let dir = builder::layout(
        &work.path().join("layout"),
        "v1",
        &[("linux", "amd64", None, layers)],
    );
    builder::push(&dir, "v1", &reg.addr, "hostile/image", None);
    let expected_root = work.path().join("expected");
    let tars: Vec<&[u8]> = layers.iter().map(|l| l.tar.as_slice()).collect();
    oracle::extract(&tars, &expected_root);
    let m = Mount::new(&format!("{}/hostile/image:v1", reg.addr), flags, &[]);
    oracle::assert_same(
        &oracle::snapshot(&expected_root),
        &oracle::snapshot(m.path()),
    );
    (m, reg, work)
}

/// A tar whose file `name` is sized only by a PAX `size` record, as Go writes a file past
/// 8 GiB: a PAX header, then a ustar header whose size field is 0. A file follows it.
fn pax_sized_tar(dir: &str, name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut d = tar::Header::new_ustar();
    d.set_entry_type(tar::EntryType::Directory);
    d.set_size(0);
    d.set_mode(0o755);
    d.set_mtime(1_700_000_000);
    d.set_uid(0);
    d.set_gid(0);
    b.append_data(&mut d, dir, &[][..]).unwrap();
    let size = data.len().to_string();
    b.append_pax_extensions([("size", size.as_bytes())])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path(format!("{dir}/{name}")).unwrap();
    h.set_size(0);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    let mut tar = b.into_inner().unwrap();
    tar.truncate(tar.len() - 1024); // the end-of-archive blocks
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    let mut b = tar::Builder::new(tar);
    let mut f = tar::Header::new_ustar();
    f.set_size(6);
    f.set_mode(0o644);
    f.set_mtime(1_700_000_000);
    f.set_uid(0);
    f.set_gid(0);
    b.append_data(&mut f, format!("{dir}/after"), &b"after\n"[..])
        .unwrap();
    b.into_inner().unwrap()
}

#[test]
fn files_sized_only_by_a_pax_record_read_back_from_tar_gzip_and_zstd() {
    if !require(TOOLS, true) {
        return;
    }
    // 20 MiB: more than the 16 MiB an entry's headers may take, which is what the data
    // was once counted against. One layer per tar walk: a blob's headers read by range
    // (tar), a stream indexed in one pass (gzip), a stream unpacked to a local tar (zstd).
    let data = noise(20 << 20, 41);
    let layers: Vec<_> = [("t", Enc::Tar), ("g", Enc::Gzip), ("z", Enc::Zstd)]
        .into_iter()
        .map(|(dir, enc)| encode(pax_sized_tar(dir, "big", &data), enc))
        .collect();
    let (m, _reg, _work) = mount_and_compare(&layers, &[]);
    for dir in ["t", "g", "z"] {
        let f = std::fs::File::open(m.path().join(dir).join("big")).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 20 << 20);
        let mut end = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut end, (20 << 20) - 4096).unwrap();
        assert!(
            end == data[data.len() - 4096..],
            "{dir}/big: its last bytes"
        );
    }
}

/// `tar` encoded by stargz-snapshotter's own zstd:chunked compressor (estargz.Build with
/// zstdchunked.Compressor, 64 KiB chunks), annotated as it annotates the layer.
fn stargz_zstd_chunked(tar: Vec<u8>, first: &[&str]) -> EncodedLayer {
    let dir = TempDir::new("zstd-chunked");
    let path = dir.path().join("layer.tar");
    std::fs::write(&path, &tar).unwrap();
    let out = Command::new(builder::estargz_tool())
        .arg("--zstd-chunked")
        .arg(&path)
        .arg(first.join(","))
        .output()
        .unwrap();
    let meta = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "estargz-build --zstd-chunked: {meta}");
    // "<toc digest> <diff id> <manifest checksum> <manifest position>"
    let meta: Vec<&str> = meta.split_whitespace().collect();
    assert_eq!(meta.len(), 4, "{meta:?}");
    let key = |k: &str| format!("io.containers.zstd-chunked.{k}");
    EncodedLayer {
        blob: out.stdout,
        media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
        annotations: vec![
            (key("manifest-checksum"), meta[2].to_string()),
            (key("manifest-position"), meta[3].to_string()),
        ],
        tar,
    }
}

#[test]
fn zstd_chunked_from_stargz_snapshotters_compressor_mounts_like_its_tar() {
    if !require(TOOLS, true) {
        return;
    }
    let lower = builder::tar(&[
        Item::Dir("bin", 0o755),
        // Several chunks, the last one short; exactly two chunks (the last one sized); one.
        Item::File("bin/tool".into(), noise(300_000, 1), 0o4755),
        file("bin/exact", noise(128 << 10, 2)),
        file("bin/small", "small\n"),
        Item::Symlink("bin/sh", "tool"),
        Item::Hardlink("bin/tool-link", "bin/tool"),
        file("empty", ""),
        Item::Fifo("fifo"),
        Item::Owned(
            "owned",
            b"x".to_vec(),
            1234,
            5678,
            vec![("user.comment", b"hello\0bin")],
        ),
        Item::Dir("gone", 0o755),
        file("gone/x", "x"),
        file("last", noise(70_000, 3)),
    ]);
    let upper = builder::tar(&[
        file(".wh.gone", ""),
        // (The directory too: GNU tar would leave it the extraction's time.)
        Item::Dir("bin", 0o755),
        file("bin/small", "replaced\n"),
        file("app.py", noise(90_000, 4)),
    ]);
    let layers = [
        stargz_zstd_chunked(lower, &[]),
        stargz_zstd_chunked(upper, &["app.py"]),
    ];
    let (m, _reg, _work) = mount_and_compare(&layers, &["--verify", "strict"]);
    assert!(m.ready.contains("zstd:chunked"), "{}", m.ready);
    // The upper layer's prioritized file (before `.prefetch.landmark`) is prefetched.
    let (ok, out, err) = ocifs(&["stats", "--json", m.path().to_str().unwrap()], &[]);
    assert!(ok, "stats: {err}");
    let stats: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(
        stats["prefetch"]["totalBytes"].as_u64().unwrap() > 0,
        "{stats}"
    );
}

#[test]
fn a_directory_of_250000_files_lists_whole_and_in_order_in_linear_time() {
    if !require(TOOLS, true) {
        return;
    }
    // The kernel lists a directory in many calls, each resumed at an offset we handed out.
    // Each call once rebuilt the whole listing to skip to its offset: this took 33 s (debug
    // build, a busy machine; 100,000 entries 2.7 s, 200,000 8-13 s), now 0.3 s.
    const N: usize = 250_000;
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    b.append_data(&mut h.clone(), "big", &[][..]).unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    // Written out of order (as GNU tar writes a directory in readdir order).
    let names: Vec<String> = (0..N)
        .map(|i| format!("entry-{:06}", (i * 7919) % N))
        .collect();
    for name in &names {
        b.append_data(&mut h.clone(), format!("big/{name}"), &[][..])
            .unwrap();
    }
    let layer = encode(b.into_inner().unwrap(), Enc::Zstd);
    let reg = Registry::start(None);
    let work = TempDir::new("bigdir");
    let dir = builder::layout(
        &work.path().join("layout"),
        "v1",
        &[("linux", "amd64", None, &[layer])],
    );
    builder::push(&dir, "v1", &reg.addr, "bigdir/image", None);
    let m = Mount::new(&format!("{}/bigdir/image:v1", reg.addr), &[], &[]);
    let start = std::time::Instant::now();
    let listed: Vec<String> = std::fs::read_dir(m.path().join("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let took = start.elapsed();
    let mut want = names;
    want.sort();
    assert!(
        listed == want,
        "{} names listed, in order: {}",
        listed.len(),
        listed.is_sorted()
    );
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    eprintln!("listed {N} entries in {took:?}");
}

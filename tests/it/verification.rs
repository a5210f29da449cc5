//! Verification: corrupted blobs refused or failed with EIO, background verification, and
//! the local copies of verified layers.

use crate::builder::{self, Enc, Item, encode, file, layout, noise, push};
use crate::conformance::expected_tree;
use crate::fixtures::{base_layers, gnu_sparse_layer};
use crate::harness::{Env, Mount, Proxy, TempDir, ocifs};
use crate::oracle;
use crate::stats::{poll_stats, stats, wait_for_verification};
use ocifs::stats::MountStats;
use std::sync::atomic::Ordering;

#[test]
fn corrupted_blobs_fail_with_eio_or_refuse_to_mount() {
    let Some(Env { reg, work }) = Env::new("corrupt") else {
        return;
    };
    let tar_layers = vec![encode(
        builder::tar(&[file("data", noise(200_000, 3))]),
        Enc::Tar,
    )];
    let esgz_layers = vec![encode(
        builder::tar(&[file("data", noise(200_000, 4))]),
        Enc::Estargz,
    )];
    for (name, layers) in [("tar", &tar_layers), ("esgz", &esgz_layers)] {
        let dir = layout(
            &work.path().join(name),
            "v1",
            &[("linux", "amd64", None, layers)],
        );
        push(&dir, "v1", &reg.addr, &format!("corrupt/{name}"), None);
        // Flip one byte in the middle of the stored layer blob.
        let d = builder::sha(&layers[0].blob);
        let path = reg.blob_path(&d);
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 3;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let cd = work.path().join("cache");
    let cd = cd.to_str().unwrap();
    let mp = TempDir::new("mp");
    let (ok, _, err) = ocifs(
        &[
            "mount",
            "--cache-dir",
            cd,
            "--verify",
            "strict",
            &format!("{}/corrupt/tar:v1", reg.addr),
            mp.path().to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        !ok && err.contains("digest mismatch"),
        "strict mount of a corrupted blob: {err}"
    );
    // eStargz: the chunk digest catches it on read, even with whole-blob verification off.
    let m = Mount::new(
        &format!("{}/corrupt/esgz:v1", reg.addr),
        &["--verify", "off"],
        &[],
    );
    let e = std::fs::read(m.path().join("data")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
}

#[test]
fn background_verification_fetches_the_layer_so_later_reads_are_local() {
    let Some(Env { reg, work }) = Env::new("bgfetch") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, None);
    let tar = builder::tar(&[file("big.bin", noise(6 << 20, 61)), file("small", "s\n")]);
    builder::push_one(
        work.path(),
        &[encode(tar, Enc::Estargz)],
        &reg.addr,
        "bg/image",
    );
    let m = Mount::new(
        &format!("{}/bg/image:v1", proxy.addr),
        &["--verify", "background"],
        &[],
    );
    let mut verified = false;
    for _ in 0..200 {
        let v = stats(m.path());
        if v.layers
            .first()
            .is_some_and(|l| l.verification == "verified")
        {
            verified = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(verified, "the layer was verified in the background");
    proxy.reset();
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("big.bin")).unwrap()),
        builder::sha(&noise(6 << 20, 61))
    );
    assert_eq!(
        proxy.blob_bytes.load(Ordering::SeqCst),
        0,
        "served from the blocks verification fetched"
    );
}

#[test]
fn verified_layers_are_copied_locally_and_serve_every_byte() {
    let Some(Env { reg, work }) = Env::new("copies") else {
        return;
    };
    // Every entry kind, whiteouts and hard links (base layers), a file of several MiB, and a
    // GNU sparse file (left out of copies), in four formats.
    let mut tars = base_layers();
    tars.push(builder::tar(&[
        Item::Dir("bin", 0o755),
        file("bin/big", noise(3 << 20, 71)),
    ]));
    tars.push(gnu_sparse_layer());
    let layers: Vec<_> = tars
        .into_iter()
        .zip([Enc::Estargz, Enc::Gzip, Enc::ZstdFrames, Enc::Tar])
        .map(|(t, e)| encode(t, e))
        .collect();
    let proxy = Proxy::start(&reg.addr, None);
    let dir = layout(
        &work.path().join("layout"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    push(&dir, "v1", &reg.addr, "copies/image", None);
    let (_, expected) = expected_tree(&work, &layers);

    let reference = format!("{}/copies/image:v1", proxy.addr);
    let flags = ["--platform", "linux/amd64", "--verify", "background"];
    let m = Mount::new(&reference, &flags, &[]);
    let copied = |v: &MountStats| (0..4).all(|i| v.layers.get(i).is_some_and(|l| l.local_copy));
    let v = poll_stats(m.path(), copied);
    assert!(copied(&v), "every verified layer is copied: {v:?}");
    // With nothing left to fetch, the mount's kernel read-ahead is raised (from FUSE's 128 KiB).
    let mut readahead = 0;
    for _ in 0..100 {
        readahead = readahead_kib(m.path());
        if readahead == 8192 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(readahead, 8192);
    // Now every read of a copied file is a read of the local copy, and nothing is fetched.
    proxy.reset();
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    let v = poll_stats(m.path(), |_| true);
    assert!(v.local_copies.reads > 0, "{v:?}");
    assert_eq!(proxy.blob_bytes.load(Ordering::SeqCst), 0);
    drop(m);

    // A layer whose files do not fit the disk cache bound is not copied; the others are.
    let small = [&flags[..], &["--disk-cache-size", "100KiB"]].concat();
    // (Not every layer is copied: the read-ahead stays as the kernel set it.)
    let m = Mount::new(&reference, &small, &[]);
    // Layers are copied in order: once the last one (its sparse file left out: nothing to
    // copy) is done, the others have been decided.
    let decided = |v: &MountStats| v.layers.get(3).is_some_and(|l| l.local_copy);
    let v = poll_stats(m.path(), decided);
    assert!(decided(&v), "{v:?}");
    assert!(v.layers[1].local_copy, "a few bytes of files: {v:?}");
    assert!(!v.layers[0].local_copy, "300 KB of files: {v:?}");
    // (Its 3 MiB of files make one zstd frame: unpacked to a local tar when opened, which
    // serves its reads already.)
    assert!(v.layers[2].local_copy, "a local tar: {v:?}");
    assert!(readahead_kib(m.path()) < 8192);
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    drop(m);

    // Switched off, nothing is copied (and the tree still reads back exactly).
    let m = Mount::new(
        &reference,
        &[&flags[..], &["--no-local-copy"]].concat(),
        &[],
    );
    wait_for_verification(&m, 4);
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    let v = poll_stats(m.path(), |_| true);
    assert_eq!(v.local_copies.bytes, 0, "{v:?}");
    assert_eq!(v.local_copies.reads, 0, "{v:?}");

    // A listing piped into a reader that has gone (here before the listing is ready) ends
    // quietly, as `ls | head` does: no panic on EPIPE.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' ls -R --cache-dir '{}' --platform linux/amd64 '{reference}' | true",
            env!("CARGO_BIN_EXE_ocifs"),
            work.path().join("ls-cache").display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
}

#[test]
fn a_gzip_layer_indexed_by_its_mount_is_served_from_the_tar_its_pass_decoded() {
    let Some(Env { reg, work }) = Env::new("firstpass") else {
        return;
    };
    // Plain gzip, no index published: the mount reads each layer once to index it.
    let layers: Vec<_> = base_layers()
        .into_iter()
        .map(|t| encode(t, Enc::Gzip))
        .collect();
    let n = layers.len();
    builder::push_one(work.path(), &layers, &reg.addr, "firstpass/image");
    let (_, expected) = expected_tree(&work, &layers);
    let reference = format!("{}/firstpass/image:v1", reg.addr);
    let flags = ["--platform", "linux/amd64"];
    let m = Mount::new(&reference, &flags, &[]);
    // Every layer is local as soon as the mount is ready, and the background copier wrote
    // nothing: the passes left the decoded tars.
    let v = stats(m.path());
    assert!(v.layers.iter().all(|l| l.local_copy), "{v:?}");
    assert!(
        v.layers.iter().all(|l| l.index.as_deref() == Some("built")),
        "{v:?}"
    );
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    let v = stats(m.path());
    assert_eq!(v.local_copies.bytes, 0, "{v:?}");
    assert_eq!(v.layers.len(), n);
    drop(m);
    // Without local copies the layers are read through their (now cached) indexes.
    let off = [&flags[..], &["--no-local-copy"]].concat();
    let m = Mount::new(&reference, &off, &[]);
    let v = stats(m.path());
    assert!(v.layers.iter().all(|l| !l.local_copy), "{v:?}");
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
}

/// The kernel read-ahead of the mount at `path`, in KiB (`/sys/class/bdi/MAJ:MIN`).
fn readahead_kib(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("mountpoint")
        .arg("-d")
        .arg(path)
        .output()
        .unwrap();
    let dev = String::from_utf8(out.stdout).unwrap();
    let knob = format!("/sys/class/bdi/{}/read_ahead_kb", dev.trim());
    std::fs::read_to_string(&knob)
        .unwrap_or_else(|e| panic!("{knob}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

//! Checkpoint indexes of gzip layers: built by many encoders' output, kept and rebuilt,
//! published to the registry (with mark windows), and SOCI zTOCs used in their place.

use crate::builder::{self, Enc, encode, file, layout, noise, push};
use crate::conformance::conformance_with;
use crate::fixtures::{base_layers, span_layers};
use crate::harness::{Env, Mount, Proxy, TempDir, ocifs, push_index};
use crate::oracle;
use crate::stats::wait_for_verification;
use std::sync::atomic::Ordering;

#[test]
fn gzip_checkpoint_indexes_from_many_encoders() {
    for enc in [
        Enc::Gzip1,
        Enc::Gzip9,
        Enc::GnuGzip,
        Enc::Pigz,
        Enc::PythonGzip,
    ] {
        conformance_with(&[enc], span_layers(), &["--span", "64KiB"], false);
    }
    conformance_with(&[Enc::Tar], span_layers(), &["--span", "64KiB"], true);
}

#[test]
fn gzip_index_is_kept_reused_lazily_and_rebuilt_when_corrupt() {
    let Some(Env { reg, work }) = Env::new("gzi") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, None);
    let tar = builder::tar(&[
        file("small.txt", "small\n"),
        file("big.bin", noise(12 << 20, 5)),
        file("tail.txt", "tail\n"),
    ]);
    let layers = vec![encode(tar, Enc::Gzip)];
    let blob_size = layers[0].blob.len() as u64;
    let digest = builder::sha(&layers[0].blob);
    builder::push_one(work.path(), &layers, &reg.addr, "gzi/image");
    let r = format!("{}/gzi/image:v1", proxy.addr);
    let index_name = format!("indexes/{}.idx", digest.replace(':', "-"));

    // First mount builds the index (one pass over the blob) and keeps it.
    let first = Mount::new(&r, &["--span", "256KiB"], &[]);
    assert_eq!(
        std::fs::read_to_string(first.path().join("tail.txt")).unwrap(),
        "tail\n"
    );
    let index_file = first._cache.path().join(&index_name);
    let index = std::fs::read(&index_file).expect("index kept in the cache directory");
    drop(first);

    // A clean cache directory holding only the index: reads are lazy from the registry.
    let fresh = TempDir::new("gzi-cache");
    std::fs::create_dir_all(fresh.path().join("indexes")).unwrap();
    std::fs::write(fresh.path().join(&index_name), &index).unwrap();
    proxy.reset();
    let mp = TempDir::new("gzi-mp");
    let (ok, _, err) = ocifs(
        &[
            "mount",
            "--verify",
            "off",
            "--small-layers",
            "0",
            "--cache-dir",
            fresh.path().to_str().unwrap(),
            &r,
            mp.path().to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read_to_string(mp.path().join("tail.txt")).unwrap(),
        "tail\n"
    );
    let fetched = proxy.blob_bytes.load(Ordering::SeqCst);
    let _ = ocifs(&["umount", mp.path().to_str().unwrap()], &[]);
    assert!(
        fetched > 0 && fetched * 4 < blob_size,
        "fetched {fetched} of {blob_size} with a kept index"
    );

    // A corrupted index is rejected (logged) and rebuilt, never trusted.
    let mut bad = index.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(fresh.path().join(&index_name), &bad).unwrap();
    let m = Mount::new(
        &r,
        &[
            "--span",
            "256KiB",
            "--cache-dir",
            fresh.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("big.bin")).unwrap()),
        builder::sha(&noise(12 << 20, 5))
    );
    let logs: String = std::fs::read_dir(fresh.path().join("logs"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(
        logs.contains("rejected") && logs.contains("checksum"),
        "log: {logs}"
    );
    drop(m);
    assert!(
        std::fs::read(fresh.path().join(&index_name)).unwrap() == index,
        "the rebuilt index differs"
    );
}

#[test]
fn gzip_index_pushed_to_the_registry_is_found_by_a_clean_mount() {
    let Some(Env { reg, work }) = Env::new("gzpush") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, None);
    let tar = builder::tar(&[
        file("small.txt", "small\n"),
        file("big.bin", noise(12 << 20, 9)),
    ]);
    let layers = vec![encode(tar, Enc::Gzip)];
    let blob_size = layers[0].blob.len() as u64;
    builder::push_one(work.path(), &layers, &reg.addr, "gzpush/image");
    let r = format!("{}/gzpush/image:v1", proxy.addr);

    let out = push_index(&r, &["--span", "512KiB"]);
    assert!(
        out.contains("index built") && out.contains("pushed 1 index"),
        "{out}"
    );
    // distribution 2.8 has no referrers API: the fallback tag must exist now.
    let (ok, tags, _) = ocifs(&["tags", &format!("{}/gzpush/image", reg.addr)], &[]);
    assert!(
        ok && String::from_utf8(tags)
            .unwrap()
            .lines()
            .any(|t| t.starts_with("sha256-"))
    );
    let (ok, json, _) = ocifs(
        &["tags", "--json", &format!("{}/gzpush/image", reg.addr)],
        &[],
    );
    let tags: Vec<String> = serde_json::from_slice(&json).unwrap();
    assert!(ok && tags.contains(&"v1".to_string()), "{tags:?}");

    proxy.reset();
    let m = Mount::new(&r, &["--verify", "off"], &[]);
    assert!(m.ready.contains("index from registry"), "{}", m.ready);
    // The image manifest, the referrers API (404 here) and its fallback tag, the tail probe,
    // the config and the index blob (as up to four ranges at once), named by the referrer's
    // annotation: the artifact's own manifest is not fetched. (The `GET /v2/`s that opened
    // connections meanwhile are not counted as requests.)
    crate::connections::all_warm(&proxy);
    let blobs = proxy.blob_requests.load(Ordering::SeqCst);
    let others = proxy.requests.load(Ordering::SeqCst).saturating_sub(blobs);
    assert!(
        others <= 3,
        "{others} manifest and referrers requests before the mount was ready"
    );
    assert_eq!(blobs, 6, "blob requests before the mount was ready");
    assert_eq!(
        std::fs::read_to_string(m.path().join("small.txt")).unwrap(),
        "small\n"
    );
    // The eStargz footer probe (512 KiB tail), the index, and one 2 MiB run around the span.
    let fetched = proxy.blob_bytes.load(Ordering::SeqCst);
    assert!(
        fetched < (512 << 10) + (1 << 20) + (2 << 20) && fetched * 3 < blob_size,
        "a clean mount with a published index fetched {fetched} of {blob_size}"
    );
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("big.bin")).unwrap()),
        builder::sha(&noise(12 << 20, 9))
    );
}

/// A published gzip index carries its marks' windows in a blob of their own: a clean mount
/// reading a small file deep inside a span fetches from the mark before it (and that mark's
/// window), not the span's front, and serves exact bytes.
#[test]
fn a_published_index_resumes_a_mid_span_read_at_the_mark_before_it() {
    let Some(Env { reg, work }) = Env::new("gzwin") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, None);
    let target = noise(1000, 7);
    let tar = builder::tar(&[
        file("front.bin", noise(1536 << 10, 5)),
        file("target.bin", target.clone()),
        file("after.bin", noise(1 << 20, 6)),
    ]);
    let layers = vec![encode(tar, Enc::Gzip)];
    builder::push_one(work.path(), &layers, &reg.addr, "gzwin/image");
    let r = format!("{}/gzwin/image:v1", proxy.addr);
    let out = push_index(&r, &["--span", "2MiB"]);
    assert!(out.contains("mark windows"), "{out}");

    // Mounts `reference` with a clean cache and reads target.bin: the blob bytes that took.
    let read_target = |reference: &str| {
        let m = Mount::new(
            reference,
            &[
                "--verify",
                "off",
                "--fetch-size",
                "64KiB",
                "--no-whole-files",
            ],
            &[],
        );
        assert!(m.ready.contains("index from registry"), "{}", m.ready);
        proxy.reset();
        assert_eq!(std::fs::read(m.path().join("target.bin")).unwrap(), target);
        (m, proxy.blob_bytes.load(Ordering::SeqCst))
    };
    let (m, fetched) = read_target(&r);
    // From span 0's start, target.bin lies 1.5 MiB (of noise: as much compressed) in; marks
    // are at most 128 KiB of compressed input apart, a window at most 32 KiB.
    assert!(
        fetched < 768 << 10,
        "reading 1000 bytes 1.5 MiB into a span fetched {fetched} bytes"
    );
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("front.bin")).unwrap()),
        builder::sha(&noise(1536 << 10, 5))
    );
    drop(m);

    // An index fetched from the registry and checked here is kept, but its windows blob
    // stays in the registry; publishing it for the same image in another repository must
    // publish windows with it, or that repository's mounts decode from span starts.
    let kept = TempDir::new("gzwin-kept");
    let kept_dir = kept.path().to_str().unwrap();
    let m = Mount::new(&r, &["--verify", "strict", "--cache-dir", kept_dir], &[]);
    assert!(m.ready.contains("index from registry"), "{}", m.ready);
    drop(m);
    builder::push_one(work.path(), &layers, &reg.addr, "gzwin/copy");
    let copy = format!("{}/gzwin/copy:v1", reg.addr);
    let (ok, out, err) = ocifs(&["index", "--push", "--cache-dir", kept_dir, &copy], &[]);
    let out = String::from_utf8_lossy(&out);
    assert!(ok, "index --push: {err}");
    assert!(
        out.contains("mark windows"),
        "pushed without windows: {out}"
    );
    let (_m, fetched) = read_target(&format!("{}/gzwin/copy:v1", proxy.addr));
    assert!(
        fetched < 768 << 10,
        "without windows in the copy's repository: {fetched} bytes for 1000"
    );
}

/// Runs tests/tools/soci/publish.py (zlib + tarfile + flatc, independent of ocifs): publishes
/// SOCI zTOCs for `repo:tag`; returns the digest the script printed.
fn publish_soci(registry: &str, repo: &str, version: &str, damage: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/soci/publish.py");
    let out = std::process::Command::new("python3")
        .args([script, registry, repo, "v1", "--soci", version])
        .args(["--span", &(1 << 20).to_string(), "--damage", damage])
        .output()
        .expect("run publish.py");
    assert!(
        out.status.success(),
        "publish.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn soci_ztocs_v1_and_v2_are_used_instead_of_building_an_index() {
    let Some(Env { reg, work }) = Env::new("soci") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, None);
    let mut tars = base_layers();
    // Text past the first span, so its deflate stream refers back across span starts.
    // (Numbered lines: repeated text alone makes a few huge deflate blocks, with no checkpoint
    // inside.)
    let log: String = (0..60_000u64)
        .map(|i| format!("{i:>8} record {} of a log line\n", i * 7919 % 10007))
        .collect();
    tars.push(builder::tar(&[
        file("small.txt", "small\n"),
        file("big.bin", noise(8 << 20, 5)),
        file("log.txt", log.clone()),
    ]));
    let layers: Vec<_> = tars.into_iter().map(|t| encode(t, Enc::Gzip9)).collect();
    let total: u64 = layers.iter().map(|l| l.blob.len() as u64).sum();
    let dir = layout(
        &work.path().join("layout"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    let tar_refs: Vec<&[u8]> = layers.iter().map(|l| l.tar.as_slice()).collect();
    oracle::extract(&tar_refs, &work.path().join("expected"));
    let expected = oracle::snapshot(&work.path().join("expected"));

    for (version, tag) in [("v1", "v1"), ("v2", "v1-soci")] {
        let repo = format!("soci/{version}");
        push(&dir, "v1", &reg.addr, &repo, None);
        publish_soci(&reg.addr, &repo, version, "none");
        proxy.reset();
        let r = format!("{}/{repo}:{tag}", proxy.addr);
        let label = format!("from a SOCI {version} zTOC");
        let fresh = TempDir::new("soci-inspect");
        let (ok, out, err) = ocifs(
            &["inspect", "--cache-dir", fresh.path().to_str().unwrap(), &r],
            &[],
        );
        let out = String::from_utf8(out).unwrap();
        assert!(ok, "inspect: {err}");
        assert_eq!(
            out.matches(&format!("published ({label}")).count(),
            3,
            "{out}"
        );
        proxy.reset();
        let m = Mount::new(&r, &["--verify", "off"], &[]);
        let label = format!("gzip (index {label})");
        assert_eq!(m.ready.matches(&label).count(), 3, "{}", m.ready);
        let at_ready = proxy.blob_bytes.load(Ordering::SeqCst);
        assert!(
            at_ready * 4 < total,
            "mounting with zTOCs fetched {at_ready} of {total} blob bytes"
        );
        assert_eq!(
            std::fs::read_to_string(m.path().join("small.txt")).unwrap(),
            "small\n"
        );
        oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    }

    // A zTOC with a wrong span digest is used, but the bytes it cannot vouch for are EIO;
    // a truncated one is rejected and ocifs builds its own index.
    push(&dir, "v1", &reg.addr, "soci/bad-digest", None);
    publish_soci(&reg.addr, "soci/bad-digest", "v1", "span-digest");
    let m = Mount::new(
        &format!("{}/soci/bad-digest:v1", reg.addr),
        &["--verify", "off"],
        &[],
    );
    assert!(m.ready.contains("SOCI v1 zTOC"), "{}", m.ready);
    // (The last span, whose digest is wrong, holds the end of log.txt.)
    let err = std::fs::read(m.path().join("log.txt"))
        .map(|b| b.len())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(m);
    push(&dir, "v1", &reg.addr, "soci/truncated", None);
    publish_soci(&reg.addr, "soci/truncated", "v2", "truncate");
    let m = Mount::new(
        &format!("{}/soci/truncated:v1-soci", reg.addr),
        &["--verify", "off"],
        &[],
    );
    assert_eq!(m.ready.matches("index built").count(), 3, "{}", m.ready);
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    drop(m);

    // A zTOC is not named by the image's digests: one whose windows were altered has span
    // digests that match, but decodes to other bytes. Verification decodes the layer through
    // it and compares with the config's diff_id: a strict mount is refused, a background one
    // fails the layer's reads once it finds out. An honest one passes and is kept as trusted.
    push(&dir, "v1", &reg.addr, "soci/bad-window", None);
    publish_soci(&reg.addr, "soci/bad-window", "v1", "window");
    let r = format!("{}/soci/bad-window:v1", reg.addr);
    let mp = TempDir::new("mp");
    let (ok, _, err) = ocifs(
        &[
            "mount",
            "--cache-dir",
            work.path().join("strict").to_str().unwrap(),
        ]
        .into_iter()
        .chain(["--verify", "strict", &r, mp.path().to_str().unwrap()])
        .collect::<Vec<_>>(),
        &[],
    );
    assert!(
        !ok && err.contains("decoded through its published index"),
        "strict mount through an altered zTOC: {err}"
    );
    let m = Mount::new(&r, &["--verify", "background"], &[]);
    let verdicts = wait_for_verification(&m, 3);
    assert!(verdicts[2].starts_with("bad:"), "{verdicts:?}");
    let err = std::fs::read(m.path().join("log.txt"))
        .map(|b| b.len())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(m);
    let cache = TempDir::new("soci-trusted");
    let cd = cache.path().to_str().unwrap();
    let honest = format!("{}/soci/v1:v1", reg.addr);
    let m = Mount::new(&honest, &["--verify", "background", "--cache-dir", cd], &[]);
    let verdicts = wait_for_verification(&m, 3);
    assert!(verdicts.iter().all(|v| v == "verified"), "{verdicts:?}");
    assert_eq!(
        std::fs::read_to_string(m.path().join("log.txt")).unwrap(),
        log
    );
    drop(m);
    let m = Mount::new(&honest, &["--verify", "background", "--cache-dir", cd], &[]);
    assert_eq!(m.ready.matches("(index cached)").count(), 3, "{}", m.ready);
}

/// `index --push` publishes an index it fetched (here: found waiting in the cache
/// directory, as a mount leaves one from the registry) only once the layer decoded through
/// it matched: a lying one (a file renamed in its list, its checksum valid, as anyone who
/// can push a referrer can make) is refused and nothing is pushed; the honest one is checked,
/// kept as trusted and pushed. `export` checks such a layer before writing any of it.
#[test]
fn an_index_not_built_here_is_checked_before_it_is_pushed_or_exported() {
    use ocifs::layer::checkpoint::file;
    let Some(Env { reg, work }) = Env::new("gzcheck") else {
        return;
    };
    let tar = builder::tar(&[
        file("small.txt", "small\n"),
        file("big.bin", noise(3 << 20, 4)),
    ]);
    let layers = vec![encode(tar, Enc::Gzip)];
    let digest = builder::sha(&layers[0].blob);
    builder::push_one(work.path(), &layers, &reg.addr, "gzcheck/image");
    let r = format!("{}/gzcheck/image:v1", reg.addr);
    let cache = TempDir::new("gzcheck-cache");
    let dir = cache.path().to_str().unwrap();
    let (ok, _, err) = ocifs(&["index", "--cache-dir", dir, &r], &[]);
    assert!(ok, "index: {err}");
    let (trusted, waiting) = (
        file::path(cache.path(), &digest),
        file::unverified_path(cache.path(), &digest),
    );
    let honest = std::fs::read(&trusted).expect("the built index is kept");
    let mut index = file::decode(&honest, &digest).unwrap();
    let small = index.entries.iter_mut().find(|e| e.path == "small.txt");
    small.expect("small.txt is listed").path = "other.txt".into();
    std::fs::remove_file(&trusted).unwrap();
    std::fs::write(&waiting, file::encode(&index)).unwrap();
    let published = || {
        let (ok, tags, err) = ocifs(&["tags", &format!("{}/gzcheck/image", reg.addr)], &[]);
        assert!(ok, "tags: {err}");
        String::from_utf8(tags).unwrap().contains("sha256-")
    };

    let (ok, out, err) = ocifs(&["index", "--push", "--cache-dir", dir, &r], &[]);
    assert!(
        !ok,
        "a lying index was pushed: {}",
        String::from_utf8_lossy(&out)
    );
    assert!(
        err.contains("before publishing") && err.contains(&digest),
        "{err}"
    );
    assert!(!published(), "something was pushed");
    std::fs::write(&waiting, file::encode(&index)).unwrap();
    let tar_out = cache.path().join("export.tar");
    let out_arg = tar_out.to_str().unwrap();
    let (ok, _, err) = ocifs(&["export", "--cache-dir", dir, "-o", out_arg, &r], &[]);
    assert!(
        !ok && err.contains(&digest),
        "a lying index was exported: {err}"
    );
    assert!(!tar_out.exists(), "a failed export left {out_arg}");
    // `cat` reads through it unchecked, except under --verify strict.
    std::fs::write(&waiting, file::encode(&index)).unwrap();
    let strict = [
        "cat",
        "--verify",
        "strict",
        "--cache-dir",
        dir,
        &r,
        "other.txt",
    ];
    let (ok, out, err) = ocifs(&strict, &[]);
    assert!(
        !ok && err.contains(&digest),
        "cat --verify strict read through a lying index: {:?} {err}",
        String::from_utf8_lossy(&out)
    );

    std::fs::write(&waiting, &honest).unwrap();
    let (ok, out, err) = ocifs(&["index", "--push", "--cache-dir", dir, &r], &[]);
    assert!(ok, "index --push of the honest index: {err}");
    assert!(String::from_utf8_lossy(&out).contains("pushed 1 index"));
    assert!(published());
    assert_eq!(std::fs::read(&trusted).unwrap(), honest, "kept as trusted");
    assert!(!waiting.exists());
    let (ok, _, err) = ocifs(&["export", "--cache-dir", dir, "-o", out_arg, &r], &[]);
    assert!(ok, "export: {err}");
    let listed = std::process::Command::new("tar")
        .args(["-tf", out_arg])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("small.txt"));
}

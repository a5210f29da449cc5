//! The layer store's directory as containers/storage reads it, without podman: the lookups
//! podman makes (`R/D/diff`, `info`, `blob`, the `use` and release notices), each layer's own
//! tree with overlay whiteouts, the listing, a tag that moves; and the credentials files
//! podman keeps, which every command reads.

use crate::builder::{self, Enc, encode, file, layout, push};
use crate::fixtures::base_layers;
use crate::harness::{self, Env, Proxy, ocifs, push_index};
use crate::oracle;
use crate::podman_env::LayerStore;
use ocifs::store::{LayerInfo, encode_name};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The layer digests of `reference`, lowest first (from `ocifs inspect`).
fn layer_digests(reference: &str) -> Vec<String> {
    let (ok, out, err) = ocifs(&["inspect", "--json", reference], &[]);
    assert!(ok, "inspect: {err}");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let layers = v["layers"].as_array().unwrap();
    layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the length given.
    let len =
        unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| buf[..len as usize].to_vec())
}

#[test]
fn the_store_answers_as_containers_storage_expects() {
    let Some(env) = Env::new("store") else {
        return;
    };
    let tars = base_layers();
    let layers: Vec<_> = tars.iter().map(|t| encode(t.clone(), Enc::Gzip)).collect();
    let dir = layout(
        &env.work.path().join("v1"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    push(&dir, "v1", &env.reg.addr, "st/image", None);
    let reference = format!("{}/st/image:v1", env.reg.addr);
    let digests = layer_digests(&reference);
    let store = LayerStore::start(&["--verify", "off", "--small-layers", "0"], &[]);
    let r = store.path().join(encode_name(&reference));
    let upper = r.join(&digests[1]);

    // What podman stats, then reads.
    for (i, d) in digests.iter().enumerate() {
        let l = r.join(d);
        assert!(std::fs::metadata(l.join("diff")).unwrap().is_dir());
        let info: LayerInfo =
            serde_json::from_slice(&std::fs::read(l.join("info")).unwrap()).unwrap();
        let want = LayerInfo {
            compressed_digest: d.clone(),
            compressed_size: layers[i].blob.len() as u64,
            diff_digest: builder::sha(&tars[i]),
            diff_size: Some(tars[i].len() as u64),
            compression: 2,
        };
        assert_eq!(info, want);
        let blob = std::fs::read(l.join("blob")).unwrap();
        assert_eq!(builder::sha(&blob), *d, "blob {i}");
    }
    // The notices podman sends are answered ENOENT and counted; other writes are refused.
    let e = std::fs::File::create(upper.join("use")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    let e = std::fs::File::create(upper.join("other")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = std::fs::remove_dir(&upper).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    let e = std::fs::metadata(r.join(builder::sha(b"no such layer"))).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    let stats = store.stats();
    assert_eq!((stats.uses, stats.releases), (1, 1), "{stats:?}");

    // Listings.
    assert_eq!(names(store.path()), [encode_name(&reference)]);
    let mut sorted = digests.clone();
    sorted.sort();
    assert_eq!(names(&r), sorted);
    assert_eq!(names(&upper), ["blob", "diff", "info"]);

    // The lower layer's own tree is the layer extracted; the upper one keeps its whiteouts
    // in overlay form.
    let lower = env.work.path().join("lower");
    oracle::extract(&[&tars[0]], &lower);
    oracle::assert_same(
        &oracle::snapshot(&lower),
        &oracle::snapshot(&r.join(&digests[0]).join("diff")),
    );
    let diff = upper.join("diff");
    for w in ["gone", "gone-dir"] {
        let m = std::fs::symlink_metadata(diff.join(w)).unwrap();
        assert!(
            m.file_type().is_char_device() && m.rdev() == 0,
            "{w}: {m:?}"
        );
    }
    assert_eq!(
        xattr(&diff.join("opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(xattr(&diff.join("etc"), "trusted.overlay.opaque"), None);
    assert!(!diff.join("opq/.wh..wh..opq").exists());
    assert_eq!(
        std::fs::read_to_string(diff.join("opq/upper")).unwrap(),
        "upper"
    );
    assert!(
        !diff.join("opq/lower").exists(),
        "only the layer's own entries"
    );

    // The tag moves: a layer of the new image is looked up under the same directory.
    let mut moved = base_layers();
    moved[1] = builder::tar(&[file("moved", "yes\n")]);
    let layers: Vec<_> = moved.iter().map(|t| encode(t.clone(), Enc::Gzip)).collect();
    let dir = layout(
        &env.work.path().join("v2"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    push(&dir, "v1", &env.reg.addr, "st/image", None);
    let new_top = layer_digests(&reference)[1].clone();
    assert_ne!(new_top, digests[1]);
    // A resolution is taken again only once it is a few seconds old.
    std::thread::sleep(std::time::Duration::from_millis(5500));
    let moved_diff = r.join(&new_top).join("diff");
    assert_eq!(
        std::fs::read_to_string(moved_diff.join("moved")).unwrap(),
        "yes\n"
    );
    // The old layer stays served (a container may still use it).
    assert_eq!(
        std::fs::read_to_string(diff.join("opq/upper")).unwrap(),
        "upper"
    );
    let stats = store.stats();
    assert_eq!(stats.images[0].layers[1], new_top, "{stats:?}");
    let (ok, out, err) = ocifs(&["stats", store.path().to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("layer store: 1 images") && text.contains(&new_top),
        "{text}"
    );
}

/// Every command reads credentials where podman keeps them:
/// `$XDG_RUNTIME_DIR/containers/auth.json`, then `$XDG_CONFIG_HOME/containers/auth.json`.
#[test]
fn credentials_are_read_where_podman_keeps_them() {
    let Some(Env { reg, work }) = Env::without_fuse("podman-auth") else {
        return;
    };
    let proxy = Proxy::start(&reg.addr, Some(("alice", "wonder")));
    let layers = vec![encode(
        builder::tar(&[file("secret", "s3cret\n")]),
        Enc::Gzip,
    )];
    builder::push_one(work.path(), &layers, &reg.addr, "private/image");
    let r = format!("{}/private/image:v1", proxy.addr);
    let cache = work.path().join("cache");
    let cd = cache.to_str().unwrap();
    let cat = |env: &[(&str, &str)]| ocifs(&["cat", "--cache-dir", cd, &r, "secret"], env);
    let runtime = work.path().join("runtime");
    let config = work.path().join("config");
    for d in [&runtime, &config] {
        std::fs::create_dir_all(d.join("containers")).unwrap();
    }
    let (rt, cf) = (runtime.to_str().unwrap(), config.to_str().unwrap());
    let (ok, _, err) = cat(&[("XDG_RUNTIME_DIR", rt), ("XDG_CONFIG_HOME", cf)]);
    assert!(!ok && err.contains("unauthorized"), "{err}");
    harness::write_docker_config(
        &config.join("containers/auth.json"),
        &proxy.addr,
        "alice:wonder",
    );
    let (ok, out, err) = cat(&[("XDG_RUNTIME_DIR", rt), ("XDG_CONFIG_HOME", cf)]);
    assert!(ok, "{err}");
    assert_eq!(out, b"s3cret\n");
    // The runtime directory's file comes first.
    harness::write_docker_config(
        &runtime.join("containers/auth.json"),
        &proxy.addr,
        "alice:wrong",
    );
    let (ok, _, err) = cat(&[("XDG_RUNTIME_DIR", rt), ("XDG_CONFIG_HOME", cf)]);
    assert!(!ok && err.contains("unauthorized"), "{err}");
}

/// Layers are verified as a mount's are: in the background (a bad blob's reads then fail
/// with EIO), or with `--verify strict` before `diff` is shown (the lookup fails, and
/// podman pulls the layer itself, and fails on it too).
#[test]
fn store_layers_are_verified_in_the_background_or_before_they_are_shown() {
    let Some(env) = Env::new("store-verify") else {
        return;
    };
    let mut refs = Vec::new();
    for (name, seed) in [("good", 5), ("bad", 6)] {
        let layers = vec![encode(
            builder::tar(&[file("data", crate::builder::noise(300_000, seed))]),
            Enc::Tar,
        )];
        let dir = layout(
            &env.work.path().join(name),
            "v1",
            &[("linux", "amd64", None, &layers)],
        );
        push(&dir, "v1", &env.reg.addr, &format!("verify/{name}"), None);
        let d = builder::sha(&layers[0].blob);
        if name == "bad" {
            // One byte flipped in the stored blob.
            let path = env.reg.blob_path(&d);
            let mut bytes = std::fs::read(&path).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            std::fs::write(&path, bytes).unwrap();
        }
        refs.push((format!("{}/verify/{name}:v1", env.reg.addr), d));
    }
    let diff = |store: &LayerStore, (r, d): &(String, String)| {
        store.path().join(encode_name(r)).join(d).join("diff")
    };
    let store = LayerStore::start(&["--small-layers", "0"], &[]);
    for r in &refs {
        assert!(std::fs::metadata(diff(&store, r)).unwrap().is_dir());
    }
    let settled = store.poll_stats(|s| {
        s.layers.len() == 2
            && s.layers
                .iter()
                .all(|l| l.layers[0].verification != "pending")
    });
    let state = |d: &str| {
        let l = settled.layers.iter().find(|l| l.digest == d).unwrap();
        l.layers[0].verification.clone()
    };
    assert_eq!(state(&refs[0].1), "verified", "{settled:?}");
    assert!(state(&refs[1].1).starts_with("bad"), "{settled:?}");
    let good = std::fs::read(diff(&store, &refs[0]).join("data")).unwrap();
    assert_eq!(good, crate::builder::noise(300_000, 5));
    let e = std::fs::read(diff(&store, &refs[1]).join("data")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Nor is the bad blob handed out whole (for `podman push` or `save`); the good one is.
    let blob = |r: &(String, String)| std::fs::read(diff(&store, r).parent().unwrap().join("blob"));
    assert_eq!(builder::sha(&blob(&refs[0]).unwrap()), refs[0].1);
    let e = blob(&refs[1]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");

    let strict = LayerStore::start(&["--verify", "strict", "--small-layers", "0"], &[]);
    assert!(std::fs::metadata(diff(&strict, &refs[0])).unwrap().is_dir());
    let e = std::fs::metadata(diff(&strict, &refs[1])).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
}

/// `ocifs store --foreground` serves until SIGTERM, then unmounts and exits cleanly; `ocifs
/// umount` stops the detached daemon (see `LayerStore`'s drop).
#[test]
fn a_foreground_store_unmounts_on_sigterm() {
    let Some(env) = Env::new("store-fg") else {
        return;
    };
    let dir = crate::harness::TempDir::new("store-fg");
    let cache = env.work.path().join("cache");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ocifs"))
        .args([
            "store",
            "--foreground",
            "--cache-dir",
            cache.to_str().unwrap(),
        ])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mounted = || {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let d = dir.path().to_str().unwrap();
        info.lines().any(|l| l.split(' ').nth(4) == Some(d))
    };
    for _ in 0..400 {
        if mounted() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(mounted(), "the store was not mounted");
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(!mounted(), "still mounted");
}

/// The published gzip indexes in `reg`'s storage (blobs starting with the index magic), as
/// (digest, size).
fn published_indexes(reg: &harness::Registry) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    for prefix in std::fs::read_dir(reg.blobs_dir()).unwrap() {
        for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let blob = blob.unwrap();
            let data = std::fs::read(blob.path().join("data")).unwrap();
            if data.starts_with(b"OCIFSGZI") {
                let hex = blob.file_name().to_string_lossy().into_owned();
                found.push((format!("sha256:{hex}"), data.len() as u64));
            }
        }
    }
    found
}

/// Bytes the registry wrote for GETs of blob `digest`, once they stop growing.
fn bytes_served(reg: &harness::Registry, digest: &str) -> u64 {
    let log = reg.dir.path().join("registry.log");
    let read = || {
        let text = std::fs::read_to_string(&log).unwrap();
        harness::blob_gets_in(&text, true)
            .get(digest)
            .map_or(0, |&(_, bytes)| bytes)
    };
    // The access log line follows the answer's last byte.
    let mut last = read();
    for _ in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = read();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// The store fetches each layer's published index once, as it resolves the image (the early
/// fetch is the one the layer takes), and an image that shares a layer opened before does
/// not fetch that layer's index again (it is kept).
#[test]
fn the_store_fetches_a_published_index_once_and_not_again_for_a_shared_layer() {
    let Some(env) = Env::new("stidx") else {
        return;
    };
    let gz = |name: &str, seed| {
        let tar = builder::tar(&[
            file(&format!("{name}.txt"), format!("{name}\n")),
            file(&format!("{name}.bin"), builder::noise(6 << 20, seed)),
        ]);
        encode(tar, Enc::Gzip)
    };
    let (shared, own) = (gz("shared", 1), gz("own", 2));
    let work = env.work.path();
    builder::push_one(
        work,
        std::slice::from_ref(&shared),
        &env.reg.addr,
        "stidx/a",
    );
    builder::push_one(work, &[shared, own], &env.reg.addr, "stidx/b");
    let (a, b) = (
        format!("{}/stidx/a:v1", env.reg.addr),
        format!("{}/stidx/b:v1", env.reg.addr),
    );
    for r in [&a, &b] {
        assert!(push_index(r, &["--span", "1MiB"]).contains("pushed"));
    }
    let indexes = published_indexes(&env.reg);
    assert_eq!(indexes.len(), 2, "one index per layer: {indexes:?}");
    let (da, db) = (layer_digests(&a), layer_digests(&b));
    let store = LayerStore::start(
        &[
            "--verify",
            "off",
            "--small-layers",
            "0",
            "--no-whole-files",
            "--no-prefetch",
        ],
        &[],
    );
    let served = |indexes: &[(String, u64)]| -> Vec<u64> {
        let served = indexes.iter().map(|(d, _)| bytes_served(&env.reg, d));
        served.collect()
    };
    let before = served(&indexes);
    assert_eq!(before, [0, 0], "the indexes were fetched before the store");

    let diff = |r: &str, d: &str| store.path().join(encode_name(r)).join(d).join("diff");
    assert!(std::fs::metadata(diff(&a, &da[0])).unwrap().is_dir());
    let after_a = served(&indexes);
    let fetched: Vec<bool> = after_a.iter().map(|&n| n > 0).collect();
    assert_eq!(
        fetched.iter().filter(|&&f| f).count(),
        1,
        "image a has one layer: {after_a:?}"
    );
    let shared_index = fetched.iter().position(|&f| f).unwrap();
    assert_eq!(
        after_a[shared_index], indexes[shared_index].1,
        "the shared layer's index was fetched more than once"
    );

    // Image b: its first layer is open already; only its own layer's index comes.
    assert!(std::fs::metadata(diff(&b, &db[1])).unwrap().is_dir());
    let after_b = served(&indexes);
    let own_index = 1 - shared_index;
    assert_eq!(
        after_b[shared_index], after_a[shared_index],
        "image b fetched the index of the layer image a opened"
    );
    assert_eq!(after_b[own_index], indexes[own_index].1, "{after_b:?}");
    assert_eq!(
        std::fs::read_to_string(diff(&b, &db[1]).join("own.txt")).unwrap(),
        "own\n"
    );
}

/// Layers start opening beside the image's config: a config the registry serves wrong (its
/// digest does not match) makes the reference's lookup and its layers' lookups fail, so
/// podman pulls by itself; once the registry serves it right again, the store serves the
/// image (failures are kept only briefly).
#[test]
fn a_config_served_wrong_fails_the_lookups_and_the_store_heals() {
    let Some(env) = Env::new("store-config") else {
        return;
    };
    let layers = vec![encode(
        builder::tar(&[file("hello.txt", "hello\n")]),
        Enc::Gzip,
    )];
    builder::push_one(env.work.path(), &layers, &env.reg.addr, "stcfg/image");
    let r = format!("{}/stcfg/image:v1", env.reg.addr);
    let d = layer_digests(&r).remove(0);
    let (ok, manifest, err) = ocifs(&["manifest", &r], &[]);
    assert!(ok, "manifest: {err}");
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let config = m["config"]["digest"].as_str().unwrap().to_string();
    let path = env.reg.blob_path(&config);
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 2;
    bad[last] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();

    let store = LayerStore::start(&["--small-layers", "0"], &[]);
    let image = store.path().join(encode_name(&r));
    assert!(
        std::fs::metadata(&image).is_err(),
        "a reference whose config is wrong was served"
    );
    assert!(
        std::fs::metadata(image.join(&d).join("diff")).is_err(),
        "a layer of a reference whose config is wrong was served"
    );

    std::fs::write(&path, &good).unwrap();
    // Failed resolutions and openings are retried after 2 s.
    let mut served = false;
    for _ in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(250));
        if std::fs::metadata(image.join(&d).join("diff")).is_ok() {
            served = true;
            break;
        }
    }
    assert!(
        served,
        "the store did not serve the image once its config was right"
    );
    assert_eq!(
        std::fs::read_to_string(image.join(&d).join("diff/hello.txt")).unwrap(),
        "hello\n"
    );
}

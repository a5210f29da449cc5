//! podman starting containers from `ocifs store`: for every layer format, `podman run` of an
//! image that exists only in the test registry takes each layer from the store (its `diff`
//! becomes a symlink into it), prints what the image holds, fetches a fraction of the
//! layers, and the pulled image, merged by overlayfs, is the extracted layers (the oracle):
//! whiteouts and opaque directories across layers included. A layer two images share is
//! opened once; idle layers are released and opened again; lookups that fail (unknown
//! references, unreachable registries, bad layers) make podman pull by itself.

use crate::builder::{self, Enc, EncodedLayer, Item, encode, file, layout, noise, push};
use crate::conformance::expected_tree;
use crate::fixtures::base_layers;
use crate::harness::{Env, Proxy, free_port, ocifs, push_index, write_docker_config};
use crate::oracle;
use crate::podman_env::{LayerStore, Podman, podman_available};
use std::path::Path;
use std::sync::atomic::Ordering;

/// A layer with busybox at /bb/busybox and, with `big`, a large file nothing reads (what
/// makes a lazy start visibly lazy).
fn busybox_layer(big: bool) -> Vec<u8> {
    let mut items = vec![
        Item::Dir("bb", 0o755),
        Item::File(
            "bb/busybox".into(),
            std::fs::read("/bin/busybox").expect("busybox (busybox-static)"),
            0o755,
        ),
    ];
    if big {
        items.push(Item::Dir("data", 0o755));
        items.push(file("data/big.bin", noise(32 << 20, 18)));
    }
    builder::tar(&items)
}

/// What the test commands print from the base layers (`fixtures::base_layers`): a directory
/// replaced by a file, an opaque directory, two whiteouts (a file and a directory), a file of
/// the upper layer. (Not `/etc/hostname`: podman mounts its own there.)
const SCRIPT: &str = "B=/bb/busybox; $B cat /replaced-dir; $B ls /opq; \
    [ -e /gone ] || echo gone; [ -e /gone-dir ] || echo gone-dir; $B cat /newfile; echo";
const PRINTED: &str = "now a file\nupper\ngone\ngone-dir\nnew\n";

/// How a test image's layers are stored in the registry.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stored {
    Estargz,
    /// gzip, with a checkpoint index published beside the image.
    GzipIndexed,
    /// gzip alone: the store builds the index when the layer is first looked up.
    Gzip,
    ZstdChunked,
    Tar,
}

/// Builds the image of `tars` stored as `how`, pushes it to `env`'s registry as
/// `repo:v1`; returns the encoded layers (their tars are the oracle's).
fn push_image(env: &Env, repo: &str, tars: &[Vec<u8>], how: Stored) -> Vec<EncodedLayer> {
    let enc = match how {
        Stored::Estargz => Enc::Estargz,
        Stored::Gzip | Stored::GzipIndexed => Enc::Gzip,
        Stored::ZstdChunked | Stored::Tar => Enc::Tar,
    };
    let layers: Vec<_> = tars.iter().map(|t| encode(t.clone(), enc)).collect();
    let dir = layout(
        &env.work
            .path()
            .join(format!("layout-{}", repo.replace('/', "_"))),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    match how {
        Stored::ZstdChunked => {
            builder::push_recompressed(&dir, "v1", &env.reg.addr, repo, "zstd:chunked")
        }
        _ => push(&dir, "v1", &env.reg.addr, repo, None),
    }
    if how == Stored::GzipIndexed {
        let out = push_index(&format!("{}/{repo}:v1", env.reg.addr), &["--span", "1MiB"]);
        assert!(
            out.contains(&format!("pushed {} index", tars.len())),
            "{out}"
        );
    }
    layers
}

/// The compressed sizes of `reference`'s layers, and their formats, as `ocifs inspect` sees
/// them.
fn layer_sizes(reference: &str) -> (u64, Vec<String>) {
    let (ok, out, err) = ocifs(&["inspect", "--json", reference], &[]);
    assert!(ok, "inspect: {err}");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let layers = v["layers"].as_array().unwrap();
    let total = layers.iter().map(|l| l["size"].as_u64().unwrap()).sum();
    let formats = layers
        .iter()
        .map(|l| l["format"].as_str().unwrap_or("").to_string());
    (total, formats.collect())
}

/// `podman run` of an image stored as `how`, served by the store, then the oracle.
fn podman_runs_lazily(how: Stored) {
    if !podman_available() {
        return;
    }
    let Some(env) = Env::new("podman") else {
        return;
    };
    let proxy = Proxy::start(&env.reg.addr, None);
    let mut tars = vec![busybox_layer(true)];
    tars.extend(base_layers());
    let layers = push_image(&env, "pod/image", &tars, how);
    let reference = format!("{}/pod/image:v1", proxy.addr);
    let (total, _) = layer_sizes(&reference);
    let (_, expected) = expected_tree(&env.work, &layers);

    let store = LayerStore::start(&["--verify", "off", "--small-layers", "0"], &[]);
    let podman = Podman::new(store.path(), &[&proxy.addr], &[]);
    proxy.reset();
    let out = podman.ok(&["run", "--rm", &reference, "/bb/busybox", "sh", "-c", SCRIPT]);
    assert_eq!(out, PRINTED);
    let fetched = proxy.blob_bytes.load(Ordering::SeqCst);

    // Every layer came from the store: podman's layers are symlinks into it, and it told
    // the store it uses them.
    assert_eq!(podman.layers_from(store.path()), 3, "layers from the store");
    let stats = store.stats();
    assert_eq!(stats.images.len(), 1, "{stats:?}");
    assert_eq!(stats.images[0].reference, reference);
    assert_eq!(stats.layers.len(), 3, "{stats:?}");
    assert!(stats.uses >= 3, "{stats:?}");
    let format = |s: &ocifs::stats::MountStats| s.layers[0].format.clone();
    let index = |s: &ocifs::stats::MountStats| s.layers[0].index.clone().unwrap_or_default();
    for s in &stats.layers {
        match how {
            Stored::Estargz => assert_eq!(format(s), "estargz"),
            Stored::ZstdChunked => assert_eq!(format(s), "zstd:chunked"),
            Stored::Tar => assert_eq!(format(s), "tar"),
            Stored::GzipIndexed => assert!(index(s).contains("registry"), "{s:?}"),
            Stored::Gzip => assert_eq!(index(s), "built"),
        }
    }
    // A fraction of the layers was fetched (building an index reads a layer whole).
    if how != Stored::Gzip {
        assert!(
            fetched * 3 < total,
            "{how:?}: fetched {fetched} of {total} bytes"
        );
    }

    // The lazily pulled image, merged by overlayfs, is the extracted layers.
    let mounted = podman.ok(&["image", "mount", &reference]);
    oracle::assert_same(&expected, &oracle::snapshot(Path::new(mounted.trim())));
    podman.ok(&["image", "unmount", &reference]);
}

#[test]
fn podman_runs_estargz_lazily() {
    podman_runs_lazily(Stored::Estargz);
}

#[test]
fn podman_runs_gzip_with_a_published_index_lazily() {
    podman_runs_lazily(Stored::GzipIndexed);
}

#[test]
fn podman_runs_gzip_without_an_index() {
    podman_runs_lazily(Stored::Gzip);
}

#[test]
fn podman_runs_zstd_chunked_lazily() {
    podman_runs_lazily(Stored::ZstdChunked);
}

#[test]
fn podman_runs_uncompressed_tar_lazily() {
    podman_runs_lazily(Stored::Tar);
}

/// Two images sharing their base layer: the store opens it once and serves both; released
/// when idle, every layer is opened again when podman next needs it, and serves the same
/// tree.
#[test]
fn a_shared_base_layer_is_opened_once_and_idle_layers_come_back() {
    if !podman_available() {
        return;
    }
    let Some(env) = Env::new("podman-share") else {
        return;
    };
    let base = busybox_layer(false);
    let a = builder::tar(&[file("which", "a\n")]);
    let b = builder::tar(&[file("which", "b\n")]);
    // gzip (flate2 encodes a tar the same way twice): one base blob in both images; its
    // index is built once and kept, and an idle layer comes back from it.
    push_image(&env, "share/a", &[base.clone(), a], Stored::Gzip);
    let layers_b = push_image(&env, "share/b", &[base, b], Stored::Gzip);
    let (ra, rb) = (
        format!("{}/share/a:v1", env.reg.addr),
        format!("{}/share/b:v1", env.reg.addr),
    );
    let store = LayerStore::start(&["--verify", "off", "--release-after", "1s"], &[]);
    let podman = Podman::new(store.path(), &[&env.reg.addr], &[]);
    let which = ["/bb/busybox", "cat", "/which"];
    let run = |r: &str| podman.ok(&[&["run", "--rm", r][..], &which[..]].concat());
    assert_eq!(run(&ra), "a\n");
    assert_eq!(run(&rb), "b\n");
    let stats = store.stats();
    assert_eq!(stats.images.len(), 2, "{stats:?}");
    assert_eq!(
        stats.images[0].layers[0], stats.images[1].layers[0],
        "one base layer"
    );
    // Both images' layers are podman's from the store, the base opened once (or, released
    // meanwhile, not open at all).
    let base_digest = &stats.images[0].layers[0];
    let opened = stats
        .layers
        .iter()
        .filter(|l| &l.digest == base_digest)
        .count();
    assert!(opened <= 1, "{stats:?}");
    assert!(podman.layers_from(store.path()) >= 3);

    // Idle layers are released; podman's next container opens them again.
    let idle = store.poll_stats(|s| s.layers.is_empty());
    assert!(idle.layers.is_empty() && idle.released >= 3, "{idle:?}");
    assert_eq!(run(&rb), "b\n");
    let (_, expected) = expected_tree(&env.work, &layers_b);
    let mounted = podman.ok(&["image", "mount", &rb]);
    oracle::assert_same(&expected, &oracle::snapshot(Path::new(mounted.trim())));
    podman.ok(&["image", "unmount", &rb]);
    assert!(store.stats().layers.len() >= 2);
}

/// Unknown references, unreachable registries, names that are no reference and layers that
/// fail to open are lookup errors, so podman pulls the image by itself; and the store reads
/// credentials where podman does (`REGISTRY_AUTH_FILE` here).
#[test]
fn failed_lookups_make_podman_pull_by_itself_and_credentials_are_podmans() {
    if !podman_available() {
        return;
    }
    let Some(env) = Env::new("podman-fail") else {
        return;
    };
    let proxy = Proxy::start(&env.reg.addr, Some(("alice", "wonder")));
    let auth = env.work.path().join("auth.json");
    write_docker_config(&auth, &proxy.addr, "alice:wonder");
    let auth_env = [("REGISTRY_AUTH_FILE", auth.to_str().unwrap())];
    let store = LayerStore::start(&["--verify", "off", "--lookup-timeout", "20s"], &auth_env);

    let name = |r: &str| store.path().join(ocifs::store::encode_name(r));
    let unknown = format!("{}/no/such:v1", env.reg.addr);
    let unreachable = format!("127.0.0.1:{}/x/y:v1", free_port());
    for p in [
        name(&unknown),
        name(&unreachable),
        store.path().join("pool"),
    ] {
        let e = std::fs::metadata(&p).unwrap_err();
        assert!(e.raw_os_error().is_some(), "{p:?}: {e}");
    }
    assert!(store.stats().images.is_empty());

    // An eStargz layer whose TOC digest annotation is wrong fails to open: podman pulls it.
    let mut tars = vec![busybox_layer(false)];
    tars.push(builder::tar(&[file("hello", "hello\n")]));
    let mut layers: Vec<_> = tars.into_iter().map(|t| encode(t, Enc::Estargz)).collect();
    layers[1].annotations[0].1 = builder::sha(b"not the TOC");
    let dir = layout(
        &env.work.path().join("bad"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    push(&dir, "v1", &env.reg.addr, "bad/image", None);
    let reference = format!("{}/bad/image:v1", proxy.addr);
    let podman = Podman::new(store.path(), &[&proxy.addr], &auth_env);
    let out = podman.ok(&["run", "--rm", &reference, "/bb/busybox", "cat", "/hello"]);
    assert_eq!(out, "hello\n");
    // The good layer came from the store through the token-guarded proxy (with the
    // credentials podman uses); the bad one was pulled.
    assert_eq!(podman.layers_from(store.path()), 1);
    let stats = store.stats();
    assert_eq!(stats.images.len(), 1, "{stats:?}");
    assert_eq!(stats.layers.len(), 1, "{stats:?}");
    assert_eq!(stats.layers[0].digest, stats.images[0].layers[0]);
    assert!(proxy.tokens_issued.load(Ordering::SeqCst) > 0);
}

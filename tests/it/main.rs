//! The integration test binary: real registry, real encoders, real FUSE mounts, and the
//! extract-and-compare oracle. See harness.rs for what CI=true requires.

mod builder;
mod harness;
mod hostile;
mod oracle;

use builder::{Enc, Item, encode, file, layout, noise, push};
use harness::{Mount, Proxy, Registry, TempDir, ocifs, push_index, require};
use std::sync::atomic::Ordering;
use std::time::Duration;

const TOOLS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "tar",
    "gzip",
    "pigz",
    "zstd",
    "go",
    "htpasswd",
    "python3",
    "flatc",
];

fn long_name() -> String {
    format!("deep/{}", "n".repeat(120))
}

/// Two layers that exercise every entry kind, whiteouts, opaque dirs and replacements.
fn base_layers() -> Vec<Vec<u8>> {
    let l0 = builder::tar(&[
        Item::Dir("etc", 0o755),
        file("etc/hostname", "ocifs\n"),
        Item::Dir("bin", 0o755),
        Item::File("bin/tool".into(), noise(300_000, 1), 0o4755),
        Item::Symlink("bin/sh", "tool"),
        Item::Symlink("abs", "/etc/hostname"),
        Item::Hardlink("bin/tool-link", "bin/tool"),
        file("empty", ""),
        Item::Fifo("fifo"),
        Item::Char("null", 1, 3),
        Item::Owned(
            "owned",
            b"x".to_vec(),
            1234,
            5678,
            vec![("user.comment", b"hello\0bin")],
        ),
        file("ünïcødé-文件.txt", "unicode\n"),
        Item::Dir("deep", 0o700),
        file(&long_name(), "long name\n"),
        Item::Dir("gone-dir", 0o755),
        file("gone-dir/x", "x"),
        file("gone", "gone"),
        Item::Dir("opq", 0o755),
        file("opq/lower", "lower"),
        Item::Dir("replaced-dir", 0o755),
        file("replaced-dir/f", "f"),
        file("tobelinked", "shared"),
    ]);
    let l1 = builder::tar(&[
        file(".wh.gone", ""),
        file(".wh.gone-dir", ""),
        Item::Dir("opq", 0o751),
        file("opq/.wh..wh..opq", ""),
        file("opq/upper", "upper"),
        file("replaced-dir", "now a file\n"),
        Item::Dir("etc", 0o755),
        file("etc/hostname", "changed\n"),
        file("newfile", "new"),
        Item::Hardlink("linked2", "newfile"),
    ]);
    vec![l0, l1]
}

/// Builds, pushes, mounts and compares one image whose layers use `encs`.
fn conformance(encs: &[Enc], tars: Vec<Vec<u8>>) {
    conformance_with(encs, tars, &[], false)
}

/// [`conformance`] with extra mount flags, optionally letting skopeo (Go) gzip the layers.
fn conformance_with(encs: &[Enc], tars: Vec<Vec<u8>>, flags: &[&str], go_gzip: bool) {
    if !require(TOOLS, true) {
        return;
    }
    let layers: Vec<_> = tars
        .into_iter()
        .zip(encs.iter().cycle())
        .map(|(t, e)| encode(t, *e))
        .collect();
    conformance_layers(layers, flags, go_gzip, None);
}

/// The oracle: `layers` extracted in order (whiteouts applied) under `work/expected`; its
/// root and snapshot.
fn expected_tree(
    work: &TempDir,
    layers: &[builder::EncodedLayer],
) -> (
    std::path::PathBuf,
    std::collections::BTreeMap<String, oracle::Info>,
) {
    let root = work.path().join("expected");
    let tar_refs: Vec<&[u8]> = layers.iter().map(|l| l.tar.as_slice()).collect();
    oracle::extract(&tar_refs, &root);
    let snapshot = oracle::snapshot(&root);
    (root, snapshot)
}

/// [`conformance`] of encoded layers; `formats`, if given, must appear in the ready line.
fn conformance_layers(
    layers: Vec<builder::EncodedLayer>,
    flags: &[&str],
    go_gzip: bool,
    formats: Option<&str>,
) {
    let reg = Registry::start(None);
    let work = TempDir::new("conf");
    let dir = layout(
        &work.path().join("layout"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    if go_gzip {
        builder::push_go_gzip(&dir, "v1", &reg.addr, "conf/image");
    } else {
        push(&dir, "v1", &reg.addr, "conf/image", None);
    }
    let (expected_root, expected) = expected_tree(&work, &layers);

    let reference = format!("{}/conf/image:v1", reg.addr);
    let mut mount_flags = vec!["--platform", "linux/amd64"];
    mount_flags.extend_from_slice(flags);
    let m = Mount::new(&reference, &mount_flags, &[]);
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    // Every file and directory was opened; the kernel asked the daemon once of each kind and
    // then opened the rest without a round trip.
    let (ok, out, err) = ocifs(&["stats", "--json", m.path().to_str().unwrap()], &[]);
    assert!(ok, "stats: {err}");
    let stats: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(stats["reads"]["opens"].as_u64().unwrap() <= 2, "{stats}");
    if let Some(f) = formats {
        assert!(m.ready.contains(f), "{f} expected: {}", m.ready);
    }

    // The same tree through `ls -R` and `cat`, without a mount.
    let cache = TempDir::new("lscache");
    let cd = cache.path().to_str().unwrap();
    let (ok, out, err) = ocifs(
        &[
            "ls",
            "-R",
            "--cache-dir",
            cd,
            "--platform",
            "linux/amd64",
            &reference,
        ],
        &[],
    );
    assert!(ok, "ls: {err}");
    let listed: Vec<String> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(listed, expected.keys().cloned().collect::<Vec<_>>());
    for p in [
        "etc/hostname",
        "bin/tool",
        "opq/upper",
        "ünïcødé-文件.txt",
        "bin/sh",
    ] {
        if !expected.contains_key(p) {
            continue;
        }
        let (ok, out, err) = ocifs(
            &[
                "cat",
                "--cache-dir",
                cd,
                "--platform",
                "linux/amd64",
                &reference,
                p,
            ],
            &[],
        );
        assert!(ok, "cat {p}: {err}");
        let want = std::fs::read(expected_root.join(p)).unwrap();
        assert!(
            out == want,
            "cat {p}: {} bytes differ from the extracted {}",
            out.len(),
            want.len()
        );
    }
}

#[test]
fn conformance_uncompressed_tar() {
    conformance(&[Enc::Tar], base_layers());
}

#[test]
fn conformance_gzip_flate2() {
    conformance(&[Enc::Gzip], base_layers());
}

#[test]
fn conformance_gzip_gnu_and_pigz_members() {
    conformance(&[Enc::GnuGzip, Enc::Pigz], base_layers());
}

#[test]
fn conformance_zstd() {
    conformance(&[Enc::Zstd], base_layers());
}

#[test]
fn conformance_estargz() {
    conformance(&[Enc::Estargz], base_layers());
}

#[test]
fn conformance_mixed_formats() {
    let mut tars = base_layers();
    tars.push(builder::tar(&[
        Item::Dir("bin", 0o755),
        file("bin/third", "third layer"),
    ]));
    conformance(&[Enc::Estargz, Enc::Tar, Enc::Zstd], tars);
}

#[test]
fn ten_thousand_files_estargz_and_gzip() {
    let mut items = vec![Item::Dir("many", 0o755)];
    for i in 0..10_500 {
        items.push(file(&format!("many/f{i:05}"), format!("file {i}\n")));
    }
    let tars = vec![builder::tar(&items)];
    conformance(&[Enc::Estargz], tars.clone());
    // Without its TOC annotation an eStargz layer is found by its footer; its TOC (larger
    // than the small tail read made then) is fetched after it.
    if require(TOOLS, true) {
        let mut bare = encode(tars[0].clone(), Enc::Estargz);
        bare.annotations.clear();
        conformance_layers(vec![bare], &[], false, Some("(estargz)"));
    }
    conformance(&[Enc::Gzip], tars);
}

#[test]
fn multi_platform_index_chooses_and_explains() {
    if !require(TOOLS, false) {
        return;
    }
    let reg = Registry::start(None);
    let work = TempDir::new("multi");
    let amd = vec![encode(builder::tar(&[file("arch", "amd64\n")]), Enc::Gzip)];
    let arm = vec![encode(builder::tar(&[file("arch", "arm64\n")]), Enc::Gzip)];
    let dir = layout(
        work.path(),
        "multi",
        &[
            ("linux", "amd64", None, &amd),
            ("linux", "arm64", Some("v8"), &arm),
        ],
    );
    push(&dir, "multi", &reg.addr, "multi/image", None);
    let r = format!("{}/multi/image:multi", reg.addr);
    let cd = work.path().join("cache");
    let cd = cd.to_str().unwrap();
    for (platform, want) in [
        ("linux/arm64/v8", "arm64\n"),
        ("linux/arm64", "arm64\n"),
        ("linux/amd64", "amd64\n"),
    ] {
        let (ok, out, err) = ocifs(
            &["cat", "--cache-dir", cd, "--platform", platform, &r, "arch"],
            &[],
        );
        assert!(ok, "{platform}: {err}");
        assert_eq!(String::from_utf8(out).unwrap(), want);
    }
    let (ok, _, err) = ocifs(
        &["ls", "--cache-dir", cd, "--platform", "linux/s390x", &r],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("linux/s390x")
            && err.contains("linux/amd64")
            && err.contains("linux/arm64/v8"),
        "{err}"
    );
    let (ok, out, err) = ocifs(&["inspect", "--json", "--platform", "linux/arm64", &r], &[]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["platforms"].as_array().unwrap().len(), 2);
    assert_eq!(v["layers"][0]["format"], "gzip");
    assert!(v["index"].as_str().unwrap().starts_with("sha256:"));

    // Converting keeps the index: every platform becomes eStargz.
    let dst = format!("{}/multi/esgz:multi", reg.addr);
    let (ok, _, err) = ocifs(&["convert", "--estargz", "--cache-dir", cd, &r, &dst], &[]);
    assert!(ok, "convert: {err}");
    for (platform, want) in [("linux/arm64", "arm64\n"), ("linux/amd64", "amd64\n")] {
        let (ok, out, err) = ocifs(&["inspect", "--json", "--platform", platform, &dst], &[]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (
                v["layers"][0]["format"].as_str(),
                v["platforms"].as_array().map(Vec::len)
            ),
            (Some("estargz"), Some(2))
        );
        let (ok, out, err) = ocifs(
            &[
                "cat",
                "--cache-dir",
                cd,
                "--platform",
                platform,
                &dst,
                "arch",
            ],
            &[],
        );
        assert!(ok, "{err}");
        assert_eq!(String::from_utf8(out).unwrap(), want);
    }
}

#[test]
fn estargz_reads_are_lazy() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("lazy");
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
    // Ready in 3 requests: the manifest, then the config alongside one read of the blob's
    // tail (footer and TOC).
    assert_eq!(proxy.requests.load(Ordering::SeqCst), 3, "{}", m.ready);
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

/// A small layer is fetched whole as soon as the mount is ready (one streamed request), so
/// every read of it is then local; a large layer beside it stays lazy; `--small-layers 0`
/// fetches nothing ahead.
#[test]
fn small_layers_are_fetched_whole_at_mount_and_large_ones_stay_lazy() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("small");
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
    let fetched_whole =
        |v: &serde_json::Value| v["layers"][1]["fetchedBytes"].as_u64().unwrap() >= small_size;
    let v = poll_stats(m.path(), fetched_whole);
    assert!(fetched_whole(&v), "the small layer was not fetched: {v}");
    assert_eq!(v["prefetch"]["smallLayerBytes"], small_size, "{v}");
    let big_fetched = v["layers"][0]["fetchedBytes"].as_u64().unwrap();
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
    let (ok, out, err) = ocifs(&["stats", "--json", m.path().to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["prefetch"]["smallLayerBytes"], 0, "{v}");
    assert!(
        v["layers"][1]["fetchedBytes"].as_u64().unwrap() < small_size,
        "fetched ahead with --small-layers 0: {v}"
    );
}

#[test]
fn bearer_token_and_basic_auth() {
    if !require(TOOLS, false) {
        return;
    }
    let work = TempDir::new("auth");
    let layers = vec![encode(
        builder::tar(&[file("secret", "s3cret\n")]),
        Enc::Gzip,
    )];
    let dir = layout(
        &work.path().join("layout"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );

    // Basic auth on the registry itself (htpasswd).
    let reg = Registry::start(Some(("alice", "wonder")));
    push(&dir, "v1", &reg.addr, "private/image", Some("alice:wonder"));
    let config = work.path().join("config.json");
    let write_cfg =
        |host: &str, user_pass: &str| harness::write_docker_config(&config, host, user_pass);
    let cfg = config.to_str().unwrap().to_string();
    let cd = work.path().join("cache");
    let cd = cd.to_str().unwrap().to_string();
    let r = format!("{}/private/image:v1", reg.addr);
    write_cfg(&reg.addr, "alice:wonder");
    let (ok, out, err) = ocifs(
        &["cat", "--cache-dir", &cd, &r, "secret"],
        &[("REGISTRY_AUTH_FILE", &cfg)],
    );
    assert!(ok, "basic: {err}");
    assert_eq!(out, b"s3cret\n");
    write_cfg(&reg.addr, "alice:wrong");
    let (ok, _, err) = ocifs(
        &["ls", "--cache-dir", &cd, &r],
        &[("REGISTRY_AUTH_FILE", &cfg)],
    );
    assert!(!ok && err.contains("unauthorized"), "{err}");
    let (ok, _, err) = ocifs(&["ls", "--cache-dir", &cd, &r], &[]);
    assert!(
        !ok && err.contains("unauthorized") && err.contains("credentials"),
        "{err}"
    );
    // Credential helpers: `credHelpers` for this host, then `credsStore`, as Docker does.
    // The helper checks it is asked about this registry and answers alice's password.
    let bin = work.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-ocifstest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread -r server\n[ \"$server\" = \"{}\" ] || {{ echo 'credentials not found in native keychain'; exit 1; }}\necho '{{\"ServerURL\":\"'$server'\",\"Username\":\"alice\",\"Secret\":\"wonder\"}}'\n",
            reg.addr
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for cfg_json in [
        format!(r#"{{"credHelpers":{{"{}":"ocifstest"}}}}"#, reg.addr),
        r#"{"credsStore":"ocifstest","auths":{}}"#.to_string(),
    ] {
        std::fs::write(&config, &cfg_json).unwrap();
        let (ok, out, err) = ocifs(
            &["cat", "--cache-dir", &cd, &r, "secret"],
            &[("REGISTRY_AUTH_FILE", &cfg), ("PATH", &path)],
        );
        assert!(ok && out == b"s3cret\n", "helper via {cfg_json}: {err}");
    }
    // A helper that has nothing for this registry: anonymous, refused by the registry.
    std::fs::write(&config, r#"{"credsStore":"ocifstest"}"#).unwrap();
    let other = format!("localhost:{}", reg.addr.rsplit(':').next().unwrap());
    let (ok, _, err) = ocifs(
        &[
            "ls",
            "--cache-dir",
            &cd,
            &format!("{other}/private/image:v1"),
        ],
        &[("REGISTRY_AUTH_FILE", &cfg), ("PATH", &path)],
    );
    assert!(!ok && err.contains("unauthorized"), "{err}");

    // Bearer tokens from a token endpoint in front of an open registry.
    let open = Registry::start(None);
    push(&dir, "v1", &open.addr, "private/image", None);
    let proxy = Proxy::start(&open.addr, Some(("bob", "builder")));
    let r = format!("{}/private/image:v1", proxy.addr);
    write_cfg(&proxy.addr, "bob:builder");
    let (ok, out, err) = ocifs(
        &["cat", "--cache-dir", &cd, &r, "secret"],
        &[("REGISTRY_AUTH_FILE", &cfg)],
    );
    assert!(ok, "bearer: {err}");
    assert_eq!(out, b"s3cret\n");
    let issued = proxy.tokens_issued.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&issued),
        "tokens are cached per scope, issued {issued}"
    );
    write_cfg(&proxy.addr, "bob:nope");
    let (ok, _, err) = ocifs(
        &["cat", "--cache-dir", &cd, &r, "secret"],
        &[("REGISTRY_AUTH_FILE", &cfg)],
    );
    assert!(
        !ok && err.contains("unauthorized") && err.contains("token server"),
        "{err}"
    );
}

#[test]
fn blob_redirects_are_followed_without_credentials_reused_and_renewed() {
    if !require(TOOLS, false) {
        return;
    }
    let reg = Registry::start(None);
    let work = TempDir::new("redirect");
    // A filler between the two files keeps read-ahead of a.bin away from b.bin's blocks.
    let tar = builder::tar(&[
        file("a.bin", noise(3 << 20, 21)),
        file("filler", vec![0u8; 10 << 20]),
        file("b.bin", noise(3 << 20, 22)),
    ]);
    let layers = vec![encode(tar, Enc::Tar)];
    builder::push_one(work.path(), &layers, &reg.addr, "redir/image");
    let proxy = Proxy::with_storage(&reg.addr, Some(("carol", "secret")));
    let st = proxy.storage.clone().unwrap();
    let config = work.path().join("config.json");
    harness::write_docker_config(&config, &proxy.addr, "carol:secret");
    let cfg = config.to_str().unwrap();
    let r = format!("{}/redir/image:v1", proxy.addr);
    let m = Mount::new(&r, &["--verify", "off"], &[("REGISTRY_AUTH_FILE", cfg)]);
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("a.bin")).unwrap()),
        builder::sha(&noise(3 << 20, 21))
    );
    let (redirects, requests) = (
        st.redirects.load(Ordering::SeqCst),
        st.requests.load(Ordering::SeqCst),
    );
    assert!(
        requests > redirects,
        "the storage URL is reused: {redirects} redirects for {requests} storage requests"
    );
    // The presigned URL expires: the next read goes back to the registry for a fresh one.
    st.signature.fetch_add(1, Ordering::SeqCst);
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("b.bin")).unwrap()),
        builder::sha(&noise(3 << 20, 22))
    );
    assert!(
        st.expired.load(Ordering::SeqCst) >= 1,
        "an expired URL was tried once"
    );
    assert!(
        st.redirects.load(Ordering::SeqCst) > redirects,
        "and a fresh one obtained"
    );
    assert_eq!(
        st.auth_leaks.load(Ordering::SeqCst),
        0,
        "registry credentials never reach storage"
    );
}

#[test]
fn clear_errors_before_the_mount_is_ready() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let work = TempDir::new("errors");
    let layers = vec![encode(builder::tar(&[file("a", "a")]), Enc::Tar)];
    builder::push_one(work.path(), &layers, &reg.addr, "err/image");
    let mp = TempDir::new("mp");
    let m = mp.path().to_str().unwrap();
    let cd = work.path().join("cache");
    let cd = cd.to_str().unwrap();
    let cases: Vec<(String, &str)> = vec![
        (format!("{}/err/image:nope", reg.addr), "not found"),
        (format!("{}/err/missing:v1", reg.addr), "not found"),
        (
            format!("127.0.0.1:{}/err/image:v1", harness::free_port()),
            "error",
        ),
        ("Bad/Ref".to_string(), "invalid reference"),
    ];
    for (r, want) in cases {
        let (ok, _, err) = ocifs(&["mount", "--cache-dir", cd, &r, m], &[]);
        assert!(!ok, "{r} mounted");
        assert!(err.to_lowercase().contains(want), "{r}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let good = format!("{}/err/image:v1", reg.addr);
    let (ok, _, err) = ocifs(&["mount", "--cache-dir", cd, &good, "/nonexistent/mp"], &[]);
    assert!(!ok && err.contains("/nonexistent/mp"), "{err}");
    std::fs::write(mp.path().join("file"), "x").unwrap();
    let (ok, _, err) = ocifs(&["mount", "--cache-dir", cd, &good, m], &[]);
    assert!(!ok && err.contains("not empty"), "{err}");
    std::fs::remove_file(mp.path().join("file")).unwrap();
    let mounted = Mount::new(&good, &[], &[]);
    let (ok, _, err) = ocifs(
        &[
            "mount",
            "--cache-dir",
            cd,
            &good,
            mounted.path().to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        !ok && (err.contains("busy") || err.contains("not empty")),
        "{err}"
    );
    assert!(
        std::fs::write(mounted.path().join("new"), "x").is_err(),
        "read-only"
    );
}

#[test]
fn corrupted_blobs_fail_with_eio_or_refuse_to_mount() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let work = TempDir::new("corrupt");
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
        let path = reg.dir.path().join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{}/data",
            &d[7..9],
            &d[7..]
        ));
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

/// Layers big enough for many 64 KiB spans, so reads resume from checkpoints mid-stream.
fn span_layers() -> Vec<Vec<u8>> {
    let mut l = base_layers();
    let mut items = vec![Item::Dir("data", 0o755)];
    for i in 0..30 {
        let mut body = format!("line {i}\n").repeat(3000).into_bytes();
        body.extend(noise(20_000, i));
        items.push(file(&format!("data/f{i:02}"), body));
    }
    l.push(builder::tar(&items));
    l
}

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
    if !require(TOOLS, true) {
        return;
    }
    // Lazy: one small file costs a fraction of the blob once the index exists.
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("zstdlazy");
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
fn gzip_index_is_kept_reused_lazily_and_rebuilt_when_corrupt() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("gzi");
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
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("gzpush");
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

    proxy.reset();
    let m = Mount::new(&r, &["--verify", "off"], &[]);
    assert!(m.ready.contains("index from registry"), "{}", m.ready);
    // The image manifest, the referrers API (404 here) and its fallback tag, the tail probe,
    // the config and the index blob, named by the referrer's annotation: the artifact's own
    // manifest is not fetched.
    let requests = proxy.requests.load(Ordering::SeqCst);
    assert!(
        requests <= 6,
        "{requests} requests before the mount was ready"
    );
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
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("gzwin");
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

/// Polls `ocifs stats --json` (for up to 10 s) until `done` says so; returns the last answer.
fn poll_stats(
    mountpoint: &std::path::Path,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut v = serde_json::Value::Null;
    for _ in 0..200 {
        let (ok, out, err) = ocifs(&["stats", "--json", mountpoint.to_str().unwrap()], &[]);
        assert!(ok, "stats: {err}");
        v = serde_json::from_slice(&out).unwrap();
        if done(&v) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    v
}

/// Polls `ocifs stats --json` until background prefetch has finished.
/// Waits (20 s at most) for a profile, written, renamed into place whole, when the daemon
/// that recorded it unmounts.
fn wait_for_profile(profile: &std::path::Path) {
    for _ in 0..400 {
        if profile.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Mounts `reference` with `--prefetch profile` and waits for the prefetch; returns the mount
/// and the blob bytes fetched until then (the proxy's counters are reset after).
fn mount_prefetched(proxy: &Proxy, reference: &str, profile: &str) -> (Mount, u64) {
    proxy.reset();
    let m = Mount::new(reference, &["--verify", "off", "--prefetch", profile], &[]);
    wait_for_prefetch(m.path());
    let fetched = proxy.blob_bytes.load(Ordering::SeqCst);
    proxy.reset();
    (m, fetched)
}

fn wait_for_prefetch(mountpoint: &std::path::Path) -> serde_json::Value {
    let finished = |v: &serde_json::Value| {
        let total = v["prefetch"]["totalBytes"].as_u64().unwrap();
        total > 0 && v["prefetch"]["doneBytes"].as_u64().unwrap() >= total
    };
    let v = poll_stats(mountpoint, finished);
    assert!(finished(&v), "prefetch did not finish");
    v
}

#[test]
fn estargz_prioritized_files_are_prefetched_and_stats_explain_it() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("prio");
    let tar = builder::tar(&[
        Item::Dir("app", 0o755),
        file("app/start.py", noise(300_000, 1)),
        Item::Dir("data", 0o755),
        file("data/big.bin", noise(8 << 20, 2)),
    ]);
    let layers = vec![builder::encode_prioritized(
        tar,
        Enc::Estargz,
        &["app/start.py"],
    )];
    let dir = layout(work.path(), "v1", &[("linux", "amd64", None, &layers)]);
    push(&dir, "v1", &reg.addr, "prio/image", None);
    let m = Mount::new(
        &format!("{}/prio/image:v1", proxy.addr),
        &["--verify", "off"],
        &[],
    );
    let stats = wait_for_prefetch(m.path());
    assert!(
        stats["layers"][0]["fetchedBytes"].as_u64().unwrap() > 0,
        "{stats}"
    );
    proxy.reset();
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("app/start.py")).unwrap()),
        builder::sha(&noise(300_000, 1))
    );
    assert_eq!(
        proxy.blob_bytes.load(Ordering::SeqCst),
        0,
        "the prioritized file was already prefetched"
    );
    let (ok, out, _) = ocifs(&["stats", m.path().to_str().unwrap()], &[]);
    let text = String::from_utf8(out).unwrap();
    assert!(
        ok && text.contains("estargz") && text.contains("latency p50"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&ocifs(&["stats", "--json", m.path().to_str().unwrap()], &[]).1)
            .unwrap();
    assert!(
        v["reads"]["count"].as_u64().unwrap() > 0
            && v["reads"]["bytes"].as_u64().unwrap() >= 300_000,
        "{v}"
    );
}

#[test]
fn recorded_profile_prefetches_a_second_start() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("profile");
    let mut items = vec![
        file("needed/a.txt", noise(200_000, 3)),
        file("needed/b.txt", "bee\n"),
    ];
    items.push(file("unneeded.bin", noise(6 << 20, 4)));
    let layers = vec![encode(builder::tar(&items), Enc::Estargz)];
    let dir = layout(work.path(), "v1", &[("linux", "amd64", None, &layers)]);
    push(&dir, "v1", &reg.addr, "profile/image", None);
    let r = format!("{}/profile/image:v1", proxy.addr);
    let profile = work.path().join("startup.profile");
    let p = profile.to_str().unwrap();
    {
        let m = Mount::new(&r, &["--verify", "off", "--record", p], &[]);
        std::fs::read(m.path().join("needed/b.txt")).unwrap();
        std::fs::read(m.path().join("needed/a.txt")).unwrap();
    }
    wait_for_profile(&profile);
    let text = std::fs::read_to_string(&profile).expect("profile written at unmount");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let paths: Vec<&str> = lines.iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        vec!["needed/b.txt", "needed/a.txt"],
        "in access order"
    );
    assert_eq!(lines[1]["len"], 200_000);

    let (m, planned) = mount_prefetched(&proxy, &r, p);
    // The mount's tail read (512 KiB: footer and TOC) and the two files' chunks, merged into
    // one range; nothing of the 6 MiB after them (the read path fetched a 2 MiB run).
    assert!(
        planned < 1_000_000,
        "mount and prefetch fetched {planned} bytes"
    );
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("needed/a.txt")).unwrap()),
        builder::sha(&noise(200_000, 3))
    );
    assert_eq!(
        proxy.blob_bytes.load(Ordering::SeqCst),
        0,
        "profile prefetch fetched it already"
    );
}

#[test]
fn a_profile_prefetch_of_a_gzip_layer_fetches_each_span_front_once() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("gzprofile");
    let tar = builder::tar(&[
        file("a.bin", noise(3 << 20, 21)),
        file("needed1.txt", noise(30_000, 22)),
        file("needed2.txt", noise(30_000, 23)),
        file("far.bin", noise(8 << 20, 24)),
        file("needed3.txt", noise(30_000, 25)),
    ]);
    let layers = vec![encode(tar, Enc::Gzip)];
    builder::push_one(work.path(), &layers, &reg.addr, "gzprofile/image");
    let r = format!("{}/gzprofile/image:v1", proxy.addr);
    push_index(&r, &["--span", "1MiB"]);
    let profile = work.path().join("p.profile");
    let p = profile.to_str().unwrap();
    {
        let m = Mount::new(
            &r,
            &["--verify", "off", "--record", p, "--no-whole-files"],
            &[],
        );
        for f in ["needed1.txt", "needed2.txt", "needed3.txt"] {
            std::fs::read(m.path().join(f)).unwrap();
        }
    }
    wait_for_profile(&profile);
    let (m, planned) = mount_prefetched(&proxy, &r, p);
    // The tail probe, the index, and two compressed ranges from a span start to the mark past
    // the files (needed1 and needed2 share theirs): 2.4 MB of this 11 MB blob. Reading each
    // file through the read path, as before, fetched 3.3 MB (runs past the files).
    assert!(
        planned < 2_800_000,
        "mount and prefetch fetched {planned} bytes"
    );
    for (f, seed) in [
        ("needed1.txt", 22),
        ("needed2.txt", 23),
        ("needed3.txt", 25),
    ] {
        assert_eq!(
            builder::sha(&std::fs::read(m.path().join(f)).unwrap()),
            builder::sha(&noise(30_000, seed))
        );
    }
    assert_eq!(proxy.blob_bytes.load(Ordering::SeqCst), 0, "all prefetched");
}

#[test]
fn convert_to_estargz_is_correct_lazy_and_readable_by_stargz_snapshotter() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let work = TempDir::new("convert");
    let mut tars = base_layers();
    // Larger than one upload chunk (8 MiB): the converted layer goes up in several PATCHes.
    tars.push(builder::tar(&[file("big.bin", noise(18 << 20, 11))]));
    let layers: Vec<_> = tars
        .iter()
        .cloned()
        .zip([Enc::Gzip, Enc::Tar, Enc::Gzip])
        .map(|(t, e)| encode(t, e))
        .collect();
    builder::push_one(work.path(), &layers, &reg.addr, "conv/src");
    let profile = work.path().join("profile");
    std::fs::write(&profile, "{\"layer\":\"\",\"path\":\"bin/tool\",\"offset\":0,\"len\":10}\n{\"layer\":\"\",\"path\":\"opq/upper\",\"offset\":0,\"len\":5}\n").unwrap();
    let cache = work.path().join("cache");
    let cd = cache.to_str().unwrap();
    let src = format!("{}/conv/src:v1", reg.addr);
    let dst = format!("{}/conv/dst:v1", reg.addr);
    let (ok, out, err) = ocifs(
        &[
            "convert",
            "--estargz",
            "--chunk-size",
            "64KiB",
            "--profile",
            profile.to_str().unwrap(),
            "--cache-dir",
            cd,
            &src,
            &dst,
        ],
        &[],
    );
    assert!(ok, "convert: {err}");
    assert!(String::from_utf8_lossy(&out).contains("converted"), "{err}");

    let (ok, out, err) = ocifs(&["inspect", "--json", &dst], &[]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let formats: Vec<&str> = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["format"].as_str().unwrap())
        .collect();
    assert_eq!(formats, ["estargz", "estargz", "estargz"]);

    // The converted image is the same tree.
    let expected_root = work.path().join("expected");
    oracle::extract(&[&tars[0], &tars[1], &tars[2]], &expected_root);
    let m = Mount::new(&dst, &[], &[]);
    oracle::assert_same(
        &oracle::snapshot(&expected_root),
        &oracle::snapshot(m.path()),
    );

    // stargz-snapshotter's own reader accepts every layer: TOC digest and chunk digests.
    for (i, l) in v["layers"].as_array().unwrap().iter().enumerate() {
        let digest = l["digest"].as_str().unwrap();
        let (ok, blob, err) = ocifs(&["fetch", &dst, digest], &[]);
        assert!(ok, "{err}");
        let path = work.path().join(format!("layer{i}.esgz"));
        std::fs::write(&path, &blob).unwrap();
        let toc = {
            let (_, manifest, _) = ocifs(&["fetch", &dst], &[]);
            let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
            m["layers"][i]["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let file = ["bin/tool", "opq/upper", "big.bin"][i];
        let out = std::process::Command::new(builder::estargz_tool())
            .args(["--verify", path.to_str().unwrap(), &toc, file])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stargz-snapshotter rejects layer {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = builder::sha(&std::fs::read(expected_root.join(file)).unwrap());
        assert_eq!(
            format!(
                "sha256:{}",
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .next()
                    .unwrap()
            ),
            want
        );
    }

    // To an OCI layout too, mounted from there with the same code path.
    let oci = work.path().join("oci-out");
    let dest = format!("oci:{}:esgz", oci.display());
    let (ok, _, err) = ocifs(
        &["convert", "--estargz", "--cache-dir", cd, &src, &dest],
        &[],
    );
    assert!(ok, "convert to layout: {err}");
    let (ok, out, err) = ocifs(&["cat", "--cache-dir", cd, &dest, "etc/hostname"], &[]);
    assert!(ok, "{err}");
    assert_eq!(out, b"changed\n");
    // A layout's blobs are files already: reading them keeps no second copy in blocks.
    let fresh = TempDir::new("layout-cache");
    let fresh_dir = fresh.path().to_str().unwrap();
    let (ok, out, err) = ocifs(&["cat", "--cache-dir", fresh_dir, &dest, "big.bin"], &[]);
    assert!(ok, "{err}");
    assert_eq!(
        builder::sha(&out),
        builder::sha(&std::fs::read(expected_root.join("big.bin")).unwrap())
    );
    let blocks = fresh.path().join("blocks");
    let kept = std::fs::read_dir(&blocks).map_or(0, |d| d.count());
    assert_eq!(
        kept,
        0,
        "blocks of a local layout kept in {}",
        blocks.display()
    );
}

#[test]
fn zstd_chunked_from_containers_image_is_lazy_through_its_toc() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("zchunked");
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

#[test]
fn foreground_mount_unmounts_cleanly_on_sigterm() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let work = TempDir::new("fg");
    let layers = vec![encode(builder::tar(&[file("hello", "hi\n")]), Enc::Gzip)];
    builder::push_one(work.path(), &layers, &reg.addr, "fg/image");
    let mp = TempDir::new("fg-mp");
    let cache = work.path().join("cache");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ocifs"))
        .args([
            "mount",
            "--foreground",
            "--cache-dir",
            cache.to_str().unwrap(),
        ])
        .arg(format!("{}/fg/image:v1", reg.addr))
        .arg(mp.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let hello = mp.path().join("hello");
    for _ in 0..200 {
        if hello.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert_eq!(std::fs::read_to_string(&hello).unwrap(), "hi\n");
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(!hello.exists(), "unmounted");
    assert!(std::fs::read_dir(mp.path()).unwrap().next().is_none());
}

#[test]
fn bearer_tokens_are_refreshed_before_they_lapse() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let work = TempDir::new("refresh");
    let tar = builder::tar(&[
        file("a", noise(3 << 20, 41)),
        file("pad", vec![0u8; 8 << 20]),
        file("b", noise(3 << 20, 42)),
    ]);
    builder::push_one(
        work.path(),
        &[encode(tar, Enc::Tar)],
        &reg.addr,
        "refresh/image",
    );
    let proxy = Proxy::start(&reg.addr, Some(("dave", "pw")));
    proxy.token_ttl.store(1, Ordering::SeqCst);
    let config = work.path().join("config.json");
    harness::write_docker_config(&config, &proxy.addr, "dave:pw");
    let m = Mount::new(
        &format!("{}/refresh/image:v1", proxy.addr),
        &["--verify", "off"],
        &[("REGISTRY_AUTH_FILE", config.to_str().unwrap())],
    );
    let (tokens, challenges) = (
        proxy.tokens_issued.load(Ordering::SeqCst),
        proxy.challenges.load(Ordering::SeqCst),
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("b")).unwrap()),
        builder::sha(&noise(3 << 20, 42))
    );
    assert!(
        proxy.tokens_issued.load(Ordering::SeqCst) > tokens,
        "a fresh token was fetched"
    );
    assert_eq!(
        proxy.challenges.load(Ordering::SeqCst),
        challenges,
        "before the old one was refused, not after a 401"
    );
}

/// A layer made by GNU tar with `--sparse`: a file with ten data regions (more than fit in the
/// main header, so the sparse map continues in extension blocks) and a trailing hole.
fn gnu_sparse_layer() -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new("sparse-src");
    let f = std::fs::File::create(dir.path().join("sparse.bin")).unwrap();
    for i in 0..10u64 {
        f.write_all_at(&noise(4096, 50 + i), i * (1 << 20) + 512)
            .unwrap();
    }
    f.set_len(12 << 20).unwrap();
    drop(f);
    let out = std::process::Command::new("tar")
        .args([
            "--sparse",
            "--format=gnu",
            "--mtime=@1700000000",
            "--owner=0",
            "--group=0",
            "-C",
        ])
        .arg(dir.path())
        .args(["-cf", "-", "sparse.bin"])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn gnu_sparse_files_read_back_with_their_holes() {
    let mut tars = base_layers();
    tars.push(gnu_sparse_layer());
    conformance(&[Enc::Tar], tars.clone());
    conformance(&[Enc::Gzip], tars.clone());
    conformance(&[Enc::Zstd], tars);
    // (stargz-snapshotter's estargz.Build refuses sparse entries, so there is no eStargz case.)
}

#[test]
fn background_verification_fetches_the_layer_so_later_reads_are_local() {
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("bgfetch");
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
        let (ok, out, _) = ocifs(&["stats", "--json", m.path().to_str().unwrap()], &[]);
        assert!(ok);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        if v["layers"][0]["verification"] == "verified" {
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
    if !require(TOOLS, true) {
        return;
    }
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
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("copies");
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
    let copied = |v: &serde_json::Value| (0..4).all(|i| v["layers"][i]["localCopy"] == true);
    let v = poll_stats(m.path(), copied);
    assert!(copied(&v), "every verified layer is copied: {v}");
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
    assert!(v["localCopies"]["reads"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(proxy.blob_bytes.load(Ordering::SeqCst), 0);
    drop(m);

    // A layer whose files do not fit the disk cache bound is not copied; the others are.
    let small = [&flags[..], &["--disk-cache-size", "100KiB"]].concat();
    // (Not every layer is copied: the read-ahead stays as the kernel set it.)
    let m = Mount::new(&reference, &small, &[]);
    // Layers are copied in order: once the last one (its sparse file left out: nothing to
    // copy) is done, the others have been decided.
    let decided = |v: &serde_json::Value| v["layers"][3]["localCopy"] == true;
    let v = poll_stats(m.path(), decided);
    assert!(decided(&v), "{v}");
    assert_eq!(
        v["layers"][1]["localCopy"], true,
        "a few bytes of files: {v}"
    );
    assert_eq!(v["layers"][0]["localCopy"], false, "300 KB of files: {v}");
    assert_eq!(v["layers"][2]["localCopy"], false, "3 MiB of files: {v}");
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
    assert_eq!(v["localCopies"]["bytes"], 0, "{v}");
    assert_eq!(v["localCopies"]["reads"], 0, "{v}");

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
    if !require(TOOLS, true) {
        return;
    }
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, None);
    let work = TempDir::new("soci");
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

/// Each layer's verification state from `ocifs stats` once none is pending (up to 20 s).
fn wait_for_verification(m: &Mount, layers: usize) -> Vec<String> {
    for _ in 0..400 {
        let (ok, out, _) = ocifs(&["stats", "--json", m.path().to_str().unwrap()], &[]);
        assert!(ok);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let states: Vec<String> = (0..layers)
            .map(|i| {
                v["layers"][i]["verification"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        if states.iter().all(|s| s != "pending") {
            return states;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("verification still pending after 20 s");
}

#[test]
fn a_programs_libraries_are_fetched_before_the_loader_asks() {
    if !require(TOOLS, true) {
        return;
    }
    // A real dynamically linked program and the libc it names, from this (Debian x86_64)
    // machine, with 4 MiB between them so no fetch run carries one along with the other.
    let tool = std::fs::read("/usr/bin/true").unwrap();
    let tool_len = tool.len();
    let libc = std::fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    let tar = builder::tar(&[
        Item::Dir("usr", 0o755),
        Item::Dir("usr/bin", 0o755),
        Item::Dir("usr/lib", 0o755),
        Item::Dir("usr/lib/x86_64-linux-gnu", 0o755),
        Item::Symlink("lib", "usr/lib"),
        Item::File("usr/bin/tool".into(), tool, 0o755),
        Item::File("usr/bin/run".into(), SCRIPT.to_vec(), 0o755),
        file("filler", noise(4 << 20, 3)),
        Item::File(
            "usr/lib/x86_64-linux-gnu/libc.so.6".into(),
            libc.clone(),
            0o755,
        ),
        file("filler2", noise(4 << 20, 4)),
        Item::Dir("conf", 0o755),
        file("conf/a", noise(20_000, 5)),
        file("conf/b", noise(20_000, 6)),
        file("conf/c", noise(20_000, 7)),
        file("conf/plugin.so", noise(300_000, 8)),
    ]);
    let reg = Registry::start(None);
    let work = TempDir::new("elf");
    let layers = vec![encode(tar, Enc::Estargz)];
    builder::push_one(work.path(), &layers, &reg.addr, "elf/image");
    let m = Mount::new(
        &format!("{}/elf/image:v1", reg.addr),
        &["--verify", "off", "--no-prefetch"],
        &[],
    );
    // Only the program's first page is read, as the kernel does at exec.
    let mut head = [0u8; 4096];
    std::io::Read::read_exact(
        &mut std::fs::File::open(m.path().join("usr/bin/tool")).unwrap(),
        &mut head,
    )
    .unwrap();
    let whole = |v: &serde_json::Value| v["prefetch"]["wholeFileBytes"].as_u64().unwrap();
    let whole = whole(&poll_stats(m.path(), |v| whole(v) > 0));
    // libc (found through the lib -> usr/lib link) and nothing else was fetched whole.
    assert_eq!(whole, libc.len() as u64);
    // Reading one file of a directory whose files lie together fetches its siblings of the
    // same kind too (not the shared object among them); a program does not bring its bin
    // directory.
    std::fs::read(m.path().join("conf/a")).unwrap();
    let together = |v: &serde_json::Value| v["prefetch"]["directoryBytes"].as_u64().unwrap();
    let together = together(&poll_stats(m.path(), |v| together(v) >= 60_000));
    // Counted in file bytes (the same for every format), not the compressed range fetched.
    assert_eq!(together, 60_000, "conf/ fetched together");
    assert_eq!(
        std::fs::read(m.path().join("lib/x86_64-linux-gnu/libc.so.6")).unwrap(),
        libc
    );
    drop(m);

    // The same layer in an image whose config names the command `tool /conf/b`: the mount
    // fetches the program (found on the default PATH), its libc and the file its argument
    // names before anything is read.
    let dir = builder::layout_with_command(
        &work.path().join("cmd"),
        "v1",
        &[("linux", "amd64", None, &layers)],
        &["tool", "/conf/b"],
    );
    push(&dir, "v1", &reg.addr, "elf/command", None);
    let m = Mount::new(
        &format!("{}/elf/command:v1", reg.addr),
        &["--verify", "off"],
        &[],
    );
    let expected = (tool_len + libc.len() + 20_000) as u64;
    let whole = |v: &serde_json::Value| v["prefetch"]["wholeFileBytes"].as_u64().unwrap();
    let got = whole(&poll_stats(m.path(), |v| whole(v) >= expected));
    assert_eq!(got, expected, "tool, libc and conf/b, nothing else");
    drop(m);

    // A script as the command: `#!/usr/bin/env tool` runs tool, found on the search path.
    let dir = builder::layout_with_command(
        &work.path().join("script"),
        "v1",
        &[("linux", "amd64", None, &layers)],
        &["run"],
    );
    push(&dir, "v1", &reg.addr, "elf/script", None);
    let m = Mount::new(
        &format!("{}/elf/script:v1", reg.addr),
        &["--verify", "off"],
        &[],
    );
    let expected = (SCRIPT.len() + tool_len + libc.len()) as u64;
    let got = whole(&poll_stats(m.path(), |v| whole(v) >= expected));
    assert_eq!(got, expected, "the script, tool and libc");
}

/// Four packages `lib/{a,b,c,d}`, each with a module cache directory of three files
/// (`cache/m{0,1,2}.pyc`, `sizes[i]` bytes of noise seeded `10 * i + m`), and 3 MiB of noise
/// after it so that no fetch run carries one package's files along with another's.
fn module_caches(sizes: [usize; 4]) -> Vec<Item> {
    let mut items = vec![Item::Dir("lib", 0o755)];
    for (i, p) in ["a", "b", "c", "d"].iter().enumerate() {
        items.push(Item::Dir(
            Box::leak(format!("lib/{p}").into_boxed_str()),
            0o755,
        ));
        items.push(Item::Dir(
            Box::leak(format!("lib/{p}/cache").into_boxed_str()),
            0o755,
        ));
        for m in 0..3 {
            items.push(file(
                &format!("lib/{p}/cache/m{m}.pyc"),
                noise(sizes[i], (10 * i + m) as u64),
            ));
        }
        items.push(file(
            &format!("lib/{p}/filler"),
            noise(3 << 20, 100 + i as u64),
        ));
    }
    items
}

#[test]
fn a_second_directory_of_a_family_brings_the_rest_of_it() {
    if !require(TOOLS, true) {
        return;
    }
    let items = module_caches([30_000; 4]);
    let reg = Registry::start(None);
    let work = TempDir::new("family");
    builder::push_one(
        work.path(),
        &[encode(builder::tar(&items), Enc::Estargz)],
        &reg.addr,
        "family/image",
    );
    let m = Mount::new(
        &format!("{}/family/image:v1", reg.addr),
        &["--verify", "off", "--no-prefetch"],
        &[],
    );
    let together = |v: &serde_json::Value| v["prefetch"]["directoryBytes"].as_u64().unwrap();
    // One directory of the family read: its own files come together, and nothing else.
    std::fs::read(m.path().join("lib/a/cache/m0.pyc")).unwrap();
    let one = together(&poll_stats(m.path(), |v| together(v) >= 90_000));
    assert!((90_000..180_000).contains(&one), "a/cache: {one} bytes");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(together(&poll_stats(m.path(), |_| true)), one);
    // A second one: the other two come as well.
    std::fs::read(m.path().join("lib/b/cache/m1.pyc")).unwrap();
    let all = together(&poll_stats(m.path(), |v| together(v) >= 4 * 90_000));
    assert!(
        (4 * 90_000..4 * 180_000).contains(&all),
        "the family: {all} bytes"
    );
    assert_eq!(
        std::fs::read(m.path().join("lib/d/cache/m2.pyc")).unwrap(),
        noise(30_000, 32)
    );
}

#[test]
fn a_family_member_over_the_budget_is_fetched_on_its_own_first_read() {
    if !require(TOOLS, true) {
        return;
    }
    // Two small module caches (a, b) and two of 5 MiB (c, d): the family's rest (8 MiB at
    // most) has room for c but not d, which is left for its own first read.
    let items = module_caches([30_000, 30_000, 1_700_000, 1_700_000]);
    let reg = Registry::start(None);
    let work = TempDir::new("budget");
    builder::push_one(
        work.path(),
        &[encode(builder::tar(&items), Enc::Estargz)],
        &reg.addr,
        "family/budget",
    );
    let m = Mount::new(
        &format!("{}/family/budget:v1", reg.addr),
        &["--verify", "off", "--no-prefetch"],
        &[],
    );
    let together = |v: &serde_json::Value| v["prefetch"]["directoryBytes"].as_u64().unwrap();
    std::fs::read(m.path().join("lib/a/cache/m0.pyc")).unwrap();
    poll_stats(m.path(), |v| together(v) >= 90_000);
    std::fs::read(m.path().join("lib/b/cache/m1.pyc")).unwrap();
    let family = 2 * 90_000 + 5_100_000;
    let before = together(&poll_stats(m.path(), |v| together(v) >= family));
    assert!(
        (family..family + 2_000_000).contains(&before),
        "a, b, c: {before} bytes"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        together(&poll_stats(m.path(), |_| true)),
        before,
        "d is not fetched yet"
    );
    // d's first read brings its siblings.
    assert_eq!(
        std::fs::read(m.path().join("lib/d/cache/m0.pyc")).unwrap(),
        noise(1_700_000, 30)
    );
    let after = together(&poll_stats(m.path(), |v| together(v) >= before + 5_100_000));
    assert!(after >= before + 5_100_000, "d: {} bytes", after - before);
}

/// A script whose interpreter `env` looks up on the search path.
const SCRIPT: &[u8] = b"#!/usr/bin/env tool\nexit 0\n";

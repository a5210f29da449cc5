//! Format conformance: each layer format and encoder, mounted and listed, reads back as the
//! extracted tree (the oracle); large directories, multi-platform indexes, GNU sparse files.

use crate::builder::{self, Enc, Item, encode, file, layout, push};
use crate::fixtures::{base_layers, gnu_sparse_layer};
use crate::harness::{Env, Mount, TempDir, ocifs};
use crate::oracle;
use crate::stats::stats;

/// Builds, pushes, mounts and compares one image whose layers use `encs`.
fn conformance(encs: &[Enc], tars: Vec<Vec<u8>>) {
    conformance_with(encs, tars, &[], false)
}

/// [`conformance`] with extra mount flags, optionally letting skopeo (Go) gzip the layers.
pub fn conformance_with(encs: &[Enc], tars: Vec<Vec<u8>>, flags: &[&str], go_gzip: bool) {
    let Some(env) = Env::new("conf") else {
        return;
    };
    let layers: Vec<_> = tars
        .into_iter()
        .zip(encs.iter().cycle())
        .map(|(t, e)| encode(t, *e))
        .collect();
    conformance_layers(&env, layers, flags, go_gzip, None);
}

/// The oracle: `layers` extracted in order (whiteouts applied) under `work/expected`; its
/// root and snapshot.
pub fn expected_tree(
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

/// [`conformance`] of encoded layers in `env`; `formats`, if given, must appear in the ready
/// line.
fn conformance_layers(
    env: &Env,
    layers: Vec<builder::EncodedLayer>,
    flags: &[&str],
    go_gzip: bool,
    formats: Option<&str>,
) {
    let Env { reg, work } = env;
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
    let (expected_root, expected) = expected_tree(work, &layers);

    let reference = format!("{}/conf/image:v1", reg.addr);
    let mut mount_flags = vec!["--platform", "linux/amd64"];
    mount_flags.extend_from_slice(flags);
    let m = Mount::new(&reference, &mount_flags, &[]);
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    // Every file and directory was opened; the kernel asked the daemon once of each kind and
    // then opened the rest without a round trip.
    let v = stats(m.path());
    assert!(v.reads.opens <= 2, "{v:?}");
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
    let want: Vec<String> = expected.keys().map(|p| format!("/{p}")).collect();
    assert_eq!(listed, want, "ls -R lists absolute paths in name order");
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
    if let Some(env) = Env::new("conf") {
        let mut bare = encode(tars[0].clone(), Enc::Estargz);
        bare.annotations.clear();
        conformance_layers(&env, vec![bare], &[], false, Some("(estargz)"));
    }
    conformance(&[Enc::Gzip], tars);
}

#[test]
fn multi_platform_index_chooses_and_explains() {
    let Some(Env { reg, work }) = Env::without_fuse("multi") else {
        return;
    };
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
fn gnu_sparse_files_read_back_with_their_holes() {
    let mut tars = base_layers();
    tars.push(gnu_sparse_layer());
    conformance(&[Enc::Tar], tars.clone());
    conformance(&[Enc::Gzip], tars.clone());
    conformance(&[Enc::Zstd], tars);
    // (stargz-snapshotter's estargz.Build refuses sparse entries, so there is no eStargz case.)
}

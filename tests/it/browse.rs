//! Browse verbs without a mount: `manifest`, `config` and `digest` agree with the registry,
//! `export`'s tar stream and `pull`'s directory equal the oracle (every path, type, mode,
//! owner, time, link target, hard link, xattr and byte), and `diff` lists what the oracle
//! says differs between two images.

use crate::builder::{Enc, encode, layout, push, sha};
use crate::conformance::expected_tree;
use crate::fixtures::base_layers;
use crate::harness::{Env, ocifs};
use crate::oracle;
use std::collections::BTreeSet;

#[test]
fn export_pull_and_the_raw_verbs_agree_with_the_oracle() {
    let Some(env) = Env::new("browse") else {
        return;
    };
    let layers: Vec<_> = base_layers()
        .into_iter()
        .zip([Enc::Gzip, Enc::Estargz])
        .map(|(t, e)| encode(t, e))
        .collect();
    let work = env.work.path();
    let dir = layout(
        &work.join("layout"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    push(&dir, "v1", &env.reg.addr, "browse/image", None);
    let r = format!("{}/browse/image:v1", env.reg.addr);
    let (_, expected) = expected_tree(&env.work, &layers);
    let cd = work.join("cache");
    let cd = cd.to_str().unwrap();
    let flags = ["--cache-dir", cd, "--platform", "linux/amd64"];
    let run = |verb: &str, extra: &[&str]| {
        let mut args = vec![verb];
        args.extend(flags);
        args.extend(extra);
        let (ok, out, err) = ocifs(&args, &[]);
        assert!(ok, "ocifs {verb}: {err}");
        out
    };

    // `ls -l` as `tar -tv` prints it; `-d`; a symlink given last is not followed; JSON.
    let ls = |extra: &[&str]| String::from_utf8(run("ls", extra)).unwrap();
    let long = ls(&["-l", &r, "/bin"]);
    assert!(
        long.lines()
            .any(|l| l == "-rwsr-xr-x 0/0 300000 2023-11-14 22:13 /bin/tool"),
        "{long}"
    );
    assert!(
        long.lines()
            .any(|l| l.starts_with("lrwxrwxrwx 0/0 ") && l.ends_with(" /bin/sh -> tool")),
        "{long}"
    );
    let root = ls(&["-l", &r]);
    assert!(
        root.lines()
            .any(|l| l.starts_with("c") && l.contains(" 1,3 ") && l.ends_with(" /null")),
        "{root}"
    );
    let dir = ls(&["-ld", &r, "bin"]);
    assert!(
        dir.starts_with("drwxr-xr-x 0/0 ") && dir.trim_end().ends_with(" /bin"),
        "{dir}"
    );
    assert_eq!(ls(&[&r, "/bin/sh"]), "/bin/sh\n", "not followed");
    let json: serde_json::Value = serde_json::from_str(&ls(&["--json", &r, "/abs"])).unwrap();
    assert_eq!(json[0]["type"], "symlink", "{json}");
    assert_eq!(json[0]["target"], "/etc/hostname", "{json}");

    let manifest = run("manifest", &[&r]);
    let digest = String::from_utf8(run("digest", &[&r])).unwrap();
    assert_eq!(
        digest.trim(),
        sha(&manifest),
        "digest is the manifest's hash"
    );
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(m["layers"].as_array().unwrap().len(), 2);
    let config: serde_json::Value = serde_json::from_slice(&run("config", &[&r])).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
    assert_eq!(
        sha(&run("config", &[&r])),
        m["config"]["digest"].as_str().unwrap()
    );

    let tar_path = work.join("export.tar");
    run("export", &["-o", tar_path.to_str().unwrap(), &r]);
    let exported = std::fs::read(&tar_path).unwrap();
    let root = work.join("from-export");
    oracle::extract(&[&exported], &root);
    oracle::assert_same(&expected, &oracle::snapshot(&root));
    // To stdout, the same stream.
    assert_eq!(run("export", &[&r]), exported);
    // To a device: written to, not replaced by a file renamed over it.
    run("export", &["-o", "/dev/null", &r]);
    use std::os::unix::fs::FileTypeExt;
    let null = std::fs::symlink_metadata("/dev/null").unwrap();
    assert!(null.file_type().is_char_device(), "{null:?}");

    let pulled = work.join("pulled");
    run("pull", &[&r, pulled.to_str().unwrap()]);
    oracle::assert_same(&expected, &oracle::snapshot(&pulled));
    // Not into a directory that has something in it.
    let mut args = vec!["pull"];
    args.extend(flags);
    args.extend([r.as_str(), pulled.to_str().unwrap()]);
    let (ok, _, err) = ocifs(&args, &[]);
    assert!(!ok && err.contains("not empty"), "{err}");
}

#[test]
fn diff_lists_what_the_oracle_says_differs() {
    let Some(env) = Env::new("diff") else {
        return;
    };
    let tars = base_layers();
    let one = [encode(tars[0].clone(), Enc::Estargz)];
    let two = [
        encode(tars[0].clone(), Enc::Gzip),
        encode(tars[1].clone(), Enc::Estargz),
    ];
    let work = env.work.path();
    let d1 = layout(&work.join("l1"), "v1", &[("linux", "amd64", None, &one)]);
    let d2 = layout(&work.join("l2"), "v2", &[("linux", "amd64", None, &two)]);
    push(&d1, "v1", &env.reg.addr, "diff/image", None);
    push(&d2, "v2", &env.reg.addr, "diff/image", None);
    let (_, s1) = expected_tree(&crate::harness::TempDir::new("diff-one"), &one);
    let (_, s2) = expected_tree(&crate::harness::TempDir::new("diff-two"), &two);
    let mut want = BTreeSet::new();
    for (p, info) in &s1 {
        match s2.get(p) {
            None => want.insert((p.clone(), "removed")),
            Some(other) if other != info => want.insert((p.clone(), "changed")),
            Some(_) => false,
        };
    }
    for p in s2.keys().filter(|p| !s1.contains_key(*p)) {
        want.insert((p.clone(), "added"));
    }
    let cd = work.join("cache");
    let (r1, r2) = (
        format!("{}/diff/image:v1", env.reg.addr),
        format!("{}/diff/image:v2", env.reg.addr),
    );
    let args = [
        "diff",
        "--json",
        "--content",
        "--cache-dir",
        cd.to_str().unwrap(),
        "--platform",
        "linux/amd64",
        &r1,
        &r2,
    ];
    let (ok, out, err) = ocifs(&args, &[]);
    assert!(ok, "{err}");
    let diffs: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let got: BTreeSet<(String, &str)> = diffs
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let change = match &d["change"] {
                serde_json::Value::String(s) if s == "added" => "added",
                serde_json::Value::String(_) => "removed",
                _ => "changed",
            };
            (d["path"].as_str().unwrap().to_string(), change)
        })
        .collect();
    assert_eq!(got, want, "{}", String::from_utf8_lossy(&out));
    // The text form: one line per path, A/D/M.
    let (ok, out, _) = ocifs(
        &args
            .iter()
            .filter(|a| **a != "--json")
            .copied()
            .collect::<Vec<_>>(),
        &[],
    );
    assert!(ok);
    let text = String::from_utf8(out).unwrap();
    assert!(text.lines().any(|l| l == "A /newfile"), "{text}");
    assert!(text.lines().any(|l| l == "D /gone"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("M /etc/hostname (")),
        "{text}"
    );
}

/// An export of a damaged image fails and leaves no file behind at `-o`'s path,
/// finished-looking or temporary: an eStargz chunk that fails its digest every time (found
/// halfway, as its file is read), and a plain tar layer damaged in a file's data (no check
/// finer than its whole blob, which is checked before anything is written).
#[test]
fn a_failed_export_leaves_no_file() {
    let Some(env) = Env::new("export-fails") else {
        return;
    };
    let work = env.work.path();
    for (repo, enc) in [
        ("browse/broken", Enc::Estargz),
        ("browse/broken-tar", Enc::Tar),
    ] {
        let layers = vec![encode(
            crate::builder::tar(&[
                crate::builder::file("a", "first\n"),
                crate::builder::file("big", crate::builder::noise(300_000, 3)),
            ]),
            enc,
        )];
        let dir = layout(&work.join(repo), "v1", &[("linux", "amd64", None, &layers)]);
        push(&dir, "v1", &env.reg.addr, repo, None);
        // A byte flipped in the stored blob, a quarter in: inside big's bytes (before the
        // eStargz TOC).
        let path = env.reg.blob_path(&sha(&layers[0].blob));
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 4;
        bytes[at] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let out_dir = work.join(format!("out-{}", repo.replace('/', "-")));
        std::fs::create_dir_all(&out_dir).unwrap();
        let tar_path = out_dir.join("export.tar");
        let r = format!("{}/{repo}:v1", env.reg.addr);
        let cd = work.join("cache");
        let (ok, _, err) = ocifs(
            &[
                "export",
                "--cache-dir",
                cd.to_str().unwrap(),
                "-o",
                tar_path.to_str().unwrap(),
                &r,
            ],
            &[],
        );
        assert!(!ok, "{repo}: the export of a damaged image succeeded");
        assert!(
            err.contains("big") || err.contains("digest") || err.contains("verification"),
            "{repo}: {err}"
        );
        let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
        assert!(left.is_empty(), "{repo}: left behind: {left:?}");
    }
}

/// A TOC the manifest does not name by digest is the registry's word. A registry serving a
/// self-consistent one of other bytes (here the pushed eStargz layer's own TOC with two
/// files' entries swapped, stored in place of the blob at the same size) passes every chunk
/// check: `cat` reads `x.txt` as `y.txt`'s bytes. `export` checks such a layer's whole blob
/// before writing anything, and refuses it.
#[test]
fn export_checks_a_layer_whose_toc_no_annotation_names() {
    let Some(env) = Env::new("export-toc") else {
        return;
    };
    let work = env.work.path();
    let mut layer = encode(
        crate::builder::tar(&[
            crate::builder::file("x.txt", "x".repeat(5000)),
            crate::builder::file("y.txt", "y".repeat(5000)),
        ]),
        Enc::Estargz,
    );
    layer.annotations.clear();
    let (honest, forged) = toc_rewritten(&layer.blob);
    assert_eq!(
        honest.len(),
        forged.len(),
        "the forged blob must keep the size"
    );
    layer.blob = honest;
    let repo = "browse/unnamed-toc";
    let dir = layout(
        &work.join(repo),
        "v1",
        &[("linux", "amd64", None, &[layer])],
    );
    push(&dir, "v1", &env.reg.addr, repo, None);
    let r = format!("{}/{repo}:v1", env.reg.addr);
    let run = |args: &[&str], name: &str| {
        let cd = work.join(format!("cache-{name}"));
        let mut all = args.to_vec();
        all.extend(["--cache-dir", cd.to_str().unwrap(), &r]);
        ocifs(&all, &[])
    };
    let tar_path = work.join("export.tar");
    let tar_arg = tar_path.to_str().unwrap();
    let (ok, _, err) = run(&["export", "-o", tar_arg], "honest");
    assert!(ok, "export of the honest blob: {err}");
    std::fs::remove_file(&tar_path).unwrap();

    let d = oci_digest(&dir);
    std::fs::write(env.reg.blob_path(&d), &forged).unwrap();
    let (ok, out, err) = ocifs(
        &[
            "cat",
            "--cache-dir",
            work.join("cache-cat").to_str().unwrap(),
            &r,
            "x.txt",
        ],
        &[],
    );
    assert!(ok, "cat: {err}");
    assert_eq!(
        out,
        "y".repeat(5000).as_bytes(),
        "the forged TOC is consistent"
    );
    let (ok, _, err) = run(&["export", "-o", tar_arg], "forged");
    assert!(!ok, "the export through a forged TOC succeeded");
    assert!(err.contains(&d) && err.contains("verification"), "{err}");
    assert!(!tar_path.exists());
}

/// The digest of the only layer of the OCI layout at `dir`.
fn oci_digest(dir: &std::path::Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"][0]["digest"].as_str().unwrap();
    let blob = |d: &str| std::fs::read(dir.join("blobs/sha256").join(&d[7..])).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&blob(m)).unwrap();
    manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// An eStargz blob with its TOC member written again (stored deflate blocks, the JSON as
/// serde writes it), and the same with the entries of `x.txt` and `y.txt` swapped (their
/// names kept): the same size, since the swapped values have the same lengths.
fn toc_rewritten(blob: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use std::io::{Read, Write};
    let footer = &blob[blob.len() - 51..];
    let (toc_off, legacy) = ocifs::layer::estargz::parse_footer(footer).unwrap();
    assert!(!legacy);
    let member = &blob[toc_off as usize..blob.len() - 51];
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(member)
        .read_to_end(&mut tar)
        .unwrap();
    let mut ar = ::tar::Archive::new(&tar[..]);
    let mut json = Vec::new();
    ar.entries()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .read_to_end(&mut json)
        .unwrap();
    let toc: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let mut swapped = toc.clone();
    let entries = swapped["entries"].as_array_mut().unwrap();
    let at = |n: &str| entries.iter().position(|e| e["name"] == n).unwrap();
    let (x, y) = (at("x.txt"), at("y.txt"));
    entries.swap(x, y);
    let (nx, ny) = (entries[x]["name"].clone(), entries[y]["name"].clone());
    entries[x]["name"] = ny;
    entries[y]["name"] = nx;
    let write = |toc: &serde_json::Value| {
        let json = serde_json::to_vec(toc).unwrap();
        let mut b = ::tar::Builder::new(Vec::new());
        let mut h = ::tar::Header::new_ustar();
        h.set_size(json.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "stargz.index.json", &json[..])
            .unwrap();
        let tar = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
        gz.write_all(&tar).unwrap();
        let mut out = blob[..toc_off as usize].to_vec();
        out.extend(gz.finish().unwrap());
        out.extend_from_slice(footer);
        out
    };
    (write(&toc), write(&swapped))
}

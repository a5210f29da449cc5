//! The browse verbs, no mount: `ls` in `tar -tv` style and as JSON, `manifest`, `config`,
//! `digest`, `export`, `diff`, `tags --json`; and the command line's own help: completions,
//! the man page, `--version`.

use crate::builder::{self, Enc, Item, encode, file};
use crate::harness::{Env, TempDir, ocifs};
use std::process::Command;

fn run(args: &[&str]) -> String {
    let (ok, out, err) = ocifs(args, &[]);
    assert!(ok, "{args:?}: {err}");
    String::from_utf8(out).unwrap()
}

#[test]
fn browse_verbs_without_a_mount() {
    let Some(Env { reg, work }) = Env::without_fuse("browse") else {
        return;
    };
    let base = builder::tar(&[
        Item::Dir("etc", 0o755),
        file("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        file("etc/gone", "bye\n"),
        Item::File("bin/busybox".into(), b"#!/bin/true\n".to_vec(), 0o4755),
        Item::Symlink("bin/sh", "busybox"),
        Item::Hardlink("bin/ash", "bin/busybox"),
        file("same", "same bytes\n"),
    ]);
    let upper = builder::tar(&[
        file("etc/passwd", "root:x:0:0::/root:/bin/rc\n"),
        file("etc/.wh.gone", ""),
        file("etc/new", "new\n"),
    ]);
    let a_layers = vec![encode(base.clone(), Enc::Gzip)];
    let b_layers = vec![encode(base, Enc::Gzip), encode(upper, Enc::Gzip)];
    builder::push_one(work.path(), &a_layers, &reg.addr, "browse/a");
    builder::push_one(work.path(), &b_layers, &reg.addr, "browse/b");
    let a = format!("{}/browse/a:v1", reg.addr);
    let b = format!("{}/browse/b:v1", reg.addr);
    let cache = work.path().join("cache");
    let cd = cache.to_str().unwrap();

    // tar -tv style, absolute paths, symlinks not followed, dates in UTC.
    let out = run(&["ls", "-l", "--cache-dir", cd, &a, "/etc", "/bin/sh"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("-rw-r--r-- 0/0 ")
                && l.ends_with(" 2023-11-14 22:13 /etc/passwd")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("lrwxrwxrwx ") && l.ends_with("/bin/sh -> busybox")),
        "{out}"
    );
    let out = run(&["ls", "-l", "--cache-dir", cd, &a, "/bin/busybox"]);
    assert!(out.starts_with("-rwsr-xr-x 0/0 "), "{out}");
    assert_eq!(
        run(&["ls", "-d", "--cache-dir", cd, &a, "etc"]).trim(),
        "/etc"
    );
    let out = run(&["ls", "-R", "--json", "--cache-dir", cd, &a]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let passwd = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "/etc/passwd")
        .expect("/etc/passwd listed");
    assert_eq!(passwd["type"], "file");
    assert_eq!(passwd["mode"], 0o644);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "/bin/sh" && e["target"] == "busybox")
    );

    // manifest, digest, config.
    let (ok, manifest, err) = ocifs(&["manifest", "--cache-dir", cd, &a], &[]);
    assert!(ok, "{err}");
    let digest = run(&["digest", "--cache-dir", cd, &a]);
    assert_eq!(digest.trim(), builder::sha(&manifest));
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let (ok, config, err) = ocifs(&["config", "--cache-dir", cd, &a], &[]);
    assert!(ok, "{err}");
    assert_eq!(
        builder::sha(&config),
        m["config"]["digest"].as_str().unwrap(),
        "the config byte for byte"
    );
    let tags: Vec<String> = serde_json::from_str(&run(&[
        "tags",
        "--json",
        "--cache-dir",
        cd,
        &a[..a.len() - 3],
    ]))
    .unwrap();
    assert_eq!(tags, ["v1"]);

    // export: the merged tree, extracted by GNU tar.
    let exported = work.path().join("b.tar");
    run(&[
        "export",
        "--cache-dir",
        cd,
        "-o",
        exported.to_str().unwrap(),
        &b,
    ]);
    let root = TempDir::new("export-root");
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&exported)
        .arg("-C")
        .arg(root.path())
        .status()
        .unwrap();
    assert!(st.success());
    let r = root.path();
    assert_eq!(
        std::fs::read_to_string(r.join("etc/passwd")).unwrap(),
        "root:x:0:0::/root:/bin/rc\n"
    );
    assert!(!r.join("etc/gone").exists(), "whiteouts applied");
    assert_eq!(std::fs::read_to_string(r.join("etc/new")).unwrap(), "new\n");
    assert_eq!(
        std::fs::read_link(r.join("bin/sh")).unwrap().to_str(),
        Some("busybox")
    );
    use std::os::unix::fs::MetadataExt;
    let (x, y) = (
        std::fs::metadata(r.join("bin/ash")).unwrap(),
        std::fs::metadata(r.join("bin/busybox")).unwrap(),
    );
    assert_eq!(x.ino(), y.ino(), "hard link kept");
    assert_eq!(y.mode() & 0o7777, 0o4755);

    // pull: the same tree as files, verified first.
    let pulled = TempDir::new("pulled");
    let into = pulled.path().join("rootfs");
    let out = run(&["pull", "--cache-dir", cd, &b, into.to_str().unwrap()]);
    assert!(out.contains("pulled") && out.contains("verified"), "{out}");
    let same = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(&into)
        .arg(r)
        .status()
        .unwrap();
    assert!(same.success(), "pull and export agree");
    let (p, e) = (
        std::fs::symlink_metadata(into.join("bin/busybox")).unwrap(),
        std::fs::symlink_metadata(r.join("bin/busybox")).unwrap(),
    );
    assert_eq!(
        (p.mode(), p.mtime(), p.uid()),
        (e.mode(), e.mtime(), e.uid())
    );
    assert_eq!(
        std::fs::metadata(into.join("bin/ash")).unwrap().ino(),
        p.ino(),
        "hard link kept"
    );
    let (ok, _, err) = ocifs(
        &["pull", "--cache-dir", cd, &b, into.to_str().unwrap()],
        &[],
    );
    assert!(!ok && err.contains("not empty"), "{err}");

    // diff: by path, what changed.
    let out = run(&["diff", "--cache-dir", cd, &a, &b]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["D /etc/gone", "A /etc/new", "M /etc/passwd (content)"],
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&run(&["diff", "--json", "--cache-dir", cd, &a, &b])).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3, "{v}");
    assert_eq!(run(&["diff", "--cache-dir", cd, &a, &a]), "");
}

#[test]
fn completions_man_page_and_version() {
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("complete") && bash.contains("ocifs"),
        "{bash}"
    );
    let man = run(&["man"]);
    assert!(man.contains(".TH") && man.contains("umount"), "{man}");
    let version = run(&["--version"]);
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    assert!(
        version.contains("eStargz") && version.contains("zstd:chunked"),
        "{version}"
    );
    // Each subcommand's help describes its arguments.
    let help = run(&["ls", "--help"]);
    assert!(
        help.contains("tar -tv") && help.contains("Examples"),
        "{help}"
    );
    // Mount tuning flags show where they matter (and are still accepted elsewhere).
    assert!(
        !help.contains("--block-size") && help.contains("--cert-dir"),
        "{help}"
    );
    assert!(run(&["mount", "--help"]).contains("--block-size"));
}

#[test]
fn pull_refuses_a_layer_that_does_not_match_its_digest() {
    let Some(Env { reg, work }) = Env::without_fuse("pull-bad") else {
        return;
    };
    let layers = vec![
        encode(builder::tar(&[file("good", "good\n")]), Enc::Gzip),
        encode(
            builder::tar(&[file("data", crate::builder::noise(200_000, 3))]),
            Enc::Tar,
        ),
    ];
    builder::push_one(work.path(), &layers, &reg.addr, "pull/bad");
    // Flip one byte in the middle of the stored tar layer.
    let d = builder::sha(&layers[1].blob);
    let path = reg.dir.path().join(format!(
        "data/docker/registry/v2/blobs/sha256/{}/{}/data",
        &d[7..9],
        &d[7..]
    ));
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let cache = work.path().join("cache");
    let into = work.path().join("rootfs");
    let (ok, _, err) = ocifs(
        &[
            "pull",
            "-q",
            "--cache-dir",
            cache.to_str().unwrap(),
            &format!("{}/pull/bad:v1", reg.addr),
            into.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok, "pulled a corrupt layer");
    // One error line (the library's own log lines aside), naming the layer.
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("ocifs:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(&d) && lines[0].contains("digest"),
        "{err}"
    );
    assert!(!into.join("data").exists(), "nothing written from it");
}

//! Layer contents several test files share.

use crate::builder::{self, Item, file, noise};
use crate::harness::TempDir;

fn long_name() -> String {
    format!("deep/{}", "n".repeat(120))
}

/// Two layers that exercise every entry kind, whiteouts, opaque dirs and replacements.
pub fn base_layers() -> Vec<Vec<u8>> {
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

/// Layers big enough for many 64 KiB spans, so reads resume from checkpoints mid-stream.
pub fn span_layers() -> Vec<Vec<u8>> {
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

/// A layer made by GNU tar with `--sparse`: a file with ten data regions (more than fit in the
/// main header, so the sparse map continues in extension blocks) and a trailing hole.
pub fn gnu_sparse_layer() -> Vec<u8> {
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

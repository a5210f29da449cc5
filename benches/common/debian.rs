//! The realistic image of the benchmarks: a Debian bookworm minbase root file system with
//! python3 made by debootstrap from deb.debian.org (cached under target/bench-rootfs), split
//! into three layers (the base system, the Python standard library, a small app that imports
//! a dozen stdlib modules), and its workload, `chroot MOUNT python3 /app/main.py`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const APP: &str = r#"import argparse, asyncio, csv, datetime, decimal, email.message, hashlib, http.client
import json, logging, re, sqlite3, unittest, xml.etree.ElementTree as ET
db = sqlite3.connect(":memory:")
db.execute("create table t (x)")
print("ok", json.dumps({"n": len(re.findall("a", "banana"))}), decimal.Decimal("1.1") + 1)
"#;

/// The debootstrapped root file system, made once and kept under target/.
pub fn rootfs() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-rootfs");
    if !dir.join("usr/bin/python3").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("bench: debootstrap bookworm minbase + python3 (once; about a minute)");
        let st = Command::new("debootstrap")
            .args(["--variant=minbase", "--include=python3", "bookworm"])
            .arg(&dir)
            .arg("http://deb.debian.org/debian")
            .stdout(std::process::Stdio::null())
            .status()
            .expect("debootstrap (scripts/setup installs it)");
        assert!(st.success(), "debootstrap failed");
    }
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::write(dir.join("app/main.py"), APP).unwrap();
    dir
}

/// GNU tar of `paths` under `root` (numeric owners), minus `exclude` patterns.
pub fn tar_of(root: &Path, paths: &[&str], exclude: &[&str]) -> Vec<u8> {
    let mut cmd = Command::new("tar");
    cmd.args(["--numeric-owner", "--xattrs", "-C"]).arg(root);
    for e in exclude {
        cmd.arg(format!("--exclude={e}"));
    }
    cmd.args(["-cf", "-"]).args(paths);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs the workload on the root file system at `root` (a mount or a directory); its time.
/// Panics when it fails.
pub fn run_app(root: &Path) -> Duration {
    try_run_app(root).unwrap_or_else(|e| panic!("{e}"))
}

/// [`run_app`], returning a failure (the app's exit status and standard error) instead.
pub fn try_run_app(root: &Path) -> Result<Duration, String> {
    let t = Instant::now();
    let out = Command::new("/usr/sbin/chroot")
        .arg(root)
        .args(["/usr/bin/python3", "/app/main.py"])
        .env_clear()
        .env("PYTHONHASHSEED", "0")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .map_err(|e| format!("app: chroot: {e}"))?;
    if !(out.status.success() && out.stdout.starts_with(b"ok")) {
        return Err(format!(
            "app: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(t.elapsed())
}

/// The image's three layers as uncompressed tars: the base system, the Python standard
/// library, the app.
pub fn layers(root: &Path) -> [Vec<u8>; 3] {
    [
        tar_of(
            root,
            &["."],
            &[
                "./usr/lib/python3*",
                "./app",
                "./proc/*",
                "./var/cache/apt/archives/*.deb",
                "./var/lib/apt/lists/*",
                "./sys/*",
                "./dev/*",
            ],
        ),
        tar_of(root, &["./usr/lib/python3", "./usr/lib/python3.11"], &[]),
        tar_of(root, &["./app"], &[]),
    ]
}

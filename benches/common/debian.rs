//! The realistic benchmark image: a Debian bookworm minbase root file system with python3
//! (debootstrap from deb.debian.org, cached under target/bench-rootfs) in three layers (the
//! base system, the Python standard library, a small app that imports a dozen stdlib
//! modules), published to a registry in every format the realistic and podman benchmarks
//! compare. The image's command is `python3 /app/main.py`, which prints a line starting with
//! `ok`.

use super::record_and_convert;
use crate::builder::{self, Enc, encode, push};
use crate::harness::{Registry, TempDir, ocifs, push_index};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The app: imports, a little work, then one line starting with "ok".
pub const APP: &str = r#"import argparse, asyncio, csv, datetime, decimal, email.message, hashlib, http.client
import json, logging, re, sqlite3, unittest, xml.etree.ElementTree as ET
db = sqlite3.connect(":memory:")
db.execute("create table t (x)")
print("ok", json.dumps({"n": len(re.findall("a", "banana"))}), decimal.Decimal("1.1") + 1)
"#;

/// What the app prints when it ran right.
pub const APP_OUTPUT: &str = "ok {\"n\": 3} 2.1\n";

/// The debootstrapped root file system, made once and kept under target/.
pub fn rootfs() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-rootfs");
    if !dir.join("usr/bin/python3").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("realistic: debootstrap bookworm minbase + python3 (once; about a minute)");
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

/// GNU tar of `paths` under `root` (numeric owners), minus `exclude` patterns; with
/// `xattrs`, in POSIX format with extended attributes (and so a PAX header of times for every
/// entry).
pub fn tar_of(root: &Path, paths: &[&str], exclude: &[&str], xattrs: bool) -> Vec<u8> {
    let mut cmd = Command::new("tar");
    cmd.arg("--numeric-owner");
    if xattrs {
        cmd.arg("--xattrs");
    }
    cmd.arg("-C").arg(root);
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

/// The three layers' tars: the base system, the Python standard library, the app (`xattrs`:
/// see [`tar_of`]).
pub fn layers(root: &Path, xattrs: bool) -> [Vec<u8>; 3] {
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
            xattrs,
        ),
        tar_of(
            root,
            &["./usr/lib/python3", "./usr/lib/python3.11"],
            &[],
            xattrs,
        ),
        tar_of(root, &["./app"], &[], xattrs),
    ]
}

/// `chroot ROOT python3 /app/main.py`, which must print the app's line; its wall time.
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

/// The image as published: repositories `real/NAME:v1` of one registry.
pub struct Published {
    /// Compressed bytes of the layers of each published variant, by name: `gzip` (with its
    /// checkpoint indexes published beside it), `plain` (the same blobs, no index),
    /// `estargz`, `profiled` (eStargz ordered by the recorded profile) and, when asked for,
    /// `zstd-chunked`.
    pub sizes: HashMap<&'static str, usize>,
    /// The largest gzip layer (digest, size), for the link probe.
    pub probe_blob: (String, u64),
    /// The app's recorded profile (what `--prefetch` takes).
    pub profile: PathBuf,
}

/// Builds the image's layers from [`rootfs`] and publishes every variant to `reg` (files
/// under `work`); with `zstd_chunked`, a zstd:chunked variant too (skopeo compresses it).
pub fn publish(reg: &Registry, work: &TempDir, zstd_chunked: bool) -> Published {
    let root = rootfs();
    let tars = layers(&root, true);
    let mut sizes = HashMap::new();
    let mut probe_blob = (String::new(), 0u64);
    let command = ["python3", "/app/main.py"];
    for (name, enc) in [("gzip", Enc::Gzip), ("estargz", Enc::Estargz)] {
        let encoded: Vec<_> = tars.iter().cloned().map(|t| encode(t, enc)).collect();
        sizes.insert(name, encoded.iter().map(|l| l.blob.len()).sum::<usize>());
        if name == "gzip" {
            let big = encoded.iter().max_by_key(|l| l.blob.len()).unwrap();
            probe_blob = (ocifs::digest::sha256(&big.blob), big.blob.len() as u64);
        }
        // The config names the command, as a real image's would.
        let dir = builder::layout_with_command(
            &work.path().join(name),
            "v1",
            &[("linux", "amd64", None, &encoded)],
            &command,
        );
        push(&dir, "v1", &reg.addr, &format!("real/{name}"), None);
        if name == "gzip" {
            // The same image where no index is published: a first mount builds one.
            push(&dir, "v1", &reg.addr, "real/plain", None);
            sizes.insert("plain", sizes["gzip"]);
        }
    }
    let direct = |name: &str| format!("{}/real/{name}:v1", reg.addr);
    if zstd_chunked {
        // Without PAX headers: skopeo 1.9's zstd:chunked compressor fails on GNU tar's POSIX
        // format ("short write"); the root file system has no extended attributes anyway.
        let plain_tars = layers(&root, false);
        let encoded: Vec<_> = plain_tars
            .into_iter()
            .map(|t| encode(t, Enc::Tar))
            .collect();
        let dir = builder::layout_with_command(
            &work.path().join("tar"),
            "v1",
            &[("linux", "amd64", None, &encoded)],
            &command,
        );
        builder::push_recompressed(&dir, "v1", &reg.addr, "real/zstd-chunked", "zstd:chunked");
        sizes.insert("zstd-chunked", image_size(&direct("zstd-chunked")) as usize);
    }

    // A recorded profile of the app, for the profile-ordered eStargz variant (recorded on
    // the registry directly: a profile is what is read, in order, not when).
    let profile = work.path().join("app.profile");
    let conv = TempDir::new("rconv");
    record_and_convert(
        &direct("estargz"),
        &profile,
        |root| {
            run_app(root);
        },
        &direct("gzip"),
        &direct("profiled"),
        conv.path(),
    );
    sizes.insert("profiled", image_size(&direct("profiled")) as usize);
    // The gzip image's indexes, published next to it (not timed).
    push_index(&direct("gzip"), &[]);
    Published {
        sizes,
        probe_blob,
        profile,
    }
}

/// The compressed size of `reference`'s layers, as `ocifs inspect` sees them.
pub fn image_size(reference: &str) -> u64 {
    let (ok, out, err) = ocifs(&["inspect", "--insecure", "--json", reference], &[]);
    assert!(ok, "inspect {reference}: {err}");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum()
}

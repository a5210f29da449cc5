//! Image builder for tests: a small tar DSL, real encoders (flate2, GNU gzip, zstd, pigz,
//! stargz-snapshotter's own estargz.Build via a tiny Go program), an OCI layout writer, and
//! a push with skopeo.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// One tar entry of a test layer.
pub enum Item {
    Dir(&'static str, u32),
    File(String, Vec<u8>, u32),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
    Fifo(&'static str),
    Char(&'static str, u32, u32),
    /// A file with (uid, gid) and xattrs.
    Owned(
        &'static str,
        Vec<u8>,
        u32,
        u32,
        Vec<(&'static str, &'static [u8])>,
    ),
}

pub fn file(path: &str, data: impl Into<Vec<u8>>) -> Item {
    Item::File(path.to_string(), data.into(), 0o644)
}

/// Deterministic incompressible bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const MTIME: u64 = 1_700_000_000;

/// Serialises items as a tar (GNU headers, PAX for xattrs), every entry with a fixed mtime.
pub fn tar(items: &[Item]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let hdr = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for it in items {
        match it {
            Item::Dir(p, mode) => b
                .append_data(&mut hdr(tar::EntryType::Directory, *mode, 0), p, &[][..])
                .unwrap(),
            Item::File(p, d, mode) => b
                .append_data(
                    &mut hdr(tar::EntryType::Regular, *mode, d.len() as u64),
                    p,
                    &d[..],
                )
                .unwrap(),
            Item::Symlink(p, t) => b
                .append_link(&mut hdr(tar::EntryType::Symlink, 0o777, 0), p, t)
                .unwrap(),
            Item::Hardlink(p, t) => b
                .append_link(&mut hdr(tar::EntryType::Link, 0o644, 0), p, t)
                .unwrap(),
            Item::Fifo(p) => b
                .append_data(&mut hdr(tar::EntryType::Fifo, 0o600, 0), p, &[][..])
                .unwrap(),
            Item::Char(p, ma, mi) => {
                let mut h = hdr(tar::EntryType::Char, 0o666, 0);
                h.set_device_major(*ma).unwrap();
                h.set_device_minor(*mi).unwrap();
                b.append_data(&mut h, p, &[][..]).unwrap()
            }
            Item::Owned(p, d, uid, gid, xattrs) => {
                let keys: Vec<(String, &[u8])> = xattrs
                    .iter()
                    .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                    .collect();
                b.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))
                    .unwrap();
                let mut h = hdr(tar::EntryType::Regular, 0o640, d.len() as u64);
                h.set_uid(*uid as u64);
                h.set_gid(*gid as u64);
                b.append_data(&mut h, p, &d[..]).unwrap()
            }
        }
    }
    b.into_inner().unwrap()
}

/// How a layer is encoded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Enc {
    Tar,
    /// flate2 at level 6.
    Gzip,
    /// flate2 at level 1 and 9.
    Gzip1,
    Gzip9,
    /// Python's gzip module.
    PythonGzip,
    /// GNU gzip -n.
    GnuGzip,
    /// pigz with small blocks: several gzip members.
    Pigz,
    Zstd,
    /// pzstd: several frames, each preceded by a skippable frame.
    Pzstd,
    /// libzstd frames of 64 KiB of input each, with a skippable frame in between (the shape
    /// of seekable zstd and zstd:chunked).
    ZstdFrames,
    Estargz,
}

pub struct EncodedLayer {
    pub blob: Vec<u8>,
    pub media_type: &'static str,
    pub annotations: Vec<(String, String)>,
    /// The original tar, for the oracle.
    pub tar: Vec<u8>,
}

fn pipe(cmd: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{cmd} failed");
    out.stdout
}

/// The Go helper built from tests/tools/estargz-build (scripts/test builds it; we build it
/// here too when missing or older than its source).
pub fn estargz_tool() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tools/estargz-build");
    let bin = dir.join("estargz-build");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&bin) < modified(&dir.join("main.go")) {
        let st = Command::new("go")
            .args(["build", "-o", "estargz-build", "."])
            .current_dir(&dir)
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOCACHE", std::env::temp_dir().join("ocifs-gocache"))
            .status()
            .expect("go (golang-go) is needed to build the eStargz encoder");
        assert!(st.success(), "building the eStargz encoder failed");
    }
    bin
}

pub fn encode(tar: Vec<u8>, enc: Enc) -> EncodedLayer {
    encode_prioritized(tar, enc, &[])
}

/// [`encode`], with eStargz files to put first (before `.prefetch.landmark`).
pub fn encode_prioritized(tar: Vec<u8>, enc: Enc, first: &[&str]) -> EncodedLayer {
    let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
    let mut annotations = Vec::new();
    let (blob, media_type) = match enc {
        Enc::Tar => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
        Enc::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            std::io::Write::write_all(&mut e, &tar).unwrap();
            (e.finish().unwrap(), gz)
        }
        Enc::Gzip1 | Enc::Gzip9 => {
            let level = if enc == Enc::Gzip1 { 1 } else { 9 };
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
            std::io::Write::write_all(&mut e, &tar).unwrap();
            (e.finish().unwrap(), gz)
        }
        Enc::PythonGzip => (
            pipe(
                "python3",
                &[
                    "-c",
                    "import gzip,sys; sys.stdout.buffer.write(gzip.compress(sys.stdin.buffer.read()))",
                ],
                &tar,
            ),
            gz,
        ),
        Enc::GnuGzip => (pipe("gzip", &["-n", "-c"], &tar), gz),
        Enc::Pigz => (
            pipe("pigz", &["-n", "-c", "-b", "128", "--independent"], &tar),
            gz,
        ),
        Enc::Zstd => (
            pipe("zstd", &["-q", "-c"], &tar),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        Enc::Pzstd => (
            pipe("pzstd", &["-q", "-p", "2", "-c"], &tar),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        Enc::ZstdFrames => {
            let mut out = Vec::new();
            for (i, part) in tar.chunks(64 * 1024).enumerate() {
                out.extend(zstd::bulk::compress(part, 3).unwrap());
                if i == 1 {
                    out.extend_from_slice(&0x184D2A50u32.to_le_bytes());
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(b"meta");
                }
            }
            (out, "application/vnd.oci.image.layer.v1.tar+zstd")
        }
        Enc::Estargz => {
            // A directory of its own: tests running at once may encode the same tar.
            let dir = crate::harness::TempDir::new("estargz");
            let tmp = dir.path().join("layer.tar");
            std::fs::write(&tmp, &tar).unwrap();
            let out = Command::new(estargz_tool())
                .arg(&tmp)
                .arg(first.join(","))
                .output()
                .unwrap();
            drop(dir);
            assert!(
                out.status.success(),
                "estargz-build: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let meta = String::from_utf8(out.stderr).unwrap();
            let toc = meta.split_whitespace().next().unwrap().to_string();
            annotations.push(("containerd.io/snapshot/stargz/toc.digest".into(), toc));
            (out.stdout, gz)
        }
    };
    EncodedLayer {
        blob,
        media_type,
        annotations,
        tar,
    }
}

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes an OCI layout with one image per (platform, layers) and tags the image (or an
/// index of them, with several) as `tag`. Returns the layout directory.
pub fn layout(
    dir: &Path,
    tag: &str,
    images: &[(&str, &str, Option<&str>, &[EncodedLayer])],
) -> PathBuf {
    layout_with_command(dir, tag, images, &["/bin/sh"])
}

/// [`layout`] with `command` as the images' configured `Cmd`.
pub fn layout_with_command(
    dir: &Path,
    tag: &str,
    images: &[(&str, &str, Option<&str>, &[EncodedLayer])],
    command: &[&str],
) -> PathBuf {
    layout_with_config(dir, tag, images, serde_json::json!({"Cmd": command}))
}

/// [`layout`] with `config` as the images' config's `config` object (Cmd, Env, User, ...).
pub fn layout_with_config(
    dir: &Path,
    tag: &str,
    images: &[(&str, &str, Option<&str>, &[EncodedLayer])],
    config: serde_json::Value,
) -> PathBuf {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let d = sha(data);
        std::fs::write(blobs.join(&d[7..]), data).unwrap();
        (d, data.len())
    };
    let mut manifests = Vec::new();
    for (os, arch, variant, layers) in images {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha(&decompress(l))).collect();
        let config = serde_json::json!({
            "architecture": arch, "os": os, "variant": variant,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let (cd, cs) = put(serde_json::to_vec(&config).unwrap().as_slice());
        let layer_descs: Vec<_> = layers
            .iter()
            .map(|l| {
                let (d, s) = put(&l.blob);
                let ann: serde_json::Map<String, serde_json::Value> = l.annotations.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
                serde_json::json!({"mediaType": l.media_type, "digest": d, "size": s, "annotations": ann})
            })
            .collect();
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": layer_descs,
        });
        let (md, ms) = put(serde_json::to_vec(&m).unwrap().as_slice());
        let mut platform = serde_json::json!({"os": os, "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = (*v).into();
        }
        manifests.push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms, "platform": platform}));
    }
    let top = if manifests.len() == 1 {
        manifests.remove(0)
    } else {
        let idx = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
        let (d, s) = put(serde_json::to_vec(&idx).unwrap().as_slice());
        serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": s})
    };
    let mut top = top;
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [top]})).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    dir.to_path_buf()
}

fn decompress(l: &EncodedLayer) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    match l.media_type {
        m if m.ends_with("gzip") => {
            flate2::read::MultiGzDecoder::new(&l.blob[..])
                .read_to_end(&mut out)
                .unwrap();
        }
        m if m.ends_with("zstd") => {
            zstd::stream::read::Decoder::new(&l.blob[..])
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
        }
        _ => out = l.blob.clone(),
    }
    out
}

/// Writes a single-platform (linux/amd64) layout of `layers` under `work` and pushes it as
/// `registry/repo:v1`.
pub fn push_one(work: &Path, layers: &[EncodedLayer], registry: &str, repo: &str) {
    let dir = layout(
        &work.join(format!("layout-{}", repo.replace('/', "_"))),
        "v1",
        &[("linux", "amd64", None, layers)],
    );
    push(&dir, "v1", registry, repo, None);
}

/// Pushes `oci:DIR:tag` with skopeo compressing its (uncompressed) layers with Go's gzip.
pub fn push_go_gzip(dir: &Path, tag: &str, registry: &str, repo: &str) {
    push_recompressed(dir, tag, registry, repo, "gzip")
}

/// Pushes `oci:DIR:tag` with skopeo (containers/image, Go) compressing its uncompressed
/// layers as `format`: `gzip`, `zstd` or `zstd:chunked`.
pub fn push_recompressed(dir: &Path, tag: &str, registry: &str, repo: &str, format: &str) {
    let src = format!("oci:{}:{tag}", dir.display());
    let dst = format!("docker://{registry}/{repo}:{tag}");
    let fmt = format!("--dest-compress-format={format}");
    let args = [
        "copy",
        "--quiet",
        "--dest-compress",
        &fmt,
        "--dest-tls-verify=false",
        &src,
        &dst,
    ];
    let out = Command::new("skopeo").args(args).output().expect("skopeo");
    assert!(
        out.status.success(),
        "skopeo push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pushes `oci:DIR:tag` to `registry/repo:tag` with skopeo.
pub fn push(dir: &Path, tag: &str, registry: &str, repo: &str, creds: Option<&str>) {
    let flags: Vec<String> = creds
        .map(|c| format!("--dest-creds={c}"))
        .into_iter()
        .collect();
    push_with(dir, tag, registry, repo, &flags);
}

/// Pushes `oci:DIR:tag` to `registry/repo:tag` with skopeo, adding `flags` to its command.
pub fn push_with<S: AsRef<std::ffi::OsStr>>(
    dir: &Path,
    tag: &str,
    registry: &str,
    repo: &str,
    flags: &[S],
) {
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--all", "--preserve-digests"])
        .args(flags)
        .arg("--dest-tls-verify=false")
        .arg(format!("oci:{}:{tag}", dir.display()))
        .arg(format!("docker://{registry}/{repo}:{tag}"))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "skopeo push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! Writes the seed corpus of the fuzz targets (`fuzz/corpus/<target>/seed-*`, see
//! src/fuzzing) from real producers: stargz-snapshotter's `estargz.Build` and ocifs's own
//! eStargz writer, containers/image's zstd:chunked (skopeo), SOCI zTOCs from
//! tests/tools/soci (zlib, tarfile, flatc), checkpoint index files built by ocifs, tars from
//! the test DSL, GNU tar and Python's tarfile, and the manifests of an OCI layout. Ignored:
//! run it again when a format changes (`cargo test --test it fuzz_seeds -- --ignored`), and
//! keep the corpus small (libFuzzer grows its own from it).

use crate::builder::{self, Enc, Item, file};
use crate::harness::TempDir;
use ocifs::blob::{Blob, MemBlob};
use ocifs::layer::checkpoint::{
    Checkpoint, CheckpointIndex, Codec, Mark, Resume, WindowsRef, file as index_file,
};
use ocifs::layer::{Entry, Kind, Locator};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn corpus(target: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn seed(target: &str, name: &str, data: &[u8]) {
    std::fs::write(corpus(target).join(format!("seed-{name}")), data).unwrap();
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Compressible text of `len` bytes (so chunked formats make several chunks of a few bytes).
fn text(len: usize) -> Vec<u8> {
    b"the quick brown fox jumps over the lazy dog 0123456789\n"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// A small layer with one of every kind of entry, a long name, xattrs and a file of several
/// 64 KiB chunks.
fn small_tar() -> Vec<u8> {
    builder::tar(&[
        Item::Dir("etc", 0o755),
        file("etc/hostname", "fuzz\n"),
        Item::Symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
        Item::Hardlink("etc/hostname.bak", "etc/hostname"),
        Item::Fifo("run-fifo"),
        Item::Char("dev-null", 1, 3),
        Item::Owned(
            "home/u/f",
            b"owned".to_vec(),
            1000,
            1000,
            vec![("user.k", b"v\0x")],
        ),
        file(&format!("deep/{}/name", "d".repeat(120)), "long"),
        file("usr/lib/big.txt", text(150 << 10)),
        file("empty", ""),
    ])
}

fn references() {
    let d = format!("sha256:{}", "a1".repeat(32));
    for (i, r) in [
        "alpine".to_string(),
        "library/alpine:3.19".into(),
        "docker.io/user/app:v1.2-rc_3".into(),
        "index.docker.io/library/busybox".into(),
        "127.0.0.1:5000/ns/app:latest".into(),
        "localhost/app".into(),
        "ghcr.io/org/team/app.x-y_z:tag".into(),
        format!("app@{d}"),
        format!("registry.example.com:443/a/b:c@{d}"),
        "[::1]:5000/app".into(),
        "Alpine".into(),
        "a//b".into(),
        "host:99999/app".into(),
    ]
    .iter()
    .enumerate()
    {
        seed("reference", &format!("{i:02}"), r.as_bytes());
    }
}

/// Tars: the test DSL's, GNU tar's (GNU sparse and PAX sparse), Python's PAX.
fn tars(work: &Path) {
    let small = builder::tar(&[
        Item::Dir("etc", 0o755),
        file("etc/hostname", "fuzz\n"),
        Item::Symlink("bin/sh", "busybox"),
        Item::Hardlink("etc/h2", "etc/hostname"),
        Item::Fifo("fifo"),
        Item::Char("null", 1, 3),
        Item::Owned(
            "home/f",
            b"owned".to_vec(),
            1000,
            100,
            vec![("user.k", b"v\0x")],
        ),
        file(&format!("{}/long", "d".repeat(150)), "long name"),
        file(".wh.gone", ""),
    ]);
    seed("tar", "dsl", &small);
    let dir = work.join("gnu");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::fs::File::create(dir.join("sparse")).unwrap();
    f.set_len(64 << 10).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(20 << 10)).unwrap();
    f.write_all(b"data in the middle").unwrap();
    drop(f);
    std::fs::write(dir.join("plain"), "plain\n").unwrap();
    for (name, format) in [("gnu-sparse", "gnu"), ("pax-sparse", "pax")] {
        let out = work.join(format!("{name}.tar"));
        run(Command::new("tar")
            .args(["--sparse", "--owner=0", "--group=0", "--mtime=@1700000000"])
            .arg(format!("--format={format}"))
            .arg("-cf")
            .arg(&out)
            .arg("-C")
            .arg(&dir)
            .args(["sparse", "plain"]));
        seed("tar", name, &std::fs::read(out).unwrap());
    }
    let script = r#"
import io, sys, tarfile
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
    for name, data, pax in [("a/" + "p" * 200, b"pax long name", {"mtime": "1700000000.5"}),
                            ("b", b"xattr", {"SCHILY.xattr.user.x": "1", "uid": "70000"})]:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.pax_headers = len(data), 1700000000, pax
        t.addfile(ti, io.BytesIO(data))
sys.stdout.buffer.write(buf.getvalue())
"#;
    seed(
        "tar",
        "python-pax",
        &run(Command::new("python3").args(["-c", script])),
    );
}

/// eStargz by stargz-snapshotter and by ocifs, and legacy stargz (the same blob with the
/// 47-byte footer).
fn estargz() {
    let tar = small_tar();
    let go = builder::encode_prioritized(tar.clone(), Enc::Estargz, &["etc/hostname"]).blob;
    seed("estargz", "stargz-snapshotter", &go);
    let mut ours = Vec::new();
    let opts = ocifs::convert::estargz::Options {
        chunk_size: 64 << 10,
        prioritized: Vec::new(),
    };
    ocifs::convert::estargz::write(std::io::Cursor::new(&tar), &mut ours, &opts).unwrap();
    seed("estargz", "ocifs", &ours);
    let footer = &go[go.len() - 51..];
    let mut legacy = go[..go.len() - 51].to_vec();
    legacy.extend_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 22, 0]);
    legacy.extend_from_slice(&footer[16..38]);
    legacy.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    seed("estargz", "legacy", &legacy);
}

/// The layer descriptors of the manifest an OCI layout's index.json names.
fn manifest_of(layout: &Path) -> (Vec<u8>, serde_json::Value) {
    let blob = |d: &str| std::fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let raw = blob(index["manifests"][0]["digest"].as_str().unwrap());
    let m = serde_json::from_slice(&raw).unwrap();
    (raw, m)
}

/// zstd:chunked by containers/image (skopeo), with its manifest; the layout's manifests,
/// config and index; a Docker manifest; an index with several platforms and a SOCI entry.
fn zstd_chunked_and_manifests(work: &Path) {
    let layer = builder::encode(small_tar(), Enc::Tar);
    let src = builder::layout(
        &work.join("src"),
        "v1",
        &[("linux", "amd64", None, &[layer])],
    );
    let dst = work.join("zc");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-compress",
        "--dest-compress-format=zstd:chunked",
        &format!("oci:{}:v1", src.display()),
        &format!("oci:{}:v1", dst.display()),
    ]));
    let (raw, m) = manifest_of(&dst);
    seed("manifest", "oci-zstd-chunked", &raw);
    let d = m["layers"][0]["digest"].as_str().unwrap();
    let blob = std::fs::read(dst.join("blobs/sha256").join(&d[7..])).unwrap();
    seed("zstdchunked", "containers-image", &blob);
    let config = m["config"]["digest"].as_str().unwrap();
    let config = std::fs::read(dst.join("blobs/sha256").join(&config[7..])).unwrap();
    seed("manifest", "config", &config);
    seed(
        "manifest",
        "layout-index",
        &std::fs::read(dst.join("index.json")).unwrap(),
    );
    let docker = work.join("docker");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--format=v2s2",
        &format!("oci:{}:v1", src.display()),
        &format!("dir:{}", docker.display()),
    ]));
    seed(
        "manifest",
        "docker-v2s2",
        &std::fs::read(docker.join("manifest.json")).unwrap(),
    );
    let (l1, l2) = (
        builder::encode(small_tar(), Enc::Gzip),
        builder::encode(small_tar(), Enc::Gzip),
    );
    let multi = builder::layout(
        &work.join("multi"),
        "v1",
        &[
            ("linux", "amd64", None, &[l1]),
            ("linux", "arm64", Some("v8"), &[l2]),
        ],
    );
    let (raw, mut index) = manifest_of(&multi);
    seed("manifest", "oci-index", &raw);
    // A SOCI v2 index listed beside the images, and the Docker spelling of an index.
    index["manifests"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.amazon.soci.index.v2+json",
        "digest": format!("sha256:{}", "5".repeat(64)), "size": 10,
        "annotations": {"com.amazon.soci.image-manifest-digest": format!("sha256:{}", "6".repeat(64))},
    }));
    seed(
        "manifest",
        "oci-index-soci",
        &serde_json::to_vec(&index).unwrap(),
    );
    index["mediaType"] = "application/vnd.docker.distribution.manifest.list.v2+json".into();
    seed(
        "manifest",
        "docker-list",
        &serde_json::to_vec(&index).unwrap(),
    );
}

/// A SOCI zTOC of a small gzip layer, by tests/tools/soci (several spans).
fn soci() {
    // Incompressible bytes: deflate ends a block every ~16 KiB of them, so there are spans.
    let tar = builder::tar(&[file("a", builder::noise(48 << 10, 7)), file("b", "b")]);
    let gz = builder::encode(tar, Enc::Gzip).blob;
    let script = r#"
import sys
sys.path.insert(0, sys.argv[1])
import publish
data, n = publish.ztoc(sys.stdin.buffer.read(), 1 << 14, "none")
sys.stdout.buffer.write(data)
sys.stderr.write(f"{n} checkpoints")
"#;
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tools/soci");
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(tools)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&gz).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(
        out.stderr.starts_with(b"2 ") || out.stderr.starts_with(b"3 "),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    seed("soci", "publish-py", &out.stdout);
}

/// The form the checkpoint_file target reads: a byte choosing the format version (2 + the
/// byte modulo 3), then the decompressed payload of an index `file`.
fn payload(version: u8, file: &[u8]) -> Vec<u8> {
    let mut out = vec![version - 2];
    out.extend(zstd::bulk::decompress(&file[52..], 1 << 24).unwrap());
    out
}

/// Index files: one built by ocifs from a gzip layer with several deflate blocks, and one by
/// hand with marks, resume states, a windows blob, xattrs and a sparse entry (also in the
/// older formats 2 and 3).
async fn checkpoint_files() {
    let tar = builder::tar(&[
        file("a", text(12 << 10)),
        file("n", builder::noise(8 << 10, 1)),
        file("b", text(6 << 10)),
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    for piece in tar.chunks(2048) {
        gz.write_all(piece).unwrap();
        gz.flush().unwrap();
    }
    let gz = gz.finish().unwrap();
    let blob: Blob = Arc::new(MemBlob::new(builder::sha(&gz), gz));
    let (index, _windows) = CheckpointIndex::build(blob, Codec::Gzip, 8 << 10, &|_, _| ())
        .await
        .unwrap();
    assert!(index.checkpoints.len() > 1, "{index:?}");
    let built = index_file::encode(&index);
    seed("checkpoint_file", "built-file", &built);
    seed("checkpoint_file", "built-v4", &payload(4, &built));
    let mut e = Entry::new("a/b".into(), Kind::File);
    e.size = 5;
    e.data = Locator::Tar { offset: 512 };
    e.xattrs.push(("user.x".into(), vec![0, 1]));
    let mut l = Entry::new("l".into(), Kind::Symlink);
    l.link = Some("a/b".into());
    let mut sp = Entry::new("sparse".into(), Kind::File);
    sp.size = 1 << 30;
    sp.data = Locator::Sparse { header: 4096 };
    let mark = |inp, out, d: u8| Mark {
        inp,
        out,
        digest: [d; 32],
        resume: Some(Resume {
            len: 77,
            out_digest: [d + 1; 32],
        }),
    };
    let hand = CheckpointIndex {
        digest: "sha256:hand".into(),
        codec: Codec::Gzip,
        span: 1024,
        comp_size: 100,
        uncomp_size: 4096,
        checkpoints: vec![
            Checkpoint {
                out: 0,
                inp: 10,
                bits: 0,
                window: vec![],
            },
            Checkpoint {
                out: 2000,
                inp: 50,
                bits: 3,
                window: vec![7; 64],
            },
        ],
        span_digests: vec![[1; 32], [2; 32]],
        entries: vec![e, l, sp],
        marks: vec![vec![mark(30, 900, 3)], vec![mark(70, 3000, 5)]],
        windows: Some(WindowsRef {
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 154,
        }),
    };
    let v4 = payload(4, &index_file::encode(&hand));
    seed("checkpoint_file", "hand-v4", &v4);
    // A zstd index has no marks: without the windows flag (its last byte) the payload is of
    // format 3, without the marks count (8 more) of format 2.
    let mut zstd = hand.clone();
    zstd.codec = Codec::Zstd;
    zstd.marks.clear();
    zstd.windows = None;
    let z = payload(4, &index_file::encode(&zstd));
    let mut v3 = z[..z.len() - 1].to_vec();
    v3[0] = 1;
    seed("checkpoint_file", "zstd-v3", &v3);
    let mut v2 = z[..z.len() - 9].to_vec();
    v2[0] = 0;
    seed("checkpoint_file", "zstd-v2", &v2);
}

#[tokio::test]
#[ignore = "writes fuzz/corpus; run by hand when a format changes"]
async fn fuzz_seeds() {
    let work = TempDir::new("fuzz-seeds");
    references();
    tars(work.path());
    estargz();
    zstd_chunked_and_manifests(work.path());
    soci();
    checkpoint_files().await;
}

//! The on-disk form of a [`CheckpointIndex`]: a compact, versioned, self-checking binary file.
//!
//! Layout: magic `OCIFSGZI`, format version (u32 LE; 2 added the codec, 3 the marks, 4 the
//! marks' resume states and the name of their windows blob),
//! payload length (u64 LE), sha256 of the payload, then the payload: zstd-compressed
//! little-endian fields (layer digest, span, sizes, checkpoints with their windows, span
//! digests, tar entries, since version 3 each span's marks, since version 4 each mark's
//! windows-blob entry length and output digest, then the windows blob's digest and size).
//! Versions 2 and 3 still load (without marks or windows: their reads decode from span
//! starts). Loading checks every length
//! against what is left, so a corrupt or hostile file is an error, never a panic or a huge
//! allocation; the caller also checks the layer digest before trusting it.

use super::{Checkpoint, CheckpointIndex, Codec, Mark, Resume, WindowsRef};
use crate::error::{Error, Result};
use crate::layer::{Entry, Kind, Locator};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"OCIFSGZI";
/// The version written.
pub(crate) const VERSION: u32 = 4;
/// The oldest version still read.
const OLDEST: u32 = 2;
/// Decompressed payloads larger than this are refused.
const MAX_PAYLOAD: usize = 1 << 30;

/// Where the index of a layer lives in the cache directory.
pub fn path(cache_dir: &Path, digest: &str) -> PathBuf {
    cache_dir
        .join("indexes")
        .join(format!("{}.idx", digest.replace(':', "-")))
}

/// Where the windows blob of an index built here is kept (named by its digest, as when
/// published).
pub fn windows_path(cache_dir: &Path, digest: &str) -> PathBuf {
    cache_dir
        .join("indexes")
        .join(format!("{}.win", digest.replace(':', "-")))
}

/// Where an index fetched from the registry waits in the cache directory until the layer has
/// been checked against it (see [`crate::verify`]); a later mount loads it as unverified.
pub fn unverified_path(cache_dir: &Path, digest: &str) -> PathBuf {
    path(cache_dir, digest).with_extension("idx.unverified")
}

/// Moves an index file from its [`unverified_path`] to its [`path`], once the layer has been
/// checked against it.
pub fn mark_checked(unverified: &Path) -> std::io::Result<()> {
    std::fs::rename(unverified, unverified.with_extension(""))
}

/// Writes `bytes` to `path` whole or not at all (a temporary file renamed into place), so a
/// reader never loads half an index.
pub async fn keep(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    crate::blob::disk::write_in_place(path, bytes).await
}

/// Builds the index of `blob` in one pass (which checks the blob's digest) and keeps it and
/// its windows blob in `cache_dir`, where later mounts trust them. A failure to keep them
/// is logged, not returned: the index built is good either way. With `copy`, the decoded tar
/// too (see [`CheckpointIndex::build_copying`]).
pub async fn build_and_keep(
    blob: crate::blob::Blob,
    codec: Codec,
    span: u64,
    cache_dir: &Path,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
    copy: Option<&super::CopyTo>,
) -> Result<(CheckpointIndex, Vec<u8>, Option<std::fs::File>)> {
    let (index, windows, copy) =
        CheckpointIndex::build_copying(blob, codec, span, progress, copy).await?;
    // The windows first, then the index that names them.
    let mut files = Vec::new();
    if let Some(w) = &index.windows {
        files.push((windows_path(cache_dir, &w.digest), None));
    }
    files.push((path(cache_dir, &index.digest), Some(encode(&index))));
    for (file, encoded) in files {
        if let Err(e) = keep(&file, encoded.as_deref().unwrap_or(&windows)).await {
            tracing::warn!("could not keep an index at {}: {e}", file.display());
        }
    }
    Ok((index, windows, copy))
}

/// A digest of tar entries as this file stores them: what an index says about a layer's
/// tree, compared with what its decoded tar says.
pub fn entries_digest(entries: &[Entry]) -> [u8; 32] {
    let mut p = Vec::new();
    let mut h = Sha256::new();
    for e in entries {
        p.clear();
        put_entry(&mut p, e);
        h.update(&p);
    }
    h.finalize().into()
}

/// Serialises `index`.
pub fn encode(index: &CheckpointIndex) -> Vec<u8> {
    let mut p = Vec::new();
    put_bytes(&mut p, index.digest.as_bytes());
    p.push(match index.codec {
        Codec::Gzip => 0,
        Codec::Zstd => 1,
    });
    for v in [
        index.span,
        index.comp_size,
        index.uncomp_size,
        index.checkpoints.len() as u64,
    ] {
        put_u64(&mut p, v);
    }
    for c in &index.checkpoints {
        put_u64(&mut p, c.out);
        put_u64(&mut p, c.inp);
        p.push(c.bits);
        put_bytes(&mut p, &c.window);
    }
    put_u64(&mut p, index.span_digests.len() as u64);
    for d in &index.span_digests {
        p.extend_from_slice(d);
    }
    put_u64(&mut p, index.entries.len() as u64);
    for e in &index.entries {
        put_entry(&mut p, e);
    }
    put_u64(&mut p, index.marks.len() as u64);
    for marks in &index.marks {
        put_u64(&mut p, marks.len() as u64);
        for m in marks {
            put_u64(&mut p, m.inp);
            put_u64(&mut p, m.out);
            p.extend_from_slice(&m.digest);
            match &m.resume {
                None => p.push(0),
                Some(r) => {
                    p.push(1);
                    put_u64(&mut p, u64::from(r.len));
                    p.extend_from_slice(&r.out_digest);
                }
            }
        }
    }
    match &index.windows {
        None => p.push(0),
        Some(w) => {
            p.push(1);
            put_bytes(&mut p, w.digest.as_bytes());
            put_u64(&mut p, w.size);
        }
    }
    frame(VERSION, &p)
}

/// The file around a raw payload: header, checksum, compressed payload.
pub(crate) fn frame(version: u32, raw: &[u8]) -> Vec<u8> {
    let payload = zstd::bulk::compress(raw, 3).expect("zstd compression of an in-memory buffer");
    let mut out = Vec::with_capacity(payload.len() + 52);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    out
}

/// Parses and checks an index file's bytes; `digest` is the layer it must describe.
pub fn decode(data: &[u8], digest: &str) -> Result<CheckpointIndex> {
    let bad = |why: &str| Error::format("gzip index", why.to_string());
    if data.len() < 52 || &data[..8] != MAGIC {
        return Err(bad("not an ocifs gzip index (bad magic or too short)"));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().unwrap());
    if !(OLDEST..=VERSION).contains(&version) {
        return Err(bad(&format!(
            "format version {version}, this ocifs reads {OLDEST} to {VERSION}"
        )));
    }
    let len = u64::from_le_bytes(data[12..20].try_into().unwrap());
    let payload = &data[52..];
    if payload.len() as u64 != len {
        return Err(bad("truncated or padded (payload length differs)"));
    }
    if Sha256::digest(payload).as_slice() != &data[20..52] {
        return Err(bad("checksum mismatch (corrupted)"));
    }
    let raw =
        zstd::bulk::decompress(payload, MAX_PAYLOAD).map_err(|e| bad(&format!("payload: {e}")))?;
    decode_payload(version, &raw, digest)
}

/// Parses the decompressed payload of a checked index file of format `version`; `digest` is
/// the layer it must describe.
pub(crate) fn decode_payload(version: u32, raw: &[u8], digest: &str) -> Result<CheckpointIndex> {
    let bad = |why: &str| Error::format("gzip index", why.to_string());
    let mut r = Reader { b: raw };
    let got =
        String::from_utf8(r.bytes()?.to_vec()).map_err(|_| bad("layer digest is not UTF-8"))?;
    if got != digest {
        return Err(bad(&format!("describes layer {got}, not {digest}")));
    }
    let codec = match r.u8()? {
        0 => Codec::Gzip,
        1 => Codec::Zstd,
        c => return Err(bad(&format!("unknown codec {c}"))),
    };
    let (span, comp_size, uncomp_size) = (r.u64()?, r.u64()?, r.u64()?);
    let n = r.count(17)?;
    let mut checkpoints = Vec::with_capacity(n);
    for _ in 0..n {
        let (out, inp, bits) = (r.u64()?, r.u64()?, r.u8()?);
        let window = r.bytes()?.to_vec();
        checkpoints.push(Checkpoint {
            out,
            inp,
            bits,
            window,
        });
    }
    let nd = r.count(32)?;
    let mut span_digests = Vec::with_capacity(nd);
    for _ in 0..nd {
        span_digests.push(r.take(32)?.try_into().unwrap());
    }
    let ne = r.count(40)?;
    let mut entries = Vec::with_capacity(ne);
    for _ in 0..ne {
        entries.push(r.entry()?);
    }
    let mut marks = Vec::new();
    if version >= 3 {
        let nm = r.count(8)?;
        for _ in 0..nm {
            let n = r.count(48 + usize::from(version >= 4))?;
            let mut span = Vec::with_capacity(n);
            for _ in 0..n {
                let (inp, out) = (r.u64()?, r.u64()?);
                let digest = r.take(32)?.try_into().unwrap();
                let resume = match version >= 4 && r.flag()? {
                    false => None,
                    true => Some(Resume {
                        len: r.u32()?,
                        out_digest: r.take(32)?.try_into().unwrap(),
                    }),
                };
                span.push(Mark {
                    inp,
                    out,
                    digest,
                    resume,
                });
            }
            marks.push(span);
        }
    }
    let windows = match version >= 4 && r.flag()? {
        false => None,
        true => {
            let digest = r.string()?;
            crate::digest::validate_digest(&digest)
                .map_err(|e| bad(&format!("windows blob digest: {e}")))?;
            Some(WindowsRef {
                digest,
                size: r.u64()?,
            })
        }
    };
    if !r.b.is_empty() {
        return Err(bad("trailing bytes"));
    }
    let index = CheckpointIndex {
        digest: got,
        codec,
        span,
        comp_size,
        uncomp_size,
        checkpoints,
        span_digests,
        entries,
        marks,
        windows,
    };
    index.check_shape().map_err(bad)?;
    Ok(index)
}

fn put_u64(p: &mut Vec<u8>, v: u64) {
    p.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(p: &mut Vec<u8>, b: &[u8]) {
    put_u64(p, b.len() as u64);
    p.extend_from_slice(b);
}

fn put_entry(p: &mut Vec<u8>, e: &Entry) {
    put_bytes(p, e.path.as_bytes());
    p.push(match e.kind {
        Kind::File => 0,
        Kind::Dir => 1,
        Kind::Symlink => 2,
        Kind::Hardlink => 3,
        Kind::Char => 4,
        Kind::Block => 5,
        Kind::Fifo => 6,
    });
    for v in [
        e.mode as u64,
        e.uid as u64,
        e.gid as u64,
        e.size,
        e.mtime.0 as u64,
        e.mtime.1 as u64,
        e.rdev.0 as u64,
        e.rdev.1 as u64,
    ] {
        put_u64(p, v);
    }
    match &e.link {
        Some(l) => {
            p.push(1);
            put_bytes(p, l.as_bytes());
        }
        None => p.push(0),
    }
    put_u64(p, e.xattrs.len() as u64);
    for (k, v) in &e.xattrs {
        put_bytes(p, k.as_bytes());
        put_bytes(p, v);
    }
    match e.data {
        Locator::Tar { offset } => {
            p.push(1);
            put_u64(p, offset);
        }
        Locator::Sparse { header } => {
            p.push(2);
            put_u64(p, header);
        }
        Locator::None | Locator::Chunks(_) => p.push(0),
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.b.len() {
            return Err(Error::format("gzip index", "ends early"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn flag(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Error::format("gzip index", "a flag is neither 0 nor 1")),
        }
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        u32::try_from(self.u64()?).map_err(|_| Error::format("gzip index", "field out of range"))
    }
    /// A count of items at least `min_size` bytes each, checked against what is left.
    fn count(&mut self, min_size: usize) -> Result<usize> {
        let n = self.u64()?;
        if n > (self.b.len() / min_size.max(1)) as u64 {
            return Err(Error::format("gzip index", "count larger than the file"));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.count(1)?;
        self.take(n)
    }
    fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| Error::format("gzip index", "string is not UTF-8"))
    }
    fn entry(&mut self) -> Result<Entry> {
        let path = self.string()?;
        // The tree makes a name of every component: only paths as a tar walk leaves them.
        if crate::layer::clean_path(&path).ok().as_deref() != Some(path.as_str()) {
            return Err(Error::format(
                "gzip index",
                format!("entry path {path:?} is not clean"),
            ));
        }
        let kind = match self.u8()? {
            0 => Kind::File,
            1 => Kind::Dir,
            2 => Kind::Symlink,
            3 => Kind::Hardlink,
            4 => Kind::Char,
            5 => Kind::Block,
            6 => Kind::Fifo,
            k => {
                return Err(Error::format(
                    "gzip index",
                    format!("unknown entry kind {k}"),
                ));
            }
        };
        let mut e = Entry::new(path, kind);
        e.mode = self.u32()?;
        e.uid = self.u32()?;
        e.gid = self.u32()?;
        e.size = self.u64()?;
        e.mtime = (self.u64()? as i64, self.u32()?);
        e.rdev = (self.u32()?, self.u32()?);
        if self.u8()? == 1 {
            e.link = Some(self.string()?);
        }
        let nx = self.count(16)?;
        for _ in 0..nx {
            let k = self.string()?;
            e.xattrs.push((k, self.bytes()?.to_vec()));
        }
        e.data = match self.u8()? {
            0 => Locator::None,
            1 => Locator::Tar {
                offset: self.u64()?,
            },
            2 => Locator::Sparse {
                header: self.u64()?,
            },
            t => {
                return Err(Error::format(
                    "checkpoint index",
                    format!("unknown locator {t}"),
                ));
            }
        };
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(codec: Codec) -> CheckpointIndex {
        let mut e = Entry::new("a/b".into(), Kind::File);
        e.size = 5;
        e.data = Locator::Tar { offset: 512 };
        e.xattrs.push(("user.x".into(), vec![0, 1]));
        let mut l = Entry::new("l".into(), Kind::Symlink);
        l.link = Some("a/b".into());
        let mut sp = Entry::new("sparse".into(), Kind::File);
        sp.size = 1 << 30;
        sp.data = Locator::Sparse { header: 4096 };
        let mark = |inp, out, d| Mark {
            inp,
            out,
            digest: [d; 32],
            resume: (d == 3).then_some(Resume {
                len: 77,
                out_digest: [9; 32],
            }),
        };
        CheckpointIndex {
            digest: "sha256:abc".into(),
            codec,
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
                    window: vec![7; 100],
                },
            ],
            span_digests: vec![[1; 32], [2; 32]],
            entries: vec![e, l, sp],
            marks: match codec {
                Codec::Gzip => vec![vec![mark(30, 900, 3)], vec![mark(70, 3000, 4)]],
                Codec::Zstd => Vec::new(),
            },
            windows: (codec == Codec::Gzip).then(|| WindowsRef {
                digest: format!("sha256:{}", "ab".repeat(32)),
                size: 77,
            }),
        }
    }

    #[test]
    fn marks_and_windows_round_trip_and_versions_2_and_3_still_load() {
        let idx = sample(Codec::Gzip);
        let back = decode(&encode(&idx), "sha256:abc").unwrap();
        assert_eq!(back, idx);
        assert!(back.marks[0][0].resume.is_some() && back.windows.is_some());
        // Versions 2 and 3: the same payload without the marks, or the windows, at its end.
        let raw = zstd::bulk::decompress(&encode(&sample(Codec::Zstd))[52..], 1 << 20).unwrap();
        let v3 = decode(&frame(3, &raw[..raw.len() - 1]), "sha256:abc").unwrap();
        assert_eq!(v3.windows, None);
        assert!(
            decode(&frame(3, &raw), "sha256:abc").is_err(),
            "trailing byte"
        );
        let v2 = frame(2, &raw[..raw.len() - 9]);
        let old = decode(&v2, "sha256:abc").unwrap();
        assert!(old.marks.is_empty());
        assert_eq!(old.checkpoints, idx.checkpoints);
        // Marks outside their span are refused.
        let mut bad = sample(Codec::Gzip);
        bad.marks[0][0].inp = 60;
        let err = decode(&encode(&bad), "sha256:abc").unwrap_err().to_string();
        assert!(err.contains("marks"), "{err}");
        assert!(decode(&frame(1, &raw), "sha256:abc").is_err());
        // A windows blob named by something that is not a digest is refused.
        let mut bad = sample(Codec::Gzip);
        bad.windows.as_mut().unwrap().digest = "../../etc".into();
        let err = decode(&encode(&bad), "sha256:abc").unwrap_err().to_string();
        assert!(err.contains("windows"), "{err}");
    }

    #[test]
    fn round_trips_and_rejects_damage() {
        let idx = sample(Codec::Zstd);
        let bytes = encode(&idx);
        let back = decode(&bytes, "sha256:abc").unwrap();
        assert_eq!(back.checkpoints, idx.checkpoints);
        assert_eq!(back.codec, Codec::Zstd);
        assert_eq!(back.entries, idx.entries);
        assert_eq!(back.entries[0].data, Locator::Tar { offset: 512 });
        assert_eq!(back.entries[1].link.as_deref(), Some("a/b"));
        let wrong = decode(&bytes, "sha256:other").unwrap_err().to_string();
        assert!(wrong.contains("describes layer"), "{wrong}");
        for i in [0, 9, 30, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(
                decode(&b, "sha256:abc").is_err(),
                "flipped byte {i} accepted"
            );
        }
        assert!(
            decode(&bytes[..bytes.len() - 3], "sha256:abc")
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
    }

    /// Found by fuzzing: entry paths no tar walk leaves (`..`, NUL, empty components) were
    /// read from an index file, whose entries become the tree's names.
    #[test]
    fn unclean_entry_paths_are_refused() {
        for path in ["a\0b", "a/../b", "a//b", "/a", "a/", "./a"] {
            let mut idx = sample(Codec::Zstd);
            idx.entries[0].path = path.into();
            let err = decode(&encode(&idx), "sha256:abc").unwrap_err().to_string();
            assert!(err.contains("not clean"), "{path:?}: {err}");
        }
        let mut root = sample(Codec::Zstd);
        root.entries[0].path = String::new();
        assert!(decode(&encode(&root), "sha256:abc").is_ok(), "the root");
    }

    /// Found by fuzzing: a checkpoint after the first one with leftover bits at compressed
    /// offset 0 passed the shape check, and its span's start (one byte before) underflowed.
    #[test]
    fn leftover_bits_at_offset_0_are_refused_for_every_checkpoint() {
        let mut idx = sample(Codec::Zstd);
        idx.checkpoints[0].inp = 0;
        idx.checkpoints[1].inp = 0;
        idx.checkpoints[1].bits = 0;
        assert!(decode(&encode(&idx), "sha256:abc").is_ok());
        idx.checkpoints[1].bits = 3;
        let err = decode(&encode(&idx), "sha256:abc").unwrap_err().to_string();
        assert!(err.contains("leftover bits"), "{err}");
    }
}

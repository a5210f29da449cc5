//! Layer formats behind one index type.
//!
//! Every format module turns a blob into the same [`Entry`] list; an entry's [`Locator`] says
//! where its bytes live, and [`Layer::read`] is the one reader that dispatches on it. The merged
//! tree never knows which format a file came from. [`detect`] decides a layer's format
//! (media type, then footer).
//!
//! | format | module | lazy? |
//! |---|---|---|
//! | uncompressed tar | [`tar`] | yes: headers walked with ranged reads |
//! | eStargz / legacy stargz | [`estargz`] | yes: footer -> TOC -> per-chunk fetch + digest check |
//! | gzip tar | [`checkpoint`] | yes, through a checkpoint index built in one pass and kept |
//! | zstd:chunked | [`zstdchunked`] | yes: footer -> TOC -> per-frame fetch + digest check |
//! | zstd tar, multi-frame | [`checkpoint`] | yes, through a frame index built in one pass |
//! | zstd tar, single frame | [`streamed`] | no: streamed once, digest checked, kept as a local tar |

pub mod checkpoint;
pub mod chunked;
pub mod detect;
pub mod estargz;
pub mod streamed;
pub mod tar;
pub(crate) mod toc;
pub mod zstdchunked;

use crate::blob::Blob;
use crate::error::{Error, Result};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// What kind of file system object an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A second name for an earlier entry of the same layer (`link` holds its path).
    Hardlink,
    Char,
    Block,
    Fifo,
}

/// Where an entry's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locator {
    /// No data (empty file, non-regular entry).
    None,
    /// At this offset of the layer's uncompressed tar stream.
    Tar { offset: u64 },
    /// A GNU sparse file whose header (and, read on demand, sparse map) is at this offset of
    /// the uncompressed tar stream.
    Sparse { header: u64 },
    /// In these chunks (eStargz, zstd:chunked), in file order.
    Chunks(Arc<[chunked::Chunk]>),
}

/// One entry of one layer, format independent. Paths are relative, `/`-separated, clean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (no file-type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    /// Symlink target, or the path a hard link points to.
    pub link: Option<String>,
    /// (major, minor) for device nodes.
    pub rdev: (u32, u32),
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub data: Locator,
}

impl Entry {
    /// An entry with defaults for everything but path and kind.
    pub fn new(path: String, kind: Kind) -> Entry {
        Entry {
            path,
            kind,
            mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            size: 0,
            mtime: (0, 0),
            link: None,
            rdev: (0, 0),
            xattrs: Vec::new(),
            data: Locator::None,
        }
    }
}

/// The layer formats ocifs knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tar,
    Gzip,
    Zstd,
    Estargz,
    LegacyStargz,
    ZstdChunked,
}

impl Format {
    /// The compression implied by an OCI or Docker layer media type (before eStargz probing).
    pub fn from_media_type(mt: &str) -> Result<Format> {
        let mt = mt.trim();
        Ok(match mt {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Format::Tar,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Format::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Format::Zstd,
            other => return Err(Error::Unsupported(format!("layer media type {other:?}"))),
        })
    }

    /// Whether reads fetch only what they need (gzip: once its checkpoint index exists; zstd
    /// is lazy only when multi-frame, which the media type does not tell).
    pub fn is_lazy(self) -> bool {
        !matches!(self, Format::Zstd)
    }

    /// Short name for messages and `inspect`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Tar => "tar",
            Format::Gzip => "gzip",
            Format::Zstd => "zstd",
            Format::Estargz => "estargz",
            Format::LegacyStargz => "stargz",
            Format::ZstdChunked => "zstd:chunked",
        }
    }
}

/// A layer's verification state, checked by every read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not yet checked against its digest (reads are served; chunk digests still apply).
    Pending,
    /// The whole blob hashed to its digest.
    Verified,
    /// Verification was switched off (`--verify off`).
    Unverified,
    /// The blob failed verification: every read fails.
    Bad(String),
}

/// Where a layer's bytes come from at read time.
pub enum LayerData {
    /// An uncompressed tar stream: the blob itself, or a local copy made by streaming.
    Tar(Blob),
    /// eStargz or zstd:chunked chunks of the (cached) compressed blob (boxed: the reader
    /// holds its caches inline).
    Chunked(Box<chunked::Reader>),
}

/// One opened layer: its data, its health, and what it was made from.
pub struct Layer {
    pub digest: String,
    pub format: Format,
    pub data: LayerData,
    pub health: RwLock<Health>,
    /// For gzip layers: where the checkpoint index came from (built, cached, from registry).
    pub index_source: Option<&'static str>,
    /// For a layer served through an index fetched from the registry: what verification
    /// must still check (the index, unlike the blob, is not named by the image's digests).
    pub index_check: Option<IndexCheck>,
    /// For a layer whose entries were read from its own blob before any digest vouched for
    /// them (an uncompressed tar): their [`checkpoint::file::entries_digest`]. When the
    /// blob's digest matches only on bytes fetched again, the entries came from bytes that
    /// may have been damaged, and [`crate::verify`] reads them again to compare.
    pub entries_read: Option<[u8; 32]>,
}

/// What remains to check about an index that came from the registry: anyone who can push a
/// referrer can publish one, and its windows and tar entries are trusted by every read (span
/// digests only vouch for compressed bytes). [`crate::verify`] decodes the layer through it
/// and compares the result with the config's `diff_id` and these entries.
#[derive(Debug)]
pub struct IndexCheck {
    /// [`checkpoint::file::entries_digest`] of the entries the index gave the tree.
    pub entries: [u8; 32],
    /// The index file waiting in the cache directory as unverified, to be marked checked
    /// (so later mounts trust it).
    pub kept: Option<std::path::PathBuf>,
    /// The output stretches the index vouches for by digest (from each gzip mark to the
    /// next, for resuming there): `(start, end, sha256)`, in order.
    pub stretches: Vec<(u64, u64, [u8; 32])>,
}

impl Layer {
    /// An error naming why, once verification has found the layer bad: none of its bytes
    /// (files or blob) are served after that.
    pub fn usable(&self) -> Result<()> {
        match &*self.health.read().unwrap() {
            Health::Bad(reason) => Err(Error::BadLayer {
                digest: self.digest.clone(),
                reason: reason.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Reads `len` bytes at `offset` of a file of `size` bytes found at `loc`.
    pub async fn read(&self, loc: &Locator, size: u64, offset: u64, len: u64) -> Result<Bytes> {
        self.read_as(loc, size, offset, len, false).await
    }

    /// [`Layer::read`] without waiting behind fetches under way (see
    /// [`crate::blob::ReadHints::read_now`]).
    pub async fn read_now(&self, loc: &Locator, size: u64, offset: u64, len: u64) -> Result<Bytes> {
        self.read_as(loc, size, offset, len, true).await
    }

    async fn read_as(
        &self,
        loc: &Locator,
        size: u64,
        offset: u64,
        len: u64,
        now: bool,
    ) -> Result<Bytes> {
        self.usable()?;
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(Bytes::new());
        }
        match (loc, &self.data) {
            (Locator::Tar { offset: base }, LayerData::Tar(blob)) if now => {
                blob.read_now(base + offset, len).await
            }
            (Locator::Tar { offset: base }, LayerData::Tar(blob)) => {
                blob.read_within(base + offset, len, base + size).await
            }
            (Locator::Sparse { header }, LayerData::Tar(blob)) => {
                tar::read_sparse(blob, *header, offset, len).await
            }
            (Locator::Chunks(chunks), LayerData::Chunked(r)) if now => {
                r.read_now(chunks, offset, len).await
            }
            (Locator::Chunks(chunks), LayerData::Chunked(r)) => r.read(chunks, offset, len).await,
            (Locator::None, _) => Ok(Bytes::new()),
            _ => Err(Error::format(
                "layer index",
                "locator does not match the layer format",
            )),
        }
    }

    /// Brings bytes `[offset, offset+len)` of a file into the cache: the chunks or tar bytes
    /// holding them, not decoded, in one request and nothing past them; for a gzip layer
    /// read through its index, the spans' compressed bytes up to the mark past them, decoded
    /// (see `CheckpointBlob::prefetch`).
    pub async fn warm_range(&self, loc: &Locator, offset: u64, len: u64) -> Result<()> {
        match (loc, &self.data) {
            (Locator::Tar { offset: base }, LayerData::Tar(blob)) => {
                blob.prefetch(base + offset, len).await
            }
            (Locator::Chunks(chunks), LayerData::Chunked(r)) => {
                let end = offset.saturating_add(len);
                let first = chunks.partition_point(|c| c.file_offset + c.len <= offset);
                let n = chunks[first..]
                    .iter()
                    .take_while(|c| c.file_offset < end)
                    .count();
                r.warm(&chunks[first..first + n]).await
            }
            _ => Ok(()),
        }
    }

    /// [`Layer::warm_range`] of a whole file whose bytes are wanted decoded soon: a chunked
    /// layer also decodes its chunks as they arrive, and keeps them (see
    /// [`chunked::Reader::decode_ahead`]; the caller bounds how many bytes that keeps).
    pub async fn warm_decoded(&self, loc: &Locator, size: u64) -> Result<()> {
        match (loc, &self.data) {
            (Locator::Chunks(chunks), LayerData::Chunked(r)) => {
                let (warmed, ()) = futures::join!(r.warm(chunks), r.decode_ahead(chunks));
                warmed
            }
            _ => self.warm_range(loc, 0, size).await,
        }
    }

    /// The blob a planned prefetch fetches `[offset, offset+len)` of a file from, and the
    /// range of it: the chunks' compressed extent; the tar range; for a gzip layer read
    /// through its index, the compressed bytes from the span start to the mark past the range.
    /// `None` for a file without data or a GNU sparse file (read instead).
    pub fn fetch_range(
        &self,
        loc: &Locator,
        offset: u64,
        len: u64,
    ) -> Option<(crate::blob::Blob, u64, u64)> {
        match (loc, &self.data) {
            (Locator::Tar { offset: base }, LayerData::Tar(blob)) => {
                let at = base + offset;
                Some(
                    blob.source_range(at, len)
                        .unwrap_or_else(|| (blob.clone(), at, at + len)),
                )
            }
            (Locator::Chunks(chunks), LayerData::Chunked(r)) => {
                let end = offset.saturating_add(len);
                let touched = chunks
                    .iter()
                    .filter(|c| c.file_offset < end && c.file_offset + c.len > offset);
                let (a, b) =
                    touched.fold((u64::MAX, 0), |(a, b), c| (a.min(c.start), b.max(c.end)));
                (a < b).then(|| (r.blob().clone(), a, b))
            }
            _ => None,
        }
    }

    /// Where a file's bytes lie in the layer's data: compressed offsets for chunked layers,
    /// tar offsets otherwise. `None` for files without data.
    pub fn extent(&self, loc: &Locator, size: u64) -> Option<(u64, u64)> {
        match loc {
            Locator::Tar { offset } => Some((*offset, offset + size)),
            Locator::Chunks(chunks) => Some((
                chunks.iter().map(|c| c.start).min()?,
                chunks.iter().map(|c| c.end).max()?,
            )),
            _ => None,
        }
    }

    /// Brings `[start, end)` of the layer's data (see [`Layer::extent`]) into the cache.
    pub async fn warm_extent(&self, start: u64, end: u64) -> Result<()> {
        let blob = match &self.data {
            LayerData::Tar(blob) => blob,
            LayerData::Chunked(r) => r.blob(),
        };
        blob.prefetch(start, end.saturating_sub(start)).await
    }

    /// Drops what the layer holds in memory to make reads fast: once it is served from a
    /// local copy, no one reads it any more (see [`crate::blob::ReadHints::release_memory`]).
    pub fn release_memory(&self) {
        match &self.data {
            LayerData::Tar(blob) => blob.release_memory(),
            LayerData::Chunked(r) => r.release_memory(),
        }
    }

    /// Whether every byte a read serves is checked against digests the image's own digests
    /// vouch for: chunk digests from a TOC the manifest names by digest, or span digests
    /// from an index built here from the checked blob, or the whole blob verified. Not so
    /// for a plain tar layer (nothing finer than the blob), a TOC no annotation names
    /// (legacy stargz, eStargz or zstd:chunked without it: the registry's word), or an index
    /// fetched from a registry (anyone's who could push a referrer) before verification.
    pub fn checks_vouched(&self) -> bool {
        match &self.data {
            _ if self.verified() => true,
            LayerData::Chunked(r) => r.toc_vouched,
            LayerData::Tar(_) => self.format != Format::Tar && self.index_check.is_none(),
        }
    }

    fn verified(&self) -> bool {
        *self.health.read().unwrap() == Health::Verified
    }

    /// The length of the layer's uncompressed tar, when known without reading it all: the
    /// blob of a tar layer, a gzip or zstd layer's index, a local copy. `None` for eStargz
    /// and zstd:chunked, whose TOC lists files, not the tar around them, and for an index
    /// from a registry until verification has checked it (anyone could have published it).
    pub fn uncompressed_size(&self) -> Option<u64> {
        match &self.data {
            LayerData::Tar(_) if self.index_check.is_some() && !self.verified() => None,
            LayerData::Tar(blob) => Some(blob.size()),
            LayerData::Chunked(_) => None,
        }
    }

    /// Marks the layer bad: later reads fail with EIO.
    pub fn mark_bad(&self, reason: String) {
        tracing::error!("layer {} marked bad: {reason}", self.digest);
        *self.health.write().unwrap() = Health::Bad(reason);
    }
}

/// Cleans a path from an archive: strips `./` and `/`, collapses `//` and `.`; rejects `..`
/// (it could escape the mount). The layer root is "".
pub fn clean_path(raw: &str) -> Result<String> {
    let mut parts = Vec::new();
    for p in raw.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                return Err(Error::format(
                    "archive path",
                    format!("{raw:?} contains '..'"),
                ));
            }
            p if p.contains('\0') => {
                return Err(Error::format(
                    "archive path",
                    format!("{raw:?} contains NUL"),
                ));
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// Layer descriptor fields the openers need.
#[derive(Debug, Clone)]
pub struct LayerDesc {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub annotations: HashMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_path_normalises_and_rejects_escapes() {
        assert_eq!(clean_path("./a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(clean_path("/etc/passwd").unwrap(), "etc/passwd");
        assert_eq!(clean_path("./").unwrap(), "");
        assert!(clean_path("a/../../etc").is_err());
    }
}

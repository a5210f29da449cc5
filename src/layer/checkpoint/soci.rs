//! Reading SOCI zTOCs: checkpoint indexes that others already publish.
//!
//! A SOCI zTOC (awslabs/soci-snapshotter) is a FlatBuffers table holding, for one gzip layer,
//! the same things our own index holds: resume points every span (compressed offset, leftover
//! bits, uncompressed offset, 32 KiB window, packed into one "zinfo" byte vector), the sha256
//! of each span's compressed bytes, and every tar entry with its uncompressed data offset. Its
//! conventions match ours exactly (a span starts one byte early when its checkpoint has
//! leftover bits and ends at the next checkpoint's first full byte), so a zTOC converts into a
//! [`CheckpointIndex`] and is served, verified and cached like one.
//!
//! Everything here is untrusted input: every offset is bounds-checked, sizes are checked
//! against the layer, and a malformed zTOC is an error naming what was wrong.

use super::{Checkpoint, CheckpointIndex, Codec};
use crate::error::{Error, Result};
use crate::layer::{Entry, Kind, Locator, clean_path};

/// `artifactType` (and config media type) of a SOCI index manifest found through referrers.
pub const INDEX_V1: &str = "application/vnd.amazon.soci.index.v1+json";
/// The same for a SOCI index named by the image manifest's [`INDEX_ANNOTATION`].
pub const INDEX_V2: &str = "application/vnd.amazon.soci.index.v2+json";
/// Image manifest annotation naming its SOCI v2 index manifest.
pub const INDEX_ANNOTATION: &str = "com.amazon.soci.index-digest";
/// Annotation on each zTOC descriptor: the layer it indexes.
pub const LAYER_ANNOTATION: &str = "com.amazon.soci.image-layer-digest";
/// Annotation on the SOCI index's descriptor inside a SOCI-enabled image index.
pub const IMAGE_ANNOTATION: &str = "com.amazon.soci.image-manifest-digest";
/// zTOCs may carry JSON prefetch hints after this separator.
const PREFETCH_SEPARATOR: &[u8] = b"---SOCI-PREFETCH---";
/// Packed checkpoint: compressed offset (u64), uncompressed offset (u64), bits (u8), window.
const PACKED_CHECKPOINT: usize = 8 + 8 + 1 + WINDOW;
const WINDOW: usize = 32 * 1024;
/// zinfo header: checkpoint count (i32), span size (i64).
const ZINFO_HEADER: usize = 12;

/// Converts the zTOC `bytes` of layer `layer` (`layer_size` compressed bytes) into an index.
pub fn parse(bytes: &[u8], layer: &str, layer_size: u64) -> Result<CheckpointIndex> {
    let bytes = match find(bytes, PREFETCH_SEPARATOR) {
        Some(at) => &bytes[..at],
        None => bytes,
    };
    let fb = Fb { buf: bytes };
    let ztoc = fb.root()?;
    let version = ztoc.string(0)?.unwrap_or_default();
    let size = |id| u64::try_from(ztoc.long(id)?).map_err(|_| bad("negative archive size".into()));
    let (comp_size, uncomp_size) = (size(2)?, size(3)?);
    if comp_size != layer_size {
        return Err(bad(format!(
            "describes a {comp_size}-byte layer, but {layer} has {layer_size} bytes"
        )));
    }
    let info = ztoc
        .table(5)?
        .ok_or_else(|| bad("no compression_info".into()))?;
    match info.byte(0, 1)? {
        1 => {}
        2 => {
            return Err(Error::Unsupported(
                "SOCI zTOCs of uncompressed layers (ocifs reads those lazily anyway)".into(),
            ));
        }
        a => return Err(bad(format!("unknown compression algorithm {a}"))),
    }
    let (span, checkpoints) = zinfo(
        info.bytes(3)?.ok_or_else(|| bad("no checkpoints".into()))?,
        comp_size,
        uncomp_size,
    )?;
    let mut span_digests = Vec::with_capacity(checkpoints.len());
    for i in 0..info.vector_len(2)? {
        let s = info.vector_string(2, i)?;
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| bad(format!("span digest {s:?} is not sha256")))?;
        let mut d = [0u8; 32];
        hex::decode_to_slice(hex, &mut d).map_err(|_| bad(format!("span digest {s:?}")))?;
        span_digests.push(d);
    }
    let max_span_id = info.int(1)?;
    if span_digests.len() != checkpoints.len() || max_span_id + 1 != checkpoints.len() as i64 {
        return Err(bad(format!(
            "{} checkpoints, {} span digests, max span id {max_span_id}",
            checkpoints.len(),
            span_digests.len()
        )));
    }
    let toc = ztoc.table(4)?.ok_or_else(|| bad("no TOC".into()))?;
    let mut entries = Vec::new();
    for i in 0..toc.vector_len(0)? {
        if let Some(e) = entry(&toc.vector_table(0, i)?, uncomp_size)? {
            entries.push(e);
        }
    }
    // Tar order (later entries override earlier ones, hard links point backwards).
    entries.sort_by_key(|(offset, _)| *offset);
    let index = CheckpointIndex {
        digest: layer.to_string(),
        codec: Codec::Gzip,
        span,
        comp_size,
        uncomp_size,
        checkpoints,
        span_digests,
        entries: entries.into_iter().map(|(_, e)| e).collect(),
        marks: Vec::new(),
        windows: None,
    };
    index.check_shape().map_err(|why| bad(why.to_string()))?;
    tracing::debug!(
        "SOCI zTOC v{version} of {layer}: {} spans",
        index.checkpoints.len()
    );
    Ok(index)
}

/// The compressed layer size a zTOC says it describes (what [`parse`] checks against the
/// layer's), when its root table is readable.
pub(crate) fn declared_size(bytes: &[u8]) -> Option<u64> {
    let bytes = find(bytes, PREFETCH_SEPARATOR).map_or(bytes, |at| &bytes[..at]);
    let ztoc = Fb { buf: bytes }.root().ok()?;
    u64::try_from(ztoc.long(2).ok()?).ok()
}

fn bad(reason: String) -> Error {
    Error::format("SOCI zTOC", reason)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Unpacks the zinfo vector: current (v2) blobs list every checkpoint; v1 blobs omit the first,
/// which is then the one right after a 10-byte gzip header.
fn zinfo(z: &[u8], comp_size: u64, uncomp_size: u64) -> Result<(u64, Vec<Checkpoint>)> {
    if z.len() < ZINFO_HEADER {
        return Err(bad("checkpoint data too short".into()));
    }
    let n = i32::from_le_bytes(z[..4].try_into().unwrap());
    let span = i64::from_le_bytes(z[4..12].try_into().unwrap());
    let (Ok(n), Ok(span)) = (usize::try_from(n), u64::try_from(span)) else {
        return Err(bad("negative checkpoint count or span".into()));
    };
    let body = z.len() - ZINFO_HEADER;
    let mut checkpoints = Vec::with_capacity(n.min(body / PACKED_CHECKPOINT + 1));
    let packed = if body == n.saturating_mul(PACKED_CHECKPOINT) {
        n
    } else if n > 0 && body == (n - 1) * PACKED_CHECKPOINT {
        checkpoints.push(Checkpoint {
            out: 0,
            inp: 10,
            bits: 0,
            window: vec![0; WINDOW],
        });
        n - 1
    } else {
        return Err(bad(format!(
            "checkpoint data of {} bytes does not hold {n} checkpoints",
            z.len()
        )));
    };
    for k in 0..packed {
        let p = &z[ZINFO_HEADER + k * PACKED_CHECKPOINT..][..PACKED_CHECKPOINT];
        let inp = u64::from_le_bytes(p[..8].try_into().unwrap());
        let out = u64::from_le_bytes(p[8..16].try_into().unwrap());
        if inp > comp_size || out > uncomp_size || p[16] > 7 {
            return Err(bad(format!("checkpoint {k} out of range")));
        }
        checkpoints.push(Checkpoint {
            out,
            inp,
            bits: p[16],
            window: p[17..].to_vec(),
        });
    }
    Ok((span, checkpoints))
}

/// One TOC entry, with its uncompressed offset (for ordering); `None` for skipped entries.
fn entry(t: &Table<'_>, uncomp_size: u64) -> Result<Option<(u64, Entry)>> {
    let name = t.string(0)?.unwrap_or_default();
    let kind = match t.string(1)?.unwrap_or_default() {
        "reg" => Kind::File,
        "dir" => Kind::Dir,
        "symlink" => Kind::Symlink,
        "hardlink" => Kind::Hardlink,
        "char" => Kind::Char,
        "block" => Kind::Block,
        "fifo" => Kind::Fifo,
        other => return Err(bad(format!("entry {name:?} has unknown type {other:?}"))),
    };
    let path = match clean_path(name) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("skipping a SOCI zTOC entry: {e}");
            return Ok(None);
        }
    };
    let offset = u64::try_from(t.long(2)?).map_err(|_| bad(format!("{name:?}: offset")))?;
    let size = u64::try_from(t.long(3)?).map_err(|_| bad(format!("{name:?}: size")))?;
    if offset.checked_add(size).is_none_or(|end| end > uncomp_size) {
        return Err(bad(format!("{name:?} lies outside the layer")));
    }
    let mut e = Entry::new(path, kind);
    e.mode = (t.long(5)? & 0o7777) as u32;
    e.uid = t.uint(6)?;
    e.gid = t.uint(7)?;
    e.mtime = parse_time(t.string(10)?.unwrap_or_default())
        .ok_or_else(|| bad(format!("{name:?}: modification time")))?;
    if matches!(kind, Kind::Symlink | Kind::Hardlink) {
        e.link = Some(t.string(4)?.unwrap_or_default().to_string());
    }
    if matches!(kind, Kind::Char | Kind::Block) {
        e.rdev = (t.long(11)? as u32, t.long(12)? as u32);
    }
    if kind == Kind::File {
        e.size = size;
        if size > 0 {
            e.data = Locator::Tar { offset };
        }
    }
    // `xattrs` holds every PAX record; the SCHILY.xattr.* ones are extended attributes.
    for i in 0..t.vector_len(13)? {
        let x = t.vector_table(13, i)?;
        let key = x.string(0)?.unwrap_or_default();
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            let value = x.bytes(1)?.unwrap_or_default();
            e.xattrs.push((name.to_string(), value.to_vec()));
        }
    }
    Ok(Some((offset, e)))
}

/// RFC 3339 with optional fraction (Go's `time.MarshalText`) -> (seconds, nanoseconds).
fn parse_time(s: &str) -> Option<(i64, u32)> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp(), t.nanosecond()))
}

/// A FlatBuffers buffer, read with a bounds check on every access.
struct Fb<'a> {
    buf: &'a [u8],
}

#[derive(Clone, Copy)]
struct Table<'a> {
    buf: &'a [u8],
    pos: usize,
    vtable: usize,
    vtable_len: usize,
}

fn get(buf: &[u8], pos: usize, n: usize) -> Result<&[u8]> {
    pos.checked_add(n)
        .and_then(|end| buf.get(pos..end))
        .ok_or_else(|| bad(format!("offset {pos} out of bounds")))
}

fn u32_at(buf: &[u8], pos: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(get(buf, pos, 4)?.try_into().unwrap()))
}

/// Follows the unsigned offset stored at `pos` (relative to `pos`).
fn follow(buf: &[u8], pos: usize) -> Result<usize> {
    pos.checked_add(u32_at(buf, pos)? as usize)
        .ok_or_else(|| bad("offset overflow".into()))
}

impl<'a> Fb<'a> {
    fn root(&self) -> Result<Table<'a>> {
        Table::at(self.buf, follow(self.buf, 0)?)
    }
}

impl<'a> Table<'a> {
    fn at(buf: &'a [u8], pos: usize) -> Result<Table<'a>> {
        let soff = i32::from_le_bytes(get(buf, pos, 4)?.try_into().unwrap());
        let vtable = usize::try_from(pos as i64 - i64::from(soff))
            .map_err(|_| bad("vtable offset out of bounds".into()))?;
        let vtable_len = u16::from_le_bytes(get(buf, vtable, 2)?.try_into().unwrap()) as usize;
        get(buf, vtable, vtable_len)?;
        Ok(Table {
            buf,
            pos,
            vtable,
            vtable_len,
        })
    }

    /// Absolute position of field `id`, if present.
    fn field(&self, id: usize) -> Result<Option<usize>> {
        let slot = 4 + 2 * id;
        if slot + 2 > self.vtable_len {
            return Ok(None);
        }
        let off = u16::from_le_bytes(get(self.buf, self.vtable + slot, 2)?.try_into().unwrap());
        Ok((off != 0).then_some(self.pos + off as usize))
    }

    fn scalar<const N: usize>(&self, id: usize) -> Result<Option<[u8; N]>> {
        match self.field(id)? {
            Some(p) => Ok(Some(get(self.buf, p, N)?.try_into().unwrap())),
            None => Ok(None),
        }
    }

    fn long(&self, id: usize) -> Result<i64> {
        Ok(self.scalar::<8>(id)?.map_or(0, i64::from_le_bytes))
    }

    fn int(&self, id: usize) -> Result<i64> {
        Ok(self
            .scalar::<4>(id)?
            .map_or(0, |b| i64::from(i32::from_le_bytes(b))))
    }

    fn uint(&self, id: usize) -> Result<u32> {
        Ok(self.scalar::<4>(id)?.map_or(0, u32::from_le_bytes))
    }

    fn byte(&self, id: usize, default: u8) -> Result<u8> {
        Ok(self.scalar::<1>(id)?.map_or(default, |b| b[0]))
    }

    /// A vector's element count and first element position.
    fn vector(&self, id: usize) -> Result<Option<(usize, usize)>> {
        let Some(p) = self.field(id)? else {
            return Ok(None);
        };
        let v = follow(self.buf, p)?;
        let len = u32_at(self.buf, v)? as usize;
        Ok(Some((len, v + 4)))
    }

    fn bytes(&self, id: usize) -> Result<Option<&'a [u8]>> {
        match self.vector(id)? {
            Some((len, start)) => Ok(Some(get(self.buf, start, len)?)),
            None => Ok(None),
        }
    }

    fn string(&self, id: usize) -> Result<Option<&'a str>> {
        match self.bytes(id)? {
            Some(b) => Ok(Some(
                std::str::from_utf8(b).map_err(|_| bad("a string is not UTF-8".into()))?,
            )),
            None => Ok(None),
        }
    }

    fn table(&self, id: usize) -> Result<Option<Table<'a>>> {
        match self.field(id)? {
            Some(p) => Ok(Some(Table::at(self.buf, follow(self.buf, p)?)?)),
            None => Ok(None),
        }
    }

    fn vector_len(&self, id: usize) -> Result<usize> {
        let len = self.vector(id)?.map_or(0, |(len, _)| len);
        // Every element takes at least 4 bytes: a count beyond the buffer is corrupt.
        if len > self.buf.len() / 4 {
            return Err(bad(format!("vector of {len} elements")));
        }
        Ok(len)
    }

    /// Position of the object element `i` of vector `id` points to.
    fn element(&self, id: usize, i: usize) -> Result<usize> {
        let (len, start) = self.vector(id)?.unwrap_or((0, 0));
        if i >= len {
            return Err(bad(format!("element {i} of {len}")));
        }
        follow(self.buf, start + 4 * i)
    }

    fn vector_table(&self, id: usize, i: usize) -> Result<Table<'a>> {
        Table::at(self.buf, self.element(id, i)?)
    }

    fn vector_string(&self, id: usize, i: usize) -> Result<&'a str> {
        let p = self.element(id, i)?;
        let len = u32_at(self.buf, p)? as usize;
        std::str::from_utf8(get(self.buf, p + 4, len)?)
            .map_err(|_| bad("a string is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let mut state = 7u64;
        for len in [0usize, 3, 4, 8, 16, 64, 1000] {
            for _ in 0..200 {
                let buf: Vec<u8> = (0..len)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                        (state >> 33) as u8
                    })
                    .collect();
                assert!(parse(&buf, "sha256:x", 100).is_err());
            }
        }
    }

    #[test]
    fn zinfo_versions_and_bad_sizes() {
        let mut z = Vec::new();
        z.extend_from_slice(&2i32.to_le_bytes());
        z.extend_from_slice(&(1i64 << 22).to_le_bytes());
        let mut cp = vec![0u8; PACKED_CHECKPOINT];
        cp[..8].copy_from_slice(&500u64.to_le_bytes());
        cp[8..16].copy_from_slice(&(5u64 << 20).to_le_bytes());
        cp[16] = 3;
        // v1: the first checkpoint is implicit.
        let mut v1 = z.clone();
        v1.extend_from_slice(&cp);
        let (span, cps) = zinfo(&v1, 1000, 10 << 20).unwrap();
        assert_eq!(span, 4 << 20);
        assert_eq!((cps[0].inp, cps[0].out, cps[0].bits), (10, 0, 0));
        assert_eq!((cps[1].inp, cps[1].out, cps[1].bits), (500, 5 << 20, 3));
        // v2 lists both; a truncated or out-of-range one is refused.
        let mut v2 = v1.clone();
        v2.extend_from_slice(&cp);
        assert_eq!(zinfo(&v2, 1000, 10 << 20).unwrap().1.len(), 2);
        assert!(zinfo(&v2[..v2.len() - 1], 1000, 10 << 20).is_err());
        assert!(zinfo(&v1, 400, 10 << 20).is_err());
    }

    #[test]
    fn times_parse_like_go_writes_them() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Some((1, 0)));
        assert_eq!(
            parse_time("2023-05-06T07:08:09.5+02:00"),
            Some((1683349689, 500_000_000))
        );
        assert_eq!(parse_time("yesterday"), None);
    }
}

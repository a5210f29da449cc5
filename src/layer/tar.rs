//! Tar streams: walk the headers of an uncompressed tar and record where each file's bytes are.
//!
//! The walk seeks past file data, so over a remote blob it only fetches the blocks holding
//! headers. GNU and PAX long names, PAX size/uid/gid/mtime and `SCHILY.xattr.*` are honoured
//! (via the `tar` crate's header parsing); a PAX size is how Go and Python size a file past
//! 8 GiB, so files of any size are walked past without reading them. The same walk indexes the local tar a streamed gzip or
//! zstd layer is unpacked into.

use super::{Entry, Kind, Locator, clean_path};
use crate::blob::Blob;
use crate::error::{Error, Result};
use bytes::Bytes;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Most bytes of headers and extension records (GNU long names, PAX records) one entry may
/// carry. The `tar` crate reads those records into memory whole, at whatever size their header
/// claims, so without a bound a small compressed layer could ask for gigabytes.
const MAX_HEADERS: u64 = 16 << 20;

/// Indexes the tar in `blob`. Runs the blocking walk on a blocking thread.
pub async fn index(blob: Blob) -> Result<Vec<Entry>> {
    let handle = tokio::runtime::Handle::current();
    let id = blob.id().to_string();
    tokio::task::spawn_blocking(move || {
        let reader = BlobReader::new(blob, handle);
        index_reader(reader, &id)
    })
    .await
    .map_err(|e| Error::Io(io::Error::other(e)))?
}

/// Indexes any seekable tar stream; `what` names it in errors.
pub fn index_reader<R: Read + Seek>(reader: R, what: &str) -> Result<Vec<Entry>> {
    let (reader, limit) = bounded(reader);
    let mut archive = ::tar::Archive::new(reader);
    let entries = archive.entries_with_seek().map_err(|e| bad(what, e))?;
    collect(entries, &limit, what)
}

/// Indexes a tar stream read front to back (it reads through file data), then drains the
/// reader so a producer feeding it never blocks.
pub fn index_stream<R: Read>(reader: R, what: &str) -> Result<Vec<Entry>> {
    let (reader, limit) = bounded(reader);
    let mut archive = ::tar::Archive::new(reader);
    let entries = collect(archive.entries().map_err(|e| bad(what, e))?, &limit, what);
    let mut rest = archive.into_inner().inner;
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(|e| bad(what, e))?;
    entries
}

/// `reader` behind a [`Bounded`] guard, and the handle that moves its limit.
pub fn bounded<R>(reader: R) -> (Bounded<R>, HeaderLimit) {
    let limit = Arc::new(AtomicU64::new(MAX_HEADERS));
    let guard = Bounded {
        inner: reader,
        pos: 0,
        limit: limit.clone(),
    };
    (guard, HeaderLimit(limit))
}

/// A tar stream reader that refuses to read past a limit: the end of the current entry's data
/// plus `MAX_HEADERS` (16 MiB) for the next entry's headers and extension records. Streams start at
/// position 0; a seek moves the position with it.
pub struct Bounded<R> {
    inner: R,
    pos: u64,
    limit: Arc<AtomicU64>,
}

/// Moves a [`Bounded`] reader's limit past each entry the walk has been given.
pub struct HeaderLimit(Arc<AtomicU64>);

impl HeaderLimit {
    /// Allows the data of entry `e` and the headers of the next one. The data is as long as
    /// the walk skips: a PAX `size` record's length when there is one (Go's archive/tar and
    /// Python's tarfile leave the header's field 0 past 8 GiB, and any PAX writer may), the
    /// header's otherwise; a GNU sparse file stores its header's size (`size()` is the
    /// expanded length).
    pub fn after<R: Read>(&self, e: &::tar::Entry<'_, R>) {
        let stored = if e.header().entry_type().is_gnu_sparse() {
            e.header().entry_size().unwrap_or(0)
        } else {
            e.size()
        };
        let data = stored.div_ceil(512).saturating_mul(512);
        let end = e.raw_file_position().saturating_add(data);
        self.0
            .store(end.saturating_add(MAX_HEADERS), Ordering::Relaxed);
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = self.limit.load(Ordering::Relaxed);
        if self.pos >= limit && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "an entry's headers and extension records (long names, PAX) before offset {} exceed {MAX_HEADERS} bytes",
                    self.pos
                ),
            ));
        }
        let n = buf
            .len()
            .min((limit - self.pos).min(usize::MAX as u64) as usize);
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<R: Seek> Seek for Bounded<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }
}

fn bad(what: &str, e: io::Error) -> Error {
    Error::format(format!("tar stream of {what}"), e.to_string())
}

fn collect<R: Read>(
    entries: ::tar::Entries<'_, R>,
    limit: &HeaderLimit,
    what: &str,
) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for item in entries {
        let mut e = item.map_err(|e| bad(what, e))?;
        limit.after(&e);
        if let Some(entry) = entry_of(&mut e, what)? {
            out.push(entry);
        }
    }
    Ok(out)
}

/// The format-independent [`Entry`] of one tar entry; `None` for entries that carry no file
/// (global headers, vendor extensions) or whose path would escape the layer.
pub fn entry_of<R: Read>(e: &mut ::tar::Entry<'_, R>, what: &str) -> Result<Option<Entry>> {
    let bad = |e: io::Error| bad(what, e);
    let h = e.header();
    use ::tar::EntryType as T;
    let kind = match h.entry_type() {
        T::Regular | T::Continuous => Kind::File,
        T::Directory => Kind::Dir,
        T::Symlink => Kind::Symlink,
        T::Link => Kind::Hardlink,
        T::Char => Kind::Char,
        T::Block => Kind::Block,
        T::Fifo => Kind::Fifo,
        T::GNUSparse => Kind::File,
        _ => return Ok(None), // global headers and vendor extensions carry no file
    };
    let raw_path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
    let path = match clean_path(&raw_path) {
        Ok(p) => p,
        Err(err) => {
            tracing::warn!("skipping entry of {what}: {err}");
            return Ok(None);
        }
    };
    let mut entry = Entry::new(path, kind);
    entry.mode = h.mode().map_err(bad)? & 0o7777;
    entry.uid = h.uid().map_err(bad)? as u32;
    entry.gid = h.gid().map_err(bad)? as u32;
    entry.mtime = (h.mtime().map_err(bad)? as i64, 0);
    entry.link = e
        .link_name_bytes()
        .map(|l| String::from_utf8_lossy(&l).into_owned());
    if matches!(kind, Kind::Char | Kind::Block) {
        entry.rdev = (
            h.device_major().map_err(bad)?.unwrap_or(0),
            h.device_minor().map_err(bad)?.unwrap_or(0),
        );
    }
    if let Some(pax) = e.pax_extensions().map_err(bad)? {
        for ext in pax {
            let ext = ext.map_err(bad)?;
            let Ok(key) = ext.key() else { continue };
            let val = ext.value_bytes();
            let num = || {
                std::str::from_utf8(val)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
            };
            match key {
                "uid" => entry.uid = num().unwrap_or(entry.uid as u64) as u32,
                "gid" => entry.gid = num().unwrap_or(entry.gid as u64) as u32,
                "mtime" => {
                    if let Some(t) = std::str::from_utf8(val).ok().and_then(parse_pax_time) {
                        entry.mtime = t;
                    }
                }
                k if k.starts_with("GNU.sparse.") => {
                    // PAX sparse formats keep a map in the data; serving the raw bytes would
                    // be wrong, so refuse clearly instead.
                    return Err(Error::Unsupported(format!(
                        "PAX-format sparse file {:?} in {what}",
                        entry.path
                    )));
                }
                k => {
                    if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                        entry.xattrs.push((name.to_string(), val.to_vec()));
                    }
                }
            }
        }
    }
    if kind == Kind::File {
        entry.size = e.size();
        if entry.size > 0 {
            entry.data = if e.header().entry_type().is_gnu_sparse() {
                Locator::Sparse {
                    header: e.raw_header_position(),
                }
            } else {
                Locator::Tar {
                    offset: e.raw_file_position(),
                }
            };
        }
    }
    Ok(Some(entry))
}

/// One stored piece of a GNU sparse file: `len` bytes at file offset `offset`, stored at tar
/// offset `at`. Everything between pieces is a hole (zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparsePiece {
    pub offset: u64,
    pub len: u64,
    pub at: u64,
}

/// Reads the sparse map of the GNU sparse entry whose header is at `header` in `tar`: the
/// map starts in the header and continues in extension blocks; the data follows them.
pub async fn sparse_map(tar: &Blob, header: u64) -> Result<(Vec<SparsePiece>, u64)> {
    let bad = |why: String| {
        Error::format(
            format!("GNU sparse header at {header} of {}", tar.id()),
            why,
        )
    };
    let block = tar.read_at(header, 512).await?;
    if block.len() != 512 {
        return Err(bad("truncated".into()));
    }
    let h = ::tar::Header::from_byte_slice(&block);
    let gnu = h.as_gnu().ok_or_else(|| bad("not a GNU header".into()))?;
    let real_size = gnu.real_size().map_err(|e| bad(e.to_string()))?;
    let mut spans: Vec<(u64, u64)> = Vec::new();
    let push = |spans: &mut Vec<(u64, u64)>, s: &::tar::GnuSparseHeader| -> Result<()> {
        if !s.is_empty() {
            spans.push((
                s.offset().map_err(|e| bad(e.to_string()))?,
                s.length().map_err(|e| bad(e.to_string()))?,
            ));
        }
        Ok(())
    };
    for s in &gnu.sparse {
        push(&mut spans, s)?;
    }
    let mut next = header + 512;
    let mut extended = gnu.is_extended();
    while extended {
        if spans.len() > 1 << 20 {
            return Err(bad("more than a million pieces".into()));
        }
        let raw = tar.read_at(next, 512).await?;
        if raw.len() != 512 {
            return Err(bad("truncated extension block".into()));
        }
        let mut ext = ::tar::GnuExtSparseHeader::new();
        ext.as_mut_bytes().copy_from_slice(&raw);
        for s in ext.sparse() {
            push(&mut spans, s)?;
        }
        extended = ext.is_extended();
        next += 512;
    }
    let mut pieces = Vec::with_capacity(spans.len());
    let (mut at, mut end) = (next, 0u64);
    for (offset, len) in spans {
        let stop = offset
            .checked_add(len)
            .ok_or_else(|| bad("piece overflows".into()))?;
        if offset < end || stop > real_size {
            return Err(bad(format!(
                "piece {offset}+{len} is out of order or past the size {real_size}"
            )));
        }
        pieces.push(SparsePiece { offset, len, at });
        at += len;
        end = stop;
    }
    Ok((pieces, real_size))
}

/// Reads `[offset, offset+len)` of a GNU sparse file, holes as zeros.
pub async fn read_sparse(tar: &Blob, header: u64, offset: u64, len: u64) -> Result<Bytes> {
    let (pieces, _) = sparse_map(tar, header).await?;
    let mut out = vec![0u8; len as usize];
    let end = offset + len;
    for p in pieces
        .iter()
        .filter(|p| p.offset < end && p.offset + p.len > offset)
    {
        let s = offset.max(p.offset);
        let e = end.min(p.offset + p.len);
        let data = tar.read_at(p.at + (s - p.offset), e - s).await?;
        if data.len() as u64 != e - s {
            return Err(Error::format(
                format!("GNU sparse file at {header} of {}", tar.id()),
                format!("the piece at {} lies past the end of the tar", p.offset),
            ));
        }
        out[(s - offset) as usize..(e - offset) as usize].copy_from_slice(&data);
    }
    Ok(Bytes::from(out))
}

/// PAX times are decimal seconds with an optional fraction.
fn parse_pax_time(s: &str) -> Option<(i64, u32)> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos = 0u32;
    for (i, c) in frac.chars().take(9).enumerate() {
        nanos += c.to_digit(10)? * 10u32.pow(8 - i as u32);
    }
    Some((secs, nanos))
}

/// A blocking `Read + Seek` view of a [`Blob`], for parsers written against std I/O.
/// Reads in 64 KiB windows; must run on a thread where blocking is allowed.
pub struct BlobReader {
    blob: Blob,
    handle: tokio::runtime::Handle,
    pos: u64,
    window: Bytes,
    window_start: u64,
}

impl BlobReader {
    /// A reader at offset 0 of `blob`.
    pub fn new(blob: Blob, handle: tokio::runtime::Handle) -> Self {
        BlobReader {
            blob,
            handle,
            pos: 0,
            window: Bytes::new(),
            window_start: 0,
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self.blob.size();
        if self.pos >= size || buf.is_empty() {
            return Ok(0);
        }
        let in_window = self.pos >= self.window_start
            && self.pos < self.window_start + self.window.len() as u64;
        if !in_window {
            let len = (64 * 1024).min(size - self.pos);
            let blob = self.blob.clone();
            let pos = self.pos;
            self.window = self
                .handle
                .block_on(async move { blob.read_at(pos, len).await })
                .map_err(io::Error::other)?;
            self.window_start = self.pos;
        }
        let s = (self.pos - self.window_start) as usize;
        let n = buf.len().min(self.window.len() - s);
        buf[..n].copy_from_slice(&self.window[s..s + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for BlobReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let size = self.blob.size() as i128;
        let new = match to {
            SeekFrom::Start(o) => o as i128,
            SeekFrom::End(d) => size + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if new < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before start",
            ));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_extension_records_are_refused_not_read_into_memory() {
        // A GNU long-name record claiming 17 MiB (more than MAX_HEADERS), then a file.
        let mut tar = Vec::new();
        let mut h = ::tar::Header::new_gnu();
        h.set_entry_type(::tar::EntryType::GNULongName);
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        let big = 17u64 << 20;
        h.set_size(big);
        h.set_cksum();
        tar.extend_from_slice(h.as_bytes());
        tar.resize(tar.len() + big as usize, b'a');
        let mut b = ::tar::Builder::new(tar);
        let mut f = ::tar::Header::new_gnu();
        f.set_size(1);
        f.set_mode(0o644);
        f.set_cksum();
        b.append_data(&mut f, "x", &b"1"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let err = index_reader(io::Cursor::new(&tar), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("exceed"), "{err}");
        let err = index_stream(&tar[..], "t").unwrap_err().to_string();
        assert!(err.contains("exceed"), "{err}");
        // Large file data is not headers: a 20 MiB file after a small long name is fine.
        let mut b = ::tar::Builder::new(Vec::new());
        let mut f = ::tar::Header::new_gnu();
        f.set_size(20 << 20);
        f.set_mode(0o644);
        f.set_uid(0);
        f.set_gid(0);
        f.set_mtime(0);
        let name = format!("{}/big", "d".repeat(150));
        b.append_data(&mut f, &name, io::repeat(7).take(20 << 20))
            .unwrap();
        b.append_data(&mut f.clone(), "after", io::repeat(7).take(20 << 20))
            .unwrap();
        let tar = b.into_inner().unwrap();
        assert_eq!(index_stream(&tar[..], "t").unwrap().len(), 2);
        assert_eq!(index_reader(io::Cursor::new(&tar), "t").unwrap().len(), 2);
    }

    /// The headers Go's archive/tar (1.19) writes for a file whose size overflows the ustar
    /// field, byte for byte but for the PAX header's name: a PAX record `size=N`, then a
    /// ustar header whose size field is 0. Python's tarfile writes the same.
    fn pax_sized(name: &str, size: u64) -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", size.to_string().as_bytes())])
            .unwrap();
        let mut h = ::tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        b.get_ref().clone()
    }

    /// A small file after the others, and the end of the archive.
    fn after_file(tar: &mut Vec<u8>) {
        let mut b = ::tar::Builder::new(std::mem::take(tar));
        let mut h = ::tar::Header::new_ustar();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, "after", &b"after"[..]).unwrap();
        *tar = b.into_inner().unwrap();
    }

    #[test]
    fn a_pax_size_record_sizes_a_file_past_the_header_bound() {
        // 20 MiB sized only by PAX: more data than MAX_HEADERS allows for headers.
        let len = 20u64 << 20;
        let mut tar = pax_sized("big", len);
        let data_at = tar.len();
        tar.extend((0..len).map(|i| (i % 251) as u8));
        after_file(&mut tar);
        for entries in [
            index_reader(io::Cursor::new(&tar), "t").unwrap(),
            index_stream(&tar[..], "t").unwrap(),
        ] {
            assert_eq!(entries.len(), 2);
            assert_eq!((entries[0].path.as_str(), entries[0].size), ("big", len));
            assert_eq!(
                entries[0].data,
                Locator::Tar {
                    offset: data_at as u64
                }
            );
            let Locator::Tar { offset } = entries[1].data else {
                panic!()
            };
            assert_eq!(&tar[offset as usize..offset as usize + 5], b"after");
        }
        // The records themselves are still bounded: a PAX header claiming 17 MiB is refused.
        let mut h = ::tar::Header::new_ustar();
        h.set_entry_type(::tar::EntryType::XHeader);
        h.set_size(17 << 20);
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        tar.extend(b"30 size=1\n".iter().cycle().take(17 << 20));
        after_file(&mut tar);
        let err = index_reader(io::Cursor::new(&tar), "t").unwrap_err();
        assert!(err.to_string().contains("exceed"), "{err}");
    }

    /// A tar of `head`, then `len` bytes synthesized from their offset, then `tail`: a
    /// 9 GiB file without 9 GiB of memory. Counts the bytes of the file it is asked for.
    struct Synth {
        head: Vec<u8>,
        len: u64,
        tail: Vec<u8>,
        data_read: AtomicU64,
    }

    fn synth_byte(i: u64) -> u8 {
        ((i % 251) as u8) ^ ((i >> 32) as u8)
    }

    #[async_trait::async_trait]
    impl crate::blob::BlobSource for Synth {
        fn id(&self) -> &str {
            "synth"
        }
        fn size(&self) -> u64 {
            self.head.len() as u64 + self.len + self.tail.len() as u64
        }
        async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
            let len = crate::blob::clamp("synth", self.size(), offset, len)?;
            // The file's data is [h, t).
            let h = self.head.len() as u64;
            let t = h + self.len;
            let out: Vec<u8> = (offset..offset + len)
                .map(|i| match i {
                    i if i < h => self.head[i as usize],
                    i if i < t => synth_byte(i - h),
                    i => self.tail[(i - t) as usize],
                })
                .collect();
            let overlap = (offset + len).min(t).saturating_sub(offset.max(h));
            self.data_read.fetch_add(overlap, Ordering::Relaxed);
            Ok(Bytes::from(out))
        }
    }
    impl crate::blob::ReadHints for Synth {}

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_nine_gib_file_sized_by_pax_lists_and_reads_at_both_ends() {
        use crate::layer::{Health, Layer, LayerData};
        let len = 9u64 << 30;
        let head = pax_sized("d/big", len);
        let mut tail = vec![0u8; (len.div_ceil(512) * 512 - len) as usize];
        after_file(&mut tail);
        let synth = Arc::new(Synth {
            head: head.clone(),
            len,
            tail,
            data_read: AtomicU64::new(0),
        });
        let blob: Blob = synth.clone();
        let entries = index(blob.clone()).await.unwrap();
        // The walk reads 64 KiB windows around the headers and seeks past the rest.
        let read = synth.data_read.load(Ordering::Relaxed);
        assert!(read <= 128 << 10, "the walk read {read} bytes of data");
        let names: Vec<_> = entries.iter().map(|e| (e.path.as_str(), e.size)).collect();
        assert_eq!(names, [("d/big", len), ("after", 5)]);
        let entry = |p: &str| entries.iter().find(|e| e.path == p).unwrap();
        let layer = Layer {
            digest: "synth".into(),
            format: crate::layer::Format::Tar,
            data: LayerData::Tar(blob),
            health: std::sync::RwLock::new(Health::Verified),
            index_source: None,
            index_check: None,
            entries_read: None,
        };
        let loc = &entry("d/big").data;
        for at in [0, 4095, (4u64 << 30) + 7, len - 4096] {
            let got = layer.read(loc, len, at, 4096).await.unwrap();
            let want: Vec<u8> = (at..at + 4096).map(synth_byte).collect();
            assert_eq!(&got[..], &want[..], "at {at}");
        }
        // A read past the end stops at the end; the file after it is intact.
        assert_eq!(layer.read(loc, len, len - 3, 100).await.unwrap().len(), 3);
        let after = entry("after");
        let got = layer.read(&after.data, 5, 0, 5).await.unwrap();
        assert_eq!(&got[..], b"after");
    }

    #[test]
    fn indexes_long_names_links_xattrs_and_offsets() {
        let mut b = ::tar::Builder::new(Vec::new());
        let long = format!("d/{}", "x".repeat(150));
        let new = |mut h: ::tar::Header| {
            h.set_uid(1);
            h.set_gid(2);
            h.set_mtime(3);
            h.set_mode(0o644);
            h
        };
        let mut h = new(::tar::Header::new_gnu());
        h.set_size(5);
        h.set_mode(0o4755);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, &long, &b"hello"[..]).unwrap();
        let mut h = new(::tar::Header::new_gnu());
        h.set_entry_type(::tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, "hl", &long).unwrap();
        b.append_pax_extensions([
            ("SCHILY.xattr.user.k", &b"v\0x"[..]),
            ("mtime", &b"5.25"[..]),
        ])
        .unwrap();
        let mut h = new(::tar::Header::new_ustar());
        h.set_entry_type(::tar::EntryType::Fifo);
        h.set_size(0);
        b.append_data(&mut h, "fifo", &[][..]).unwrap();
        let tar = b.into_inner().unwrap();
        let entries = index_reader(io::Cursor::new(&tar), "test").unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].path, long);
        assert_eq!(entries[0].mode, 0o4755);
        let Locator::Tar { offset } = entries[0].data else {
            panic!()
        };
        assert_eq!(&tar[offset as usize..offset as usize + 5], b"hello");
        assert_eq!(
            (entries[1].kind, entries[1].link.as_deref()),
            (Kind::Hardlink, Some(long.as_str()))
        );
        assert_eq!(
            entries[2].xattrs,
            vec![("user.k".to_string(), b"v\0x".to_vec())]
        );
        assert_eq!(entries[2].mtime, (5, 250_000_000));
    }

    #[test]
    fn pax_sparse_files_are_refused_not_served_wrong() {
        let mut b = ::tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("GNU.sparse.major", &b"1"[..]),
            ("GNU.sparse.minor", &b"0"[..]),
            ("GNU.sparse.realsize", &b"4096"[..]),
        ])
        .unwrap();
        let mut h = ::tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, "GNUSparseFile.0/f", &b"map"[..])
            .unwrap();
        let tar = b.into_inner().unwrap();
        let err = index_reader(io::Cursor::new(&tar), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sparse"), "{err}");
    }

    #[tokio::test]
    async fn a_sparse_piece_past_the_end_of_the_tar_is_an_error_not_a_panic() {
        // GNU tar's sparse file: 4 KiB of data at 20 KiB of 64 KiB, stored at 512..4608.
        let whole = include_bytes!("../../fuzz/corpus/tar/seed-gnu-sparse").to_vec();
        for (tar, ok) in [(whole[..1536].to_vec(), false), (whole, true)] {
            let entries = index_reader(io::Cursor::new(&tar), "t").unwrap();
            let Locator::Sparse { header } = entries[0].data else {
                panic!("{:?}", entries[0])
            };
            let blob: Blob = Arc::new(crate::blob::MemBlob::new("t", tar));
            let read = read_sparse(&blob, header, 20 << 10, 4096).await;
            match read {
                Ok(b) => assert!(ok && b.starts_with(b"data in the middle")),
                Err(e) => assert!(!ok && e.to_string().contains("past the end"), "{e}"),
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut junk = vec![0xffu8; 1024];
        junk[156] = b'0';
        assert!(index_reader(io::Cursor::new(junk), "junk").is_err());
    }
}

//! Reading files stored as independently compressed chunks: eStargz (gzip members) and
//! zstd:chunked (zstd frames). A file's [`Chunk`]s say where each piece's compressed bytes
//! start and end in the blob; a read fetches only the chunks it touches, decodes them, and
//! checks each one's digest before a byte is returned. A small cache of decoded chunks
//! (bounded in bytes) lets sequential kernel reads inside one chunk decode it once.
//!
//! A chunk is decoded whole before a byte of it is served (its digest covers all of it).
//! Chunks up to [`MAX_CHUNK`] are decoded in memory; eStargz writes 4 MiB or smaller ones. A
//! larger chunk (zstd:chunked cuts files where a rolling checksum says, so a file of one
//! repeated byte is one chunk however long it is) is decoded once into an unnamed file in the
//! cache directory, checked as it is written, and read from there. A zstd:chunked `zeros`
//! chunk (a hole) is served as zeros without fetching anything. What a TOC claims bounds the
//! work it can cause: compressed bytes read per chunk are bounded by its decoded length, a
//! chunk longer than the disk cache bound is refused with an error naming it, and decoded
//! files past that bound are dropped oldest first.

use crate::blob::{Blob, BytesLru, Flights, healing};
use crate::error::{Error, Result};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The largest chunk decoded in memory (decoded bytes up to its end, `inner + len`).
pub const MAX_CHUNK: u64 = 64 << 20;
/// Decoded chunks kept per layer, in bytes.
const DECODED_BYTES: u64 = 16 << 20;

/// How each chunk's compressed bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// A gzip member (eStargz).
    Gzip,
    /// A zstd frame (zstd:chunked).
    Zstd,
}

/// One piece of a file: where its compressed bytes start and end in the blob, and what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk within the file.
    pub file_offset: u64,
    /// Uncompressed length.
    pub len: u64,
    /// Compressed extent `[start, end)` of the member or frame holding it.
    pub start: u64,
    pub end: u64,
    /// Offset of the chunk inside the decoded member.
    pub inner: u64,
    /// `sha256:...` of the uncompressed chunk, if the TOC has one.
    pub digest: Option<String>,
    /// A run of zero bytes (zstd:chunked `chunkType: "zeros"`): served without a fetch.
    pub zeros: bool,
}

impl Chunk {
    /// Decoded bytes of its member or frame up to the chunk's end.
    fn decoded_end(&self) -> u64 {
        self.inner.saturating_add(self.len)
    }

    /// Compressed bytes worth reading to decode it: its extent, but never more than a
    /// generous bound of what `decoded_end` bytes can take (deflate and zstd expand
    /// incompressible data by well under 1%; a zstd block is decoded whole, 128 KiB at most),
    /// so a TOC claiming a huge extent cannot make one read huge.
    fn compressed_len(&self) -> u64 {
        let bound = self
            .decoded_end()
            .saturating_mul(2)
            .saturating_add(256 << 10);
        (self.end - self.start).min(bound)
    }
}

/// A large chunk's decoded file, once its first reader has written and checked it.
type Decoded = Arc<tokio::sync::OnceCell<Arc<std::fs::File>>>;

/// Large chunks decoded into files, by key: each is decoded once, by its first reader; the
/// least recently decoded are dropped (and their files with them) when together they take
/// more than the spill bound, so the disk they take is bounded like the block cache's.
#[derive(Default)]
struct Spilled {
    cells: HashMap<(u64, u64), Decoded>,
    /// Decoded chunks, oldest first, with their lengths.
    order: std::collections::VecDeque<((u64, u64), u64)>,
    bytes: u64,
}

impl Spilled {
    /// Counts a newly decoded chunk; drops the oldest others while over `max`.
    fn decoded(&mut self, key: (u64, u64), len: u64, max: u64) {
        self.order.push_back((key, len));
        self.bytes += len;
        while self.bytes > max && self.order.len() > 1 {
            let Some((old, n)) = self.order.pop_front() else {
                break;
            };
            self.cells.remove(&old);
            self.bytes -= n;
        }
    }
}

/// Where chunks too large for memory are decoded to.
#[derive(Debug, Clone)]
pub struct Spill {
    /// Directory of the unnamed files (the cache directory's `chunks`).
    pub dir: PathBuf,
    /// The longest chunk decoded there (the disk cache bound).
    pub max: u64,
}

/// Reads chunks of one blob.
pub struct Reader {
    blob: Blob,
    codec: Codec,
    /// Decoded chunks by (compressed start, offset inside the member).
    decoded: Mutex<BytesLru<(u64, u64)>>,
    /// Chunks being decoded, by the same key: a reader and [`Reader::decode_ahead`] wanting
    /// one chunk at once decode it once.
    decoding: Flights<(u64, u64)>,
    /// Compressed bytes at the start of the blob worth prefetching (eStargz: everything before
    /// `.prefetch.landmark`, the prioritized files).
    pub prefetch_len: u64,
    /// Where chunks over [`MAX_CHUNK`] are decoded (without it they are refused).
    spill: Option<Spill>,
    /// Chunks decoded into files.
    spilled: Mutex<Spilled>,
    /// Zero chunks whose digest has been checked.
    zeros_checked: Mutex<HashSet<(u64, u64)>>,
    /// Whether the TOC the chunk digests come from was checked against a digest the image
    /// manifest names (an annotation); without one it is the registry's word.
    pub toc_vouched: bool,
}

impl Reader {
    /// A reader of `blob` (normally block-cached) whose chunks are `codec`-compressed.
    pub fn new(blob: Blob, codec: Codec, prefetch_len: u64) -> Reader {
        Reader {
            blob,
            codec,
            decoded: Mutex::new(BytesLru::new(DECODED_BYTES)),
            decoding: Flights::default(),
            prefetch_len,
            spill: None,
            spilled: Mutex::default(),
            zeros_checked: Mutex::default(),
            toc_vouched: false,
        }
    }

    /// Notes whether the TOC was checked against a digest the manifest names.
    pub fn vouched(mut self, yes: bool) -> Reader {
        self.toc_vouched = yes;
        self
    }

    /// Lets chunks over [`MAX_CHUNK`] be decoded into files under `spill.dir`.
    pub fn spill_to(mut self, spill: Spill) -> Reader {
        self.spill = Some(spill);
        self
    }

    /// Brings the first `prefetch_len` compressed bytes into the block cache, front first
    /// (the files needed first arrive first), adding their size to `done` once in.
    pub async fn prefetch(&self, done: &std::sync::atomic::AtomicU64) -> Result<()> {
        self.blob.prefetch(0, self.prefetch_len).await?;
        done.fetch_add(self.prefetch_len, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Decodes `chunks` in the order given (each once) as their compressed bytes arrive (a
    /// read waits for the fetch under way, or fetches the chunk itself) and keeps them
    /// decoded: the decoded cache grows by their size, which the caller bounds. For what
    /// a start reads soon after (prioritized files, a program fetched whole): decoded on
    /// demand, each of its reads would wait for its chunk's inflating and digest check.
    /// Stops at the first chunk that fails, leaving it and the rest to their readers.
    pub async fn decode_ahead(&self, chunks: &[Chunk]) {
        let ahead: Vec<&Chunk> = chunks
            .iter()
            .filter(|c| !c.zeros && c.decoded_end() <= MAX_CHUNK)
            .collect();
        let grow = ahead.iter().map(|c| c.len).sum();
        self.decoded.lock().unwrap().grow(grow);
        for c in ahead {
            if let Err(e) = self.chunk(c, c.end, false).await {
                tracing::debug!("decoding ahead stopped at {}: {e}", self.what(c));
                break;
            }
        }
    }

    /// Drops the decoded chunks and the blob's cached blocks held in memory (see
    /// [`crate::blob::ReadHints::release_memory`]).
    pub fn release_memory(&self) {
        *self.decoded.lock().unwrap() = BytesLru::new(DECODED_BYTES);
        self.blob.release_memory();
    }

    /// The (block-cached) compressed blob.
    pub fn blob(&self) -> &Blob {
        &self.blob
    }

    /// Brings the compressed bytes of `chunks` into the cache in one streamed range.
    pub async fn warm(&self, chunks: &[Chunk]) -> Result<()> {
        let (Some(a), Some(b)) = (
            chunks.iter().map(|c| c.start).min(),
            chunks.iter().map(|c| c.end).max(),
        ) else {
            return Ok(());
        };
        self.blob.prefetch(a, b.saturating_sub(a)).await
    }

    /// Reads `[offset, offset+len)` of a file made of `chunks`.
    pub async fn read(&self, chunks: &[Chunk], offset: u64, len: u64) -> Result<Bytes> {
        self.read_chunks(chunks, offset, len, false).await
    }

    /// [`Reader::read`] without waiting behind fetches under way (see
    /// [`crate::blob::ReadHints::read_now`]).
    pub async fn read_now(&self, chunks: &[Chunk], offset: u64, len: u64) -> Result<Bytes> {
        self.read_chunks(chunks, offset, len, true).await
    }

    async fn read_chunks(
        &self,
        chunks: &[Chunk],
        offset: u64,
        len: u64,
        now: bool,
    ) -> Result<Bytes> {
        let end = offset + len;
        let mut out = BytesMut::with_capacity(len as usize);
        let first = chunks.partition_point(|c| c.file_offset + c.len <= offset);
        // Read-ahead stays within this file's compressed bytes.
        let until = chunks.iter().map(|c| c.end).max().unwrap_or(0);
        for c in &chunks[first..] {
            if c.file_offset >= end {
                break;
            }
            let s = offset.max(c.file_offset) - c.file_offset;
            let e = end.min(c.file_offset + c.len) - c.file_offset;
            if c.zeros {
                self.check_zeros(c).await?;
                out.resize(out.len() + (e - s) as usize, 0);
            } else if c.decoded_end() > MAX_CHUNK {
                out.extend_from_slice(&self.read_spilled(c, s, e - s).await?);
            } else {
                let data = self.chunk(c, until, now).await?;
                out.extend_from_slice(&data[s as usize..e as usize]);
            }
        }
        Ok(out.freeze())
    }

    /// One chunk, decoded and checked against its digest (its compressed bytes read `now`
    /// if asked, see [`crate::blob::ReadHints::read_now`]). Compressed bytes that do not
    /// decode to the chunk are dropped from the cache and fetched once more: only a second
    /// failure is the read's.
    async fn chunk(&self, c: &Chunk, until: u64, now: bool) -> Result<Bytes> {
        let key = (c.start, c.inner);
        if let Some(b) = self.decoded.lock().unwrap().get(&key) {
            return Ok(b);
        }
        // One decode per chunk at a time; not for a read that must not wait (`now`), whose
        // chunk may be held by a decoding ahead still waiting for its bytes.
        let _pass = match now {
            false => Some(self.decoding.enter(key).await),
            true => None,
        };
        if let Some(b) = self.decoded.lock().unwrap().get(&key) {
            return Ok(b);
        }
        self.check_extent(c)?;
        let data = healing(
            &self.blob,
            (c.start, c.compressed_len()),
            &self.what(c),
            || self.decode_chunk(c, until, now),
        )
        .await?;
        self.decoded.lock().unwrap().put(key, data.clone());
        Ok(data)
    }

    /// Fetches, decodes and checks one chunk.
    async fn decode_chunk(&self, c: &Chunk, until: u64, now: bool) -> Result<Bytes> {
        let what = || self.what(c);
        let compressed = if now {
            self.blob.read_now(c.start, c.compressed_len()).await?
        } else {
            self.blob
                .read_within(c.start, c.compressed_len(), until)
                .await?
        };
        let (inner, len, codec) = (c.inner, c.len, self.codec);
        let data = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut dec = decoder(codec, std::io::Cursor::new(compressed))?;
            std::io::copy(&mut (&mut dec).take(inner), &mut std::io::sink())?;
            let mut out = Vec::with_capacity(len.min(1 << 20) as usize);
            dec.take(len).read_to_end(&mut out)?;
            Ok(out)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
        .map_err(|e| Error::format(what(), e.to_string()))?;
        if data.len() as u64 != c.len {
            return Err(Error::format(
                what(),
                format!("decodes to {} bytes, the TOC says {}", data.len(), c.len),
            ));
        }
        if let Some(expected) = &c.digest {
            let actual = crate::digest::sha256(&data);
            if &actual != expected {
                return Err(Error::Digest {
                    what: what(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(Bytes::from(data))
    }

    fn what(&self, c: &Chunk) -> String {
        format!("chunk at {} of {}", c.start, self.blob.id())
    }

    fn check_extent(&self, c: &Chunk) -> Result<()> {
        if c.end <= c.start || c.end > self.blob.size() {
            return Err(Error::format(
                self.what(c),
                format!("bad extent {}..{}", c.start, c.end),
            ));
        }
        Ok(())
    }

    /// Checks once that a zero chunk's digest is that of its zeros, so a TOC that contradicts
    /// itself fails like a bad chunk. Only holes up to [`MAX_CHUNK`] are hashed (about 50 ms);
    /// a longer one would hold its first read for seconds per GiB, so its type, from the
    /// same authenticated TOC, is trusted, as containers/storage does.
    async fn check_zeros(&self, c: &Chunk) -> Result<()> {
        let key = (c.start, c.inner);
        let Some(expected) = c.digest.clone().filter(|_| c.len <= MAX_CHUNK) else {
            return Ok(());
        };
        if self.zeros_checked.lock().unwrap().contains(&key) {
            return Ok(());
        }
        let len = c.len;
        let actual = tokio::task::spawn_blocking(move || {
            let zeros = [0u8; 64 << 10];
            let mut h = crate::digest::Hasher::default();
            let mut left = len;
            while left > 0 {
                let n = left.min(zeros.len() as u64);
                h.update(&zeros[..n as usize]);
                left -= n;
            }
            h.finish()
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        if actual != expected {
            return Err(Error::Digest {
                what: format!("zero {}", self.what(c)),
                expected,
                actual,
            });
        }
        self.zeros_checked.lock().unwrap().insert(key);
        Ok(())
    }

    /// `len` bytes at `offset` of a chunk too large for memory, from its decoded file.
    async fn read_spilled(&self, c: &Chunk, offset: u64, len: u64) -> Result<Bytes> {
        let key = (c.start, c.inner);
        let cell = self
            .spilled
            .lock()
            .unwrap()
            .cells
            .entry(key)
            .or_default()
            .clone();
        let decode = || async {
            let what = self.what(c);
            let spill = self.spill_dir(c)?;
            let range = (c.start, c.compressed_len());
            let file = healing(&self.blob, range, &what, || self.spill(c, spill.clone())).await?;
            let max = self.spill.as_ref().map_or(0, |s| s.max);
            self.spilled.lock().unwrap().decoded(key, c.len, max);
            Ok::<_, Error>(file)
        };
        let file = cell.get_or_try_init(decode).await?.clone();
        crate::blob::read_file_at(file, offset, len).await
    }

    /// Where a large chunk may be decoded: an error when there is no such place or the
    /// chunk is longer than it may hold.
    fn spill_dir(&self, c: &Chunk) -> Result<Spill> {
        let what = self.what(c);
        let Some(spill) = self.spill.clone() else {
            return Err(Error::format(
                what,
                format!(
                    "{} bytes long, more than the {MAX_CHUNK} decoded in memory, and no cache directory to decode it into",
                    c.len
                ),
            ));
        };
        if c.len > spill.max {
            return Err(Error::format(
                what,
                format!(
                    "{} bytes long, more than the {} the cache directory may hold",
                    c.len, spill.max
                ),
            ));
        }
        self.check_extent(c)?;
        Ok(spill)
    }

    /// Decodes a large chunk into an unnamed file under `spill`, checking its length and
    /// digest; the file is served only once both match, and disappears with the mount.
    async fn spill(&self, c: &Chunk, spill: Spill) -> Result<Arc<std::fs::File>> {
        let what = self.what(c);
        tracing::info!(
            "decoding {what} ({} bytes) into {}",
            c.len,
            spill.dir.display()
        );
        let (blob, codec, c) = (self.blob.clone(), self.codec, c.clone());
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || -> Result<std::fs::File> {
            let file = crate::blob::disk::unnamed_file(&spill.dir)?;
            let mut src = super::tar::BlobReader::new(blob, handle);
            src.seek(std::io::SeekFrom::Start(c.start))?;
            let mut dec = decoder(codec, src.take(c.compressed_len()))?;
            std::io::copy(&mut (&mut dec).take(c.inner), &mut std::io::sink())?;
            let mut out = HashingWriter {
                out: std::io::BufWriter::with_capacity(1 << 20, file.try_clone()?),
                hasher: crate::digest::Hasher::default(),
                written: 0,
            };
            std::io::copy(&mut dec.take(c.len), &mut out)
                .map_err(|e| Error::format(&what, e.to_string()))?;
            out.out.flush()?;
            let HashingWriter {
                hasher, written, ..
            } = out;
            if written != c.len {
                return Err(Error::format(
                    &what,
                    format!("decodes to {written} bytes, the TOC says {}", c.len),
                ));
            }
            let actual = hasher.finish();
            if let Some(expected) = c.digest
                && actual != expected
            {
                return Err(Error::Digest {
                    what,
                    expected,
                    actual,
                });
            }
            Ok(file)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
        .map(Arc::new)
    }
}

/// A decoder of one gzip member or zstd frame read from `src`.
fn decoder(codec: Codec, src: impl Read + Send + 'static) -> std::io::Result<Box<dyn Read + Send>> {
    Ok(match codec {
        Codec::Gzip => Box::new(flate2::read::GzDecoder::new(src)),
        Codec::Zstd => Box::new(zstd::stream::read::Decoder::new(src)?),
    })
}

/// Writes through, hashing and counting what passes.
struct HashingWriter<W> {
    out: W,
    hasher: crate::digest::Hasher,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::MemBlob;
    use std::io::Write;
    use std::sync::Arc;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[tokio::test]
    async fn decoded_chunks_are_bounded_in_bytes() {
        // Eighty 256 KiB chunks (20 MiB), each its own gzip member, one after another.
        const LEN: u64 = 256 << 10;
        let mut blob = Vec::new();
        let mut chunks = Vec::new();
        for i in 0..80u64 {
            let data = vec![i as u8; LEN as usize];
            let member = gzip(&data);
            chunks.push(Chunk {
                file_offset: i * LEN,
                len: LEN,
                start: blob.len() as u64,
                end: (blob.len() + member.len()) as u64,
                inner: 0,
                digest: Some(crate::digest::sha256(&data)),
                zeros: false,
            });
            blob.extend_from_slice(&member);
        }
        let reader = Reader::new(Arc::new(MemBlob::new("b", blob)), Codec::Gzip, 0);
        let all = reader.read(&chunks, 0, 80 * LEN).await.unwrap();
        assert!(
            all.chunks(LEN as usize)
                .enumerate()
                .all(|(i, c)| c.iter().all(|&b| b == i as u8))
        );
        {
            let decoded = reader.decoded.lock().unwrap();
            // As many of the last chunks as fit in the byte bound, not a fixed count.
            assert!(decoded.used() <= DECODED_BYTES && decoded.len() as u64 == DECODED_BYTES / LEN);
            assert_eq!(decoded.used(), decoded.len() as u64 * LEN);
        }
    }

    fn one_chunk(data: &[u8], member: &[u8]) -> Chunk {
        Chunk {
            file_offset: 0,
            len: data.len() as u64,
            start: 0,
            end: member.len() as u64,
            inner: 0,
            digest: Some(crate::digest::sha256(data)),
            zeros: false,
        }
    }

    #[tokio::test]
    async fn chunks_too_large_for_memory_are_decoded_to_a_file_and_checked() {
        // 80 MiB of a repeated pattern: one gzip member, as a rolling-checksum cutter leaves it.
        let data: Vec<u8> = (0..80u64 << 20).map(|i| (i % 251) as u8).collect();
        let member = gzip(&data);
        let chunk = one_chunk(&data, &member);
        let blob: Blob = Arc::new(MemBlob::new("b", member));

        let bare = Reader::new(blob.clone(), Codec::Gzip, 0);
        let err = bare
            .read(std::slice::from_ref(&chunk), 0, 10)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no cache directory"), "{err}");

        let dir = std::env::temp_dir().join(format!("ocifs-spill-{}", std::process::id()));
        let spill = Spill {
            dir: dir.clone(),
            max: 1 << 30,
        };
        let reader = Reader::new(blob.clone(), Codec::Gzip, 0).spill_to(spill.clone());
        let at = (70 << 20) + 7;
        let got = reader
            .read(std::slice::from_ref(&chunk), at, 100_000)
            .await
            .unwrap();
        assert_eq!(&got[..], &data[at as usize..at as usize + 100_000]);
        assert_eq!(
            reader
                .read(std::slice::from_ref(&chunk), 3, 5)
                .await
                .unwrap(),
            &data[3..8]
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "the decoded file has no name"
        );

        // A digest that does not match fails the read; so does a chunk past the disk bound.
        let mut wrong = chunk.clone();
        wrong.digest = Some(crate::digest::sha256(b"other"));
        let reader = Reader::new(blob.clone(), Codec::Gzip, 0).spill_to(spill.clone());
        let err = reader.read(&[wrong], 0, 10).await.unwrap_err();
        assert!(matches!(err, Error::Digest { .. }), "{err}");
        let small = Spill {
            max: 1 << 20,
            ..spill
        };
        let reader = Reader::new(blob, Codec::Gzip, 0).spill_to(small);
        let err = reader.read(&[chunk], 0, 10).await.unwrap_err();
        assert!(err.to_string().contains("may hold"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A chunk whose compressed bytes arrived damaged (and were cached so) is fetched once
    /// more; a second failure is the read's.
    #[tokio::test]
    async fn a_chunk_that_fails_its_digest_is_fetched_again_once() {
        use crate::blob::cache::{BlockCache, ReadAhead};
        use crate::blob::damaging::Damaging;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let member = gzip(&data);
        let chunk = one_chunk(&data, &member);
        let ra = ReadAhead {
            bytes: 1 << 20,
            after: 1 << 40, // no read-ahead: it would take the damaged answers
        };
        for (damaged, mended) in [(1, true), (2, false)] {
            let src = Damaging::new(member.clone(), damaged);
            let cache = BlockCache::new(4096, 4096, 64 << 20, None, ra);
            let reader = Reader::new(cache.wrap(src.clone()), Codec::Gzip, 0);
            let got = reader.read(std::slice::from_ref(&chunk), 0, 300_000).await;
            match mended {
                true => assert!(got.unwrap() == data),
                false => assert!(got.unwrap_err().is_check()),
            }
            assert_eq!(src.reads.load(std::sync::atomic::Ordering::SeqCst), 2);
        }
    }

    #[test]
    fn decoded_files_are_dropped_oldest_first_past_the_bound() {
        let mut s = Spilled::default();
        for k in 0..3u64 {
            s.cells.insert((k, 0), Decoded::default());
            s.decoded((k, 0), 100, 250);
        }
        assert_eq!(s.bytes, 200);
        assert!(!s.cells.contains_key(&(0, 0)) && s.cells.contains_key(&(2, 0)));
        // One chunk over the bound alone is still kept: it is being read.
        s.cells.insert((9, 0), Decoded::default());
        s.decoded((9, 0), 1000, 250);
        assert_eq!((s.bytes, s.cells.len()), (1000, 1));
    }

    #[tokio::test]
    async fn zero_chunks_are_served_without_reading_the_blob() {
        // The blob holds no valid frame at all: only a zero chunk can be served from it.
        let blob: Blob = Arc::new(MemBlob::new("z", vec![0xEEu8; 100]));
        let hole = vec![0u8; 3 << 20];
        let mut chunk = one_chunk(&hole, &[0u8; 10]);
        chunk.zeros = true;
        let reader = Reader::new(blob.clone(), Codec::Zstd, 0);
        let got = reader.read(&[chunk.clone()], 1 << 20, 4096).await.unwrap();
        assert!(got.len() == 4096 && got.iter().all(|&b| b == 0));

        chunk.digest = Some(crate::digest::sha256(b"not zeros"));
        let reader = Reader::new(blob, Codec::Zstd, 0);
        let err = reader.read(&[chunk], 0, 1).await.unwrap_err();
        assert!(matches!(err, Error::Digest { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_huge_claimed_extent_reads_only_what_the_chunk_can_take() {
        struct Largest(MemBlob, std::sync::atomic::AtomicU64);
        #[async_trait::async_trait]
        impl crate::blob::BlobSource for Largest {
            fn id(&self) -> &str {
                self.0.id()
            }
            fn size(&self) -> u64 {
                self.0.size()
            }
            async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
                self.1.fetch_max(len, std::sync::atomic::Ordering::Relaxed);
                self.0.read_at(offset, len).await
            }
        }
        impl crate::blob::ReadHints for Largest {}
        let data = b"hello".to_vec();
        let mut blob = gzip(&data);
        let mut chunk = one_chunk(&data, &blob);
        blob.resize(64 << 20, 0);
        chunk.end = blob.len() as u64;
        let src = Arc::new(Largest(MemBlob::new("x", blob), Default::default()));
        let reader = Reader::new(src.clone(), Codec::Gzip, 0);
        assert_eq!(reader.read(&[chunk], 0, 5).await.unwrap(), &data[..]);
        let largest = src.1.load(std::sync::atomic::Ordering::Relaxed);
        assert!(largest <= 300 << 10, "read {largest} bytes");
    }
}

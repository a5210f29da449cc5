//! Reading files stored as independently compressed chunks: eStargz (gzip members) and
//! zstd:chunked (zstd frames). A file's [`Chunk`]s say where each piece's compressed bytes
//! start and end in the blob; a read fetches only the chunks it touches, decodes them, and
//! checks each one's digest before a byte is returned. A small cache of decoded chunks
//! (bounded in bytes) lets sequential kernel reads inside one chunk decode it once.
//!
//! A chunk is decoded whole (its digest covers all of it), so its size bounds the memory one
//! read takes: chunks larger than [`MAX_CHUNK`] are refused. Encoders write 4 MiB or smaller
//! (eStargz's default; `ocifs convert --chunk-size` keeps to the limit); a TOC that says more
//! is refused at read time with an error naming the chunk, never by exhausting memory.

use crate::blob::{Blob, BytesLru};
use crate::error::{Error, Result};
use bytes::{Bytes, BytesMut};
use std::io::Read;
use std::sync::Mutex;

/// The largest chunk decoded (its uncompressed length).
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
}

/// Reads chunks of one blob.
pub struct Reader {
    blob: Blob,
    codec: Codec,
    /// Decoded chunks by (compressed start, offset inside the member).
    decoded: Mutex<BytesLru<(u64, u64)>>,
    /// Compressed bytes at the start of the blob worth prefetching (eStargz: everything before
    /// `.prefetch.landmark`, the prioritized files).
    pub prefetch_len: u64,
}

impl Reader {
    /// A reader of `blob` (normally block-cached) whose chunks are `codec`-compressed.
    pub fn new(blob: Blob, codec: Codec, prefetch_len: u64) -> Reader {
        Reader {
            blob,
            codec,
            decoded: Mutex::new(BytesLru::new(DECODED_BYTES)),
            prefetch_len,
        }
    }

    /// Fetches the first `prefetch_len` compressed bytes into the block cache in large
    /// requests, adding each piece's size to `done`.
    pub async fn prefetch(&self, done: &std::sync::atomic::AtomicU64) -> Result<()> {
        // One streamed range, front first: the files needed first arrive first.
        self.blob.prefetch(0, self.prefetch_len).await?;
        done.fetch_add(self.prefetch_len, std::sync::atomic::Ordering::Relaxed);
        Ok(())
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

    /// [`ChunkedReader::read`] without waiting behind fetches under way (see
    /// [`crate::blob::BlobSource::read_now`]).
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
            let data = self.chunk(c, until, now).await?;
            let s = offset.max(c.file_offset) - c.file_offset;
            let e = end.min(c.file_offset + c.len) - c.file_offset;
            out.extend_from_slice(&data[s as usize..e as usize]);
        }
        Ok(out.freeze())
    }

    /// One chunk, decoded and checked against its digest (its compressed bytes read `now`
    /// if asked, see [`crate::blob::BlobSource::read_now`]).
    async fn chunk(&self, c: &Chunk, until: u64, now: bool) -> Result<Bytes> {
        let key = (c.start, c.inner);
        if let Some(b) = self.decoded.lock().unwrap().get(&key) {
            return Ok(b);
        }
        let what = || format!("chunk at {} of {}", c.start, self.blob.id());
        if c.len > MAX_CHUNK {
            return Err(Error::format(
                what(),
                format!(
                    "{} bytes long, more than the {MAX_CHUNK} a chunk may be",
                    c.len
                ),
            ));
        }
        if c.end <= c.start || c.end > self.blob.size() {
            return Err(Error::format(
                what(),
                format!("bad extent {}..{}", c.start, c.end),
            ));
        }
        let compressed = if now {
            self.blob.read_now(c.start, c.end - c.start).await?
        } else {
            self.blob
                .read_within(c.start, c.end - c.start, until)
                .await?
        };
        let (inner, len, codec) = (c.inner, c.len, self.codec);
        let data = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut dec: Box<dyn Read> = match codec {
                Codec::Gzip => Box::new(flate2::read::GzDecoder::new(&compressed[..])),
                Codec::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(&compressed[..])?),
            };
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
        let data = Bytes::from(data);
        self.decoded.lock().unwrap().put(key, data.clone());
        Ok(data)
    }
}

/// The file metadata that eStargz and zstd:chunked TOC entries spell the same way.
pub struct TocMeta<'a> {
    pub kind: &'a str,
    pub mode: i64,
    pub uid: u32,
    pub gid: u32,
    pub modtime: &'a str,
    pub rdev: (u32, u32),
    pub link_name: &'a str,
    pub xattrs: &'a std::collections::HashMap<String, String>,
}

impl TocMeta<'_> {
    /// The [`Entry`] (without size or data) for `path`; `what` names the layer in errors.
    pub fn entry(&self, path: String, what: &str) -> Result<super::Entry> {
        use super::Kind;
        use base64::Engine;
        let kind = match self.kind {
            "dir" => Kind::Dir,
            "reg" => Kind::File,
            "symlink" => Kind::Symlink,
            "hardlink" => Kind::Hardlink,
            "char" => Kind::Char,
            "block" => Kind::Block,
            "fifo" => Kind::Fifo,
            other => {
                return Err(Error::format(
                    what,
                    format!("entry {path:?} has unknown type {other:?}"),
                ));
            }
        };
        let mut e = super::Entry::new(path, kind);
        e.mode = (self.mode & 0o7777) as u32;
        e.uid = self.uid;
        e.gid = self.gid;
        e.mtime = (super::estargz::parse_rfc3339(self.modtime).unwrap_or(0), 0);
        e.rdev = self.rdev;
        if matches!(kind, Kind::Symlink | Kind::Hardlink) {
            e.link = Some(self.link_name.to_string());
        }
        for (k, v) in self.xattrs {
            let val = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|err| Error::format(what, format!("xattr {k} of {:?}: {err}", e.path)))?;
            e.xattrs.push((k.clone(), val));
        }
        e.xattrs.sort();
        Ok(e)
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
    async fn decoded_chunks_are_bounded_in_bytes_and_oversized_ones_refused() {
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

        // A TOC claiming a chunk past the limit gets an error naming it, not an allocation.
        let mut huge = chunks[0].clone();
        huge.len = MAX_CHUNK + 1;
        let err = reader.read(&[huge], 0, 4096).await.unwrap_err().to_string();
        assert!(err.contains("more than"), "{err}");
    }
}

//! The byte seam: [`BlobSource`] is all that format parsers and readers ever see of the
//! network or disk, and [`ReadHints`] what a reader may tell the decorators in between. Implementations: a registry blob over HTTP Range ([`crate::registry`]),
//! a local file ([`FileBlob`]), bytes in memory ([`MemBlob`]); the block cache
//! ([`cache::CachedBlob`]) wraps any of them behind the same trait.

mod bytes_lru;
pub mod cache;
pub mod counting;
#[cfg(test)]
pub(crate) mod damaging;
pub mod disk;
mod flight;

pub use bytes_lru::BytesLru;
pub use flight::Flights;

use crate::error::{Error, Result};
use async_trait::async_trait;
use bytes::Bytes;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Random access to one immutable blob: what every source must answer.
#[async_trait]
pub trait BlobSource: Send + Sync {
    /// A stable identity for caching: the blob's digest, or a derived name.
    fn id(&self) -> &str;
    /// Total size in bytes.
    fn size(&self) -> u64;
    /// Exactly `len` bytes at `offset` (clamped to the end of the blob).
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes>;
    /// The same bytes handed to `sink` in order as they arrive, so a caller can use the
    /// front of a long read before its end has come (network sources stream; the default
    /// delivers one piece).
    async fn stream_at(
        &self,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        sink(self.read_at(offset, len).await?);
        Ok(())
    }
}

/// What a layer reader may tell a blob beyond what to read, and ask of it. Every method has
/// a default that ignores the hint; the decorators that act on them override them: the block
/// cache ([`cache::CachedBlob`]), a gzip layer's decoded view (`CheckpointBlob`), a local
/// file ([`FileBlob`]).
#[async_trait]
pub trait ReadHints: BlobSource {
    /// `read_at` for a reader moving through a range that ends at `until` (the end of the
    /// file being read): read-ahead, where a source does it, stays before `until`, and what a
    /// miss fetches past `until` is a guess (the block cache limits how many are under way),
    /// since what lies beyond belongs to other files.
    async fn read_within(&self, offset: u64, len: u64, _until: u64) -> Result<Bytes> {
        self.read_at(offset, len).await
    }
    /// `read_at` for a reader that must not wait behind fetches already under way: a cache
    /// serves what it holds and fetches the rest itself, even blocks another request is still
    /// bringing (their bytes then come twice). For the few small reads whose answer decides
    /// what to fetch next (where a program's dynamic section says its libraries are).
    async fn read_now(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.read_at(offset, len).await
    }
    /// Makes later reads of `[offset, offset+len)` fast, front first (the block cache streams
    /// the range in; the default reads it and drops the bytes).
    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.read_at(offset, len).await.map(drop)
    }
    /// For a view decoded from another blob (a gzip layer read through its checkpoint
    /// index): that blob and the range of it that decoding `[offset, offset+len)` needs, so a
    /// planned prefetch can fetch many ranges' compressed bytes, merged, without decoding
    /// them. `None` (the default): the bytes are this blob's own.
    fn source_range(&self, _offset: u64, _len: u64) -> Option<(Blob, u64, u64)> {
        None
    }
    /// Whether every byte of `[offset, offset+len)` is held or already on its way (a cache's
    /// blocks in memory or on disk, or being fetched), so reading it waits for no new request.
    /// The default: no.
    fn at_hand(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// Whether every byte lies in a local file for as long as this blob lives (nothing to
    /// fetch, decode or evict): a local copy of it would only duplicate it. The default: no.
    fn is_local_file(&self) -> bool {
        false
    }
    /// Drops what this blob holds in memory to make later reads fast (decoded spans, cached
    /// blocks), for a blob no one reads any more: its layer is served from a local copy
    /// (see `serve::local`). Later reads still work, fetching or decoding again.
    fn release_memory(&self) {}
    /// Drops whatever this blob keeps of `[offset, offset+len)`, in memory and on disk,
    /// because bytes read from there failed a check (a chunk's, span's or blob's digest):
    /// the next read fetches them again instead of failing the same way for good. The
    /// default keeps nothing; decorators pass it on to what they wrap.
    fn discard(&self, _offset: u64, _len: u64) {}
}

/// A shared, dynamically typed blob, as layers read it.
pub type Blob = Arc<dyn ReadHints>;

/// Runs `attempt` (which reads `range` of `blob` and checks what it decodes); when the check
/// fails, drops the range's cached bytes and runs it once more, so bytes that arrived
/// damaged are fetched again instead of failing every later read. A second failure is
/// logged and returned. Errors that are not checks (the network) are returned at once.
pub async fn healing<T, F, Fut>(
    blob: &Blob,
    range: (u64, u64),
    what: &str,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    match attempt().await {
        Err(e) if e.is_check() => {
            tracing::warn!("{what}: {e}; dropping its cached bytes and fetching them again");
            blob.discard(range.0, range.1);
            attempt().await.inspect_err(|e| {
                if e.is_check() {
                    tracing::error!("{what}: failed its check again after a fresh fetch: {e}");
                }
            })
        }
        done => done,
    }
}

/// The byte range `[offset, offset+len)` clamped to a blob of `size`, or an error past the end.
pub fn clamp(id: &str, size: u64, offset: u64, len: u64) -> Result<u64> {
    if offset > size {
        return Err(Error::format(
            format!("read of blob {id}"),
            format!("offset {offset} is past its end ({size})"),
        ));
    }
    Ok(len.min(size - offset))
}

/// How much of a blob's end to read speculatively when its descriptor announces a TOC
/// (eStargz, zstd:chunked annotations): footer and, usually, the whole TOC in one request.
pub const TAIL_READ: u64 = 512 * 1024;
/// How much to read when nothing announces a TOC: enough for a footer (and a small TOC); most
/// such layers are plain gzip or zstd, whose tail is not needed at all.
pub const SMALL_TAIL_READ: u64 = 64 * 1024;

/// Reads the last `len` bytes of `blob`; returns them with their start offset.
pub async fn read_tail(blob: &Blob, len: u64) -> Result<(u64, Bytes)> {
    let size = blob.size();
    let start = size.saturating_sub(len);
    Ok((start, blob.read_at(start, size - start).await?))
}

/// The most ranges [`spread`] cuts a read into.
pub const SPREAD_PIECES: u64 = 4;
/// The smallest range [`spread`] cuts, and the boundaries it cuts on: the block cache's
/// default blocks.
const SPREAD_MIN: u64 = crate::config::DEFAULT_BLOCK_SIZE;

/// `[offset, offset+len)` cut into at most `most` ranges (and at most [`SPREAD_PIECES`]) of
/// 64 KiB or more, on 64 KiB boundaries, to be asked for at once.
///
/// Why: a connection's window opens slowly (TCP slow start), so a range of a few hundred KiB
/// on one connection takes a round trip for every doubling, and quarters on warm connections
/// each need two doublings fewer. The first range of a blob is also its probe at the host
/// (`registry::pull`): at a mirror the others wait for it and start a round trip later; at
/// the image's own registry they go out beside it. (While they waited: a layer's 512 KiB
/// tail made eStargz ready 15-20 ms sooner on the packet-level link, and a published index
/// read so was 90 ms later; beside the probe, that index makes gzip ready ~67 ms sooner.)
/// Over HTTP/2 the ranges share one connection (measured: no gain, no loss beyond the
/// noise).
pub fn spread(offset: u64, len: u64, most: u64) -> Vec<(u64, u64)> {
    let most = most.clamp(1, SPREAD_PIECES);
    let end = offset.saturating_add(len);
    let piece = (end - offset)
        .div_ceil(most)
        .div_ceil(SPREAD_MIN)
        .saturating_mul(SPREAD_MIN);
    let mut pieces = Vec::new();
    let mut at = offset;
    while at < end {
        // A cut on a boundary at least a smallest piece on, unless what would be left is
        // less than a smallest piece.
        let mut cut = at.saturating_add(piece) / SPREAD_MIN * SPREAD_MIN;
        if cut < at.saturating_add(SPREAD_MIN) {
            cut = cut.saturating_add(SPREAD_MIN);
        }
        let last = pieces.len() as u64 + 1 == most || cut.saturating_add(SPREAD_MIN) > end;
        let next = if last { end } else { cut };
        pieces.push((at, next - at));
        at = next;
    }
    pieces
}

/// Brings `[offset, offset+len)` of `blob`, a block cache's, in as the ranges of [`spread`]
/// (at most `most`) at once. (Through the cache's prefetch, which fetches each range's
/// blocks and no more; a blob without a cache would read each range twice.) On the first
/// failure the other ranges are dropped: a later read of their blocks fetches them itself.
pub async fn prefetch_spread(blob: &Blob, offset: u64, len: u64, most: u64) -> Result<()> {
    let len = clamp(blob.id(), blob.size(), offset, len)?;
    let pieces = spread(offset, len, most);
    futures::future::try_join_all(pieces.into_iter().map(|(o, l)| blob.prefetch(o, l))).await?;
    Ok(())
}

/// All of `blob`, front to back, in pieces of `piece` bytes (for a pass that reads a layer
/// once: indexing, unpacking). Where the blob is not at hand, one streamed request brings it
/// in from the front (the block cache's prefetch) while the pieces are read as they arrive:
/// the link never idles between one piece's request and the next, and a new connection's
/// window opens once. A failed prefetch only leaves the pieces to fetch themselves.
pub fn read_in_order(
    blob: Blob,
    piece: u64,
) -> impl futures::Stream<Item = Result<Bytes>> + Send + 'static {
    use futures::StreamExt;
    let size = blob.size();
    let prefetch = (!blob.at_hand(0, size)).then(|| {
        let blob = blob.clone();
        crate::task::TaskGuard::spawn(async move {
            if let Err(e) = blob.prefetch(0, size).await {
                tracing::debug!(
                    "streaming {} in failed: {e}; reading it piece by piece",
                    blob.id()
                );
            }
        })
    });
    futures::stream::iter((0..size).step_by(piece.max(1) as usize))
        .map(move |at| {
            // The stream owns the prefetch: dropping it cancels the request.
            let _owned = &prefetch;
            let blob = blob.clone();
            async move { blob.read_at(at, piece.min(size - at)).await }
        })
        .buffered(2)
}

/// A blob held in memory (tests, small fetched objects).
pub struct MemBlob {
    id: String,
    data: Bytes,
}

impl MemBlob {
    /// Wraps `data` under the identity `id`.
    pub fn new(id: impl Into<String>, data: impl Into<Bytes>) -> Self {
        MemBlob {
            id: id.into(),
            data: data.into(),
        }
    }
}

#[async_trait]
impl BlobSource for MemBlob {
    fn id(&self) -> &str {
        &self.id
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        let len = clamp(&self.id, self.size(), offset, len)?;
        Ok(self.data.slice(offset as usize..(offset + len) as usize))
    }
}

impl ReadHints for MemBlob {}

/// A blob in a local file (OCI layouts, uncompressed tars kept in the cache directory).
pub struct FileBlob {
    id: String,
    file: Arc<std::fs::File>,
    size: u64,
}

impl FileBlob {
    /// Serves an open `file` under the identity `id`.
    pub fn from_file(id: impl Into<String>, file: std::fs::File) -> Result<Self> {
        let size = file.metadata()?.len();
        Ok(FileBlob {
            id: id.into(),
            file: Arc::new(file),
            size,
        })
    }

    /// Opens `path` under the identity `id`.
    pub fn open(id: impl Into<String>, path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileBlob {
            id: id.into(),
            file: Arc::new(file),
            size,
        })
    }
}

#[async_trait]
impl BlobSource for FileBlob {
    fn id(&self) -> &str {
        &self.id
    }
    fn size(&self) -> u64 {
        self.size
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        let len = clamp(&self.id, self.size, offset, len)?;
        read_file_at(self.file.clone(), offset, len).await
    }
}

#[async_trait]
impl ReadHints for FileBlob {
    /// A local file holds every byte: reading any range waits for no request.
    fn at_hand(&self, offset: u64, len: u64) -> bool {
        clamp(&self.id, self.size, offset, len).is_ok()
    }
    fn is_local_file(&self) -> bool {
        true
    }
    /// Asks the kernel to read the range ahead into the page cache (it returns at once),
    /// instead of reading it here only to drop it.
    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        let len = clamp(&self.id, self.size, offset, len)?;
        let file = self.file.clone();
        // On a blocking thread: starting the reads of a large range may wait for the disk.
        let advise = move || {
            use std::os::fd::AsRawFd;
            // SAFETY: advice on an open descriptor; no memory is passed.
            unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    offset as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
        };
        tokio::task::spawn_blocking(advise)
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))
    }
}

/// Exactly `len` bytes at `offset` of a local file, read on a blocking thread.
pub async fn read_file_at(file: Arc<std::fs::File>, offset: u64, len: u64) -> Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(|e| Error::Io(std::io::Error::other(e)))?
}

#[cfg(test)]
mod spread_tests {
    use super::*;

    /// Every cut covers the range exactly, in order, within the piece limit, on 64 KiB
    /// boundaries, none smaller than 64 KiB unless the range is; nothing overflows.
    #[test]
    fn spread_covers_the_range_in_at_most_four_aligned_pieces() {
        let cases = [
            (0, 1),
            (0, 64 << 10),
            (100, (64 << 10) + 5),
            (65535, 200 << 10),
            (371_814, 242_090),
            (8_215_751, 524_288),
            (60_096_512, 584_973),
            (32 << 10, 4 * (128 << 10) + (64 << 10)),
            (12_345, 10 << 20),
            (u64::MAX - 100, 100),
            (u64::MAX - (1 << 20), 1 << 20),
        ];
        for (offset, len) in cases {
            for most in [1, 2, 3, 4, 9] {
                let pieces = spread(offset, len, most);
                assert!(!pieces.is_empty());
                assert!(pieces.len() as u64 <= most.min(SPREAD_PIECES));
                let mut at = offset;
                for (i, &(o, l)) in pieces.iter().enumerate() {
                    let case = format!("{offset}+{len} in {most}: piece {i} ({o}+{l})");
                    assert_eq!(o, at, "{case} starts where the last ended");
                    assert!(l >= SPREAD_MIN.min(len), "{case} is too small");
                    if i > 0 {
                        assert_eq!(o % SPREAD_MIN, 0, "{case} is not on a boundary");
                    }
                    at += l;
                }
                assert_eq!(at, offset + len, "{offset}+{len} in {most}: the end");
            }
        }
        assert!(spread(5, 0, 4).is_empty());
        assert_eq!(spread(8_215_751, 524_288, 4).len(), 4);
        assert_eq!(spread(8_215_751, 524_288, 2).len(), 2);
        assert_eq!(spread(0, 100 << 10, 4).len(), 1);
    }

    /// A tail brought in through the block cache as spread ranges is one request per
    /// range, and reading it afterwards asks for nothing more.
    #[tokio::test]
    async fn a_spread_prefetch_asks_once_per_range_and_the_read_after_it_never() {
        let data: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let counted = Arc::new(counting::CountingBlob::new(Arc::new(MemBlob::new(
            "sha256:m",
            data.clone(),
        ))));
        let ra = cache::ReadAhead {
            bytes: 4 << 20,
            after: 1 << 20,
        };
        let cache = cache::BlockCache::new(64 << 10, 2 << 20, 16 << 20, None, ra);
        let blob = cache.wrap(counted.clone());
        let (start, len) = (700_000 - 524_288, 524_288);
        prefetch_spread(&blob, start, len, 4).await.unwrap();
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(
            counted.requests.load(Relaxed),
            spread(start, len, 4).len() as u64
        );
        assert_eq!(counted.requests.load(Relaxed), 4);
        let (at, tail) = read_tail(&blob, len).await.unwrap();
        assert_eq!((at, &tail[..]), (start, &data[start as usize..]));
        assert_eq!(
            counted.requests.load(Relaxed),
            4,
            "the read waited for no request"
        );
    }
}

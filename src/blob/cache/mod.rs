//! The block cache: a [`BlobSource`](super::BlobSource) decorator keyed by (blob id, block number).
//!
//! Blobs are named by digest and immutable, so a cached block is never invalidated. One home
//! per job:
//! - `store`: where blocks live (memory LRU bounded in bytes, optional directory kept
//!   across remounts);
//! - `gates`: single flight, a block several readers want at once is fetched once;
//! - `guesses`: how far a fetch runs past what is being read (the guess budget) and
//!   read-ahead for streaks of sequential reads;
//! - `blob`: [`CachedBlob`], the per-blob view readers hold;
//! - this module: [`BlockCache`], which turns a miss into one request.
//!
//! A miss fetches a *stretch*: the missing block and the blocks after it that nobody has or
//! is fetching, up to the fetch size, in one streamed request. Each block is handed out as
//! soon as its bytes have arrived, so the reader that missed waits one round trip plus one
//! block, not the whole stretch, while its neighbours keep arriving for the reads that usually
//! follow (small files read one after another, a binary's pages). On a link where a round trip
//! costs more than a block, this is what keeps a chain of dependent reads short.

mod blob;
mod gates;
mod guesses;
mod store;

pub use blob::CachedBlob;

use super::{Blob, clamp};
use crate::error::{Error, Result};
use bytes::{Bytes, BytesMut};
use gates::{Claim, Gates};
use guesses::Guesses;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use store::Store;

/// A block's name: (blob id, block index).
type Key = (String, u64);

/// Read-ahead of sequential readers (its values are speculation's, see
/// [`crate::speculate::SpeculateConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct ReadAhead {
    /// How far ahead of a sequential reader blocks are fetched.
    pub bytes: u64,
    /// How long a streak of sequential reads must be before read-ahead starts.
    pub after: u64,
}

/// Counters an experimenter reads to explain a run.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Blocks served from memory.
    pub mem_hits: AtomicU64,
    /// Blocks served from the cache directory.
    pub disk_hits: AtomicU64,
    /// Blocks fetched from the inner source.
    pub misses: AtomicU64,
    /// Bytes fetched from the inner source.
    pub fetched_bytes: AtomicU64,
    /// Of those, the blocks a waiting read asked for, up to the end of the file it reads:
    /// what the workload needed. The rest was fetched ahead of any read (guesses past the
    /// file, read-ahead, prefetch, speculation, verification, local copies).
    pub demand_bytes: AtomicU64,
}

/// Shared block storage for every blob of a mount.
pub struct BlockCache {
    block_size: u64,
    /// Blocks fetched ahead of a sequential reader.
    readahead: u64,
    /// Block boundaries a streak crosses before read-ahead starts.
    sequential: u64,
    /// Most blocks one miss fetches (its stretch).
    stretch_blocks: u64,
    store: Store,
    gates: Gates,
    /// Blocks fetched past the end of the file being read, not arrived yet (see `guesses`).
    guesses: Guesses,
    /// Set while a planned prefetch brings what readers need: read-ahead would only fetch
    /// past it (in a profile-ordered eStargz layer, files read one after another look
    /// sequential up to the landmark, and what follows it is what the workload skips).
    readahead_paused: AtomicBool,
    /// Hit and miss counters.
    pub stats: CacheStats,
}

impl BlockCache {
    /// A cache of `capacity` bytes in memory, in blocks of `block_size`, fetching up to
    /// `fetch_size` bytes per miss, optionally persisted under `dir`, reading `ahead` of
    /// sequential readers.
    pub fn new(
        block_size: u64,
        fetch_size: u64,
        capacity: u64,
        dir: Option<PathBuf>,
        ahead: ReadAhead,
    ) -> Arc<Self> {
        let block_size = block_size.max(4096);
        let stretch_blocks = (fetch_size / block_size).clamp(1, 64);
        Arc::new(BlockCache {
            block_size,
            readahead: (ahead.bytes / block_size).clamp(1, 64),
            sequential: (ahead.after / block_size).max(2),
            stretch_blocks,
            store: Store::new(block_size, capacity, dir),
            gates: Gates::default(),
            guesses: Guesses::new(stretch_blocks.saturating_sub(1) * block_size),
            readahead_paused: Default::default(),
            stats: CacheStats::default(),
        })
    }

    /// Pauses (or resumes) read-ahead for every blob of this cache.
    pub fn pause_readahead(&self, paused: bool) {
        self.readahead_paused.store(paused, Ordering::Relaxed);
    }

    /// Wraps `inner` so its reads go through this cache.
    pub fn wrap(self: &Arc<Self>, inner: Blob) -> Blob {
        Arc::new(CachedBlob::new(inner, self.clone()))
    }

    fn key(blob: &Blob, index: u64) -> Key {
        (blob.id().to_string(), index)
    }

    /// Whether block `index` of `blob` is in memory, on disk or being fetched.
    fn at_hand(&self, blob: &Blob, index: u64) -> bool {
        let key = Self::key(blob, index);
        self.store.in_memory(&key)
            || self.gates.in_flight(&key)
            || self
                .store
                .on_disk_whole(&key, self.block_len(blob.size(), index))
    }

    /// Length of block `index` of a blob of `size` bytes.
    fn block_len(&self, size: u64, index: u64) -> u64 {
        self.block_size.min(size - index * self.block_size)
    }

    /// Block `index` of `blob`, fetched on a miss with a stretch after it; blocks from
    /// `guess_from` on are past the file being read (see [`BlockCache::stretch_end`]). The
    /// caller needs the block's first `need` bytes: a miss answers with them as soon as they
    /// have arrived (the block is kept once it is whole), so a small file at a block's front
    /// comes with a new connection's first flights, not after the whole block.
    async fn block(
        self: &Arc<Self>,
        blob: &Blob,
        index: u64,
        guess_from: u64,
        need: u64,
    ) -> Result<Bytes> {
        let key = Self::key(blob, index);
        if let Some(b) = self.store.memory(&key) {
            self.stats.mem_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        let guard = self.gates.wait(&key).await;
        // Second look: another reader or a stretch may have stored it while we waited.
        if let Some(b) = self.store.memory(&key) {
            self.stats.mem_hits.fetch_add(1, Ordering::Relaxed);
            self.gates.release(&key, guard);
            return Ok(b);
        }
        if let Some(data) = self
            .store
            .disk(&key, self.block_len(blob.size(), index))
            .await
        {
            self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
            self.store.remember(key.clone(), data.clone());
            self.gates.release(&key, guard);
            return Ok(data);
        }
        // The network: this block and the following ones nobody has or is fetching, as far as
        // the stretch goes.
        let mut stretch = vec![(key, guard)];
        let guess_from = guess_from.max(index + 1);
        for i in index + 1..self.stretch_end(blob, index, guess_from) {
            match self.try_claim(&Self::key(blob, i)) {
                Some(claim) => stretch.push(claim),
                None => break,
            }
        }
        self.count_guesses(blob, &stretch, guess_from);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(self.clone().fetch_stretch(
            blob.clone(),
            stretch,
            guess_from,
            Some((tx, need)),
        ));
        rx.await
            .unwrap_or_else(|_| Err(Error::Io(std::io::Error::other("block fetch ended early"))))
    }

    /// Brings `[offset, offset+len)` of `blob` into the cache, front first: the blocks nobody
    /// has or is fetching are streamed in as few requests as the cached ones in between allow.
    /// Returns once the range is in (or its fetches failed), including the blocks another
    /// fetch was already bringing: a planned prefetch that finds its range under way (an
    /// announced front fetched at open) lasts until it has arrived.
    async fn prefetch(self: &Arc<Self>, blob: &Blob, offset: u64, len: u64) -> Result<()> {
        let len = clamp(blob.id(), blob.size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let bs = self.block_size;
        let (stretches, others) = self.claim(blob, offset / bs, (offset + len - 1) / bs);
        let fetches = stretches
            .into_iter()
            .map(|s| self.clone().fetch_stretch(blob.clone(), s, u64::MAX, None));
        let fetched: Result<()> = futures::future::join_all(fetches)
            .await
            .into_iter()
            .collect();
        for key in others {
            let guard = self.gates.wait(&key).await;
            self.gates.release(&key, guard);
        }
        fetched
    }

    /// Claims the blocks `first..=last` that nobody has or is fetching (holding their gates),
    /// grouped into stretches of consecutive blocks; also the blocks someone else is fetching.
    fn claim(&self, blob: &Blob, first: u64, last: u64) -> (Vec<Vec<Claim>>, Vec<Key>) {
        let mut stretches = Vec::new();
        let mut stretch = Vec::new();
        let mut others = Vec::new();
        for i in first..=last {
            let key = Self::key(blob, i);
            match self.try_claim(&key) {
                Some(claim) => stretch.push(claim),
                None => {
                    if self.gates.in_flight(&key) {
                        others.push(key);
                    }
                    if !stretch.is_empty() {
                        stretches.push(std::mem::take(&mut stretch));
                    }
                }
            }
        }
        if !stretch.is_empty() {
            stretches.push(stretch);
        }
        (stretches, others)
    }

    /// Block `k`'s gate if nobody has the block (memory or disk) or is fetching it.
    fn try_claim(&self, k: &Key) -> Option<Claim> {
        if self.store.on_disk(k) || self.store.in_memory(k) {
            return None;
        }
        self.gates.try_claim(k).map(|g| (k.clone(), g))
    }

    /// Where the stretch of a miss at block `first` ends (exclusive): a stretch's length on,
    /// but past `guess_from` (the first block after the file being read) only as far as the
    /// guess budget has room.
    fn stretch_end(&self, blob: &Blob, first: u64, guess_from: u64) -> u64 {
        let full = (first + self.stretch_blocks).min(blob.size().div_ceil(self.block_size));
        let room = self.guesses.room() / self.block_size;
        guess_from.saturating_add(room).min(full)
    }

    /// Counts the blocks of `stretch` from `guess_from` on as guesses under way.
    fn count_guesses(&self, blob: &Blob, stretch: &[Claim], guess_from: u64) {
        let bytes = stretch
            .iter()
            .filter(|(k, _)| k.1 >= guess_from)
            .map(|(k, _)| self.block_len(blob.size(), k.1))
            .sum();
        self.guesses.start(bytes);
    }

    /// Fetches a stretch of consecutive blocks in one streamed request, storing and releasing
    /// each as it completes; the first block (the one a reader is waiting for) goes to
    /// `first`, or as much of its front as the reader needs, as soon as that has arrived.
    /// Blocks from `guess_from` on were counted as guesses.
    async fn fetch_stretch(
        self: Arc<Self>,
        blob: Blob,
        stretch: Vec<Claim>,
        guess_from: u64,
        first: Option<(tokio::sync::oneshot::Sender<Result<Bytes>>, u64)>,
    ) -> Result<()> {
        let size = blob.size();
        let start = stretch[0].0.1 * self.block_size;
        let last = stretch[stretch.len() - 1].0.1;
        let end = start + (last - stretch[0].0.1) * self.block_size + self.block_len(size, last);
        tracing::debug!(
            "fetching {}+{} of {} ({}, guesses from {})",
            start,
            end - start,
            blob.id(),
            if first.is_some() { "miss" } else { "ahead" },
            guess_from.saturating_mul(self.block_size)
        );
        // Blocks before `guess_from` of a stretch a reader waits for are that reader's.
        let demand = first.is_some();
        let mut first = first;
        let settled = |key: &Key| {
            if key.1 >= guess_from {
                self.guesses.settle(self.block_len(size, key.1));
            }
        };
        let mut blocks = stretch.into_iter();
        let mut current = blocks.next();
        let mut pending = BytesMut::new();
        let mut sink = |piece: Bytes| {
            pending.extend_from_slice(&piece);
            // Until it is answered, `pending` holds the front of the reader's block.
            if first
                .as_ref()
                .is_some_and(|(_, need)| pending.len() as u64 >= *need)
            {
                let (tx, need) = first.take().unwrap();
                let _ = tx.send(Ok(Bytes::copy_from_slice(&pending[..need as usize])));
            }
            while let Some((key, _)) = &current {
                let want = self.block_len(size, key.1) as usize;
                if pending.len() < want {
                    break;
                }
                let data = pending.split_to(want).freeze();
                let (key, guard) = current.take().unwrap();
                self.keep(&key, data.clone(), demand && key.1 < guess_from);
                if let Some((tx, _)) = first.take() {
                    let _ = tx.send(Ok(data));
                }
                settled(&key);
                self.gates.release(&key, guard);
                current = blocks.next();
            }
        };
        let result = blob.stream_at(start, end - start, &mut sink).await;
        if let Err(e) = &result {
            tracing::warn!(
                "fetching {start}+{} of {} failed: {e}",
                end - start,
                blob.id()
            );
        }
        // The waiters of blocks not stored fetch them again themselves.
        for (key, guard) in current.into_iter().chain(blocks) {
            settled(&key);
            self.gates.release(&key, guard);
        }
        match (result, first.take()) {
            (Err(e), Some((tx, _))) => {
                let _ = tx.send(Err(e));
                Ok(())
            }
            (result, _) => result,
        }
    }

    /// Counts and keeps a fetched block (`demand`: a waiting read asked for it).
    fn keep(&self, key: &Key, data: Bytes, demand: bool) {
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let len = data.len() as u64;
        self.stats.fetched_bytes.fetch_add(len, Ordering::Relaxed);
        if demand {
            self.stats.demand_bytes.fetch_add(len, Ordering::Relaxed);
        }
        self.store.keep(key, data);
    }
}

/// Bytes `[offset, offset+len)` out of consecutive `blocks`, the first starting at `start`.
fn assemble(blocks: &[Bytes], start: u64, offset: u64, len: u64) -> Bytes {
    if let [b] = blocks {
        let s = (offset - start) as usize;
        return b.slice(s..s + len as usize);
    }
    let mut out = BytesMut::with_capacity(len as usize);
    let mut bstart = start;
    for b in blocks {
        let s = offset.max(bstart) - bstart;
        let e = (offset + len).min(bstart + b.len() as u64) - bstart;
        if s < e {
            out.extend_from_slice(&b[s as usize..e as usize]);
        }
        bstart += b.len() as u64;
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RA: ReadAhead = ReadAhead {
        bytes: 4 << 20,
        after: 1 << 20,
    };
    use crate::blob::{BlobSource, MemBlob, ReadHints};
    use async_trait::async_trait;
    use std::sync::Mutex;

    #[tokio::test]
    async fn releasing_a_blob_drops_its_blocks_from_memory_only() {
        let cache = BlockCache::new(4096, 4096, 1 << 20, None, RA);
        let a = cache.wrap(Arc::new(MemBlob::new("sha256:a", vec![1u8; 20_000])));
        let b = cache.wrap(Arc::new(MemBlob::new("sha256:b", vec![2u8; 20_000])));
        a.read_at(0, 20_000).await.unwrap();
        b.read_at(0, 8192).await.unwrap();
        let used = cache.store.used();
        assert_eq!(used, 20_000 + 8192);
        a.release_memory();
        assert_eq!(cache.store.used(), 8192);
        // Still readable (fetched again), and the other blob's blocks were kept.
        assert_eq!(a.read_at(4096, 4).await.unwrap(), &[1u8; 4][..]);
        let hits = cache.stats.mem_hits.load(Ordering::Relaxed);
        b.read_at(0, 4096).await.unwrap();
        assert_eq!(cache.stats.mem_hits.load(Ordering::Relaxed), hits + 1);
    }

    /// `ocifs stats` tells what reads waited for from what was fetched ahead of them.
    #[tokio::test]
    async fn bytes_a_read_waits_for_are_told_from_bytes_fetched_ahead() {
        const B: u64 = 4096;
        let cache = BlockCache::new(B, 4 * B, 1 << 20, None, RA);
        let blob = cache.wrap(Arc::new(MemBlob::new(
            "sha256:d",
            vec![5u8; 16 * B as usize],
        )));
        // A read of a file ending inside block 1: blocks 0 and 1 are the read's, the two
        // after them in the same request guesses past the file.
        blob.read_within(100, 200, 2 * B - 10).await.unwrap();
        let s = &cache.stats;
        assert_eq!(s.demand_bytes.load(Ordering::Relaxed), 2 * B);
        assert_eq!(s.fetched_bytes.load(Ordering::Relaxed), 4 * B);
        // A prefetch is ahead of any read; reading what it brought fetches nothing.
        blob.prefetch(8 * B, 2 * B).await.unwrap();
        blob.read_at(8 * B, 100).await.unwrap();
        assert_eq!(s.demand_bytes.load(Ordering::Relaxed), 2 * B);
        assert_eq!(s.fetched_bytes.load(Ordering::Relaxed), 6 * B);
    }

    /// What a gzip read asks before choosing where to resume: are these bytes here (memory
    /// or disk) or coming, so that reading them sends no request?
    #[tokio::test]
    async fn at_hand_means_in_memory_or_on_disk() {
        let dir = std::env::temp_dir().join(format!("ocifs-athand-{}", std::process::id()));
        let cache = BlockCache::new(4096, 4096, 1 << 20, Some(dir.clone()), RA);
        let blob = cache.wrap(Arc::new(MemBlob::new("sha256:h", vec![3u8; 20_000])));
        assert!(!blob.at_hand(0, 10));
        blob.read_at(4096, 4096).await.unwrap();
        assert!(blob.at_hand(4096, 4096) && blob.at_hand(5000, 100));
        assert!(!blob.at_hand(4000, 200), "the block before is not here");
        assert!(!blob.at_hand(8192, 1));
        // Dropped from memory, still on disk (once the background write has landed).
        blob.release_memory();
        for _ in 0..200 {
            if blob.at_hand(4096, 4096) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(blob.at_hand(4096, 4096));
        assert!(!blob.at_hand(0, 10));
        assert!(!blob.at_hand(19_000, 5000), "past the end");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn reads_across_blocks_match_source_and_hit_cache() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let cache = BlockCache::new(4096, 4096, 1 << 20, None, RA);
        let blob = cache.wrap(Arc::new(MemBlob::new("sha256:x", data.clone())));
        for (off, len) in [(0u64, 10u64), (4000, 9000), (99_990, 100), (12_288, 4096)] {
            let got = blob.read_at(off, len).await.unwrap();
            let end = ((off + len) as usize).min(data.len());
            assert_eq!(&got[..], &data[off as usize..end]);
        }
        let misses = cache.stats.misses.load(Ordering::Relaxed);
        blob.read_at(4000, 9000).await.unwrap();
        assert_eq!(cache.stats.misses.load(Ordering::Relaxed), misses);
    }

    /// 50 000 bytes (`i % modulo`) as blob `id`, and a cache of 4 KiB blocks for it.
    fn small_blocks(id: &str, modulo: u32) -> (Vec<u8>, Arc<BlockCache>, Blob) {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % modulo) as u8).collect();
        let cache = BlockCache::new(4096, 4096, 1 << 20, None, RA);
        let inner: Blob = Arc::new(MemBlob::new(id, data.clone()));
        (data, cache, inner)
    }

    #[tokio::test]
    async fn a_read_now_does_not_wait_behind_a_fetch_under_way() {
        let (data, cache, inner) = small_blocks("sha256:n", 253);
        let blob = cache.wrap(inner.clone());
        // Another request is bringing blocks 1..=3 and has not finished.
        let held = cache.claim(&inner, 1, 3).0;
        let patient = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            blob.read_at(5000, 6000),
        );
        assert!(patient.await.is_err(), "a plain read waits for the fetch");
        let now = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            blob.read_now(5000, 6000),
        );
        assert_eq!(&now.await.unwrap().unwrap()[..], &data[5000..11_000]);
        // What it fetched is kept: served from memory, even before the other fetch ends.
        let misses = cache.stats.misses.load(Ordering::Relaxed);
        assert_eq!(
            &blob.read_now(4096, 8192).await.unwrap()[..],
            &data[4096..12_288]
        );
        assert_eq!(cache.stats.misses.load(Ordering::Relaxed), misses);
        drop(held);
    }

    #[tokio::test]
    async fn blocks_of_a_cancelled_fetch_are_not_taken_for_blocks_under_way() {
        let (data, cache, inner) = small_blocks("sha256:c", 247);
        let held = cache.claim(&inner, 1, 3).0;
        assert!(cache.at_hand(&inner, 2), "claimed: under way");
        // The fetch's task is aborted: its gates drop without being released.
        drop(held);
        assert!(!cache.at_hand(&inner, 2));
        let blob = cache.wrap(inner.clone());
        assert_eq!(
            &blob.read_at(5000, 6000).await.unwrap()[..],
            &data[5000..11_000]
        );
        assert!(cache.at_hand(&inner, 2));
    }

    #[tokio::test]
    async fn a_prefetch_lasts_until_the_blocks_another_fetch_brings_are_in() {
        let (data, cache, inner) = small_blocks("sha256:p", 249);
        let blob = cache.wrap(inner.clone());
        // Another request is bringing blocks 1..=3 and has not finished.
        let held = cache.claim(&inner, 1, 3).0;
        let prefetch = blob.prefetch(0, 20_000);
        tokio::pin!(prefetch);
        let early = tokio::time::timeout(std::time::Duration::from_millis(100), &mut prefetch);
        assert!(early.await.is_err(), "the prefetch waits for blocks 1..=3");
        drop(held);
        tokio::time::timeout(std::time::Duration::from_secs(5), prefetch)
            .await
            .expect("the prefetch ends once the other fetch has")
            .unwrap();
        assert_eq!(&blob.read_at(0, 4096).await.unwrap()[..], &data[..4096]);
    }

    /// A blob that hands out the first block of a request at once and the rest only when
    /// `go` has a permit, and notes every request.
    struct Held {
        data: Bytes,
        requests: Mutex<Vec<(u64, u64)>>,
        go: tokio::sync::Semaphore,
    }

    #[async_trait]
    impl BlobSource for Held {
        fn id(&self) -> &str {
            "sha256:held"
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
            Ok(self.data.slice(offset as usize..(offset + len) as usize))
        }
        async fn stream_at(
            &self,
            offset: u64,
            len: u64,
            sink: &mut (dyn FnMut(Bytes) + Send),
        ) -> Result<()> {
            self.requests.lock().unwrap().push((offset, len));
            let all = self.read_at(offset, len).await?;
            let head = all.len().min(4096);
            sink(all.slice(..head));
            if all.len() > head {
                self.go.acquire().await.unwrap().forget();
                sink(all.slice(head..));
            }
            Ok(())
        }
    }
    impl ReadHints for Held {}

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_miss_fetches_past_its_file_only_while_no_other_guess_is_under_way() {
        const B: u64 = 4096;
        let cache = BlockCache::new(B, 8 * B, 1 << 20, None, RA);
        let held = Arc::new(Held {
            data: Bytes::from(vec![7u8; 64 * B as usize]),
            requests: Mutex::new(Vec::new()),
            go: tokio::sync::Semaphore::new(0),
        });
        let blob = cache.wrap(held.clone());
        // A miss in a one-block file carries on for a run past it; while those guesses are
        // still arriving, a miss in a three-block file elsewhere fetches its file and no more.
        blob.read_within(0, 100, 100).await.unwrap();
        blob.read_within(20 * B, 100, 23 * B).await.unwrap();
        held.go.add_permits(2);
        while cache.stats.fetched_bytes.load(Ordering::Relaxed) < 11 * B {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Once they have arrived, a miss carries on past its file again.
        blob.read_within(40 * B, 100, 40 * B + 100).await.unwrap();
        held.go.add_permits(1);
        assert_eq!(
            *held.requests.lock().unwrap(),
            [(0, 8 * B), (20 * B, 3 * B), (40 * B, 8 * B)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_miss_is_answered_once_the_front_it_needs_has_arrived() {
        const B: u64 = 16 << 10;
        let cache = BlockCache::new(B, B, 1 << 20, None, RA);
        let data: Vec<u8> = (0..4 * B as u32).map(|i| (i % 249) as u8).collect();
        let held = Arc::new(Held {
            data: Bytes::from(data.clone()),
            requests: Mutex::new(Vec::new()),
            go: tokio::sync::Semaphore::new(0),
        });
        let blob = cache.wrap(held.clone());
        // The source has sent the block's first 4 KiB and holds the rest: a read within
        // them is answered (it would wait for the whole block otherwise).
        let front = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            blob.read_within(B + 1000, 500, B + 1500),
        );
        let front = front.await.expect("answered before the block is whole");
        assert_eq!(
            &front.unwrap()[..],
            &data[B as usize + 1000..B as usize + 1500]
        );
        // A read of the block's end waits for the rest, and then the block is whole: its
        // front is served from memory, with no other request.
        held.go.add_permits(1);
        let end = blob.read_at(2 * B - 100, 100).await.unwrap();
        assert_eq!(&end[..], &data[2 * B as usize - 100..2 * B as usize]);
        let hits = cache.stats.mem_hits.load(Ordering::Relaxed);
        let again = blob.read_at(B, 4096).await.unwrap();
        assert_eq!(&again[..], &data[B as usize..B as usize + 4096]);
        assert_eq!(cache.stats.mem_hits.load(Ordering::Relaxed), hits + 1);
        assert_eq!(*held.requests.lock().unwrap(), [(B, B)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_readers_of_one_block_fetch_it_once() {
        let counter = Arc::new(crate::blob::counting::CountingBlob::new(Arc::new(
            MemBlob::new("sha256:sf", vec![3u8; 1 << 20]),
        )));
        let cache = BlockCache::new(1 << 20, 1 << 20, 4 << 20, None, RA);
        let blob = cache.wrap(counter.clone());
        let reads = (0..16).map(|i| {
            let blob = blob.clone();
            tokio::spawn(async move { blob.read_at(i * 1000, 100).await.unwrap() })
        });
        for r in futures::future::join_all(reads).await {
            assert_eq!(&r.unwrap()[..], &[3u8; 100][..]);
        }
        assert_eq!(counter.requests.load(Ordering::Relaxed), 1, "single flight");
    }

    #[tokio::test]
    async fn read_ahead_stays_within_the_file_being_read() {
        const B: u64 = 64 << 10;
        let cache = BlockCache::new(B, B, 64 << 20, None, RA);
        let blob = cache.wrap(Arc::new(MemBlob::new(
            "sha256:f",
            vec![2u8; 200 * B as usize],
        )));
        let misses = || cache.stats.misses.load(Ordering::Relaxed);
        // A file of 30 blocks read front to back: read-ahead starts after 16 boundaries but
        // stops at the file's last block (29), not 64 blocks on.
        for i in 0..=16 {
            blob.read_within(i * B, B, 30 * B - 10).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(misses(), 30);
        // Paused read-ahead (a planned prefetch runs) fetches nothing past the reads.
        cache.pause_readahead(true);
        for i in 100..=120 {
            blob.read_at(i * B, B).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(misses(), 30 + 21);
    }

    #[tokio::test]
    async fn sequential_reads_fetch_ahead_and_random_reads_do_not() {
        // 64 KiB blocks: read-ahead starts after 16 boundaries (1 MiB), 64 blocks (4 MiB) ahead.
        const B: u64 = 64 << 10;
        let data = vec![1u8; 200 * B as usize];
        let cache = BlockCache::new(B, B, 64 << 20, None, RA);
        let blob = cache.wrap(Arc::new(MemBlob::new("sha256:z", data)));
        let misses = || cache.stats.misses.load(Ordering::Relaxed);
        let settle = || tokio::time::sleep(std::time::Duration::from_millis(50));
        blob.read_at(10 * B, 100).await.unwrap();
        blob.read_at(0, 100).await.unwrap();
        settle().await;
        assert_eq!(misses(), 2, "no read-ahead for random reads");
        for i in 1..=5 {
            blob.read_at(i * B, B).await.unwrap();
        }
        settle().await;
        assert_eq!(misses(), 2 + 5, "a short run reads no further");
        for i in 6..=16 {
            blob.read_at(i * B, B).await.unwrap();
        }
        settle().await;
        // Blocks 6..=16 read (10 cached), then the window 17..=80 in one piece.
        assert_eq!(misses(), 2 + 5 + 10 + 64);
        for i in 17..=47 {
            blob.read_at(i * B, B).await.unwrap();
        }
        settle().await;
        assert_eq!(misses(), 2 + 5 + 10 + 64, "half the window is still ahead");
        blob.read_at(48 * B, B).await.unwrap();
        settle().await;
        // Less than half the window ahead: topped up from 81 to 48 + 1 + 64 = 113.
        assert_eq!(misses(), 2 + 5 + 10 + 64 + 32);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_miss_fetches_a_run_in_one_request_and_stops_at_cached_blocks() {
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 241) as u8).collect();
        let counter = Arc::new(crate::blob::counting::CountingBlob::new(Arc::new(
            MemBlob::new("sha256:run", data.clone()),
        )));
        let cache = BlockCache::new(4096, 16384, 1 << 20, None, RA);
        let blob = cache.wrap(counter.clone());
        // Block 6 first; then a miss at block 3 runs to block 5 only (6 is cached).
        assert_eq!(
            &blob.read_at(6 * 4096, 10).await.unwrap()[..],
            &data[24576..24586]
        );
        assert_eq!(
            &blob.read_at(3 * 4096 + 5, 7).await.unwrap()[..],
            &data[12293..12300]
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(counter.requests.load(Ordering::Relaxed), 2);
        // Blocks 6..=9 (the last one short: 40,000 bytes end inside it), then 3..=5.
        assert_eq!(
            counter.bytes.load(Ordering::Relaxed),
            3 * 4096 + 3136 + 3 * 4096
        );
        // Blocks 4 and 5 came with the run: no request for them.
        let got = blob.read_at(4 * 4096, 2 * 4096).await.unwrap();
        assert_eq!(&got[..], &data[16384..24576]);
        let got = blob.read_at(39_000, 5000).await.unwrap();
        assert_eq!(&got[..], &data[39_000..]);
        assert_eq!(counter.requests.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_served_from_cache_fetches_no_neighbours() {
        let counter = Arc::new(crate::blob::counting::CountingBlob::new(Arc::new(
            MemBlob::new("sha256:cached", vec![9u8; 16 * 4096]),
        )));
        let cache = BlockCache::new(4096, 16384, 1 << 20, None, RA);
        let blob = cache.wrap(counter.clone());
        blob.read_at(0, 2 * 4096).await.unwrap(); // misses: blocks 0..=3 in one run
        blob.read_at(2 * 4096, 2 * 4096).await.unwrap(); // all cached
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(counter.requests.load(Ordering::Relaxed), 1);
        assert_eq!(counter.bytes.load(Ordering::Relaxed), 4 * 4096);
    }

    /// A blob whose reads come back with one byte flipped while `damaged` is set.
    struct Damaging {
        data: Bytes,
        damaged: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl BlobSource for Damaging {
        fn id(&self) -> &str {
            "sha256:damaging"
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
            let mut out = self.data[offset as usize..(offset + len) as usize].to_vec();
            if self.damaged.load(Ordering::SeqCst) {
                out[0] ^= 1;
            }
            Ok(Bytes::from(out))
        }
    }
    impl ReadHints for Damaging {}

    #[tokio::test]
    async fn discarded_blocks_are_fetched_again_from_memory_and_disk() {
        let dir = std::env::temp_dir().join(format!("ocifs-discard-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data: Vec<u8> = (0..5 * 4096u32).map(|i| (i % 249) as u8).collect();
        let inner = Arc::new(Damaging {
            data: Bytes::from(data.clone()),
            damaged: true.into(),
        });
        let cache = BlockCache::new(4096, 4096, 1 << 20, Some(dir.clone()), RA);
        let blob = cache.wrap(inner.clone());
        let bad = blob.read_at(4096, 4096).await.unwrap();
        assert_ne!(&bad[..], &data[4096..8192]);
        // Once on disk, a new cache (a remount) would serve the damage too...
        let path = cache
            .store
            .disk_path(&("sha256:damaging".into(), 1))
            .unwrap();
        for _ in 0..200 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(path.exists());
        // ... until the reader that found it bad discards it: gone from memory and disk.
        inner.damaged.store(false, Ordering::SeqCst);
        blob.discard(5000, 10);
        assert!(!path.exists() && !blob.at_hand(4096, 1));
        assert_eq!(
            &blob.read_at(4096, 4096).await.unwrap()[..],
            &data[4096..8192]
        );
        let again = BlockCache::new(4096, 4096, 1 << 20, Some(dir.clone()), RA);
        let blob = again.wrap(inner.clone());
        inner.damaged.store(true, Ordering::SeqCst);
        for _ in 0..200 {
            if blob.at_hand(4096, 4096) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            &blob.read_at(4096, 4096).await.unwrap()[..],
            &data[4096..8192]
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_block_changed_on_disk_is_dropped_not_served() {
        let dir = std::env::temp_dir().join(format!("ocifs-crc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 241) as u8).collect();
        let inner = Arc::new(Damaging {
            data: Bytes::from(data.clone()),
            damaged: false.into(),
        });
        let cache = BlockCache::new(4096, 4096, 1 << 20, Some(dir.clone()), RA);
        cache
            .wrap(inner.clone())
            .read_at(0, 3 * 4096)
            .await
            .unwrap();
        let path = cache
            .store
            .disk_path(&("sha256:damaging".into(), 2))
            .unwrap();
        for _ in 0..200 {
            let key = |i: u64| ("sha256:damaging".to_string(), i);
            if (0..3).all(|i| cache.store.on_disk_whole(&key(i), 4096)) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 4096 + 4, "the block and its checksum");
        bytes[100] ^= 0x80;
        std::fs::write(&path, &bytes).unwrap();
        // A later mount: the changed block is noticed, dropped and fetched again.
        let again = BlockCache::new(4096, 4096, 1 << 20, Some(dir.clone()), RA);
        let blob = again.wrap(inner);
        assert_eq!(&blob.read_at(0, 3 * 4096).await.unwrap()[..], &data[..]);
        assert_eq!(again.stats.disk_hits.load(Ordering::Relaxed), 2);
        assert_eq!(again.stats.misses.load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn memory_stays_bounded_and_disk_survives() {
        let dir = std::env::temp_dir().join(format!("ocifs-cache-test-{}", std::process::id()));
        let data = vec![7u8; 64 * 1024];
        let cache = BlockCache::new(4096, 4096, 8192, Some(dir.clone()), RA);
        let blob = cache.wrap(Arc::new(MemBlob::new("sha256:y", data.clone())));
        blob.read_at(0, 65536).await.unwrap();
        assert!(cache.store.used() <= 8192);
        // Blocks are written to disk in the background.
        let blocks = dir.join("sha256-y");
        for _ in 0..1000 {
            let n = std::fs::read_dir(&blocks).map_or(0, |d| {
                d.filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_none()))
                    .count()
            });
            if n == 16 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let again = BlockCache::new(4096, 4096, 8192, Some(dir.clone()), RA);
        let blob = again.wrap(Arc::new(MemBlob::new("sha256:y", data)));
        blob.read_at(0, 65536).await.unwrap();
        assert_eq!(again.stats.misses.load(Ordering::Relaxed), 0);
        // Cleanup only: a block write still under way must not fail the test.
        let _ = std::fs::remove_dir_all(dir);
    }
}

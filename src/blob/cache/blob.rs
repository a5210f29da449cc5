//! [`CachedBlob`]: one blob's reads through the [`BlockCache`]: hits, misses that fetch a
//! stretch, several-block reads in as few requests as the cached blocks allow, read-ahead for
//! a streak of sequential reads, and a queue-jumping `read_now`.

use super::guesses::Streak;
use super::{BlockCache, assemble};
use crate::blob::{Blob, BlobSource, ReadHints, clamp};
use crate::error::Result;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A blob whose reads go through a [`BlockCache`].
pub struct CachedBlob {
    inner: Blob,
    cache: Arc<BlockCache>,
    streak: Streak,
}

impl CachedBlob {
    pub(super) fn new(inner: Blob, cache: Arc<BlockCache>) -> Self {
        CachedBlob {
            inner,
            cache,
            streak: Streak::default(),
        }
    }

    /// Starts background fetches of the blocks after `last`, up to the one holding byte
    /// `until - 1` (errors are left to the reader that later needs the block).
    fn read_ahead(&self, last: u64, until: u64) {
        let blocks = self.inner.size().min(until).div_ceil(self.cache.block_size);
        let Some((from, end)) = self.streak.ahead(last, blocks, self.cache.readahead) else {
            return;
        };
        for s in self.cache.claim(&self.inner, from, end - 1).0 {
            let fetch = self
                .cache
                .clone()
                .fetch_stretch(self.inner.clone(), s, u64::MAX, None);
            tokio::spawn(fetch);
        }
    }
}

#[async_trait]
impl BlobSource for CachedBlob {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.read_within(offset, len, self.size()).await
    }
}

#[async_trait]
impl ReadHints for CachedBlob {
    /// Drops this blob's blocks from memory (those on disk stay, for later mounts).
    fn release_memory(&self) {
        self.cache.store.forget(self.inner.id());
    }
    /// Drops the blocks holding `[offset, offset+len)` from memory and disk (and passes the
    /// hint on to the blob below).
    fn discard(&self, offset: u64, len: u64) {
        let Ok(len) = clamp(self.id(), self.size(), offset, len) else {
            return;
        };
        if len == 0 {
            return;
        }
        let bs = self.cache.block_size;
        let (first, last) = (offset / bs, (offset + len - 1) / bs);
        tracing::info!(
            "dropping cached blocks {first}..={last} of {}: bytes read from them failed a check",
            self.id()
        );
        self.cache.store.discard(self.inner.id(), first, last);
        self.inner.discard(offset, len);
    }
    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.cache.prefetch(&self.inner, offset, len).await
    }
    fn at_hand(&self, offset: u64, len: u64) -> bool {
        let Ok(len) = clamp(self.id(), self.size(), offset, len) else {
            return false;
        };
        let bs = self.cache.block_size;
        (offset / bs..(offset + len).div_ceil(bs)).all(|i| self.cache.at_hand(&self.inner, i))
    }
    async fn read_within(&self, offset: u64, len: u64, until: u64) -> Result<Bytes> {
        let len = clamp(self.id(), self.size(), offset, len)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let cache = &self.cache;
        let bs = cache.block_size;
        let (first, last) = (offset / bs, (offset + len - 1) / bs);
        // Blocks from here on lie past the file being read: fetching them is a guess.
        let guess_from = until.min(self.size()).div_ceil(bs).max(last + 1);
        let crossed = self.streak.note(first, last);
        if crossed >= cache.sequential
            && cache.readahead > 0
            && !cache.readahead_paused.load(Ordering::Relaxed)
        {
            tracing::trace!(
                "read-ahead after {}+{len} of {} (until {until})",
                offset,
                self.id()
            );
            self.read_ahead(last, until);
        }
        if last > first {
            // Several blocks: one streamed request per stretch of missing ones instead of a
            // request per block. Only a read that misses carries on past its end, like a single
            // miss's stretch; a read served from the cache fetches nothing.
            let mut stretches = cache.claim(&self.inner, first, last).0;
            if !stretches.is_empty() {
                let end = cache.stretch_end(&self.inner, first, guess_from);
                for s in cache.claim(&self.inner, last + 1, end.max(last + 1) - 1).0 {
                    match stretches.last_mut() {
                        // Contiguous with the read's last stretch: one request.
                        Some(prev) if prev[prev.len() - 1].0.1 + 1 == s[0].0.1 => prev.extend(s),
                        _ => stretches.push(s),
                    }
                }
            }
            for s in stretches {
                cache.count_guesses(&self.inner, &s, guess_from);
                let fetch = cache
                    .clone()
                    .fetch_stretch(self.inner.clone(), s, guess_from, None);
                tokio::spawn(fetch);
            }
        }
        // The last block is needed only up to the read's end (the others whole).
        let need = |i: u64| match i == last {
            true => offset + len - i * bs,
            false => bs,
        };
        let blocks = futures::future::try_join_all(
            (first..=last).map(|i| cache.block(&self.inner, i, guess_from, need(i))),
        )
        .await?;
        Ok(assemble(&blocks, first * bs, offset, len))
    }
    async fn read_now(&self, offset: u64, len: u64) -> Result<Bytes> {
        let len = clamp(self.id(), self.size(), offset, len)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let cache = &self.cache;
        let bs = cache.block_size;
        let (first, last) = (offset / bs, (offset + len - 1) / bs);
        let key = |i: u64| BlockCache::key(&self.inner, i);
        let held: Option<Vec<Bytes>> = (first..=last)
            .map(|i| cache.store.memory(&key(i)))
            .collect();
        if let Some(blocks) = held {
            return Ok(assemble(&blocks, first * bs, offset, len));
        }
        // These blocks, fetched here and now in one request, whoever else is fetching them.
        let start = first * bs;
        let end = ((last + 1) * bs).min(self.size());
        let data = self.inner.read_at(start, end - start).await?;
        let stats = &cache.stats;
        stats
            .fetched_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut blocks = Vec::new();
        for i in first..=last {
            let s = ((i - first) * bs) as usize;
            let block = data.slice(s..(s + bs as usize).min(data.len()));
            stats.misses.fetch_add(1, Ordering::Relaxed);
            cache.store.remember(key(i), block.clone());
            blocks.push(block);
        }
        Ok(assemble(&blocks, start, offset, len))
    }
}

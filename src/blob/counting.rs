//! [`CountingBlob`]: a [`BlobSource`] decorator counting the network bytes and requests of
//! one layer blob, for `ocifs stats`.

use super::{Blob, BlobSource, ReadHints};
use crate::error::Result;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A blob that counts the bytes and requests that pass through it.
pub struct CountingBlob {
    inner: Blob,
    pub bytes: AtomicU64,
    pub requests: AtomicU64,
}

impl CountingBlob {
    /// Counts reads of `inner`.
    pub fn new(inner: Blob) -> Self {
        CountingBlob {
            inner,
            bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl BlobSource for CountingBlob {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        let data = self.inner.read_at(offset, len).await?;
        self.count(&data);
        Ok(data)
    }
    async fn stream_at(
        &self,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.inner
            .stream_at(offset, len, &mut |piece| {
                self.bytes.fetch_add(piece.len() as u64, Ordering::Relaxed);
                sink(piece)
            })
            .await
    }
}

/// Counting is invisible to readers: what is at hand below (a local file) is at hand here.
impl ReadHints for CountingBlob {
    fn at_hand(&self, offset: u64, len: u64) -> bool {
        self.inner.at_hand(offset, len)
    }
    fn is_local_file(&self) -> bool {
        self.inner.is_local_file()
    }
    fn discard(&self, offset: u64, len: u64) {
        self.inner.discard(offset, len)
    }
}

impl CountingBlob {
    /// Counts one request that brought `data`.
    fn count(&self, data: &Bytes) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
    }

    /// `other`, whose reads this blob counts as its own: a blob fetched on behalf of this
    /// one (a gzip index's mark windows, counted with their layer).
    pub fn counting(self: &Arc<Self>, other: Blob) -> Blob {
        Arc::new(CountedBy {
            inner: other,
            counter: self.clone(),
        })
    }
}

/// A blob whose reads another [`CountingBlob`] counts (see [`CountingBlob::counting`]).
struct CountedBy {
    inner: Blob,
    counter: Arc<CountingBlob>,
}

#[async_trait]
impl BlobSource for CountedBy {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        let data = self.inner.read_at(offset, len).await?;
        self.counter.count(&data);
        Ok(data)
    }
}

impl ReadHints for CountedBy {
    fn discard(&self, offset: u64, len: u64) {
        self.inner.discard(offset, len)
    }
}

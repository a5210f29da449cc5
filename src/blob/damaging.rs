//! A test blob that delivers damaged bytes, as a bad link would.

use super::{BlobSource, MemBlob, ReadHints};
use crate::error::Result;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes in memory whose first `damaged` reads come back with their middle byte flipped.
pub struct Damaging {
    inner: MemBlob,
    damaged: AtomicU64,
    /// Reads so far.
    pub reads: AtomicU64,
}

impl Damaging {
    /// `bytes` (named by their digest), the first `damaged` reads of them damaged.
    pub fn new(bytes: Vec<u8>, damaged: u64) -> Arc<Damaging> {
        Arc::new(Damaging {
            inner: MemBlob::new(crate::digest::sha256(&bytes), bytes),
            damaged: damaged.into(),
            reads: AtomicU64::new(0),
        })
    }
}

#[async_trait]
impl BlobSource for Damaging {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let data = self.inner.read_at(offset, len).await?;
        let damage = self
            .damaged
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !damage || data.is_empty() {
            return Ok(data);
        }
        let mut out = data.to_vec();
        let mid = out.len() / 2;
        out[mid] ^= 0x20;
        Ok(Bytes::from(out))
    }
}

impl ReadHints for Damaging {}

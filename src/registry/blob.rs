//! [`RegistryBlob`]: one registry blob as a [`BlobSource`], read with ranged GETs (see
//! [`Registry::stream_blob`]).

use super::Registry;
use crate::blob::{BlobSource, clamp};
use crate::error::Result;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;

/// One registry blob as a [`BlobSource`].
pub struct RegistryBlob {
    registry: Arc<Registry>,
    repo: String,
    digest: String,
    size: u64,
}

impl RegistryBlob {
    /// The blob `digest` of `repo`, whose size the manifest gave.
    pub fn new(registry: Arc<Registry>, repo: &str, digest: &str, size: u64) -> Self {
        RegistryBlob {
            registry,
            repo: repo.into(),
            digest: digest.into(),
            size,
        }
    }
}

#[async_trait]
impl BlobSource for RegistryBlob {
    fn id(&self) -> &str {
        &self.digest
    }
    fn size(&self) -> u64 {
        self.size
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        let len = clamp(&self.digest, self.size, offset, len)?;
        self.registry
            .read_blob(&self.repo, &self.digest, offset, len)
            .await
    }
    async fn stream_at(
        &self,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        let len = clamp(&self.digest, self.size, offset, len)?;
        self.registry
            .stream_blob(&self.repo, &self.digest, offset, len, sink)
            .await
    }
}

/// Hints are for the decorators above a registry blob (the block cache); it ignores them.
impl crate::blob::ReadHints for RegistryBlob {}

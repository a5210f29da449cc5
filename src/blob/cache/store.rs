//! Where cached blocks live: an LRU in memory bounded in bytes, and optionally a directory
//! that keeps them across remounts (`DIR/<blob>/<block size>-<index>`: blocks cut with
//! another `--block-size` never match).

use super::Key;
use crate::blob::BytesLru;
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::Mutex;

/// Block storage: memory and, optionally, disk.
pub(super) struct Store {
    block_size: u64,
    lru: Mutex<BytesLru<Key>>,
    dir: Option<PathBuf>,
}

impl Store {
    pub(super) fn new(block_size: u64, capacity: u64, dir: Option<PathBuf>) -> Self {
        Store {
            block_size,
            lru: Mutex::new(BytesLru::new(capacity)),
            dir,
        }
    }

    /// The block, if it is in memory.
    pub(super) fn memory(&self, key: &Key) -> Option<Bytes> {
        self.lru.lock().unwrap().get(key)
    }

    /// Whether the block is in memory.
    pub(super) fn in_memory(&self, key: &Key) -> bool {
        self.lru.lock().unwrap().contains(key)
    }

    /// Keeps a block in memory only.
    pub(super) fn remember(&self, key: Key, data: Bytes) {
        self.lru.lock().unwrap().put(key, data);
    }

    /// Keeps a fetched block in memory and (written in the background) on disk.
    pub(super) fn keep(&self, key: &Key, data: Bytes) {
        if let Some(path) = self.disk_path(key) {
            let data = data.clone();
            // A failed disk write only costs a later refetch; never fail the read for it.
            tokio::spawn(async move {
                let tmp = path.with_extension("tmp");
                let ok = async {
                    tokio::fs::create_dir_all(path.parent().unwrap()).await?;
                    tokio::fs::write(&tmp, &data).await?;
                    tokio::fs::rename(&tmp, &path).await
                }
                .await;
                if let Err(e) = ok {
                    tracing::warn!("cache directory write {} failed: {e}", path.display());
                }
            });
        }
        self.remember(key.clone(), data);
    }

    /// The block from disk, if it is there whole (`want` bytes).
    pub(super) async fn disk(&self, key: &Key, want: u64) -> Option<Bytes> {
        let path = self.disk_path(key)?;
        let data = tokio::fs::read(&path).await.ok()?;
        (data.len() as u64 == want).then(|| Bytes::from(data))
    }

    /// Whether a file for the block exists on disk (cheap: no length check).
    pub(super) fn on_disk(&self, key: &Key) -> bool {
        self.disk_path(key).is_some_and(|p| p.exists())
    }

    /// Whether the block is on disk whole (`want` bytes).
    pub(super) fn on_disk_whole(&self, key: &Key, want: u64) -> bool {
        self.disk_path(key)
            .and_then(|p| std::fs::metadata(p).ok())
            .is_some_and(|m| m.len() == want)
    }

    /// Drops blob `id`'s blocks from memory (those on disk stay, for later mounts).
    pub(super) fn forget(&self, id: &str) {
        self.lru.lock().unwrap().retain(|k| k.0 != id);
    }

    /// Bytes held in memory.
    #[cfg(test)]
    pub(super) fn used(&self) -> u64 {
        self.lru.lock().unwrap().used()
    }

    fn disk_path(&self, key: &Key) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let name = key.0.replace(':', "-").replace('/', "_");
        Some(
            dir.join(name)
                .join(format!("{}-{}", self.block_size, key.1)),
        )
    }
}

//! Where cached blocks live: an LRU in memory bounded in bytes, and optionally a directory
//! that keeps them across remounts (`DIR/<blob>/<block size>-<index>`: blocks cut with
//! another `--block-size` never match).
//!
//! A block file is the block's bytes followed by their CRC-32 (4 bytes, little-endian),
//! checked whenever the block is read back: a block changed on disk (a flipped bit, a torn
//! write, an edit) is dropped and fetched again, never served. The checksum guards against
//! accidents, not against someone who can write the cache directory (they could write the
//! checksum too); what a reader checks by digest (chunks, spans, whole blobs) it checks again
//! whatever the cache says. A block found bad by such a check is dropped from memory and
//! disk with [`Store::discard`].

use super::Key;
use crate::blob::BytesLru;
use bytes::Bytes;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bytes of the checksum after a block's bytes on disk.
const CRC_LEN: u64 = 4;

/// Block storage: memory and, optionally, disk.
pub(super) struct Store {
    block_size: u64,
    lru: Mutex<BytesLru<Key>>,
    dir: Option<PathBuf>,
    /// Per block whose disk write may be under way, the number of the latest write or
    /// discard: a write lands only if nothing came after it, so a block discarded while
    /// its write was still on the way does not come back.
    writes: Arc<Mutex<HashMap<Key, u64>>>,
}

impl Store {
    pub(super) fn new(block_size: u64, capacity: u64, dir: Option<PathBuf>) -> Self {
        Store {
            block_size,
            lru: Mutex::new(BytesLru::new(capacity)),
            dir,
            writes: Arc::default(),
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
            let number = {
                let mut writes = self.writes.lock().unwrap();
                let n = writes.entry(key.clone()).or_insert(0);
                *n += 1;
                *n
            };
            let (writes, key, data) = (self.writes.clone(), key.clone(), data.clone());
            // A failed disk write only costs a later refetch; never fail the read for it.
            tokio::spawn(async move {
                let tmp = crate::blob::disk::temp_path(&path);
                let crc = crc32fast::hash(&data).to_le_bytes();
                let ok = async {
                    tokio::fs::create_dir_all(path.parent().unwrap()).await?;
                    tokio::fs::write(&tmp, [&data[..], &crc[..]].concat()).await?;
                    let mut writes = writes.lock().unwrap();
                    if writes.get(&key) != Some(&number) {
                        // Discarded (or written again) meanwhile.
                        drop(writes);
                        return std::fs::remove_file(&tmp);
                    }
                    writes.remove(&key);
                    std::fs::rename(&tmp, &path)
                }
                .await;
                if let Err(e) = ok {
                    tracing::warn!("cache directory write {} failed: {e}", path.display());
                }
            });
        }
        self.remember(key.clone(), data);
    }

    /// The block from disk, if it is there whole (`want` bytes) and matches its checksum;
    /// a block that does not is removed.
    pub(super) async fn disk(&self, key: &Key, want: u64) -> Option<Bytes> {
        let path = self.disk_path(key)?;
        let mut data = tokio::fs::read(&path).await.ok()?;
        if data.len() as u64 != want + CRC_LEN {
            return None;
        }
        let crc = data.split_off(want as usize);
        if crc32fast::hash(&data).to_le_bytes()[..] != crc[..] {
            tracing::warn!(
                "cached block {} of {} does not match its checksum: dropped, fetching it again",
                key.1,
                key.0
            );
            remove(&path);
            return None;
        }
        Some(Bytes::from(data))
    }

    /// Whether a file for the block exists on disk (cheap: no length check).
    pub(super) fn on_disk(&self, key: &Key) -> bool {
        self.disk_path(key).is_some_and(|p| p.exists())
    }

    /// Whether the block is on disk whole (`want` bytes).
    pub(super) fn on_disk_whole(&self, key: &Key, want: u64) -> bool {
        self.disk_path(key)
            .and_then(|p| std::fs::metadata(p).ok())
            .is_some_and(|m| m.len() == want + CRC_LEN)
    }

    /// Drops blob `id`'s blocks from memory (those on disk stay, for later mounts).
    pub(super) fn forget(&self, id: &str) {
        self.lru.lock().unwrap().retain(|k| k.0 != id);
    }

    /// Drops blocks `first..=last` of blob `id` from memory and disk, and any disk write of
    /// them still under way: bytes read from them failed a check.
    pub(super) fn discard(&self, id: &str, first: u64, last: u64) {
        self.lru
            .lock()
            .unwrap()
            .retain(|k| k.0 != id || !(first..=last).contains(&k.1));
        if self.dir.is_none() {
            return;
        }
        let mut writes = self.writes.lock().unwrap();
        for i in first..=last {
            let key = (id.to_string(), i);
            if let Some(path) = self.disk_path(&key) {
                remove(&path);
            }
            if let Some(n) = writes.get_mut(&key) {
                *n += 1;
            }
        }
    }

    /// Bytes held in memory.
    #[cfg(test)]
    pub(super) fn used(&self) -> u64 {
        self.lru.lock().unwrap().used()
    }

    /// Where block `key` lives on disk, if blocks are kept there.
    pub(super) fn disk_path(&self, key: &Key) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let name = key.0.replace(':', "-").replace('/', "_");
        Some(
            dir.join(name)
                .join(format!("{}-{}", self.block_size, key.1)),
        )
    }
}

/// Removes a block file; one already gone is fine.
fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("could not remove {}: {e}", path.display());
    }
}

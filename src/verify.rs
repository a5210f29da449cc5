//! Whole-blob verification: the gate between "served" and "trusted".
//!
//! eStargz chunks are checked on every read; tar data is only as good as its blob, so every
//! layer blob is hashed whole (before the mount in strict mode, in the background otherwise)
//! and a mismatch marks the layer bad, failing its reads with EIO. The blob is read through the
//! block cache, so verification also fetches the whole layer in the background: once it is
//! done, reads are served locally.

use crate::blob::Blob;
use crate::digest::Hasher;
use crate::error::{Error, Result};
use crate::layer::{Health, Layer};
use std::sync::Arc;

/// Read size while hashing: small enough that a foreground read arriving meanwhile waits
/// little behind it on the link.
const PIECE: u64 = 1 << 20;

/// Hashes the whole blob and compares it with its id (its digest). Before each piece it
/// waits until `idle()` says the foreground has no reads going.
pub async fn verify_blob(raw: &Blob, idle: &(dyn Fn() -> bool + Sync)) -> Result<()> {
    let mut h = Hasher::default();
    let size = raw.size();
    let mut off = 0;
    while off < size {
        while !idle() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let piece = raw.read_at(off, PIECE.min(size - off)).await?;
        if piece.is_empty() {
            return Err(Error::Registry(format!(
                "blob {} ended early at {off}",
                raw.id()
            )));
        }
        h.update(&piece);
        off += piece.len() as u64;
    }
    let actual = h.finish();
    if actual != raw.id() {
        return Err(Error::Digest {
            what: format!("layer blob {}", raw.id()),
            expected: raw.id().into(),
            actual,
        });
    }
    Ok(())
}

/// Verifies each still-pending layer and records the verdict in its health, yielding to
/// foreground reads (see [`verify_blob`]).
pub async fn verify_layers(layers: &[(Arc<Layer>, Blob)], idle: &(dyn Fn() -> bool + Sync)) {
    for (layer, raw) in layers {
        if *layer.health.read().unwrap() != Health::Pending {
            continue;
        }
        match verify_blob(raw, idle).await {
            Ok(()) => {
                tracing::info!("layer {} verified", layer.digest);
                *layer.health.write().unwrap() = Health::Verified;
            }
            Err(e) => layer.mark_bad(format!("verification failed: {e}")),
        }
    }
}

/// A background task that is cancelled when this guard is dropped.
pub struct TaskGuard(tokio::task::JoinHandle<()>);

impl TaskGuard {
    /// Spawns `fut` on the current runtime, owned by the returned guard.
    pub fn spawn(fut: impl std::future::Future<Output = ()> + Send + 'static) -> TaskGuard {
        TaskGuard(tokio::spawn(fut))
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

//! One layer served on its own, as a runtime stacks it: its own tree with whiteouts in
//! overlay form ([`crate::tree::overlay`]), read through the same layer index, verification
//! gate, block cache, speculation, local copy and statistics as a mount. Nothing here knows
//! who asks: the additional layer store ([`crate::store`]) shows it as a `diff` directory, and
//! a containerd snapshotter could show it as a snapshot.
//!
//! A served layer is a [`ServedImage`] of a one-layer [`Image`] whose tree is the layer's
//! own: the read path, `--record`, speculation and `ocifs stats` figures are the mount's.

use super::ServedImage;
use crate::config::VerifyMode;
use crate::error::{Error, Result};
use crate::image::{Image, LayerOpener, Resolved};
use crate::layer::LayerDesc;
use crate::speculate::{SpeculateConfig, Speculator};
use crate::stats::MountStats;
use crate::task::TaskGuard;
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Whether the link is free for background work (no foreground read waits).
pub type Idle = Arc<dyn Fn() -> bool + Send + Sync>;

/// How layers are served, beyond how they are opened.
#[derive(Clone)]
pub struct LayerServing {
    pub speculate: SpeculateConfig,
    pub verify: VerifyMode,
    /// Local copies of verified layers: directory and disk bound per layer (`None`: off).
    pub local_copies: Option<(PathBuf, u64)>,
    /// When background work (verification, copies) may use the link.
    pub idle: Idle,
}

/// One opened layer, served with its own tree, and its background work.
pub struct ServedLayer {
    /// The layer as a one-layer image (its tree is the layer's own, see the module doc).
    pub served: Arc<ServedImage>,
    /// The descriptor it was opened from.
    pub desc: LayerDesc,
    /// Its uncompressed digest, from the config of the image it was opened for.
    pub diff_id: Option<String>,
    /// Verification, local copy, speculation: stopped when the layer is dropped.
    _tasks: Vec<TaskGuard>,
}

impl ServedLayer {
    /// Opens layer `desc` through `opener` and starts its background work. `image` gives the
    /// image the layer was listed in, with its config: needed only for the layer's
    /// uncompressed digest, so it may still be on its way while the layer's index comes.
    pub async fn open(
        opener: &LayerOpener,
        desc: &LayerDesc,
        image: impl Future<Output = Result<Arc<Resolved>>>,
        how: &LayerServing,
    ) -> Result<ServedLayer> {
        let start = Instant::now();
        let ((opened, entries), resolved) =
            futures::future::try_join(opener.open(desc), image).await?;
        let index = (resolved.layers.iter())
            .position(|l| l.digest == desc.digest)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "layer {} in {}",
                    desc.digest, resolved.manifest_digest
                ))
            })?;
        let diff_id = crate::image::manifest::diff_ids(&resolved.config)
            .get(index)
            .filter(|d| !d.is_empty())
            .cloned();
        let diff_ids: Vec<String> = diff_id.iter().cloned().collect();
        if how.verify == VerifyMode::Strict {
            crate::image::verify_now(std::slice::from_ref(&opened), &diff_ids).await?;
        }
        let mut own = (*resolved).clone();
        own.layers = vec![desc.clone()];
        let image = Arc::new(Image {
            resolved: own,
            source: opener.source().clone(),
            layers: vec![opened],
            tree: crate::tree::overlay::layer_tree(&entries),
        });
        let cache = opener.cache().clone();
        let speculator = Arc::new(Speculator::new(
            how.speculate.clone(),
            &image,
            cache.clone(),
            None,
        ));
        let served = Arc::new(ServedImage::new(
            image,
            cache,
            speculator,
            false,
            start.elapsed(),
            opener.config().read_timeout,
        ));
        let mut tasks = served.speculator.start(&served.image);
        if how.verify != VerifyMode::Off {
            tasks.push(TaskGuard::spawn(converge(
                served.clone(),
                diff_ids,
                how.verify == VerifyMode::Background,
                how.local_copies.clone(),
                how.idle.clone(),
            )));
        }
        Ok(ServedLayer {
            served,
            desc: desc.clone(),
            diff_id,
            _tasks: tasks,
        })
    }

    /// Reads `len` bytes at `offset` of file `ino` of the layer's tree.
    pub async fn read(&self, ino: u64, offset: u64, len: u64) -> Result<Bytes> {
        self.served.read(ino, offset, len).await
    }

    /// Reads `len` bytes at `offset` of the layer's compressed blob, through the block cache;
    /// an error once verification has found the blob bad. (Not hashed here: whoever takes
    /// the whole blob, a registry `podman push` uploads to, checks it against its digest.)
    pub async fn read_blob(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.served.image.layers[0].layer.usable()?;
        let blob = &self.served.image.layers[0].blob;
        let len = len.min(blob.size().saturating_sub(offset));
        if len == 0 {
            return Ok(Bytes::new());
        }
        blob.read_at(offset, len).await
    }

    /// The layer's uncompressed size, when known (see [`crate::layer::Layer::uncompressed_size`]).
    pub fn uncompressed_size(&self) -> Option<u64> {
        self.served.image.layers[0].layer.uncompressed_size()
    }

    /// The layer's figures, in the shape `ocifs stats` shows a mount in.
    pub fn stats(&self) -> MountStats {
        self.served.stats()
    }
}

/// Verification (unless done before the layer was served, or off), and once verified a local
/// copy of the layer's files, yielding to foreground reads.
async fn converge(
    served: Arc<ServedImage>,
    diff_ids: Vec<String>,
    background: bool,
    copies: Option<(PathBuf, u64)>,
    idle: Idle,
) {
    let idle = move || idle();
    if background {
        let l = &served.image.layers[0];
        if let Err(e) =
            crate::verify::verify_layers(&[(&*l.layer, &l.blob)], &diff_ids, &idle).await
        {
            tracing::warn!("layer {} left unverified: {e}", l.layer.digest);
        }
    }
    if let Some((dir, budget)) = &copies {
        served.copy_layers_locally(dir, *budget, &idle).await;
    }
}

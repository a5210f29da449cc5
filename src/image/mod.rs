//! An opened image: resolved manifest, opened layers, merged tree, and the read path that
//! ties them together. This is the FUSE-free core that `mount`, `ls` and `cat` all use.

pub mod manifest;
pub mod source;

pub use manifest::{Platform, Resolved, resolve};
pub use source::Source;

use crate::blob::Blob;
use crate::blob::cache::BlockCache;
use crate::config::{OpenConfig, VerifyMode};
use crate::error::{Error, Result};
use crate::layer::{
    Entry, Format, Health, Layer, LayerData, LayerDesc, estargz, gzindex, streamed, tar,
};
use crate::tree::Tree;
use bytes::Bytes;
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// Progress callback: (layer digest, bytes done, bytes total).
pub type Progress = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// An image ready to be read.
pub struct Image {
    pub resolved: Resolved,
    /// Opened layers, lowest first, with their raw (uncached) blobs for verification.
    pub layers: Vec<(Arc<Layer>, Blob)>,
    pub tree: Tree,
    pub cache: Arc<BlockCache>,
    /// How long resolving and indexing took.
    pub open_time: std::time::Duration,
}

impl Image {
    /// Resolves `reference` in `source` and opens every layer (in parallel).
    pub async fn open(
        source: &Source,
        reference: &str,
        cfg: &OpenConfig,
        progress: Progress,
    ) -> Result<Image> {
        let start = Instant::now();
        let resolved = resolve(source, reference, &cfg.platform).await?;
        let cache = BlockCache::new(
            cfg.block_size,
            cfg.cache_size,
            Some(cfg.cache_dir.join("blocks")),
        );
        let opened = futures::future::try_join_all(resolved.layers.iter().map(|desc| {
            let (cache, progress) = (cache.clone(), progress.clone());
            async move {
                let raw = source.blob(&desc.digest, desc.size)?;
                let (layer, entries) = open_layer(desc, raw.clone(), &cache, cfg, progress).await?;
                Ok::<_, Error>(((Arc::new(layer), raw), entries))
            }
        }))
        .await?;
        let (layers, entries): (Vec<_>, Vec<Vec<Entry>>) = opened.into_iter().unzip();
        if cfg.verify == VerifyMode::Strict {
            crate::verify::verify_layers(&layers).await;
            for (l, _) in &layers {
                if let Health::Bad(reason) = &*l.health.read().unwrap() {
                    return Err(Error::BadLayer {
                        digest: l.digest.clone(),
                        reason: reason.clone(),
                    });
                }
            }
        }
        let tree = Tree::build(&entries);
        Ok(Image {
            resolved,
            layers,
            tree,
            cache,
            open_time: start.elapsed(),
        })
    }

    /// Reads `len` bytes at `offset` of the regular file `ino`.
    pub async fn read(&self, ino: u64, offset: u64, len: u64) -> Result<Bytes> {
        let node = self
            .tree
            .get(ino)
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))?;
        match &node.data {
            None => Ok(Bytes::new()),
            Some((li, loc)) => self.layers[*li].0.read(loc, node.size, offset, len).await,
        }
    }

    /// Reads a whole file.
    pub async fn read_all(&self, ino: u64) -> Result<Bytes> {
        let size = self.tree.get(ino).map_or(0, |n| n.size);
        self.read(ino, 0, size).await
    }

    /// One line per layer: digest, format, size.
    pub fn layer_summary(&self) -> String {
        let formats: Vec<&str> = self.layers.iter().map(|(l, _)| l.format.name()).collect();
        format!("{} layers ({})", self.layers.len(), formats.join(", "))
    }
}

/// Detects the format of one layer and indexes it.
async fn open_layer(
    desc: &LayerDesc,
    raw: Blob,
    cache: &Arc<BlockCache>,
    cfg: &OpenConfig,
    progress: Progress,
) -> Result<(Layer, Vec<Entry>)> {
    let mut format = Format::from_media_type(&desc.media_type)?;
    let cached = cache.wrap(raw.clone());
    let initial = if cfg.verify == VerifyMode::Off {
        Health::Unverified
    } else {
        Health::Pending
    };
    let (data, entries, health) = match format {
        Format::Tar => (
            LayerData::Tar(cached.clone()),
            tar::index(cached).await?,
            initial,
        ),
        Format::Gzip => {
            // Every gzip layer may be eStargz: the footer tells (one tail read, reused for the TOC).
            let (tail_start, tail) = estargz::read_tail(&cached).await?;
            match estargz::parse_footer(&tail) {
                Some((_, legacy)) => {
                    let toc_digest = desc
                        .annotations
                        .get(estargz::TOC_DIGEST_ANNOTATION)
                        .map(String::as_str);
                    let (reader, entries, _) =
                        estargz::open(cached, tail_start, tail, toc_digest).await?;
                    format = if legacy {
                        Format::LegacyStargz
                    } else {
                        Format::Estargz
                    };
                    (LayerData::Estargz(reader), entries, initial)
                }
                None => gzip_indexed(cached, cfg, progress).await?,
            }
        }
        Format::Zstd | Format::Estargz | Format::LegacyStargz => {
            streamed_layer(raw, format, cfg, progress).await?
        }
    };
    let layer = Layer {
        digest: desc.digest.clone(),
        format,
        data,
        health: RwLock::new(health),
    };
    Ok((layer, entries))
}

/// A plain gzip layer, lazy through its checkpoint index: loaded from the cache directory
/// (checked: checksum, layer digest) or built in one pass over the blob and kept there.
async fn gzip_indexed(
    cached: Blob,
    cfg: &OpenConfig,
    progress: Progress,
) -> Result<(LayerData, Vec<Entry>, Health)> {
    let digest = cached.id().to_string();
    let path = gzindex::file::path(&cfg.cache_dir, &digest);
    let loaded = match tokio::fs::read(&path).await {
        Ok(bytes) => match gzindex::file::decode(&bytes, &digest) {
            Ok(index) => Some(index),
            Err(e) => {
                tracing::warn!("rejected {}: {e}; rebuilding it", path.display());
                None
            }
        },
        Err(_) => None,
    };
    let mut index = match loaded {
        Some(index) => index,
        None => {
            let d = digest.clone();
            let report = move |done: u64, total: u64| progress(&d, done, total);
            let index = gzindex::GzIndex::build(cached.clone(), cfg.span, &report).await?;
            let bytes = gzindex::file::encode(&index);
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let saved = async {
                tokio::fs::create_dir_all(path.parent().unwrap()).await?;
                tokio::fs::write(&tmp, &bytes).await?;
                tokio::fs::rename(&tmp, &path).await
            };
            if let Err(e) = saved.await {
                tracing::warn!(
                    "could not keep the index of {digest} at {}: {e}",
                    path.display()
                );
            }
            index
        }
    };
    let entries = std::mem::take(&mut index.entries);
    let blob = Arc::new(gzindex::GzBlob::new(Arc::new(index), cached));
    // The index came from a pass that checked the whole blob's digest, and every read checks
    // its span's digest: nothing is served unverified.
    Ok((LayerData::Tar(blob), entries, Health::Verified))
}

async fn streamed_layer(
    raw: Blob,
    format: Format,
    cfg: &OpenConfig,
    progress: Progress,
) -> Result<(LayerData, Vec<Entry>, Health)> {
    let digest = raw.id().to_string();
    let report = move |done: u64, total: u64| progress(&digest, done, total);
    let local = streamed::local_tar(raw, format, &cfg.cache_dir, &report).await?;
    let entries = tar::index(local.clone()).await?;
    // The stream was hashed on the way in: the local tar is verified.
    Ok((LayerData::Tar(local), entries, Health::Verified))
}

/// A layer's format as `inspect` reports it: media type, then (for gzip) the eStargz footer,
/// read with one small ranged request. `None` for media types ocifs cannot read.
pub async fn probe_format(source: &Source, desc: &LayerDesc) -> Result<Option<Format>> {
    let Ok(format) = Format::from_media_type(&desc.media_type) else {
        return Ok(None);
    };
    if format != Format::Gzip || desc.size < estargz::FOOTER_SIZE {
        return Ok(Some(format));
    }
    let blob = source.blob(&desc.digest, desc.size)?;
    let tail = blob
        .read_at(desc.size - estargz::FOOTER_SIZE, estargz::FOOTER_SIZE)
        .await?;
    Ok(Some(match estargz::parse_footer(&tail) {
        Some((_, true)) => Format::LegacyStargz,
        Some((_, false)) => Format::Estargz,
        None => Format::Gzip,
    }))
}

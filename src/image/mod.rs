//! An opened image: resolved manifest, opened layers, merged tree, and the read path that
//! ties them together. This is the FUSE-free core that `mount`, `ls` and `cat` all use.

pub mod activity;
pub mod command;
mod elf;
pub mod local;
pub mod manifest;
mod open;
pub mod share;
pub mod source;
mod together;
pub mod wholefile;

pub use manifest::{Platform, Resolved, resolve};
pub use source::Source;

use crate::blob::Blob;
use crate::blob::cache::BlockCache;
use crate::config::{OpenConfig, VerifyMode};
use crate::error::{Error, Result};
use crate::layer::{Entry, Format, Health, Layer, LayerDesc};
use crate::stats::{CountingBlob, ReadStats, Recorder};
use crate::tree::Tree;
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Progress callback: (layer digest, bytes done, bytes total).
pub type Progress = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// An image ready to be read.
pub struct Image {
    pub resolved: Resolved,
    /// Opened layers, lowest first, each with the (block-cached) blob verification reads.
    pub layers: Vec<(Arc<Layer>, Blob)>,
    pub tree: Tree,
    pub cache: Arc<BlockCache>,
    /// How long resolving and indexing took.
    pub open_time: std::time::Duration,
    /// Network bytes and requests per layer blob (same order as `layers`).
    pub counters: Vec<Arc<CountingBlob>>,
    /// Latency and volume of reads served.
    pub reads: ReadStats,
    /// Set by `--record`: every read, in order.
    pub recorder: Option<Recorder>,
    /// Background prefetch progress: bytes planned and done.
    pub prefetch_total: AtomicU64,
    pub prefetch_done: AtomicU64,
    /// Files read at random places, queued to be fetched whole (see `wholefile.rs`).
    pub whole_files: wholefile::WholeFiles,
    /// Set while a planned prefetch (landmarks, profile) runs; speculation waits for it
    /// (see [`Image::set_prefetching`]).
    pub prefetching: std::sync::atomic::AtomicBool,
    /// Sizes of the files fetched whole.
    pub whole_fetched: AtomicU64,
    /// Sizes of the files fetched with their directory (see `image::together`). Both count file
    /// bytes, so the figures compare across formats; blob bytes are per layer.
    pub directory_fetched: AtomicU64,
    /// Compressed bytes of the small layers fetched whole at mount (see
    /// [`Image::fetch_small_layers`]).
    pub small_layers: AtomicU64,
    /// Verified layers' files copied to local files, which then serve their reads (see
    /// `image::local`).
    pub local: local::LocalCopies,
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
        let mut resolved = manifest::resolve_manifest(source, reference, &cfg.platform).await?;
        let blocks = cfg.cache_dir.join("blocks");
        let cache = BlockCache::new(cfg.block_size, cfg.fetch_size, cfg.cache_size, Some(blocks));
        let ctx = open::Ctx {
            source,
            cache: cache.clone(),
            cfg,
            progress,
            manifest_digest: resolved.manifest_digest.clone(),
            soci_index: resolved
                .annotations
                .get(crate::layer::checkpoint::soci::INDEX_ANNOTATION)
                .cloned(),
            published: tokio::sync::OnceCell::new(),
        };
        // The config is not needed to open layers: fetch it alongside (one round trip less).
        let config = manifest::fetch_config(source, &resolved);
        let opened = futures::future::try_join_all(resolved.layers.iter().map(|desc| {
            let ctx = &ctx;
            async move {
                let counter = Arc::new(CountingBlob::new(source.blob(&desc.digest, desc.size)?));
                let raw: Blob = counter.clone();
                let (layer, entries) = ctx.open_layer(desc, &counter).await?;
                // Verification reads through the block cache: it checks the bytes we serve,
                // and doubles as the background fetch that makes later reads local.
                let verified_through = ctx.cache.wrap(raw);
                Ok::<_, Error>(((Arc::new(layer), verified_through), (entries, counter)))
            }
        }));
        let (config, opened) = futures::future::try_join(config, opened).await?;
        resolved.config = config;
        let (layers, rest): (Vec<_>, Vec<_>) = opened.into_iter().unzip();
        let (entries, counters): (Vec<Vec<Entry>>, Vec<_>) = rest.into_iter().unzip();
        if cfg.verify == VerifyMode::Strict {
            let diff_ids = manifest::diff_ids(&resolved.config);
            crate::verify::verify_layers(&layers, &diff_ids, &|| true).await;
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
        let local = local::LocalCopies::new(layers.len());
        Ok(Image {
            resolved,
            layers,
            tree,
            cache,
            open_time: start.elapsed(),
            counters,
            reads: ReadStats::default(),
            recorder: None,
            prefetch_total: AtomicU64::new(0),
            prefetch_done: AtomicU64::new(0),
            whole_files: Default::default(),
            prefetching: Default::default(),
            whole_fetched: AtomicU64::new(0),
            directory_fetched: AtomicU64::new(0),
            small_layers: AtomicU64::new(0),
            local,
        })
    }

    /// Marks a planned prefetch (landmarks, a profile) as running or done. While it runs,
    /// guesses are held back — whole-file and library fetches, directories read together,
    /// read-ahead: the plan already brings what the workload reads, in order, and guesses
    /// would only compete with it for the link.
    pub fn set_prefetching(&self, running: bool) {
        self.prefetching.store(running, Ordering::Relaxed);
        self.cache.pause_readahead(running);
    }

    /// Reads `len` bytes at `offset` of the regular file `ino`: the read path.
    pub async fn read(&self, ino: u64, offset: u64, len: u64) -> Result<Bytes> {
        let start = Instant::now();
        let node = self
            .tree
            .get(ino)
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))?;
        self.reads.begin();
        let (result, local) = match &node.data {
            None => (Ok(Bytes::new()), false),
            Some((li, loc)) => match self.read_local(*li, ino, node.size, offset, len).await {
                Some(local) => (local, true),
                None => (
                    self.layers[*li].0.read(loc, node.size, offset, len).await,
                    false,
                ),
            },
        };
        self.reads.end();
        if start.elapsed() > std::time::Duration::from_millis(10) {
            tracing::debug!(
                "slow read: inode {ino} at {offset}+{len} took {:?}",
                start.elapsed()
            );
        }
        match &result {
            Ok(data) => self.reads.record(start.elapsed(), data.len() as u64),
            Err(_) => {
                self.reads.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let len = len.min(node.size.saturating_sub(offset));
        if let Some(r) = &self.recorder {
            r.note(ino, offset, len);
        }
        // Guesses bring what the next reads will need; a file served from a local copy needs
        // nothing brought (they would only decode blocks again).
        if local {
            return result;
        }
        self.whole_files.note(ino, node.size, offset, len);
        if offset == 0
            && let Ok(data) = &result
        {
            self.whole_files
                .note_head(ino, node.size, node.parent, data);
        }
        result
    }

    /// One line per layer: format, and where a gzip layer's index came from.
    pub fn layer_summary(&self) -> String {
        let formats: Vec<String> = self
            .layers
            .iter()
            .map(|(l, _)| match l.index_source {
                Some(src) => format!("{} (index {src})", l.format.name()),
                None => l.format.name().to_string(),
            })
            .collect();
        format!("{} layers ({})", self.layers.len(), formats.join(", "))
    }
}

/// A layer's format as `inspect` reports it (see [`crate::layer::detect::probe`]).
pub async fn probe_format(source: &Source, desc: &LayerDesc) -> Result<Option<Format>> {
    crate::layer::detect::probe(desc, || source.blob(&desc.digest, desc.size)).await
}

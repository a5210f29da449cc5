//! An image being served: the read path a mount answers with, and what it keeps beside the
//! image — read statistics, the `--record` recorder, local copies of verified layers, and the
//! mount's [`Speculator`], told about every read once. FUSE-free: the adapter in
//! [`crate::fuse`] converts and calls [`ServedImage::read`]. [`layer`] serves one layer on its
//! own, for a runtime that stacks layers itself (the additional layer store).

pub mod layer;
pub mod local;

use crate::blob::cache::BlockCache;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::layer::Health;
use crate::speculate::Speculator;
use crate::stats::{Access, MountStats, ReadStats, Recorder};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A mounted image: the image and everything its reads go through.
pub struct ServedImage {
    pub image: Arc<Image>,
    pub cache: Arc<BlockCache>,
    pub speculator: Arc<Speculator>,
    /// Latency and volume of reads served.
    pub reads: ReadStats,
    /// Set by `--record`: every read, in order.
    pub recorder: Option<Recorder>,
    /// Verified layers' files copied to local files, which then serve their reads.
    pub local: local::LocalCopies,
    /// How long resolving and opening the image took.
    pub open_time: Duration,
    /// A read not answered within this fails with EIO (`--read-timeout`).
    pub read_timeout: Duration,
}

impl ServedImage {
    /// Serves `image` (opened in `open_time`, its blobs read through `cache`), with
    /// `speculator` told about every read; `record` keeps every read for `--record`; a read
    /// fails once it has taken `read_timeout`.
    pub fn new(
        image: Arc<Image>,
        cache: Arc<BlockCache>,
        speculator: Arc<Speculator>,
        record: bool,
        open_time: Duration,
        read_timeout: Duration,
    ) -> Self {
        let local = local::LocalCopies::new(image.layers.len());
        ServedImage {
            image,
            cache,
            speculator,
            reads: ReadStats::default(),
            recorder: record.then(Recorder::default),
            local,
            open_time,
            read_timeout,
        }
    }

    /// Reads `len` bytes at `offset` of the regular file `ino`: the read path. A read that
    /// takes longer than the read timeout fails with EIO; what it started (block fetches,
    /// with their retries) goes on, for the reads that come after.
    pub async fn read(&self, ino: u64, offset: u64, len: u64) -> Result<Bytes> {
        let start = Instant::now();
        let image = &self.image;
        let node = image
            .tree
            .get(ino)
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))?;
        self.reads.begin();
        let read = async {
            match &node.data {
                None => (Ok(Bytes::new()), false),
                Some((li, loc)) => match self.local.read(*li, ino, node.size, offset, len).await {
                    Some(local) => (local, true),
                    None => (
                        image.layers[*li]
                            .layer
                            .read(loc, node.size, offset, len)
                            .await,
                        false,
                    ),
                },
            }
        };
        let (result, local) = match tokio::time::timeout(self.read_timeout, read).await {
            Ok(done) => done,
            Err(_) => {
                let why = format!(
                    "read of {} at {offset}+{len} not answered within {:?} (--read-timeout): \
                     the registry did not deliver its bytes in time (retries are logged above)",
                    image
                        .tree
                        .path(ino)
                        .unwrap_or_else(|| format!("inode {ino}")),
                    self.read_timeout
                );
                (Err(Error::Timeout(why)), false)
            }
        };
        self.reads.end();
        if start.elapsed() > Duration::from_millis(10) {
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
        if !local {
            let head = match (&result, offset) {
                (Ok(data), 0) => Some(&data[..]),
                _ => None,
            };
            self.speculator.on_read(ino, node, offset, len, head);
        }
        result
    }

    /// The recorded accesses with layer digests and paths.
    pub fn profile(&self) -> Vec<Access> {
        let Some(rec) = &self.recorder else {
            return Vec::new();
        };
        let image = &self.image;
        rec.take()
            .into_iter()
            .filter_map(|(ino, offset, len)| {
                let node = image.tree.get(ino)?;
                let layer = node
                    .data
                    .as_ref()
                    .map(|(li, _)| image.layers[*li].layer.digest.clone())
                    .unwrap_or_default();
                Some(Access {
                    layer,
                    path: image.tree.path(ino)?,
                    offset,
                    len,
                })
            })
            .collect()
    }

    /// A snapshot of the mount's figures, for `ocifs stats`.
    pub fn stats(&self) -> MountStats {
        use crate::stats::{
            CacheFigures, LayerFigures, LocalFigures, PrefetchFigures, ReadFigures,
        };
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let layers = self
            .image
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| LayerFigures {
                digest: l.layer.digest.clone(),
                format: l.layer.format.name().to_string(),
                size: l.blob.size(),
                index: l.layer.index_source.map(str::to_string),
                fetched_bytes: load(&l.counter.bytes),
                requests: load(&l.counter.requests),
                verification: match &*l.layer.health.read().unwrap() {
                    Health::Pending => "pending".to_string(),
                    Health::Verified => "verified".to_string(),
                    Health::Unverified => "unverified (--verify off)".to_string(),
                    Health::Bad(r) => format!("bad: {r}"),
                },
                local_copy: self.served_locally(i),
            })
            .collect();
        let c = &self.cache.stats;
        let r = &self.reads;
        let s = &self.speculator.counts;
        MountStats {
            digest: self.image.resolved.manifest_digest.clone(),
            ready_ms: self.open_time.as_millis() as u64,
            layers,
            cache: CacheFigures {
                mem_hits: load(&c.mem_hits),
                disk_hits: load(&c.disk_hits),
                misses: load(&c.misses),
                fetched_bytes: load(&c.fetched_bytes),
                demand_bytes: load(&c.demand_bytes),
            },
            reads: ReadFigures {
                count: load(&r.reads),
                bytes: load(&r.bytes),
                errors: load(&r.errors),
                opens: load(&r.opens),
                p50_us: r.percentile(0.5).as_micros() as u64,
                p99_us: r.percentile(0.99).as_micros() as u64,
            },
            prefetch: PrefetchFigures {
                total_bytes: load(&s.planned),
                done_bytes: load(&s.planned_done),
                whole_file_bytes: load(&s.whole_files),
                directory_bytes: load(&s.directories),
                small_layer_bytes: load(&s.small_layers),
            },
            local_copies: LocalFigures {
                bytes: load(&self.local.bytes),
                reads: load(&self.local.reads),
            },
            hosts: match &self.image.source {
                crate::image::Source::Registry { repo } => repo.figures(),
                crate::image::Source::Layout { .. } => Vec::new(),
            },
            process: crate::stats::ProcessFigures::this(),
        }
    }
}

//! A containers/storage *additional layer store*: podman, CRI-O and buildah, configured with
//! `additionallayerstores = ["DIR:ref"]` in storage.conf, look for each layer of an image
//! they pull at `DIR/<base64 of the image reference>/<layer digest>/` and, when `diff`,
//! `info` and `blob` are there, use the layer from there instead of pulling it: `diff` is the
//! layer's own tree (overlayfs stacks it as a lower directory), `info` its metadata as JSON,
//! `blob` its compressed bytes (for `push` and `save`). See docs/ARCHITECTURE.md for the exact
//! lookups Debian's podman 4.3 makes.
//!
//! [`Store`] is the FUSE-free directory model: one long-running daemon serves many images. A
//! reference's directory appears on its first lookup (manifest and config resolved, every
//! layer starting to open as soon as the manifest is in: `resolve.rs`); a layer's `diff` is a
//! [`ServedLayer`], opened once however many images share it (`pool.rs`) and released when
//! idle. Unknown references, unreachable
//! registries and layers that fail to open are lookup errors within a bounded time, so the
//! runtime falls back to an ordinary pull. containers/storage tells a store when it starts
//! and stops using a layer (creating `use` in the layer's directory, removing the directory)
//! and expects `ENOENT` from a store that listens: both are answered so, and counted.
//! [`fuse`] is the thin kernel adapter, [`mount`] starts and runs it.

pub mod fuse;
mod images;
pub mod mount;
mod nodes;
mod pending;
mod pool;
mod resolve;

pub use images::{LayerInfo, decode_name, encode_name};
pub use nodes::ROOT;

use crate::blob::cache::BlockCache;
use crate::config::OpenConfig;
use crate::error::{Error, Result};
use crate::image::{Progress, Source};
use crate::serve::layer::{LayerServing, ServedLayer};
use crate::speculate::SpeculateConfig;
use crate::stats::{ImageFigures, ReadStats, StoreStats};
use crate::task::TaskGuard;
use bytes::Bytes;
use images::Images;
use nodes::{Node, Nodes, Place};
use pool::LayerPool;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The names in a layer's directory.
pub const DIFF: &str = "diff";
pub const INFO: &str = "info";
pub const BLOB: &str = "blob";
/// What containers/storage creates in a layer's directory when it starts using the layer.
pub const USE: &str = "use";

/// A layer digest missing from a reference's resolution older than this resolves the
/// reference again (its tag may have moved).
const REFRESH_ON_MISS: Duration = Duration::from_secs(5);

/// Turns a reference into the source to read it from and the tag or digest to resolve there
/// (with the credentials the runtime would use): the caller's, so that only it reads the
/// environment.
pub type Connect = Arc<dyn Fn(&str) -> Result<(Source, String)> + Send + Sync>;

/// How the store serves.
#[derive(Clone)]
pub struct StoreConfig {
    pub open: OpenConfig,
    pub speculate: SpeculateConfig,
    /// Local copies of verified layers: directory and disk bound per layer.
    pub local_copies: Option<(PathBuf, u64)>,
    /// Layers not asked for during this long are released.
    pub release_after: Duration,
    /// The longest a lookup waits for a reference to resolve or a layer to open.
    pub lookup_timeout: Duration,
}

/// What a lookup found: enough for the adapter's attributes.
pub enum Found {
    /// One of the store's own directories.
    Dir,
    /// One of the store's own files, of this size.
    File(u64),
    /// Node `.1` of a served layer's tree.
    Layer(Arc<ServedLayer>, u64),
}

/// A directory's entries (without `.` and `..`) and its parent's inode.
pub struct Listing {
    pub parent: u64,
    pub entries: Vec<(u64, String, Found)>,
}

/// The store: references, layers, inode numbers.
pub struct Store {
    cfg: StoreConfig,
    connect: Connect,
    cache: Arc<BlockCache>,
    progress: Progress,
    serving: LayerServing,
    nodes: Mutex<Nodes>,
    images: Mutex<Images>,
    pool: Arc<LayerPool>,
    /// Each (image, layer)'s `info`, fixed once made (the kernel keeps its size).
    infos: Mutex<HashMap<(u32, String), Bytes>>,
    /// Reads served, store-wide: background work yields to them.
    pub reads: Arc<ReadStats>,
    /// containers/storage's notices: layers it started using, and stopped using.
    uses: AtomicU64,
    releases: AtomicU64,
}

impl Store {
    /// A store serving with `cfg`, reaching registries through `connect`.
    pub fn new(cfg: StoreConfig, connect: Connect, progress: Progress) -> Arc<Store> {
        let cache = crate::image::block_cache(&cfg.open, cfg.speculate.readahead);
        let reads = Arc::new(ReadStats::default());
        let quiet = reads.clone();
        let serving = LayerServing {
            speculate: cfg.speculate.clone(),
            verify: cfg.open.verify,
            local_copies: cfg.local_copies.clone(),
            idle: Arc::new(move || quiet.idle_for(Duration::from_millis(30))),
        };
        Arc::new(Store {
            cfg,
            connect,
            cache,
            progress,
            serving,
            nodes: Mutex::new(Nodes::default()),
            images: Mutex::new(Images::default()),
            pool: Arc::default(),
            infos: Mutex::new(HashMap::new()),
            reads,
            uses: AtomicU64::new(0),
            releases: AtomicU64::new(0),
        })
    }

    /// The child `name` of directory `parent`: its inode and what it is.
    pub async fn lookup(&self, parent: u64, name: &str) -> Result<(u64, Found)> {
        let missing = || Error::NotFound(format!("{name} in inode {parent}"));
        match self.node(parent)? {
            Node::Place(Place::Root) => {
                let reference = decode_name(name).ok_or_else(missing)?;
                let image = self.image(&reference).await?;
                Ok((self.ino(Place::Image(image.id))?, Found::Dir))
            }
            Node::Place(Place::Image(id)) => {
                crate::digest::validate_digest(name).map_err(|_| missing())?;
                self.listing(id, name).await?;
                Ok((self.ino(Place::Layer(id, name.to_string()))?, Found::Dir))
            }
            Node::Place(Place::Layer(id, digest)) => match name {
                DIFF => {
                    let layer = self.layer(id, &digest).await?;
                    let view = self.nodes.lock().unwrap().view(id, &digest);
                    let view = view.ok_or_else(|| Error::Unsupported("more views".into()))?;
                    let ino = Nodes::diff_ino(view, crate::tree::ROOT).ok_or_else(missing)?;
                    Ok((ino, Found::Layer(layer, crate::tree::ROOT)))
                }
                INFO => {
                    let info = self.info(id, &digest).await?;
                    let ino = self.ino(Place::Info(id, digest))?;
                    Ok((ino, Found::File(info.len() as u64)))
                }
                BLOB => {
                    let size = self.blob_size(id, &digest).await?;
                    let ino = self.ino(Place::Blob(id, digest))?;
                    Ok((ino, Found::File(size)))
                }
                _ => Err(missing()),
            },
            Node::Place(Place::Info(..) | Place::Blob(..)) => {
                Err(Error::Io(std::io::Error::from_raw_os_error(libc::ENOTDIR)))
            }
            Node::Diff { view, local } => {
                let layer = self.view(view).await?;
                let child = layer
                    .served
                    .image
                    .tree
                    .lookup(local, name)
                    .filter(|&c| live(&layer, c))
                    .ok_or_else(missing)?;
                let ino = Nodes::diff_ino(view, child).ok_or_else(missing)?;
                Ok((ino, Found::Layer(layer, child)))
            }
        }
    }

    /// What inode `ino` is.
    pub async fn attr(&self, ino: u64) -> Result<Found> {
        match self.node(ino)? {
            Node::Place(Place::Root | Place::Image(_) | Place::Layer(..)) => Ok(Found::Dir),
            Node::Place(Place::Info(id, digest)) => {
                Ok(Found::File(self.info(id, &digest).await?.len() as u64))
            }
            Node::Place(Place::Blob(id, digest)) => {
                Ok(Found::File(self.blob_size(id, &digest).await?))
            }
            Node::Diff { view, local } => {
                let layer = self.view(view).await?;
                match live(&layer, local) {
                    true => Ok(Found::Layer(layer, local)),
                    false => Err(Error::NotFound(format!("inode {ino}"))),
                }
            }
        }
    }

    /// Reads `len` bytes at `offset` of file `ino`.
    pub async fn read(&self, ino: u64, offset: u64, len: u64) -> Result<Bytes> {
        self.reads.begin();
        let result = self.read_inner(ino, offset, len).await;
        self.reads.end();
        result
    }

    async fn read_inner(&self, ino: u64, offset: u64, len: u64) -> Result<Bytes> {
        match self.node(ino)? {
            Node::Place(Place::Info(id, digest)) => {
                let info = self.info(id, &digest).await?;
                let start = (offset as usize).min(info.len());
                let end = start.saturating_add(len as usize).min(info.len());
                Ok(info.slice(start..end))
            }
            Node::Place(Place::Blob(id, digest)) => {
                self.layer(id, &digest).await?.read_blob(offset, len).await
            }
            Node::Diff { view, local } => self.view(view).await?.read(local, offset, len).await,
            Node::Place(_) => Err(Error::Io(std::io::Error::from_raw_os_error(libc::EISDIR))),
        }
    }

    /// The entries of directory `ino`.
    pub async fn list(&self, ino: u64) -> Result<Listing> {
        let not_dir = || Error::Io(std::io::Error::from_raw_os_error(libc::ENOTDIR));
        match self.node(ino)? {
            Node::Place(Place::Root) => {
                let images = self.images.lock().unwrap().all();
                let mut entries = Vec::new();
                for i in images {
                    entries.push((self.ino(Place::Image(i.id))?, i.name.clone(), Found::Dir));
                }
                Ok(Listing {
                    parent: ROOT,
                    entries,
                })
            }
            Node::Place(Place::Image(id)) => {
                let image = self.entry(id)?;
                let mut entries = Vec::new();
                for l in &image.current().resolved.layers {
                    let ino = self.ino(Place::Layer(id, l.digest.clone()))?;
                    entries.push((ino, l.digest.clone(), Found::Dir));
                }
                Ok(Listing {
                    parent: ROOT,
                    entries,
                })
            }
            Node::Place(Place::Layer(id, _)) => {
                let mut entries = Vec::new();
                for name in [DIFF, INFO, BLOB] {
                    let (ino, found) = self.lookup(ino, name).await?;
                    entries.push((ino, name.to_string(), found));
                }
                let parent = self.ino(Place::Image(id))?;
                Ok(Listing { parent, entries })
            }
            Node::Place(_) => Err(not_dir()),
            Node::Diff { view, local } => {
                let layer = self.view(view).await?;
                let tree = &layer.served.image.tree;
                let node = tree
                    .get(local)
                    .filter(|n| n.kind == crate::layer::Kind::Dir);
                let node = node.ok_or_else(not_dir)?;
                let parent = match local {
                    crate::tree::ROOT => {
                        let (id, digest) = self.view_target(view)?;
                        self.ino(Place::Layer(id, digest))?
                    }
                    _ => Nodes::diff_ino(view, node.parent).unwrap_or(ROOT),
                };
                let mut entries = Vec::with_capacity(node.children.len());
                for (name, &child) in &node.children {
                    if let Some(ino) = Nodes::diff_ino(view, child) {
                        entries.push((ino, name.clone(), Found::Layer(layer.clone(), child)));
                    }
                }
                Ok(Listing { parent, entries })
            }
        }
    }

    /// containers/storage creating `name` in directory `parent`: whether it was the notice
    /// that it uses a layer (`use` in a layer's directory), which a listening store answers
    /// with `ENOENT`.
    pub fn note_use(&self, parent: u64, name: &str) -> bool {
        let notice = name == USE && matches!(self.node(parent), Ok(Node::Place(Place::Layer(..))));
        if notice {
            self.uses.fetch_add(1, Ordering::Relaxed);
        }
        notice
    }

    /// containers/storage removing directory `name` of `parent`: whether it was the notice
    /// that it no longer uses a layer (a layer's directory), answered with `ENOENT`.
    pub fn note_release(&self, parent: u64, name: &str) -> bool {
        let notice = matches!(self.node(parent), Ok(Node::Place(Place::Image(_))))
            && crate::digest::validate_digest(name).is_ok();
        if notice {
            self.releases.fetch_add(1, Ordering::Relaxed);
        }
        notice
    }

    /// Releases idle layers every so often, until the guard drops.
    pub fn start_releasing(self: &Arc<Self>) -> TaskGuard {
        let every =
            (self.cfg.release_after / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let me = Arc::downgrade(self);
        TaskGuard::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(store) = me.upgrade() else { return };
                store.pool.release_idle(store.cfg.release_after);
                let mut images = store.images.lock().unwrap();
                // Resolutions done are kept by the images they made (failures: retried).
                images.resolving.retain(|_, p| !p.done_before(pool::RETRY));
            }
        })
    }

    /// The store's figures for `ocifs stats`: images, opened layers, cache.
    pub fn stats(&self) -> StoreStats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let images = self.images.lock().unwrap().all();
        let images = images
            .iter()
            .map(|i| {
                let r = i.current();
                ImageFigures {
                    reference: i.reference.clone(),
                    digest: r.resolved.manifest_digest.clone(),
                    layers: r.resolved.layers.iter().map(|l| l.digest.clone()).collect(),
                }
            })
            .collect();
        let layers = self
            .pool
            .opened()
            .into_iter()
            .map(|(digest, l)| {
                let mut s = l.stats();
                s.digest = digest;
                s
            })
            .collect();
        let c = &self.cache.stats;
        StoreStats {
            images,
            layers,
            released: load(&self.pool.released),
            uses: load(&self.uses),
            releases: load(&self.releases),
            cache: crate::stats::CacheFigures {
                mem_hits: load(&c.mem_hits),
                disk_hits: load(&c.disk_hits),
                misses: load(&c.misses),
                fetched_bytes: load(&c.fetched_bytes),
                demand_bytes: load(&c.demand_bytes),
            },
        }
    }

    fn node(&self, ino: u64) -> Result<Node> {
        self.nodes
            .lock()
            .unwrap()
            .node(ino)
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))
    }

    fn ino(&self, place: Place) -> Result<u64> {
        self.nodes
            .lock()
            .unwrap()
            .ino(place)
            .ok_or_else(|| Error::Unsupported("more than 2^32 store nodes".into()))
    }

    fn entry(&self, id: u32) -> Result<Arc<images::ImageEntry>> {
        self.images
            .lock()
            .unwrap()
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("image {id}")))
    }

    fn view_target(&self, view: u32) -> Result<(u32, String)> {
        let nodes = self.nodes.lock().unwrap();
        let (id, digest) = nodes
            .view_target(view)
            .ok_or_else(|| Error::NotFound(format!("view {view}")))?;
        Ok((id, digest.to_string()))
    }

    /// The compressed size of layer `digest` of image `id` (the size of its `blob`).
    async fn blob_size(&self, id: u32, digest: &str) -> Result<u64> {
        let listing = self.listing(id, digest).await?;
        let (_, desc, _) = listing
            .layer(digest)
            .ok_or_else(|| Error::NotFound(format!("layer {digest}")))?;
        Ok(desc.size)
    }

    /// Layer `digest`'s `info` in image `id`, made once.
    async fn info(&self, id: u32, digest: &str) -> Result<Bytes> {
        let key = (id, digest.to_string());
        if let Some(b) = self.infos.lock().unwrap().get(&key) {
            return Ok(b.clone());
        }
        let layer = self.layer(id, digest).await?;
        let listing = self.listing(id, digest).await?;
        let (_, desc, diff_id) = listing
            .layer(digest)
            .ok_or_else(|| Error::NotFound(format!("layer {digest}")))?;
        let format = layer.served.image.layers[0].layer.format;
        let info = LayerInfo::new(desc, &diff_id, format, layer.uncompressed_size());
        let mut json =
            serde_json::to_vec(&info).map_err(|e| Error::format("info", e.to_string()))?;
        json.push(b'\n');
        let mut infos = self.infos.lock().unwrap();
        Ok(infos
            .entry(key)
            .or_insert_with(|| Bytes::from(json))
            .clone())
    }
}

/// Whether node `local` of a layer's tree is there (replaced nodes linger unlinked).
fn live(layer: &ServedLayer, local: u64) -> bool {
    (layer.served.image.tree.get(local)).is_some_and(|n| n.nlink > 0 || local == crate::tree::ROOT)
}

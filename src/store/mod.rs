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
//! layer starting to open as soon as the manifest is in); a layer's `diff` is a [`ServedLayer`], opened once however many
//! images share it (`pool.rs`) and released when idle. Unknown references, unreachable
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

pub use images::{LayerInfo, decode_name, encode_name};
pub use nodes::ROOT;

use crate::blob::cache::BlockCache;
use crate::config::OpenConfig;
use crate::error::{Error, Result};
use crate::image::{LayerOpener, Progress, Resolved, Source};
use crate::layer::LayerDesc;
use crate::serve::layer::{LayerServing, ServedLayer};
use crate::speculate::SpeculateConfig;
use crate::stats::{ImageFigures, ReadStats, StoreStats};
use crate::task::TaskGuard;
use bytes::Bytes;
use futures::FutureExt;
use images::{Images, ResolvedImage};
use nodes::{Node, Nodes, Place};
use pending::Pending;
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

    /// The entry of `reference`, resolving it (once, however many ask) if it has none.
    async fn image(&self, reference: &str) -> Result<Arc<images::ImageEntry>> {
        if let Some(e) = self.images.lock().unwrap().by_reference(reference) {
            return Ok(e);
        }
        let resolved = self.resolve(reference).await?;
        Ok(self.images.lock().unwrap().insert(reference, resolved))
    }

    /// Resolves `reference` (joining a resolution under way), within the lookup timeout.
    async fn resolve(&self, reference: &str) -> Result<Arc<ResolvedImage>> {
        let pending = {
            let mut images = self.images.lock().unwrap();
            match images.resolving.get(reference) {
                Some(p) if !p.failed_before(pool::RETRY) && !is_stale(p) => p.clone(),
                _ => {
                    let p = self.start_resolving(reference);
                    images.resolving.insert(reference.to_string(), p.clone());
                    p
                }
            }
        };
        let what = format!("resolving {reference}");
        pending
            .wait(self.cfg.lookup_timeout, &what)
            .await
            .map_err(|e| shared(&e, &what))
    }

    /// Starts resolving `reference`: its manifest, then (as soon as the manifest is in)
    /// every layer opening beside the config, which a layer needs only at the end of its
    /// opening (one round trip less before the runtime's first layer is ready).
    fn start_resolving(&self, reference: &str) -> Arc<Pending<ResolvedImage>> {
        let connect = self.connect.clone();
        let (reference, cfg) = (reference.to_string(), self.cfg.open.clone());
        let (cache, progress) = (self.cache.clone(), self.progress.clone());
        let opening = self.opening();
        let timeout = self.cfg.lookup_timeout;
        Pending::start(async move {
            let (source, what) = connect(&reference)?;
            // Connections for the config and the layers' first reads, opened while the
            // manifest is on its way (as a mount does).
            source.warm();
            let mut resolved =
                crate::image::manifest::resolve_manifest(&source, &what, &cfg.platform).await?;
            // Published indexes are fetched as soon as they are found (those of layers
            // whose index is kept here are not).
            let opener = LayerOpener::new(source.clone(), &resolved, cfg, cache, progress);
            let opener = Arc::new(opener.fetch_indexes_early(&resolved.layers));
            let (config_tx, config_rx) = tokio::sync::oneshot::channel::<Arc<Resolved>>();
            let config_rx = config_rx.shared();
            let opens: Vec<_> = (resolved.layers.iter())
                .map(|desc| {
                    let what = format!("the config of {reference}");
                    let image = config_rx.clone().map(move |r| {
                        r.map_err(|_| Error::Registry(format!("{what} could not be fetched")))
                    });
                    opening.get(&opener, desc, image)
                })
                .collect();
            resolved.config = crate::image::manifest::fetch_config(&source, &resolved).await?;
            let resolved = Arc::new(resolved);
            let _ = config_tx.send(resolved.clone());
            tracing::info!("resolved {reference}: {}", resolved.manifest_digest);
            // Once the layers have opened (or failed), what none of them took goes.
            let forget = opener.clone();
            let forget = TaskGuard::spawn(async move {
                for open in opens {
                    let _ = open.wait(timeout, "opening a layer").await;
                }
                forget.forget_early_indexes();
            });
            Ok(ResolvedImage {
                resolved,
                opener,
                at: std::time::Instant::now(),
                _forget: forget,
            })
        })
    }

    /// The resolution of image `id` that lists layer `digest`, resolving the reference
    /// again when the layer is missing from an old resolution (the tag may have moved).
    async fn listing(&self, id: u32, digest: &str) -> Result<Arc<ResolvedImage>> {
        let image = self.entry(id)?;
        if let Some(r) = image.listing(digest) {
            return Ok(r);
        }
        let missing = || Error::NotFound(format!("layer {digest} of {}", image.reference));
        if image.current().at.elapsed() < REFRESH_ON_MISS {
            return Err(missing());
        }
        let newer = self.resolve(&image.reference).await?;
        if newer.resolved.manifest_digest != image.current().resolved.manifest_digest {
            tracing::info!(
                "{} has moved to {}",
                image.reference,
                newer.resolved.manifest_digest
            );
        }
        image.update(newer);
        image.listing(digest).ok_or_else(missing)
    }

    /// Layer `digest` of image `id`, opened (or joining its opening), within the lookup
    /// timeout.
    async fn layer(&self, id: u32, digest: &str) -> Result<Arc<ServedLayer>> {
        if let Some(l) = self.pool.open_now(digest) {
            return Ok(l);
        }
        let listing = self.listing(id, digest).await?;
        let (_, desc, _) = listing
            .layer(digest)
            .ok_or_else(|| Error::NotFound(format!("layer {digest}")))?;
        let image = futures::future::ready(Ok(listing.resolved.clone()));
        let pending = self.opening().get(&listing.opener, desc, image);
        let what = format!("opening layer {digest}");
        pending
            .wait(self.cfg.lookup_timeout, &what)
            .await
            .map_err(|e| shared(&e, &what))
    }

    /// The layer view `view` shows.
    async fn view(&self, view: u32) -> Result<Arc<ServedLayer>> {
        let (id, digest) = self.view_target(view)?;
        self.layer(id, &digest).await
    }

    /// What opening a layer takes from the store.
    fn opening(&self) -> Opening {
        Opening {
            pool: self.pool.clone(),
            serving: self.serving.clone(),
        }
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

/// What opening a layer takes from the store: cheap to clone into a resolution's task.
#[derive(Clone)]
struct Opening {
    pool: Arc<LayerPool>,
    serving: LayerServing,
}

impl Opening {
    /// Layer `desc` from the pool, opened through `opener` if it is neither open nor under
    /// way; `image` gives the image with its config (see [`ServedLayer::open`]).
    fn get(
        &self,
        opener: &Arc<LayerOpener>,
        desc: &LayerDesc,
        image: impl Future<Output = Result<Arc<Resolved>>> + Send + 'static,
    ) -> Arc<Pending<ServedLayer>> {
        self.pool.get(&desc.digest, || {
            let (opener, desc) = (opener.clone(), desc.clone());
            let (serving, trees) = (self.serving.clone(), self.pool.trees());
            Pending::start(async move {
                let layer = ServedLayer::open(&opener, &desc, image, &serving).await?;
                let digest = &desc.digest;
                trees.check(digest, layer.served.image.tree.node_count())?;
                tracing::info!(
                    "opened layer {digest}: {}",
                    layer.served.image.layer_summary()
                );
                Ok(layer)
            })
        })
    }
}

/// Whether node `local` of a layer's tree is there (replaced nodes linger unlinked).
fn live(layer: &ServedLayer, local: u64) -> bool {
    (layer.served.image.tree.get(local)).is_some_and(|n| n.nlink > 0 || local == crate::tree::ROOT)
}

/// A resolution done long enough ago to be looked up again rather than joined (it stays in
/// `resolving` only until the releaser prunes it, or a failure is retried).
fn is_stale(p: &Pending<ResolvedImage>) -> bool {
    matches!(p.now(), Some(Ok(r)) if r.at.elapsed() > REFRESH_ON_MISS)
}

/// An error several waiters share, as an error of this caller's: the same kind (so the
/// same errno) where it can be copied, else a registry error naming `what` failed.
fn shared(e: &Arc<Error>, what: &str) -> Error {
    match &**e {
        Error::NotFound(m) => Error::NotFound(m.clone()),
        Error::Unsupported(m) => Error::Unsupported(m.clone()),
        Error::BadLayer { digest, reason } => Error::BadLayer {
            digest: digest.clone(),
            reason: reason.clone(),
        },
        Error::Io(io) if io.raw_os_error().is_some() => Error::Io(
            std::io::Error::from_raw_os_error(io.raw_os_error().unwrap_or(libc::EIO)),
        ),
        other => Error::Registry(format!("{what}: {other}")),
    }
}

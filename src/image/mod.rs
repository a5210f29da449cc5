//! An opened image: resolved manifest, opened layers and merged tree — the FUSE-free core
//! that `mount`, `ls` and `cat` all read through. What a mount adds on top (statistics, local
//! copies, speculation) is in [`crate::serve`] and [`crate::speculate`].

pub mod export;
pub mod manifest;
mod open;
pub mod runconfig;
pub mod share;
pub mod source;

pub use manifest::{Platform, Resolved, resolve};
pub use source::Source;

use crate::blob::Blob;
use crate::blob::cache::{BlockCache, ReadAhead};
use crate::blob::counting::CountingBlob;
use crate::config::{OpenConfig, VerifyMode};
use crate::error::{Error, Result};
use crate::layer::{Entry, Format, Health, Layer, LayerDesc};
use crate::task::TaskGuard;
use crate::tree::Tree;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;

/// Progress callback: (layer digest, bytes done, bytes total).
pub type Progress = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// An image ready to be read.
pub struct Image {
    pub resolved: Resolved,
    /// Where it is read from (for a registry: the hosts, and what each served).
    pub source: Source,
    /// Opened layers, lowest first.
    pub layers: Vec<OpenedLayer>,
    pub tree: Tree,
}

/// One opened layer: its reader, its blob as verification reads it, and its network counter.
pub struct OpenedLayer {
    pub layer: Arc<Layer>,
    /// The layer's blob through the block cache: verification reads it, so that it checks
    /// the bytes served and doubles as the background fetch that makes later reads local.
    pub blob: Blob,
    /// Network bytes and requests of the layer's blob (and of what is fetched on its behalf).
    pub counter: Arc<CountingBlob>,
    /// The fetch of the front the layer's descriptor announced, while it runs (see
    /// [`OpenConfig::fetch_announced_front`]); it ends with the layer.
    _front: Option<TaskGuard>,
    /// The fetch of a small layer streamed in whole as it was opened (see
    /// [`OpenConfig::fetch_small_layers`]), until [`OpenedLayer::stop_small_fetch`].
    small_fetch: std::sync::Mutex<Option<TaskGuard>>,
}

impl OpenedLayer {
    /// Stops streaming the layer in whole, if it was a small layer opened so: a planned
    /// prefetch found once the mount is ready (prioritized files without an announced
    /// front) brings what the start reads instead.
    pub fn stop_small_fetch(&self) {
        self.small_fetch.lock().unwrap().take();
    }
}

/// The block cache `cfg` describes (memory bound, block and fetch sizes, `CACHE_DIR/blocks`),
/// with `readahead` for sequential readers.
pub fn block_cache(cfg: &OpenConfig, readahead: ReadAhead) -> Arc<BlockCache> {
    let blocks = cfg.cache_dir.join("blocks");
    BlockCache::new(
        cfg.block_size,
        cfg.fetch_size,
        cfg.cache_size,
        Some(blocks),
        readahead,
    )
}

/// Opens the layers of one resolved image, one at a time or all at once: what every layer of
/// an image is opened with (its source, the configuration, the block cache, and the indexes
/// published for the image, looked up once for all its layers). A mount opens every layer
/// before it is ready; the layer store opens each when it is first asked for.
pub struct LayerOpener {
    source: Source,
    cfg: OpenConfig,
    cache: Arc<BlockCache>,
    progress: Progress,
    manifest_digest: String,
    soci_index: Option<String>,
    published: tokio::sync::OnceCell<HashMap<String, share::Published>>,
    /// Those indexes being fetched since they were found (see [`open::Ctx::fetched`]).
    fetched: tokio::sync::OnceCell<open::Fetched>,
    /// Each layer's compressed size, by digest, once [`LayerOpener::fetch_indexes_early`]
    /// asked for it (a SOCI zTOC is read against it).
    sizes: HashMap<String, u64>,
    /// Bytes the decoded copies of first passes may still take, all layers together.
    copy_budget: Arc<std::sync::atomic::AtomicU64>,
    /// How many ranges each layer's tail is asked for as (see [`open::tail_ranges`]).
    tail_ranges: u64,
    /// The small layers streamed in whole as they are opened (see
    /// [`OpenConfig::fetch_small_layers`]).
    small: std::collections::HashSet<String>,
}

impl LayerOpener {
    /// An opener for the layers of `resolved` (found in `source`), read through `cache`.
    pub fn new(
        source: Source,
        resolved: &Resolved,
        cfg: OpenConfig,
        cache: Arc<BlockCache>,
        progress: Progress,
    ) -> Self {
        let cfg_copy_bound = cfg.disk_cache_size;
        let cfg_small_layers = cfg.fetch_small_layers;
        LayerOpener {
            source,
            cfg,
            cache,
            progress,
            manifest_digest: resolved.manifest_digest.clone(),
            soci_index: resolved
                .annotations
                .get(crate::layer::checkpoint::soci::INDEX_ANNOTATION)
                .cloned(),
            published: tokio::sync::OnceCell::new(),
            fetched: tokio::sync::OnceCell::new(),
            sizes: HashMap::new(),
            copy_budget: Arc::new(std::sync::atomic::AtomicU64::new(cfg_copy_bound)),
            tail_ranges: open::tail_ranges(&resolved.layers),
            small: small_at_open(&resolved.layers, cfg_small_layers),
        }
    }

    /// Fetches the published indexes of `layers` as soon as they are found, for an opener
    /// about to open those layers at once (a mount; the layer store as it resolves an
    /// image). An index no layer takes is kept until the opener is dropped or
    /// [`LayerOpener::forget_early_indexes`] is called.
    pub fn fetch_indexes_early(mut self, layers: &[LayerDesc]) -> Self {
        let sizes = layers.iter().map(|d| (d.digest.clone(), d.size));
        self.sizes = sizes.collect();
        self
    }

    /// Drops the indexes fetched early that no layer has taken (a layer opened later fetches
    /// its own), for an opener that outlives the openings it was made for (the layer store's).
    pub fn forget_early_indexes(&self) {
        if let Some(fetched) = self.fetched.get() {
            fetched.lock().unwrap().clear();
        }
    }

    /// The configuration layers are opened with.
    pub fn config(&self) -> &OpenConfig {
        &self.cfg
    }

    /// The block cache layers are read through.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The block cache layers are read through.
    pub fn cache(&self) -> &Arc<BlockCache> {
        &self.cache
    }

    /// Detects the format of the layer `desc` names and indexes it: the opened layer and
    /// its entries.
    pub async fn open(&self, desc: &LayerDesc) -> Result<(OpenedLayer, Vec<Entry>)> {
        let ctx = open::Ctx {
            source: &self.source,
            cache: self.cache.clone(),
            cfg: &self.cfg,
            progress: self.progress.clone(),
            manifest_digest: self.manifest_digest.clone(),
            soci_index: self.soci_index.clone(),
            published: &self.published,
            fetched: &self.fetched,
            sizes: &self.sizes,
            copy_budget: &self.copy_budget,
            tail_ranges: self.tail_ranges,
        };
        let counter = Arc::new(CountingBlob::new(
            self.source.blob(&desc.digest, desc.size)?,
        ));
        let raw: Blob = counter.clone();
        let blob = self.cache.wrap(raw);
        let (front, small) = match self.fetch_front(desc, &blob) {
            Some((fetch, true)) => (None, Some(fetch)),
            Some((fetch, false)) => (Some(fetch), None),
            None => (None, None),
        };
        let (layer, entries) = ctx.open_layer(desc, &counter).await?;
        let opened = OpenedLayer {
            layer: Arc::new(layer),
            blob,
            counter,
            _front: front,
            small_fetch: std::sync::Mutex::new(small),
        };
        Ok((opened, entries))
    }

    /// Starts streaming the front of `desc`'s blob into the block cache, when the blob is
    /// a registry's: the front its descriptor announces as the prioritized files
    /// ([`PREFETCH_SIZE_ANNOTATION`]) when asked to, or a small layer whole (all but the
    /// tail its opening reads; see [`OpenConfig::fetch_small_layers`]). It then arrives
    /// beside the TOC, where the planned prefetch would only start it once the mount is
    /// ready (a start waits for those bytes first). The announcement is only a hint (see
    /// [`announced_front`]): what is fetched is served only as the TOC locates it, checked
    /// as every chunk is. The fetch, and whether it is a small layer's.
    ///
    /// [`PREFETCH_SIZE_ANNOTATION`]: crate::layer::estargz::PREFETCH_SIZE_ANNOTATION
    fn fetch_front(&self, desc: &LayerDesc, blob: &Blob) -> Option<(TaskGuard, bool)> {
        if !matches!(self.source, Source::Registry { .. }) {
            return None;
        }
        let announced = announced_front(desc).filter(|_| self.cfg.fetch_announced_front);
        let small = announced.is_none() && self.small.contains(&desc.digest);
        let len = match (announced, small) {
            (Some(len), _) => len,
            (None, true) => desc.size,
            (None, false) => return None,
        };
        let len = front_before_tail(desc, len, self.cfg.block_size);
        if len == 0 {
            return None;
        }
        let what = if small {
            "the small layer"
        } else {
            "the announced front of"
        };
        let (blob, digest) = (blob.clone(), desc.digest.clone());
        let fetch = TaskGuard::spawn(async move {
            match blob.prefetch(0, len).await {
                Ok(()) => tracing::debug!("fetched {what} {digest}: {len} bytes"),
                Err(e) => tracing::debug!("fetching {what} {digest}: {e}"),
            }
        });
        Some((fetch, small))
    }
}

impl Image {
    /// Resolves `reference` in `source` and opens every layer (in parallel), reading registry
    /// blobs through `cache`.
    pub async fn open(
        source: &Source,
        reference: &str,
        cfg: &OpenConfig,
        cache: &Arc<BlockCache>,
        progress: Progress,
    ) -> Result<Image> {
        // Connections for what follows the manifest, opened while it is on its way.
        source.warm();
        let mut resolved = manifest::resolve_manifest(source, reference, &cfg.platform).await?;
        let opener = LayerOpener::new(
            source.clone(),
            &resolved,
            cfg.clone(),
            cache.clone(),
            progress,
        )
        .fetch_indexes_early(&resolved.layers);
        // The config is not needed to open layers: fetch it alongside (one round trip less).
        let config = manifest::fetch_config(source, &resolved);
        let opened = futures::future::try_join_all(resolved.layers.iter().map(|d| opener.open(d)));
        let (config, opened) = futures::future::try_join(config, opened).await?;
        resolved.config = config;
        let (layers, entries): (Vec<_>, Vec<Vec<Entry>>) = opened.into_iter().unzip();
        if cfg.verify == VerifyMode::Strict {
            verify_now(&layers, &manifest::diff_ids(&resolved.config)).await?;
        }
        let tree = Tree::build(&entries);
        Ok(Image {
            resolved,
            source: source.clone(),
            layers,
            tree,
        })
    }

    /// `len` bytes at `offset` of the regular file `ino`, read through its layer: nothing
    /// counted, recorded or guessed (that is [`crate::serve::ServedImage::read`]).
    pub async fn read_file(&self, ino: u64, offset: u64, len: u64) -> Result<Bytes> {
        self.read_file_as(ino, offset, len, false).await
    }

    /// [`Image::read_file`] without waiting behind fetches under way (see
    /// [`crate::blob::ReadHints::read_now`]): for the few small reads whose answer decides
    /// what to fetch next.
    pub async fn read_file_now(&self, ino: u64, offset: u64, len: u64) -> Result<Bytes> {
        self.read_file_as(ino, offset, len, true).await
    }

    async fn read_file_as(&self, ino: u64, offset: u64, len: u64, now: bool) -> Result<Bytes> {
        let node = self
            .tree
            .get(ino)
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))?;
        let Some((li, loc)) = &node.data else {
            return Ok(Bytes::new());
        };
        let layer = &self.layers[*li].layer;
        match now {
            true => layer.read_now(loc, node.size, offset, len).await,
            false => layer.read(loc, node.size, offset, len).await,
        }
    }

    /// One line per layer: format, and where a gzip layer's index came from.
    pub fn layer_summary(&self) -> String {
        let formats: Vec<String> = self
            .layers
            .iter()
            .map(|l| match l.layer.index_source {
                Some(src) => format!("{} (index {src})", l.layer.format.name()),
                None => l.layer.format.name().to_string(),
            })
            .collect();
        format!("{} layers ({})", self.layers.len(), formats.join(", "))
    }
}

/// How many bytes at the start of `desc`'s blob its annotation announces as the prioritized
/// files, for a layer that also announces a TOC (eStargz, zstd:chunked); never into the
/// tail the TOC is read from, whose read must not wait behind the front. `None` when it
/// announces nothing usable (absent, not a number, zero).
fn announced_front(desc: &LayerDesc) -> Option<u64> {
    let toc = Format::from_media_type(&desc.media_type)
        .is_ok_and(|f| crate::layer::detect::announces_toc(f, desc));
    let text = desc
        .annotations
        .get(crate::layer::estargz::PREFETCH_SIZE_ANNOTATION)
        .filter(|_| toc)?;
    let room = desc
        .size
        .saturating_sub(crate::layer::detect::toc_tail(desc));
    let len = text.trim().parse::<u64>().ok()?.min(room);
    (len > 0).then_some(len)
}

/// Which of layers of `sizes` (compressed bytes) are fetched whole as small layers: those
/// of at most `max`, smallest first, while their total stays within `max`.
pub fn small_layers(sizes: &[u64], max: u64) -> Vec<usize> {
    let mut small: Vec<usize> = (0..sizes.len()).filter(|&i| sizes[i] <= max).collect();
    small.sort_by_key(|&i| sizes[i]);
    let mut total = 0u64;
    small.retain(|&i| {
        total = total.saturating_add(sizes[i]);
        total <= max
    });
    small
}

/// The digests of the small layers of `layers` to stream in whole as they are opened (see
/// [`OpenConfig::fetch_small_layers`]): none when a layer announces a front.
fn small_at_open(layers: &[LayerDesc], max: u64) -> std::collections::HashSet<String> {
    if max == 0 || layers.iter().any(|d| announced_front(d).is_some()) {
        return Default::default();
    }
    let sizes: Vec<u64> = layers.iter().map(|d| d.size).collect();
    let small = small_layers(&sizes, max).into_iter();
    small.map(|i| layers[i].digest.clone()).collect()
}

/// The bytes at the end of `desc`'s blob that opening the layer reads itself (its TOC, or
/// a footer's worth where one may be), which a fetch of the rest leaves to it.
fn opening_tail(desc: &LayerDesc) -> u64 {
    use crate::layer::detect;
    let Ok(format) = Format::from_media_type(&desc.media_type) else {
        return 0;
    };
    if detect::announces_toc(format, desc) {
        detect::toc_tail(desc)
    } else if detect::may_have_footer(format) {
        crate::blob::SMALL_TAIL_READ
    } else {
        0
    }
}

/// At most `len` bytes from the start of `desc`'s blob, ending before the block cache's
/// block (of `block` bytes) that holds the first byte opening the layer reads: a fetch of
/// the front must not claim a block that read would then wait for behind the whole front.
fn front_before_tail(desc: &LayerDesc, len: u64, block: u64) -> u64 {
    let tail_start = desc.size.saturating_sub(opening_tail(desc));
    let block = block.max(1);
    match tail_start == desc.size {
        true => len.min(desc.size),
        false => len.min(tail_start / block * block),
    }
}

/// Checks `layers` against their digests (and `diff_ids`, for indexes from the registry)
/// before they are served, as `--verify strict` asks: the first bad layer is the error.
pub async fn verify_now(layers: &[OpenedLayer], diff_ids: &[String]) -> Result<()> {
    let pairs: Vec<_> = layers.iter().map(|l| (&*l.layer, &l.blob)).collect();
    // Strict: a layer the network kept from being verified fails too.
    crate::verify::verify_layers(&pairs, diff_ids, &|| true).await?;
    for l in layers {
        if let Health::Bad(reason) = &*l.layer.health.read().unwrap() {
            return Err(Error::BadLayer {
                digest: l.layer.digest.clone(),
                reason: reason.clone(),
            });
        }
    }
    Ok(())
}

/// A layer's format as `inspect` reports it (see [`crate::layer::detect::probe`]).
pub async fn probe_format(source: &Source, desc: &LayerDesc) -> Result<Option<Format>> {
    crate::layer::detect::probe(desc, || source.blob(&desc.digest, desc.size)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_layers_are_chosen_smallest_first_within_one_bound() {
        const MIB: u64 = 1 << 20;
        // The realistic image: a 55 MiB base, the 8 MiB standard library, a tiny app layer.
        assert_eq!(
            small_layers(&[55 * MIB, 8 * MIB, 2000], 16 * MIB),
            vec![2, 1]
        );
        // Five 5 MiB layers: three fit in 16 MiB, the rest are left to reads.
        assert_eq!(small_layers(&[5 * MIB; 5], 16 * MIB), vec![0, 1, 2]);
        // A layer of exactly the bound alone fits; nothing with a bound of 0.
        assert_eq!(small_layers(&[16 * MIB, 17 * MIB], 16 * MIB), vec![0]);
        assert!(small_layers(&[1, 2, 3], 0).is_empty());
        assert!(small_layers(&[], 16 * MIB).is_empty());
    }

    #[test]
    fn small_layers_stream_in_at_open_unless_a_layer_announces_a_front() {
        let layer = |digest: &str, size: u64, front: Option<&str>| LayerDesc {
            digest: digest.into(),
            size,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            annotations: [
                (
                    crate::layer::estargz::TOC_DIGEST_ANNOTATION,
                    Some("sha256:t"),
                ),
                (crate::layer::estargz::PREFETCH_SIZE_ANNOTATION, front),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?.to_string())))
            .collect(),
        };
        let plain = [
            layer("sha256:base", 60 << 20, None),
            layer("sha256:lib", 8 << 20, None),
            layer("sha256:app", 1000, None),
        ];
        let small = small_at_open(&plain, 16 << 20);
        let mut names: Vec<_> = small.iter().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["sha256:app", "sha256:lib"]);
        assert!(small_at_open(&plain, 0).is_empty(), "turned off");
        // A layer announcing its prioritized files: the front is what a start reads first.
        let mut fronted = plain.clone();
        fronted[0] = layer("sha256:base", 60 << 20, Some("7000000"));
        assert!(small_at_open(&fronted, 16 << 20).is_empty());
        // What opening reads itself is left out: the TOC an offset names, else a footer's.
        let mut hinted = layer("sha256:lib", 8 << 20, None);
        let toc_at = (8 << 20) - 300_000;
        (hinted.annotations).insert(
            crate::layer::estargz::TOC_OFFSET_ANNOTATION.into(),
            toc_at.to_string(),
        );
        assert_eq!(opening_tail(&hinted), 300_000);
        // A front ends before the block holding the tail's first byte.
        let block = 64 << 10;
        let end = front_before_tail(&hinted, u64::MAX, block);
        assert_eq!(end, ((8 << 20) - 300_000) / block * block);
        assert_eq!(front_before_tail(&hinted, 1000, block), 1000);
        hinted.annotations.clear();
        assert_eq!(opening_tail(&hinted), crate::blob::SMALL_TAIL_READ);
        // A tar layer has no footer: nothing is read at its end, all of it may be fetched.
        let mut tar = hinted.clone();
        tar.media_type = "application/vnd.oci.image.layer.v1.tar".into();
        assert_eq!(opening_tail(&tar), 0);
        assert_eq!(front_before_tail(&tar, u64::MAX, block), 8 << 20);
    }

    #[test]
    fn an_announced_front_is_a_hint_bounded_by_the_blob_before_its_tail() {
        let tail = crate::blob::TAIL_READ;
        let desc = |value: Option<&str>, toc: bool| LayerDesc {
            digest: "sha256:l".into(),
            size: tail + 1000,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            annotations: value
                .map(|v| {
                    (
                        crate::layer::estargz::PREFETCH_SIZE_ANNOTATION.into(),
                        v.into(),
                    )
                })
                .into_iter()
                .chain(toc.then(|| {
                    let key = crate::layer::estargz::TOC_DIGEST_ANNOTATION;
                    (key.into(), format!("sha256:{}", "0".repeat(64)))
                }))
                .collect(),
        };
        assert_eq!(announced_front(&desc(Some("400"), true)), Some(400));
        assert_eq!(
            announced_front(&desc(Some("99999999999"), true)),
            Some(1000)
        );
        for nothing in [None, Some("0"), Some("-5"), Some("lots"), Some("")] {
            assert_eq!(announced_front(&desc(nothing, true)), None, "{nothing:?}");
        }
        // Only beside a TOC: a plain gzip layer's annotation is not ours to trust.
        assert_eq!(announced_front(&desc(Some("400"), false)), None);
    }
}

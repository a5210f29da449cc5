//! Opening one layer: decide its format (`layer::detect`: media type, then the footer) and
//! index it.
//! For plain gzip layers the checkpoint index comes from, in order: the cache directory, an
//! index published next to the image in the registry, or a build pass over the blob.

use super::{Progress, Source, share};
use crate::blob::cache::BlockCache;
use crate::blob::counting::CountingBlob;
use crate::blob::{Blob, healing};
use crate::config::{OpenConfig, VerifyMode};
use crate::error::Result;
use crate::layer::checkpoint::{self, CheckpointIndex, Codec};
use crate::layer::{
    Entry, Format, Health, IndexCheck, Layer, LayerData, LayerDesc, chunked, detect, estargz,
    streamed, tar, zstdchunked,
};
use crate::task::TaskGuard;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// What every layer of one image is opened with.
pub(super) struct Ctx<'a> {
    pub source: &'a Source,
    pub cache: Arc<BlockCache>,
    pub cfg: &'a OpenConfig,
    pub progress: Progress,
    pub manifest_digest: String,
    /// The SOCI v2 index the image manifest names, if any.
    pub soci_index: Option<String>,
    /// Indexes published in the registry, looked up once, on first need.
    pub published: &'a tokio::sync::OnceCell<HashMap<String, share::Published>>,
    /// Those indexes being fetched, by layer digest, until a layer takes its own; started
    /// once they are found when every layer is opened at once ([`LayerOpener`]'s
    /// `fetch_indexes_early`).
    pub fetched: &'a tokio::sync::OnceCell<Fetched>,
    /// Each layer's compressed size, by digest; empty when indexes are not fetched early.
    pub sizes: &'a HashMap<String, u64>,
    /// Bytes the decoded copies of first passes may still take (see [`checkpoint::CopyTo`]).
    pub copy_budget: &'a Arc<std::sync::atomic::AtomicU64>,
    /// How many ranges a large tail is asked for as ([`tail_ranges`]).
    pub tail_ranges: u64,
}

/// Published indexes being fetched, by layer digest (see [`Ctx::fetched`]).
pub(super) type Fetched = std::sync::Mutex<HashMap<String, TaskGuard<IndexFetch>>>;

/// A published index fetched and checked, with its encoding (see [`share::fetch`]).
type IndexFetch = Result<(checkpoint::CheckpointIndex, bytes::Bytes)>;

/// How many ranges each large announced tail (one that is not the whole blob) is asked for
/// as, at once: the connections [`Source::warm`] opens shared among those tails, so that the
/// ranges find them open instead of each waiting for a new one (four ranges on four warm
/// connections gained nothing), between 1 and [`crate::blob::SPREAD_PIECES`].
pub(super) fn tail_ranges(layers: &[LayerDesc]) -> u64 {
    let large = layers
        .iter()
        .filter(|d| {
            Format::from_media_type(&d.media_type).is_ok_and(|f| detect::announces_toc(f, d))
        })
        .filter(|d| d.size > detect::toc_tail(d))
        .count() as u64;
    (crate::registry::WARM_CONNECTIONS as u64 / large.max(1)).clamp(1, crate::blob::SPREAD_PIECES)
}

impl Ctx<'_> {
    /// A chunked layer's data, decoding chunks too large for memory into the cache directory.
    fn chunked(&self, reader: chunked::Reader) -> LayerData {
        LayerData::Chunked(Box::new(reader.spill_to(chunked::Spill {
            dir: self.cfg.cache_dir.join("chunks"),
            max: self.cfg.disk_cache_size,
        })))
    }

    /// Detects the format of one layer and indexes it.
    /// `counter` is the layer's blob, counting what is fetched for it.
    pub async fn open_layer(
        &self,
        desc: &LayerDesc,
        counter: &Arc<CountingBlob>,
    ) -> Result<(Layer, Vec<Entry>)> {
        let raw: Blob = counter.clone();
        let media = Format::from_media_type(&desc.media_type)?;
        // A local layout's blob is a file already: reads of it go to the file (and the page
        // cache), not into the block cache, whose directory would only hold a second copy.
        let cached = match self.source {
            Source::Layout { .. } => raw.clone(),
            Source::Registry { .. } => self.cache.wrap(raw.clone()),
        };
        let initial = if self.cfg.verify == VerifyMode::Off {
            Health::Unverified
        } else {
            Health::Pending
        };
        // Every gzip layer may be eStargz, every zstd one zstd:chunked: the footer tells (one
        // tail read, reused for the TOC). Without an annotation announcing the TOC the layer is
        // most likely plain: the tail read is small, and the registry is asked for published
        // indexes meanwhile.
        let announced = detect::announces_toc(media, desc).then(|| detect::toc_tail(desc));
        let (tail_start, tail) = if detect::may_have_footer(media) {
            self.tail(&cached, announced).await?
        } else {
            (0, Bytes::new())
        };
        let format = detect::from_tail(media, &tail);
        let mut index_source = None;
        let mut index_check = None;
        // Headers, footers and TOCs that fail their checks may have arrived damaged: they
        // are read once more from fresh bytes before the layer is refused.
        let what = format!("opening layer {}", desc.digest);
        let whole = (0, cached.size());
        let mut first_tail = Some((tail_start, tail));
        let mut tail = || {
            let first = first_tail.take();
            let cached = &cached;
            async move {
                match first {
                    Some(t) => Ok(t),
                    None => self.tail(cached, announced).await,
                }
            }
        };
        let (data, entries, health) = match format {
            Format::Tar => (
                LayerData::Tar(cached.clone()),
                healing(&cached, whole, &what, || tar::index(cached.clone())).await?,
                initial,
            ),
            Format::Estargz | Format::LegacyStargz => {
                let toc_digest = desc
                    .annotations
                    .get(estargz::TOC_DIGEST_ANNOTATION)
                    .map(String::as_str);
                let (reader, entries, _) = healing(&cached, whole, &what, || {
                    let (tail, cached) = (tail(), cached.clone());
                    async move {
                        let (start, bytes) = tail.await?;
                        estargz::open(cached, start, bytes, toc_digest).await
                    }
                })
                .await?;
                (self.chunked(reader), entries, initial)
            }
            Format::ZstdChunked => {
                let checksum = zstdchunked::CHECKSUM_ANNOTATIONS
                    .iter()
                    .find_map(|a| desc.annotations.get(*a))
                    .map(String::as_str);
                let (reader, entries) = healing(&cached, whole, &what, || {
                    let (tail, cached) = (tail(), cached.clone());
                    async move {
                        let (start, bytes) = tail.await?;
                        zstdchunked::open(cached, start, bytes, checksum).await
                    }
                })
                .await?;
                (self.chunked(reader), entries, initial)
            }
            Format::Gzip => {
                let (index, from, trust, copy) = self.index(cached.clone(), Codec::Gzip).await?;
                index_source = Some(from);
                if let Some(file) = copy {
                    // The pass that built the index checked the blob's digest and left the
                    // decoded tar: reads of it need no decoding (nor the network) at all.
                    let tar =
                        crate::blob::FileBlob::from_file(format!("{}/tar", desc.digest), file)?;
                    let entries = index.entries;
                    let layer = Layer {
                        digest: desc.digest.clone(),
                        format,
                        data: LayerData::Tar(Arc::new(tar)),
                        health: RwLock::new(Health::Verified),
                        index_source,
                        index_check: None,
                        entries_read: None,
                    };
                    return Ok((layer, entries));
                }
                let windows = (index.windows.as_ref())
                    .filter(|_| self.cfg.mark_windows)
                    .and_then(|w| self.windows(w, counter));
                let (data, entries, health, check) =
                    indexed_layer(index, cached, windows, trust, initial);
                index_check = check;
                (data, entries, health)
            }
            Format::Zstd => {
                // Multi-frame zstd is lazy through a frame index; a single frame is not
                // seekable, so it is unpacked once (from the blocks the pass already cached).
                let unpacked = streamed::tar_path(&self.cfg.cache_dir, &desc.digest).exists();
                match unpacked {
                    false => match self.index(cached.clone(), Codec::Zstd).await? {
                        (index, from, trust, _) if index.checkpoints.len() > 1 => {
                            index_source = Some(from);
                            let (data, entries, health, check) =
                                indexed_layer(index, cached, None, trust, initial);
                            index_check = check;
                            (data, entries, health)
                        }
                        _ => self.streamed(cached, format).await?,
                    },
                    true => self.streamed(cached, format).await?,
                }
            }
        };
        // An uncompressed tar's entries were read before any digest vouched for them.
        let entries_read = (format == Format::Tar && health == Health::Pending)
            .then(|| crate::layer::checkpoint::file::entries_digest(&entries));
        let layer = Layer {
            digest: desc.digest.clone(),
            format,
            data,
            health: RwLock::new(health),
            index_source,
            index_check,
            entries_read,
        };
        Ok((layer, entries))
    }

    /// Reads a layer's tail for its footer: when a TOC is `announced`, as many bytes as that
    /// says (see [`detect::toc_tail`]: the TOC usually arrives whole), else a small read,
    /// while the registry is asked for published indexes (the layer is most likely plain and
    /// will need one; an opener that opens every layer at once then starts fetching them,
    /// see [`Ctx::fetch_early`]) unless one is cached here.
    async fn tail(&self, cached: &Blob, announced: Option<u64>) -> Result<(u64, Bytes)> {
        if let Some(len) = announced {
            // Over the network a large tail holds the mount back: asked for as several ranges
            // at once. Not a tail that is the whole blob: that is one whole read (which a
            // pull-through cache that lacks the blob may answer in full at once).
            let start = cached.size().saturating_sub(len);
            if let Source::Registry { .. } = self.source
                && start > 0
                && let Err(e) = crate::blob::prefetch_spread(
                    cached,
                    start,
                    cached.size() - start,
                    self.tail_ranges,
                )
                .await
            {
                // The read below asks again, as it would have at first.
                tracing::debug!("fetching the tail of {} as ranges: {e}", cached.id());
            }
            return crate::blob::read_tail(cached, len).await;
        }
        let tail = crate::blob::read_tail(cached, crate::blob::SMALL_TAIL_READ);
        if checkpoint::file::path(&self.cfg.cache_dir, cached.id()).exists() {
            return tail.await;
        }
        tokio::join!(tail, self.fetch_early()).0
    }

    /// Looks up the published indexes and, when every layer is opened at once (a mount, or
    /// the layer store as it resolves an image), starts fetching them all as soon as they
    /// are found: each plain gzip layer needs its own before it is open, and the fetches
    /// then overlap the layers' tail reads instead of following each
    /// (gzip with an index, packet link: ready ~488 -> ~457 ms over 6 rounds). Not for a
    /// layer whose index is kept here. A layer takes its own (see [`Ctx::index`]).
    async fn fetch_early(&self) {
        let published = self.published().await;
        if self.sizes.is_empty() {
            return;
        }
        self.fetched
            .get_or_init(|| async {
                let kept = |layer: &str| {
                    checkpoint::file::path(&self.cfg.cache_dir, layer).exists()
                        || checkpoint::file::unverified_path(&self.cfg.cache_dir, layer).exists()
                };
                let fetches = published.iter().filter_map(|(layer, p)| {
                    let size = *self.sizes.get(layer)?;
                    if kept(layer) {
                        return None;
                    }
                    let (source, p, digest) = (self.source.clone(), p.clone(), layer.clone());
                    let fetch =
                        TaskGuard::spawn(
                            async move { share::fetch(&source, &p, &digest, size).await },
                        );
                    Some((layer.clone(), fetch))
                });
                std::sync::Mutex::new(fetches.collect())
            })
            .await;
    }

    /// The indexes published in the registry for this image, looked up once for all layers.
    async fn published(&self) -> &HashMap<String, share::Published> {
        self.published
            .get_or_init(|| async {
                share::discover(
                    self.source,
                    &self.manifest_digest,
                    self.soci_index.as_deref(),
                )
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!("looking for published indexes failed: {e}");
                    HashMap::new()
                })
            })
            .await
    }

    /// The checkpoint index of a gzip or zstd layer, where it came from, whether it is
    /// still to be checked against the layer (`Unchecked` for one from the registry, see
    /// [`crate::layer::IndexCheck`]; `Trusted` for one built here from the verified blob),
    /// and the decoded tar when this pass built it and `copy_first_pass` asked for it.
    async fn index(
        &self,
        cached: Blob,
        codec: Codec,
    ) -> Result<(CheckpointIndex, &'static str, Trust, Option<std::fs::File>)> {
        let digest = cached.id().to_string();
        let path = checkpoint::file::path(&self.cfg.cache_dir, &digest);
        let waiting = checkpoint::file::unverified_path(&self.cfg.cache_dir, &digest);
        for (file, trust, from) in [
            (&path, Trust::Trusted, "cached"),
            (
                &waiting,
                Trust::Unchecked(Some(waiting.clone())),
                "cached, from the registry",
            ),
        ] {
            match tokio::fs::read(file).await {
                Ok(bytes) => match checkpoint::file::decode(&bytes, &digest) {
                    Ok(index) => return Ok((index, from, trust, None)),
                    Err(e) => {
                        tracing::warn!("rejected {}: {e}; looking for another", file.display())
                    }
                },
                Err(_) => tracing::debug!("no index for {digest} at {}", file.display()),
            }
        }
        if let Some(p) = self.published().await.get(&digest) {
            // The fetch started early, or (none: a layer opened alone or again) one now.
            let early = match self
                .fetched
                .get()
                .and_then(|f| f.lock().unwrap().remove(&digest))
            {
                Some(mut fetch) => fetch.output().await,
                None => None,
            };
            let fetched = match early {
                Some(fetched) => fetched,
                None => share::fetch(self.source, p, &digest, cached.size()).await,
            };
            match fetched {
                Ok((index, bytes)) => {
                    let kept = keep(&waiting, &bytes).await;
                    let trust = Trust::Unchecked(kept.then(|| waiting.clone()));
                    return Ok((index, p.origin.label(), trust, None));
                }
                Err(e) => tracing::warn!(
                    "rejected the published index {} of {digest}: {e}; building one",
                    p.digest
                ),
            }
        }
        let d = digest.clone();
        let progress = self.progress.clone();
        let report = move |done: u64, total: u64| progress(&d, done, total);
        // Where the layer will be served for a while, the pass of a gzip layer also leaves
        // the decoded tar to serve it from (the local copies' place; all of an image's
        // first-pass copies together within the disk cache bound; a zstd layer's single
        // span is unpacked to a kept tar instead). A tar that decodes to many times its
        // compressed size is mostly headers (a million empty files: 6.8 MiB to 488 MiB) or
        // runs of zeros: decoding those again is cheap, writing them out is not.
        let copy = (self.cfg.copy_first_pass && codec == Codec::Gzip).then(|| checkpoint::CopyTo {
            dir: self.cfg.cache_dir.join("copies"),
            limit: cached.size().saturating_mul(COPY_RATIO),
            budget: self.copy_budget.clone(),
        });
        let (index, _, copy) = checkpoint::file::build_and_keep(
            cached,
            codec,
            self.cfg.span,
            &self.cfg.cache_dir,
            &report,
            copy.as_ref(),
        )
        .await?;
        Ok((index, "built", Trust::Trusted, copy))
    }

    /// The blob of a gzip index's mark windows (see the `layer::checkpoint::windows` module): the
    /// file kept when the index was built here, else the blob published with the index.
    /// `None` (reads then decode from span starts) when neither can
    /// be opened.
    fn windows(&self, w: &checkpoint::WindowsRef, counter: &Arc<CountingBlob>) -> Option<Blob> {
        let path = checkpoint::file::windows_path(&self.cfg.cache_dir, &w.digest);
        if let Ok(file) = crate::blob::FileBlob::open(w.digest.clone(), &path) {
            return Some(Arc::new(file));
        }
        // Not through the block cache: a read fetches one entry, a few KB, exactly (the
        // layer keeps the entries it fetched).
        match self.source.blob(&w.digest, w.size) {
            Ok(blob) => Some(counter.counting(blob)),
            Err(e) => {
                tracing::warn!("no windows blob {}: {e}", w.digest);
                None
            }
        }
    }

    async fn streamed(&self, raw: Blob, format: Format) -> Result<(LayerData, Vec<Entry>, Health)> {
        let digest = raw.id().to_string();
        let progress = self.progress.clone();
        let report = move |done: u64, total: u64| progress(&digest, done, total);
        // An answer that arrived damaged (the digest fails) is fetched once more, as every
        // check here is: otherwise the damaged blocks, kept, would fail every later open.
        let (report, dir) = (&report, self.cfg.cache_dir.as_path());
        let what = format!("unpacking layer {}", raw.id());
        let whole = (0, raw.size());
        let again = raw.clone();
        let local = healing(&raw, whole, &what, move || {
            streamed::local_tar(again.clone(), format, dir, report)
        })
        .await?;
        let entries = tar::index(local.clone()).await?;
        // The stream was hashed on the way in: the local tar is verified.
        Ok((LayerData::Tar(local), entries, Health::Verified))
    }
}

/// Most decoded bytes per compressed byte a first pass copies (gzip layers of ordinary files
/// decode to 2-5 times their size).
const COPY_RATIO: u64 = 32;

/// Whether an index is trusted as it is, or must still be checked against the layer (with
/// the cached file that waits for that check).
enum Trust {
    Trusted,
    Unchecked(Option<std::path::PathBuf>),
}

/// Serves a layer through its index: its data, entries, health (`initial` until checked) and
/// what is left to check. Every read checks its span's digest; a trusted index came from a
/// pass that checked the whole blob's digest, so nothing is served unverified. One from the
/// registry is checked by verification (see [`IndexCheck`]).
fn indexed_layer(
    mut index: CheckpointIndex,
    cached: Blob,
    windows: Option<Blob>,
    trust: Trust,
    initial: Health,
) -> (LayerData, Vec<Entry>, Health, Option<IndexCheck>) {
    let entries = std::mem::take(&mut index.entries);
    let (health, check) = match trust {
        Trust::Trusted => (Health::Verified, None),
        Trust::Unchecked(kept) => (
            initial,
            Some(IndexCheck {
                entries: checkpoint::file::entries_digest(&entries),
                kept,
                stretches: index.mark_stretches(),
            }),
        ),
    };
    let mut blob = checkpoint::CheckpointBlob::new(Arc::new(index), cached);
    if let Some(windows) = windows {
        blob = blob.with_windows(windows);
    }
    let blob = Arc::new(blob);
    (LayerData::Tar(blob), entries, health, check)
}

/// Writes an index file atomically; failing only costs a rebuild later. Whether it was kept.
async fn keep(path: &std::path::Path, bytes: &[u8]) -> bool {
    match checkpoint::file::keep(path, bytes).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("could not keep an index at {}: {e}", path.display());
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(size: u64, announced: bool) -> LayerDesc {
        let mut annotations = HashMap::new();
        if announced {
            annotations.insert(
                estargz::TOC_DIGEST_ANNOTATION.to_string(),
                "sha256:0".into(),
            );
        }
        LayerDesc {
            digest: format!("sha256:{size}"),
            size,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            annotations,
        }
    }

    /// The warm connections are shared among the large announced tails; small tails (read
    /// whole) and layers that announce nothing take none.
    #[test]
    fn large_announced_tails_share_the_warm_connections() {
        let big = 64 << 20;
        let small = crate::blob::TAIL_READ;
        assert_eq!(tail_ranges(&[desc(big, true)]), 4);
        assert_eq!(
            tail_ranges(&[desc(big, true), desc(big, true), desc(small, true)]),
            4
        );
        assert_eq!(tail_ranges(&[desc(big, true), desc(big, false)]), 4);
        assert_eq!(tail_ranges(&vec![desc(big, true); 3]), 2);
        assert_eq!(tail_ranges(&vec![desc(big, true); 9]), 1);
        assert_eq!(tail_ranges(&[]), 4);
    }
}

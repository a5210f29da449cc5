//! How the store turns a directory name into a resolved image and a layer digest into an
//! opened layer: each reference resolved once however many ask (again when a layer it does
//! not list is asked for and its tag may have moved), every layer starting to open as soon as
//! the manifest is in, and errors shared by the lookups that waited for them.

use super::images::{ImageEntry, ResolvedImage};
use super::pending::Pending;
use super::pool::{self, LayerPool};
use super::{REFRESH_ON_MISS, Store};
use crate::error::{Error, Result};
use crate::image::{LayerOpener, Resolved};
use crate::layer::LayerDesc;
use crate::serve::layer::{LayerServing, ServedLayer};
use crate::task::TaskGuard;
use futures::FutureExt;
use std::sync::Arc;

impl Store {
    /// The entry of `reference`, resolving it (once, however many ask) if it has none.
    pub(super) async fn image(&self, reference: &str) -> Result<Arc<ImageEntry>> {
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
                let waits = opens.iter().map(|o| o.wait(timeout, "opening a layer"));
                futures::future::join_all(waits).await;
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
    pub(super) async fn listing(&self, id: u32, digest: &str) -> Result<Arc<ResolvedImage>> {
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
    pub(super) async fn layer(&self, id: u32, digest: &str) -> Result<Arc<ServedLayer>> {
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
    pub(super) async fn view(&self, view: u32) -> Result<Arc<ServedLayer>> {
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

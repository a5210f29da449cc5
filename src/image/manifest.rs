//! Resolving a reference to one image manifest: HEAD for the digest, GET, and for an image
//! index (OCI index or Docker manifest list) the manifest for the wanted platform.

use super::source::Source;
// The platform to choose is configuration (`config` owns it); `image::Platform` names it too.
pub use crate::config::Platform;
use crate::error::{Error, Result};
use crate::layer::LayerDesc;
use bytes::Bytes;
use oci_spec::image::{ImageIndex, ImageManifest};
use std::collections::HashMap;

/// One image, resolved: the manifest, its config, and where it came from.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Digest of the index the manifest was chosen from, if any.
    pub index_digest: Option<String>,
    /// Platforms the index offered.
    pub platforms: Vec<String>,
    pub manifest_digest: String,
    pub manifest_media_type: String,
    pub manifest: Bytes,
    pub config_digest: String,
    pub config_size: u64,
    pub config: Bytes,
    pub layers: Vec<LayerDesc>,
    /// The image manifest's annotations (e.g. the SOCI v2 index it names).
    pub annotations: HashMap<String, String>,
}

/// Whether a manifest body is an image index (OCI index or Docker manifest list): by media
/// type, or for a registry that sends none, by its keys.
pub(crate) fn is_index(media_type: &str, body: &[u8]) -> bool {
    media_type.contains("image.index") || media_type.contains("manifest.list") || {
        serde_json::from_slice::<serde_json::Value>(body)
            .map(|v| v.get("manifests").is_some() && v.get("layers").is_none())
            .unwrap_or(false)
    }
}

/// Resolves `reference` (tag or digest) in `source` for `platform`, config included.
pub async fn resolve(source: &Source, reference: &str, platform: &Platform) -> Result<Resolved> {
    let mut r = resolve_manifest(source, reference, platform).await?;
    r.config = fetch_config(source, &r).await?;
    Ok(r)
}

/// The config blob of a resolved image (its digest checked).
pub async fn fetch_config(source: &Source, r: &Resolved) -> Result<Bytes> {
    source.small_blob(&r.config_digest, r.config_size).await
}

/// Resolves `reference` to its image manifest without fetching the config (`config` is
/// empty), so a mount can fetch the config while it opens the layers.
pub async fn resolve_manifest(
    source: &Source,
    reference: &str,
    platform: &Platform,
) -> Result<Resolved> {
    // One GET, also for tags: the digest is the body's hash, which we compute ourselves (a
    // HEAD first would only cost a round trip; registries count the GET either way).
    let (mut body, mut meta) = source.manifest(reference).await?;
    let mut index_digest = None;
    let mut platforms = Vec::new();
    if is_index(&meta.media_type, &body) {
        let (offered, chosen) = choose_platform(&body, &meta.digest, platform)?;
        platforms = offered;
        let Some(digest) = chosen else {
            return Err(Error::Platform {
                wanted: platform.to_string(),
                available: platforms.join(", "),
            });
        };
        index_digest = Some(meta.digest.clone());
        (body, meta) = source.manifest(&digest).await?;
        if is_index(&meta.media_type, &body) {
            return Err(Error::format(
                format!("manifest {digest}"),
                "an index inside an index is not supported",
            ));
        }
    }
    let parts = manifest_parts(&body, &meta.digest)?;
    Ok(Resolved {
        index_digest,
        platforms,
        manifest_digest: meta.digest,
        manifest_media_type: meta.media_type,
        manifest: body,
        config_digest: parts.config_digest,
        config_size: parts.config_size,
        config: Bytes::new(),
        layers: parts.layers,
        annotations: parts.annotations,
    })
}

/// The platforms an image index (`body`, whose digest is `digest`) offers, artifacts apart,
/// and the digest of the first manifest for `platform`, if any.
pub(crate) fn choose_platform(
    body: &[u8],
    digest: &str,
    platform: &Platform,
) -> Result<(Vec<String>, Option<String>)> {
    let index = ImageIndex::from_reader(body)
        .map_err(|e| Error::format(format!("image index {digest}"), e.to_string()))?;
    let mut platforms = Vec::new();
    let mut chosen = None;
    for m in index.manifests() {
        // Artifacts listed next to images (a SOCI v2 index) are not candidates.
        let artifact = m.artifact_type().is_some()
            || m.annotations()
                .as_ref()
                .is_some_and(|a| a.contains_key(crate::layer::checkpoint::soci::IMAGE_ANNOTATION));
        let Some(p) = m.platform().as_ref().filter(|_| !artifact) else {
            continue;
        };
        let (os, arch) = (p.os().to_string(), p.architecture().to_string());
        let variant = p.variant().as_deref();
        platforms.push(
            Platform {
                os: os.clone(),
                arch: arch.clone(),
                variant: variant.map(str::to_string),
            }
            .to_string(),
        );
        if chosen.is_none() && platform.matches(&os, &arch, variant) {
            chosen = Some(m.digest().to_string());
        }
    }
    Ok((platforms, chosen))
}

/// What a mount needs of an image manifest.
pub(crate) struct ManifestParts {
    pub config_digest: String,
    pub config_size: u64,
    pub layers: Vec<LayerDesc>,
    pub annotations: HashMap<String, String>,
}

/// Parses an image manifest (`body`, whose digest is `digest`).
pub(crate) fn manifest_parts(body: &[u8], digest: &str) -> Result<ManifestParts> {
    let manifest = ImageManifest::from_reader(body)
        .map_err(|e| Error::format(format!("image manifest {digest}"), e.to_string()))?;
    let cfg = manifest.config();
    let layers = manifest
        .layers()
        .iter()
        .map(|l| LayerDesc {
            digest: l.digest().to_string(),
            size: l.size(),
            media_type: l.media_type().to_string(),
            annotations: l.annotations().clone().unwrap_or_default(),
        })
        .collect();
    Ok(ManifestParts {
        config_digest: cfg.digest().to_string(),
        config_size: cfg.size(),
        layers,
        annotations: manifest.annotations().clone().unwrap_or_default(),
    })
}

/// The `rootfs.diff_ids` of an image config (the digests of its uncompressed layers), in
/// layer order; empty when the config lists none or is not JSON.
pub fn diff_ids(config: &[u8]) -> Vec<String> {
    serde_json::from_slice::<serde_json::Value>(config)
        .ok()
        .and_then(|v| {
            v["rootfs"]["diff_ids"].as_array().map(|a| {
                a.iter()
                    .map(|d| d.as_str().unwrap_or_default().to_string())
                    .collect()
            })
        })
        .unwrap_or_default()
}

//! Resolving a reference to one image manifest: HEAD for the digest, GET, and for an image
//! index (OCI index or Docker manifest list) the manifest for the wanted platform.

use super::source::Source;
use crate::error::{Error, Result};
use crate::layer::LayerDesc;
use bytes::Bytes;
use oci_spec::image::{ImageIndex, ImageManifest};
use std::collections::HashMap;
use std::fmt;

/// `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `linux/arm64/v8`.
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || Error::format("platform", format!("{s:?} is not os/arch[/variant]"));
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        Ok(Platform {
            os: parts[0].into(),
            arch: parts[1].into(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }

    /// The platform of this machine, as Go spells it.
    pub fn host() -> Platform {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            other => (other, None),
        };
        Platform {
            os: "linux".into(),
            arch: arch.into(),
            variant: variant.map(str::to_string),
        }
    }

    /// Whether an index entry's platform satisfies this one (arm64's default variant is v8).
    fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        let norm = |v: Option<&str>| match (arch, v) {
            ("arm64", None) => Some("v8".to_string()),
            (_, v) => v.map(str::to_string),
        };
        self.os == os
            && self.arch == arch
            && (self.variant.is_none() || norm(self.variant.as_deref()) == norm(variant))
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

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

fn is_index(media_type: &str, body: &[u8]) -> bool {
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
        let index = ImageIndex::from_reader(&body[..])
            .map_err(|e| Error::format(format!("image index {}", meta.digest), e.to_string()))?;
        let mut chosen = None;
        for m in index.manifests() {
            // Artifacts listed next to images (a SOCI v2 index) are not candidates.
            let artifact = m.artifact_type().is_some()
                || m.annotations().as_ref().is_some_and(|a| {
                    a.contains_key(crate::layer::checkpoint::soci::IMAGE_ANNOTATION)
                });
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
    let manifest = ImageManifest::from_reader(&body[..])
        .map_err(|e| Error::format(format!("image manifest {}", meta.digest), e.to_string()))?;
    let cfg = manifest.config();
    let config_digest = cfg.digest().to_string();
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
    Ok(Resolved {
        index_digest,
        platforms,
        manifest_digest: meta.digest,
        manifest_media_type: meta.media_type,
        manifest: body,
        config_digest,
        config_size: cfg.size(),
        config: Bytes::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_matching_is_variant_aware() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert!(p.matches("linux", "arm64", None));
        assert!(!p.matches("linux", "arm", Some("v8")));
        let p = Platform::parse("linux/arm/v6").unwrap();
        assert!(!p.matches("linux", "arm", Some("v7")));
        assert!(
            Platform::parse("linux/amd64")
                .unwrap()
                .matches("linux", "amd64", None)
        );
        assert!(Platform::parse("linux").is_err());
    }
}

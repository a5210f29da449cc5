//! Sharing checkpoint indexes through the registry, next to the image they describe.
//!
//! `ocifs index REF --push` uploads the indexes of an image's gzip layers as one OCI artifact:
//! a manifest of type [`ARTIFACT_TYPE`] whose `subject` is the image manifest and whose layers
//! are index files, each annotated with the layer digest it describes. Registries with the
//! referrers API list it there; for the others (distribution 2.8) the `sha256-<hex>` tag holds
//! an image index of referrers (the referrers tag schema). A mount looks there before building
//! an index, and trusts what it finds only after the blob digest, the file's own checksum and
//! the layer digest inside it all match.

use super::CheckpointIndex;
use crate::error::{Error, Result};
use crate::image::Source;
use crate::registry::Registry;
use bytes::Bytes;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

/// `artifactType` of the pushed manifest and media type of each index blob.
pub const ARTIFACT_TYPE: &str = "application/vnd.ocifs.checkpoint-index.v1";
/// Annotation on each index blob naming the layer it indexes.
pub const LAYER_ANNOTATION: &str = "io.ocifs.checkpoint-index.layer";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const EMPTY_CONFIG: &[u8] = b"{}";
/// Index files larger than this are not fetched.
const MAX_INDEX: u64 = 512 << 20;

/// A published index: the blob holding it.
#[derive(Debug, Clone)]
pub struct Published {
    pub digest: String,
    pub size: u64,
}

/// Finds published indexes for the image `manifest_digest`: layer digest -> index blob.
pub async fn discover(
    source: &Source,
    manifest_digest: &str,
) -> Result<HashMap<String, Published>> {
    let Source::Registry { registry, repo } = source else {
        return Ok(HashMap::new());
    };
    let Some(body) = registry.referrers(repo, manifest_digest).await? else {
        return Ok(HashMap::new());
    };
    let index: Value = serde_json::from_slice(&body)
        .map_err(|e| Error::format("referrers index", e.to_string()))?;
    let mut found = HashMap::new();
    for m in index["manifests"].as_array().into_iter().flatten() {
        if m["artifactType"] != ARTIFACT_TYPE {
            continue;
        }
        let Some(digest) = m["digest"].as_str() else {
            continue;
        };
        let (bytes, _) = source.manifest(digest).await?;
        let manifest: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::format("index artifact manifest", e.to_string()))?;
        if manifest["subject"]["digest"] != manifest_digest {
            continue;
        }
        for l in manifest["layers"].as_array().into_iter().flatten() {
            let (Some(layer), Some(d), Some(size)) = (
                l["annotations"][LAYER_ANNOTATION].as_str(),
                l["digest"].as_str(),
                l["size"].as_u64(),
            ) else {
                continue;
            };
            found.insert(
                layer.to_string(),
                Published {
                    digest: d.to_string(),
                    size,
                },
            );
        }
    }
    Ok(found)
}

/// Fetches and checks a published index for `layer`; returns it with its encoded bytes.
pub async fn fetch(
    source: &Source,
    p: &Published,
    layer: &str,
) -> Result<(CheckpointIndex, Bytes)> {
    if p.size > MAX_INDEX {
        return Err(Error::format(
            format!("published index {}", p.digest),
            "too large",
        ));
    }
    let data = source.blob(&p.digest, p.size)?.read_at(0, p.size).await?;
    let actual = crate::digest::sha256(&data);
    if actual != p.digest {
        return Err(Error::Digest {
            what: format!("published index {}", p.digest),
            expected: p.digest.clone(),
            actual,
        });
    }
    Ok((super::file::decode(&data, layer)?, data))
}

/// Pushes encoded indexes (layer digest, file bytes) as one artifact referring to the image
/// manifest `subject` (digest, media type, size). Returns the artifact manifest's digest.
pub async fn push(
    registry: &Arc<Registry>,
    repo: &str,
    subject: (&str, &str, u64),
    indexes: &[(String, Bytes)],
) -> Result<String> {
    let config_digest = crate::digest::sha256(EMPTY_CONFIG);
    registry
        .push_blob(repo, &config_digest, Bytes::from_static(EMPTY_CONFIG))
        .await?;
    let mut layers = Vec::new();
    for (layer, data) in indexes {
        let digest = crate::digest::sha256(data);
        registry.push_blob(repo, &digest, data.clone()).await?;
        layers.push(json!({"mediaType": ARTIFACT_TYPE, "digest": digest, "size": data.len(), "annotations": {LAYER_ANNOTATION: layer}}));
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config_digest, "size": EMPTY_CONFIG.len()},
        "layers": layers,
        "subject": {"mediaType": subject.1, "digest": subject.0, "size": subject.2},
    });
    let bytes = Bytes::from(serde_json::to_vec(&manifest).expect("JSON of JSON values"));
    let digest = crate::digest::sha256(&bytes);
    let size = bytes.len();
    let registry_tracks_subject = registry
        .push_manifest(repo, &digest, MANIFEST_MEDIA_TYPE, bytes)
        .await?;
    if !registry_tracks_subject {
        // Referrers tag schema: merge our descriptor into the index at sha256-<hex>.
        let tag = crate::registry::referrers_tag(subject.0);
        let mut index: Value = match registry.referrers(repo, subject.0).await? {
            Some(b) => serde_json::from_slice(&b).unwrap_or_else(|_| json!({})),
            None => json!({}),
        };
        let mut manifests: Vec<Value> = index["manifests"].as_array().cloned().unwrap_or_default();
        manifests.retain(|m| m["artifactType"] != ARTIFACT_TYPE);
        manifests.push(json!({"mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE, "digest": digest, "size": size}));
        index = json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests});
        let body = Bytes::from(serde_json::to_vec(&index).expect("JSON of JSON values"));
        registry
            .push_manifest(repo, &tag, INDEX_MEDIA_TYPE, body)
            .await?;
    }
    Ok(digest)
}

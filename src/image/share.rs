//! Sharing checkpoint indexes through the registry, next to the image they describe.
//!
//! `ocifs index REF --push` uploads the indexes of an image's gzip layers as one OCI artifact:
//! a manifest of type [`ARTIFACT_TYPE`] whose `subject` is the image manifest and whose layers
//! are index files, each annotated with the layer digest it describes. Registries with the
//! referrers API list it there; for the others (distribution 2.8) the `sha256-<hex>` tag holds
//! an image index of referrers (the referrers tag schema). A mount looks there before building
//! an index, and trusts what it finds only after the blob digest, the file's own checksum and
//! the layer digest inside it all match.
//!
//! SOCI zTOCs are found the same way: a v2 SOCI index is named by the image manifest's
//! `com.amazon.soci.index-digest` annotation (so it is covered by the manifest digest), a v1
//! index is a referrer of the image manifest. Our own published index wins over a SOCI one.

use super::Source;
use crate::error::{Error, Result};
use crate::layer::checkpoint::{CheckpointIndex, file, soci};
use crate::registry::Registry;
use bytes::Bytes;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

/// `artifactType` of the pushed manifest and media type of each index blob.
pub const ARTIFACT_TYPE: &str = "application/vnd.ocifs.checkpoint-index.v1";
/// Annotation on each index blob naming the layer it indexes.
pub const LAYER_ANNOTATION: &str = "io.ocifs.checkpoint-index.layer";
/// Annotation on the artifact (and so on its descriptor in the referrers listing) listing its
/// index blobs as a JSON array of `[layer, blob digest, size]`: a mount that finds it there
/// fetches the blobs at once, a round trip sooner than through the artifact's manifest.
pub const BLOBS_ANNOTATION: &str = "io.ocifs.checkpoint-index.blobs";
/// Media type of a mark windows blob pushed with an index (see `layer::checkpoint::windows`),
/// and the annotation naming the layer whose index names it. The index file carries the
/// blob's digest; the artifact lists it so that the registry keeps it with the index.
pub const WINDOWS_MEDIA_TYPE: &str = "application/vnd.ocifs.checkpoint-windows.v1";
pub const WINDOWS_ANNOTATION: &str = "io.ocifs.checkpoint-windows.layer";
/// Longest such annotation read (a few hundred layers).
const MAX_BLOBS_ANNOTATION: usize = 64 << 10;
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const EMPTY_CONFIG: &[u8] = b"{}";
/// Index files larger than this are not fetched.
const MAX_INDEX: u64 = 512 << 20;

/// Who published an index, which decides how it is read. Declared in order of preference
/// when a layer has several (the derived `Ord`): ours, then SOCI v2, then SOCI v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    Ocifs,
    SociV2,
    SociV1,
}

impl Origin {
    /// How `inspect` and the mount's ready line name the index source ("index ...").
    pub fn label(self) -> &'static str {
        match self {
            Origin::Ocifs => "from registry",
            Origin::SociV1 => "from a SOCI v1 zTOC",
            Origin::SociV2 => "from a SOCI v2 zTOC",
        }
    }
}

/// A published index: the blob holding it.
#[derive(Debug, Clone)]
pub struct Published {
    pub digest: String,
    pub size: u64,
    pub origin: Origin,
}

/// Finds published indexes for the image `manifest_digest`: layer digest -> index blob.
/// `soci_v2` is the SOCI index named by the manifest's annotation, if any.
pub async fn discover(
    source: &Source,
    manifest_digest: &str,
    soci_v2: Option<&str>,
) -> Result<HashMap<String, Published>> {
    let mut found = HashMap::new();
    let soci = async {
        match soci_v2 {
            // Named by the manifest itself: no subject to check, the digest link is the proof.
            Some(digest) => Some((digest, artifact_layers(source, digest, None).await)),
            None => None,
        }
    };
    let referrers = async {
        match source {
            Source::Registry { repo } => repo.referrers(manifest_digest).await,
            _ => Ok(None),
        }
    };
    let (soci, referrers) = tokio::join!(soci, referrers);
    match soci {
        Some((_, Ok(layers))) => add(&mut found, layers, Origin::SociV2),
        Some((digest, Err(e))) => tracing::warn!("ignoring the SOCI index {digest}: {e}"),
        None => {}
    }
    let Some(body) = referrers? else {
        return Ok(found);
    };
    let index: Value = serde_json::from_slice(&body)
        .map_err(|e| Error::format("referrers index", e.to_string()))?;
    // Every referrer's manifest is fetched at once.
    let fetches = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let origin = match m["artifactType"].as_str() {
                Some(ARTIFACT_TYPE) => Origin::Ocifs,
                Some(soci::INDEX_V1) => Origin::SociV1,
                _ => return None,
            };
            let digest = m["digest"].as_str()?;
            let listed = (origin == Origin::Ocifs)
                .then(|| listed_blobs(&m["annotations"][BLOBS_ANNOTATION]))
                .flatten();
            Some(async move {
                let layers = match listed {
                    Some(layers) => Ok(layers),
                    None => artifact_layers(source, digest, Some(manifest_digest)).await,
                };
                (digest, origin, layers)
            })
        });
    for (digest, origin, layers) in futures::future::join_all(fetches).await {
        match layers {
            Ok(layers) => add(&mut found, layers, origin),
            Err(e) => tracing::warn!("ignoring the referrer {digest}: {e}"),
        }
    }
    Ok(found)
}

/// Keeps ours over SOCI's, and a SOCI v2 index over a v1 one.
fn add(found: &mut HashMap<String, Published>, layers: Vec<(String, String, u64)>, o: Origin) {
    for (layer, digest, size) in layers {
        let p = Published {
            digest,
            size,
            origin: o,
        };
        if found.get(&layer).is_none_or(|old| o < old.origin) {
            found.insert(layer, p);
        }
    }
}

/// The (layer, index blob digest, size) list a referrer's [`BLOBS_ANNOTATION`] carries, if it
/// has a well-formed one. (What it names is checked like any published index when fetched:
/// blob digest, the file's checksum, the layer digest inside.)
fn listed_blobs(annotation: &Value) -> Option<Vec<(String, String, u64)>> {
    let text = annotation
        .as_str()
        .filter(|t| t.len() <= MAX_BLOBS_ANNOTATION)?;
    serde_json::from_str(text).ok()
}

/// The (layer, index blob digest, size) list of an index artifact manifest; with `subject`,
/// only if the artifact refers to that manifest.
async fn artifact_layers(
    source: &Source,
    digest: &str,
    subject: Option<&str>,
) -> Result<Vec<(String, String, u64)>> {
    let (bytes, _) = source.manifest(digest).await?;
    let manifest: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::format("index artifact manifest", e.to_string()))?;
    if let Some(s) = subject
        && manifest["subject"]["digest"] != s
    {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for l in manifest["layers"].as_array().into_iter().flatten() {
        let layer = l["annotations"][LAYER_ANNOTATION]
            .as_str()
            .or_else(|| l["annotations"][soci::LAYER_ANNOTATION].as_str());
        if let (Some(layer), Some(d), Some(size)) =
            (layer, l["digest"].as_str(), l["size"].as_u64())
        {
            out.push((layer.to_string(), d.to_string(), size));
        }
    }
    Ok(out)
}

/// Fetches and checks a published index for `layer` (`layer_size` bytes); returns it with its
/// encoding in our index file format (for the cache directory).
pub async fn fetch(
    source: &Source,
    p: &Published,
    layer: &str,
    layer_size: u64,
) -> Result<(CheckpointIndex, Bytes)> {
    if p.size > MAX_INDEX {
        return Err(Error::format(
            format!("published index {}", p.digest),
            "too large",
        ));
    }
    // As a few ranges at once where they go out beside the first's probe: on fresh
    // connections each opens its window side by side (a 575 KB index on the packet link:
    // gzip ready ~469 -> ~402 ms). Else whole: a mirror's probe takes a small blob's whole
    // answer as it comes, where a piece would wait for a cache to store it.
    let blob = source.blob(&p.digest, p.size)?;
    let most = match source.reads_at_once() {
        true => crate::blob::SPREAD_PIECES,
        false => 1,
    };
    let pieces = crate::blob::spread(0, p.size, most);
    let reads = pieces.iter().map(|&(o, l)| blob.read_at(o, l));
    let data: Bytes = futures::future::try_join_all(reads).await?.concat().into();
    let actual = crate::digest::sha256(&data);
    if actual != p.digest {
        return Err(Error::Digest {
            what: format!("published index {}", p.digest),
            expected: p.digest.clone(),
            actual,
        });
    }
    match p.origin {
        Origin::Ocifs => Ok((file::decode(&data, layer)?, data)),
        Origin::SociV1 | Origin::SociV2 => {
            let index = soci::parse(&data, layer, layer_size)?;
            let encoded = Bytes::from(file::encode(&index));
            Ok((index, encoded))
        }
    }
}

/// One index to push: the layer it describes, its file, and its marks' windows blob if any.
pub struct Pushed {
    pub layer: String,
    pub index: Bytes,
    pub windows: Option<Bytes>,
}

/// Pushes encoded indexes (and their windows blobs) as one artifact referring to the image
/// manifest `subject` (digest, media type, size). Returns the artifact manifest's digest.
pub async fn push(
    registry: &Arc<Registry>,
    repo: &str,
    subject: (&str, &str, u64),
    indexes: &[Pushed],
) -> Result<String> {
    let config_digest = crate::digest::sha256(EMPTY_CONFIG);
    registry
        .push_blob(repo, &config_digest, Bytes::from_static(EMPTY_CONFIG))
        .await?;
    let mut layers = Vec::new();
    let mut listed = Vec::new();
    for Pushed {
        layer,
        index: data,
        windows,
    } in indexes
    {
        if let Some(w) = windows {
            let digest = crate::digest::sha256(w);
            registry.push_blob(repo, &digest, w.clone()).await?;
            layers.push(json!({"mediaType": WINDOWS_MEDIA_TYPE, "digest": digest, "size": w.len(), "annotations": {WINDOWS_ANNOTATION: layer}}));
        }
        let digest = crate::digest::sha256(data);
        registry.push_blob(repo, &digest, data.clone()).await?;
        layers.push(json!({"mediaType": ARTIFACT_TYPE, "digest": digest, "size": data.len(), "annotations": {LAYER_ANNOTATION: layer}}));
        listed.push(json!([layer, digest, data.len()]));
    }
    let annotations = json!({BLOBS_ANNOTATION: Value::Array(listed).to_string()});
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config_digest, "size": EMPTY_CONFIG.len()},
        "layers": layers,
        "subject": {"mediaType": subject.1, "digest": subject.0, "size": subject.2},
        "annotations": annotations,
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
        // With the manifest's annotations, as a registry's referrers API lists them.
        manifests.push(json!({"mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE, "digest": digest, "size": size, "annotations": annotations}));
        index = json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests});
        let body = Bytes::from(serde_json::to_vec(&index).expect("JSON of JSON values"));
        registry
            .push_manifest(repo, &tag, INDEX_MEDIA_TYPE, body)
            .await?;
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_referrers_blob_list_is_read_only_when_well_formed() {
        let good = json!(json!([["sha256:l", "sha256:i", 42]]).to_string());
        assert_eq!(
            listed_blobs(&good),
            Some(vec![("sha256:l".into(), "sha256:i".into(), 42)])
        );
        for bad in [
            json!(null),
            json!("[1, 2]"),
            json!("not json"),
            json!(["sha256:l"]),
        ] {
            assert_eq!(listed_blobs(&bad), None, "{bad}");
        }
        let long = json!(format!("[{}]", vec!["[\"a\",\"b\",1]"; 10_000].join(",")));
        assert_eq!(listed_blobs(&long), None, "too long");
    }

    #[test]
    fn ours_beats_soci_v2_beats_soci_v1_in_any_order() {
        let one = |d: &str| vec![("sha256:l".to_string(), d.to_string(), 1)];
        for order in [
            [Origin::SociV2, Origin::Ocifs, Origin::SociV1],
            [Origin::SociV1, Origin::SociV2, Origin::Ocifs],
            [Origin::Ocifs, Origin::SociV1, Origin::SociV2],
        ] {
            let mut found = HashMap::new();
            for o in order {
                add(&mut found, one(&format!("{o:?}")), o);
            }
            assert_eq!(found["sha256:l"].origin, Origin::Ocifs, "{order:?}");
        }
        let mut found = HashMap::new();
        add(&mut found, one("v1"), Origin::SociV1);
        add(&mut found, one("v2"), Origin::SociV2);
        assert_eq!(found["sha256:l"].digest, "v2");
    }
}

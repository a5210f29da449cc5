//! Image references the store was asked about: a directory name is the base64 of a
//! reference (as containers/image spells it: `registry/repo:tag` or `registry/repo@digest`),
//! resolved once to a manifest and config. A tag that has moved since shows up as a layer
//! digest the resolution does not list; the reference is then resolved again. Each layer
//! digest keeps the resolution that listed it, so a layer in use stays servable after its
//! tag has moved on.

use super::pending::Pending;
use crate::image::{LayerOpener, Resolved};
use crate::layer::{Format, LayerDesc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One resolution of a reference: manifest, config, and the opener of its layers.
pub struct ResolvedImage {
    pub resolved: Arc<Resolved>,
    pub opener: Arc<LayerOpener>,
    pub at: Instant,
    /// Drops the published indexes fetched early that no layer took, once the layers this
    /// resolution started opening have opened.
    pub _forget: crate::task::TaskGuard,
}

impl ResolvedImage {
    /// Layer `digest`: its index, descriptor and uncompressed digest (`None` if this image
    /// does not list it with a `diff_id`).
    pub fn layer(&self, digest: &str) -> Option<(usize, &LayerDesc, String)> {
        let index = self
            .resolved
            .layers
            .iter()
            .position(|l| l.digest == digest)?;
        let diff_id = crate::image::manifest::diff_ids(&self.resolved.config)
            .get(index)
            .filter(|d| d.starts_with("sha256:"))
            .cloned()?;
        Some((index, &self.resolved.layers[index], diff_id))
    }
}

/// A reference the store resolved, under its directory's inode.
pub struct ImageEntry {
    pub id: u32,
    /// The reference, decoded from the directory name.
    pub reference: String,
    /// The directory name (base64 of the reference).
    pub name: String,
    current: Mutex<Arc<ResolvedImage>>,
    /// The resolution that listed each layer digest served, for views of layers a moved tag
    /// no longer lists.
    listed: Mutex<HashMap<String, Arc<ResolvedImage>>>,
}

impl ImageEntry {
    /// The latest resolution.
    pub fn current(&self) -> Arc<ResolvedImage> {
        self.current.lock().unwrap().clone()
    }

    /// Takes a newer resolution.
    pub fn update(&self, newer: Arc<ResolvedImage>) {
        *self.current.lock().unwrap() = newer;
    }

    /// The resolution that lists layer `digest` (the latest if it does), remembered.
    pub fn listing(&self, digest: &str) -> Option<Arc<ResolvedImage>> {
        let mut listed = self.listed.lock().unwrap();
        if let Some(r) = listed.get(digest) {
            return Some(r.clone());
        }
        let current = self.current();
        current.layer(digest)?;
        listed.insert(digest.to_string(), current.clone());
        Some(current)
    }
}

/// Every reference known, and resolutions under way.
#[derive(Default)]
pub struct Images {
    by_id: HashMap<u32, Arc<ImageEntry>>,
    by_reference: HashMap<String, u32>,
    /// Resolutions under way (or failed lately), by reference.
    pub resolving: HashMap<String, Arc<Pending<ResolvedImage>>>,
    next_id: u32,
}

impl Images {
    pub fn get(&self, id: u32) -> Option<Arc<ImageEntry>> {
        self.by_id.get(&id).cloned()
    }

    pub fn by_reference(&self, reference: &str) -> Option<Arc<ImageEntry>> {
        self.get(*self.by_reference.get(reference)?)
    }

    /// The entry of `reference`, made with `resolved` if it has none.
    pub fn insert(&mut self, reference: &str, resolved: Arc<ResolvedImage>) -> Arc<ImageEntry> {
        if let Some(e) = self.by_reference(reference) {
            return e;
        }
        self.next_id += 1;
        let entry = Arc::new(ImageEntry {
            id: self.next_id,
            reference: reference.to_string(),
            name: encode_name(reference),
            current: Mutex::new(resolved),
            listed: Mutex::new(HashMap::new()),
        });
        self.by_id.insert(entry.id, entry.clone());
        self.by_reference.insert(reference.to_string(), entry.id);
        entry
    }

    /// Every entry, in the order they were made.
    pub fn all(&self) -> Vec<Arc<ImageEntry>> {
        let mut all: Vec<_> = self.by_id.values().cloned().collect();
        all.sort_by_key(|e| e.id);
        all
    }
}

/// The reference a store directory name stands for: base64 (standard alphabet, padded) of a
/// reference that parses. `None` for anything else.
pub fn decode_name(name: &str) -> Option<String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(name)
        .ok()?;
    let reference = String::from_utf8(bytes).ok()?;
    crate::reference::Reference::parse(&reference).ok()?;
    Some(reference)
}

/// The store directory name of `reference` (what containers/storage looks up).
pub fn encode_name(reference: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(reference)
}

/// A layer's metadata as containers/storage reads it from `info` (its `Layer` type, JSON):
/// the compressed and uncompressed digests and sizes and the compression. containers/storage
/// fills in the ID, parent and creation time itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerInfo {
    #[serde(rename = "compressed-diff-digest")]
    pub compressed_digest: String,
    #[serde(rename = "compressed-size")]
    pub compressed_size: u64,
    #[serde(rename = "diff-digest")]
    pub diff_digest: String,
    /// The uncompressed size, when known without reading the whole layer.
    #[serde(rename = "diff-size", skip_serializing_if = "Option::is_none", default)]
    pub diff_size: Option<u64>,
    /// containers/storage's `archive.Compression`: 0 none, 2 gzip, 4 zstd.
    #[serde(rename = "compression", default)]
    pub compression: u8,
}

impl LayerInfo {
    pub fn new(desc: &LayerDesc, diff_id: &str, format: Format, diff_size: Option<u64>) -> Self {
        LayerInfo {
            compressed_digest: desc.digest.clone(),
            compressed_size: desc.size,
            diff_digest: diff_id.to_string(),
            diff_size,
            compression: match format {
                Format::Tar => 0,
                Format::Gzip | Format::Estargz | Format::LegacyStargz => 2,
                Format::Zstd | Format::ZstdChunked => 4,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_base64_of_references_that_parse() {
        let r = "127.0.0.1:5000/exp/bb:v1";
        let name = encode_name(r);
        assert_eq!(name, "MTI3LjAuMC4xOjUwMDAvZXhwL2JiOnYx");
        assert_eq!(decode_name(&name).as_deref(), Some(r));
        assert_eq!(decode_name("not base64!"), None);
        assert_eq!(
            decode_name(&encode_name("UPPER/Case")),
            None,
            "not a reference"
        );
        assert_eq!(decode_name("pool"), None);
    }

    #[test]
    fn info_is_containers_storage_layer_json() {
        let desc = LayerDesc {
            digest: "sha256:aa".into(),
            size: 10,
            media_type: String::new(),
            annotations: HashMap::new(),
        };
        let info = LayerInfo::new(&desc, "sha256:bb", Format::Estargz, None);
        let json: serde_json::Value = serde_json::to_value(&info).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"compressed-diff-digest": "sha256:aa", "compressed-size": 10,
                "diff-digest": "sha256:bb", "compression": 2})
        );
        let tar = LayerInfo::new(&desc, "sha256:bb", Format::Tar, Some(20));
        assert_eq!(serde_json::to_value(&tar).unwrap()["diff-size"], 20);
        assert_eq!(tar.compression, 0);
    }
}

//! Where an image comes from: a registry repository (with its mirrors: [`Repo`]) or a local
//! OCI image layout (`oci:PATH[:TAG]`). Both hand out manifests and [`Blob`]s, so everything
//! after this point runs the same code.

use crate::blob::{Blob, FileBlob};
use crate::error::{Error, Result};
use crate::registry::{ManifestMeta, Repo, RepoBlob};
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::Arc;

/// An image repository, remote or local.
#[derive(Clone)]
pub enum Source {
    /// A repository on a registry, pulled through its mirrors.
    Registry { repo: Arc<Repo> },
    /// An OCI image layout directory.
    Layout { dir: PathBuf },
}

impl Source {
    /// Human-readable name for messages.
    pub fn describe(&self) -> String {
        match self {
            Source::Registry { repo } => repo.name().to_string(),
            Source::Layout { dir } => format!("oci:{}", dir.display()),
        }
    }

    /// Opens connections to the registry in the background (see
    /// [`crate::registry::Repo::warm`]); nothing for a layout. Not owned by a guard: the
    /// task ends by itself (the client's connect and read timeouts bound it), and the
    /// connections it opens serve reads after the image is open too.
    pub fn warm(&self) {
        if let Source::Registry { repo } = self {
            let repo = repo.clone();
            tokio::spawn(async move { repo.warm(crate::registry::WARM_CONNECTIONS).await });
        }
    }

    /// Resolves a tag or digest to a manifest's digest without fetching it, when possible.
    pub async fn head(&self, reference: &str) -> Result<Option<ManifestMeta>> {
        match self {
            Source::Registry { repo } => repo.head(reference).await,
            Source::Layout { .. } => Ok(None),
        }
    }

    /// Fetches a manifest (by tag or digest) and checks its digest.
    pub async fn manifest(&self, reference: &str) -> Result<(Bytes, ManifestMeta)> {
        match self {
            Source::Registry { repo } => repo.manifest(reference).await,
            Source::Layout { dir } => {
                let digest = if reference.starts_with("sha256:") {
                    reference.to_string()
                } else {
                    self.layout_tag(reference)?
                };
                let data = Bytes::from(std::fs::read(self.layout_blob_path(&digest)?)?);
                let actual = crate::digest::sha256(&data);
                if actual != digest {
                    return Err(Error::Digest {
                        what: format!("manifest in {}", dir.display()),
                        expected: digest,
                        actual,
                    });
                }
                let media_type = serde_json::from_slice::<serde_json::Value>(&data)
                    .ok()
                    .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
                    .unwrap_or_default();
                let size = data.len() as u64;
                Ok((
                    data,
                    ManifestMeta {
                        digest,
                        media_type,
                        size,
                    },
                ))
            }
        }
    }

    /// Whether several reads of one blob go out at once (see `registry::pull::ranges`): at
    /// a registry without mirrors that has not answered a range whole. Not for a layout,
    /// whose blobs are files.
    pub fn reads_at_once(&self) -> bool {
        match self {
            Source::Registry { repo } => repo.reads_beside_probe(),
            Source::Layout { .. } => false,
        }
    }

    /// A blob by digest; `size` comes from the descriptor that named it.
    pub fn blob(&self, digest: &str, size: u64) -> Result<Blob> {
        crate::digest::validate_digest(digest)
            .map_err(|e| Error::format(format!("descriptor digest {digest:?}"), e))?;
        match self {
            Source::Registry { repo } => Ok(Arc::new(RepoBlob::new(repo.clone(), digest, size))),
            Source::Layout { .. } => {
                let b = FileBlob::open(digest, &self.layout_blob_path(digest)?)?;
                if crate::blob::BlobSource::size(&b) != size {
                    return Err(Error::format(
                        format!("blob {digest}"),
                        "size differs from its descriptor",
                    ));
                }
                Ok(Arc::new(b))
            }
        }
    }

    /// Reads a whole small blob (config, index) and checks its digest.
    pub async fn small_blob(&self, digest: &str, size: u64) -> Result<Bytes> {
        if size > crate::registry::MAX_MANIFEST as u64 {
            return Err(Error::format(
                format!("blob {digest}"),
                format!("{size} bytes is too large for a config"),
            ));
        }
        if let Source::Registry { repo } = self {
            crate::digest::validate_digest(digest)
                .map_err(|e| Error::format(format!("descriptor digest {digest:?}"), e))?;
            // Checked at each host, so that a mirror serving it wrong is passed over.
            return repo.read_whole(digest, size).await;
        }
        // A damaged answer is fetched once more (see `blob::healing`).
        let blob = self.blob(digest, size)?;
        let what = format!("blob {digest}");
        crate::blob::healing(&blob, (0, size), &what, || async {
            let data = blob.read_at(0, size).await?;
            let actual = crate::digest::sha256(&data);
            if actual != digest {
                return Err(Error::Digest {
                    what: what.clone(),
                    expected: digest.into(),
                    actual,
                });
            }
            Ok(data)
        })
        .await
    }

    /// Tags of the repository.
    pub async fn tags(&self) -> Result<Vec<String>> {
        match self {
            Source::Registry { repo } => repo.tags().await,
            Source::Layout { dir } => {
                let index = self.layout_index()?;
                let mut tags: Vec<String> = index
                    .iter()
                    .filter_map(|m| {
                        m.get("annotations")?
                            .get("org.opencontainers.image.ref.name")?
                            .as_str()
                            .map(str::to_string)
                    })
                    .collect();
                tags.sort();
                if tags.is_empty() && index.is_empty() {
                    return Err(Error::NotFound(format!("images in {}", dir.display())));
                }
                Ok(tags)
            }
        }
    }

    fn layout_index(&self) -> Result<Vec<serde_json::Value>> {
        let Source::Layout { dir } = self else {
            unreachable!()
        };
        let path = dir.join("index.json");
        let text = std::fs::read(&path)
            .map_err(|e| Error::NotFound(format!("{}: {e}", path.display())))?;
        let v: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::format(path.display().to_string(), e.to_string()))?;
        Ok(v.get("manifests")
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default())
    }

    /// The manifest digest a layout tag names (the only one if the layout has one image).
    fn layout_tag(&self, tag: &str) -> Result<String> {
        let index = self.layout_index()?;
        let name = |m: &serde_json::Value| {
            m.get("annotations")?
                .get("org.opencontainers.image.ref.name")?
                .as_str()
                .map(str::to_string)
        };
        let found = index
            .iter()
            .find(|m| name(m).as_deref() == Some(tag))
            .or_else(|| {
                (index.len() == 1 && (tag == "latest" || name(&index[0]).is_none()))
                    .then(|| &index[0])
            });
        found
            .and_then(|m| m.get("digest")?.as_str().map(str::to_string))
            .ok_or_else(|| Error::NotFound(format!("tag {tag:?} in {}", self.describe())))
    }

    fn layout_blob_path(&self, digest: &str) -> Result<PathBuf> {
        let Source::Layout { dir } = self else {
            unreachable!()
        };
        crate::digest::validate_digest(digest)
            .map_err(|e| Error::format(format!("digest {digest:?}"), e))?;
        let (alg, hex) = digest.split_once(':').unwrap();
        Ok(dir.join("blobs").join(alg).join(hex))
    }
}

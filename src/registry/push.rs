//! Writing to a registry: blob uploads (monolithic for small blobs, chunked from a file for
//! layers, so memory stays bounded), manifest puts, and the referrers lookup with the
//! tag-schema fallback for registries without the referrers API (distribution 2.8).

use super::{Registry, read_limited};
use crate::error::{Error, Result};
use bytes::Bytes;
use reqwest::{Method, StatusCode, header};

/// Bytes per PATCH of a chunked upload.
pub const UPLOAD_CHUNK: usize = 8 << 20;

/// Where an upload continues: the response's Location, resolved against its URL.
fn next_location(resp: &reqwest::Response) -> Result<reqwest::Url> {
    let loc = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Error::Registry("upload answered without a Location".into()))?;
    resp.url()
        .join(loc)
        .map_err(|e| Error::Registry(format!("bad upload location {loc:?}: {e}")))
}

/// The tag under which the referrers tag schema lists referrers of `digest`.
pub fn referrers_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

impl Registry {
    /// Uploads a blob unless the registry already has it.
    pub async fn push_blob(&self, repo: &str, digest: &str, data: Bytes) -> Result<()> {
        if self.has_blob(repo, digest).await? {
            return Ok(());
        }
        let target = self.start_upload(repo).await?;
        self.finish_upload(repo, target, digest, data).await
    }

    /// Uploads the blob in file `path` unless the registry already has it: PATCH requests of
    /// [`UPLOAD_CHUNK`] bytes read one at a time, then the closing PUT. `progress` gets the
    /// bytes sent so far. Returns whether anything was uploaded.
    pub async fn push_blob_file(
        &self,
        repo: &str,
        digest: &str,
        path: &std::path::Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<bool> {
        if self.has_blob(repo, digest).await? {
            return Ok(false);
        }
        let mut file = tokio::fs::File::open(path).await?;
        let mut target = self.start_upload(repo).await?;
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            let mut n = 0;
            while n < buf.len() {
                let got = tokio::io::AsyncReadExt::read(&mut file, &mut buf[n..]).await?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            if n == 0 {
                break;
            }
            buf.truncate(n);
            let headers = [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (
                    header::CONTENT_RANGE,
                    format!("{sent}-{}", sent + n as u64 - 1),
                ),
            ];
            let resp = self
                .send_with(
                    repo,
                    "pull,push",
                    Method::PATCH,
                    target.as_str(),
                    &headers,
                    Some(Bytes::from(buf)),
                )
                .await?;
            if resp.status() != StatusCode::ACCEPTED {
                return Err(self.error_for(
                    &format!("uploading bytes {sent}.. of blob {digest}"),
                    resp.status(),
                ));
            }
            target = next_location(&resp)?;
            sent += n as u64;
            progress(sent);
        }
        self.finish_upload(repo, target, digest, Bytes::new())
            .await?;
        Ok(true)
    }

    /// The closing PUT of an upload at `target`, with its last bytes (all of a monolithic one).
    async fn finish_upload(
        &self,
        repo: &str,
        mut target: reqwest::Url,
        digest: &str,
        last: Bytes,
    ) -> Result<()> {
        target.query_pairs_mut().append_pair("digest", digest);
        let headers = [(header::CONTENT_TYPE, "application/octet-stream".to_string())];
        let resp = self
            .send_with(
                repo,
                "pull,push",
                Method::PUT,
                target.as_str(),
                &headers,
                Some(last),
            )
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.error_for(&format!("uploading blob {digest}"), resp.status()));
        }
        Ok(())
    }

    async fn has_blob(&self, repo: &str, digest: &str) -> Result<bool> {
        let url = self.url(&format!("{repo}/blobs/{digest}"));
        let head = self
            .send_with(repo, "pull,push", Method::HEAD, &url, &[], None)
            .await?;
        Ok(head.status().is_success())
    }

    /// Starts an upload session; returns where to send its bytes.
    async fn start_upload(&self, repo: &str) -> Result<reqwest::Url> {
        let start = self.url(&format!("{repo}/blobs/uploads/"));
        let resp = self
            .send_with(repo, "pull,push", Method::POST, &start, &[], None)
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.error_for(&format!("starting an upload to {repo}"), resp.status()));
        }
        next_location(&resp)
    }

    /// Puts a manifest under `reference` (tag or digest); returns whether the registry took
    /// care of the `subject` itself (it answered with `OCI-Subject`).
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        data: Bytes,
    ) -> Result<bool> {
        let url = self.url(&format!("{repo}/manifests/{reference}"));
        let headers = [(header::CONTENT_TYPE, media_type.to_string())];
        let resp = self
            .send_with(repo, "pull,push", Method::PUT, &url, &headers, Some(data))
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.error_for(
                &format!("putting {}", super::manifest_name(repo, reference)),
                resp.status(),
            ));
        }
        Ok(resp.headers().contains_key("oci-subject"))
    }

    /// The image index listing referrers of `digest`: the referrers API when the registry has
    /// it, else the `sha256-<hex>` tag. `None` when neither exists.
    pub async fn referrers(&self, repo: &str, digest: &str) -> Result<Option<Bytes>> {
        // The API and the tag fallback are asked at once: a registry without the API (404 or
        // a non-index answer) costs no extra round trip, one with it an extra small request.
        let api = async {
            let url = self.url(&format!("{repo}/referrers/{digest}"));
            let accept = [(
                header::ACCEPT,
                "application/vnd.oci.image.index.v1+json".to_string(),
            )];
            let resp = self.send(repo, Method::GET, &url, &accept).await?;
            let is_index = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.contains("image.index"));
            if resp.status().is_success() && is_index {
                return Ok(Some(
                    read_limited(resp, super::MAX_MANIFEST, "referrers").await?,
                ));
            }
            Ok::<_, crate::error::Error>(None)
        };
        let tag = async {
            let tag = referrers_tag(digest);
            let resp = self.manifest_request(repo, Method::GET, &tag).await?;
            match resp.status() {
                StatusCode::NOT_FOUND => Ok(None),
                s if s.is_success() => Ok(Some(
                    read_limited(resp, super::MAX_MANIFEST, "referrers index").await?,
                )),
                s => Err(self.error_for(&format!("referrers of {digest}"), s)),
            }
        };
        match tokio::join!(api, tag) {
            (Ok(Some(index)), _) => Ok(Some(index)),
            (_, tag) => tag,
        }
    }
}

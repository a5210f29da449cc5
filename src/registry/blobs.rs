//! Blob reads: ranged GETs checked against Content-Range, bodies that break off resumed from
//! the last byte received, storage redirects followed without our Authorization header and
//! reused until they stop working.

use super::range::{Broke, ranged_body};
use super::retry::{Outcome, Retries};
use super::{Registry, Try};
use crate::error::{Error, Result};
use bytes::{Bytes, BytesMut};
use reqwest::{Method, header};

impl Registry {
    /// Reads `[offset, offset+len)` of a blob with one ranged GET.
    pub async fn read_blob(
        &self,
        repo: &str,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        let mut out = BytesMut::with_capacity(len as usize);
        self.stream_blob(repo, digest, offset, len, &mut |piece| {
            out.extend_from_slice(&piece)
        })
        .await?;
        Ok(out.freeze())
    }

    /// Streams `[offset, offset+len)` of a blob to `sink` as it arrives. A body that breaks
    /// off, stalls or crawls is asked for again from the last byte received, as the retry
    /// policy allows (one count for the requests and the resumes of their bodies).
    pub async fn stream_blob(
        &self,
        repo: &str,
        digest: &str,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let what = format!("blob {digest}");
        let mut retries = Retries::new(self.retries);
        let mut got = 0u64;
        loop {
            let before = got;
            let mut counted = |piece: Bytes| {
                got += piece.len() as u64;
                sink(piece)
            };
            let at = offset + before;
            let tried = self
                .try_blob(
                    repo,
                    digest,
                    at,
                    len - before,
                    &what,
                    &mut retries,
                    &mut counted,
                )
                .await;
            let (outcome, e) = match tried {
                Ok(()) => return Ok(()),
                Err(Try::Final(e)) => return Err(e),
                Err(Try::Again(Outcome::Body { .. }, e)) => (
                    Outcome::Body {
                        progressed: got > before,
                    },
                    e,
                ),
                Err(Try::Again(outcome, e)) => (outcome, e),
            };
            match retries.wait(outcome, None) {
                Some(wait) => {
                    tracing::warn!("{e}; asking again from byte {} in {wait:?}", offset + got);
                    tokio::time::sleep(wait).await;
                }
                None => return Err(e),
            }
        }
    }

    /// One try of a blob read: open it ([`Registry::open_tries`]), then read the body as the
    /// transfer limits allow.
    #[allow(clippy::too_many_arguments)]
    async fn try_blob(
        &self,
        repo: &str,
        digest: &str,
        offset: u64,
        len: u64,
        what: &str,
        retries: &mut Retries,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> std::result::Result<(), Try> {
        let resp = self
            .open_tries(repo, digest, offset, len, what, retries)
            .await?;
        ranged_body(resp, offset, len, what, self.transfer, sink)
            .await
            .map_err(|b| match b {
                Broke::Misfit(e) => Try::Again(Outcome::Misfit, e),
                Broke::Body(e) => Try::Again(Outcome::Body { progressed: false }, e),
            })
    }

    /// The successful answer to a GET of `[offset, offset+len)` of a blob (`len` > 0), its
    /// body unread: from the registry, or from the storage it redirects to. Its status tells
    /// a range (206) from the whole blob (200; see `range::RangeAnswer`).
    pub(crate) async fn open_blob(
        &self,
        repo: &str,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<reqwest::Response> {
        let what = format!("blob {digest}");
        let mut retries = Retries::new(self.retries);
        self.open_tries(repo, digest, offset, len, &what, &mut retries)
            .await
            .map_err(|t| match t {
                Try::Final(e) | Try::Again(_, e) => e,
            })
    }

    /// [`Registry::open_blob`] counting its retries in `retries`: through the storage URL the
    /// registry last redirected to, else the registry (and the storage it redirects to now).
    async fn open_tries(
        &self,
        repo: &str,
        digest: &str,
        offset: u64,
        len: u64,
        what: &str,
        retries: &mut Retries,
    ) -> std::result::Result<reqwest::Response, Try> {
        let range = (
            header::RANGE,
            format!("bytes={}-{}", offset, offset + len - 1),
        );
        let identity = (header::ACCEPT_ENCODING, "identity".to_string());
        let idle = self.transfer.idle_timeout;
        let cached = self.redirects.lock().unwrap().get(digest).cloned();
        if let Some(url) = cached {
            let client = self.http.for_url(&url).map_err(Try::Final)?;
            let resp = client
                .get(&url)
                .header(range.0.clone(), &range.1)
                .header(identity.0.clone(), &identity.1)
                .send();
            match tokio::time::timeout(idle, resp).await {
                Ok(Ok(r)) if r.status().is_success() => return Ok(r),
                _ => {
                    // Expired presigned URL (403) or storage hiccup: ask the registry again.
                    self.redirects.lock().unwrap().remove(digest);
                }
            }
        }
        let url = self.url(&format!("{repo}/blobs/{digest}"));
        let headers = [range.clone(), identity.clone()];
        let resp = self
            .send_tries(repo, "pull", Method::GET, &url, &headers, None, retries)
            .await
            .map_err(Try::Final)?;
        let status = resp.status();
        if status.is_redirection() {
            let loc = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    Try::Final(Error::Registry(format!(
                        "{what}: redirect without Location"
                    )))
                })?;
            let target = resp.url().join(loc).map_err(|e| {
                Try::Final(Error::Registry(format!(
                    "{what}: bad redirect {loc:?}: {e}"
                )))
            })?;
            // No Authorization header: the storage host is not the registry.
            let client = self.http.for_url(target.as_str()).map_err(Try::Final)?;
            let sent = client
                .get(target.clone())
                .header(range.0, range.1)
                .header(identity.0, identity.1)
                .send();
            let r = match tokio::time::timeout(idle, sent).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(Try::Again(Outcome::of(&e), e.into())),
                Err(_) => {
                    return Err(Try::Again(
                        Outcome::Timeout,
                        Error::Timeout(format!("{what}: no answer from storage within {idle:?}")),
                    ));
                }
            };
            if !r.status().is_success() {
                let e = self.error_for(
                    &format!("{what} at storage {}", target.host_str().unwrap_or("?")),
                    r.status(),
                );
                return Err(Try::Again(Outcome::Status(r.status()), e));
            }
            self.redirects
                .lock()
                .unwrap()
                .insert(digest.to_string(), target.to_string());
            return Ok(r);
        }
        if !status.is_success() {
            return Err(Try::Final(self.error_for(what, status)));
        }
        Ok(resp)
    }

    /// A blob's size, from HEAD.
    pub async fn blob_size(&self, repo: &str, digest: &str) -> Result<u64> {
        let url = self.url(&format!("{repo}/blobs/{digest}"));
        let resp = self.send(repo, Method::HEAD, &url, &[]).await?;
        if !resp.status().is_success() && !resp.status().is_redirection() {
            return Err(self.error_for(&format!("blob {digest}"), resp.status()));
        }
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .ok_or_else(|| Error::Registry(format!("blob {digest}: HEAD without Content-Length")))
    }
}

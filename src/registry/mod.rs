//! The registry client: the one place where HTTP, auth, redirects and retries live.
//!
//! Manifests are resolved with HEAD and fetched with GET under the OCI + Docker Accept list;
//! blobs are read with single-range GETs checked against Content-Range (a 200 with the whole
//! body is accepted and sliced: `range.rs`). Blob redirects to storage are followed without
//! our Authorization header and the redirected URL is reused until it stops working. Failed
//! requests are retried as `retry.rs` decides.

pub mod auth;
mod http;
mod push;
mod range;
mod retry;
pub use push::{UPLOAD_CHUNK, referrers_tag};

use crate::blob::{BlobSource, clamp};
use crate::error::{Error, Result};
use async_trait::async_trait;
use auth::{Authenticator, Credentials};
use bytes::{Bytes, BytesMut};
use http::Http;
pub use http::{TlsFailure, TlsOptions, tls_failure};
use range::ranged_body;
use reqwest::{Method, StatusCode, header};
use retry::{Outcome, Retries};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Media types we accept for manifests, most specific first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Manifests larger than this are refused (the distribution spec suggests 4 MiB).
pub const MAX_MANIFEST: usize = 4 << 20;

/// How to reach one registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Plain HTTP allowed (the CLI allows it for localhost and 127.0.0.1, with `--insecure`
    /// and with `--tls-verify=false`): [`Registry::connect`] uses https when the registry
    /// answers TLS, else http.
    pub insecure: bool,
    /// Credentials for Basic auth or the token server.
    pub credentials: Option<Credentials>,
    /// TLS settings for the registry host: extra authorities, a client certificate.
    pub tls: TlsOptions,
}

/// How a registry is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// HTTPS.
    Https,
    /// Plain HTTP.
    Http,
}

/// What a HEAD or GET of a manifest told us.
#[derive(Debug, Clone)]
pub struct ManifestMeta {
    /// `sha256:...` of the manifest bytes.
    pub digest: String,
    /// Content-Type as sent.
    pub media_type: String,
    /// Size in bytes.
    pub size: u64,
}

/// A client for one registry host.
pub struct Registry {
    host: String,
    base: String,
    http: Http,
    auth: Authenticator,
    /// Blob digest -> storage URL the registry last redirected us to.
    redirects: Mutex<HashMap<String, String>>,
}

impl Registry {
    /// A client for `host` (`docker.io` means Docker Hub's API host), over https unless
    /// plain HTTP is allowed (see [`RegistryOptions::insecure`]) and the registry does not
    /// answer TLS: one handshake tells, as skopeo tries https first.
    pub async fn connect(host: &str, opts: RegistryOptions) -> Result<Arc<Self>> {
        let api_host = api_host(host);
        let scheme = if opts.insecure {
            match http::speaks_tls(api_host).await {
                Some(true) => Scheme::Https,
                // Nothing answered: the first request says so, over either.
                Some(false) | None => Scheme::Http,
            }
        } else {
            Scheme::Https
        };
        Registry::new(host, opts, scheme)
    }

    /// A client for `host` over `scheme`, without asking the registry.
    pub fn new(host: &str, opts: RegistryOptions, scheme: Scheme) -> Result<Arc<Self>> {
        let api_host = api_host(host);
        let http = Http::new(api_host, scheme == Scheme::Http, opts.tls)?;
        let scheme = match scheme {
            Scheme::Https => "https",
            Scheme::Http => "http",
        };
        Ok(Arc::new(Registry {
            host: host.to_string(),
            base: format!("{scheme}://{api_host}"),
            http,
            auth: Authenticator::new(opts.credentials),
            redirects: Mutex::new(HashMap::new()),
        }))
    }

    /// The registry host this client talks to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Sends a request to the registry with auth: a cached header up front, one retry after
    /// answering a 401 challenge, one more if a cached token was refused. Transport errors,
    /// 429 and 5xx are retried with backoff, as [`retry::Retries`] decides.
    async fn send(
        &self,
        repo: &str,
        method: Method,
        url: &str,
        headers: &[(header::HeaderName, String)],
    ) -> Result<reqwest::Response> {
        self.send_with(repo, "pull", method, url, headers, None)
            .await
    }

    /// [`Registry::send`] with an explicit scope (`pull` or `pull,push`) and an optional body.
    async fn send_with(
        &self,
        repo: &str,
        actions: &str,
        method: Method,
        url: &str,
        headers: &[(header::HeaderName, String)],
        body: Option<Bytes>,
    ) -> Result<reqwest::Response> {
        let scope = format!("repository:{repo}:{actions}");
        let mut auth = self.auth.header(&self.http, &scope).await?;
        let mut challenged = false;
        let mut retries = Retries::default();
        loop {
            let mut req = self.http.for_url(url)?.request(method.clone(), url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Some(a) = &auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => match retries.wait(Outcome::of(&e)) {
                    Some(wait) => {
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    None => return Err(e.into()),
                },
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED {
                if challenged {
                    return Err(Error::Unauthorized(format!(
                        "{} refused our credentials for {repo}",
                        self.host
                    )));
                }
                challenged = true;
                let www = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                auth = Some(
                    self.auth
                        .respond(&self.http, www.as_deref(), &scope)
                        .await?,
                );
                continue;
            }
            match retries.wait(Outcome::Status(status)) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Ok(resp),
            }
        }
    }

    fn error_for(&self, what: &str, status: StatusCode) -> Error {
        match status {
            StatusCode::NOT_FOUND => Error::NotFound(format!("{what} on {}", self.host)),
            StatusCode::FORBIDDEN => {
                Error::Unauthorized(format!("{what}: access denied by {}", self.host))
            }
            s => Error::Registry(format!("{what}: {} answered HTTP {s}", self.host)),
        }
    }

    /// A HEAD or GET of `/v2/<repo>/manifests/<reference>` with the manifest Accept list.
    async fn manifest_request(
        &self,
        repo: &str,
        method: Method,
        reference: &str,
    ) -> Result<reqwest::Response> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        self.send(
            repo,
            method,
            &url,
            &[(header::ACCEPT, MANIFEST_ACCEPT.into())],
        )
        .await
    }

    /// Resolves a tag or digest with HEAD (registries count GETs against rate limits).
    /// Returns `None` when the registry gives no digest (some refuse HEAD): then GET.
    pub async fn head_manifest(&self, repo: &str, reference: &str) -> Result<Option<ManifestMeta>> {
        let resp = self.manifest_request(repo, Method::HEAD, reference).await?;
        let status = resp.status();
        if status == StatusCode::METHOD_NOT_ALLOWED {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(self.error_for(&manifest_name(repo, reference), status));
        }
        let h = resp.headers();
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        match (get("docker-content-digest"), get("content-length")) {
            (Some(digest), Some(len)) => Ok(Some(ManifestMeta {
                digest,
                media_type: get("content-type").unwrap_or_default(),
                size: len.parse().unwrap_or(0),
            })),
            _ => Ok(None),
        }
    }

    /// GETs a manifest, checking its size and, when pulled by digest (or when the registry
    /// sent Docker-Content-Digest), its sha256.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Result<(Bytes, ManifestMeta)> {
        let resp = self.manifest_request(repo, Method::GET, reference).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.error_for(&manifest_name(repo, reference), status));
        }
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let sent_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = read_limited(resp, MAX_MANIFEST, "manifest").await?;
        let digest = crate::digest::sha256(&body);
        for expected in [
            Some(reference).filter(|r| r.starts_with("sha256:")),
            sent_digest.as_deref(),
        ]
        .into_iter()
        .flatten()
        {
            if expected != digest {
                return Err(Error::Digest {
                    what: manifest_name(repo, reference),
                    expected: expected.to_string(),
                    actual: digest,
                });
            }
        }
        let size = body.len() as u64;
        Ok((
            body,
            ManifestMeta {
                digest,
                media_type,
                size,
            },
        ))
    }

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

    /// [`Registry::read_blob`], handing the bytes to `sink` in order as they arrive.
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
        let range = (
            header::RANGE,
            format!("bytes={}-{}", offset, offset + len - 1),
        );
        let identity = (header::ACCEPT_ENCODING, "identity".to_string());
        let what = format!("blob {digest}");
        let cached = self.redirects.lock().unwrap().get(digest).cloned();
        if let Some(url) = cached {
            let resp = self
                .http
                .for_url(&url)?
                .get(&url)
                .header(range.0.clone(), &range.1)
                .header(identity.0.clone(), &identity.1)
                .send()
                .await;
            match resp {
                Ok(r) if r.status().is_success() => {
                    return ranged_body(r, offset, len, &what, sink).await;
                }
                _ => {
                    // Expired presigned URL (403) or storage hiccup: ask the registry again.
                    self.redirects.lock().unwrap().remove(digest);
                }
            }
        }
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let resp = self
            .send(repo, Method::GET, &url, &[range.clone(), identity.clone()])
            .await?;
        let status = resp.status();
        if status.is_redirection() {
            let loc = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| Error::Registry(format!("{what}: redirect without Location")))?;
            let target = resp
                .url()
                .join(loc)
                .map_err(|e| Error::Registry(format!("{what}: bad redirect {loc:?}: {e}")))?;
            // No Authorization header: the storage host is not the registry.
            let r = self
                .http
                .for_url(target.as_str())?
                .get(target.clone())
                .header(range.0, range.1)
                .header(identity.0, identity.1)
                .send()
                .await?;
            if !r.status().is_success() {
                return Err(self.error_for(
                    &format!("{what} at storage {}", target.host_str().unwrap_or("?")),
                    r.status(),
                ));
            }
            self.redirects
                .lock()
                .unwrap()
                .insert(digest.to_string(), target.to_string());
            return ranged_body(r, offset, len, &what, sink).await;
        }
        if !status.is_success() {
            return Err(self.error_for(&what, status));
        }
        ranged_body(resp, offset, len, &what, sink).await
    }

    /// A blob's size, from HEAD.
    pub async fn blob_size(&self, repo: &str, digest: &str) -> Result<u64> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let resp = self.send(repo, Method::HEAD, &url, &[]).await?;
        if !resp.status().is_success() && !resp.status().is_redirection() {
            return Err(self.error_for(&format!("blob {digest}"), resp.status()));
        }
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .ok_or_else(|| Error::Registry(format!("blob {digest}: HEAD without Content-Length")))
    }

    /// All tags of a repository, following `Link: <...>; rel="next"` pagination.
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>> {
        let mut url = format!("{}/v2/{repo}/tags/list?n=1000", self.base);
        let mut tags = Vec::new();
        for _ in 0..1000 {
            let resp = self.send(repo, Method::GET, &url, &[]).await?;
            if !resp.status().is_success() {
                return Err(self.error_for(&format!("tags of {repo}"), resp.status()));
            }
            let next = resp
                .headers()
                .get(header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| {
                    l.split_once('<')
                        .and_then(|(_, r)| r.split_once('>'))
                        .map(|(u, _)| u.to_string())
                });
            let body = read_limited(resp, 16 << 20, "tag list").await?;
            #[derive(serde::Deserialize)]
            struct List {
                tags: Option<Vec<String>>,
            }
            let list: List = serde_json::from_slice(&body)
                .map_err(|e| Error::format("tag list", e.to_string()))?;
            tags.extend(list.tags.unwrap_or_default());
            match next {
                Some(n) if n.starts_with('/') => url = format!("{}{n}", self.base),
                Some(n) => url = n,
                None => return Ok(tags),
            }
        }
        Err(Error::Registry("tag list pagination does not end".into()))
    }
}

/// `manifest REPO:TAG` or `manifest REPO@DIGEST`, as references are written.
fn manifest_name(repo: &str, reference: &str) -> String {
    let sep = if reference.contains(':') { '@' } else { ':' };
    format!("manifest {repo}{sep}{reference}")
}

/// The host that serves `host`'s API (`docker.io`: Docker Hub's).
fn api_host(host: &str) -> &str {
    if host == crate::reference::DOCKER_HUB {
        "registry-1.docker.io"
    } else {
        host
    }
}

/// Reads a whole response body, refusing more than `limit` bytes.
async fn read_limited(mut resp: reqwest::Response, limit: usize, what: &str) -> Result<Bytes> {
    let mut out = BytesMut::new();
    while let Some(chunk) = resp.chunk().await? {
        if out.len() + chunk.len() > limit {
            return Err(Error::format(what, format!("larger than {limit} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// One registry blob as a [`BlobSource`].
pub struct RegistryBlob {
    registry: Arc<Registry>,
    repo: String,
    digest: String,
    size: u64,
}

impl RegistryBlob {
    /// The blob `digest` of `repo`, whose size the manifest gave.
    pub fn new(registry: Arc<Registry>, repo: &str, digest: &str, size: u64) -> Self {
        RegistryBlob {
            registry,
            repo: repo.into(),
            digest: digest.into(),
            size,
        }
    }
}

#[async_trait]
impl BlobSource for RegistryBlob {
    fn id(&self) -> &str {
        &self.digest
    }
    fn size(&self) -> u64 {
        self.size
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        let len = clamp(&self.digest, self.size, offset, len)?;
        self.registry
            .read_blob(&self.repo, &self.digest, offset, len)
            .await
    }
    async fn stream_at(
        &self,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        let len = clamp(&self.digest, self.size, offset, len)?;
        self.registry
            .stream_blob(&self.repo, &self.digest, offset, len, sink)
            .await
    }
}

/// Hints are for the decorators above a registry blob (the block cache); it ignores them.
impl crate::blob::ReadHints for RegistryBlob {}

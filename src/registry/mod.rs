//! The registry client: the one place where HTTP, auth, redirects and retries live.
//!
//! Manifests are resolved with HEAD and fetched with GET under the OCI + Docker Accept list;
//! blobs are read (`blobs.rs`) with single-range GETs checked against Content-Range (a 200 with the whole
//! body is accepted and sliced: `range.rs`). Blob redirects to storage are followed without
//! our Authorization header and the redirected URL is reused until it stops working. Failed
//! requests are retried as `retry.rs` decides; a blob body that breaks off, stalls or crawls
//! (see [`Transfer`]) is asked for again from the last byte received.
//!
//! [`Registry`] talks to one host. Above it, [`Repo`] (`pull.rs`) pulls a repository from its
//! hosts in order — mirrors, then the registry — as the mirror configuration (`routes.rs`:
//! containerd's `hosts.rs`, containers' `registries_conf.rs`) says, falling back from one to
//! the next, and streams once (`whole.rs`) a blob that a host sends whole for a ranged read.

pub mod auth;
mod blobs;
mod conf;
pub mod endpoint;
pub mod hosts;
mod http;
mod pull;
mod push;
mod question;
mod range;
mod refusal;
pub mod registries_conf;
mod retry;
pub mod routes;
mod whole;
pub use endpoint::{Capabilities, Endpoint, Route};
pub use pull::{Repo, RepoBlob, RepoOptions};
pub use push::{UPLOAD_CHUNK, referrers_tag};
pub use routes::MirrorConfig;

use crate::config::Transfer;
use crate::error::{Error, Result};
use auth::{Authenticator, Credentials};
use bytes::{Bytes, BytesMut};
use http::Http;
pub use http::{TlsFailure, host_port, tls_failure};
pub use question::speaks_tls;
use reqwest::{Method, StatusCode, header};
use retry::{Outcome, Retries};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// Media types we accept for manifests, most specific first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Manifests larger than this are refused (the distribution spec suggests 4 MiB).
pub const MAX_MANIFEST: usize = 4 << 20;

/// Connections [`Registry::warm`] opens while the manifest is on its way: enough for the
/// requests that follow it at once (the config and the layers' tails, the large ones as
/// ranges that share these connections, or the index discovery's three).
pub const WARM_CONNECTIONS: usize = 8;

/// How to reach one registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Use plain HTTP (always allowed for localhost and 127.0.0.1).
    pub insecure: bool,
    /// Credentials for Basic auth or the token server.
    pub credentials: Option<Credentials>,
    /// How long an answer may dawdle before it is abandoned and asked for again.
    pub transfer: Transfer,
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
    /// `scheme://host[:port]`, for the relative URLs a registry answers with.
    origin: String,
    /// The API root (`origin` + `/v2`, or the configured path).
    api: String,
    /// `?ns=<registry>` for a mirror standing in for another registry, else empty.
    query: String,
    /// Configured headers sent with every request to the registry.
    headers: header::HeaderMap,
    http: Http,
    auth: Authenticator,
    /// Blob digest -> storage URL the registry last redirected us to.
    redirects: Mutex<HashMap<String, String>>,
    transfer: Transfer,
    /// Retries of each request after its first try (see `retry.rs`): fewer at a host that
    /// has another to fall back to.
    retries: u32,
    /// Set when the connections were opened beside the TLS question: the next
    /// [`Registry::warm`] has nothing to open (its requests would only hold them while the
    /// manifest's request wants one).
    warmed: AtomicBool,
    /// The plain registry's answer to the TLS question when that asked for the manifest a
    /// pull wants first (or the request still on its way): taken by the
    /// [`Registry::get_manifest`] of the same URL.
    primed: Mutex<Option<question::Kept>>,
}

/// How one try of a blob read ended, when it did not deliver the range.
enum Try {
    /// Not worth trying again (the error is the read's).
    Final(Error),
    /// Worth trying again from the last byte received, as the retry policy allows.
    Again(Outcome, Error),
}

impl Registry {
    /// A client for `host` (`docker.io` means Docker Hub's API host).
    pub fn new(host: &str, opts: RegistryOptions) -> Result<Arc<Self>> {
        let endpoint = Endpoint::direct(host, opts.insecure);
        let mut r = Registry::build(&endpoint, None, opts.credentials, opts.transfer, false)?;
        r.host = host.to_string();
        Ok(Arc::new(r))
    }

    /// A client for a configured host: its endpoint (API root, TLS, headers), the registry
    /// it stands in for when it is a mirror (`namespace`), and its credentials. `fallback`:
    /// another host follows it, so its requests get fewer retries (`retry.rs`).
    pub fn at(
        endpoint: &Endpoint,
        namespace: Option<&str>,
        credentials: Option<Credentials>,
        transfer: Transfer,
        fallback: bool,
    ) -> Result<Arc<Self>> {
        Ok(Arc::new(Registry::build(
            endpoint,
            namespace,
            credentials,
            transfer,
            fallback,
        )?))
    }

    fn build(
        endpoint: &Endpoint,
        namespace: Option<&str>,
        credentials: Option<Credentials>,
        transfer: Transfer,
        fallback: bool,
    ) -> Result<Self> {
        let mut headers = header::HeaderMap::new();
        for (k, v) in &endpoint.headers {
            let bad =
                |e: String| Error::Registry(format!("header {k:?} for {}: {e}", endpoint.host));
            headers.append(
                header::HeaderName::from_bytes(k.as_bytes()).map_err(|e| bad(e.to_string()))?,
                header::HeaderValue::from_str(v).map_err(|e| bad(e.to_string()))?,
            );
        }
        Ok(Registry {
            host: endpoint.name(),
            origin: endpoint.origin(),
            api: endpoint.api(),
            query: namespace.map(|ns| format!("ns={ns}")).unwrap_or_default(),
            headers,
            http: Http::new(
                endpoint.scheme == "http",
                &endpoint.tls,
                endpoint.dial_timeout,
            )?,
            auth: Authenticator::new(credentials),
            redirects: Mutex::new(HashMap::new()),
            transfer,
            retries: match fallback {
                true => retry::FALLBACK_RETRIES,
                false => retry::MAX_RETRIES,
            },
            warmed: Default::default(),
            primed: Default::default(),
        })
    }

    /// The URL of API path `path` (`<repo>/manifests/<ref>`, may carry a query).
    fn url(&self, path: &str) -> String {
        match (self.query.is_empty(), path.contains('?')) {
            (true, _) => format!("{}/{path}", self.api),
            (false, false) => format!("{}/{path}?{}", self.api, self.query),
            (false, true) => format!("{}/{path}&{}", self.api, self.query),
        }
    }

    /// How blob bodies are watched (idle timeout, least rate).
    pub(crate) fn transfer(&self) -> Transfer {
        self.transfer
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
        let mut retries = Retries::new(self.retries);
        self.send_tries(repo, actions, method, url, headers, body, &mut retries)
            .await
    }

    /// `e`, a request to `url` that failed, or, when that was an https request that
    /// failed without a word about TLS, the host's refusal of our TLS connection if a
    /// probe finds one (see `Http::tls_refusal`: over HTTP/2 a refused client certificate
    /// shows as a closed connection).
    async fn why_refused(&self, e: Error, url: &str) -> Error {
        let Error::Http(he) = &e else { return e };
        let Ok(u) = reqwest::Url::parse(url) else {
            return e;
        };
        if u.scheme() != "https" || he.is_timeout() || http::tls_refused(he) {
            return e;
        }
        let Some(host) = http::host_port(&u) else {
            return e;
        };
        match self.http.tls_refusal(&host).await {
            Some(source) => Error::TlsRefused { host, source },
            None => e,
        }
    }

    /// [`Registry::send_with`], counting its retries in `retries` (a blob read shares them
    /// between its requests and the resumes of their bodies). Without a body to upload,
    /// an answer whose headers take longer than the idle timeout is a timeout.
    #[allow(clippy::too_many_arguments)]
    async fn send_tries(
        &self,
        repo: &str,
        actions: &str,
        method: Method,
        url: &str,
        headers: &[(header::HeaderName, String)],
        body: Option<Bytes>,
        retries: &mut Retries,
    ) -> Result<reqwest::Response> {
        let scope = format!("repository:{repo}:{actions}");
        let mut auth = self.auth.header(&self.http, &scope).await?;
        let mut challenged = false;
        let mut probed = false;
        let idle = self.transfer.idle_timeout;
        loop {
            let mut req = self.http.for_url(url)?.request(method.clone(), url);
            req = req.headers(self.headers.clone());
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Some(a) = &auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let sent = match &body {
                Some(_) => Ok(req.send().await),
                None => tokio::time::timeout(idle, req.send()).await,
            };
            let tried = match sent {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err((Outcome::of(&e), Error::from(e))),
                Err(_) => Err((
                    Outcome::Timeout,
                    Error::Timeout(format!("{method} {url}: no answer within {idle:?}")),
                )),
            };
            let resp = match tried {
                Ok(r) => r,
                Err((outcome, e)) => {
                    // Once per request: a refusal is final, and said as such.
                    let e = match std::mem::replace(&mut probed, true) {
                        false => self.why_refused(e, url).await,
                        true => e,
                    };
                    if matches!(e, Error::TlsRefused { .. }) {
                        return Err(e);
                    }
                    match retries.wait(outcome, None) {
                        Some(wait) => {
                            tracing::warn!("{e}; trying again in {wait:?}");
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                        None => return Err(e),
                    }
                }
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
            let asked = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok());
            let asked = retry::retry_after(asked, std::time::SystemTime::now());
            match retries.wait(Outcome::Status(status), asked) {
                Some(wait) => {
                    tracing::warn!(
                        "{method} {url}: {} answered HTTP {status}{}; trying again in {wait:?}",
                        self.host,
                        asked.map_or(String::new(), |a| format!(" (Retry-After {a:?})"))
                    );
                    tokio::time::sleep(wait).await
                }
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
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Error::Unavailable(format!("{what}: {} answered HTTP {s}", self.host))
            }
            s => Error::Registry(format!("{what}: {} answered HTTP {s}", self.host)),
        }
    }

    /// The error for a manifest request answered `status`. A 404 from something that is not
    /// a registry at all (a web server answers 404 to every registry path) says so: the
    /// user has the wrong host or port, not the wrong tag.
    async fn manifest_error(&self, repo: &str, reference: &str, status: StatusCode) -> Error {
        let what = manifest_name(repo, reference);
        if status == StatusCode::NOT_FOUND
            && let Some(answer) = self.not_a_registry().await
        {
            return Error::NotFound(format!(
                "{what}: {} is not a container registry ({answer}); check the host and port",
                self.host
            ));
        }
        self.error_for(&what, status)
    }

    /// A HEAD or GET of `/v2/<repo>/manifests/<reference>` with the manifest Accept list.
    async fn manifest_request(
        &self,
        repo: &str,
        method: Method,
        reference: &str,
    ) -> Result<reqwest::Response> {
        let url = self.url(&format!("{repo}/manifests/{reference}"));
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
            return Err(self.manifest_error(repo, reference, status).await);
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
        let url = self.url(&format!("{repo}/manifests/{reference}"));
        let primed = self.primed.lock().unwrap().take();
        let answer = match primed.filter(|p| p.url() == url) {
            Some(kept) => kept.answer().await,
            None => None,
        };
        let (headers, body) = match answer {
            Some(answer) => (answer.headers, answer.body),
            None => {
                let resp = self.manifest_request(repo, Method::GET, reference).await?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(self.manifest_error(repo, reference, status).await);
                }
                let headers = resp.headers().clone();
                (headers, read_limited(resp, MAX_MANIFEST, "manifest").await?)
            }
        };
        let get = |n: header::HeaderName| {
            let value = headers.get(n).and_then(|v| v.to_str().ok());
            value.map(str::to_string)
        };
        let media_type = get(header::CONTENT_TYPE).unwrap_or_default();
        let sent_digest = get(header::HeaderName::from_static("docker-content-digest"));
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

    /// All tags of a repository, following `Link: <...>; rel="next"` pagination.
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>> {
        let mut url = self.url(&format!("{repo}/tags/list?n=1000"));
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
                Some(n) if n.starts_with('/') => url = format!("{}{n}", self.origin),
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

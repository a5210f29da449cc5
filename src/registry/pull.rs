//! A repository as it is pulled: [`Repo`] holds its hosts in order — mirrors, then the
//! registry — each a [`Registry`] client with the repository's name at that host, and falls
//! back from one to the next. A host that fails a request (no connection, a timeout, a 5xx
//! after retries — one retry where another host follows, the full budget at the last — a
//! 404, a wrong digest or size) is skipped for that request and the next one tried, the
//! registry last; a host that could not be reached is left alone for a while (one that
//! answered 5xx, with a host after it, for a shorter while), one
//! that lacks an object or served it wrong is not asked for it again, one that refused our
//! credentials is not asked again. Tags are resolved only at hosts that may resolve; content
//! named by digest is checked wherever it comes from (manifests and small blobs hashed whole,
//! blob answers checked against the blob's size and digest headers, streamed blobs hashed).
//!
//! Per host and blob, the first ranged read is a probe the others wait for (at a mirror; at
//! the image's own registry they go out beside it, see `ranges.rs`): a 206 means the host
//! serves ranges; a 200 with the whole blob (a pull-through cache that has not stored it)
//! means the blob is streamed whole, once, into a spool that serves every read of it from
//! that host (`whole.rs`) — never one full download per read. A 200 that names the blob's
//! digest is first taken for a pull-through cache that has started storing the blob: the
//! readers hang up and wait for it to answer by range (`ranges.rs`), so that the cache's one
//! download is the only one the origin makes, however many nodes ask.

use super::auth::Credentials;
use super::endpoint::{Capabilities, Endpoint, Route};
use super::{ManifestMeta, Registry};
use crate::blob::{BlobSource, ReadHints, clamp};
use crate::error::{Error, Result};
use crate::stats::HostFigures;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use ranges::RangeState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a host that could not be reached is left alone.
const DOWN_FOR: Duration = Duration::from_secs(30);
/// How long a host that answered 5xx or 429 after its retries is left alone when another
/// host follows it: long enough that a broken mirror costs one fallback per few seconds,
/// not one per request; short enough that a mirror back from a hiccup is soon used again.
const BUSY_FOR: Duration = Duration::from_secs(5);

/// How a repository's blobs are pulled, beyond its routes.
#[derive(Debug, Clone, Default)]
pub struct RepoOptions {
    /// Where blobs a host sends whole are spooled (`None`: such answers are sliced, and the
    /// host asked again for each read).
    pub spool_dir: Option<PathBuf>,
    /// How each host's blob bodies are watched (idle timeout, least rate).
    pub transfer: crate::config::Transfer,
    /// How long the readers of a blob wait for a host that answered a range of it with the
    /// whole blob to store it and answer by range (zero: never; the blob is streamed whole
    /// at once). Keep it well within a read's deadline.
    pub fill_wait: Duration,
}

/// One host of a repository.
struct Host {
    registry: Arc<Registry>,
    repo: String,
    caps: Capabilities,
    mirror: bool,
    /// Not asked before then (it could not be reached).
    down_until: Mutex<Option<Instant>>,
    /// It refused our credentials: not asked again.
    refused: AtomicBool,
    /// Shared with the spool tasks that stream from it.
    counters: Arc<Counters>,
    /// Whether it stored a blob we waited for ([`Filling::Fills`]) or let a wait run out
    /// without ever storing one ([`Filling::Never`]: not waited for again).
    filling: Mutex<Filling>,
    /// It answered a range with a whole blob: the reads of a blob there wait for its probe
    /// (see `Repo::beside_probe`).
    answered_whole: AtomicBool,
}

/// What waiting for a host to store blobs it answered whole has shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filling {
    /// Nothing yet.
    Unknown,
    /// It answered a range with that range (after a wait, or for a blob it had): a whole
    /// answer from it means a blob not stored yet, worth waiting for.
    Fills,
    /// A wait ran out before it ever answered a range: it ignores ranges, and a whole answer
    /// is streamed at once (until it answers a range after all).
    Never,
}

/// What one host served.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
    failures: AtomicU64,
    whole: AtomicU64,
    /// Blobs it answered whole at first and by range once it had stored them.
    stored: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Bytes per object (a manifest's or a blob's digest).
    served: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn served(&self, object: &str, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        *self
            .served
            .lock()
            .unwrap()
            .entry(object.to_string())
            .or_default() += bytes;
    }
}

/// A repository and the hosts it is pulled from, in order.
pub struct Repo {
    /// `registry/repository` as the reference names it.
    name: String,
    hosts: Vec<Host>,
    opts: RepoOptions,
    /// (host, object) pairs a host lacks or served wrong.
    skipped: Mutex<HashSet<(usize, String)>>,
    /// (host, blob) -> how the blob is read there.
    ranges: Mutex<HashMap<(usize, String), RangeState>>,
}

/// What a request needs of a host.
#[derive(Clone, Copy)]
enum Need {
    Pull,
    Resolve,
}

impl Repo {
    /// The repository `name` (`registry/repository`) through `routes`, each host's client
    /// built with the credentials `credentials` finds for it.
    pub fn connect(
        name: &str,
        routes: &[Route],
        credentials: &dyn Fn(&Endpoint) -> Result<Option<Credentials>>,
        opts: RepoOptions,
    ) -> Result<Arc<Repo>> {
        let mut hosts = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            // A host before another that may pull has a fallback: fewer retries there.
            let fallback = routes[i + 1..].iter().any(|later| later.caps.pull);
            let registry = Registry::at(
                &r.endpoint,
                r.namespace.as_deref(),
                credentials(&r.endpoint)?,
                opts.transfer,
                fallback,
            )?;
            hosts.push(Host::new(registry, &r.repo, r.caps, r.mirror));
        }
        Ok(Arc::new(Repo {
            name: name.to_string(),
            hosts,
            opts,
            skipped: Mutex::default(),
            ranges: Mutex::default(),
        }))
    }

    /// The client of host `i` (in the order of the routes it was connected with).
    pub fn host(&self, i: usize) -> Option<Arc<Registry>> {
        self.hosts.get(i).map(|h| h.registry.clone())
    }

    /// The client of the registry itself (the last host tried: mirrors come first), for
    /// explaining errors.
    pub fn origin(&self) -> Option<Arc<Registry>> {
        self.hosts.last().map(|h| h.registry.clone())
    }

    /// Opens `n` connections to the first host (the one a request goes to first) in the
    /// background of opening an image: see [`Registry::warm`].
    pub async fn warm(&self, n: usize) {
        if let Some(h) = self.hosts.first() {
            h.registry.warm(n).await;
        }
    }

    /// `registry/repository`, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The first host that takes uploads, and the repository's name there.
    pub fn push_target(&self) -> Option<(Arc<Registry>, String)> {
        let h = self.hosts.iter().find(|h| h.caps.push)?;
        Some((h.registry.clone(), h.repo.clone()))
    }

    /// Hosts to ask for `object` (a digest or tag) needing `need`, in order: those not known
    /// to lack it, refuse us or be down (if every one is down, those not lacking it).
    fn order(&self, need: Need, object: &str) -> Vec<usize> {
        let usable: Vec<usize> = (0..self.hosts.len())
            .filter(|&i| {
                let h = &self.hosts[i];
                let can = match need {
                    Need::Pull => h.caps.pull,
                    Need::Resolve => h.caps.resolve,
                };
                can && !self.passed_over(i, object)
            })
            .collect();
        let up: Vec<usize> = usable.iter().copied().filter(|&i| !self.down(i)).collect();
        if up.is_empty() { usable } else { up }
    }

    /// Whether host `i` refused us or lacks `object` (or served it wrong).
    fn passed_over(&self, i: usize, object: &str) -> bool {
        self.hosts[i].refused.load(Ordering::Relaxed)
            || (self.skipped.lock().unwrap()).contains(&(i, object.to_string()))
    }

    /// Whether host `i` could not be reached a moment ago.
    fn down(&self, i: usize) -> bool {
        let until = *self.hosts[i].down_until.lock().unwrap();
        until.is_some_and(|t| t > Instant::now())
    }

    /// The error when no host may serve `object`.
    fn none_serves(&self, object: &str) -> Error {
        Error::NotFound(format!("{object} of {}: no host may serve it", self.name))
    }

    /// Notes that host `i` failed a request for `object` with `e`, and what that means for
    /// later requests (see the module doc).
    fn failed(&self, i: usize, object: &str, e: &Error) {
        let h = &self.hosts[i];
        h.counters.failures.fetch_add(1, Ordering::Relaxed);
        *h.counters.last_error.lock().unwrap() = Some(e.to_string());
        match e {
            Error::Http(he) if he.is_connect() || he.is_timeout() => h.down_for(DOWN_FOR),
            Error::Unavailable(_) if i + 1 < self.hosts.len() => h.down_for(BUSY_FOR),
            Error::Unauthorized(_) => h.refused.store(true, Ordering::Relaxed),
            Error::NotFound(_) | Error::Digest { .. } | Error::Format { .. }
                if object.starts_with("sha256:") =>
            {
                self.skipped.lock().unwrap().insert((i, object.to_string()));
            }
            _ => {}
        }
        let role = if h.mirror { "mirror" } else { "registry" };
        tracing::warn!("{role} {} failed for {object}: {e}", h.registry.host());
    }

    /// Tries `op` at each host `order` gives, in turn, until one succeeds; the last error if
    /// none does.
    async fn each_host<T, F, Fut>(&self, need: Need, object: &str, mut op: F) -> Result<T>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut last = None;
        for i in self.order(need, object) {
            match op(i).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.failed(i, object, &e);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| self.none_serves(object)))
    }

    /// Host `i`, counting a request to it.
    fn asked(&self, i: usize) -> &Host {
        let h = &self.hosts[i];
        h.counters.requests.fetch_add(1, Ordering::Relaxed);
        h
    }

    fn need_for(reference: &str) -> Need {
        if reference.starts_with("sha256:") {
            Need::Pull
        } else {
            Need::Resolve
        }
    }

    /// Resolves a tag or digest with HEAD at the first host that answers (see
    /// [`Registry::head_manifest`]).
    pub async fn head(&self, reference: &str) -> Result<Option<ManifestMeta>> {
        self.each_host(Repo::need_for(reference), reference, |i| {
            let h = self.asked(i);
            h.registry.head_manifest(&h.repo, reference)
        })
        .await
    }

    /// A manifest by tag (at hosts that may resolve) or digest (checked), from the first
    /// host that serves it.
    pub async fn manifest(&self, reference: &str) -> Result<(Bytes, ManifestMeta)> {
        self.each_host(Repo::need_for(reference), reference, |i| async move {
            let h = self.asked(i);
            let got = h.registry.get_manifest(&h.repo, reference).await?;
            h.counters.served(&got.1.digest, got.0.len() as u64);
            Ok(got)
        })
        .await
    }

    /// A whole small blob (a config, an index), checked against its digest at each host.
    pub async fn read_whole(&self, digest: &str, size: u64) -> Result<Bytes> {
        // No range names no bytes: an empty blob is only checked.
        if size == 0 {
            return match crate::digest::sha256(b"") {
                empty if empty == digest => Ok(Bytes::new()),
                actual => Err(Error::Digest {
                    what: format!("blob {digest} of size 0"),
                    expected: digest.into(),
                    actual,
                }),
            };
        }
        let mut last = None;
        for i in self.order(Need::Pull, digest) {
            let mut out = BytesMut::with_capacity(size as usize);
            let got = self
                .at_host(i, digest, size, 0, size, &mut |p| out.extend_from_slice(&p))
                .await;
            let e = match got {
                Ok(false) => continue,
                Ok(true) => match crate::digest::sha256(&out) {
                    actual if actual == digest => return Ok(out.freeze()),
                    actual => Error::Digest {
                        what: format!("blob {digest} from {}", self.hosts[i].registry.host()),
                        expected: digest.into(),
                        actual,
                    },
                },
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            self.failed(i, digest, &e);
            last = Some(e);
        }
        Err(last.unwrap_or_else(|| self.none_serves(digest)))
    }

    /// `[offset, offset+len)` of blob `digest` (`size` bytes), handed to `sink` as it
    /// arrives; a host failing part-way is left for the next, from where it stopped.
    pub async fn stream_blob(
        &self,
        digest: &str,
        size: u64,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut done = 0u64;
        let mut last = None;
        for i in self.order(Need::Pull, digest) {
            let (from, rest) = (offset + done, len - done);
            let mut counted = |piece: Bytes| {
                done += piece.len() as u64;
                sink(piece)
            };
            let r = self
                .at_host(i, digest, size, from, rest, &mut counted)
                .await;
            match r {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| self.none_serves(digest)))
    }

    /// A blob's size, from HEAD at the first host that answers.
    pub async fn blob_size(&self, digest: &str) -> Result<u64> {
        self.each_host(Need::Pull, digest, |i| {
            let h = self.asked(i);
            h.registry.blob_size(&h.repo, digest)
        })
        .await
    }

    /// All tags, from the first host that may resolve and answers.
    pub async fn tags(&self) -> Result<Vec<String>> {
        self.each_host(Need::Resolve, "tags", |i| {
            let h = self.asked(i);
            h.registry.tags(&h.repo)
        })
        .await
    }

    /// The referrers index of `digest` (see [`Registry::referrers`]), from the first host
    /// that may resolve and answers: like a tag, it is a name the registry vouches for.
    pub async fn referrers(&self, digest: &str) -> Result<Option<Bytes>> {
        let object = super::referrers_tag(digest);
        self.each_host(Need::Resolve, &object, |i| {
            let h = self.asked(i);
            h.registry.referrers(&h.repo, digest)
        })
        .await
    }

    /// What each host served, for `ocifs stats` and `ocifs inspect`.
    pub fn figures(&self) -> Vec<HostFigures> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.hosts
            .iter()
            .map(|h| HostFigures {
                host: h.registry.host().to_string(),
                role: if h.mirror { "mirror" } else { "registry" }.into(),
                repository: h.repo.clone(),
                capabilities: h.caps.names(),
                requests: load(&h.counters.requests),
                bytes: load(&h.counters.bytes),
                failures: load(&h.counters.failures),
                last_error: h.counters.last_error.lock().unwrap().clone(),
                whole_streams: load(&h.counters.whole),
                waited_for_store: load(&h.counters.stored),
                served: h.counters.served.lock().unwrap().clone(),
            })
            .collect()
    }
}

impl Host {
    fn new(registry: Arc<Registry>, repo: &str, caps: Capabilities, mirror: bool) -> Host {
        Host {
            registry,
            repo: repo.to_string(),
            caps,
            mirror,
            down_until: Mutex::new(None),
            refused: AtomicBool::new(false),
            counters: Arc::default(),
            filling: Mutex::new(Filling::Unknown),
            answered_whole: AtomicBool::new(false),
        }
    }

    /// Leaves the host alone for `span` from now, unless it is already left alone longer.
    fn down_for(&self, span: Duration) {
        let mut until = self.down_until.lock().unwrap();
        let end = Instant::now() + span;
        *until = Some(until.map_or(end, |u| u.max(end)));
    }
}

/// One blob of a [`Repo`] as a [`BlobSource`].
pub struct RepoBlob {
    repo: Arc<Repo>,
    digest: String,
    size: u64,
}

impl RepoBlob {
    /// The blob `digest` of `repo`, whose size the manifest gave.
    pub fn new(repo: Arc<Repo>, digest: &str, size: u64) -> Self {
        RepoBlob {
            repo,
            digest: digest.into(),
            size,
        }
    }
}

#[async_trait]
impl BlobSource for RepoBlob {
    fn id(&self) -> &str {
        &self.digest
    }
    fn size(&self) -> u64 {
        self.size
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        let len = clamp(&self.digest, self.size, offset, len)?;
        let mut out = BytesMut::with_capacity(len as usize);
        self.stream_at(offset, len, &mut |p| out.extend_from_slice(&p))
            .await?;
        Ok(out.freeze())
    }
    async fn stream_at(
        &self,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        let len = clamp(&self.digest, self.size, offset, len)?;
        self.repo
            .stream_blob(&self.digest, self.size, offset, len, sink)
            .await
    }
}

/// Hints are for the decorators above a registry blob (the block cache); it ignores them.
impl ReadHints for RepoBlob {}

mod ranges;
#[cfg(test)]
mod tests;

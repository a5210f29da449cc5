//! Reading a blob from one host: the first ranged read of it there is a probe the others
//! wait for, and its answer decides whether the blob is read by ranges or from one whole
//! stream (see `whole.rs`).

use super::super::range::{RangeAnswer, ranged_body};
use super::super::whole::Spool;
use super::Repo;
use crate::error::{Error, Result};
use bytes::Bytes;
use reqwest::header;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::watch;

/// How a blob is read from one host.
#[derive(Clone)]
pub(super) enum Ranges {
    /// Not asked yet: the next read is the probe.
    Unknown,
    /// A probe is under way; other reads wait for its answer.
    Probing,
    /// By range.
    Ranged,
    /// From one whole stream (the host answered a range with the whole blob).
    Whole(Arc<Spool>),
}

/// How one blob is read from one host, shared by its readers.
pub(super) type RangeState = Arc<watch::Sender<Ranges>>;

impl Repo {
    /// How blob `digest` is read from host `i`.
    pub(super) fn ranges(&self, i: usize, digest: &str) -> RangeState {
        let mut all = self.ranges.lock().unwrap();
        all.entry((i, digest.to_string()))
            .or_insert_with(|| Arc::new(watch::channel(Ranges::Unknown).0))
            .clone()
    }

    /// `[offset, offset+len)` of blob `digest` from host `i`: by range, from the blob's
    /// spool, or as the probe that decides which. `false` (nothing read): while this read
    /// waited for another's probe, that probe found the host down, refusing us or lacking
    /// the blob. A failure is noted (see `Repo::failed`) before any read waiting for this
    /// one's probe looks again.
    pub(super) async fn at_host(
        &self,
        i: usize,
        digest: &str,
        size: u64,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<bool> {
        let h = &self.hosts[i];
        let state = self.ranges(i, digest);
        loop {
            let now = state.borrow().clone();
            match now {
                Ranges::Ranged => {
                    h.counters.requests.fetch_add(1, Ordering::Relaxed);
                    let mut counted = |p: Bytes| {
                        h.counters.served(digest, p.len() as u64);
                        sink(p)
                    };
                    let r = h
                        .registry
                        .stream_blob(&h.repo, digest, offset, len, &mut counted)
                        .await;
                    return self.settle(i, digest, r);
                }
                Ranges::Whole(spool) => {
                    let r = spool.stream(offset, len, size, sink).await;
                    if r.is_err() {
                        // The next read asks the host again (or, after a mismatch, another).
                        state.send_if_modified(|s| match s {
                            Ranges::Whole(sp) if Arc::ptr_eq(sp, &spool) => {
                                *s = Ranges::Unknown;
                                true
                            }
                            _ => false,
                        });
                    }
                    return self.settle(i, digest, r);
                }
                Ranges::Probing => {
                    let mut rx = state.subscribe();
                    let _ = rx.wait_for(|s| !matches!(s, Ranges::Probing)).await;
                    if self.passed_over(i, digest) || self.down(i) {
                        return Ok(false);
                    }
                }
                Ranges::Unknown => {
                    let mine = state.send_if_modified(|s| match s {
                        Ranges::Unknown => {
                            *s = Ranges::Probing;
                            true
                        }
                        _ => false,
                    });
                    if mine {
                        let _reset = ProbeGuard(&state);
                        let r = self.probe(i, &state, digest, size, offset, len, sink).await;
                        return self.settle(i, digest, r);
                    }
                }
            }
        }
    }

    /// `r`, a read of `digest` from host `i`, noting its failure.
    fn settle(&self, i: usize, digest: &str, r: Result<()>) -> Result<bool> {
        if let Err(e) = &r {
            self.failed(i, digest, e);
        }
        r.map(|()| true)
    }

    /// The first ranged read of a blob at host `i`: its answer decides how the blob is read
    /// there from now on.
    #[allow(clippy::too_many_arguments)]
    async fn probe(
        &self,
        i: usize,
        state: &watch::Sender<Ranges>,
        digest: &str,
        size: u64,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        let h = &self.hosts[i];
        h.counters.requests.fetch_add(1, Ordering::Relaxed);
        let resp = h.registry.open_blob(&h.repo, digest, offset, len).await?;
        let what = format!("blob {digest} from {}", h.registry.host());
        check_answer(&resp, digest, size, &what)?;
        let content_range = resp
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok());
        let answer = RangeAnswer::of(resp.status(), content_range, offset, &what)?;
        let spool_dir = self.opts.spool_dir.as_ref();
        match (answer, spool_dir) {
            (RangeAnswer::Full { .. }, Some(dir)) => {
                let (counters, object) = (h.counters.clone(), digest.to_string());
                let served = Box::new(move |n| counters.served(&object, n));
                let transfer = h.registry.transfer();
                let spool = Spool::start(resp, dir, digest, size, transfer, served)?;
                h.counters.whole.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    "{} sends blob {digest} whole for a ranged read: streaming it once",
                    h.registry.host()
                );
                state.send_replace(Ranges::Whole(spool.clone()));
                spool.stream(offset, len, size, sink).await
            }
            _ => {
                state.send_replace(Ranges::Ranged);
                let mut counted = |p: Bytes| {
                    h.counters.served(digest, p.len() as u64);
                    sink(p)
                };
                let transfer = h.registry.transfer();
                Ok(ranged_body(resp, offset, len, &what, transfer, &mut counted).await?)
            }
        }
    }
}

/// Puts a probe's state back to unknown if the probe ended without deciding (it failed, or
/// its reader went away), so that the next read probes again instead of waiting forever.
struct ProbeGuard<'a>(&'a watch::Sender<Ranges>);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.send_if_modified(|s| match s {
            Ranges::Probing => {
                *s = Ranges::Unknown;
                true
            }
            _ => false,
        });
    }
}

/// Checks what a blob answer says of the blob against what its descriptor says: the digest
/// it names (`Docker-Content-Digest`), and its size (a 200's length, a 206's total).
fn check_answer(resp: &reqwest::Response, digest: &str, size: u64, what: &str) -> Result<()> {
    let h = resp.headers();
    let get = |n: header::HeaderName| h.get(n).and_then(|v| v.to_str().ok());
    if let Some(sent) = h.get("docker-content-digest").and_then(|v| v.to_str().ok())
        && sent != digest
    {
        return Err(Error::Digest {
            what: what.to_string(),
            expected: digest.into(),
            actual: sent.into(),
        });
    }
    let total = match resp.status() {
        reqwest::StatusCode::PARTIAL_CONTENT => get(header::CONTENT_RANGE)
            .and_then(|cr| cr.rsplit_once('/'))
            .and_then(|(_, t)| t.parse::<u64>().ok()),
        _ => get(header::CONTENT_LENGTH).and_then(|l| l.parse::<u64>().ok()),
    };
    match total {
        Some(t) if t != size => Err(Error::format(
            what,
            format!("the host says the blob has {t} bytes; its descriptor says {size}"),
        )),
        _ => Ok(()),
    }
}

//! Reading a blob from one host: the first ranged read of it there is a probe, and its
//! answer decides whether the blob is read by ranges or from one whole stream (see
//! `whole.rs`). A pull-through cache answers a blob it has not stored with the whole blob,
//! fetched from its origin for that answer, while it downloads the blob once more to store it
//! (distribution 2.8's `ServeBlob`; a hang-up does not stop the store): the probe hangs up
//! and asks again until the cache answers by range, so N nodes cost the origin one download
//! of the blob, not N + 1. At a mirror, the other reads of the blob wait for the probe's
//! answer (each request would start one more download). At the image's own registry they go
//! out beside it, a round trip sooner, until the registry answers a range whole (a cache
//! named as the registry: those answers are hung up on, and its reads wait from then on).

use super::super::range::{RangeAnswer, ranged_body};
use super::super::whole::Spool;
use super::{Filling, Repo};
use crate::error::{Error, Result};
use bytes::Bytes;
use reqwest::header;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Largest blob whose whole answer a read of all of it takes without waiting for a cache to
/// store the blob.
const TAKE_WHOLE_MAX: u64 = 1 << 20;

/// Whether a read of `[offset, offset+len)` of a blob of `size` bytes takes a whole answer
/// as it is: it wants the whole blob, a small one.
fn takes_whole(offset: u64, len: u64, size: u64) -> bool {
    offset == 0 && len == size && size <= TAKE_WHOLE_MAX
}

/// How a blob is read from one host.
#[derive(Clone)]
pub(super) enum Ranges {
    /// Not asked yet: the next read is the probe.
    Unknown,
    /// A probe is under way; other reads wait for its answer (at the image's own registry,
    /// they go out beside it: see [`Repo::beside_probe`]).
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
                    let t0 = std::time::Instant::now();
                    let r = h
                        .registry
                        .stream_blob(&h.repo, digest, offset, len, &mut counted)
                        .await;
                    tracing::trace!("GET {digest} {offset}+{len}: {:?}", t0.elapsed());
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
                Ranges::Probing if self.beside_probe(i) => {
                    let t0 = std::time::Instant::now();
                    if let Some(r) = self
                        .ranged_beside_probe(i, digest, size, offset, len, sink)
                        .await
                    {
                        tracing::trace!("GET {digest} {offset}+{len}: {:?}", t0.elapsed());
                        return self.settle(i, digest, r);
                    }
                    // Answered whole: the probe decides how the blob is read after all.
                }
                Ranges::Probing => {
                    let mut rx = state.subscribe();
                    // Decided (by range or whole): read that way, whatever befell the host
                    // meanwhile. Back to unknown: the probe failed, and it noted why.
                    let decided = rx
                        .wait_for(|s| !matches!(s, Ranges::Probing))
                        .await
                        .is_ok_and(|s| !matches!(*s, Ranges::Unknown));
                    if !decided && (self.passed_over(i, digest) || self.down(i)) {
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
                        let t0 = std::time::Instant::now();
                        let r = self.probe(i, &state, digest, size, offset, len, sink).await;
                        tracing::trace!("probe {digest} {offset}+{len}: {:?}", t0.elapsed());
                        return self.settle(i, digest, r);
                    }
                }
            }
        }
    }

    /// Whether a read of a blob at host `i` that another read is probing goes out at once
    /// instead of waiting for the probe's answer (a round trip, which a mount's first reads
    /// of each layer, its tail ranges, would each wait): at the image's own registry, until
    /// it answers a range with a whole blob. A mirror may be a pull-through cache, where
    /// every request of a blob it has not stored starts one more download from its origin,
    /// so there the probe goes alone (see the module doc).
    pub(super) fn beside_probe(&self, i: usize) -> bool {
        let h = &self.hosts[i];
        !h.mirror && !h.answered_whole.load(Ordering::Relaxed)
    }

    /// Whether reads of a blob go out beside its probe at every host of this repository
    /// (no mirrors, and the registry has not answered a range whole).
    pub fn reads_beside_probe(&self) -> bool {
        (0..self.hosts.len()).all(|i| self.beside_probe(i))
    }

    /// A read beside the probe (see [`Repo::beside_probe`]): `None` when the host answered
    /// it with the whole blob, hung up on (the host is then marked, and the read waits for
    /// the probe like the next ones), unless the read takes a whole answer (`takes_whole`).
    /// Like the probe's, its answer is read in one try: a failure goes back to the reader,
    /// whose cache asks again.
    async fn ranged_beside_probe(
        &self,
        i: usize,
        digest: &str,
        size: u64,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Option<Result<()>> {
        let (resp, answer) = match self.ask(i, digest, size, offset, len).await {
            Ok(a) => a,
            Err(e) => return Some(Err(e)),
        };
        if answer != RangeAnswer::Partial && !takes_whole(offset, len, size) {
            tracing::debug!(
                "{} answered a range of blob {digest} whole: its reads wait for probes now",
                self.hosts[i].registry.host()
            );
            return None;
        }
        Some(self.body(i, resp, digest, offset, len, sink).await)
    }

    /// Asks host `i` for `[offset, offset+len)` of blob `digest` (`size` bytes), counting the
    /// request: the answer, checked against the blob, and how it answers the range. A whole
    /// answer the read does not take (see `takes_whole`) marks the host
    /// (`answered_whole`): its reads wait for probes from then on.
    async fn ask(
        &self,
        i: usize,
        digest: &str,
        size: u64,
        offset: u64,
        len: u64,
    ) -> Result<(reqwest::Response, RangeAnswer)> {
        let h = &self.hosts[i];
        let what = format!("blob {digest} from {}", h.registry.host());
        h.counters.requests.fetch_add(1, Ordering::Relaxed);
        let resp = h.registry.open_blob(&h.repo, digest, offset, len).await?;
        check_answer(&resp, digest, size, &what)?;
        let content_range = resp
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok());
        let answer = RangeAnswer::of(resp.status(), content_range, offset, &what)?;
        if answer != RangeAnswer::Partial && !takes_whole(offset, len, size) {
            h.answered_whole.store(true, Ordering::Relaxed);
        }
        Ok((resp, answer))
    }

    /// `r`, a read of `digest` from host `i`, noting its failure.
    fn settle(&self, i: usize, digest: &str, r: Result<()>) -> Result<bool> {
        if let Err(e) = &r {
            self.failed(i, digest, e);
        }
        r.map(|()| true)
    }

    /// The first ranged read of a blob at host `i`: its answer decides how the blob is read
    /// there from now on. A 200 that names the blob (a pull-through cache that has just
    /// started storing it) is hung up on, and the range asked again as [`FillWait`] says
    /// until the host answers 206 or the wait runs out; then the blob is streamed whole.
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
        let mut wait = FillWait::new(Duration::ZERO, size);
        loop {
            let (resp, answer) = self.ask(i, digest, size, offset, len).await?;
            // A small blob read whole (a config, a tiny layer) takes a whole answer as it is:
            // the cache's extra download of it costs less than a pause.
            let whole_read = takes_whole(offset, len, size);
            // How long to wait is decided at the first whole answer: a wait for another
            // blob that runs out meanwhile does not cut this one short.
            if wait.tries == 0 {
                wait.limit = self.fill_wait(i);
            }
            let names_blob = resp.headers().contains_key("docker-content-digest");
            match (answer, self.opts.spool_dir.as_ref()) {
                // The answer is what we want, whatever its status; the next read decides
                // how the host serves ranges.
                (RangeAnswer::Full { .. }, _) if whole_read => {
                    return self.body(i, resp, digest, offset, len, sink).await;
                }
                (RangeAnswer::Full { .. }, _) if names_blob && wait.more() => {
                    drop(resp);
                    let pause = wait.next();
                    if wait.tries == 1 {
                        tracing::info!(
                            "{} has not stored blob {digest} yet (it answers ranges with the \
                             whole blob): waiting up to {:?} for it to",
                            h.registry.host(),
                            wait.limit
                        );
                    }
                    tokio::time::sleep(pause).await;
                }
                (RangeAnswer::Full { .. }, Some(dir)) => {
                    if wait.tries > 0 {
                        self.gave_up_waiting(i, digest, &wait);
                    }
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
                    return spool.stream(offset, len, size, sink).await;
                }
                (answer, _) => {
                    if answer == RangeAnswer::Partial {
                        self.answers_ranges(i, digest, &wait);
                    }
                    state.send_replace(Ranges::Ranged);
                    return self.body(i, resp, digest, offset, len, sink).await;
                }
            }
        }
    }

    /// Reads the body of `resp`, an answer of host `i` to a read of `[offset, offset+len)`
    /// of blob `digest`, counting what it served.
    async fn body(
        &self,
        i: usize,
        resp: reqwest::Response,
        digest: &str,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        let h = &self.hosts[i];
        let what = format!("blob {digest} from {}", h.registry.host());
        let mut counted = |p: Bytes| {
            h.counters.served(digest, p.len() as u64);
            sink(p)
        };
        let transfer = h.registry.transfer();
        Ok(ranged_body(resp, offset, len, &what, transfer, &mut counted).await?)
    }

    /// How long to wait for host `i` to store a blob it answered whole: not at all once it
    /// let a wait run out without ever storing one. Not scaled down by the blob's size at a
    /// host not yet known to store blobs: N nodes asking one cache at once make its stores
    /// slower than one node would see them, and a wait that runs out marks the host (tried:
    /// with a limit of the blob's time at 10 MiB/s, at least 2 s, every node of 8 and 16
    /// gave up and streamed whole, 8.9-15.9x the origin bytes of one node).
    fn fill_wait(&self, i: usize) -> Duration {
        match *self.hosts[i].filling.lock().unwrap() {
            Filling::Never => Duration::ZERO,
            Filling::Unknown | Filling::Fills => self.opts.fill_wait,
        }
    }

    /// Notes that host `i` answered a range of blob `digest` with that range: it is worth
    /// waiting for when it answers another blob whole (it has not stored that one yet),
    /// even if a wait ran out before. Counted as a store when we waited for it.
    fn answers_ranges(&self, i: usize, digest: &str, wait: &FillWait) {
        let h = &self.hosts[i];
        *h.filling.lock().unwrap() = Filling::Fills;
        if wait.tries == 0 {
            return;
        }
        h.counters.stored.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            "{} has stored blob {digest}: reading it by range (waited {:?}, {} tries)",
            h.registry.host(),
            wait.started.elapsed(),
            wait.tries
        );
    }

    /// Notes that host `i` still answered blob `digest` whole when the wait ran out.
    fn gave_up_waiting(&self, i: usize, digest: &str, wait: &FillWait) {
        let h = &self.hosts[i];
        let mut filling = h.filling.lock().unwrap();
        if *filling == Filling::Unknown {
            *filling = Filling::Never;
        }
        tracing::warn!(
            "{} did not store blob {digest} within {:?} ({} tries){}",
            h.registry.host(),
            wait.limit,
            wait.tries,
            if *filling == Filling::Never {
                "; not waiting for it again"
            } else {
                ""
            }
        );
    }
}

/// When to ask a host again for a blob it answered whole: soon at first (a small blob is
/// stored in a moment; a large one not before its bytes can have crossed the cache's link,
/// see [`FillWait::STORE_RATE`]), then less and less often, each ask costing the host's
/// origin the first flights of one more download, until `limit` has passed. Measured in the
/// fleet benchmark (docs/BENCHMARKS.md): these asks cost the origin 1-2 MB per blob in all.
struct FillWait {
    limit: Duration,
    started: Instant,
    /// Answers hung up on so far.
    tries: u32,
    pause: Duration,
}

impl FillWait {
    /// The first pause, how it grows, and the longest.
    const FIRST: Duration = Duration::from_millis(250);
    const GROWTH: f64 = 1.5;
    const LONGEST: Duration = Duration::from_secs(2);
    /// Bytes per second faster than which no cache is taken to store a blob (800 Mbit/s, a
    /// fast link to its origin): the first pause lasts at least the blob's size at this
    /// rate (62 MB: 0.6 s), for an ask before then only costs the origin the first flights
    /// of one more download.
    const STORE_RATE: f64 = 100e6;

    /// A wait for a blob of `size` bytes, lasting `limit`.
    fn new(limit: Duration, size: u64) -> FillWait {
        let storing = Duration::from_secs_f64(size as f64 / FillWait::STORE_RATE);
        FillWait {
            limit,
            started: Instant::now(),
            tries: 0,
            pause: storing.clamp(FillWait::FIRST, FillWait::LONGEST),
        }
    }

    /// Whether there is time left to wait.
    fn more(&self) -> bool {
        self.started.elapsed() < self.limit
    }

    /// The pause before the next ask (never past the limit), counting this try. Each pause
    /// is jittered by up to a quarter either way, so that nodes which started together do
    /// not ask together: distribution 2.8 in front of an origin that asks for no
    /// credentials pings it before each request of a blob it has not stored, one at a time,
    /// and a request that arrives as the store commits starts a second store.
    fn next(&mut self) -> Duration {
        self.tries += 1;
        let quarter = (self.pause / 4).as_micros() as u64;
        let jittered = self.pause - self.pause / 4
            + Duration::from_micros(rand::random_range(0..=2 * quarter));
        let pause = jittered.min(self.limit.saturating_sub(self.started.elapsed()));
        self.pause = self.pause.mul_f64(FillWait::GROWTH).min(FillWait::LONGEST);
        pause
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_blob_is_asked_for_again_once_it_can_have_been_stored() {
        let ms = Duration::from_millis;
        let pauses = |size| {
            let mut wait = FillWait::new(Duration::from_secs(60), size);
            (0..8).map(|_| wait.next()).collect::<Vec<_>>()
        };
        // Each pause is jittered by up to a quarter either way.
        let near = |p: Duration, d: Duration| p >= d - d / 4 && p <= d + d / 4;
        let small = pauses(1 << 20);
        assert!(near(small[0], ms(250)), "{small:?}");
        assert!(near(small[1], ms(375)), "{small:?}");
        let large = pauses(62_000_000);
        assert!(near(large[0], ms(620)), "{large:?}");
        assert!(near(large[1], ms(930)), "{large:?}");
        let huge = pauses(10 << 30);
        assert!(near(huge[0], ms(2000)), "{huge:?}");
        // Never longer than the longest, and never past the limit.
        assert!(large.iter().chain(&huge).all(|&p| p <= ms(2500)));
        let mut short = FillWait::new(ms(300), 62_000_000);
        assert!(short.next() <= ms(300));
    }
}

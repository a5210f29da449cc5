//! Reading through a checkpoint index: [`CheckpointBlob`] serves a layer's uncompressed tar
//! by decoding only the spans, span fronts or mark-to-mark stretches a read needs, each
//! checked against the index's digests before its bytes are served.

use super::{CheckpointIndex, Codec, gzip, windows, zstd};
use crate::blob::{Blob, BlobSource, BytesLru, Flights, ReadHints, clamp, healing};
use crate::error::{Error, Result};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Decoded output kept per layer (whole spans are 4 MiB by default).
const KEPT: u64 = 32 << 20;
/// Least compressed front a read skips by fetching a mark's window (a request of its own,
/// sent beside the one for the compressed bytes, ~14 KB) instead of the front: about two
/// mark stretches. On the realistic start 0, 64, 128 and 256 KiB measured the same, and
/// 4% faster than 512 KiB (the front a first read waited for shared the link).
pub(super) const SKIP_MIN: u64 = 256 << 10;
/// Mark window entries kept per layer (each a few KB compressed).
const ENTRIES_KEPT: u64 = 4 << 20;

/// Decodes span `k` of `index` from its compressed bytes, after checking their digest.
pub fn read_span(index: &CheckpointIndex, k: usize, compressed: &[u8]) -> Result<Vec<u8>> {
    let what = || format!("span {k} of layer {}", index.digest);
    let (start, end) = index.span_extent(k);
    if compressed.len() as u64 != end - start {
        return Err(Error::format(
            what(),
            "compressed extent has the wrong length",
        ));
    }
    let expected = index
        .span_digests
        .get(k)
        .ok_or_else(|| Error::format(what(), "no digest"))?;
    check_digest(&what, compressed, expected)?;
    let (o0, o1) = index.span_output(k);
    decode(index, k, compressed, (o1 - o0) as usize, &what)
}

/// Decodes the start of span `k` up to its mark `j` from the compressed bytes up to that
/// mark, after checking the digest of every piece between marks: at least the mark's output.
pub fn read_prefix(
    index: &CheckpointIndex,
    k: usize,
    j: usize,
    compressed: &[u8],
) -> Result<Vec<u8>> {
    let what = || format!("span {k} of layer {} up to mark {j}", index.digest);
    let (start, _) = index.span_extent(k);
    let marks = index.marks_of(k);
    let mark = marks
        .get(j)
        .ok_or_else(|| Error::format(what(), "no such mark"))?;
    if compressed.len() as u64 != mark.inp - start {
        return Err(Error::format(
            what(),
            "compressed prefix has the wrong length",
        ));
    }
    let mut from = start;
    for m in &marks[..=j] {
        let piece = &compressed[(from - start) as usize..(m.inp - start) as usize];
        check_digest(&what, piece, &m.digest)?;
        from = m.inp;
    }
    let (o0, _) = index.span_output(k);
    decode(index, k, compressed, (mark.out - o0) as usize, &what)
}

fn check_digest(what: &dyn Fn() -> String, bytes: &[u8], expected: &[u8; 32]) -> Result<()> {
    let actual: [u8; 32] = Sha256::digest(bytes).into();
    if &actual != expected {
        return Err(Error::Digest {
            what: what(),
            expected: hex::encode(expected),
            actual: hex::encode(actual),
        });
    }
    Ok(())
}

/// Decodes `want` bytes of span `k` from (verified) compressed bytes starting at the span.
fn decode(
    index: &CheckpointIndex,
    k: usize,
    compressed: &[u8],
    want: usize,
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>> {
    let out = match index.codec {
        Codec::Gzip => gzip::inflate_span(&index.checkpoints[k], compressed, want),
        Codec::Zstd => zstd::decode_span(compressed, want),
    }
    .map_err(|e| match e {
        Error::Format { reason, .. } => Error::format(what(), reason),
        e => e,
    })?;
    if out.len() != want {
        return Err(Error::format(
            what(),
            format!("decoded {} of {want} bytes", out.len()),
        ));
    }
    Ok(out)
}

/// The uncompressed tar of a layer, served lazily through its checkpoint index.
pub struct CheckpointBlob {
    id: String,
    index: Arc<CheckpointIndex>,
    compressed: Blob,
    /// The marks' windows blob and where each mark's entry starts in it, when reads may
    /// resume at marks (see [`windows`]).
    windows: Option<(Blob, Vec<Vec<u64>>)>,
    /// Window entries fetched so far, by (span, mark): each is fetched exactly (a few KB), not
    /// in cache blocks that would bring its neighbours over the link too.
    entries: Mutex<BytesLru<(usize, usize)>>,
    /// Set when a resume at a mark failed: later reads decode from span starts only.
    windows_failed: AtomicBool,
    /// Decoded output by (span, where it starts: the span's start or a mark's output).
    pieces: Mutex<BytesLru<(usize, u64)>>,
    /// Decodes under way, by (span, compressed range).
    decoding: Flights<(usize, (u64, u64))>,
    /// Window entries being fetched, by (span, mark).
    fetching: Flights<(usize, usize)>,
}

/// What [`CheckpointBlob::lookup`] found for a read.
enum Lookup {
    /// Kept decoded output covering the read, and where it starts.
    Kept(u64, Bytes),
    /// What to decode.
    Decode(Plan),
}

/// Which stretch of a span a read decodes.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// The whole span, from its checkpoint.
    Span,
    /// The span's front up to its mark `j`.
    Prefix(usize),
    /// From mark `j` to mark `stop` (or the span's end), with the mark's window.
    FromMark(usize, Option<usize>),
}

impl CheckpointBlob {
    /// Serves `index` from `compressed` (normally the block-cached layer blob).
    pub fn new(index: Arc<CheckpointIndex>, compressed: Blob) -> CheckpointBlob {
        CheckpointBlob {
            id: format!("{}/checkpoint", index.digest),
            index,
            compressed,
            windows: None,
            entries: Mutex::new(BytesLru::new(ENTRIES_KEPT)),
            windows_failed: AtomicBool::new(false),
            pieces: Mutex::new(BytesLru::new(KEPT)),
            decoding: Flights::default(),
            fetching: Flights::default(),
        }
    }

    /// Lets reads resume at marks, with their windows from `blob` (read by exact ranges),
    /// if the index's marks have windows and `blob` is the size the index says.
    pub fn with_windows(mut self, blob: Blob) -> CheckpointBlob {
        let offsets = windows::offsets(&self.index);
        self.windows = offsets
            .filter(|_| self.index.windows.as_ref().map(|w| w.size) == Some(blob.size()))
            .map(|o| (blob, o));
        self
    }

    /// Decoded output of span `k` covering `[s, e)` (absolute offsets), and where it starts.
    /// Read-ahead of the compressed blob stays before `until`.
    async fn piece(&self, k: usize, s: u64, e: u64, until: u64) -> Result<(u64, Bytes)> {
        let plan = match self.lookup(k, s, e) {
            Lookup::Kept(from, data) => return Ok((from, data)),
            Lookup::Decode(plan) => plan,
        };
        // The kernel asks for several pages at once: reads that need the same stretch wait for
        // the first to decode it (one window request, one inflate) and then find it kept.
        let _pass = self
            .decoding
            .enter((k, self.compressed_range(k, plan)))
            .await;
        let plan = match self.lookup(k, s, e) {
            Lookup::Kept(from, data) => return Ok((from, data)),
            Lookup::Decode(plan) => plan,
        };
        let marks = self.index.marks_of(k);
        let (o0, _) = self.index.span_output(k);
        tracing::trace!(
            "{}: span {k}, read {s}..{e}: {plan:?}, compressed {:?}",
            self.index.digest,
            self.compressed_range(k, plan)
        );
        let (from, data) = match plan {
            Plan::FromMark(j, stop) => match self.decode_from_mark(k, j, stop, until).await {
                Ok(data) => (marks[j].out, data),
                Err(e) => {
                    // A bad window or digest will not mend: stop using windows. A failed
                    // request may: only this read goes without.
                    let lasting = e.is_check();
                    tracing::warn!(
                        "{}: resuming at a mark failed ({e}); decoding from the span's start{}",
                        self.index.digest,
                        if lasting { " from now on" } else { "" }
                    );
                    if lasting {
                        self.windows_failed.store(true, Ordering::Relaxed);
                    }
                    let plan = stop.map_or(Plan::Span, Plan::Prefix);
                    (o0, self.decode_front(k, plan, until).await?)
                }
            },
            plan => (o0, self.decode_front(k, plan, until).await?),
        };
        let mut pieces = self.pieces.lock().unwrap();
        if pieces.get(&(k, from)).is_none_or(|b| b.len() < data.len()) {
            pieces.put((k, from), data.clone());
        }
        Ok((from, data))
    }

    /// Decoded output of span `k` already kept that covers `[s, e)`, or the stretch to decode.
    fn lookup(&self, k: usize, s: u64, e: u64) -> Lookup {
        let (o0, _) = self.index.span_output(k);
        let marks = self.index.marks_of(k);
        let before = marks.partition_point(|m| m.out <= s);
        let mut continuing = None;
        let mut front_seen = false;
        {
            let mut pieces = self.pieces.lock().unwrap();
            let starts = std::iter::once(o0).chain(marks[..before].iter().map(|m| m.out));
            for from in starts {
                let Some(b) = pieces.get(&(k, from)) else {
                    continue;
                };
                let end = from + b.len() as u64;
                if end >= e {
                    return Lookup::Kept(from, b);
                }
                front_seen |= from == o0;
                if end >= s && continuing.is_none() {
                    continuing = Some(from);
                }
            }
        }
        let mark_at = |from: u64| marks.iter().position(|m| m.out == from);
        let stop = marks.iter().position(|m| m.out >= e);
        let resumable = self.windows.is_some() && !self.windows_failed.load(Ordering::Relaxed);
        // A reader coming back for more is usually moving through the span: decoding the
        // rest of it now inflates and hashes it about once, where growing piece after piece
        // would redo the front each time. A new reader decodes only its stretch: from the
        // latest point already at hand, else from the mark before it when windows exist and
        // that skips a long front, else from the span's start (the whole span once its front
        // has been read).
        Lookup::Decode(match continuing {
            Some(from) => match mark_at(from) {
                Some(j) if from > o0 => Plan::FromMark(j, None),
                _ => Plan::Span,
            },
            None if resumable && before > 0 => match self.local_start(k, before - 1) {
                Some(Some(t)) => Plan::FromMark(t, stop),
                Some(None) => stop.map_or(Plan::Span, Plan::Prefix),
                // A window is a request of its own: worth it only to skip a long front.
                None if marks[before - 1].inp - self.index.span_extent(k).0 >= SKIP_MIN => {
                    Plan::FromMark(before - 1, stop)
                }
                None => stop.map_or(Plan::Span, Plan::Prefix),
            },
            None if front_seen => Plan::Span,
            None => stop.map_or(Plan::Span, Plan::Prefix),
        })
    }

    /// The compressed bytes `plan` decodes in span `k`.
    fn compressed_range(&self, k: usize, plan: Plan) -> (u64, u64) {
        let marks = self.index.marks_of(k);
        let (start, end) = self.index.span_extent(k);
        match plan {
            Plan::Span => (start, end),
            Plan::Prefix(j) => (start, marks[j].inp),
            Plan::FromMark(j, stop) => (marks[j].inp, stop.map_or(end, |t| marks[t].inp)),
        }
    }

    /// The latest point of span `k` from which decoding up to its mark `j` needs no request:
    /// a mark whose window entry and compressed bytes up to mark `j` are cached or coming
    /// (`Some(Some(mark))`), or the span's start when its front is (`Some(None)`: a planned
    /// prefetch, an earlier read's run, a verified layer). Decoding a little more here is
    /// cheaper than a round trip for a window.
    fn local_start(&self, k: usize, j: usize) -> Option<Option<usize>> {
        self.windows.as_ref()?;
        let marks = self.index.marks_of(k);
        let upto = marks[j].inp;
        let local = |from: u64| self.compressed.at_hand(from, upto - from);
        // The windows blob is read uncached: an entry is at hand once this layer fetched it.
        let window_local = |t: usize| self.entries.lock().unwrap().contains(&(k, t));
        if let Some(t) = (0..=j)
            .rev()
            .find(|&t| window_local(t) && local(marks[t].inp - 1))
        {
            return Some(Some(t));
        }
        local(self.index.span_extent(k).0).then_some(None)
    }

    /// Decodes span `k` (whole, or its front up to a mark) from its checkpoint; compressed
    /// bytes that fail their digests are dropped from the cache and fetched once more.
    async fn decode_front(&self, k: usize, plan: Plan, until: u64) -> Result<Bytes> {
        let (start, end) = self.index.span_extent(k);
        let marks = self.index.marks_of(k);
        let mark = match plan {
            Plan::Prefix(j) => Some(j),
            _ => None,
        };
        let upto = mark.map_or(end, |j| marks[j].inp);
        let what = format!("span {k} of layer {}", self.index.digest);
        healing(&self.compressed, (start, upto - start), &what, || {
            self.decode_front_once(k, mark, (start, upto), until)
        })
        .await
    }

    /// One try of [`CheckpointBlob::decode_front`]: `[start, upto)` fetched and decoded
    /// (up to mark `mark`, or the whole span).
    async fn decode_front_once(
        &self,
        k: usize,
        mark: Option<usize>,
        (start, upto): (u64, u64),
        until: u64,
    ) -> Result<Bytes> {
        let compressed = self
            .compressed
            .read_within(start, upto - start, until)
            .await?;
        let index = self.index.clone();
        let data = tokio::task::spawn_blocking(move || match mark {
            Some(j) => read_prefix(&index, k, j, &compressed),
            None => read_span(&index, k, &compressed),
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        Ok(Bytes::from(data))
    }

    /// Decodes span `k` from its mark `j` to mark `stop` (or the span's end): the mark's
    /// window and the compressed bytes are fetched together. Output that fails its digests
    /// drops both (window entry and compressed bytes) and is decoded once more from fresh
    /// ones.
    async fn decode_from_mark(
        &self,
        k: usize,
        j: usize,
        stop: Option<usize>,
        until: u64,
    ) -> Result<Bytes> {
        let marks = self.index.marks_of(k);
        let from = marks[j].inp - 1;
        let upto = stop.map_or(self.index.span_extent(k).1, |t| marks[t].inp);
        let what = format!("span {k} of layer {} from mark {j}", self.index.digest);
        let mut first = true;
        healing(&self.compressed, (from, upto - from), &what, || {
            if !std::mem::take(&mut first) {
                self.entries.lock().unwrap().retain(|e| *e != (k, j));
                if let Some((blob, offsets)) = &self.windows {
                    let len = marks[j].resume.as_ref().map_or(0, |r| u64::from(r.len));
                    blob.discard(offsets[k][j], len);
                }
            }
            self.decode_from_mark_once(k, j, stop, until)
        })
        .await
    }

    /// One try of [`CheckpointBlob::decode_from_mark`].
    async fn decode_from_mark_once(
        &self,
        k: usize,
        j: usize,
        stop: Option<usize>,
        until: u64,
    ) -> Result<Bytes> {
        let Some((blob, offsets)) = &self.windows else {
            return Err(Error::format("gzip marks", "no windows"));
        };
        let marks = self.index.marks_of(k);
        let mark = &marks[j];
        let len = mark.resume.as_ref().map_or(0, |r| u64::from(r.len));
        let from = mark.inp - 1;
        let upto = stop.map_or(self.index.span_extent(k).1, |t| marks[t].inp);
        let entry = async {
            let kept = || self.entries.lock().unwrap().get(&(k, j));
            if let Some(entry) = kept() {
                return Ok::<Bytes, Error>(entry);
            }
            // Reads of other stretches from this mark fetch its entry once.
            let _pass = self.fetching.enter((k, j)).await;
            if let Some(entry) = kept() {
                return Ok(entry);
            }
            let entry = blob.read_at(offsets[k][j], len).await?;
            self.entries.lock().unwrap().put((k, j), entry.clone());
            Ok(entry)
        };
        let (entry, compressed) =
            tokio::join!(entry, self.compressed.read_within(from, upto - from, until));
        let (entry, compressed) = (entry?, compressed?);
        let index = self.index.clone();
        let data = tokio::task::spawn_blocking(move || {
            windows::read_from_mark(&index, k, j, stop, &entry, &compressed)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        Ok(Bytes::from(data))
    }
}

#[async_trait]
impl BlobSource for CheckpointBlob {
    fn id(&self) -> &str {
        &self.id
    }
    fn size(&self) -> u64 {
        self.index.uncomp_size
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.read_within(offset, len, self.size()).await
    }
}

#[async_trait]
impl ReadHints for CheckpointBlob {
    fn release_memory(&self) {
        self.pieces.lock().unwrap().retain(|_| false);
        self.entries.lock().unwrap().retain(|_| false);
        self.compressed.release_memory();
        if let Some((blob, _)) = &self.windows {
            blob.release_memory();
        }
    }
    /// A small read whose answer decides what to fetch next (a program's dynamic section):
    /// what follows it is a guess like any other, not the rest of a file being read. (The
    /// default, `read_at`, counted the whole layer as the file being read, so each such read
    /// fetched a full run past it that nothing limited.)
    async fn read_now(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.read_within(offset, len, offset.saturating_add(len))
            .await
    }
    /// Decodes the range, so that a later read finds it decoded or its compressed bytes
    /// cached. The range is what is wanted (a whole file, a directory's files), not the start
    /// of a stream: what a miss fetches past the mark after it is a guess, limited like any
    /// other (see [`crate::blob::cache`]); `read_at` would count the rest of the blob as the
    /// file and fetch a full run after it.
    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        let until = offset.saturating_add(len);
        self.read_within(offset, len, until).await.map(drop)
    }
    /// Drops the decoded output kept for `[offset, offset+len)` and the compressed bytes
    /// it came from.
    fn discard(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len.max(1)).min(self.size());
        if offset >= end {
            return;
        }
        let (a, b) = self.index.compressed_extent(offset, end);
        let cps = &self.index.checkpoints;
        let span_of = |at: u64| cps.partition_point(|c| c.out <= at).saturating_sub(1);
        let (first, last) = (span_of(offset), span_of(end - 1));
        self.pieces
            .lock()
            .unwrap()
            .retain(|(k, _)| !(first..=last).contains(k));
        self.compressed.discard(a, b - a);
    }
    fn source_range(&self, offset: u64, len: u64) -> Option<(Blob, u64, u64)> {
        let end = offset.saturating_add(len.max(1)).min(self.size());
        let (a, b) = self.index.compressed_extent(offset, end);
        Some((self.compressed.clone(), a, b))
    }
    async fn read_within(&self, offset: u64, len: u64, until: u64) -> Result<Bytes> {
        let len = clamp(&self.id, self.size(), offset, len)?;
        let end = offset + len;
        let cps = &self.index.checkpoints;
        // The compressed end of the file being read.
        let comp_until = self
            .index
            .compressed_extent(offset, until.max(offset + 1))
            .1;
        let mut k = cps.partition_point(|c| c.out <= offset).saturating_sub(1);
        let mut out = BytesMut::with_capacity(len as usize);
        while k < cps.len() && (out.len() as u64) < len {
            let (o0, o1) = self.index.span_output(k);
            let (s, e) = (offset.max(o0), end.min(o1));
            if s < e {
                let (from, data) = self.piece(k, s, e, comp_until).await?;
                out.extend_from_slice(&data[(s - from) as usize..(e - from) as usize]);
            }
            k += 1;
        }
        Ok(out.freeze())
    }
}

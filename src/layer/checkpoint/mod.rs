//! Checkpoint indexes: lazy reads from ordinary gzip layers and multi-frame zstd layers.
//!
//! Neither stream can be entered at an arbitrary offset, but both can be resumed at known
//! points: gzip at a deflate block boundary given the bit offset and the 32 KiB of output
//! before it (zlib's zran.c, in `gzip.rs`); zstd at the start of any frame (in `zstd.rs`). One
//! streaming pass over the blob records such a checkpoint every `span` bytes of output, the
//! sha256 of each span's compressed bytes, every tar entry's offset, and checks the whole
//! blob's digest. Afterwards a read fetches only the compressed span(s) covering it, checks
//! their digests, and resumes from the checkpoint: one round trip plus one span's decoding.
//!
//! Span `k` covers compressed bytes `[start(k), inp(k+1))` where `start` backs up one byte when
//! a gzip checkpoint begins mid-byte; adjacent spans may share that byte. A single-frame zstd
//! layer yields one span (the caller then prefers a local copy).
//!
//! Gzip spans also carry *marks* (index format 3): every ~128 KiB of compressed input, at a
//! deflate block boundary, the pass notes how much output the span's bytes up to there yield
//! and the sha256 of the compressed bytes since the previous mark. A read near a span's start
//! then fetches, verifies and inflates only the prefix up to the first mark past it, instead
//! of the whole span (~1.5 MB for 4 MiB of output): on a slow link a cold read waits for a
//! fraction of a span, while windows (32 KiB each) stay one per span and the index small.

pub mod file;
mod gzip;
mod inflate;
pub mod share;
pub mod soci;
mod zstd;

use super::Entry;
use crate::blob::{Blob, BlobSource, clamp};
use crate::digest::Hasher;
use crate::error::{Error, Result};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

/// Default uncompressed distance between checkpoints.
pub const DEFAULT_SPAN: u64 = 4 << 20;
/// Compressed bytes requested per ranged read while building.
const PIECE: u64 = 8 << 20;
/// Most compressed bytes between two marks (fewer for small spans: a sixteenth of the span).
const MARK_MAX: u64 = 128 << 10;

/// Compressed distance between marks for spans of `span` output bytes.
fn mark_every(span: u64) -> u64 {
    (span / 16).clamp(16 << 10, MARK_MAX)
}

/// Which compression a checkpoint index resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Gzip,
    Zstd,
}

/// A resume point in the compressed stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Uncompressed offset.
    pub out: u64,
    /// Compressed offset of the first byte not yet (fully) consumed.
    pub inp: u64,
    /// Bits (0-7) of the byte at `inp - 1` still to be consumed.
    pub bits: u8,
    /// Up to 32 KiB of output preceding `out`.
    pub window: Vec<u8>,
}

/// A verifiable prefix of a gzip span: decoding the span's compressed bytes up to `inp`
/// yields its output up to at least `out`; `digest` is the sha256 of the compressed bytes from
/// the previous mark (or the span's start) to `inp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub inp: u64,
    pub out: u64,
    pub digest: [u8; 32],
}

impl Checkpoint {
    /// Where this span's compressed bytes start.
    pub fn start(&self) -> u64 {
        self.inp - u64::from(self.bits > 0)
    }
}

/// Everything needed to serve a gzip layer lazily.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointIndex {
    /// The layer blob this index describes.
    pub digest: String,
    pub codec: Codec,
    pub span: u64,
    pub comp_size: u64,
    pub uncomp_size: u64,
    pub checkpoints: Vec<Checkpoint>,
    /// sha256 of each span's compressed bytes.
    pub span_digests: Vec<[u8; 32]>,
    /// The layer's tar entries (locators are uncompressed tar offsets).
    pub entries: Vec<Entry>,
    /// Per span, the marks strictly inside it, in order; empty when the index has none
    /// (zstd, SOCI zTOCs, format 2 files): then a read fetches and verifies whole spans.
    pub marks: Vec<Vec<Mark>>,
}

impl CheckpointIndex {
    /// Compressed extent of span `k` (the bytes its digest covers and a read fetches).
    pub fn span_extent(&self, k: usize) -> (u64, u64) {
        let start = self.checkpoints[k].start();
        let end = self
            .checkpoints
            .get(k + 1)
            .map_or(self.comp_size, |c| c.inp);
        (start, end)
    }

    /// The marks inside span `k` (none when the index has no marks).
    pub fn marks_of(&self, k: usize) -> &[Mark] {
        self.marks.get(k).map_or(&[], |m| &m[..])
    }

    /// The compressed bytes that decoding `[from, to)` of the output needs: from the start of
    /// the span holding `from` to the first mark past `to` in the span holding its last byte
    /// (or that span's end).
    pub fn compressed_extent(&self, from: u64, to: u64) -> (u64, u64) {
        let span_of = |at: u64| {
            self.checkpoints
                .partition_point(|c| c.out <= at)
                .saturating_sub(1)
        };
        let last = span_of(to.saturating_sub(1));
        let end = self
            .marks_of(last)
            .iter()
            .find(|m| m.out >= to)
            .map_or(self.span_extent(last).1, |m| m.inp);
        (self.span_extent(span_of(from)).0, end)
    }

    /// Uncompressed extent of span `k`.
    pub fn span_output(&self, k: usize) -> (u64, u64) {
        let out = self.checkpoints[k].out;
        (
            out,
            self.checkpoints
                .get(k + 1)
                .map_or(self.uncomp_size, |c| c.out),
        )
    }

    /// Checks what every reader relies on: a first checkpoint at the start of the output,
    /// checkpoints in order and inside the layer, one span digest each.
    pub fn check_shape(&self) -> std::result::Result<(), &'static str> {
        let cps = &self.checkpoints;
        let ordered = cps
            .windows(2)
            .all(|w| w[0].out < w[1].out && w[0].inp <= w[1].inp);
        if cps.is_empty() || !ordered || cps[0].out != 0 || cps[0].inp == 0 && cps[0].bits > 0 {
            return Err("checkpoints missing or out of order");
        }
        if cps.iter().any(|c| {
            c.bits > 7
                || c.window.len() > 32 * 1024
                || c.inp > self.comp_size
                || c.out > self.uncomp_size
        }) {
            return Err("checkpoint out of range");
        }
        if self.span_digests.len() != cps.len() {
            return Err("one span digest per checkpoint expected");
        }
        if !self.marks.is_empty() {
            if self.codec != Codec::Gzip {
                return Err("marks are for gzip spans only");
            }
            if self.marks.len() != cps.len() {
                return Err("one mark list per span expected");
            }
            for (k, marks) in self.marks.iter().enumerate() {
                let ((i0, i1), (o0, o1)) = (self.span_extent(k), self.span_output(k));
                let (mut inp, mut out) = (i0, o0);
                for m in marks {
                    if m.inp <= inp || m.inp >= i1 || m.out < out || m.out > o1 {
                        return Err("marks out of order or outside their span");
                    }
                    (inp, out) = (m.inp, m.out);
                }
            }
        }
        Ok(())
    }

    /// Builds the index of `blob` (a layer whose id is its digest) in one pass.
    /// `progress` gets (bytes done, total).
    pub async fn build(
        blob: Blob,
        codec: Codec,
        span: u64,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<CheckpointIndex> {
        let digest = blob.id().to_string();
        let size = blob.size();
        // The pass runs on a blocking thread; pieces reach it through a bounded channel that
        // the async side waits on without blocking a runtime thread.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(2);
        let builder = tokio::task::spawn_blocking(move || {
            let input = std::iter::from_fn(move || rx.blocking_recv());
            match codec {
                Codec::Gzip => gzip::pass(input, span),
                Codec::Zstd => zstd::pass(input, span),
            }
        });
        let mut hasher = Hasher::default();
        // Two pieces requested at a time, so the link does not idle for a round trip
        // between one piece's end and the next one's start.
        use futures::StreamExt;
        let mut pieces = futures::stream::iter((0..size).step_by(PIECE as usize))
            .map(|at| {
                let blob = blob.clone();
                async move { blob.read_at(at, PIECE.min(size - at)).await }
            })
            .buffered(2);
        let mut off = 0;
        while let Some(piece) = pieces.next().await {
            let piece = piece?;
            if piece.is_empty() {
                break;
            }
            hasher.update(&piece);
            off += piece.len() as u64;
            progress(off, size);
            if tx.send(piece).await.is_err() {
                break; // the builder failed; its error is reported below
            }
        }
        drop(tx);
        let built = builder
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        let (checkpoints, span_digests, uncomp_size, entries, marks) =
            built.map_err(|e| match e {
                Error::Format { reason, .. } => {
                    Error::format(format!("{codec:?} layer {digest}"), reason)
                }
                e => e,
            })?;
        let actual = hasher.finish();
        if actual != digest {
            return Err(Error::Digest {
                what: format!("layer blob {digest}"),
                expected: digest,
                actual,
            });
        }
        Ok(CheckpointIndex {
            digest,
            codec,
            span,
            comp_size: size,
            uncomp_size,
            checkpoints,
            span_digests,
            entries,
            marks,
        })
    }
}

type Built = (
    Vec<Checkpoint>,
    Vec<[u8; 32]>,
    u64,
    Vec<Entry>,
    Vec<Vec<Mark>>,
);

/// What both codecs' passes share: the tar parser fed with the output on its own thread, and
/// the bookkeeping of checkpoints and span digests.
struct Pass {
    tar_tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    tar: std::thread::JoinHandle<Result<Vec<Entry>>>,
    checkpoints: Vec<Checkpoint>,
    digests: Vec<[u8; 32]>,
    /// Compressed bytes from the current span's start onwards, and where that start is.
    pending: Vec<u8>,
    pending_start: u64,
    /// Marks of each span so far (gzip only).
    marks: Vec<Vec<Mark>>,
}

impl Pass {
    fn new() -> Pass {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let tar = std::thread::spawn(move || {
            let reader = crate::layer::streamed::ChannelReader::new(rx);
            super::tar::index_stream(reader, "compressed layer")
        });
        Pass {
            tar_tx: Some(tx),
            tar,
            checkpoints: Vec::new(),
            digests: Vec::new(),
            pending: Vec::new(),
            pending_start: 0,
            marks: Vec::new(),
        }
    }

    /// Compressed bytes as they arrive.
    fn input(&mut self, piece: &[u8]) {
        self.pending.extend_from_slice(piece);
    }

    /// Uncompressed bytes as they are produced (a dead tar parser reports at `finish`).
    fn output(&self, data: &[u8]) {
        if let Some(tx) = &self.tar_tx {
            let _ = tx.send(data.to_vec());
        }
    }

    /// Whether a resume point at uncompressed offset `out` is due.
    fn due(&self, out: u64, span: u64) -> bool {
        self.checkpoints.last().is_none_or(|c| out - c.out > span)
    }

    /// Records a checkpoint and closes the previous span's digest.
    fn checkpoint(&mut self, cp: Checkpoint) {
        if let Some(marks) = self.marks.last_mut() {
            // Marks lie strictly inside their span (a boundary can repeat a byte offset).
            marks.retain(|m| m.inp < cp.inp);
        }
        if !self.checkpoints.is_empty() {
            let upto = (cp.inp - self.pending_start) as usize;
            self.digests
                .push(Sha256::digest(&self.pending[..upto]).into());
        }
        let keep_from = (cp.start() - self.pending_start) as usize;
        self.pending.drain(..keep_from);
        self.pending_start = cp.start();
        self.checkpoints.push(cp);
        self.marks.push(Vec::new());
    }

    /// Whether a mark is due at compressed offset `inp` (`every` bytes since the last one).
    fn mark_due(&self, inp: u64, every: u64) -> bool {
        let since = self.marks.last().and_then(|m| m.last()).map(|m| m.inp);
        let since = since.unwrap_or(self.pending_start);
        !self.checkpoints.is_empty() && inp >= since + every
    }

    /// Records a mark in the current span: its prefix up to `inp` yields `out` bytes.
    fn mark(&mut self, inp: u64, out: u64) {
        let Some(marks) = self.marks.last_mut() else {
            return;
        };
        let from = marks.last().map_or(self.pending_start, |m| m.inp);
        let piece = &self.pending
            [(from - self.pending_start) as usize..(inp - self.pending_start) as usize];
        marks.push(Mark {
            inp,
            out,
            digest: Sha256::digest(piece).into(),
        });
    }

    fn finish(mut self, uncompressed: u64) -> Result<Built> {
        self.tar_tx = None;
        if self.checkpoints.is_empty() {
            return Err(Error::format("compressed stream", "no data"));
        }
        self.digests.push(Sha256::digest(&self.pending).into());
        let entries = self
            .tar
            .join()
            .map_err(|_| Error::format("layer", "tar parser panicked"))??;
        // Only gzip passes make marks; an index without any has none at all.
        let marks = if self.marks.iter().any(|m| !m.is_empty()) {
            self.marks
        } else {
            Vec::new()
        };
        Ok((self.checkpoints, self.digests, uncompressed, entries, marks))
    }
}

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
    /// Decoded spans, or their starts (up to a mark) when only those were needed.
    spans: Mutex<lru::LruCache<usize, Bytes>>,
}

impl CheckpointBlob {
    /// Serves `index` from `compressed` (normally the block-cached layer blob).
    pub fn new(index: Arc<CheckpointIndex>, compressed: Blob) -> CheckpointBlob {
        CheckpointBlob {
            id: format!("{}/checkpoint", index.digest),
            index,
            compressed,
            spans: Mutex::new(lru::LruCache::new(NonZeroUsize::new(8).unwrap())),
        }
    }

    /// At least the first `need` decoded bytes of span `k`: on its first read, its start up
    /// to the first mark that covers `need`; otherwise the whole span.
    /// Read-ahead of the compressed blob stays before `until`.
    async fn span(&self, k: usize, need: u64, until: u64) -> Result<Bytes> {
        let cached = self.spans.lock().unwrap().get(&k).cloned();
        if let Some(b) = &cached
            && b.len() as u64 >= need
        {
            return Ok(b.clone());
        }
        let (o0, _) = self.index.span_output(k);
        // Only a span's first read stops at a mark: a reader that comes back for more is
        // usually moving through the span, and decoding it whole now inflates and hashes it
        // about once, where growing prefix after prefix would redo the front each time.
        let marks = match cached {
            None => self.index.marks_of(k),
            Some(_) => &[][..],
        };
        let mark = marks.iter().position(|m| m.out - o0 >= need);
        let (start, end) = self.index.span_extent(k);
        let upto = mark.map_or(end, |j| marks[j].inp);
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
        let data = Bytes::from(data);
        let mut spans = self.spans.lock().unwrap();
        if spans.peek(&k).is_none_or(|b| b.len() < data.len()) {
            spans.put(k, data.clone());
        }
        Ok(data)
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
    fn release_memory(&self) {
        self.spans.lock().unwrap().clear();
        self.compressed.release_memory();
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.read_within(offset, len, self.size()).await
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
            let data = self.span(k, end.min(o1) - o0, comp_until).await?;
            let s = offset.max(o0) - o0;
            let e = end.min(o1) - o0;
            if s < e {
                out.extend_from_slice(&data[s as usize..e as usize]);
            }
            k += 1;
        }
        Ok(out.freeze())
    }
}

#[cfg(test)]
mod tests;

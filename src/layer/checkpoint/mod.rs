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

mod blob;
mod copy;
pub mod file;
mod gzip;
mod inflate;
pub mod soci;
mod windows;
mod zstd;

pub use blob::{CheckpointBlob, read_prefix, read_span};
pub use copy::CopyTo;
use copy::Copying;

use super::Entry;
use crate::blob::Blob;
use crate::digest::Hasher;
use crate::error::{Error, Result};
use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Default uncompressed distance between checkpoints.
pub const DEFAULT_SPAN: u64 = 4 << 20;
/// Compressed bytes handed to the pass at a time while building.
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
/// yields its output up to exactly `out` (a deflate block boundary); `digest` is the sha256 of
/// the compressed bytes from the previous mark (or the span's start) to `inp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub inp: u64,
    pub out: u64,
    pub digest: [u8; 32],
    /// How to resume decoding here without the span's front (format 4), if the index has it.
    pub resume: Option<Resume>,
}

/// A mark's resume state, kept outside the index (see the `windows` module): its entry in the
/// windows blob, and the sha256 of the output from the mark to the next one (or the span's
/// end), which vouches for whatever a resume there decodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Length of the mark's entry in the windows blob (entries follow each other in mark
    /// order, so their offsets are the running sum).
    pub len: u32,
    pub out_digest: [u8; 32],
}

/// The blob holding a gzip index's mark windows, named by digest: a file in the cache
/// directory when the index was built here, a blob of the index artifact when published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowsRef {
    pub digest: String,
    pub size: u64,
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
    /// Where the marks' windows are, when they have any (format 4).
    pub windows: Option<WindowsRef>,
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

    /// The output stretches from each mark with a resume state to the next mark (or its
    /// span's end), with the digest the index gives them: `(start, end, sha256)`, in order.
    pub fn mark_stretches(&self) -> Vec<(u64, u64, [u8; 32])> {
        let mut out = Vec::new();
        for (k, marks) in self.marks.iter().enumerate() {
            let span_end = self.span_output(k).1;
            for (t, m) in marks.iter().enumerate() {
                if let Some(r) = &m.resume {
                    let end = marks.get(t + 1).map_or(span_end, |n| n.out);
                    out.push((m.out, end, r.out_digest));
                }
            }
        }
        out
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
        if cps.is_empty() || !ordered || cps[0].out != 0 {
            return Err("checkpoints missing or out of order");
        }
        // Leftover bits belong to the byte before `inp`: there is none before the blob.
        if cps.iter().any(|c| c.inp == 0 && c.bits > 0) {
            return Err("checkpoint with leftover bits at compressed offset 0");
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

    /// Builds the index of `blob` (a layer whose id is its digest) in one pass, with its
    /// marks' windows blob (empty for zstd). `progress` gets (bytes done, total).
    ///
    /// A pass over bytes that do not inflate or do not hash to the blob's digest may have
    /// read bytes that arrived damaged (and were cached so): they are all dropped from the
    /// cache and the pass runs once more from fresh ones. Without per-piece digests the
    /// damaged piece cannot be told from the others, so the whole blob is fetched again; a
    /// second failure fails the layer.
    pub async fn build(
        blob: Blob,
        codec: Codec,
        span: u64,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(CheckpointIndex, Vec<u8>)> {
        let (index, windows, _) = Self::build_copying(blob, codec, span, progress, None).await?;
        Ok((index, windows))
    }

    /// [`CheckpointIndex::build`] that also writes the decoded tar into an unnamed file in
    /// `copy`'s directory, returned once the pass has checked the blob's digest (so it holds
    /// the layer's verified bytes); `None` when it outgrew `copy.limit` or could not be written.
    pub async fn build_copying(
        blob: Blob,
        codec: Codec,
        span: u64,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
        copy: Option<&CopyTo>,
    ) -> Result<(CheckpointIndex, Vec<u8>, Option<std::fs::File>)> {
        let what = format!("the index pass over layer {}", blob.id());
        crate::blob::healing(&blob, (0, blob.size()), &what, || {
            Self::build_once(blob.clone(), codec, span, progress, copy)
        })
        .await
    }

    /// One pass of [`CheckpointIndex::build_copying`].
    async fn build_once(
        blob: Blob,
        codec: Codec,
        span: u64,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
        copy: Option<&CopyTo>,
    ) -> Result<(CheckpointIndex, Vec<u8>, Option<std::fs::File>)> {
        let digest = blob.id().to_string();
        let size = blob.size();
        // The pass runs on a blocking thread; pieces reach it through a bounded channel that
        // the async side waits on without blocking a runtime thread.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(2);
        let copying = copy.and_then(|c| Copying::start(c, &digest));
        let builder = tokio::task::spawn_blocking(move || {
            let input = std::iter::from_fn(move || rx.blocking_recv());
            let pass = Pass::new(copying);
            match codec {
                Codec::Gzip => gzip::pass(pass, input, span),
                Codec::Zstd => zstd::pass(pass, input, span),
            }
        });
        let mut hasher = Hasher::default();
        use futures::StreamExt;
        let mut pieces = std::pin::pin!(crate::blob::read_in_order(blob.clone(), PIECE));
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
        let built = built.map_err(|e| match e {
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
        let windows = (!built.windows.is_empty()).then(|| WindowsRef {
            digest: crate::digest::sha256(&built.windows),
            size: built.windows.len() as u64,
        });
        let index = CheckpointIndex {
            digest,
            codec,
            span,
            comp_size: size,
            uncomp_size: built.uncomp_size,
            checkpoints: built.checkpoints,
            span_digests: built.span_digests,
            entries: built.entries,
            marks: built.marks,
            windows,
        };
        Ok((index, built.windows, built.copy))
    }
}

/// What an indexing pass found.
struct Built {
    checkpoints: Vec<Checkpoint>,
    span_digests: Vec<[u8; 32]>,
    uncomp_size: u64,
    entries: Vec<Entry>,
    marks: Vec<Vec<Mark>>,
    /// The marks' windows blob (gzip; empty otherwise).
    windows: Vec<u8>,
    /// The decoded tar, when the pass was asked to copy it and did.
    copy: Option<std::fs::File>,
}

/// What both codecs' passes share: the tar parser fed with the output on its own thread, and
/// the bookkeeping of checkpoints, span digests and marks.
struct Pass {
    tar_tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    tar: std::thread::JoinHandle<Result<Vec<Entry>>>,
    checkpoints: Vec<Checkpoint>,
    digests: Vec<[u8; 32]>,
    /// Compressed bytes from the current span's start onwards, and where that start is.
    pending: Vec<u8>,
    pending_start: u64,
    /// Output of the current span so far (for the digests of its marks' segments).
    span_out: Vec<u8>,
    /// Marks of each span so far (gzip only), and their windows blob.
    marks: Vec<Vec<Mark>>,
    windows: Vec<u8>,
    copy: Option<Copying>,
}

impl Pass {
    fn new(copy: Option<Copying>) -> Pass {
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
            span_out: Vec::new(),
            marks: Vec::new(),
            windows: Vec::new(),
            copy,
        }
    }

    /// Compressed bytes as they arrive.
    fn input(&mut self, piece: &[u8]) {
        self.pending.extend_from_slice(piece);
    }

    /// Uncompressed bytes as they are produced (a dead tar parser reports at `finish`).
    fn output(&mut self, data: &[u8]) {
        if !self.checkpoints.is_empty() {
            self.span_out.extend_from_slice(data);
        }
        if let Some(tx) = &self.tar_tx {
            let _ = tx.send(data.to_vec());
        }
        if self.copy.as_mut().is_some_and(|c| !c.write(data)) {
            self.copy = None;
        }
    }

    /// Whether a resume point at uncompressed offset `out` is due.
    fn due(&self, out: u64, span: u64) -> bool {
        self.checkpoints.last().is_none_or(|c| out - c.out > span)
    }

    /// Records a checkpoint and closes the previous span's digests.
    fn checkpoint(&mut self, cp: Checkpoint) {
        if let Some(marks) = self.marks.last_mut() {
            // Marks lie strictly inside their span (a boundary can repeat a byte offset);
            // a dropped mark's window was the last one written.
            while marks.last().is_some_and(|m| m.inp >= cp.inp) {
                let gone = marks.pop().and_then(|m| m.resume).map_or(0, |r| r.len);
                self.windows.truncate(self.windows.len() - gone as usize);
            }
        }
        if !self.checkpoints.is_empty() {
            let upto = (cp.inp - self.pending_start) as usize;
            self.digests
                .push(Sha256::digest(&self.pending[..upto]).into());
            self.close_span(cp.out);
        }
        let keep_from = (cp.start() - self.pending_start) as usize;
        self.pending.drain(..keep_from);
        self.pending_start = cp.start();
        self.checkpoints.push(cp);
        self.marks.push(Vec::new());
    }

    /// Gives the current span's marks the digests of their output segments, the last one
    /// ending at `end` (the span's end).
    fn close_span(&mut self, end: u64) {
        let (Some(cp), Some(marks)) = (self.checkpoints.last(), self.marks.last_mut()) else {
            return;
        };
        let o0 = cp.out;
        let ends: Vec<u64> = marks.iter().skip(1).map(|m| m.out).chain([end]).collect();
        for (m, e) in marks.iter_mut().zip(ends) {
            let seg = &self.span_out[(m.out - o0) as usize..(e - o0) as usize];
            if let Some(r) = &mut m.resume {
                r.out_digest = Sha256::digest(seg).into();
            }
        }
        self.span_out.clear();
    }

    /// Whether a mark is due at compressed offset `inp` (`every` bytes since the last one).
    fn mark_due(&self, inp: u64, every: u64) -> bool {
        let since = self.marks.last().and_then(|m| m.last()).map(|m| m.inp);
        let since = since.unwrap_or(self.pending_start);
        !self.checkpoints.is_empty() && inp >= since + every
    }

    /// Records a mark in the current span: its prefix up to `inp` yields `out` bytes; a
    /// decoder resumes there from the `bits` (0-7) left of the byte before `inp` and the
    /// `window` of output before `out`, written to the windows blob.
    fn mark(&mut self, inp: u64, out: u64, bits: u8, window: &[u8]) {
        let Some(marks) = self.marks.last_mut() else {
            return;
        };
        let from = marks.last().map_or(self.pending_start, |m| m.inp);
        let piece = &self.pending
            [(from - self.pending_start) as usize..(inp - self.pending_start) as usize];
        let entry = windows::entry(bits, window);
        self.windows.extend_from_slice(&entry);
        marks.push(Mark {
            inp,
            out,
            digest: Sha256::digest(piece).into(),
            resume: Some(Resume {
                len: entry.len() as u32,
                out_digest: [0; 32], // set when the span closes
            }),
        });
    }

    fn finish(mut self, uncompressed: u64) -> Result<Built> {
        self.tar_tx = None;
        if self.checkpoints.is_empty() {
            return Err(Error::format("compressed stream", "no data"));
        }
        self.digests.push(Sha256::digest(&self.pending).into());
        self.close_span(uncompressed);
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
        Ok(Built {
            checkpoints: self.checkpoints,
            span_digests: self.digests,
            uncomp_size: uncompressed,
            entries,
            marks,
            windows: self.windows,
            copy: self.copy.and_then(|c| c.finish(uncompressed)),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;

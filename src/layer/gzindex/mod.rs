//! Checkpoint indexes for plain gzip layers: lazy reads from ordinary images.
//!
//! A gzip stream cannot be entered at an arbitrary offset, but it can be resumed at a deflate
//! block boundary given the bit offset and the 32 KiB of output before it (zlib's zran.c).
//! One streaming pass over the blob records such a checkpoint every `span` bytes of output,
//! the sha256 of each span's compressed bytes, every tar entry's offset, and checks the whole
//! blob's digest. Afterwards a read fetches only the compressed span(s) covering it, checks
//! their digests, and inflates from the checkpoint: one round trip plus one span's inflate.
//!
//! Span `k` covers compressed bytes `[start(k), inp(k+1))` where `start` backs up one byte when
//! the checkpoint begins mid-byte; adjacent spans may share that byte. Multi-member streams
//! (pigz, concatenated members) work: a resumed raw inflate that reaches a member's end skips
//! the 8-byte trailer and continues in gzip mode.

pub mod file;
mod inflate;
pub mod share;

use super::Entry;
use crate::blob::{Blob, BlobSource, clamp};
use crate::digest::Hasher;
use crate::error::{Error, Result};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use inflate::{AUTO, GZIP, Inflater, RAW};
use libz_rs_sys::{Z_BLOCK, Z_BUF_ERROR, Z_NO_FLUSH, Z_OK, Z_STREAM_END};
use sha2::{Digest, Sha256};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

/// Default uncompressed distance between checkpoints.
pub const DEFAULT_SPAN: u64 = 4 << 20;
const WINDOW: usize = 32 * 1024;
/// Compressed bytes requested per ranged read while building.
const PIECE: u64 = 8 << 20;

/// A resume point in the gzip stream.
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

impl Checkpoint {
    /// Where this span's compressed bytes start.
    pub fn start(&self) -> u64 {
        self.inp - u64::from(self.bits > 0)
    }
}

/// Everything needed to serve a gzip layer lazily.
#[derive(Debug, Clone, PartialEq)]
pub struct GzIndex {
    /// The layer blob this index describes.
    pub digest: String,
    pub span: u64,
    pub comp_size: u64,
    pub uncomp_size: u64,
    pub checkpoints: Vec<Checkpoint>,
    /// sha256 of each span's compressed bytes.
    pub span_digests: Vec<[u8; 32]>,
    /// The layer's tar entries (locators are uncompressed tar offsets).
    pub entries: Vec<Entry>,
}

impl GzIndex {
    /// Compressed extent of span `k` (the bytes its digest covers and a read fetches).
    pub fn span_extent(&self, k: usize) -> (u64, u64) {
        let start = self.checkpoints[k].start();
        let end = self
            .checkpoints
            .get(k + 1)
            .map_or(self.comp_size, |c| c.inp);
        (start, end)
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

    /// Builds the index of `blob` (a gzip layer whose id is its digest) in one pass.
    /// `progress` gets (bytes done, total).
    pub async fn build(
        blob: Blob,
        span: u64,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<GzIndex> {
        let digest = blob.id().to_string();
        let size = blob.size();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(2);
        let builder = tokio::task::spawn_blocking(move || build_pass(rx.into_iter(), span));
        let mut hasher = Hasher::default();
        let mut off = 0;
        while off < size {
            let piece = blob.read_at(off, PIECE.min(size - off)).await?;
            if piece.is_empty() {
                break;
            }
            hasher.update(&piece);
            off += piece.len() as u64;
            progress(off, size);
            if tx.send(piece).is_err() {
                break; // the builder failed; its error is reported below
            }
        }
        drop(tx);
        let built = builder
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        let (checkpoints, span_digests, uncomp_size, entries) = built.map_err(|e| match e {
            Error::Format { reason, .. } => Error::format(format!("gzip layer {digest}"), reason),
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
        Ok(GzIndex {
            digest,
            span,
            comp_size: size,
            uncomp_size,
            checkpoints,
            span_digests,
            entries,
        })
    }
}

type Built = (Vec<Checkpoint>, Vec<[u8; 32]>, u64, Vec<Entry>);

/// The blocking pass: inflate with `Z_BLOCK`, checkpoint at block boundaries, hash spans,
/// and feed the output to a tar parser on another thread.
fn build_pass(input: impl Iterator<Item = Bytes>, span: u64) -> Result<Built> {
    let (tar_tx, tar_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let tar = std::thread::spawn(move || {
        let reader = crate::layer::streamed::ChannelReader::new(tar_rx);
        super::tar::index_stream(reader, "gzip layer")
    });
    let mut inf = Inflater::new(AUTO)?;
    let (mut totin, mut totout) = (0u64, 0u64);
    let mut window: Vec<u8> = Vec::with_capacity(2 * WINDOW);
    let mut out = vec![0u8; 256 * 1024];
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let mut digests = Vec::new();
    // Compressed bytes from the current span's start onwards, and where that start is.
    let (mut pending, mut pending_start) = (Vec::<u8>::new(), 0u64);
    let mut member_done = false;
    let corrupt = |at: u64, why: String| {
        Error::format("gzip stream", format!("at compressed offset {at}: {why}"))
    };
    for piece in input {
        pending.extend_from_slice(&piece);
        let mut pos = 0;
        let mut stalls = 0;
        while pos < piece.len() {
            if member_done {
                if piece[pos..].iter().all(|&b| b == 0) {
                    totin += (piece.len() - pos) as u64;
                    break; // zero padding after the last member
                }
                inf.reset(GZIP)?;
                member_done = false;
            }
            let step = inf.inflate(&piece[pos..], &mut out, Z_BLOCK);
            pos += step.consumed;
            totin += step.consumed as u64;
            totout += step.produced as u64;
            if step.produced > 0 {
                let produced = &out[..step.produced];
                window.extend_from_slice(produced);
                if window.len() > WINDOW {
                    window.drain(..window.len() - WINDOW);
                }
                let _ = tar_tx.send(produced.to_vec());
            }
            match step.code {
                Z_STREAM_END => member_done = true,
                Z_OK | Z_BUF_ERROR => {}
                code => return Err(corrupt(totin, format!("inflate failed (zlib code {code})"))),
            }
            if step.consumed == 0 && step.produced == 0 {
                stalls += 1;
                if stalls > 4 {
                    break;
                }
            } else {
                stalls = 0;
            }
            let dt = inf.data_type();
            let boundary = dt & 128 != 0 && dt & 64 == 0 && step.code != Z_STREAM_END;
            if boundary && checkpoints.last().is_none_or(|c| totout - c.out > span) {
                let cp = Checkpoint {
                    out: totout,
                    inp: totin,
                    bits: (dt & 7) as u8,
                    window: window.clone(),
                };
                if !checkpoints.is_empty() {
                    let upto = (cp.inp - pending_start) as usize;
                    digests.push(Sha256::digest(&pending[..upto]).into());
                }
                let keep_from = (cp.start() - pending_start) as usize;
                pending.drain(..keep_from);
                pending_start = cp.start();
                checkpoints.push(cp);
            }
        }
    }
    drop(tar_tx);
    if !member_done {
        return Err(corrupt(
            totin,
            "the stream ends inside a gzip member (truncated?)".into(),
        ));
    }
    if checkpoints.is_empty() {
        return Err(corrupt(0, "no deflate data".into()));
    }
    digests.push(Sha256::digest(&pending).into());
    let entries = tar
        .join()
        .map_err(|_| Error::format("gzip layer", "tar parser panicked"))??;
    Ok((checkpoints, digests, totout, entries))
}

/// Inflates span `k` of `index` from its verified compressed bytes.
pub fn inflate_span(index: &GzIndex, k: usize, compressed: &[u8]) -> Result<Vec<u8>> {
    let what = || format!("span {k} of gzip layer {}", index.digest);
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
    let actual: [u8; 32] = Sha256::digest(compressed).into();
    if &actual != expected {
        return Err(Error::Digest {
            what: what(),
            expected: hex::encode(expected),
            actual: hex::encode(actual),
        });
    }
    let cp = &index.checkpoints[k];
    let (o0, o1) = index.span_output(k);
    let want = (o1 - o0) as usize;
    let mut inf = Inflater::new(RAW)?;
    let mut input = compressed;
    if cp.bits > 0 {
        let b = *input
            .first()
            .ok_or_else(|| Error::format(what(), "empty span"))?;
        inf.prime(cp.bits as i32, (b >> (8 - cp.bits)) as i32)?;
        input = &input[1..];
    }
    if !cp.window.is_empty() {
        inf.set_dictionary(&cp.window)?;
    }
    let mut out = vec![0u8; want];
    let (mut pos, mut produced, mut raw) = (0usize, 0usize, true);
    while produced < want {
        let step = inf.inflate(&input[pos..], &mut out[produced..], Z_NO_FLUSH);
        pos += step.consumed;
        produced += step.produced;
        match step.code {
            Z_STREAM_END if produced < want => {
                // End of a member: a raw stream leaves the trailer for us; gzip mode eats it.
                if raw {
                    pos += 8;
                }
                if pos >= input.len() {
                    break;
                }
                inf.reset(GZIP)?;
                raw = false;
            }
            Z_OK | Z_STREAM_END => {}
            Z_BUF_ERROR if step.consumed == 0 && step.produced == 0 => break,
            Z_BUF_ERROR => {}
            code => {
                return Err(Error::format(
                    what(),
                    format!("inflate failed (zlib code {code})"),
                ));
            }
        }
    }
    if produced != want {
        return Err(Error::format(
            what(),
            format!("inflated {produced} of {want} bytes"),
        ));
    }
    Ok(out)
}

/// The uncompressed tar of a gzip layer, served lazily through its index.
pub struct GzBlob {
    id: String,
    index: Arc<GzIndex>,
    compressed: Blob,
    spans: Mutex<lru::LruCache<usize, Bytes>>,
}

impl GzBlob {
    /// Serves `index` from `compressed` (normally the block-cached layer blob).
    pub fn new(index: Arc<GzIndex>, compressed: Blob) -> GzBlob {
        GzBlob {
            id: format!("{}/gzindex", index.digest),
            index,
            compressed,
            spans: Mutex::new(lru::LruCache::new(NonZeroUsize::new(8).unwrap())),
        }
    }

    async fn span(&self, k: usize) -> Result<Bytes> {
        if let Some(b) = self.spans.lock().unwrap().get(&k) {
            return Ok(b.clone());
        }
        let (start, end) = self.index.span_extent(k);
        let compressed = self.compressed.read_at(start, end - start).await?;
        let index = self.index.clone();
        let data = tokio::task::spawn_blocking(move || inflate_span(&index, k, &compressed))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        let data = Bytes::from(data);
        self.spans.lock().unwrap().put(k, data.clone());
        Ok(data)
    }
}

#[async_trait]
impl BlobSource for GzBlob {
    fn id(&self) -> &str {
        &self.id
    }
    fn size(&self) -> u64 {
        self.index.uncomp_size
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        let len = clamp(&self.id, self.size(), offset, len)?;
        let end = offset + len;
        let cps = &self.index.checkpoints;
        let mut k = cps.partition_point(|c| c.out <= offset).saturating_sub(1);
        let mut out = BytesMut::with_capacity(len as usize);
        while k < cps.len() && (out.len() as u64) < len {
            let (o0, o1) = self.index.span_output(k);
            let data = self.span(k).await?;
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

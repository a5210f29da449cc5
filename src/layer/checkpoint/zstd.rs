//! Zstd checkpoints: every frame starts fresh (no window, no dictionary), so the indexing pass
//! records a checkpoint at a frame boundary once `span` bytes have passed, and a span decodes
//! with an ordinary decoder from its first frame. Multi-frame layers (pzstd, seekable zstd,
//! zstd:chunked, whose skippable metadata frames decoders pass over) become lazy; a
//! single-frame layer yields one span.

use super::{Built, Checkpoint, Pass};
use crate::error::{Error, Result};
use bytes::Bytes;
use std::io::Read;
use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer};

/// The indexing pass over a zstd stream arriving in pieces.
pub(super) fn pass(mut pass: Pass, input: impl Iterator<Item = Bytes>, span: u64) -> Result<Built> {
    let mut dctx = DCtx::create();
    let (mut totin, mut totout) = (0u64, 0u64);
    let mut out = vec![0u8; 256 * 1024];
    let mut frame_done = true;
    pass.checkpoint(Checkpoint {
        out: 0,
        inp: 0,
        bits: 0,
        window: Vec::new(),
    });
    for piece in input {
        pass.input(&piece);
        let mut inb = InBuffer::around(&piece[..]);
        while inb.pos() < piece.len() || !frame_done {
            let before = inb.pos();
            let mut outb = OutBuffer::around(&mut out[..]);
            let hint = dctx
                .decompress_stream(&mut outb, &mut inb)
                .map_err(|code| {
                    Error::format(
                        "zstd stream",
                        format!(
                            "at compressed offset {}: {}",
                            totin,
                            zstd::zstd_safe::get_error_name(code)
                        ),
                    )
                })?;
            let produced = outb.pos();
            totin += (inb.pos() - before) as u64;
            totout += produced as u64;
            if produced > 0 {
                pass.output(&out[..produced]);
            }
            frame_done = hint == 0;
            if frame_done && pass.due(totout, span) {
                pass.checkpoint(Checkpoint {
                    out: totout,
                    inp: totin,
                    bits: 0,
                    window: Vec::new(),
                });
            }
            if inb.pos() == before && produced == 0 {
                break; // needs more input
            }
        }
    }
    if !frame_done {
        return Err(Error::format(
            "zstd stream",
            format!("ends inside a frame at {totin} (truncated?)"),
        ));
    }
    // A checkpoint at the very end would describe an empty span: drop it.
    if pass.checkpoints.len() > 1 && pass.checkpoints.last().is_some_and(|c| c.out == totout) {
        pass.checkpoints.pop();
    }
    pass.finish(totout)
}

/// Decodes `want` bytes from the frames in `compressed`.
pub(super) fn decode_span(compressed: &[u8], want: usize) -> Result<Vec<u8>> {
    let mut dec = zstd::stream::read::Decoder::with_buffer(compressed)
        .map_err(|e| Error::format("zstd span", e.to_string()))?;
    let mut out = Vec::with_capacity(want);
    (&mut dec)
        .take(want as u64)
        .read_to_end(&mut out)
        .map_err(|e| Error::format("zstd span", e.to_string()))?;
    Ok(out)
}

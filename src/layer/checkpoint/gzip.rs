//! Gzip checkpoints (zlib's zran.c): the indexing pass inflates with `Z_BLOCK` so it stops at
//! every deflate block boundary, and records a checkpoint there once `span` bytes have passed:
//! the compressed offset, the 0-7 bits of the previous byte still unread, and the last 32 KiB
//! of output. Resuming primes those bits, sets the window as the dictionary and inflates raw.
//! Multi-member streams (pigz, concatenated members) work in both directions: the pass resets
//! at each member end; a resumed raw inflate that reaches a member's end skips the 8-byte
//! trailer and continues in gzip mode.

use super::inflate::{AUTO, GZIP, Inflater, RAW};
use super::{Built, Checkpoint, Pass};
use crate::error::{Error, Result};
use bytes::Bytes;
use libz_rs_sys::{Z_BLOCK, Z_BUF_ERROR, Z_NO_FLUSH, Z_OK, Z_STREAM_END};

const WINDOW: usize = 32 * 1024;

/// The indexing pass over a gzip stream arriving in pieces.
pub(super) fn pass(mut pass: Pass, input: impl Iterator<Item = Bytes>, span: u64) -> Result<Built> {
    let mut inf = Inflater::new(AUTO)?;
    let (mut totin, mut totout) = (0u64, 0u64);
    let mut window: Vec<u8> = Vec::with_capacity(2 * WINDOW);
    let mut out = vec![0u8; 256 * 1024];
    let mut member_done = false;
    let corrupt = |at: u64, why: String| {
        Error::format("gzip stream", format!("at compressed offset {at}: {why}"))
    };
    for piece in input {
        pass.input(&piece);
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
                pass.output(produced);
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
            if boundary && pass.due(totout, span) {
                pass.checkpoint(Checkpoint {
                    out: totout,
                    inp: totin,
                    bits: (dt & 7) as u8,
                    window: window.clone(),
                });
            } else if boundary && pass.mark_due(totin, super::mark_every(span)) {
                pass.mark(totin, totout, (dt & 7) as u8, &window);
            }
        }
    }
    if !member_done {
        return Err(corrupt(
            totin,
            "the stream ends inside a gzip member (truncated?)".into(),
        ));
    }
    pass.finish(totout)
}

/// Inflates `want` bytes from checkpoint `cp`, given the span's compressed bytes.
pub(super) fn inflate_span(cp: &Checkpoint, compressed: &[u8], want: usize) -> Result<Vec<u8>> {
    let mut inf = Inflater::new(RAW)?;
    let mut input = compressed;
    if cp.bits > 0 {
        let b = *input
            .first()
            .ok_or_else(|| Error::format("gzip span", "empty span"))?;
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
                    "gzip span",
                    format!("inflate failed (zlib code {code})"),
                ));
            }
        }
    }
    out.truncate(produced);
    Ok(out)
}

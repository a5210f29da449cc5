//! Mark windows (index format 4): resuming a gzip span at a mark, without its front.
//!
//! A gzip span can only be decoded from its checkpoint, whose 32 KiB window is in the index.
//! A file in the middle of a 4 MiB span therefore costs the span's compressed front (about
//! 0.8 MB on average) before its own bytes. Every mark (a deflate block boundary every ~128 KiB
//! of compressed input) could be a checkpoint too, but 32 KiB of window per mark would grow
//! the index, which a mount fetches before it is ready, about twelvefold. So the marks'
//! windows live in a blob of their own, fetched by range only when a read resumes at a mark:
//! one small ranged read beside the compressed bytes, in the same round trip (a request of
//! its own all the same, so `CheckpointBlob` asks for one only to skip a long front).
//!
//! Each entry is one byte of bits (0-7: how many bits of the byte before the mark are still
//! to be decoded) followed by the window, zstd-compressed. Entries follow each other in mark
//! order. Nothing in an entry is trusted: the index carries the sha256 of the output from
//! each mark to the next (or the span's end), and a resume serves only output that matches
//! it. For an index from the registry those digests are checked against the decoded layer by
//! verification, like everything else in it (see [`crate::verify`]).

use super::{Checkpoint, CheckpointIndex, gzip};
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};

/// Largest window a gzip stream can refer back into.
const WINDOW: usize = 32 * 1024;

/// The windows-blob entry for a mark: `bits` and the `window` before it.
pub(super) fn entry(bits: u8, window: &[u8]) -> Vec<u8> {
    let mut e = vec![bits];
    e.extend(zstd::bulk::compress(window, 1).expect("zstd compression of an in-memory buffer"));
    e
}

/// Parses an entry: the bits to prime and the window.
fn parse(entry: &[u8]) -> Result<(u8, Vec<u8>)> {
    let bad = |why: String| Error::format("gzip mark window", why);
    let (&bits, packed) = entry
        .split_first()
        .ok_or_else(|| bad("empty entry".into()))?;
    if bits > 7 {
        return Err(bad(format!("{bits} bits to prime (at most 7)")));
    }
    let window = zstd::bulk::decompress(packed, WINDOW).map_err(|e| bad(e.to_string()))?;
    Ok((bits, window))
}

/// Where each mark's entry starts in the windows blob, per span (the running sum of the
/// entries' lengths), or `None` when some mark has no entry.
pub(super) fn offsets(index: &CheckpointIndex) -> Option<Vec<Vec<u64>>> {
    let mut at = 0u64;
    let mut out = Vec::with_capacity(index.marks.len());
    for marks in &index.marks {
        let mut span = Vec::with_capacity(marks.len());
        for m in marks {
            span.push(at);
            at += u64::from(m.resume.as_ref()?.len);
        }
        out.push(span);
    }
    let size = index.windows.as_ref()?.size;
    (at == size && !index.marks.is_empty()).then_some(out)
}

/// Decodes span `k` from its mark `j` up to mark `stop` (or the span's end), given the mark's
/// windows entry and the compressed bytes from the one before the mark's `inp` up to the stop
/// mark's `inp` (or the span's end). Each segment between marks must match its digest.
pub(super) fn read_from_mark(
    index: &CheckpointIndex,
    k: usize,
    j: usize,
    stop: Option<usize>,
    entry: &[u8],
    compressed: &[u8],
) -> Result<Vec<u8>> {
    let what = || format!("span {k} of layer {} from mark {j}", index.digest);
    let marks = index.marks_of(k);
    let (_, span_end) = index.span_output(k);
    let end_of = |t: usize| marks.get(t).map_or(span_end, |m| m.out);
    let stop = stop.unwrap_or(marks.len());
    let mark = marks
        .get(j)
        .filter(|_| j < stop && stop <= marks.len())
        .ok_or_else(|| Error::format(what(), "no such mark range"))?;
    let (bits, window) = parse(entry).map_err(|e| Error::format(what(), e.to_string()))?;
    let input = match bits {
        0 => compressed.get(1..),
        _ => Some(compressed),
    }
    .ok_or_else(|| Error::format(what(), "no compressed bytes"))?;
    let cp = Checkpoint {
        out: mark.out,
        inp: mark.inp,
        bits,
        window,
    };
    let want = (end_of(stop) - mark.out) as usize;
    let out =
        gzip::inflate_span(&cp, input, want).map_err(|e| Error::format(what(), e.to_string()))?;
    if out.len() != want {
        return Err(Error::format(
            what(),
            format!("decoded {} of {want} bytes", out.len()),
        ));
    }
    for (t, m) in marks.iter().enumerate().take(stop).skip(j) {
        let seg = &out[(m.out - mark.out) as usize..(end_of(t + 1) - mark.out) as usize];
        let expected = m
            .resume
            .as_ref()
            .ok_or_else(|| Error::format(what(), "a mark without a digest"))?
            .out_digest;
        let actual: [u8; 32] = Sha256::digest(seg).into();
        if actual != expected {
            return Err(Error::Digest {
                what: format!("{} (output after mark {t})", what()),
                expected: hex::encode(expected),
                actual: hex::encode(actual),
            });
        }
    }
    Ok(out)
}

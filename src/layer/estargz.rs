//! eStargz (and legacy stargz): lazy by design.
//!
//! A blob is a concatenation of gzip members ending in a TOC member and a footer that holds the
//! TOC's offset. Opening reads the tail speculatively (footer and, usually, the TOC in one
//! request), checks the TOC against the `containerd.io/snapshot/stargz/toc.digest` annotation,
//! and turns TOC entries into [`Entry`]s whose locator lists the file's chunks. A read fetches
//! only the compressed extents of the chunks it touches, inflates them and checks each
//! chunk's `chunkDigest` before a byte is returned.

use super::chunked::{Chunk, Codec, Reader};
use super::toc::{self, TocEntry};
use super::{Entry, Kind, Locator, clean_path};
use crate::blob::Blob;
use crate::error::{Error, Result};
use bytes::Bytes;
use std::io::Read;

/// Annotation carrying the sha256 of the uncompressed TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Annotation `ocifs convert` puts on a layer with prioritized files: how many compressed
/// bytes at the blob's start hold them (the offset of `.prefetch.landmark`'s payload), so a
/// mount can stream them in beside the TOC instead of after it. Only a hint: what is served
/// is still checked against the TOC's chunk digests.
pub const PREFETCH_SIZE_ANNOTATION: &str = "io.ocifs.prefetch-size";
/// Annotation `ocifs convert` puts on every eStargz layer: the blob offset where the TOC's
/// gzip member starts (as the footer says), so that a mount reads exactly the TOC and footer
/// at once instead of a guessed tail. Only a hint: the footer decides, and the TOC's digest
/// is checked.
pub const TOC_OFFSET_ANNOTATION: &str = "io.ocifs.toc-offset";
/// Footer sizes: eStargz and legacy stargz.
pub const FOOTER_SIZE: u64 = 51;
const LEGACY_FOOTER_SIZE: u64 = 47;
/// TOCs larger than this (uncompressed) are refused.
const MAX_TOC: u64 = 256 << 20;
/// Names eStargz writers add that readers hide (stargz-snapshotter's zstd:chunked too).
pub(super) const HIDDEN: [&str; 3] = [
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// The footer's verdict: where the TOC member starts, and which footer variant it was.
pub fn parse_footer(tail: &[u8]) -> Option<(u64, bool)> {
    let try_one = |f: &[u8], legacy: bool| -> Option<u64> {
        // gzip header: 1f 8b 08, FLG with FEXTRA (0x04), then MTIME(4) XFL OS, XLEN(2)
        if f.len() < 12 || f[0] != 0x1f || f[1] != 0x8b || f[2] != 8 || f[3] & 4 == 0 {
            return None;
        }
        let xlen = u16::from_le_bytes([f[10], f[11]]) as usize;
        let extra = f.get(12..12 + xlen)?;
        let payload = if legacy {
            (xlen == 22).then_some(extra)?
        } else {
            if xlen != 26
                || extra[0] != b'S'
                || extra[1] != b'G'
                || u16::from_le_bytes([extra[2], extra[3]]) != 22
            {
                return None;
            }
            &extra[4..]
        };
        if &payload[16..22] != b"STARGZ" {
            return None;
        }
        u64::from_str_radix(std::str::from_utf8(&payload[..16]).ok()?, 16).ok()
    };
    let n = tail.len();
    if n >= FOOTER_SIZE as usize
        && let Some(o) = try_one(&tail[n - FOOTER_SIZE as usize..], false)
    {
        return Some((o, false));
    }
    if n >= LEGACY_FOOTER_SIZE as usize
        && let Some(o) = try_one(&tail[n - LEGACY_FOOTER_SIZE as usize..], true)
    {
        return Some((o, true));
    }
    None
}

/// Opens an eStargz blob whose tail (at `tail_start`) was already read: fetches and checks the
/// TOC, returns the entries and a reader for their chunks, and whether it is legacy stargz.
pub async fn open(
    blob: Blob,
    tail_start: u64,
    tail: Bytes,
    toc_digest: Option<&str>,
) -> Result<(Reader, Vec<Entry>, bool)> {
    let what = format!("eStargz layer {}", blob.id());
    let (toc_off, legacy) =
        parse_footer(&tail).ok_or_else(|| Error::format(&what, "no eStargz footer"))?;
    let footer = if legacy {
        LEGACY_FOOTER_SIZE
    } else {
        FOOTER_SIZE
    };
    let toc_end = blob.size() - footer;
    if toc_off >= toc_end {
        return Err(Error::format(
            &what,
            format!("TOC offset {toc_off} is past the footer"),
        ));
    }
    let member = if toc_off >= tail_start {
        tail.slice((toc_off - tail_start) as usize..(toc_end - tail_start) as usize)
    } else {
        blob.read_at(toc_off, toc_end - toc_off).await?
    };
    let json = extract_toc(&member).map_err(|e| Error::format(&what, format!("TOC: {e}")))?;
    let actual = crate::digest::sha256(&json);
    if let Some(expected) = toc_digest
        && expected != actual
    {
        return Err(Error::Digest {
            what: format!("TOC of {}", blob.id()),
            expected: expected.into(),
            actual,
        });
    }
    let toc = toc::parse(&json, &what)?;
    // Everything before the landmark's payload is what the image author marked as needed at
    // startup; `.no.prefetch.landmark` (or no landmark) means nothing is.
    let prefetch_len = toc
        .iter()
        .find(|e| clean_path(&e.name).is_ok_and(|p| p == ".prefetch.landmark"))
        .map_or(0, |e| e.offset.min(toc_off));
    let entries = entries_from_toc(toc, toc_off, &what)?;
    let reader = Reader::new(blob, Codec::Gzip, prefetch_len).vouched(toc_digest.is_some());
    Ok((reader, entries, legacy))
}

/// Inflates the TOC member and returns the bytes of its `stargz.index.json` tar entry.
fn extract_toc(member: &[u8]) -> std::io::Result<Vec<u8>> {
    let gz = flate2::read::GzDecoder::new(member).take(MAX_TOC + 1024);
    let mut ar = ::tar::Archive::new(gz);
    for e in ar.entries()? {
        let mut e = e?;
        if e.path_bytes().as_ref() == b"stargz.index.json" {
            if e.size() > MAX_TOC {
                return Err(std::io::Error::other(format!(
                    "TOC is {} bytes, over the limit",
                    e.size()
                )));
            }
            let mut json = Vec::with_capacity(e.size() as usize);
            e.read_to_end(&mut json)?;
            return Ok(json);
        }
    }
    Err(std::io::Error::other("no stargz.index.json entry"))
}

fn entries_from_toc(toc: Vec<TocEntry>, toc_off: u64, what: &str) -> Result<Vec<Entry>> {
    // Each member ends where the next one (by offset) starts; the last one at the TOC.
    let mut starts: Vec<u64> = toc
        .iter()
        .filter(|e| e.offset > 0)
        .map(|e| e.offset)
        .collect();
    starts.push(toc_off);
    starts.sort_unstable();
    starts.dedup();
    let end_of = |o: u64| -> Result<u64> {
        let i = starts.partition_point(|&s| s <= o);
        starts
            .get(i)
            .copied()
            .ok_or_else(|| Error::format(what, format!("chunk offset {o} is past the TOC")))
    };
    let mut out: Vec<Entry> = Vec::with_capacity(toc.len());
    let mut chunks: Vec<Chunk> = Vec::new();
    let flush = |out: &mut Vec<Entry>, chunks: &mut Vec<Chunk>| -> Result<()> {
        if let Some(last) = out.last_mut()
            && !chunks.is_empty()
        {
            if !toc::tiles(chunks, last.size) {
                return Err(Error::format(
                    what,
                    format!(
                        "chunks of {:?} do not tile its {} bytes",
                        last.path, last.size
                    ),
                ));
            }
            last.data = Locator::Chunks(std::mem::take(chunks).into());
        }
        Ok(())
    };
    for t in toc {
        let path = clean_path(&t.name)?;
        if t.kind == "chunk" {
            let Some(file) = out
                .last()
                .filter(|e| e.path == path && e.kind == Kind::File)
            else {
                return Err(Error::format(
                    what,
                    format!("chunk of {path:?} does not follow its file"),
                ));
            };
            let len = if t.chunk_size == 0 {
                file.size.saturating_sub(t.chunk_offset)
            } else {
                t.chunk_size
            };
            chunks.push(chunk(&t, len, end_of(t.offset)?));
            continue;
        }
        flush(&mut out, &mut chunks)?;
        if HIDDEN.contains(&path.as_str()) {
            continue;
        }
        let mut e = t.entry(path, what)?;
        let kind = e.kind;
        if kind == Kind::File {
            e.size = t.size;
            if t.size > 0 {
                let len = if t.chunk_size == 0 {
                    t.size
                } else {
                    t.chunk_size
                };
                chunks.push(chunk(&t, len, end_of(t.offset)?));
            }
        }
        out.push(e);
    }
    flush(&mut out, &mut chunks)?;
    Ok(out)
}

fn chunk(t: &TocEntry, len: u64, end: u64) -> Chunk {
    Chunk {
        file_offset: t.chunk_offset,
        len,
        start: t.offset,
        end,
        inner: t.inner_offset,
        digest: (!t.chunk_digest.is_empty()).then(|| t.chunk_digest.clone()),
        zeros: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footers() {
        let mut f = vec![
            0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
        ];
        f.extend_from_slice(b"00000000000012abSTARGZ");
        f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.len(), 51);
        assert_eq!(parse_footer(&f), Some((0x12ab, false)));
        let mut l = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 22, 0];
        l.extend_from_slice(b"00000000000000ffSTARGZ");
        l.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_footer(&l), Some((0xff, true)));
        assert_eq!(parse_footer(&[0u8; 100]), None);
        let mut bad = f.clone();
        bad[20] = b'z';
        assert_eq!(parse_footer(&bad), None);
    }

    #[test]
    fn chunks_must_cover_their_file() {
        let t = vec![
            TocEntry {
                name: "a".into(),
                kind: "reg".into(),
                size: 10,
                offset: 100,
                chunk_size: 4,
                ..Default::default()
            },
            TocEntry {
                name: "a".into(),
                kind: "chunk".into(),
                offset: 200,
                chunk_offset: 4,
                chunk_size: 0,
                ..Default::default()
            },
        ];
        let e = entries_from_toc(t, 300, "t").unwrap();
        let Locator::Chunks(c) = &e[0].data else {
            panic!()
        };
        assert_eq!(
            (c[0].start, c[0].end, c[1].len, c[1].end),
            (100, 200, 6, 300)
        );
        let t = vec![TocEntry {
            name: "b".into(),
            kind: "chunk".into(),
            offset: 1,
            ..Default::default()
        }];
        assert!(entries_from_toc(t, 300, "t").is_err());
    }

    /// Found by fuzzing: chunks whose lengths add up to the file's size but do not tile it (a
    /// gap where a chunk starts past the end of the one before, or lengths that overflow to
    /// the size) were accepted, and reads served their bytes at the wrong offsets.
    #[test]
    fn chunks_must_tile_their_file() {
        let toc = |first_offset: u64, first_len: u64, second_offset: u64, second_len: u64| {
            vec![
                TocEntry {
                    name: "a".into(),
                    kind: "reg".into(),
                    size: 10,
                    offset: 100,
                    chunk_offset: first_offset,
                    chunk_size: first_len,
                    ..Default::default()
                },
                TocEntry {
                    name: "a".into(),
                    kind: "chunk".into(),
                    offset: 200,
                    chunk_offset: second_offset,
                    chunk_size: second_len,
                    ..Default::default()
                },
            ]
        };
        assert!(entries_from_toc(toc(0, 4, 4, 6), 300, "t").is_ok());
        for (bad, why) in [
            (toc(0, 4, 5, 6), "gap"),
            (toc(1, 4, 4, 6), "first chunk not at 0"),
            (toc(0, u64::MAX, 0, 11), "lengths overflow"),
        ] {
            let err = entries_from_toc(bad, 300, "t").unwrap_err().to_string();
            assert!(err.contains("do not tile"), "{why}: {err}");
        }
    }
}

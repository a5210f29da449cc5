//! zstd:chunked (containers/storage): a zstd tar whose file payloads are separate zstd frames,
//! with a TOC (compressed JSON) and a footer in skippable frames at the end. Lazy like
//! eStargz: the footer gives the TOC's position, the TOC gives each file's frames, and every
//! chunk is checked against its digest when read.
//!
//! Two generations exist. The older footer is a skippable frame with a 40-byte payload
//! (TOC offset, compressed and uncompressed length, type 1, magic `GnUlInUx`), with
//! `io.containers.zstd-chunked.*` annotations; the current one has a 64-byte payload (adding
//! the tar-split position; magic `GNUlInUx`) and `io.github.containers.zstd-chunked.*`
//! annotations. The `manifest-checksum` annotation is the sha256 of the compressed TOC.

use super::chunked::{Chunk, Codec, Reader};
use super::toc::{self, TocEntry};
use super::{Entry, Kind, Locator, clean_path};
use crate::blob::Blob;
use crate::error::{Error, Result};
use bytes::Bytes;

/// Annotations carrying the sha256 of the compressed TOC (older and current generation).
pub const CHECKSUM_ANNOTATIONS: [&str; 2] = [
    "io.containers.zstd-chunked.manifest-checksum",
    "io.github.containers.zstd-chunked.manifest-checksum",
];
const SKIPPABLE_MAGIC: u32 = 0x184D2A50;
/// Uncompressed TOCs larger than this are refused.
const MAX_TOC: u64 = 256 << 20;

/// Where the TOC is: compressed offset and length, uncompressed length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TocPosition {
    pub offset: u64,
    pub compressed: u64,
    pub uncompressed: u64,
}

/// Finds either generation's footer at the end of `tail`.
pub fn parse_footer(tail: &[u8]) -> Option<TocPosition> {
    let try_one = |payload_len: usize, magic: &[u8; 8]| -> Option<TocPosition> {
        let n = tail.len().checked_sub(payload_len + 8)?;
        let f = &tail[n..];
        let word = |i: usize| u64::from_le_bytes(f[8 + i * 8..16 + i * 8].try_into().unwrap());
        let header_ok = u32::from_le_bytes(f[..4].try_into().unwrap()) == SKIPPABLE_MAGIC
            && u32::from_le_bytes(f[4..8].try_into().unwrap()) as usize == payload_len;
        (header_ok && &f[f.len() - 8..] == magic && word(3) == 1).then(|| TocPosition {
            offset: word(0),
            compressed: word(1),
            uncompressed: word(2),
        })
    };
    try_one(64, b"GNUlInUx").or_else(|| try_one(40, b"GnUlInUx"))
}

/// Opens a zstd:chunked blob whose tail (at `tail_start`) was already read.
pub async fn open(
    blob: Blob,
    tail_start: u64,
    tail: Bytes,
    checksum: Option<&str>,
) -> Result<(Reader, Vec<Entry>)> {
    let what = format!("zstd:chunked layer {}", blob.id());
    let pos = parse_footer(&tail).ok_or_else(|| Error::format(&what, "no zstd:chunked footer"))?;
    let end = pos
        .offset
        .checked_add(pos.compressed)
        .filter(|&e| e <= blob.size());
    let Some(end) = end else {
        return Err(Error::format(&what, "TOC position is past the blob"));
    };
    if pos.uncompressed > MAX_TOC {
        return Err(Error::format(
            &what,
            format!("TOC of {} bytes is over the limit", pos.uncompressed),
        ));
    }
    let compressed = if pos.offset >= tail_start {
        tail.slice((pos.offset - tail_start) as usize..(end - tail_start) as usize)
    } else {
        blob.read_at(pos.offset, pos.compressed).await?
    };
    let actual = crate::digest::sha256(&compressed);
    if let Some(expected) = checksum
        && expected != actual
    {
        return Err(Error::Digest {
            what: format!("TOC of {}", blob.id()),
            expected: expected.into(),
            actual,
        });
    }
    let json = zstd::bulk::decompress(&compressed, pos.uncompressed as usize)
        .map_err(|e| Error::format(&what, format!("TOC: {e}")))?;
    let toc = toc::parse(&json, &what)?;
    let entries = entries_from_toc(toc, blob.size(), &what)?;
    Ok((Reader::new(blob, Codec::Zstd, 0), entries))
}

fn entries_from_toc(toc: Vec<TocEntry>, size: u64, what: &str) -> Result<Vec<Entry>> {
    let mut out: Vec<Entry> = Vec::with_capacity(toc.len());
    // Chunks of the file being assembled, and where that file's frames end.
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut file_end = 0;
    let flush = |out: &mut Vec<Entry>, chunks: &mut Vec<Chunk>, file_end: u64| -> Result<()> {
        let Some(last) = out.last_mut() else {
            return Ok(());
        };
        if chunks.is_empty() {
            return Ok(());
        }
        let n = chunks.len();
        for i in 0..n {
            chunks[i].end = if i + 1 < n {
                chunks[i + 1].start
            } else {
                file_end
            };
        }
        // A hole needs no bytes of the blob (containers/storage still writes a small frame).
        let bad_extent = |c: &Chunk| (c.end <= c.start && !c.zeros) || c.end > size;
        if !toc::tiles(chunks, last.size) || chunks.iter().any(bad_extent) {
            return Err(Error::format(
                what,
                format!(
                    "chunks of {:?} do not describe its {} bytes",
                    last.path, last.size
                ),
            ));
        }
        last.data = Locator::Chunks(std::mem::take(chunks).into());
        Ok(())
    };
    let zeros = |chunk_type: &str| match chunk_type {
        "" => Ok(false),
        "zeros" => Ok(true),
        other => Err(Error::format(what, format!("unknown chunk type {other:?}"))),
    };
    for t in toc {
        let path = clean_path(&t.name)?;
        let digest = |d: &str| (!d.is_empty()).then(|| d.to_string());
        if t.kind == "chunk" {
            if out
                .last()
                .is_none_or(|e| e.path != path || e.kind != Kind::File)
            {
                return Err(Error::format(
                    what,
                    format!("chunk of {path:?} does not follow its file"),
                ));
            }
            chunks.push(Chunk {
                file_offset: t.chunk_offset,
                len: t.chunk_size,
                start: t.offset,
                end: 0,
                inner: 0,
                digest: digest(&t.chunk_digest),
                zeros: zeros(&t.chunk_type)?,
            });
            continue;
        }
        flush(&mut out, &mut chunks, file_end)?;
        let mut e = t.entry(path, what)?;
        let kind = e.kind;
        if kind == Kind::File && t.size > 0 {
            e.size = t.size;
            file_end = t.end_offset;
            let (len, d, z) = if t.chunk_size > 0 {
                (t.chunk_size, digest(&t.chunk_digest), zeros(&t.chunk_type)?)
            } else {
                (t.size, digest(&t.digest), false)
            };
            chunks.push(Chunk {
                file_offset: 0,
                len,
                start: t.offset,
                end: 0,
                inner: 0,
                digest: d,
                zeros: z,
            });
        }
        out.push(e);
    }
    flush(&mut out, &mut chunks, file_end)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footer(payload_words: &[u64], magic: &[u8; 8]) -> Vec<u8> {
        let mut f = vec![0u8; 10];
        f.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
        f.extend_from_slice(&((payload_words.len() * 8 + 8) as u32).to_le_bytes());
        for w in payload_words {
            f.extend_from_slice(&w.to_le_bytes());
        }
        f.extend_from_slice(magic);
        f
    }

    #[test]
    fn both_footer_generations() {
        let old = footer(&[100, 20, 50, 1], b"GnUlInUx");
        assert_eq!(
            parse_footer(&old),
            Some(TocPosition {
                offset: 100,
                compressed: 20,
                uncompressed: 50
            })
        );
        let new = footer(&[7, 8, 9, 1, 0, 0, 0], b"GNUlInUx");
        assert_eq!(
            parse_footer(&new),
            Some(TocPosition {
                offset: 7,
                compressed: 8,
                uncompressed: 9
            })
        );
        assert_eq!(
            parse_footer(&footer(&[1, 2, 3, 2], b"GnUlInUx")),
            None,
            "type must be 1"
        );
        assert_eq!(parse_footer(&[0u8; 80]), None);
    }

    #[test]
    fn chunks_end_where_the_next_starts() {
        let t = vec![
            TocEntry {
                kind: "reg".into(),
                name: "f".into(),
                size: 10,
                offset: 100,
                end_offset: 300,
                chunk_size: 4,
                ..Default::default()
            },
            TocEntry {
                kind: "chunk".into(),
                name: "f".into(),
                offset: 200,
                chunk_offset: 4,
                chunk_size: 6,
                ..Default::default()
            },
            TocEntry {
                kind: "reg".into(),
                name: "g".into(),
                size: 3,
                offset: 300,
                end_offset: 310,
                digest: "sha256:x".into(),
                ..Default::default()
            },
        ];
        let e = entries_from_toc(t, 1000, "t").unwrap();
        let Locator::Chunks(c) = &e[0].data else {
            panic!()
        };
        assert_eq!(
            (c[0].start, c[0].end, c[1].start, c[1].end),
            (100, 200, 200, 300)
        );
        let Locator::Chunks(g) = &e[1].data else {
            panic!()
        };
        assert_eq!(
            (g[0].len, g[0].end, g[0].digest.as_deref()),
            (3, 310, Some("sha256:x"))
        );
        let bad = vec![TocEntry {
            kind: "reg".into(),
            name: "f".into(),
            size: 10,
            offset: 100,
            end_offset: 5000,
            ..Default::default()
        }];
        assert!(entries_from_toc(bad, 1000, "t").is_err(), "past the blob");
        let hole = |chunk_type: &str, offset, end_offset| {
            vec![TocEntry {
                kind: "reg".into(),
                name: "h".into(),
                size: 10,
                offset,
                end_offset,
                chunk_size: 10,
                chunk_type: chunk_type.into(),
                ..Default::default()
            }]
        };
        // A hole needs no compressed bytes; data does; an unknown chunk type is named.
        let e = entries_from_toc(hole("zeros", 100, 100), 1000, "t").unwrap();
        assert!(matches!(&e[0].data, Locator::Chunks(c) if c[0].zeros));
        assert!(entries_from_toc(hole("", 100, 100), 1000, "t").is_err());
        let err = entries_from_toc(hole("sparkles", 100, 200), 1000, "t").unwrap_err();
        assert!(err.to_string().contains("sparkles"), "{err}");
    }

    /// Found by fuzzing (the eStargz TOC, which shares the check): chunks that add up to the
    /// file's size without tiling it were accepted.
    #[test]
    fn chunks_must_tile_their_file() {
        let toc = |second_offset: u64, second_len: u64| {
            vec![
                TocEntry {
                    kind: "reg".into(),
                    name: "f".into(),
                    size: 10,
                    offset: 100,
                    end_offset: 300,
                    chunk_size: 4,
                    ..Default::default()
                },
                TocEntry {
                    kind: "chunk".into(),
                    name: "f".into(),
                    offset: 200,
                    chunk_offset: second_offset,
                    chunk_size: second_len,
                    ..Default::default()
                },
            ]
        };
        assert!(entries_from_toc(toc(4, 6), 1000, "t").is_ok());
        assert!(entries_from_toc(toc(3, 6), 1000, "t").is_err(), "overlap");
        assert!(entries_from_toc(toc(5, 6), 1000, "t").is_err(), "gap");
        assert!(
            entries_from_toc(toc(4, u64::MAX - 3), 1000, "t").is_err(),
            "overflow"
        );
    }
}

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
//!
//! containers/storage gives every file an `endOffset` (where its last frame ends) and every
//! chunk a `chunkSize`. stargz-snapshotter's zstd:chunked compressor (its estargz writer with
//! zstd frames, older footer) writes neither: as in eStargz, a frame ends where the next one
//! starts (the last one at the TOC's skippable frame), and a file's last chunk runs to its end.
//! It also writes eStargz's landmark files, which are hidden here as they are there.

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
    // The TOC's skippable frame (its 8-byte header, then the TOC) ends the file frames.
    let toc_start = pos.offset.saturating_sub(8);
    // eStargz's landmark: the files before it are the ones to prefetch.
    let prefetch_len = toc
        .iter()
        .find(|e| clean_path(&e.name).is_ok_and(|p| p == ".prefetch.landmark"))
        .map_or(0, |e| e.offset.min(toc_start));
    let entries = entries_from_toc(toc, blob.size(), toc_start, &what)?;
    let reader = Reader::new(blob, Codec::Zstd, prefetch_len).vouched(checksum.is_some());
    Ok((reader, entries))
}

/// The entries of a TOC, for a blob of `size` bytes whose file frames end at `toc_start`.
fn entries_from_toc(
    toc: Vec<TocEntry>,
    size: u64,
    toc_start: u64,
    what: &str,
) -> Result<Vec<Entry>> {
    // Where frames start, for a file without `endOffset`: its last frame ends at the next.
    let mut starts: Vec<u64> = toc
        .iter()
        .filter(|e| e.offset > 0)
        .map(|e| e.offset)
        .collect();
    starts.push(toc_start);
    starts.sort_unstable();
    starts.dedup();
    let next_start = |o: u64| starts.get(starts.partition_point(|&s| s <= o)).copied();
    let mut out: Vec<Entry> = Vec::with_capacity(toc.len());
    // Chunks of the file being assembled, and where that file's frames end (0: not given).
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
            } else if file_end > 0 {
                file_end
            } else {
                next_start(chunks[i].start).unwrap_or(0)
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
            // A file's last chunk may leave its size out (stargz-snapshotter's writer does):
            // it runs to the file's end.
            let file_size = out.last().map_or(0, |e| e.size);
            let len = match t.chunk_size {
                0 => file_size.saturating_sub(t.chunk_offset),
                n => n,
            };
            chunks.push(Chunk {
                file_offset: t.chunk_offset,
                len,
                start: t.offset,
                end: 0,
                inner: 0,
                digest: digest(&t.chunk_digest),
                zeros: zeros(&t.chunk_type)?,
            });
            continue;
        }
        flush(&mut out, &mut chunks, file_end)?;
        if super::estargz::HIDDEN.contains(&path.as_str()) {
            continue;
        }
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
        let e = entries_from_toc(t, 1000, 1000, "t").unwrap();
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
        assert!(
            entries_from_toc(bad, 1000, 1000, "t").is_err(),
            "past the blob"
        );
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
        let e = entries_from_toc(hole("zeros", 100, 100), 1000, 1000, "t").unwrap();
        assert!(matches!(&e[0].data, Locator::Chunks(c) if c[0].zeros));
        assert!(entries_from_toc(hole("", 100, 100), 1000, 1000, "t").is_err());
        let err = entries_from_toc(hole("sparkles", 100, 200), 1000, 1000, "t").unwrap_err();
        assert!(err.to_string().contains("sparkles"), "{err}");
    }

    /// The TOC stargz-snapshotter's zstdchunked compressor wrote for a landmark, a directory,
    /// a 200,000-byte file in 64 KiB chunks and a 1-byte file (estargz.Build, Debian's 0.14):
    /// no `endOffset`, no `chunkSize` on a file's last chunk; the TOC's frame at 200,523.
    const GO_TOC: &str = r#"{"version":1,"entries":[
        {"name":".no.prefetch.landmark","type":"reg","size":1,"offset":96,"digest":"sha256:l","chunkDigest":"sha256:l"},
        {"name":"d/","type":"dir","mode":493,"userName":"root","groupName":"root"},
        {"name":"d/big","type":"reg","size":200000,"mode":420,"offset":313,"digest":"sha256:b","chunkSize":65536,"chunkDigest":"sha256:c0"},
        {"name":"d/big","type":"chunk","offset":65863,"chunkOffset":65536,"chunkSize":65536,"chunkDigest":"sha256:c1"},
        {"name":"d/big","type":"chunk","offset":131413,"chunkOffset":131072,"chunkSize":65536,"chunkDigest":"sha256:c2"},
        {"name":"d/big","type":"chunk","offset":196963,"chunkOffset":196608,"chunkDigest":"sha256:c3"},
        {"name":"small","type":"reg","size":1,"mode":420,"offset":200498,"digest":"sha256:s","chunkDigest":"sha256:s"}
    ]}"#;

    #[test]
    fn frames_run_to_the_next_one_and_last_chunks_to_the_file_end() {
        let toc = toc::parse(GO_TOC.as_bytes(), "t").unwrap();
        let e = entries_from_toc(toc, 201_252, 200_523, "t").unwrap();
        let names: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["d", "d/big", "small"], "the landmark is hidden");
        let Locator::Chunks(big) = &e[1].data else {
            panic!()
        };
        let got: Vec<_> = big
            .iter()
            .map(|c| {
                (
                    c.file_offset,
                    c.len,
                    c.start,
                    c.end,
                    c.digest.as_deref().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (0, 65536, 313, 65863, "sha256:c0"),
                (65536, 65536, 65863, 131413, "sha256:c1"),
                (131072, 65536, 131413, 196963, "sha256:c2"),
                (196608, 3392, 196963, 200498, "sha256:c3"),
            ]
        );
        let Locator::Chunks(small) = &e[2].data else {
            panic!()
        };
        assert_eq!(
            (small[0].len, small[0].start, small[0].end),
            (1, 200_498, 200_523)
        );

        // Only a file's last chunk may leave its size out; chunks must tile the file.
        let broken = |from: &str, to: &str| {
            let toc = toc::parse(GO_TOC.replace(from, to).as_bytes(), "t").unwrap();
            entries_from_toc(toc, 201_252, 200_523, "t").unwrap_err()
        };
        broken(
            r#""chunkOffset":65536,"chunkSize":65536,"#,
            r#""chunkOffset":65536,"#,
        );
        broken(r#""chunkOffset":131072"#, r#""chunkOffset":131000"#);
        // A frame past the TOC is refused.
        broken(r#""offset":200498"#, r#""offset":200600"#);
    }

    #[tokio::test]
    async fn a_blob_laid_out_as_stargz_snapshotter_writes_it_reads_back_verified() {
        use crate::blob::MemBlob;
        use std::sync::Arc;
        // Each file's chunks in frames of their own, each frame also holding what the tar
        // stream has after the chunk (padding, the next header), as estargz.Writer cuts it.
        let big: Vec<u8> = (0..150_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let mut blob = zstd::bulk::compress(&[0u8; 512], 3).unwrap();
        let landmark_at = blob.len() as u64;
        let mut entries = vec![
            serde_json::json!({"name": ".prefetch.landmark", "type": "reg",
            "size": 1, "offset": blob.len(), "chunkDigest": crate::digest::sha256(&[0x0f])}),
        ];
        blob.extend(zstd::bulk::compress(&[0x0fu8; 513], 3).unwrap());
        for (i, piece) in big.chunks(65536).enumerate() {
            let mut e = serde_json::json!({"name": "big", "type": if i == 0 { "reg" } else { "chunk" },
                "offset": blob.len(), "chunkOffset": i * 65536,
                "chunkDigest": crate::digest::sha256(piece)});
            if i == 0 {
                e["size"] = big.len().into();
            }
            if piece.len() == 65536 {
                e["chunkSize"] = 65536.into();
            }
            entries.push(e);
            let mut frame = piece.to_vec();
            frame.extend([7u8; 700]);
            blob.extend(zstd::bulk::compress(&frame, 3).unwrap());
        }
        let toc = serde_json::json!({"version": 1, "entries": entries}).to_string();
        let compressed = zstd::bulk::compress(toc.as_bytes(), 3).unwrap();
        let skippable = |payload: &[u8]| {
            let mut f = SKIPPABLE_MAGIC.to_le_bytes().to_vec();
            f.extend((payload.len() as u32).to_le_bytes());
            f.extend(payload);
            f
        };
        let toc_offset = blob.len() as u64 + 8;
        blob.extend(skippable(&compressed));
        let mut footer = Vec::new();
        for w in [toc_offset, compressed.len() as u64, toc.len() as u64, 1] {
            footer.extend(w.to_le_bytes());
        }
        footer.extend(b"GnUlInUx");
        blob.extend(skippable(&footer));

        let checksum = crate::digest::sha256(&compressed);
        let len = blob.len() as u64;
        let blob: Blob = Arc::new(MemBlob::new("zc", blob));
        let (tail_start, tail) = crate::blob::read_tail(&blob, 100).await.unwrap();
        let unnamed = open(blob.clone(), tail_start, tail.clone(), None).await;
        assert!(!unnamed.unwrap().0.toc_vouched, "no checksum annotation");
        let (reader, entries) = open(blob, tail_start, tail, Some(&checksum)).await.unwrap();
        assert!(reader.toc_vouched);
        assert_eq!(entries.len(), 1, "the landmark is hidden");
        assert_eq!(
            reader.prefetch_len, landmark_at,
            "what comes before the landmark is prefetched"
        );
        let Locator::Chunks(chunks) = &entries[0].data else {
            panic!()
        };
        assert!(chunks.iter().all(|c| c.end <= len));
        let got = reader.read(chunks, 0, big.len() as u64).await.unwrap();
        assert!(got == big, "every chunk decodes to its bytes");
    }
}

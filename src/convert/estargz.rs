//! The eStargz writer: rewrites an uncompressed tar as an eStargz blob that is still an
//! ordinary tar.gz (stargz-snapshotter's `docs/estargz.md`).
//!
//! The input tar's bytes are copied, not re-encoded: each entry's segment (its extension and
//! main headers, its data, its padding) goes to the output in the chosen order, with a gzip
//! member boundary before every chunk of file data, so a reader can inflate any chunk alone.
//! Prioritized files come first (with their parent directories and hard-link targets),
//! followed by `.prefetch.landmark`; without priorities `.no.prefetch.landmark` leads. Then
//! the TOC (`stargz.index.json`, in a member of its own, ending the tar) and the 51-byte
//! footer holding the TOC's offset.

use crate::digest::Hasher;
use crate::error::{Error, Result};
use crate::layer::{Entry, Kind, Locator};
use base64::Engine;
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};

/// Default chunk size: large files are split into independently inflatable pieces.
pub const DEFAULT_CHUNK: u64 = 4 << 20;
const LANDMARK: &str = ".prefetch.landmark";
const NO_LANDMARK: &str = ".no.prefetch.landmark";
/// Entries an eStargz source carries that must not be copied into a new TOC's tar.
const METADATA: [&str; 3] = ["stargz.index.json", LANDMARK, NO_LANDMARK];

/// How to write.
#[derive(Debug, Clone)]
pub struct Options {
    pub chunk_size: u64,
    /// Paths (clean, relative) to put first, in this order.
    pub prioritized: Vec<String>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// sha256 of the blob.
    pub digest: String,
    pub size: u64,
    /// sha256 of the uncompressed tar stream (the config's diff_id).
    pub diff_id: String,
    pub uncompressed_size: u64,
    /// sha256 of the TOC JSON (the `containerd.io/snapshot/stargz/toc.digest` annotation).
    pub toc_digest: String,
    /// Compressed bytes before `.prefetch.landmark`'s payload (the prioritized files), 0
    /// without prioritized files.
    pub prefetch_size: u64,
    /// Where the TOC's gzip member starts (the footer's offset).
    pub toc_offset: u64,
}

/// One input entry: where its bytes are in the input tar.
struct Segment {
    start: u64,
    data_start: u64,
    end: u64,
    entry: Entry,
}

/// Writes `input` (an uncompressed tar) as eStargz to `out`.
pub fn write<R: Read + Seek, W: Write>(mut input: R, out: W, opts: &Options) -> Result<Written> {
    let segments = segments(&mut input)?;
    let order = order(&segments, &opts.prioritized);
    let mut w = Members::new(out);
    let mut toc: Vec<Value> = Vec::new();
    let landmark_first = !order.iter().any(|o| matches!(o, Slot::Landmark));
    if landmark_first {
        write_landmark(&mut w, NO_LANDMARK, &mut toc)?;
    }
    let mut prefetch_size = 0;
    for slot in order {
        let seg = match slot {
            Slot::Landmark => {
                prefetch_size = write_landmark(&mut w, LANDMARK, &mut toc)?;
                continue;
            }
            Slot::Entry(i) => &segments[i],
        };
        w.write(&read_range(&mut input, seg.start, seg.data_start)?)?;
        let e = &seg.entry;
        if let Locator::Sparse { .. } = e.data {
            return Err(Error::Unsupported(format!(
                "GNU sparse file {:?}: converting sparse files is not supported yet",
                e.path
            )));
        }
        let mut t = toc_entry(e);
        if e.kind == Kind::File && e.size > 0 {
            let mut file_hash = Hasher::default();
            let mut off = 0;
            let chunked = e.size > opts.chunk_size;
            while off < e.size {
                let n = opts.chunk_size.min(e.size - off);
                let data = read_range(&mut input, seg.data_start + off, seg.data_start + off + n)?;
                file_hash.update(&data);
                w.close()?;
                let offset = w.offset();
                w.write(&data)?;
                w.close()?;
                let chunk_digest = crate::digest::sha256(&data);
                if off == 0 {
                    t["offset"] = offset.into();
                    t["chunkDigest"] = chunk_digest.into();
                    if chunked {
                        t["chunkSize"] = n.into();
                    }
                    toc.push(t.clone());
                } else {
                    toc.push(json!({"name": e.path, "type": "chunk", "offset": offset, "chunkOffset": off,
                                    "chunkSize": n, "chunkDigest": chunk_digest}));
                }
                off += n;
            }
            let first = toc
                .iter()
                .rposition(|x| x["name"] == e.path && x["type"] == "reg")
                .expect("just pushed");
            toc[first]["digest"] = file_hash.finish().into();
            w.write(&read_range(&mut input, seg.data_start + e.size, seg.end)?)?;
        } else {
            toc.push(t);
        }
    }
    w.close()?;
    let toc_json =
        serde_json::to_vec(&json!({"version": 1, "entries": toc})).expect("JSON of JSON values");
    let toc_digest = crate::digest::sha256(&toc_json);
    let toc_offset = w.offset();
    w.write(&tar_file_bytes("stargz.index.json", &toc_json))?;
    w.write(&[0u8; 1024])?; // end of the tar archive
    w.close()?;
    let mut footer = vec![
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    footer.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    footer.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    w.raw(&footer)?;
    let (digest, size, diff_id, uncompressed_size) = w.finish()?;
    Ok(Written {
        digest,
        size,
        diff_id,
        uncompressed_size,
        toc_digest,
        prefetch_size,
        toc_offset,
    })
}

enum Slot {
    Entry(usize),
    Landmark,
}

/// Walks the tar: each entry with the byte range it occupies, metadata entries of an eStargz
/// source dropped.
fn segments<R: Read + Seek>(input: &mut R) -> Result<Vec<Segment>> {
    let bad = |e: std::io::Error| Error::format("tar stream to convert", e.to_string());
    input.seek(SeekFrom::Start(0)).map_err(bad)?;
    let (input, limit) = crate::layer::tar::bounded(input);
    let mut ar = ::tar::Archive::new(input);
    let mut out = Vec::new();
    let mut prev_end = 0;
    for item in ar.entries_with_seek().map_err(bad)? {
        let mut e = item.map_err(bad)?;
        limit.after(&e);
        let data_start = e.raw_file_position();
        let end = data_start + e.size().div_ceil(512) * 512;
        let start = prev_end;
        prev_end = end;
        let Some(entry) = crate::layer::tar::entry_of(&mut e, "tar stream to convert")? else {
            continue;
        };
        if METADATA.contains(&entry.path.as_str()) {
            continue;
        }
        out.push(Segment {
            start,
            data_start,
            end,
            entry,
        });
    }
    Ok(out)
}

/// Output order: prioritized entries (after their parent directories and hard-link targets),
/// the landmark if any were found, then everything else in input order.
fn order(segments: &[Segment], prioritized: &[String]) -> Vec<Slot> {
    let by_path: HashMap<&str, usize> = segments
        .iter()
        .enumerate()
        .map(|(i, s)| (s.entry.path.as_str(), i))
        .collect();
    let mut placed = HashSet::new();
    let mut out = Vec::new();
    fn place(
        i: usize,
        segs: &[Segment],
        by_path: &HashMap<&str, usize>,
        placed: &mut HashSet<usize>,
        out: &mut Vec<Slot>,
        depth: u32,
    ) {
        if depth > 64 || placed.contains(&i) {
            return;
        }
        let e = &segs[i].entry;
        let mut parent = e.path.as_str();
        let mut parents = Vec::new();
        while let Some((p, _)) = parent.rsplit_once('/') {
            parents.push(p);
            parent = p;
        }
        for p in parents.into_iter().rev() {
            if let Some(&j) = by_path.get(p) {
                place(j, segs, by_path, placed, out, depth + 1);
            }
        }
        if e.kind == Kind::Hardlink
            && let Some(&j) = e
                .link
                .as_deref()
                .and_then(|l| by_path.get(l.trim_start_matches("./")))
        {
            place(j, segs, by_path, placed, out, depth + 1);
        }
        if placed.insert(i) {
            out.push(Slot::Entry(i));
        }
    }
    for p in prioritized {
        if let Some(&i) = by_path.get(p.as_str()) {
            place(i, segments, &by_path, &mut placed, &mut out, 0);
        }
    }
    if !out.is_empty() {
        out.push(Slot::Landmark);
    }
    out.extend(
        (0..segments.len())
            .filter(|i| !placed.contains(i))
            .map(Slot::Entry),
    );
    out
}

fn toc_entry(e: &Entry) -> Value {
    let kind = match e.kind {
        Kind::File => "reg",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::Hardlink => "hardlink",
        Kind::Char => "char",
        Kind::Block => "block",
        Kind::Fifo => "fifo",
    };
    let mut t = json!({"name": e.path, "type": kind, "modtime": rfc3339(e.mtime.0), "mode": e.mode, "uid": e.uid, "gid": e.gid});
    if e.kind == Kind::File {
        t["size"] = e.size.into();
    }
    if let Some(l) = &e.link {
        let l = if e.kind == Kind::Hardlink {
            crate::layer::clean_path(l).unwrap_or_else(|_| l.clone())
        } else {
            l.clone()
        };
        t["linkName"] = l.into();
    }
    if matches!(e.kind, Kind::Char | Kind::Block) {
        t["devMajor"] = e.rdev.0.into();
        t["devMinor"] = e.rdev.1.into();
    }
    if !e.xattrs.is_empty() {
        let b64 = base64::engine::general_purpose::STANDARD;
        t["xattrs"] = e
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(b64.encode(v))))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    debug_assert!(e.data == Locator::None || e.kind == Kind::File);
    t
}

/// Writes a landmark entry; the offset of its payload's gzip member.
fn write_landmark<W: Write>(w: &mut Members<W>, name: &str, toc: &mut Vec<Value>) -> Result<u64> {
    let bytes = tar_file_bytes(name, &[0x0f]);
    w.write(&bytes[..512])?;
    w.close()?;
    let offset = w.offset();
    w.write(&[0x0f])?;
    w.close()?;
    w.write(&bytes[513..])?;
    toc.push(json!({"name": name, "type": "reg", "size": 1, "offset": offset, "modtime": rfc3339(0), "mode": 0o644,
                    "digest": crate::digest::sha256(&[0x0f]), "chunkDigest": crate::digest::sha256(&[0x0f])}));
    Ok(offset)
}

/// A ustar entry for a regular file: header, data, padding.
fn tar_file_bytes(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = ::tar::Header::new_ustar();
    h.set_path(name).expect("short ASCII name");
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(::tar::EntryType::Regular);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(512 + data.len().div_ceil(512) * 512, 0);
    out
}

fn read_range<R: Read + Seek>(r: &mut R, start: u64, end: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; (end - start) as usize];
    r.seek(SeekFrom::Start(start))?;
    r.read_exact(&mut buf)
        .map_err(|e| Error::format("tar stream to convert", format!("at {start}: {e}")))?;
    Ok(buf)
}

/// `2006-01-02T15:04:05Z` for seconds since the epoch.
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Gzip members over one output: tracks the compressed offset, and hashes both the blob and
/// the uncompressed stream.
struct Members<W: Write> {
    sink: Option<Tally<W>>,
    member: Option<GzEncoder<Tally<W>>>,
    diff: Hasher,
    uncompressed: u64,
}

struct Tally<W: Write> {
    inner: W,
    written: u64,
    hash: Hasher,
}

impl<W: Write> Write for Tally<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Members<W> {
    fn new(out: W) -> Self {
        Members {
            sink: Some(Tally {
                inner: out,
                written: 0,
                hash: Hasher::default(),
            }),
            member: None,
            diff: Hasher::default(),
            uncompressed: 0,
        }
    }

    /// Appends uncompressed bytes to the open member (opening one if needed).
    fn write(&mut self, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.member.is_none() {
            let sink = self
                .sink
                .take()
                .expect("sink present while no member is open");
            self.member = Some(GzEncoder::new(sink, Compression::default()));
        }
        self.member.as_mut().unwrap().write_all(data)?;
        self.diff.update(data);
        self.uncompressed += data.len() as u64;
        Ok(())
    }

    /// Ends the open member, if any.
    fn close(&mut self) -> Result<()> {
        if let Some(m) = self.member.take() {
            self.sink = Some(m.finish()?);
        }
        Ok(())
    }

    /// Compressed bytes written so far (with no member open).
    fn offset(&self) -> u64 {
        self.sink.as_ref().expect("no member open").written
    }

    /// Writes already-compressed bytes (the footer, a complete empty gzip member).
    fn raw(&mut self, data: &[u8]) -> Result<()> {
        self.close()?;
        self.sink.as_mut().unwrap().write_all(data)?;
        Ok(())
    }

    fn finish(mut self) -> Result<(String, u64, String, u64)> {
        self.close()?;
        let mut sink = self.sink.take().unwrap();
        sink.flush()?;
        Ok((
            sink.hash.finish(),
            sink.written,
            self.diff.finish(),
            self.uncompressed,
        ))
    }
}

#[cfg(test)]
mod tests;

//! The TOC that eStargz and zstd:chunked layers carry, as both spell it: containers/storage
//! took eStargz's `TOCEntry` for zstd:chunked and added a few fields (`endOffset`,
//! `chunkType`). [`parse`] reads the JSON; [`TocEntry::entry`] turns an entry's file metadata
//! into an [`Entry`]; where the bytes are (chunks) each format reads in its own module.

use super::chunked::Chunk;
use super::{Entry, Kind};
use crate::error::{Error, Result};
use std::collections::HashMap;

#[derive(serde::Deserialize)]
struct Toc {
    version: i64,
    entries: Vec<TocEntry>,
}

/// One TOC entry: a file, directory, link, device or fifo, or a further chunk of the file
/// before it (`type` `chunk`). Each format reads the fields it writes.
#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    pub modtime: String,
    pub link_name: String,
    pub mode: i64,
    pub uid: u32,
    pub gid: u32,
    pub offset: u64,
    /// eStargz: where the chunk starts inside its decoded gzip member.
    pub inner_offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: HashMap<String, String>,
    /// zstd:chunked: a file's digest (its chunk's, when it is one chunk).
    pub digest: String,
    /// zstd:chunked: where a file's frames end.
    pub end_offset: u64,
    pub chunk_offset: u64,
    pub chunk_size: u64,
    pub chunk_digest: String,
    /// zstd:chunked: `"zeros"` for a hole (a run of zeros), empty for data.
    pub chunk_type: String,
}

/// The entries of a TOC's JSON (version 1); `what` names the layer in errors.
pub(super) fn parse(json: &[u8], what: &str) -> Result<Vec<TocEntry>> {
    let toc: Toc =
        serde_json::from_slice(json).map_err(|e| Error::format(what, format!("TOC JSON: {e}")))?;
    if toc.version != 1 {
        return Err(Error::format(
            what,
            format!("TOC version {} (want 1)", toc.version),
        ));
    }
    Ok(toc.entries)
}

impl TocEntry {
    /// The [`Entry`] (without size or data) for `path`; `what` names the layer in errors.
    pub fn entry(&self, path: String, what: &str) -> Result<Entry> {
        use base64::Engine;
        let kind = match self.kind.as_str() {
            "dir" => Kind::Dir,
            "reg" => Kind::File,
            "symlink" => Kind::Symlink,
            "hardlink" => Kind::Hardlink,
            "char" => Kind::Char,
            "block" => Kind::Block,
            "fifo" => Kind::Fifo,
            other => {
                return Err(Error::format(
                    what,
                    format!("entry {path:?} has unknown type {other:?}"),
                ));
            }
        };
        let mut e = Entry::new(path, kind);
        e.mode = (self.mode & 0o7777) as u32;
        e.uid = self.uid;
        e.gid = self.gid;
        e.mtime = (parse_rfc3339(&self.modtime).unwrap_or(0), 0);
        e.rdev = (self.dev_major, self.dev_minor);
        if matches!(kind, Kind::Symlink | Kind::Hardlink) {
            e.link = Some(self.link_name.clone());
        }
        for (k, v) in &self.xattrs {
            let val = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|err| Error::format(what, format!("xattr {k} of {:?}: {err}", e.path)))?;
            e.xattrs.push((k.clone(), val));
        }
        e.xattrs.sort();
        Ok(e)
    }
}

/// Whether the chunks a TOC gives a file tile it: in order, each starting where the one
/// before ends, from 0 to its `size`. A read finds the chunk holding an offset and serves its
/// bytes there, so a gap, an overlap or lengths that overflow would serve wrong bytes (or
/// too few).
pub(super) fn tiles(chunks: &[Chunk], size: u64) -> bool {
    let mut at = 0u64;
    for c in chunks {
        if c.file_offset != at {
            return false;
        }
        match at.checked_add(c.len) {
            Some(next) => at = next,
            None => return false,
        }
    }
    at == size
}

/// Parses the RFC 3339 timestamps Go writes (`2006-01-02T15:04:05Z`, optional fraction and
/// offset) into seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || (b[10] != b'T' && b[10] != b't') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        rest = r.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let offset = match rest {
        "Z" | "z" => 0,
        r if r.len() == 6 => {
            let sign = if r.starts_with('-') { -1 } else { 1 };
            sign * (r[1..3].parse::<i64>().ok()? * 3600 + r[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + se - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20.5+01:00"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_rfc3339("garbage"), None);
    }
}

//! What a mounted image does besides answering reads: background prefetch (eStargz
//! prioritized files, or a recorded access profile), writing the profile `--record` asked
//! for, and the statistics `ocifs stats` shows.
//!
//! Prefetch runs as one background task reading in order; foreground reads run concurrently
//! on the same runtime, and whatever prefetch has already fetched they find in the caches.

use super::Image;
use crate::error::{Error, Result};
use crate::layer::{Health, LayerData};
use crate::stats::Access;
use bytes::Bytes;
use serde_json::json;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::atomic::Ordering;

/// Profile ranges fetched at once during prefetch.
const PREFETCH_IN_FLIGHT: usize = 8;

impl Image {
    /// Bytes of eStargz prioritized files (before a `.prefetch.landmark`) in all layers.
    pub fn landmark_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|(l, _)| match &l.data {
                LayerData::Chunked(r) => r.prefetch_len,
                _ => 0,
            })
            .sum()
    }

    /// Prefetches every eStargz layer's prioritized files (before `.prefetch.landmark`).
    pub async fn prefetch_landmarks(&self) {
        let readers: Vec<_> = self
            .layers
            .iter()
            .filter_map(|(l, _)| match &l.data {
                LayerData::Chunked(r) if r.prefetch_len > 0 => Some((l.digest.clone(), r)),
                _ => None,
            })
            .collect();
        let total: u64 = readers.iter().map(|(_, r)| r.prefetch_len).sum();
        self.prefetch_total.fetch_add(total, Ordering::Relaxed);
        for (digest, r) in readers {
            if let Err(e) = r.prefetch(&self.prefetch_done).await {
                tracing::warn!("prefetch of {digest} stopped: {e}");
            }
        }
        if total > 0 {
            tracing::info!("prefetched {total} bytes of prioritized files");
        }
    }

    /// Prefetches the ranges of a recorded profile, in order, through the normal read path
    /// (so it works for every format). Entries naming files the image lacks are skipped.
    pub async fn prefetch_profile(&self, accesses: &[Access]) {
        let planned: Vec<(u64, u64, u64, String)> = accesses
            .iter()
            .filter_map(|a| Some((self.tree.resolve(&a.path)?, a.offset, a.len, a.path.clone())))
            .collect();
        let total: u64 = planned.iter().map(|p| p.2).sum();
        self.prefetch_total.fetch_add(total, Ordering::Relaxed);
        // Several ranges in flight, started in profile order, so the prefetch overlaps round
        // trips and runs ahead of a workload that reads the same ranges one after another.
        use futures::StreamExt;
        let mut pending = planned.into_iter();
        let mut in_flight = futures::stream::FuturesOrdered::new();
        loop {
            while in_flight.len() < PREFETCH_IN_FLIGHT
                && let Some((ino, offset, len, path)) = pending.next()
            {
                in_flight.push_back(async move {
                    let read = self.file_bytes(ino, offset, len).await;
                    (path, read.map(|b| b.len() as u64))
                });
            }
            let Some((path, result)) = in_flight.next().await else {
                break;
            };
            match result {
                Ok(n) => {
                    self.prefetch_done.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!("profile prefetch of {path} failed: {e}"),
            }
        }
        tracing::info!("profile prefetch done ({total} bytes planned)");
    }

    /// Bytes of file `ino` for background work (prefetch, the ELF reader): not counted as
    /// foreground reads, not recorded, no speculation.
    pub(super) async fn file_bytes(&self, ino: u64, offset: u64, len: u64) -> Result<Bytes> {
        self.background_read(ino, offset, len, false).await
    }

    /// [`Image::file_bytes`] without waiting behind fetches under way (see
    /// [`crate::blob::BlobSource::read_now`]).
    pub(super) async fn file_bytes_now(&self, ino: u64, offset: u64, len: u64) -> Result<Bytes> {
        self.background_read(ino, offset, len, true).await
    }

    async fn background_read(&self, ino: u64, offset: u64, len: u64, now: bool) -> Result<Bytes> {
        let node = self
            .tree
            .get(ino)
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))?;
        let Some((li, loc)) = &node.data else {
            return Ok(Bytes::new());
        };
        let layer = &self.layers[*li].0;
        match now {
            true => layer.read_now(loc, node.size, offset, len).await,
            false => layer.read(loc, node.size, offset, len).await,
        }
    }

    /// The recorded accesses with layer digests and paths.
    pub fn profile(&self) -> Vec<Access> {
        let Some(rec) = &self.recorder else {
            return Vec::new();
        };
        rec.take()
            .into_iter()
            .filter_map(|(ino, offset, len)| {
                let node = self.tree.get(ino)?;
                let layer = node
                    .data
                    .as_ref()
                    .map(|(li, _)| self.layers[*li].0.digest.clone())
                    .unwrap_or_default();
                Some(Access {
                    layer,
                    path: self.tree.path(ino)?,
                    offset,
                    len,
                })
            })
            .collect()
    }

    /// A JSON snapshot for `ocifs stats`.
    pub fn stats_json(&self) -> serde_json::Value {
        let layers: Vec<_> = self
            .layers
            .iter()
            .zip(&self.counters)
            .map(|((l, _), c)| {
                let health = match &*l.health.read().unwrap() {
                    Health::Pending => "pending".to_string(),
                    Health::Verified => "verified".to_string(),
                    Health::Unverified => "unverified (--verify off)".to_string(),
                    Health::Bad(r) => format!("bad: {r}"),
                };
                json!({"digest": l.digest, "format": l.format.name(), "index": l.index_source,
                       "fetchedBytes": c.bytes.load(Ordering::Relaxed), "requests": c.requests.load(Ordering::Relaxed),
                       "verification": health})
            })
            .collect();
        let s = &self.cache.stats;
        json!({
            "digest": self.resolved.manifest_digest,
            "readyMs": self.open_time.as_millis() as u64,
            "layers": layers,
            "cache": {"memHits": s.mem_hits.load(Ordering::Relaxed), "diskHits": s.disk_hits.load(Ordering::Relaxed),
                      "misses": s.misses.load(Ordering::Relaxed), "fetchedBytes": s.fetched_bytes.load(Ordering::Relaxed)},
            "reads": {"count": self.reads.reads.load(Ordering::Relaxed), "bytes": self.reads.bytes.load(Ordering::Relaxed),
                      "errors": self.reads.errors.load(Ordering::Relaxed), "opens": self.reads.opens.load(Ordering::Relaxed),
                      "p50Us": self.reads.percentile(0.5).as_micros() as u64, "p99Us": self.reads.percentile(0.99).as_micros() as u64},
            "prefetch": {"totalBytes": self.prefetch_total.load(Ordering::Relaxed), "doneBytes": self.prefetch_done.load(Ordering::Relaxed),
                         "wholeFileBytes": self.whole_fetched.load(Ordering::Relaxed),
                         "directoryBytes": self.directory_fetched.load(Ordering::Relaxed)},
        })
    }
}

/// Writes a profile as JSON lines. It is written beside `path` and renamed into place, so
/// a reader never sees a half-written profile (nor an empty one while it is being written).
pub fn write_profile(path: &Path, accesses: &[Access]) -> Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".partial");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    for a in accesses {
        serde_json::to_writer(&mut f, a).map_err(|e| Error::Io(e.into()))?;
        f.write_all(b"\n")?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads a profile written by [`write_profile`].
pub fn read_profile(path: &Path) -> Result<Vec<Access>> {
    let f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut out = Vec::new();
    for (i, line) in f.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| {
            Error::format(
                format!("profile {} line {}", path.display(), i + 1),
                e.to_string(),
            )
        })?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_reads_back_as_written_and_leaves_no_partial_file() {
        let dir = std::env::temp_dir().join(format!("ocifs-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("startup.profile");
        let accesses = vec![
            Access {
                layer: "sha256:aa".into(),
                path: "usr/bin/x".into(),
                offset: 0,
                len: 4096,
            },
            Access {
                layer: "sha256:bb".into(),
                path: "etc/y".into(),
                offset: 10,
                len: 1,
            },
        ];
        write_profile(&path, &accesses).unwrap();
        let back = read_profile(&path).unwrap();
        assert_eq!(
            back.iter()
                .map(|a| (&a.path[..], a.offset, a.len))
                .collect::<Vec<_>>(),
            vec![("usr/bin/x", 0, 4096), ("etc/y", 10, 1)]
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("startup.profile")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

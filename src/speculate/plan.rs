//! Planned prefetch: a recorded access profile (and its file format), eStargz prioritized
//! files (landmarks), and the image's small layers fetched whole at mount.
//!
//! A plan runs as one background task fetching in order; foreground reads run concurrently
//! on the same runtime, and whatever the plan has already fetched they find in the caches.

use super::{Counts, Speculator};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::layer::chunked::Chunk;
use crate::layer::{LayerData, Locator};
use crate::stats::Access;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of eStargz prioritized files (before a `.prefetch.landmark`) in all layers.
pub fn landmark_bytes(image: &Image) -> u64 {
    image
        .layers
        .iter()
        .map(|l| match &l.layer.data {
            LayerData::Chunked(r) => r.prefetch_len,
            _ => 0,
        })
        .sum()
}

/// Decoded bytes an image's layers decode ahead and keep, together: prioritized files
/// and files fetched whole (see [`crate::layer::chunked::Reader::decode_ahead`]).
pub const DECODE_AHEAD_MAX: u64 = 64 << 20;

/// Prefetches every eStargz layer's prioritized files (before `.prefetch.landmark`), all
/// layers at once, each front first in one streamed request (or waiting for the front a
/// layer's open already streams in). One layer after another left the link to one
/// connection, a second's stream started only when the first was done (with a window that
/// had shrunk meanwhile), and a start reads the layers interleaved.
pub async fn prefetch_landmarks(image: &Image, counts: &Counts) {
    let readers: Vec<_> = image
        .layers
        .iter()
        .filter_map(|l| match &l.layer.data {
            LayerData::Chunked(r) if r.prefetch_len > 0 => Some((l.layer.digest.clone(), r)),
            _ => None,
        })
        .collect();
    let total: u64 = readers.iter().map(|(_, r)| r.prefetch_len).sum();
    counts.planned.fetch_add(total, Ordering::Relaxed);
    let fetches = readers.into_iter().map(|(digest, r)| async move {
        if let Err(e) = r.prefetch(&counts.planned_done).await {
            tracing::warn!("prefetch of {digest} stopped: {e}");
        }
    });
    futures::future::join_all(fetches).await;
    if total > 0 {
        tracing::info!("prefetched {total} bytes of prioritized files");
    }
}

/// Decodes every eStargz layer's prioritized files as [`prefetch_landmarks`] brings them,
/// all layers at once, front first (see [`chunked::Reader::decode_ahead`]): as many
/// decoded bytes as `decode_budget` has, layer by layer. Polled after the fetch has
/// claimed its blocks (its reads then wait for the streams), and awaited apart from it,
/// so that guesses wait only for the fetch.
///
/// [`chunked::Reader::decode_ahead`]: crate::layer::chunked::Reader::decode_ahead
pub async fn decode_landmarks(image: &Image, decode_budget: &AtomicU64) {
    let decodes: Vec<_> = image
        .layers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| match &l.layer.data {
            LayerData::Chunked(r) if r.prefetch_len > 0 => Some((
                r,
                prioritized_chunks(image, i, r.prefetch_len, decode_budget),
            )),
            _ => None,
        })
        .collect();
    let decodes = decodes
        .iter()
        .map(|(r, ahead)| async move { r.decode_ahead(ahead).await });
    futures::future::join_all(decodes).await;
}

/// The chunks of the files layer `layer` serves whose compressed bytes lie within its
/// first `front` bytes, front first, as many as `budget` (decoded bytes, reduced by what is
/// taken) allows.
fn prioritized_chunks(image: &Image, layer: usize, front: u64, budget: &AtomicU64) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = image
        .tree
        .files_in(layer)
        .filter_map(|(_, node)| match &node.data {
            Some((_, Locator::Chunks(c))) => Some(c.iter().filter(|c| c.end <= front)),
            _ => None,
        })
        .flatten()
        .cloned()
        .collect();
    chunks.sort_by_key(|c| (c.start, c.inner));
    chunks.dedup_by_key(|c| (c.start, c.inner));
    let mut taken = Vec::new();
    for c in chunks {
        if !super::take(budget, c.len) {
            break;
        }
        taken.push(c);
    }
    taken
}

/// Fetches the image's small layers whole, right after the mount is ready: each layer of
/// at most `max` compressed bytes, smallest first, while their total stays within `max`,
/// all at once, one streamed request each, into the block cache (undecoded); the bytes
/// planned go to the statistics.
///
/// A start reads a small layer it touches at all nearly whole (the Python start fetched
/// 7.7 of the standard library layer's 8 MB, one dependent miss after another, as each
/// import found the next module); the same bytes in one stream cost one round trip. Large
/// layers are left to reads and guesses, and `max` bounds what this fetches in all, so an
/// image of many layers does not flood the link the reads share.
pub async fn fetch_small_layers(image: &Image, max: u64, counts: &Counts) {
    let sizes: Vec<u64> = image.layers.iter().map(|l| l.blob.size()).collect();
    let small: Vec<_> = crate::image::small_layers(&sizes, max)
        .into_iter()
        .map(|i| &image.layers[i].blob)
        .collect();
    let planned = small.iter().map(|b| b.size()).sum();
    counts.small_layers.store(planned, Ordering::Relaxed);
    let fetches = small.iter().map(|b| async move {
        if let Err(e) = b.prefetch(0, b.size()).await {
            tracing::debug!("fetching small layer {} whole: {e}", b.id());
        }
    });
    futures::future::join_all(fetches).await;
}

/// Prefetches what a recorded profile read, for every format, without decoding it. Each
/// access is turned into the blob range it is fetched from (see [`Layer::fetch_range`]:
/// for a gzip layer with an index, the compressed bytes from its span's start); ranges of
/// one blob that overlap or nearly touch are merged, so the bytes several accesses share
/// (a span's front) come once; the merged ranges are fetched into the block cache, a few
/// at a time, in the order the workload first needed them. Decoding waits for the reads.
/// Entries naming files the image lacks are skipped; a sparse file's are read instead.
///
/// [`Layer::fetch_range`]: crate::layer::Layer::fetch_range
pub async fn prefetch_profile(image: &Image, spec: &Speculator, accesses: &[Access]) {
    let (counts, cfg) = (&spec.counts, &spec.cfg);
    let mut wanted = Vec::new();
    let mut reads = Vec::new();
    for (order, a) in accesses.iter().enumerate() {
        let Some((ino, node)) = image
            .tree
            .resolve(&a.path)
            .and_then(|i| Some((i, image.tree.get(i)?)))
        else {
            continue;
        };
        let Some((li, loc)) = &node.data else {
            continue;
        };
        let len = a.len.min(node.size.saturating_sub(a.offset));
        if len == 0 {
            continue;
        }
        match image.layers[*li].layer.fetch_range(loc, a.offset, len) {
            Some((blob, start, end)) => wanted.push(Wanted {
                blob,
                start,
                end,
                order,
                bytes: len,
            }),
            None => reads.push((ino, a.offset, len, a.path.clone())),
        }
    }
    let plan = merge(wanted, cfg.profile_merge_gap);
    let total: u64 =
        plan.iter().map(|w| w.bytes).sum::<u64>() + reads.iter().map(|r| r.2).sum::<u64>();
    counts.planned.fetch_add(total, Ordering::Relaxed);
    tracing::info!(
        "profile prefetch: {} accesses in {} ranges, {} bytes to fetch",
        accesses.len(),
        plan.len(),
        plan.iter()
            .map(|w| w.end.saturating_sub(w.start))
            .sum::<u64>()
    );
    // A few ranges at a time, in plan order; the block cache streams each in one request
    // per stretch of it that it does not hold yet.
    use futures::StreamExt;
    let mut pending = plan.into_iter();
    let mut in_flight = futures::stream::FuturesOrdered::new();
    loop {
        while in_flight.len() < cfg.profile_in_flight
            && let Some(w) = pending.next()
        {
            in_flight.push_back(async move {
                let r = w
                    .blob
                    .prefetch(w.start, w.end.saturating_sub(w.start))
                    .await;
                (w, r)
            });
        }
        let Some((w, r)) = in_flight.next().await else {
            break;
        };
        match r {
            Ok(()) => {
                counts.planned_done.fetch_add(w.bytes, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(
                "profile prefetch of {}..{} of {} failed: {e}",
                w.start,
                w.end,
                w.blob.id()
            ),
        }
    }
    for (ino, offset, len, path) in reads {
        match image.read_file(ino, offset, len).await {
            Ok(b) => {
                counts
                    .planned_done
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!("profile prefetch of {path} failed: {e}"),
        }
    }
    tracing::info!("profile prefetch done ({total} bytes planned)");
}

/// A blob range a planned prefetch fetches: where it is, when the workload first needed
/// it (its place in the profile), and how many file bytes of the profile it holds.
struct Wanted {
    blob: crate::blob::Blob,
    start: u64,
    end: u64,
    order: usize,
    bytes: u64,
}

/// Merges the ranges of each blob that overlap or lie within `gap` of each other (a block of
/// the cache); returns the merged ranges in the order their first access came in the profile.
fn merge(mut wanted: Vec<Wanted>, gap: u64) -> Vec<Wanted> {
    wanted.sort_by(|a, b| (a.blob.id(), a.start).cmp(&(b.blob.id(), b.start)));
    let mut out: Vec<Wanted> = Vec::new();
    for w in wanted {
        match out.last_mut() {
            Some(last)
                if last.blob.id() == w.blob.id() && w.start <= last.end.saturating_add(gap) =>
            {
                last.end = last.end.max(w.end);
                last.order = last.order.min(w.order);
                last.bytes += w.bytes;
            }
            _ => out.push(w),
        }
    }
    out.sort_by_key(|w| w.order);
    out
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
    fn profile_ranges_merge_per_blob_and_keep_first_access_order() {
        let a: crate::blob::Blob =
            std::sync::Arc::new(crate::blob::MemBlob::new("a", vec![0u8; 1 << 24]));
        let b: crate::blob::Blob =
            std::sync::Arc::new(crate::blob::MemBlob::new("b", vec![0u8; 1 << 24]));
        let w = |blob: &crate::blob::Blob, start: u64, end: u64, order: usize| Wanted {
            blob: blob.clone(),
            start,
            end,
            order,
            bytes: 10,
        };
        let plan = merge(
            vec![
                w(&a, 5_000_000, 5_100_000, 0),
                w(&b, 0, 1000, 1),
                // The same span front as the first, needed later: merged into it.
                w(&a, 4_000_000, 5_050_000, 2),
                // Within a block of the first: merged.
                w(&a, 5_150_000, 5_200_000, 3),
                // Far away: its own range.
                w(&a, 9_000_000, 9_100_000, 4),
                w(&b, 1000, 2000, 5),
            ],
            64 << 10,
        );
        let got: Vec<_> = plan
            .iter()
            .map(|p| (p.blob.id().to_string(), p.start, p.end, p.order, p.bytes))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), 4_000_000, 5_200_000, 0, 30),
                ("b".into(), 0, 2000, 1, 20),
                ("a".into(), 9_000_000, 9_100_000, 4, 10),
            ]
        );
    }

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

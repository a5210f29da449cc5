//! Files read at scattered places are fetched whole.
//!
//! A program's binary and shared libraries are read by page faults scattered through the file;
//! each fault is a read the process waits for, one round trip after another. When a file
//! (large enough to matter, small enough to be worth it) is read a second time at a place that
//! does not continue the previous read, the whole file is fetched in the background in large
//! requests; the faults that follow find their bytes arriving or already cached. Sequential
//! readers never trigger it (the block cache's read-ahead serves them).
//!
//! A file fetched whole comes head and tail first, in requests of their own, then its middle:
//! a program is read at both ends first (its headers; then the loader reads the dynamic
//! section and relocates the data segment, in the last few dozen KiB).

use super::SpeculateConfig;
use crate::image::Image;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

/// Marks a file already queued.
const QUEUED: u64 = u64::MAX;

/// Where each file's last read ended, or that it is queued: the policy's state.
pub struct ReadPositions {
    min: u64,
    max: u64,
    ends: Mutex<HashMap<u64, u64>>,
}

impl ReadPositions {
    /// Positions for files of `min..=max` bytes (others are never fetched whole).
    pub fn new(min: u64, max: u64) -> Self {
        ReadPositions {
            min,
            max,
            ends: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a file of `size` bytes is worth fetching whole.
    pub fn in_range(&self, size: u64) -> bool {
        (self.min..=self.max).contains(&size)
    }

    /// Notes a read of `len` bytes at `offset` of file `ino` (`size` bytes); true when the
    /// file is now to be fetched whole (its first re-read that does not continue the last).
    pub fn note(&self, ino: u64, size: u64, offset: u64, len: u64) -> bool {
        if !self.in_range(size) {
            return false;
        }
        let mut ends = self.ends.lock().unwrap();
        match ends.get(&ino).copied() {
            Some(QUEUED) => false,
            Some(end) if end != offset => {
                ends.insert(ino, QUEUED);
                true
            }
            _ => {
                ends.insert(ino, offset + len);
                false
            }
        }
    }

    /// Marks `ino` as queued; true unless it already was.
    pub fn claim(&self, ino: u64) -> bool {
        self.ends.lock().unwrap().insert(ino, QUEUED) != Some(QUEUED)
    }
}

/// Fetches file `ino` whole into the cache (ends first, then the rest), decoding it as it
/// arrives while `decode_budget` (decoded bytes kept) allows; returns its size once
/// fetched, 0 if it was not (too large, no data, a failed request).
pub async fn fetch_whole(
    image: &Image,
    cfg: &SpeculateConfig,
    ino: u64,
    decode_budget: &AtomicU64,
) -> u64 {
    let Some(node) = image.tree.get(ino) else {
        return 0;
    };
    let Some((li, loc)) = &node.data else {
        return 0;
    };
    if node.size > cfg.whole_max {
        return 0;
    }
    tracing::debug!("fetching inode {ino} whole ({} bytes)", node.size);
    let layer = &image.layers[*li].layer;
    let (head, tail) = (cfg.whole_head, cfg.whole_tail);
    let ends = match node.size > head + tail {
        true => vec![(0, head), (node.size - tail, tail)],
        false => Vec::new(),
    };
    // Polled in order the first time: the ends claim their blocks before the whole-file
    // fetch claims the rest.
    let ends =
        futures::future::try_join_all(ends.into_iter().map(|(o, l)| layer.warm_range(loc, o, l)));
    // A chunked layer's file is decoded as it arrives too, while the budget lasts: its
    // reads follow soon.
    let chunked = matches!(layer.data, crate::layer::LayerData::Chunked(_));
    let whole = async {
        match chunked && super::take(decode_budget, node.size) {
            true => layer.warm_decoded(loc, node.size).await,
            false => layer.warm_range(loc, 0, node.size).await,
        }
    };
    let (ends, all) = tokio::join!(ends, whole);
    match ends.map(drop).and(all) {
        Ok(()) => node.size,
        Err(e) => {
            tracing::debug!("whole-file fetch of inode {ino}: {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_non_sequential_reread_of_a_mid_sized_file_queues_it() {
        let w = ReadPositions::new(256 << 10, 64 << 20);
        assert!(!w.note(1, 1 << 20, 0, 4096));
        assert!(!w.note(1, 1 << 20, 4096, 4096)); // sequential
        assert!(w.note(1, 1 << 20, 500_000, 4096)); // a jump: queued once
        assert!(!w.note(1, 1 << 20, 0, 4096));
        assert!(!w.note(2, 1000, 0, 10));
        assert!(!w.note(2, 1000, 500, 10)); // too small to matter
        assert!(!w.note(3, 1 << 40, 0, 10));
        assert!(!w.note(3, 1 << 40, 1 << 30, 10)); // too large
        assert!(!w.claim(1), "already queued");
        assert!(w.claim(4));
    }
}

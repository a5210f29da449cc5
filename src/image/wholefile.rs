//! Whole-file fetch for files read at random places.
//!
//! A program's binary and shared libraries are read by page faults scattered through the file;
//! each fault is a read the process waits for, one round trip after another. When a file
//! (large enough to matter, small enough to be worth it) is read a second time at a place that
//! does not continue the previous read, the whole file is queued for a background fetch in
//! large requests; the faults that follow find their bytes arriving or already cached.
//! Sequential readers never trigger it (the block cache's read-ahead serves them).

use super::Image;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Files smaller than this are usually read whole in one request anyway.
const MIN_SIZE: u64 = 256 << 10;
/// Files larger than this are left to on-demand reads and read-ahead.
const MAX_SIZE: u64 = 64 << 20;
/// Files fetched at once.
const IN_FLIGHT: usize = 4;
/// Marks a file already queued.
const QUEUED: u64 = u64::MAX;

/// Per-file read positions and the queue of files to fetch whole.
pub struct WholeFiles {
    /// inode -> end of its last read, or [`QUEUED`].
    ends: Mutex<HashMap<u64, u64>>,
    tx: mpsc::UnboundedSender<u64>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<u64>>>,
}

impl Default for WholeFiles {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        WholeFiles {
            ends: Mutex::new(HashMap::new()),
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl WholeFiles {
    /// Notes a read of `len` bytes at `offset` of file `ino` (`size` bytes); queues the file
    /// on its first non-sequential re-read.
    pub fn note(&self, ino: u64, size: u64, offset: u64, len: u64) {
        if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
            return;
        }
        let mut ends = self.ends.lock().unwrap();
        match ends.get(&ino).copied() {
            Some(QUEUED) => {}
            Some(end) if end != offset => {
                ends.insert(ino, QUEUED);
                let _ = self.tx.send(ino);
            }
            _ => {
                ends.insert(ino, offset + len);
            }
        }
    }
}

impl Image {
    /// Fetches queued files whole, a few at a time, until the image is dropped. Started by
    /// mounts; commands that read a file once (`cat`) do not need it.
    pub async fn fetch_whole_files(self: Arc<Self>) {
        let Some(mut rx) = self.whole_files.rx.lock().unwrap().take() else {
            return;
        };
        let gate = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        while let Some(ino) = rx.recv().await {
            let Ok(permit) = gate.clone().acquire_owned().await else {
                return;
            };
            let image = self.clone();
            tokio::spawn(async move {
                if let Some(node) = image.tree.get(ino)
                    && let Some((li, loc)) = &node.data
                {
                    match image.layers[*li].0.warm(loc, node.size).await {
                        Ok(()) => {
                            image.whole_fetched.fetch_add(node.size, Ordering::Relaxed);
                        }
                        Err(e) => tracing::debug!("whole-file fetch of inode {ino}: {e}"),
                    }
                }
                drop(permit);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_non_sequential_reread_of_a_mid_sized_file_queues_it() {
        let w = WholeFiles::default();
        let mut rx = w.rx.lock().unwrap().take().unwrap();
        w.note(1, 1 << 20, 0, 4096);
        w.note(1, 1 << 20, 4096, 4096); // sequential
        assert!(rx.try_recv().is_err());
        w.note(1, 1 << 20, 500_000, 4096); // a jump: queued once
        w.note(1, 1 << 20, 0, 4096);
        assert_eq!(rx.try_recv().ok(), Some(1));
        assert!(rx.try_recv().is_err());
        w.note(2, 1000, 0, 10);
        w.note(2, 1000, 500, 10); // too small to matter
        w.note(3, 1 << 40, 0, 10);
        w.note(3, 1 << 40, 1 << 30, 10); // too large
        assert!(rx.try_recv().is_err());
    }
}

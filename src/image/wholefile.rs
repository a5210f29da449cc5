//! Whole-file fetch for files read at random places.
//!
//! A program's binary and shared libraries are read by page faults scattered through the file;
//! each fault is a read the process waits for, one round trip after another. When a file
//! (large enough to matter, small enough to be worth it) is read a second time at a place that
//! does not continue the previous read, the whole file is queued for a background fetch in
//! large requests; the faults that follow find their bytes arriving or already cached.
//! Sequential readers never trigger it (the block cache's read-ahead serves them).
//!
//! The same queue fetches what a program will load (see [`super::elf`]): when an ELF file's
//! first bytes are read, the file itself is fetched whole (its pages are mapped and mostly
//! touched), and so are its dynamic loader, `/etc/ld.so.cache` and its `DT_NEEDED` libraries
//! (looked up in the image's library directories), and theirs in turn. And when a file of a directory
//! is first read, the directory's files are fetched together if they lie together in one
//! layer and span at most 8 MiB (a module's package, a locale, `/etc`).

use super::{Image, elf};
use crate::error::Result;
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
/// Directories (relative to the image root) searched for a needed library, besides the
/// `*-linux-*` multiarch directories under `lib` and `usr/lib`.
const LIBRARY_DIRS: [&str; 5] = ["lib", "usr/lib", "lib64", "usr/lib64", "usr/local/lib"];

/// Work for the background fetcher.
#[derive(Debug, PartialEq, Eq)]
enum Job {
    /// Fetch this file whole.
    Whole(u64),
    /// Find and fetch the libraries this ELF file needs.
    Libraries(u64),
    /// Fetch the files of this directory if they lie together and are small in all.
    Directory(u64),
}

/// A directory's files are fetched together only if they span at most this much.
const DIRECTORY_MAX: u64 = 8 << 20;

/// Per-file read positions and the queue of files to fetch whole.
pub struct WholeFiles {
    /// inode -> end of its last read, or [`QUEUED`].
    ends: Mutex<HashMap<u64, u64>>,
    /// ELF files whose libraries have been looked up.
    programs: Mutex<std::collections::HashSet<u64>>,
    /// Directories whose files have been considered for fetching together.
    directories: Mutex<std::collections::HashSet<u64>>,
    tx: mpsc::UnboundedSender<Job>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Job>>>,
}

impl Default for WholeFiles {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        WholeFiles {
            ends: Mutex::new(HashMap::new()),
            programs: Mutex::new(Default::default()),
            directories: Mutex::new(Default::default()),
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
                let _ = self.tx.send(Job::Whole(ino));
            }
            _ => {
                ends.insert(ino, offset + len);
            }
        }
    }

    /// Notes the first bytes of file `ino` (`size` bytes, in directory `parent`) as read: an
    /// ELF file is fetched whole (the loader maps it and its page faults touch most of it)
    /// and gets what it will load looked up, and the directory's files are considered
    /// together (a program reading one module, locale file or config file usually reads its
    /// siblings).
    pub fn note_head(&self, ino: u64, size: u64, parent: u64, head: &[u8]) {
        // A program (ELF, or a script whose interpreter runs next).
        let elf = elf::is_elf64(head);
        if (elf || head.starts_with(b"#!")) && self.programs.lock().unwrap().insert(ino) {
            if elf && (MIN_SIZE..=MAX_SIZE).contains(&size) {
                self.queue_file(ino);
            }
            let _ = self.tx.send(Job::Libraries(ino));
        }
        if self.directories.lock().unwrap().insert(parent) {
            let _ = self.tx.send(Job::Directory(parent));
        }
    }

    /// Queues `ino` to be fetched whole unless it already was; true if newly queued.
    fn claim(&self, ino: u64) -> bool {
        self.ends.lock().unwrap().insert(ino, QUEUED) != Some(QUEUED)
    }

    /// Queues file `ino` to be fetched whole (if it was not yet); true if newly queued.
    pub fn queue_file(&self, ino: u64) -> bool {
        let new = self.claim(ino);
        if new {
            let _ = self.tx.send(Job::Whole(ino));
        }
        new
    }

    /// Queues program `ino` to be fetched whole, and what it loads next to be looked up.
    pub fn queue_program(&self, ino: u64) -> bool {
        let new = self.queue_file(ino);
        if self.programs.lock().unwrap().insert(ino) {
            let _ = self.tx.send(Job::Libraries(ino));
        }
        new
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
        while let Some(job) = rx.recv().await {
            // A planned prefetch (prioritized files, a recorded profile) already brings what
            // the workload needs, in order: guesses made meanwhile would only compete with it,
            // so they are dropped.
            if self.prefetching.load(Ordering::Relaxed) {
                continue;
            }
            let Ok(permit) = gate.clone().acquire_owned().await else {
                return;
            };
            let image = self.clone();
            tokio::spawn(async move {
                match job {
                    Job::Whole(ino) => image.warm_file(ino).await,
                    Job::Directory(dir) => image.warm_directory(dir).await,
                    Job::Libraries(ino) => match image.loaded_next(ino).await {
                        Ok(libs) => {
                            let w = &image.whole_files;
                            for lib in libs {
                                if w.queue_file(lib) && w.programs.lock().unwrap().insert(lib) {
                                    let _ = w.tx.send(Job::Libraries(lib));
                                }
                            }
                        }
                        Err(e) => tracing::debug!("libraries of inode {ino}: {e}"),
                    },
                }
                drop(permit);
            });
        }
    }

    async fn warm_file(&self, ino: u64) {
        if let Some(node) = self.tree.get(ino)
            && let Some((li, loc)) = &node.data
            && node.size <= MAX_SIZE
        {
            tracing::debug!("fetching inode {ino} whole ({} bytes)", node.size);
            match self.layers[*li].0.warm(loc, node.size).await {
                Ok(()) => {
                    self.whole_fetched.fetch_add(node.size, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!("whole-file fetch of inode {ino}: {e}"),
            }
        }
    }

    /// Fetches the files of directory `dir` from the layer most of them come from, in one
    /// streamed range, when that range is small and mostly theirs (files written together).
    async fn warm_directory(&self, dir: u64) {
        let Some(node) = self.tree.get(dir) else {
            return;
        };
        let mut per_layer: HashMap<usize, (u64, u64, u64, usize)> = HashMap::new();
        for &child in node.children.values() {
            let Some(c) = self.tree.get(child) else {
                continue;
            };
            let Some((li, loc)) = &c.data else { continue };
            let Some((a, b)) = self.layers[*li].0.extent(loc, c.size) else {
                continue;
            };
            let e = per_layer.entry(*li).or_insert((u64::MAX, 0, 0, 0));
            *e = (e.0.min(a), e.1.max(b), e.2 + (b - a), e.3 + 1);
        }
        let Some((li, (a, b, sum, _))) = per_layer.into_iter().max_by_key(|(_, e)| e.3) else {
            return;
        };
        // Small enough, and mostly this directory's bytes (not interleaved with others').
        if b - a <= DIRECTORY_MAX && sum * 2 >= b - a {
            tracing::debug!("fetching directory inode {dir} together ({a}..{b} of layer {li})");
            match self.layers[li].0.warm_extent(a, b).await {
                Ok(()) => {
                    self.directory_fetched.fetch_add(b - a, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!("fetching directory inode {dir}: {e}"),
            }
        }
    }

    /// The files ELF file `ino` makes the loader open next, found in the image: its
    /// interpreter (the dynamic loader, `PT_INTERP`) and, when it has one, the loader's cache
    /// `etc/ld.so.cache`, then the libraries it names (`DT_NEEDED`) in the library directories.
    async fn loaded_next(&self, ino: u64) -> Result<Vec<u64>> {
        let head = self.file_bytes(ino, 0, 4096).await?;
        if let Some((interp, looked_up)) = elf::shebang(&head) {
            let mut next: Vec<u64> = self.tree.resolve_links(&interp).into_iter().collect();
            if let Some(name) = looked_up {
                next.extend(super::command::find_on_path(&self.tree, &name, None));
            }
            return Ok(next);
        }
        let found = elf::is_elf64(&head).then(|| {
            Some((
                elf::program_headers(&head)?,
                elf::program_header_size(&head)?,
            ))
        });
        let Some(((off, len), entry)) = found.flatten() else {
            return Ok(Vec::new());
        };
        let phdrs = self.file_bytes(ino, off, len).await?;
        let Some(headers) = elf::segments(&phdrs, entry) else {
            return Ok(Vec::new());
        };
        let mut next = Vec::new();
        if let Some((ioff, ilen)) = headers.interp
            && let Some(path) = elf::interp_path(&self.file_bytes(ino, ioff, ilen).await?)
        {
            next.extend(self.tree.resolve_links(&path));
            next.extend(self.tree.resolve_links("etc/ld.so.cache"));
        }
        let Some((doff, dlen)) = headers.dynamic else {
            return Ok(next);
        };
        let dynamic = self.file_bytes(ino, doff, dlen).await?;
        let Some(((soff, slen), offsets)) = elf::needed_offsets(&dynamic, &headers.loads) else {
            return Ok(next);
        };
        let strtab = self.file_bytes(ino, soff, slen).await?;
        let dirs = self.library_dirs();
        next.extend(elf::names(&strtab, &offsets).iter().filter_map(|name| {
            dirs.iter()
                .find_map(|d| self.tree.resolve_links(&format!("{d}/{name}")))
        }));
        Ok(next)
    }

    /// Where libraries are looked for: the usual directories and the multiarch ones.
    fn library_dirs(&self) -> Vec<String> {
        let mut dirs = Vec::new();
        for base in ["usr/lib", "lib"] {
            if let Some(node) = self.tree.resolve_links(base).and_then(|i| self.tree.get(i)) {
                dirs.extend(
                    node.children
                        .keys()
                        .filter(|n| n.contains("-linux-"))
                        .map(|n| format!("{base}/{n}")),
                );
            }
        }
        dirs.extend(LIBRARY_DIRS.iter().map(|d| d.to_string()));
        dirs
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
        assert_eq!(rx.try_recv().ok(), Some(Job::Whole(1)));
        assert!(rx.try_recv().is_err());
        w.note(2, 1000, 0, 10);
        w.note(2, 1000, 500, 10); // too small to matter
        w.note(3, 1 << 40, 0, 10);
        w.note(3, 1 << 40, 1 << 30, 10); // too large
        assert!(rx.try_recv().is_err());
    }
}

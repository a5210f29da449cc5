//! Whole-file fetch for files read at random places.
//!
//! A program's binary and shared libraries are read by page faults scattered through the file;
//! each fault is a read the process waits for, one round trip after another. When a file
//! (large enough to matter, small enough to be worth it) is read a second time at a place that
//! does not continue the previous read, the whole file is queued for a background fetch in
//! large requests; the faults that follow find their bytes arriving or already cached.
//! Sequential readers never trigger it (the block cache's read-ahead serves them).
//!
//! The same queue fetches what a program will load (see `image::elf`): when an ELF file's
//! first bytes are read, the file itself is fetched whole (its pages are mapped and mostly
//! touched), and so are its dynamic loader, `/etc/ld.so.cache` and its `DT_NEEDED` libraries
//! (looked up in the image's library directories), and theirs in turn. The same queue fetches
//! files read together (see `image::together`).
//!
//! Order matters as much as choice, because everything fetched shares one link. A file
//! fetched whole comes head and tail first, in requests of their own, then its middle: a
//! program is read at both ends first. Looking up what a program loads takes a few small
//! reads, each a round trip; it does not wait for one of the few bulk-fetch slots, and it reads
//! the dynamic section with [`crate::blob::BlobSource::read_now`], not behind the program's
//! own whole-file fetch, which reaches it only after everything before it (5.5 MB into
//! python3.11, whose data segment is larger than the tail fetched first).

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
/// How much of the front of a file fetched whole comes first, alone: a program's headers and
/// the first pages the kernel and the loader read.
const HEAD: u64 = 64 << 10;
/// How much of the end of a file fetched whole comes first, alone: a program's dynamic
/// section and the data the loader relocates.
const TAIL: u64 = 128 << 10;
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
    /// Fetch the files of this directory (the first) of the same kind as the file read (the
    /// second) if they lie together and are small in all.
    Directory(u64, u64),
}

/// Per-file read positions and the queue of files to fetch whole.
pub struct WholeFiles {
    /// inode -> end of its last read, or [`QUEUED`].
    ends: Mutex<HashMap<u64, u64>>,
    /// ELF files whose libraries have been looked up.
    programs: Mutex<std::collections::HashSet<u64>>,
    /// Directories whose files have been considered for fetching together.
    pub(super) directories: Mutex<std::collections::HashSet<u64>>,
    /// Families of same-named directories (parent of their parents, name) -> how many of
    /// them have been read (see [`super::together`]).
    pub(super) families: Mutex<HashMap<(u64, String), u32>>,
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
            families: Mutex::new(Default::default()),
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
    /// ELF file gets what it will load looked up and is fetched whole (the loader maps it and
    /// its page faults touch most of it), and the directory's files are considered together
    /// (a program reading one module, locale file or config file usually reads its siblings;
    /// not so a program in a bin directory).
    pub fn note_head(&self, ino: u64, size: u64, parent: u64, head: &[u8]) {
        // A program (ELF, or a script whose interpreter runs next).
        let elf = elf::is_elf64(head);
        if (elf || head.starts_with(b"#!")) && self.programs.lock().unwrap().insert(ino) {
            if elf && (MIN_SIZE..=MAX_SIZE).contains(&size) {
                self.queue_file(ino);
            }
            let _ = self.tx.send(Job::Libraries(ino));
        }
        // Programs are run one by one, by name: a bin directory is not read together.
        let runs = elf::is_executable(head) || head.starts_with(b"#!");
        if !runs && self.directories.lock().unwrap().insert(parent) {
            let _ = self.tx.send(Job::Directory(parent, ino));
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

    /// Queues program `ino` to be fetched whole and what it loads next to be looked up (and
    /// fetched in turn); true if newly queued.
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
            let image = self.clone();
            // Looking up what a program loads takes a few small reads, each a round trip:
            // it does not wait behind (or hold up) the bulk fetches.
            if let Job::Libraries(ino) = job {
                tokio::spawn(async move {
                    if let Err(e) = image.loaded_next(ino).await {
                        tracing::debug!("what inode {ino} loads: {e}");
                    }
                });
                continue;
            }
            let Ok(permit) = gate.clone().acquire_owned().await else {
                return;
            };
            tokio::spawn(async move {
                match job {
                    Job::Whole(ino) => image.warm_file(ino).await,
                    Job::Directory(dir, read) => image.warm_directory(dir, read).await,
                    Job::Libraries(_) => {} // started above, without a slot
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
            // Both ends first, in requests of their own, then the rest: a program is read at
            // both ends before anything else (its headers; then the loader reads the dynamic
            // section and relocates the data segment, in the last few dozen KiB).
            let layer = &self.layers[*li].0;
            let ends = match node.size > HEAD + TAIL {
                true => vec![(0, HEAD), (node.size - TAIL, TAIL)],
                false => Vec::new(),
            };
            // Polled in order the first time: the ends claim their blocks before the
            // whole-file fetch claims the rest.
            let ends = futures::future::try_join_all(
                ends.into_iter().map(|(o, l)| layer.warm_range(loc, o, l)),
            );
            let (ends, all) = tokio::join!(ends, layer.warm_range(loc, 0, node.size));
            match ends.map(drop).and(all) {
                Ok(()) => {
                    self.whole_fetched.fetch_add(node.size, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!("whole-file fetch of inode {ino}: {e}"),
            }
        }
    }

    /// Finds and queues what ELF file `ino` makes the loader open next: its interpreter (the
    /// dynamic loader, `PT_INTERP`) and, when it has one, the loader's cache
    /// `etc/ld.so.cache`, then the libraries it names (`DT_NEEDED`) in the library
    /// directories. For a script: its interpreter. Each is queued as soon as it is found,
    /// while the program itself is being fetched whole.
    async fn loaded_next(&self, ino: u64) -> Result<()> {
        let w = &self.whole_files;
        let found = |next: u64| {
            w.queue_program(next);
        };
        let head = self.file_bytes(ino, 0, 4096).await?;
        if let Some((interp, looked_up)) = elf::shebang(&head) {
            self.tree.resolve_links(&interp).into_iter().for_each(found);
            if let Some(name) = looked_up {
                super::command::find_on_path(&self.tree, &name, None)
                    .into_iter()
                    .for_each(found);
            }
            return Ok(());
        }
        let program = elf::is_elf64(&head).then(|| {
            Some((
                elf::program_headers(&head)?,
                elf::program_header_size(&head)?,
            ))
        });
        let Some(((off, len), entry)) = program.flatten() else {
            return Ok(());
        };
        let phdrs = self.file_bytes(ino, off, len).await?;
        let Some(headers) = elf::segments(&phdrs, entry) else {
            return Ok(());
        };
        if let Some((ioff, ilen)) = headers.interp
            && let Some(path) = elf::interp_path(&self.file_bytes(ino, ioff, ilen).await?)
        {
            self.tree.resolve_links(&path).into_iter().for_each(found);
            if let Some(cache) = self.tree.resolve_links("etc/ld.so.cache") {
                w.queue_file(cache);
            }
        }
        let Some((doff, dlen)) = headers.dynamic else {
            return Ok(());
        };
        // Read now, not behind the whole-file fetch of the program, which brings the dynamic
        // section (5.5 MB into python3.11) after everything before it.
        let dynamic = self.file_bytes_now(ino, doff, dlen).await?;
        let Some(((soff, slen), offsets)) = elf::needed_offsets(&dynamic, &headers.loads) else {
            return Ok(());
        };
        let strtab = self.file_bytes_now(ino, soff, slen).await?;
        let dirs = self.library_dirs();
        for name in elf::names(&strtab, &offsets) {
            dirs.iter()
                .find_map(|d| self.tree.resolve_links(&format!("{d}/{name}")))
                .into_iter()
                .for_each(found);
        }
        Ok(())
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

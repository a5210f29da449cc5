//! Startup speculation: everything a mount fetches before a reader asks for it.
//!
//! A cold start is a chain of dependent reads, each a round trip. Speculation shortens it by
//! fetching what the next reads will need while the current ones are served. It has one home:
//! the [`Speculator`] owns the queue of guesses, the state the policies keep, one [`Mode`] and
//! one [`SpeculateConfig`] holding every limit. The read path tells it about each read once
//! ([`Speculator::on_read`]); everything else runs in the background tasks
//! [`Speculator::start`] spawns.
//!
//! Each heuristic is a small policy in a module of its own, deciding *what* to fetch from what
//! was read and the tree; this module decides *when*:
//! - [`plan`]: a planned prefetch — a recorded profile, or eStargz prioritized files
//!   (landmarks) — and small layers fetched whole at mount;
//! - `scattered`: a file read at scattered places is fetched whole;
//! - `program` (with `elf`): what a starting program will load next (its loader, libraries,
//!   a script's interpreter);
//! - `together`: a directory's files of one kind, and families of same-named directories;
//! - `command`: the image config's command, known before the process exists, and the files
//!   a runtime reads from the root before it starts the command (user and group databases).
//!
//! Order matters as much as choice, because everything fetched shares one link. A planned
//! prefetch names what the workload reads: while it runs, guesses are dropped and the block
//! cache's read-ahead is paused (they would only compete with it; the runtime's few small
//! files are fetched beside it, as the runtime reads them before the workload starts);
//! after it, the narrow guesses (scattered files, libraries, directories) resume and the
//! broad ones (families, the command, small layers) never run. Looking up what a program
//! loads takes a few small reads, each a round trip: it does not wait for one of the few
//! bulk-fetch slots, and neither does a file of at most `whole_head` bytes fetched whole
//! (one small request).

mod command;
mod elf;
pub mod plan;
mod program;
mod scattered;
mod together;

pub use command::RUNTIME_FILES;
pub use plan::{read_profile, write_profile};

use crate::blob::cache::{BlockCache, ReadAhead};
use crate::image::Image;
use crate::stats::Access;
use crate::task::TaskGuard;
use crate::tree::Node;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Every limit of speculation, with its default.
#[derive(Debug, Clone)]
pub struct SpeculateConfig {
    /// Guesses at all (scattered files, programs, directories, the command, the runtime's
    /// files): `--no-whole-files` turns them off.
    pub guesses: bool,
    /// Prefetch eStargz prioritized files (`--no-prefetch` turns it off).
    pub landmarks: bool,
    /// Layers of at most this many compressed bytes are fetched whole at mount, smallest
    /// first, this many in all (`--small-layers`; 0: none).
    pub small_layers: u64,
    /// Files fetched whole are at least this large (smaller ones are read whole in one
    /// request anyway) ...
    pub whole_min: u64,
    /// ... and at most this large (larger ones are left to reads and read-ahead).
    pub whole_max: u64,
    /// How much of a file fetched whole comes first, alone: a program's headers.
    pub whole_head: u64,
    /// How much of its end comes first, alone: the dynamic section, the data relocated.
    pub whole_tail: u64,
    /// Files (or directories) fetched at once (files of at most `whole_head` bytes aside).
    pub whole_in_flight: usize,
    /// A directory's files are fetched together only if they span at most this much of their
    /// layer's data (compressed bytes for eStargz, the uncompressed tar for gzip with an index).
    pub directory_max: u64,
    /// The rest of a family of directories is fetched only up to this much in all.
    pub family_max: u64,
    /// Directories of a family fetched at once.
    pub family_in_flight: usize,
    /// Most blob bytes `/etc/passwd` or `/etc/group`, which a runtime reads before it
    /// starts a container, is fetched ahead with as a mount starts (more is left to the
    /// read: in a gzip layer, a file deep in its span resumes at a mark instead).
    pub runtime_fetch_max: u64,
    /// Arguments of the configured command looked at.
    pub command_args: usize,
    /// Ranges of a profile fetched at once.
    pub profile_in_flight: usize,
    /// Ranges of one blob in a profile closer than this are fetched as one.
    pub profile_merge_gap: u64,
    /// The block cache's read-ahead of sequential readers.
    pub readahead: ReadAhead,
}

impl Default for SpeculateConfig {
    fn default() -> Self {
        SpeculateConfig {
            guesses: true,
            landmarks: true,
            small_layers: 16 << 20,
            whole_min: 256 << 10,
            whole_max: 64 << 20,
            whole_head: 64 << 10,
            whole_tail: 128 << 10,
            whole_in_flight: 4,
            directory_max: 8 << 20,
            family_max: 8 << 20,
            family_in_flight: 4,
            runtime_fetch_max: 256 << 10,
            command_args: 32,
            profile_in_flight: 8,
            profile_merge_gap: 64 << 10,
            readahead: ReadAhead {
                bytes: 4 << 20,
                after: 1 << 20,
            },
        }
    }
}

/// What drives a mount's speculation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A plan (profile, landmarks) brings what the workload reads; guesses wait for it and
    /// the broad ones never run.
    Planned,
    /// No plan: every guess.
    Guessing,
    /// No guesses (a plan, if any, still runs).
    Off,
}

/// Bytes speculation brought, for `ocifs stats`. File bytes, so they compare across formats.
#[derive(Debug, Default)]
pub struct Counts {
    /// Bytes a planned prefetch set out to bring, and has brought.
    pub planned: AtomicU64,
    pub planned_done: AtomicU64,
    /// Sizes of the files fetched whole.
    pub whole_files: AtomicU64,
    /// Sizes of the files fetched with their directory.
    pub directories: AtomicU64,
    /// Compressed bytes of the small layers fetched whole at mount.
    pub small_layers: AtomicU64,
}

/// A planned prefetch: a recorded profile, eStargz prioritized files, or both (in that order).
struct Plan {
    profile: Option<Vec<Access>>,
    landmarks: bool,
}

/// A guess for the background fetcher.
#[derive(Debug, PartialEq, Eq)]
enum Job {
    /// Fetch this file whole.
    Whole(u64),
    /// Find and fetch what this program (ELF, or a script) loads next.
    Loads(u64),
    /// Fetch the files of this directory (the first) of the same kind as the file read (the
    /// second) if they lie together.
    Directory(u64, u64),
}

/// One mount's speculation: mode, limits, queue and the state its policies keep.
pub struct Speculator {
    cfg: SpeculateConfig,
    mode: Mode,
    /// The planned prefetch, until [`Speculator::start`] runs it.
    plan: Mutex<Option<Plan>>,
    /// Set while a planned prefetch runs (see the module doc).
    planning: AtomicBool,
    /// The cache whose read-ahead pauses while a plan runs.
    cache: Arc<BlockCache>,
    scattered: scattered::ReadPositions,
    /// Programs whose loads have been looked up.
    programs: Mutex<HashSet<u64>>,
    /// Directories whose files have been considered for fetching together.
    directories: Mutex<HashSet<u64>>,
    /// Families of same-named directories (parent of their parents, name) -> how many of
    /// them have been read.
    families: Mutex<HashMap<(u64, String), u32>>,
    tx: mpsc::UnboundedSender<Job>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Job>>>,
    /// What speculation brought.
    pub counts: Counts,
    /// Decoded bytes that files fetched ahead may still keep decoded (see
    /// [`plan::DECODE_AHEAD_MAX`]).
    decode_budget: AtomicU64,
}

/// Takes `n` bytes from `budget` if it has them.
fn take(budget: &AtomicU64, n: u64) -> bool {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(n))
        .is_ok()
}

impl Speculator {
    /// The speculation of a mount of `image` whose blobs go through `cache`; `profile` is a
    /// recorded profile to prefetch (`--prefetch`).
    pub fn new(
        cfg: SpeculateConfig,
        image: &Image,
        cache: Arc<BlockCache>,
        profile: Option<Vec<Access>>,
    ) -> Self {
        let landmarks = cfg.landmarks && plan::landmark_bytes(image) > 0;
        let plan = (profile.is_some() || landmarks).then_some(Plan { profile, landmarks });
        let mode = match (cfg.guesses, plan.is_some()) {
            (false, _) => Mode::Off,
            (true, true) => Mode::Planned,
            (true, false) => Mode::Guessing,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        Speculator {
            scattered: scattered::ReadPositions::new(cfg.whole_min, cfg.whole_max),
            cfg,
            mode,
            plan: Mutex::new(plan),
            planning: AtomicBool::new(false),
            cache,
            programs: Default::default(),
            directories: Default::default(),
            families: Default::default(),
            tx,
            rx: Mutex::new(Some(rx)),
            counts: Counts::default(),
            decode_budget: AtomicU64::new(plan::DECODE_AHEAD_MAX),
        }
    }

    /// This mount's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The limits.
    pub fn config(&self) -> &SpeculateConfig {
        &self.cfg
    }

    /// Starts the background work: the guess fetcher, the planned prefetch, the runtime's
    /// files, and (without a plan) the command's first reads and the small layers. Dropping
    /// the guards stops it.
    pub fn start(self: &Arc<Self>, image: &Arc<Image>) -> Vec<TaskGuard> {
        let mut tasks = Vec::new();
        if self.mode != Mode::Off {
            tasks.push(TaskGuard::spawn(self.clone().fetch_guesses(image.clone())));
        }
        let plan = self.plan.lock().unwrap().take();
        let planned = plan.is_some();
        if planned {
            // The plan brings what the start reads, not small layers streamed in at open.
            image.layers.iter().for_each(|l| l.stop_small_fetch());
        }
        if let Some(Plan { profile, landmarks }) = plan {
            self.set_planning(true);
            let (me, image) = (self.clone(), image.clone());
            tasks.push(TaskGuard::spawn(async move {
                if let Some(p) = profile {
                    plan::prefetch_profile(&image, &me, &p).await;
                }
                if !landmarks {
                    me.set_planning(false);
                    return;
                }
                // The plan ends with the fetch (guesses wait only for it); the decoding goes
                // on after. Polled first, the fetch has claimed its blocks before a decode
                // reads one, so the decoding waits for the streams and asks for nothing.
                let fetch = async {
                    plan::prefetch_landmarks(&image, &me.counts).await;
                    me.set_planning(false);
                };
                futures::join!(fetch, plan::decode_landmarks(&image, &me.decode_budget));
            }));
        }
        if self.mode != Mode::Off {
            tasks.push(self.fetch_runtime_files(image));
        }
        if !planned && self.mode != Mode::Off {
            self.predict_command(image);
        }
        if !planned && self.cfg.small_layers > 0 {
            let (me, image) = (self.clone(), image.clone());
            tasks.push(TaskGuard::spawn(async move {
                plan::fetch_small_layers(&image, me.cfg.small_layers, &me.counts).await;
            }));
        }
        tasks
    }

    /// Marks the planned prefetch as running or done; while it runs, guesses are dropped and
    /// read-ahead is paused (the plan already brings what the workload reads, in order).
    fn set_planning(&self, running: bool) {
        self.planning.store(running, Ordering::Relaxed);
        self.cache.pause_readahead(running);
    }

    /// Notes a read the workload waited for: `len` bytes at `offset` of file `ino`, and its
    /// first bytes when the read started at 0.
    pub fn on_read(&self, ino: u64, node: &Node, offset: u64, len: u64, head: Option<&[u8]>) {
        if self.mode == Mode::Off {
            return;
        }
        if self.scattered.note(ino, node.size, offset, len) {
            let _ = self.tx.send(Job::Whole(ino));
        }
        let Some(head) = head else { return };
        // A program (ELF, or a script whose interpreter runs next): fetched whole (the loader
        // maps it and its page faults touch most of it), what it loads looked up.
        let elf = elf::is_elf64(head);
        if (elf || head.starts_with(b"#!")) && self.programs.lock().unwrap().insert(ino) {
            if elf && self.scattered.in_range(node.size) {
                self.queue_file(ino);
            }
            let _ = self.tx.send(Job::Loads(ino));
        }
        // Programs are run one by one, by name: a bin directory is not read together.
        let runs = elf::is_executable(head) || head.starts_with(b"#!");
        if !runs && self.directories.lock().unwrap().insert(node.parent) {
            let _ = self.tx.send(Job::Directory(node.parent, ino));
        }
    }

    /// Queues file `ino` to be fetched whole (if it was not yet); true if newly queued.
    fn queue_file(&self, ino: u64) -> bool {
        let new = self.scattered.claim(ino);
        if new {
            let _ = self.tx.send(Job::Whole(ino));
        }
        new
    }

    /// Queues program `ino` to be fetched whole and what it loads to be looked up; true if
    /// newly queued.
    fn queue_program(&self, ino: u64) -> bool {
        let new = self.queue_file(ino);
        if self.programs.lock().unwrap().insert(ino) {
            let _ = self.tx.send(Job::Loads(ino));
        }
        new
    }

    /// Fetches the files a runtime reads before it starts a container from this root (see
    /// [`command::runtime_ranges`]) at once, beside a plan if there is one: the runtime
    /// reads them before the command runs, so they are the start's first misses otherwise.
    fn fetch_runtime_files(self: &Arc<Self>, image: &Image) -> TaskGuard {
        let wanted: Vec<_> = command::runtime_ranges(image, self.cfg.runtime_fetch_max)
            .into_iter()
            .filter(|r| self.scattered.claim(r.ino))
            .collect();
        let me = self.clone();
        TaskGuard::spawn(async move {
            let counts = &me.counts;
            let fetches = wanted.iter().map(|r| async move {
                match r.blob.prefetch(r.start, r.len).await {
                    Ok(()) => drop(counts.whole_files.fetch_add(r.size, Ordering::Relaxed)),
                    Err(e) => tracing::debug!("fetching a runtime file ahead: {e}"),
                }
            });
            futures::future::join_all(fetches).await;
        })
    }

    /// Queues the configured command's program and the files its arguments name.
    fn predict_command(&self, image: &Image) {
        let predicted =
            command::predict(&image.resolved.config, &image.tree, self.cfg.command_args);
        let Some((program, files)) = predicted else {
            return;
        };
        let mut queued = usize::from(self.queue_program(program));
        for f in files {
            queued += usize::from(self.queue_file(f));
        }
        tracing::debug!("configured command: {queued} files queued");
    }

    /// Runs the queued guesses, a few at a time, until the mount ends.
    async fn fetch_guesses(self: Arc<Self>, image: Arc<Image>) {
        let Some(mut rx) = self.rx.lock().unwrap().take() else {
            return;
        };
        let gate = Arc::new(tokio::sync::Semaphore::new(self.cfg.whole_in_flight));
        while let Some(job) = rx.recv().await {
            if self.planning.load(Ordering::Relaxed) {
                continue;
            }
            let (me, image) = (self.clone(), image.clone());
            // A few small reads, each a round trip: not behind (or holding up) bulk fetches.
            if let Job::Loads(ino) = job {
                tokio::spawn(async move {
                    let found = |load| match load {
                        program::Load::Program(i) => drop(me.queue_program(i)),
                        program::Load::File(i) => drop(me.queue_file(i)),
                    };
                    if let Err(e) = program::loads(&image, ino, &found).await {
                        tracing::debug!("what inode {ino} loads: {e}");
                    }
                });
                continue;
            }
            // A small file is one small request too: it does not wait for a bulk slot. (How
            // many come is bounded by what queues them: a command's arguments, a loader's
            // cache, the C library's few files, each file once.)
            if let Job::Whole(ino) = job
                && image
                    .tree
                    .get(ino)
                    .is_some_and(|n| n.size <= self.cfg.whole_head)
            {
                tokio::spawn(async move { me.fetch_whole(&image, ino).await });
                continue;
            }
            let Ok(permit) = gate.clone().acquire_owned().await else {
                return;
            };
            tokio::spawn(async move {
                match job {
                    Job::Whole(ino) => me.fetch_whole(&image, ino).await,
                    Job::Directory(dir, read) => me.fetch_directory(&image, dir, read).await,
                    Job::Loads(_) => {} // started above, without a slot
                }
                drop(permit);
            });
        }
    }

    /// Fetches file `ino` whole, counting it.
    async fn fetch_whole(&self, image: &Image, ino: u64) {
        let fetched = scattered::fetch_whole(image, &self.cfg, ino, &self.decode_budget).await;
        self.counts
            .whole_files
            .fetch_add(fetched, Ordering::Relaxed);
    }

    /// Fetches directory `dir`'s files of the kind of file `read` when they lie together;
    /// and, if `dir` is the second of its family to be read (and no plan names what the
    /// workload reads), the rest of the family within its budget.
    async fn fetch_directory(&self, image: &Image, dir: u64, read: u64) {
        let Some(kind) = together::kind_of(image, dir, read) else {
            return;
        };
        let cfg = &self.cfg;
        if let Some(t) = together::together(image, dir, &kind, cfg.directory_max) {
            self.fetch_together(image, dir, t).await;
        }
        if self.mode == Mode::Planned {
            return;
        }
        let cousins = {
            let mut families = self.families.lock().unwrap();
            together::family_on_second_read(&image.tree, dir, &mut families)
        };
        let mut budget = cfg.family_max;
        let mut plans = Vec::new();
        for cousin in cousins {
            if self.directories.lock().unwrap().contains(&cousin) {
                continue;
            }
            if let Some(t) = together::together(image, cousin, &kind, cfg.directory_max) {
                let len = t.extent.1 - t.extent.0;
                if len > budget {
                    // Left for its own first read, which fetches it then.
                    break;
                }
                budget -= len;
                if self.directories.lock().unwrap().insert(cousin) {
                    plans.push((cousin, t));
                }
            }
        }
        if !plans.is_empty() {
            tracing::debug!("fetching {} directories like inode {dir}", plans.len());
        }
        use futures::StreamExt;
        futures::stream::iter(plans)
            .for_each_concurrent(cfg.family_in_flight, |(d, t)| {
                self.fetch_together(image, d, t)
            })
            .await;
    }

    async fn fetch_together(&self, image: &Image, dir: u64, t: together::Together) {
        let (li, (a, b)) = (t.layer, t.extent);
        tracing::debug!("fetching directory inode {dir} together ({a}..{b} of layer {li})");
        match image.layers[li].layer.warm_extent(a, b).await {
            Ok(()) => {
                let n = t.file_bytes;
                self.counts.directories.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!("fetching directory inode {dir}: {e}"),
        }
    }
}

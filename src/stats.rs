//! Statistics an experimenter needs to explain a startup: a read-latency histogram, the
//! access recorder behind `--record`, and [`MountStats`], what `ocifs stats` shows (network
//! bytes per layer come from [`crate::blob::counting::CountingBlob`]). All lock-free counters
//! or short mutex sections; nothing global.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Read latencies in power-of-two microsecond buckets, plus totals.
pub struct ReadStats {
    buckets: [AtomicU64; 32],
    pub reads: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    /// Opens of files and directories the kernel sent us (it stops after the first of each
    /// kind when it can open without asking; see `crate::fuse`).
    pub opens: AtomicU64,
    /// Reads being served now, and when the last one ended (for background work to yield).
    in_flight: AtomicU64,
    last_end: Mutex<std::time::Instant>,
}

impl Default for ReadStats {
    fn default() -> Self {
        ReadStats {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            reads: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            opens: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last_end: Mutex::new(std::time::Instant::now()),
        }
    }
}

impl ReadStats {
    /// A read starts.
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A read ends.
    pub fn end(&self) {
        *self.last_end.lock().unwrap() = std::time::Instant::now();
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether no read has been served for `quiet`: background fetching may use the link.
    pub fn idle_for(&self, quiet: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && self.last_end.lock().unwrap().elapsed() >= quiet
    }

    /// Records one read of `bytes` that took `took`.
    pub fn record(&self, took: Duration, bytes: u64) {
        let us = took.as_micros().max(1) as u64;
        let b = (63 - us.leading_zeros() as usize).min(31);
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The latency below which `p` (0..1) of reads finished, to a factor of two.
    pub fn percentile(&self, p: f64) -> Duration {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let target = ((total as f64) * p).ceil() as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Duration::from_micros(2u64 << i);
            }
        }
        Duration::from_micros(2u64 << 31)
    }
}

/// One recorded access: which file of which layer, which range.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Access {
    pub layer: String,
    pub path: String,
    pub offset: u64,
    pub len: u64,
}

/// Records accesses (inode, offset, len) in order, for `--record`; paths are resolved when
/// the profile is written, not on the read path.
#[derive(Default)]
pub struct Recorder {
    accesses: Mutex<Vec<(u64, u64, u64)>>,
}

impl Recorder {
    /// Notes a read.
    pub fn note(&self, ino: u64, offset: u64, len: u64) {
        let mut a = self.accesses.lock().unwrap();
        // Merge a read that continues the previous one of the same file.
        if let Some(last) = a.last_mut()
            && last.0 == ino
            && last.1 + last.2 == offset
        {
            last.2 += len;
            return;
        }
        a.push((ino, offset, len));
    }

    /// The accesses so far.
    pub fn take(&self) -> Vec<(u64, u64, u64)> {
        self.accesses.lock().unwrap().clone()
    }
}

/// What `ocifs stats` shows of a mount (its JSON form, field names in camelCase, is what
/// `ocifs stats --json` prints and what the tests read).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountStats {
    /// The image's manifest digest.
    pub digest: String,
    /// Time from start to a ready mount.
    pub ready_ms: u64,
    pub layers: Vec<LayerFigures>,
    pub cache: CacheFigures,
    pub reads: ReadFigures,
    pub prefetch: PrefetchFigures,
    pub local_copies: LocalFigures,
    /// The hosts the image is pulled from, in the order they are tried (empty for a local
    /// layout).
    #[serde(default)]
    pub hosts: Vec<HostFigures>,
    /// The process serving the mount (absent in the output of older versions).
    #[serde(default)]
    pub process: ProcessFigures,
}

/// What one host of the image's repository served (see `registry::Repo`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostFigures {
    /// `host[:port]` (with its API root when not `/v2`).
    pub host: String,
    /// `mirror` or `registry`.
    pub role: String,
    /// The repository's name at this host.
    pub repository: String,
    /// What it may be asked: `pull, resolve, push`.
    pub capabilities: String,
    /// Requests sent, bytes received, requests that failed (and the last failure).
    pub requests: u64,
    pub bytes: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    /// Blobs it sent whole for a ranged read, each streamed once.
    pub whole_streams: u64,
    /// Blobs it answered whole at first (a pull-through cache that had not stored them) and
    /// by range once it had: we waited for it to store them.
    #[serde(default)]
    pub waited_for_store: u64,
    /// Bytes received per object: a manifest's or a blob's digest.
    pub served: std::collections::BTreeMap<String, u64>,
}

/// One layer's figures.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerFigures {
    pub digest: String,
    pub format: String,
    /// The layer blob's (compressed) size.
    #[serde(default)]
    pub size: u64,
    /// Where a gzip layer's index came from.
    pub index: Option<String>,
    /// Network bytes and requests of its blob.
    pub fetched_bytes: u64,
    pub requests: u64,
    /// Its health: pending, verified, unverified or bad (with the reason).
    pub verification: String,
    /// Whether its reads are served from a local copy.
    pub local_copy: bool,
}

/// The block cache's counters.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheFigures {
    pub mem_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub fetched_bytes: u64,
    /// Of `fetched_bytes`, what waiting reads asked for (up to the end of the file each
    /// read); the rest was fetched ahead of any read (prefetch, guesses, read-ahead,
    /// verification, local copies).
    #[serde(default)]
    pub demand_bytes: u64,
}

impl CacheFigures {
    /// The line `ocifs stats` prints: hits, misses, and the bytes fetched split into what
    /// reads waited for and what was fetched ahead.
    pub fn line(&self) -> String {
        format!(
            "cache: {} memory hits, {} disk hits, {} misses; {} bytes fetched: {} for waiting reads, {} ahead of any read (prefetch, guesses, read-ahead, verification)",
            self.mem_hits,
            self.disk_hits,
            self.misses,
            self.fetched_bytes,
            self.demand_bytes,
            self.fetched_bytes.saturating_sub(self.demand_bytes)
        )
    }
}

/// Reads served: count, bytes, errors, opens asked, latency percentiles.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadFigures {
    pub count: u64,
    pub bytes: u64,
    pub errors: u64,
    pub opens: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// What speculation brought (see [`crate::speculate`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrefetchFigures {
    /// File bytes a planned prefetch set out to bring, and has brought.
    pub total_bytes: u64,
    pub done_bytes: u64,
    /// Sizes of the files fetched whole, and with their directory.
    pub whole_file_bytes: u64,
    pub directory_bytes: u64,
    /// Compressed bytes of the small layers fetched whole at mount.
    pub small_layer_bytes: u64,
}

/// Local copies of verified layers: bytes written, reads served from them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalFigures {
    pub bytes: u64,
    pub reads: u64,
}

/// The process serving a mount: its pid, and under a supervisor (see
/// `daemon::supervise`), the supervisor's pid and how many processes served it before.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessFigures {
    pub pid: u32,
    pub supervisor: Option<u32>,
    pub restarts: u32,
}

impl ProcessFigures {
    /// This process, unsupervised.
    pub fn this() -> Self {
        ProcessFigures {
            pid: std::process::id(),
            supervisor: None,
            restarts: 0,
        }
    }
}

/// What `ocifs stats` shows of an additional layer store (see [`crate::store`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreStats {
    /// The references resolved so far.
    pub images: Vec<ImageFigures>,
    /// Each layer open now, in a mount's shape: `digest` is the layer's, `layers` holds it
    /// alone, `readyMs` is how long it took to open.
    pub layers: Vec<MountStats>,
    /// Layers released after being idle.
    pub released: u64,
    /// containers/storage's notices: layers it started using, and stopped using.
    pub uses: u64,
    pub releases: u64,
    /// The block cache all layers share.
    pub cache: CacheFigures,
}

/// One image reference of a store.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageFigures {
    pub reference: String,
    /// Its manifest digest (the latest resolution).
    pub digest: String,
    /// Its layer digests, lowest first.
    pub layers: Vec<String>,
}

/// What a daemon's control socket answers: a mount's figures or a store's.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum DaemonStats {
    Store(StoreStats),
    Mount(MountStats),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_merging() {
        let s = ReadStats::default();
        for _ in 0..98 {
            s.record(Duration::from_micros(100), 1);
        }
        s.record(Duration::from_millis(50), 1);
        s.record(Duration::from_millis(50), 1);
        assert!(s.percentile(0.5) <= Duration::from_micros(256));
        assert!(s.percentile(0.99) >= Duration::from_millis(32));
        let r = Recorder::default();
        r.note(5, 0, 10);
        r.note(5, 10, 10);
        r.note(6, 0, 1);
        assert_eq!(r.take(), vec![(5, 0, 20), (6, 0, 1)]);
    }
}

//! Typed configuration values, parsed once by the CLI, with defaults in one place.

use crate::error::{Error, Result};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Default in-memory block cache size.
pub const DEFAULT_CACHE_SIZE: u64 = 512 << 20;
/// Default block size of the block cache: what a reader that misses waits for.
pub const DEFAULT_BLOCK_SIZE: u64 = 64 << 10;
/// Default bound of the on-disk block cache (checked when a mount ends).
pub const DEFAULT_DISK_CACHE_SIZE: u64 = 10 << 30;
/// Default bytes one miss fetches (the missing block and the ones after it, streamed).
pub const DEFAULT_FETCH_SIZE: u64 = 2 << 20;
/// Default time a read of a mounted file may take before it fails with EIO: long enough for
/// a container start over a slow link (a few retries of a 2 MiB fetch), short enough that a
/// dead registry shows as an error, not a hang.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time the readers of a blob wait for a pull-through cache to store it (it answers
/// ranges with the whole blob until then): half the default read timeout, enough for a
/// cache to fetch a few hundred megabytes at 200 Mbit/s.
pub const DEFAULT_FILL_WAIT: Duration = Duration::from_secs(15);

/// How long a registry transfer may dawdle before it is abandoned and asked for again from
/// the last byte received (curl's `--speed-time` and `--speed-limit`): an answer whose
/// headers take longer than `idle_timeout`, or a body that delivers fewer than
/// `min_rate × idle_timeout` bytes (none at all: a stall) in an `idle_timeout` window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub idle_timeout: Duration,
    /// Bytes per second.
    pub min_rate: u64,
}

impl Transfer {
    /// Defaults: 10 s windows, 16 KiB/s. A body slower than that is tried again on a new
    /// connection (resuming, so nothing is fetched twice); a link that slow for every
    /// connection still works, one window at a time, until a read's deadline.
    pub const DEFAULT: Transfer = Transfer {
        idle_timeout: Duration::from_secs(10),
        min_rate: 16 << 10,
    };
}

impl Default for Transfer {
    fn default() -> Self {
        Transfer::DEFAULT
    }
}

/// A duration written like `30s`, `500ms`, `2m` (a bare number is seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeLimit(pub Duration);

impl std::fmt::Display for TimeLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            ms if ms % 60_000 == 0 && ms > 0 => write!(f, "{}m", ms / 60_000),
            ms if ms % 1000 == 0 => write!(f, "{}s", ms / 1000),
            ms => write!(f, "{ms}ms"),
        }
    }
}

impl FromStr for TimeLimit {
    type Err = Error;
    fn from_str(s: &str) -> Result<TimeLimit> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            Error::format("duration", format!("{s:?} does not start with a number"))
        })?;
        let ms: u64 = match unit.trim() {
            "ms" => 1,
            "" | "s" => 1000,
            "m" | "min" => 60_000,
            u => {
                return Err(Error::format(
                    "duration",
                    format!("unknown unit {u:?} in {s:?} (ms, s or m)"),
                ));
            }
        };
        n.checked_mul(ms)
            .map(|ms| TimeLimit(Duration::from_millis(ms)))
            .ok_or_else(|| Error::format("duration", format!("{s:?} overflows")))
    }
}

/// When layer blobs are checked against their digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum VerifyMode {
    /// Serve at once; hash every blob in the background; a mismatch fails that layer's reads.
    #[default]
    Background,
    /// Hash every blob before the mount is ready.
    Strict,
    /// Never hash whole blobs (eStargz chunk digests are still checked).
    Off,
}

/// A byte count written like `512MiB`, `1G`, `4096`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::fmt::Display for ByteSize {
    /// The largest binary unit that divides the count (`256KiB`), so defaults print readably.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if self.0 != 0 && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl FromStr for ByteSize {
    type Err = Error;
    fn from_str(s: &str) -> Result<ByteSize> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| Error::format("size", format!("{s:?} does not start with a number")))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            u => {
                return Err(Error::format(
                    "size",
                    format!("unknown unit {u:?} in {s:?}"),
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| Error::format("size", format!("{s:?} overflows")))
    }
}

/// `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `linux/arm64/v8`.
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || Error::format("platform", format!("{s:?} is not os/arch[/variant]"));
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        Ok(Platform {
            os: parts[0].into(),
            arch: parts[1].into(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }

    /// The platform of this machine, as Go spells it.
    pub fn host() -> Platform {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            other => (other, None),
        };
        Platform {
            os: "linux".into(),
            arch: arch.into(),
            variant: variant.map(str::to_string),
        }
    }

    /// Whether an index entry's platform satisfies this one (arm64's default variant is v8).
    pub(crate) fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        let norm = |v: Option<&str>| match (arch, v) {
            ("arm64", None) => Some("v8".to_string()),
            (_, v) => v.map(str::to_string),
        };
        self.os == os
            && self.arch == arch
            && (self.variant.is_none() || norm(self.variant.as_deref()) == norm(variant))
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Everything that shapes how an image is opened and served.
#[derive(Debug, Clone)]
pub struct OpenConfig {
    /// Platform to pick from an image index.
    pub platform: Platform,
    /// In-memory block cache bound.
    pub cache_size: u64,
    /// Block size of the block cache.
    pub block_size: u64,
    /// Bytes one miss fetches in one streamed request.
    pub fetch_size: u64,
    /// Bound of the blocks and local tars kept in `cache_dir` (oldest removed when a mount
    /// ends); also the largest chunk decoded to disk.
    pub disk_cache_size: u64,
    /// Directory for persistent blocks, local tars and logs.
    pub cache_dir: PathBuf,
    /// Verification mode.
    pub verify: VerifyMode,
    /// Uncompressed bytes between checkpoints of gzip indexes.
    pub span: u64,
    /// Whether reads of a gzip layer may resume at a mark with its window (fetched from the
    /// index's windows blob) instead of decoding from the span's start.
    pub mark_windows: bool,
    /// How long a read of a mounted file may take before it fails with EIO.
    pub read_timeout: Duration,
    /// Whether a pass that builds a gzip layer's index also keeps the decoded tar (an
    /// unnamed file under `cache_dir/copies`; an image's copies together at most
    /// `disk_cache_size`, each at most 32 times its layer's compressed size) and serves the
    /// layer from it: for mount, store and run, which serve for a while (not `ls` or `cat`).
    pub copy_first_pass: bool,
    /// Whether a layer whose descriptor says how many bytes at its start hold its
    /// prioritized files (`ocifs convert`'s annotation) has them streamed into the block
    /// cache as soon as it is opened, beside its TOC, instead of once the mount is ready:
    /// for mount, store and run, unless prefetching is off.
    pub fetch_announced_front: bool,
    /// Layers of at most this many compressed bytes, smallest first and at most this many
    /// in all ([`crate::image::small_layers`]), are streamed into the block cache whole as
    /// soon as they are opened, beside the TOCs, unless a layer of the image announces a
    /// front (then the front is what a start reads first): a start reads a small layer it
    /// touches nearly whole. 0: not at open (the speculation may still fetch them once the
    /// mount is ready).
    pub fetch_small_layers: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("1g".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert!("MiB".parse::<ByteSize>().is_err());
        assert!("5 parsecs".parse::<ByteSize>().is_err());
    }

    #[test]
    fn time_limits() {
        let ms = |s: &str| s.parse::<TimeLimit>().unwrap().0.as_millis();
        assert_eq!(ms("30s"), 30_000);
        assert_eq!(ms("30"), 30_000);
        assert_eq!(ms("250ms"), 250);
        assert_eq!(ms("2m"), 120_000);
        assert!("s".parse::<TimeLimit>().is_err());
        assert!("3h".parse::<TimeLimit>().is_err());
        for t in ["30s", "250ms", "2m"] {
            assert_eq!(t.parse::<TimeLimit>().unwrap().to_string(), t);
        }
    }

    #[test]
    fn platform_matching_is_variant_aware() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert!(p.matches("linux", "arm64", None));
        assert!(!p.matches("linux", "arm", Some("v8")));
        let p = Platform::parse("linux/arm/v6").unwrap();
        assert!(!p.matches("linux", "arm", Some("v7")));
        assert!(
            Platform::parse("linux/amd64")
                .unwrap()
                .matches("linux", "amd64", None)
        );
        assert!(Platform::parse("linux").is_err());
    }
}

//! What every command shares: the image-reading options and their typed configuration,
//! credentials, the control socket's path, the runtime, progress lines, opening an image.

use anyhow::{Context, Result};
use clap::Args;
use ocifs::config::{
    ByteSize, DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_SIZE, DEFAULT_DISK_CACHE_SIZE, DEFAULT_FETCH_SIZE,
    OpenConfig, VerifyMode,
};
use ocifs::image::{Image, Platform, Progress, Source};
use ocifs::reference::Reference;
use ocifs::registry::{Registry, RegistryOptions, auth::Credentials};
use std::path::PathBuf;
use std::sync::Arc;

/// Options every image-reading command shares.
#[derive(Args, Clone)]
pub struct Common {
    /// Platform to choose from an image index (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    /// Allow plain HTTP to the registry (always allowed for localhost/127.0.0.1).
    #[arg(long)]
    insecure: bool,
    /// In-memory block cache size.
    #[arg(long, default_value_t = ByteSize(DEFAULT_CACHE_SIZE))]
    cache_size: ByteSize,
    /// Cache directory: blocks, unpacked layers, daemon logs (default ~/.cache/ocifs).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// When to check whole layer blobs against their digests.
    #[arg(long, value_enum, default_value_t = VerifyMode::Background)]
    verify: VerifyMode,
    /// Uncompressed bytes between checkpoints when building a gzip layer's index.
    #[arg(long, default_value = "4MiB")]
    span: ByteSize,
    /// Block cache granularity: what a read that misses waits for.
    #[arg(long, default_value_t = ByteSize(DEFAULT_BLOCK_SIZE))]
    block_size: ByteSize,
    /// Bytes one miss fetches (its block and the following ones, streamed in one request).
    #[arg(long, default_value_t = ByteSize(DEFAULT_FETCH_SIZE))]
    fetch_size: ByteSize,
    /// Bound of the blocks and local tars kept in the cache directory; the least recently
    /// written blobs' blocks and tars are removed when a mount ends. Also the largest chunk
    /// decoded to disk.
    #[arg(long, default_value_t = ByteSize(DEFAULT_DISK_CACHE_SIZE))]
    disk_cache_size: ByteSize,
    /// Decode gzip layers from span starts only, never resuming at an index mark with its
    /// window (to measure what mark windows buy).
    #[arg(long)]
    no_mark_windows: bool,
}

impl Common {
    /// The typed configuration for opening images.
    pub fn open_config(&self) -> Result<OpenConfig> {
        let platform = match &self.platform {
            Some(p) => Platform::parse(p)?,
            None => Platform::host(),
        };
        let block_size = self.block_size.0.clamp(4096, 64 << 20);
        Ok(OpenConfig {
            platform,
            // At least a few blocks, so one read's blocks fit at once.
            cache_size: self.cache_size.0.max(block_size * 4),
            block_size,
            fetch_size: self.fetch_size.0.max(block_size),
            disk_cache_size: self.disk_cache_size.0,
            cache_dir: self.cache_dir()?,
            verify: self.verify,
            span: self.span.0.max(64 * 1024),
            mark_windows: !self.no_mark_windows,
        })
    }

    pub fn cache_dir(&self) -> Result<PathBuf> {
        if let Some(d) = &self.cache_dir {
            return Ok(d.clone());
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .context("no --cache-dir, XDG_CACHE_HOME or HOME to put the cache in")?;
        Ok(base.join("ocifs"))
    }

    /// Turns `REF` into a source and the tag or digest to resolve in it.
    pub fn source(&self, reference: &str) -> Result<(Source, String, String)> {
        if let Some(rest) = reference.strip_prefix("oci:") {
            let slash = rest.rfind('/').map_or(0, |i| i + 1);
            let (dir, tag) = match rest[slash..].rfind(':') {
                Some(i) => (&rest[..slash + i], &rest[slash + i + 1..]),
                None => (rest, "latest"),
            };
            let source = Source::Layout {
                dir: PathBuf::from(dir),
            };
            return Ok((source, tag.to_string(), reference.to_string()));
        }
        let r = Reference::parse(reference)?;
        let registry = Registry::new(
            &r.registry,
            RegistryOptions {
                insecure: self.insecure,
                credentials: credentials(&r.registry)?,
            },
        )?;
        let what = r.manifest_reference().to_string();
        Ok((
            Source::Registry {
                registry,
                repo: r.repository.clone(),
            },
            what,
            r.to_string(),
        ))
    }
}

/// Credentials for `registry` from `REGISTRY_AUTH_FILE`, `$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`, first file that has an entry.
fn credentials(registry: &str) -> Result<Option<Credentials>> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(f));
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        files.push(PathBuf::from(d).join("config.json"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        files.push(PathBuf::from(h).join(".docker/config.json"));
    }
    for f in files {
        if let Some(c) = Credentials::from_docker_config(&f, registry)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// The control socket of the mount at `mountpoint`: named after its canonical path, in
/// `/run/ocifs` for root, else `$XDG_RUNTIME_DIR/ocifs` or `/tmp/ocifs-<uid>`.
pub fn control_socket(mountpoint: &std::path::Path) -> Result<PathBuf> {
    let canonical = canonical_mountpoint(mountpoint)
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = if uid == 0 {
        PathBuf::from("/run/ocifs")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(d).join("ocifs")
    } else {
        PathBuf::from(format!("/tmp/ocifs-{uid}"))
    };
    let id = ocifs::digest::sha256(canonical.as_os_str().as_encoded_bytes());
    Ok(dir.join(format!("{}.sock", &id[7..23])))
}

/// The canonical path of a mountpoint, found without looking at the mounted file system
/// itself (no `stat` of its root): a mount whose daemon is gone, or whose serving process is
/// still starting under a supervisor (and computes its own control socket), would not
/// answer. The parent is canonicalized; the last component, if a symbolic link (a mount
/// goes on its target), is followed with `readlink`, which never asks a mounted file system.
fn canonical_mountpoint(path: &std::path::Path) -> std::io::Result<PathBuf> {
    let mut path = path.to_path_buf();
    for _ in 0..40 {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return path.canonicalize();
        };
        let parent = if parent.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            parent
        };
        let here = parent.canonicalize()?.join(name);
        match std::fs::read_link(&here) {
            Ok(target) => path = here.parent().unwrap_or(&here).join(target),
            Err(_) => return Ok(here),
        }
    }
    Err(std::io::Error::other("too many levels of symbolic links"))
}

/// Runs `fut` on a fresh multi-threaded runtime.
pub fn block_on<T>(fut: impl std::future::Future<Output = T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(fut))
}

/// Prints a progress line per streamed layer, at most once per 10%.
pub fn progress() -> Progress {
    let last = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        u64,
    >::new()));
    Arc::new(move |digest: &str, done: u64, total: u64| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let mut last = last.lock().unwrap();
        let prev = last.entry(digest.to_string()).or_insert(u64::MAX);
        if *prev == u64::MAX || pct / 10 > *prev / 10 {
            *prev = pct;
            eprintln!(
                "ocifs: reading layer {} once (indexing or unpacking): {pct}% of {} MiB",
                &digest[..digest.len().min(19)],
                total >> 20
            );
        }
    })
}

pub async fn open(common: &Common, reference: &str) -> Result<Image> {
    let (source, what, _) = common.source(reference)?;
    let cfg = common.open_config()?;
    let readahead = ocifs::speculate::SpeculateConfig::default().readahead;
    let cache = ocifs::image::block_cache(&cfg, readahead);
    Image::open(&source, &what, &cfg, &cache, progress())
        .await
        .with_context(|| format!("opening {reference}"))
}

/// An error and its causes on one line.
pub fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mountpoint_is_named_by_its_target_whichever_way_it_is_spelled() {
        let base = std::env::temp_dir().join(format!("ocifs-cli-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("real/mnt")).unwrap();
        std::os::unix::fs::symlink("real", base.join("via")).unwrap();
        std::os::unix::fs::symlink("real/mnt", base.join("link")).unwrap();
        let want = base.canonicalize().unwrap().join("real/mnt");
        for spelling in ["real/mnt", "via/mnt", "link", "real/./mnt"] {
            let got = canonical_mountpoint(&base.join(spelling)).unwrap();
            assert_eq!(got, want, "{spelling}");
        }
        std::os::unix::fs::symlink("loop", base.join("loop")).unwrap();
        assert!(canonical_mountpoint(&base.join("loop")).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}

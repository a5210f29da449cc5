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

/// Credentials for `registry` from the first file with an entry for it, in the order
/// containers/image (podman, skopeo) reads them: `REGISTRY_AUTH_FILE`, else
/// `$XDG_RUNTIME_DIR/containers/auth.json` (`/run/containers/UID/auth.json` without it); then
/// `$XDG_CONFIG_HOME/containers/auth.json` (`~/.config/...`), then the docker config
/// (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`). A default path that cannot
/// be read (`/run/containers` is root's) counts as absent; a file a variable names must be
/// readable.
fn credentials(registry: &str) -> Result<Option<Credentials>> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    // (file, named by a variable)
    let mut files: Vec<(PathBuf, bool)> = Vec::new();
    match (var("REGISTRY_AUTH_FILE"), var("XDG_RUNTIME_DIR")) {
        (Some(f), _) => files.push((f, true)),
        (None, Some(d)) => files.push((d.join("containers/auth.json"), false)),
        // SAFETY: getuid has no preconditions.
        (None, None) => files.push((
            PathBuf::from(format!("/run/containers/{}/auth.json", unsafe {
                libc::getuid()
            })),
            false,
        )),
    }
    let home = var("HOME");
    match (var("XDG_CONFIG_HOME"), &home) {
        (Some(d), _) => files.push((d.join("containers/auth.json"), false)),
        (None, Some(h)) => files.push((h.join(".config/containers/auth.json"), false)),
        (None, None) => {}
    }
    match (var("DOCKER_CONFIG"), &home) {
        (Some(d), _) => files.push((d.join("config.json"), true)),
        (None, Some(h)) => files.push((h.join(".docker/config.json"), false)),
        (None, None) => {}
    }
    for (f, named) in files {
        match Credentials::from_docker_config(&f, registry) {
            Ok(Some(c)) => return Ok(Some(c)),
            Ok(None) => {}
            Err(ocifs::Error::Io(e))
                if !named && e.kind() == std::io::ErrorKind::PermissionDenied => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// The control socket of the mount at `mountpoint`: named after its canonical path, in
/// `/run/ocifs` for root, else `$XDG_RUNTIME_DIR/ocifs` or `/tmp/ocifs-<uid>`.
pub fn control_socket(mountpoint: &std::path::Path) -> Result<PathBuf> {
    let canonical = mountpoint
        .canonicalize()
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

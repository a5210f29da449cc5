//! Argument parsing and the commands. `mount` without `--foreground` re-executes itself as a
//! detached daemon and waits for its "ready" line, like other FUSE mounters.

mod commands;
mod index;
mod mount;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ocifs::config::{
    ByteSize, DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_SIZE, DEFAULT_DISK_CACHE_SIZE, DEFAULT_FETCH_SIZE,
    OpenConfig, VerifyMode,
};
use ocifs::image::{Platform, Source};
use ocifs::reference::Reference;
use ocifs::registry::{Registry, RegistryOptions, auth::Credentials};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ocifs",
    version,
    about = "Container images from a registry as a lazily loaded read-only file system"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

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

#[derive(Subcommand)]
enum Cmd {
    /// Mount an image read-only at MOUNTPOINT; returns once the mount is ready.
    Mount {
        #[command(flatten)]
        common: Common,
        /// Stay attached, log to stderr; Ctrl-C unmounts.
        #[arg(long)]
        foreground: bool,
        /// Internal: run as the detached daemon child of `mount`.
        #[arg(long, hide = true)]
        daemon_child: bool,
        /// Write the ordered list of file ranges read to FILE when unmounted.
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
        /// Prefetch the ranges of a recorded profile in the background, in order.
        #[arg(long, value_name = "FILE")]
        prefetch: Option<PathBuf>,
        /// Do not prefetch eStargz prioritized files (those before .prefetch.landmark).
        #[arg(long)]
        no_prefetch: bool,
        /// Do not fetch a file whole in the background when it is read at scattered places
        /// (binaries and libraries faulted in page by page), nor what a program loads once
        /// its first page is read, nor a directory's files read together, nor (without a
        /// planned prefetch) the files of the image's configured command at mount.
        #[arg(long)]
        no_whole_files: bool,
        /// Fetch the image's layers of at most this many compressed bytes whole as soon as the
        /// mount is ready, smallest first and at most this much in all (not with a planned
        /// prefetch: a profile or eStargz prioritized files); 0 turns it off.
        #[arg(long, default_value = "16MiB")]
        small_layers: ByteSize,
        /// Do not copy a verified layer's files into a local file (in the cache directory,
        /// for as long as the mount lasts) to serve their reads from; without the copy, cold
        /// reads decode the layer's compressed blocks again.
        #[arg(long)]
        no_local_copy: bool,
        reference: String,
        mountpoint: PathBuf,
    },
    /// Unmount an ocifs mount.
    Umount { mountpoint: PathBuf },
    /// Show a mount's statistics: bytes and requests per layer, cache, latency, prefetch.
    Stats {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        mountpoint: PathBuf,
    },
    /// Show the resolved digest, platforms, config and layers of an image.
    Inspect {
        #[command(flatten)]
        common: Common,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        reference: String,
    },
    /// List files of an image without mounting it.
    Ls {
        #[command(flatten)]
        common: Common,
        /// Long format: mode, owner, size, mtime, link target.
        #[arg(short = 'l')]
        long: bool,
        /// Recurse into directories.
        #[arg(short = 'R')]
        recursive: bool,
        reference: String,
        path: Option<String>,
    },
    /// Write one file of an image to stdout.
    Cat {
        #[command(flatten)]
        common: Common,
        reference: String,
        path: String,
    },
    /// Write a raw manifest (no digest) or blob/manifest (by digest) to stdout.
    Fetch {
        #[command(flatten)]
        common: Common,
        reference: String,
        digest: Option<String>,
    },
    /// Build (or find) the checkpoint indexes of an image's gzip layers; `--push` publishes
    /// them to the registry as an artifact referring to the image.
    Index {
        #[command(flatten)]
        common: Common,
        /// Upload the indexes next to the image (referrers API, or the sha256-<hex> tag).
        #[arg(long)]
        push: bool,
        reference: String,
    },
    /// Rewrite an image's layers as eStargz (profiled files first) and push it to DESTINATION
    /// (a registry reference with a tag, or oci:PATH[:TAG]).
    Convert {
        #[command(flatten)]
        common: Common,
        /// Convert to eStargz (the one target format).
        #[arg(long, required = true)]
        estargz: bool,
        /// An access profile from `ocifs mount --record`: its files go first.
        #[arg(long, value_name = "FILE")]
        profile: Option<PathBuf>,
        /// Size of independently readable chunks of large files.
        #[arg(long, default_value = "4MiB")]
        chunk_size: ByteSize,
        source: String,
        destination: String,
    },
    /// List a repository's tags.
    Tags {
        #[command(flatten)]
        common: Common,
        repository: String,
    },
}

/// Entry point: runs the command, prints one clear error line on failure.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemonish = matches!(cli.cmd, Cmd::Mount { .. });
    if !daemonish {
        // Output piped into `head` ends the command quietly when the reader goes, as with
        // coreutils (Rust ignores SIGPIPE, and `println!` then panics). Sockets are not
        // affected: the standard library sends with MSG_NOSIGNAL.
        // SAFETY: restoring a signal's default disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let filter = std::env::var("OCIFS_LOG").unwrap_or_else(|_| {
        if daemonish {
            "info".into()
        } else {
            "warn".into()
        }
    });
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    match commands::run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ocifs: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

impl Common {
    /// The typed configuration for opening images.
    fn open_config(&self) -> Result<OpenConfig> {
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

    fn cache_dir(&self) -> Result<PathBuf> {
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
    fn source(&self, reference: &str) -> Result<(Source, String, String)> {
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
fn control_socket(mountpoint: &std::path::Path) -> Result<PathBuf> {
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
fn block_on<T>(fut: impl std::future::Future<Output = T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(fut))
}

//! What every command shares: the image-reading options and their typed configuration,
//! credentials, the control socket's path, the runtime, progress lines, opening an image.

use anyhow::{Context, Result};
use clap::Args;
use ocifs::config::{
    ByteSize, DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_SIZE, DEFAULT_DISK_CACHE_SIZE, DEFAULT_FETCH_SIZE,
    DEFAULT_READ_TIMEOUT, OpenConfig, TimeLimit, Transfer, VerifyMode,
};
use ocifs::image::{Image, Platform, Progress, Source};
use ocifs::reference::Reference;
use ocifs::registry::hosts::{DEFAULT_HOSTS_DIR, HostsDir};
use ocifs::registry::registries_conf::RegistriesConf;
use ocifs::registry::{MirrorConfig, Repo, RepoOptions, auth::Credentials};
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
    /// containerd's hosts directory: mirrors per registry in HOST/hosts.toml (`none`: ignore).
    #[arg(long, default_value = DEFAULT_HOSTS_DIR)]
    hosts_dir: PathBuf,
    /// A containers registries.conf to read instead of /etc/containers/registries.conf and
    /// its registries.conf.d/ (`none`: ignore both).
    #[arg(long)]
    registries_conf: Option<PathBuf>,
    /// Cache directory: blocks, indexes, unpacked layers, daemon logs (default ~/.cache/ocifs).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// When to check whole layer blobs against their digests.
    #[arg(long, value_enum, default_value_t = VerifyMode::Background)]
    verify: VerifyMode,
    /// A registry answer with no headers, or too few body bytes (see --min-rate), for this
    /// long is abandoned and asked for again from the last byte received.
    #[arg(long, default_value_t = TimeLimit(Transfer::DEFAULT.idle_timeout))]
    idle_timeout: TimeLimit,
    /// The least rate of a registry answer's body, per second, over each --idle-timeout.
    #[arg(long, default_value_t = ByteSize(Transfer::DEFAULT.min_rate))]
    min_rate: ByteSize,
}

/// How a mount (or `run`, `index`) fetches and keeps bytes: on the commands that serve
/// reads for long, not on every command's `--help`.
#[derive(Args, Clone, Debug)]
pub struct Tuning {
    /// In-memory block cache size.
    #[arg(long, default_value_t = ByteSize(DEFAULT_CACHE_SIZE))]
    cache_size: ByteSize,
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
    /// A read of a mounted file not answered within this fails with EIO (and a log line).
    #[arg(long, default_value_t = TimeLimit(DEFAULT_READ_TIMEOUT))]
    read_timeout: TimeLimit,
}

impl Default for Tuning {
    /// The defaults the flags have.
    fn default() -> Self {
        Tuning {
            cache_size: ByteSize(DEFAULT_CACHE_SIZE),
            span: ByteSize(4 << 20),
            block_size: ByteSize(DEFAULT_BLOCK_SIZE),
            fetch_size: ByteSize(DEFAULT_FETCH_SIZE),
            disk_cache_size: ByteSize(DEFAULT_DISK_CACHE_SIZE),
            no_mark_windows: false,
            read_timeout: TimeLimit(DEFAULT_READ_TIMEOUT),
        }
    }
}

impl Common {
    /// Whether `--platform` was given (else the host's platform is chosen).
    pub fn platform_given(&self) -> bool {
        self.platform.is_some()
    }

    /// The typed configuration for opening images, with the default tuning.
    pub fn open_config(&self) -> Result<OpenConfig> {
        self.open_config_tuned(&Tuning::default())
    }

    /// The typed configuration for opening images with `tuning`.
    pub fn open_config_tuned(&self, tuning: &Tuning) -> Result<OpenConfig> {
        let platform = match &self.platform {
            Some(p) => Platform::parse(p)?,
            None => Platform::host(),
        };
        let t = tuning;
        let block_size = t.block_size.0.clamp(4096, 64 << 20);
        Ok(OpenConfig {
            platform,
            // At least a few blocks, so one read's blocks fit at once.
            cache_size: t.cache_size.0.max(block_size * 4),
            block_size,
            fetch_size: t.fetch_size.0.max(block_size),
            disk_cache_size: t.disk_cache_size.0,
            cache_dir: self.cache_dir()?,
            verify: self.verify,
            span: t.span.0.max(64 * 1024),
            mark_windows: !t.no_mark_windows,
            read_timeout: t.read_timeout.0.max(std::time::Duration::from_millis(100)),
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
        let routes = self.mirrors()?.routes(&r, self.insecure)?;
        let opts = RepoOptions {
            spool_dir: Some(self.cache_dir()?.join("spool")),
            transfer: Transfer {
                idle_timeout: self
                    .idle_timeout
                    .0
                    .max(std::time::Duration::from_millis(100)),
                min_rate: self.min_rate.0,
            },
        };
        let name = format!("{}/{}", r.registry, r.repository);
        let find = |e: &ocifs::registry::Endpoint| credentials(e.credential_key());
        let repo = Repo::connect(&name, &routes, &find, opts)?;
        let what = r.manifest_reference().to_string();
        Ok((Source::Registry { repo }, what, r.to_string()))
    }

    /// The mirror configuration: `--hosts-dir` and `--registries-conf` (or the system's).
    fn mirrors(&self) -> Result<MirrorConfig> {
        let none = |p: &PathBuf| p.as_os_str() == "none";
        let hosts_dir = (!none(&self.hosts_dir)).then(|| HostsDir(self.hosts_dir.clone()));
        let registries = match &self.registries_conf {
            Some(p) if none(p) => RegistriesConf::default(),
            Some(p) => {
                if !p.exists() {
                    anyhow::bail!("--registries-conf {}: no such file", p.display());
                }
                RegistriesConf::load(std::slice::from_ref(p))?
            }
            None => RegistriesConf::system()?,
        };
        Ok(MirrorConfig {
            hosts_dir,
            registries,
        })
    }
}

/// Credentials for `registry` from the first file with an entry for it, in the order
/// containers/image (podman, skopeo) reads them: `REGISTRY_AUTH_FILE`, else
/// `$XDG_RUNTIME_DIR/containers/auth.json` (`/run/containers/UID/auth.json` without it); then
/// `$XDG_CONFIG_HOME/containers/auth.json` (`~/.config/...`), then the docker config
/// (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`). A default path that cannot
/// be read (`/run/containers` is root's) counts as absent; a file a variable names must be
/// readable.
fn credentials(registry: &str) -> ocifs::Result<Option<Credentials>> {
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
            Err(e) => return Err(e),
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
    open_tuned(common, &Tuning::default(), reference).await
}

/// [`open`] with `tuning`.
pub async fn open_tuned(common: &Common, tuning: &Tuning, reference: &str) -> Result<Image> {
    let (source, what, _) = common.source(reference)?;
    let cfg = common.open_config_tuned(tuning)?;
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

/// Mount options beyond opening the image.
pub struct MountExtras {
    pub record: Option<PathBuf>,
    pub prefetch: Option<PathBuf>,
    pub no_prefetch: bool,
    pub no_whole_files: bool,
    /// Layers of at most this many compressed bytes are fetched whole at mount (0: none).
    pub small_layers: u64,
    pub no_local_copy: bool,
    pub tuning: Tuning,
}

impl MountExtras {
    /// The speculation these options ask for (every other limit at its default).
    pub fn speculate_config(&self) -> ocifs::speculate::SpeculateConfig {
        ocifs::speculate::SpeculateConfig {
            guesses: !self.no_whole_files,
            landmarks: !self.no_prefetch,
            small_layers: self.small_layers,
            ..Default::default()
        }
    }
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

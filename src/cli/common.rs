//! What every command shares: the image-reading options and their typed configuration,
//! the registry (reached as `access.rs` says), the control socket's path, the runtime,
//! signals, output and progress lines, opening an image.

use super::access;
use anyhow::{Context, Result};
use clap::Args;
use ocifs::config::{
    ByteSize, DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_SIZE, DEFAULT_DISK_CACHE_SIZE, DEFAULT_FETCH_SIZE,
    DEFAULT_FILL_WAIT, DEFAULT_READ_TIMEOUT, OpenConfig, TimeLimit, Transfer, VerifyMode,
};
use ocifs::image::{Image, Platform, Progress, Source};
use ocifs::reference::Reference;
use ocifs::registry::hosts::{DEFAULT_HOSTS_DIR, HostsDir};
use ocifs::registry::registries_conf::RegistriesConf;
use ocifs::registry::{MirrorConfig, Repo, RepoOptions, auth::Credentials};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Options every image-reading command shares.
#[derive(Args, Clone)]
pub struct Common {
    /// No progress lines (errors and results are still printed).
    #[arg(short, long)]
    pub quiet: bool,
    /// Platform to choose from an image index (default: this machine's).
    #[arg(long, help_heading = "Registry")]
    platform: Option<String>,
    /// Allow plain HTTP to the registry when it does not answer TLS (always allowed for
    /// localhost/127.0.0.1); certificates are still checked when it does.
    #[arg(long, help_heading = "Registry")]
    insecure: bool,
    /// containerd's hosts directory: mirrors per registry in HOST/hosts.toml (`none`: ignore).
    #[arg(long, help_heading = "Registry", default_value = DEFAULT_HOSTS_DIR)]
    hosts_dir: PathBuf,
    /// A containers registries.conf to read instead of /etc/containers/registries.conf and
    /// its registries.conf.d/ (`none`: ignore both).
    #[arg(long, help_heading = "Registry")]
    registries_conf: Option<PathBuf>,
    /// Require HTTPS and check the registry's certificate (`true`, even for localhost), or
    /// accept any certificate and allow plain HTTP (`false`), as skopeo and podman do.
    /// Default: check certificates; plain HTTP only for localhost or with --insecure.
    #[arg(long, help_heading = "Registry", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    tls_verify: Option<bool>,
    /// Certificates for the registry: *.crt authorities, *.cert + *.key client pairs
    /// (default: /etc/containers/certs.d/HOST:PORT, then /etc/docker/certs.d/HOST:PORT).
    #[arg(long, help_heading = "Registry", value_name = "DIR")]
    cert_dir: Option<PathBuf>,
    /// Credentials for the registry (the password is asked for when left out).
    #[arg(long, help_heading = "Registry", value_name = "USER[:PASSWORD]")]
    creds: Option<String>,
    /// Credentials file in containers' auth.json (or docker's config.json) format (default:
    /// $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json).
    #[arg(long, help_heading = "Registry", value_name = "FILE")]
    authfile: Option<PathBuf>,
    /// Cache directory: blocks, indexes, unpacked layers, daemon logs (default ~/.cache/ocifs).
    #[arg(long, help_heading = "Cache and fetching")]
    cache_dir: Option<PathBuf>,
    /// When to check whole layer blobs against their digests.
    #[arg(long, help_heading = "Cache and fetching", value_enum, default_value_t = VerifyMode::Background)]
    verify: VerifyMode,
    /// A registry answer with no headers, or too few body bytes (see --min-rate), for this
    /// long is abandoned and asked for again from the last byte received.
    #[arg(long, help_heading = "Cache and fetching", default_value_t = TimeLimit(Transfer::DEFAULT.idle_timeout))]
    idle_timeout: TimeLimit,
    /// The least rate of a registry answer's body, per second, over each --idle-timeout.
    #[arg(long, help_heading = "Cache and fetching", default_value_t = ByteSize(Transfer::DEFAULT.min_rate))]
    min_rate: ByteSize,
    /// How long reads wait for a pull-through cache that answers a range with the whole blob
    /// (it has not stored it yet) to store it and answer by range, before streaming the blob
    /// whole from it (0: at once). Keep it below --read-timeout.
    #[arg(long, help_heading = "Cache and fetching", default_value_t = TimeLimit(DEFAULT_FILL_WAIT))]
    cache_fill_wait: TimeLimit,
}

/// How a mount (or `run`, `index`) fetches and keeps bytes: on the commands that serve
/// reads for long, not on every command's `--help`.
#[derive(Args, Clone, Debug)]
pub struct Tuning {
    /// In-memory block cache size.
    #[arg(long, help_heading = "Cache and fetching", default_value_t = ByteSize(DEFAULT_CACHE_SIZE))]
    cache_size: ByteSize,
    /// Uncompressed bytes between checkpoints when building a gzip layer's index.
    #[arg(long, help_heading = "Cache and fetching", default_value = "4MiB")]
    span: ByteSize,
    /// Block cache granularity: what a read that misses waits for.
    #[arg(long, help_heading = "Cache and fetching", default_value_t = ByteSize(DEFAULT_BLOCK_SIZE))]
    block_size: ByteSize,
    /// Bytes one miss fetches (its block and the following ones, streamed in one request).
    #[arg(long, help_heading = "Cache and fetching", default_value_t = ByteSize(DEFAULT_FETCH_SIZE))]
    fetch_size: ByteSize,
    /// Bound of the blocks and local tars kept in the cache directory; the least recently
    /// written blobs' blocks and tars are removed when a mount ends. Also the largest chunk
    /// decoded to disk.
    #[arg(long, help_heading = "Cache and fetching", default_value_t = ByteSize(DEFAULT_DISK_CACHE_SIZE))]
    disk_cache_size: ByteSize,
    /// Decode gzip layers from span starts only, never resuming at an index mark with its
    /// window (to measure what mark windows buy).
    #[arg(long, help_heading = "Cache and fetching")]
    no_mark_windows: bool,
    /// A read of a mounted file not answered within this fails with EIO (and a log line).
    #[arg(long, help_heading = "Cache and fetching", default_value_t = TimeLimit(DEFAULT_READ_TIMEOUT))]
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
            copy_first_pass: false,
            fetch_announced_front: false,
            fetch_small_layers: 0,
        })
    }

    /// Whether whole layer blobs are checked against their digests (not `--verify off`).
    pub fn verifies(&self) -> bool {
        self.verify != VerifyMode::Off
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

    /// Turns `REF` into a source and the tag or digest to resolve in it, and a name to show:
    /// `oci:DIR[:TAG]` is an OCI layout; a registry reference may carry skopeo's `docker://`.
    /// A registry that may be plain HTTP is asked whether it speaks TLS, with the GET of
    /// the reference's manifest that opening an image starts with (see `registry/question.rs`).
    pub async fn source(&self, reference: &str) -> Result<(Source, String, String)> {
        self.source_asking(reference, true).await
    }

    /// [`Common::source`] for a command that does not start by GETting the reference's
    /// manifest (`tags`, `convert`): the TLS question asks for no manifest.
    pub async fn source_only(&self, reference: &str) -> Result<(Source, String, String)> {
        self.source_asking(reference, false).await
    }

    async fn source_asking(
        &self,
        reference: &str,
        manifest_first: bool,
    ) -> Result<(Source, String, String)> {
        let reference = reference.strip_prefix("docker://").unwrap_or(reference);
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
        let verify = self.tls_verify;
        // Plain HTTP allowed (then tried only when the registry does not answer TLS).
        let insecure = match verify {
            Some(false) => true,
            _ => self.insecure,
        };
        let mut routes = self.mirrors()?.routes(&r, insecure)?;
        // The registry itself, when it may be plain HTTP: asked whether it speaks TLS once
        // its client exists (below).
        let mut probe = None;
        for (i, route) in routes.iter_mut().enumerate() {
            let e = &mut route.endpoint;
            // --cert-dir, else certs.d/HOST:PORT, adds to what hosts.toml says of the host.
            let certs = access::tls(self.cert_dir.as_deref(), verify.unwrap_or(true), &e.host)?;
            e.tls.ca.extend(certs.ca);
            if e.tls.client.is_empty() {
                e.tls.client = certs.client;
            }
            e.tls.skip_verify |= certs.skip_verify;
            if route.mirror || e.scheme != "http" {
                continue;
            }
            if verify == Some(true) {
                e.scheme = "https".into();
            } else {
                probe = Some(i);
            }
        }
        let opts = RepoOptions {
            spool_dir: Some(self.cache_dir()?.join("spool")),
            transfer: Transfer {
                idle_timeout: self
                    .idle_timeout
                    .0
                    .max(std::time::Duration::from_millis(100)),
                min_rate: self.min_rate.0,
            },
            fill_wait: self.cache_fill_wait.0,
        };
        // --creds for the registry itself; the auth files for each host.
        let given = match self.creds.as_deref() {
            Some(c) => Some(access::credentials(
                Some(c),
                None,
                &r.registry,
                &r.repository,
            )?),
            None => None,
        };
        let mut found: HashMap<String, Option<Credentials>> = HashMap::new();
        for route in &routes {
            let key = route.endpoint.credential_key().to_string();
            let c = match &given {
                Some(c) if !route.mirror => c.clone(),
                _ => access::credentials(None, self.authfile.as_deref(), &key, &route.repo)?,
            };
            found.entry(key).or_insert(c);
        }
        let name = format!("{}/{}", r.registry, r.repository);
        let find =
            |e: &ocifs::registry::Endpoint| Ok(found.get(e.credential_key()).cloned().flatten());
        let mut repo = Repo::connect(&name, &routes, &find, opts.clone())?;
        // As skopeo: https first, plain HTTP only when TLS is not answered. Asked with the
        // registry's own plain client, and when it is the first host, for the manifest: a
        // plain registry's answer is the manifest, and leaves its connection in the pool.
        let first = (probe == Some(0) && manifest_first)
            .then(|| (routes[0].repo.as_str(), r.manifest_reference()));
        if let Some(i) = probe
            && let Some(registry) = repo.host(i)
            && registry.speaks_tls(first).await == Some(true)
        {
            routes[i].endpoint.scheme = "https".into();
            repo = Repo::connect(&name, &routes, &find, opts)?;
        }
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

/// The exit status of a command interrupted by a signal (as shells report SIGINT).
pub const INTERRUPTED: u8 = 130;

/// SIGINT, SIGTERM and SIGHUP, listened for from creation on (they no longer end the
/// process).
pub struct Stop {
    signals: [tokio::signal::unix::Signal; 3],
}

impl Stop {
    pub fn listen() -> Result<Stop> {
        use tokio::signal::unix::{SignalKind, signal};
        let s = |k| signal(k).context("listening for signals");
        Ok(Stop {
            signals: [
                s(SignalKind::interrupt())?,
                s(SignalKind::terminate())?,
                s(SignalKind::hangup())?,
            ],
        })
    }

    /// Resolves when one of the signals arrives.
    pub async fn wait(&mut self) {
        let [a, b, c] = &mut self.signals;
        tokio::select! {
            _ = a.recv() => {}
            _ = b.recv() => {}
            _ = c.recv() => {}
        }
    }
}

/// Runs `fut` on a fresh multi-threaded runtime.
pub fn block_on<T>(fut: impl std::future::Future<Output = T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(block_sigpipe)
        .build()?;
    Ok(rt.block_on(fut))
}

/// Blocks SIGPIPE on the calling thread. A vectored write to a socket the peer closed
/// (`writev` takes no MSG_NOSIGNAL; the HTTP clients write requests that way) raises it at
/// the writing thread, which would end a command that keeps SIGPIPE's default for its
/// stdout without a word (seen with HTTP/2: `ocifs cat` against a registry refusing its
/// client certificate); blocked, the write fails with EPIPE and the request reports it. The
/// HTTP clients' connections are driven on the runtime's threads, which call this as they
/// start.
fn block_sigpipe() {
    // SAFETY: plain signal-mask calls on a set this function owns.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Prints a line to stdout. A closed stdout (the reader went away) is not worth a panic:
/// the line is dropped.
pub fn out(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Prints a line to stderr, dropping it when stderr is closed.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Progress of the layers read once (indexed or unpacked): a bar per layer (bytes, rate,
/// time left) on a terminal, else a line at most once per 10%; nothing with `-q`.
pub fn progress(quiet: bool) -> Progress {
    progress_of(quiet, "reading layer {} once (indexing or unpacking)")
}

/// [`progress`] whose lines say `doing` (`{}` stands for the layer).
pub fn progress_of(quiet: bool, doing: &'static str) -> Progress {
    use std::io::IsTerminal;
    if quiet {
        return Arc::new(|_: &str, _: u64, _: u64| {});
    }
    if std::io::stderr().is_terminal() {
        let bars = Bars::default();
        return Arc::new(move |digest: &str, done: u64, total: u64| {
            bars.at(&format!("layer {}", short(digest)), done, total)
        });
    }
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
            let doing = doing.replace("{}", short(digest));
            say(&format!("ocifs: {doing}: {pct}% of {} MiB", total >> 20));
        }
    })
}

/// `sha256:0123456789ab`: enough of a digest to tell layers apart.
fn short(digest: &str) -> &str {
    &digest[..digest.len().min(19)]
}

/// Progress bars on a terminal, one per job, kept until the job is done.
#[derive(Default, Clone)]
pub struct Bars {
    multi: indicatif::MultiProgress,
    bars: Arc<std::sync::Mutex<std::collections::HashMap<String, indicatif::ProgressBar>>>,
}

impl Bars {
    /// Job `name` has done `done` of `total` bytes.
    pub fn at(&self, name: &str, done: u64, total: u64) {
        let mut bars = self.bars.lock().unwrap();
        let bar = bars.entry(name.to_string()).or_insert_with(|| {
            let b = self.multi.add(indicatif::ProgressBar::new(total));
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            b.set_message(name.to_string());
            b
        });
        bar.set_length(total);
        bar.set_position(done);
        if done >= total {
            bar.finish();
        }
    }
}
pub async fn open(common: &Common, reference: &str) -> Result<Image> {
    open_tuned(common, &Tuning::default(), reference).await
}

/// [`open`] with `tuning`.
pub async fn open_tuned(common: &Common, tuning: &Tuning, reference: &str) -> Result<Image> {
    let (source, what, _) = common.source(reference).await?;
    let cfg = common.open_config_tuned(tuning)?;
    let readahead = ocifs::speculate::SpeculateConfig::default().readahead;
    let cache = ocifs::image::block_cache(&cfg, readahead);
    Image::open(&source, &what, &cfg, &cache, progress(common.quiet))
        .await
        .with_context(|| format!("opening {reference}"))
}

/// What to fetch before it is read, and whether to keep local copies: the same flags for
/// `mount`, `store` and `run`.
#[derive(Args, Clone, Debug)]
pub struct Speculation {
    /// Do not prefetch eStargz prioritized files (those before .prefetch.landmark).
    #[arg(long)]
    pub no_prefetch: bool,
    /// Do not fetch a file whole in the background when it is read at scattered places
    /// (binaries and libraries faulted in page by page), nor what a program loads once
    /// its first page is read, nor a directory's files read together, nor (without a
    /// planned prefetch) the files of the image's configured command at mount, nor
    /// /etc/passwd and /etc/group, which a runtime reads before it starts a container.
    #[arg(long)]
    pub no_whole_files: bool,
    /// Fetch the image's layers of at most this many compressed bytes whole as soon as they
    /// are opened, smallest first and at most this much in all (not with a planned
    /// prefetch: a profile or eStargz prioritized files); 0 turns it off.
    #[arg(long, default_value = "16MiB")]
    pub small_layers: ByteSize,
    /// Do not copy a verified layer's files into a local file (in the cache directory,
    /// for as long as the mount lasts) to serve their reads from, nor keep the decoded tar
    /// of a layer indexed for the first time; without them, cold reads decode the layer's
    /// compressed blocks again.
    #[arg(long)]
    pub no_local_copy: bool,
}

impl Speculation {
    /// The speculation these options ask for (every other limit at its default).
    pub fn config(&self) -> ocifs::speculate::SpeculateConfig {
        ocifs::speculate::SpeculateConfig {
            guesses: !self.no_whole_files,
            landmarks: !self.no_prefetch,
            small_layers: self.small_layers.0,
            ..Default::default()
        }
    }

    /// Where local copies go and how much they may take, unless turned off.
    pub fn local_copies(&self, open: &OpenConfig) -> Option<(PathBuf, u64)> {
        (!self.no_local_copy).then(|| (open.cache_dir.join("copies"), open.disk_cache_size))
    }

    /// `open` for a command that serves for a while (mount, store, run): a layer indexed
    /// for the first time is served from the decoded tar its pass leaves, unless local
    /// copies are off.
    pub fn serving(&self, mut open: OpenConfig) -> OpenConfig {
        open.copy_first_pass = !self.no_local_copy;
        open.fetch_announced_front = !self.no_prefetch;
        open.fetch_small_layers = self.small_layers.0;
        open
    }
}

/// Mount options beyond opening the image.
pub struct MountExtras {
    pub record: Option<PathBuf>,
    pub prefetch: Option<PathBuf>,
    pub speculation: Speculation,
    pub tuning: Tuning,
}

impl MountExtras {
    /// `open` for a mount or run (see [`Speculation::serving`]): with a profile to prefetch,
    /// no small layer is streamed in at open (the plan brings what the start reads).
    pub fn serving(&self, open: OpenConfig) -> OpenConfig {
        let mut open = self.speculation.serving(open);
        if self.prefetch.is_some() {
            open.fetch_small_layers = 0;
        }
        open
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

//! Starting a mount, as a library: [`open`] resolves and opens an image with its block
//! cache and speculation; [`start`] mounts it, starts the background work (verification,
//! local copies, speculation) and returns a [`Mount`] whose guards stop that work when it
//! ends; [`Mount::run`] serves until the file system is unmounted or `shutdown` resolves. The
//! CLI and the tests drive a mount the same way, with their own dependencies (source,
//! configuration, mountpoint, shutdown future).
//!
//! As root, `ocifs mount` is two processes: [`supervise`] holds the kernel's FUSE connection
//! and mounts it, and a serving process started by it runs [`open`] and [`serve_supervised`]
//! over a socket pair ([`relay`], [`wire`]); when the serving process dies, another takes over
//! and the mount stays up.

pub mod control;
pub mod kernel;
pub mod relay;
pub mod run;
pub mod supervise;
pub mod wire;

pub use control::{daemon_pid, fetch_stats};
pub use kernel::{
    CONVERGED_READAHEAD_KIB, Mounted, check_mountpoint, check_ocifs_mount, mounted_at,
    raise_readahead, unmount, unmount_own,
};

use crate::config::{OpenConfig, VerifyMode};
use crate::error::{Error, Result};
use crate::fuse::OcifsFs;
use crate::image::{Image, Progress, Source};
use crate::serve::ServedImage;
use crate::speculate::{SpeculateConfig, Speculator};
use crate::stats::{Access, ProcessFigures};
use crate::task::TaskGuard;
use fuser::{Config, MountOption, SessionACL};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// FUSE session threads; reads are handed to tokio, so a few suffice. A supervisor ends a
/// serving process's session with one `DESTROY` per thread.
const SESSION_THREADS: usize = 4;
/// Background work waits until no read has been served for this long.
const IDLE: Duration = Duration::from_millis(30);

/// How one mount is served, beyond the image.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub mountpoint: PathBuf,
    /// The name `/proc/mounts` shows (`ocifs:REF`).
    pub fsname: String,
    /// Where `ocifs stats` finds the mount's control socket.
    pub control: Option<PathBuf>,
    /// Local copies of verified layers: directory and disk bound (`None`: off).
    pub local_copies: Option<(PathBuf, u64)>,
}

/// Resolves `reference` in `source` and opens it for serving: the block cache `cfg`
/// describes, the image, and the speculation `spec` sets up (with `profile` to prefetch);
/// `record` keeps every read for a profile.
pub async fn open(
    source: &Source,
    reference: &str,
    cfg: &OpenConfig,
    spec: SpeculateConfig,
    profile: Option<Vec<Access>>,
    record: bool,
    progress: Progress,
) -> Result<ServedImage> {
    let start = Instant::now();
    let cache = crate::image::block_cache(cfg, spec.readahead);
    let image = Arc::new(Image::open(source, reference, cfg, &cache, progress).await?);
    let speculator = Arc::new(Speculator::new(spec, &image, cache.clone(), profile));
    Ok(ServedImage::new(
        image,
        cache,
        speculator,
        record,
        start.elapsed(),
        cfg.read_timeout,
    ))
}

/// A mounted image and its background work.
pub struct Mount {
    served: Arc<ServedImage>,
    mountpoint: PathBuf,
    /// Resolves when the FUSE session ends (the file system was unmounted, or the supervisor
    /// ended the session).
    ended: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
    /// Served for a supervisor, which owns the mount: never unmounted from here.
    supervised: bool,
    /// Verification, local copies, speculation: stopped when the mount ends.
    tasks: Vec<TaskGuard>,
    _control: Option<control::SocketGuard>,
}

/// Where the FUSE session gets its requests.
enum Channel {
    /// fuser mounts the file system itself (`/dev/fuse`, or fusermount3 without root).
    Mount,
    /// A supervisor's channel ([`supervise`]); the file system is mounted already.
    Supervised { channel: OwnedFd, restarts: u32 },
}

/// Mounts `served` at `opts.mountpoint` with its background work under way: verification
/// (in `verify` mode `background`), local copies as layers are verified (and, once every
/// layer is local, a larger kernel read-ahead), and speculation. Returns once the mount is
/// ready.
pub async fn start(served: ServedImage, verify: VerifyMode, opts: MountOptions) -> Result<Mount> {
    check_mountpoint(&opts.mountpoint)?;
    start_with(served, verify, opts, Channel::Mount).await
}

/// [`start`] for a serving process under a supervisor: the file system is already mounted
/// at `opts.mountpoint` by the supervisor, whose requests arrive on `channel`
/// ([`supervise::inherited_channel`]); `restarts` processes served it before this one.
/// Returns once the session has started (the supervisor's `INIT` answered).
pub async fn serve_supervised(
    served: ServedImage,
    verify: VerifyMode,
    opts: MountOptions,
    channel: OwnedFd,
    restarts: u32,
) -> Result<Mount> {
    start_with(
        served,
        verify,
        opts,
        Channel::Supervised { channel, restarts },
    )
    .await
}

async fn start_with(
    served: ServedImage,
    verify: VerifyMode,
    opts: MountOptions,
    channel: Channel,
) -> Result<Mount> {
    let served = Arc::new(served);
    let (mounted, is_mounted) = tokio::sync::oneshot::channel::<()>();
    let mut tasks = Vec::new();
    if verify != VerifyMode::Off {
        tasks.push(TaskGuard::spawn(converge(
            served.clone(),
            verify == VerifyMode::Background,
            opts.local_copies.clone(),
            opts.mountpoint.clone(),
            is_mounted,
        )));
    }
    tasks.extend(served.speculator.start(&served.image));
    let process = match &channel {
        Channel::Mount => ProcessFigures::this(),
        Channel::Supervised { restarts, .. } => ProcessFigures {
            supervisor: Some(std::os::unix::process::parent_id()),
            restarts: *restarts,
            ..ProcessFigures::this()
        },
    };
    let control = match &opts.control {
        Some(path) => Some(control::stats_socket(served.clone(), path, process)?),
        None => None,
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(opts.fsname.clone()),
        MountOption::Subtype("ocifs".into()),
        MountOption::DefaultPermissions,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(SESSION_THREADS);
    let fs = OcifsFs::new(served.clone(), tokio::runtime::Handle::current());
    let supervised = matches!(channel, Channel::Supervised { .. });
    let session = match channel {
        Channel::Mount => {
            config.clone_fd = true;
            fuser::spawn_mount(fs, &opts.mountpoint, &config)?
        }
        Channel::Supervised { channel, .. } => {
            // Cloned descriptors are a /dev/fuse feature; the session threads share the
            // socket, each read one whole request as from /dev/fuse.
            config.clone_fd = false;
            let fs = fs.with_max_request(supervise::MAX_REQUEST);
            // The handshake blocks until the supervisor sends the kernel's INIT.
            let handshake = tokio::task::spawn_blocking(move || {
                fuser::Session::from_fd(fs, channel, SessionACL::All, config)
            });
            handshake
                .await
                .map_err(|e| Error::Io(std::io::Error::other(e)))??
                .spawn()?
        }
    };
    let (tx, ended) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(session.join());
    });
    let _ = mounted.send(());
    Ok(Mount {
        served,
        mountpoint: opts.mountpoint,
        ended,
        supervised,
        tasks,
        _control: control,
    })
}

impl Mount {
    /// The image being served.
    pub fn served(&self) -> &Arc<ServedImage> {
        &self.served
    }

    /// Serves until the file system is unmounted (`ocifs umount`, `umount`) or `shutdown`
    /// resolves (then it unmounts it, unless it serves for a supervisor: see [`Ended`]);
    /// stops the background work.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<Ended> {
        let path = self.mountpoint.display().to_string();
        let result = tokio::select! {
            ended = &mut self.ended => {
                if self.supervised {
                    // The supervisor ended the session, or went away: either way, done.
                    tracing::info!("the supervisor ended the session at {path}");
                    Ok(Ended::Unmounted)
                } else {
                    tracing::info!("file system at {path} was unmounted");
                    ended
                        .map_err(|_| {
                            Error::Io(std::io::Error::other("FUSE session thread vanished"))
                        })
                        .and_then(|r| r.map_err(Error::Io))
                        .map(|()| Ended::Unmounted)
                }
            }
            _ = shutdown => {
                if self.supervised {
                    tracing::info!("stopping; the supervisor keeps {path} mounted");
                    Ok(Ended::HandedOver)
                } else {
                    tracing::info!("unmounting {path}");
                    let unmounted = unmount_own(&self.mountpoint);
                    let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.ended).await;
                    unmounted.map(|()| Ended::Unmounted)
                }
            }
        };
        self.tasks.clear();
        result
    }
}

/// How [`Mount::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The file system was unmounted (or its supervisor ended the session): the mount is over.
    Unmounted,
    /// Signalled while serving for a supervisor, which keeps the mount and starts a successor
    /// (an upgrade). The process should exit at once, before its runtime drops the reads
    /// under way: a dropped fuser reply answers `EIO`, which the supervisor would pass on;
    /// unanswered, they are sent again to the successor.
    HandedOver,
}

/// Verification (unless done before the mount), and alongside it local copies of the layers
/// as they are verified, so that reads converge to local speed; once every layer is served
/// from its copy (and the mount is up), a larger kernel read-ahead.
async fn converge(
    served: Arc<ServedImage>,
    background: bool,
    copies: Option<(PathBuf, u64)>,
    mountpoint: PathBuf,
    is_mounted: tokio::sync::oneshot::Receiver<()>,
) {
    // Yield the link to the reads of a starting workload.
    let idle = || served.reads.idle_for(IDLE);
    let verified = async {
        if background {
            let image = &served.image;
            let diff_ids = crate::image::manifest::diff_ids(&image.resolved.config);
            let pairs: Vec<_> = image.layers.iter().map(|l| (&*l.layer, &l.blob)).collect();
            // A layer left unverified was logged; it stays served as pending.
            let _ = crate::verify::verify_layers(&pairs, &diff_ids, &idle).await;
        }
    };
    // Each layer is copied once verified, while the next ones are verified.
    let copied = async {
        match &copies {
            Some((dir, budget)) => served.copy_layers_locally(dir, *budget, &idle).await,
            None => false,
        }
    };
    let ((), all_copied) = tokio::join!(verified, copied);
    if all_copied && is_mounted.await.is_ok() {
        raise_converged_readahead(&mountpoint);
    }
}

/// Raises a converged mount's kernel read-ahead (see [`CONVERGED_READAHEAD_KIB`]).
fn raise_converged_readahead(mountpoint: &Path) {
    let kib = CONVERGED_READAHEAD_KIB;
    match raise_readahead(mountpoint, kib) {
        Ok(before) if before < kib => {
            tracing::info!("every layer is local: read-ahead {before} -> {kib} KiB")
        }
        Ok(_) => {}
        Err(e) => tracing::info!("read-ahead left as it was: {e}"),
    }
}

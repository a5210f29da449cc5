//! Starting a mount, as a library: [`open`] resolves and opens an image with its block
//! cache and speculation; [`start`] mounts it, starts the background work (verification,
//! local copies, speculation) and returns a [`Mount`] whose guards stop that work when it
//! ends; [`Mount::run`] serves until the file system is unmounted or `shutdown` resolves. The
//! CLI and the tests drive a mount the same way, with their own dependencies (source,
//! configuration, mountpoint, shutdown future).

pub mod control;
pub mod kernel;

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
use crate::stats::Access;
use crate::task::TaskGuard;
use fuser::{Config, MountOption, SessionACL};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// FUSE session threads; reads are handed to tokio, so a few suffice.
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
    ))
}

/// A mounted image and its background work.
pub struct Mount {
    served: Arc<ServedImage>,
    mountpoint: PathBuf,
    /// Resolves when the FUSE session ends (the file system was unmounted).
    ended: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
    /// Verification, local copies, speculation: stopped when the mount ends.
    tasks: Vec<TaskGuard>,
    _control: Option<control::SocketGuard>,
}

/// Mounts `served` at `opts.mountpoint` with its background work under way: verification
/// (in `verify` mode `background`), local copies as layers are verified (and, once every
/// layer is local, a larger kernel read-ahead), and speculation. Returns once the mount is
/// ready.
pub async fn start(served: ServedImage, verify: VerifyMode, opts: MountOptions) -> Result<Mount> {
    check_mountpoint(&opts.mountpoint)?;
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
    let control = match &opts.control {
        Some(path) => Some(control::stats_socket(served.clone(), path)?),
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
    config.clone_fd = true;
    let fs = OcifsFs::new(served.clone(), tokio::runtime::Handle::current());
    let session = fuser::spawn_mount(fs, &opts.mountpoint, &config)?;
    let (tx, ended) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(session.join());
    });
    let _ = mounted.send(());
    Ok(Mount {
        served,
        mountpoint: opts.mountpoint,
        ended,
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
    /// resolves (then it unmounts it); stops the background work.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let path = self.mountpoint.display().to_string();
        let result = tokio::select! {
            ended = &mut self.ended => {
                tracing::info!("file system at {path} was unmounted");
                ended
                    .map_err(|_| Error::Io(std::io::Error::other("FUSE session thread vanished")))
                    .and_then(|r| r.map_err(Error::Io))
            }
            _ = shutdown => {
                tracing::info!("unmounting {path}");
                let unmounted = unmount_own(&self.mountpoint);
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.ended).await;
                unmounted
            }
        };
        self.tasks.clear();
        result
    }
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
            crate::verify::verify_layers(&pairs, &diff_ids, &idle).await
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

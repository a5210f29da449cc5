//! Mount lifecycle: check the mountpoint, hand the image to FUSE, serve until unmounted or
//! signalled, and unmount cleanly. Takes its dependencies (image, runtime, shutdown future)
//! so tests and the CLI drive it the same way.

use crate::error::{Error, Result};
use crate::fuse::OcifsFs;
use crate::image::Image;
use fuser::{Config, MountOption, SessionACL};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

/// FUSE session threads; reads are handed to tokio, so a few suffice.
const SESSION_THREADS: usize = 4;

/// Refuses a mountpoint that is missing, not a directory, not empty, or already a mount.
pub fn check_mountpoint(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("mountpoint {}: {e}", path.display()),
        ))
    })?;
    if !meta.is_dir() {
        return Err(Error::Io(std::io::Error::other(format!(
            "mountpoint {} is not a directory",
            path.display()
        ))));
    }
    let parent = path.canonicalize()?.parent().map(|p| p.to_path_buf());
    if let Some(parent) = parent
        && std::fs::metadata(&parent)?.dev() != meta.dev()
    {
        return Err(Error::Io(std::io::Error::other(format!(
            "mountpoint {} is busy: something is mounted there",
            path.display()
        ))));
    }
    if std::fs::read_dir(path)?.next().is_some() {
        return Err(Error::Io(std::io::Error::other(format!(
            "mountpoint {} is not empty",
            path.display()
        ))));
    }
    Ok(())
}

/// Mounts `image` at `mountpoint` and serves it until the file system is unmounted
/// (by `ocifs umount`, `umount`, or `shutdown` resolving, which unmounts it).
/// `control`, when given, is a unix socket path where `ocifs stats` gets a JSON snapshot.
pub async fn serve(
    image: Arc<Image>,
    mountpoint: &Path,
    fsname: &str,
    control: Option<&Path>,
    shutdown: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(),
) -> Result<()> {
    check_mountpoint(mountpoint)?;
    let _stats = match control {
        Some(path) => Some(stats_socket(image.clone(), path)?),
        None => None,
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype("ocifs".into()),
        MountOption::DefaultPermissions,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(SESSION_THREADS);
    config.clone_fd = true;
    let fs = OcifsFs::new(image, tokio::runtime::Handle::current());
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(session.join());
    });
    on_ready();
    tokio::select! {
        ended = &mut rx => {
            tracing::info!("file system at {} was unmounted", mountpoint.display());
            return ended.map_err(|_| Error::Io(std::io::Error::other("FUSE session thread vanished")))?.map_err(Error::Io);
        }
        _ = shutdown => {}
    }
    tracing::info!("unmounting {}", mountpoint.display());
    unmount(mountpoint)?;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await;
    Ok(())
}

/// The read-ahead a mount gets once every layer is served from a local copy (see
/// `image::local`): the kernel starts a FUSE mount at 128 KiB whatever the daemon asks for,
/// which keeps about one read of the copy under way at a time. Cold 1 MiB reads of a 200 MiB
/// file from a converged mount, six alternating rounds: 0.84-1.2 GB/s with 8 MiB against
/// 0.59-0.97 GB/s with 128 KiB (local disk, itself at 8 MiB here: 0.5-1.7 GB/s). Raised
/// only once nothing is fetched any more: on a lazy mount a larger window would fetch bytes
/// that no one reads.
pub const CONVERGED_READAHEAD_KIB: u64 = 8 << 10;

/// The Linux FUSE file system magic (`statfs` `f_type`).
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Raises the kernel's read-ahead of the FUSE mount at `mountpoint` to `kib` KiB (its backing
/// device info, `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`) if it is lower; returns the
/// value before. Needs root; refuses a path that is not a FUSE mount, so that the read-ahead
/// of the disk under it is never touched.
pub fn raise_readahead(mountpoint: &Path, kib: u64) -> Result<u64> {
    let c = c_path(mountpoint)?;
    // SAFETY: statfs writes into a zeroed struct of the right type; c is NUL-terminated.
    let fs = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut fs) != 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        fs
    };
    if fs.f_type as i64 != FUSE_SUPER_MAGIC {
        return Err(Error::Io(std::io::Error::other(format!(
            "{} is not a FUSE mount",
            mountpoint.display()
        ))));
    }
    let dev = std::fs::metadata(mountpoint)?.dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    let before: u64 = std::fs::read_to_string(&knob)?
        .trim()
        .parse()
        .map_err(|_| Error::format(knob.clone(), "not a number"))?;
    if before < kib {
        std::fs::write(&knob, kib.to_string())?;
    }
    Ok(before)
}

/// Answers each connection to `path` with the image's statistics as JSON; the socket is
/// removed when the returned guard drops.
fn stats_socket(image: Arc<Image>, path: &Path) -> Result<SocketGuard> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    let task = crate::verify::TaskGuard::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = serde_json::to_vec(&image.stats_json()).unwrap_or_default();
            let _ = conn.write_all(&body).await;
        }
    });
    Ok(SocketGuard {
        path: path.to_path_buf(),
        _task: task,
    })
}

struct SocketGuard {
    path: std::path::PathBuf,
    _task: crate::verify::TaskGuard,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads the statistics of the mount whose control socket is `path`.
pub async fn fetch_stats(path: &Path) -> Result<serde_json::Value> {
    use tokio::io::AsyncReadExt;
    let mut conn = tokio::net::UnixStream::connect(path).await.map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("no ocifs daemon answers at {}: {e}", path.display()),
        ))
    })?;
    let mut body = Vec::new();
    conn.read_to_end(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| Error::format("stats", e.to_string()))
}

/// A mountpoint as a C string for the system calls that take one.
fn c_path(path: &Path) -> Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::format("mountpoint", "contains NUL"))
}

/// Unmounts an ocifs mount (lazily, so open files do not block shutdown).
pub fn unmount(path: &Path) -> Result<()> {
    let c = c_path(path)?;
    // SAFETY: c is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) {
        let status = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(path)
            .status()?;
        if status.success() {
            return Ok(());
        }
    }
    Err(Error::Io(std::io::Error::new(
        err.kind(),
        format!("unmount {}: {err}", path.display()),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_is_never_raised_outside_a_fuse_mount() {
        // The temporary directory lives on a disk (or tmpfs): its read-ahead must stay as is.
        let dir = std::env::temp_dir();
        let err = raise_readahead(&dir, u64::MAX).unwrap_err();
        assert!(err.to_string().contains("not a FUSE mount"), "{err}");
        assert!(raise_readahead(Path::new("/nonexistent/ocifs"), 1).is_err());
    }
}

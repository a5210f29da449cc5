//! What a mount asks of the kernel: a usable mountpoint, unmounting, and the read-ahead
//! of a converged mount.

use crate::error::{Error, Result};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Refuses a mountpoint that is missing, not a directory, not empty, or already a mount.
pub fn check_mountpoint(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| {
        // What a FUSE mount whose daemon died answers.
        let hint = if e.raw_os_error() == Some(libc::ENOTCONN) {
            format!(
                " (a dead mount: `ocifs umount {}` removes it)",
                path.display()
            )
        } else {
            String::new()
        };
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("mountpoint {}: {e}{hint}", path.display()),
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
            "mountpoint {} is busy: something is mounted there (if it is an ocifs mount \
             whose daemon died, `ocifs umount {}` removes it)",
            path.display(),
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

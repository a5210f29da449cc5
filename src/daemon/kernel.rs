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

/// What is mounted at a mountpoint, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// The file system type (`fuse` for ours: the kernel shows a subtype only when the
    /// mount helper passes one).
    pub fstype: String,
    /// What the mount names as its source (`ocifs:REF` for ours).
    pub source: String,
}

impl Mounted {
    /// Whether this is an ocifs mount: a FUSE file system whose source is `ocifs:REF`, or
    /// `ocifs-store` for a layer store.
    pub fn is_ocifs(&self) -> bool {
        (self.fstype == "fuse" || self.fstype == "fuse.ocifs")
            && (self.source.starts_with("ocifs:") || self.source == "ocifs-store")
    }
}

/// What is mounted with `path` as its mountpoint (the topmost mount, when mounts are
/// stacked); `None` when nothing is. A dead FUSE mount's root cannot be resolved, so `path`
/// is made absolute through its parent.
pub fn mounted_at(path: &Path) -> Result<Option<Mounted>> {
    let abs = match path.canonicalize() {
        Ok(p) => p,
        Err(_) => {
            let name = path.file_name().ok_or_else(|| {
                Error::Io(std::io::Error::other(format!(
                    "{}: not a mountpoint",
                    path.display()
                )))
            })?;
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            parent.canonicalize()?.join(name)
        }
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mounted_in(&info, abs.as_os_str().as_encoded_bytes()))
}

/// The last mount in `mountinfo` whose mountpoint is `path`.
fn mounted_in(mountinfo: &str, path: &[u8]) -> Option<Mounted> {
    let mut found = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split(' ').nth(4).map(unescape_mountinfo);
        if point.as_deref() == Some(path) {
            let mut f = right.split(' ');
            found = Some(Mounted {
                fstype: f.next().unwrap_or_default().to_string(),
                source: f
                    .next()
                    .map(unescape_mountinfo)
                    .map_or_else(String::new, |s| String::from_utf8_lossy(&s).into_owned()),
            });
        }
    }
    found
}

/// A mountinfo field with its octal escapes (`\040` for a space) decoded.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Refuses a path that is not the mountpoint of an ocifs mount, naming what is there.
pub fn check_ocifs_mount(path: &Path) -> Result<()> {
    match mounted_at(path)? {
        Some(m) if m.is_ocifs() => Ok(()),
        Some(m) => Err(Error::Io(std::io::Error::other(format!(
            "{} is not an ocifs mount (it is a {} mount of {}); leaving it alone",
            path.display(),
            m.fstype,
            m.source
        )))),
        None => Err(Error::Io(std::io::Error::other(format!(
            "{} is not an ocifs mount: nothing is mounted there",
            path.display()
        )))),
    }
}

/// Unmounts the ocifs mount at `path`; refuses anything else mounted there.
pub fn unmount(path: &Path) -> Result<()> {
    check_ocifs_mount(path)?;
    unmount_own(path)
}

/// Unmounts the mount at `path`, which the caller mounted (lazily, so open files do not
/// block shutdown), without asking what it is: a mount that is ending unmounts itself.
pub fn unmount_own(path: &Path) -> Result<()> {
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
        format!("unmounting {}: {}", path.display(), err.kind()),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_come_from_mountinfo() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
            40 22 0:40 / /tmp/a\\040b rw,nosuid - tmpfs tmpfs rw\n\
            41 40 0:41 / /tmp/a\\040b ro - fuse ocifs:r/x:1 ro,user_id=0\n\
            42 22 0:42 / /mnt rw - tmpfs tmpfs rw\n\
            43 22 0:43 / /s rw - fuse.sshfs me@host:/ rw\n";
        let at = |p: &[u8]| mounted_in(info, p);
        assert!(at(b"/tmp/a b").unwrap().is_ocifs());
        assert_eq!(at(b"/tmp/a b").unwrap().source, "ocifs:r/x:1");
        assert_eq!(at(b"/mnt").unwrap().fstype, "tmpfs");
        assert!(!at(b"/mnt").unwrap().is_ocifs());
        assert!(!at(b"/s").unwrap().is_ocifs());
        assert_eq!(at(b"/tmp"), None);
        let dir = std::env::temp_dir();
        let err = unmount(&dir).unwrap_err().to_string();
        assert!(err.contains("not an ocifs mount"), "{err}");
    }

    #[test]
    fn read_ahead_is_never_raised_outside_a_fuse_mount() {
        // The temporary directory lives on a disk (or tmpfs): its read-ahead must stay as is.
        let dir = std::env::temp_dir();
        let err = raise_readahead(&dir, u64::MAX).unwrap_err();
        assert!(err.to_string().contains("not a FUSE mount"), "{err}");
        assert!(raise_readahead(Path::new("/nonexistent/ocifs"), 1).is_err());
    }
}

//! Starting a [`RunSpec`] on a mounted image, as a runtime would: in a mount namespace of its
//! own, the read-only image under a writable overlay (its upper directory on a tmpfs that
//! vanishes with the namespace), `/proc` mounted, `/dev` and `/sys` bound in, the host's
//! `/etc/resolv.conf` bound over the image's; then `chroot`, the working directory (made if
//! the image lacks it), the user's groups, gid and uid, and `exec`. No other isolation
//! (network, PID, cgroups): this is for measuring a start, not for running untrusted code.
//!
//! The set-up runs in the forked child before `exec` (`pre_exec`), where only system calls
//! are safe: every path and option string is made beforehand.

use super::RunSpec;
use crate::error::{Error, Result};
use std::ffi::{CStr, CString};
use std::io;
use std::path::Path;

/// What the child's set-up uses, made before the fork.
struct Prepared {
    scratch: CString,
    upper: CString,
    work: CString,
    root: CString,
    overlay: CString,
    proc_: CString,
    dev: CString,
    sys: CString,
    etc: CString,
    resolv: CString,
    host_resolv: Option<CString>,
    /// The working directory and each directory above it, top first.
    workdirs: Vec<CString>,
    groups: Vec<libc::gid_t>,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

fn cstring(s: impl Into<Vec<u8>>) -> Result<CString> {
    CString::new(s).map_err(|_| Error::format("path", "contains NUL"))
}

fn path_c(p: &Path) -> Result<CString> {
    cstring(p.as_os_str().as_encoded_bytes())
}

/// A command that starts `spec` on the image mounted at `image` (read-only), using the empty
/// directory `scratch` for its writable layer (mounted over in the child's namespace only).
pub fn command(image: &Path, scratch: &Path, spec: &RunSpec) -> Result<tokio::process::Command> {
    for p in [image, scratch] {
        let s = p.to_string_lossy();
        if s.contains([',', ':']) {
            return Err(Error::Unsupported(format!(
                "{s}: overlayfs cannot take a path with ',' or ':'"
            )));
        }
    }
    let j = |name: &str| scratch.join(name);
    let root = j("root");
    let overlay = format!(
        "lowerdir={},upperdir={},workdir={}",
        image.display(),
        j("upper").display(),
        j("work").display()
    );
    let mut workdirs = Vec::new();
    let mut at = String::new();
    for part in spec.workdir.split('/').filter(|p| !p.is_empty()) {
        at = format!("{at}/{part}");
        workdirs.push(cstring(at.as_str())?);
    }
    let host_resolv = Path::new("/etc/resolv.conf").exists();
    let p = Prepared {
        scratch: path_c(scratch)?,
        upper: path_c(&j("upper"))?,
        work: path_c(&j("work"))?,
        root: path_c(&root)?,
        overlay: cstring(overlay)?,
        proc_: path_c(&root.join("proc"))?,
        dev: path_c(&root.join("dev"))?,
        sys: path_c(&root.join("sys"))?,
        etc: path_c(&root.join("etc"))?,
        resolv: path_c(&root.join("etc/resolv.conf"))?,
        host_resolv: host_resolv
            .then(|| cstring("/etc/resolv.conf"))
            .transpose()?,
        workdirs,
        groups: spec.groups.clone(),
        uid: spec.uid,
        gid: spec.gid,
    };
    let mut cmd = tokio::process::Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..]).env_clear();
    for e in &spec.env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    // SAFETY: `enter` makes only system calls, on strings made above.
    unsafe {
        cmd.pre_exec(move || enter(&p));
    }
    Ok(cmd)
}

fn check(r: libc::c_int) -> io::Result<()> {
    match r {
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}

/// `mkdir`, already there being fine.
fn mkdir(p: &CString) -> io::Result<()> {
    // SAFETY: a valid NUL-terminated path.
    match unsafe { libc::mkdir(p.as_ptr(), 0o755) } {
        0 => Ok(()),
        _ => match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            e => Err(e),
        },
    }
}

fn mount(
    src: &CStr,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: valid NUL-terminated strings or null where mount(2) allows it.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    })
}

/// The child's set-up, between fork and exec: system calls only.
fn enter(p: &Prepared) -> io::Result<()> {
    let none = c"none";
    // SAFETY: unshare has no memory preconditions.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
    mount(none, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(c"tmpfs", &p.scratch, Some(c"tmpfs"), 0, Some(c"mode=0755"))?;
    for d in [&p.upper, &p.work, &p.root] {
        mkdir(d)?;
    }
    mount(c"overlay", &p.root, Some(c"overlay"), 0, Some(&p.overlay))?;
    for d in [&p.proc_, &p.dev, &p.sys] {
        mkdir(d)?;
    }
    let noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(c"proc", &p.proc_, Some(c"proc"), noexec, None)?;
    mount(c"/dev", &p.dev, None, libc::MS_BIND | libc::MS_REC, None)?;
    mount(c"/sys", &p.sys, None, libc::MS_BIND | libc::MS_REC, None)?;
    if let Some(host) = &p.host_resolv {
        // Best effort: an image whose resolv.conf is a dangling link keeps it.
        let _ = mkdir(&p.etc);
        // SAFETY: a valid path; the descriptor is closed at once.
        let fd = unsafe {
            libc::open(
                p.resolv.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                0o644,
            )
        };
        if fd >= 0 {
            // SAFETY: fd was just opened.
            unsafe { libc::close(fd) };
            let _ = mount(host, &p.resolv, None, libc::MS_BIND, None);
        }
    }
    // SAFETY: valid NUL-terminated paths.
    check(unsafe { libc::chroot(p.root.as_ptr()) })?;
    for d in &p.workdirs {
        mkdir(d)?;
    }
    let workdir = p.workdirs.last().map_or(c"/", |c| c.as_c_str());
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::chdir(workdir.as_ptr()) })?;
    // SAFETY: the group list outlives the call; ids are plain integers.
    check(unsafe { libc::setgroups(p.groups.len(), p.groups.as_ptr()) })?;
    check(unsafe { libc::setgid(p.gid) })?;
    check(unsafe { libc::setuid(p.uid) })?;
    Ok(())
}

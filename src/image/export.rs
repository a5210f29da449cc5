//! An image's merged tree as one tar stream (`ocifs export`, like `crane export`), and as a
//! directory (`ocifs pull`): what extracting the layers in order with whiteouts applied
//! gives, read through the same layers, indexes and digest checks as a mount.
//!
//! Both walk the tree depth first in name order. A file with several names is written once,
//! its other names as hard links to the first; in the tar stream xattrs go in PAX records
//! (`SCHILY.xattr.*`, as GNU tar writes them).

use super::Image;
use crate::error::{Error, Result};
use crate::layer::Kind;
use crate::tree::{Node, ROOT};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Bytes of a file read at a time.
const PIECE: u64 = 4 << 20;

/// Every node of the image, depth first in name order, with its path (`""` for the root).
fn walk(image: &Image) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut stack = vec![(ROOT, String::new())];
    while let Some((ino, path)) = stack.pop() {
        if let Some(node) = image.tree.get(ino) {
            let children: Vec<_> = node.children.iter().map(|(n, &i)| (n.clone(), i)).collect();
            for (name, child) in children.into_iter().rev() {
                let p = match path.is_empty() {
                    true => name,
                    false => format!("{path}/{name}"),
                };
                stack.push((child, p));
            }
        }
        out.push((ino, path));
    }
    out
}

/// Reads all of file `ino` through `read` (a blocking call into the async read path).
fn file_bytes(
    node: &Node,
    ino: u64,
    read: &dyn Fn(u64, u64, u64) -> Result<bytes::Bytes>,
) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity(node.size.min(PIECE) as usize);
    while (data.len() as u64) < node.size {
        let off = data.len() as u64;
        let piece = read(ino, off, PIECE.min(node.size - off))?;
        if piece.is_empty() {
            return Err(Error::format(
                format!("inode {ino}"),
                format!("ended at {off} of {} bytes", node.size),
            ));
        }
        data.extend_from_slice(&piece);
    }
    Ok(data)
}

/// Writes the merged tree as a tar stream to `out`. `read` reads a file's bytes (blocking;
/// see [`blocking_reader`]).
pub fn export(
    image: &Image,
    out: impl Write,
    read: &dyn Fn(u64, u64, u64) -> Result<bytes::Bytes>,
) -> Result<()> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let mut first_name: HashMap<u64, String> = HashMap::new();
    for (ino, path) in walk(image) {
        let Some(node) = image.tree.get(ino) else {
            continue;
        };
        if path.is_empty() {
            continue;
        }
        if !node.xattrs.is_empty() {
            let records: Vec<(String, &[u8])> = node
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), &v[..]))
                .collect();
            tar.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(node.mode);
        h.set_uid(node.uid.into());
        h.set_gid(node.gid.into());
        h.set_mtime(node.mtime.0.max(0) as u64);
        h.set_size(0);
        match node.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                tar.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Kind::File | Kind::Hardlink => {
                if node.nlink > 1 {
                    if let Some(first) = first_name.get(&ino) {
                        h.set_entry_type(tar::EntryType::Link);
                        tar.append_link(&mut h, &path, first)?;
                        continue;
                    }
                    first_name.insert(ino, path.clone());
                }
                let data = file_bytes(node, ino, read)?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, &path, &data[..])?;
            }
            Kind::Symlink => {
                h.set_entry_type(tar::EntryType::Symlink);
                let target = node.link.clone().unwrap_or_default();
                tar.append_link(&mut h, &path, target)?;
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                h.set_entry_type(match node.kind {
                    Kind::Char => tar::EntryType::Char,
                    Kind::Block => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                h.set_device_major(node.rdev.0)?;
                h.set_device_minor(node.rdev.1)?;
                tar.append_data(&mut h, &path, std::io::empty())?;
            }
        }
    }
    tar.into_inner()?.flush()?;
    Ok(())
}

/// Materialises the merged tree under `dir` (which must exist and be empty): every path,
/// type, mode, owner, time, link target, hard link and xattr (owners, devices and trusted
/// xattrs need root). Paths come from the tree, whose parents are always directories made
/// here, so nothing is written outside `dir`; directories get their mode and times last.
pub fn extract(
    image: &Image,
    dir: &Path,
    read: &dyn Fn(u64, u64, u64) -> Result<bytes::Bytes>,
) -> Result<()> {
    if std::fs::read_dir(dir)?.next().is_some() {
        return Err(Error::Io(std::io::Error::other(format!(
            "{} is not empty",
            dir.display()
        ))));
    }
    let mut first_name: HashMap<u64, std::path::PathBuf> = HashMap::new();
    let mut dirs = Vec::new();
    for (ino, path) in walk(image) {
        let Some(node) = image.tree.get(ino) else {
            continue;
        };
        let at = dir.join(&path);
        match node.kind {
            Kind::Dir => {
                if !path.is_empty() {
                    std::fs::create_dir(&at)?;
                }
                dirs.push((node, at));
                continue;
            }
            Kind::File | Kind::Hardlink => {
                if node.nlink > 1 {
                    if let Some(first) = first_name.get(&ino) {
                        std::fs::hard_link(first, &at)?;
                        continue;
                    }
                    first_name.insert(ino, at.clone());
                }
                std::fs::write(&at, file_bytes(node, ino, read)?)?;
            }
            Kind::Symlink => {
                std::os::unix::fs::symlink(node.link.clone().unwrap_or_default(), &at)?;
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                let kind = match node.kind {
                    Kind::Char => libc::S_IFCHR,
                    Kind::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let dev = libc::makedev(node.rdev.0, node.rdev.1);
                let c = c_path(&at)?;
                // SAFETY: c is a NUL-terminated path that outlives the call.
                if unsafe { libc::mknod(c.as_ptr(), kind | (node.mode & 0o7777), dev) } != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
            }
        }
        settle(node, &at)?;
    }
    // Deepest first, so a directory's own time is set after everything under it.
    for (node, at) in dirs.into_iter().rev() {
        settle(node, &at)?;
    }
    Ok(())
}

/// Owner, xattrs, mode (not for symlinks) and times of `node`, on the object at `at`.
fn settle(node: &Node, at: &Path) -> Result<()> {
    std::os::unix::fs::lchown(at, Some(node.uid), Some(node.gid))?;
    let c = c_path(at)?;
    for (name, value) in &node.xattrs {
        let n = std::ffi::CString::new(name.as_bytes())
            .map_err(|_| Error::format("xattr name", "contains NUL"))?;
        // SAFETY: NUL-terminated name and path, value with its length, all outliving the call.
        let rc = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::Io(std::io::Error::new(
                e.kind(),
                format!("xattr {name} on {}: {e}", at.display()),
            )));
        }
    }
    if node.kind != Kind::Symlink {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(at, std::fs::Permissions::from_mode(node.mode & 0o7777))?;
    }
    let t = libc::timespec {
        tv_sec: node.mtime.0 as libc::time_t,
        tv_nsec: node.mtime.1 as libc::c_long,
    };
    // SAFETY: c is NUL-terminated; the two timespecs live across the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn c_path(p: &Path) -> Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::format("path", "contains NUL"))
}

/// A blocking reader of the image's files through its async read path, for [`export`] and
/// [`extract`] run on a blocking thread of `runtime`.
pub fn blocking_reader(
    image: &Image,
    runtime: tokio::runtime::Handle,
) -> impl Fn(u64, u64, u64) -> Result<bytes::Bytes> + '_ {
    move |ino, off, len| runtime.block_on(image.read_file(ino, off, len))
}

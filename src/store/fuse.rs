//! The thin FUSE adapter of the layer store: each handler converts arguments, asks the
//! [`Store`] on the tokio runtime (a lookup may resolve a reference or open a layer, so none
//! runs on the kernel's request threads), replies, and maps errors to errno. Layer trees are
//! immutable and get the mount adapter's long cache times; so do the store's own nodes, whose
//! numbers are never reused. Writes are refused (`EROFS`), except containers/storage's two
//! notices, answered `ENOENT` as it expects from a store that listens (see [`Store::note_use`]).

use super::{Found, Listing, Store};
use crate::fuse::{TTL, ask_capabilities, attr, errno, reply_sized, xattr_names};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request,
};
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// The FUSE view of a [`Store`].
pub struct StoreFs {
    store: Arc<Store>,
    runtime: tokio::runtime::Handle,
    /// See `crate::fuse::OcifsFs`: the kernel opens files and directories itself once an
    /// open is answered `ENOSYS`, when it offers that.
    no_open: bool,
    no_opendir: bool,
}

impl StoreFs {
    /// Serves `store`, answering on `runtime`.
    pub fn new(store: Arc<Store>, runtime: tokio::runtime::Handle) -> Self {
        StoreFs {
            store,
            runtime,
            no_open: false,
            no_opendir: false,
        }
    }

    /// Runs `f` on the runtime with the store.
    fn spawn<F>(&self, f: impl FnOnce(Arc<Store>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(f(self.store.clone()));
    }
}

/// The attributes of what the store found at `ino`.
fn found_attr(ino: u64, found: &Found) -> Option<FileAttr> {
    let own = |kind: FileType, perm: u16, size: u64| FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    };
    match found {
        Found::Dir => Some(own(FileType::Directory, 0o555, 0)),
        Found::File(size) => Some(own(FileType::RegularFile, 0o444, *size)),
        Found::Layer(layer, local) => Some(attr(ino, layer.served.image.tree.get(*local)?)),
    }
}

/// Logs a failed request once, here at the boundary (lookups of unknown names are routine).
fn failed(what: &str, e: &crate::Error) -> Errno {
    match e {
        crate::Error::NotFound(_) => tracing::debug!("{what}: {e}"),
        _ => tracing::warn!("{what}: {e}"),
    }
    errno(e)
}

/// The xattrs of a layer's node (none for the store's own nodes).
fn xattrs(found: &Found) -> Vec<(String, Vec<u8>)> {
    match found {
        Found::Layer(layer, local) => (layer.served.image.tree.get(*local))
            .map(|n| n.xattrs.clone())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The listing with `.` and `..` first; offsets are positions in it.
fn with_dots(ino: u64, l: Listing) -> Vec<(u64, String, Option<Found>)> {
    let mut out = vec![
        (ino, ".".to_string(), None),
        (l.parent, "..".to_string(), None),
    ];
    out.extend(l.entries.into_iter().map(|(i, n, f)| (i, n, Some(f))));
    out
}

impl Filesystem for StoreFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        (self.no_open, self.no_opendir) = ask_capabilities(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str().map(str::to_string) else {
            return reply.error(Errno::ENOENT);
        };
        tracing::debug!("lookup {name:?} in {parent}");
        self.spawn(|store| async move {
            match store.lookup(parent.into(), &name).await {
                Ok((ino, found)) => match found_attr(ino, &found) {
                    Some(a) => reply.entry(&TTL, &a, Generation(0)),
                    None => reply.error(Errno::ENOENT),
                },
                Err(e) => reply.error(failed(&format!("lookup of {name} in {parent}"), &e)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        tracing::debug!("getattr {ino}");
        self.spawn(|store| async move {
            match store.attr(ino.into()).await {
                Ok(found) => match found_attr(ino.into(), &found) {
                    Some(a) => reply.attr(&TTL, &a),
                    None => reply.error(Errno::ENOENT),
                },
                Err(e) => reply.error(failed(&format!("getattr of {ino}"), &e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(|store| async move {
            match store.attr(ino.into()).await {
                Ok(Found::Layer(layer, local)) => {
                    match layer
                        .served
                        .image
                        .tree
                        .get(local)
                        .and_then(|n| n.link.as_ref())
                    {
                        Some(l) => reply.data(l.as_bytes()),
                        None => reply.error(Errno::EINVAL),
                    }
                }
                Ok(_) => reply.error(Errno::EINVAL),
                Err(e) => reply.error(failed(&format!("readlink of {ino}"), &e)),
            }
        });
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.no_open {
            true => reply.error(Errno::ENOSYS),
            false => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        tracing::debug!("read {ino} at {offset}+{size}");
        self.spawn(|store| async move {
            match store.read(ino.into(), offset, size as u64).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(failed(&format!("read of {ino} at {offset}"), &e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.no_opendir {
            true => reply.error(Errno::ENOSYS),
            false => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn(|store| async move {
            let listing = match store.list(ino.into()).await {
                Ok(l) => with_dots(ino.into(), l),
                Err(e) => return reply.error(failed(&format!("readdir of {ino}"), &e)),
            };
            for (i, (child, name, found)) in listing.iter().enumerate().skip(offset as usize) {
                let kind = found
                    .as_ref()
                    .and_then(|f| found_attr(*child, f))
                    .map_or(FileType::Directory, |a| a.kind);
                if reply.add(INodeNo(*child), (i + 1) as u64, kind, name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        tracing::debug!("readdirplus {ino} from {offset}");
        self.spawn(|store| async move {
            let listing = match store.list(ino.into()).await {
                Ok(l) => with_dots(ino.into(), l),
                Err(e) => return reply.error(failed(&format!("readdir of {ino}"), &e)),
            };
            for (i, (child, name, found)) in listing.iter().enumerate().skip(offset as usize) {
                // `.` and `..` come without attributes, as the kernel does not look them up.
                let a = match found {
                    Some(f) => found_attr(*child, f),
                    None => found_attr(*child, &Found::Dir),
                };
                let Some(a) = a else { continue };
                if reply.add(
                    INodeNo(*child),
                    (i + 1) as u64,
                    name,
                    &TTL,
                    &a,
                    Generation(0),
                ) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.to_os_string();
        tracing::debug!("getxattr {name:?} of {ino}");
        self.spawn(|store| async move {
            match store.attr(ino.into()).await {
                Ok(found) => match xattrs(&found).iter().find(|(k, _)| OsStr::new(k) == name) {
                    Some((_, v)) => reply_sized(reply, size, v),
                    None => reply.error(Errno::NO_XATTR),
                },
                Err(e) => reply.error(failed(&format!("getxattr of {ino}"), &e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.spawn(|store| async move {
            match store.attr(ino.into()).await {
                Ok(found) => reply_sized(reply, size, &xattr_names(&xattrs(&found))),
                Err(e) => reply.error(failed(&format!("listxattr of {ino}"), &e)),
            }
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match mask.contains(AccessFlags::W_OK) {
            true => reply.error(Errno::EROFS),
            false => reply.ok(),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let notice = name
            .to_str()
            .is_some_and(|n| self.store.note_use(parent.into(), n));
        tracing::debug!("create {name:?} in {parent} (a notice: {notice})");
        reply.error(if notice { Errno::ENOENT } else { Errno::EROFS });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let notice = name
            .to_str()
            .is_some_and(|n| self.store.note_release(parent.into(), n));
        tracing::debug!("rmdir {name:?} in {parent} (a notice: {notice})");
        reply.error(if notice { Errno::ENOENT } else { Errno::EROFS });
    }

    fn mkdir(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn mknod(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, _: u32, r: ReplyEntry) {
        r.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _: &Request, _: INodeNo, _: &OsStr, _: &std::path::Path, r: ReplyEntry) {
        r.error(Errno::EROFS);
    }

    fn link(&self, _: &Request, _: INodeNo, _: INodeNo, _: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    /// Nothing is ever written: closing has nothing to flush (`ENOSYS` once stops them).
    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    /// Files here are always ready (Go's runtime polls the `info` file podman reads):
    /// `ENOSYS` tells the kernel once, and it stops asking.
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// No ioctls (`isatty`'s `TCGETS` expects `ENOTTY`).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }
}

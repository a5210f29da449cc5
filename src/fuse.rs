//! The thin FUSE adapter: each handler converts arguments, asks the core ([`ServedImage`] and
//! its image's [`crate::tree::Tree`]), replies, and maps errors to errno (logging them once, here).
//!
//! Reads that may touch the network are answered from a task on the tokio runtime, so the
//! kernel request loop never waits for a registry. The image is immutable, so attributes,
//! entries and page cache are kept for a long time.

use crate::layer::Kind;
use crate::serve::ServedImage;
use crate::tree::{Node, ROOT};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

/// How long the kernel may cache attributes and entries: the image never changes (nor do a
/// layer store's nodes, whose numbers are never reused).
pub(crate) const TTL: Duration = Duration::from_secs(24 * 3600);

/// The FUSE view of one opened image.
pub struct OcifsFs {
    served: Arc<ServedImage>,
    runtime: tokio::runtime::Handle,
    /// The kernel opens files (directories) without asking us once we answer an open
    /// (opendir) with `ENOSYS`, keeping their page cache as if we had said `FOPEN_KEEP_CACHE`
    /// (`FOPEN_CACHE_DIR`); set in `init` when the kernel offers it. A process starting from
    /// the mount opens hundreds of files, each an open and a release round trip otherwise.
    no_open: bool,
    no_opendir: bool,
    /// The largest read (and write) the kernel may send, when the transport bounds messages
    /// (a supervisor's socket pair); `None`: fuser's and the kernel's limits.
    max_request: Option<u32>,
}

impl OcifsFs {
    /// Serves `served`, running network reads on `runtime`.
    pub fn new(served: Arc<ServedImage>, runtime: tokio::runtime::Handle) -> Self {
        OcifsFs {
            served,
            runtime,
            no_open: false,
            no_opendir: false,
            max_request: None,
        }
    }

    /// Asks the kernel for requests (reads) of at most `bytes`.
    pub fn with_max_request(mut self, bytes: u32) -> Self {
        self.max_request = Some(bytes);
        self
    }

    fn node(&self, ino: INodeNo) -> Result<&Node, Errno> {
        self.served
            .image
            .tree
            .get(u64::from(ino))
            .filter(|n| n.nlink > 0 || u64::from(ino) == ROOT)
            .ok_or(Errno::ENOENT)
    }
}

/// The attributes the kernel sees for a node.
pub fn attr(ino: u64, n: &Node) -> FileAttr {
    let time = if n.mtime.0 >= 0 {
        UNIX_EPOCH + Duration::new(n.mtime.0 as u64, n.mtime.1)
    } else {
        UNIX_EPOCH - Duration::from_secs(n.mtime.0.unsigned_abs())
    };
    let size = match n.kind {
        Kind::Symlink => n.link.as_ref().map_or(0, |l| l.len() as u64),
        _ => n.size,
    };
    let (major, minor) = n.rdev;
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind: file_type(n.kind),
        perm: (n.mode & 0o7777) as u16,
        nlink: n.nlink.max(1),
        uid: n.uid,
        gid: n.gid,
        rdev: (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12),
        flags: 0,
        blksize: 4096,
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        Kind::File | Kind::Hardlink => FileType::RegularFile,
    }
}

pub(crate) fn errno(e: &crate::Error) -> Errno {
    Errno::from_i32(e.errno())
}

/// Asks the kernel for what both adapters serve with (readdirplus, parallel directory
/// operations, 1 MiB read-ahead); whether it lets opens and opendirs go unanswered.
pub(crate) fn ask_capabilities(config: &mut KernelConfig) -> (bool, bool) {
    use fuser::InitFlags;
    let _ = config.add_capabilities(
        InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS,
    );
    let _ = config.set_max_readahead(1 << 20);
    let no_open = config
        .add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT)
        .is_ok();
    let no_opendir = config
        .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
        .is_ok();
    (no_open, no_opendir)
}

/// Answers an xattr request of `size` bytes with `value` (its size when `size` is 0).
pub(crate) fn reply_sized(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// The names of `xattrs` as listxattr answers them: each followed by a NUL.
pub(crate) fn xattr_names(xattrs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut list = Vec::new();
    for (k, _) in xattrs {
        list.extend_from_slice(k.as_bytes());
        list.push(0);
    }
    list
}

/// Directory `ino` listed from `offset` on (see [`crate::tree::Tree::list`]): entries with
/// the offset to resume after each.
fn listing(
    fs: &OcifsFs,
    ino: INodeNo,
    offset: u64,
) -> Result<impl Iterator<Item = (u64, &str, u64)>, Errno> {
    fs.node(ino)?;
    fs.served
        .image
        .tree
        .list(ino.into(), offset)
        .ok_or(Errno::ENOTDIR)
}

impl Filesystem for OcifsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        (self.no_open, self.no_opendir) = ask_capabilities(config);
        if let Some(max) = self.max_request {
            // The kernel's largest request follows the larger of the two.
            let _ = config.set_max_write(max);
            let _ = config.set_max_readahead(max.min(1 << 20));
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = name
            .to_str()
            .and_then(|n| self.served.image.tree.lookup(u64::from(parent), n))
            .and_then(|i| Some((i, self.served.image.tree.get(i)?)));
        match found {
            Some((ino, n)) => reply.entry(&TTL, &attr(ino, n), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(n) => reply.attr(&TTL, &attr(ino.into(), n)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino).map(|n| n.link.as_deref()) {
            Ok(Some(l)) => reply.data(l.as_bytes()),
            Ok(None) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.served.reads.opens.fetch_add(1, Ordering::Relaxed);
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.node(ino) {
            Ok(n) if n.kind == Kind::Dir => reply.error(Errno::EISDIR),
            Ok(_) if self.no_open => reply.error(Errno::ENOSYS),
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
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
        let served = self.served.clone();
        self.runtime.spawn(async move {
            match served.read(ino.into(), offset, size as u64).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    tracing::error!("read of inode {ino} at {offset} failed: {e}");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.served.reads.opens.fetch_add(1, Ordering::Relaxed);
        match self.node(ino) {
            Ok(n) if n.kind == Kind::Dir && self.no_opendir => reply.error(Errno::ENOSYS),
            Ok(n) if n.kind == Kind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
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
        let entries = match listing(self, ino, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (child, name, next) in entries {
            let kind = self
                .served
                .image
                .tree
                .get(child)
                .map_or(FileType::Directory, |n| file_type(n.kind));
            if reply.add(INodeNo(child), next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match listing(self, ino, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (child, name, next) in entries {
            let Some(n) = self.served.image.tree.get(child) else {
                continue;
            };
            if reply.add(
                INodeNo(child),
                next,
                name,
                &TTL,
                &attr(child, n),
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (files, bytes) = self.served.image.tree.totals();
        reply.statfs(bytes.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let n = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let Some((_, value)) = n.xattrs.iter().find(|(k, _)| OsStr::new(k) == name) else {
            return reply.error(Errno::NO_XATTR);
        };
        reply_sized(reply, size, value);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.node(ino) {
            Ok(n) => reply_sized(reply, size, &xattr_names(&n.xattrs)),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.node(ino) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// Nothing is ever buffered for writing: closing a file has nothing to flush. `ENOSYS`
    /// tells the kernel so once, and it stops sending a flush at every close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// No ioctls: an image's files are plain files, never terminals (`isatty` asks with
    /// `TCGETS` and expects `ENOTTY`).
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

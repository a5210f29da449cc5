//! The correctness oracle: extract the layers' tars in order with GNU tar, applying OCI
//! whiteouts, then compare that tree with a mounted one — every path, type, mode, owner,
//! size, mtime, link target, hard-link identity, xattr and byte.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

/// Extracts `tars` (lowest layer first) into `root` like a runtime would.
pub fn extract(tars: &[&[u8]], root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    for (i, t) in tars.iter().enumerate() {
        let file = root.with_extension(format!("layer{i}.tar"));
        std::fs::write(&file, t).unwrap();
        // Whiteouts first: they hide lower layers only.
        let mut ar = tar::Archive::new(&t[..]);
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let p = e.path().unwrap().into_owned();
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let dir = root.join(p.parent().unwrap_or(Path::new("")));
            if name == ".wh..wh..opq" {
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for c in rd.flatten() {
                        remove(&c.path());
                    }
                }
            } else if let Some(victim) = name.strip_prefix(".wh.") {
                remove(&dir.join(victim));
            } else {
                // A directory replaced by a non-directory, or the reverse, goes first.
                let is_dir = e.header().entry_type() == tar::EntryType::Directory;
                let target = root.join(&p);
                if let Ok(m) = std::fs::symlink_metadata(&target)
                    && m.is_dir() != is_dir
                {
                    remove(&target);
                }
            }
        }
        let st = Command::new("tar")
            .args([
                "-x",
                "-p",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "--exclude=.wh.*",
                "-f",
            ])
            .arg(&file)
            .arg("-C")
            .arg(root)
            .status()
            .unwrap();
        assert!(st.success(), "tar -x of layer {i}");
        std::fs::remove_file(&file).unwrap();
        // GNU tar can leave a directory's mtime disturbed by later entries of the same layer
        // (hard links); a runtime's applier sets directory times last, so do that here.
        let mut ar = tar::Archive::new(&t[..]);
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            if e.header().entry_type() == tar::EntryType::Directory {
                let p = root.join(e.path().unwrap());
                let t = libc::timespec {
                    tv_sec: e.header().mtime().unwrap() as i64,
                    tv_nsec: 0,
                };
                let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: valid path and two timespecs.
                let r = unsafe {
                    libc::utimensat(
                        libc::AT_FDCWD,
                        c.as_ptr(),
                        [t, t].as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                assert_eq!(r, 0);
            }
        }
    }
}

fn remove(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).unwrap(),
        Ok(_) => std::fs::remove_file(p).unwrap(),
        Err(_) => {}
    }
}

/// Everything we compare about one path.
#[derive(Debug, PartialEq)]
pub struct Info {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    rdev: u64,
    link: Option<String>,
    xattrs: BTreeMap<String, Vec<u8>>,
    content: Option<String>,
    /// Index of the first path (in sorted order) sharing this inode; itself when unshared.
    link_group: String,
}

/// Walks `root` into path -> info (root itself excluded).
pub fn snapshot(root: &Path) -> BTreeMap<String, Info> {
    let mut paths = Vec::new();
    walk(root, root, &mut paths);
    paths.sort();
    let mut first_of: HashMap<(u64, u64), String> = HashMap::new();
    let mut out = BTreeMap::new();
    for rel in paths {
        let p = root.join(&rel);
        let m = std::fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_file() {
            "file"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else {
            "other"
        };
        let group = if ft.is_file() && m.nlink() > 1 {
            first_of
                .entry((m.dev(), m.ino()))
                .or_insert_with(|| rel.clone())
                .clone()
        } else {
            rel.clone()
        };
        out.insert(
            rel.clone(),
            Info {
                kind,
                mode: if ft.is_symlink() {
                    0
                } else {
                    m.mode() & 0o7777
                },
                uid: m.uid(),
                gid: m.gid(),
                size: if ft.is_dir() { 0 } else { m.size() },
                mtime: (m.mtime(), m.mtime_nsec()),
                rdev: m.rdev(),
                link: ft.is_symlink().then(|| {
                    std::fs::read_link(&p)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                }),
                xattrs: xattrs(&p),
                content: ft
                    .is_file()
                    .then(|| super::builder::sha(&std::fs::read(&p).unwrap())),
                link_group: group,
            },
        );
    }
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        if e.file_type().unwrap().is_dir() {
            walk(root, &p, out);
        }
    }
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid path and buffer for the duration of the calls.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        let cname = std::ffi::CString::new(name).unwrap();
        let mut val = vec![0u8; 65536];
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        assert!(m >= 0, "lgetxattr {p:?}");
        val.truncate(m as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), val);
    }
    out
}

/// Asserts two snapshots are equal, reporting the first differences readably.
pub fn assert_same(expected: &BTreeMap<String, Info>, actual: &BTreeMap<String, Info>) {
    let mut diffs = Vec::new();
    for (p, e) in expected {
        match actual.get(p) {
            None => diffs.push(format!("missing in mount: {p}")),
            Some(a) if a != e => diffs.push(format!("{p}:\n  expected {e:?}\n  mounted  {a:?}")),
            _ => {}
        }
    }
    for p in actual.keys() {
        if !expected.contains_key(p) {
            diffs.push(format!("extra in mount: {p}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences, first ones:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(!expected.is_empty());
}

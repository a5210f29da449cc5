//! The merged tree: every layer's entries, applied in order with OCI whiteouts.
//!
//! Rules (OCI image spec, "Representing Changes"): `.wh.NAME` removes NAME from lower layers,
//! `.wh..wh..opq` in a directory hides everything lower layers put there; whiteout files are
//! never shown. A layer's whiteouts apply to the layers below it only, so each layer is applied
//! in two passes: its whiteouts first, then its entries. Inode numbers are indexes into one
//! vector, assigned in layer and entry order, so they are stable for a given image; hard links
//! share a node and count their names in `nlink`. Children are kept sorted by name, so
//! directories list in a stable order.

pub mod overlay;

use crate::layer::{Entry, Kind, Locator, clean_path};
use std::collections::BTreeMap;

/// The root directory's inode number (FUSE's fixed root).
pub const ROOT: u64 = 1;

/// Symlinks [`Tree::follow`] follows in one path at most (Linux's `MAXSYMLINKS`).
pub const MAX_SYMLINKS: u32 = 40;

/// Why [`Tree::follow`] found no inode at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unresolved {
    #[error("no such file or directory")]
    NotFound,
    #[error("too many levels of symbolic links")]
    TooManyLinks,
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// One file system object of the merged image.
#[derive(Debug, Clone)]
pub struct Node {
    /// File, Dir, Symlink, Char, Block or Fifo (never Hardlink: links share the node).
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, u32),
    pub rdev: (u32, u32),
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Symlink target.
    pub link: Option<String>,
    pub nlink: u32,
    /// Which layer holds the bytes, and where.
    pub data: Option<(usize, Locator)>,
    /// Directory entries by name.
    pub children: BTreeMap<String, u64>,
    /// The directory this node was first created in (`..` for directories).
    pub parent: u64,
}

impl Node {
    fn from_entry(e: &Entry, layer: usize, parent: u64) -> Node {
        Node {
            kind: e.kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            mtime: e.mtime,
            rdev: e.rdev,
            xattrs: e.xattrs.clone(),
            link: if e.kind == Kind::Symlink {
                e.link.clone()
            } else {
                None
            },
            nlink: 1,
            data: (e.data != Locator::None).then(|| (layer, e.data.clone())),
            children: BTreeMap::new(),
            parent,
        }
    }

    fn implicit_dir(parent: u64) -> Node {
        Node::from_entry(&Entry::new(String::new(), Kind::Dir), 0, parent)
    }
}

/// The merged, read-only view of an image.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// Merges the entries of each layer, lowest first.
    pub fn build(layers: &[Vec<Entry>]) -> Tree {
        let mut t = Tree {
            nodes: vec![Node::implicit_dir(ROOT)],
        };
        for (li, entries) in layers.iter().enumerate() {
            for e in entries {
                let (dir, name) = split(&e.path);
                if name == OPAQUE {
                    if let Some(d) = t.resolve(dir) {
                        let names: Vec<String> = t.node(d).children.keys().cloned().collect();
                        for n in names {
                            t.remove(d, &n);
                        }
                    }
                } else if let Some(victim) = name.strip_prefix(WHITEOUT)
                    && let Some(d) = t.resolve(dir)
                {
                    t.remove(d, victim);
                }
            }
            for e in entries {
                t.add(li, e);
            }
        }
        for i in 0..t.nodes.len() {
            if t.nodes[i].kind == Kind::Dir {
                let subdirs = t.nodes[i]
                    .children
                    .values()
                    .filter(|&&c| t.nodes[(c - 1) as usize].kind == Kind::Dir)
                    .count();
                t.nodes[i].nlink = 2 + subdirs as u32;
            }
        }
        t
    }

    fn add(&mut self, layer: usize, e: &Entry) {
        let (dir, name) = split(&e.path);
        if name.starts_with(WHITEOUT) {
            return;
        }
        if e.path.is_empty() {
            if e.kind == Kind::Dir {
                let keep = std::mem::take(&mut self.nodes[0].children);
                self.nodes[0] = Node::from_entry(e, layer, ROOT);
                self.nodes[0].children = keep;
            }
            return;
        }
        let parent = self.make_dirs(dir);
        if let Some(&old) = self.node(parent).children.get(name) {
            if e.kind == Kind::Dir && self.node(old).kind == Kind::Dir {
                let n = &mut self.nodes[(old - 1) as usize];
                let keep = std::mem::take(&mut n.children);
                *n = Node::from_entry(e, layer, parent);
                n.children = keep;
                return;
            }
            self.remove(parent, name);
        }
        let ino = if e.kind == Kind::Hardlink {
            let target = e.link.as_deref().and_then(|l| clean_path(l).ok());
            match target.as_deref().and_then(|t| self.resolve(t)) {
                Some(t) if self.node(t).kind != Kind::Dir => {
                    self.nodes[(t - 1) as usize].nlink += 1;
                    t
                }
                _ => {
                    tracing::warn!(
                        "hard link {:?} -> {:?}: target missing, skipped",
                        e.path,
                        e.link
                    );
                    return;
                }
            }
        } else {
            self.nodes.push(Node::from_entry(e, layer, parent));
            self.nodes.len() as u64
        };
        self.nodes[(parent - 1) as usize]
            .children
            .insert(name.to_string(), ino);
    }

    /// Finds or creates (as plain 0755 root-owned directories) every directory on `path`.
    fn make_dirs(&mut self, path: &str) -> u64 {
        let mut cur = ROOT;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            cur = match self.node(cur).children.get(comp) {
                Some(&c) if self.node(c).kind == Kind::Dir => c,
                Some(_) => {
                    // A non-directory is in the way: the later layer's directory replaces it.
                    self.remove(cur, comp);
                    self.push_dir(cur, comp)
                }
                None => self.push_dir(cur, comp),
            };
        }
        cur
    }

    fn push_dir(&mut self, parent: u64, name: &str) -> u64 {
        self.nodes.push(Node::implicit_dir(parent));
        let ino = self.nodes.len() as u64;
        self.nodes[(parent - 1) as usize]
            .children
            .insert(name.to_string(), ino);
        ino
    }

    /// Unlinks `name` from `dir`, and everything below it if it is a directory.
    fn remove(&mut self, dir: u64, name: &str) {
        let Some(ino) = self.nodes[(dir - 1) as usize].children.remove(name) else {
            return;
        };
        let n = &mut self.nodes[(ino - 1) as usize];
        n.nlink = n.nlink.saturating_sub(1);
        let names: Vec<String> = n.children.keys().cloned().collect();
        for c in names {
            self.remove(ino, &c);
        }
    }

    /// The node with inode number `ino`.
    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(ino.checked_sub(1)? as usize)
    }

    fn node(&self, ino: u64) -> &Node {
        &self.nodes[(ino - 1) as usize]
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        self.get(parent)?.children.get(name).copied()
    }

    /// The inode at a clean relative path ("" is the root); symlinks are not followed.
    pub fn resolve(&self, path: &str) -> Option<u64> {
        path.split('/')
            .filter(|c| !c.is_empty())
            .try_fold(ROOT, |cur, comp| self.lookup(cur, comp))
    }

    /// The inode at a relative path, following symlinks in every component (absolute targets
    /// from the image root; `..` never leaves it, and goes back along the path walked), at
    /// most [`MAX_SYMLINKS`] of them. Empty and `.` components are skipped.
    pub fn follow(&self, path: &str) -> Result<u64, Unresolved> {
        let mut pending: Vec<&str> = path.split('/').rev().collect();
        // The directories walked, from the root to the current one.
        let mut walked = vec![ROOT];
        let mut links = 0;
        while let Some(comp) = pending.pop() {
            match comp {
                "" | "." => {}
                ".." => {
                    if walked.len() > 1 {
                        walked.pop();
                    }
                }
                name => {
                    let cur = *walked.last().expect("the root is never popped");
                    let next = self.lookup(cur, name).ok_or(Unresolved::NotFound)?;
                    let node = self.get(next).ok_or(Unresolved::NotFound)?;
                    match (&node.kind, &node.link) {
                        (Kind::Symlink, Some(target)) => {
                            links += 1;
                            if links > MAX_SYMLINKS {
                                return Err(Unresolved::TooManyLinks);
                            }
                            if target.starts_with('/') {
                                walked.truncate(1);
                            }
                            pending.extend(target.split('/').rev());
                        }
                        _ => walked.push(next),
                    }
                }
            }
        }
        Ok(*walked.last().expect("the root is never popped"))
    }

    /// [`Tree::follow`], without the reason when the path does not resolve.
    pub fn resolve_links(&self, path: &str) -> Option<u64> {
        self.follow(path).ok()
    }

    /// A path of `ino` (its first name), for profiles and messages.
    pub fn path(&self, ino: u64) -> Option<String> {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let parent = self.get(cur)?.parent;
            let name = self
                .get(parent)?
                .children
                .iter()
                .find(|&(_, &c)| c == cur)?
                .0;
            parts.push(name.clone());
            cur = parent;
            if parts.len() > 4096 {
                return None;
            }
        }
        parts.reverse();
        Some(parts.join("/"))
    }

    /// The reachable nodes whose bytes live in layer `layer`, with their inode numbers.
    pub fn files_in(&self, layer: usize) -> impl Iterator<Item = (u64, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(move |(_, n)| n.nlink > 0 && n.data.as_ref().is_some_and(|d| d.0 == layer))
            .map(|(i, n)| (i as u64 + 1, n))
    }

    /// How many nodes the tree holds (reachable or not): the highest inode number.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Number of reachable names (for statfs) and total file bytes.
    pub fn totals(&self) -> (u64, u64) {
        let live = self.nodes.iter().filter(|n| n.nlink > 0);
        live.fold((0, 0), |(c, s), n| (c + 1, s + n.size))
    }
}

fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str, data: u64) -> Entry {
        let mut e = Entry::new(p.into(), Kind::File);
        e.size = data;
        e.data = Locator::Tar { offset: data };
        e
    }
    fn dir(p: &str) -> Entry {
        Entry::new(p.into(), Kind::Dir)
    }
    fn link(p: &str, to: &str) -> Entry {
        let mut e = Entry::new(p.into(), Kind::Hardlink);
        e.link = Some(to.into());
        e
    }

    fn symlink(p: &str, to: &str) -> Entry {
        let mut e = Entry::new(p.into(), Kind::Symlink);
        e.link = Some(to.into());
        e
    }

    #[test]
    fn paths_follow_symlinks_inside_the_image() {
        let mut layer = vec![
            dir("usr"),
            dir("usr/lib"),
            file("usr/lib/libc.so", 1),
            symlink("lib", "usr/lib"),
            symlink("usr/lib/abs", "/usr/lib/libc.so"),
            symlink("usr/lib/up", "../../../../usr"),
            symlink("loop", "loop"),
            symlink("dangling", "nowhere"),
        ];
        // A chain of exactly MAX_SYMLINKS links resolves; one more is too many.
        for i in 1..=MAX_SYMLINKS {
            layer.push(symlink(&format!("c{i}"), &format!("c{}", i - 1)));
        }
        layer.push(file("c0", 2));
        layer.push(symlink("c41", "c40"));
        let t = Tree::build(&[layer]);
        let libc = t.resolve("usr/lib/libc.so").unwrap();
        for p in [
            "lib/libc.so",
            "./lib//./libc.so",
            "lib/abs",
            "usr/lib/up/lib/libc.so",
        ] {
            assert_eq!(t.follow(p), Ok(libc), "{p}");
        }
        assert_eq!(
            t.follow("lib/../lib/libc.so"),
            Ok(libc),
            "back along the walk"
        );
        assert_eq!(t.follow(""), Ok(ROOT));
        assert_eq!(t.follow("lib"), t.follow("usr/lib"));
        assert_eq!(t.follow("c40"), Ok(t.resolve("c0").unwrap()));
        assert_eq!(t.follow("c41"), Err(Unresolved::TooManyLinks));
        assert_eq!(t.follow("loop"), Err(Unresolved::TooManyLinks));
        assert_eq!(t.follow("dangling"), Err(Unresolved::NotFound));
        assert_eq!(t.follow("lib/missing"), Err(Unresolved::NotFound));
        assert_eq!(t.resolve_links("lib/missing"), None);
        assert_eq!(t.resolve_links("lib/abs"), Some(libc));
    }

    #[test]
    fn whiteouts_opaque_dirs_and_hard_links() {
        let l0 = vec![
            dir("a"),
            file("a/x", 1),
            file("a/y", 2),
            dir("b"),
            file("b/z", 3),
            file("keep", 4),
            link("keep2", "keep"),
        ];
        let l1 = vec![
            file("a/.wh.x", 0),
            dir("b"),
            file("b/.wh..wh..opq", 0),
            file("b/new", 5),
            file("c/deep/f", 6),
        ];
        let t = Tree::build(&[l0, l1]);
        assert!(t.resolve("a/x").is_none());
        assert!(t.resolve("a/y").is_some());
        assert!(t.resolve("b/z").is_none());
        assert!(
            t.resolve("b/new").is_some(),
            "opaque hides lower layers only"
        );
        assert!(t.resolve("b/.wh..wh..opq").is_none());
        assert!(t.resolve("a/.wh.x").is_none());
        assert_eq!(t.resolve("keep"), t.resolve("keep2"));
        assert_eq!(t.get(t.resolve("keep").unwrap()).unwrap().nlink, 2);
        assert_eq!(t.get(t.resolve("c/deep").unwrap()).unwrap().kind, Kind::Dir);
        assert_eq!(t.get(ROOT).unwrap().nlink, 2 + 3);
        assert_eq!(
            t.path(t.resolve("c/deep/f").unwrap()).as_deref(),
            Some("c/deep/f")
        );
    }

    #[test]
    fn replacing_a_linked_file_keeps_the_other_name() {
        let l0 = vec![file("f", 1), link("g", "f")];
        let l1 = vec![file("f", 9)];
        let t = Tree::build(&[l0, l1]);
        let (f, g) = (t.resolve("f").unwrap(), t.resolve("g").unwrap());
        assert_ne!(f, g);
        assert_eq!(t.get(g).unwrap().nlink, 1);
        assert_eq!(
            t.get(f).unwrap().data,
            Some((1, Locator::Tar { offset: 9 }))
        );
    }

    #[test]
    fn whiteout_of_a_directory_removes_its_subtree_and_file_replaces_dir() {
        let l0 = vec![file("d/a/b", 1), file("e/f", 2)];
        let l1 = vec![file(".wh.d", 0), file("e", 3)];
        let t = Tree::build(&[l0, l1]);
        assert!(t.resolve("d").is_none());
        assert_eq!(t.get(t.resolve("e").unwrap()).unwrap().kind, Kind::File);
        let names: Vec<_> = t.get(ROOT).unwrap().children.keys().cloned().collect();
        assert_eq!(names, vec!["e"]);
    }
}

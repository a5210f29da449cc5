//! The merged tree: every layer's entries, applied in order with OCI whiteouts.
//!
//! Rules (OCI image spec, "Representing Changes"): `.wh.NAME` removes NAME from lower layers,
//! `.wh..wh..opq` in a directory hides everything lower layers put there; whiteout files are
//! never shown. A layer's whiteouts apply to the layers below it only, so each layer is applied
//! in two passes: its whiteouts first, then its entries. Inode numbers are indexes into one
//! vector, assigned in layer and entry order, so they are stable for a given image; hard links
//! share a node and count their names in `nlink`. A directory's children are a vector sorted
//! by name (a map only while the tree is built): names are found by binary search, and a
//! listing resumes at its offset, an index, without walking what came before it, so listing
//! a directory takes time linear in its size however many calls the kernel splits it into.

mod build;
pub mod diff;
pub mod overlay;

use crate::layer::{Entry, Kind, Locator};

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
    /// Directory entries, sorted by name.
    pub children: Children,
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
            children: Children::default(),
            parent,
        }
    }

    fn implicit_dir(parent: u64) -> Node {
        Node::from_entry(&Entry::new(String::new(), Kind::Dir), 0, parent)
    }
}

/// A directory's entries, sorted by name: a name is found by binary search, and a listing
/// starts at any position without walking the ones before it.
#[derive(Debug, Clone, Default)]
pub struct Children(Vec<(String, u64)>);

/// The pairs [`Children::iter`] yields, and its iterator.
type Pair<'a> = (&'a String, &'a u64);
type Iter<'a> =
    std::iter::Map<std::slice::Iter<'a, (String, u64)>, fn(&'a (String, u64)) -> Pair<'a>>;

impl Children {
    /// The inode named `name`.
    pub fn get(&self, name: &str) -> Option<&u64> {
        let i = self
            .0
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()?;
        Some(&self.0[i].1)
    }

    /// Names and inodes in name order.
    pub fn iter(&self) -> Iter<'_> {
        self.0.iter().map(|(n, i)| (n, i))
    }

    /// Names in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(n, _)| n)
    }

    /// Inodes in name order.
    pub fn values(&self) -> impl Iterator<Item = &u64> {
        self.0.iter().map(|(_, i)| i)
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a Children {
    type Item = Pair<'a>;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
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
        build::build(layers)
    }

    /// Directory `ino` listed from position `offset` on: `.` (position 0), `..` (1), then its
    /// children in name order, each as (inode, name, the position after it, where a listing
    /// that stops there resumes). Starting anywhere costs the same. `None` if `ino` is not a
    /// directory.
    pub fn list(
        &self,
        ino: u64,
        offset: u64,
    ) -> Option<impl Iterator<Item = (u64, &str, u64)> + '_> {
        let n = self.get(ino).filter(|n| n.kind == Kind::Dir)?;
        let first = usize::try_from(offset).unwrap_or(usize::MAX);
        let dots = [(ino, "."), (n.parent, "..")]
            .into_iter()
            .zip(1..)
            .skip(first.min(2))
            .map(|((i, name), next)| (i, name, next));
        let skip = first.saturating_sub(2).min(n.children.len());
        let kids = n.children.0[skip..]
            .iter()
            .zip(skip as u64 + 3..)
            .map(|((name, i), next)| (*i, name.as_str(), next));
        Some(dots.chain(kids))
    }

    /// The node with inode number `ino`.
    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(ino.checked_sub(1)? as usize)
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

    /// A digest of the tree as the kernel sees it: each inode number with its kind, mode,
    /// owner, size, times, link count, parent, symlink target, extended attributes and named
    /// children. Two trees with one fingerprint give every file the same inode number (which
    /// the kernel keeps), so a supervisor checks it before a new serving process takes over
    /// a mount. Where the bytes live (the locators) is left out: a layer may be opened
    /// through another index and still serve the same bytes.
    pub fn fingerprint(&self) -> String {
        let mut h = crate::digest::Hasher::default();
        let mut text = |b: &[u8]| {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        };
        for (i, n) in self.nodes.iter().enumerate() {
            let numbers = [
                i as u64 + 1,
                n.kind as u64,
                n.mode as u64,
                n.uid as u64,
                n.gid as u64,
                n.size,
                n.mtime.0 as u64,
                n.mtime.1 as u64,
                n.rdev.0 as u64,
                n.rdev.1 as u64,
                n.nlink as u64,
                n.parent,
                n.xattrs.len() as u64,
                n.children.len() as u64,
            ];
            for v in numbers {
                text(&v.to_le_bytes());
            }
            text(n.link.as_deref().unwrap_or("\0").as_bytes());
            for (k, v) in &n.xattrs {
                text(k.as_bytes());
                text(v);
            }
            for (name, ino) in &n.children {
                text(name.as_bytes());
                text(&ino.to_le_bytes());
            }
        }
        h.finish()
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
    fn the_fingerprint_is_the_same_for_the_same_entries_and_changes_with_any_of_them() {
        let layer = || vec![dir("a"), file("a/x", 1), symlink("l", "a/x"), file("b", 2)];
        let base = Tree::build(&[layer()]).fingerprint();
        assert_eq!(Tree::build(&[layer()]).fingerprint(), base);
        // Another place for the same bytes keeps it: only the shape counts.
        let mut moved = layer();
        moved[1].data = Locator::Tar { offset: 99 };
        assert_eq!(Tree::build(&[moved]).fingerprint(), base);
        // Any change the kernel would see changes it: order (inode numbers), size, a name.
        let mut changes = vec![
            vec![dir("a"), file("b", 2), file("a/x", 1), symlink("l", "a/x")],
            vec![dir("a"), file("a/x", 1), symlink("l", "a/x"), file("b", 3)],
            vec![dir("a"), file("a/y", 1), symlink("l", "a/x"), file("b", 2)],
            vec![dir("a"), file("a/x", 1), symlink("l", "a/y"), file("b", 2)],
        ];
        let mut moded = layer();
        moded[3].mode = 0o600;
        changes.push(moded);
        for c in changes {
            assert_ne!(
                Tree::build(std::slice::from_ref(&c)).fingerprint(),
                base,
                "{c:?}"
            );
        }
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

    /// A listing as the kernel gets it: pages of `page` entries, each resumed at the offset
    /// the last one handed back.
    fn paged(t: &Tree, dir: u64, page: usize) -> Vec<(u64, String, u64)> {
        let mut out: Vec<(u64, String, u64)> = Vec::new();
        loop {
            let from = out.last().map_or(0, |e| e.2);
            let got: Vec<_> = t
                .list(dir, from)
                .unwrap()
                .take(page)
                .map(|(i, n, next)| (i, n.to_string(), next))
                .collect();
            if got.is_empty() {
                return out;
            }
            out.extend(got);
        }
    }

    #[test]
    fn listings_resume_at_any_offset() {
        let mut l0 = vec![dir("d")];
        // Out of order, past the size a vector is kept sorted in place: a map while built.
        l0.extend((0..100).rev().map(|i| file(&format!("d/f{i:03}"), i + 1)));
        l0.push(file("plain", 1));
        let l1 = vec![file("d/.wh.f050", 0), file("d/g", 7)];
        let t = Tree::build(&[l0, l1]);
        let d = t.resolve("d").unwrap();
        let all: Vec<_> = t.list(d, 0).unwrap().collect();
        let names: Vec<&str> = all.iter().map(|e| e.1).collect();
        let mut want = vec![".".to_string(), "..".to_string()];
        want.extend((0..100).filter(|&i| i != 50).map(|i| format!("f{i:03}")));
        want.push("g".into());
        assert_eq!(names, want);
        assert_eq!((all[0].0, all[1].0), (d, ROOT));
        assert_eq!(all[2].0, t.lookup(d, "f000").unwrap());
        for (k, e) in all.iter().enumerate() {
            assert_eq!(
                e.2,
                k as u64 + 1,
                "each entry hands back the offset after it"
            );
            let rest: Vec<_> = t.list(d, k as u64).unwrap().collect();
            assert_eq!(rest, all[k..], "resumed at {k}");
        }
        assert_eq!(t.list(d, all.len() as u64).unwrap().count(), 0);
        assert_eq!(t.list(d, u64::MAX).unwrap().count(), 0);
        assert!(t.list(t.resolve("plain").unwrap(), 0).is_none());
        assert_eq!(
            t.get(d).unwrap().children.get("f051"),
            t.lookup(d, "f051").as_ref()
        );
    }

    #[test]
    fn a_large_directory_lists_in_time_linear_in_its_size() {
        // 200,000 names in order, listed 25 at a time (8,000 resumptions). Resuming by
        // building the whole listing again, as readdir once did, took 22 s for the first
        // 20,000 in a debug build; this takes well under a second.
        let n = 200_000u64;
        let mut layer = vec![dir("d")];
        layer.extend((0..n).map(|i| file(&format!("d/file-{i:07}"), i + 1)));
        let t = Tree::build(&[layer]);
        let d = t.resolve("d").unwrap();
        let start = std::time::Instant::now();
        let listed = paged(&t, d, 25);
        let took = start.elapsed();
        assert_eq!(listed.len() as u64, n + 2);
        assert!(listed[2..].windows(2).all(|w| w[0].1 < w[1].1));
        assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    }

    #[test]
    fn children_out_of_order_or_removed_from_large_directories_stay_sorted() {
        // A large directory removed from (whiteouts, an opaque directory) and added to out of
        // order across layers.
        let n = 1000u64;
        let mut l0 = vec![dir("a"), dir("b")];
        for i in 0..n {
            l0.push(file(&format!("a/{i:04}"), i + 1));
            l0.push(file(&format!("b/{i:04}"), i + 1));
        }
        let mut l1 = vec![file("a/.wh.0500", 0), file("a/0000x", 1), file("a/0999", 2)];
        l1.push(file("b/.wh..wh..opq", 0));
        l1.extend((0..40).rev().map(|i| file(&format!("b/new{i:02}"), 3)));
        let t = Tree::build(&[l0, l1]);
        let a = t.resolve("a").unwrap();
        let names: Vec<String> = paged(&t, a, 100).into_iter().skip(2).map(|e| e.1).collect();
        let mut want: Vec<String> = (0..n)
            .filter(|&i| i != 500)
            .map(|i| format!("{i:04}"))
            .collect();
        want.insert(1, "0000x".into());
        assert_eq!(names, want);
        assert_eq!(
            t.get(t.resolve("a/0999").unwrap()).unwrap().data,
            Some((1, Locator::Tar { offset: 2 }))
        );
        let b = t.resolve("b").unwrap();
        let names: Vec<String> = t.list(b, 2).unwrap().map(|e| e.1.to_string()).collect();
        assert_eq!(
            names,
            (0..40).map(|i| format!("new{i:02}")).collect::<Vec<_>>()
        );
        assert!(t.resolve("b/0001").is_none());
    }
}

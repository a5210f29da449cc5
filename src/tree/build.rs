//! Building the tree: each layer's whiteouts, then its entries, applied to directories whose
//! children are kept in the cheapest form that stays correct while names arrive (see
//! [`Kids`]), then sorted into [`Children`] once every layer is in.

use super::{Children, Node, OPAQUE, ROOT, Tree, WHITEOUT, split};
use crate::layer::{Entry, Kind, clean_path};
use std::collections::HashMap;

/// Merges the entries of each layer, lowest first.
pub(super) fn build(layers: &[Vec<Entry>]) -> Tree {
    let mut t = Builder {
        nodes: vec![Node::implicit_dir(ROOT)],
        kids: HashMap::from([(ROOT, Kids::default())]),
    };
    for (li, entries) in layers.iter().enumerate() {
        for e in entries {
            let (dir, name) = split(&e.path);
            if name == OPAQUE {
                if let Some(d) = t.resolve(dir) {
                    for n in t.names(d) {
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
    t.finish()
}

/// The tree while layers are applied: each directory's children, moved into [`Children`]
/// when every layer is in.
struct Builder {
    nodes: Vec<Node>,
    /// Children by directory inode.
    kids: HashMap<u64, Kids>,
}

/// A directory's children while the tree is built: a sorted vector while names come in order
/// (tar writers usually sort, and then appending is all it takes), a hash map once they do
/// not, sorted into a vector when the tree is finished. For a million entries in order this
/// takes 32 bytes an entry less than a sorted map did; out of order, about as much (a
/// `BTreeMap` there leaves its nodes behind as holes in the heap once freed: 31 more).
enum Kids {
    Sorted(Vec<(String, u64)>),
    Map(HashMap<String, u64>),
}

impl Default for Kids {
    fn default() -> Kids {
        Kids::Sorted(Vec::new())
    }
}

/// Entries of a sorted vector that may still be inserted into or removed from in place.
const SMALL: usize = 32;

impl Kids {
    fn get(&self, name: &str) -> Option<u64> {
        match self {
            Kids::Sorted(v) => v
                .binary_search_by(|(n, _)| n.as_str().cmp(name))
                .ok()
                .map(|i| v[i].1),
            Kids::Map(m) => m.get(name).copied(),
        }
    }

    /// Adds `name`, which is not there.
    fn insert(&mut self, name: &str, ino: u64) {
        if let Kids::Sorted(v) = self {
            match v.last() {
                None => return v.push((name.to_string(), ino)),
                Some((last, _)) if last.as_str() < name => return v.push((name.to_string(), ino)),
                _ if v.len() < SMALL => {
                    let i = v.partition_point(|(n, _)| n.as_str() < name);
                    return v.insert(i, (name.to_string(), ino));
                }
                _ => self.make_map(),
            }
        }
        if let Kids::Map(m) = self {
            m.insert(name.to_string(), ino);
        }
    }

    fn remove(&mut self, name: &str) -> Option<u64> {
        if let Kids::Sorted(v) = self {
            let i = v.binary_search_by(|(n, _)| n.as_str().cmp(name)).ok()?;
            if v.len() <= SMALL {
                return Some(v.remove(i).1);
            }
            self.make_map();
        }
        match self {
            Kids::Map(m) => m.remove(name),
            Kids::Sorted(_) => None,
        }
    }

    fn make_map(&mut self) {
        if let Kids::Sorted(v) = self {
            *self = Kids::Map(std::mem::take(v).into_iter().collect());
        }
    }

    fn names(&self) -> Vec<String> {
        match self {
            Kids::Sorted(v) => v.iter().map(|(n, _)| n.clone()).collect(),
            Kids::Map(m) => m.keys().cloned().collect(),
        }
    }

    fn into_sorted(self) -> Vec<(String, u64)> {
        match self {
            Kids::Sorted(mut v) => {
                v.shrink_to_fit();
                v
            }
            Kids::Map(m) => {
                let mut v: Vec<_> = m.into_iter().collect();
                v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                v
            }
        }
    }
}

/// The index of inode `ino` in the node vector.
fn idx(ino: u64) -> usize {
    (ino - 1) as usize
}

impl Builder {
    fn add(&mut self, layer: usize, e: &Entry) {
        let (dir, name) = split(&e.path);
        if name.starts_with(WHITEOUT) {
            return;
        }
        if e.path.is_empty() {
            if e.kind == Kind::Dir {
                self.nodes[0] = Node::from_entry(e, layer, ROOT);
            }
            return;
        }
        let parent = self.make_dirs(dir);
        if let Some(old) = self.lookup(parent, name) {
            if e.kind == Kind::Dir && self.nodes[idx(old)].kind == Kind::Dir {
                self.nodes[idx(old)] = Node::from_entry(e, layer, parent);
                return;
            }
            self.remove(parent, name);
        }
        let ino = if e.kind == Kind::Hardlink {
            let target = e.link.as_deref().and_then(|l| clean_path(l).ok());
            match target.as_deref().and_then(|t| self.resolve(t)) {
                Some(t) if self.nodes[idx(t)].kind != Kind::Dir => {
                    self.nodes[idx(t)].nlink += 1;
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
            self.push(Node::from_entry(e, layer, parent))
        };
        self.kids.entry(parent).or_default().insert(name, ino);
    }

    /// Adds a node; returns its inode number.
    fn push(&mut self, node: Node) -> u64 {
        self.nodes.push(node);
        self.nodes.len() as u64
    }

    fn lookup(&self, dir: u64, name: &str) -> Option<u64> {
        self.kids.get(&dir)?.get(name)
    }

    fn names(&self, dir: u64) -> Vec<String> {
        self.kids.get(&dir).map_or_else(Vec::new, Kids::names)
    }

    /// Finds or creates (as plain 0755 root-owned directories) every directory on `path`.
    fn make_dirs(&mut self, path: &str) -> u64 {
        let mut cur = ROOT;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            cur = match self.lookup(cur, comp) {
                Some(c) if self.nodes[idx(c)].kind == Kind::Dir => c,
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
        let ino = self.push(Node::implicit_dir(parent));
        self.kids.entry(parent).or_default().insert(name, ino);
        ino
    }

    /// Unlinks `name` from `dir`, and everything below it if it is a directory.
    fn remove(&mut self, dir: u64, name: &str) {
        let Some(ino) = self.kids.get_mut(&dir).and_then(|k| k.remove(name)) else {
            return;
        };
        let n = &mut self.nodes[idx(ino)];
        n.nlink = n.nlink.saturating_sub(1);
        for c in self.names(ino) {
            self.remove(ino, &c);
        }
    }

    /// The inode at a clean relative path, as built so far.
    fn resolve(&self, path: &str) -> Option<u64> {
        path.split('/')
            .filter(|c| !c.is_empty())
            .try_fold(ROOT, |cur, comp| self.lookup(cur, comp))
    }

    /// The finished tree: each directory's children sorted into a vector, its link count set.
    fn finish(self) -> Tree {
        let Builder { mut nodes, kids } = self;
        for (ino, kids) in kids {
            let children = Children(kids.into_sorted());
            let n = &nodes[idx(ino)];
            if n.kind == Kind::Dir {
                let subdirs = children
                    .values()
                    .filter(|&&c| nodes[idx(c)].kind == Kind::Dir)
                    .count();
                nodes[idx(ino)].nlink = 2 + subdirs as u32;
            }
            nodes[idx(ino)].children = children;
        }
        // Directories that never had a child.
        for n in nodes.iter_mut() {
            if n.kind == Kind::Dir && n.children.is_empty() {
                n.nlink = 2;
            }
        }
        Tree { nodes }
    }
}

//! Files read together: a directory's files of one kind, and families of same-named
//! directories.
//!
//! A program that reads one file of a directory usually reads its siblings of the same kind
//! next (a package's compiled modules, a locale's categories, `/etc`). So on the first read
//! of a file, the directory's files of that kind (by name: shared objects, or the same
//! extension) are fetched in one streamed range when they lie together in one layer and span
//! at most 8 MiB. Reading a plugin directory's index does not bring its plugins: glibc's
//! `gconv-modules.cache` is 27 KB, its directory of `.so` converters 3.6 MB, and a program
//! loads one or two of them.
//!
//! And a program that has read two directories of the same name under sibling directories
//! (`encodings/__pycache__`, then `re/__pycache__`) is walking a family of them, one per
//! package it imports, each first read a round trip of its own: the rest of the family
//! (`*/__pycache__` beside them, 8 MiB at most) is fetched then, a few at a time. One such
//! directory alone proves nothing: a program reading `de/LC_MESSAGES` does not read the
//! other languages'. Nor is it done on a mount with a planned prefetch (landmarks, a profile):
//! the plan names what the workload reads.

use crate::image::Image;
use crate::layer::Kind;
use crate::tree::Tree;
use std::collections::HashMap;

/// The kind of file `read`, a child of directory `dir` (see [`name_kind`]).
pub fn kind_of(image: &Image, dir: u64, read: u64) -> Option<String> {
    image
        .tree
        .get(dir)
        .and_then(|n| n.children.iter().find(|(_, i)| **i == read))
        .map(|(name, _)| name_kind(name).to_string())
}

/// Where the files of directory `dir` of `kind` lie in the layer most of them come from, if
/// that range is at most `max` bytes and mostly theirs (files written together, not
/// interleaved with others').
pub fn together(image: &Image, dir: u64, kind: &str, max: u64) -> Option<Together> {
    let tree = &image.tree;
    let node = tree.get(dir)?;
    // layer -> (start, end, sum of extents, files, sum of file sizes)
    let mut per_layer: HashMap<usize, (u64, u64, u64, usize, u64)> = HashMap::new();
    for (_, &child) in node.children.iter().filter(|(n, _)| name_kind(n) == kind) {
        let Some(c) = tree.get(child) else {
            continue;
        };
        let Some((li, loc)) = &c.data else { continue };
        let Some((a, b)) = image.layers[*li].layer.extent(loc, c.size) else {
            continue;
        };
        let e = per_layer.entry(*li).or_insert((u64::MAX, 0, 0, 0, 0));
        *e = (e.0.min(a), e.1.max(b), e.2 + (b - a), e.3 + 1, e.4 + c.size);
    }
    let (layer, (a, b, sum, _, file_bytes)) = per_layer.into_iter().max_by_key(|(_, e)| e.3)?;
    (b - a <= max && sum * 2 >= b - a).then_some(Together {
        layer,
        extent: (a, b),
        file_bytes,
    })
}

/// Counts `dir` (named N, in directory S, in P) as read in its family, the directories
/// P/*/N (`families` holds the counts); on the second, returns the others.
pub fn family_on_second_read(
    tree: &Tree,
    dir: u64,
    families: &mut HashMap<(u64, String), u32>,
) -> Vec<u64> {
    let Some(s) = tree.get(dir).map(|n| n.parent) else {
        return Vec::new();
    };
    let Some(sn) = tree.get(s) else {
        return Vec::new();
    };
    let Some(name) = sn.children.iter().find(|(_, i)| **i == dir).map(|(n, _)| n) else {
        return Vec::new();
    };
    let p = sn.parent;
    let Some(pn) = tree.get(p).filter(|_| p != s) else {
        return Vec::new();
    };
    let seen = families.entry((p, name.clone())).or_insert(0);
    *seen += 1;
    if *seen != 2 {
        return Vec::new();
    }
    pn.children
        .values()
        .filter(|&&c| c != s)
        .filter_map(|&c| tree.get(c)?.children.get(name).copied())
        .filter(|&d| tree.get(d).is_some_and(|n| n.kind == Kind::Dir))
        .collect()
}

/// A directory's files of one kind that lie together.
pub struct Together {
    pub layer: usize,
    /// Their range in the layer's data (see [`crate::layer::Layer::extent`]: compressed bytes
    /// for eStargz, the uncompressed tar for gzip with an index).
    pub extent: (u64, u64),
    /// Their sizes added up: what the statistics count, the same for every format.
    pub file_bytes: u64,
}

/// What kind of file a name suggests, for fetching a directory's files together: shared
/// objects (`libz.so.1`, `_ssl.cpython-311-x86_64-linux-gnu.so`) are one kind, loaded one by
/// one by name; otherwise the extension (`.pyc`, `.conf`; none for `LC_CTYPE` or `passwd`).
pub fn name_kind(name: &str) -> &str {
    if name.ends_with(".so") || name.contains(".so.") {
        return ".so";
    }
    match name.rfind('.') {
        Some(i) if i > 0 => &name[i..],
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_say_their_kind() {
        assert_eq!(name_kind("libz.so.1.2.13"), ".so");
        assert_eq!(name_kind("_ssl.cpython-311-x86_64-linux-gnu.so"), ".so");
        assert_eq!(name_kind("typing.cpython-311.pyc"), ".pyc");
        assert_eq!(name_kind("gconv-modules.cache"), ".cache");
        assert_eq!(name_kind("LC_CTYPE"), "");
        assert_eq!(name_kind(".bashrc"), "");
    }

    #[test]
    fn a_family_is_brought_on_its_second_directory_only() {
        use crate::layer::Entry;
        let dirs = [
            "pkg/a/__pycache__",
            "pkg/b/__pycache__",
            "pkg/c/__pycache__",
        ];
        let mut entries: Vec<Entry> = dirs
            .iter()
            .map(|d| Entry::new(d.to_string(), Kind::Dir))
            .collect();
        // A same-named file, not a directory, is not one of the family.
        entries.push(Entry::new("pkg/d/__pycache__".into(), Kind::File));
        let tree = Tree::build(&[entries]);
        let ino = |p: &str| tree.resolve(p).unwrap();
        let mut families = HashMap::new();
        assert!(family_on_second_read(&tree, ino(dirs[0]), &mut families).is_empty());
        let mut rest = family_on_second_read(&tree, ino(dirs[1]), &mut families);
        rest.sort();
        let mut want = vec![ino(dirs[0]), ino(dirs[2])];
        want.sort();
        assert_eq!(rest, want, "the others, once two were read");
        assert!(
            family_on_second_read(&tree, ino(dirs[2]), &mut families).is_empty(),
            "brought once"
        );
        // A directory at the root has no family.
        assert!(family_on_second_read(&tree, ino("pkg"), &mut families).is_empty());
    }
}

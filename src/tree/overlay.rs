//! One layer's own tree, with its whiteouts in overlayfs form: what a runtime stacks as one
//! lower directory of an overlay mount (a containers/storage additional layer store's
//! `diff`, a containerd snapshot). The kernel merges the layers, so nothing is hidden here:
//! `.wh.NAME` becomes a character device 0/0 named NAME, and `.wh..wh..opq` in a directory
//! becomes `trusted.overlay.opaque=y` on that directory (the forms containers/storage's
//! overlay driver and containerd write when they unpack a layer).
//!
//! Any `trusted.overlay.*` extended attribute the layer's own entries carry is dropped:
//! overlayfs obeys those (redirects, metacopy, opacity) in a lower directory, so an image
//! could otherwise reshape the merged tree in ways an ordinary pull never would.

use super::Tree;
use crate::layer::{Entry, Kind};
use std::collections::HashSet;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// The extended attribute overlayfs reads to hide a lower directory's lower layers.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// The namespace of the attributes overlayfs obeys in its layers.
const OVERLAY_XATTRS: &str = "trusted.overlay.";

/// The tree of one layer on its own, whiteouts in overlay form (see the module doc). Inode
/// numbers are stable for the same entries, as [`Tree::build`]'s are.
pub fn layer_tree(entries: &[Entry]) -> Tree {
    Tree::build(&[overlay_entries(entries)])
}

/// `entries` with whiteouts and opaque markers in overlay form. Whiteouts come first, so
/// that a real entry of the same name in the same layer (which a well-formed layer never
/// has) wins over the whiteout whatever the order.
pub fn overlay_entries(entries: &[Entry]) -> Vec<Entry> {
    let mut opaque: HashSet<&str> = HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let (dir, name) = e.path.rsplit_once('/').unwrap_or(("", &e.path));
        if name == OPAQUE {
            opaque.insert(dir);
        } else if let Some(victim) = name.strip_prefix(WHITEOUT) {
            // `.wh..wh.*` names other than the opaque marker are aufs bookkeeping.
            if victim.is_empty() || victim.starts_with(WHITEOUT) {
                continue;
            }
            let path = match dir {
                "" => victim.to_string(),
                d => format!("{d}/{victim}"),
            };
            let mut w = Entry::new(path, Kind::Char);
            w.mode = 0;
            w.mtime = e.mtime;
            out.push(w);
        }
    }
    // An opaque directory the layer has no entry for gets one, so it can carry the mark.
    let listed: HashSet<&str> = entries
        .iter()
        .filter(|e| e.kind == Kind::Dir)
        .map(|e| e.path.as_str())
        .collect();
    let mut implicit: Vec<&str> = opaque.difference(&listed).copied().collect();
    implicit.sort_unstable();
    for dir in implicit {
        out.push(Entry::new(dir.to_string(), Kind::Dir));
    }
    for e in entries {
        let name = e.path.rsplit_once('/').map_or(e.path.as_str(), |(_, n)| n);
        if name.starts_with(WHITEOUT) {
            continue;
        }
        let mut e = e.clone();
        e.xattrs.retain(|(k, _)| !k.starts_with(OVERLAY_XATTRS));
        out.push(e);
    }
    for e in &mut out {
        if e.kind == Kind::Dir && opaque.contains(e.path.as_str()) {
            e.xattrs.retain(|(k, _)| !k.starts_with(OVERLAY_XATTRS));
            e.xattrs.push((OPAQUE_XATTR.to_string(), b"y".to_vec()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Locator;
    use crate::tree::ROOT;

    fn file(p: &str, at: u64) -> Entry {
        let mut e = Entry::new(p.into(), Kind::File);
        e.size = 1;
        e.data = Locator::Tar { offset: at };
        e
    }

    fn dir(p: &str) -> Entry {
        Entry::new(p.into(), Kind::Dir)
    }

    #[test]
    fn whiteouts_become_char_devices_and_opaque_markers_an_xattr() {
        let mut marked = dir("keep");
        marked.xattrs = vec![
            ("trusted.overlay.redirect".into(), b"/elsewhere".to_vec()),
            ("user.note".into(), b"kept".to_vec()),
        ];
        let entries = vec![
            file(".wh.gone", 0),
            dir("etc"),
            file("etc/.wh.passwd", 0),
            dir("opq"),
            file("opq/.wh..wh..opq", 0),
            file("opq/new", 1),
            file("implicit/.wh..wh..opq", 0),
            file(".wh..wh.plnk", 0),
            marked,
            file("etc/shadow", 2),
        ];
        let t = layer_tree(&entries);
        for p in ["gone", "etc/passwd"] {
            let n = t.get(t.resolve(p).unwrap()).unwrap();
            assert_eq!(
                (n.kind, n.rdev, n.mode, n.data.is_none()),
                (Kind::Char, (0, 0), 0, true),
                "{p}"
            );
        }
        let opaque = |p: &str| {
            let n = t.get(t.resolve(p).unwrap()).unwrap();
            assert_eq!(n.kind, Kind::Dir, "{p}");
            n.xattrs.iter().any(|(k, v)| k == OPAQUE_XATTR && v == b"y")
        };
        assert!(opaque("opq"));
        assert!(opaque("implicit"), "a directory the layer does not list");
        assert!(!opaque("etc"));
        assert!(
            t.resolve("opq/new").is_some(),
            "the layer's own entries stay"
        );
        assert!(t.resolve("etc/shadow").is_some());
        assert!(t.resolve("opq/.wh..wh..opq").is_none());
        assert!(t.resolve(".wh..wh.plnk").is_none() && t.resolve(".wh.plnk").is_none());
        let keep = t.get(t.resolve("keep").unwrap()).unwrap();
        assert_eq!(
            keep.xattrs,
            vec![("user.note".to_string(), b"kept".to_vec())]
        );
        let root: Vec<_> = t.get(ROOT).unwrap().children.keys().cloned().collect();
        assert_eq!(root, ["etc", "gone", "implicit", "keep", "opq"]);
    }

    #[test]
    fn a_real_entry_wins_over_a_whiteout_of_the_same_name_in_either_order() {
        for entries in [
            vec![file("x", 7), file(".wh.x", 0)],
            vec![file(".wh.x", 0), file("x", 7)],
        ] {
            let t = layer_tree(&entries);
            let n = t.get(t.resolve("x").unwrap()).unwrap();
            assert_eq!(n.kind, Kind::File);
            assert_eq!(n.data, Some((0, Locator::Tar { offset: 7 })));
        }
    }

    #[test]
    fn an_opaque_directory_listed_after_its_marker_keeps_the_mark_and_its_mode() {
        let mut d = dir("d");
        d.mode = 0o700;
        d.xattrs = vec![(OPAQUE_XATTR.into(), b"n".to_vec())];
        let t = layer_tree(&[file("d/.wh..wh..opq", 0), d, file("d/f", 3)]);
        let n = t.get(t.resolve("d").unwrap()).unwrap();
        assert_eq!(n.mode, 0o700);
        assert_eq!(n.xattrs, vec![(OPAQUE_XATTR.to_string(), b"y".to_vec())]);
    }
}

//! What differs between two merged trees (`ocifs diff`): paths added, removed, and changed,
//! with the attributes that changed. Metadata only: file bytes are compared by the caller
//! when asked (they may have to be fetched).

use super::{Node, ROOT, Tree};

/// How a path differs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    /// The attributes that differ (`type`, `mode`, `owner`, `size`, `target`, `mtime`,
    /// `device`, `xattrs`).
    Changed(Vec<&'static str>),
}

/// One path that differs, and how.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    pub path: String,
    pub change: Change,
}

/// The differences from `a` to `b`, in path order. A directory added or removed is listed
/// with everything under it.
pub fn diff(a: &Tree, b: &Tree) -> Vec<Difference> {
    let mut out = Vec::new();
    walk(a, b, Some(ROOT), Some(ROOT), String::new(), &mut out);
    out
}

fn walk(
    a: &Tree,
    b: &Tree,
    ia: Option<u64>,
    ib: Option<u64>,
    path: String,
    out: &mut Vec<Difference>,
) {
    let na = ia.and_then(|i| a.get(i));
    let nb = ib.and_then(|i| b.get(i));
    match (na, nb) {
        (None, None) => return,
        (Some(_), None) => out.push(Difference {
            path: path.clone(),
            change: Change::Removed,
        }),
        (None, Some(_)) => out.push(Difference {
            path: path.clone(),
            change: Change::Added,
        }),
        (Some(x), Some(y)) => {
            let fields = changed(x, y);
            if !fields.is_empty() && !path.is_empty() {
                out.push(Difference {
                    path: path.clone(),
                    change: Change::Changed(fields),
                });
            }
        }
    }
    // Children of both, merged in name order.
    let names = |n: Option<&Node>| -> Vec<(String, u64)> {
        n.map(|n| n.children.iter().map(|(k, &v)| (k.clone(), v)).collect())
            .unwrap_or_default()
    };
    let (ca, cb) = (names(na), names(nb));
    let (mut i, mut j) = (0, 0);
    while i < ca.len() || j < cb.len() {
        let join = |name: &str| match path.is_empty() {
            true => name.to_string(),
            false => format!("{path}/{name}"),
        };
        let order = match (ca.get(i), cb.get(j)) {
            (Some(x), Some(y)) => x.0.cmp(&y.0),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                walk(a, b, Some(ca[i].1), None, join(&ca[i].0), out);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                walk(a, b, None, Some(cb[j].1), join(&cb[j].0), out);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                walk(a, b, Some(ca[i].1), Some(cb[j].1), join(&ca[i].0), out);
                i += 1;
                j += 1;
            }
        }
    }
}

/// Every regular file of `tree` with its path, inode and size, in path order.
pub fn regular_files(tree: &Tree) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![(ROOT, String::new())];
    while let Some((ino, path)) = stack.pop() {
        let Some(node) = tree.get(ino) else { continue };
        if node.kind == crate::layer::Kind::File {
            out.push((path.clone(), ino, node.size));
        }
        for (name, &child) in node.children.iter() {
            let p = match path.is_empty() {
                true => name.clone(),
                false => format!("{path}/{name}"),
            };
            stack.push((child, p));
        }
    }
    out.sort();
    out
}

/// The attributes of two nodes of one path that differ.
fn changed(x: &Node, y: &Node) -> Vec<&'static str> {
    let mut f = Vec::new();
    let checks: [(&'static str, bool); 8] = [
        ("type", x.kind != y.kind),
        ("mode", x.mode != y.mode),
        ("owner", (x.uid, x.gid) != (y.uid, y.gid)),
        ("size", x.size != y.size),
        ("target", x.link != y.link),
        ("mtime", x.mtime != y.mtime),
        ("device", x.rdev != y.rdev),
        ("xattrs", x.xattrs != y.xattrs),
    ];
    for (name, differs) in checks {
        if differs {
            f.push(name);
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Entry, Kind};

    fn file(p: &str, size: u64) -> Entry {
        let mut e = Entry::new(p.to_string(), Kind::File);
        e.size = size;
        e
    }

    #[test]
    fn added_removed_and_changed_paths_in_order() {
        let a = Tree::build(&[vec![
            file("etc/passwd", 10),
            file("etc/old", 1),
            file("bin/sh", 100),
            Entry::new("gone".into(), Kind::Dir),
            file("gone/x", 1),
        ]]);
        let mut sh = file("bin/sh", 100);
        sh.mode = 0o755;
        let b = Tree::build(&[vec![file("etc/passwd", 12), sh, file("etc/new", 1)]]);
        let got: Vec<_> = diff(&a, &b)
            .into_iter()
            .map(|d| (d.path, d.change))
            .collect();
        assert_eq!(
            got,
            vec![
                ("bin/sh".into(), Change::Changed(vec!["mode"])),
                ("etc/new".into(), Change::Added),
                ("etc/old".into(), Change::Removed),
                ("etc/passwd".into(), Change::Changed(vec!["size"])),
                ("gone".into(), Change::Removed),
                ("gone/x".into(), Change::Removed),
            ]
        );
        assert!(diff(&a, &a).is_empty());
    }
}

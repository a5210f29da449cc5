//! Browsing an image without mounting it, as crane and skopeo users expect: `ls` (in `tar
//! -tv` style, or JSON), `manifest` (raw, like `crane manifest`), `config`, `digest`.

use super::common::{Common, open};
use anyhow::{Result, anyhow, bail};
use ocifs::layer::Kind;
use ocifs::tree::{Node, Tree};
use std::io::Write;

/// How `ls` prints.
#[derive(Clone, Copy)]
pub struct LsOptions {
    /// `tar -tv` style: mode, owner, size, date, path, link target.
    pub long: bool,
    /// Into subdirectories.
    pub recursive: bool,
    /// A directory itself, not its entries.
    pub directory: bool,
    /// One JSON array of entries.
    pub json: bool,
}

/// `ocifs ls`: the entries at `paths` (default `/`) of an image, with absolute paths. A
/// symlink is shown as itself (`-> target`), never followed, unless a path goes through it.
pub async fn ls(common: &Common, reference: &str, paths: &[String], o: LsOptions) -> Result<()> {
    let image = open(common, reference).await?;
    let tree = &image.tree;
    let roots: Vec<String> = if paths.is_empty() {
        vec!["/".into()]
    } else {
        paths.to_vec()
    };
    let mut found = Vec::new();
    for p in &roots {
        let (ino, path) = entry(tree, p)?;
        let node = tree.get(ino).expect("resolved inode");
        if node.kind == Kind::Dir && !o.directory {
            walk(tree, ino, &path, o.recursive, &mut found);
        } else {
            found.push((path, ino));
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if o.json {
        let list: Vec<serde_json::Value> = found
            .iter()
            .map(|(p, ino)| json_entry(p, tree.get(*ino).expect("inode")))
            .collect();
        serde_json::to_writer_pretty(&mut out, &list)?;
        writeln!(out)?;
    } else {
        for (p, ino) in &found {
            let n = tree.get(*ino).expect("inode");
            if o.long {
                writeln!(out, "{}", long_line(p, n))?;
            } else {
                writeln!(out, "{p}")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// The inode of `path` (its directories followed through symlinks, its last name not) and
/// its absolute, clean form.
fn entry(tree: &Tree, path: &str) -> Result<(u64, String)> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let Some((last, dirs)) = parts.split_last() else {
        return Ok((ocifs::tree::ROOT, "/".into()));
    };
    let dir = if dirs.is_empty() {
        ocifs::tree::ROOT
    } else {
        tree.follow(&dirs.join("/"))
            .map_err(|e| anyhow!("{path}: {e}"))?
    };
    if tree.get(dir).map(|n| n.kind) != Some(Kind::Dir) {
        bail!("{path}: not a directory on the way");
    }
    if *last == ".." || parts.contains(&"..") {
        // Where `..` leads, by the tree's own names.
        let ino = tree.follow(path).map_err(|e| anyhow!("{path}: {e}"))?;
        return Ok((ino, format!("/{}", tree.path(ino).unwrap_or_default())));
    }
    let ino = tree
        .lookup(dir, last)
        .ok_or_else(|| anyhow!("{path}: no such file or directory in the image"))?;
    // The name asked for (a hard link's other names are the same node).
    Ok((ino, format!("/{}", parts.join("/"))))
}

/// The entries of directory `ino` (at `path`), depth first in name order.
fn walk(tree: &Tree, ino: u64, path: &str, recursive: bool, out: &mut Vec<(String, u64)>) {
    let node = tree.get(ino).expect("inode");
    for (name, &child) in &node.children {
        let p = if path == "/" {
            format!("/{name}")
        } else {
            format!("{path}/{name}")
        };
        out.push((p.clone(), child));
        if recursive && tree.get(child).is_some_and(|c| c.kind == Kind::Dir) {
            walk(tree, child, &p, recursive, out);
        }
    }
}

/// `-rw-r--r-- 0/0 4096 2026-12-06 06:35 /etc/passwd` (devices: `major,minor` for the
/// size; dates in UTC).
fn long_line(path: &str, n: &Node) -> String {
    let size = match n.kind {
        Kind::Char | Kind::Block => format!("{},{}", n.rdev.0, n.rdev.1),
        _ => n.size.to_string(),
    };
    let mut line = format!(
        "{} {}/{} {size:>9} {} {path}",
        mode_string(n.kind, n.mode),
        n.uid,
        n.gid,
        date(n.mtime.0)
    );
    if let Some(l) = &n.link {
        line += &format!(" -> {l}");
    }
    line
}

/// `drwxr-xr-x`, with set-id and sticky bits as `ls` shows them.
pub fn mode_string(kind: Kind, mode: u32) -> String {
    let t = match kind {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::Char => 'c',
        Kind::Block => 'b',
        Kind::Fifo => 'p',
        Kind::File | Kind::Hardlink => '-',
    };
    let mut s = String::from(t);
    for (shift, special, lower, upper) in [
        (6, 0o4000, 's', 'S'),
        (3, 0o2000, 's', 'S'),
        (0, 0o1000, 't', 'T'),
    ] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        let x = bits & 1 != 0;
        s.push(match (mode & special != 0, x) {
            (true, true) => lower,
            (true, false) => upper,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// `YYYY-MM-DD HH:MM` in UTC.
fn date(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => "????-??-?? ??:??".into(),
    }
}

/// One `ls --json` entry.
fn json_entry(path: &str, n: &Node) -> serde_json::Value {
    let kind = match n.kind {
        Kind::File | Kind::Hardlink => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::Char => "char",
        Kind::Block => "block",
        Kind::Fifo => "fifo",
    };
    let mut v = serde_json::json!({
        "path": path, "type": kind, "mode": n.mode & 0o7777, "uid": n.uid, "gid": n.gid,
        "size": n.size, "mtime": n.mtime.0,
    });
    if let Some(l) = &n.link {
        v["target"] = l.clone().into();
    }
    if matches!(n.kind, Kind::Char | Kind::Block) {
        v["device"] = serde_json::json!([n.rdev.0, n.rdev.1]);
    }
    if n.nlink > 1 && n.kind != Kind::Dir {
        v["links"] = n.nlink.into();
    }
    v
}

/// `ocifs manifest`: the manifest `REF` names, byte for byte (an index stays an index).
pub async fn manifest(common: &Common, reference: &str) -> Result<()> {
    let (source, what, _) = common.source(reference).await?;
    let (body, _) = source.manifest(&what).await?;
    let mut out = std::io::stdout().lock();
    out.write_all(&body)?;
    out.flush()?;
    Ok(())
}

/// `ocifs config`: the image config of `REF` for the platform, byte for byte.
pub async fn config(common: &Common, reference: &str) -> Result<()> {
    let (source, what, _) = common.source(reference).await?;
    let cfg = common.open_config()?;
    let r = ocifs::image::resolve(&source, &what, &cfg.platform).await?;
    let mut out = std::io::stdout().lock();
    out.write_all(&r.config)?;
    out.flush()?;
    Ok(())
}

/// `ocifs digest`: the digest of the manifest `REF` names (an index's own, for a
/// multi-platform image, as `crane digest` prints).
pub async fn digest(common: &Common, reference: &str) -> Result<()> {
    let (source, what, _) = common.source(reference).await?;
    let digest = match source.head(&what).await? {
        Some(meta) => meta.digest,
        None => source.manifest(&what).await?.1.digest,
    };
    super::common::out(&digest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_dates_as_tar_tv_shows_them() {
        assert_eq!(mode_string(Kind::File, 0o644), "-rw-r--r--");
        assert_eq!(mode_string(Kind::Dir, 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(Kind::File, 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string(Kind::File, 0o2644), "-rw-r-Sr--");
        assert_eq!(mode_string(Kind::Symlink, 0o777), "lrwxrwxrwx");
        assert_eq!(date(1_700_000_000), "2023-11-14 22:13");
    }
}

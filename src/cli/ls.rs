//! `ocifs ls`: an image's paths without mounting it, absolute, in name order. `-l` prints
//! them as `tar -tv` does (`-rw-r--r-- 0/0 4096 2026-12-06 06:35 /etc/passwd`, a symlink with
//! `-> target`, a device with `major,minor` for its size), `-R` recurses, `-d` lists a
//! directory itself, `--json` prints one object per path. A symlink named as the last part of
//! a PATH is listed, not followed (unless PATH ends with `/`).

use super::common::{Common, open};
use anyhow::{Result, bail};
use ocifs::layer::Kind;
use ocifs::tree::{Node, ROOT, Tree};
use std::io::Write;

/// How to list.
pub struct LsOptions {
    pub long: bool,
    pub recursive: bool,
    pub directory: bool,
    pub json: bool,
}

/// One listed path, as `--json` prints it.
#[derive(serde::Serialize)]
struct Listed<'a> {
    path: String,
    #[serde(rename = "type")]
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    /// Seconds since the epoch.
    mtime: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<(u32, u32)>,
}

/// Lists `paths` (the root when none) of `reference`.
pub async fn ls(common: &Common, reference: &str, paths: &[String], o: &LsOptions) -> Result<()> {
    let image = open(common, reference).await?;
    let tree = &image.tree;
    let roots = match paths.is_empty() {
        true => vec![String::from("/")],
        false => paths.to_vec(),
    };
    let mut listed = Vec::new();
    for p in &roots {
        let (ino, path) = find(tree, p)?;
        let node = tree.get(ino).unwrap();
        if node.kind != Kind::Dir || o.directory {
            listed.push((path, node));
            continue;
        }
        children(tree, ino, &path, o.recursive, &mut listed);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if o.json {
        let all: Vec<_> = listed.iter().map(|(p, n)| entry(p, n)).collect();
        serde_json::to_writer_pretty(&mut out, &all)?;
        writeln!(out)?;
    } else {
        for (p, n) in &listed {
            match o.long {
                true => writeln!(out, "{}", long_line(p, n))?,
                false => writeln!(out, "{p}")?,
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// The node PATH names and its absolute path: every part but the last followed through
/// symlinks, the last one only when PATH ends with `/`.
fn find(tree: &Tree, raw: &str) -> Result<(u64, String)> {
    let clean: Vec<&str> = raw
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let Some((last, parents)) = clean.split_last() else {
        return Ok((ROOT, "/".to_string()));
    };
    let missing = || anyhow::anyhow!("{raw}: no such file or directory");
    let parent = match parents.is_empty() {
        true => ROOT,
        false => tree.follow(&parents.join("/")).map_err(|_| missing())?,
    };
    let ino = match (*last, raw.ends_with('/')) {
        ("..", _) => tree.get(parent).map(|n| n.parent).ok_or_else(missing)?,
        (_, true) => tree.follow(&clean.join("/")).map_err(|_| missing())?,
        (name, false) => tree.lookup(parent, name).ok_or_else(missing)?,
    };
    match tree.path(ino) {
        Some(p) => Ok((ino, format!("/{p}"))),
        None => bail!("{raw}: no such file or directory"),
    }
}

/// The children of directory `ino` (at `path`), and theirs with `recursive`, in name order.
fn children<'t>(
    tree: &'t Tree,
    ino: u64,
    path: &str,
    recursive: bool,
    out: &mut Vec<(String, &'t Node)>,
) {
    let Some(dir) = tree.get(ino) else { return };
    for (name, &child) in dir.children.iter() {
        let Some(node) = tree.get(child) else {
            continue;
        };
        let p = format!("{}/{name}", path.trim_end_matches('/'));
        out.push((p.clone(), node));
        if recursive && node.kind == Kind::Dir {
            children(tree, child, &p, true, out);
        }
    }
}

fn entry<'a>(path: &str, n: &'a Node) -> Listed<'a> {
    let device = matches!(n.kind, Kind::Char | Kind::Block).then_some(n.rdev);
    Listed {
        path: path.to_string(),
        kind: match n.kind {
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Char => "char",
            Kind::Block => "block",
            Kind::Fifo => "fifo",
            Kind::File | Kind::Hardlink => "file",
        },
        mode: n.mode & 0o7777,
        uid: n.uid,
        gid: n.gid,
        size: n.size,
        mtime: n.mtime.0,
        target: n.link.as_deref().filter(|_| n.kind == Kind::Symlink),
        device,
    }
}

/// `tar -tv`'s line for one path.
fn long_line(path: &str, n: &Node) -> String {
    let size = match n.kind {
        Kind::Char | Kind::Block => format!("{},{}", n.rdev.0, n.rdev.1),
        _ => n.size.to_string(),
    };
    let mut line = format!(
        "{} {}/{} {size} {} {path}",
        mode_string(n.kind, n.mode),
        n.uid,
        n.gid,
        date(n.mtime.0)
    );
    if n.kind == Kind::Symlink
        && let Some(l) = &n.link
    {
        line.push_str(&format!(" -> {l}"));
    }
    line
}

/// `drwxr-xr-x`, with setuid, setgid and sticky bits as `ls` shows them.
fn mode_string(kind: Kind, mode: u32) -> String {
    let t = match kind {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::Char => 'c',
        Kind::Block => 'b',
        Kind::Fifo => 'p',
        Kind::File | Kind::Hardlink => '-',
    };
    let mut s = String::from(t);
    for (shift, special, on, off) in [
        (6, 0o4000, 's', 'S'),
        (3, 0o2000, 's', 'S'),
        (0, 0o1000, 't', 'T'),
    ] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (mode & special != 0, bits & 1 != 0) {
            (true, true) => on,
            (true, false) => off,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// `YYYY-MM-DD HH:MM` in UTC, as `tar -tv` prints a time.
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
        Err(_) => secs.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_dates_read_as_tar_prints_them() {
        assert_eq!(mode_string(Kind::File, 0o644), "-rw-r--r--");
        assert_eq!(mode_string(Kind::File, 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string(Kind::Dir, 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(Kind::File, 0o2644), "-rw-r-Sr--");
        assert_eq!(date(0), "1970-01-01 00:00");
        assert_eq!(date(1_700_000_000), "2023-11-14 22:13");
    }
}

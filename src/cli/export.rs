//! `ocifs export`: the merged tree of an image as one tar stream (as `crane export` writes
//! it), and `ocifs diff`: what changed between two images' trees.
//!
//! Both read through the same core as a mount: file bytes are fetched as they are written
//! out (export), or only where two files' metadata agree and their bytes are not known to
//! be the same ones (diff).

use super::browse::mode_string;
use super::common::{Common, open};
use anyhow::{Context, Result, bail};
use ocifs::image::Image;
use ocifs::layer::{Kind, Locator};
use ocifs::tree::{Node, ROOT, Tree};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

/// `ocifs export REF [-o FILE]`: the tree, depth first in name order, paths relative
/// (`etc/passwd`), hard links as links to their first name, xattrs as PAX records.
pub async fn export(common: &Common, reference: &str, output: Option<PathBuf>) -> Result<()> {
    let out: Box<dyn Write + Send> = match &output {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => {
            use std::io::IsTerminal;
            if std::io::stdout().is_terminal() {
                bail!("not writing a tar stream to a terminal: use -o FILE or a pipe");
            }
            Box::new(std::io::stdout())
        }
    };
    let image = Arc::new(open(common, reference).await?);
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || write_tar(&image, &handle, out))
        .await
        .context("the tar writer stopped")?
}

fn write_tar(image: &Arc<Image>, handle: &tokio::runtime::Handle, out: impl Write) -> Result<()> {
    let mut b = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, out));
    let mut entries = Vec::new();
    walk(&image.tree, ROOT, "", &mut entries);
    let mut first_name: HashMap<u64, String> = HashMap::new();
    for (path, ino) in entries {
        let n = image.tree.get(ino).expect("inode");
        let mut h = tar::Header::new_ustar();
        h.set_mode(n.mode & 0o7777);
        h.set_uid(u64::from(n.uid));
        h.set_gid(u64::from(n.gid));
        h.set_mtime(n.mtime.0.max(0) as u64);
        h.set_size(0);
        if !n.xattrs.is_empty() {
            let keys: Vec<(String, &[u8])> = (n.xattrs.iter())
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), &v[..]))
                .collect();
            b.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))?;
        }
        if n.kind != Kind::Dir && n.nlink > 1 {
            if let Some(first) = first_name.get(&ino) {
                h.set_entry_type(tar::EntryType::Link);
                b.append_link(&mut h, &path, first)?;
                continue;
            }
            first_name.insert(ino, path.clone());
        }
        match n.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Kind::Symlink => {
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, &path, n.link.as_deref().unwrap_or(""))?;
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                h.set_entry_type(match n.kind {
                    Kind::Char => tar::EntryType::Char,
                    Kind::Block => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                h.set_device_major(n.rdev.0)?;
                h.set_device_minor(n.rdev.1)?;
                b.append_data(&mut h, &path, std::io::empty())?;
            }
            Kind::File | Kind::Hardlink => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(n.size);
                let reader = FileReader {
                    image: image.clone(),
                    handle: handle.clone(),
                    ino,
                    off: 0,
                    size: n.size,
                    buf: bytes::Bytes::new(),
                };
                b.append_data(&mut h, &path, reader)
                    .with_context(|| format!("writing /{path}"))?;
            }
        }
    }
    b.into_inner()?.flush()?;
    Ok(())
}

/// A file's bytes as a blocking reader (the tar writer's thread), 4 MiB reads at a time.
struct FileReader {
    image: Arc<Image>,
    handle: tokio::runtime::Handle,
    ino: u64,
    off: u64,
    size: u64,
    buf: bytes::Bytes,
}

impl Read for FileReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            if self.off >= self.size {
                return Ok(0);
            }
            let len = (4 << 20).min(self.size - self.off);
            let piece = self
                .handle
                .block_on(self.image.read_file(self.ino, self.off, len))
                .map_err(std::io::Error::other)?;
            if piece.is_empty() {
                return Err(std::io::Error::other("the file ended early"));
            }
            self.off += piece.len() as u64;
            self.buf = piece;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        let _ = self.buf.split_to(n);
        Ok(n)
    }
}

/// The entries under directory `ino` (at `path`, "" for the root), depth first by name.
pub fn walk(tree: &Tree, ino: u64, path: &str, out: &mut Vec<(String, u64)>) {
    for (name, &child) in &tree.get(ino).expect("inode").children {
        let p = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}/{name}")
        };
        out.push((p.clone(), child));
        if tree.get(child).is_some_and(|c| c.kind == Kind::Dir) {
            walk(tree, child, &p, out);
        }
    }
}

/// One difference between two trees.
#[derive(serde::Serialize)]
struct Change {
    path: String,
    /// `added`, `removed` or `changed`.
    change: &'static str,
    /// What changed: type, mode, owner, size, target, content, device, xattrs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    what: Vec<&'static str>,
}

/// `ocifs diff REF1 REF2`: paths added, removed and changed (type, mode, owner, size,
/// symlink target, device, xattrs, content), by path in name order. Contents are compared
/// only when the rest agrees and the bytes are not the same layer's same bytes: then both
/// files are read (through the block cache, so only those files are fetched).
pub async fn diff(common: &Common, a: &str, b: &str, json: bool) -> Result<()> {
    let (left, right) = tokio::try_join!(open(common, a), open(common, b))?;
    let mut la = Vec::new();
    let mut lb = Vec::new();
    walk(&left.tree, ROOT, "", &mut la);
    walk(&right.tree, ROOT, "", &mut lb);
    let ra: HashMap<&str, u64> = la.iter().map(|(p, i)| (p.as_str(), *i)).collect();
    let rb: HashMap<&str, u64> = lb.iter().map(|(p, i)| (p.as_str(), *i)).collect();
    let mut paths: Vec<&str> = ra.keys().chain(rb.keys()).copied().collect();
    paths.sort_unstable();
    paths.dedup();
    let mut changes = Vec::new();
    for p in paths {
        let change = match (ra.get(p), rb.get(p)) {
            (Some(_), None) => Some(("removed", Vec::new())),
            (None, Some(_)) => Some(("added", Vec::new())),
            (Some(&x), Some(&y)) => {
                let what = differences(&left, x, &right, y).await?;
                (!what.is_empty()).then_some(("changed", what))
            }
            (None, None) => None,
        };
        if let Some((change, what)) = change {
            changes.push(Change {
                path: format!("/{p}"),
                change,
                what,
            });
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        serde_json::to_writer_pretty(&mut out, &changes)?;
        writeln!(out)?;
    } else {
        for c in &changes {
            let mark = match c.change {
                "added" => 'A',
                "removed" => 'D',
                _ => 'M',
            };
            if c.what.is_empty() {
                writeln!(out, "{mark} {}", c.path)?;
            } else {
                writeln!(out, "{mark} {} ({})", c.path, c.what.join(", "))?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// What differs between node `x` of `a` and node `y` of `b`.
async fn differences(a: &Image, x: u64, b: &Image, y: u64) -> Result<Vec<&'static str>> {
    let (n, m) = (a.tree.get(x).expect("inode"), b.tree.get(y).expect("inode"));
    let mut what = Vec::new();
    if n.kind != m.kind {
        what.push("type");
        return Ok(what);
    }
    if mode_string(n.kind, n.mode) != mode_string(m.kind, m.mode) {
        what.push("mode");
    }
    if (n.uid, n.gid) != (m.uid, m.gid) {
        what.push("owner");
    }
    if n.link != m.link {
        what.push("target");
    }
    if n.rdev != m.rdev && matches!(n.kind, Kind::Char | Kind::Block) {
        what.push("device");
    }
    if n.xattrs != m.xattrs {
        what.push("xattrs");
    }
    if n.kind == Kind::File {
        if n.size != m.size {
            what.push("size");
        } else if !same_bytes(a, n, b, m) && !same_content(a, x, b, y, n.size).await? {
            what.push("content");
        }
    }
    Ok(what)
}

/// Whether two files are known to be the same bytes without reading them: the same layer
/// blob at the same place, or eStargz/zstd:chunked chunks with the same digests.
fn same_bytes(a: &Image, n: &Node, b: &Image, m: &Node) -> bool {
    let (Some((la, pa)), Some((lb, pb))) = (&n.data, &m.data) else {
        // No data: both empty.
        return n.data.is_none() && m.data.is_none();
    };
    let same_layer = a.layers[*la].layer.digest == b.layers[*lb].layer.digest;
    if same_layer && pa == pb {
        return true;
    }
    match (pa, pb) {
        (Locator::Chunks(ca), Locator::Chunks(cb)) => {
            let digests = |c: &[ocifs::layer::chunked::Chunk]| {
                c.iter()
                    .map(|c| c.digest.clone().map(|d| (c.file_offset, c.len, d)))
                    .collect::<Option<Vec<_>>>()
            };
            matches!((digests(ca), digests(cb)), (Some(x), Some(y)) if x == y)
        }
        _ => false,
    }
}

/// Whether two files of `size` bytes have the same bytes, read piece by piece.
async fn same_content(a: &Image, x: u64, b: &Image, y: u64, size: u64) -> Result<bool> {
    let mut off = 0;
    while off < size {
        let len = (4 << 20).min(size - off);
        let (p, q) = tokio::try_join!(a.read_file(x, off, len), b.read_file(y, off, len))?;
        if p != q || p.is_empty() {
            return Ok(p == q && !p.is_empty());
        }
        off += p.len() as u64;
    }
    Ok(true)
}

//! `ocifs pull REF DIR`: the image's merged tree, whiteouts applied, written out as files,
//! after every layer has been checked against its digest: the layers are fetched whole, all
//! at once, through the block cache, whose blocks on disk later pulls and mounts reuse (a
//! layer served through an index from the registry is also checked against that index).
//!
//! Every path is created under DIR by this walk itself: directories are made here (never
//! followed through a symlink of the image), files are created new, never opened through an
//! existing name, so no entry can write outside DIR.

use super::common::{Bars, Common, progress_line};
use anyhow::{Context, Result, bail};
use ocifs::config::VerifyMode;
use ocifs::image::Image;
use ocifs::layer::{Health, Kind};
use ocifs::tree::ROOT;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// `ocifs pull REF DIR`.
pub async fn pull(common: &Common, reference: &str, dir: &Path) -> Result<()> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty: pull writes into a new or empty directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (source, what, display) = common.source(reference).await?;
    let mut cfg = common.open_config()?;
    // Layers open pending, and are all checked below, at once.
    cfg.verify = VerifyMode::Background;
    let readahead = ocifs::speculate::SpeculateConfig::default().readahead;
    let cache = ocifs::image::block_cache(&cfg, readahead);
    let started = std::time::Instant::now();
    let image = Image::open(&source, &what, &cfg, &cache, super::common::progress())
        .await
        .with_context(|| format!("pulling {display}"))?;
    verify_all(&image).await?;
    let (files, bytes) = image.tree.totals();
    let written = write_tree(&image, dir).await?;
    super::common::out(&format!(
        "pulled {display} ({}) into {}: {files} files, {written} of {bytes} bytes written, verified, in {:.1}s",
        image.resolved.manifest_digest,
        dir.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Checks every layer against its digest (and a registry index against the layer),
/// concurrently; the first that fails is the error.
async fn verify_all(image: &Image) -> Result<()> {
    let diff_ids = ocifs::image::manifest::diff_ids(&image.resolved.config);
    let checks = image.layers.iter().enumerate().map(|(i, l)| {
        let ids: Vec<String> = diff_ids.get(i).cloned().into_iter().collect();
        async move {
            let pair = [(&*l.layer, &l.blob)];
            ocifs::verify::verify_layers(&pair, &ids, &|| true).await;
        }
    });
    futures::future::join_all(checks).await;
    for l in &image.layers {
        match &*l.layer.health.read().unwrap() {
            Health::Verified => {}
            Health::Bad(why) => bail!("layer {}: {why}", l.layer.digest),
            other => bail!("layer {} is not verified ({other:?})", l.layer.digest),
        }
    }
    Ok(())
}

/// Writes the tree under `dir`; returns the file bytes written.
async fn write_tree(image: &Image, dir: &Path) -> Result<u64> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut entries = Vec::new();
    super::export::walk(&image.tree, ROOT, "", &mut entries);
    let total = image.tree.totals().1;
    let bars = (!super::common::QUIET.load(std::sync::atomic::Ordering::Relaxed)
        && std::io::IsTerminal::is_terminal(&std::io::stderr()))
    .then(Bars::default);
    let mut first: HashMap<u64, PathBuf> = HashMap::new();
    let mut dirs = Vec::new();
    let mut done = 0u64;
    let mut last_tenth = 0;
    for (rel, ino) in &entries {
        let n = image.tree.get(*ino).expect("inode");
        let path = dir.join(rel);
        if n.kind != Kind::Dir && n.nlink > 1 {
            if let Some(to) = first.get(ino) {
                std::fs::hard_link(to, &path).with_context(|| format!("linking /{rel}"))?;
                continue;
            }
            first.insert(*ino, path.clone());
        }
        match n.kind {
            Kind::Dir => {
                std::fs::create_dir(&path).with_context(|| format!("creating /{rel}"))?;
                // Modes and times once its entries are written (a read-only directory).
                dirs.push((path, *ino));
                continue;
            }
            Kind::Symlink => {
                std::os::unix::fs::symlink(n.link.as_deref().unwrap_or(""), &path)
                    .with_context(|| format!("creating /{rel}"))?;
            }
            Kind::File | Kind::Hardlink => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("creating /{rel}"))?;
                let mut off = 0;
                while off < n.size {
                    let len = (4 << 20).min(n.size - off);
                    let piece = image
                        .read_file(*ino, off, len)
                        .await
                        .with_context(|| format!("reading /{rel}"))?;
                    if piece.is_empty() {
                        bail!("/{rel} ended early");
                    }
                    f.write_all(&piece)
                        .with_context(|| format!("writing /{rel}"))?;
                    off += piece.len() as u64;
                    done += piece.len() as u64;
                    match &bars {
                        Some(b) => b.at("pull", done, total),
                        None => {
                            let tenth = (done * 10).checked_div(total).unwrap_or(10);
                            if tenth > last_tenth {
                                last_tenth = tenth;
                                progress_line(&format!(
                                    "ocifs: written {}% of {} MiB",
                                    tenth * 10,
                                    total.div_ceil(1 << 20)
                                ));
                            }
                        }
                    }
                }
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                let kind = match n.kind {
                    Kind::Char => libc::S_IFCHR,
                    Kind::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                if kind != libc::S_IFIFO && !root {
                    tracing::warn!("/{rel}: a device; only root can make it, skipped");
                    continue;
                }
                let c = c_path(&path)?;
                let dev = libc::makedev(n.rdev.0, n.rdev.1);
                // SAFETY: mknod with a valid NUL-terminated path.
                if unsafe { libc::mknod(c.as_ptr(), kind | 0o600, dev) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("creating /{rel}"));
                }
            }
        }
        finish(&path, n, root).with_context(|| format!("setting the attributes of /{rel}"))?;
    }
    // Deepest first, so a directory's time is set after its entries changed it.
    for (path, ino) in dirs.iter().rev() {
        let n = image.tree.get(*ino).expect("inode");
        finish(path, n, root)
            .with_context(|| format!("setting the attributes of {}", path.display()))?;
    }
    let n = image.tree.get(ROOT).expect("root");
    finish(dir, n, root)?;
    Ok(done)
}

/// Owner (as root), xattrs, mode and modification time of an entry written at `path`.
fn finish(path: &Path, n: &ocifs::tree::Node, root: bool) -> Result<()> {
    let c = c_path(path)?;
    let link = n.kind == Kind::Symlink;
    if root {
        // SAFETY: lchown with a valid NUL-terminated path (does not follow a symlink).
        if unsafe { libc::lchown(c.as_ptr(), n.uid, n.gid) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    for (name, value) in &n.xattrs {
        let Ok(cname) = std::ffi::CString::new(name.as_bytes()) else {
            continue;
        };
        // SAFETY: lsetxattr with valid NUL-terminated strings and a buffer of value.len().
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if r != 0 {
            tracing::warn!(
                "{}: xattr {name}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    if !link {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(n.mode & 0o7777))?;
    }
    let t = libc::timespec {
        tv_sec: n.mtime.0,
        tv_nsec: i64::from(n.mtime.1),
    };
    let times = [t, t];
    // SAFETY: utimensat with a valid path and two timespecs; AT_SYMLINK_NOFOLLOW for links.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn c_path(p: &Path) -> Result<std::ffi::CString> {
    Ok(std::ffi::CString::new(p.as_os_str().as_encoded_bytes())?)
}

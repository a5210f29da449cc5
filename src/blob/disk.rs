//! Keeping the cache directory's bulk within a size bound.
//!
//! Two things there grow with every image mounted: blocks, stored per blob
//! (`blocks/<blob>/<block size>-<index>`), and the uncompressed tars of layers that cannot be
//! read lazily (`tars/<layer>.tar`). When a mount ends, each blob directory and each tar counts
//! as one unit; the least recently written units are removed until the total fits the bound
//! again, so the cache directory does not grow without end across mounts. A file still being
//! written (named by [`temp_path`]) is neither counted nor removed. (Checkpoint indexes are
//! small and kept; decoded large chunks and local copies of layers live in unnamed files (see
//! [`unnamed_file`]) that vanish with their mount.)

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where to write a file that is renamed to `path` once whole: a name of its own for each
/// writer (process id and a random number), so that two writers of the same file, in one
/// process or several, never write into each other's; [`prune`] passes it over.
pub fn temp_path(path: &Path) -> PathBuf {
    path.with_extension(format!(
        "tmp{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ))
}

/// Writes `bytes` to `path` whole or not at all (under [`temp_path`], renamed into place),
/// so that a reader never finds half a file and a writer that stops leaves none.
pub async fn write_in_place(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let written = tokio::fs::write(&tmp, bytes).await;
    put_in_place(&tmp, path, written).await
}

/// Renames `tmp` to `path` once `written` says it is whole; removes it if either failed.
pub async fn put_in_place(
    tmp: &Path,
    path: &Path,
    written: std::io::Result<()>,
) -> std::io::Result<()> {
    let placed = match written {
        Ok(()) => tokio::fs::rename(tmp, path).await,
        Err(e) => Err(e),
    };
    if placed.is_err() {
        let _ = tokio::fs::remove_file(tmp).await;
    }
    placed
}

/// Removes the least recently written units (blob directories, tars) under `dirs` until they
/// take at most `max_bytes`; returns the bytes removed.
pub fn prune(dirs: &[PathBuf], max_bytes: u64) -> std::io::Result<u64> {
    let mut units = Vec::new();
    let mut total = 0;
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().contains(".tmp") {
                continue;
            }
            let (size, newest) = unit_size(&entry.path())?;
            total += size;
            units.push((newest, size, entry.path()));
        }
    }
    units.sort();
    let mut removed = 0;
    for (_, size, path) in units {
        if total - removed <= max_bytes {
            break;
        }
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
        removed += size;
    }
    Ok(removed)
}

/// Bytes in a file, or in the files of a directory, and when the newest was written.
fn unit_size(path: &Path) -> std::io::Result<(u64, SystemTime)> {
    let stamp = |m: &std::fs::Metadata| m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return Ok((meta.len(), stamp(&meta)));
    }
    let (mut size, mut newest) = (0, SystemTime::UNIX_EPOCH);
    for file in std::fs::read_dir(path)?.flatten() {
        if let Ok(m) = file.metadata() {
            size += m.len();
            newest = newest.max(stamp(&m));
        }
    }
    Ok((size, newest))
}

/// A file in `dir` with no name: it takes disk space only while open.
/// (`O_TMPFILE`; where the file system lacks it, a new file removed as soon as it is open).
pub fn unnamed_file(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    match read_write()
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
    {
        Err(e)
            if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                || e.raw_os_error() == Some(libc::EISDIR) =>
        {
            created_and_removed(dir)
        }
        other => other,
    }
}

fn read_write() -> std::fs::OpenOptions {
    let mut open = std::fs::OpenOptions::new();
    open.read(true).write(true);
    open
}

/// [`unnamed_file`] where `O_TMPFILE` is not supported: a new file, removed at once. Names
/// carry the process and the time; a name already taken is tried again with a later time.
fn created_and_removed(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tries = 0;
    loop {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = dir.join(format!(".decoding-{}-{stamp}", std::process::id()));
        match read_write().create_new(true).mode(0o600).open(&path) {
            Ok(file) => {
                std::fs::remove_file(&path)?;
                return Ok(file);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 16 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_the_oldest_units_until_the_rest_fits() {
        let dir = std::env::temp_dir().join(format!("ocifs-prune-{}", std::process::id()));
        let (blocks, tars) = (dir.join("blocks"), dir.join("tars"));
        let stamp = |path: &Path, i: u64| {
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 * (i + 1));
            let f = std::fs::File::options().write(true).open(path).unwrap();
            f.set_modified(t).unwrap();
        };
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            std::fs::create_dir_all(blocks.join(name)).unwrap();
            let block = blocks.join(name).join("65536-0");
            std::fs::write(&block, vec![0u8; 1000]).unwrap();
            stamp(&block, 2 * i as u64);
        }
        // A tar between "old" and "mid", and one being written (never counted or removed).
        std::fs::create_dir_all(&tars).unwrap();
        std::fs::write(tars.join("a.tar"), vec![0u8; 500]).unwrap();
        stamp(&tars.join("a.tar"), 1);
        std::fs::write(tars.join("b.tmp42"), vec![0u8; 9000]).unwrap();
        stamp(&tars.join("b.tmp42"), 0);

        let both = [blocks.clone(), tars.clone()];
        assert_eq!(prune(&both, 2500).unwrap(), 1000);
        assert!(!blocks.join("old").exists() && tars.join("a.tar").exists());
        assert_eq!(prune(&both, 2000).unwrap(), 500);
        assert!(!tars.join("a.tar").exists() && blocks.join("mid").exists());
        assert_eq!(prune(&both, 5000).unwrap(), 0);
        assert_eq!(prune(&both, 0).unwrap(), 2000);
        assert!(tars.join("b.tmp42").exists());
        assert_eq!(prune(&[dir.join("missing")], 0).unwrap(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unnamed_files_leave_no_name_behind() {
        use std::io::{Read, Seek, Write};
        let spill = std::env::temp_dir().join(format!("ocifs-unnamed-{}", std::process::id()));
        // O_TMPFILE where the file system has it, and the fallback on the same directory.
        for mut f in [
            unnamed_file(&spill).unwrap(),
            created_and_removed(&spill).unwrap(),
            created_and_removed(&spill).unwrap(),
        ] {
            f.write_all(b"decoded").unwrap();
            f.rewind().unwrap();
            let mut back = String::new();
            f.read_to_string(&mut back).unwrap();
            assert_eq!(back, "decoded");
        }
        assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0);
        std::fs::remove_dir_all(&spill).unwrap();
    }
}

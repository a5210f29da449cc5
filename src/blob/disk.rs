//! Keeping the on-disk block cache within a size bound.
//!
//! Blocks are stored per blob (`DIR/<blob>/<block size>-<index>`). When a mount ends, the
//! blob directories are summed and the least recently written ones are removed until the
//! total fits the bound again, so the cache directory does not grow without end across mounts.

use std::path::Path;
use std::time::SystemTime;

/// Removes the least recently written blob directories under `dir` until the blocks in it
/// take at most `max_bytes`; returns the bytes removed.
pub fn prune(dir: &Path, max_bytes: u64) -> std::io::Result<u64> {
    let mut blobs = Vec::new();
    let mut total = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for blob in entries.flatten() {
        let (mut size, mut newest) = (0, SystemTime::UNIX_EPOCH);
        for block in std::fs::read_dir(blob.path())?.flatten() {
            if let Ok(m) = block.metadata() {
                size += m.len();
                newest = newest.max(m.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            }
        }
        total += size;
        blobs.push((newest, size, blob.path()));
    }
    blobs.sort();
    let mut removed = 0;
    for (_, size, path) in blobs {
        if total - removed <= max_bytes {
            break;
        }
        std::fs::remove_dir_all(&path)?;
        removed += size;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_the_oldest_blobs_until_the_rest_fits() {
        let dir = std::env::temp_dir().join(format!("ocifs-prune-{}", std::process::id()));
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("65536-0"), vec![0u8; 1000]).unwrap();
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 * (i as u64 + 1));
            let f = std::fs::File::options()
                .write(true)
                .open(dir.join(name).join("65536-0"))
                .unwrap();
            f.set_modified(t).unwrap();
        }
        assert_eq!(prune(&dir, 2500).unwrap(), 1000);
        assert!(!dir.join("old").exists() && dir.join("mid").exists());
        assert_eq!(prune(&dir, 5000).unwrap(), 0);
        assert_eq!(prune(&dir, 0).unwrap(), 2000);
        assert_eq!(prune(&dir.join("missing"), 0).unwrap(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

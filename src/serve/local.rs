//! Converging to local speed: once a layer has been verified, the files the tree serves from
//! it are decoded once, in the background, into one local file, and from then on their reads
//! are reads of that file — no decoding, no digest checks, no block cache. Bulk reads of a
//! converged mount then run at about local-disk speed, as from an unpacked snapshot (see
//! docs/BENCHMARKS.md); before, every cold read inflated its chunk or span again.
//!
//! Only verified layers are copied, and their files are read through the layer as any read
//! is (chunk digests checked, spans decoded through a checked index): the copy holds the
//! image's bytes. A plain tar layer, which has no check finer than its whole blob, is copied
//! whole and kept only if the copy's hash matches the layer's digest. A copy is an unnamed
//! file in the cache directory (it vanishes with the mount), all copies of a mount together
//! at most the disk cache bound; copying yields to
//! foreground reads as verification does, and a layer's copy is used only once complete.
//! Files hidden by upper layers are not copied, nor GNU sparse files (their holes would be
//! written out). A layer served from a local file already (the tar a first index pass
//! decoded, within its own bound: see `layer::checkpoint::CopyTo`) is not copied.

use crate::error::{Error, Result};
use crate::layer::{Health, Locator};
use bytes::Bytes;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Bytes read from the layer and written at a time: small enough that a foreground read
/// arriving meanwhile waits little behind it.
const PIECE: u64 = 1 << 20;

/// The local copies of an image's layers: one slot per layer, filled once its copy is
/// complete.
pub struct LocalCopies {
    layers: Vec<OnceLock<LocalCopy>>,
    /// Bytes written to local copies so far (complete or under way).
    pub bytes: AtomicU64,
    /// Reads served from local copies.
    pub reads: AtomicU64,
}

/// One layer's copy: the file, and where each inode's bytes start in it.
struct LocalCopy {
    file: Arc<std::fs::File>,
    at: HashMap<u64, u64>,
}

impl LocalCopies {
    /// No copies yet, for an image of `layers` layers.
    pub fn new(layers: usize) -> Self {
        LocalCopies {
            layers: (0..layers).map(|_| OnceLock::new()).collect(),
            bytes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    /// Whether layer `layer`'s copy is complete (and serving its reads).
    pub fn is_complete(&self, layer: usize) -> bool {
        self.layers.get(layer).is_some_and(|l| l.get().is_some())
    }

    /// Where inode `ino`'s bytes start in layer `layer`'s copy, once that copy is complete.
    fn find(&self, layer: usize, ino: u64) -> Option<(Arc<std::fs::File>, u64)> {
        let copy = self.layers.get(layer)?.get()?;
        Some((copy.file.clone(), *copy.at.get(&ino)?))
    }
}

impl LocalCopies {
    /// `len` bytes at `offset` of inode `ino` (`size` bytes, data in layer `layer`) from the
    /// layer's local copy; `None` when it has none (yet) or the file is not in it.
    pub async fn read(
        &self,
        layer: usize,
        ino: u64,
        size: u64,
        offset: u64,
        len: u64,
    ) -> Option<Result<Bytes>> {
        let (file, at) = self.find(layer, ino)?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        let len = len.min(size.saturating_sub(offset));
        Some(crate::blob::read_file_at(file, at + offset, len).await)
    }
}

impl super::ServedImage {
    /// Copies the files of each verified layer into a local file in `dir` (see the module
    /// doc), while `idle()` says the foreground has no reads going, at most `budget` bytes in
    /// all; a layer still pending verification is waited for (run it alongside
    /// [`crate::verify::verify_layers`]). A layer that does not fit, or whose copy fails,
    /// keeps being served as before. Returns whether every layer is now served from its copy.
    pub async fn copy_layers_locally(
        &self,
        dir: &Path,
        budget: u64,
        idle: &(dyn Fn() -> bool + Sync),
    ) -> bool {
        let mut left = budget;
        let layers = &self.image.layers;
        for (li, opened) in layers.iter().enumerate() {
            let digest = &opened.layer.digest;
            // Verification may be under way: each layer is copied as soon as it is verified,
            // so copying (CPU, local disk) overlaps the fetching of the next layers.
            if self.is_local(li) {
                // Its reads go to that file: what was held to make them fast is not needed.
                opened.layer.release_memory();
                opened.blob.release_memory();
                continue;
            }
            while *opened.layer.health.read().unwrap() == Health::Pending {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            if *opened.layer.health.read().unwrap() != Health::Verified {
                continue;
            }
            let start = std::time::Instant::now();
            match self.copy_layer(li, dir, &mut left, idle).await {
                Ok(Some(copy)) => {
                    tracing::info!(
                        "layer {digest}: {} files copied locally in {:.2?}; reads are local now",
                        copy.at.len(),
                        start.elapsed()
                    );
                    let _ = self.local.layers[li].set(copy);
                    // Its reads are local now: what was held to make them fast is not needed.
                    opened.layer.release_memory();
                    opened.blob.release_memory();
                    // Hand the freed pieces back to the system (glibc keeps small frees).
                    #[cfg(target_env = "gnu")]
                    // SAFETY: malloc_trim only returns free heap memory to the system.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("layer {digest} not copied locally: {e}"),
            }
        }
        (0..layers.len()).all(|li| self.served_locally(li))
    }

    /// Whether layer `li`'s reads go to a local file: its copy is complete, or it is served
    /// from one already ([`Self::is_local`]).
    pub fn served_locally(&self, li: usize) -> bool {
        self.local.is_complete(li) || self.is_local(li)
    }

    /// Whether layer `li` is served from a local file already (the decoded tar its index
    /// pass left, a layout's tar): a copy would only duplicate it.
    pub fn is_local(&self, li: usize) -> bool {
        match &self.image.layers[li].layer.data {
            crate::layer::LayerData::Tar(tar) => tar.is_local_file(),
            crate::layer::LayerData::Chunked(_) => false,
        }
    }

    async fn copy_layer(
        &self,
        li: usize,
        dir: &Path,
        left: &mut u64,
        idle: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<LocalCopy>> {
        let layer = &self.image.layers[li].layer;
        if layer.format == crate::layer::Format::Tar {
            return self.copy_whole_tar(li, dir, left, idle).await;
        }
        // In layer order, so the layer's blob is read front to back.
        let mut files: Vec<_> = self
            .image
            .tree
            .files_in(li)
            .filter_map(|(ino, n)| match &n.data {
                Some((_, Locator::Sparse { .. })) => None,
                Some((_, loc)) if n.size > 0 => {
                    Some((layer.extent(loc, n.size)?.0, ino, n.size, loc))
                }
                _ => None,
            })
            .collect();
        files.sort_by_key(|&(start, ino, _, _)| (start, ino));
        let total: u64 = files.iter().map(|&(_, _, size, _)| size).sum();
        if !take_room(&layer.digest, total, left) {
            return Ok(None);
        }
        let file = copy_file(dir).await?;
        let mut at = HashMap::with_capacity(files.len());
        // Files lie back to back in the copy; what is read is written in pieces of about
        // PIECE (one blocking write each, not one per small file).
        let mut pending = Vec::with_capacity(PIECE as usize);
        let mut end = 0;
        for (_, ino, size, loc) in files {
            at.insert(ino, end);
            let mut off = 0;
            while off < size {
                while !idle() {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                let piece = layer.read(loc, size, off, PIECE).await?;
                if piece.is_empty() {
                    return Err(Error::format(
                        format!("layer {}", layer.digest),
                        format!("inode {ino} ended at {off} of {size} bytes"),
                    ));
                }
                pending.extend_from_slice(&piece);
                off += piece.len() as u64;
                if pending.len() as u64 >= PIECE {
                    write_at(&file, &mut pending, end + off).await?;
                }
            }
            end += size;
            self.local.bytes.fetch_add(size, Ordering::Relaxed);
        }
        write_at(&file, &mut pending, end).await?;
        Ok(Some(LocalCopy { file, at }))
    }
}

impl super::ServedImage {
    /// A plain tar layer's copy: its whole blob, read once front to back and hashed, kept
    /// only if it matches the layer's digest (the blob has no finer check: its files' bytes
    /// are trusted because the whole was, so the copy is checked as a whole too). Its files
    /// are found in it where the tar holds them.
    async fn copy_whole_tar(
        &self,
        li: usize,
        dir: &Path,
        left: &mut u64,
        idle: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<LocalCopy>> {
        let opened = &self.image.layers[li];
        let (layer, blob) = (&opened.layer, &opened.blob);
        if !take_room(&layer.digest, blob.size(), left) {
            return Ok(None);
        }
        let file = copy_file(dir).await?;
        copy_checked(blob, &layer.digest, &file, idle, &self.local.bytes).await?;
        let at = (self.image.tree.files_in(li))
            .filter_map(|(ino, n)| match &n.data {
                Some((_, Locator::Tar { offset })) => Some((ino, *offset)),
                _ => None,
            })
            .collect();
        Ok(Some(LocalCopy { file, at }))
    }
}

/// Takes `need` bytes of what is `left` of the copies' bound for layer `digest`'s copy;
/// false (and a log line) if they do not fit.
fn take_room(digest: &str, need: u64, left: &mut u64) -> bool {
    if need > *left {
        tracing::info!(
            "layer {digest} not copied locally: it takes {need} bytes, {} are left of the disk cache bound",
            *left
        );
        return false;
    }
    *left -= need;
    true
}

/// Copies all of `blob` into `file`, front to back while `idle()` says so (verification's
/// own pass, [`crate::verify::read_whole`]; the writes on a blocking thread), adding what
/// is read to `copied`; an error if the bytes do not hash to `digest`.
async fn copy_checked(
    blob: &crate::blob::Blob,
    digest: &str,
    file: &Arc<std::fs::File>,
    idle: &(dyn Fn() -> bool + Sync),
    copied: &AtomicU64,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(4);
    let f = file.clone();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut at = 0;
        for piece in rx {
            f.write_all_at(&piece, at)?;
            at += piece.len() as u64;
        }
        Ok(())
    });
    let actual = crate::verify::read_whole(blob, idle, &mut |piece| {
        copied.fetch_add(piece.len() as u64, Ordering::Relaxed);
        tx.send(piece.clone()).is_ok()
    })
    .await;
    // Dropping the sender ends the writer.
    drop(tx);
    writer
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
    let actual = actual?;
    if actual != digest {
        return Err(Error::Digest {
            what: format!("local copy of layer {digest}"),
            expected: digest.into(),
            actual,
        });
    }
    Ok(())
}

/// A new unnamed file in `dir` for one layer's copy.
async fn copy_file(dir: &Path) -> Result<Arc<std::fs::File>> {
    let dir = dir.to_path_buf();
    let made = tokio::task::spawn_blocking(move || {
        let file = crate::blob::disk::unnamed_file(&dir)?;
        // Its readers move through files front to back: a larger read-ahead window
        // (measured: 5 of 6 cold reads of a 200 MiB file faster, median +6%).
        use std::os::fd::AsRawFd;
        // SAFETY: advice on an open descriptor; no memory is passed.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        Ok::<_, std::io::Error>(file)
    });
    Ok(Arc::new(
        made.await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??,
    ))
}

/// Writes `pending` so that it ends at `end` of `file` (on a blocking thread), and empties it.
async fn write_at(file: &Arc<std::fs::File>, pending: &mut Vec<u8>, end: u64) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let bytes = std::mem::replace(pending, Vec::with_capacity(PIECE as usize));
    let (f, pos) = (file.clone(), end - bytes.len() as u64);
    tokio::task::spawn_blocking(move || f.write_all_at(&bytes, pos))
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::damaging::Damaging;

    /// A plain tar layer's copy is kept only if it hashes to the layer's digest: bytes that
    /// arrive damaged while it is made (a block fetched again after verification) are found.
    #[tokio::test]
    async fn a_whole_copy_is_checked_against_the_digest() {
        let bytes: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 241) as u8).collect();
        let dir = std::env::temp_dir();
        for damaged in [0, 1] {
            let blob: crate::blob::Blob = Damaging::new(bytes.clone(), damaged);
            let digest = blob.id().to_string();
            let file = copy_file(&dir).await.unwrap();
            let copied = AtomicU64::new(0);
            let done = copy_checked(&blob, &digest, &file, &|| true, &copied).await;
            match damaged {
                0 => {
                    done.unwrap();
                    let mut back = vec![0; bytes.len()];
                    file.read_exact_at(&mut back, 0).unwrap();
                    assert!(back == bytes);
                    assert_eq!(copied.load(Ordering::Relaxed), bytes.len() as u64);
                }
                _ => assert!(matches!(done, Err(Error::Digest { .. })), "{done:?}"),
            }
        }
    }
}

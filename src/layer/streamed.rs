//! The non-lazy fallback (single-frame zstd layers; also what `convert` unpacks layers with,
//! an uncompressed one copied as it is): stream the blob once, check its digest, keep the
//! uncompressed tar in the cache directory, and serve reads from that local file.
//!
//! The local tar is named by the layer digest and only renamed into place after the digest
//! matched, so a later mount finds it and skips the download.

use super::Format;
use crate::blob::{Blob, FileBlob};
use crate::digest::Hasher;
use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Size of each ranged request while streaming.
const PIECE: u64 = 8 << 20;

/// Returns the local uncompressed tar for the layer, making it if needed.
/// `progress` is called with (bytes done, total) as the download advances.
pub async fn local_tar(
    raw: Blob,
    format: Format,
    dir: &Path,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<Blob> {
    let digest = raw.id().to_string();
    let path = tar_path(dir, &digest);
    if path.exists() {
        return Ok(std::sync::Arc::new(FileBlob::open(
            format!("{digest}/tar"),
            &path,
        )?));
    }
    std::fs::create_dir_all(path.parent().unwrap())?;
    // A name of this writer's own: the same layer may be unpacked twice at once (an image
    // that lists it twice, `diff` of two images sharing it), each renamed into place whole.
    let tmp = crate::blob::disk::temp_path(&path);
    // Compressed bytes flow through a bounded channel into a blocking decoder thread.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let tmp2 = tmp.clone();
    let decoder = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut input = ChannelReader::new(rx);
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp2)?);
        let n = match format {
            Format::Tar => std::io::copy(&mut input, &mut out)?,
            Format::Zstd => std::io::copy(&mut zstd::stream::read::Decoder::new(input)?, &mut out)?,
            _ => std::io::copy(&mut flate2::read::MultiGzDecoder::new(input), &mut out)?,
        };
        out.flush()?;
        out.get_ref().sync_all()?;
        Ok(n)
    });
    let mut hasher = Hasher::default();
    let size = raw.size();
    let mut off = 0;
    let mut send_failed = false;
    use futures::StreamExt;
    let mut pieces = std::pin::pin!(crate::blob::read_in_order(raw.clone(), PIECE));
    while let Some(piece) = pieces.next().await {
        let piece = piece?;
        hasher.update(&piece);
        off += piece.len() as u64;
        progress(off, size);
        if tx.send(piece.to_vec()).is_err() {
            send_failed = true;
            break;
        }
    }
    drop(tx);
    let decoded = decoder
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
    let fail = |e: Error| {
        let _ = std::fs::remove_file(&tmp);
        e
    };
    decoded.map_err(|e| {
        fail(Error::format(
            format!("{} layer {digest}", format.name()),
            e.to_string(),
        ))
    })?;
    if send_failed {
        return Err(fail(Error::format(
            format!("layer {digest}"),
            "decoder stopped early",
        )));
    }
    let actual = hasher.finish();
    if actual != digest {
        return Err(fail(Error::Digest {
            what: format!("layer blob {digest}"),
            expected: digest.clone(),
            actual,
        }));
    }
    std::fs::rename(&tmp, &path)?;
    Ok(std::sync::Arc::new(FileBlob::open(
        format!("{digest}/tar"),
        &path,
    )?))
}

/// Where the uncompressed tar of a layer lives in the cache directory.
pub fn tar_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("tars")
        .join(format!("{}.tar", digest.replace(':', "-")))
}

/// A `Read` over byte vectors arriving on a channel (a decoder thread's input).
pub struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    /// Reads what arrives on `rx` until the sender is dropped.
    pub fn new(rx: std::sync::mpsc::Receiver<Vec<u8>>) -> Self {
        ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two unpacks of one layer at once (an image listing it twice) each write a file of their
    /// own: the tar kept is whole, whichever is renamed into place last.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_layer_unpacked_twice_at_once_is_kept_whole() {
        let dir = std::env::temp_dir().join(format!("ocifs-streamed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tar: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let digest = crate::digest::sha256(&gz);
        let blob_path = dir.join("blob");
        std::fs::write(&blob_path, &gz).unwrap();
        let blob = || -> Blob { std::sync::Arc::new(FileBlob::open(&digest, &blob_path).unwrap()) };
        let cache = dir.join("cache");
        let (a, b) = tokio::join!(
            local_tar(blob(), Format::Gzip, &cache, &|_, _| {}),
            local_tar(blob(), Format::Gzip, &cache, &|_, _| {}),
        );
        a.unwrap();
        b.unwrap();
        assert!(std::fs::read(tar_path(&cache, &digest)).unwrap() == tar);
        let left: Vec<_> = std::fs::read_dir(cache.join("tars"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "only the tar, no temporary file: {left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

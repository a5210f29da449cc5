//! A blob streamed whole, once, from a host that answered a ranged read of it with the whole
//! blob (`RangeAnswer::Full`). That is what a pull-through cache (distribution in `proxy:`
//! mode, Harbor's proxy cache) does for a blob it has not stored yet: distribution 2.8 fetches
//! the blob from its origin once to store it and once more for every request it answers
//! meanwhile, so a reader that keeps its slice, hangs up and asks again for the next makes
//! the origin send the blob again and again. A [`Spool`] reads the answer to the end into an
//! unnamed file in the spool directory and serves every read of the blob from that host as
//! its bytes arrive; the bytes are hashed on the way, and the whole blob must match its
//! digest (its last bytes are served only then; a mismatch fails every later read, and the
//! host is passed over for the blob).

use super::range::ranged_body;
use crate::blob::read_file_at;
use crate::config::Transfer;
use crate::digest::Hasher;
use crate::error::{Error, Result};
use crate::task::TaskGuard;
use bytes::Bytes;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

/// Most bytes handed to a reader at once.
const PIECE: u64 = 1 << 20;

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// The whole blob arrived and matched its digest.
    Complete,
    /// It hashed to this instead.
    Mismatch(String),
    /// The stream or the spool file failed.
    Failed(String),
}

/// How far a stream has come.
#[derive(Debug, Clone)]
struct Progress {
    arrived: u64,
    end: Option<End>,
}

/// One blob being streamed whole into a local file, read as it arrives.
pub(super) struct Spool {
    digest: String,
    file: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
    /// The stream; dropping the spool stops it.
    _task: TaskGuard,
}

impl Spool {
    /// Streams the body of `resp` (a 200 with the whole blob `digest` of `size` bytes) into
    /// an unnamed file in `dir`; `counted` is told of each piece that arrives.
    pub fn start(
        resp: reqwest::Response,
        dir: &Path,
        digest: &str,
        size: u64,
        transfer: Transfer,
        counted: Box<dyn Fn(u64) + Send + Sync>,
    ) -> Result<Arc<Spool>> {
        std::fs::create_dir_all(dir)?;
        let file = Arc::new(crate::blob::disk::unnamed_file(dir)?);
        let (tx, progress) = watch::channel(Progress {
            arrived: 0,
            end: None,
        });
        let (writer, what, expected) = (file.clone(), format!("blob {digest}"), digest.to_string());
        let task = TaskGuard::spawn(async move {
            let mut hasher = Hasher::default();
            let mut pos = 0u64;
            let mut write_error = None;
            let streamed = ranged_body(resp, 0, size, &what, transfer, &mut |piece: Bytes| {
                if write_error.is_some() {
                    return;
                }
                if let Err(e) = writer.write_all_at(&piece, pos) {
                    write_error = Some(e);
                    return;
                }
                hasher.update(&piece);
                pos += piece.len() as u64;
                counted(piece.len() as u64);
                // The last piece is announced with the verdict on the digest: a read that
                // needs the blob's end (a footer) is never served before it.
                if pos < size {
                    tx.send_modify(|p| p.arrived = pos);
                }
            })
            .await;
            let end = match (streamed, write_error) {
                (Err(e), _) => End::Failed(crate::error::Error::from(e).to_string()),
                (_, Some(e)) => End::Failed(format!("writing the spool file: {e}")),
                _ => match hasher.finish() {
                    actual if actual == expected => End::Complete,
                    actual => End::Mismatch(actual),
                },
            };
            tx.send_modify(|p| {
                p.arrived = pos;
                p.end = Some(end);
            });
        });
        Ok(Arc::new(Spool {
            digest: digest.to_string(),
            file,
            progress,
            _task: task,
        }))
    }

    /// Hands `[offset, offset+len)` to `sink` as the stream brings it; a read reaching the
    /// blob's end (`size`) waits for the verdict on the digest before it is handed anything.
    /// Fails once the stream has failed or the blob did not match its digest, even for bytes
    /// that had arrived.
    pub async fn stream(
        &self,
        offset: u64,
        len: u64,
        size: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        let end = offset + len;
        let mut pos = offset;
        let mut progress = self.progress.clone();
        let at_end = end >= size;
        while pos < end {
            let (arrived, ended) = {
                let p = progress
                    .wait_for(|p| (p.arrived > pos && !at_end) || p.end.is_some())
                    .await
                    .map_err(|_| Error::Registry(format!("the stream of {} ended", self.digest)))?;
                (p.arrived, p.end.clone())
            };
            match ended {
                Some(End::Mismatch(actual)) => {
                    return Err(Error::Digest {
                        what: format!("blob {} streamed whole", self.digest),
                        expected: self.digest.clone(),
                        actual,
                    });
                }
                Some(End::Failed(why)) => return Err(Error::Registry(why)),
                Some(End::Complete) if arrived <= pos => {
                    return Err(Error::format(
                        format!("read of blob {}", self.digest),
                        format!("offset {pos} is past its end ({arrived})"),
                    ));
                }
                _ => {}
            }
            let n = (arrived.min(end) - pos).min(PIECE);
            sink(read_file_at(self.file.clone(), pos, n).await?);
            pos += n;
        }
        Ok(())
    }
}

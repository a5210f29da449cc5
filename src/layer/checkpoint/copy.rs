//! The decoded copy an indexing pass may leave (see
//! [`super::CheckpointIndex::build_copying`]): the layer's tar in an unnamed file, served
//! instead of decoding spans once the pass has checked the blob's digest.

/// Where an indexing pass also writes the decoded tar (see
/// [`super::CheckpointIndex::build_copying`]): a directory for an unnamed file, the most bytes this
/// copy may take, and the bytes left for all copies it shares a budget with (taken as the
/// copy grows, given back if it is given up).
#[derive(Debug, Clone)]
pub struct CopyTo {
    pub dir: std::path::PathBuf,
    pub limit: u64,
    pub budget: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The decoded output on its way into its file.
pub(super) struct Copying {
    out: Option<std::io::BufWriter<std::fs::File>>,
    written: u64,
    limit: u64,
    budget: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Copying {
    pub(super) fn start(to: &CopyTo, digest: &str) -> Option<Copying> {
        match crate::blob::disk::unnamed_file(&to.dir) {
            Ok(file) => Some(Copying {
                out: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
                written: 0,
                limit: to.limit,
                budget: to.budget.clone(),
            }),
            Err(e) => {
                tracing::warn!("no decoded copy of layer {digest}: {e}");
                None
            }
        }
    }

    /// Appends `data`; false when the copy is to be given up.
    pub(super) fn write(&mut self, data: &[u8]) -> bool {
        use std::io::Write;
        use std::sync::atomic::Ordering::Relaxed;
        let n = data.len() as u64;
        let taken = self
            .budget
            .fetch_update(Relaxed, Relaxed, |left| left.checked_sub(n));
        if self.written + n > self.limit || taken.is_err() {
            if taken.is_ok() {
                self.budget.fetch_add(n, Relaxed);
            }
            tracing::info!("the decoded layer outgrows what its copy may take: not copied");
            return false;
        }
        self.written += n;
        match self.out.as_mut().map(|o| o.write_all(data)) {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                tracing::warn!("writing a decoded copy failed: {e}; not copied");
                false
            }
            None => false,
        }
    }

    /// The file, once all `uncompressed` bytes are in it.
    pub(super) fn finish(mut self, uncompressed: u64) -> Option<std::fs::File> {
        if self.written != uncompressed {
            return None;
        }
        let file = self.out.take()?.into_inner().ok();
        if file.is_some() {
            self.written = 0; // kept: its bytes stay taken from the budget
        }
        file
    }
}

impl Drop for Copying {
    /// A copy given up gives its bytes back.
    fn drop(&mut self) {
        let written = self.written;
        self.budget
            .fetch_add(written, std::sync::atomic::Ordering::Relaxed);
    }
}

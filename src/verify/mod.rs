//! Whole-blob verification: the gate between "served" and "trusted".
//!
//! eStargz chunks are checked on every read; tar data is only as good as its blob, so every
//! layer blob is hashed whole (before the mount in strict mode, in the background otherwise)
//! and a mismatch marks the layer bad, failing its reads with EIO. The blob is read through the
//! block cache, so verification also fetches the whole layer in the background: once it is
//! done, reads are served locally.
//!
//! A mismatch is not taken at its word at once: the bytes hashed may be cached blocks that
//! arrived damaged (in this mount or an earlier one with the same cache directory). The
//! layer's cached blocks are dropped and the layer verified again from the network; only a
//! second mismatch marks it bad. Nothing of a verdict is kept across mounts: each mount
//! verifies afresh.
//!
//! A layer served through a checkpoint index fetched from the registry is checked once more:
//! the index is not named by the image's digests, and its windows and tar entries shape every
//! byte served (see [`crate::layer::IndexCheck`]). The layer is decoded through the index, as
//! reads decode it, and the result must hash to the config's `diff_id`, while the tar entries
//! read from that stream must be the ones the index gave the tree.

use crate::blob::Blob;
use crate::digest::Hasher;
use crate::error::{Error, Result};
use crate::layer::checkpoint::file::entries_digest;
use crate::layer::{Health, IndexCheck, Layer, LayerData};
use sha2::{Digest, Sha256};

/// Read size while hashing: small enough that a foreground read arriving meanwhile waits
/// little behind it on the link.
const PIECE: u64 = 1 << 20;

/// Hashes the whole blob and compares it with its id (its digest). Before each piece it
/// waits until `idle()` says the foreground has no reads going.
pub async fn verify_blob(raw: &Blob, idle: &(dyn Fn() -> bool + Sync)) -> Result<()> {
    let actual = read_whole(raw, idle, &mut |_| true).await?;
    if actual != raw.id() {
        return Err(Error::Digest {
            what: format!("layer blob {}", raw.id()),
            expected: raw.id().into(),
            actual,
        });
    }
    Ok(())
}

/// Reads `blob` front to back in pieces, yielding to the foreground (see [`verify_blob`]),
/// handing each piece to `each` (which says whether to go on); returns the sha256 digest.
pub(crate) async fn read_whole(
    blob: &Blob,
    idle: &(dyn Fn() -> bool + Sync),
    each: &mut (dyn FnMut(&bytes::Bytes) -> bool + Send),
) -> Result<String> {
    let mut h = Hasher::default();
    let size = blob.size();
    let mut off = 0;
    while off < size {
        while !idle() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let piece = blob.read_at(off, PIECE.min(size - off)).await?;
        if piece.is_empty() {
            return Err(Error::Registry(format!(
                "blob {} ended early at {off}",
                blob.id()
            )));
        }
        h.update(&piece);
        off += piece.len() as u64;
        if !each(&piece) {
            break;
        }
    }
    Ok(h.finish())
}

/// Decodes a layer through the index it was fetched with and compares the result with
/// `diff_id` and the index's entries (see the module doc). Once it matches, the cached
/// index file is moved to where later mounts trust it.
async fn check_index(
    layer: &Layer,
    check: &IndexCheck,
    diff_id: Option<&str>,
    idle: &(dyn Fn() -> bool + Sync),
) -> Result<()> {
    let bad = |why: String| Error::format("published index", why);
    let LayerData::Tar(decoded) = &layer.data else {
        return Err(bad("the layer is not served through it".into()));
    };
    let diff_id =
        diff_id.ok_or_else(|| bad("the image config names no diff_id for this layer".into()))?;
    // The tar entries come from the same stream, read by a parser on its own thread.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let what = format!("layer {} decoded through its published index", layer.digest);
    let parser = {
        let what = what.clone();
        tokio::task::spawn_blocking(move || {
            crate::layer::tar::index_stream(crate::layer::streamed::ChannelReader::new(rx), &what)
        })
    };
    // The stretches a read may resume into at a gzip mark must match their digests too.
    let mut stretches = Stretches::new(&check.stretches);
    let mut send = |piece: &bytes::Bytes| {
        stretches.feed(piece);
        tx.send(piece.to_vec()).is_ok()
    };
    let actual = read_whole(decoded, idle, &mut send).await;
    // Dropping the sender ends the parser's stream.
    drop(tx);
    let entries = parser
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
    let actual = actual?;
    let entries = entries?;
    if actual != diff_id {
        return Err(Error::Digest {
            what,
            expected: diff_id.into(),
            actual,
        });
    }
    if let Some(at) = stretches.mismatch() {
        return Err(bad(format!(
            "its digest of the output from offset {at} of layer {} is wrong",
            layer.digest
        )));
    }
    if entries_digest(&entries) != check.entries {
        return Err(bad(format!(
            "its tar entries differ from those of layer {}",
            layer.digest
        )));
    }
    if let Some(waiting) = &check.kept
        && let Err(e) = crate::layer::checkpoint::file::mark_checked(waiting)
    {
        tracing::warn!(
            "could not keep the checked index {}: {e}",
            waiting.display()
        );
    }
    Ok(())
}

/// Checks a stream's stretches `(start, end, sha256)` (in order, not overlapping) as its
/// pieces go past.
struct Stretches<'a> {
    list: &'a [(u64, u64, [u8; 32])],
    next: usize,
    pos: u64,
    hasher: Sha256,
    bad: Option<u64>,
}

impl<'a> Stretches<'a> {
    fn new(list: &'a [(u64, u64, [u8; 32])]) -> Self {
        Stretches {
            list,
            next: 0,
            pos: 0,
            hasher: Sha256::new(),
            bad: None,
        }
    }

    fn feed(&mut self, piece: &[u8]) {
        let end = self.pos + piece.len() as u64;
        while let Some(&(s, e, digest)) = self.list.get(self.next) {
            if s > end || (s == end && e > s) {
                break; // starts in a later piece
            }
            let from = s.max(self.pos);
            let to = e.min(end).max(from);
            let at = |o: u64| (o - self.pos) as usize;
            self.hasher.update(&piece[at(from)..at(to)]);
            if e > end {
                break; // goes on in a later piece
            }
            let actual: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
            if actual != digest && self.bad.is_none() {
                self.bad = Some(s);
            }
            self.next += 1;
        }
        self.pos = end;
    }

    /// Where the first stretch that did not match (or was never reached) starts.
    fn mismatch(&self) -> Option<u64> {
        self.bad.or_else(|| self.list.get(self.next).map(|s| s.0))
    }
}

/// Waits before verifying a layer again when the network failed it (not its bytes).
const NETWORK_RETRIES: [u64; 3] = [1, 2, 4];

/// Verifies each still-pending layer and records the verdict in its health, yielding to
/// foreground reads (see [`verify_blob`]). `diff_ids` are the config's, in layer order.
/// A mismatch drops the layer's cached blocks and verifies again from the network; a second
/// one marks the layer bad. A layer the network keeps from being read (after a few tries)
/// stays pending, served as before: the first such error is returned.
pub async fn verify_layers(
    layers: &[(&Layer, &Blob)],
    diff_ids: &[String],
    idle: &(dyn Fn() -> bool + Sync),
) -> Result<()> {
    let mut unfinished = None;
    for (i, &(layer, raw)) in layers.iter().enumerate() {
        if *layer.health.read().unwrap() != Health::Pending {
            continue;
        }
        let mut waits = NETWORK_RETRIES.into_iter();
        let mut refetched = false;
        let verdict = loop {
            let diff_id = diff_ids.get(i).map(String::as_str);
            match verify_layer(layer, raw, diff_id, idle, &mut refetched).await {
                Err(e) if !e.is_check() => match waits.next() {
                    Some(s) => {
                        tracing::warn!(
                            "verifying layer {} could not read it ({e}); trying again in {s} s",
                            layer.digest
                        );
                        tokio::time::sleep(std::time::Duration::from_secs(s)).await;
                    }
                    None => break Err(e),
                },
                verdict => break verdict,
            }
        };
        match verdict {
            Ok(()) => {
                tracing::info!("layer {} verified", layer.digest);
                *layer.health.write().unwrap() = Health::Verified;
            }
            Err(e) if e.is_check() => layer.mark_bad(format!("verification failed: {e}")),
            Err(e) => {
                tracing::warn!("layer {} left unverified: {e}", layer.digest);
                unfinished.get_or_insert(e);
            }
        }
    }
    unfinished.map_or(Ok(()), Err)
}

/// Verifies one layer (its blob, then the index it came with), again from fresh bytes
/// after a mismatch (see [`verify_layers`]); `refetched` says, across tries, whether the
/// blob matched only on bytes fetched again.
async fn verify_layer(
    layer: &Layer,
    raw: &Blob,
    diff_id: Option<&str>,
    idle: &(dyn Fn() -> bool + Sync),
    refetched: &mut bool,
) -> Result<()> {
    let what = format!("verification of layer {}", layer.digest);
    let mut attempts = 0;
    let verified = crate::blob::healing(raw, (0, raw.size()), &what, || {
        attempts += 1;
        async {
            verify_blob(raw, idle).await?;
            if let Some(check) = &layer.index_check {
                let checked = check_index(layer, check, diff_id, idle).await;
                if checked.as_ref().is_err_and(Error::is_check)
                    && let LayerData::Tar(decoded) = &layer.data
                {
                    // Decoded output kept from damaged bytes goes with them.
                    decoded.discard(0, decoded.size());
                }
                checked?;
            }
            Ok(())
        }
    })
    .await;
    *refetched |= attempts > 1;
    verified?;
    if *refetched {
        recheck_entries(layer).await?;
    }
    Ok(())
}

/// After a layer's digest matched only on bytes fetched again: the entries its tree was
/// built from, if they were read from the blob itself (see [`Layer::entries_read`]), may
/// have come from the damaged bytes (a tar header's checksum does not cover a long name
/// or PAX record). They are read again from the checked bytes; a difference is a check
/// failure (the layer is bad: its files were placed by damaged names).
async fn recheck_entries(layer: &Layer) -> Result<()> {
    let (Some(read), LayerData::Tar(blob)) = (&layer.entries_read, &layer.data) else {
        return Ok(());
    };
    let entries = crate::layer::tar::index(blob.clone()).await?;
    if entries_digest(&entries) != *read {
        return Err(Error::format(
            format!("layer {}", layer.digest),
            "its file list was read from bytes that failed the digest, and differs from the checked bytes' (mount it again)",
        ));
    }
    tracing::info!(
        "layer {}: its file list, read before a damaged answer was fetched again, is the checked bytes' own",
        layer.digest
    );
    Ok(())
}

#[cfg(test)]
mod tests;

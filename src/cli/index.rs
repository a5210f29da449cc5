//! `ocifs index`: each plain gzip (or multi-frame zstd) layer's checkpoint index, as opening
//! the image builds, loads or fetches it, printed and, with `--push`, published next to the
//! image (see `ocifs::image::share`).

use super::common::{Common, Tuning, open_tuned, progress};
use anyhow::{Context, Result, bail};
use ocifs::image::{Source, share};
use ocifs::layer::checkpoint::{self, CheckpointIndex};
use std::path::Path;

/// Prints each indexed layer's index; with `push`, publishes them as a referrer.
pub async fn index(common: &Common, tuning: &Tuning, reference: &str, push: bool) -> Result<()> {
    let image = open_tuned(common, tuning, reference).await?;
    let (source, _, _) = common.source(reference).await?;
    let cache_dir = common.open_config_tuned(tuning)?.cache_dir;
    if push {
        check_fetched(common, &image).await?;
    }
    let mut indexes = Vec::new();
    for opened in &image.layers {
        let (layer, blob) = (&opened.layer, &opened.blob);
        let Some(src) = layer.index_source else {
            println!("{} {}: no index needed", layer.digest, layer.format.name());
            continue;
        };
        let (path, mut bytes) = kept_index(&cache_dir, &layer.digest)?;
        let kept = checkpoint::file::decode(&bytes, &layer.digest)
            .with_context(|| format!("reading the index {}", path.display()))?;
        let windows = match &kept.windows {
            Some(w) => match kept_windows(&cache_dir, &w.digest) {
                Some(windows) => Some(windows),
                None => match published_windows(&source, w).await {
                    Some(windows) => Some(windows),
                    None => {
                        // An index fetched from the registry leaves its windows there,
                        // perhaps in another repository: publishing it without them would
                        // leave this one's mounts decoding from span starts. The pass that
                        // made it makes them again (and both are kept for next time).
                        let (index, windows) =
                            rebuild(&kept, blob.clone(), &cache_dir, progress(common.quiet))
                                .await
                                .with_context(|| {
                                    format!("rebuilding the index of {}", layer.digest)
                                })?;
                        bytes = checkpoint::file::encode(&index);
                        Some(windows)
                    }
                },
            },
            None => None,
        };
        println!(
            "{} gzip: index {src}, {} bytes, {}{}",
            layer.digest,
            bytes.len(),
            path.display(),
            windows
                .as_ref()
                .map(|w| format!(", mark windows {} bytes", w.len()))
                .unwrap_or_default()
        );
        indexes.push(share::Pushed {
            layer: layer.digest.clone(),
            index: bytes::Bytes::from(bytes),
            windows,
        });
    }
    if !push {
        return Ok(());
    }
    let Source::Registry { repo } = &source else {
        bail!("--push needs a registry reference")
    };
    let Some((registry, repo)) = repo.push_target() else {
        bail!("no host of {reference} takes uploads (its mirror configuration gives none push)")
    };
    let (registry, repo) = (&registry, repo.as_str());
    if indexes.is_empty() {
        println!("nothing to push: the image has no plain gzip layers");
        return Ok(());
    }
    let r = &image.resolved;
    let subject = (
        r.manifest_digest.as_str(),
        r.manifest_media_type.as_str(),
        r.manifest.len() as u64,
    );
    let digest = share::push(registry, repo, subject, &indexes).await?;
    println!(
        "pushed {} index(es) as {digest}, referring to {}",
        indexes.len(),
        r.manifest_digest
    );
    Ok(())
}

/// Before publishing: an index fetched from a registry (ours or a SOCI zTOC) is anyone's
/// who could push a referrer, and a mount trusts it only once the layer decoded through it
/// has matched the config's `diff_id` (see `ocifs::verify`). Pushing it again asks others
/// to trust it, so it is checked the same way first, which fetches those layers whole
/// (a failure names the layer and nothing is pushed); under `--verify off` it is pushed
/// unchecked, with a warning.
async fn check_fetched(common: &Common, image: &ocifs::image::Image) -> Result<()> {
    let fetched = |l: &&ocifs::image::OpenedLayer| l.layer.index_check.is_some();
    if !image.layers.iter().any(|l| fetched(&l)) {
        return Ok(());
    }
    if !common.verifies() {
        tracing::warn!(
            "publishing indexes fetched from the registry without checking them against their layers (--verify off)"
        );
        return Ok(());
    }
    super::browse::verify_whole(common, image, fetched)
        .await
        .context("checking the indexes fetched from the registry before publishing them")
}

/// The index file of layer `digest` in the cache directory and its bytes: the trusted one,
/// else one fetched from the registry that waits to be checked (opening the image just
/// fetched it there when the cache directory was fresh).
fn kept_index(cache_dir: &Path, digest: &str) -> Result<(std::path::PathBuf, Vec<u8>)> {
    let trusted = checkpoint::file::path(cache_dir, digest);
    let waiting = checkpoint::file::unverified_path(cache_dir, digest);
    for p in [&trusted, &waiting] {
        if let Ok(b) = std::fs::read(p) {
            return Ok((p.clone(), b));
        }
    }
    bail!(
        "the index of {digest} was not kept in {} (is the cache directory writable?)",
        trusted.parent().unwrap_or(cache_dir).display()
    )
}

/// The windows blob `w` as published next to its index in the image's repository, checked
/// against its digest; `None` when it is not there.
async fn published_windows(source: &Source, w: &checkpoint::WindowsRef) -> Option<bytes::Bytes> {
    let blob = source.blob(&w.digest, w.size).ok()?;
    let bytes = blob.read_at(0, w.size).await.ok()?;
    (ocifs::digest::sha256(&bytes) == w.digest).then_some(bytes)
}

/// The windows blob named `digest`, if it is kept in the cache directory and intact.
fn kept_windows(cache_dir: &Path, digest: &str) -> Option<bytes::Bytes> {
    let path = checkpoint::file::windows_path(cache_dir, digest);
    let b = std::fs::read(path).ok()?;
    (ocifs::digest::sha256(&b) == digest).then(|| bytes::Bytes::from(b))
}

/// Builds `kept`'s index again from the layer blob (same codec and span: one pass, which
/// checks the blob's digest); the index and its windows are kept in the cache directory.
async fn rebuild(
    kept: &CheckpointIndex,
    blob: ocifs::blob::Blob,
    cache_dir: &Path,
    report: ocifs::image::Progress,
) -> Result<(CheckpointIndex, bytes::Bytes)> {
    let digest = kept.digest.clone();
    let progress = move |done: u64, total: u64| report(&digest, done, total);
    let (index, windows, _) =
        checkpoint::file::build_and_keep(blob, kept.codec, kept.span, cache_dir, &progress, None)
            .await?;
    Ok((index, bytes::Bytes::from(windows)))
}

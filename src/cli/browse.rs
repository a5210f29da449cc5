//! Browse verbs, no mount, same core and laziness: `manifest`, `config`, `digest` (as
//! `crane manifest|config|digest`), `export` (the merged tree as one tar stream, as
//! `crane export`), `pull` (a verified extraction into a directory) and `diff` (what differs
//! between two images' trees).

use super::common::{Common, open, progress_of};
use anyhow::{Context, Result, bail};
use ocifs::image::{Image, export, manifest};
use ocifs::tree::diff::{Change, Difference};
use std::io::Write;
use std::path::Path;

/// `ocifs manifest`: the raw manifest REF names (an index for a multi-platform image, unless
/// `--platform` picks one of its images).
pub async fn manifest(common: &Common, reference: &str) -> Result<()> {
    let (source, what, _) = common.source(reference).await?;
    let body = match common.platform_given() {
        true => {
            let cfg = common.open_config()?;
            manifest::resolve_manifest(&source, &what, &cfg.platform)
                .await?
                .manifest
        }
        false => source.manifest(&what).await?.0,
    };
    std::io::stdout().lock().write_all(&body)?;
    Ok(())
}

/// `ocifs config`: the raw config of the image (for the chosen platform).
pub async fn config(common: &Common, reference: &str) -> Result<()> {
    let (source, what, _) = common.source(reference).await?;
    let cfg = common.open_config()?;
    let resolved = manifest::resolve(&source, &what, &cfg.platform).await?;
    std::io::stdout().lock().write_all(&resolved.config)?;
    Ok(())
}

/// `ocifs digest`: the digest of what REF names (the index of a multi-platform image, or
/// with `--platform` the chosen image's manifest).
pub async fn digest(common: &Common, reference: &str) -> Result<()> {
    let (source, what, _) = common.source(reference).await?;
    let cfg = common.open_config()?;
    let resolved = manifest::resolve_manifest(&source, &what, &cfg.platform).await?;
    let digest = match (common.platform_given(), resolved.index_digest) {
        (false, Some(index)) => index,
        _ => resolved.manifest_digest,
    };
    println!("{digest}");
    Ok(())
}

/// Runs `f` with the image and a blocking reader of its files, on a blocking thread.
async fn with_reader<T: Send + 'static>(
    image: Image,
    f: impl FnOnce(&Image, &dyn Fn(u64, u64, u64) -> ocifs::Result<bytes::Bytes>) -> T + Send + 'static,
) -> Result<T> {
    let runtime = tokio::runtime::Handle::current();
    Ok(tokio::task::spawn_blocking(move || {
        let read = export::blocking_reader(&image, runtime);
        f(&image, &read)
    })
    .await?)
}

/// Shows, until dropped, how much of each layer's blob has come from the network (the
/// bytes already in the block cache are not fetched, so a bar may end short of 100%).
fn watch_fetches(common: &Common, image: &Image) -> tokio::task::JoinHandle<()> {
    let report = progress_of(common.quiet, "fetching layer {}");
    let layers: Vec<_> = image
        .layers
        .iter()
        .map(|l| (l.layer.digest.clone(), l.counter.clone(), l.blob.size()))
        .collect();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tick.tick().await;
            for (digest, counter, size) in &layers {
                let done = counter.bytes.load(std::sync::atomic::Ordering::Relaxed);
                if done > 0 {
                    report(digest, done.min(*size), *size);
                }
            }
        }
    })
}

/// `ocifs export`: the merged tree as one tar stream, to `output` or stdout. A file is
/// written under a temporary name and renamed to `output` once whole: an export that fails
/// leaves nothing that looks like a finished one. (Not when `output` is something other
/// than a file, such as `/dev/stdout`, a pipe or a symlink: that is written to as it is.)
pub async fn export(common: &Common, reference: &str, output: Option<&Path>) -> Result<()> {
    let image = open(common, reference).await?;
    // A layer whose reads are not checked against digests the image vouches for (a plain
    // tar layer, a TOC no annotation names, an index fetched from a registry: see
    // `Layer::checks_vouched`) is checked whole before any byte is exported; every other
    // layer's bytes are checked as each file is read.
    if common.verifies() {
        let unchecked = |l: &&ocifs::image::OpenedLayer| !l.layer.checks_vouched();
        verify_whole(common, &image, unchecked).await?;
    }
    let to_file = |p: &Path| std::fs::symlink_metadata(p).map_or(true, |m| m.is_file());
    let temp = output
        .filter(|p| to_file(p))
        .map(ocifs::blob::disk::temp_path);
    let out: Box<dyn Write + Send> = match temp.as_deref().or(output) {
        Some(t) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(t).with_context(|| format!("creating {}", t.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let watch = watch_fetches(common, &image);
    let done = with_reader(image, move |image, read| export::export(image, out, read)).await;
    watch.abort();
    let done = done.and_then(|d| Ok(d?));
    if let (Some(t), Some(p)) = (&temp, output) {
        match &done {
            Ok(()) => std::fs::rename(t, p)
                .with_context(|| format!("renaming {} to {}", t.display(), p.display()))?,
            Err(_) => {
                let _ = std::fs::remove_file(t);
            }
        }
    }
    done.with_context(|| format!("exporting {reference}"))
}

/// `ocifs pull`: every layer verified against its digest, then the merged tree extracted into
/// `dir` (created if missing; it must be empty).
pub async fn pull(common: &Common, reference: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let image = open(common, reference).await?;
    // Whole layers are checked against their digests first (this fetches them; in the
    // background of a mount it would be the same work). Extraction then reads the checked
    // blocks the cache kept; chunks and spans are checked again as they are decoded, but a
    // plain tar layer's block dropped from the cache meanwhile is fetched again unchecked
    // (see docs/RELIABILITY.md).
    verify_whole(common, &image, |_| true).await?;
    let target = dir.to_path_buf();
    with_reader(image, move |image, read| {
        export::extract(image, &target, read)
    })
    .await?
    .with_context(|| format!("extracting {reference} into {}", dir.display()))
}

/// Checks the whole blobs of the image's layers that `which` picks against their digests
/// (fetching them), with progress; an error naming the first that does not match.
pub(super) async fn verify_whole(
    common: &Common,
    image: &Image,
    which: impl Fn(&&ocifs::image::OpenedLayer) -> bool,
) -> Result<()> {
    let all_ids = manifest::diff_ids(&image.resolved.config);
    // Each layer with its own diff_id (verification takes them by position; a config that
    // names too few leaves the rest without, as for a mount).
    let (pairs, ids): (Vec<_>, Vec<_>) = (image.layers.iter().enumerate())
        .filter(|(_, l)| which(l))
        .map(|(i, l)| ((&*l.layer, &l.blob), all_ids.get(i).cloned()))
        .unzip();
    let diff_ids: Vec<String> = ids.into_iter().map_while(|d| d).collect();
    if pairs.is_empty() {
        return Ok(());
    }
    let watch = watch_fetches(common, image);
    let verified = ocifs::verify::verify_layers(&pairs, &diff_ids, &|| true).await;
    watch.abort();
    verified?;
    for (layer, _) in &pairs {
        if let ocifs::layer::Health::Bad(why) = &*layer.health.read().unwrap() {
            bail!("layer {} failed verification: {why}", layer.digest);
        }
    }
    Ok(())
}

/// `ocifs diff`: what differs from REF1's tree to REF2's, as `A`/`D`/`M` lines (the changed
/// attributes after `M`) or JSON. With `content`, files whose metadata match are read and
/// compared too (`content` is then listed among the changes).
pub async fn diff(common: &Common, one: &str, two: &str, content: bool, json: bool) -> Result<()> {
    let (a, b) = futures::future::try_join(open(common, one), open(common, two)).await?;
    let mut diffs = ocifs::tree::diff::diff(&a.tree, &b.tree);
    if content {
        add_content_changes(&a, &b, &mut diffs).await?;
    }
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &diffs)?;
        writeln!(out)?;
        return Ok(());
    }
    for d in &diffs {
        match &d.change {
            Change::Added => writeln!(out, "A /{}", d.path)?,
            Change::Removed => writeln!(out, "D /{}", d.path)?,
            Change::Changed(f) => writeln!(out, "M /{} ({})", d.path, f.join(", "))?,
        }
    }
    Ok(())
}

/// Compares the bytes of the regular files present in both trees with the same metadata.
async fn add_content_changes(a: &Image, b: &Image, diffs: &mut Vec<Difference>) -> Result<()> {
    let listed: std::collections::HashSet<String> = diffs.iter().map(|d| d.path.clone()).collect();
    let files = |t: &ocifs::tree::Tree| -> Vec<(String, u64, u64)> {
        ocifs::tree::diff::regular_files(t)
            .into_iter()
            .filter(|(p, _, _)| !listed.contains(p))
            .collect()
    };
    let fa = files(&a.tree);
    let fb: std::collections::HashMap<String, u64> =
        files(&b.tree).into_iter().map(|(p, i, _)| (p, i)).collect();
    for (path, ia, size) in fa {
        let Some(&ib) = fb.get(&path) else { continue };
        let mut off = 0;
        while off < size {
            let len = (4 << 20).min(size - off);
            let (x, y) =
                futures::future::try_join(a.read_file(ia, off, len), b.read_file(ib, off, len))
                    .await?;
            if x != y {
                diffs.push(Difference {
                    path: path.clone(),
                    change: Change::Changed(vec!["content"]),
                });
                break;
            }
            off += len;
        }
    }
    diffs.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(())
}

//! `ocifs convert`: rewrite an image's layers as eStargz and push the result.
//!
//! For every manifest (each platform of an index), each layer is unpacked to a local tar
//! (verified against its digest), rewritten by [`estargz::write`] with the profiled files
//! first, and uploaded; the config's `diff_ids` and the layer annotations (TOC digest,
//! uncompressed size) are updated, then the config, the manifest and (for multi-platform
//! images) a new index are pushed. Destinations are a registry repository or an OCI layout.

pub mod estargz;

use crate::error::{Error, Result};
use crate::image::Source;
use crate::layer::{Format, streamed};
use crate::registry::Registry;
use crate::speculate::RUNTIME_FILES;
use crate::stats::Access;
use bytes::Bytes;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Where converted images go.
pub enum Destination {
    Registry {
        registry: Arc<Registry>,
        repo: String,
        tag: String,
    },
    Layout {
        dir: PathBuf,
        tag: String,
    },
}

/// How to convert.
pub struct Options {
    pub chunk_size: u64,
    /// A recorded access profile: its files go first in the layers that hold them.
    pub profile: Vec<Access>,
    /// Working space for unpacked layers and written blobs: each layer's files are removed
    /// once it is converted (the caller removes the directory when the conversion fails).
    pub work_dir: PathBuf,
}

/// Progress lines for the user.
pub type Report = Arc<dyn Fn(&str) + Send + Sync>;

/// Converts the image `reference` of `source` and pushes it to `dest`; returns the digest of
/// the pushed manifest (or index).
pub async fn convert(
    source: &Source,
    reference: &str,
    dest: &Destination,
    opts: &Options,
    report: Report,
) -> Result<String> {
    let by = match source.head(reference).await? {
        Some(meta) => meta.digest,
        None => reference.to_string(),
    };
    let (body, _) = source.manifest(&by).await?;
    let top: Value =
        serde_json::from_slice(&body).map_err(|e| Error::format("manifest", e.to_string()))?;
    let (bytes, media_type) = if top.get("manifests").is_some() {
        let mut index = top.clone();
        let mut out = Vec::new();
        for m in top["manifests"].as_array().into_iter().flatten() {
            let d = m["digest"]
                .as_str()
                .ok_or_else(|| Error::format("image index", "manifest without digest"))?;
            let (digest, size) = convert_manifest(source, d, dest, opts, &report).await?;
            let mut m = m.clone();
            m["mediaType"] = OCI_MANIFEST.into();
            m["digest"] = digest.into();
            m["size"] = size.into();
            out.push(m);
        }
        index["manifests"] = Value::Array(out);
        index["mediaType"] = OCI_INDEX.into();
        (to_bytes(&index), OCI_INDEX)
    } else {
        (
            converted_manifest(source, &top, dest, opts, &report).await?,
            OCI_MANIFEST,
        )
    };
    let digest = crate::digest::sha256(&bytes);
    dest.put_manifest(media_type, bytes, true).await?;
    Ok(digest)
}

async fn convert_manifest(
    source: &Source,
    digest: &str,
    dest: &Destination,
    opts: &Options,
    report: &Report,
) -> Result<(String, u64)> {
    let (body, _) = source.manifest(digest).await?;
    let manifest: Value =
        serde_json::from_slice(&body).map_err(|e| Error::format("manifest", e.to_string()))?;
    let bytes = converted_manifest(source, &manifest, dest, opts, report).await?;
    let (d, size) = (crate::digest::sha256(&bytes), bytes.len() as u64);
    dest.put_manifest(OCI_MANIFEST, bytes, false).await?;
    Ok((d, size))
}

/// Converts the layers of one manifest; returns the new manifest's bytes (not yet pushed).
async fn converted_manifest(
    source: &Source,
    manifest: &Value,
    dest: &Destination,
    opts: &Options,
    report: &Report,
) -> Result<Bytes> {
    let (cfg_digest, cfg_size) = descriptor(&manifest["config"], "config")?;
    let mut config: Value = serde_json::from_slice(&source.small_blob(cfg_digest, cfg_size).await?)
        .map_err(|e| Error::format("image config", e.to_string()))?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    report_scratch(source, &layers, &opts.work_dir, report).await;
    let mut new_layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let (digest, size) = descriptor(l, "layer")?;
        let media_type = l["mediaType"].as_str().unwrap_or_default();
        let n = layers.len();
        let unpacking = Steps::new(report, format!("layer {}/{n}: unpacked", i + 1));
        let tar = local_tar(
            source,
            digest,
            size,
            Format::from_media_type(media_type)?,
            &opts.work_dir,
            &|done, total| unpacking.at(done, total),
        )
        .await?;
        let prioritized = profile_paths(&opts.profile);
        let out_path = opts
            .work_dir
            .join(format!("{}.esgz", digest.replace(':', "-")));
        let (chunk_size, out2, tar2) = (opts.chunk_size, out_path.clone(), tar.clone());
        let writing = Steps::new(report, format!("layer {}/{n}: rewritten", i + 1));
        let written = tokio::task::spawn_blocking(move || -> Result<estargz::Written> {
            let file = std::fs::File::open(&tar2)?;
            let total = file.metadata()?.len();
            let input = Counted {
                inner: std::io::BufReader::new(file),
                read: 0,
                report: &|done| writing.at(done, total),
            };
            let out = std::io::BufWriter::new(std::fs::File::create(&out2)?);
            estargz::write(
                input,
                out,
                &estargz::Options {
                    chunk_size,
                    prioritized,
                },
            )
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        // The unpacked layer is not needed any more: scratch space holds one layer at a time.
        let _ = tokio::fs::remove_file(&tar).await;
        let total = written.size;
        let uploading = |sent: u64| {
            // A line per 64 MiB at most: progress for big layers, quiet for small ones.
            if sent < total && sent % (64 << 20) < crate::registry::UPLOAD_CHUNK as u64 {
                report(&format!(
                    "layer {}/{}: uploaded {} of {total} bytes",
                    i + 1,
                    layers.len(),
                    sent
                ));
            }
        };
        dest.put_blob_file(&written.digest, &out_path, &uploading)
            .await?;
        let _ = tokio::fs::remove_file(&out_path).await;
        report(&format!(
            "layer {}/{}: {digest} -> {} ({} bytes, eStargz)",
            i + 1,
            layers.len(),
            written.digest,
            written.size
        ));
        let mut annotations = json!({
            crate::layer::estargz::TOC_DIGEST_ANNOTATION: written.toc_digest,
            "io.containers.estargz.uncompressed-size": written.uncompressed_size.to_string(),
            crate::layer::estargz::TOC_OFFSET_ANNOTATION: written.toc_offset.to_string(),
        });
        if written.prefetch_size > 0 {
            annotations[crate::layer::estargz::PREFETCH_SIZE_ANNOTATION] =
                written.prefetch_size.to_string().into();
        }
        new_layers.push(json!({
            "mediaType": GZIP_LAYER, "digest": written.digest, "size": written.size,
            "annotations": annotations,
        }));
        diff_ids.push(Value::from(written.diff_id));
    }
    config["rootfs"]["diff_ids"] = Value::Array(diff_ids);
    let config_bytes = to_bytes(&config);
    let config_digest = crate::digest::sha256(&config_bytes);
    let config_size = config_bytes.len();
    dest.put_blob(&config_digest, config_bytes).await?;
    let mut out = manifest.clone();
    out["mediaType"] = OCI_MANIFEST.into();
    out["config"] = json!({"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size});
    out["layers"] = Value::Array(new_layers);
    Ok(to_bytes(&out))
}

/// The profile's paths, first access first, each once, after the files a runtime reads
/// before it starts a container ([`RUNTIME_FILES`]: a container's start reads those before
/// anything the profile recorded, which was read once the workload ran); none without a
/// profile.
///
/// Matched by path, not by the recorded layer digest: a profile is usually recorded on one
/// encoding of an image (say eStargz) and applied to another (its gzip source), whose layer
/// digests differ. Paths a layer does not hold are ignored by the writer.
fn profile_paths(profile: &[Access]) -> Vec<String> {
    if profile.is_empty() {
        return Vec::new();
    }
    let mut seen = std::collections::HashSet::new();
    let runtime = RUNTIME_FILES.iter().map(|p| p.to_string());
    runtime
        .chain(profile.iter().map(|a| a.path.clone()))
        .filter(|p| seen.insert(p.clone()))
        .collect()
}

/// The layer as a verified local uncompressed tar; `progress(done, total)` as it arrives.
/// Streamed once and hashed on the way in, whatever its compression: the tar is renamed into
/// place (and read back) only after its writer is done and the digest matched.
async fn local_tar(
    source: &Source,
    digest: &str,
    size: u64,
    format: Format,
    work: &Path,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<PathBuf> {
    let raw = source.blob(digest, size)?;
    streamed::local_tar(raw, format, work, progress).await?;
    Ok(streamed::tar_path(work, digest))
}

/// Progress lines for one step of one layer: `what N%` at each tenth, and at the end.
struct Steps {
    report: Report,
    what: String,
    /// The last tenth reported (u64::MAX: none yet).
    last: std::sync::atomic::AtomicU64,
}

impl Steps {
    fn new(report: &Report, what: String) -> Steps {
        Steps {
            report: report.clone(),
            what,
            last: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    fn at(&self, done: u64, total: u64) {
        let tenth = (done.min(total) * 10).checked_div(total).unwrap_or(10);
        let last = self.last.swap(tenth, std::sync::atomic::Ordering::Relaxed);
        if last != tenth {
            (self.report)(&format!(
                "{} {}% of {} MiB",
                self.what,
                tenth * 10,
                total.div_ceil(1 << 20)
            ));
        }
    }
}

/// A reader that tells how many bytes were read so far.
struct Counted<'a, R> {
    inner: R,
    read: u64,
    report: &'a (dyn Fn(u64) + Send + Sync),
}

impl<R: std::io::Read> std::io::Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        (self.report)(self.read);
        Ok(n)
    }
}

impl<R: std::io::Seek> std::io::Seek for Counted<'_, R> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Says how much scratch space converting the `layers` of one manifest takes in `work` (one
/// layer at a time: the largest layer unpacked plus its eStargz form, about its compressed
/// size), and how much is free there. A gzip layer's unpacked size is its trailer's
/// (ISIZE, one 4-byte read; the size modulo 4 GiB, so taken only when it is not below the
/// compressed size); others are guessed at four times their compressed size.
async fn report_scratch(source: &Source, layers: &[Value], work: &Path, report: &Report) {
    let mut need = 0u64;
    let mut exact = true;
    for l in layers {
        let Ok((digest, size)) = descriptor(l, "layer") else {
            continue;
        };
        let media_type = l["mediaType"].as_str().unwrap_or_default();
        let unpacked = match Format::from_media_type(media_type) {
            Ok(Format::Tar) => Some(size),
            Ok(Format::Gzip) if size >= 18 => gzip_isize(source, digest, size)
                .await
                .filter(|&n| n >= size),
            _ => None,
        };
        exact &= unpacked.is_some();
        need = need.max(unpacked.unwrap_or(size * 4) + size);
    }
    let free = free_space(work).map(|f| format!("; {} MiB free there", f >> 20));
    report(&format!(
        "scratch space: {}{} MiB in {} (the largest layer unpacked plus its eStargz form){}",
        if exact { "" } else { "about " },
        need.div_ceil(1 << 20),
        work.display(),
        free.unwrap_or_default()
    ));
}

/// The uncompressed size a gzip blob's last 4 bytes give (modulo 4 GiB).
async fn gzip_isize(source: &Source, digest: &str, size: u64) -> Option<u64> {
    let blob = source.blob(digest, size).ok()?;
    let tail = blob.read_at(size - 4, 4).await.ok()?;
    let b: [u8; 4] = tail.as_ref().try_into().ok()?;
    Some(u64::from(u32::from_le_bytes(b)))
}

/// Free bytes on the file system holding `dir` (or its nearest existing parent).
fn free_space(dir: &Path) -> Option<u64> {
    let existing = dir.ancestors().find(|d| d.exists())?;
    let c = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes into a zeroed struct of the right type; c is NUL-terminated.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        st
    };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The digest and size of a descriptor in a manifest; `what` names it in errors.
fn descriptor<'a>(d: &'a Value, what: &str) -> Result<(&'a str, u64)> {
    match (d["digest"].as_str(), d["size"].as_u64()) {
        (Some(digest), Some(size)) => Ok((digest, size)),
        _ => Err(Error::format(
            "manifest",
            format!("{what} descriptor without digest or size"),
        )),
    }
}

fn to_bytes(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("JSON of JSON values"))
}

impl Destination {
    /// Stores the blob in file `path` (uploaded in chunks, or copied into the layout).
    async fn put_blob_file(
        &self,
        digest: &str,
        path: &std::path::Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<()> {
        match self {
            Destination::Registry { registry, repo, .. } => {
                registry
                    .push_blob_file(repo, digest, path, progress)
                    .await?;
                Ok(())
            }
            Destination::Layout { dir, .. } => {
                let to = dir.join("blobs/sha256").join(&digest[7..]);
                tokio::fs::create_dir_all(to.parent().unwrap()).await?;
                let tmp = crate::blob::disk::temp_path(&to);
                let copied = tokio::fs::copy(path, &tmp).await.map(|_| ());
                Ok(crate::blob::disk::put_in_place(&tmp, &to, copied).await?)
            }
        }
    }

    async fn put_blob(&self, digest: &str, data: Bytes) -> Result<()> {
        match self {
            Destination::Registry { registry, repo, .. } => {
                registry.push_blob(repo, digest, data).await
            }
            Destination::Layout { dir, .. } => {
                let path = dir.join("blobs/sha256").join(&digest[7..]);
                tokio::fs::create_dir_all(path.parent().unwrap()).await?;
                Ok(crate::blob::disk::write_in_place(&path, &data).await?)
            }
        }
    }

    /// Puts a manifest by digest, and under the destination tag when `tagged`.
    async fn put_manifest(&self, media_type: &str, data: Bytes, tagged: bool) -> Result<()> {
        let digest = crate::digest::sha256(&data);
        match self {
            Destination::Registry {
                registry,
                repo,
                tag,
            } => {
                let reference = if tagged {
                    tag.as_str()
                } else {
                    digest.as_str()
                };
                registry
                    .push_manifest(repo, reference, media_type, data)
                    .await?;
                Ok(())
            }
            Destination::Layout { dir, tag } => {
                let size = data.len();
                self.put_blob(&digest, data).await?;
                if tagged {
                    let index_path = dir.join("index.json");
                    let mut index: Value = match tokio::fs::read(&index_path).await {
                        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                            Error::format(index_path.display().to_string(), e.to_string())
                        })?,
                        Err(_) => json!({"schemaVersion": 2, "manifests": []}),
                    };
                    let mut manifests = index["manifests"].as_array().cloned().unwrap_or_default();
                    manifests.retain(|m| {
                        m["annotations"]["org.opencontainers.image.ref.name"] != tag.as_str()
                    });
                    manifests.push(json!({"mediaType": media_type, "digest": digest, "size": size,
                                          "annotations": {"org.opencontainers.image.ref.name": tag}}));
                    index["manifests"] = Value::Array(manifests);
                    // A layout being written may be read (or mounted) meanwhile.
                    crate::blob::disk::write_in_place(&index_path, &to_bytes(&index)).await?;
                    crate::blob::disk::write_in_place(
                        &dir.join("oci-layout"),
                        br#"{"imageLayoutVersion":"1.0.0"}"#,
                    )
                    .await?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_is_preceded_by_the_runtimes_files_each_path_once() {
        let access = |path: &str| Access {
            layer: String::new(),
            path: path.to_string(),
            offset: 0,
            len: 1,
        };
        let profile = [
            access("usr/bin/app"),
            access("etc/passwd"),
            access("usr/bin/app"),
        ];
        assert_eq!(
            profile_paths(&profile),
            ["etc/passwd", "etc/group", "usr/bin/app"],
            "the runtime's files first, every path once"
        );
        assert!(
            profile_paths(&[]).is_empty(),
            "nothing prioritized without a profile"
        );
    }

    /// An uncompressed layer is unpacked as the others are: streamed once, its digest checked,
    /// and its tar complete when handed to the writer (it was written through a file whose
    /// last write could still be under way when the writer read it: an empty upper layer).
    #[tokio::test]
    async fn an_uncompressed_layer_is_unpacked_whole_and_checked() {
        let dir = std::env::temp_dir().join(format!("ocifs-convert-tar-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let blobs = dir.join("layout/blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let tar: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
        let digest = crate::digest::sha256(&tar);
        std::fs::write(blobs.join(&digest[7..]), &tar).unwrap();
        let source = Source::Layout {
            dir: dir.join("layout"),
        };
        let size = tar.len() as u64;
        let work = dir.join("work");
        let path = local_tar(&source, &digest, size, Format::Tar, &work, &|_, _| {})
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), tar);

        // A blob that is not what its digest says is refused, and nothing is left behind.
        let mut damaged = tar.clone();
        damaged[20_000] ^= 1;
        let wrong = format!("sha256:{}", "0".repeat(64));
        std::fs::write(blobs.join(&wrong[7..]), &damaged).unwrap();
        let err = local_tar(&source, &wrong, size, Format::Tar, &work, &|_, _| {})
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Digest { .. }), "{err}");
        assert!(!streamed::tar_path(&work, &wrong).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

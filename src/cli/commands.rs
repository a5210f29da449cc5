//! The commands themselves: each builds what it needs and calls the library.

use super::common::{Common, INTERRUPTED, Stop, Tuning, control_socket, open_tuned, out, say};
use anyhow::{Context, Result, anyhow, bail};
use ocifs::image::Source;
use ocifs::layer::{Format, Kind};
use ocifs::stats::{HostFigures, MountStats};
use ocifs::tree::Tree;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// `ocifs cat`: one file's bytes to stdout.
pub async fn cat(common: &Common, tuning: &Tuning, reference: &str, path: &str) -> Result<()> {
    let image = open_tuned(common, tuning, reference).await?;
    let ino = follow(&image.tree, path)?;
    let node = image.tree.get(ino).unwrap();
    if node.kind != Kind::File {
        bail!("{path} is not a regular file");
    }
    let mut out = std::io::stdout().lock();
    let mut off = 0;
    while off < node.size {
        let len = (4 << 20).min(node.size - off);
        let data = image.read_file(ino, off, len).await?;
        out.write_all(&data)?;
        off += data.len() as u64;
    }
    Ok(())
}

/// `ocifs stats`: a mount's figures, as text or JSON.
pub async fn stats(mountpoint: &std::path::Path, json: bool) -> Result<()> {
    ocifs::daemon::check_ocifs_mount(mountpoint)?;
    use ocifs::stats::DaemonStats;
    let asked =
        ocifs::daemon::control::fetch_json::<DaemonStats>(&control_socket(mountpoint)?).await;
    let stats = asked.map_err(|_| {
        anyhow!(
            "the ocifs mount at {} does not answer: its daemon has exited (`ocifs umount {}` removes it)",
            mountpoint.display(),
            mountpoint.display()
        )
    })?;
    match stats {
        DaemonStats::Mount(stats) => print_stats(&stats, json),
        DaemonStats::Store(stats) => super::store::print_store_stats(&stats, json),
    }
}

/// Resolves a path inside the image, following symlinks, never leaving the image.
fn follow(tree: &Tree, path: &str) -> Result<u64> {
    tree.follow(path).map_err(|e| anyhow!("{path}: {e}"))
}

pub async fn inspect(common: &Common, reference: &str, json: bool) -> Result<()> {
    let (source, what, display) = common.source(reference).await?;
    let cfg = common.open_config()?;
    let r = ocifs::image::resolve(&source, &what, &cfg.platform).await?;
    // Indexes published next to the image (ours, SOCI v1 referrers, SOCI v2 annotation).
    let soci_v2 = r
        .annotations
        .get(ocifs::layer::checkpoint::soci::INDEX_ANNOTATION);
    let published =
        ocifs::image::share::discover(&source, &r.manifest_digest, soci_v2.map(String::as_str))
            .await
            .unwrap_or_default();
    let mut layers = Vec::new();
    for l in &r.layers {
        let format = ocifs::image::probe_format(&source, l).await?;
        let mut index = serde_json::Value::Null;
        let why = match format {
            Some(Format::ZstdChunked) => "TOC at the end of the blob (zstd:chunked)".to_string(),
            Some(Format::Estargz | Format::LegacyStargz) => {
                "TOC at the end of the blob".to_string()
            }
            Some(Format::Tar) => "uncompressed: headers walked with ranged reads".to_string(),
            Some(f @ (Format::Gzip | Format::Zstd)) => {
                let path = ocifs::layer::checkpoint::file::path(&cfg.cache_dir, &l.digest);
                match std::fs::read(&path).ok().map(|b| (b.len(), ocifs::layer::checkpoint::file::decode(&b, &l.digest))) {
                    Some((size, Ok(i))) => {
                        index = serde_json::json!({"source": "cached", "path": path, "spans": i.checkpoints.len(),
                            "span": i.span, "bytes": size, "uncompressedSize": i.uncomp_size});
                        format!("checkpoint index cached: {} spans of {} MiB, {} KiB, uncompressed {} bytes", i.checkpoints.len(), i.span >> 20, size >> 10, i.uncomp_size)
                    }
                    Some((_, Err(e))) => format!("cached checkpoint index rejected ({e}); the next mount rebuilds it"),
                    None if published.contains_key(&l.digest) => {
                        let p = &published[&l.digest];
                        index = serde_json::json!({"source": p.origin.label(), "blob": p.digest, "bytes": p.size});
                        format!("checkpoint index published ({}, {} KiB); a mount fetches it instead of building one", p.origin.label(), p.size >> 10)
                    }
                    None if f == Format::Gzip => "checkpoint index built by the first mount (one pass over the blob), then kept".to_string(),
                    None => "lazy if multi-frame (frame index built by the first mount); a single frame is unpacked once".to_string(),
                }
            }
            None => "unknown media type".to_string(),
        };
        layers.push(serde_json::json!({
            "digest": l.digest, "mediaType": l.media_type, "size": l.size,
            "format": format.map(Format::name).unwrap_or("unsupported"),
            "lazy": format.is_some_and(Format::is_lazy),
            "why": why,
            "index": index,
        }));
    }
    let config: serde_json::Value =
        serde_json::from_slice(&r.config).unwrap_or(serde_json::Value::Null);
    let v = serde_json::json!({
        "reference": display, "digest": r.manifest_digest, "mediaType": r.manifest_media_type,
        "index": r.index_digest, "platforms": r.platforms, "platform": cfg.platform.to_string(),
        "config": { "digest": r.config_digest, "architecture": config.get("architecture"), "os": config.get("os"),
                    "created": config.get("created"), "env": config.pointer("/config/Env"), "cmd": config.pointer("/config/Cmd"),
                    "entrypoint": config.pointer("/config/Entrypoint") },
        "layers": layers,
        "hosts": hosts(&source),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "reference:  {display}\ndigest:     {}\nmedia type: {}",
        r.manifest_digest, r.manifest_media_type
    );
    if let Some(i) = &r.index_digest {
        println!("index:      {i}\nplatforms:  {}", r.platforms.join(", "));
    }
    println!("config:     {}", r.config_digest);
    for (i, l) in layers.iter().enumerate() {
        println!(
            "layer {i}:    {} {} {} bytes, {} ({})",
            l["digest"].as_str().unwrap_or(""),
            l["format"].as_str().unwrap_or(""),
            l["size"],
            if l["lazy"].as_bool() == Some(true) {
                "lazy"
            } else {
                "not lazy"
            },
            l["why"].as_str().unwrap_or("")
        );
    }
    print_hosts(&hosts(&source));
    Ok(())
}

/// What each host of a registry source served so far (none for a layout).
fn hosts(source: &Source) -> Vec<HostFigures> {
    match source {
        Source::Registry { repo } => repo.figures(),
        Source::Layout { .. } => Vec::new(),
    }
}

/// One line per host, in the order they are tried, and one per object it served.
fn print_hosts(hosts: &[HostFigures]) {
    for h in hosts {
        println!(
            "host {} ({}: {}; repository {}): {} requests, {} bytes, {} failed{}{}{}",
            h.host,
            h.role,
            h.capabilities,
            h.repository,
            h.requests,
            h.bytes,
            h.failures,
            if h.whole_streams > 0 {
                format!(", {} blobs streamed whole", h.whole_streams)
            } else {
                String::new()
            },
            if h.waited_for_store > 0 {
                format!(", waited for it to store {} blobs", h.waited_for_store)
            } else {
                String::new()
            },
            h.last_error
                .as_deref()
                .map(|e| format!(" (last: {e})"))
                .unwrap_or_default()
        );
        for (object, bytes) in &h.served {
            println!("  served {object}: {bytes} bytes");
        }
    }
}

pub async fn fetch(common: &Common, reference: &str, digest: Option<&str>) -> Result<()> {
    let (source, what, _) = common.source(reference).await?;
    let mut out = std::io::stdout().lock();
    let Some(digest) = digest else {
        let (body, _) = source.manifest(&what).await?;
        out.write_all(&body)?;
        return Ok(());
    };
    ocifs::reference::validate_digest(digest)
        .map_err(|e| anyhow::anyhow!("digest {digest:?}: {e}"))?;
    let size = match &source {
        Source::Registry { repo } => match repo.blob_size(digest).await {
            Ok(s) => s,
            Err(ocifs::Error::NotFound(_)) => {
                let (body, _) = source.manifest(digest).await?;
                out.write_all(&body)?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        },
        Source::Layout { dir } => {
            let (alg, hex) = digest.split_once(':').unwrap();
            std::fs::metadata(PathBuf::from(dir).join("blobs").join(alg).join(hex))?.len()
        }
    };
    let blob = source.blob(digest, size)?;
    let mut hasher = ocifs::digest::Hasher::default();
    let mut off = 0;
    let start = Instant::now();
    while off < size {
        let piece = blob.read_at(off, (8 << 20).min(size - off)).await?;
        hasher.update(&piece);
        out.write_all(&piece)?;
        off += piece.len() as u64;
    }
    let actual = hasher.finish();
    if actual != digest {
        bail!("blob {digest} hashed to {actual}: the output is corrupt");
    }
    tracing::info!(
        "fetched {size} bytes in {:.2}s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn print_stats(v: &MountStats, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    println!("image {} (ready in {} ms)", v.digest, v.ready_ms);
    let p = &v.process;
    match p.supervisor {
        Some(s) => println!(
            "served by process {} under supervisor {s} ({} restarts)",
            p.pid, p.restarts
        ),
        None => println!("served by process {}", p.pid),
    }
    for l in &v.layers {
        let pct = (l.fetched_bytes as f64 * 100.0) / (l.size.max(1) as f64);
        println!(
            "  {} {:8} fetched {} of {} bytes ({pct:.1}%) in {} requests; {}{}{}",
            l.digest,
            l.format,
            l.fetched_bytes,
            l.size,
            l.requests,
            l.verification,
            l.index
                .as_deref()
                .map(|s| format!("; index {s}"))
                .unwrap_or_default(),
            if l.local_copy {
                "; served from a local copy"
            } else {
                ""
            }
        );
    }
    let c = &v.cache;
    println!("{}", c.line());
    let r = &v.reads;
    println!(
        "reads: {} ({} bytes, {} errors), latency p50 {} us, p99 {} us; opens asked of the daemon: {}",
        r.count, r.bytes, r.errors, r.p50_us, r.p99_us, r.opens
    );
    let p = &v.prefetch;
    println!(
        "prefetch: {} of {} bytes; fetched in the background: small layers whole {} bytes, files whole (scattered reads, libraries, the runtime's user files) {} bytes, files with their directory {} bytes",
        p.done_bytes, p.total_bytes, p.small_layer_bytes, p.whole_file_bytes, p.directory_bytes
    );
    let c = &v.local_copies;
    println!(
        "local copies of verified layers: {} bytes written, {} reads served from them",
        c.bytes, c.reads
    );
    print_hosts(&v.hosts);
    Ok(())
}

pub async fn convert(
    common: &Common,
    src: &str,
    dst: &str,
    profile: Option<PathBuf>,
    chunk_size: u64,
) -> Result<()> {
    let max = ocifs::layer::chunked::MAX_CHUNK;
    if chunk_size > max {
        bail!(
            "--chunk-size {chunk_size} is larger than {max} bytes, the most a reader decodes in memory (larger chunks are decoded to disk, slowly)"
        );
    }
    // Signals are ours from the start: an interrupted run removes its scratch files.
    let mut stop = Stop::listen()?;
    let (source, what, display) = common.source_only(src).await?;
    let dst = dst.strip_prefix("docker://").unwrap_or(dst);
    let dest = match dst.strip_prefix("oci:") {
        Some(rest) => {
            let slash = rest.rfind('/').map_or(0, |i| i + 1);
            let (dir, tag) = match rest[slash..].rfind(':') {
                Some(i) => (&rest[..slash + i], &rest[slash + i + 1..]),
                None => (rest, "latest"),
            };
            ocifs::convert::Destination::Layout {
                dir: PathBuf::from(dir),
                tag: tag.to_string(),
            }
        }
        None => {
            let (dsource, _, _) = common.source_only(dst).await?;
            let r = ocifs::reference::Reference::parse(dst)?;
            let Some(tag) = r.tag.filter(|_| r.digest.is_none()) else {
                bail!("the destination {dst} needs a tag, not a digest")
            };
            let Source::Registry { repo } = dsource else {
                unreachable!("a registry reference")
            };
            let Some((registry, repo)) = repo.push_target() else {
                bail!("no host of {dst} takes uploads (its mirror configuration gives none push)")
            };
            ocifs::convert::Destination::Registry {
                registry,
                repo,
                tag,
            }
        }
    };
    let profile = match profile {
        Some(p) => ocifs::speculate::read_profile(&p)?,
        None => Vec::new(),
    };
    // A scratch directory of this run's own, removed however the run ends.
    let scratch = Scratch(
        common
            .cache_dir()?
            .join("convert")
            .join(format!("run-{}", std::process::id())),
    );
    let opts = ocifs::convert::Options {
        chunk_size: chunk_size.max(4096),
        profile,
        work_dir: scratch.0.clone(),
    };
    let quiet = common.quiet;
    let report: ocifs::convert::Report = Arc::new(move |line: &str| {
        if !quiet {
            say(&format!("ocifs: {line}"))
        }
    });
    let converted = tokio::select! {
        r = ocifs::convert::convert(&source, &what, &dest, &opts, report) => r,
        () = stop.wait() => {
            drop(scratch);
            say("ocifs: interrupted; scratch files removed, nothing tagged");
            // Not back through the runtime, which would wait for the layer being rewritten
            // on a blocking thread.
            std::process::exit(i32::from(INTERRUPTED));
        }
    };
    let digest = converted.with_context(|| format!("converting {display}"))?;
    drop(scratch);
    out(&format!("converted {display} to eStargz: {dst} ({digest})"));
    Ok(())
}

/// A scratch directory, removed with everything in it when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

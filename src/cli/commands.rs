//! The commands themselves: each builds what it needs and calls the library.

use super::mount::{MountExtras, mount_here, spawn_daemon};
use super::{Cmd, Common, block_on};
use anyhow::{Context, Result, anyhow, bail};
use ocifs::image::{Image, Progress, Source};
use ocifs::layer::{Format, Kind};
use ocifs::tree::{Node, Tree};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

pub fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Mount {
            common,
            foreground,
            daemon_child,
            record,
            prefetch,
            no_prefetch,
            no_whole_files,
            small_layers,
            no_local_copy,
            reference,
            mountpoint,
        } => {
            if foreground || daemon_child {
                let extras = MountExtras {
                    record,
                    prefetch,
                    no_prefetch,
                    no_whole_files,
                    small_layers: small_layers.0,
                    no_local_copy,
                };
                mount_here(&common, &reference, &mountpoint, daemon_child, extras)
            } else {
                spawn_daemon(&common, &mountpoint)
            }
        }
        Cmd::Stats { json, mountpoint } => block_on(async {
            let v = ocifs::daemon::fetch_stats(&super::control_socket(&mountpoint)?).await?;
            print_stats(&v, json)?;
            Ok(ExitCode::SUCCESS)
        })?,
        Cmd::Umount { mountpoint } => {
            ocifs::daemon::unmount(&mountpoint)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect {
            common,
            json,
            reference,
        } => block_on(inspect(&common, &reference, json))?.map(|_| ExitCode::SUCCESS),
        Cmd::Ls {
            common,
            long,
            recursive,
            reference,
            path,
        } => block_on(async {
            let image = open(&common, &reference).await?;
            let path = path.unwrap_or_default();
            let ino = follow(&image.tree, &path)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            list(&image.tree, ino, &clean(&path), long, recursive, &mut out)?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        })?,
        Cmd::Cat {
            common,
            reference,
            path,
        } => block_on(async {
            let image = open(&common, &reference).await?;
            let ino = follow(&image.tree, &path)?;
            let node = image.tree.get(ino).unwrap();
            if node.kind != Kind::File {
                bail!("{path} is not a regular file");
            }
            let mut out = std::io::stdout().lock();
            let mut off = 0;
            while off < node.size {
                let data = image.read(ino, off, (4 << 20).min(node.size - off)).await?;
                out.write_all(&data)?;
                off += data.len() as u64;
            }
            Ok(ExitCode::SUCCESS)
        })?,
        Cmd::Fetch {
            common,
            reference,
            digest,
        } => block_on(fetch(&common, &reference, digest.as_deref()))?.map(|_| ExitCode::SUCCESS),
        Cmd::Index {
            common,
            push,
            reference,
        } => block_on(super::index::index(&common, &reference, push))?.map(|_| ExitCode::SUCCESS),
        Cmd::Convert {
            common,
            estargz: _,
            profile,
            chunk_size,
            source,
            destination,
        } => block_on(convert(
            &common,
            &source,
            &destination,
            profile,
            chunk_size.0,
        ))?
        .map(|_| ExitCode::SUCCESS),
        Cmd::Tags { common, repository } => block_on(async {
            let (source, _, _) = common.source(&repository)?;
            for t in source.tags().await? {
                println!("{t}");
            }
            Ok(ExitCode::SUCCESS)
        })?,
    }
}

/// Prints a progress line per streamed layer, at most once per 10%.
pub(super) fn progress() -> Progress {
    let last = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        u64,
    >::new()));
    Arc::new(move |digest: &str, done: u64, total: u64| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let mut last = last.lock().unwrap();
        let prev = last.entry(digest.to_string()).or_insert(u64::MAX);
        if *prev == u64::MAX || pct / 10 > *prev / 10 {
            *prev = pct;
            eprintln!(
                "ocifs: reading layer {} once (indexing or unpacking): {pct}% of {} MiB",
                &digest[..digest.len().min(19)],
                total >> 20
            );
        }
    })
}

pub(super) async fn open(common: &Common, reference: &str) -> Result<Image> {
    let (source, what, _) = common.source(reference)?;
    let cfg = common.open_config()?;
    Image::open(&source, &what, &cfg, progress())
        .await
        .with_context(|| format!("opening {reference}"))
}

fn clean(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Resolves a path inside the image, following symlinks, never leaving the image.
fn follow(tree: &Tree, path: &str) -> Result<u64> {
    tree.follow(path).map_err(|e| anyhow!("{path}: {e}"))
}

/// `ls` output; with `-l`: `mode uid gid size mtime path [-> target]`.
fn list(
    tree: &Tree,
    ino: u64,
    path: &str,
    long: bool,
    recursive: bool,
    out: &mut impl Write,
) -> Result<()> {
    let node = tree.get(ino).unwrap();
    if node.kind != Kind::Dir {
        return line(out, node, path, long);
    }
    for (name, &child) in &node.children {
        let p = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}/{name}")
        };
        let c = tree.get(child).unwrap();
        line(out, c, if recursive { &p } else { name }, long)?;
        if recursive && c.kind == Kind::Dir {
            list_children(tree, child, &p, long, out)?;
        }
    }
    Ok(())
}

fn list_children(
    tree: &Tree,
    ino: u64,
    path: &str,
    long: bool,
    out: &mut impl Write,
) -> Result<()> {
    for (name, &child) in &tree.get(ino).unwrap().children {
        let p = format!("{path}/{name}");
        let c = tree.get(child).unwrap();
        line(out, c, &p, long)?;
        if c.kind == Kind::Dir {
            list_children(tree, child, &p, long, out)?;
        }
    }
    Ok(())
}

fn line(out: &mut impl Write, n: &Node, name: &str, long: bool) -> Result<()> {
    if !long {
        writeln!(out, "{name}")?;
        return Ok(());
    }
    let t = match n.kind {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::Char => 'c',
        Kind::Block => 'b',
        Kind::Fifo => 'p',
        Kind::File | Kind::Hardlink => '-',
    };
    write!(
        out,
        "{t}{:04o} {} {} {} {} {name}",
        n.mode & 0o7777,
        n.uid,
        n.gid,
        n.size,
        n.mtime.0
    )?;
    if let Some(l) = &n.link {
        write!(out, " -> {l}")?;
    }
    writeln!(out)?;
    Ok(())
}

async fn inspect(common: &Common, reference: &str, json: bool) -> Result<()> {
    let (source, what, display) = common.source(reference)?;
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
    Ok(())
}

async fn fetch(common: &Common, reference: &str, digest: Option<&str>) -> Result<()> {
    let (source, what, _) = common.source(reference)?;
    let mut out = std::io::stdout().lock();
    let Some(digest) = digest else {
        let (body, _) = source.manifest(&what).await?;
        out.write_all(&body)?;
        return Ok(());
    };
    ocifs::reference::validate_digest(digest)
        .map_err(|e| anyhow::anyhow!("digest {digest:?}: {e}"))?;
    let size = match &source {
        Source::Registry { registry, repo } => match registry.blob_size(repo, digest).await {
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

fn print_stats(v: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    println!(
        "image {} (ready in {} ms)",
        v["digest"].as_str().unwrap_or(""),
        v["readyMs"]
    );
    for l in v["layers"].as_array().into_iter().flatten() {
        println!(
            "  {} {:8} fetched {} bytes in {} requests; {}{}{}",
            l["digest"].as_str().unwrap_or(""),
            l["format"].as_str().unwrap_or(""),
            l["fetchedBytes"],
            l["requests"],
            l["verification"].as_str().unwrap_or(""),
            l["index"]
                .as_str()
                .map(|s| format!("; index {s}"))
                .unwrap_or_default(),
            if l["localCopy"] == true {
                "; served from a local copy"
            } else {
                ""
            }
        );
    }
    let c = &v["cache"];
    println!(
        "cache: {} memory hits, {} disk hits, {} misses ({} bytes fetched)",
        c["memHits"], c["diskHits"], c["misses"], c["fetchedBytes"]
    );
    let r = &v["reads"];
    println!(
        "reads: {} ({} bytes, {} errors), latency p50 {} us, p99 {} us; opens asked of the daemon: {}",
        r["count"], r["bytes"], r["errors"], r["p50Us"], r["p99Us"], r["opens"]
    );
    let p = &v["prefetch"];
    println!(
        "prefetch: {} of {} bytes; fetched in the background: small layers whole {} bytes, files whole (scattered reads, libraries) {} bytes, files with their directory {} bytes",
        p["doneBytes"],
        p["totalBytes"],
        p["smallLayerBytes"],
        p["wholeFileBytes"],
        p["directoryBytes"]
    );
    let c = &v["localCopies"];
    println!(
        "local copies of verified layers: {} bytes written, {} reads served from them",
        c["bytes"], c["reads"]
    );
    Ok(())
}

async fn convert(
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
    let (source, what, display) = common.source(src)?;
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
            let (dsource, _, _) = common.source(dst)?;
            let r = ocifs::reference::Reference::parse(dst)?;
            let Some(tag) = r.tag.filter(|_| r.digest.is_none()) else {
                bail!("the destination {dst} needs a tag, not a digest")
            };
            let Source::Registry { registry, repo } = dsource else {
                unreachable!("a registry reference")
            };
            ocifs::convert::Destination::Registry {
                registry,
                repo,
                tag,
            }
        }
    };
    let profile = match profile {
        Some(p) => ocifs::image::activity::read_profile(&p)?,
        None => Vec::new(),
    };
    let work_dir = common.cache_dir()?.join("convert");
    let opts = ocifs::convert::Options {
        chunk_size: chunk_size.max(4096),
        profile,
        work_dir,
    };
    let report: ocifs::convert::Report = Arc::new(|line: &str| eprintln!("ocifs: {line}"));
    let digest = ocifs::convert::convert(&source, &what, &dest, &opts, report)
        .await
        .with_context(|| format!("converting {display}"))?;
    println!("converted {display} to eStargz: {dst} ({digest})");
    Ok(())
}

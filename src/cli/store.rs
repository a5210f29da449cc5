//! `ocifs store`: serve a containers/storage additional layer store at STORE_DIR, in the
//! foreground or as the detached daemon child (the same handshake as `mount`), until
//! unmounted; and its `ocifs stats` output.

use super::common::{Common, block_on, control_socket, progress};
use anyhow::{Context, Result};
use ocifs::stats::StoreStats;
use ocifs::store::{Connect, Store, StoreConfig};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Store options beyond opening images.
pub struct StoreExtras {
    pub speculation: super::common::Speculation,
    pub release_after: Duration,
    pub lookup_timeout: Duration,
}

/// Serves the store from this process (`--foreground`, or the detached daemon child):
/// mounts it, announces it, serves until unmounted or signalled, then prunes the cache
/// directory.
pub fn store_here(
    common: &Common,
    dir: &Path,
    child: bool,
    extras: StoreExtras,
) -> Result<ExitCode> {
    block_on(async {
        // Registered before the store is mounted: a signal once it is visible unmounts it.
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let started = async {
            let open = extras.speculation.serving(common.open_config()?);
            let cfg = StoreConfig {
                speculate: extras.speculation.config(),
                local_copies: extras.speculation.local_copies(&open),
                release_after: extras.release_after,
                lookup_timeout: extras.lookup_timeout,
                open,
            };
            let quiet = common.quiet;
            let common = common.clone();
            // The credentials are read for each reference resolved, as podman reads them for
            // each pull (a `podman login` after the store started counts).
            let connect: Connect = Arc::new(move |reference: &str| {
                // Only registry references: a layout path is not the runtime's to name.
                let r = ocifs::reference::Reference::parse(reference)?;
                // Choosing http or https may take a round trip: the lookup waits for it here,
                // on its own worker thread.
                let found = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(common.source(&r.to_string()))
                });
                let (source, what, _) = found.map_err(typed)?;
                Ok((source, what))
            });
            let store = Store::new(cfg, connect, progress(quiet));
            let control = control_socket(dir)?;
            let mount = ocifs::store::mount::start(store, dir, Some(&control)).await?;
            Ok::<_, anyhow::Error>(mount)
        }
        .await;
        let mount = match started {
            Ok(m) => m,
            Err(e) => {
                if child {
                    println!("ERR {}", super::errors::line(&e));
                }
                return Err(e);
            }
        };
        let line = format!(
            "OK layer store at {} ready: add \"{}:ref\" to additionallayerstores in storage.conf",
            dir.display(),
            dir.canonicalize()
                .unwrap_or_else(|_| dir.to_path_buf())
                .display()
        );
        super::mount::announce(child, &line);
        let shutdown = async {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        };
        let served = mount.run(shutdown).await;
        let cfg = common.open_config()?;
        let dirs = [cfg.cache_dir.join("blocks"), cfg.cache_dir.join("tars")];
        let max = cfg.disk_cache_size;
        let pruned = tokio::task::spawn_blocking(move || ocifs::blob::disk::prune(&dirs, max));
        if let Ok(Err(e)) = pruned.await {
            tracing::warn!("could not prune {}: {e}", cfg.cache_dir.display());
        }
        served.context("serving the layer store")?;
        Ok(ExitCode::SUCCESS)
    })?
}

/// The library error inside a CLI error (a reference that does not parse, credentials that
/// cannot be read), or the message as a registry error.
fn typed(e: anyhow::Error) -> ocifs::Error {
    match e.downcast::<ocifs::Error>() {
        Ok(e) => e,
        Err(e) => ocifs::Error::Registry(format!("{e:#}")),
    }
}

/// A duration written like `10m`, `30s`, `500ms`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number"))?;
    let ms = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        u => return Err(format!("unknown unit {u:?} in {s:?} (ms, s, m, h)")),
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// `ocifs stats` of a store: each image, then each layer open now.
pub fn print_store_stats(v: &StoreStats, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    println!(
        "layer store: {} images, {} layers open",
        v.images.len(),
        v.layers.len()
    );
    for i in &v.images {
        println!(
            "image {} ({}): {} layers",
            i.reference,
            i.digest,
            i.layers.len()
        );
    }
    for s in &v.layers {
        for l in &s.layers {
            println!(
                "  layer {} {:8} opened in {} ms; fetched {} bytes in {} requests; {}{}; {} reads ({} bytes, {} errors)",
                l.digest,
                l.format,
                s.ready_ms,
                l.fetched_bytes,
                l.requests,
                l.verification,
                l.index
                    .as_deref()
                    .map(|s| format!("; index {s}"))
                    .unwrap_or_default(),
                s.reads.count,
                s.reads.bytes,
                s.reads.errors
            );
        }
    }
    let c = &v.cache;
    println!("{}", c.line());
    println!(
        "released when idle: {} layers; containers/storage notices: {} uses, {} releases",
        v.released, v.uses, v.releases
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }
}

//! `ocifs run`: the startup experiment in one command. Mounts the image lazily in this
//! process (under the cache directory), starts its command as a runtime would
//! (`ocifs::daemon::run`), passes input, output and exit status through, unmounts when the
//! command ends (Ctrl-C reaches the command, which ends, then the mount goes), and prints one
//! summary of the start.

use super::common::{Common, MountExtras, block_on, control_socket, progress};
use anyhow::{Context, Result, bail};
use ocifs::daemon::MountOptions;
use ocifs::daemon::run::Launch;
use ocifs::image::runconfig::RunConfig;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// What one run measured.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    digest: String,
    /// From the start of `ocifs run` to a ready mount.
    ready_ms: u64,
    /// To the command's exec.
    exec_ms: u64,
    /// From the exec to the command's end.
    run_ms: u64,
    exit_code: i32,
    /// Network bytes and requests of the image's layer blobs, and their compressed size.
    fetched_bytes: u64,
    requests: u64,
    image_bytes: u64,
    /// File bytes the command read, and the fetched bytes it waited for (the rest of
    /// `fetched_bytes` came ahead of its reads: prefetch, guesses, verification).
    read_bytes: u64,
    waited_bytes: u64,
    /// Distinct files read.
    files_touched: usize,
}

/// Runs `reference`'s command (or `args` in place of its `Cmd`) from a lazy mount.
pub fn run(
    common: &Common,
    reference: &str,
    args: &[String],
    extras: MountExtras,
    json: bool,
) -> Result<ExitCode> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        bail!("ocifs run needs root (it mounts, and enters a mount namespace)");
    }
    let start = Instant::now();
    let cfg = common.open_config_tuned(&extras.tuning)?;
    let dir = cfg
        .cache_dir
        .join("run")
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = block_on(run_in(common, reference, args, &extras, json, &dir, start))?;
    let _ = std::fs::remove_dir(&dir);
    result
}

async fn run_in(
    common: &Common,
    reference: &str,
    args: &[String],
    extras: &MountExtras,
    json: bool,
    dir: &std::path::Path,
    start: Instant,
) -> Result<ExitCode> {
    let cfg = extras.serving(common.open_config_tuned(&extras.tuning)?);
    let (source, what, display) = common.source(reference).await?;
    let profile = match &extras.prefetch {
        Some(p) => Some(ocifs::speculate::read_profile(p)?),
        None => None,
    };
    let spec = extras.speculation.config();
    // Every read is recorded: the summary counts the files touched, `--record` keeps them.
    let served = ocifs::daemon::open(
        &source,
        &what,
        &cfg,
        spec,
        profile,
        true,
        progress(common.quiet),
    )
    .await
    .with_context(|| format!("opening {reference}"))?;
    let config = RunConfig::parse(&served.image.resolved.config);
    let opts = MountOptions {
        mountpoint: dir.to_path_buf(),
        fsname: format!("ocifs:{display}"),
        control: Some(control_socket(dir)?),
        local_copies: extras.speculation.local_copies(&cfg),
    };
    let mount = ocifs::daemon::start(served, cfg.verify, opts).await?;
    let ready = start.elapsed();
    let served = mount.served().clone();
    // The command gets Ctrl-C from the terminal and ends; this process waits for it, then
    // unmounts (holding the handler keeps SIGINT from ending this process first).
    let _sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let (root, args) = (dir.to_path_buf(), args.to_vec());
    let spawned = tokio::task::spawn_blocking(move || {
        let launch = Launch::new(&root, &config, &args)?;
        let mut cmd = launch.command(&root)?;
        // `spawn` returns once the child has exec'd (or failed to).
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {:?} in the image", launch.argv))?;
        Ok::<_, anyhow::Error>((child, start.elapsed()))
    })
    .await?;
    let (mut child, exec) = match spawned {
        Ok(v) => v,
        Err(e) => {
            mount.run(async {}).await?;
            return Err(e);
        }
    };
    let (ended, is_ended) = tokio::sync::oneshot::channel();
    let waiter = tokio::task::spawn_blocking(move || {
        let status = child.wait();
        let _ = ended.send(());
        status
    });
    mount
        .run(async {
            let _ = is_ended.await;
        })
        .await?;
    let status = waiter.await??;
    let ran = start.elapsed().saturating_sub(exec);
    let exit_code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    let profile = served.profile();
    if let Some(path) = &extras.record {
        ocifs::speculate::write_profile(path, &profile)
            .with_context(|| format!("writing the profile {}", path.display()))?;
    }
    let files: std::collections::HashSet<&str> = profile.iter().map(|a| a.path.as_str()).collect();
    let layers = &served.image.layers;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let figures = served.stats();
    let summary = Summary {
        digest: served.image.resolved.manifest_digest.clone(),
        ready_ms: millis(ready),
        exec_ms: millis(exec),
        run_ms: millis(ran),
        exit_code,
        fetched_bytes: layers.iter().map(|l| load(&l.counter.bytes)).sum(),
        requests: layers.iter().map(|l| load(&l.counter.requests)).sum(),
        image_bytes: layers.iter().map(|l| l.blob.size()).sum(),
        read_bytes: figures.reads.bytes,
        waited_bytes: figures.cache.demand_bytes,
        files_touched: files.len(),
    };
    print_summary(&summary, json)?;
    Ok(ExitCode::from(exit_code.clamp(0, 255) as u8))
}

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn print_summary(s: &Summary, json: bool) -> Result<()> {
    if json {
        eprintln!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    let pct = (s.fetched_bytes as f64 * 100.0) / (s.image_bytes.max(1) as f64);
    eprintln!(
        "ocifs run: ready {:.2}s, exec {:.2}s, ran {:.2}s (exit {}); fetched {} of {} bytes ({pct:.1}%) in {} requests ({} bytes waited for by reads, the rest fetched ahead); {} files touched, {} bytes read",
        s.ready_ms as f64 / 1000.0,
        s.exec_ms as f64 / 1000.0,
        s.run_ms as f64 / 1000.0,
        s.exit_code,
        s.fetched_bytes,
        s.image_bytes,
        s.requests,
        s.waited_bytes,
        s.files_touched,
        s.read_bytes
    );
    Ok(())
}

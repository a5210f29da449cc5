//! `ocifs mount`: in the foreground (or as the detached daemon child), open the image, start
//! the background work (verification, prefetch), serve until unmounted, write the profile.
//! Without `--foreground`, re-execute as a detached daemon and wait for its ready line.

use super::common::{Common, block_on, chain, control_socket, progress};
use anyhow::{Context, Result, bail};
use ocifs::daemon::MountOptions;
use ocifs::speculate::SpeculateConfig;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

/// Mount options beyond opening the image.
pub struct MountExtras {
    pub record: Option<PathBuf>,
    pub prefetch: Option<PathBuf>,
    pub no_prefetch: bool,
    pub no_whole_files: bool,
    /// Layers of at most this many compressed bytes are fetched whole at mount (0: none).
    pub small_layers: u64,
    pub no_local_copy: bool,
}

/// Tells the waiting parent (daemon child) or the user (foreground) that the mount is ready.
pub fn announce(child: bool, line: &str) {
    if child {
        println!("{line}");
        let _ = std::io::stdout().flush();
        // Let go of the parent's pipe so it can exit.
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            use std::os::fd::AsRawFd;
            // SAFETY: dup2 onto stdout with a valid fd.
            unsafe { libc::dup2(null.as_raw_fd(), 1) };
        }
    } else {
        eprintln!("{}", line.trim_start_matches("OK "));
    }
}

/// Serves a mount from this process (`--foreground`, or the detached daemon child): opens the
/// image, starts the mount and its background work, announces it, serves until unmounted or
/// signalled, then prunes the cache directory and writes the profile.
pub fn mount_here(
    common: &Common,
    reference: &str,
    mountpoint: &Path,
    child: bool,
    extras: MountExtras,
) -> Result<ExitCode> {
    block_on(async {
        let cfg = common.open_config()?;
        let spec = SpeculateConfig {
            guesses: !extras.no_whole_files,
            landmarks: !extras.no_prefetch,
            small_layers: extras.small_layers,
            ..SpeculateConfig::default()
        };
        let opts = MountOptions {
            mountpoint: mountpoint.to_path_buf(),
            fsname: String::new(),
            control: Some(control_socket(mountpoint)?),
            local_copies: (!extras.no_local_copy)
                .then(|| (cfg.cache_dir.join("copies"), cfg.disk_cache_size)),
        };
        let opened = async {
            ocifs::daemon::check_mountpoint(mountpoint)?;
            let (source, what, display) = common.source(reference)?;
            let profile = match &extras.prefetch {
                Some(p) => Some(ocifs::speculate::read_profile(p)?),
                None => None,
            };
            let record = extras.record.is_some();
            let served =
                ocifs::daemon::open(&source, &what, &cfg, spec, profile, record, progress())
                    .await
                    .with_context(|| format!("opening {reference}"))?;
            let opts = MountOptions {
                fsname: format!("ocifs:{display}"),
                ..opts
            };
            let line = format!(
                "OK mounted {display} ({}) at {}: {}, {} files, ready in {:.2}s",
                served.image.resolved.manifest_digest,
                mountpoint.display(),
                served.image.layer_summary(),
                served.image.tree.totals().0,
                served.open_time.as_secs_f64()
            );
            let mount = ocifs::daemon::start(served, cfg.verify, opts).await?;
            Ok::<_, anyhow::Error>((mount, line))
        }
        .await;
        let (mount, line) = match opened {
            Ok(v) => v,
            Err(e) => {
                if child {
                    println!("ERR {}", chain(&e));
                }
                return Err(e);
            }
        };
        announce(child, &line);
        let served = mount.served().clone();
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        let served_result = mount.run(shutdown).await;
        // Keep the cache directory bounded, now that this mount's blocks are written (off the
        // start-up path, where it would compete with the first reads).
        let dirs = [cfg.cache_dir.join("blocks"), cfg.cache_dir.join("tars")];
        let max = cfg.disk_cache_size;
        let pruned = tokio::task::spawn_blocking(move || ocifs::blob::disk::prune(&dirs, max));
        let dir = cfg.cache_dir.display();
        match pruned.await {
            Ok(Ok(n)) if n > 0 => {
                tracing::info!("removed {n} bytes of old blocks and tars from {dir}")
            }
            Ok(Err(e)) => tracing::warn!("could not prune {dir}: {e}"),
            _ => {}
        }
        served_result?;
        if let Some(path) = &extras.record {
            let profile = served.profile();
            ocifs::speculate::write_profile(path, &profile)
                .with_context(|| format!("writing the profile {}", path.display()))?;
            tracing::info!("recorded {} accesses to {}", profile.len(), path.display());
        }
        Ok(ExitCode::SUCCESS)
    })?
}

/// Starts `ocifs mount --daemon-child ...` detached, logging into the cache directory, and
/// waits for its first line: `OK ...` when the mount is ready, `ERR ...` otherwise.
pub fn spawn_daemon(common: &Common, mountpoint: &Path) -> Result<ExitCode> {
    ocifs::daemon::check_mountpoint(mountpoint)?;
    let log_dir = common.cache_dir()?.join("logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let log_path = log_dir.join(format!("mount-{stamp}.log"));
    let log = std::fs::File::create(&log_path)?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(&args)
        .arg("--daemon-child")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    if let Some(ok) = line.strip_prefix("OK ") {
        println!("{} (log: {})", ok.trim_end(), log_path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let _ = child.wait();
    match line.strip_prefix("ERR ") {
        Some(err) => bail!("{}", err.trim_end()),
        None => bail!(
            "the mount daemon exited before the mount was ready; see {}",
            log_path.display()
        ),
    }
}

//! `ocifs mount`: in the foreground (or as the detached daemon child), open the image, start
//! the background work (verification, prefetch), serve until unmounted, write the profile.
//! Without `--foreground`, re-execute as a detached daemon and wait for its ready line.

use super::Common;
use super::commands::progress;
use anyhow::{Context, Result, bail};
use ocifs::image::Image;
use ocifs::verify::TaskGuard;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;

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
fn announce(child: bool, line: &str) {
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

pub fn mount_here(
    common: &Common,
    reference: &str,
    mountpoint: &Path,
    child: bool,
    extras: MountExtras,
) -> Result<ExitCode> {
    super::block_on(async {
        let opened = async {
            ocifs::daemon::check_mountpoint(mountpoint)?;
            let (source, what, display) = common.source(reference)?;
            let cfg = common.open_config()?;
            let profile = match &extras.prefetch {
                Some(p) => Some(ocifs::image::activity::read_profile(p)?),
                None => None,
            };
            let mut image = Image::open(&source, &what, &cfg, progress())
                .await
                .with_context(|| format!("opening {reference}"))?;
            if extras.record.is_some() {
                image.recorder = Some(Default::default());
            }
            Ok::<_, anyhow::Error>((Arc::new(image), display, cfg, profile))
        }
        .await;
        let (image, display, cfg, profile) = match opened {
            Ok(v) => v,
            Err(e) => {
                if child {
                    println!("ERR {}", super::chain(&e));
                }
                return Err(e);
            }
        };
        // Verification (unless done before the mount, or off) and, alongside, local copies of
        // the layers as they are verified, so that reads converge to local speed; once every
        // layer is served from its copy (and the mount is up), a larger kernel read-ahead.
        let (mounted, is_mounted) = tokio::sync::oneshot::channel::<()>();
        let verifier = (cfg.verify != ocifs::config::VerifyMode::Off).then(|| {
            let image = image.clone();
            let background = cfg.verify == ocifs::config::VerifyMode::Background;
            let copies = (!extras.no_local_copy)
                .then(|| (cfg.cache_dir.join("copies"), cfg.disk_cache_size));
            let mountpoint = mountpoint.to_path_buf();
            TaskGuard::spawn(async move {
                // Yield the link to the reads of a starting workload.
                let idle = || image.reads.idle_for(std::time::Duration::from_millis(30));
                let verified = async {
                    if background {
                        let diff_ids = ocifs::image::manifest::diff_ids(&image.resolved.config);
                        ocifs::verify::verify_layers(&image.layers, &diff_ids, &idle).await
                    }
                };
                // Each layer is copied once verified, while the next ones are verified.
                let copied = async {
                    match &copies {
                        Some((dir, budget)) => image.copy_layers_locally(dir, *budget, &idle).await,
                        None => false,
                    }
                };
                let ((), all_copied) = tokio::join!(verified, copied);
                if all_copied && is_mounted.await.is_ok() {
                    let kib = ocifs::daemon::CONVERGED_READAHEAD_KIB;
                    match ocifs::daemon::raise_readahead(&mountpoint, kib) {
                        Ok(before) if before < kib => {
                            tracing::info!("every layer is local: read-ahead {before} -> {kib} KiB")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::info!("read-ahead left as it was: {e}"),
                    }
                }
            })
        });
        let whole_files =
            (!extras.no_whole_files).then(|| TaskGuard::spawn(image.clone().fetch_whole_files()));
        // A planned prefetch (a profile, eStargz prioritized files) brings what the workload
        // reads; without one, the configured command's first reads are guessed instead.
        let landmarks = !extras.no_prefetch && image.landmark_bytes() > 0;
        let prefetcher = (profile.is_some() || landmarks).then(|| {
            let image = image.clone();
            image.set_prefetching(true);
            TaskGuard::spawn(async move {
                if let Some(p) = profile {
                    image.prefetch_profile(&p).await;
                }
                if landmarks {
                    image.prefetch_landmarks().await;
                }
                image.set_prefetching(false);
            })
        });
        if prefetcher.is_none() && whole_files.is_some() {
            image.predict_command();
        }
        // Like the other guesses, not while a planned prefetch brings what the workload reads.
        let small_layers = (prefetcher.is_none() && extras.small_layers > 0).then(|| {
            let image = image.clone();
            TaskGuard::spawn(async move {
                image.fetch_small_layers(extras.small_layers).await;
            })
        });
        let line = format!(
            "OK mounted {display} ({}) at {}: {}, {} files, ready in {:.2}s",
            image.resolved.manifest_digest,
            mountpoint.display(),
            image.layer_summary(),
            image.tree.totals().0,
            image.open_time.as_secs_f64()
        );
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        let fsname = format!("ocifs:{display}");
        let control = super::control_socket(mountpoint)?;
        let served = ocifs::daemon::serve(
            image.clone(),
            mountpoint,
            &fsname,
            Some(&control),
            shutdown,
            || {
                announce(child, &line);
                let _ = mounted.send(());
            },
        )
        .await;
        drop((verifier, prefetcher, whole_files, small_layers));
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
        if let Err(e) = &served
            && child
        {
            println!("ERR {e}");
        }
        served?;
        if let Some(path) = &extras.record {
            let profile = image.profile();
            ocifs::image::activity::write_profile(path, &profile)
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

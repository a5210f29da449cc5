//! `ocifs mount`: in the foreground (or as the detached daemon child), open the image, start
//! the background work (verification, prefetch), serve until unmounted, write the profile.
//! Without `--foreground`, re-execute as a detached daemon and wait for its ready line. As
//! root, the foreground process (or daemon child) supervises: it holds the mount and runs
//! this command again as the serving process (`--serve-fd`), restarting it when it dies
//! (`ocifs::daemon::supervise`).

use super::common::{Common, MountExtras, block_on, chain, control_socket, progress};
use anyhow::{Context, Result, bail};
use ocifs::daemon::MountOptions;
use ocifs::daemon::supervise::{Announcement, RestartPolicy, ServerStart};
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{ExitCode, Stdio};

/// A serving process's orders from its supervisor.
pub struct Serving {
    /// The inherited end of the supervisor's socket pair.
    pub fd: i32,
    /// The image digest to open (a successor's).
    pub pin: Option<String>,
    pub restarts: u32,
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

/// Serves a mount from this process (`--foreground`, the detached daemon child, or for a
/// supervisor with `serving`): opens the image, starts the mount (or, serving, says
/// `OPENED` and takes the supervisor's connection) and its background work, announces it,
/// serves until unmounted or signalled, then prunes the cache directory and writes the
/// profile.
pub fn mount_here(
    common: &Common,
    reference: &str,
    mountpoint: &Path,
    child: bool,
    extras: MountExtras,
    serving: Option<Serving>,
) -> Result<ExitCode> {
    // Taken first, so that it is owned (and closed on exec) whatever happens next.
    let channel = match &serving {
        Some(s) => Some(ocifs::daemon::supervise::inherited_channel(s.fd)?),
        None => None,
    };
    block_on(async {
        let cfg = common.open_config_tuned(&extras.tuning)?;
        let spec = extras.speculate_config();
        let opts = MountOptions {
            mountpoint: mountpoint.to_path_buf(),
            fsname: String::new(),
            control: Some(control_socket(mountpoint)?),
            local_copies: (!extras.no_local_copy)
                .then(|| (cfg.cache_dir.join("copies"), cfg.disk_cache_size)),
        };
        let opened = async {
            if serving.is_none() {
                ocifs::daemon::check_mountpoint(mountpoint)?;
            }
            let (source, what, display) = common.source(reference)?;
            // A successor opens exactly the image the first serving process did.
            let what = serving.as_ref().and_then(|s| s.pin.clone()).unwrap_or(what);
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
            let mount = match (channel, &serving) {
                (Some(channel), Some(s)) => {
                    let resolved = &served.image.resolved;
                    let opened = Announcement::Opened {
                        pin: (resolved.index_digest.as_ref())
                            .unwrap_or(&resolved.manifest_digest)
                            .clone(),
                        tree: served.image.tree.fingerprint(),
                        fsname: opts.fsname.clone(),
                    };
                    println!("{}", opened.line());
                    std::io::stdout().flush()?;
                    let restarts = s.restarts;
                    ocifs::daemon::serve_supervised(served, cfg.verify, opts, channel, restarts)
                        .await?
                }
                _ => ocifs::daemon::start(served, cfg.verify, opts).await?,
            };
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
        let served_result = mount.run(terminated()).await;
        if let Ok(ocifs::daemon::Ended::HandedOver) = served_result {
            // The successor answers what this process has not (see `Ended::HandedOver`).
            std::process::exit(0);
        }
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

/// Supervises a mount from this process (`--foreground`, or the detached daemon child, as
/// root): runs this command again as the serving process with the supervisor's channel
/// (and, for a successor, the digest the first one opened), mounts once it has opened the
/// image, announces the mount, and keeps it up until it is unmounted or this process is
/// signalled.
pub fn supervise_here(mountpoint: &Path, child: bool) -> Result<ExitCode> {
    // The path, not /proc/self/exe: after an upgrade replaces the binary, successors run
    // the new one.
    let program = std::env::current_exe()?;
    let args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--daemon-child" && a != "--foreground")
        .collect();
    let command = move |s: &ServerStart| {
        let mut c = std::process::Command::new(&program);
        c.args(&args)
            .arg("--serve-fd")
            .arg(s.channel_fd.to_string())
            .arg("--restarts")
            .arg(s.restarts.to_string());
        if let Some(pin) = s.pin {
            c.arg("--pin").arg(pin);
        }
        c
    };
    let ready_said = std::cell::Cell::new(false);
    let ready = |text: &str| {
        ready_said.set(true);
        announce(child, &format!("OK {text}"));
    };
    let supervised = block_on(async {
        let policy = RestartPolicy::default();
        ocifs::daemon::supervise::supervise(mountpoint, policy, command, ready, terminated()).await
    })?;
    if let Err(e) = supervised {
        let e = anyhow::Error::new(e);
        if child && !ready_said.get() {
            println!("{}", Announcement::Failed(chain(&e)).line());
        }
        return Err(e);
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed at once (call it on
/// the runtime), so a signal that comes before the future is first polled is not lost.
fn terminated() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
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

//! `ocifs mount`: in the foreground (or as the detached daemon child), open the image, start
//! the background work (verification, prefetch), serve until unmounted, write the profile.
//! Without `--foreground`, re-execute as a detached daemon and wait for its ready line. As
//! root, the foreground process (or daemon child) supervises: it holds the mount and runs
//! this command again as the serving process (`--serve-fd`), restarting it when it dies
//! (`ocifs::daemon::supervise`).
//!
//! Interrupting (Ctrl-C, SIGTERM, SIGHUP) before the mount is ready leaves nothing mounted:
//! the waiting parent stops the daemon and waits for it, and the daemon listens for those
//! signals from its start, so no signal can end it between mounting and serving (a FUSE
//! daemon that dies leaves a dead mount). A daemon whose parent is gone before it could be
//! told the mount is ready unmounts it and exits.

use super::common::{Common, MountExtras, Stop, block_on, control_socket, out, progress, say};
use super::errors;
use anyhow::{Context, Result, bail};
use ocifs::daemon::MountOptions;
use ocifs::daemon::supervise::{Announcement, RestartPolicy, ServerStart};
use std::io::Write;
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

/// Refuses to mount, before any network work, where FUSE cannot be used: no `/dev/fuse`, no
/// read-write access to it, or (not root) no `fusermount3` to mount with.
pub fn check_fuse() -> Result<()> {
    let dev = Path::new("/dev/fuse");
    if !dev.exists() {
        bail!(
            "/dev/fuse is missing: this system has no FUSE (load the module with `modprobe fuse`; in a container, pass the device in)"
        );
    }
    let c = std::ffi::CString::new("/dev/fuse").expect("no NUL");
    // SAFETY: access reads a NUL-terminated path; no other preconditions.
    if unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
        bail!(
            "cannot open /dev/fuse for reading and writing ({}): mounting needs access to it; run as root or ask for access to /dev/fuse",
            std::io::Error::last_os_error().kind()
        );
    }
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let fusermount = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").exists()));
    if !root && !fusermount {
        bail!("fusermount3 is not installed: mounting as a user needs it (Debian: fuse3)");
    }
    Ok(())
}

/// Tells the waiting parent (daemon child) or the user (foreground) that the mount is ready.
/// False when the parent is gone (nobody can be told about the mount).
pub fn announce(child: bool, line: &str) -> bool {
    if !child {
        say(line.trim_start_matches("OK "));
        return true;
    }
    let mut out = std::io::stdout();
    let told = writeln!(out, "{line}").and_then(|()| out.flush()).is_ok();
    // Let go of the parent's pipe so it can exit.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto stdout with a valid fd.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
    told
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
        // First of all: from here on a signal cannot end the process with a mount left dead.
        let mut stop = Stop::listen()?;
        let cfg = extras.serving(common.open_config_tuned(&extras.tuning)?);
        let spec = extras.speculation.config();
        let opts = MountOptions {
            mountpoint: mountpoint.to_path_buf(),
            fsname: String::new(),
            control: Some(control_socket(mountpoint)?),
            local_copies: extras.speculation.local_copies(&cfg),
        };
        let opened = async {
            if serving.is_none() {
                ocifs::daemon::check_mountpoint(mountpoint)?;
                check_fuse()?;
            }
            let (source, what, display) = common.source(reference).await?;
            // A successor opens exactly the image the first serving process did.
            let what = serving.as_ref().and_then(|s| s.pin.clone()).unwrap_or(what);
            let profile = match &extras.prefetch {
                Some(p) => Some(ocifs::speculate::read_profile(p)?),
                None => None,
            };
            let record = extras.record.is_some();
            let served = ocifs::daemon::open(
                &source,
                &what,
                &cfg,
                spec,
                profile,
                record,
                progress(common.quiet),
            )
            .await
            .with_context(|| format!("opening {display}"))?;
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
        };
        let opened = tokio::select! {
            r = opened => r,
            () = stop.wait() => {
                let what = format!("interrupted; nothing is mounted at {}", mountpoint.display());
                tracing::info!("{what}");
                if !child {
                    say(&format!("ocifs: {what}"));
                }
                return Ok(ExitCode::from(super::common::INTERRUPTED));
            }
        };
        let (mount, line) = match opened {
            Ok(v) => v,
            Err(e) => {
                if child {
                    let line = errors::line(&e);
                    let _ = writeln!(std::io::stdout(), "ERR {line}");
                }
                return Err(e);
            }
        };
        let served = mount.served().clone();
        let told = announce(child, &line);
        if !told {
            tracing::warn!("the mount command is gone before the mount was ready: unmounting");
        }
        let served_result = if told {
            mount.run(stop.wait()).await
        } else {
            mount.run(async {}).await
        };
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
    // The mount command gone before it could be told: nobody knows of the mount, undo it.
    let gone = std::sync::Arc::new(tokio::sync::Notify::new());
    let ready = |text: &str| {
        ready_said.set(true);
        if !announce(child, &format!("OK {text}")) {
            tracing::warn!("the mount command is gone before the mount was ready: unmounting");
            gone.notify_one();
        }
    };
    let supervised = block_on(async {
        let policy = RestartPolicy::default();
        let mut stop = Stop::listen()?;
        let gone = gone.clone();
        let stopped = async move {
            tokio::select! {
                () = stop.wait() => {}
                () = gone.notified() => {}
            }
        };
        anyhow::Ok(
            ocifs::daemon::supervise::supervise(mountpoint, policy, command, ready, stopped).await,
        )
    })??;
    if let Err(e) = supervised {
        let e = anyhow::Error::new(e);
        if child && !ready_said.get() {
            println!("{}", Announcement::Failed(errors::line(&e)).line());
        }
        return Err(e);
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts `ocifs mount --daemon-child ...` detached, logging into the cache directory, and
/// waits for its first line: `OK ...` when the mount is ready, `ERR ...` otherwise. A signal
/// meanwhile stops the daemon (which unmounts if it got that far) and waits for it.
pub fn spawn_daemon(common: &Common, mountpoint: &Path) -> Result<ExitCode> {
    ocifs::daemon::check_mountpoint(mountpoint)?;
    check_fuse()?;
    let log_dir = common.cache_dir()?.join("logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let log_path = log_dir.join(format!("mount-{stamp}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    block_on(async {
        let mut stop = Stop::listen()?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.args(&args)
            .arg("--daemon-child")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal
        // session, so the terminal's signals reach only this process, which passes them on.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("starting the mount daemon")?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        let line = tokio::select! {
            l = lines.next_line() => l.unwrap_or(None).unwrap_or_default(),
            () = stop.wait() => {
                if let Some(pid) = child.id() {
                    // SAFETY: signalling our own child, which has not been reaped.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
                let _ = child.wait().await;
                say(&format!("ocifs: interrupted; nothing is mounted at {}", mountpoint.display()));
                return Ok(ExitCode::from(super::common::INTERRUPTED));
            }
        };
        if let Some(ok) = line.strip_prefix("OK ") {
            out(&format!("{} (log: {})", ok.trim_end(), log_path.display()));
            return Ok(ExitCode::SUCCESS);
        }
        let _ = child.wait().await;
        match line.strip_prefix("ERR ") {
            Some(err) => bail!("{}", err.trim_end()),
            None => bail!(
                "the mount daemon exited before the mount was ready; see {}",
                log_path.display()
            ),
        }
    })?
}

/// How long `ocifs umount` waits for the daemon to finish (it finishes when the kernel ends
/// the FUSE session, which waits for files still open on the mount).
const DAEMON_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `ocifs umount DIR`: refuses anything but an ocifs mount, unmounts it, and waits for the
/// daemon that served it to finish, so that its `--record` profile is complete on return.
pub fn umount(mountpoint: &Path) -> Result<ExitCode> {
    ocifs::daemon::check_ocifs_mount(mountpoint)?;
    // The daemon is found through its control socket (whose peer it is) before the unmount
    // takes the socket away; a dead mount has none, and nothing to wait for.
    let daemon = control_socket(mountpoint)
        .ok()
        .and_then(|sock| block_on(ocifs::daemon::daemon_pid(&sock)).ok()?.ok())
        .and_then(|pid| Some((pid, pidfd_open(pid)?)));
    ocifs::daemon::unmount(mountpoint)?;
    if let Some((pid, fd)) = daemon
        && !exited(&fd, DAEMON_EXIT_WAIT)
    {
        say(&format!(
            "ocifs: {} is unmounted; its daemon (pid {pid}) is still finishing (files still open on it?)",
            mountpoint.display()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// A pidfd of process `pid`: readable once the process has exited.
fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a successful pidfd_open returned a descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits up to `limit` for the process behind `pidfd` to exit; whether it did.
fn exited(pidfd: &std::os::fd::OwnedFd, limit: std::time::Duration) -> bool {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut p = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        match n {
            1.. => return true,
            0 => return false,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
}

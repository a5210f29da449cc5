//! `ocifs run`: mount an image lazily, run its command (or the one given after `--`) on it
//! in a private mount namespace, pass stdin, stdout and the exit status through, unmount,
//! and print one summary line (stderr; JSON with `--json`).

use super::common::{Common, block_on, progress};
use anyhow::{Context, Result};
use ocifs::daemon::MountOptions;
use ocifs::run::{RunSpec, RunSummary};
use ocifs::speculate::SpeculateConfig;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Run options beyond opening the image.
pub struct RunExtras {
    pub record: Option<PathBuf>,
    pub prefetch: Option<PathBuf>,
    pub json: bool,
    pub no_prefetch: bool,
    pub no_whole_files: bool,
    pub small_layers: u64,
    pub no_local_copy: bool,
}

/// Runs `command` (or the image's own) of `reference`; its exit status is ours.
pub fn run(
    common: &Common,
    reference: &str,
    command: &[String],
    extras: RunExtras,
) -> Result<ExitCode> {
    block_on(async {
        let start = Instant::now();
        let cfg = common.open_config()?;
        let (source, what, display) = common.source(reference)?;
        let profile = match &extras.prefetch {
            Some(p) => Some(ocifs::speculate::read_profile(p)?),
            None => None,
        };
        let spec = SpeculateConfig {
            guesses: !extras.no_whole_files,
            landmarks: !extras.no_prefetch,
            small_layers: extras.small_layers,
            ..SpeculateConfig::default()
        };
        // Every read is recorded: the summary counts the files touched.
        let served = ocifs::daemon::open(&source, &what, &cfg, spec, profile, true, progress())
            .await
            .with_context(|| format!("opening {reference}"))?;
        let process = RunSpec::from_image(&served.image, command).await?;
        let base = cfg
            .cache_dir
            .join("run")
            .join(std::process::id().to_string());
        let (mnt, scratch) = (base.join("mnt"), base.join("scratch"));
        for d in [&mnt, &scratch] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let opts = MountOptions {
            mountpoint: mnt.clone(),
            fsname: format!("ocifs:{display}"),
            control: None,
            local_copies: (!extras.no_local_copy)
                .then(|| (cfg.cache_dir.join("copies"), cfg.disk_cache_size)),
        };
        // From the mount on, SIGINT and SIGTERM go to the command (none yet: the first one
        // found waiting ends it as soon as it starts), and the mount is always undone.
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mount = ocifs::daemon::start(served, cfg.verify, opts).await?;
        let served = mount.served().clone();
        let ready = start.elapsed();
        let status = async {
            let mut cmd = ocifs::run::container::command(&mnt, &scratch, &process)?;
            let mut child = cmd
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {:?}", process.argv))?;
            let exec = start.elapsed();
            let forward = |child: &tokio::process::Child, sig| {
                if let Some(pid) = child.id() {
                    // SAFETY: kill has no memory preconditions; pid is our child's.
                    unsafe { libc::kill(pid as libc::pid_t, sig) };
                }
            };
            let status = loop {
                tokio::select! {
                    s = child.wait() => break s?,
                    _ = int.recv() => forward(&child, libc::SIGINT),
                    _ = term.recv() => forward(&child, libc::SIGTERM),
                }
            };
            Ok::<_, anyhow::Error>((status, exec, start.elapsed() - exec))
        }
        .await;
        // Unmounted whatever happened to the command.
        let unmounted = mount.run(async {}).await;
        let _ = std::fs::remove_dir_all(&base);
        unmounted?;
        let (status, exec, ran) = status?;
        let code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        let stats = served.stats();
        let touched: std::collections::HashSet<String> =
            served.profile().into_iter().map(|a| a.path).collect();
        let summary = RunSummary {
            reference: display,
            digest: stats.digest.clone(),
            ready_ms: ready.as_millis() as u64,
            first_exec_ms: exec.as_millis() as u64,
            run_ms: ran.as_millis() as u64,
            exit_status: code,
            fetched_bytes: stats.layers.iter().map(|l| l.fetched_bytes).sum(),
            requests: stats.layers.iter().map(|l| l.requests).sum(),
            image_bytes: served.image.resolved.layers.iter().map(|l| l.size).sum(),
            files_touched: touched.len() as u64,
            reads: stats.reads.count,
        };
        match extras.json {
            true => eprintln!("{}", serde_json::to_string(&summary)?),
            false => eprintln!("{summary}"),
        }
        if let Some(path) = &extras.record {
            let profile = served.profile();
            ocifs::speculate::write_profile(path, &profile)
                .with_context(|| format!("writing the profile {}", path.display()))?;
        }
        Ok(ExitCode::from(code.clamp(0, 255) as u8))
    })?
}

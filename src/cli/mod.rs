//! Argument parsing and the commands. `mount` without `--foreground` re-executes itself as a
//! detached daemon and waits for its "ready" line, like other FUSE mounters.

//!
//! `mod.rs` parses and dispatches; `common.rs` holds what every command shares (options,
//! configuration, the registry), `access.rs` how to reach a registry (credentials, TLS
//! files), `errors.rs` the one line a failure prints; the commands themselves are in
//! `commands.rs`, `mount.rs`, `store.rs`, `run.rs`, `ls.rs`, `browse.rs` and `index.rs`.

mod access;
mod browse;
mod commands;
mod common;
mod errors;
mod index;
mod ls;
mod mount;
mod run;
mod store;

use anyhow::Result;
use clap::{Parser, Subcommand};
use common::{Common, block_on};
use ocifs::config::ByteSize;
use std::path::PathBuf;
use std::process::ExitCode;

/// `--version`: the version, the commit, and what is compiled in.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("OCIFS_COMMIT"),
    ")\nlayer formats: eStargz, legacy stargz, zstd:chunked, gzip and multi-frame zstd through \
     checkpoint indexes (ours, SOCI zTOC v1/v2), single-frame zstd, uncompressed tar\n\
     features: FUSE mount, ocifs run, convert to eStargz, \
     verification (background/strict), block cache, prefetch profiles"
);

#[derive(Parser)]
#[command(
    name = "ocifs",
    version,
    long_version = LONG_VERSION,
    about = "Container images from a registry as a lazily loaded read-only file system"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount an image read-only at MOUNTPOINT; returns once the mount is ready.
    Mount {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        tuning: common::Tuning,
        /// Stay attached, log to stderr; Ctrl-C unmounts.
        #[arg(long)]
        foreground: bool,
        /// Internal: run as the detached daemon child of `mount`.
        #[arg(long, hide = true)]
        daemon_child: bool,
        /// Write the ordered list of file ranges read to FILE when unmounted.
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
        /// Prefetch the ranges of a recorded profile in the background, in order.
        #[arg(long, value_name = "FILE")]
        prefetch: Option<PathBuf>,
        #[command(flatten)]
        speculation: common::Speculation,
        /// Serve from the mount daemon itself. By default (as root) the daemon only holds
        /// the mount and a child process serves it, which is restarted if it dies while
        /// readers wait, so the mount survives a crash or an upgrade.
        #[arg(long)]
        no_supervisor: bool,
        /// Internal: serve for a supervisor over this inherited socket.
        #[arg(long, hide = true, value_name = "FD")]
        serve_fd: Option<i32>,
        /// Internal: the image digest a restarted serving process opens.
        #[arg(long, hide = true, value_name = "DIGEST")]
        pin: Option<String>,
        /// Internal: how many serving processes came before this one.
        #[arg(long, hide = true, default_value_t = 0)]
        restarts: u32,
        /// The image: [docker://]HOST[:PORT]/NAME[:TAG|@DIGEST], or oci:DIR[:TAG].
        reference: String,
        /// An empty directory to mount on (or the mount, for stats).
        mountpoint: PathBuf,
    },
    /// Unmount an ocifs mount or layer store (nothing else), once its daemon has finished
    /// (written its `--record` profile).
    Umount {
        /// The mountpoint of an ocifs mount.
        mountpoint: PathBuf,
    },
    /// Serve a containers/storage additional layer store at STORE_DIR (podman, CRI-O and
    /// buildah with `additionallayerstores = ["STORE_DIR:ref"]` in storage.conf start
    /// containers from it lazily); returns once it is ready.
    Store {
        #[command(flatten)]
        common: Common,
        /// Stay attached, log to stderr; Ctrl-C unmounts.
        #[arg(long)]
        foreground: bool,
        /// Internal: run as the detached daemon child of `store`.
        #[arg(long, hide = true)]
        daemon_child: bool,
        #[command(flatten)]
        speculation: common::Speculation,
        /// Release a layer nobody has asked for during this long (10m, 30s, 1h); it is
        /// opened again, from the cache directory, when next asked for.
        #[arg(long, default_value = "10m", value_parser = store::parse_duration)]
        release_after: std::time::Duration,
        /// The longest a lookup waits for a reference to resolve or a layer to open before
        /// failing (the runtime then pulls the layer itself).
        #[arg(long, default_value = "60s", value_parser = store::parse_duration)]
        lookup_timeout: std::time::Duration,
        store_dir: PathBuf,
    },
    /// Show a mount's (or layer store's) statistics: bytes and requests per layer, cache,
    /// latency, prefetch.
    Stats {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// An empty directory to mount on (or the mount, for stats).
        mountpoint: PathBuf,
    },
    /// Show the resolved digest, platforms, config and layers of an image.
    Inspect {
        #[command(flatten)]
        common: Common,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The image: [docker://]HOST[:PORT]/NAME[:TAG|@DIGEST], or oci:DIR[:TAG].
        reference: String,
    },
    /// List files of an image without mounting it.
    ///
    /// Paths are absolute, in name order. Examples: `ocifs ls -l alpine /etc`,
    /// `ocifs ls -R --json alpine /usr/lib`.
    Ls {
        #[command(flatten)]
        common: Common,
        /// Long format, as `tar -tv`: mode, owner/group, size, mtime (UTC), path, link target.
        #[arg(short = 'l')]
        long: bool,
        /// Recurse into directories.
        #[arg(short = 'R')]
        recursive: bool,
        /// List a directory itself, not its contents.
        #[arg(short = 'd')]
        directory: bool,
        /// Machine-readable output: one object per path.
        #[arg(long)]
        json: bool,
        reference: String,
        /// Paths in the image (default: its root). A symlink given last is listed, not
        /// followed, unless the path ends with `/`.
        paths: Vec<String>,
    },
    /// Write one file of an image to stdout.
    Cat {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        tuning: common::Tuning,
        /// The image: [docker://]HOST[:PORT]/NAME[:TAG|@DIGEST], or oci:DIR[:TAG].
        reference: String,
        /// The file in the image (symlinks on the way are followed).
        path: String,
    },
    /// Write a raw manifest (no digest) or blob/manifest (by digest) to stdout.
    Fetch {
        #[command(flatten)]
        common: Common,
        /// The image: [docker://]HOST[:PORT]/NAME[:TAG|@DIGEST], or oci:DIR[:TAG].
        reference: String,
        /// A blob or manifest digest (sha256:...) in the same repository.
        digest: Option<String>,
    },
    /// Build (or find) the checkpoint indexes of an image's gzip layers; `--push` publishes
    /// them to the registry as an artifact referring to the image.
    Index {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        tuning: common::Tuning,
        /// Upload the indexes next to the image (referrers API, or the sha256-<hex> tag).
        #[arg(long)]
        push: bool,
        /// The image: [docker://]HOST[:PORT]/NAME[:TAG|@DIGEST], or oci:DIR[:TAG].
        reference: String,
    },
    /// Rewrite an image's layers as eStargz (profiled files first) and push it to DESTINATION
    /// (a registry reference with a tag, or oci:PATH[:TAG]).
    Convert {
        #[command(flatten)]
        common: Common,
        /// Convert to eStargz (the one target format).
        #[arg(long, required = true)]
        estargz: bool,
        /// An access profile from `ocifs mount --record`: its files go first (after
        /// /etc/passwd and /etc/group, which a container runtime reads before them).
        #[arg(long, value_name = "FILE")]
        profile: Option<PathBuf>,
        /// Size of independently readable chunks of large files.
        #[arg(long, default_value = "4MiB")]
        chunk_size: ByteSize,
        /// The image to convert.
        source: String,
        /// Where to push: HOST[:PORT]/NAME:TAG, or oci:DIR[:TAG].
        destination: String,
    },
    /// List a repository's tags.
    Tags {
        #[command(flatten)]
        common: Common,
        /// Machine-readable output: a JSON array of strings.
        #[arg(long)]
        json: bool,
        repository: String,
    },
    /// Write the raw manifest REF names (an image index for a multi-platform image, unless
    /// --platform picks one of its images), like `crane manifest`.
    Manifest {
        #[command(flatten)]
        common: Common,
        reference: String,
    },
    /// Write the raw config of the image (for the chosen platform), like `crane config`.
    Config {
        #[command(flatten)]
        common: Common,
        reference: String,
    },
    /// Print the digest of what REF names (the index of a multi-platform image, or with
    /// --platform the chosen image's manifest), like `crane digest`.
    Digest {
        #[command(flatten)]
        common: Common,
        reference: String,
    },
    /// Write the image's merged file system (layers applied, whiteouts removed) as one tar
    /// stream, like `crane export`. Example: `ocifs export alpine -o alpine.tar`.
    Export {
        #[command(flatten)]
        common: Common,
        /// Write to FILE instead of stdout (under a temporary name, renamed once whole).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
        reference: String,
    },
    /// Verify every layer of the image against its digest, then extract the merged file
    /// system into DIR (created if missing, must be empty). Example: `ocifs pull alpine ./root`.
    Pull {
        #[command(flatten)]
        common: Common,
        reference: String,
        dir: PathBuf,
    },
    /// List the paths added (A), removed (D) and changed (M, with the attributes that changed)
    /// from REF1's merged file system to REF2's, reading only indexes and TOCs unless
    /// --content. Example: `ocifs diff app:v1 app:v2`.
    Diff {
        #[command(flatten)]
        common: Common,
        /// Also compare the bytes of files whose metadata match (fetches them).
        #[arg(long)]
        content: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        reference1: String,
        reference2: String,
    },
    /// Write a shell completion script to stdout. Example: `ocifs completions bash >
    /// /etc/bash_completion.d/ocifs`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (ocifs.1 and one per subcommand) into DIR.
    Man {
        /// Where to write them.
        dir: PathBuf,
    },
    /// Run the image's command (or ARGS in place of its Cmd) from a lazy mount, as a runtime
    /// would (its root, Env, WorkingDir and User; /proc, /dev, /sys and /etc/resolv.conf of
    /// the host bound in), pass its input, output and exit status through, unmount, and
    /// print one summary of the start on stderr. Needs root.
    Run {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        tuning: common::Tuning,
        /// Write the ordered list of file ranges read to FILE (for --prefetch or
        /// `ocifs convert --profile`).
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
        /// Prefetch the ranges of a recorded profile in the background, in order.
        #[arg(long, value_name = "FILE")]
        prefetch: Option<PathBuf>,
        #[command(flatten)]
        speculation: common::Speculation,
        /// Print the summary as one JSON object (on stderr; stdout is the command's).
        #[arg(long)]
        json: bool,
        reference: String,
        /// The command line to run instead of the image's Cmd (after the Entrypoint).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// The command line's definition.
fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Entry point: runs the command, prints one clear error line on failure.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemonish = matches!(cli.cmd, Cmd::Mount { .. } | Cmd::Store { .. });
    if !daemonish {
        // Output piped into `head` ends the command quietly when the reader goes, as with
        // coreutils (Rust ignores SIGPIPE, and `println!` then panics). Sockets: `send`
        // takes MSG_NOSIGNAL, but the vectored writes of the HTTP clients do not; their
        // connections are driven on the runtime's threads, which block SIGPIPE
        // (`common::block_on`).
        // SAFETY: restoring a signal's default disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // `run` shares the terminal with the command: fuser's notice that the mount it serves
    // was already unmounted (by us) is not for the user.
    let running = matches!(cli.cmd, Cmd::Run { .. });
    // The TLS verifier logs each certificate it refuses as an error; the command's own
    // error line says it better. So it does for the registry client's retries and the hosts
    // it fell back from: a command that fails prints one line (a daemon logs them all).
    let filter = std::env::var("OCIFS_LOG").unwrap_or_else(|_| match (daemonish, running) {
        (true, _) => "info,rustls_platform_verifier=off".into(),
        (false, true) => {
            "warn,fuser=error,rustls_platform_verifier=off,ocifs::registry=error".into()
        }
        (false, false) => "warn,rustls_platform_verifier=off,ocifs::registry=error".into(),
    });
    // Colours only for a terminal: a daemon's stderr is its log file.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            let line = errors::line(&e);
            common::say(&format!("ocifs: {line}"));
            ExitCode::FAILURE
        }
    }
}

/// Runs one command.
fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Mount {
            common,
            tuning,
            foreground,
            daemon_child,
            record,
            prefetch,
            speculation,
            no_supervisor,
            serve_fd,
            pin,
            restarts,
            reference,
            mountpoint,
        } => {
            let extras = common::MountExtras {
                record,
                prefetch,
                speculation,
                tuning,
            };
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            if let Some(fd) = serve_fd {
                let serving = mount::Serving { fd, pin, restarts };
                mount::mount_here(
                    &common,
                    &reference,
                    &mountpoint,
                    true,
                    extras,
                    Some(serving),
                )
            } else if (foreground || daemon_child) && root && !no_supervisor {
                mount::supervise_here(&mountpoint, daemon_child)
            } else if foreground || daemon_child {
                mount::mount_here(&common, &reference, &mountpoint, daemon_child, extras, None)
            } else {
                mount::spawn_daemon(&common, &mountpoint)
            }
        }
        Cmd::Store {
            common,
            foreground,
            daemon_child,
            speculation,
            release_after,
            lookup_timeout,
            store_dir,
        } => {
            if foreground || daemon_child {
                let extras = store::StoreExtras {
                    speculation,
                    release_after,
                    lookup_timeout,
                };
                store::store_here(&common, &store_dir, daemon_child, extras)
            } else {
                mount::spawn_daemon(&common, &store_dir)
            }
        }
        Cmd::Stats { json, mountpoint } => {
            block_on(commands::stats(&mountpoint, json))?.map(|_| ExitCode::SUCCESS)
        }
        Cmd::Umount { mountpoint } => mount::umount(&mountpoint),
        Cmd::Inspect {
            common,
            json,
            reference,
        } => block_on(commands::inspect(&common, &reference, json))?.map(|_| ExitCode::SUCCESS),
        Cmd::Ls {
            common,
            long,
            recursive,
            directory,
            json,
            reference,
            paths,
        } => {
            let o = ls::LsOptions {
                long,
                recursive,
                directory,
                json,
            };
            block_on(ls::ls(&common, &reference, &paths, &o))?.map(|_| ExitCode::SUCCESS)
        }
        Cmd::Cat {
            common,
            tuning,
            reference,
            path,
        } => {
            block_on(commands::cat(&common, &tuning, &reference, &path))?.map(|_| ExitCode::SUCCESS)
        }
        Cmd::Fetch {
            common,
            reference,
            digest,
        } => block_on(commands::fetch(&common, &reference, digest.as_deref()))?
            .map(|_| ExitCode::SUCCESS),
        Cmd::Index {
            common,
            tuning,
            push,
            reference,
        } => block_on(index::index(&common, &tuning, &reference, push))?.map(|_| ExitCode::SUCCESS),
        Cmd::Convert {
            common,
            estargz: _,
            profile,
            chunk_size,
            source,
            destination,
        } => block_on(commands::convert(
            &common,
            &source,
            &destination,
            profile,
            chunk_size.0,
        ))?
        .map(|_| ExitCode::SUCCESS),
        Cmd::Run {
            common,
            tuning,
            record,
            prefetch,
            speculation,
            json,
            reference,
            args,
        } => {
            let extras = common::MountExtras {
                record,
                prefetch,
                speculation,
                tuning,
            };
            run::run(&common, &reference, &args, extras, json)
        }
        Cmd::Manifest { common, reference } => {
            block_on(browse::manifest(&common, &reference))?.map(|_| ExitCode::SUCCESS)
        }
        Cmd::Config { common, reference } => {
            block_on(browse::config(&common, &reference))?.map(|_| ExitCode::SUCCESS)
        }
        Cmd::Digest { common, reference } => {
            block_on(browse::digest(&common, &reference))?.map(|_| ExitCode::SUCCESS)
        }
        Cmd::Export {
            common,
            output,
            reference,
        } => block_on(browse::export(&common, &reference, output.as_deref()))?
            .map(|_| ExitCode::SUCCESS),
        Cmd::Pull {
            common,
            reference,
            dir,
        } => block_on(browse::pull(&common, &reference, &dir))?.map(|_| ExitCode::SUCCESS),
        Cmd::Diff {
            common,
            content,
            json,
            reference1,
            reference2,
        } => block_on(browse::diff(
            &common,
            &reference1,
            &reference2,
            content,
            json,
        ))?
        .map(|_| ExitCode::SUCCESS),
        Cmd::Completions { shell } => {
            let mut cmd = command();
            clap_complete::generate(shell, &mut cmd, "ocifs", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man { dir } => {
            std::fs::create_dir_all(&dir)?;
            let cmd = command();
            clap_mangen::generate_to(cmd, &dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Tags {
            common,
            json,
            repository,
        } => block_on(async {
            let (source, _, _) = common.source_only(&repository).await?;
            let tags = source.tags().await?;
            match json {
                true => println!("{}", serde_json::to_string(&tags)?),
                false => tags.iter().for_each(|t| println!("{t}")),
            }
            Ok(ExitCode::SUCCESS)
        })?,
    }
}

#[cfg(test)]
mod tests {
    /// build.rs watches only paths that exist, relative to the package (as cargo reads
    /// them): a missing one (`.git/HEAD` in a git worktree, where `.git` is a file) made
    /// every cargo command run it again and rebuild ocifs.
    #[test]
    fn the_build_script_watches_paths_that_exist() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for p in env!("OCIFS_BUILD_WATCHED").lines() {
            assert!(
                root.join(p).exists(),
                "build.rs watches {p}, which is missing"
            );
        }
    }
}

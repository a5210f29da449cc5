//! Argument parsing and the commands. `mount` without `--foreground` re-executes itself as a
//! detached daemon and waits for its "ready" line, like other FUSE mounters.

//!
//! `mod.rs` parses and dispatches; `common.rs` holds what every command shares (options,
//! configuration, credentials); the commands themselves are in `commands.rs`, `mount.rs`,
//! `store.rs`, `run.rs` and `index.rs`, which use `common.rs` (and `store.rs` the daemon handshake of
//! `mount.rs`).

mod commands;
mod common;
mod index;
mod mount;
mod run;
mod store;

use anyhow::Result;
use clap::{Parser, Subcommand};
use common::{Common, block_on};
use ocifs::config::ByteSize;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ocifs",
    version,
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
        /// Do not prefetch eStargz prioritized files (those before .prefetch.landmark).
        #[arg(long)]
        no_prefetch: bool,
        /// Do not fetch a file whole in the background when it is read at scattered places
        /// (binaries and libraries faulted in page by page), nor what a program loads once
        /// its first page is read, nor a directory's files read together, nor (without a
        /// planned prefetch) the files of the image's configured command at mount.
        #[arg(long)]
        no_whole_files: bool,
        /// Fetch the image's layers of at most this many compressed bytes whole as soon as the
        /// mount is ready, smallest first and at most this much in all (not with a planned
        /// prefetch: a profile or eStargz prioritized files); 0 turns it off.
        #[arg(long, default_value = "16MiB")]
        small_layers: ByteSize,
        /// Do not copy a verified layer's files into a local file (in the cache directory,
        /// for as long as the mount lasts) to serve their reads from; without the copy, cold
        /// reads decode the layer's compressed blocks again.
        #[arg(long)]
        no_local_copy: bool,
        reference: String,
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
        /// Do not prefetch eStargz prioritized files.
        #[arg(long)]
        no_prefetch: bool,
        /// No background fetches of whole files, what programs load, directories (see
        /// `mount --no-whole-files`).
        #[arg(long)]
        no_whole_files: bool,
        /// Fetch layers of at most this many compressed bytes whole once opened; 0 turns it
        /// off.
        #[arg(long, default_value = "16MiB")]
        small_layers: ByteSize,
        /// Do not copy verified layers' files into local files to serve their reads from.
        #[arg(long)]
        no_local_copy: bool,
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
    /// Mount an image lazily and run its command (or CMD) on it in a private mount
    /// namespace, as a runtime would; stdin, stdout and the exit status pass through, and one
    /// summary line (stderr) tells the figures of the start.
    Run {
        #[command(flatten)]
        common: Common,
        /// Write the ordered list of file ranges read to FILE.
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
        /// Prefetch the ranges of a recorded profile in the background, in order.
        #[arg(long, value_name = "FILE")]
        prefetch: Option<PathBuf>,
        /// The summary as JSON.
        #[arg(long)]
        json: bool,
        /// Do not prefetch eStargz prioritized files.
        #[arg(long)]
        no_prefetch: bool,
        /// No background fetches of whole files, what programs load, directories.
        #[arg(long)]
        no_whole_files: bool,
        /// Fetch layers of at most this many compressed bytes whole at mount; 0: none.
        #[arg(long, default_value = "16MiB")]
        small_layers: ByteSize,
        /// Do not copy verified layers' files locally.
        #[arg(long)]
        no_local_copy: bool,
        reference: String,
        /// The command instead of the image's `Cmd` (its `Entrypoint` stays).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Unmount an ocifs mount or layer store.
    Umount { mountpoint: PathBuf },
    /// Show a mount's (or layer store's) statistics: bytes and requests per layer, cache,
    /// latency, prefetch.
    Stats {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        mountpoint: PathBuf,
    },
    /// Show the resolved digest, platforms, config and layers of an image.
    Inspect {
        #[command(flatten)]
        common: Common,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        reference: String,
    },
    /// List files of an image without mounting it.
    Ls {
        #[command(flatten)]
        common: Common,
        /// Long format: mode, owner, size, mtime, link target.
        #[arg(short = 'l')]
        long: bool,
        /// Recurse into directories.
        #[arg(short = 'R')]
        recursive: bool,
        reference: String,
        path: Option<String>,
    },
    /// Write one file of an image to stdout.
    Cat {
        #[command(flatten)]
        common: Common,
        reference: String,
        path: String,
    },
    /// Write a raw manifest (no digest) or blob/manifest (by digest) to stdout.
    Fetch {
        #[command(flatten)]
        common: Common,
        reference: String,
        digest: Option<String>,
    },
    /// Build (or find) the checkpoint indexes of an image's gzip layers; `--push` publishes
    /// them to the registry as an artifact referring to the image.
    Index {
        #[command(flatten)]
        common: Common,
        /// Upload the indexes next to the image (referrers API, or the sha256-<hex> tag).
        #[arg(long)]
        push: bool,
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
        /// An access profile from `ocifs mount --record`: its files go first.
        #[arg(long, value_name = "FILE")]
        profile: Option<PathBuf>,
        /// Size of independently readable chunks of large files.
        #[arg(long, default_value = "4MiB")]
        chunk_size: ByteSize,
        source: String,
        destination: String,
    },
    /// List a repository's tags.
    Tags {
        #[command(flatten)]
        common: Common,
        repository: String,
    },
}

/// Entry point: runs the command, prints one clear error line on failure.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemonish = matches!(cli.cmd, Cmd::Mount { .. } | Cmd::Store { .. });
    if !daemonish {
        // Output piped into `head` ends the command quietly when the reader goes, as with
        // coreutils (Rust ignores SIGPIPE, and `println!` then panics). Sockets are not
        // affected: the standard library sends with MSG_NOSIGNAL.
        // SAFETY: restoring a signal's default disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // `run` shares the terminal with the command: fuser's notice that the mount it serves
    // was already unmounted (by us) is not for the user.
    let running = matches!(cli.cmd, Cmd::Run { .. });
    let filter = std::env::var("OCIFS_LOG").unwrap_or_else(|_| match (daemonish, running) {
        (true, _) => "info".into(),
        (false, true) => "warn,fuser=error".into(),
        (false, false) => "warn".into(),
    });
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ocifs: {}", common::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Runs one command.
fn run(cmd: Cmd) -> Result<ExitCode> {
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
                let extras = mount::MountExtras {
                    record,
                    prefetch,
                    no_prefetch,
                    no_whole_files,
                    small_layers: small_layers.0,
                    no_local_copy,
                };
                mount::mount_here(&common, &reference, &mountpoint, daemon_child, extras)
            } else {
                mount::spawn_daemon(&common, &mountpoint)
            }
        }
        Cmd::Store {
            common,
            foreground,
            daemon_child,
            no_prefetch,
            no_whole_files,
            small_layers,
            no_local_copy,
            release_after,
            lookup_timeout,
            store_dir,
        } => {
            if foreground || daemon_child {
                let extras = store::StoreExtras {
                    no_prefetch,
                    no_whole_files,
                    small_layers: small_layers.0,
                    no_local_copy,
                    release_after,
                    lookup_timeout,
                };
                store::store_here(&common, &store_dir, daemon_child, extras)
            } else {
                mount::spawn_daemon(&common, &store_dir)
            }
        }
        Cmd::Run {
            common,
            record,
            prefetch,
            json,
            no_prefetch,
            no_whole_files,
            small_layers,
            no_local_copy,
            reference,
            command,
        } => {
            let extras = run::RunExtras {
                record,
                prefetch,
                json,
                no_prefetch,
                no_whole_files,
                small_layers: small_layers.0,
                no_local_copy,
            };
            run::run(&common, &reference, &command, extras)
        }
        Cmd::Stats { json, mountpoint } => {
            block_on(commands::stats(&mountpoint, json))?.map(|_| ExitCode::SUCCESS)
        }
        Cmd::Umount { mountpoint } => {
            ocifs::daemon::unmount(&mountpoint)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect {
            common,
            json,
            reference,
        } => block_on(commands::inspect(&common, &reference, json))?.map(|_| ExitCode::SUCCESS),
        Cmd::Ls {
            common,
            long,
            recursive,
            reference,
            path,
        } => block_on(commands::ls(&common, &reference, path, long, recursive))?
            .map(|_| ExitCode::SUCCESS),
        Cmd::Cat {
            common,
            reference,
            path,
        } => block_on(commands::cat(&common, &reference, &path))?.map(|_| ExitCode::SUCCESS),
        Cmd::Fetch {
            common,
            reference,
            digest,
        } => block_on(commands::fetch(&common, &reference, digest.as_deref()))?
            .map(|_| ExitCode::SUCCESS),
        Cmd::Index {
            common,
            push,
            reference,
        } => block_on(index::index(&common, &reference, push))?.map(|_| ExitCode::SUCCESS),
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
        Cmd::Tags { common, repository } => block_on(async {
            let (source, _, _) = common.source(&repository)?;
            for t in source.tags().await? {
                println!("{t}");
            }
            Ok(ExitCode::SUCCESS)
        })?,
    }
}

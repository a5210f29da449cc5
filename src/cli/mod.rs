//! Argument parsing and the commands. `mount` without `--foreground` re-executes itself as a
//! detached daemon and waits for its "ready" line, like other FUSE mounters.

//!
//! `mod.rs` parses and dispatches; `common.rs` holds what every command shares (options,
//! configuration, the registry), `access.rs` how to reach a registry (credentials, TLS
//! files), `errors.rs` the one line a failure prints; the commands themselves are in
//! `commands.rs`, `mount.rs` and `index.rs`.

mod access;
mod browse;
mod commands;
mod common;
mod errors;
mod export;
mod index;
mod mount;
mod pull;

use anyhow::Result;
use clap::{Parser, Subcommand};
use common::{Common, block_on};
use ocifs::config::ByteSize;
use std::path::PathBuf;
use std::process::ExitCode;

/// What `--version` prints: the version, and the formats and features compiled in.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\nlayer formats: eStargz, legacy stargz, zstd:chunked, gzip (checkpoint indexes: ours, SOCI v1/v2 zTOCs), zstd (one or several frames), tar",
    "\nregistry: https (rustls; certs.d, client certificates), plain HTTP for localhost or --insecure, Basic and Bearer auth, credential helpers",
    "\nconvert to: eStargz"
);

#[derive(Parser)]
#[command(
    name = "ocifs",
    version,
    long_version = LONG_VERSION,
    about = "Container images from a registry as a lazily loaded read-only file system"
)]
struct Cli {
    /// No progress lines (errors and results are still printed).
    #[arg(short, long, global = true)]
    quiet: bool,
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
        /// The image: [docker://]HOST[:PORT]/NAME[:TAG|@DIGEST], or oci:DIR[:TAG].
        reference: String,
        /// An empty directory to mount on (or the mount, for stats).
        mountpoint: PathBuf,
    },
    /// Unmount an ocifs mount (nothing else), once its daemon has finished (written its
    /// `--record` profile).
    Umount {
        /// The mountpoint of an ocifs mount.
        mountpoint: PathBuf,
    },
    /// Show a mount's statistics: bytes and requests per layer, cache, latency, prefetch.
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
    /// List files of an image without mounting it, with absolute paths.
    #[command(
        after_help = "Examples:\n  ocifs ls -l alpine /etc\n  ocifs ls -R --json oci:./layout:v1 /usr/lib"
    )]
    Ls {
        #[command(flatten)]
        common: Common,
        /// Long format, as `tar -tv`: mode, uid/gid, size, date (UTC), path, `-> target`.
        #[arg(short = 'l')]
        long: bool,
        /// Recurse into directories.
        #[arg(short = 'R')]
        recursive: bool,
        /// List a directory itself, not its entries.
        #[arg(short = 'd')]
        directory: bool,
        /// One JSON array: path, type, mode, uid, gid, size, mtime, target, device, links.
        #[arg(long)]
        json: bool,
        /// The image.
        reference: String,
        /// Paths in the image (default: /); symlinks are listed, not followed.
        paths: Vec<String>,
    },
    /// Write the image's merged tree as one tar stream (like `crane export`).
    #[command(
        after_help = "Examples:\n  ocifs export alpine | tar -tvf -\n  ocifs export -o rootfs.tar oci:./layout:v1"
    )]
    Export {
        #[command(flatten)]
        common: Common,
        /// Write to FILE instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The image: [docker://]HOST[:PORT]/NAME[:TAG|@DIGEST], or oci:DIR[:TAG].
        reference: String,
    },
    /// Write the image's merged tree into DIR as files, every layer checked against its
    /// digest first (layers fetched whole, all at once; their blocks kept in the cache
    /// directory for later pulls and mounts).
    #[command(after_help = "Example:\n  ocifs pull alpine ./rootfs")]
    Pull {
        #[command(flatten)]
        common: Common,
        /// The image: [docker://]HOST[:PORT]/NAME[:TAG|@DIGEST], or oci:DIR[:TAG].
        reference: String,
        /// A new or empty directory.
        dir: PathBuf,
    },
    /// Show the paths added (A), removed (D) and changed (M: type, mode, owner, size,
    /// target, device, xattrs, content) from one image to another.
    Diff {
        #[command(flatten)]
        common: Common,
        /// One JSON array: path, change (added, removed, changed), what.
        #[arg(long)]
        json: bool,
        /// The image before.
        reference: String,
        /// The image after.
        other: String,
    },
    /// Write the manifest REF names to stdout, byte for byte (like `crane manifest`).
    Manifest {
        #[command(flatten)]
        common: Common,
        /// The image: [docker://]HOST[:PORT]/NAME[:TAG|@DIGEST], or oci:DIR[:TAG].
        reference: String,
    },
    /// Write the image config of REF (for --platform) to stdout, byte for byte.
    Config {
        #[command(flatten)]
        common: Common,
        /// The image: [docker://]HOST[:PORT]/NAME[:TAG|@DIGEST], or oci:DIR[:TAG].
        reference: String,
    },
    /// Print the digest of the manifest REF names (an index's, for a multi-platform image).
    Digest {
        #[command(flatten)]
        common: Common,
        /// The image: [docker://]HOST[:PORT]/NAME[:TAG|@DIGEST], or oci:DIR[:TAG].
        reference: String,
    },
    /// Write one file of an image to stdout.
    Cat {
        #[command(flatten)]
        common: Common,
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
        /// An access profile from `ocifs mount --record`: its files go first.
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
    /// Print a shell completion script (e.g. `ocifs completions bash > /etc/bash_completion.d/ocifs`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page, in roff (e.g. `ocifs man | man -l -`).
    Man,
    /// List a repository's tags.
    Tags {
        #[command(flatten)]
        common: Common,
        /// One JSON array of tags.
        #[arg(long)]
        json: bool,
        /// The repository: [docker://]HOST[:PORT]/NAME.
        repository: String,
    },
}

/// The mount tuning flags every image-reading command accepts (one `Common` type), shown in
/// the help of the commands they matter to: `mount` all of them, `index` the span.
const TUNING: &[&str] = &[
    "cache_size",
    "verify",
    "span",
    "block_size",
    "fetch_size",
    "disk_cache_size",
    "no_mark_windows",
];

/// The command line's definition, with each subcommand's help showing only its own flags
/// (the tuning flags stay accepted everywhere, as before).
fn command() -> clap::Command {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    for name in names {
        cmd = cmd.mut_subcommand(&name, |mut sub| {
            for arg in TUNING {
                let shown = name == "mount" || (name == "index" && *arg == "span");
                if !shown && sub.get_arguments().any(|a| a.get_id() == *arg) {
                    sub = sub.mut_arg(*arg, |a| a.hide(true));
                }
            }
            sub
        });
    }
    cmd
}

/// Entry point: runs the command, prints one clear error line on failure.
pub fn main() -> ExitCode {
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    common::QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    let daemonish = matches!(cli.cmd, Cmd::Mount { .. });
    if !daemonish {
        // Output piped into `head` ends the command quietly when the reader goes, as with
        // coreutils (Rust ignores SIGPIPE, and `println!` then panics). Sockets are not
        // affected: the standard library sends with MSG_NOSIGNAL.
        // SAFETY: restoring a signal's default disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // The TLS verifier logs each certificate it refuses as an error; the command's own
    // error line says it better.
    let filter = std::env::var("OCIFS_LOG").unwrap_or_else(|_| {
        if daemonish {
            "info,rustls_platform_verifier=off".into()
        } else {
            "warn,rustls_platform_verifier=off".into()
        }
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
            let line = block_on(errors::explain(&e)).unwrap_or_else(|_| errors::line(&e));
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
            let o = browse::LsOptions {
                long,
                recursive,
                directory,
                json,
            };
            block_on(browse::ls(&common, &reference, &paths, o))?.map(|_| ExitCode::SUCCESS)
        }
        Cmd::Export {
            common,
            output,
            reference,
        } => block_on(export::export(&common, &reference, output))?.map(|_| ExitCode::SUCCESS),
        Cmd::Pull {
            common,
            reference,
            dir,
        } => block_on(pull::pull(&common, &reference, &dir))?.map(|_| ExitCode::SUCCESS),
        Cmd::Diff {
            common,
            json,
            reference,
            other,
        } => block_on(export::diff(&common, &reference, &other, json))?.map(|_| ExitCode::SUCCESS),
        Cmd::Manifest { common, reference } => {
            block_on(browse::manifest(&common, &reference))?.map(|_| ExitCode::SUCCESS)
        }
        Cmd::Config { common, reference } => {
            block_on(browse::config(&common, &reference))?.map(|_| ExitCode::SUCCESS)
        }
        Cmd::Digest { common, reference } => {
            block_on(browse::digest(&common, &reference))?.map(|_| ExitCode::SUCCESS)
        }
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
        Cmd::Completions { shell } => {
            let mut cmd = command();
            clap_complete::generate(shell, &mut cmd, "ocifs", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man => {
            let cmd = command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Tags {
            common,
            json,
            repository,
        } => block_on(async {
            let (source, _, _) = common.source(&repository).await?;
            let tags = source.tags().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tags)?);
            } else {
                for t in tags {
                    println!("{t}");
                }
            }
            Ok(ExitCode::SUCCESS)
        })?,
    }
}

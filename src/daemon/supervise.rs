//! A supervised mount: this process (the mount daemon, root) owns the kernel's FUSE
//! connection and mounts it itself; the image is served by a child process, and when that
//! process dies (a crash, `kill -9`, or an upgrade: replace the binary and stop the child),
//! another one takes its place while the connection stays up. Readers see a pause, not an
//! error.
//!
//! The serving process is `ocifs mount` itself, started by the command the caller builds
//! from a [`ServerStart`]: it gets one end of a socket pair (see [`super::relay`]) instead
//! of `/dev/fuse`, and tells the supervisor how it is doing with [`Announcement`] lines on
//! its stdout: `OPENED` once the image is open (then the supervisor mounts, the first time,
//! and hands over the connection), `OK` once it serves, `ERR` when it could not. A
//! successor opens the image pinned to the digest the first one resolved, so a moved tag
//! cannot change the tree under the kernel, which keeps inode numbers across the switch; its
//! tree must hash to the first one's ([`crate::tree::Tree::fingerprint`]) or it is never
//! handed the connection. Restarts are bounded ([`RestartPolicy`]): past the bound, every
//! waiting request fails with `EIO` and the file system is unmounted, so a crash loop never
//! holds readers forever.

use super::relay::{self, Installed, Relay};
use super::{SESSION_THREADS, check_mountpoint, unmount};
use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// The largest read the kernel sends a supervised server (its `max_pages`). A reply crosses
/// the socket pair as one message, and the kernel keeps most of a large message in one
/// physically contiguous allocation: 1 MiB replies would need 1 MiB of contiguous memory
/// each, which a fragmented machine may refuse (the reply is then lost and its reader
/// waits for good). 128 KiB is the kernel's own default.
pub const MAX_REQUEST: u32 = 128 << 10;

/// How long a stopping serving process may take to write its profile and prune the cache.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// How long the kernel connection may take to end after an unmount (open files keep it).
const UNMOUNT_WAIT: Duration = Duration::from_secs(5);

/// How many times the serving process may end within a window before the supervisor gives
/// up.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub max: u32,
    pub window: Duration,
}

impl Default for RestartPolicy {
    /// Five restarts a minute: enough for a crash now and then or an upgrade, and a crash
    /// loop fails the readers within seconds.
    fn default() -> Self {
        RestartPolicy {
            max: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// What the caller needs to build the command of one serving process.
#[derive(Debug, Clone, Copy)]
pub struct ServerStart<'a> {
    /// The descriptor number of the process's end of the channel (inherited).
    pub channel_fd: i32,
    /// The image digest a successor must open (none for the first process).
    pub pin: Option<&'a str>,
    /// How many processes served this mount before this one.
    pub restarts: u32,
}

/// A line a serving process writes on its stdout for the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// The image is open: its digest to pin successors to (the index's, else the
    /// manifest's), its tree's fingerprint, and the name to mount it under.
    Opened {
        pin: String,
        tree: String,
        fsname: String,
    },
    /// Serving; the text is the mount's ready line.
    Ready(String),
    /// Could not start; the text says why.
    Failed(String),
}

impl Announcement {
    /// The line, without its newline.
    pub fn line(&self) -> String {
        match self {
            Announcement::Opened { pin, tree, fsname } => format!("OPENED {pin} {tree} {fsname}"),
            Announcement::Ready(text) => format!("OK {text}"),
            Announcement::Failed(text) => format!("ERR {text}"),
        }
    }

    /// Reads a line written by [`Announcement::line`]; `None` for anything else.
    pub fn parse(line: &str) -> Option<Announcement> {
        let (word, rest) = line.trim_end().split_once(' ')?;
        match word {
            "OPENED" => {
                let mut parts = rest.splitn(3, ' ');
                let (pin, tree, fsname) = (parts.next()?, parts.next()?, parts.next()?);
                (crate::digest::validate_digest(pin).is_ok() && !fsname.is_empty()).then(|| {
                    Announcement::Opened {
                        pin: pin.into(),
                        tree: tree.into(),
                        fsname: fsname.into(),
                    }
                })
            }
            "OK" => Some(Announcement::Ready(rest.into())),
            "ERR" => Some(Announcement::Failed(rest.into())),
            _ => None,
        }
    }
}

/// The descriptor a supervisor handed this process (`ServerStart::channel_fd`), checked to be
/// a socket and made close-on-exec so that helpers this process runs do not inherit it.
pub fn inherited_channel(fd: i32) -> Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: fstat writes into a zeroed struct of the right type; an invalid fd only fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if fd < 3 || unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(failed(format!("descriptor {fd} is not open")));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(failed(format!("descriptor {fd} is not a socket")));
    }
    // SAFETY: the supervisor passed this descriptor for us alone; nothing else here owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD on a descriptor we own.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    Ok(owned)
}

/// Supervises a mount at `mountpoint`: starts the serving process with the command
/// `command` builds, mounts once it has opened the image, calls `ready` with its ready line,
/// restarts it whenever it ends, and returns when the file system is unmounted (or
/// `shutdown` resolves: then it unmounts it), after stopping the serving process. Fails if
/// the first process cannot serve, or when restarts exceed `policy`.
pub async fn supervise<F>(
    mountpoint: &Path,
    policy: RestartPolicy,
    command: F,
    ready: impl FnOnce(&str),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()>
where
    F: Fn(&ServerStart) -> std::process::Command,
{
    check_mountpoint(mountpoint)?;
    tokio::pin!(shutdown);
    // Until the file system is mounted and handed over, a signal abandons it: the serving
    // process is killed (its handle dropped) and the file system, if mounted, unmounted (the
    // guard dropped).
    let started = async {
        let mut server = Server::spawn(&command, None, 0)?;
        let (pin, tree, fsname) = match server.next().await? {
            Announcement::Opened { pin, tree, fsname } => (pin, tree, fsname),
            other => return Err(unexpected(other)),
        };
        let dev = mount_fuse(mountpoint, &fsname)?;
        let mounted = Unmounter(Some(mountpoint));
        let (dev, init) = read_init(dev).await?;
        let relay = Relay::start(dev, init)?;
        server.install(&relay)?;
        Ok::<_, Error>((server, relay, pin, tree, mounted))
    };
    let (mut server, relay, pin, tree, mut mounted) = tokio::select! {
        started = started => started?,
        _ = &mut shutdown => return Err(failed("interrupted before the mount was ready".into())),
    };
    // Handed over, the mount may already serve: a signal from now on is a normal stop.
    let line = match server.next().await? {
        Announcement::Ready(line) => line,
        other => return Err(unexpected(other)),
    };
    mounted.0 = None;
    ready(&line);
    server.log_the_rest();
    tracing::info!(
        "serving process {} serves {}",
        server.pid,
        mountpoint.display()
    );
    let supervisor = Supervisor {
        relay,
        mountpoint: mountpoint.to_path_buf(),
        policy,
        command,
        pin,
        tree,
        ends: VecDeque::new(),
        restarts: 0,
    };
    supervisor.run(server, shutdown).await
}

/// Unmounts its path when dropped, unless disarmed (`None`).
struct Unmounter<'a>(Option<&'a Path>);

impl Drop for Unmounter<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = unmount(path);
        }
    }
}

struct Supervisor<F> {
    relay: Relay,
    mountpoint: PathBuf,
    policy: RestartPolicy,
    command: F,
    pin: String,
    tree: String,
    /// When serving processes ended, within the policy's window.
    ends: VecDeque<Instant>,
    restarts: u32,
}

enum Event {
    Exited(String),
    Started(Box<std::result::Result<Server, StartError>>),
    Unmounted,
    Shutdown,
}

/// Why a successor did not take over: worth another try, or never (a different tree).
enum StartError {
    Retry(Error),
    Fatal(Error),
}

impl From<Error> for StartError {
    fn from(e: Error) -> Self {
        StartError::Retry(e)
    }
}

impl<F> Supervisor<F>
where
    F: Fn(&ServerStart) -> std::process::Command,
{
    async fn run(
        mut self,
        server: Server,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        tokio::pin!(shutdown);
        let mut ended = self.relay.ended();
        let mut server = Some(server);
        loop {
            let event = match server.as_mut() {
                Some(s) => tokio::select! {
                    status = s.child.wait() => Event::Exited(match status {
                        Ok(st) => st.to_string(),
                        Err(e) => e.to_string(),
                    }),
                    _ = ended.wait_for(|e| *e) => Event::Unmounted,
                    _ = &mut shutdown => Event::Shutdown,
                },
                None => tokio::select! {
                    started = self.start_again() => Event::Started(Box::new(started)),
                    _ = ended.wait_for(|e| *e) => Event::Unmounted,
                    _ = &mut shutdown => Event::Shutdown,
                },
            };
            match event {
                Event::Exited(status) => {
                    let gone = server.take().expect("a server ended");
                    tracing::warn!(
                        "serving process {} ended ({status}) with {} requests waiting; \
                         starting another",
                        gone.pid,
                        self.relay.waiting()
                    );
                    self.forget(gone).await;
                    self.count_end()?;
                }
                Event::Started(started) => match *started {
                    Ok(s) => server = Some(s),
                    Err(StartError::Fatal(e)) => return Err(self.give_up(e)),
                    Err(StartError::Retry(e)) => {
                        tracing::warn!("starting the serving process again failed: {e}");
                        self.count_end()?;
                    }
                },
                Event::Unmounted => {
                    tracing::info!("{} was unmounted", self.mountpoint.display());
                    self.stop(server).await;
                    return Ok(());
                }
                Event::Shutdown => {
                    tracing::info!("unmounting {}", self.mountpoint.display());
                    let unmounted = unmount(&self.mountpoint);
                    let _ = tokio::time::timeout(UNMOUNT_WAIT, ended.wait_for(|e| *e)).await;
                    self.stop(server).await;
                    return unmounted;
                }
            }
        }
    }

    /// Starts a successor (after a pause that grows with recent restarts), checks its tree
    /// and hands it the connection.
    async fn start_again(&mut self) -> std::result::Result<Server, StartError> {
        let recent = self.ends.len() as u32;
        if recent > 1 {
            let pause = Duration::from_millis(100) * 2u32.pow((recent - 2).min(4));
            tokio::time::sleep(pause).await;
        }
        let mut server = Server::spawn(&self.command, Some(&self.pin), self.restarts + 1)?;
        match server.next().await? {
            Announcement::Opened { tree, .. } if tree == self.tree => {}
            Announcement::Opened { tree, .. } => {
                return Err(StartError::Fatal(failed(format!(
                    "the new serving process built a different tree ({tree}, not {}): \
                     it would answer for the wrong files",
                    self.tree
                ))));
            }
            other => return Err(StartError::Retry(unexpected(other))),
        }
        let replayed = server.install(&self.relay)?;
        self.restarts += 1;
        tracing::info!(
            "serving process {} took over (restart {}); {replayed} requests sent again",
            server.pid,
            self.restarts
        );
        server.log_the_rest();
        Ok(server)
    }

    /// Lets go of a process that ended, once its last replies have been passed on.
    async fn forget(&self, mut gone: Server) {
        self.relay.detach();
        if let Some(installed) = gone.installed.as_mut() {
            // A helper it started may still hold its end open: stop reading then.
            if tokio::time::timeout(UNMOUNT_WAIT, &mut installed.drained)
                .await
                .is_err()
            {
                installed.stop_reading();
                let _ = (&mut installed.drained).await;
            }
        }
    }

    /// Counts one more end of a serving process; past the policy, gives up.
    fn count_end(&mut self) -> Result<()> {
        let now = Instant::now();
        self.ends.push_back(now);
        while self
            .ends
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.window)
        {
            self.ends.pop_front();
        }
        if self.ends.len() as u32 > self.policy.max {
            return Err(self.give_up(failed(format!(
                "the serving process ended {} times in {} s",
                self.ends.len(),
                self.policy.window.as_secs()
            ))));
        }
        Ok(())
    }

    /// Fails every waiting request with `EIO` and unmounts.
    fn give_up(&self, why: Error) -> Error {
        let failed_requests = self.relay.fail_pending(libc::EIO);
        let unmounted = match unmount(&self.mountpoint) {
            Ok(()) => "unmounted".to_string(),
            Err(e) => format!("could not be unmounted ({e})"),
        };
        tracing::error!(
            "giving up on {}: {why}; {failed_requests} waiting requests failed with EIO, and \
             the file system was {unmounted}",
            self.mountpoint.display()
        );
        failed(format!(
            "{why}; gave up: {failed_requests} waiting requests failed with EIO and {} was \
             {unmounted}",
            self.mountpoint.display()
        ))
    }

    /// Ends the serving process's session and waits for it to finish (it writes the
    /// profile and prunes the cache directory), killing it if it takes too long.
    async fn stop(&self, server: Option<Server>) {
        self.relay.stop_server(SESSION_THREADS);
        let Some(mut s) = server else { return };
        if tokio::time::timeout(STOP_WAIT, s.child.wait())
            .await
            .is_err()
        {
            tracing::warn!("serving process {} did not stop; killing it", s.pid);
            let _ = s.child.kill().await;
        }
    }
}

/// One serving process: the child, its announcements, its channel.
struct Server {
    child: Child,
    pid: u32,
    lines: Option<Lines<BufReader<ChildStdout>>>,
    /// The relay's end of the channel, until installed.
    channel: Option<OwnedFd>,
    installed: Option<Installed>,
}

impl Server {
    /// Starts the command `command` builds, in a process group of its own (a terminal's
    /// Ctrl-C is for the supervisor), with its end of a new channel, stdout piped and
    /// stderr shared.
    fn spawn<F>(command: &F, pin: Option<&str>, restarts: u32) -> Result<Server>
    where
        F: Fn(&ServerStart) -> std::process::Command,
    {
        use std::os::unix::process::CommandExt;
        let (ours, theirs) = relay::channel()?;
        let fd = theirs.as_raw_fd();
        let mut cmd = command(&ServerStart {
            channel_fd: fd,
            pin,
            restarts,
        });
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .process_group(0);
        // SAFETY: runs in the child between fork and exec; fcntl is async-signal-safe and
        // only keeps the child's copy of its end open across exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let mut child = cmd.spawn()?;
        drop(theirs);
        let pid = child.id().unwrap_or_default();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| failed("no stdout from the serving process".into()))?;
        Ok(Server {
            child,
            pid,
            lines: Some(BufReader::new(stdout).lines()),
            channel: Some(ours),
            installed: None,
        })
    }

    /// The next announcement; an error if the process ends first.
    async fn next(&mut self) -> Result<Announcement> {
        let lines = self
            .lines
            .as_mut()
            .expect("announcements are read before logged");
        while let Some(line) = lines.next_line().await? {
            match Announcement::parse(&line) {
                Some(Announcement::Failed(why)) => return Err(failed(why)),
                Some(a) => return Ok(a),
                None => tracing::info!("serving process {}: {line}", self.pid),
            }
        }
        let status = self.child.wait().await?;
        Err(failed(format!(
            "the serving process exited ({status}) before it was ready"
        )))
    }

    /// Hands this process the connection; returns how many requests it was sent again.
    fn install(&mut self, relay: &Relay) -> Result<usize> {
        let channel = self.channel.take().expect("a channel is installed once");
        let installed = relay.install(channel)?;
        let replayed = installed.replayed;
        self.installed = Some(installed);
        Ok(replayed)
    }

    /// Logs whatever else the process writes on its stdout.
    fn log_the_rest(&mut self) {
        if let Some(mut lines) = self.lines.take() {
            let pid = self.pid;
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!("serving process {pid}: {line}");
                }
            });
        }
    }
}

/// Opens `/dev/fuse` and mounts it read-only at `mountpoint` as `fsname`, as fuser does for
/// root (`allow_other`, `default_permissions`, nosuid, nodev), with the subtype `ocifs`.
fn mount_fuse(mountpoint: &Path, fsname: &str) -> Result<OwnedFd> {
    use nix::mount::MsFlags;
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| failed(format!("/dev/fuse: {e}")))?;
    let mode = std::fs::metadata(mountpoint)?.mode();
    // SAFETY: getuid and getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let data = format!(
        "fd={},rootmode={mode:o},user_id={uid},group_id={gid},default_permissions,allow_other",
        dev.as_raw_fd()
    );
    nix::mount::mount(
        Some(fsname),
        mountpoint,
        Some("fuse.ocifs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| failed(format!("mount {}: {e}", mountpoint.display())))?;
    Ok(OwnedFd::from(dev))
}

/// Reads the kernel's first request on a new connection (its `INIT`).
async fn read_init(dev: OwnedFd) -> Result<(OwnedFd, Vec<u8>)> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; (16 << 20) + 8192];
        loop {
            match nix::unistd::read(&dev, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok((dev, buf));
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(e) => return Err(Error::Io(e.into())),
            }
        }
    })
    .await
    .map_err(|e| failed(format!("reading INIT: {e}")))?
}

fn unexpected(a: Announcement) -> Error {
    failed(format!(
        "the serving process said {:?} out of turn",
        a.line()
    ))
}

fn failed(why: String) -> Error {
    Error::Io(std::io::Error::other(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_round_trip_and_anything_else_is_ignored() {
        let digest = format!("sha256:{}", "a".repeat(64));
        for a in [
            Announcement::Opened {
                pin: digest.clone(),
                tree: "sha256:tree".into(),
                fsname: "ocifs:localhost/x y:1".into(),
            },
            Announcement::Ready("mounted x at /m".into()),
            Announcement::Failed("no such image".into()),
        ] {
            assert_eq!(Announcement::parse(&a.line()), Some(a.clone()));
        }
        for stray in [
            "",
            "OK",
            "hello world",
            "OPENED sha256:short t ocifs:x",
            &format!("OPENED {digest} tree"),
        ] {
            assert_eq!(Announcement::parse(stray), None, "{stray:?}");
        }
    }

    #[test]
    fn only_an_open_socket_is_taken_as_the_channel() {
        assert!(inherited_channel(1_000_000).is_err());
        assert!(inherited_channel(1).is_err());
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = file.as_raw_fd();
        assert!(inherited_channel(fd).is_err());
        let (a, _b) = relay::channel().unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(a);
        let owned = inherited_channel(raw).unwrap();
        // SAFETY: F_GETFD on a descriptor we own.
        let flags = unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }
}

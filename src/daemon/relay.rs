//! The relay at the heart of a supervised mount: the supervisor holds the kernel's FUSE
//! connection and passes whole FUSE messages between it and the serving process, which reads
//! and answers them over a `SOCK_SEQPACKET` socket pair as if it were `/dev/fuse` (each read
//! one whole request, each write one whole reply).
//!
//! Every request the kernel waits on is kept, by `unique`, until its reply has gone back, so
//! that when the serving process dies the next one is handed what the kernel still waits for:
//! first the kernel's original `INIT` (which the kernel sends once per connection, and which
//! fuser insists on reading first — its answer is dropped after the first one), then every
//! unanswered request. A reply is passed to the kernel only if its request is still waiting,
//! which drops the answers to replayed `INIT`s and to the `DESTROY`s that end a session, and
//! answers a request at most once. Two threads: one reads the kernel (and is the only one
//! recording requests), one per serving process reads its replies.

use super::wire::{self, InHeader, OutHeader};
use crate::error::{Error, Result};
use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The largest FUSE message: a 16 MiB write plus headers (the kernel refuses a smaller read
/// buffer for some settings). Allocated zeroed, so untouched pages cost nothing.
const MESSAGE_BUFFER: usize = (16 << 20) + 8192;
/// Send buffer of each end of a server channel: a reply must fit in one message.
const CHANNEL_SNDBUF: usize = 4 << 20;
/// `unique` values of the `DESTROY` requests the relay makes up: far above any the kernel uses.
const OWN_UNIQUE: u64 = u64::MAX - 1024;

/// A connected `SOCK_SEQPACKET` pair for a serving process: the relay's end and the server's,
/// both close-on-exec (the spawner clears the flag on the server's end in the child), each
/// with a send buffer that holds the largest reply.
pub fn channel() -> Result<(OwnedFd, OwnedFd)> {
    use socket::{AddressFamily, SockFlag, SockType, setsockopt, sockopt};
    let (a, b) = socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io)?;
    for end in [&a, &b] {
        // Above net.core.wmem_max only with CAP_NET_ADMIN (root, which a supervisor is).
        if setsockopt(end, sockopt::SndBufForce, &CHANNEL_SNDBUF).is_err() {
            setsockopt(end, sockopt::SndBuf, &CHANNEL_SNDBUF).map_err(io)?;
        }
    }
    Ok((a, b))
}

/// The relay between one kernel FUSE connection and its successive serving processes.
pub struct Relay {
    shared: Arc<Shared>,
}

struct Shared {
    /// `/dev/fuse` (any message-preserving descriptor in the tests).
    kernel: OwnedFd,
    /// The kernel's `INIT` request, as it came.
    init: Vec<u8>,
    init_unique: u64,
    /// The first server's answer to `INIT` (without its `unique`), to notice a successor
    /// that would have negotiated differently.
    init_reply: Mutex<Option<Vec<u8>>>,
    /// The serving process's end of the channel; `None` while there is none.
    /// Lock order: `server`, then `pending`.
    server: Mutex<Option<Arc<OwnedFd>>>,
    /// Requests the kernel waits on, by `unique`: the whole message, to send again.
    pending: Mutex<HashMap<u64, Vec<u8>>>,
    /// Set once the relay stops serving: new requests are answered with `EIO` at once.
    failing: AtomicBool,
    /// Becomes `true` when the kernel connection ends (unmounted, or aborted).
    ended: tokio::sync::watch::Sender<bool>,
}

/// A serving process's channel, installed in the relay.
pub struct Installed {
    /// Requests sent again: those the kernel was still waiting on.
    pub replayed: usize,
    /// Resolves once every reply the process wrote has been passed on (its end closed).
    pub drained: tokio::sync::oneshot::Receiver<()>,
    channel: Arc<OwnedFd>,
}

impl Installed {
    /// Stops reading this process's replies (its end stays open while another process
    /// holds it); replies already queued are still passed on.
    pub fn stop_reading(&self) {
        let _ = socket::shutdown(self.channel.as_raw_fd(), socket::Shutdown::Read);
    }
}

impl Relay {
    /// Starts relaying the connection `kernel`, whose first request `init` (already read)
    /// must be `INIT`; requests are recorded from now on and go to the channel installed next.
    pub fn start(kernel: OwnedFd, init: Vec<u8>) -> Result<Relay> {
        let h = InHeader::parse(&init)?;
        if h.opcode != wire::FUSE_INIT {
            return Err(Error::format(
                "FUSE connection",
                format!("the first request is opcode {}, not INIT", h.opcode),
            ));
        }
        let shared = Arc::new(Shared {
            kernel,
            init: init.clone(),
            init_unique: h.unique,
            init_reply: Mutex::new(None),
            server: Mutex::new(None),
            pending: Mutex::new(HashMap::from([(h.unique, init)])),
            failing: AtomicBool::new(false),
            ended: tokio::sync::watch::channel(false).0,
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("ocifs-relay-kernel".into())
            .spawn(move || s.read_kernel())?;
        Ok(Relay { shared })
    }

    /// Hands the connection to a serving process through `channel` (the relay's end): sends
    /// it the kernel's `INIT`, then every request still waiting, and passes its replies on.
    pub fn install(&self, channel: OwnedFd) -> Result<Installed> {
        let channel = Arc::new(channel);
        let s = &self.shared;
        // `INIT` goes first (fuser reads nothing else first); the kernel thread sends to the
        // new channel only once it is installed, and records what it sends under this lock,
        // so the snapshot holds exactly the requests the new process has not been sent.
        let replay: Vec<Vec<u8>> = {
            let mut server = s.server.lock().unwrap();
            send(&channel, &s.init)?;
            *server = Some(channel.clone());
            let pending = s.pending.lock().unwrap();
            pending
                .iter()
                .filter(|(u, _)| **u != s.init_unique)
                .map(|(_, m)| m.clone())
                .collect()
        };
        let (tx, drained) = tokio::sync::oneshot::channel();
        let (s2, c2) = (s.clone(), channel.clone());
        std::thread::Builder::new()
            .name("ocifs-relay-server".into())
            .spawn(move || {
                s2.read_server(&c2);
                let _ = tx.send(());
            })?;
        for m in &replay {
            // A failure means this process is gone too: the requests wait for the next.
            if let Err(e) = send(&channel, m) {
                tracing::warn!("replaying a request to the serving process: {e}");
                break;
            }
        }
        Ok(Installed {
            replayed: replay.len(),
            drained,
            channel,
        })
    }

    /// Forgets the current serving process: requests wait (recorded) for the next one.
    pub fn detach(&self) {
        *self.shared.server.lock().unwrap() = None;
    }

    /// Ends the current serving process's session cleanly: one `DESTROY` per session thread
    /// (each thread answers one and stops), then end-of-file on its channel.
    pub fn stop_server(&self, threads: usize) {
        let Some(channel) = self.shared.server.lock().unwrap().take() else {
            return;
        };
        for i in 0..threads {
            let _ = send(&channel, &wire::destroy_request(OWN_UNIQUE + i as u64));
        }
        let _ = socket::shutdown(channel.as_raw_fd(), socket::Shutdown::Write);
    }

    /// Stops serving: every waiting request, and every later one, is answered with `errno`.
    pub fn fail_pending(&self, errno: i32) -> usize {
        let s = &self.shared;
        {
            let mut server = s.server.lock().unwrap();
            s.failing.store(true, Ordering::SeqCst);
            *server = None;
        }
        let waiting: Vec<u64> = s.pending.lock().unwrap().drain().map(|(u, _)| u).collect();
        for u in &waiting {
            s.to_kernel(&wire::error_reply(*u, errno));
        }
        waiting.len()
    }

    /// Requests the kernel is waiting on.
    pub fn waiting(&self) -> usize {
        self.shared.pending.lock().unwrap().len()
    }

    /// Becomes `true` when the kernel connection has ended (the file system was unmounted).
    pub fn ended(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shared.ended.subscribe()
    }
}

impl Shared {
    /// The kernel side: each request is recorded (if the kernel waits on it) and sent to the
    /// serving process, if there is one; ends when the connection does.
    fn read_kernel(&self) {
        let mut buf = vec![0u8; MESSAGE_BUFFER];
        loop {
            match nix::unistd::read(&self.kernel, &mut buf) {
                Ok(0) => break,
                Ok(n) => self.on_request(&buf[..n]),
                // ENOENT: the request was interrupted before we read it.
                Err(Errno::EINTR | Errno::EAGAIN | Errno::ENOENT) => {}
                Err(Errno::ENODEV) => break,
                Err(e) => {
                    tracing::error!("reading the FUSE connection: {e}");
                    break;
                }
            }
        }
        self.ended.send_replace(true);
    }

    fn on_request(&self, msg: &[u8]) {
        let h = match InHeader::parse(msg) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("dropped a request from the kernel: {e}");
                if msg.len() >= 16 {
                    let unique = u64::from_ne_bytes(msg[8..16].try_into().unwrap_or_default());
                    self.to_kernel(&wire::error_reply(unique, libc::EIO));
                }
                return;
            }
        };
        let channel = {
            let server = self.server.lock().unwrap();
            // Checked under the lock `fail_pending` sets it under: a request is either
            // answered there or here, never left waiting.
            if self.failing.load(Ordering::SeqCst) {
                drop(server);
                if h.needs_reply() {
                    self.to_kernel(&wire::error_reply(h.unique, libc::EIO));
                }
                return;
            }
            if h.needs_reply() {
                self.pending.lock().unwrap().insert(h.unique, msg.to_vec());
            }
            server.clone()
        };
        let Some(channel) = channel else { return };
        match send(&channel, msg) {
            Ok(()) => {}
            Err(Error::Io(e)) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                tracing::error!("request {} is too large to relay", h.unique);
                if self.pending.lock().unwrap().remove(&h.unique).is_some() {
                    self.to_kernel(&wire::error_reply(h.unique, libc::EIO));
                }
            }
            // The serving process is gone: the request waits for the next one.
            Err(_) => {}
        }
    }

    /// The server side: passes each reply on if its request is still waiting; returns at
    /// end-of-file (the process has exited and its queued replies are passed on).
    fn read_server(&self, channel: &OwnedFd) {
        let mut buf = vec![0u8; MESSAGE_BUFFER];
        loop {
            match socket::recv(channel.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) => return,
                Ok(n) => self.on_reply(&buf[..n]),
                // ECONNRESET: the process died with requests unread; it is said once, before
                // the replies it did write, which are still passed on.
                Err(Errno::EINTR | Errno::ECONNRESET) => {}
                Err(e) => {
                    tracing::warn!("reading the serving process: {e}");
                    return;
                }
            }
        }
    }

    fn on_reply(&self, msg: &[u8]) {
        let h = match OutHeader::parse(msg) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("dropped a reply from the serving process: {e}");
                return;
            }
        };
        if h.unique == self.init_unique {
            let mut first = self.init_reply.lock().unwrap();
            let this = wire::without_unique(msg);
            match &*first {
                None => *first = Some(this),
                Some(f) if *f != this => tracing::warn!(
                    "the new serving process answered INIT differently; the kernel keeps \
                     what the first one negotiated"
                ),
                Some(_) => {}
            }
        }
        if self.pending.lock().unwrap().remove(&h.unique).is_some() {
            self.to_kernel(msg);
        }
    }

    fn to_kernel(&self, msg: &[u8]) {
        match nix::unistd::write(&self.kernel, msg) {
            // ENOENT: the request is no longer waited on (interrupted, or aborted).
            Ok(_) | Err(Errno::ENOENT) | Err(Errno::ENODEV) => {}
            Err(e) => tracing::warn!("answering the kernel: {e}"),
        }
    }
}

/// Sends one whole message, without `SIGPIPE` when the peer is gone.
fn send(channel: &impl AsFd, msg: &[u8]) -> Result<()> {
    let fd = channel.as_fd().as_raw_fd();
    loop {
        match socket::send(fd, msg, MsgFlags::MSG_NOSIGNAL) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(io(e)),
        }
    }
}

fn io(e: Errno) -> Error {
    Error::Io(std::io::Error::from(e))
}

#[cfg(test)]
mod tests;

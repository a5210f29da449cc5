//! What stands between the nodes and the origin: a pull-through cache (Debian's
//! docker-registry, distribution 2.8, in `proxy:` mode) listening on the fleet's bridge, and a
//! mirror that answers every request with 503. Also the reading of a docker-registry access
//! log, for the blob GETs the origin answered.

use crate::harness::TempDir;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A pull-through cache of the registry at `upstream`, with storage of its own; killed on
/// drop (its storage with it).
pub struct PullThrough {
    /// `IP:PORT` it listens on.
    pub addr: String,
    dir: TempDir,
    child: Child,
}

impl PullThrough {
    /// Starts one at `addr` (`IP:PORT`, on the fleet's bridge) for `upstream` (`IP:PORT`,
    /// plain HTTP; `creds` its user and password, if it asks for them) and waits until it
    /// answers.
    pub fn start(addr: &str, upstream: &str, creds: Option<(&str, &str)>) -> PullThrough {
        let dir = TempDir::new("fleet-cache");
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}/data\nhttp:\n  addr: {addr}\nproxy:\n  remoteurl: http://{upstream}\n",
            dir.path().display()
        );
        if let Some((user, pass)) = creds {
            cfg += &format!("  username: {user}\n  password: {pass}\n");
        }
        std::fs::write(dir.path().join("config.yml"), cfg).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry");
        let cache = PullThrough {
            addr: addr.to_string(),
            dir,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the pull-through cache did not start: {}",
                std::fs::read_to_string(cache.log()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cache
    }

    /// Its access log.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Whether it has stored blob `digest` (distribution moves a blob into place once it
    /// has arrived whole and matched its digest).
    pub fn stored(&self, digest: &str) -> bool {
        let hex = &digest[7..];
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
            .exists()
    }

    /// Waits (up to `limit`) until every blob of `digests` is stored; whether they are.
    pub fn wait_stored(&self, digests: &[String], limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !digests.iter().all(|d| self.stored(d)) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }
}

impl Drop for PullThrough {
    /// Stops the cache; its log is copied into OCIFS_BENCH_KEEP_LOGS (if set) as
    /// `cache-PID.log`.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(keep) = std::env::var("OCIFS_BENCH_KEEP_LOGS") {
            let to = Path::new(&keep).join(format!("cache-{}.log", self.child.id()));
            let _ = std::fs::create_dir_all(&keep);
            let _ = std::fs::copy(self.log(), to);
        }
    }
}

/// A mirror that answers every request with 503 (keeping the connection), counting them.
pub struct Unavailable {
    pub addr: String,
    pub requests: Arc<AtomicU64>,
}

impl Unavailable {
    /// Listens on `addr` (`IP:PORT`); the listener lives as long as the process.
    pub fn start(addr: &str) -> Unavailable {
        let listener = TcpListener::bind(addr).unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let counted = counted.clone();
                std::thread::spawn(move || answer_503(conn, &counted));
            }
        });
        Unavailable {
            addr: addr.to_string(),
            requests,
        }
    }
}

/// Answers each request on `conn` with 503 until the client hangs up.
fn answer_503(mut conn: TcpStream, counted: &AtomicU64) {
    loop {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match conn.read(&mut b) {
                Ok(1) => head.push(b[0]),
                _ => return,
            }
        }
        counted.fetch_add(1, Ordering::SeqCst);
        let answer = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        if conn.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// Where a log file ends now; [`blob_gets`] reads after such a mark.
pub fn log_mark(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// The blob GETs a docker-registry access log shows after `mark`: digest -> (GETs, bytes
/// written).
pub fn blob_gets(log: &Path, mark: u64) -> HashMap<String, (u64, u64)> {
    let mut text = Vec::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        use std::io::Seek;
        let _ = f.seek(std::io::SeekFrom::Start(mark));
        let _ = f.read_to_end(&mut text);
    }
    // Hung-up answers ("response completed with error") count: the bytes went out.
    crate::harness::blob_gets_in(&String::from_utf8_lossy(&text), true)
}

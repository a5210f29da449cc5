//! Test infrastructure: the real registry (Debian's docker-registry) on a free loopback port,
//! a counting and optionally token-enforcing HTTP proxy in front of it, and the `ocifs` binary.
//!
//! Under CI=true a missing tool or FUSE device is a failure, never a silent skip.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The tools the integration tests use (scripts/test installs them).
pub const TOOLS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "tar",
    "gzip",
    "pigz",
    "zstd",
    "go",
    "htpasswd",
    "python3",
    "flatc",
];

/// What a test starts from: [`TOOLS`] checked (see [`require`]), a running registry and a
/// scratch directory.
pub struct Env {
    pub reg: Registry,
    pub work: TempDir,
}

impl Env {
    /// For a test that mounts: [`TOOLS`] and /dev/fuse. `None` (the reason printed) when one
    /// is missing outside CI; a panic under CI.
    pub fn new(tag: &str) -> Option<Env> {
        Env::start(tag, true)
    }

    /// For a test that only runs `ocifs` commands: [`TOOLS`], no FUSE device.
    pub fn without_fuse(tag: &str) -> Option<Env> {
        Env::start(tag, false)
    }

    fn start(tag: &str, fuse: bool) -> Option<Env> {
        if !require(TOOLS, fuse) {
            return None;
        }
        let reg = Registry::start(None);
        let work = TempDir::new(tag);
        Some(Env { reg, work })
    }
}

/// Whether the test environment has what a test needs; panics under CI when it does not.
pub fn require(tools: &[&str], fuse: bool) -> bool {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| {
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .stdout(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
        })
        .map(|t| t.to_string())
        .collect();
    if fuse && !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse".into());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("missing {missing:?} (scripts/test installs them)");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED (not CI): {msg}");
    false
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ocifs-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running docker-registry, killed on drop.
pub struct Registry {
    child: Child,
    pub addr: String,
    pub dir: TempDir,
}

impl Registry {
    /// Starts a registry; with `htpasswd = Some((user, pass))` it requires Basic auth.
    pub fn start(htpasswd: Option<(&str, &str)>) -> Registry {
        Registry::start_full(htpasswd, "", "")
    }

    /// A pull-through cache (distribution's `proxy:` mode) of the registry at `upstream`
    /// (`host:port`, plain HTTP), which must be up already.
    pub fn pull_through(upstream: &str) -> Registry {
        Registry::start_full(
            None,
            "",
            &format!("proxy:\n  remoteurl: http://{upstream}\n"),
        )
    }

    /// [`Registry::start`] with more settings under `http:` (YAML lines indented by two
    /// spaces, such as a `tls:` block).
    pub fn start_with(htpasswd: Option<(&str, &str)>, http_extra: &str) -> Registry {
        Registry::start_full(htpasswd, http_extra, "")
    }

    /// [`Registry::start`] with `http_extra` under `http:` and `extra` appended to its
    /// configuration.
    fn start_full(htpasswd: Option<(&str, &str)>, http_extra: &str, extra: &str) -> Registry {
        let dir = TempDir::new("registry");
        let mut port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}/data\nhttp:\n  addr: 127.0.0.1:{port}\n{http_extra}",
            dir.path().display()
        );
        if let Some((u, p)) = htpasswd {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .expect("htpasswd");
            std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
            cfg += &format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}/htpasswd\n",
                dir.path().display()
            );
        }
        cfg += extra;
        // The port was free when asked; another test's registry may take it first. Then this
        // one cannot listen, and starts again on another port.
        for _ in 0..5 {
            std::fs::write(dir.path().join("config.yml"), &cfg).unwrap();
            let addr = format!("127.0.0.1:{port}");
            if let Some(child) = Registry::spawn(&dir, &addr) {
                return Registry { child, addr, dir };
            }
            let next = free_port();
            cfg = cfg.replace(
                &format!("127.0.0.1:{port}\n"),
                &format!("127.0.0.1:{next}\n"),
            );
            port = next;
        }
        panic!(
            "registry did not start: {}",
            std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
        );
    }

    /// Starts docker-registry with the configuration in `dir` and waits until it says it
    /// listens on `addr` (a connection alone may reach another process on that port); `None`
    /// when it exited instead (the port was taken).
    fn spawn(dir: &TempDir, addr: &str) -> Option<Child> {
        let log_path = dir.path().join("registry.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let before = log.metadata().unwrap().len() as usize;
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry");
        let listening = format!("listening on {addr}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::read(&log_path).unwrap_or_default();
            let said = String::from_utf8_lossy(log.get(before..).unwrap_or_default());
            if said.contains(&listening) && std::net::TcpStream::connect(addr).is_ok() {
                return Some(child);
            }
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            assert!(Instant::now() < deadline, "registry did not start: {said}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Where the registry stores blob `digest` (`sha256:...`) on disk, for tests that damage
    /// or inspect what it serves.
    #[allow(dead_code)]
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.blobs_dir().join(&hex[..2]).join(hex).join("data")
    }

    /// The directory of the registry's stored blobs (one directory per two-hex prefix).
    #[allow(dead_code)]
    pub fn blobs_dir(&self) -> PathBuf {
        self.dir.path().join("data/docker/registry/v2/blobs/sha256")
    }

    /// Kills the registry (`kill -9`: its data stays), as a crash would.
    #[allow(dead_code)]
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the registry again after [`Registry::kill`], on the same port with the same data.
    #[allow(dead_code)]
    pub fn restart(&mut self) {
        self.kill();
        self.child = Registry::spawn(&self.dir, &self.addr).expect("registry restarted");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback HTTP proxy to a registry that counts blob bytes and requests, and optionally
/// demands Bearer tokens from its own `/token` endpoint (which demands Basic credentials).
pub struct Proxy {
    pub addr: String,
    /// Set by [`Proxy::with_storage`]: blob GETs are redirected to a storage path.
    pub storage: Option<Arc<Storage>>,
    /// Requests, but for the API version check (`GET /v2/`).
    pub requests: Arc<AtomicU64>,
    /// `GET /v2/` requests (a client opening connections ahead, or checking the API).
    pub pings: Arc<AtomicU64>,
    pub blob_bytes: Arc<AtomicU64>,
    pub blob_requests: Arc<AtomicU64>,
    /// The most blob GETs under way at once since the last reset.
    pub blob_in_flight_max: Arc<AtomicU64>,
    blob_in_flight: Arc<AtomicU64>,
    pub tokens_issued: Arc<AtomicU64>,
    /// Lifetime (`expires_in`) of the tokens the token endpoint issues (default 300 s).
    pub token_ttl: Arc<AtomicU64>,
    /// 401 challenges sent to registry requests (other than `GET /v2/`).
    pub challenges: Arc<AtomicU64>,
}

/// An emulated blob store behind redirects (like S3 presigned URLs): only the newest
/// signature is valid, and a request carrying an Authorization header counts as a leak.
#[derive(Default)]
pub struct Storage {
    pub signature: AtomicU64,
    pub redirects: AtomicU64,
    pub requests: AtomicU64,
    pub expired: AtomicU64,
    pub auth_leaks: AtomicU64,
}

impl Proxy {
    pub fn start(upstream: &str, token_auth: Option<(&str, &str)>) -> Proxy {
        Proxy::with_link(upstream, token_auth, None)
    }

    /// A proxy whose blob GETs answer 307 to a presigned-URL-like storage path on itself.
    pub fn with_storage(upstream: &str, token_auth: Option<(&str, &str)>) -> Proxy {
        Proxy::build(
            upstream,
            token_auth,
            None,
            Some(Arc::new(Storage::default())),
        )
    }

    /// A proxy that also emulates a link: each request waits one round trip, and response
    /// bodies are paced to `link.1` bytes per second.
    pub fn with_link(
        upstream: &str,
        token_auth: Option<(&str, &str)>,
        link: Option<(Duration, u64)>,
    ) -> Proxy {
        Proxy::build(upstream, token_auth, link, None)
    }

    fn build(
        upstream: &str,
        token_auth: Option<(&str, &str)>,
        link: Option<(Duration, u64)>,
        storage: Option<Arc<Storage>>,
    ) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let blob_bytes = Arc::new(AtomicU64::new(0));
        let blob_requests = Arc::new(AtomicU64::new(0));
        let blob_in_flight = Arc::new(AtomicU64::new(0));
        let blob_in_flight_max = Arc::new(AtomicU64::new(0));
        let tokens_issued = Arc::new(AtomicU64::new(0));
        let token_ttl = Arc::new(AtomicU64::new(300));
        let challenges = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let pings = Arc::new(AtomicU64::new(0));
        let ctx = Arc::new(ProxyCtx {
            client: reqwest::blocking::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            storage: storage.clone(),
            link,
            link_free: std::sync::Mutex::new(std::time::Instant::now()),
            requests: requests.clone(),
            pings: pings.clone(),
            upstream: upstream.to_string(),
            addr: addr.clone(),
            creds: token_auth.map(|(u, p)| format!("{u}:{p}")),
            blob_bytes: blob_bytes.clone(),
            blob_requests: blob_requests.clone(),
            blob_in_flight: blob_in_flight.clone(),
            blob_in_flight_max: blob_in_flight_max.clone(),
            tokens_issued: tokens_issued.clone(),
            token_ttl: token_ttl.clone(),
            challenges: challenges.clone(),
        });
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let ctx = ctx.clone();
                std::thread::spawn(move || {
                    let _ = ctx.handle(conn);
                });
            }
        });
        Proxy {
            addr,
            storage,
            requests,
            pings,
            blob_bytes,
            blob_requests,
            blob_in_flight_max,
            blob_in_flight,
            tokens_issued,
            token_ttl,
            challenges,
        }
    }

    pub fn reset(&self) {
        self.requests.store(0, Ordering::SeqCst);
        self.pings.store(0, Ordering::SeqCst);
        self.blob_bytes.store(0, Ordering::SeqCst);
        self.blob_requests.store(0, Ordering::SeqCst);
        let now = self.blob_in_flight.load(Ordering::SeqCst);
        self.blob_in_flight_max.store(now, Ordering::SeqCst);
    }
}

struct ProxyCtx {
    /// One client for all upstream requests: building one per request cost ~20 ms of CPU
    /// each, which the emulated link then added to every round trip.
    client: reqwest::blocking::Client,
    storage: Option<Arc<Storage>>,
    link: Option<(Duration, u64)>,
    /// When the emulated link is next free to carry bytes.
    link_free: std::sync::Mutex<std::time::Instant>,
    requests: Arc<AtomicU64>,
    pings: Arc<AtomicU64>,
    upstream: String,
    addr: String,
    creds: Option<String>,
    blob_bytes: Arc<AtomicU64>,
    blob_requests: Arc<AtomicU64>,
    blob_in_flight: Arc<AtomicU64>,
    blob_in_flight_max: Arc<AtomicU64>,
    tokens_issued: Arc<AtomicU64>,
    token_ttl: Arc<AtomicU64>,
    challenges: Arc<AtomicU64>,
}

/// Counts a blob GET as under way while it lives.
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ProxyCtx {
    fn handle(&self, mut conn: std::net::TcpStream) -> std::io::Result<()> {
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if conn.read(&mut byte)? == 0 || (buf.is_empty() && byte[0] == 0x16) {
                return Ok(()); // closed, or a TLS hello: plain HTTP only, refuse at once
            }
            buf.push(byte[0]);
        }
        // The API version check carries no image data; ocifs sends them to open connections
        // ahead (see `Registry::speaks_tls`), which the counts leave out.
        if !buf.starts_with(b"GET /v2/ ") {
            self.requests.fetch_add(1, Ordering::SeqCst);
        }
        if let Some((rtt, _)) = self.link {
            std::thread::sleep(rtt);
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let (method, target) = (
            first.next().unwrap_or("").to_string(),
            first.next().unwrap_or("").to_string(),
        );
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            })
            .collect();
        let ping = method == "GET" && target == "/v2/";
        if ping {
            self.pings.fetch_add(1, Ordering::SeqCst);
        }
        let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut body_in = vec![
            0u8;
            header("content-length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0)
        ];
        conn.read_exact(&mut body_in)?;
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut target = target;
        let mut from_storage = false;
        if let Some(st) = &self.storage
            && let Some(rest) = target.strip_prefix("/storage/")
        {
            st.requests.fetch_add(1, Ordering::SeqCst);
            if header("authorization").is_some() {
                st.auth_leaks.fetch_add(1, Ordering::SeqCst);
            }
            let (path, sig) = rest.split_once("?sig=").unwrap_or((rest, ""));
            if sig != st.signature.load(Ordering::SeqCst).to_string() {
                st.expired.fetch_add(1, Ordering::SeqCst);
                return respond(&mut conn, "403 Forbidden", &[], b"expired", false);
            }
            target = format!("/v2/{path}");
            from_storage = true;
        } else if let Some(creds) = &self.creds {
            if target.starts_with("/token") {
                let ok = header("authorization")
                    .is_some_and(|a| a == format!("Basic {}", b64.encode(creds)));
                if !ok {
                    return respond(
                        &mut conn,
                        "401 Unauthorized",
                        &[],
                        b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
                        false,
                    );
                }
                let n = self.tokens_issued.fetch_add(1, Ordering::SeqCst);
                let ttl = self.token_ttl.load(Ordering::SeqCst);
                let body = format!("{{\"token\":\"tok-{n}\",\"expires_in\":{ttl}}}");
                return respond(
                    &mut conn,
                    "200 OK",
                    &[("Content-Type".into(), "application/json".into())],
                    body.as_bytes(),
                    false,
                );
            }
            let ok = header("authorization").is_some_and(|a| a.starts_with("Bearer tok-"));
            if !ok {
                if !ping {
                    self.challenges.fetch_add(1, Ordering::SeqCst);
                }
                let challenge = format!(
                    "Bearer realm=\"http://{}/token\",service=\"test\",scope=\"repository:x:pull\"",
                    self.addr
                );
                return respond(
                    &mut conn,
                    "401 Unauthorized",
                    &[("WWW-Authenticate".into(), challenge)],
                    b"{}",
                    false,
                );
            }
        }
        if let Some(st) = &self.storage
            && !from_storage
            && method == "GET"
            && target.starts_with("/v2/")
            && target.contains("/blobs/sha256:")
        {
            st.redirects.fetch_add(1, Ordering::SeqCst);
            let location = format!(
                "http://{}/storage/{}?sig={}",
                self.addr,
                &target[4..],
                st.signature.load(Ordering::SeqCst)
            );
            return respond(
                &mut conn,
                "307 Temporary Redirect",
                &[("Location".into(), location)],
                b"",
                false,
            );
        }
        let mut up = self.client.request(
            method.parse().unwrap(),
            format!("http://{}{target}", self.upstream),
        );
        for (k, v) in &headers {
            if matches!(
                k.as_str(),
                "range" | "accept" | "accept-encoding" | "content-type"
            ) {
                up = up.header(k, v);
            }
        }
        if !body_in.is_empty() || method == "PUT" || method == "POST" {
            up = up.body(body_in);
        }
        let resp = match up.send() {
            Ok(r) => r,
            Err(_) => return respond(&mut conn, "502 Bad Gateway", &[], b"", false),
        };
        let status = resp.status();
        let mut out_headers = Vec::new();
        for (k, v) in resp.headers() {
            if matches!(
                k.as_str(),
                "content-type"
                    | "docker-content-digest"
                    | "content-range"
                    | "location"
                    | "www-authenticate"
                    | "link"
                    | "oci-subject"
            ) {
                out_headers.push((k.to_string(), v.to_str().unwrap_or("").to_string()));
            }
        }
        let head_len = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let status_line = format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        let head = method == "HEAD";
        let blob_get = method == "GET" && target.contains("/blobs/");
        let _in_flight = blob_get.then(|| {
            let now = self.blob_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.blob_in_flight_max.fetch_max(now, Ordering::SeqCst);
            InFlight(&self.blob_in_flight)
        });
        if blob_get {
            self.blob_requests.fetch_add(1, Ordering::SeqCst);
        }
        let Some((_, rate)) = self.link else {
            let body = resp.bytes().unwrap_or_default();
            if blob_get {
                self.blob_bytes
                    .fetch_add(body.len() as u64, Ordering::SeqCst);
            }
            if head && let Some(l) = head_len {
                out_headers.push(("Content-Length".into(), l));
            }
            let body = if head { &b""[..] } else { &body };
            return respond(&mut conn, &status_line, &out_headers, body, head);
        };
        // Over the emulated link the body streams from upstream as it comes, at the link
        // rate: one token bucket shared by all connections, taken piece by piece, so
        // concurrent responses interleave and a reader sees the first bytes of a long
        // response early, as on a real link.
        let len: Option<usize> = head_len.as_deref().and_then(|l| l.parse().ok());
        if head {
            if let Some(l) = head_len {
                out_headers.push(("Content-Length".into(), l));
            }
            return respond_head(&mut conn, &status_line, &out_headers, 0, true);
        }
        let mut resp = resp;
        let mut buffered = Vec::new();
        let len = match len {
            Some(l) => l,
            None => {
                std::io::Read::read_to_end(&mut resp, &mut buffered)?;
                buffered.len()
            }
        };
        respond_head(&mut conn, &status_line, &out_headers, len, false)?;
        let mut source: Box<dyn Read> = if buffered.is_empty() {
            Box::new(resp)
        } else {
            Box::new(std::io::Cursor::new(buffered))
        };
        let mut piece = vec![0u8; 32 << 10];
        let mut sent = 0;
        while sent < len {
            let want = piece.len().min(len - sent);
            let n = fill(&mut source, &mut piece[..want])?;
            if n == 0 {
                break;
            }
            let due = {
                let mut free = self.link_free.lock().unwrap();
                let start = (*free).max(std::time::Instant::now());
                *free = start + Duration::from_secs_f64(n as f64 / rate as f64);
                *free
            };
            std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            conn.write_all(&piece[..n])?;
            sent += n;
            if blob_get {
                self.blob_bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
        conn.flush()
    }
}

/// Reads into `buf` until it is full or the source ends; how much was read.
fn fill(source: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match source.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The status line and headers of a response whose body follows.
fn respond_head(
    conn: &mut std::net::TcpStream,
    status: &str,
    headers: &[(String, String)],
    len: usize,
    head: bool,
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        out += &format!("{k}: {v}\r\n");
    }
    if !head {
        out += &format!("Content-Length: {len}\r\n");
    }
    out += "\r\n";
    conn.write_all(out.as_bytes())
}

fn respond(
    conn: &mut std::net::TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
    head: bool,
) -> std::io::Result<()> {
    respond_head(conn, status, headers, body.len(), head)?;
    conn.write_all(body)?;
    conn.flush()
}

/// Writes a Docker `config.json` at `path` with `user:pass` for `host`.
pub fn write_docker_config(path: &Path, host: &str, user_pass: &str) {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(user_pass);
    std::fs::write(
        path,
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
}

/// Builds and publishes the checkpoint indexes of `reference` (`ocifs index --push FLAGS`,
/// in a cache directory of its own); returns what it printed.
pub fn push_index(reference: &str, flags: &[&str]) -> String {
    let cache = TempDir::new("push-index");
    let mut args = vec![
        "index",
        "--push",
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    args.push(reference);
    let (ok, out, err) = ocifs(&args, &[]);
    assert!(ok, "index --push: {err}");
    String::from_utf8(out).unwrap()
}

/// Runs the `ocifs` binary with `args`; returns (success, stdout, stderr).
pub fn ocifs(args: &[&str], env: &[(&str, &str)]) -> (bool, Vec<u8>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocifs"));
    cmd.args(args)
        .env("HOME", std::env::temp_dir())
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("DOCKER_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run ocifs");
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A mounted image, unmounted on drop.
pub struct Mount {
    pub dir: TempDir,
    /// The line `ocifs mount` printed when ready.
    pub ready: String,
    pub _cache: TempDir,
}

impl Mount {
    /// `ocifs mount` (daemon mode) of `reference`, with extra flags.
    pub fn new(reference: &str, extra: &[&str], env: &[(&str, &str)]) -> Mount {
        let dir = TempDir::new("mnt");
        let cache = TempDir::new("cache");
        let mp = dir.path().to_str().unwrap().to_string();
        let cd = cache.path().to_str().unwrap().to_string();
        // A caller-chosen --cache-dir in `extra` wins over the fresh one.
        let mut args = vec!["mount"];
        if !extra.contains(&"--cache-dir") {
            args.extend(["--cache-dir", &cd]);
        }
        // The tests' images are small: each of their layers would be fetched whole at
        // mount, and the lazy paths are what most tests check. The test of that fetch asks
        // for it.
        if !extra.contains(&"--small-layers") {
            args.extend(["--small-layers", "0"]);
        }
        args.extend_from_slice(extra);
        args.push(reference);
        args.push(&mp);
        let (ok, stdout, stderr) = ocifs(&args, env);
        assert!(ok, "mount of {reference} failed: {stderr}");
        let ready = String::from_utf8_lossy(&stdout).into_owned();
        assert!(
            ready.contains("mounted") && ready.contains("sha256:"),
            "ready line: {ready}"
        );
        Mount {
            dir,
            ready,
            _cache: cache,
        }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = ocifs(&["umount", self.dir.path().to_str().unwrap()], &[]);
        // The daemon exits once unmounted; give it a moment so the directory is free.
        for _ in 0..50 {
            if std::fs::read_dir(self.dir.path())
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The blob GETs in the text of a docker-registry access log: digest -> (GETs, bytes
/// written). Answers the client hung up on ("response completed with error") count only
/// `with_errors`.
pub fn blob_gets_in(
    text: &str,
    with_errors: bool,
) -> std::collections::HashMap<String, (u64, u64)> {
    let done = match with_errors {
        true => "msg=\"response completed",
        false => "msg=\"response completed\"",
    };
    let mut out = std::collections::HashMap::new();
    for line in text.lines().filter(|l| l.contains(done)) {
        let field = |name: &str| {
            let at = line.find(&format!("{name}="))? + name.len() + 1;
            let rest = line[at..].trim_start_matches('"');
            Some(rest.split(['"', ' ']).next()?.to_string())
        };
        let (Some(method), Some(uri), Some(written)) = (
            field("http.request.method"),
            field("http.request.uri"),
            field("http.response.written"),
        ) else {
            continue;
        };
        let Some((_, digest)) = uri.split_once("/blobs/") else {
            continue;
        };
        if method != "GET" || !digest.starts_with("sha256:") {
            continue;
        }
        let e = out.entry(digest.to_string()).or_insert((0, 0));
        e.0 += 1;
        e.1 += written.parse::<u64>().unwrap_or(0);
    }
    out
}

/// A self-signed P-256 certificate `crt` with its key `key` for `subject`, valid for two
/// days; `extensions` are `openssl req -addext` values (a CA's constraints, an address).
pub fn self_signed(key: &Path, crt: &Path, subject: &str, extensions: &[&str]) {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
    ])
    .args(["-nodes", "-days", "2", "-subj", subject, "-keyout"])
    .arg(key)
    .arg("-out")
    .arg(crt);
    for e in extensions {
        cmd.args(["-addext", e]);
    }
    let out = cmd.output().expect("openssl");
    assert!(
        out.status.success(),
        "openssl req -x509 {subject}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

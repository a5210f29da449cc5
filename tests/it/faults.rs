//! A fault-injecting HTTP proxy for the hostile-network tests: it sits in front of a registry
//! (or of the harness's token [`crate::harness::Proxy`]) on a loopback port and passes every
//! request through, except the blob GETs a test has planned a [`Fault`] for: "the next N blob
//! requests (whose path contains P) get this fault", after which they are clean again.
//!
//! It runs on a tokio runtime of its own, so a stalled or trickling answer costs a timer, not
//! a thread, and `Drop` ends every connection it holds.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a faulty answer does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The connection is reset before anything is answered.
    ResetBeforeHeaders,
    /// Headers and half the body, then a reset.
    ResetMidBody,
    /// Headers (with the full Content-Length) and half the body, then a clean close.
    CutShort,
    /// No answer at all, the connection held open.
    StallBeforeHeaders,
    /// Headers and a quarter of the body, then nothing, the connection held open.
    Stall,
    /// The body at this many bytes per second.
    Trickle(u64),
    /// This status, with an empty body.
    Status(u16),
    /// 429 Too Many Requests with `Retry-After: N` (seconds).
    TooMany { retry_after: u64 },
    /// A 206 whose Content-Range starts one byte after the offset asked for (and whose body
    /// is those bytes): an honest answer to another question.
    ShiftedRange,
    /// A 206 whose Content-Range is the range asked for, but whose body starts one byte
    /// later: only digests can tell.
    LyingRange,
    /// A 200 with the whole blob, the Range header ignored.
    IgnoreRange,
    /// The body with its middle byte flipped.
    FlipByte,
    /// 401 with this `WWW-Authenticate` challenge, as when a token is revoked.
    Unauthorized(String),
    /// 307 to a path on this proxy that redirects again, without end.
    RedirectLoop,
}

/// One planned fault: for the next `left` blob GETs whose path contains `path`.
struct Planned {
    fault: Fault,
    left: u32,
    path: Option<String>,
}

struct State {
    upstream: String,
    plan: Mutex<VecDeque<Planned>>,
    client: reqwest::Client,
    faulted: AtomicU64,
}

/// A running fault proxy; stopped (every connection dropped) on drop.
pub struct FaultProxy {
    pub addr: String,
    state: Arc<State>,
    _rt: tokio::runtime::Runtime,
}

impl FaultProxy {
    /// A proxy to the HTTP server at `upstream` (`host:port`), with no fault planned.
    pub fn start(upstream: &str) -> FaultProxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("fault proxy listener");
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(State {
            upstream: upstream.to_string(),
            plan: Mutex::default(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            faulted: AtomicU64::new(0),
        });
        let accepting = state.clone();
        let own = addr.clone();
        rt.spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (state, own) = (accepting.clone(), own.clone());
                tokio::spawn(async move {
                    let _ = state.handle(conn, &own).await;
                });
            }
        });
        FaultProxy {
            addr,
            state,
            _rt: rt,
        }
    }

    /// `fault` for the next `n` blob GETs.
    pub fn inject(&self, fault: Fault, n: u32) {
        self.plan(fault, n, None);
    }

    /// `fault` for the next `n` blob GETs whose path contains `path`.
    pub fn inject_matching(&self, fault: Fault, n: u32, path: &str) {
        self.plan(fault, n, Some(path.to_string()));
    }

    fn plan(&self, fault: Fault, left: u32, path: Option<String>) {
        let mut plan = self.state.plan.lock().unwrap();
        plan.push_back(Planned { fault, left, path });
    }

    /// Drops every planned fault: answers are clean from now on.
    pub fn clear(&self) {
        self.state.plan.lock().unwrap().clear();
    }

    /// Blob GETs answered with a fault so far.
    pub fn faulted(&self) -> u64 {
        self.state.faulted.load(Ordering::SeqCst)
    }
}

/// A request's head, as read from the client.
struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl State {
    /// The fault planned for this blob GET, if any (counting it down).
    fn fault_for(&self, target: &str) -> Option<Fault> {
        let mut plan = self.plan.lock().unwrap();
        let found = plan
            .iter_mut()
            .find(|p| p.left > 0 && p.path.as_ref().is_none_or(|s| target.contains(s)))?;
        found.left -= 1;
        let fault = found.fault.clone();
        plan.retain(|p| p.left > 0);
        Some(fault)
    }

    async fn handle(&self, mut conn: TcpStream, own: &str) -> std::io::Result<()> {
        let Some(head) = read_head(&mut conn).await? else {
            return Ok(());
        };
        let mut body_in = vec![
            0u8;
            head.header("content-length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0)
        ];
        conn.read_exact(&mut body_in).await?;
        if let Some(n) = head.target.strip_prefix("/loop/") {
            let n: u64 = n.parse().unwrap_or(0) + 1;
            let location = format!("http://{own}/loop/{n}");
            return respond(&mut conn, 307, &[("Location", &location)], b"").await;
        }
        let blob_get = head.method == "GET" && head.target.contains("/blobs/");
        let fault = match blob_get {
            true => self.fault_for(&head.target),
            false => None,
        };
        if fault.is_some() {
            self.faulted.fetch_add(1, Ordering::SeqCst);
        }
        match &fault {
            Some(Fault::ResetBeforeHeaders) => return reset(conn),
            Some(Fault::StallBeforeHeaders) => return hold(conn).await,
            Some(Fault::Status(code)) => return respond(&mut conn, *code, &[], b"").await,
            Some(Fault::TooMany { retry_after }) => {
                let after = retry_after.to_string();
                return respond(&mut conn, 429, &[("Retry-After", &after)], b"").await;
            }
            Some(Fault::Unauthorized(challenge)) => {
                let h = [("WWW-Authenticate", challenge.as_str())];
                return respond(&mut conn, 401, &h, b"{}").await;
            }
            Some(Fault::RedirectLoop) => {
                let location = format!("http://{own}/loop/1");
                return respond(&mut conn, 307, &[("Location", &location)], b"").await;
            }
            _ => {}
        }
        // The range asked for, and the one asked of the upstream.
        let asked = head.header("range").and_then(parse_range);
        let mut range = head.header("range").map(str::to_string);
        match (&fault, asked) {
            (Some(Fault::ShiftedRange), Some((a, b))) => {
                range = Some(format!("bytes={}-{b}", a + 1))
            }
            (Some(Fault::LyingRange), Some((a, b))) => {
                range = Some(format!("bytes={}-{}", a + 1, b + 1))
            }
            (Some(Fault::IgnoreRange), _) => range = None,
            _ => {}
        }
        let mut up = self.client.request(
            head.method.parse().unwrap(),
            format!("http://{}{}", self.upstream, head.target),
        );
        for (k, v) in &head.headers {
            if matches!(
                k.as_str(),
                "accept" | "accept-encoding" | "content-type" | "authorization"
            ) {
                up = up.header(k, v);
            }
        }
        if let Some(r) = &range {
            up = up.header("range", r);
        }
        if !body_in.is_empty() {
            up = up.body(body_in);
        }
        let resp = match up.send().await {
            Ok(r) => r,
            // The upstream is down: the client sees a reset, as it would without us.
            Err(_) => return reset(conn),
        };
        let status = resp.status().as_u16();
        let mut headers: Vec<(String, String)> = resp
            .headers()
            .iter()
            .filter(|(k, _)| {
                matches!(
                    k.as_str(),
                    "content-type"
                        | "docker-content-digest"
                        | "content-range"
                        | "location"
                        | "www-authenticate"
                        | "link"
                        | "oci-subject"
                )
            })
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let head_len = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if head.method == "HEAD" {
            if let Some(l) = head_len {
                headers.push(("Content-Length".into(), l));
            }
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (&**k, &**v)).collect();
            return write_head(&mut conn, status, &h, None).await;
        }
        let mut body = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            Err(_) => return reset(conn),
        };
        if let (Some(Fault::LyingRange), Some((a, b))) = (&fault, asked) {
            // Claim the range asked for; the body is one byte further on.
            let total = headers
                .iter()
                .find(|(k, _)| k == "content-range")
                .and_then(|(_, v)| v.rsplit('/').next().map(str::to_string))
                .unwrap_or_else(|| "*".into());
            headers.retain(|(k, _)| k != "content-range");
            headers.push(("content-range".into(), format!("bytes {a}-{b}/{total}")));
        }
        if fault == Some(Fault::FlipByte) && !body.is_empty() {
            let mid = body.len() / 2;
            body[mid] ^= 0x5a;
        }
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (&**k, &**v)).collect();
        write_head(&mut conn, status, &h, Some(body.len())).await?;
        match fault {
            Some(Fault::ResetMidBody) => {
                conn.write_all(&body[..body.len() / 2]).await?;
                conn.flush().await?;
                reset(conn)
            }
            Some(Fault::CutShort) => {
                conn.write_all(&body[..body.len() / 2]).await?;
                conn.shutdown().await
            }
            Some(Fault::Stall) => {
                conn.write_all(&body[..body.len() / 4]).await?;
                conn.flush().await?;
                hold(conn).await
            }
            Some(Fault::Trickle(rate)) => {
                // Ten pieces a second; a client that gave up ends it (the write fails).
                let piece = (rate / 10).max(1) as usize;
                for part in body.chunks(piece) {
                    conn.write_all(part).await?;
                    conn.flush().await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(())
            }
            _ => {
                conn.write_all(&body).await?;
                conn.flush().await
            }
        }
    }
}

/// `bytes=A-B` as (A, B).
fn parse_range(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Reads a request head; `None` if the client closed first.
async fn read_head(conn: &mut TcpStream) -> std::io::Result<Option<Head>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        buf.push(byte[0]);
        if buf.len() > 64 << 10 {
            return Ok(None);
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    Ok(Some(Head {
        method,
        target,
        headers,
    }))
}

/// Resets the connection (RST, not FIN).
fn reset(conn: TcpStream) -> std::io::Result<()> {
    #[allow(deprecated)]
    conn.set_linger(Some(Duration::ZERO))?;
    drop(conn);
    Ok(())
}

/// Holds the connection open without a byte until the client goes away (or a minute).
async fn hold(mut conn: TcpStream) -> std::io::Result<()> {
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while conn.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    Ok(())
}

async fn write_head(
    conn: &mut TcpStream,
    status: u16,
    headers: &[(&str, &str)],
    len: Option<usize>,
) -> std::io::Result<()> {
    let reason = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    for (k, v) in headers {
        out += &format!("{k}: {v}\r\n");
    }
    if let Some(len) = len {
        out += &format!("Content-Length: {len}\r\n");
    }
    out += "\r\n";
    conn.write_all(out.as_bytes()).await
}

async fn respond(
    conn: &mut TcpStream,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    write_head(conn, status, headers, Some(body.len())).await?;
    conn.write_all(body).await?;
    conn.flush().await
}

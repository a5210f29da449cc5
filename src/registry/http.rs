//! The HTTP clients of one registry, and what its TLS failures mean.
//!
//! An HTTPS client trusts the system's certificate authorities, and loading them (every file
//! in `/etc/ssl/certs`) takes 5-7 ms on the benchmark machine, paid before the first request. A registry reached
//! over plain HTTP (localhost, `--insecure`) does not need them: its client is built without,
//! and the one with them only when a URL needs it (a token server or blob storage behind
//! `https://`).
//!
//! The registry's own host gets the TLS settings the user gave for it ([`TlsOptions`]: extra
//! certificate authorities, a client certificate, no verification), as containers tools
//! apply `certs.d/HOST:PORT`; other hosts (token servers, blob storage) get the system's
//! authorities only. Whether a registry that may be plain HTTP speaks TLS is found with one
//! handshake ([`speaks_tls`]), as skopeo tries https first and falls back to http.

use crate::error::{Error, Result};
use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

/// TLS settings for one registry host (the CLI reads them from `--cert-dir` and the
/// `certs.d` directories).
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// Accept any certificate (`--tls-verify=false`).
    pub skip_verify: bool,
    /// Extra certificate authorities, PEM, each with the name of the file it came from.
    pub roots: Vec<(String, Vec<u8>)>,
    /// A client certificate and its key, PEM (certificate first), with the name of the
    /// certificate file.
    pub identity: Option<(String, Vec<u8>)>,
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roots: Vec<&str> = self.roots.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("TlsOptions")
            .field("skip_verify", &self.skip_verify)
            .field("roots", &roots)
            .field(
                "identity",
                &self
                    .identity
                    .as_ref()
                    .map(|(n, _)| format!("{n} <key redacted>")),
            )
            .finish()
    }
}

/// The clients: one without trust roots for `http://` URLs, when the registry is plain HTTP;
/// one with the user's TLS settings for `https://` URLs of the registry host; and one that
/// trusts the system's authorities for other hosts, built on first use.
pub struct Http {
    /// `host[:port]` of the registry, as URLs name it.
    host: String,
    plain: Option<reqwest::Client>,
    /// The registry host's HTTPS client, built on first use when the registry is plain HTTP.
    registry_tls: OnceLock<reqwest::Client>,
    other_tls: OnceLock<reqwest::Client>,
    tls: TlsOptions,
}

impl Http {
    /// Clients for the registry at `host` (`host[:port]`), reached over plain HTTP (`plain`)
    /// or HTTPS with `tls`. Certificate and key files that do not parse are errors here.
    pub fn new(host: &str, plain: bool, tls: TlsOptions) -> Result<Http> {
        let http = Http {
            host: host.to_string(),
            plain: None,
            registry_tls: OnceLock::new(),
            other_tls: OnceLock::new(),
            tls,
        };
        // Parse the user's files now, so a bad one is reported before any request (building
        // the client, which loads the system's authorities, waits for a first https URL).
        let registry_tls = http.registry_builder()?;
        if !plain {
            let client = registry_tls
                .build()
                .map_err(|e| Error::Registry(format!("building an HTTPS client: {e}")))?;
            let _ = http.registry_tls.set(client);
            return Ok(http);
        }
        let client = builder()
            .tls_certs_only(Vec::<reqwest::Certificate>::new())
            .build()?;
        Ok(Http {
            plain: Some(client),
            ..http
        })
    }

    /// A client builder with the registry's TLS settings, the user's files parsed.
    fn registry_builder(&self) -> Result<reqwest::ClientBuilder> {
        let mut b = builder();
        if self.tls.skip_verify {
            b = b.tls_danger_accept_invalid_certs(true);
        }
        let mut roots = Vec::new();
        for (name, pem) in &self.tls.roots {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::format(format!("CA certificate {name}"), e.to_string()))?;
            if certs.is_empty() {
                return Err(Error::format(
                    format!("CA certificate {name}"),
                    "no PEM certificate in it",
                ));
            }
            roots.extend(certs);
        }
        if !roots.is_empty() {
            b = b.tls_certs_merge(roots);
        }
        if let Some((name, pem)) = &self.tls.identity {
            let id = reqwest::Identity::from_pem(pem)
                .map_err(|e| Error::format(format!("client certificate {name}"), e.to_string()))?;
            b = b.identity(id);
        }
        Ok(b)
    }

    /// The client for `url`: the plain one for `http://` when there is one, the registry's
    /// HTTPS client for its own host, else the one that trusts the system's authorities.
    pub fn for_url(&self, url: &str) -> Result<&reqwest::Client> {
        if let Some(plain) = &self.plain
            && url.starts_with("http://")
        {
            return Ok(plain);
        }
        let own = url
            .strip_prefix("https://")
            .and_then(|rest| rest.split(['/', '?']).next())
            .is_some_and(|host| host == self.host);
        let cell = if own {
            &self.registry_tls
        } else {
            &self.other_tls
        };
        if let Some(c) = cell.get() {
            return Ok(c);
        }
        let b = if own {
            self.registry_builder()?
        } else {
            builder()
        };
        let built = b
            .build()
            .map_err(|e| Error::Registry(format!("building an HTTPS client for {url}: {e}")))?;
        // Two first uses at once build two; either is fine to keep.
        Ok(cell.get_or_init(|| built))
    }
}

/// The settings every client shares: no automatic redirects (blob redirects are followed by
/// hand, without our Authorization header), bounded connect and read waits.
fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("ocifs/", env!("CARGO_PKG_VERSION")))
}

/// Why a connection to a registry failed, when TLS (or its absence) is the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFailure {
    /// The server does not speak TLS (a plain-HTTP registry asked for https).
    NotTls,
    /// Its certificate is not signed by an authority we trust.
    UnknownIssuer,
    /// Its certificate has expired.
    Expired,
    /// Its certificate is not valid yet.
    NotValidYet,
    /// Its certificate names other hosts.
    WrongName,
    /// The server wants a client certificate we did not send, or refused the one we sent.
    ClientCertificate,
    /// Another TLS failure, in rustls's words.
    Other(String),
}

/// What TLS had to do with `e`, a request's error: `None` when the failure was not about TLS
/// (a refused connection, a timeout, an HTTP error).
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let mut cur = Some(e);
    let mut handshake_cut = false;
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(classify(r));
        }
        cur = match err.downcast_ref::<std::io::Error>() {
            Some(io) => {
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) {
                    handshake_cut = true;
                }
                // An io::Error shows its inner error but skips it in `source()` (and the
                // connectors nest them): go into it.
                match io.get_ref() {
                    Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                    None => err.source(),
                }
            }
            None => err.source(),
        };
    }
    // A server that closes the connection on a TLS hello (a plain-HTTP server that reads
    // it as a bad request) cuts the handshake short.
    handshake_cut.then_some(TlsFailure::NotTls)
}

fn classify(e: &rustls::Error) -> TlsFailure {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidMessage(_) => TlsFailure::NotTls,
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => TlsFailure::UnknownIssuer,
            C::Expired | C::ExpiredContext { .. } => TlsFailure::Expired,
            C::NotValidYet | C::NotValidYetContext { .. } => TlsFailure::NotValidYet,
            C::NotValidForName | C::NotValidForNameContext { .. } => TlsFailure::WrongName,
            other => TlsFailure::Other(format!("{other:?}")),
        },
        E::AlertReceived(
            A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::HandshakeFailure
            | A::CertificateUnknown,
        ) => TlsFailure::ClientCertificate,
        other => TlsFailure::Other(other.to_string()),
    }
}

/// Whether the server at `host` (`host[:port]`) speaks TLS: `Some(false)` when it is plain
/// HTTP, `None` when nothing answered at all (the request that follows will say why).
///
/// Two questions race, and the first clear answer wins. A TLS handshake by a client that
/// trusts no authority (so asking loads none of the system's): a TLS server fails it with a
/// certificate error, a plain one answers with HTTP or hangs up. And a plain `GET /v2/`: a
/// registry answers 200 or 401, a TLS port 400 ("an HTTP request to an HTTPS server") or
/// nothing. A Go HTTP server (docker-registry) took 30-100 ms to answer a TLS hello and
/// 2-10 ms to answer the plain request (the race: 4-20 ms); a server that hangs up on a
/// TLS hello answers the handshake first. The plain question costs a plain-HTTP registry
/// one request.
pub async fn speaks_tls(host: &str) -> Option<bool> {
    // One client (no trust roots, so nothing to load) asks both questions.
    let client = builder()
        .tls_certs_only(Vec::<reqwest::Certificate>::new())
        .timeout(Duration::from_secs(10))
        .build()
        .ok()?;
    let handshake = {
        let (client, url) = (client.clone(), format!("https://{host}/v2/"));
        async move {
            match client.get(url).send().await {
                Ok(_) => Some(true),
                Err(e) => match tls_failure(&e) {
                    Some(TlsFailure::NotTls) => Some(false),
                    Some(_) => Some(true),
                    None => None,
                },
            }
        }
    };
    let plain = {
        let url = format!("http://{host}/v2/");
        async move {
            let resp = client.get(url).send().await.ok()?;
            Some(resp.status() == reqwest::StatusCode::BAD_REQUEST)
        }
    };
    // Tasks of their own (ended when this returns or is dropped): in one task, the
    // handshake's polls held back the plain request for 40-90 ms (measured on a loaded
    // 2-core machine), so that it never answered first.
    let mut handshake = Aborting(tokio::spawn(handshake));
    let mut plain = Aborting(tokio::spawn(plain));
    let t0 = std::time::Instant::now();
    let (first, handshake_first) = tokio::select! {
        a = &mut handshake.0 => (a.ok().flatten(), true),
        b = &mut plain.0 => (b.ok().flatten(), false),
    };
    let answer = match first {
        Some(_) => first,
        None => {
            let mut other = if handshake_first { plain } else { handshake };
            (&mut other.0).await.ok().flatten()
        }
    };
    tracing::debug!("{host} speaks TLS: {answer:?} ({:?})", t0.elapsed());
    answer
}

/// A spawned task, aborted when dropped.
struct Aborting<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Aborting<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl super::Registry {
    /// What the server answered to the API version check (`GET /v2/`, which every registry
    /// answers 200, or 401 when it wants credentials) when that shows it is not a registry,
    /// say a web server that answers 404 to everything; `None` when it is one or did not
    /// answer. For explaining a "not found".
    pub async fn not_a_registry(&self) -> Option<String> {
        let url = format!("{}/v2/", self.base);
        let resp = self.http.for_url(&url).ok()?.get(&url).send().await.ok()?;
        let status = resp.status();
        let api = resp
            .headers()
            .contains_key("docker-distribution-api-version");
        let registry = api || status.is_success() || status == reqwest::StatusCode::UNAUTHORIZED;
        (!registry).then(|| format!("GET /v2/ answered HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_registry_gets_an_https_client_only_when_a_url_needs_one() {
        let http = Http::new("127.0.0.1:5000", true, TlsOptions::default()).unwrap();
        assert!(http.other_tls.get().is_none());
        let plain = http.for_url("http://127.0.0.1:5000/v2/").unwrap() as *const _;
        assert!(http.other_tls.get().is_none());
        let tls = http.for_url("https://storage.example/blob").unwrap() as *const _;
        assert_ne!(plain, tls);
        assert!(http.other_tls.get().is_some());
        let https = Http::new("registry.example", false, TlsOptions::default()).unwrap();
        assert!(https.plain.is_none() && https.registry_tls.get().is_some());
        // The registry's own host gets its client; another host the system's.
        let own = https.for_url("https://registry.example/v2/").unwrap() as *const _;
        let other = https.for_url("https://registry.example.cdn/x").unwrap() as *const _;
        assert_ne!(own, other);
    }

    #[test]
    fn bad_certificate_files_are_named() {
        let tls = TlsOptions {
            roots: vec![("/etc/x/ca.crt".into(), b"not a certificate".to_vec())],
            ..TlsOptions::default()
        };
        let err = Http::new("r.example", false, tls)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/etc/x/ca.crt"), "{err}");
        let tls = TlsOptions {
            identity: Some(("/etc/x/client.cert".into(), b"junk".to_vec())),
            ..TlsOptions::default()
        };
        let err = Http::new("r.example", false, tls)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/etc/x/client.cert"), "{err}");
        let dbg = format!(
            "{:?}",
            TlsOptions {
                identity: Some(("c.cert".into(), b"SECRET KEY".to_vec())),
                ..TlsOptions::default()
            }
        );
        assert!(!dbg.contains("SECRET"), "{dbg}");
    }

    #[test]
    fn tls_failures_are_told_apart() {
        let wrap = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let not_tls = wrap(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        assert_eq!(tls_failure(&not_tls), Some(TlsFailure::NotTls));
        let expired = wrap(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired,
        ));
        assert_eq!(tls_failure(&expired), Some(TlsFailure::Expired));
        let alert = wrap(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        ));
        assert_eq!(tls_failure(&alert), Some(TlsFailure::ClientCertificate));
        // As hyper-rustls and reqwest's connector nest them.
        let nested = std::io::Error::other(wrap(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        )));
        assert_eq!(tls_failure(&nested), Some(TlsFailure::UnknownIssuer));
        let cut = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert_eq!(tls_failure(&cut), Some(TlsFailure::NotTls));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(tls_failure(&refused), None);
    }
}

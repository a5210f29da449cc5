//! The HTTP clients of one registry.
//!
//! An HTTPS client trusts the system's certificate authorities, and loading them (every file
//! in `/etc/ssl/certs`) takes 5-7 ms on the benchmark machine, paid before the first request. A registry reached
//! over plain HTTP (localhost, `--insecure`) does not need them: its client is built without,
//! and the one with them only when a URL needs it (a token server or blob storage behind
//! `https://`).

//!
//! The host's TLS settings ([`Tls`]: extra certificate authorities, a client certificate, no
//! verification) come from its hosts.toml, or from `--cert-dir`, `certs.d/HOST:PORT` and
//! `--tls-verify` as containers tools apply them. Whether a registry that may be plain HTTP
//! speaks TLS is asked in `question.rs`.
use super::endpoint::Tls;
use crate::error::{Error, Result};
use std::sync::OnceLock;
use std::time::Duration;

/// The clients: one without trust roots for `http://` URLs, when the registry is plain HTTP,
/// and one with them for `https://`, built on first use.
pub struct Http {
    plain: Option<reqwest::Client>,
    tls: OnceLock<reqwest::Client>,
    /// The host's TLS configuration (authorities, client certificates, `skip_verify`).
    settings: Tls,
    connect: Option<Duration>,
    /// What asking the host why it refused TLS found (see [`super::refusal`]).
    refusals: super::refusal::Refusals,
}

impl Http {
    /// Clients for a registry reached over plain HTTP (`plain`) or HTTPS, with the host's
    /// TLS configuration and connect timeout (`None`: the default).
    pub fn new(plain: bool, settings: &Tls, connect: Option<Duration>) -> Result<Http> {
        let mut http = Http {
            plain: None,
            tls: OnceLock::new(),
            settings: settings.clone(),
            connect,
            refusals: Default::default(),
        };
        if !plain {
            let client = http.tls_builder()?.build()?;
            http.tls = OnceLock::from(client);
            return Ok(http);
        }
        let client = builder(connect)
            .tls_certs_only(Vec::<reqwest::Certificate>::new())
            .build()?;
        http.plain = Some(client);
        Ok(http)
    }

    /// A builder trusting the system's authorities and the host's, with its client
    /// certificate; reading a configured file that is missing or not PEM is an error naming it.
    fn tls_builder(&self) -> Result<reqwest::ClientBuilder> {
        let s = &self.settings;
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| Error::Config {
                at: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        let bad = |p: &std::path::Path, e: reqwest::Error| Error::Config {
            at: p.display().to_string(),
            reason: format!("not a PEM file of the expected kind: {e}"),
        };
        let mut b = builder(self.connect).tls_danger_accept_invalid_certs(s.skip_verify);
        let mut roots = Vec::new();
        for p in &s.ca {
            let certs = reqwest::Certificate::from_pem_bundle(&read(p)?).map_err(|e| bad(p, e))?;
            if certs.is_empty() {
                return Err(Error::Config {
                    at: p.display().to_string(),
                    reason: "no PEM certificate in it".into(),
                });
            }
            roots.extend(certs);
        }
        if !roots.is_empty() {
            b = b.tls_certs_merge(roots);
        }
        // One identity per client: the first pair configured.
        if let Some((cert, key)) = s.client.first() {
            let mut pem = read(cert)?;
            if let Some(k) = key {
                pem.push(b'\n');
                pem.extend(read(k)?);
            }
            b = b.identity(reqwest::Identity::from_pem(&pem).map_err(|e| bad(cert, e))?);
        }
        Ok(b)
    }

    /// The client for `http://` URLs, when the registry is reached over plain HTTP.
    pub fn plain(&self) -> Option<&reqwest::Client> {
        self.plain.as_ref()
    }

    /// The client for `url`: the plain one for `http://` when there is one, else the one that
    /// trusts the system's authorities.
    pub fn for_url(&self, url: &str) -> Result<&reqwest::Client> {
        if let Some(plain) = &self.plain
            && url.starts_with("http://")
        {
            return Ok(plain);
        }
        if let Some(tls) = self.tls.get() {
            return Ok(tls);
        }
        let client = self
            .tls_builder()?
            .build()
            .map_err(|e| Error::Registry(format!("building an HTTPS client for {url}: {e}")))?;
        // Two first uses at once build two; either is fine to keep.
        Ok(self.tls.get_or_init(|| client))
    }
}

impl Http {
    /// Why `host` (`host[:port]`) refuses our TLS connections, asked when a request to it
    /// failed without a word about TLS (see [`super::refusal`]). `None`: it did not refuse.
    pub async fn tls_refusal(&self, host: &str) -> Option<rustls::Error> {
        self.refusals.ask(&self.settings, host).await
    }
}

/// The settings every client shares: no automatic redirects (blob redirects are followed by
/// hand, without our Authorization header), bounded connect (`connect`, default 10 s) and read
/// waits.
pub(super) fn builder(connect: Option<Duration>) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect.unwrap_or(Duration::from_secs(10)))
        .read_timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("ocifs/", env!("CARGO_PKG_VERSION")))
        // HTTP/2 carries every request to a host over one connection, whose flow-control
        // windows cap it at a window per round trip (hyper's defaults, 2 MiB per stream and
        // 5 MiB per connection, are 20 and 50 MB/s at 100 ms). As large as Linux lets one
        // TCP connection's receive window grow (tcp_rmem's 6 MiB), and room for several.
        .http2_initial_stream_window_size(H2_STREAM_WINDOW)
        .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
}

/// An HTTP/2 stream's flow-control window (see [`builder`]).
const H2_STREAM_WINDOW: u32 = 8 << 20;
/// An HTTP/2 connection's flow-control window, shared by its streams.
const H2_CONNECTION_WINDOW: u32 = 32 << 20;

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
    let mut handshake_cut = false;
    for err in causes(e) {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(classify(r));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            )
        {
            handshake_cut = true;
        }
    }
    // A server that closes the connection on a TLS hello (a plain-HTTP server that reads
    // it as a bad request) cuts the handshake short.
    handshake_cut.then_some(TlsFailure::NotTls)
}

/// Whether `e` failed in TLS for good (a certificate refused either way, a server that does
/// not speak TLS): trying again would fail the same way. A connection cut short in its
/// handshake, a garbled record or another alert is not counted (that may pass).
pub fn tls_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e)
        .find_map(|err| err.downcast_ref::<rustls::Error>())
        // Not a garbled record or an overloaded server's internal error: those may pass.
        .is_some_and(|r| !matches!(classify(r), TlsFailure::Other(_)))
}

/// `e` and its causes, outermost first. An io::Error shows its inner error but skips it in
/// `source()` (and the connectors nest them): the walk goes into it.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |err| {
        match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        }
    })
}

/// `host[:port]` of `url`, as registries are named (`None`: the URL has no host).
pub fn host_port(url: &reqwest::Url) -> Option<String> {
    let host = url.host_str()?;
    Some(match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    })
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

impl super::Registry {
    /// What the server answered to the API version check (`GET /v2/`, which every registry
    /// answers 200, or 401 when it wants credentials) when that shows it is not a registry,
    /// say a web server that answers 404 to everything; `None` when it is one or did not
    /// answer. For explaining a "not found".
    pub(super) async fn not_a_registry(&self) -> Option<String> {
        let url = format!("{}/", self.api);
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
        let http = Http::new(true, &Tls::default(), None).unwrap();
        assert!(http.tls.get().is_none());
        let plain = http.for_url("http://127.0.0.1:5000/v2/").unwrap() as *const _;
        assert!(http.tls.get().is_none());
        let tls = http.for_url("https://storage.example/blob").unwrap() as *const _;
        assert_ne!(plain, tls);
        assert!(http.tls.get().is_some());
        let https = Http::new(false, &Tls::default(), None).unwrap();
        assert!(https.plain.is_none() && https.tls.get().is_some());
    }

    #[test]
    fn configured_tls_files_that_are_missing_or_not_pem_are_named() {
        let missing = Tls {
            ca: vec!["/nonexistent/ocifs-ca.pem".into()],
            ..Tls::default()
        };
        let e = Http::new(false, &missing, None).err().unwrap().to_string();
        assert!(e.starts_with("/nonexistent/ocifs-ca.pem: "), "{e}");
        let junk = std::env::temp_dir().join(format!("ocifs-junk-{}.pem", std::process::id()));
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let bad = Tls {
            client: vec![(junk.clone(), None)],
            ..Tls::default()
        };
        let e = Http::new(false, &bad, None).err().unwrap().to_string();
        assert!(e.contains(junk.to_str().unwrap()), "{e}");
        // A plain-HTTP registry reads them only when an https URL needs its TLS client.
        let lazy = Http::new(true, &missing, None).unwrap();
        assert!(lazy.for_url("https://storage.example/x").is_err());
        let _ = std::fs::remove_file(junk);
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
        // Only failures in TLS itself are final; a handshake cut short may be the network.
        assert!(tls_refused(&not_tls) && tls_refused(&expired) && tls_refused(&alert));
        assert!(tls_refused(&nested));
        assert!(!tls_refused(&cut) && !tls_refused(&refused));
        let garbled = wrap(rustls::Error::DecryptError);
        let overloaded = wrap(rustls::Error::AlertReceived(
            rustls::AlertDescription::InternalError,
        ));
        assert!(!tls_refused(&garbled) && !tls_refused(&overloaded));
    }
}

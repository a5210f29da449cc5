//! Asking a host why it refused TLS, when a request could not say.
//!
//! A TLS 1.3 server refuses a client certificate by an alert *after* the handshake. HTTP/2
//! writes its preface at once, the server's close then resets the connection, and the alert
//! is lost: the request fails as "connection closed". So a request to an https URL that
//! fails without a word about TLS asks here: one handshake of our own, with the host's
//! client certificate and the same trust as its client (the system's authorities and the
//! host's, or none with `skip_verify`), that sends nothing after the handshake and listens
//! for two handshake times. A refusal is remembered for good (the certificates are read
//! once per client), an acceptance for [`ACCEPTED_FOR`]; requests failing at once share one
//! probe. It connects directly, not through a proxy.

use super::endpoint::Tls;
use crate::error::{Error, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a host that accepted the probe is not asked again.
const ACCEPTED_FOR: Duration = Duration::from_secs(30);
/// Longest wait for each step of the probe (name lookup and connection, the server's word).
const STEP: Duration = Duration::from_secs(1);

/// What the last probe of a host found, and when.
#[derive(Default)]
pub struct Refusals {
    last: tokio::sync::Mutex<Option<(Instant, Option<rustls::Error>)>>,
}

impl Refusals {
    /// Why `host` (`host[:port]`) refuses TLS with `settings`; `None` when it did not.
    pub async fn ask(&self, settings: &Tls, host: &str) -> Option<rustls::Error> {
        let mut last = self.last.lock().await;
        if let Some((at, found)) = &*last
            && (found.is_some() || at.elapsed() < ACCEPTED_FOR)
        {
            return found.clone();
        }
        let found = probe(settings, host).await;
        *last = Some((Instant::now(), found.clone()));
        found
    }
}

/// One probe of `host`, on a blocking thread, within a few steps' time.
async fn probe(settings: &Tls, host: &str) -> Option<rustls::Error> {
    let config = match config(settings) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::debug!("no TLS probe of {host}: {e}");
            return None;
        }
    };
    let host = host.to_string();
    let blocking = tokio::task::spawn_blocking(move || refusal(&host, config));
    // The name lookup has no timeout of its own.
    match tokio::time::timeout(STEP * 4, blocking).await {
        Ok(Ok(found)) => found,
        _ => None,
    }
}

/// The probe's TLS configuration: the host's client certificate and trust.
fn config(settings: &Tls) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |e: &dyn std::fmt::Display| Error::Registry(format!("TLS probe: {e}"));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = if settings.skip_verify {
        Arc::new(AnyServer(provider.clone()))
    } else {
        let mut roots = Vec::new();
        for ca in &settings.ca {
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad(&e))? {
                roots.push(c.map_err(|e| bad(&e))?);
            }
        }
        let v = rustls_platform_verifier::Verifier::new_with_extra_roots(roots, provider.clone())
            .map_err(|e| bad(&e))?;
        Arc::new(v)
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    Ok(match settings.client.first() {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .map_err(|e| bad(&e))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad(&e))?;
            let key =
                PrivateKeyDer::from_pem_file(key.as_ref().unwrap_or(cert)).map_err(|e| bad(&e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| bad(&e))?
        }
    })
}

/// The handshake itself (blocking): the server's refusal, if it says one.
fn refusal(host: &str, config: Arc<rustls::ClientConfig>) -> Option<rustls::Error> {
    use std::io::Read;
    use std::net::ToSocketAddrs;
    let with_port = match host.rsplit_once(':') {
        Some((_, p)) if p.parse::<u16>().is_ok() && !host.ends_with(']') => host.to_string(),
        _ => format!("{host}:443"),
    };
    let name = with_port.rsplit_once(':')?.0.trim_matches(['[', ']']);
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).ok()?;
    let addr = with_port.to_socket_addrs().ok()?.next()?;
    let tcp = std::net::TcpStream::connect_timeout(&addr, STEP).ok()?;
    tcp.set_read_timeout(Some(STEP)).ok()?;
    tcp.set_write_timeout(Some(STEP)).ok()?;
    let conn = rustls::ClientConnection::new(config, server).ok()?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let said = |e: std::io::Error| {
        (e.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned()
    };
    let start = Instant::now();
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            return said(e);
        }
    }
    // A refusal arrives now, within a round trip (the handshake took at least one); a
    // server that accepted waits for a request we never send.
    let rtts = (start.elapsed() * 2).clamp(Duration::from_millis(100), STEP);
    tls.sock.set_read_timeout(Some(rtts)).ok()?;
    let mut byte = [0u8; 1];
    tls.read(&mut byte).err().and_then(said)
}

/// Accepts any server certificate: for a host configured with `skip_verify`, as its client.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_is_probed_once_for_requests_failing_together_and_not_again_soon() {
        // A server that takes connections and closes them (no TLS at all): no refusal said.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(c);
            }
        });
        let refusals = Refusals::default();
        let tls = Tls {
            skip_verify: true,
            ..Tls::default()
        };
        let asks = (0..4).map(|_| refusals.ask(&tls, &host));
        let found = futures::future::join_all(asks).await;
        assert!(found.iter().all(Option::is_none), "{found:?}");
        assert!(refusals.ask(&tls, &host).await.is_none());
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one probe for five asks"
        );
    }

    #[test]
    fn a_client_certificate_that_cannot_be_read_means_no_probe() {
        let tls = Tls {
            client: vec![("/nonexistent/client.cert".into(), None)],
            ..Tls::default()
        };
        let Err(e) = config(&tls) else {
            panic!("a configuration without its certificate")
        };
        assert!(e.to_string().contains("TLS probe"), "{e}");
    }
}

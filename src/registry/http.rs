//! The HTTP clients of one registry.
//!
//! An HTTPS client trusts the system's certificate authorities, and loading them (every file
//! in `/etc/ssl/certs`) takes 5-7 ms on the benchmark machine, paid before the first request. A registry reached
//! over plain HTTP (localhost, `--insecure`) does not need them: its client is built without,
//! and the one with them only when a URL needs it (a token server or blob storage behind
//! `https://`).

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
            roots.extend(reqwest::Certificate::from_pem_bundle(&read(p)?).map_err(|e| bad(p, e))?);
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

/// The settings every client shares: no automatic redirects (blob redirects are followed by
/// hand, without our Authorization header), bounded connect (`connect`, default 10 s) and read
/// waits.
fn builder(connect: Option<Duration>) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect.unwrap_or(Duration::from_secs(10)))
        .read_timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("ocifs/", env!("CARGO_PKG_VERSION")))
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
}

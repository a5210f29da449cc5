//! The HTTP clients of one registry.
//!
//! An HTTPS client trusts the system's certificate authorities, and loading them (every file
//! in `/etc/ssl/certs`) takes 5-7 ms on the benchmark machine, paid before the first request. A registry reached
//! over plain HTTP (localhost, `--insecure`) does not need them: its client is built without,
//! and the one with them only when a URL needs it (a token server or blob storage behind
//! `https://`).

use crate::error::{Error, Result};
use std::sync::OnceLock;
use std::time::Duration;

/// The clients: one without trust roots for `http://` URLs, when the registry is plain HTTP,
/// and one with them for `https://`, built on first use.
pub struct Http {
    plain: Option<reqwest::Client>,
    tls: OnceLock<reqwest::Client>,
}

impl Http {
    /// Clients for a registry reached over plain HTTP (`plain`) or HTTPS.
    pub fn new(plain: bool) -> Result<Http> {
        if !plain {
            return Ok(Http {
                plain: None,
                tls: OnceLock::from(builder().build()?),
            });
        }
        let client = builder()
            .tls_certs_only(Vec::<reqwest::Certificate>::new())
            .build()?;
        Ok(Http {
            plain: Some(client),
            tls: OnceLock::new(),
        })
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
        let client = builder()
            .build()
            .map_err(|e| Error::Registry(format!("building an HTTPS client for {url}: {e}")))?;
        // Two first uses at once build two; either is fine to keep.
        Ok(self.tls.get_or_init(|| client))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_registry_gets_an_https_client_only_when_a_url_needs_one() {
        let http = Http::new(true).unwrap();
        assert!(http.tls.get().is_none());
        let plain = http.for_url("http://127.0.0.1:5000/v2/").unwrap() as *const _;
        assert!(http.tls.get().is_none());
        let tls = http.for_url("https://storage.example/blob").unwrap() as *const _;
        assert_ne!(plain, tls);
        assert!(http.tls.get().is_some());
        let https = Http::new(false).unwrap();
        assert!(https.plain.is_none() && https.tls.get().is_some());
    }
}

//! One registry host as ocifs reaches it ([`Endpoint`]: scheme, host, API root, TLS, extra
//! headers), what it may be asked for ([`Capabilities`]), and a [`Route`]: one host of a
//! repository's pull order with the repository's name there. The mirror configuration
//! (`hosts.rs`, `registries_conf.rs`) yields routes; [`Endpoint::direct`] is a registry
//! reached as its name says, without any.

use std::path::PathBuf;
use std::time::Duration;

/// Docker Hub's API host, where `docker.io` names are pulled from unless a mirror says
/// otherwise.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// What a host may be asked (containerd's host capabilities). Resolving a tag is a trusted
/// act: a mirror that may not resolve only serves content named by digest, which is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Manifests and blobs by digest.
    pub pull: bool,
    /// Tags to digests.
    pub resolve: bool,
    /// Uploads.
    pub push: bool,
}

impl Capabilities {
    /// Everything: a registry itself, or a host whose configuration lists no capabilities.
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
    /// Content by digest only.
    pub const PULL: Capabilities = Capabilities {
        pull: true,
        resolve: false,
        push: false,
    };
    /// Pull and resolve, no uploads: a trusted mirror.
    pub const PULL_RESOLVE: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: false,
    };

    /// The capabilities as a containerd configuration spells them (`pull, resolve`).
    pub fn names(&self) -> String {
        let names: Vec<&str> = [
            (self.pull, "pull"),
            (self.resolve, "resolve"),
            (self.push, "push"),
        ]
        .iter()
        .filter_map(|&(on, n)| on.then_some(n))
        .collect();
        names.join(", ")
    }
}

/// TLS settings of one host beyond the system's trust roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// Accept any certificate (containerd's `skip_verify`).
    pub skip_verify: bool,
    /// PEM files of further certificate authorities to trust.
    pub ca: Vec<PathBuf>,
    /// Client certificates: a PEM certificate file and its key file (`None`: the key is in
    /// the certificate's file).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
}

/// How to reach one registry host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`.
    pub host: String,
    /// The API root on the host: `/v2` unless the configuration says otherwise.
    pub path: String,
    pub tls: Tls,
    /// Headers sent with every request to the host (not to storage it redirects to).
    pub headers: Vec<(String, String)>,
    /// How long a connection may take to open (default: the client's).
    pub dial_timeout: Option<Duration>,
}

impl Endpoint {
    /// The registry `host[:port]` reached as its name says: Docker Hub's API host for
    /// `docker.io`, plain HTTP for loopback hosts or when `insecure`, else HTTPS.
    pub fn direct(registry: &str, insecure: bool) -> Endpoint {
        let host = api_host(registry);
        let scheme = if insecure || is_local(&host) {
            "http"
        } else {
            "https"
        };
        Endpoint {
            scheme: scheme.into(),
            host,
            path: "/v2".into(),
            tls: Tls::default(),
            headers: Vec::new(),
            dial_timeout: None,
        }
    }

    /// Parses `[scheme://]host[:port][/path]` as containerd does: HTTPS when no scheme is
    /// given (plain HTTP for loopback hosts or when `insecure`), `/v2` appended to the path
    /// unless it already ends so or `override_path` says the path is the API root.
    pub fn parse(url: &str, insecure: bool, override_path: bool) -> Result<Endpoint, String> {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, rest)) if s == "http" || s == "https" => (Some(s), rest),
            Some((s, _)) => return Err(format!("scheme {s:?} is not http or https")),
            None => (None, url),
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let parsed = reqwest::Url::parse(&format!("http://{host}/"))
            .map_err(|e| format!("host {host:?}: {e}"))?;
        if host.is_empty()
            || parsed.host_str().is_none()
            || host.contains(['@', '?', '#'])
            || rest.contains(['?', '#'])
        {
            return Err(format!(
                "{url:?} is not a host with an optional port and path"
            ));
        }
        let host = api_host(host);
        let scheme = match scheme {
            Some(s) => s,
            None if insecure || is_local(&host) => "http",
            None => "https",
        };
        let mut path = clean_path(path);
        if !override_path && !path.ends_with("/v2") {
            path.push_str("/v2");
        }
        Ok(Endpoint {
            scheme: scheme.into(),
            host,
            path,
            tls: Tls::default(),
            headers: Vec::new(),
            dial_timeout: None,
        })
    }

    /// `scheme://host[:port]`.
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.host)
    }

    /// `scheme://host[:port]/path`: what API paths (`<repo>/manifests/<ref>`) follow.
    pub fn api(&self) -> String {
        format!("{}{}", self.origin(), self.path)
    }

    /// The host's name for messages and statistics: `host[:port]`, with the API root when it
    /// is not `/v2`.
    pub fn name(&self) -> String {
        match self.path.as_str() {
            "/v2" => self.host.clone(),
            p => format!("{}{p}", self.host),
        }
    }

    /// The name credentials for this host are stored under (Docker Hub's API host is
    /// `docker.io` in credential files).
    pub fn credential_key(&self) -> &str {
        if self.host == DOCKER_HUB_API {
            crate::reference::DOCKER_HUB
        } else {
            &self.host
        }
    }
}

/// One host of a repository's pull order, and the repository's name there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub endpoint: Endpoint,
    /// The repository at this host (a rewrite rule or a remapped location may change it).
    pub repo: String,
    pub caps: Capabilities,
    /// A mirror, tried before the registry itself (which is not a mirror and comes last).
    pub mirror: bool,
    /// The registry a mirror stands in for, sent as the `ns` query parameter as containerd
    /// does (some mirrors serve several registries and need to know which).
    pub namespace: Option<String>,
}

impl Route {
    /// The registry itself, as its name says (no configuration).
    pub fn direct(registry: &str, repo: &str, insecure: bool) -> Route {
        Route {
            endpoint: Endpoint::direct(registry, insecure),
            repo: repo.into(),
            caps: Capabilities::ALL,
            mirror: false,
            namespace: None,
        }
    }
}

/// The host requests for `registry` go to: Docker Hub's API host for its names.
fn api_host(registry: &str) -> String {
    match registry {
        crate::reference::DOCKER_HUB | "index.docker.io" => DOCKER_HUB_API.into(),
        h => h.into(),
    }
}

/// Whether `host[:port]` is this machine, reached over plain HTTP without configuration.
pub fn is_local(host: &str) -> bool {
    ["localhost", "127.0.0.1", "[::1]"]
        .iter()
        .any(|h| host == *h || host.starts_with(&format!("{h}:")))
}

/// `path` without empty, `.` components or a trailing slash (`""` for the root).
fn clean_path(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .fold(String::new(), |acc, c| format!("{acc}/{c}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_containerds_path_rules() {
        let e = Endpoint::parse("https://mirror.example", false, false).unwrap();
        assert_eq!(e.api(), "https://mirror.example/v2");
        let e = Endpoint::parse("mirror.example:5000/cache", false, false).unwrap();
        assert_eq!(e.api(), "https://mirror.example:5000/cache/v2");
        let e = Endpoint::parse("http://m.example/v2/up/", false, true).unwrap();
        assert_eq!(
            (e.api(), e.name()),
            ("http://m.example/v2/up".into(), "m.example/v2/up".into())
        );
        let e = Endpoint::parse("m.example/x/v2", false, false).unwrap();
        assert_eq!(e.api(), "https://m.example/x/v2");
        let e = Endpoint::parse("127.0.0.1:5000", false, false).unwrap();
        assert_eq!(e.api(), "http://127.0.0.1:5000/v2");
        let e = Endpoint::parse("m.example", true, false).unwrap();
        assert_eq!(e.scheme, "http");
        for bad in ["ftp://x", "", "https://", "a b", "x?y=1", "u@host"] {
            assert!(Endpoint::parse(bad, false, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn docker_hub_goes_to_its_api_host() {
        let e = Endpoint::direct("docker.io", false);
        assert_eq!(e.api(), "https://registry-1.docker.io/v2");
        assert_eq!(e.credential_key(), "docker.io");
        let e = Endpoint::parse("https://docker.io", false, false).unwrap();
        assert_eq!(e.host, DOCKER_HUB_API);
        assert_eq!(Endpoint::direct("localhost:5000", false).scheme, "http");
        assert_eq!(Capabilities::PULL_RESOLVE.names(), "pull, resolve");
    }
}

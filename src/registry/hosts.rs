//! containerd's hosts directory (`ctr --hosts-dir`, the CRI `config_path`; by default
//! `/etc/containerd/certs.d`). A registry `HOST[:PORT]` is configured by the first of the
//! directories `HOST_PORT_`, `HOST:PORT` and `_default` that exists; its `hosts.toml` lists
//! `[host."URL"]` mirrors, tried in file order, and `server`, the registry itself, tried last
//! (without `server`, the registry the name says). Each host may set `capabilities` (`pull`,
//! `resolve`, `push`; all by default), `skip_verify`, `ca` and `client` (paths relative to the
//! directory), `[header]`, `override_path` (the URL's path is the API root), `dial_timeout`
//! and `rewrite`: regular expressions over the repository path with their replacements
//! (`"^library/(.*)" = "mirrored/$1"`), the first that matches applied to every request to
//! that host, so the image keeps its name (containerd's "mirror repository rewrites" change).
//! The file's top-level fields configure `server`. A directory without `hosts.toml` applies
//! Docker's certificate files in it to the registry: `*.crt` authorities, `*.cert` client
//! certificates with the `*.key` of the same name.

use super::conf::{Ordered, Source, strings};
use super::endpoint::{Capabilities, Endpoint, Route, Tls};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Where containerd keeps host directories by default.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// One host of a `hosts.toml`, as configured.
#[derive(Debug, Clone)]
pub struct Host {
    pub endpoint: Endpoint,
    pub caps: Capabilities,
    /// Repository rewrites for requests to this host, in file order.
    pub rewrites: Vec<Rewrite>,
    /// A `[host]` entry (tried first, in order); `false` for `server`, tried last.
    pub mirror: bool,
}

/// A repository rewrite: requests for a repository matching `pattern` go to the repository
/// the replacement makes of it (`$1`, `${name}` name groups).
#[derive(Debug, Clone)]
pub struct Rewrite {
    pub pattern: regex::Regex,
    pub replace: String,
    /// `file:line` of the rule, for errors.
    at: String,
}

impl Rewrite {
    /// `repo` rewritten by the first rule of `rules` that matches it (unchanged if none).
    /// The result must be a valid repository name: a rule making anything else is an error
    /// naming the rule.
    pub fn apply(rules: &[Rewrite], repo: &str) -> Result<String> {
        let Some(rule) = rules.iter().find(|r| r.pattern.is_match(repo)) else {
            return Ok(repo.to_string());
        };
        let out = rule
            .pattern
            .replace_all(repo, rule.replace.as_str())
            .into_owned();
        crate::reference::Reference::parse(&format!("host.invalid/{out}")).map_err(|_| {
            Error::Config {
                at: rule.at.clone(),
                reason: format!("rewrite of {repo:?} gives {out:?}, not a repository name"),
            }
        })?;
        Ok(out)
    }
}

/// The fields of a `[host."URL"]` table, which the file's top level also has (for `server`).
#[derive(serde::Deserialize, Default)]
struct Fields {
    capabilities: Option<Spanned<Vec<String>>>,
    ca: Option<Spanned<toml::Value>>,
    client: Option<Spanned<toml::Value>>,
    skip_verify: Option<bool>,
    header: Option<Ordered<Spanned<toml::Value>>>,
    override_path: Option<bool>,
    dial_timeout: Option<Spanned<String>>,
    rewrite: Option<Ordered<Spanned<String>>>,
}

/// What a `hosts.toml` has beside the top-level host fields.
#[derive(serde::Deserialize)]
struct HostsFile {
    server: Option<Spanned<String>>,
    host: Option<Ordered<Fields>>,
}

/// A containerd hosts directory.
#[derive(Debug, Clone)]
pub struct HostsDir(pub PathBuf);

impl HostsDir {
    /// The directory configuring `registry`: `HOST_PORT_` or `HOST:PORT`, else (when
    /// `fallback`) `_default`; `None` if none exists.
    pub fn dir_for(&self, registry: &str, fallback: bool) -> Option<PathBuf> {
        let mut names = Vec::new();
        if let Some((host, port)) = registry.rsplit_once(':')
            && !host.is_empty()
        {
            names.push(format!("{host}_{port}_"));
        }
        names.push(registry.to_string());
        if fallback {
            names.push("_default".into());
        }
        names
            .into_iter()
            .map(|n| self.0.join(n))
            .find(|p| p.is_dir())
    }

    /// The hosts configured for `registry`, mirrors first, the directory of its own or (when
    /// `fallback`) `_default`'s; `None` when no directory applies. `insecure`: the registry
    /// itself is reached over plain HTTP when `server` does not say otherwise.
    pub fn hosts(
        &self,
        registry: &str,
        fallback: bool,
        insecure: bool,
    ) -> Result<Option<Vec<Host>>> {
        let Some(dir) = self.dir_for(registry, fallback) else {
            return Ok(None);
        };
        let path = dir.join("hosts.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => {
                parse(&path, &text, registry, insecure).map(Some)
            }
            Ok(_) => Ok(Some(vec![cert_files(&dir, registry, insecure)?])),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Some(vec![cert_files(&dir, registry, insecure)?]))
            }
            Err(e) => Err(Error::Config {
                at: path.display().to_string(),
                reason: e.to_string(),
            }),
        }
    }
}

/// Parses the `hosts.toml` at `path` (text `text`) configuring `registry` (reached over plain
/// HTTP when `insecure` and `server` does not say otherwise).
pub fn parse(path: &Path, text: &str, registry: &str, insecure: bool) -> Result<Vec<Host>> {
    let src = Source { path, text };
    let file: HostsFile = src.parse()?;
    let top: Fields = src.parse()?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let mut hosts = Vec::new();
    for (url, fields) in file.host.map(|h| h.0).unwrap_or_default() {
        hosts.push(Host {
            mirror: true,
            ..host(&src, base, Some(&url), fields, registry, insecure)?
        });
    }
    hosts.push(host(
        &src,
        base,
        file.server.as_ref(),
        top,
        registry,
        insecure,
    )?);
    Ok(hosts)
}

/// One host from its URL and fields: a mirror (a `[host]` key), the `server` URL, or (no URL)
/// the registry itself.
fn host(
    src: &Source,
    base: &Path,
    url: Option<&Spanned<String>>,
    f: Fields,
    registry: &str,
    insecure: bool,
) -> Result<Host> {
    let override_path = f.override_path.unwrap_or(false);
    let mut endpoint = match url {
        Some(u) => Endpoint::parse(u.get_ref(), false, override_path)
            .map_err(|why| src.error(Some(u.span()), why))?,
        None => Endpoint::direct(registry, insecure),
    };
    let caps = match &f.capabilities {
        None => Capabilities::ALL,
        Some(c) => {
            let mut caps = Capabilities {
                pull: false,
                resolve: false,
                push: false,
            };
            for name in c.get_ref() {
                match name.to_ascii_lowercase().as_str() {
                    "pull" => caps.pull = true,
                    "resolve" => caps.resolve = true,
                    "push" => caps.push = true,
                    // The referrers API is asked where tags are resolved.
                    "referrers" => {}
                    other => {
                        return Err(
                            src.error(Some(c.span()), format!("unknown capability {other:?}"))
                        );
                    }
                }
            }
            caps
        }
    };
    let abs = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    endpoint.tls.skip_verify = f.skip_verify.unwrap_or(false);
    if let Some(ca) = &f.ca {
        endpoint.tls.ca = strings(src, "ca", ca)?.iter().map(|p| abs(p)).collect();
    }
    if let Some(client) = &f.client {
        endpoint.tls.client = client_pairs(src, client, &abs)?;
    }
    for (name, value) in f.header.map(|h| h.0).unwrap_or_default() {
        let values = strings(src, &format!("header {:?}", name.get_ref()), &value)?;
        let valid = reqwest::header::HeaderName::from_bytes(name.get_ref().as_bytes()).is_ok()
            && values
                .iter()
                .all(|v| reqwest::header::HeaderValue::from_str(v).is_ok());
        if !valid {
            return Err(src.error(
                Some(name.span()),
                format!("header {:?} is not a valid HTTP header", name.get_ref()),
            ));
        }
        for v in values {
            endpoint.headers.push((name.get_ref().clone(), v));
        }
    }
    if let Some(t) = &f.dial_timeout {
        endpoint.dial_timeout = Some(go_duration(t.get_ref()).ok_or_else(|| {
            src.error(
                Some(t.span()),
                format!(
                    "dial_timeout {:?} is not a duration such as \"1s\" or \"500ms\"",
                    t.get_ref()
                ),
            )
        })?);
    }
    let mut rewrites = Vec::new();
    for (pattern, replace) in f.rewrite.map(|r| r.0).unwrap_or_default() {
        let at = src.at(Some(pattern.span()));
        let compiled = regex::Regex::new(pattern.get_ref()).map_err(|e| {
            src.error(
                Some(pattern.span()),
                format!("rewrite {:?}: {e}", pattern.get_ref()),
            )
        })?;
        rewrites.push(Rewrite {
            pattern: compiled,
            replace: replace.into_inner(),
            at,
        });
    }
    Ok(Host {
        endpoint,
        caps,
        rewrites,
        mirror: false,
    })
}

/// `client`: a path, a list of paths, or a list of `[certificate, key]` pairs (a path alone
/// or an empty key: the key is in the certificate's file).
fn client_pairs(
    src: &Source,
    v: &Spanned<toml::Value>,
    abs: &dyn Fn(&str) -> PathBuf,
) -> Result<Vec<(PathBuf, Option<PathBuf>)>> {
    let bad = || {
        src.error(
            Some(v.span()),
            "client must be a path, a list of paths or a list of [certificate, key] pairs",
        )
    };
    let one = |x: &toml::Value| match x {
        toml::Value::String(s) => Ok((abs(s), None)),
        toml::Value::Array(pair) => match pair.as_slice() {
            [toml::Value::String(c), toml::Value::String(k)] => {
                Ok((abs(c), (!k.is_empty()).then(|| abs(k))))
            }
            _ => Err(bad()),
        },
        _ => Err(bad()),
    };
    match v.get_ref() {
        toml::Value::String(_) => Ok(vec![one(v.get_ref())?]),
        toml::Value::Array(items) => items.iter().map(one).collect(),
        _ => Err(bad()),
    }
}

/// The registry itself with Docker's certificate files of `dir`.
fn cert_files(dir: &Path, registry: &str, insecure: bool) -> Result<Host> {
    let mut tls = Tls::default();
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    for n in &names {
        if n.ends_with(".crt") {
            tls.ca.push(dir.join(n));
        } else if let Some(stem) = n.strip_suffix(".cert") {
            let key = dir.join(format!("{stem}.key"));
            tls.client.push((dir.join(n), key.exists().then_some(key)));
        }
    }
    let mut endpoint = Endpoint::direct(registry, insecure);
    endpoint.tls = tls;
    Ok(Host {
        endpoint,
        caps: Capabilities::ALL,
        rewrites: Vec::new(),
        mirror: false,
    })
}

/// The routes of `repo` of `registry` through `hosts`.
pub fn routes(hosts: &[Host], registry: &str, repo: &str) -> Result<Vec<Route>> {
    let registry_host = Endpoint::direct(registry, false).host;
    hosts
        .iter()
        .map(|h| {
            Ok(Route {
                endpoint: h.endpoint.clone(),
                repo: Rewrite::apply(&h.rewrites, repo)?,
                caps: h.caps,
                mirror: h.mirror,
                namespace: (h.mirror && h.endpoint.host != registry_host)
                    .then(|| registry.to_string()),
            })
        })
        .collect()
}

/// A Go duration (`300ms`, `1.5s`, `1m30s`): what containerd's `dial_timeout` takes.
fn go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * secs;
        rest = &rest[unit_end..];
    }
    (total.is_finite() && total < 1e9).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests;

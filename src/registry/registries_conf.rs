//! containers' `registries.conf` (podman, skopeo, CRI-O; `/etc/containers/registries.conf`,
//! then the drop-ins of `registries.conf.d/` in name order, a later `[[registry]]` with the
//! same prefix replacing an earlier one). For an image name, the `[[registry]]` table with the
//! longest matching `prefix` (default: its `location`; `*.example.com` matches subdomains)
//! applies: `location` replaces the prefix part of the name, `insecure` allows plain HTTP,
//! `blocked` refuses the pull, and `[[registry.mirror]]` entries (`location`, `insecure`,
//! `pull-from-mirror`: `all`, `digest-only`, `tag-only`) are tried in order before the
//! registry. A mirror used for digests only (`pull-from-mirror = "digest-only"` or the
//! registry's `mirror-by-digest-only`) may not resolve tags: it serves what the registry's
//! digest names. Other settings (search registries, aliases, credential helpers) are not
//! ocifs's business and are ignored.

use super::conf::Source;
use super::endpoint::{Capabilities, Endpoint, Route};
use crate::error::{Error, Result};
use crate::reference::Reference;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Where containers tools keep the file, and its drop-in directory.
pub const DEFAULT_REGISTRIES_CONF: &str = "/etc/containers/registries.conf";
pub const DEFAULT_REGISTRIES_CONF_D: &str = "/etc/containers/registries.conf.d";

#[derive(serde::Deserialize)]
struct File {
    registry: Option<Vec<Spanned<RegistryTable>>>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RegistryTable {
    prefix: Option<Spanned<String>>,
    location: Option<Spanned<String>>,
    insecure: Option<bool>,
    blocked: Option<bool>,
    mirror: Option<Vec<Spanned<MirrorTable>>>,
    mirror_by_digest_only: Option<bool>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct MirrorTable {
    location: Option<Spanned<String>>,
    insecure: Option<bool>,
    pull_from_mirror: Option<Spanned<String>>,
}

/// When a mirror is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullFrom {
    /// For references by tag and by digest.
    All,
    /// For references by digest only: it may not resolve tags.
    DigestOnly,
    /// For references by tag only.
    TagOnly,
}

/// One `[[registry.mirror]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub location: String,
    pub insecure: bool,
    pub pull_from: PullFrom,
}

/// One `[[registry]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub prefix: String,
    /// Empty for a wildcard prefix without location: the name is used as it is.
    pub location: String,
    pub insecure: bool,
    pub blocked: bool,
    pub mirrors: Vec<Mirror>,
    /// `file:line` of the table, for errors.
    pub at: String,
}

/// The `[[registry]]` tables of every file read, later files replacing same prefixes.
#[derive(Debug, Clone, Default)]
pub struct RegistriesConf {
    pub registries: Vec<Registry>,
}

impl RegistriesConf {
    /// The system configuration: `DEFAULT_REGISTRIES_CONF` and the `.conf` files of
    /// `DEFAULT_REGISTRIES_CONF_D`, those that exist.
    pub fn system() -> Result<RegistriesConf> {
        let mut files = vec![PathBuf::from(DEFAULT_REGISTRIES_CONF)];
        files.extend(drop_ins(Path::new(DEFAULT_REGISTRIES_CONF_D))?);
        RegistriesConf::load(&files)
    }

    /// Reads `files` in order (those that do not exist are skipped).
    pub fn load(files: &[PathBuf]) -> Result<RegistriesConf> {
        let mut conf = RegistriesConf::default();
        for path in files {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(Error::Config {
                        at: path.display().to_string(),
                        reason: e.to_string(),
                    });
                }
            };
            for r in parse(path, &text)? {
                conf.registries.retain(|old| old.prefix != r.prefix);
                conf.registries.push(r);
            }
        }
        Ok(conf)
    }

    /// The table applying to `r` (longest matching prefix), with the name it maps `r` to.
    fn find(&self, r: &Reference) -> Option<(&Registry, usize)> {
        self.registries
            .iter()
            .filter_map(|reg| prefix_match(&reg.prefix, r).map(|n| (reg, n)))
            .max_by_key(|(reg, _)| reg.prefix.len())
    }

    /// The routes of `r`, mirrors first; `None` when no table applies.
    pub fn routes(&self, r: &Reference) -> Result<Option<Vec<Route>>> {
        let Some((reg, matched)) = self.find(r) else {
            return Ok(None);
        };
        if reg.blocked {
            return Err(Error::Config {
                at: reg.at.clone(),
                reason: format!("pulling {}/{} is blocked", r.registry, r.repository),
            });
        }
        let by_digest = r.digest.is_some();
        let mut routes = Vec::new();
        for m in &reg.mirrors {
            let caps = match m.pull_from {
                PullFrom::All => Capabilities::PULL_RESOLVE,
                PullFrom::DigestOnly => Capabilities::PULL,
                PullFrom::TagOnly if by_digest => continue,
                PullFrom::TagOnly => Capabilities::PULL_RESOLVE,
            };
            let mut route = remap(&m.location, m.insecure, matched, r, &reg.at)?;
            route.caps = caps;
            route.mirror = true;
            route.namespace = (route.endpoint.host != Endpoint::direct(&r.registry, false).host)
                .then(|| r.registry.clone());
            routes.push(route);
        }
        routes.push(remap(&reg.location, reg.insecure, matched, r, &reg.at)?);
        Ok(Some(routes))
    }
}

/// The `.conf` files of a drop-in directory, in name order (none if it does not exist).
pub fn drop_ins(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf"))
        .collect();
    files.sort();
    Ok(files)
}

/// Parses one `registries.conf` file.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Registry>> {
    let src = Source { path, text };
    let file: File = src.parse()?;
    let mut out = Vec::new();
    for table in file.registry.unwrap_or_default() {
        let at = src.at(Some(table.span()));
        let t = table.into_inner();
        let location = t.location.as_ref().map(|l| l.get_ref().clone());
        let prefix = match (&t.prefix, &location) {
            (Some(p), _) => p.get_ref().clone(),
            (None, Some(l)) => l.clone(),
            (None, None) => {
                return Err(Error::Config {
                    at,
                    reason: "a [[registry]] needs a prefix or a location".into(),
                });
            }
        };
        let span = t.prefix.as_ref().or(t.location.as_ref()).map(|s| s.span());
        let wildcard = prefix.starts_with("*.");
        let field = if t.prefix.is_some() {
            "prefix"
        } else {
            "location"
        };
        check_name(&prefix, wildcard)
            .map_err(|why| src.error(span.clone(), format!("{field} {prefix:?}: {why}")))?;
        let location = match location {
            Some(_) if wildcard => {
                return Err(src.error(span, "a wildcard prefix (*.domain) takes no location"));
            }
            Some(l) => l,
            None if wildcard => String::new(),
            None => prefix.clone(),
        };
        if !location.is_empty() {
            check_name(&location, false).map_err(|why| {
                src.error(
                    t.location.as_ref().map(|s| s.span()),
                    format!("location {location:?}: {why}"),
                )
            })?;
        }
        let by_digest = t.mirror_by_digest_only.unwrap_or(false);
        let mut mirrors = Vec::new();
        for m in t.mirror.unwrap_or_default() {
            let mspan = m.span();
            let m = m.into_inner();
            let Some(loc) = m.location else {
                return Err(src.error(Some(mspan), "a [[registry.mirror]] needs a location"));
            };
            check_name(loc.get_ref(), false).map_err(|why| {
                src.error(
                    Some(loc.span()),
                    format!("mirror location {:?}: {why}", loc.get_ref()),
                )
            })?;
            let pull_from = match &m.pull_from_mirror {
                None => PullFrom::All,
                Some(_) if by_digest => {
                    return Err(src.error(
                        m.pull_from_mirror.as_ref().map(|p| p.span()),
                        "pull-from-mirror may not be set when the registry has mirror-by-digest-only",
                    ));
                }
                Some(p) => match p.get_ref().as_str() {
                    "" | "all" => PullFrom::All,
                    "digest-only" => PullFrom::DigestOnly,
                    "tag-only" => PullFrom::TagOnly,
                    other => {
                        return Err(src.error(
                            Some(p.span()),
                            format!(
                                "pull-from-mirror {other:?} is not all, digest-only or tag-only"
                            ),
                        ));
                    }
                },
            };
            mirrors.push(Mirror {
                location: loc.into_inner(),
                insecure: m.insecure.unwrap_or(false),
                pull_from: if by_digest {
                    PullFrom::DigestOnly
                } else {
                    pull_from
                },
            });
        }
        out.push(Registry {
            prefix,
            location,
            insecure: t.insecure.unwrap_or(false),
            blocked: t.blocked.unwrap_or(false),
            mirrors,
            at,
        });
    }
    Ok(out)
}

/// Checks a prefix or location: `host[:port][/path]`, or `*.domain` for a wildcard prefix.
fn check_name(name: &str, wildcard: bool) -> std::result::Result<(), String> {
    if wildcard {
        let rest = &name[2..];
        if rest.is_empty() || rest.contains(['/', ':', '*', '@']) {
            return Err("a wildcard prefix is *.domain, nothing more".into());
        }
        return Ok(());
    }
    if name.contains('*') {
        return Err("* is only allowed at the start of a prefix (*.domain)".into());
    }
    if name.contains("://") {
        return Err("no scheme here (insecure = true allows plain HTTP)".into());
    }
    // Parsed as a reference whose registry part is the first component.
    let probe = if name.contains('/') {
        name.to_string()
    } else {
        format!("{name}/x")
    };
    Reference::parse(&probe)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Whether `prefix` matches `r`: the length of the name part it covers (`registry/repo` up
/// to where the prefix ends), or `None`.
fn prefix_match(prefix: &str, r: &Reference) -> Option<usize> {
    let name = format!("{}/{}", r.registry, r.repository);
    if let Some(domain) = prefix.strip_prefix("*.") {
        // The host is what matched: a mirror's location stands in for it.
        let host = r.registry.split(':').next().unwrap_or("");
        return host
            .ends_with(&format!(".{domain}"))
            .then_some(r.registry.len());
    }
    if name == prefix || name.starts_with(&format!("{prefix}/")) {
        return Some(prefix.len());
    }
    let tagged = r.tag.as_ref().map(|t| format!("{name}:{t}"));
    let digested = r.digest.as_ref().map(|d| format!("{name}@{d}"));
    [tagged, digested]
        .into_iter()
        .flatten()
        .any(|full| full == prefix)
        .then_some(name.len())
}

/// The route to `location` for `r`, whose first `matched` bytes of `registry/repo` the
/// table's prefix covered (an empty location: the name as it is).
fn remap(location: &str, insecure: bool, matched: usize, r: &Reference, at: &str) -> Result<Route> {
    let name = format!("{}/{}", r.registry, r.repository);
    let mapped = if location.is_empty() {
        name.clone()
    } else {
        format!("{location}{}", &name[matched.min(name.len())..])
    };
    let (host, repo) = mapped.split_once('/').ok_or_else(|| Error::Config {
        at: at.to_string(),
        reason: format!("{name} maps to {mapped:?}, which names no repository"),
    })?;
    // The mapped name must still be a repository name (a location could make it invalid).
    Reference::parse(&format!("host.invalid/{repo}")).map_err(|e| Error::Config {
        at: at.to_string(),
        reason: format!("{name} maps to {mapped:?}: {e}"),
    })?;
    let endpoint = Endpoint::parse(host, insecure, false).map_err(|why| Error::Config {
        at: at.to_string(),
        reason: format!("location {host:?}: {why}"),
    })?;
    Ok(Route {
        endpoint,
        repo: repo.to_string(),
        caps: Capabilities::ALL,
        mirror: false,
        namespace: None,
    })
}

#[cfg(test)]
mod tests;

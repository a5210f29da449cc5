//! Image references: the Docker/OCI grammar with Docker's normalisation.
//!
//! `alpine` -> `docker.io/library/alpine:latest`; `host:port/name:tag`; `name@sha256:...`;
//! tag and digest together (the digest wins for resolution, the tag is kept for display).
//! Each rejection names the part that is wrong.

// The digest form is `digest`'s; `reference::validate_digest` names it too.
pub use crate::digest::validate_digest;
use crate::error::{Error, Result};
use std::fmt;

/// The registry Docker Hub's short names resolve to.
pub const DOCKER_HUB: &str = "docker.io";

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host, with port if any (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path (`library/alpine`).
    pub repository: String,
    /// Tag, if given (or `latest` when neither tag nor digest was given).
    pub tag: Option<String>,
    /// Digest (`sha256:<64 hex>`), if given.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses and normalises `input`.
    pub fn parse(input: &str) -> Result<Reference> {
        let bad = |reason: String| Error::Reference {
            input: input.to_string(),
            reason,
        };
        if input.is_empty() {
            return Err(bad("empty reference".into()));
        }
        if input.len() > 4096 {
            return Err(bad("longer than 4096 bytes".into()));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => {
                validate_digest(d).map_err(|e| bad(format!("digest {d:?}: {e}")))?;
                (r, Some(d.to_string()))
            }
            None => (input, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let t = &rest[last_slash + i + 1..];
                validate_tag(t).map_err(|e| bad(format!("tag {t:?}: {e}")))?;
                (&rest[..last_slash + i], Some(t.to_string()))
            }
            None => (rest, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                validate_host(first).map_err(|e| bad(format!("registry {first:?}: {e}")))?;
                (first.to_string(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        validate_repository(&repository)
            .map_err(|e| bad(format!("repository {repository:?}: {e}")))?;
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry for: the digest when known, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn validate_tag(t: &str) -> std::result::Result<(), String> {
    let ok_first = t
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok_first || t.len() > 128 {
        return Err("must start with a letter, digit or '_' and be at most 128 chars".into());
    }
    if !t
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err("may only contain letters, digits, '_', '.' and '-'".into());
    }
    Ok(())
}

fn validate_host(h: &str) -> std::result::Result<(), String> {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || h.starts_with('[') => (host, Some(port)),
        _ => (h, None),
    };
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return Err(format!("port {p:?} is not a number below 65536"));
    }
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'))
    {
        return Err("not a valid host name".into());
    }
    Ok(())
}

fn validate_repository(r: &str) -> std::result::Result<(), String> {
    if r.len() > 255 {
        return Err("longer than 255 characters".into());
    }
    for comp in r.split('/') {
        if comp.is_empty() {
            return Err("has an empty path component".into());
        }
        let b = comp.as_bytes();
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
            return Err(format!(
                "component {comp:?} must start and end with a lowercase letter or digit"
            ));
        }
        if !b
            .iter()
            .all(|&c| alnum(c) || matches!(c, b'.' | b'_' | b'-'))
        {
            return Err(format!(
                "component {comp:?} may only contain lowercase letters, digits, '.', '_' and '-'"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn normalises_docker_hub_short_names() {
        assert_eq!(p("alpine").to_string(), "docker.io/library/alpine:latest");
        assert_eq!(p("user/app:1").to_string(), "docker.io/user/app:1");
        assert_eq!(p("index.docker.io/library/busybox").registry, "docker.io");
    }

    #[test]
    fn parses_hosts_ports_tags_and_digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = p(&format!("127.0.0.1:5000/ns/app:v1@{d}"));
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "ns/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.manifest_reference(), d);
        let r = p("localhost/app");
        assert_eq!(
            (r.registry.as_str(), r.tag.as_deref()),
            ("localhost", Some("latest"))
        );
        let r = p(&format!("app@{d}"));
        assert_eq!(r.tag, None);
    }

    #[test]
    fn rejections_name_the_wrong_part() {
        for (input, part) in [
            ("", "empty"),
            ("Alpine", "repository"),
            ("alpine:", "tag"),
            ("alpine:-x", "tag"),
            ("alpine@sha256:abc", "digest"),
            ("alpine@md5:abc", "digest"),
            ("host:99999/app", "registry"),
            ("a//b", "repository"),
        ] {
            let e = Reference::parse(input).unwrap_err().to_string();
            assert!(e.contains(part), "{input:?}: {e}");
        }
    }
}

//! How to reach a registry, read as containers tools (skopeo, podman) read it: credentials
//! from `--creds`, `--authfile` or the usual auth files, and TLS settings from `--cert-dir`
//! or the per-host `certs.d` directories.

use anyhow::{Context, Result, bail};
use ocifs::registry::auth::Credentials;
use ocifs::registry::endpoint::Tls;
use std::path::{Path, PathBuf};

/// Credentials for `repository` on `registry`: `--creds USER[:PASSWORD]` (the password asked
/// on the terminal when left out), else the first of these files that has an entry:
/// `--authfile FILE` alone when given; otherwise the files containers/image (podman,
/// skopeo) reads, in its order (see [`auth_files`]).
pub fn credentials(
    creds: Option<&str>,
    authfile: Option<&Path>,
    registry: &str,
    repository: &str,
) -> Result<Option<Credentials>> {
    if let Some(c) = creds {
        return parse_creds(c).map(Some);
    }
    let files = match authfile {
        Some(f) => {
            if !f.exists() {
                bail!("--authfile {}: no such file", f.display());
            }
            vec![(f.to_path_buf(), true)]
        }
        None => auth_files(),
    };
    for (f, named) in files {
        let found = match Credentials::from_auth_file(&f, registry, repository) {
            // A default path that cannot be read (`/run/containers` is root's) is absent.
            Err(ocifs::Error::Io(e))
                if !named && e.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                continue;
            }
            found => found.with_context(|| format!("reading credentials from {}", f.display()))?,
        };
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// The auth files looked at without `--authfile`, in containers/image's order, each with
/// whether a variable named it (then it must be readable): `$REGISTRY_AUTH_FILE`, else
/// `$XDG_RUNTIME_DIR/containers/auth.json` (`/run/containers/UID/auth.json` without it);
/// then `$XDG_CONFIG_HOME/containers/auth.json` (`~/.config/...`); then the Docker config
/// (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`).
fn auth_files() -> Vec<(PathBuf, bool)> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut files = Vec::new();
    match (env("REGISTRY_AUTH_FILE"), env("XDG_RUNTIME_DIR")) {
        (Some(f), _) => files.push((f, true)),
        (None, Some(d)) => files.push((d.join("containers/auth.json"), false)),
        // SAFETY: getuid has no preconditions.
        (None, None) => files.push((
            PathBuf::from(format!("/run/containers/{}/auth.json", unsafe {
                libc::getuid()
            })),
            false,
        )),
    }
    let home = env("HOME");
    match (env("XDG_CONFIG_HOME"), &home) {
        (Some(d), _) => files.push((d.join("containers/auth.json"), false)),
        (None, Some(h)) => files.push((h.join(".config/containers/auth.json"), false)),
        (None, None) => {}
    }
    match (env("DOCKER_CONFIG"), &home) {
        (Some(d), _) => files.push((d.join("config.json"), true)),
        (None, Some(h)) => files.push((h.join(".docker/config.json"), false)),
        (None, None) => {}
    }
    files
}

/// `USER:PASSWORD`, or `USER` with the password read from the terminal (not echoed).
fn parse_creds(c: &str) -> Result<Credentials> {
    let (user, pass) = match c.split_once(':') {
        Some((u, p)) => (u.to_string(), p.to_string()),
        None => {
            use std::io::IsTerminal;
            if !std::io::stdin().is_terminal() {
                bail!("--creds {c}: no password (give USER:PASSWORD, or run on a terminal)");
            }
            let p = rpassword::prompt_password(format!("Password for {c}: "))
                .context("reading the password")?;
            (c.to_string(), p)
        }
    };
    if user.is_empty() {
        bail!("--creds: the user name is empty (USER:PASSWORD)");
    }
    Ok(Credentials {
        username: user,
        password: pass,
    })
}

/// The TLS settings for `host` (`HOST[:PORT]`): certificates from `cert_dir` when given,
/// else from the first of `~/.config/containers/certs.d/HOST`, `/etc/containers/certs.d/HOST`
/// and `/etc/docker/certs.d/HOST` that exists (as containers/image chooses); no
/// verification with `--tls-verify=false`.
pub fn tls(cert_dir: Option<&Path>, verify: bool, host: &str) -> Result<Tls> {
    let dir = match cert_dir {
        Some(d) => {
            if !d.is_dir() {
                bail!("--cert-dir {}: not a directory", d.display());
            }
            Some(d.to_path_buf())
        }
        None => {
            let mut bases = Vec::new();
            if let Some(h) = std::env::var_os("HOME").filter(|_| !is_root()) {
                bases.push(PathBuf::from(h).join(".config/containers/certs.d"));
            }
            bases.push("/etc/containers/certs.d".into());
            bases.push("/etc/docker/certs.d".into());
            bases.into_iter().map(|b| b.join(host)).find(|d| d.is_dir())
        }
    };
    let mut opts = match dir {
        Some(d) => read_cert_dir(&d)?,
        None => Tls::default(),
    };
    opts.skip_verify = !verify;
    Ok(opts)
}

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

/// Reads a certificate directory as docker and containers/image do: each `*.crt` is a
/// certificate authority; each `*.cert` is a client certificate whose key is the `*.key`
/// of the same name (one without the other is an error). The first client pair, by name, is
/// used. The files are read (and bad ones named) when the client is built.
pub fn read_cert_dir(dir: &Path) -> Result<Tls> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading certificates in {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    let mut opts = Tls::default();
    for p in &names {
        let shown = p.display().to_string();
        match p.extension().and_then(|e| e.to_str()) {
            Some("crt") => opts.ca.push(p.clone()),
            Some("cert") => {
                let key = p.with_extension("key");
                if !key.exists() {
                    bail!(
                        "missing key {} for the client certificate {shown} (certificate authorities end in .crt)",
                        key.display()
                    );
                }
                if opts.client.is_empty() {
                    opts.client.push((p.clone(), Some(key)));
                }
            }
            Some("key") => {
                let cert = p.with_extension("cert");
                if !cert.exists() {
                    bail!(
                        "missing client certificate {} for the key {shown}",
                        cert.display()
                    );
                }
            }
            _ => {}
        }
    }
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_dirs_are_read_as_containers_tools_read_them() {
        let dir = std::env::temp_dir().join(format!("ocifs-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.crt"), "CA").unwrap();
        std::fs::write(dir.join("client.cert"), "CERT").unwrap();
        std::fs::write(dir.join("client.key"), "KEY").unwrap();
        std::fs::write(dir.join("README"), "ignored").unwrap();
        let o = read_cert_dir(&dir).unwrap();
        assert_eq!(o.ca, vec![dir.join("ca.crt")]);
        let (cert, key) = o.client[0].clone();
        assert!(cert.ends_with("client.cert"));
        assert_eq!(key, Some(dir.join("client.key")));
        std::fs::remove_file(dir.join("client.key")).unwrap();
        let err = read_cert_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("missing key") && err.contains("client.key"),
            "{err}"
        );
        std::fs::remove_file(dir.join("client.cert")).unwrap();
        std::fs::write(dir.join("lone.key"), "KEY").unwrap();
        let err = read_cert_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("missing client certificate"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn creds_split_at_the_first_colon() {
        let c = parse_creds("alice:pa:ss").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "pa:ss")
        );
        assert!(parse_creds(":x").is_err());
    }
}

//! Registry authentication: credentials, the WWW-Authenticate challenge, and the token cache.
//!
//! Flow (distribution spec): a request answered 401 carries a challenge; for `Basic` we resend
//! with the user's credentials; for `Bearer` we ask the challenge's realm for a token scoped to
//! the repository, cache it per scope until shortly before `expires_in` (or the JWT's `exp`)
//! runs out, and fetch a fresh one when a cached token is refused.

use crate::error::{Error, Result};
use base64::Engine;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A user name and password (or identity token). `Debug` redacts the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({:?}, <redacted>)", self.username)
    }
}

impl Credentials {
    /// Looks `registry` up in a Docker `config.json`, as the Docker CLI does: a credential
    /// helper named for the host in `credHelpers`, else an inline `auths.<host>.auth` (base64
    /// `user:pass`), else the default helper `credsStore`. Docker Hub is stored under
    /// `https://index.docker.io/v1/`. A helper is the program `docker-credential-<name>`
    /// (see [`from_helper`](Self::from_helper)).
    pub fn from_docker_config(path: &Path, registry: &str) -> Result<Option<Credentials>> {
        Credentials::from_auth_file(path, registry, "")
    }

    /// [`from_docker_config`](Self::from_docker_config) for an image in `repository`, also
    /// reading containers' `auth.json` keys scoped to a namespace (`HOST/NS/REPO`,
    /// `HOST/NS`), most specific first, before the host's own entry (containers-auth.json(5)).
    pub fn from_auth_file(
        path: &Path,
        registry: &str,
        repository: &str,
    ) -> Result<Option<Credentials>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::format(
                format!("credentials file {}", path.display()),
                e.to_string(),
            )
        })?;
        let keys: Vec<String> = if registry == crate::reference::DOCKER_HUB {
            vec![
                "https://index.docker.io/v1/".into(),
                "index.docker.io".into(),
                "docker.io".into(),
            ]
        } else {
            vec![
                registry.to_string(),
                format!("https://{registry}"),
                format!("http://{registry}"),
            ]
        };
        // The name a helper stores the registry under.
        let server = keys[0].clone();
        let server = &server;
        // Namespaced keys (containers' auth.json): the whole repository, then its parents.
        let mut scoped: Vec<String> = Vec::new();
        let mut ns = repository;
        while !ns.is_empty() {
            scoped.push(format!("{registry}/{ns}"));
            ns = ns.rsplit_once('/').map_or("", |(parent, _)| parent);
        }
        let keys: Vec<String> = scoped.into_iter().chain(keys).collect();
        let helpers = json.get("credHelpers").and_then(|h| h.as_object());
        if let Some(name) = keys
            .iter()
            .find_map(|k| helpers.and_then(|h| h.get(k)).and_then(|n| n.as_str()))
        {
            return Credentials::from_helper(name, server);
        }
        let empty = serde_json::Map::new();
        let auths = json
            .get("auths")
            .and_then(|a| a.as_object())
            .unwrap_or(&empty);
        for k in &keys {
            let Some(entry) = auths.get(k) else { continue };
            if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| {
                        Error::format(format!("auth for {k} in {}", path.display()), e.to_string())
                    })?;
                let s = String::from_utf8_lossy(&raw).into_owned();
                let (u, p) = s.split_once(':').ok_or_else(|| {
                    Error::format(
                        format!("auth for {k} in {}", path.display()),
                        "no ':' in user:password",
                    )
                })?;
                return Ok(Some(Credentials {
                    username: u.into(),
                    password: p.into(),
                }));
            }
        }
        match json.get("credsStore").and_then(|n| n.as_str()) {
            Some(name) => Credentials::from_helper(name, server),
            None => Ok(None),
        }
    }

    /// Asks the credential helper `docker-credential-<name>` (found on `PATH`) for `server`'s
    /// credentials: `get` with the server on stdin, JSON `{"Username", "Secret"}` on stdout.
    /// A helper that has none, is missing, fails or takes longer than 30 s yields no
    /// credentials (with a warning, except for "not found"): the registry's 401 then says
    /// what is missing, and public images still open.
    pub fn from_helper(name: &str, server: &str) -> Result<Option<Credentials>> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(Error::format("credential helper name", format!("{name:?}")));
        }
        let program = format!("docker-credential-{name}");
        let child = Command::new(&program)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("credential helper {program} for {server}: {e}");
                return Ok(None);
            }
        };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(server.as_bytes());
        }
        let deadline = Instant::now() + HELPER_TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(
                    "credential helper {program} for {server}: no answer in {HELPER_TIMEOUT:?}"
                );
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if !(text.contains("not found") || err.contains("not found")) {
                tracing::warn!(
                    "credential helper {program} for {server} failed: {} {}",
                    text.trim(),
                    err.trim()
                );
            }
            return Ok(None);
        }
        parse_helper_output(&out.stdout)
            .map(Some)
            .map_err(|why| Error::format(format!("answer of {program}"), why))
    }

    fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm=...`
    Basic,
    /// `Bearer realm=...,service=...,scope=...`
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
        error: Option<String>,
    },
}

impl Challenge {
    /// Parses the header value; unknown schemes are `None`.
    pub fn parse(header: &str) -> Option<Challenge> {
        let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        let params = parse_params(rest);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => Some(Challenge::Basic),
            "bearer" => Some(Challenge::Bearer {
                realm: params.get("realm")?.clone(),
                service: params.get("service").cloned(),
                scope: params.get("scope").cloned(),
                error: params.get("error").cloned(),
            }),
            _ => None,
        }
    }
}

fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((k, v)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (val, next) = if let Some(q) = v.strip_prefix('"') {
            let end = q.find('"').unwrap_or(q.len());
            (q[..end].to_string(), q.get(end + 1..).unwrap_or(""))
        } else {
            let end = v.find(',').unwrap_or(v.len());
            (v[..end].trim().to_string(), &v[end..])
        };
        out.insert(k, val);
        rest = next.trim_start_matches([',', ' ']);
    }
    out
}

#[derive(Clone)]
struct Token {
    value: String,
    refresh_at: Instant,
}

/// Per-registry authentication state: what scheme the registry wants and cached tokens.
pub struct Authenticator {
    credentials: Option<Credentials>,
    state: Mutex<AuthState>,
}

#[derive(Default)]
struct AuthState {
    /// The last challenge seen, so later requests authenticate up front.
    challenge: Option<Challenge>,
    tokens: HashMap<String, Token>,
}

impl Authenticator {
    /// Authentication with optional credentials (anonymous otherwise).
    pub fn new(credentials: Option<Credentials>) -> Self {
        Authenticator {
            credentials,
            state: Mutex::new(AuthState::default()),
        }
    }

    /// The `Authorization` header to send for `scope` now, if we know one without a round trip.
    fn cached_header(&self, scope: &str) -> Option<String> {
        let st = self.state.lock().unwrap();
        match st.challenge.as_ref()? {
            Challenge::Basic => self.credentials.as_ref().map(|c| c.basic_header()),
            Challenge::Bearer { .. } => {
                let t = st.tokens.get(scope)?;
                (Instant::now() < t.refresh_at).then(|| format!("Bearer {}", t.value))
            }
        }
    }

    /// The header to send for `scope`: the cached one, or, when the registry wants Bearer tokens
    /// and ours is due for refresh (90% of its lifetime), a fresh token fetched now — so a
    /// long-lived mount never runs into an expired token.
    pub async fn header(&self, http: &super::Http, scope: &str) -> Result<Option<String>> {
        if let Some(h) = self.cached_header(scope) {
            return Ok(Some(h));
        }
        let challenge = self.state.lock().unwrap().challenge.clone();
        let Some(Challenge::Bearer { realm, service, .. }) = challenge else {
            return Ok(None);
        };
        let token = self
            .fetch_token(http, &realm, service.as_deref(), scope)
            .await?;
        let header = format!("Bearer {}", token.value);
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(scope.to_string(), token);
        Ok(Some(header))
    }

    /// Handles a 401: records the challenge and returns the header to retry with.
    pub async fn respond(
        &self,
        http: &super::Http,
        header: Option<&str>,
        scope: &str,
    ) -> Result<String> {
        let challenge = header.and_then(Challenge::parse).ok_or_else(|| {
            Error::Unauthorized("registry sent 401 without a usable challenge".into())
        })?;
        {
            let mut st = self.state.lock().unwrap();
            st.challenge = Some(challenge.clone());
            st.tokens.remove(scope);
        }
        match challenge {
            Challenge::Basic => self
                .credentials
                .as_ref()
                .map(|c| c.basic_header())
                .ok_or_else(|| Error::Unauthorized("the registry requires credentials and none were given (--creds USER:PASSWORD, --authfile FILE, or `podman login`/`docker login`)".into())),
            Challenge::Bearer { realm, service, .. } => {
                let token = self.fetch_token(http, &realm, service.as_deref(), scope).await?;
                let header = format!("Bearer {}", token.value);
                self.state.lock().unwrap().tokens.insert(scope.to_string(), token);
                Ok(header)
            }
        }
    }

    async fn fetch_token(
        &self,
        http: &super::Http,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Token> {
        let mut query = vec![("scope", scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut req = http.for_url(realm)?.get(realm).query(&query);
        if let Some(c) = &self.credentials {
            req = req.header("Authorization", c.basic_header());
        }
        let resp = req.send().await?;
        let status = resp.status();
        if status == 401 || status == 403 {
            return Err(Error::Unauthorized(format!(
                "token server {realm} refused {} (HTTP {status})",
                self.credentials
                    .as_ref()
                    .map_or("anonymous access".to_string(), |c| format!(
                        "the credentials of {:?}",
                        c.username
                    ))
            )));
        }
        if !status.is_success() {
            return Err(Error::Registry(format!(
                "token server {realm} answered HTTP {status}"
            )));
        }
        let body = resp.bytes().await?;
        if body.len() > 1 << 20 {
            return Err(Error::format("token response", "larger than 1 MiB"));
        }
        parse_token(&body)
    }
}

/// Parses a token response: `token` or `access_token`, `expires_in` (default 60 s) or the JWT's
/// `exp`, and schedules a refresh at 90% of the lifetime.
/// How long a credential helper may take (a keychain prompt nobody answers must not hang us).
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// A credential helper's `get` answer.
fn parse_helper_output(out: &[u8]) -> std::result::Result<Credentials, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let a: Answer = serde_json::from_slice(out).map_err(|e| e.to_string())?;
    if a.username == "<token>" {
        // An identity token is exchanged through OAuth2, which the token flow here lacks.
        return Err("identity tokens (Username \"<token>\") are not supported".into());
    }
    Ok(Credentials {
        username: a.username,
        password: a.secret,
    })
}

fn parse_token(body: &[u8]) -> Result<Token> {
    #[derive(serde::Deserialize)]
    struct Resp {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let r: Resp =
        serde_json::from_slice(body).map_err(|e| Error::format("token response", e.to_string()))?;
    let value = r
        .token
        .or(r.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::format("token response", "no token or access_token"))?;
    let lifetime = r
        .expires_in
        .or_else(|| jwt_lifetime(&value))
        .unwrap_or(60)
        .clamp(1, 365 * 86400);
    Ok(Token {
        value,
        refresh_at: Instant::now() + Duration::from_millis(lifetime * 900),
    })
}

/// Seconds until a JWT's `exp`, if the token is a JWT with one.
fn jwt_lifetime(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&raw)
        .ok()?
        .get("exp")?
        .as_u64()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    exp.checked_sub(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        let c = Challenge::parse(r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull",error="invalid_token""#).unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg".into()),
                scope: Some("repository:a/b:pull".into()),
                error: Some("invalid_token".into())
            }
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Negotiate"), None);
    }

    #[test]
    fn token_lifetime_from_expires_in_or_jwt() {
        let t = parse_token(br#"{"access_token":"abc","expires_in":300}"#).unwrap();
        assert_eq!(t.value, "abc");
        assert!(t.refresh_at > Instant::now() + Duration::from_secs(200));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"exp\":{}}}", now + 1000));
        assert_eq!(
            jwt_lifetime(&format!("h.{payload}.s")).map(|s| s > 900),
            Some(true)
        );
        assert!(parse_token(br#"{"token":""}"#).is_err());
    }

    #[test]
    fn reads_docker_config_and_redacts() {
        let dir = std::env::temp_dir().join(format!("ocifs-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.json");
        std::fs::write(&p, r#"{"auths":{"reg:5000":{"auth":"dXNlcjpwYXNz"}}}"#).unwrap();
        let c = Credentials::from_docker_config(&p, "reg:5000")
            .unwrap()
            .unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("user", "pass"));
        assert!(!format!("{c:?}").contains("pass"));
        assert_eq!(Credentials::from_docker_config(&p, "other").unwrap(), None);
        // A helper named for the host wins over inline auths; a missing helper yields none.
        std::fs::write(
            &p,
            r#"{"auths":{"reg:5000":{"auth":"dXNlcjpwYXNz"}},"credHelpers":{"reg:5000":"ocifs-no-such-helper"}}"#,
        )
        .unwrap();
        assert_eq!(
            Credentials::from_docker_config(&p, "reg:5000").unwrap(),
            None
        );
        std::fs::write(&p, r#"{"credsStore":"../../bin/sh"}"#).unwrap();
        assert!(Credentials::from_docker_config(&p, "reg:5000").is_err());
        // containers' auth.json: a namespace's entry wins over the host's, most specific first.
        std::fs::write(
            &p,
            r#"{"auths":{"reg:5000":{"auth":"aG9zdDpo"},"reg:5000/team":{"auth":"dGVhbTp0"},"reg:5000/team/app":{"auth":"YXBwOmE="}}}"#,
        )
        .unwrap();
        let user = |repo: &str| {
            Credentials::from_auth_file(&p, "reg:5000", repo)
                .unwrap()
                .map(|c| c.username)
        };
        assert_eq!(user("team/app").as_deref(), Some("app"));
        assert_eq!(user("team/other").as_deref(), Some("team"));
        assert_eq!(user("else/app").as_deref(), Some("host"));
        assert_eq!(user("").as_deref(), Some("host"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reads_credential_helper_answers() {
        let c = parse_helper_output(br#"{"ServerURL":"r","Username":"u","Secret":"s"}"#).unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "s"));
        assert!(parse_helper_output(b"not json").is_err());
        let e = parse_helper_output(br#"{"Username":"<token>","Secret":"t"}"#).unwrap_err();
        assert!(e.contains("identity tokens"), "{e}");
    }
}

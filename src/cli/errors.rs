//! The one line a failed command prints: each cause once, and library wording (TLS alerts,
//! socket errors, URLs) replaced by what was wrong and, where there is one, what to do. (A
//! host that is not a registry at all is told apart by the registry client, on a 404.)

use ocifs::registry::{TlsFailure, tls_failure};

/// The error and its causes on one line, each said once; transport failures in words.
pub fn line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        if let Some(r) = cause.downcast_ref::<reqwest::Error>() {
            parts.push(transport(r));
            break;
        }
        if let Some(ocifs::Error::TlsRefused { host, source }) = cause.downcast_ref() {
            let f = tls_failure(source).unwrap_or(TlsFailure::Other(source.to_string()));
            parts.push(tls_words(host, f));
            break;
        }
        let text = without_os_error(&cause.to_string());
        // thiserror's `#[from]` errors show their source's message and return it as
        // `source()` too; a context may repeat what it wraps.
        if text.is_empty() || parts.iter().any(|p| p.contains(&text)) {
            continue;
        }
        // An http error of ours shows the reqwest error's text: the next cause says it better.
        if matches!(
            cause.downcast_ref::<ocifs::Error>(),
            Some(ocifs::Error::Http(_))
        ) {
            continue;
        }
        parts.push(text);
    }
    let mut out = parts.join(": ");
    out.retain(|c| c != '\n');
    out
}

/// A request that got no usable answer, in words: which host, what went wrong, what to do.
fn transport(e: &reqwest::Error) -> String {
    let host = e
        .url()
        .and_then(ocifs::registry::host_port)
        .unwrap_or_else(|| "the registry".into());
    // A connection cut short counts as "not TLS" only in a handshake (while connecting).
    let tls = tls_failure(e).filter(|f| e.is_connect() || *f != TlsFailure::NotTls);
    if let Some(f) = tls {
        return tls_words(&host, f);
    }
    if e.is_connect() {
        let refused = io_kind(e) == Some(std::io::ErrorKind::ConnectionRefused);
        return if refused {
            format!("cannot connect to {host}: connection refused (is the registry running there?)")
        } else {
            format!("cannot connect to {host}: {}", deepest(e))
        };
    }
    if e.is_timeout() {
        return format!("{host} did not answer in time");
    }
    format!("{host}: {}", deepest(e))
}

/// What a TLS failure with `host` means, in words, and what to do.
fn tls_words(host: &str, f: TlsFailure) -> String {
    let certs = format!("--cert-dir DIR or /etc/containers/certs.d/{host}/");
    match f {
        TlsFailure::NotTls => format!(
            "{host} does not speak TLS: https to a plain-HTTP registry? Use --insecure (plain HTTP allowed) or --tls-verify=false"
        ),
        TlsFailure::UnknownIssuer => format!(
            "the TLS certificate of {host} is not signed by an authority we trust: put its CA certificate (NAME.crt) in {certs}, or use --tls-verify=false"
        ),
        TlsFailure::Expired => format!(
            "the TLS certificate of {host} has expired (or this machine's clock is wrong); use --tls-verify=false to connect anyway"
        ),
        TlsFailure::NotValidYet => format!(
            "the TLS certificate of {host} is not valid yet (or this machine's clock is wrong)"
        ),
        TlsFailure::WrongName => {
            format!("the TLS certificate of {host} was issued for another name")
        }
        TlsFailure::ClientCertificate => format!(
            "{host} refused the TLS connection: it wants a client certificate (NAME.cert and NAME.key in {certs})"
        ),
        TlsFailure::Other(why) => format!("TLS with {host} failed: {why}"),
    }
}

/// The kind of the innermost I/O error under `e`.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur = Some(e);
    let mut kind = None;
    while let Some(c) = cur {
        cur = match c.downcast_ref::<std::io::Error>() {
            Some(io) => {
                kind = Some(io.kind());
                // Its inner error, which `source()` skips.
                match io.get_ref() {
                    Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                    None => c.source(),
                }
            }
            None => c.source(),
        };
    }
    kind
}

/// The innermost cause's message (the outer ones are reqwest's and hyper's framing).
fn deepest(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    without_os_error(&cur.to_string())
}

/// `Connection refused (os error 111)` -> `Connection refused`.
fn without_os_error(s: &str) -> String {
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::other("mountpoint /m is busy: something is mounted there");
        let e = anyhow::Error::from(ocifs::Error::Io(io));
        assert_eq!(
            line(&e),
            "mountpoint /m is busy: something is mounted there"
        );
        let e = anyhow::Error::from(ocifs::Error::NotFound("manifest a@sha256:00 on r".into()))
            .context("opening r/a@sha256:00");
        assert_eq!(
            line(&e),
            "opening r/a@sha256:00: not found: manifest a@sha256:00 on r"
        );
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = anyhow::Error::from(io).context("reading x");
        assert_eq!(line(&e), "reading x: No such file or directory");
    }
}

//! Typed errors for the whole crate, and the single place that maps them to errno values.
//!
//! Library code returns [`Error`]; the CLI wraps it in `anyhow` and the FUSE adapter turns it
//! into an errno with [`Error::errno`], logging it once at that boundary.

use std::io;

/// Everything that can go wrong between a reference and a served byte.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image reference does not follow the Docker/OCI grammar.
    #[error("invalid reference {input:?}: {reason}")]
    Reference { input: String, reason: String },
    /// The registry refused our credentials (or we had none).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A repository, tag, manifest or blob does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The registry answered something we cannot use.
    #[error("registry error: {0}")]
    Registry(String),
    /// The registry answered 5xx or 429 after every retry: it may serve later.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// Bytes did not hash to the digest that names them.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    Digest {
        what: String,
        expected: String,
        actual: String,
    },
    /// Untrusted input (manifest, TOC, tar header, index) is malformed.
    #[error("invalid {what}: {reason}")]
    Format { what: String, reason: String },
    /// A layer failed verification earlier; all its reads fail.
    #[error("layer {digest} is marked bad: {reason}")]
    BadLayer { digest: String, reason: String },
    /// No manifest in an index matches the requested platform.
    #[error("no image for platform {wanted}; available: {available}")]
    Platform { wanted: String, available: String },
    /// A configuration file (a containerd `hosts.toml`, a containers `registries.conf`) is
    /// malformed; `at` names the file and, where known, the line.
    #[error("{at}: {reason}")]
    Config { at: String, reason: String },
    /// Something the request is valid for but ocifs does not do.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Something took longer than its deadline: a read of a mounted file, or a registry
    /// answer that stalled or crawled (see [`crate::config::Transfer`]).
    #[error("timed out: {0}")]
    Timeout(String),
    /// Transport-level failure talking to a registry.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// A registry refused our TLS connection, as a handshake of its own found out after a
    /// request failed without saying why (`tls_refusal` in the registry's HTTP module).
    #[error("{host} refused the TLS connection: {source}")]
    TlsRefused {
        host: String,
        #[source]
        source: rustls::Error,
    },
    /// Local I/O (cache directory, layout, fuse device).
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Crate-wide result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for a [`Error::Format`] error about `what`.
    pub fn format(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Format {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Whether this is bytes failing a check (a digest, or data that does not decode as its
    /// index says): what was read may have arrived damaged, and fetching it again may mend it.
    pub fn is_check(&self) -> bool {
        matches!(self, Error::Digest { .. } | Error::Format { .. })
    }

    /// The errno a FUSE request answers with when it fails with this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound(_) => libc::ENOENT,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::Reference { .. }
            | Error::Unauthorized(_)
            | Error::Registry(_)
            | Error::Unavailable(_)
            | Error::Digest { .. }
            | Error::Format { .. }
            | Error::BadLayer { .. }
            | Error::Platform { .. }
            | Error::Config { .. }
            | Error::Timeout(_)
            | Error::Http(_)
            | Error::TlsRefused { .. } => libc::EIO,
        }
    }
}

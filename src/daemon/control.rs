//! The control socket: `ocifs stats` asks a running mount (or layer store) for its figures,
//! and `ocifs umount` learns from it which process serves the mount, to wait for it to finish.

use crate::error::{Error, Result};
use crate::serve::ServedImage;
use crate::stats::{MountStats, ProcessFigures};
use std::path::Path;
use std::sync::Arc;

/// Answers each connection to `path` with the mount's statistics as JSON, `process` saying
/// which process serves it; the socket is removed when the returned guard drops.
pub fn stats_socket(
    served: Arc<ServedImage>,
    path: &Path,
    process: ProcessFigures,
) -> Result<SocketGuard> {
    answer_socket(path, move || {
        let stats = MountStats {
            process: process.clone(),
            ..served.stats()
        };
        serde_json::to_vec(&stats).unwrap_or_default()
    })
}

/// Answers each connection to `path` with what `answer` gives; the socket is removed when
/// the returned guard drops.
pub fn answer_socket(
    path: &Path,
    answer: impl Fn() -> Vec<u8> + Send + Sync + 'static,
) -> Result<SocketGuard> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    let task = crate::task::TaskGuard::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut conn, _)) = listener.accept().await {
            let _ = conn.write_all(&answer()).await;
        }
    });
    Ok(SocketGuard {
        path: path.to_path_buf(),
        _task: task,
    })
}

pub struct SocketGuard {
    path: std::path::PathBuf,
    _task: crate::task::TaskGuard,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads the statistics of the mount whose control socket is `path`.
pub async fn fetch_stats(path: &Path) -> Result<MountStats> {
    fetch_json(path).await
}

/// Reads the JSON answer of the daemon whose control socket is `path` (a mount's
/// [`MountStats`], a store's [`crate::stats::StoreStats`]: see
/// [`crate::stats::DaemonStats`]).
pub async fn fetch_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    use tokio::io::AsyncReadExt;
    let mut conn = tokio::net::UnixStream::connect(path).await.map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("no ocifs daemon answers at {}: {e}", path.display()),
        ))
    })?;
    let mut body = Vec::new();
    conn.read_to_end(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| Error::format("stats", e.to_string()))
}

/// The id of the process serving the control socket at `path` (the peer of a connection to
/// it), so that unmounting can wait until that daemon has finished (written its profile).
pub async fn daemon_pid(path: &Path) -> Result<u32> {
    let conn = tokio::net::UnixStream::connect(path).await?;
    let pid = conn.peer_cred()?.pid();
    pid.and_then(|p| u32::try_from(p).ok()).ok_or_else(|| {
        Error::Io(std::io::Error::other(
            "the control socket's peer has no pid",
        ))
    })
}

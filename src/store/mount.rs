//! Starting a layer store, as a library: [`start`] mounts a [`Store`] at a directory, with its
//! control socket and the releasing of idle layers; [`StoreMount::run`] serves until the
//! directory is unmounted or `shutdown` resolves, as [`crate::daemon::Mount::run`] does.

use super::Store;
use super::fuse::StoreFs;
use crate::daemon::{check_mountpoint, control, unmount};
use crate::error::{Error, Result};
use crate::task::TaskGuard;
use fuser::{Config, MountOption, SessionACL};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// FUSE session threads: every request is handed to tokio, so a few suffice.
const SESSION_THREADS: usize = 4;

/// A mounted store.
pub struct StoreMount {
    store: Arc<Store>,
    mountpoint: PathBuf,
    ended: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
    _tasks: Vec<TaskGuard>,
    _control: Option<control::SocketGuard>,
}

/// Mounts `store` at `mountpoint` (an empty directory), answering `ocifs stats` at `control`.
/// Returns once the store is mounted.
pub async fn start(
    store: Arc<Store>,
    mountpoint: &Path,
    control: Option<&Path>,
) -> Result<StoreMount> {
    check_mountpoint(mountpoint)?;
    let control = match control {
        Some(path) => {
            let s = store.clone();
            let answer = move || serde_json::to_vec(&s.stats()).unwrap_or_default();
            Some(control::answer_socket(path, answer)?)
        }
        None => None,
    };
    let mut config = Config::default();
    // Not read-only: containers/storage's notices (creating `use`, removing a layer's
    // directory) must reach the store, which refuses every other write itself.
    config.mount_options = vec![
        MountOption::FSName("ocifs-store".into()),
        MountOption::Subtype("ocifs".into()),
        MountOption::DefaultPermissions,
        MountOption::Suid,
        MountOption::Dev,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(SESSION_THREADS);
    config.clone_fd = true;
    let fs = StoreFs::new(store.clone(), tokio::runtime::Handle::current());
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    let (tx, ended) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(session.join());
    });
    Ok(StoreMount {
        _tasks: vec![store.start_releasing()],
        store,
        mountpoint: mountpoint.to_path_buf(),
        ended,
        _control: control,
    })
}

impl StoreMount {
    /// The store being served.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Serves until the directory is unmounted (`ocifs umount`, `umount`) or `shutdown`
    /// resolves (then it unmounts it).
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let path = self.mountpoint.display().to_string();
        tokio::select! {
            ended = &mut self.ended => {
                tracing::info!("layer store at {path} was unmounted");
                ended
                    .map_err(|_| Error::Io(std::io::Error::other("FUSE session thread vanished")))
                    .and_then(|r| r.map_err(Error::Io))
            }
            _ = shutdown => {
                tracing::info!("unmounting the layer store at {path}");
                let unmounted = unmount(&self.mountpoint);
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.ended).await;
                unmounted
            }
        }
    }
}

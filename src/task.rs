//! Background work owned by a guard: dropping the guard cancels the task, so a mount's
//! verification, speculation and control socket end with the mount.

/// A background task that is cancelled when this guard is dropped.
pub struct TaskGuard(tokio::task::JoinHandle<()>);

impl TaskGuard {
    /// Spawns `fut` on the current runtime, owned by the returned guard.
    pub fn spawn(fut: impl std::future::Future<Output = ()> + Send + 'static) -> TaskGuard {
        TaskGuard(tokio::spawn(fut))
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

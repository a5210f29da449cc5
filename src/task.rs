//! Background work owned by a guard: dropping the guard cancels the task, so a mount's
//! verification, speculation and control socket end with the mount.

/// A background task that is cancelled when this guard is dropped; `T` is what it yields.
pub struct TaskGuard<T = ()>(tokio::task::JoinHandle<T>);

impl<T: Send + 'static> TaskGuard<T> {
    /// Spawns `fut` on the current runtime, owned by the returned guard.
    pub fn spawn(fut: impl std::future::Future<Output = T> + Send + 'static) -> TaskGuard<T> {
        TaskGuard(tokio::spawn(fut))
    }

    /// Waits for the task's output; `None` if it panicked or was cancelled.
    pub async fn output(&mut self) -> Option<T> {
        (&mut self.0).await.ok()
    }
}

impl<T> Drop for TaskGuard<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

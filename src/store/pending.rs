//! Work started once and awaited by many: resolving a reference, opening a layer. The work
//! runs as a task of its own, so a lookup that stops waiting (its time is up) does not stop
//! it, and the next lookup finds it done. A failure is kept for a short while, so a burst of
//! lookups of an unknown reference costs one registry round trip, then is tried again.

use crate::error::Error;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the work gives: the value, or the error every waiter sees.
pub type Outcome<T> = Result<Arc<T>, Arc<Error>>;

/// One run of some work, and its outcome once it has one.
pub struct Pending<T> {
    outcome: Shared<BoxFuture<'static, Outcome<T>>>,
    started: Instant,
}

impl<T: Send + Sync + 'static> Pending<T> {
    /// Starts `work` on the current runtime.
    pub fn start(work: impl Future<Output = crate::Result<T>> + Send + 'static) -> Arc<Self> {
        let task = tokio::spawn(work);
        let outcome = async move {
            match task.await {
                Ok(Ok(v)) => Ok(Arc::new(v)),
                Ok(Err(e)) => Err(Arc::new(e)),
                Err(e) => Err(Arc::new(Error::Io(std::io::Error::other(format!(
                    "the task ended early: {e}"
                ))))),
            }
        }
        .boxed()
        .shared();
        Arc::new(Pending {
            outcome,
            started: Instant::now(),
        })
    }

    /// Waits at most `limit` for the outcome (a timeout is an error of its own; the work goes
    /// on).
    pub async fn wait(&self, limit: Duration, what: &str) -> Outcome<T> {
        match tokio::time::timeout(limit, self.outcome.clone()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Arc::new(Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{what}: not ready after {limit:?}"),
            )))),
        }
    }

    /// The outcome, if the work is done.
    pub fn now(&self) -> Option<Outcome<T>> {
        self.outcome.peek().cloned()
    }

    /// Whether the work started more than `age` ago and is done.
    pub fn done_before(&self, age: Duration) -> bool {
        self.now().is_some() && self.started.elapsed() > age
    }

    /// Whether the work failed more than `age` ago: time to try again.
    pub fn failed_before(&self, age: Duration) -> bool {
        matches!(self.now(), Some(Err(_))) && self.started.elapsed() > age
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn many_waiters_one_run_and_a_timeout_does_not_stop_the_work() {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let p = Pending::start(async move {
            r.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(7u32)
        });
        let early = p.wait(Duration::from_millis(1), "seven").await.unwrap_err();
        assert!(early.to_string().contains("not ready"), "{early}");
        let (a, b) = tokio::join!(
            p.wait(Duration::from_secs(5), "seven"),
            p.wait(Duration::from_secs(5), "seven")
        );
        assert_eq!((*a.unwrap(), *b.unwrap()), (7, 7));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(!p.failed_before(Duration::ZERO));
    }

    #[tokio::test]
    async fn failures_are_kept_then_tried_again() {
        let p: Arc<Pending<u32>> = Pending::start(async { Err(Error::NotFound("nothing".into())) });
        let e = p.wait(Duration::from_secs(5), "x").await.unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT);
        assert!(p.failed_before(Duration::ZERO));
        assert!(!p.failed_before(Duration::from_secs(60)));
    }
}

//! Single flight per block: a block that several readers want at once is fetched once.
//!
//! Each block being fetched has a gate (an async mutex). The fetcher holds it until the block
//! is stored or its fetch failed; readers wait on it, then look in the store again. Fetches
//! claim gates with `try_lock`, so a block someone else is bringing is never fetched twice.

use super::Key;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedMutexGuard;

type Gate = Arc<tokio::sync::Mutex<()>>;
/// A claimed block: its key and its held gate.
pub(super) type Claim = (Key, OwnedMutexGuard<()>);

/// The gates of the blocks being fetched.
#[derive(Default)]
pub(super) struct Gates {
    inflight: Mutex<HashMap<Key, Gate>>,
}

impl Gates {
    /// Waits for `key`'s gate (held while someone fetches the block), and holds it.
    pub(super) async fn wait(&self, key: &Key) -> OwnedMutexGuard<()> {
        self.gate(key).lock_owned().await
    }

    /// `key`'s gate, if nobody holds it.
    pub(super) fn try_claim(&self, key: &Key) -> Option<OwnedMutexGuard<()>> {
        self.gate(key).try_lock_owned().ok()
    }

    /// Whether someone is fetching `key`: its gate is held. (A fetch cancelled mid-way, its
    /// task aborted, drops its gates without [`Gates::release`]: their entries stay until
    /// the next claim, and must not count as fetches under way.)
    pub(super) fn in_flight(&self, key: &Key) -> bool {
        let inflight = self.inflight.lock().unwrap();
        inflight.get(key).is_some_and(|g| g.try_lock().is_err())
    }

    /// Lets the waiters of `key` in (the block is stored, or its fetch failed).
    pub(super) fn release(&self, key: &Key, guard: OwnedMutexGuard<()>) {
        let mut inflight = self.inflight.lock().unwrap();
        if inflight
            .get(key)
            .is_some_and(|g| Arc::ptr_eq(g, OwnedMutexGuard::mutex(&guard)))
        {
            inflight.remove(key);
        }
        drop(guard);
    }

    fn gate(&self, key: &Key) -> Gate {
        let mut inflight = self.inflight.lock().unwrap();
        inflight.entry(key.clone()).or_default().clone()
    }
}

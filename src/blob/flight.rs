//! Single flight by key: [`Flights::enter`] lets one task at a time do the work named by a
//! key, so that tasks wanting the same thing at once wait for the first and then find its
//! result wherever it was kept, instead of doing the work again.
//!
//! The kernel asks for several pages of a file at once; in a gzip layer read through a
//! checkpoint index those reads often need the same stretch decoded from the same mark, and
//! without a gate each of them fetched the mark's window (a request of its own) and inflated
//! the stretch again.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedMutexGuard;

type Gate = Arc<tokio::sync::Mutex<()>>;

/// The gates of work under way, by key.
pub struct Flights<K> {
    gates: Mutex<HashMap<K, Gate>>,
}

impl<K> Default for Flights<K> {
    fn default() -> Self {
        Flights {
            gates: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Flights<K> {
    /// Waits until no other task holds `key`, then holds it until the returned pass drops.
    /// A task that waited must look again for what it wanted before doing the work: the
    /// holder before it has usually kept it.
    pub async fn enter(&self, key: K) -> Pass<'_, K> {
        let gate = self
            .gates
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = gate.clone().lock_owned().await;
        Pass {
            flights: self,
            key,
            gate,
            guard: Some(guard),
        }
    }

    /// Keys held or waited for now (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.gates.lock().unwrap().len()
    }
}

/// Holds one key of [`Flights`]; dropping it lets the next waiter in.
pub struct Pass<'a, K: Hash + Eq> {
    flights: &'a Flights<K>,
    key: K,
    gate: Gate,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Hash + Eq> Drop for Pass<'_, K> {
    fn drop(&mut self) {
        let mut gates = self.flights.gates.lock().unwrap();
        // Waiters keep their own handle on the gate; a newcomer after this point makes a new
        // one and finds the work done.
        if gates
            .get(&self.key)
            .is_some_and(|g| Arc::ptr_eq(g, &self.gate))
        {
            gates.remove(&self.key);
        }
        drop(self.guard.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn tasks_wanting_one_key_do_the_work_once_and_other_keys_do_not_wait() {
        let flights = Arc::new(Flights::<u32>::default());
        let done = Arc::new(Mutex::new(None::<u32>));
        let work = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (flights, done, work) = (flights.clone(), done.clone(), work.clone());
                tokio::spawn(async move {
                    let _pass = flights.enter(7).await;
                    if done.lock().unwrap().is_none() {
                        work.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        *done.lock().unwrap() = Some(42);
                    }
                })
            })
            .collect();
        // Another key is not held up by the eight.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let other = tokio::time::timeout(Duration::from_millis(10), flights.enter(8)).await;
        assert!(other.is_ok(), "a different key waited");
        drop(other);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(work.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0, "gates are removed once nobody holds them");
    }
}

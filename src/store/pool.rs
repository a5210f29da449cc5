//! Opened layers, by digest: a layer that several images share is opened once, for the first
//! image that asks, and served to all. A layer nobody has touched for a while is released
//! (its tree, index and decoded chunks leave memory; its blocks and index stay in the cache
//! directory); the next request opens it again from there. A failed open is kept briefly,
//! then tried again.

use super::pending::Pending;
use crate::serve::layer::ServedLayer;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a failed open is kept before the layer is tried again.
pub const RETRY: Duration = Duration::from_secs(2);

struct Slot {
    pending: Arc<Pending<ServedLayer>>,
    /// Milliseconds since the pool's start at the last request for the layer.
    last_used: AtomicU64,
}

/// The opened layers.
pub struct LayerPool {
    slots: Mutex<HashMap<String, Slot>>,
    trees: Arc<TreeSizes>,
    epoch: Instant,
    /// Layers released so far.
    pub released: AtomicU64,
}

impl Default for LayerPool {
    fn default() -> Self {
        LayerPool {
            slots: Mutex::new(HashMap::new()),
            trees: Arc::default(),
            epoch: Instant::now(),
            released: AtomicU64::new(0),
        }
    }
}

impl LayerPool {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Layer `digest`, open or being opened; `open` starts opening it when the pool has it
    /// neither open nor under way (nor failed lately).
    pub fn get(
        &self,
        digest: &str,
        open: impl FnOnce() -> Arc<Pending<ServedLayer>>,
    ) -> Arc<Pending<ServedLayer>> {
        let now = self.now_ms();
        let mut slots = self.slots.lock().unwrap();
        if let Some(s) = slots.get(digest)
            && !s.pending.failed_before(RETRY)
        {
            s.last_used.store(now, Ordering::Relaxed);
            return s.pending.clone();
        }
        let pending = open();
        slots.insert(
            digest.to_string(),
            Slot {
                pending: pending.clone(),
                last_used: AtomicU64::new(now),
            },
        );
        pending
    }

    /// Layer `digest` if it is open now (noting the use).
    pub fn open_now(&self, digest: &str) -> Option<Arc<ServedLayer>> {
        let slots = self.slots.lock().unwrap();
        let s = slots.get(digest)?;
        s.last_used.store(self.now_ms(), Ordering::Relaxed);
        s.pending.now()?.ok()
    }

    /// The tree sizes of the layers opened so far, for checking a layer opened again.
    pub fn trees(&self) -> Arc<TreeSizes> {
        self.trees.clone()
    }

    /// Releases the layers opened (or failed) and not asked for in `idle`; returns how many.
    pub fn release_idle(&self, idle: Duration) -> usize {
        let cutoff = self.now_ms().saturating_sub(idle.as_millis() as u64);
        let mut slots = self.slots.lock().unwrap();
        let before = slots.len();
        slots.retain(|digest, s| {
            let keep = s.pending.now().is_none() || s.last_used.load(Ordering::Relaxed) > cutoff;
            if !keep {
                tracing::info!("releasing idle layer {digest}");
            }
            keep
        });
        let n = before - slots.len();
        self.released.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// The layers open now, by digest.
    pub fn opened(&self) -> Vec<(String, Arc<ServedLayer>)> {
        let slots = self.slots.lock().unwrap();
        let mut all: Vec<_> = slots
            .iter()
            .filter_map(|(d, s)| Some((d.clone(), s.pending.now()?.ok()?)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// The number of nodes each layer's tree had when first opened: a layer opened again must
/// number its nodes the same way (views keep inode numbers across a release).
#[derive(Default)]
pub struct TreeSizes(Mutex<HashMap<String, usize>>);

impl TreeSizes {
    /// Checks a freshly opened layer's tree size against the one it had before.
    pub fn check(&self, digest: &str, nodes: usize) -> crate::Result<()> {
        let mut known = self.0.lock().unwrap();
        match known.get(digest) {
            Some(&n) if n != nodes => Err(crate::Error::format(
                format!("layer {digest}"),
                format!("opened again with {nodes} nodes, not {n}: its inode numbers would change"),
            )),
            Some(_) => Ok(()),
            None => {
                known.insert(digest.to_string(), nodes);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_opened_again_must_have_the_same_tree_size() {
        let t = TreeSizes::default();
        assert!(t.check("sha256:a", 10).is_ok());
        assert!(t.check("sha256:a", 10).is_ok());
        assert!(t.check("sha256:a", 11).is_err());
        assert!(t.check("sha256:b", 11).is_ok());
    }
}

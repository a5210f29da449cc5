//! A least-recently-used map of byte buffers bounded by their total size, not their count:
//! the block cache's memory and a chunked layer's decoded chunks both hold pieces of very
//! different sizes.

use bytes::Bytes;
use std::hash::Hash;

/// Buffers by key, the least recently used dropped while the total exceeds the capacity.
pub struct BytesLru<K: Hash + Eq> {
    map: lru::LruCache<K, Bytes>,
    used: u64,
    capacity: u64,
}

impl<K: Hash + Eq> BytesLru<K> {
    /// An empty map holding at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        BytesLru {
            map: lru::LruCache::unbounded(),
            used: 0,
            capacity,
        }
    }

    /// The buffer under `key`, now the most recently used.
    pub fn get(&mut self, key: &K) -> Option<Bytes> {
        self.map.get(key).cloned()
    }

    /// Whether `key` is held (without touching its recency).
    pub fn contains(&self, key: &K) -> bool {
        self.map.contains(key)
    }

    /// Keeps `data` under `key`, then drops the least recently used buffers (possibly this
    /// one, if it alone exceeds the capacity) until the total fits.
    pub fn put(&mut self, key: K, data: Bytes) {
        self.used += data.len() as u64;
        if let Some(old) = self.map.put(key, data) {
            self.used -= old.len() as u64;
        }
        while self.used > self.capacity {
            match self.map.pop_lru() {
                Some((_, b)) => self.used -= b.len() as u64,
                None => break,
            }
        }
    }

    /// Drops the buffers whose key `keep` refuses.
    pub fn retain(&mut self, keep: impl Fn(&K) -> bool)
    where
        K: Clone,
    {
        let gone: Vec<K> = self
            .map
            .iter()
            .filter(|(k, _)| !keep(k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(b) = self.map.pop(&k) {
                self.used -= b.len() as u64;
            }
        }
    }

    /// Raises the capacity by `bytes`.
    pub fn grow(&mut self, bytes: u64) {
        self.capacity = self.capacity.saturating_add(bytes);
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Buffers held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

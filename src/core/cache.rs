//! The in-process cache in front of the store: bounded in bytes, optional TTL, and versioned so
//! it never goes backwards (a late read of an older row cannot overwrite a newer change).

use moka::ops::compute::Op;
use moka::sync::Cache as Moka;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

/// A cached key: its version and value (`None` = deleted / absent at that version).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    pub version: u64,
    pub value: Option<Arc<str>>,
}

/// Cache statistics.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    #[serde(rename = "hitRatio")]
    pub hit_ratio: f64,
    pub size: u64,
    pub bytes: u64,
    #[serde(rename = "maxBytes")]
    pub max_bytes: u64,
}

pub struct Cache {
    inner: Moka<Arc<str>, CacheEntry>,
    hits: AtomicU64,
    misses: AtomicU64,
    max_bytes: u64,
    /// Set before the first entry goes in: until then `refresh` has nothing to look up (most
    /// streams change keys nobody reads through `get`).
    filled: AtomicBool,
}

fn weight(k: &Arc<str>, v: &CacheEntry) -> u32 {
    (k.len() + v.value.as_ref().map_or(0, |s| s.len()) + 48).min(u32::MAX as usize) as u32
}

impl Cache {
    /// A cache holding at most `max_bytes` of keys+values; `ttl_ms` 0 means no expiry.
    pub fn new(max_bytes: u64, ttl_ms: u64) -> Self {
        let mut b = Moka::builder().max_capacity(max_bytes).weigher(weight);
        if ttl_ms > 0 {
            b = b.time_to_live(Duration::from_millis(ttl_ms));
        }
        Cache {
            inner: b.build(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            max_bytes,
            filled: AtomicBool::new(false),
        }
    }

    /// Looks a key up, counting a hit or a miss.
    pub fn get(&self, key: &str) -> Option<CacheEntry> {
        let r = self.inner.get(key);
        if r.is_some() {
            self.hits.fetch_add(1, Relaxed);
        } else {
            self.misses.fetch_add(1, Relaxed);
        }
        r
    }

    /// Stores `entry` unless the cache already holds the same or a newer version of the key.
    /// Returns true when stored.
    pub fn offer(&self, key: Arc<str>, entry: CacheEntry) -> bool {
        let new_version = entry.version;
        // Before the entry is visible: a `refresh` that finds the flag unset would not have
        // found the entry either.
        self.filled.store(true, SeqCst);
        let r = self.inner.entry(key).and_compute_with(|cur| match cur {
            Some(e) if e.value().version >= new_version => Op::Nop,
            _ => Op::Put(entry),
        });
        !matches!(
            r,
            moka::ops::compute::CompResult::Unchanged(_)
                | moka::ops::compute::CompResult::StillNone(_)
        )
    }

    /// The cached version of `key`, without counting a hit or miss.
    pub fn peek_version(&self, key: &str) -> Option<u64> {
        self.inner.get(key).map(|e| e.version)
    }

    /// Updates `key` only if it is cached with an older version. Called by the single thread
    /// that writes the cache, so the check and the insert cannot interleave with another write.
    pub fn refresh(&self, key: &Arc<str>, entry: CacheEntry) -> bool {
        // Most changed keys are not cached; `contains_key` does not record a read, `get` does.
        if !self.filled.load(SeqCst) || !self.inner.contains_key(key) {
            return false;
        }
        match self.inner.get(key) {
            Some(cur) if cur.version < entry.version => {
                self.inner.insert(key.clone(), entry);
                true
            }
            _ => false,
        }
    }

    /// Drops `key` (a change whose version cannot be compared with the cached one).
    pub fn invalidate(&self, key: &str) {
        self.inner.invalidate(key);
    }

    /// Drops every entry (after a resync: changes were missed, any entry may be stale).
    pub fn clear(&self) {
        self.inner.invalidate_all();
    }

    pub fn stats(&self) -> CacheStats {
        self.inner.run_pending_tasks();
        let hits = self.hits.load(Relaxed);
        let misses = self.misses.load(Relaxed);
        let total = hits + misses;
        CacheStats {
            hits,
            misses,
            hit_ratio: if total == 0 {
                0.0
            } else {
                hits as f64 / total as f64
            },
            size: self.inner.entry_count(),
            bytes: self.inner.weighted_size(),
            max_bytes: self.max_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(version: u64, v: &str) -> CacheEntry {
        CacheEntry {
            version,
            value: Some(v.into()),
        }
    }

    #[test]
    fn never_goes_backwards() {
        let c = Cache::new(1 << 20, 0);
        assert!(c.offer("k".into(), e(2, "two")));
        assert!(!c.offer("k".into(), e(1, "one")));
        assert!(!c.offer("k".into(), e(2, "again")));
        assert_eq!(c.get("k"), Some(e(2, "two")));
        assert!(c.offer(
            "k".into(),
            CacheEntry {
                version: 3,
                value: None
            }
        ));
        assert_eq!(c.get("k").unwrap().value, None);
    }

    #[test]
    fn refresh_updates_cached_keys_only() {
        let c = Cache::new(1 << 20, 0);
        assert!(!c.refresh(&"absent".into(), e(1, "x")));
        assert_eq!(c.get("absent"), None);
        c.offer("k".into(), e(1, "one"));
        assert!(c.refresh(&"k".into(), e(2, "two")));
        assert!(!c.refresh(&"k".into(), e(2, "again")));
        assert!(!c.refresh(&"k".into(), e(1, "old")));
        assert_eq!(c.get("k"), Some(e(2, "two")));
    }

    #[test]
    fn counts_hits_and_misses() {
        let c = Cache::new(1 << 20, 0);
        c.offer("a".into(), e(1, "x"));
        assert!(c.get("a").is_some());
        assert!(c.get("b").is_none());
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.size), (1, 1, 1));
        assert!((s.hit_ratio - 0.5).abs() < 1e-9);
    }

    #[test]
    fn bounded_in_bytes() {
        let c = Cache::new(64 * 1024, 0);
        let big = "x".repeat(1000);
        for i in 0..1000 {
            c.offer(format!("k{i}").into(), e(1, &big));
        }
        let s = c.stats();
        assert!(s.bytes <= 64 * 1024, "{s:?}");
        assert!(s.size < 1000, "{s:?}");
    }

    #[test]
    fn ttl_expires_entries() {
        let c = Cache::new(1 << 20, 30);
        c.offer("k".into(), e(1, "v"));
        assert!(c.get("k").is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.get("k").is_none());
    }
}

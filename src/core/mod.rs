//! The core: ordering/dedupe, the cache, the history ring and the hand-off to the adaptive
//! batcher. It is fed `Change`s by a source and never knows which database it is fed by.

pub mod batcher;
pub mod cache;
pub mod engine;
pub mod history;
pub mod order;
pub mod pipeline;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use crate::event::{Change, Event};
use crate::metrics::Metrics;
use cache::{Cache, CacheEntry};
use history::History;
use order::{Admission, Sequencer};

/// Shared state between the source thread, the batcher and the API.
pub struct Core {
    // Held only for the few map operations of one ingest call.
    sequencer: Mutex<Sequencer>,
    pub cache: Option<Cache>,
    history: Mutex<History>,
    pub metrics: Arc<Metrics>,
    queue_size: usize,
}

impl Core {
    pub fn new(
        cache: Option<Cache>,
        history_size: usize,
        history_max_bytes: usize,
        dedupe_capacity: usize,
        metrics: Arc<Metrics>,
        queue_size: usize,
    ) -> Core {
        Core {
            sequencer: Mutex::new(Sequencer::new(dedupe_capacity)),
            cache,
            history: Mutex::new(History::new(history_size, history_max_bytes)),
            metrics,
            queue_size,
        }
    }

    /// How many more events the delivery queue takes without blocking. A source reads at most
    /// this many: a slow consumer leaves changes in the database's log, not in memory.
    pub fn free_capacity(&self) -> usize {
        self.queue_size
            .saturating_sub(self.metrics.dispatch_queue_depth.load(Relaxed))
    }

    /// Admits new changes (in source order), updates the cache and history, and returns the
    /// events to deliver.
    pub fn ingest(&self, changes: Vec<Change>) -> Vec<Event> {
        let mut admitted = Vec::with_capacity(changes.len());
        {
            let mut seq = self.sequencer.lock().unwrap_or_else(|p| p.into_inner());
            for mut c in changes {
                match seq.admit(&mut c) {
                    Admission::Accept(_) => admitted.push(Arc::new(c)),
                    Admission::DuplicatePosition | Admission::StaleVersion => {
                        self.metrics.events_deduplicated.fetch_add(1, Relaxed);
                    }
                }
            }
        }
        let n = admitted.len();
        if n == 0 {
            return Vec::new();
        }
        if let Some(cache) = &self.cache {
            // Keep cached keys current; keys nobody read are not pulled into the cache.
            for c in admitted.iter().filter(|c| c.table.is_none()) {
                if !c.versioned {
                    // Its version says nothing (a SQL write that left it, or a SQL DELETE after
                    // which versions restart): drop the entry rather than compare.
                    cache.invalidate(&c.key);
                    continue;
                }
                cache.refresh(
                    &c.key,
                    CacheEntry {
                        version: c.version,
                        value: c.data.clone(),
                    },
                );
            }
        }
        {
            let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            for c in &admitted {
                h.push(c.seq, Event::Change(c.clone()));
            }
        }
        self.metrics.events_captured.fetch_add(n as u64, Relaxed);
        admitted.into_iter().map(Event::Change).collect()
    }

    /// Fills the cache after a store read, unless a newer change of the key was already seen.
    pub fn fill_cache(&self, key: Arc<str>, entry: CacheEntry) {
        if let Some(cache) = &self.cache {
            let newer_seen = {
                let seq = self.sequencer.lock().unwrap_or_else(|p| p.into_inner());
                matches!(seq.last_version(&key), Some(v) if v > entry.version)
            };
            if !newer_seen {
                cache.offer(key, entry);
            }
        }
    }

    /// The last global seq handed out.
    pub fn last_seq(&self) -> u64 {
        self.sequencer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_seq()
    }

    /// Events and bytes held in the history ring.
    pub fn history_len(&self) -> (usize, usize) {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        (h.len(), h.bytes())
    }
}

//! The core: ordering/dedupe, the cache, the history ring and the hand-off to the adaptive
//! batcher. It is fed `Change`s by a source and never knows which database it is fed by.

pub mod batcher;
pub mod cache;
pub mod engine;
pub mod history;
pub mod order;
pub mod pipeline;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};

use crate::event::{Change, Event};
use crate::metrics::Metrics;
use cache::{Cache, CacheEntry};
use history::{History, Replay};
use order::{Admission, Sequencer};

/// Receives every admitted change, in seq order, while the history lock is held (the WebSocket
/// hub): a subscriber registered under that lock gets a replay up to some seq and every change
/// after it live, with nothing missed or doubled in between. Must not block.
pub trait Publisher: Send + Sync {
    fn publish(&self, changes: &[Arc<Change>]);
}

/// The cache shared by instances (L2, Redis): offered what the store reads.
pub trait L2Sink: Send + Sync {
    fn offer(&self, key: Arc<str>, entry: CacheEntry);
}

/// Shared state between the source thread, the batcher and the API.
pub struct Core {
    // Held only for the few map operations of one ingest call.
    sequencer: Mutex<Sequencer>,
    pub cache: Option<Cache>,
    history: Mutex<History>,
    pub metrics: Arc<Metrics>,
    queue_size: usize,
    publisher: RwLock<Option<Arc<dyn Publisher>>>,
    l2: RwLock<Option<Arc<dyn L2Sink>>>,
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
            publisher: RwLock::new(None),
            l2: RwLock::new(None),
        }
    }

    /// Attaches (or detaches) the publisher that sees every admitted change.
    pub fn set_publisher(&self, p: Option<Arc<dyn Publisher>>) {
        *self.publisher.write().unwrap_or_else(|p| p.into_inner()) = p;
    }

    /// Runs `register(last)` under the history lock, where `last` is the last seq published,
    /// and returns what the history holds after `since` (when given): a subscriber registered
    /// in `register` then gets every change after `last` live.
    pub fn subscribe_at<T>(
        &self,
        since: Option<u64>,
        register: impl FnOnce(u64) -> T,
    ) -> (T, Option<Replay>) {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let last = h.last();
        let replay = since.map(|s| h.since(s, last));
        (register(last), replay)
    }

    /// How many more events the delivery queue takes without blocking. A source reads at most
    /// this many: a slow consumer leaves changes in the database's log, not in memory.
    pub fn free_capacity(&self) -> usize {
        self.queue_size
            .saturating_sub(self.metrics.dispatch_queue_depth.load(Relaxed))
    }

    /// Admits new changes (in source order), updates the cache and (while a hub runs) the
    /// history, and returns the events to deliver. A change is numbered while the source's
    /// vector still holds it (read in order, no atomic operation), then moved into the `Arc` it
    /// is shared by from there on.
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
            match &*self.publisher.read().unwrap_or_else(|p| p.into_inner()) {
                Some(p) => {
                    for c in &admitted {
                        h.push(c.seq, Event::Change(c.clone()));
                    }
                    p.publish(&admitted);
                }
                // No hub, so nobody can ask for a replay: holding the changes would only keep
                // their memory cold until eviction. A hub started later replays from then on
                // and answers an older `since` with a gap.
                None => h.continue_after(admitted[n - 1].seq),
            }
        }
        self.metrics.events_captured.fetch_add(n as u64, Relaxed);
        admitted.into_iter().map(Event::Change).collect()
    }

    /// Attaches (or detaches) the L2 cache.
    pub fn set_l2(&self, l2: Option<Arc<dyn L2Sink>>) {
        *self.l2.write().unwrap_or_else(|p| p.into_inner()) = l2;
    }

    /// Fills the caches after a store read: L2 compares versions itself; L1 is filled unless a
    /// newer change of the key was already seen.
    pub fn fill_cache(&self, key: Arc<str>, entry: CacheEntry) {
        if let Some(l2) = &*self.l2.read().unwrap_or_else(|p| p.into_inner()) {
            l2.offer(key.clone(), entry.clone());
        }
        self.fill_l1(key, entry);
    }

    /// Fills the in-process cache only (after an L2 hit).
    pub fn fill_l1(&self, key: Arc<str>, entry: CacheEntry) {
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

    /// Continues the seq numbering after `seq` (an instance joining a Redis-backed stream
    /// there): a client resuming before it gets a gap, not silence.
    pub fn start_at(&self, seq: u64) {
        self.sequencer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .continue_after(seq);
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .continue_after(seq);
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{ChangeKind, ChangeLogSeq, Position};

    /// An insert of key `k<n>` at change-log position `n` (shared by the core's tests).
    pub(crate) fn change(n: u64) -> Change {
        Change {
            kind: ChangeKind::Insert,
            key: format!("k{n}").into(),
            data: Some("1".into()),
            version: 1,
            versioned: true,
            seq: 0,
            position: Position::ChangeLog(ChangeLogSeq(n)),
            source: "test",
            commit_ts_us: 0,
            table: None,
            before: None,
            meta: None,
        }
    }

    struct Seen(Mutex<Vec<u64>>);

    impl Publisher for Seen {
        fn publish(&self, changes: &[Arc<Change>]) {
            self.0.lock().unwrap().extend(changes.iter().map(|c| c.seq));
        }
    }

    #[test]
    fn the_history_holds_changes_only_while_a_hub_can_replay_them() {
        let core = Core::new(None, 100, 1 << 20, 100, Arc::new(Metrics::new()), 1000);
        core.ingest((1..=5).map(change).collect());
        assert_eq!(core.history_len().0, 0, "no hub: nothing held");

        let hub = Arc::new(Seen(Mutex::new(Vec::new())));
        core.set_publisher(Some(hub.clone()));
        core.ingest((6..=8).map(change).collect());
        assert_eq!(*hub.0.lock().unwrap(), vec![6, 7, 8]);
        // A resume from before the hub started is told what it missed; one after is replayed.
        let ((), replay) = core.subscribe_at(Some(2), |last| assert_eq!(last, 8));
        match replay {
            Some(Replay::Gap { from, to, events }) => {
                assert_eq!((from, to, events.len()), (3, 5, 3))
            }
            other => panic!("{other:?}"),
        }
        let ((), replay) = core.subscribe_at(Some(6), |_| ());
        assert!(matches!(replay, Some(Replay::Events(e)) if e.len() == 2));

        // Stopped and started again: the ring never spans the time without a hub.
        core.set_publisher(None);
        core.ingest((9..=10).map(change).collect());
        assert_eq!(core.history_len().0, 0);
        core.set_publisher(Some(hub));
        core.ingest(vec![change(11)]);
        let ((), replay) = core.subscribe_at(Some(7), |last| assert_eq!(last, 11));
        match replay {
            Some(Replay::Gap { from, to, events }) => {
                assert_eq!((from, to, events.len()), (8, 10, 1))
            }
            other => panic!("{other:?}"),
        }
    }
}

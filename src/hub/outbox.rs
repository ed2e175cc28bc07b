//! A connection's outgoing queue, bounded in bytes, with the slow-consumer policy applied when
//! the bound is reached. Pure logic: the connection task drains it, the publisher fills it.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// What happens when a client falls `maxQueueBytes` behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Keep only the latest queued event per key (intermediate versions are skipped); if the
    /// distinct keys alone pass the bound, drop the oldest and signal a gap.
    Coalesce,
    /// Drop what is queued and signal a gap.
    Drop,
    /// Close the connection (close code 4408).
    Disconnect,
}

impl Policy {
    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "coalesce" => Some(Policy::Coalesce),
            "drop" => Some(Policy::Drop),
            "disconnect" => Some(Policy::Disconnect),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Item {
    pub seq: u64,
    /// What coalescing compares: the key, or the table and key of a row.
    pub coalesce_key: Arc<str>,
    pub json: Arc<str>,
}

/// What a push did beyond queueing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Overflow {
    pub coalesced: u64,
    pub dropped: u64,
    pub disconnect: bool,
}

#[derive(Debug)]
pub struct Outbox {
    items: VecDeque<Item>,
    bytes: usize,
    max_bytes: usize,
    policy: Policy,
    /// Events dropped and not yet reported: the first and last seq.
    gap: Option<(u64, u64)>,
}

impl Outbox {
    pub fn new(max_bytes: usize, policy: Policy) -> Outbox {
        Outbox {
            items: VecDeque::new(),
            bytes: 0,
            max_bytes: max_bytes.max(1),
            policy,
            gap: None,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn note_gap(&mut self, seq: u64) {
        self.gap = Some(match self.gap {
            Some((a, b)) => (a.min(seq), b.max(seq)),
            None => (seq, seq),
        });
    }

    /// Queues an event, applying the policy if the bound is passed.
    pub fn push(&mut self, item: Item) -> Overflow {
        let mut o = Overflow::default();
        self.bytes += item.json.len();
        self.items.push_back(item);
        if self.bytes <= self.max_bytes {
            return o;
        }
        match self.policy {
            Policy::Disconnect => o.disconnect = true,
            Policy::Drop => {
                // Everything before the newest event goes; the client is told which seqs.
                let newest = self.items.pop_back();
                for it in self.items.drain(..) {
                    o.dropped += 1;
                    let s = it.seq;
                    self.gap = Some(match self.gap {
                        Some((a, b)) => (a.min(s), b.max(s)),
                        None => (s, s),
                    });
                }
                self.bytes = 0;
                if let Some(n) = newest {
                    if n.json.len() <= self.max_bytes {
                        self.bytes = n.json.len();
                        self.items.push_back(n);
                    } else {
                        o.dropped += 1;
                        self.note_gap(n.seq);
                    }
                }
            }
            Policy::Coalesce => {
                // Keep the latest event of each key, in order.
                let mut seen = HashSet::new();
                let mut kept = VecDeque::with_capacity(self.items.len());
                for it in self.items.drain(..).rev() {
                    if seen.insert(it.coalesce_key.clone()) {
                        kept.push_front(it);
                    } else {
                        o.coalesced += 1;
                    }
                }
                self.items = kept;
                self.bytes = self.items.iter().map(|i| i.json.len()).sum();
                while self.bytes > self.max_bytes {
                    match self.items.pop_front() {
                        Some(it) => {
                            self.bytes -= it.json.len();
                            o.dropped += 1;
                            self.note_gap(it.seq);
                        }
                        None => break,
                    }
                }
            }
        }
        o
    }

    /// Everything queued: the gap to report first (if any), then the events in order.
    pub fn take(&mut self) -> (Option<(u64, u64)>, Vec<Item>) {
        self.bytes = 0;
        (self.gap.take(), self.items.drain(..).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64, key: &str, size: usize) -> Item {
        Item {
            seq,
            coalesce_key: key.into(),
            json: "x".repeat(size).into(),
        }
    }

    #[test]
    fn within_the_bound_everything_is_kept_in_order() {
        let mut o = Outbox::new(100, Policy::Drop);
        for s in 1..=5 {
            assert_eq!(o.push(item(s, "k", 10)), Overflow::default());
        }
        let (gap, items) = o.take();
        assert!(gap.is_none());
        assert_eq!(
            items.iter().map(|i| i.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(o.bytes(), 0);
    }

    #[test]
    fn drop_signals_exactly_what_was_dropped() {
        let mut o = Outbox::new(30, Policy::Drop);
        for s in 1..=3 {
            o.push(item(s, "k", 10));
        }
        let r = o.push(item(4, "k", 10));
        assert_eq!(r.dropped, 3);
        let (gap, items) = o.take();
        assert_eq!(gap, Some((1, 3)));
        assert_eq!(items.iter().map(|i| i.seq).collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn coalesce_keeps_the_latest_per_key() {
        let mut o = Outbox::new(35, Policy::Coalesce);
        o.push(item(1, "a", 10));
        o.push(item(2, "b", 10));
        o.push(item(3, "a", 10));
        let r = o.push(item(4, "a", 10));
        assert_eq!(r.coalesced, 2);
        let (gap, items) = o.take();
        assert!(gap.is_none());
        assert_eq!(items.iter().map(|i| i.seq).collect::<Vec<_>>(), [2, 4]);
        // Distinct keys beyond the bound: the oldest go, with a gap.
        let mut o = Outbox::new(25, Policy::Coalesce);
        for (s, k) in [(1, "a"), (2, "b"), (3, "c")] {
            o.push(item(s, k, 10));
        }
        let (gap, items) = o.take();
        assert_eq!(gap, Some((1, 1)));
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn disconnect_is_asked_for() {
        let mut o = Outbox::new(15, Policy::Disconnect);
        assert!(!o.push(item(1, "a", 10)).disconnect);
        assert!(o.push(item(2, "a", 10)).disconnect);
    }
}

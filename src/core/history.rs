//! The history ring: the last `capacity` events by global seq, so a reconnecting consumer can be
//! replayed what it missed, or told exactly what cannot be replayed.

use std::collections::VecDeque;

use crate::event::Event;

/// What a replay request gets.
#[derive(Debug, PartialEq)]
pub enum Replay {
    /// Every event after the requested seq, in order.
    Events(Vec<Event>),
    /// Events `from..=to` are no longer held; `events` are those still held after them.
    Gap {
        from: u64,
        to: u64,
        events: Vec<Event>,
    },
}

#[derive(Debug)]
pub struct History {
    ring: VecDeque<(u64, Event)>,
    capacity: usize,
    /// Bound on the bytes of keys and values held (values can be large).
    max_bytes: usize,
    bytes: usize,
    /// The last seq pushed (held or not).
    last: u64,
}

fn size_of(e: &Event) -> usize {
    match e {
        Event::Change(c) => 64 + c.key.len() + c.data.as_ref().map_or(0, |d| d.len()),
        Event::Resync { reason, .. }
        | Event::Mode { reason, .. }
        | Event::Invalidate { reason, .. } => 64 + reason.len(),
        Event::Schema { columns, .. } => 64 + columns.len(),
    }
}

impl History {
    /// A ring of at most `capacity` events and `max_bytes` bytes of keys and values.
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        History {
            ring: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
            max_bytes,
            bytes: 0,
            last: 0,
        }
    }

    /// The last seq pushed, whether or not it is still held.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Seqs up to `seq` were handed out without being held here (before this ring existed, or
    /// while no hub ran). What the ring held before them is dropped: it only ever holds an
    /// unbroken run of seqs, so a replay from before `seq` reports a gap.
    pub fn continue_after(&mut self, seq: u64) {
        if seq > self.last && !self.ring.is_empty() {
            self.ring.clear();
            self.bytes = 0;
        }
        self.last = self.last.max(seq);
    }

    pub fn push(&mut self, seq: u64, e: Event) {
        self.last = self.last.max(seq);
        let size = size_of(&e);
        if self.capacity == 0 || size > self.max_bytes {
            // Too big to keep: a replay across it reports a gap.
            self.ring.clear();
            self.bytes = 0;
            return;
        }
        while self.ring.len() >= self.capacity || self.bytes + size > self.max_bytes {
            match self.ring.pop_front() {
                Some((_, old)) => self.bytes -= size_of(&old),
                None => break,
            }
        }
        self.bytes += size;
        self.ring.push_back((seq, e));
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Events after `after` (exclusive), given that the last seq handed out is `last`.
    pub fn since(&self, after: u64, last: u64) -> Replay {
        let oldest = self.ring.front().map_or(last + 1, |(s, _)| *s);
        let events: Vec<Event> = self
            .ring
            .iter()
            .filter(|(s, _)| *s > after)
            .map(|(_, e)| e.clone())
            .collect();
        if after + 1 < oldest && after < last {
            Replay::Gap {
                from: after + 1,
                to: oldest - 1,
                events,
            }
        } else {
            Replay::Events(events)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: u64) -> Event {
        Event::Resync {
            source: "t",
            reason: n.to_string(),
            from: n,
            to: n,
        }
    }

    #[test]
    fn replays_what_it_holds_and_names_the_gap() {
        let mut h = History::new(3, 1 << 20);
        for s in 1..=5 {
            h.push(s, ev(s));
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.since(3, 5), Replay::Events(vec![ev(4), ev(5)]));
        assert_eq!(h.since(5, 5), Replay::Events(vec![]));
        assert_eq!(
            h.since(1, 5),
            Replay::Gap {
                from: 2,
                to: 2,
                events: vec![ev(3), ev(4), ev(5)]
            }
        );
    }

    #[test]
    fn bounded_in_bytes_too() {
        let mut h = History::new(1000, 1000);
        for s in 1..=100 {
            h.push(s, ev(s));
        }
        assert!(h.bytes() <= 1000, "{}", h.bytes());
        assert!(h.len() < 100);
        // The newest events are the ones kept, and a replay from the start names the gap.
        match h.since(0, 100) {
            Replay::Gap {
                from: 1,
                to,
                events,
            } => {
                assert_eq!(to as usize, 100 - h.len());
                assert_eq!(events.len(), h.len());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_ring_started_mid_stream_reports_what_came_before_as_a_gap() {
        let mut h = History::new(10, 1 << 20);
        h.continue_after(50);
        assert_eq!(
            h.since(40, h.last()),
            Replay::Gap {
                from: 41,
                to: 50,
                events: vec![]
            }
        );
        assert_eq!(h.since(50, h.last()), Replay::Events(vec![]));
        h.push(51, ev(51));
        match h.since(45, h.last()) {
            Replay::Gap { from, to, events } => {
                assert_eq!((from, to, events.len()), (46, 50, 1));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn seqs_passed_by_break_the_run_so_what_came_before_is_dropped() {
        let mut h = History::new(10, 1 << 20);
        for s in 1..=3 {
            h.push(s, ev(s));
        }
        h.continue_after(3);
        assert_eq!(h.len(), 3, "nothing passed by");
        h.continue_after(6);
        assert!(h.is_empty());
        assert_eq!(h.bytes(), 0);
        h.push(7, ev(7));
        assert_eq!(
            h.since(2, h.last()),
            Replay::Gap {
                from: 3,
                to: 6,
                events: vec![ev(7)]
            }
        );
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut h = History::new(0, 1 << 20);
        h.push(1, ev(1));
        assert!(h.is_empty());
        assert_eq!(
            h.since(0, 1),
            Replay::Gap {
                from: 1,
                to: 1,
                events: vec![]
            }
        );
    }
}

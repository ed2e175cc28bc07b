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
}

impl History {
    pub fn new(capacity: usize) -> Self {
        History {
            ring: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
        }
    }

    pub fn push(&mut self, seq: u64, e: Event) {
        if self.capacity == 0 {
            return;
        }
        if self.ring.len() == self.capacity {
            self.ring.pop_front();
        }
        self.ring.push_back((seq, e));
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
        let mut h = History::new(3);
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
    fn zero_capacity_holds_nothing() {
        let mut h = History::new(0);
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

//! Sinks deliver batches of events somewhere (JavaScript listeners now, the WebSocket hub later).
//! A sink never talks to a database.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::event::Event;

/// A consumer of event batches.
pub trait BatchSink: Send + Sync + 'static {
    /// Hands `events` over. The sink drops `ack` once the consumer has processed the batch; that
    /// is what bounds the batches in flight. Returns false when the consumer is gone for good.
    fn deliver(&self, events: Vec<Event>, ack: Ack) -> bool;
}

/// Counts batches in flight and lets the batcher wait for room.
#[derive(Debug)]
pub struct Gate {
    in_flight: Mutex<usize>,
    cv: Condvar,
    max: usize,
}

impl Gate {
    pub fn new(max: usize) -> Arc<Gate> {
        Arc::new(Gate {
            in_flight: Mutex::new(0),
            cv: Condvar::new(),
            max: max.max(1),
        })
    }

    /// Waits until a batch may be sent, then takes the slot.
    pub fn acquire(self: &Arc<Self>) -> Ack {
        let mut n = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= self.max {
            n = self.cv.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
        Ack(Some(self.clone()))
    }

    /// Batches currently in flight.
    pub fn in_flight(&self) -> usize {
        *self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until nothing is in flight, at most `timeout`. Returns true when idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut n = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = self
                .cv
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Releases one in-flight slot when dropped.
#[derive(Debug)]
pub struct Ack(Option<Arc<Gate>>);

impl Ack {
    /// An ack bound to no gate (tests, fire-and-forget sinks).
    pub fn detached() -> Ack {
        Ack(None)
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            let mut n = g.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            *n = n.saturating_sub(1);
            g.cv.notify_all();
        }
    }
}

//! Sinks deliver batches of events somewhere (JavaScript listeners now, the WebSocket hub later).
//! A sink never talks to a database.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::event::Event;

/// A consumer of event batches.
pub trait BatchSink: Send + Sync + 'static {
    /// Hands `events` over. The sink drops `ack` once the consumer has processed the batch; that
    /// is what bounds the batches in flight. Returns false when the consumer is gone for good.
    fn deliver(&self, events: Vec<Event>, ack: Ack) -> bool;
}

/// Called when a slot frees up while events are waiting for one.
pub type Waker = Box<dyn Fn() + Send + Sync>;

/// Counts batches in flight and wakes the producer when a slot frees up while it has events
/// waiting.
pub struct Gate {
    in_flight: Mutex<usize>,
    cv: Condvar,
    max: usize,
    /// Events the producer holds back for lack of a slot (kept in sync by the batcher).
    pub waiting: AtomicUsize,
    waker: Mutex<Option<Waker>>,
    /// Mirrors the in-flight count for status readers (`getStatus().queues.inFlightBatches`).
    gauge: Option<Arc<AtomicUsize>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("in_flight", &self.in_flight())
            .field("max", &self.max)
            .finish()
    }
}

impl Gate {
    /// A gate for `max` batches in flight that keeps `gauge` (if any) equal to its count.
    pub fn new(max: usize, gauge: Option<Arc<AtomicUsize>>) -> Arc<Gate> {
        Arc::new(Gate {
            in_flight: Mutex::new(0),
            cv: Condvar::new(),
            max: max.max(1),
            waiting: AtomicUsize::new(0),
            waker: Mutex::new(None),
            gauge,
        })
    }

    fn set_gauge(&self, n: usize) {
        if let Some(g) = &self.gauge {
            g.store(n, SeqCst);
        }
    }

    /// Installs the function that wakes the producer.
    pub fn set_waker(&self, w: Waker) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
    }

    /// Takes a slot if one is free.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Ack> {
        let mut n = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if *n >= self.max {
            return None;
        }
        *n += 1;
        self.set_gauge(*n);
        Some(Ack(Some(self.clone())))
    }

    /// Waits up to `timeout` for a slot.
    pub fn acquire_timeout(self: &Arc<Self>, timeout: Duration) -> Option<Ack> {
        let deadline = Instant::now() + timeout;
        let mut n = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= self.max {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            n = self
                .cv
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *n += 1;
        Some(Ack(Some(self.clone())))
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

    fn release(&self) {
        {
            let mut n = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            *n = n.saturating_sub(1);
            self.set_gauge(*n);
            self.cv.notify_all();
        }
        // SeqCst pairs with the batcher's store of `waiting` before its try_acquire: either it
        // got this slot, or we see its waiting events and wake it.
        if self.waiting.load(SeqCst) > 0 {
            if let Some(w) = self
                .waker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                w();
            }
        }
    }
}

/// Releases one in-flight slot when dropped.
#[derive(Debug)]
pub struct Ack(Option<Arc<Gate>>);

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            g.release();
        }
    }
}

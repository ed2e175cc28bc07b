//! Adaptive batching between capture and a sink, driven by the capture thread itself (no extra
//! thread, so an idle change costs no extra hop). When the pipe is idle an event goes out alone,
//! at once. When events arrive faster than the sink takes them, they wait while the in-flight
//! slots are taken and leave together (up to `batch_size`); under sustained load (the previous
//! batch was full) a batch may also linger up to `batch_timeout` to fill up.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::event::Event;
use crate::metrics::Metrics;
use crate::sink::{BatchSink, Gate, Waker};

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    pub batch_size: usize,
    pub batch_timeout: Duration,
    pub max_in_flight: usize,
}

pub struct Batcher {
    pending: VecDeque<Event>,
    gate: Arc<Gate>,
    sink: Arc<dyn BatchSink>,
    opts: BatchOptions,
    metrics: Arc<Metrics>,
    last_full: bool,
    /// When the events now pending started to wait (for the linger bound).
    since: Option<Instant>,
    sink_gone: bool,
}

impl Batcher {
    /// `waker` is called (from the consumer's thread) when a slot frees up while events wait.
    pub fn new(
        sink: Arc<dyn BatchSink>,
        opts: BatchOptions,
        metrics: Arc<Metrics>,
        waker: Option<Waker>,
    ) -> Batcher {
        let gate = Gate::new(opts.max_in_flight, Some(metrics.in_flight_batches.clone()));
        if let Some(w) = waker {
            gate.set_waker(w);
        }
        Batcher {
            pending: VecDeque::new(),
            gate,
            sink,
            opts,
            metrics,
            last_full: false,
            since: None,
            sink_gone: false,
        }
    }

    /// Events waiting for delivery.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Queues events (in source order) that arrived at `now`.
    pub fn push(&mut self, events: Vec<Event>, now: Instant) {
        if events.is_empty() || self.sink_gone {
            return;
        }
        if self.pending.is_empty() {
            self.since = Some(now);
        }
        self.metrics
            .dispatch_queue_depth
            .fetch_add(events.len(), Relaxed);
        self.pending.extend(events);
    }

    /// Delivers what may go now. Returns when to call again for a lingering batch (`None`: no
    /// time-based wake is needed; a freed slot calls the waker).
    pub fn flush(&mut self, now: Instant) -> Option<Duration> {
        let size = self.opts.batch_size.max(1);
        loop {
            if self.pending.is_empty() || self.sink_gone {
                self.gate.waiting.store(0, SeqCst);
                return None;
            }
            if self.last_full && self.pending.len() < size && !self.opts.batch_timeout.is_zero() {
                let due = self.since.unwrap_or(now) + self.opts.batch_timeout;
                if now < due {
                    return Some(due - now);
                }
            }
            self.gate.waiting.store(self.pending.len(), SeqCst);
            let ack = self.gate.try_acquire()?;
            self.send(size, ack, now);
        }
    }

    fn send(&mut self, size: usize, ack: crate::sink::Ack, now: Instant) {
        let n = self.pending.len().min(size);
        let batch: Vec<Event> = self.pending.drain(..n).collect();
        self.last_full = n >= size;
        self.since = if self.pending.is_empty() {
            None
        } else {
            Some(now)
        };
        self.gate.waiting.store(self.pending.len(), SeqCst);
        self.metrics.dispatch_queue_depth.fetch_sub(n, Relaxed);
        if !self.sink.deliver(batch, ack) {
            self.sink_gone = true;
            let left = self.pending.len();
            self.pending.clear();
            self.metrics.dispatch_queue_depth.fetch_sub(left, Relaxed);
        }
    }

    /// Delivers everything pending, waiting for slots, then waits until the sink has processed
    /// every batch (used when closing). Gives up after `timeout`.
    pub fn drain(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let size = self.opts.batch_size.max(1);
        while !self.pending.is_empty() && !self.sink_gone {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.gate.acquire_timeout(left) {
                Some(ack) => self.send(size, ack, Instant::now()),
                None => return false,
            }
        }
        self.gate
            .wait_idle(deadline.saturating_duration_since(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Change, ChangeKind, ChangeLogSeq, Position};
    use crate::sink::Ack;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        batches: Mutex<Vec<Vec<u64>>>,
        held: Mutex<Vec<Ack>>,
        hold: bool,
    }

    impl BatchSink for Recorder {
        fn deliver(&self, events: Vec<Event>, ack: Ack) -> bool {
            let seqs = events
                .iter()
                .map(|e| match e {
                    Event::Change(c) => c.seq,
                    _ => 0,
                })
                .collect();
            self.batches.lock().unwrap().push(seqs);
            if self.hold {
                self.held.lock().unwrap().push(ack);
            }
            true
        }
    }

    fn ev(seq: u64) -> Event {
        Event::Change(Arc::new(Change {
            kind: ChangeKind::Insert,
            key: "k".into(),
            data: None,
            version: seq,
            versioned: true,
            seq,
            position: Position::ChangeLog(ChangeLogSeq(seq)),
            source: "t",
            commit_ts_us: 0,
            table: None,
            before: None,
            meta: None,
        }))
    }

    fn t() -> Instant {
        *T0
    }

    static T0: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

    fn evs(r: std::ops::RangeInclusive<u64>) -> Vec<Event> {
        r.map(ev).collect()
    }

    fn opts(size: usize, in_flight: usize, linger_ms: u64) -> BatchOptions {
        BatchOptions {
            batch_size: size,
            batch_timeout: Duration::from_millis(linger_ms),
            max_in_flight: in_flight,
        }
    }

    fn batcher(sink: &Arc<Recorder>, o: BatchOptions, wakes: &Arc<AtomicUsize>) -> Batcher {
        let w = wakes.clone();
        Batcher::new(
            sink.clone(),
            o,
            Arc::new(Metrics::new()),
            Some(Box::new(move || {
                w.fetch_add(1, Relaxed);
            })),
        )
    }

    #[test]
    fn idle_pipe_flushes_each_event_at_once() {
        let sink = Arc::new(Recorder::default());
        let wakes = Arc::new(AtomicUsize::new(0));
        let mut b = batcher(&sink, opts(100, 2, 1), &wakes);
        for s in 1..=3 {
            b.push(vec![ev(s)], t());
            assert_eq!(b.flush(Instant::now()), None);
        }
        assert_eq!(
            *sink.batches.lock().unwrap(),
            vec![vec![1], vec![2], vec![3]]
        );
        assert_eq!(wakes.load(Relaxed), 0, "no wake-up when nothing waits");
    }

    #[test]
    fn busy_consumer_coalesces_up_to_batch_size_in_order_and_wakes_the_producer() {
        let sink = Arc::new(Recorder {
            hold: true,
            ..Default::default()
        });
        let wakes = Arc::new(AtomicUsize::new(0));
        let mut b = batcher(&sink, opts(4, 1, 0), &wakes);
        b.push(vec![ev(1)], t());
        b.flush(Instant::now());
        // The only slot is taken: everything else waits and piles up.
        for s in 2..=10 {
            b.push(vec![ev(s)], t());
            assert_eq!(b.flush(Instant::now()), None);
        }
        assert_eq!(sink.batches.lock().unwrap().len(), 1);
        assert_eq!(b.pending(), 9);
        // The consumer finishes: the producer is woken and sends the backlog in full batches.
        while b.pending() > 0 {
            let before = wakes.load(Relaxed);
            sink.held.lock().unwrap().clear();
            assert_eq!(wakes.load(Relaxed), before + 1);
            b.flush(Instant::now());
        }
        let batches = sink.batches.lock().unwrap().clone();
        assert_eq!(
            batches,
            vec![vec![1], vec![2, 3, 4, 5], vec![6, 7, 8, 9], vec![10]]
        );
    }

    #[test]
    fn a_large_push_is_split_at_batch_size() {
        let sink = Arc::new(Recorder::default());
        let wakes = Arc::new(AtomicUsize::new(0));
        let mut b = batcher(&sink, opts(4, 8, 0), &wakes);
        b.push(evs(1..=10), t());
        b.flush(Instant::now());
        let batches = sink.batches.lock().unwrap().clone();
        assert_eq!(
            batches,
            vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10]]
        );
    }

    #[test]
    fn batch_size_one_is_one_call_per_event() {
        let sink = Arc::new(Recorder::default());
        let wakes = Arc::new(AtomicUsize::new(0));
        let mut b = batcher(&sink, opts(1, 64, 0), &wakes);
        b.push(evs(1..=20), t());
        b.flush(Instant::now());
        assert_eq!(sink.batches.lock().unwrap().len(), 20);
    }

    #[test]
    fn sustained_load_lingers_at_most_batch_timeout() {
        let sink = Arc::new(Recorder::default());
        let wakes = Arc::new(AtomicUsize::new(0));
        let mut b = batcher(&sink, opts(5, 4, 10), &wakes);
        let t0 = t();
        b.push(evs(1..=5), t());
        assert_eq!(b.flush(t0), None); // a full batch goes at once
        b.push(evs(6..=7), t());
        // Sustained load: a partial batch waits to fill, and says for how long.
        let wait = b.flush(t0).expect("lingers");
        assert!(wait <= Duration::from_millis(10));
        assert_eq!(sink.batches.lock().unwrap().len(), 1);
        b.push(evs(8..=10), t());
        assert_eq!(b.flush(t0), None); // filled up: goes without waiting
        b.push(vec![ev(11)], t0);
        assert!(b.flush(t0).is_some());
        // After the linger time the partial batch goes anyway.
        assert_eq!(b.flush(t0 + Duration::from_millis(11)), None);
        let batches = sink.batches.lock().unwrap().clone();
        assert_eq!(
            batches,
            vec![vec![1, 2, 3, 4, 5], vec![6, 7, 8, 9, 10], vec![11]]
        );
    }

    #[test]
    fn drain_delivers_everything_and_waits_for_the_consumer() {
        let sink = Arc::new(Recorder::default());
        let wakes = Arc::new(AtomicUsize::new(0));
        let mut b = batcher(&sink, opts(3, 1, 0), &wakes);
        b.push(evs(1..=7), t());
        assert!(b.drain(Duration::from_secs(1)));
        assert_eq!(
            sink.batches.lock().unwrap().concat(),
            (1..=7).collect::<Vec<_>>()
        );
    }

    #[test]
    fn drain_gives_up_when_the_consumer_never_finishes() {
        let sink = Arc::new(Recorder {
            hold: true,
            ..Default::default()
        });
        let wakes = Arc::new(AtomicUsize::new(0));
        let mut b = batcher(&sink, opts(1, 1, 0), &wakes);
        b.push(evs(1..=2), t());
        assert!(!b.drain(Duration::from_millis(20)));
    }
}

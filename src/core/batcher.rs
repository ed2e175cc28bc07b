//! Adaptive batching between capture and a sink. When the pipe is idle an event goes out alone,
//! at once (one hop). When events arrive faster than the sink takes them, they pile up while the
//! in-flight slots are taken and leave together (up to `batch_size`); under sustained load
//! (the previous batch was full) a batch may also linger up to `batch_timeout` to fill up.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::event::Event;
use crate::metrics::Metrics;
use crate::sink::{BatchSink, Gate};

/// What the capture side feeds the batcher.
#[derive(Debug)]
pub enum Feed {
    /// Events in source order (one ingest call's worth: one channel operation, not one per event).
    Events(Vec<Event>),
    /// No more events: flush, wait for the sink to finish, then stop.
    Stop,
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    pub batch_size: usize,
    pub batch_timeout: Duration,
    pub max_in_flight: usize,
    /// How long a stop waits for the sink to finish the batches in flight.
    pub drain_timeout: Duration,
}

/// Runs until `Feed::Stop`, a closed channel, or a sink that is gone. Returns the gate so the
/// caller can see what is still in flight.
pub fn run(
    rx: Receiver<Feed>,
    sink: Arc<dyn BatchSink>,
    opts: BatchOptions,
    metrics: Arc<Metrics>,
) -> Arc<Gate> {
    let gate = Gate::new(opts.max_in_flight);
    let size = opts.batch_size.max(1);
    let mut pending: VecDeque<Event> = VecDeque::new();
    let mut stopping = false;
    let mut last_full = false;

    let drain = |pending: &mut VecDeque<Event>, stopping: &mut bool| {
        while pending.len() < size && !*stopping {
            match rx.try_recv() {
                Ok(Feed::Events(v)) => pending.extend(v),
                Ok(Feed::Stop) | Err(TryRecvError::Disconnected) => *stopping = true,
                Err(TryRecvError::Empty) => break,
            }
        }
    };

    loop {
        if pending.is_empty() && !stopping {
            match rx.recv() {
                Ok(Feed::Events(v)) => pending.extend(v),
                Ok(Feed::Stop) | Err(_) => stopping = true,
            }
        }
        drain(&mut pending, &mut stopping);
        if last_full && !stopping && pending.len() < size && !opts.batch_timeout.is_zero() {
            let deadline = Instant::now() + opts.batch_timeout;
            while pending.len() < size {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match rx.recv_timeout(left) {
                    Ok(Feed::Events(v)) => pending.extend(v),
                    Ok(Feed::Stop) | Err(RecvTimeoutError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                }
            }
        }
        if pending.is_empty() {
            if stopping {
                break;
            }
            continue;
        }
        let ack = gate.acquire();
        // Whatever arrived while the consumer was busy joins this batch.
        drain(&mut pending, &mut stopping);
        let n = pending.len().min(size);
        let batch: Vec<Event> = pending.drain(..n).collect();
        last_full = n >= size;
        metrics.dispatch_queue_depth.fetch_sub(n, Relaxed);
        metrics.in_flight_batches.store(gate.in_flight(), Relaxed);
        if !sink.deliver(batch, ack) {
            break;
        }
    }
    gate.wait_idle(opts.drain_timeout);
    metrics.in_flight_batches.store(gate.in_flight(), Relaxed);
    gate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Change, ChangeKind, ChangeLogSeq, Position};
    use crate::sink::Ack;
    use std::sync::mpsc::{sync_channel, SyncSender};
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

    fn ev(seq: u64) -> Feed {
        Feed::Events(vec![Event::Change(Arc::new(Change {
            kind: ChangeKind::Insert,
            key: "k".into(),
            data: None,
            version: seq,
            seq,
            position: Position::ChangeLog(ChangeLogSeq(seq)),
            source: "t",
            commit_ts_us: 0,
        }))])
    }

    fn opts(size: usize, in_flight: usize) -> BatchOptions {
        BatchOptions {
            batch_size: size,
            batch_timeout: Duration::from_millis(0),
            max_in_flight: in_flight,
            drain_timeout: Duration::from_millis(100),
        }
    }

    fn spawn(
        sink: Arc<Recorder>,
        o: BatchOptions,
    ) -> (SyncSender<Feed>, std::thread::JoinHandle<()>) {
        let (tx, rx) = sync_channel(10_000);
        let m = Arc::new(Metrics::new());
        m.dispatch_queue_depth.store(1_000_000, Relaxed);
        let h = std::thread::spawn(move || {
            run(rx, sink, o, m);
        });
        (tx, h)
    }

    fn wait_for(sink: &Recorder, n: usize) {
        let t = Instant::now();
        while sink
            .batches
            .lock()
            .unwrap()
            .iter()
            .map(Vec::len)
            .sum::<usize>()
            < n
        {
            assert!(t.elapsed() < Duration::from_secs(5), "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn idle_pipe_flushes_each_event_at_once() {
        let sink = Arc::new(Recorder::default());
        let (tx, h) = spawn(sink.clone(), opts(100, 2));
        for s in 1..=3 {
            tx.send(ev(s)).unwrap();
            wait_for(&sink, s as usize);
        }
        tx.send(Feed::Stop).unwrap();
        h.join().unwrap();
        assert_eq!(
            *sink.batches.lock().unwrap(),
            vec![vec![1], vec![2], vec![3]]
        );
    }

    #[test]
    fn busy_consumer_coalesces_up_to_batch_size_in_order() {
        // The sink holds every ack: after one batch in flight, events pile up.
        let sink = Arc::new(Recorder {
            hold: true,
            ..Default::default()
        });
        let (tx, h) = spawn(sink.clone(), opts(4, 1));
        tx.send(ev(1)).unwrap();
        wait_for(&sink, 1);
        for s in 2..=10 {
            tx.send(ev(s)).unwrap();
        }
        // Let the batcher see the backlog, then free the slot repeatedly.
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(20));
            sink.held.lock().unwrap().clear();
        }
        wait_for(&sink, 10);
        tx.send(Feed::Stop).unwrap();
        sink.held.lock().unwrap().clear();
        h.join().unwrap();
        let batches = sink.batches.lock().unwrap().clone();
        assert_eq!(batches[0], vec![1]);
        assert!(batches.iter().all(|b| b.len() <= 4), "{batches:?}");
        assert!(batches.len() <= 4, "expected coalescing, got {batches:?}");
        let flat: Vec<u64> = batches.concat();
        assert_eq!(flat, (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn stop_flushes_pending_events() {
        let sink = Arc::new(Recorder::default());
        let (tx, h) = spawn(sink.clone(), opts(1000, 2));
        for s in 1..=50 {
            tx.send(ev(s)).unwrap();
        }
        tx.send(Feed::Stop).unwrap();
        h.join().unwrap();
        let flat: Vec<u64> = sink.batches.lock().unwrap().concat();
        assert_eq!(flat, (1..=50).collect::<Vec<_>>());
    }

    #[test]
    fn a_large_feed_is_split_at_batch_size() {
        let sink = Arc::new(Recorder::default());
        let (tx, h) = spawn(sink.clone(), opts(4, 2));
        let events: Vec<Event> = (1..=10)
            .map(|s| match ev(s) {
                Feed::Events(mut v) => v.remove(0),
                Feed::Stop => unreachable!(),
            })
            .collect();
        tx.send(Feed::Events(events)).unwrap();
        tx.send(Feed::Stop).unwrap();
        h.join().unwrap();
        let batches = sink.batches.lock().unwrap().clone();
        assert!(batches.iter().all(|b| b.len() <= 4), "{batches:?}");
        assert_eq!(batches.concat(), (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn batch_size_one_is_one_call_per_event() {
        let sink = Arc::new(Recorder::default());
        let (tx, h) = spawn(sink.clone(), opts(1, 4));
        for s in 1..=20 {
            tx.send(ev(s)).unwrap();
        }
        tx.send(Feed::Stop).unwrap();
        h.join().unwrap();
        let batches = sink.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 20);
    }

    #[test]
    fn sustained_load_lingers_to_fill_a_batch() {
        let sink = Arc::new(Recorder::default());
        let mut o = opts(5, 1);
        o.batch_timeout = Duration::from_millis(200);
        let (tx, h) = spawn(sink.clone(), o);
        // First a full batch (so the batcher sees sustained load)...
        for s in 1..=5 {
            tx.send(ev(s)).unwrap();
        }
        wait_for(&sink, 5);
        // ...then events trickle in faster than the linger time: they are coalesced.
        for s in 6..=10 {
            tx.send(ev(s)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        wait_for(&sink, 10);
        tx.send(Feed::Stop).unwrap();
        h.join().unwrap();
        let batches = sink.batches.lock().unwrap().clone();
        assert!(batches.len() <= 3, "{batches:?}");
        assert_eq!(batches.concat(), (1..=10).collect::<Vec<_>>());
    }
}

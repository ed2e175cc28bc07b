//! The delivery thread of a server source. A capture thread blocks on the network, so the
//! batching timers and the sink's backpressure live here: source → bounded channel → core →
//! batcher → sink. The thread also remembers the checkpoint of the last changes it handed on, which
//! is what the source persists: resuming there neither skips nor repeats a change.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::batcher::{BatchOptions, Batcher};
use super::Core;
use crate::event::{Change, Event};
use crate::sink::BatchSink;

/// What a source sends to the pipeline.
pub enum SourceMsg<C> {
    /// Changes in source order. `checkpoint` is set when the last change ends a transaction:
    /// the position to resume from once these changes are delivered.
    Changes {
        changes: Vec<Change>,
        checkpoint: Option<C>,
    },
    /// The source lost its place (log purged, history expired) and continues from `checkpoint`.
    Resync {
        reason: String,
        checkpoint: Option<C>,
    },
    /// A notice for listeners: the capture mode changed, a watched table's columns changed.
    Notice(Event),
    /// Deliver what was received, then stop.
    Stop,
    /// A delivery slot freed up while events wait for one. Sent by the pipeline's own waker,
    /// never by a source: it wakes the thread from its wait for messages.
    Wake,
}

/// A source's resume position. A newer checkpoint usually replaces the older one; a source
/// whose checkpoint has parts (one token per MongoDB change stream) merges them.
pub trait Checkpoint: Clone + Send + 'static {
    fn advance(&mut self, newer: Self) {
        *self = newer;
    }
}

/// A running pipeline thread.
pub struct Pipeline<C> {
    tx: SyncSender<SourceMsg<C>>,
    handle: Option<JoinHandle<()>>,
    delivered: Arc<Mutex<Option<C>>>,
}

impl<C: Checkpoint> Pipeline<C> {
    /// Starts the thread. `source` names the source in the events it makes (resync);
    /// `capacity` bounds the messages waiting between source and pipeline.
    pub fn start(
        name: &str,
        source: &'static str,
        core: Arc<Core>,
        sink: Arc<dyn BatchSink>,
        opts: BatchOptions,
        capacity: usize,
        start: Option<C>,
    ) -> std::io::Result<Pipeline<C>> {
        let (tx, rx) = sync_channel(capacity.max(1));
        let delivered = Arc::new(Mutex::new(start));
        let d = delivered.clone();
        let wake = tx.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(source, core, sink, opts, rx, wake, d))?;
        Ok(Pipeline {
            tx,
            handle: Some(handle),
            delivered,
        })
    }

    /// The sender a source thread feeds.
    pub fn sender(&self) -> SyncSender<SourceMsg<C>> {
        self.tx.clone()
    }

    /// The checkpoint after the last changes handed to the sink.
    pub fn delivered(&self) -> Option<C> {
        self.delivered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Delivers what was received (within bounds), stops the thread and returns the final
    /// checkpoint.
    pub fn stop(mut self) -> Option<C> {
        self.join();
        self.delivered()
    }
}

impl<C> Pipeline<C> {
    fn join(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.tx.send(SourceMsg::Stop);
            let _ = h.join();
        }
    }
}

/// The thread holds a sender of its own channel (its waker's), so it never sees the channel
/// disconnect: a pipeline dropped without `stop()` stops it here.
impl<C> Drop for Pipeline<C> {
    fn drop(&mut self) {
        self.join();
    }
}

fn run<C: Checkpoint>(
    source: &'static str,
    core: Arc<Core>,
    sink: Arc<dyn BatchSink>,
    opts: BatchOptions,
    rx: Receiver<SourceMsg<C>>,
    wake: SyncSender<SourceMsg<C>>,
    delivered: Arc<Mutex<Option<C>>>,
) {
    let me = std::thread::current();
    let woken = Arc::new(AtomicBool::new(false));
    let w = woken.clone();
    // The thread waits either parked (the delivery queue is full) or for a message: wake both.
    // A full channel needs no `Wake`, its messages wake the thread.
    let waker: crate::sink::Waker = Box::new(move || {
        w.store(true, Relaxed);
        me.unpark();
        let _ = wake.try_send(SourceMsg::Wake);
    });
    let mut batcher = Batcher::new(sink, opts, core.metrics.clone(), Some(waker));
    let handle = |msg: SourceMsg<C>, batcher: &mut Batcher| -> bool {
        match msg {
            SourceMsg::Changes {
                changes,
                checkpoint,
            } => {
                let events = core.ingest(changes);
                batcher.push(events, Instant::now());
                if let Some(c) = checkpoint {
                    advance(&delivered, c);
                }
                true
            }
            SourceMsg::Resync { reason, checkpoint } => {
                core.metrics.resyncs.fetch_add(1, Relaxed);
                // Changes were missed: cached values may be stale.
                if let Some(cache) = &core.cache {
                    cache.clear();
                }
                let to = core.last_seq();
                batcher.push(
                    vec![Event::Resync {
                        source,
                        reason,
                        from: to,
                        to,
                    }],
                    Instant::now(),
                );
                if let Some(c) = checkpoint {
                    advance(&delivered, c);
                }
                true
            }
            SourceMsg::Notice(e) => {
                batcher.push(vec![e], Instant::now());
                true
            }
            SourceMsg::Stop => false,
            SourceMsg::Wake => true,
        }
    };
    loop {
        let linger = batcher.flush(Instant::now());
        if core.free_capacity() == 0 {
            // The sink is behind: leave changes in the source (and the network) until a batch
            // is processed; the waker unparks this thread.
            if !woken.swap(false, Relaxed) {
                std::thread::park_timeout(Duration::from_millis(5));
            }
            continue;
        }
        let wait = linger.unwrap_or(Duration::from_millis(50));
        match rx.recv_timeout(wait) {
            Ok(msg) => {
                if !handle(msg, &mut batcher) {
                    break;
                }
                // Take what else is waiting before flushing: one batch instead of many.
                while core.free_capacity() > 0 {
                    match rx.try_recv() {
                        Ok(msg) => {
                            if !handle(msg, &mut batcher) {
                                return finish(rx, batcher, handle);
                            }
                        }
                        Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    finish(rx, batcher, handle)
}

fn finish<C>(
    rx: Receiver<SourceMsg<C>>,
    mut batcher: Batcher,
    mut handle: impl FnMut(SourceMsg<C>, &mut Batcher) -> bool,
) {
    // Messages already received are delivered; the source stopped sending before `Stop`.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(msg) = rx.try_recv() {
        if Instant::now() > deadline || !handle(msg, &mut batcher) {
            break;
        }
        if batcher.pending() >= 65_536 {
            batcher.drain(Duration::from_secs(1));
        }
    }
    batcher.drain(Duration::from_secs(5));
}

fn advance<C: Checkpoint>(delivered: &Mutex<Option<C>>, c: C) {
    let mut d = delivered.lock().unwrap_or_else(|p| p.into_inner());
    match d.as_mut() {
        Some(old) => old.advance(c),
        None => *d = Some(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tests::change;
    use crate::metrics::Metrics;
    use crate::sink::Ack;

    #[derive(Clone)]
    struct Cp;
    impl Checkpoint for Cp {}

    /// Records when each batch arrived and holds its slot until told.
    #[derive(Default)]
    struct Holder {
        arrived: Mutex<Vec<Instant>>,
        held: Mutex<Vec<Ack>>,
    }

    impl BatchSink for Holder {
        fn deliver(&self, _events: Vec<Event>, ack: Ack) -> bool {
            self.arrived.lock().unwrap().push(Instant::now());
            self.held.lock().unwrap().push(ack);
            true
        }
    }

    fn wait_for(what: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !what() {
            assert!(t0.elapsed() < Duration::from_secs(5), "timed out");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    #[test]
    fn events_waiting_for_a_slot_leave_as_soon_as_it_frees_up() {
        let core = Arc::new(Core::new(
            None,
            100,
            1 << 20,
            100,
            Arc::new(Metrics::new()),
            1000,
        ));
        let sink = Arc::new(Holder::default());
        let opts = BatchOptions {
            batch_size: 10,
            batch_timeout: Duration::ZERO,
            max_in_flight: 1,
        };
        let p = Pipeline::<Cp>::start("t", "test", core, sink.clone(), opts, 8, None).unwrap();
        let send = |n: u64| {
            p.sender()
                .send(SourceMsg::Changes {
                    changes: vec![change(n)],
                    checkpoint: Some(Cp),
                })
                .unwrap();
        };
        send(1);
        wait_for(|| sink.arrived.lock().unwrap().len() == 1);
        // The fastest of three tries: the thread's idle wait for messages is 50 ms, which a
        // freed slot must cut short.
        let mut fastest = Duration::MAX;
        for n in 2..5 {
            send(n);
            // Let the thread settle into its wait, with the change held back for lack of a slot.
            std::thread::sleep(Duration::from_millis(10));
            assert_eq!(sink.arrived.lock().unwrap().len() as u64, n - 1);
            let freed = Instant::now();
            sink.held.lock().unwrap().clear();
            wait_for(|| sink.arrived.lock().unwrap().len() as u64 == n);
            let at = *sink.arrived.lock().unwrap().last().unwrap();
            fastest = fastest.min(at.duration_since(freed));
        }
        assert!(fastest < Duration::from_millis(20), "took {fastest:?}");
        sink.held.lock().unwrap().clear();
        drop(p);
    }
}

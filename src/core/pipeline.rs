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
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(source, core, sink, opts, rx, d))?;
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
        let _ = self.tx.send(SourceMsg::Stop);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.delivered()
    }
}

fn run<C: Checkpoint>(
    source: &'static str,
    core: Arc<Core>,
    sink: Arc<dyn BatchSink>,
    opts: BatchOptions,
    rx: Receiver<SourceMsg<C>>,
    delivered: Arc<Mutex<Option<C>>>,
) {
    let me = std::thread::current();
    let woken = Arc::new(AtomicBool::new(false));
    let w = woken.clone();
    let waker: crate::sink::Waker = Box::new(move || {
        w.store(true, Relaxed);
        me.unpark();
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

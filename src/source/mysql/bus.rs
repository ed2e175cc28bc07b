//! A MySQL streamer in bus mode (`options.redis`): its link to Redis, and the switch between
//! capturing (while it holds the lease) and following.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use super::{start_capture, CaptureContext, Capturing, Resume, Store, PIPELINE_CAPACITY};
use crate::core::pipeline::SourceMsg;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::source::SourceStatus;

impl crate::bus::BusCheckpoint for Resume {
    fn to_bus(&self) -> String {
        let at = crate::event::now_us();
        match self {
            Resume::Binlog { file, pos } => format!("{at}|b|{pos}|{file}"),
            Resume::Poll { ts_us } => format!("{at}|p|{ts_us}"),
        }
    }

    fn from_bus(s: &str) -> Option<(Resume, i64)> {
        let mut parts = s.splitn(4, '|');
        let at: i64 = parts.next()?.parse().ok()?;
        let r = match (parts.next()?, parts.next()?, parts.next()) {
            ("b", pos, Some(file)) if !file.is_empty() => Resume::Binlog {
                file: file.to_string(),
                pos: pos.parse().ok()?,
            },
            ("p", ts, None) => Resume::Poll {
                ts_us: ts.parse().ok()?,
            },
            _ => return None,
        };
        Some((r, at))
    }
}

/// The Redis side of a streamer in bus mode (`options.redis`).
pub(super) struct BusLink {
    cfg: crate::config::RedisConfig,
    client: redis::Client,
    keys: crate::bus::Keys,
    status: Arc<crate::bus::BusStatus>,
    pub(super) lease: crate::bus::lease::Lease,
    pub(super) consumer: crate::bus::consume::Consumer,
}

impl BusLink {
    /// Connects (failing `init()` fast when Redis is unreachable), starts reading the stream
    /// from its current end into `tx`, and asks for the capture lease once.
    pub(super) fn open(
        cfg: &crate::config::RedisConfig,
        status: Arc<crate::bus::BusStatus>,
        tx: std::sync::mpsc::SyncSender<SourceMsg<Resume>>,
        core: &Core,
    ) -> Result<BusLink> {
        let client = crate::bus::client(cfg)?;
        let keys = crate::bus::Keys::new(&cfg.key_prefix);
        let mut conn = crate::bus::connect(&client).map_err(|e| crate::bus::init_error(&e, cfg))?;
        let from = crate::bus::consume::snapshot(&mut conn, &keys)
            .map_err(|e| crate::bus::init_error(&e, cfg))?;
        drop(conn);
        core.start_at(from.1);
        let thread_err = |e: std::io::Error| Error::Internal(format!("Redis bus thread: {e}"));
        let consumer = crate::bus::consume::Consumer::start(
            client.clone(),
            keys.clone(),
            from,
            tx,
            status.clone(),
        )
        .map_err(thread_err)?;
        let lease = crate::bus::lease::Lease::start(
            client.clone(),
            keys.clone(),
            crate::bus::instance_id(),
            Duration::from_millis(cfg.lease_ms),
            status.clone(),
        )
        .map_err(thread_err)?;
        Ok(BusLink {
            cfg: cfg.clone(),
            client,
            keys,
            status,
            lease,
            consumer,
        })
    }

    /// Where the capturer of a new term starts: the checkpoint stored with the stream.
    fn checkpoint(&self) -> std::result::Result<Option<(Resume, i64)>, String> {
        crate::bus::read_checkpoint(&self.client, &self.keys).map_err(|e| crate::bus::describe(&e))
    }

    fn appender(&self, lease: String) -> Result<crate::bus::append::Appender<Resume>> {
        crate::bus::append::Appender::start(
            self.client.clone(),
            self.keys.clone(),
            lease,
            crate::bus::append::AppendOptions {
                max_len: self.cfg.stream_max_len,
                max_age_ms: self.cfg.stream_max_age_ms,
                cache_ttl_ms: if self.cfg.cache {
                    self.cfg.cache_ttl_ms
                } else {
                    0
                },
            },
            self.status.clone(),
            PIPELINE_CAPACITY,
            None,
        )
        .map_err(|e| Error::Internal(format!("Redis append thread: {e}")))
    }
}

/// Bus mode: starts capturing when this instance got the lease, stops when it lost it.
pub(super) fn take_over(
    rt: &tokio::runtime::Runtime,
    store: &mut Store,
    bus: &BusLink,
    capturing: &mut Option<Capturing>,
    new_ctx: &dyn Fn(std::sync::mpsc::SyncSender<SourceMsg<Resume>>) -> CaptureContext,
    fast_path: &std::result::Result<(), String>,
    status: &SourceStatus,
) {
    let held = bus.lease.held();
    let current = capturing.as_ref().map(|c| c.term);
    let fenced = capturing
        .as_ref()
        .is_some_and(|c| c.appender.as_ref().is_some_and(|a| a.fenced()));
    if current.is_some() && (fenced || held.as_ref().map(|h| h.term) != current) {
        tracing::warn!("this instance no longer holds the capture lease: capture stopped");
        if let Some(c) = capturing.take() {
            c.stop();
        }
        bus.status.set_leader(false);
        bus.status.term.store(0, Relaxed);
        status.set_mode("follower");
    }
    let Some(h) = held else { return };
    if capturing.is_some() {
        return;
    }
    let saved = match bus.checkpoint() {
        Ok(Some(cp)) => Some(cp),
        Ok(None) => match rt.block_on(store.read_saved()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot read the database's checkpoint to start capture: {e}");
                return;
            }
        },
        Err(e) => {
            tracing::warn!("cannot read the stream's checkpoint to start capture: {e}");
            return;
        }
    };
    let appender = match bus.appender(h.value.clone()) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    let ctx = new_ctx(appender.sender());
    // The starting point goes to the stream at once: a successor resumes there even if this
    // instance dies before any change.
    let first_entry = saved.is_none();
    match start_capture(rt, store, &ctx, saved, fast_path) {
        Ok((poller, first)) => {
            if let (true, Some(cp)) = (first_entry, first) {
                let _ = ctx.tx.send(SourceMsg::Changes {
                    changes: Vec::new(),
                    checkpoint: Some(cp),
                });
            }
            tracing::info!(term = h.term, "this instance captures for the stream");
            bus.status.set_leader(true);
            bus.status.term.store(h.term, Relaxed);
            *capturing = Some(Capturing {
                ctx,
                poller,
                appender: Some(appender),
                term: h.term,
            });
        }
        Err(e) => {
            tracing::warn!(
                code = e.code(),
                "capture could not start: {e}; trying again"
            );
            ctx.stop.store(true, Relaxed);
            appender.stop();
        }
    }
}

//! The hub's HTTP side (axum): the WebSocket route, `/health` and `/metrics`, and one task per
//! connection that reads client messages, drains the connection's outbox into frames, and
//! keeps the heartbeat.

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::Grant;
use super::protocol::{self, close, Channel, ClientMsg, Subscriptions};
use super::{Conn, Shared};
use crate::core::history::Replay;
use crate::event::Event;

/// Read buffer of a WebSocket connection, bytes.
const READ_BUFFER: usize = 4096;

/// Most events in one `events` frame.
const FRAME_EVENTS: usize = 1000;

pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let mut app = Router::new()
        .route(&shared.config.path, get(upgrade))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/status", get(status));
    if shared.config.dashboard {
        app = app.route("/", get(dashboard));
    }
    let app = app.with_state(shared.clone());
    let stop = shared.clone();
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.shutdown.notified().await })
        .await;
    if let Err(e) = r {
        tracing::error!("hub server stopped: {e}");
    }
}

/// The `token` query parameter, percent-decoded.
fn query_token(uri: &Uri) -> Option<String> {
    let q = uri.query()?;
    let raw = q.split('&').find_map(|kv| kv.strip_prefix("token="))?;
    crate::config::percent_decode(raw)
        .ok()
        .filter(|t| !t.is_empty())
}

async fn upgrade(
    ws: WebSocketUpgrade,
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Some(allowed) = &shared.config.origins {
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .map(|o| o.trim_end_matches('/'));
        if !origin.is_some_and(|o| allowed.iter().any(|a| a == o)) {
            shared.metrics.refused.fetch_add(1, Relaxed);
            return (
                StatusCode::FORBIDDEN,
                "this Origin is not in the hub's origins list",
            )
                .into_response();
        }
    }
    let token = query_token(&uri);
    let max = shared.config.max_payload;
    // Clients send small control messages: a small read buffer (the default is 128 KiB per
    // connection, most of a hub's memory with thousands of clients). Larger messages still
    // arrive whole, up to `max`.
    let ws = ws
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER);
    let n = shared.metrics.connections.fetch_add(1, Relaxed) + 1;
    let full = n > shared.config.max_connections;
    ws.on_upgrade(move |socket| async move {
        if full {
            shared.metrics.refused.fetch_add(1, Relaxed);
            refuse(
                socket,
                close::TRY_LATER,
                "maxConnections reached; try again later",
            )
            .await;
        } else {
            shared.metrics.connections_total.fetch_add(1, Relaxed);
            connection(socket, &shared, token).await;
        }
        shared.metrics.connections.fetch_sub(1, Relaxed);
    })
}

async fn refuse(mut socket: WebSocket, code: u16, why: &str) {
    let _ = socket
        .send(Message::Text(protocol::error(code_name(code), why).into()))
        .await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: why.into(),
        })))
        .await;
    let (_, mut rx) = socket.split();
    await_close(&mut rx).await;
}

/// Reads until the client answers our close frame (or a second passes), so the socket is not
/// dropped with unread data: that would reset the connection and hide the close code.
async fn await_close(rx: &mut futures_util::stream::SplitStream<WebSocket>) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(m)) = rx.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

fn code_name(code: u16) -> &'static str {
    match code {
        close::BAD_MESSAGE => "BAD_MESSAGE",
        close::TOO_BIG => "MESSAGE_TOO_BIG",
        close::TRY_LATER => "TOO_MANY_CONNECTIONS",
        close::SLOW_CONSUMER => "SLOW_CONSUMER",
        close::RATE_LIMITED => "RATE_LIMITED",
        close::DEAD_PEER => "NO_PONG",
        close::UNAUTHENTICATED => "UNAUTHENTICATED",
        close::FORBIDDEN => "FORBIDDEN",
        _ => "GOING_AWAY",
    }
}

type Tx = SplitSink<WebSocket, Message>;

/// Token bucket of the client messages a connection may send.
struct Bucket {
    tokens: f64,
    capacity: f64,
    per_sec: f64,
    at: Instant,
}

impl Bucket {
    fn new(messages: u32, interval: Duration) -> Bucket {
        Bucket {
            tokens: messages as f64,
            capacity: messages as f64,
            per_sec: messages as f64 / interval.as_secs_f64(),
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_sec)
            .min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// When a grant's token expires, as a tokio instant.
fn expiry(g: &Grant) -> tokio::time::Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    tokio::time::Instant::now() + Duration::from_secs(g.exp.saturating_sub(now))
}

async fn connection(socket: WebSocket, shared: &Arc<Shared>, token: Option<String>) {
    let cfg = &shared.config;
    let m = &shared.metrics;
    // With auth, a token in the URL is checked before anything else; without one the first
    // message must be `auth`.
    let mut grant: Option<Grant> = None;
    if let (Some(auth), Some(t)) = (&cfg.auth, &token) {
        match auth.verify(t) {
            Ok(g) => grant = Some(g),
            Err(why) => {
                shared.metrics.refused.fetch_add(1, Relaxed);
                refuse(socket, close::UNAUTHENTICATED, &why).await;
                return;
            }
        }
    }
    let conn = shared.register();
    let (mut tx, mut rx) = socket.split();
    let (last, _) = shared.core.subscribe_at(None, |last| last);
    let hello = protocol::welcome(last, cfg.heartbeat.as_millis() as u64);
    let mut ended: Option<(u16, String)> = None;
    if tx.send(Message::Text(hello.into())).await.is_ok() {
        let mut ping = tokio::time::interval(cfg.heartbeat);
        ping.tick().await;
        let mut last_seen = Instant::now();
        let mut bucket = Bucket::new(cfg.rate_messages, cfg.rate_interval);
        ended = loop {
            if shared.closing.load(Relaxed) {
                break Some((close::GOING_AWAY, "the server is closing".into()));
            }
            let kill = conn.kill.load(Relaxed);
            if kill != 0 {
                break Some((
                    kill,
                    format!(
                        "this client fell {} bytes behind (slowConsumer.maxQueueBytes); reconnect and resume with the last seq",
                        cfg.max_queue_bytes
                    ),
                ));
            }
            let expires = grant.as_ref().map(expiry);
            tokio::select! {
                _ = async { match expires { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    break Some((close::UNAUTHENTICATED, "the token expired; reconnect with a new one, or send { type: 'auth' } before it expires".into()));
                }
                msg = rx.next() => match msg {
                    None | Some(Ok(Message::Close(_))) => break None,
                    Some(Err(e)) => {
                        let s = e.to_string();
                        if s.contains("too long") || s.contains("Space limit") {
                            m.bad_messages.fetch_add(1, Relaxed);
                            break Some((close::TOO_BIG, format!("a message is larger than maxPayload ({} bytes)", cfg.max_payload)));
                        }
                        break None;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => last_seen = Instant::now(),
                    Some(Ok(Message::Binary(_))) => {
                        m.bad_messages.fetch_add(1, Relaxed);
                        break Some((close::BAD_MESSAGE, "binary frames are not part of the protocol; send JSON text".into()));
                    }
                    Some(Ok(Message::Text(t))) => {
                        last_seen = Instant::now();
                        if !bucket.take() {
                            m.rate_limited.fetch_add(1, Relaxed);
                            break Some((close::RATE_LIMITED, format!(
                                "more than {} messages in {} ms (rateLimit)", cfg.rate_messages, cfg.rate_interval.as_millis()
                            )));
                        }
                        match protocol::parse(t.as_str()) {
                            Err(why) => {
                                m.bad_messages.fetch_add(1, Relaxed);
                                break Some((close::BAD_MESSAGE, why));
                            }
                            Ok(msg) => match authorize(&msg, &mut grant, &conn, shared) {
                                Err(refusal) => break Some(refusal),
                                Ok(()) => {
                                    if handle(msg, &conn, shared, &mut tx, grant.as_ref()).await.is_err() {
                                        break None;
                                    }
                                }
                            },
                        }
                    }
                },
                _ = conn.notify.notified() => {
                    if flush(&conn, shared, &mut tx).await.is_err() {
                        break None;
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > cfg.heartbeat * 2 {
                        break Some((close::DEAD_PEER, "no pong within two heartbeat intervals".into()));
                    }
                    if tx.send(Message::Ping(Vec::new().into())).await.is_err() {
                        break None;
                    }
                }
                _ = shared.shutdown.notified() => {
                    break Some((close::GOING_AWAY, "the server is closing".into()));
                }
            }
        };
    }
    if let Some((code, why)) = ended {
        let _ = tx
            .send(Message::Text(protocol::error(code_name(code), &why).into()))
            .await;
        let _ = tx
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: why.chars().take(120).collect::<String>().into(),
            })))
            .await;
        shared.unregister(&conn);
        await_close(&mut rx).await;
        return;
    }
    shared.unregister(&conn);
}

async fn send(tx: &mut Tx, shared: &Shared, text: String) -> Result<(), ()> {
    shared.metrics.frames.fetch_add(1, Relaxed);
    shared.metrics.bytes.fetch_add(text.len() as u64, Relaxed);
    tx.send(Message::Text(text.into())).await.map_err(|_| ())
}

/// Applies authentication to a client message: `auth` sets or refreshes the grant; anything
/// else needs a grant (when auth is on) covering its channels.
fn authorize(
    msg: &ClientMsg,
    grant: &mut Option<Grant>,
    conn: &Conn,
    shared: &Shared,
) -> Result<(), (u16, String)> {
    let Some(auth) = &shared.config.auth else {
        return match msg {
            ClientMsg::Auth { .. } => Err((
                close::BAD_MESSAGE,
                "this hub has no authentication; do not send `auth`".into(),
            )),
            _ => Ok(()),
        };
    };
    match msg {
        ClientMsg::Auth { token, .. } => {
            let g = auth
                .verify(token)
                .map_err(|why| (close::UNAUTHENTICATED, why))?;
            // A refreshed token must still cover what the connection has.
            let subs = conn.subs.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(c) = subs.channels().iter().find(|c| !g.allows(c)) {
                return Err((
                    close::FORBIDDEN,
                    format!("the new token does not grant channel {}", c.name()),
                ));
            }
            *grant = Some(g);
            Ok(())
        }
        _ if grant.is_none() => Err((
            close::UNAUTHENTICATED,
            "authenticate first: connect with ?token=<JWT> or send { type: 'auth', token }".into(),
        )),
        ClientMsg::Subscribe { channels, .. } => {
            let g = grant.as_ref().expect("checked above");
            match channels.iter().find(|c| !g.allows(c)) {
                Some(c) => Err((
                    close::FORBIDDEN,
                    format!("the token does not grant channel {}", c.name()),
                )),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

async fn handle(
    msg: ClientMsg,
    conn: &Conn,
    shared: &Shared,
    tx: &mut Tx,
    grant: Option<&Grant>,
) -> Result<(), ()> {
    match msg {
        ClientMsg::Auth { id, .. } => {
            let exp = grant.map_or(0, |g| g.exp);
            send(tx, shared, protocol::authenticated(&id, exp)).await
        }
        ClientMsg::Ping { id } => send(tx, shared, protocol::pong(&id)).await,
        ClientMsg::Unsubscribe { id, channels } => {
            {
                let mut s = conn.subs.lock().unwrap_or_else(|p| p.into_inner());
                for c in &channels {
                    s.remove(c);
                }
            }
            send(tx, shared, protocol::unsubscribed(&id, &channels)).await
        }
        ClientMsg::Subscribe {
            id,
            channels,
            since,
        } => subscribe(id, channels, since, conn, shared, tx).await,
    }
}

async fn subscribe(
    id: Option<serde_json::Value>,
    channels: Vec<Channel>,
    since: Option<u64>,
    conn: &Conn,
    shared: &Shared,
    tx: &mut Tx,
) -> Result<(), ()> {
    let want = if shared.config.history { since } else { None };
    // Registered under the history lock: everything after `last` arrives live.
    let (last, replay) = shared.core.subscribe_at(want, |last| {
        let mut s = conn.subs.lock().unwrap_or_else(|p| p.into_inner());
        for c in &channels {
            s.add(c);
        }
        last
    });
    send(tx, shared, protocol::subscribed(&id, &channels, last)).await?;
    let mut only = Subscriptions::default();
    for c in &channels {
        only.add(c);
    }
    let events = match (replay, since) {
        (Some(Replay::Events(e)), _) => e,
        (Some(Replay::Gap { from, to, events }), _) => {
            let why = "the history ring no longer holds these events";
            send_gap(tx, shared, from, to, why).await?;
            events
        }
        // Replay is off: everything after `since` is a gap.
        (None, Some(s)) if s < last => {
            let why = "replay is off on this hub (history: false)";
            send_gap(tx, shared, s + 1, last, why).await?;
            Vec::new()
        }
        (None, _) => Vec::new(),
    };
    let matching: Vec<String> = events
        .iter()
        .filter(|e| matches!(e, Event::Change(c) if only.matches(c)))
        .map(protocol::encode_event)
        .collect();
    let matching: Vec<&str> = matching.iter().map(String::as_str).collect();
    send_events(tx, shared, &matching).await
}

/// `events` frames of at most `FRAME_EVENTS` events each.
async fn send_events(tx: &mut Tx, shared: &Shared, events: &[&str]) -> Result<(), ()> {
    for chunk in events.chunks(FRAME_EVENTS) {
        shared
            .metrics
            .deliveries
            .fetch_add(chunk.len() as u64, Relaxed);
        send(tx, shared, protocol::events_frame(chunk.iter().copied())).await?;
    }
    Ok(())
}

async fn send_gap(tx: &mut Tx, shared: &Shared, from: u64, to: u64, why: &str) -> Result<(), ()> {
    shared.metrics.gaps.fetch_add(1, Relaxed);
    send(tx, shared, protocol::gap(from, to, why)).await
}

async fn flush(conn: &Conn, shared: &Shared, tx: &mut Tx) -> Result<(), ()> {
    let (gap, items) = {
        let mut ob = conn.outbox.lock().unwrap_or_else(|p| p.into_inner());
        let before = ob.bytes();
        let taken = ob.take();
        let q = &shared.metrics.queued_bytes;
        q.fetch_sub(before.min(q.load(Relaxed)), Relaxed);
        taken
    };
    if let Some((from, to)) = gap {
        let why = "this client fell behind (slowConsumer.maxQueueBytes); these events were dropped";
        send_gap(tx, shared, from, to, why).await?;
    }
    let events: Vec<&str> = items.iter().map(|i| &*i.json).collect();
    send_events(tx, shared, &events).await
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let body = format!(
        "{{\"status\":\"ok\",\"connections\":{},\"lastSeq\":{}}}",
        shared.metrics.connections.load(Relaxed),
        shared.core.subscribe_at(None, |last| last).0
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The page of the live dashboard, served from the package (no CDN).
const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard(State(shared): State<Arc<Shared>>) -> Response {
    let page = DASHBOARD.replace("__STREAM_PATH__", &shared.config.path);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page,
    )
        .into_response()
}

/// Mode, rates, latency and hub clients, for the dashboard (no secrets, like `/metrics`).
async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let mut v = (shared.status)();
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "connections".into(),
            shared.metrics.connections.load(Relaxed).into(),
        );
    }
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics_text(&shared),
    )
        .into_response()
}

/// The Prometheus text exposition of the engine's and the hub's counters.
fn metrics_text(shared: &Shared) -> String {
    let h = &shared.metrics;
    let e = &shared.core.metrics;
    let mut out = String::with_capacity(4096);
    let mut put = |name: &str, kind: &str, help: &str, v: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    let n = |x: u64| x.to_string();
    put(
        "usp_events_captured_total",
        "counter",
        "Changes admitted by the engine.",
        n(e.events_captured.load(Relaxed)),
    );
    put(
        "usp_events_emitted_total",
        "counter",
        "Events handed to JavaScript listeners.",
        n(e.events_emitted.load(Relaxed)),
    );
    put(
        "usp_events_deduplicated_total",
        "counter",
        "Changes dropped as already delivered.",
        n(e.events_deduplicated.load(Relaxed)),
    );
    put(
        "usp_resyncs_total",
        "counter",
        "Times a source lost its place and resynchronised.",
        n(e.resyncs.load(Relaxed)),
    );
    put(
        "usp_write_queue_depth",
        "gauge",
        "push/get/delete calls waiting.",
        n(e.write_queue_depth.load(Relaxed) as u64),
    );
    put(
        "usp_delivery_queue_depth",
        "gauge",
        "Events captured and not yet handed to JavaScript.",
        n(e.dispatch_queue_depth.load(Relaxed) as u64),
    );
    put(
        "usp_hub_connections",
        "gauge",
        "Open WebSocket connections.",
        n(h.connections.load(Relaxed) as u64),
    );
    put(
        "usp_hub_connections_total",
        "counter",
        "WebSocket connections accepted.",
        n(h.connections_total.load(Relaxed)),
    );
    put(
        "usp_hub_refused_total",
        "counter",
        "Connections refused at maxConnections.",
        n(h.refused.load(Relaxed)),
    );
    put(
        "usp_hub_frames_total",
        "counter",
        "Frames sent to clients.",
        n(h.frames.load(Relaxed)),
    );
    put(
        "usp_hub_deliveries_total",
        "counter",
        "Events sent to clients (one per client).",
        n(h.deliveries.load(Relaxed)),
    );
    put(
        "usp_hub_bytes_total",
        "counter",
        "Bytes of frames sent to clients.",
        n(h.bytes.load(Relaxed)),
    );
    put(
        "usp_hub_queued_bytes",
        "gauge",
        "Bytes waiting in client queues.",
        n(h.queued_bytes.load(Relaxed) as u64),
    );
    put(
        "usp_hub_coalesced_total",
        "counter",
        "Queued events replaced by a newer one of the same key (slow clients).",
        n(h.coalesced.load(Relaxed)),
    );
    put(
        "usp_hub_dropped_total",
        "counter",
        "Queued events dropped for slow clients (signalled as gaps).",
        n(h.dropped.load(Relaxed)),
    );
    put(
        "usp_hub_gaps_total",
        "counter",
        "Gap frames sent.",
        n(h.gaps.load(Relaxed)),
    );
    put(
        "usp_hub_slow_disconnects_total",
        "counter",
        "Clients closed for falling behind.",
        n(h.slow_disconnects.load(Relaxed)),
    );
    put(
        "usp_hub_rate_limited_total",
        "counter",
        "Clients closed for sending too many messages.",
        n(h.rate_limited.load(Relaxed)),
    );
    put(
        "usp_hub_bad_messages_total",
        "counter",
        "Clients closed for malformed or oversized messages.",
        n(h.bad_messages.load(Relaxed)),
    );
    // get() answered per cache level: l1 in-process, l2 Redis (options.redis.cache).
    let (l1_hits, l1_misses) = shared.core.cache.as_ref().map_or((0, 0), |c| {
        let s = c.stats();
        (s.hits, s.misses)
    });
    let _ = writeln!(
        out,
        "# HELP usp_cache_hits_total get() calls answered by a cache level (l1 in-process, l2 Redis).\n# TYPE usp_cache_hits_total counter\nusp_cache_hits_total{{level=\"l1\"}} {l1_hits}\nusp_cache_hits_total{{level=\"l2\"}} {}",
        e.l2_hits.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP usp_cache_misses_total get() calls a cache level could not answer.\n# TYPE usp_cache_misses_total counter\nusp_cache_misses_total{{level=\"l1\"}} {l1_misses}\nusp_cache_misses_total{{level=\"l2\"}} {}",
        e.l2_misses.load(Relaxed)
    );
    // Commit → JavaScript hand-off latency as a histogram (seconds, cumulative buckets).
    const BOUNDS_US: [u64; 12] = [
        100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    ];
    let (buckets, count, sum_us) = e.latency_buckets(&BOUNDS_US);
    let name = "usp_delivery_latency_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Commit to JavaScript hand-off latency.\n# TYPE {name} histogram"
    );
    for (b, c) in BOUNDS_US.iter().zip(&buckets) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {c}", *b as f64 / 1e6);
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {}\n{name}_count {count}",
        sum_us / 1e6
    );
    let l = e.latency();
    let _ = writeln!(
        out,
        "# HELP usp_latency_ms Commit to JavaScript hand-off, ms.\n# TYPE usp_latency_ms summary\nusp_latency_ms{{quantile=\"0.5\"}} {}\nusp_latency_ms{{quantile=\"0.95\"}} {}\nusp_latency_ms{{quantile=\"0.99\"}} {}\nusp_latency_ms_count {}",
        l.p50, l.p95, l.p99, l.count
    );
    out
}

//! The Node-API surface: one class, `NativeStreamer`, whose methods convert arguments, call the
//! engine and map errors. JavaScript callbacks are wrapped as threadsafe functions implementing
//! the engine's sink traits, so the engine never sees napi.

use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::config::Config;
use crate::core::engine::{Engine, Lookup};
use crate::error::Error as CoreError;
use crate::event::{encode_js_batch, now_us, Event};
use crate::metrics::Metrics;
use crate::sink::{Ack, BatchSink};
use crate::store::{encode_completions, Completion, CompletionSink};

/// Throws `e` as a JavaScript `Error` with `code` set to its stable code.
fn throw(env: &Env, e: CoreError) -> napi::Error {
    match env.throw_error(&e.to_string(), Some(e.code())) {
        Ok(()) => napi::Error::from_status(Status::PendingException),
        Err(_) => napi::Error::new(Status::GenericFailure, format!("{}: {e}", e.code())),
    }
}

/// Runs `f`, turning an engine error or a panic into a thrown, coded JavaScript error.
fn guard<T>(env: &Env, f: impl FnOnce() -> std::result::Result<T, CoreError>) -> napi::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(throw(env, e)),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            Err(throw(env, CoreError::Internal(msg)))
        }
    }
}

struct JsBatch {
    json: String,
    commit_ts: Vec<i64>,
}

type EventsFn = ThreadsafeFunction<JsBatch, (), FnArgs<(BatchText, f64)>, Status, false>;

/// An encoded batch on its way to JavaScript. ASCII text (most JSON) becomes a string by a plain
/// copy (`latin1`); other text is decoded from UTF-8.
struct BatchText(String);

impl ToNapiValue for BatchText {
    unsafe fn to_napi_value(
        env: napi::sys::napi_env,
        val: Self,
    ) -> napi::Result<napi::sys::napi_value> {
        if val.0.is_ascii() {
            Latin1String::to_napi_value(env, Latin1String::from(val.0))
        } else {
            String::to_napi_value(env, val.0)
        }
    }
}

type CompletionsFn = ThreadsafeFunction<String, (), String, Status, false>;

/// Delivers event batches to the JavaScript dispatcher: one call per batch, one JSON string
/// (columns, see `encode_js_batch`).
struct JsEventSink {
    tsfn: EventsFn,
}

impl BatchSink for JsEventSink {
    fn deliver(&self, events: Vec<Event>, ack: Ack) -> bool {
        let commit_ts: Vec<i64> = events.iter().filter_map(Event::commit_ts_us).collect();
        let json = encode_js_batch(&events);
        let status = self.tsfn.call_with_return_value(
            JsBatch { json, commit_ts },
            ThreadsafeFunctionCallMode::NonBlocking,
            move |_ret, _env| {
                // The listeners have run: free the in-flight slot.
                drop(ack);
                Ok(())
            },
        );
        status == Status::Ok
    }
}

/// Settles JavaScript promises: one call per batch of completions.
struct JsCompletionSink {
    tsfn: CompletionsFn,
}

impl CompletionSink for JsCompletionSink {
    fn complete(&self, done: Vec<Completion>) {
        if done.is_empty() {
            return;
        }
        let status = self.tsfn.call(
            encode_completions(&done),
            ThreadsafeFunctionCallMode::NonBlocking,
        );
        if status != Status::Ok {
            tracing::debug!(
                ?status,
                "completion not delivered: JavaScript is shutting down"
            );
        }
    }
}

/// The native half of `UltimateStreamer`. Use the `UltimateStreamer` class from JavaScript;
/// this class is its engine and not a public API.
#[napi]
pub struct NativeStreamer {
    engine: Engine,
}

#[napi]
impl NativeStreamer {
    /// Validates `configJson` (the user's config as JSON, or null for defaults).
    #[napi(constructor)]
    pub fn new(env: Env, config_json: Option<String>) -> napi::Result<Self> {
        guard(&env, || {
            let v = match config_json {
                Some(s) => serde_json::from_str(&s).map_err(|e| {
                    CoreError::InvalidConfig(format!("the config is not a plain object: {e}"))
                })?,
                None => serde_json::Value::Null,
            };
            let engine = Engine::new(Config::from_json(&v)?)?;
            Ok(NativeStreamer { engine })
        })
    }

    /// Starts the engine. `onEvents(json, dispatchedAtMs)` receives event batches, `onComplete(json)` settles
    /// operations; `id` is settled when the store is ready.
    #[napi]
    pub fn init(
        &self,
        env: Env,
        id: u32,
        on_events: Function<FnArgs<(String, f64)>, ()>,
        on_complete: Function<String, ()>,
    ) -> napi::Result<()> {
        let metrics: Arc<Metrics> = self.engine.metrics().clone();
        let events: EventsFn = on_events
            .build_threadsafe_function::<JsBatch>()
            .callee_handled::<false>()
            .build_callback(move |ctx| {
                // Runs on the JavaScript thread, right before the listeners.
                let b = ctx.value;
                let now = now_us();
                metrics.record_latencies(&b.commit_ts, now);
                metrics.record_batch(b.commit_ts.len() as u64);
                // The hand-off time, on the same clock as the commit timestamps.
                Ok(FnArgs {
                    data: (BatchText(b.json), now as f64 / 1000.0),
                })
            })?;
        let completions: CompletionsFn = on_complete
            .build_threadsafe_function::<String>()
            .callee_handled::<false>()
            .build_callback(|ctx| Ok(ctx.value))?;
        guard(&env, || {
            self.engine.init(
                id,
                Arc::new(JsEventSink { tsfn: events }),
                Arc::new(JsCompletionSink { tsfn: completions }),
            )
        })
    }

    /// Queues an upsert; settled through `onComplete` with the new version.
    #[napi]
    pub fn push(&self, env: Env, id: u32, key: String, json: String) -> napi::Result<()> {
        guard(&env, || self.engine.push(id, &key, json))
    }

    /// Queues a delete; settled through `onComplete`.
    #[napi]
    pub fn delete(&self, env: Env, id: u32, key: String) -> napi::Result<()> {
        guard(&env, || self.engine.delete(id, &key))
    }

    /// Queues a watch of a MySQL table's rows; settled through `onComplete`.
    #[napi]
    pub fn watch(
        &self,
        env: Env,
        id: u32,
        table: String,
        insert: bool,
        update: bool,
        delete: bool,
    ) -> napi::Result<()> {
        guard(&env, || {
            self.engine.watch(id, &table, insert, update, delete)
        })
    }

    /// Returns the value's JSON from the cache (`"null"` when known absent), or `undefined`
    /// when a store read was queued (settled through `onComplete`).
    #[napi]
    pub fn get(&self, env: Env, id: u32, key: String) -> napi::Result<Option<String>> {
        guard(&env, || {
            Ok(match self.engine.get(id, &key)? {
                Lookup::Hit(v) => Some(v.as_deref().unwrap_or("null").to_string()),
                Lookup::Pending => None,
            })
        })
    }

    /// Stops the engine. Returns true when already stopped; otherwise `id` is settled later.
    #[napi]
    pub fn close(&self, env: Env, id: u32) -> napi::Result<bool> {
        guard(&env, || self.engine.close(id))
    }

    /// Starts the WebSocket hub; returns `{"port":…,"url":…}`.
    #[napi]
    pub fn listen(&self, env: Env, options_json: String) -> napi::Result<String> {
        guard(&env, || {
            let v: serde_json::Value = serde_json::from_str(&options_json).map_err(|e| {
                crate::error::Error::InvalidArgument(format!("listen(): options are not JSON: {e}"))
            })?;
            let (port, url) = self.engine.listen(&v)?;
            Ok(serde_json::json!({ "port": port, "url": url }).to_string())
        })
    }

    /// The status snapshot as JSON.
    #[napi]
    pub fn status(&self, env: Env) -> napi::Result<String> {
        guard(&env, || Ok(self.engine.status().to_string()))
    }

    /// Counts an exception thrown by a listener (the message is the error's message only).
    #[napi]
    pub fn report_listener_error(&self, message: String) {
        self.engine.record_listener_error(&message);
    }

    /// Forgets recorded latencies (used by benchmarks between phases).
    #[napi]
    pub fn reset_latency(&self) {
        self.engine.metrics().reset_latency();
    }
}

/// Every error code the engine can produce.
#[napi]
pub fn error_codes() -> Vec<String> {
    crate::error::ALL_CODES
        .iter()
        .map(|s| s.to_string())
        .collect()
}

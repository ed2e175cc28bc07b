//! ultimate-streaming's engine. Sources capture committed changes, the core orders, dedupes,
//! caches and batches them, sinks deliver them. The Node-API binding (feature `node`) is a thin
//! layer over `core::engine::Engine`; everything else builds and tests without Node.
#![deny(clippy::all)]

pub mod bus;
pub mod config;
pub mod core;
pub mod error;
pub mod event;
pub mod hub;
pub mod logging;
pub mod metrics;
pub mod sink;
pub mod source;
pub mod store;

#[cfg(feature = "node")]
mod binding;

/// The engine allocates and frees several small objects per change (its key, value, the change
/// itself, batch vectors) at rates of a million a second; glibc's allocator was the largest
/// single cost of the capture thread in a profile. mimalloc keeps per-thread free lists.
/// It serves Rust allocations only: Node and SQLite keep their own allocators. Built without
/// its transparent-huge-page advice (`no_thp`): with it, the first touch of each 2 MiB region
/// of a fresh thread's memory stalled that thread while the kernel zeroed the whole region
/// (most of the delivery thread's time while a new streamer caught up, in a profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

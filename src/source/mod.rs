//! Sources turn database changes into `Change`s with their positions and feed the core. They
//! never talk to JavaScript. The embedded SQLite source also serves the store operations
//! (push/get/delete) on the same thread, so a write and its capture share one connection.

pub mod sqlite;

//! Diagnostics through `tracing`. The level comes from the `logLevel` option, else `USP_LOG`,
//! else `warn`. The first streamer of a process installs the subscriber; log lines never carry
//! values, passwords or tokens, only keys, codes and counts.

use std::sync::Once;

static INIT: Once = Once::new();

pub fn init(level: Option<&str>) {
    INIT.call_once(|| {
        const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
        // An empty or unknown USP_LOG means the default, never "everything".
        let env = std::env::var("USP_LOG")
            .ok()
            .map(|l| l.trim().to_ascii_lowercase())
            .filter(|l| LEVELS.contains(&l.as_str()));
        let level = level
            .map(str::to_string)
            .or(env)
            .unwrap_or_else(|| "warn".into());
        let filter = format!("ultimate_streaming={level}");
        let filter = tracing_subscriber::EnvFilter::try_new(filter)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("ultimate_streaming=warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(true)
            .try_init();
    });
}

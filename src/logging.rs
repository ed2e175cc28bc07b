//! Diagnostics through `tracing`. The level comes from the `logLevel` option, else `USP_LOG`,
//! else `warn`. The first streamer of a process installs the subscriber; log lines never carry
//! values, passwords or tokens, only keys, codes and counts.

use std::sync::Once;

static INIT: Once = Once::new();

pub fn init(level: Option<&str>) {
    INIT.call_once(|| {
        let filter = level
            .map(|l| format!("ultimate_streaming={l}"))
            .or_else(|| {
                std::env::var("USP_LOG")
                    .ok()
                    .map(|l| format!("ultimate_streaming={l}"))
            })
            .unwrap_or_else(|| "ultimate_streaming=warn".to_string());
        let filter = tracing_subscriber::EnvFilter::try_new(filter)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("ultimate_streaming=warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(true)
            .try_init();
    });
}

//! `tripline run`: the engine, stopped cleanly by SIGINT or SIGTERM.

use std::path::Path;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app;
use crate::config::Settings;

pub fn run(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Settings::load(config_path)?;
    crate::status::record::started(config_path);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        app::run(config, shutdown).await
    });
    // Dropping the runtime would wait forever for a blocking write stuck on
    // a dead filesystem (a `file` sink); everything that matters is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result?;
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

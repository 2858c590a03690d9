//! `fieldgate run`: the gateway under systemd or a terminal, with SIGTERM/Ctrl-C for a drained
//! stop and SIGHUP for a reload.

use std::path::PathBuf;

use fieldgate::config::Config;
use tokio_util::sync::CancellationToken;

pub async fn run(path: PathBuf, config: Config) -> anyhow::Result<()> {
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let cancel = CancellationToken::new();
    tokio::spawn(stop_on_signal(cancel.clone()));
    let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
    tokio::spawn(reload_on_sighup(path, reload_tx));
    fieldgate::gateway::run_reloadable(
        config,
        fieldgate::uplink::Tuning::default(),
        reloads,
        cancel,
    )
    .await?;
    Ok(())
}

/// On SIGHUP, loads the config again: a valid one replaces the running pipeline; a bad one is
/// refused with every error in the log, and the running config goes on.
async fn reload_on_sighup(path: PathBuf, reloads: tokio::sync::mpsc::Sender<Config>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!(path = %path.display(), "SIGHUP: reloading the configuration");
        match Config::load(&path) {
            Ok(c) => {
                if reloads.send(c).await.is_err() {
                    return;
                }
            }
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!("{e}");
                }
                tracing::error!(
                    errors = errors.0.len(),
                    "reload refused: the new configuration has errors; the running one goes on"
                );
            }
        }
    }
}

/// Cancels on SIGTERM or SIGINT (Ctrl-C).
pub async fn stop_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
    }
    cancel.cancel();
}

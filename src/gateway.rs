//! Wiring: opens the queue, starts one poller per bus and the uplink, reloads them on a new
//! config, and shuts them down in the order that keeps every reading.
//!
//! Shutdown order: the cancellation token stops the pollers and the uplink together; each
//! poller hands its last readings to the store before it returns; the uplink waits briefly for
//! acknowledgements of what is in flight, publishes `offline` and disconnects; the store thread
//! commits everything still waiting once the last handle is dropped. Nothing queued is dropped:
//! unacknowledged rows simply wait in `queue.db` for the next start.
//!
//! Reload: a new, already validated config replaces the running pollers and uplink (one
//! "generation" stops, the next starts) while the store thread and the queue stay as they are.
//! A reload is not an outage: the old uplink disconnects cleanly without publishing `offline`,
//! and the new one says `online` again as it connects.
//! Settings that need the queue reopened (`state_dir`, `queue:`) take effect at the next start.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::{Backoff, Retry};
use crate::config::{Config, Transport};
use crate::state::Shared;
use crate::store::{self, Store, StoreError};
use crate::systemd;
use crate::uplink::{Tuning, Uplink};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store thread panicked")]
    StorePanicked,
}

/// Runs the gateway until `cancel` fires, then drains and returns.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), GatewayError> {
    run_with(config, Tuning::default(), cancel).await
}

/// [`run`] with explicit uplink timing (tests shorten the timeouts).
pub async fn run_with(
    config: Config,
    tuning: Tuning,
    cancel: CancellationToken,
) -> Result<(), GatewayError> {
    let (_keep, reloads) = mpsc::channel(1);
    run_reloadable(config, tuning, reloads, cancel).await
}

/// Runs the gateway, replacing its pipeline with each config received on `reloads`.
pub async fn run_reloadable(
    mut config: Config,
    tuning: Tuning,
    mut reloads: mpsc::Receiver<Config>,
    cancel: CancellationToken,
) -> Result<(), GatewayError> {
    // The page is served from the start: while the queue cannot be opened it says why.
    let why = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let waiting = cancel.child_token();
    let page = match &config.web {
        Some(web) => crate::web::bind(web).await.map(|listener| {
            let web = web.clone();
            let (why, done) = (why.clone(), waiting.clone());
            tokio::spawn(async move { crate::web::serve_waiting(listener, &web, why, done).await })
        }),
        None => None,
    };
    let opened = open_queue(&config, &why, &cancel).await;
    waiting.cancel();
    let listener = match page {
        Some(task) => task.await.ok(),
        None => None,
    };
    let Some(store) = opened else {
        return Ok(()); // stopped while waiting for the state directory
    };
    // A page that does not read (in the `aside` table, say) made this exit 1 (#28): the store
    // thread replaces the file at its first use, salvaging what reads.
    match store.stats() {
        Ok(stats) => {
            tracing::info!(gateway = %config.gateway.id, queue = %config.gateway.state_dir.join("queue.db").display(),
            queued = stats.depth, last_seq = stats.last_seq, "queue open")
        }
        Err(e) => tracing::warn!(gateway = %config.gateway.id, error = %e,
            "queue open, but its figures do not read; the store thread repairs the file at its first use"),
    }
    let (handle, store_thread) = store::spawn(store)?;
    let shared = Shared::new(
        handle,
        &config.gateway.id,
        // The status page shows them; Sparkplug's DBIRTH carries them.
        config.web.is_some() || config.sparkplug.is_some(),
    );
    let health = shared.health.clone();
    let watchdog = tokio::spawn(systemd::watchdog(health, cancel.clone()));
    let started = std::time::Instant::now();
    let metrics = config.metrics.map(|listen| {
        tokio::spawn(crate::web::serve_metrics(
            listen,
            shared.clone(),
            started,
            cancel.clone(),
        ))
    });
    let web = config.web.clone().zip(listener).map(|(web, listener)| {
        tokio::spawn(crate::web::serve_on(
            listener,
            web,
            shared.clone(),
            started,
            cancel.clone(),
        ))
    });

    loop {
        let generation = cancel.child_token();
        let tasks = start(&config, &tuning, &shared, started, &generation, &cancel);
        systemd::ready();
        let next = tokio::select! {
            _ = cancel.cancelled() => None,
            c = reloads.recv() => c,
        };
        if next.is_some() {
            systemd::reloading();
        } else {
            systemd::stopping();
        }
        generation.cancel();
        tasks.wait().await;
        let Some(next) = next else { break };
        if next.gateway.state_dir != config.gateway.state_dir
            || next.queue.limits != config.queue.limits
            || next.metrics != config.metrics
            || next.web != config.web
        {
            tracing::warn!(
                "reload: `state_dir`, `queue:`, `metrics:` and `web:` changes take effect at the next start"
            );
        }
        tracing::info!(path = %next.path.display(), devices = next.devices.len(), "configuration reloaded");
        config = next;
    }
    watchdog.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    if let Some(w) = web {
        w.abort();
    }
    drop(shared);
    tokio::task::spawn_blocking(move || store_thread.join())
        .await
        .map_err(|_| GatewayError::StorePanicked)?
        .map_err(|_| GatewayError::StorePanicked)?;
    tracing::info!("gateway stopped; unacknowledged readings stay queued for the next start");
    Ok(())
}

/// Starts one generation of the pipeline: a poller per bus with devices, and the uplink.
fn start(
    config: &Config,
    tuning: &Tuning,
    shared: &Shared,
    started: std::time::Instant,
    cancel: &CancellationToken,
    gateway_stop: &CancellationToken,
) -> TaskTracker {
    let tasks = TaskTracker::new();
    let mut commands = std::collections::HashMap::new();
    for bus in &config.buses {
        let devices: Vec<_> = config
            .devices
            .iter()
            .filter(|d| d.bus == bus.name)
            .cloned()
            .collect();
        if devices.is_empty() {
            continue;
        }
        let (bus, shared, cancel) = (bus.clone(), shared.clone(), cancel.clone());
        match bus.transport {
            Transport::SerialLine { .. } => {
                tasks.spawn(crate::poll::line::run(bus, devices, shared, cancel))
            }
            _ => {
                let (tx, rx) = mpsc::channel(16);
                for d in &devices {
                    commands.insert(d.name.clone(), tx.clone());
                }
                tasks.spawn(crate::poll::modbus::run(bus, devices, shared, rx, cancel))
            }
        };
    }
    let uplink = Uplink::new(
        config,
        shared.clone(),
        tuning.clone(),
        started,
        commands,
        gateway_stop.clone(),
    );
    tasks.spawn(uplink.run(cancel.clone()));
    tasks.spawn(crate::status::write_periodically(
        shared.clone(),
        started,
        config.gateway.state_dir.clone(),
        config.gateway.status_interval,
        cancel.clone(),
    ));
    tasks.close();
    tasks
}

/// Opens the queue, retrying with backoff while it cannot be opened (a read-only or missing
/// state directory, a full disk): the gateway stays up, says why once (and every ten minutes),
/// and polls nothing until every reading has a place to go. No crash loop under systemd.
/// Opens the queue, retrying until it opens or `cancel` fires; `why` says meanwhile why
/// nothing is polled (for the status page).
async fn open_queue(
    config: &Config,
    why: &std::sync::Mutex<String>,
    cancel: &CancellationToken,
) -> Option<Store> {
    let dir = config.gateway.state_dir.clone();
    let limits = config.queue.limits;
    let mut retry = Retry::new(Backoff::DEVICE);
    let mut last_log: Option<std::time::Instant> = None;
    loop {
        let d = dir.clone();
        // After a power cut the file is checked before READY (PRAGMA quick_check): measured
        // 0.37 s for 1 000 000 rows on a warm x86 disk, but a Pi reading a cold SD card is
        // slower. systemd gets more time while it runs, instead of killing a start in progress.
        systemd::extend_start(Duration::from_secs(120));
        let result = tokio::task::spawn_blocking(move || Store::open_with(&d, limits))
            .await
            .expect("store open does not panic");
        match result {
            Ok(s) => {
                if last_log.is_some() {
                    tracing::info!(dir = %dir.display(), "queue opened; polling starts");
                }
                return Some(s);
            }
            Err(e) => {
                *why.lock().expect("not poisoned") = format!(
                    "cannot open the queue in {}: {e}; nothing is polled until it can be opened (retrying)",
                    dir.display()
                );
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(600)) {
                    tracing::error!(dir = %dir.display(), error = %e,
                        "cannot open the queue; nothing is polled until it can be opened, retrying");
                    last_log = Some(std::time::Instant::now());
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(retry.failed()) => {}
        }
    }
}

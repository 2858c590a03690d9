//! Wiring: opens the queue, starts one poller per bus and the uplink, and shuts them down in
//! the order that keeps every reading.
//!
//! Shutdown order: the cancellation token stops the pollers and the uplink together; each
//! poller hands its last readings to the store before it returns; the uplink waits briefly for
//! acknowledgements of what is in flight, publishes `offline` and disconnects; the store thread
//! commits everything still waiting once the last handle is dropped. Nothing queued is dropped:
//! unacknowledged rows simply wait in `queue.db` for the next start.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use std::time::Duration;

use crate::store::{self, Store, StoreError};
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
    let Some(store) = open_queue(&config, &cancel).await else {
        return Ok(()); // stopped while waiting for the state directory
    };
    let stats = store.stats()?;
    tracing::info!(gateway = %config.gateway.id, queue = %config.gateway.state_dir.join("queue.db").display(),
        queued = stats.depth, last_seq = stats.last_seq, "queue open");
    let (handle, store_thread) = store::spawn(store)?;

    let tasks = TaskTracker::new();
    let bus_stats = crate::poller::SharedStats::default();
    let availability = std::sync::Arc::new(crate::poller::Availability::default());
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
        let args = (
            bus.clone(),
            devices,
            handle.clone(),
            bus_stats.clone(),
            availability.clone(),
            cancel.clone(),
        );
        match bus.transport {
            crate::config::Transport::SerialLine { .. } => tasks.spawn(crate::line::run(
                args.0, args.1, args.2, args.3, args.4, args.5,
            )),
            _ => tasks.spawn(crate::poller::run(
                args.0, args.1, args.2, args.3, args.4, args.5,
            )),
        };
    }
    let mut uplink = Uplink::new(&config, handle.clone());
    uplink.tuning = tuning;
    uplink.bus_stats = bus_stats;
    uplink.availability = availability;
    tasks.spawn(uplink.run(cancel.clone()));
    drop(handle);
    tasks.close();
    tasks.wait().await;

    tokio::task::spawn_blocking(move || store_thread.join())
        .await
        .map_err(|_| GatewayError::StorePanicked)?
        .map_err(|_| GatewayError::StorePanicked)?;
    tracing::info!("gateway stopped; unacknowledged readings stay queued for the next start");
    Ok(())
}

/// Opens the queue, retrying with backoff while it cannot be opened (a read-only or missing
/// state directory, a full disk): the gateway stays up, says why once (and every ten minutes),
/// and polls nothing until every reading has a place to go. No crash loop under systemd.
async fn open_queue(config: &Config, cancel: &CancellationToken) -> Option<Store> {
    let dir = config.gateway.state_dir.clone();
    let limits = config.queue.limits;
    let mut backoff = Duration::from_secs(1);
    let mut last_log: Option<std::time::Instant> = None;
    loop {
        let d = dir.clone();
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
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(600)) {
                    tracing::error!(dir = %dir.display(), error = %e,
                        "cannot open the queue; nothing is polled until it can be opened, retrying");
                    last_log = Some(std::time::Instant::now());
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

//! The status page (`web: { listen: … }`): one read-only page for the integrator at the
//! cabinet, and the JSON behind it.
//!
//! - `GET /` the page, `GET /app.js`, `GET /style.css` — embedded in the binary (no CDN: the Pi
//!   is often offline); the page polls the API every two seconds and updates in place.
//! - `GET /api/status` — `{"status": Snapshot, "depth_history": [[ts_ms, depth], …]}`: the same
//!   typed [`Snapshot`] as the status message, `status.json`, `fieldgate status` and
//!   Prometheus, plus the queue depth sampled every 10 s over the last hour for the chart.
//! - `GET /metrics` — the Prometheus text ([`crate::metrics`]). The same server, with the same
//!   limits, serves it alone on `metrics: { listen: … }` ([`serve_metrics`]: no page, no
//!   password; loopback by default).
//!
//! Read-only: nothing here writes to a device, and no secret is in the snapshot. Optional HTTP
//! basic auth (`web.password_file`, any user name). Hostile or slow clients cannot hold the
//! gateway: at most [`MAX_CONNECTIONS`] at once (more get a 503 and are closed), a request
//! head must arrive within [`HEAD_TIMEOUT`] and be at most [`MAX_HEAD`] bytes, a response must
//! be taken within [`WRITE_TIMEOUT`]; anything malformed gets a 4xx. HTTP/1.1 without
//! keep-alive: one request per connection, which is all a page polling every two seconds needs.

mod http;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Web;
use crate::message::now_ms;
use crate::state::Shared;
use crate::status::Snapshot;
pub use http::{Request, Response, parse_head};

/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// A request head must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// A response must be taken within this.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Queue depth samples: every 10 s over the last hour.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const SAMPLES: usize = 360;

const INDEX: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

/// What `/api/status` returns.
#[derive(Serialize)]
struct Api<'a> {
    status: &'a Snapshot,
    /// `[ts_ms, depth]`, oldest first.
    depth_history: Vec<[i64; 2]>,
}

/// Depth samples by the monotonic clock, turned into wall-clock stamps when served: samples
/// stamped by the wall clock vanished from the chart when NTP stepped it.
type History = Arc<Mutex<VecDeque<(Instant, i64)>>>;

/// What a listener serves.
#[derive(Clone)]
enum Site {
    /// The page, its API and `/metrics`, behind the password when one is set.
    Page {
        shared: Shared,
        started: Instant,
        history: History,
        password: Option<Arc<str>>,
    },
    /// `/metrics` alone (`metrics: { listen }`).
    Metrics { shared: Shared, started: Instant },
    /// The page before the queue opens: `/api/status` answers 503 with `{"waiting": why}`.
    Waiting {
        why: Arc<Mutex<String>>,
        password: Option<Arc<str>>,
    },
}

/// The status page's address, bound early: it is served before the queue opens
/// ([`serve_waiting`]) and after ([`serve_on`]) on the one listener. None: logged.
pub async fn bind(web: &Web) -> Option<TcpListener> {
    match TcpListener::bind(web.listen).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!(listen = %web.listen, error = %e, "cannot open the status page's address; the gateway runs without it");
            None
        }
    }
}

/// Serves the page while the queue cannot be opened (a read-only or missing state directory):
/// it says why nothing is polled (`why`, kept up to date by the caller) instead of not
/// answering. Returns the listener when `done` fires, for [`serve_on`].
pub async fn serve_waiting(
    listener: TcpListener,
    web: &Web,
    why: Arc<Mutex<String>>,
    done: CancellationToken,
) -> TcpListener {
    // Nothing is taken before the first open fails: a queue that opens at once leaves every
    // connection to the running page's server (its own limit, the real figures).
    while why.lock().expect("not poisoned").is_empty() {
        tokio::select! {
            _ = done.cancelled() => return listener,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let site = Site::Waiting {
        why,
        password: web.password.as_ref().map(|p| p.0.as_str().into()),
    };
    accept(&listener, site, done).await;
    listener
}

/// Serves `GET /metrics` alone on `listen` until `cancel` fires: the page's server and limits
/// (it was a second server of its own once, whose accept loop spun when out of descriptors).
pub async fn serve_metrics(
    listen: SocketAddr,
    shared: Shared,
    started: Instant,
    cancel: CancellationToken,
) {
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "cannot listen for metrics; the gateway runs without them");
            return;
        }
    };
    serve_metrics_on(listener, shared, started, cancel).await;
}

/// [`serve_metrics`] on a listener already bound (tests bind port 0).
pub async fn serve_metrics_on(
    listener: TcpListener,
    shared: Shared,
    started: Instant,
    cancel: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    accept(&listener, Site::Metrics { shared, started }, cancel).await;
}

/// Serves the status page on `listener` (see [`bind`]) until `cancel` fires.
pub async fn serve_on(
    listener: TcpListener,
    web: Web,
    shared: Shared,
    started: Instant,
    cancel: CancellationToken,
) {
    let addr = listener.local_addr().map_or(web.listen, |a| a);
    tracing::info!(%addr, auth = web.password.is_some(), "status page at http://{addr}/");
    let history: History = Arc::default();
    tokio::spawn(sample_depth(
        shared.clone(),
        history.clone(),
        cancel.clone(),
    ));
    let site = Site::Page {
        shared,
        started,
        history,
        password: web.password.map(|p| p.0.into()),
    };
    accept(&listener, site, cancel).await;
}

/// Takes connections until `cancel` fires: at most [`MAX_CONNECTIONS`] served at once.
async fn accept(listener: &TcpListener, site: Site, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (conn, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: pause instead of spinning.
                    tracing::debug!(error = %e, "status page: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(conn));
            continue;
        };
        let site = site.clone();
        tokio::spawn(async move {
            let _permit = permit;
            handle(conn, peer, &site).await;
        });
    }
}

/// Too many connections: a short 503, and closed.
async fn refuse(mut conn: TcpStream) {
    let r = Response::text(503, "too many connections; try again\n");
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.write_all(&r.to_bytes(false))).await;
}

async fn handle(mut conn: TcpStream, peer: SocketAddr, site: &Site) {
    let response = match http::read_head(&mut conn, HEAD_TIMEOUT, MAX_HEAD).await {
        Err(http::HeadError::Closed) => return,
        Err(e) => Response::text(e.status(), &format!("{e}\n")),
        Ok(req) => route(&req, site).await,
    };
    if response.status >= 500 {
        tracing::debug!(%peer, status = response.status, "status page: request failed");
    }
    let head_only = false;
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        conn.write_all(&response.to_bytes(head_only)).await?;
        conn.shutdown().await
    })
    .await;
}

async fn route(req: &Request, site: &Site) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response::text(405, "read-only: GET only\n").header("Allow", "GET, HEAD");
    }
    let path = req.path.split('?').next().unwrap_or("");
    let (live, password) = match site {
        Site::Page {
            shared,
            started,
            history,
            password,
        } => (Some((shared, *started, history)), password.as_deref()),
        Site::Waiting { password, .. } => (None, password.as_deref()),
        Site::Metrics { shared, started } => {
            let r = match path {
                "/metrics" | "/" => metrics(shared, *started).await,
                _ => Response::text(404, "GET /metrics\n"),
            };
            return if req.method == "HEAD" {
                r.without_body()
            } else {
                r
            };
        }
    };
    if let Some(p) = password
        && !req
            .basic_auth_password()
            .is_some_and(|given| same(&given, p))
    {
        return Response::text(401, "password required\n").header(
            "WWW-Authenticate",
            "Basic realm=\"fieldgate\", charset=\"UTF-8\"",
        );
    }
    let r = match (path, live) {
        ("/metrics" | "/api/status", None) => {
            let why = match site {
                Site::Waiting { why, .. } => why.lock().expect("not poisoned").clone(),
                _ => String::new(),
            };
            let body = serde_json::to_vec(&serde_json::json!({ "waiting": why }))
                .expect("plain data serializes");
            Response::new(503, "application/json", body)
        }
        ("/metrics", Some((shared, started, _))) => metrics(shared, started).await,
        ("/" | "/index.html", _) => {
            Response::new(200, "text/html; charset=utf-8", INDEX.as_bytes().to_vec())
        }
        ("/app.js", _) => Response::new(
            200,
            "text/javascript; charset=utf-8",
            APP_JS.as_bytes().to_vec(),
        ),
        ("/style.css", _) => {
            Response::new(200, "text/css; charset=utf-8", STYLE.as_bytes().to_vec())
        }
        ("/api/status", Some((shared, started, history))) => {
            match Snapshot::take(shared, started).await {
                Ok(s) => {
                    let now = now_ms();
                    let depth_history = history
                        .lock()
                        .expect("not poisoned")
                        .iter()
                        .map(|(at, depth)| [now - at.elapsed().as_millis() as i64, *depth])
                        .collect();
                    let body = serde_json::to_vec(&Api {
                        status: &s,
                        depth_history,
                    })
                    .expect("plain data serializes");
                    Response::new(200, "application/json", body)
                }
                Err(e) => Response::text(503, &format!("the queue does not answer: {e}\n")),
            }
        }
        ("/favicon.ico", _) => Response::new(204, "text/plain", Vec::new()),
        _ => Response::text(404, "not found; the page is at /\n"),
    };
    if req.method == "HEAD" {
        return r.without_body();
    }
    r
}

/// The Prometheus text of a snapshot taken now.
async fn metrics(shared: &Shared, started: Instant) -> Response {
    match Snapshot::take(shared, started).await {
        Ok(s) => Response::new(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::render(&s).into_bytes(),
        ),
        Err(e) => Response::text(503, &format!("the queue does not answer: {e}\n")),
    }
}

/// Compares two passwords in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= (*x ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

/// Samples the queue depth every 10 s, keeping the last hour.
async fn sample_depth(shared: Shared, history: History, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(stats) = shared.store.stats().await else {
            continue;
        };
        let mut h = history.lock().expect("not poisoned");
        if h.len() == SAMPLES {
            h.pop_front();
        }
        h.push_back((Instant::now(), stats.depth as i64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_compare_whole() {
        assert!(same("s3cret", "s3cret"));
        assert!(!same("s3cret", "s3cre"));
        assert!(!same("s3cre", "s3cret"));
        assert!(!same("", "x"));
        assert!(same("", ""));
    }
}

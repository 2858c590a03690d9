//! The status page: HTTP behaviour against a running gateway, and the page itself in a real
//! browser (headless Chromium, driven over the DevTools protocol) while a simulated device
//! answers, stops answering, and the uplink is cut.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Gateway, config, free_port};
use fieldgate::testkit::proxy::{FaultProxy, Mode};
use fieldgate::testkit::sim::Simulator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn boiler() -> Simulator {
    let sim = Simulator::start(None).await.unwrap();
    sim.with_unit(1, |b| {
        b.set_holding(100, &[0x0000, 0x4275]); // 61.25 f32, CDAB
        b.set_input(7, &[152]); // 1.52 bar
        b.coils.insert(5, true);
    });
    sim
}

const BOILER: &str = "  boiler:\n    bus: plc\n    every: 200ms\n    offline_after: 2\n    points:\n      flow_temp: { register: 100, type: f32, order: CDAB, unit: \"°C\" }\n      pressure: { register: 7, kind: input, scale: 0.01, unit: bar }\n      pump: { coil: 5 }\n";

/// A gateway with the page on a free port; returns it and the page's address.
fn gateway_with_page(
    dir: &Path,
    broker: SocketAddr,
    sim: &Simulator,
    extra: &str,
) -> (Gateway, SocketAddr) {
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let yaml = config(&dir.join("state"), broker, sim.addr, BOILER).replace(
        "devices:\n",
        &format!("web:\n  listen: {web}\n{extra}devices:\n"),
    );
    (Gateway::start(dir, &yaml), web)
}

/// One HTTP exchange: the raw request in, (status, head, body) out. The body ends at the
/// connection's close or at its `Content-Length` (Chromium's DevTools server keeps it open).
async fn http(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = c.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            out.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&out);
            if let Some((head, body)) = text.split_once("\r\n\r\n")
                && let Some(len) = head.lines().find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse::<usize>().ok())
                })
                && body.len() >= len
            {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("answered within 10s");
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await
}

/// Until the page's server answers `GET /api/status` (the address is bound before the queue
/// opens: a connection alone proves nothing, and one left in its backlog would take a slot).
async fn wait_http(addr: SocketAddr) {
    for _ in 0..100 {
        // 200, or 401 behind a password; 503 while the queue is not open yet.
        if TcpStream::connect(addr).await.is_ok()
            && matches!(get(addr, "/api/status").await.0, 200 | 401)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the status page never answered on {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_the_snapshot_and_bad_requests_get_a_4xx() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sim = boiler().await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, web) = gateway_with_page(dir.path(), broker, &sim, "");
    wait_http(web).await;

    // The values the simulator serves, in the same snapshot the status message carries.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let api = loop {
        let (status, head, body) = get(web, "/api/status").await;
        assert_eq!(status, 200, "{head}");
        assert!(head.contains("Content-Type: application/json"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["status"]["buses"]["plc"]["devices"]["boiler"]["values"]["pump"].is_object() {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "no values: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let s = &api["status"];
    assert_eq!(s["gateway"]["id"], "gw1");
    assert_eq!(s["gateway"]["version"], env!("CARGO_PKG_VERSION"));
    let values = &s["buses"]["plc"]["devices"]["boiler"]["values"];
    assert_eq!(values["flow_temp"]["value"], 61.25);
    assert_eq!(values["flow_temp"]["unit"], "°C");
    assert_eq!(values["pressure"]["value"], 1.52);
    assert_eq!(values["pump"]["value"], true);
    assert_eq!(values["pump"]["every_ms"], 200);
    assert!(api["depth_history"].is_array());
    // No secret anywhere: the config's password never reaches the snapshot.
    assert!(!api.to_string().contains("password"));

    let (status, _, body) = get(web, "/").await;
    assert_eq!(status, 200);
    assert!(body.contains("<script src=\"/app.js\">"), "{body}");
    assert_eq!(get(web, "/app.js").await.0, 200);
    assert_eq!(get(web, "/style.css").await.0, 200);
    assert_eq!(get(web, "/nope").await.0, 404);
    let (status, head, _) = http(web, b"POST /api/status HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 405, "read-only: {head}");
    assert_eq!(http(web, b"GARBAGE\r\n\r\n").await.0, 400);
    assert_eq!(http(web, b"GET / HTTP/9\r\n\r\n").await.0, 400);
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(http(web, huge.as_bytes()).await.0, 431);
    let (status, head, body) = http(web, b"HEAD /api/status HTTP/1.1\r\n\r\n").await;
    assert_eq!((status, body.as_str()), (200, ""), "{head}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_file_requires_basic_auth() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sim = boiler().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.pass"), "s3cret\n").unwrap();
    let (gw, web) = gateway_with_page(dir.path(), broker, &sim, "  password_file: web.pass\n");
    wait_http(web).await;
    let (status, head, _) = get(web, "/api/status").await;
    assert_eq!(status, 401);
    assert!(head.contains("WWW-Authenticate: Basic"), "{head}");
    // "anyone:wrong" and "anyone:s3cret"
    let wrong = b"GET /api/status HTTP/1.1\r\nAuthorization: Basic YW55b25lOndyb25n\r\n\r\n";
    assert_eq!(http(web, wrong).await.0, 401);
    let right = b"GET /api/status HTTP/1.1\r\nAuthorization: Basic YW55b25lOnMzY3JldA==\r\n\r\n";
    let (status, _, body) = http(web, right).await;
    assert_eq!(status, 200);
    assert!(
        !body.contains("s3cret"),
        "the password is not in the snapshot"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_hold_the_page_or_the_gateway() {
    let broker = fieldgate::testkit::broker::start().unwrap();
    let sim = boiler().await;
    let dir = tempfile::tempdir().unwrap();
    let sub = common::Subscriber::start(broker).await;
    let (gw, web) = gateway_with_page(dir.path(), broker, &sim, "");
    wait_http(web).await;
    // More idle connections than the cap: they send nothing.
    let mut idle = Vec::new();
    for _ in 0..fieldgate::web::MAX_CONNECTIONS + 4 {
        idle.push(TcpStream::connect(web).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The cap is full: a new client is told so at once instead of waiting.
    let (status, _, _) = get(web, "/api/status").await;
    assert_eq!(status, 503);
    // Polling and publishing go on meanwhile.
    let before = sub.all().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(sub.all().len() > before + 5, "the gateway kept publishing");
    // The idle ones are dropped after the head timeout; the page answers again.
    tokio::time::sleep(fieldgate::web::HEAD_TIMEOUT).await;
    assert_eq!(get(web, "/api/status").await.0, 200);
    drop(idle);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The page in a real browser.

fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|b| {
            Command::new("which")
                .arg(b)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        });
    if found.is_none() {
        if std::env::var("FIELDGATE_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
            panic!("chromium is required (FIELDGATE_REQUIRE_CHROMIUM=1) but not installed");
        }
        eprintln!("SKIPPED: chromium is not installed (apt-get install chromium)");
    }
    found
}

/// Headless Chromium with the DevTools protocol on a port it chooses; killed on drop.
struct Browser {
    child: Child,
    profile: tempfile::TempDir,
}

impl Browser {
    fn open(bin: &Path, url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=390,844", // a phone
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Browser { child, profile }
    }

    /// The DevTools port, from the file Chromium writes once it listens.
    async fn port(&self) -> u16 {
        let file = self.profile.path().join("DevToolsActivePort");
        for _ in 0..300 {
            if let Some(p) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.parse().ok()))
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("chromium did not open its DevTools port in 15s");
    }

    /// A DevTools connection to the page.
    async fn page(&self) -> Cdp {
        let port = self.port().await;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..100 {
            // The Host given is the one the WebSocket URLs in the answer name.
            let req =
                format!("GET /json/list HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            let (_, _, body) = http(addr, req.as_bytes()).await;
            let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
            if let Some(ws) = list
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            {
                return Cdp::connect(ws).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no page target in chromium");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The least of the DevTools protocol: `Runtime.evaluate` over a WebSocket (RFC 6455 framing,
/// masked client frames, text only).
struct Cdp {
    conn: TcpStream,
    id: u64,
}

impl Cdp {
    async fn connect(ws_url: &str) -> Cdp {
        let rest = ws_url.strip_prefix("ws://").expect("ws:// url");
        let (host, path) = rest.split_once('/').unwrap();
        let mut conn = TcpStream::connect(host).await.unwrap();
        let req = format!(
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            conn.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        Cdp { conn, id: 0 }
    }

    async fn send(&mut self, text: &str) {
        let payload = text.as_bytes();
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut frame = vec![0x81u8];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n < 65536 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.conn.write_all(&frame).await.unwrap();
    }

    async fn recv(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.conn.read_exact(&mut h).await.unwrap();
            let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
            let len = match h[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.conn.read_exact(&mut b).await.unwrap();
                    u16::from_be_bytes(b) as usize
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.conn.read_exact(&mut b).await.unwrap();
                    u64::from_be_bytes(b) as usize
                }
                n => n as usize,
            };
            let mut data = vec![0u8; len];
            self.conn.read_exact(&mut data).await.unwrap();
            if opcode == 0x9 || opcode == 0xA {
                continue; // ping / pong
            }
            message.extend_from_slice(&data);
            if fin {
                return String::from_utf8(message).unwrap();
            }
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> serde_json::Value {
        self.id += 1;
        let id = self.id;
        let msg = serde_json::json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true},
        });
        self.send(&msg.to_string()).await;
        loop {
            let v: serde_json::Value = serde_json::from_str(&self.recv().await).unwrap();
            if v["id"] == id {
                return v["result"]["result"]["value"].clone();
            }
        }
    }

    /// Waits until `expression` gives a value `ok` accepts (the page updates itself).
    async fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.eval(expression).await;
            if ok(&v) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                let text = self.eval("document.body.innerText").await;
                panic!("the page never showed {what}: last {v}; page:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn text_of(selector: &str) -> String {
    format!("(document.querySelector('{selector}') || {{}}).textContent || null")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_the_page_shows_values_a_device_going_offline_and_the_queue_rising() {
    let Some(bin) = chromium() else { return };
    let broker = fieldgate::testkit::broker::start().unwrap();
    let proxy = FaultProxy::start(broker).await.unwrap();
    let sim = boiler().await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, web) = gateway_with_page(dir.path(), proxy.addr(), &sim, "");
    wait_http(web).await;
    let browser = Browser::open(&bin, &format!("http://{web}/"));
    let mut page = browser.page().await;

    // The values the simulator serves.
    let v = page
        .wait_for(
            "the boiler's flow temperature",
            &text_of("[data-device=boiler] [data-point=flow_temp] .value"),
            |v| v == "61.25",
        )
        .await;
    assert_eq!(v, "61.25");
    let pressure = page
        .eval(&text_of(
            "[data-device=boiler] [data-point=pressure] .value",
        ))
        .await;
    assert_eq!(pressure, "1.52");
    let pump = page
        .eval(&text_of("[data-device=boiler] [data-point=pump] .value"))
        .await;
    assert_eq!(pump, "true");
    assert_eq!(
        page.eval(&text_of("[data-device=boiler] h2 .badge")).await,
        "online"
    );
    page.wait_for("the broker connected", &text_of("#link"), |v| {
        v.as_str()
            .is_some_and(|s| s.starts_with("broker connected"))
    })
    .await;
    // Laid out for a phone: nothing wider than the screen.
    let overflow = page
        .eval("document.documentElement.scrollWidth <= window.innerWidth + 1")
        .await;
    assert_eq!(overflow, true, "the page fits a 390 px wide screen");

    // The device stops answering: the same page, without a reload, turns it offline.
    sim.state.lock().unwrap().silent.push(1);
    page.wait_for(
        "the device offline",
        &text_of("[data-device=boiler] h2 .badge"),
        |v| v == "offline",
    )
    .await;
    page.wait_for(
        "its values marked stale",
        "document.querySelectorAll('[data-device=boiler] tr.stale').length",
        |v| v.as_u64() == Some(3),
    )
    .await;
    sim.state.lock().unwrap().silent.clear();
    page.wait_for(
        "the device online again",
        &text_of("[data-device=boiler] h2 .badge"),
        |v| v == "online",
    )
    .await;

    // The uplink is cut: the queue depth on the page rises, the broker shows down.
    proxy.set(Mode::Cut);
    let depth = |v: &serde_json::Value| {
        v.as_str()
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.replace(',', "").parse::<u64>().ok())
    };
    // Polled every 200 ms with 3 points, a drained queue still holds a poll or two in flight
    // (appended, committed, published, not yet acknowledged) at any instant the page samples;
    // the backlog is built far above that, and "drained" is back below it.
    let first = page
        .wait_for("a queue building up", &text_of("[data-key=depth]"), |v| {
            depth(v).is_some_and(|d| d >= 40)
        })
        .await;
    page.wait_for("a deeper queue", &text_of("[data-key=depth]"), |v| {
        depth(v) > depth(&first)
    })
    .await;
    page.wait_for("the broker down", &text_of("#link"), |v| {
        v.as_str().is_some_and(|s| s.starts_with("broker down"))
    })
    .await;
    proxy.set(Mode::Pass);
    page.wait_for("the queue drained", &text_of("[data-key=depth]"), |v| {
        depth(v).is_some_and(|d| d <= 9)
    })
    .await;
    drop(page);
    drop(browser);
    gw.stop().await;
}

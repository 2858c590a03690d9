//! An in-process MQTT broker (rumqttd) on a free loopback port, for `fieldgate demo` and the
//! tests, so that neither needs a broker installed.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// Starts rumqttd on a free loopback port, in its own thread.
///
/// rumqttd binds the address itself, so the port is chosen first: outside the kernel's
/// ephemeral range (which outgoing connections keep drawing from, and could take it in the
/// meantime), and then proven to be ours with an MQTT handshake.
///
/// When the suite runs under MQTT 5 (`FIELDGATE_TEST_MQTT_PROTOCOL=5`, see [`test_protocol`]) it
/// is a mosquitto instead, which speaks 5 and 3.1.1 on one port (rumqttd needs a listener for
/// each), tied to the calling thread: it is killed when the test's thread ends.
pub fn start() -> std::io::Result<SocketAddr> {
    if test_protocol() == "5" {
        return start_mosquitto_for_thread();
    }
    for _ in 0..20 {
        let addr = SocketAddr::from(([127, 0, 0, 1], quiet_port()?));
        let broker = rumqttd::Broker::new(broker_config(addr));
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                let mut broker = broker;
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "in-process broker stopped");
                }
            })?;
        for _ in 0..100 {
            if answers_mqtt(addr) {
                return Ok(addr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Err(std::io::Error::other("the in-process broker did not start"))
}

/// A loopback port below the ephemeral range (32768 and up) that can be bound now.
pub fn quiet_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() as u64 * 7919 + crate::message::now_ms() as u64) % 10_000;
    let _ = NEXT.compare_exchange(
        0,
        20_000 + seed as u16,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..2_000 {
        let mut port = NEXT.fetch_add(1, Ordering::Relaxed);
        if !(20_000..32_000).contains(&port) {
            NEXT.store(20_001, Ordering::Relaxed);
            port = 20_000;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(
        "no free loopback port in 20000..32000",
    ))
}

/// Whether an MQTT broker answers a CONNECT on `addr` with a CONNACK.
fn answers_mqtt(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    // CONNECT, MQTT 3.1.1, clean session, keep-alive 10 s, client id "probe".
    let connect = [
        0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10, 0, 5, b'p', b'r', b'o', b'b', b'e',
    ];
    let mut ack = [0u8; 4];
    s.write_all(&connect).is_ok() && s.read_exact(&mut ack).is_ok() && ack[0] == 0x20
}

fn broker_config(addr: SocketAddr) -> rumqttd::Config {
    use std::collections::HashMap;
    let server = rumqttd::ServerSettings {
        name: "demo".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 1000,
            max_segment_size: 10 << 20,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// The MQTT version the tests' gateways speak: `FIELDGATE_TEST_MQTT_PROTOCOL` (`5`), or
/// `3.1.1`. `.ci/run` runs the uplink tests under both.
pub fn test_protocol() -> &'static str {
    match std::env::var("FIELDGATE_TEST_MQTT_PROTOCOL").as_deref() {
        Ok("5") => "5",
        _ => "3.1.1",
    }
}

/// Every mosquitto the test kit starts keeps the user it was started as. Started as root it
/// would switch to the `mosquitto` user, which (1) cannot write in a test's private directory
/// (a persistent broker then saves nothing and a restart forgets every session) nor read the
/// files a test wrote there, and (2) loses the parent-death signal `setpriv --pdeathsig` set
/// (a change of user clears it), so the broker outlives its test. As anyone but root the line
/// changes nothing: mosquitto runs as that user anyway.
const KEEP_USER: &str = "user root\n";

/// A mosquitto on a free loopback port that dies with the calling thread (`setpriv
/// --pdeathsig`): no Receive Maximum (`max_inflight_messages 0`), nothing kept.
fn start_mosquitto_for_thread() -> std::io::Result<SocketAddr> {
    let bin = mosquitto_bin().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "FIELDGATE_TEST_MQTT_PROTOCOL=5 runs the tests against mosquitto, which is not installed",
        )
    })?;
    let port = quiet_port()?;
    let dir =
        std::env::temp_dir().join(format!("fieldgate-mosquitto-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "{KEEP_USER}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\nmax_queued_messages 0\n"
        ),
    )?;
    let mut cmd = if std::path::Path::new("/usr/bin/setpriv").exists() {
        let mut c = std::process::Command::new("/usr/bin/setpriv");
        c.args(["--pdeathsig", "KILL", "--", bin]);
        c
    } else {
        std::process::Command::new(bin)
    };
    cmd.arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..200 {
        if answers_mqtt(addr) {
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(std::io::Error::other("mosquitto did not start"))
}

/// Where Debian (and a local build) install mosquitto; None when it is not installed.
pub fn mosquitto_bin() -> Option<&'static str> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

/// Starts mosquitto with `conf` (written to `conf_file`, after [`KEEP_USER`]) and waits, at
/// most 5 s, until `127.0.0.1:port` accepts connections. For the tests and the benchmarks;
/// mosquitto must be installed.
pub fn spawn_mosquitto(
    conf_file: &std::path::Path,
    conf: &str,
    port: u16,
) -> std::io::Result<std::process::Child> {
    let bin = mosquitto_bin().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "mosquitto is not installed (apt-get install mosquitto)",
        )
    })?;
    std::fs::write(conf_file, format!("{KEEP_USER}{conf}"))?;
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(conf_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    Ok(child)
}

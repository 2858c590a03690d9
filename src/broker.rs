//! An in-process MQTT broker (rumqttd) on a free loopback port, for `fieldgate demo` and the
//! tests, so that neither needs a broker installed.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// Starts rumqttd on a free loopback port, in its own thread.
pub fn start() -> std::io::Result<SocketAddr> {
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = broker_config(addr);
    let broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = broker;
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "in-process broker stopped");
            }
        })?;
    // Wait until it listens.
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(std::io::Error::other(format!(
        "the in-process broker did not start on {addr}"
    )))
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

//! `fieldgate read`: commissioning. Reads registers or bits once, from a bus in a config or one
//! named on the command line, and prints every interpretation of them.

use std::path::PathBuf;
use std::time::Duration;

use fieldgate::bus::serial::{Endpoint, Parity, SerialSettings};
use fieldgate::bus::{Bus, Data, Link, Transport};
use fieldgate::config::Config;
use fieldgate::modbus::{ReadRequest, Table};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["holding", "input", "coils", "discrete"])))]
#[command(group(clap::ArgGroup::new("where").required(true).args(["config", "port", "host"])))]
pub struct ReadArgs {
    /// Take the bus from this config (with --bus).
    #[arg(long, requires = "bus")]
    config: Option<PathBuf>,
    /// The bus name in the config.
    #[arg(long)]
    bus: Option<String>,
    /// Or a serial port (Modbus RTU), e.g. /dev/ttyUSB0. (A TCP port goes with --host.)
    #[arg(long)]
    port: Option<String>,
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    #[arg(long, default_value = "none", value_parser = ["none", "even", "odd"])]
    parity: String,
    #[arg(long, default_value_t = 8)]
    data_bits: u8,
    #[arg(long, default_value_t = 1)]
    stop_bits: u8,
    /// Or a Modbus TCP device or converter: HOST, HOST:PORT or [IPv6]:PORT (default port 502).
    #[arg(long, value_name = "HOST[:PORT]")]
    host: Option<String>,
    /// The TCP port, when --host gives none.
    #[arg(long, default_value_t = 502)]
    tcp_port: u16,
    /// With --host: RTU frames over TCP (an RS-485-to-Ethernet converter).
    #[arg(long)]
    rtu_over_tcp: bool,
    /// Unit (slave) id.
    #[arg(long, default_value_t = 1)]
    unit: u8,
    /// Holding registers from this 0-based address.
    #[arg(long)]
    holding: Option<u16>,
    /// Input registers from this 0-based address.
    #[arg(long)]
    input: Option<u16>,
    /// Coils from this 0-based address.
    #[arg(long)]
    coils: Option<u16>,
    /// Discrete inputs from this 0-based address.
    #[arg(long)]
    discrete: Option<u16>,
    /// How many registers or bits.
    #[arg(long, default_value_t = 1)]
    count: u16,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// `HOST`, `HOST:PORT`, `[V6]:PORT` or a bare IPv6 address; the port defaults to `default`.
pub fn host_and_port(host: &str, default: u16) -> anyhow::Result<(String, u16)> {
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| anyhow::anyhow!("`{host}`: `{p}` is not a TCP port (1..=65535)"))
    };
    if let Some(rest) = host.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| anyhow::anyhow!("`{host}`: unclosed '['"))?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((h.to_string(), port(p)?)),
            None if after.is_empty() => Ok((h.to_string(), default)),
            None => anyhow::bail!("`{host}`: expected [ADDRESS]:PORT"),
        };
    }
    match host.split_once(':') {
        // One colon: host:port. More: an IPv6 address without a port.
        Some((h, p)) if !p.contains(':') => Ok((h.to_string(), port(p)?)),
        _ => Ok((host.to_string(), default)),
    }
}

pub async fn read(a: ReadArgs) -> anyhow::Result<()> {
    let transport = if let Some(cfg) = &a.config {
        let name = a.bus.as_deref().unwrap_or_default();
        let config = Config::load(cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
        let bus = config.buses.into_iter().find(|b| b.name == name);
        bus.ok_or_else(|| anyhow::anyhow!("no bus `{name}` in {}", cfg.display()))?
            .transport
    } else if let Some(port) = &a.port {
        if port.parse::<u16>().is_ok() {
            anyhow::bail!(
                "--port names a serial port (e.g. /dev/ttyUSB0); for Modbus TCP write --host HOST:{port}"
            );
        }
        Transport::ModbusRtu {
            endpoint: Endpoint::Serial(SerialSettings {
                port: port.clone(),
                baud: a.baud,
                parity: match a.parity.as_str() {
                    "even" => Parity::Even,
                    "odd" => Parity::Odd,
                    _ => Parity::None,
                },
                data_bits: a.data_bits,
                stop_bits: a.stop_bits,
            }),
            timeout: a.timeout,
            retries: 0,
            turnaround: Duration::ZERO,
        }
    } else {
        let (host, port) = host_and_port(a.host.as_deref().unwrap_or_default(), a.tcp_port)?;
        if a.rtu_over_tcp {
            Transport::ModbusRtu {
                endpoint: Endpoint::Tcp { host, port },
                timeout: a.timeout,
                retries: 0,
                turnaround: Duration::ZERO,
            }
        } else {
            Transport::ModbusTcp {
                host,
                port,
                timeout: a.timeout,
            }
        }
    };
    let (table, start) = match (a.holding, a.input, a.coils, a.discrete) {
        (Some(s), ..) => (Table::Holding, s),
        (_, Some(s), ..) => (Table::Input, s),
        (_, _, Some(s), _) => (Table::Coil, s),
        (.., Some(s)) => (Table::Discrete, s),
        _ => unreachable!("clap requires one"),
    };
    if a.count == 0 || a.count > table.max_per_request() {
        anyhow::bail!(
            "--count must be 1..={} for {}",
            table.max_per_request(),
            table.name()
        );
    }
    let req = ReadRequest {
        table,
        start,
        count: a.count,
        points: vec![],
    };
    let mut link = Link::new(&Bus {
        name: "read".into(),
        transport,
    })
    .ok_or_else(|| {
        anyhow::anyhow!("that is a serial_line bus; `read` reads Modbus registers and bits")
    })?;
    match link.read(a.unit, &req).await? {
        Data::Words(w) => print!(
            "{}",
            fieldgate::commission::describe_words(start, &w[..a.count as usize])
        ),
        Data::Bits(b) => print!(
            "{}",
            fieldgate::commission::describe_bits(start, &b[..a.count as usize])
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::host_and_port;

    #[test]
    fn a_host_takes_its_port_with_it() {
        let ok = |h: &str| host_and_port(h, 502).unwrap();
        assert_eq!(ok("10.0.0.7"), ("10.0.0.7".into(), 502));
        assert_eq!(ok("10.0.0.7:4001"), ("10.0.0.7".into(), 4001));
        assert_eq!(ok("converter.local:4001"), ("converter.local".into(), 4001));
        assert_eq!(ok("[fe80::1]:4001"), ("fe80::1".into(), 4001));
        assert_eq!(ok("[fe80::1]"), ("fe80::1".into(), 502));
        assert_eq!(ok("fe80::1"), ("fe80::1".into(), 502));
        assert!(host_and_port("10.0.0.7:http", 502).is_err());
        assert!(host_and_port("[fe80::1:4001", 502).is_err());
    }
}

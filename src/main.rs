//! The `fieldgate` command: `run`, `check` and `demo`. The binary edge: errors become exit
//! codes and messages here (`anyhow`, printed with their cause chain).

mod demo;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fieldgate::config::{Config, EX_CONFIG};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "fieldgate",
    version,
    about = "Modbus to MQTT edge gateway that never drops a reading"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Poll the configured devices and publish to the broker until SIGTERM or Ctrl-C.
    Run { config: PathBuf },
    /// Validate a config and every device model it uses and print the read plan; or validate
    /// one device model file (`fieldgate check mappings/sdm120.yaml`).
    Check { config: PathBuf },
    /// Commissioning: read registers or bits once and print every interpretation
    /// (u16, i16, u32, i32, f32, f64 … in all four word/byte orders).
    Read(ReadArgs),
    /// What a running gateway reports: uptime, queue, buses, devices (from its status.json).
    Status {
        /// The gateway's config (its gateway.state_dir is read).
        #[arg(long, conflicts_with = "state_dir")]
        config: Option<PathBuf>,
        /// Or the state directory itself (default /var/lib/fieldgate).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Inspect the store-and-forward queue (works while the gateway runs).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Everything on loopback, no hardware: a simulated device, a broker, the gateway, and an
    /// uplink outage partway through.
    Demo {
        /// Stop after this long (e.g. 20s); default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// When to cut the uplink.
        #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
        cut_at: Duration,
        /// For how long.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        cut_for: Duration,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["holding", "input", "coils", "discrete"])))]
#[command(group(clap::ArgGroup::new("where").required(true).args(["config", "port", "host"])))]
struct ReadArgs {
    /// Take the bus from this config (with --bus).
    #[arg(long, requires = "bus")]
    config: Option<PathBuf>,
    /// The bus name in the config.
    #[arg(long)]
    bus: Option<String>,
    /// Or a serial port (Modbus RTU), e.g. /dev/ttyUSB0.
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
    /// Or a Modbus TCP host.
    #[arg(long)]
    host: Option<String>,
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

#[derive(Subcommand)]
enum QueueCommand {
    /// Depth, oldest age, bytes, dropped and acknowledged counts.
    Stats {
        /// The gateway's config (its gateway.state_dir is read).
        #[arg(
            long,
            conflicts_with = "state_dir",
            required_unless_present = "state_dir"
        )]
        config: Option<PathBuf>,
        /// Or the state directory itself.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The state directory named on the command line, or the one of the given config, or the
/// packaged default.
fn state_dir_of(config: Option<PathBuf>, state_dir: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    match (config, state_dir) {
        (_, Some(d)) => Ok(d),
        (Some(c), None) => load(&c).map(|c| c.gateway.state_dir),
        (None, None) => Ok(PathBuf::from("/var/lib/fieldgate")),
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        eprintln!(
            "{}: {} error{}",
            path.display(),
            errors.0.len(),
            if errors.0.len() == 1 { "" } else { "s" }
        );
        ExitCode::from(EX_CONFIG as u8)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config }
            if std::fs::read_to_string(&config)
                .is_ok_and(|t| fieldgate::config::is_model_text(&t)) =>
        {
            match fieldgate::config::check_model(&config) {
                Ok(m) => {
                    print!("{}", m.summary());
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!(
                        "{}: {} error{}",
                        config.display(),
                        errors.0.len(),
                        if errors.0.len() == 1 { "" } else { "s" }
                    );
                    ExitCode::from(EX_CONFIG as u8)
                }
            }
        }
        Command::Check { config } => match load(&config) {
            Ok(c) => {
                print!("{}", c.summary());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config: path } => {
            let config = match load(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(&config.gateway.log_level);
            report(runtime().block_on(run(path, config)))
        }
        Command::Status {
            config,
            state_dir,
            json,
        } => match state_dir_of(config, state_dir) {
            Ok(dir) => report(status(&dir, json)),
            Err(code) => code,
        },
        Command::Read(args) => report(runtime().block_on(read(args))),
        Command::Queue {
            command:
                QueueCommand::Stats {
                    config,
                    state_dir,
                    json,
                },
        } => match state_dir_of(config, state_dir) {
            Ok(dir) => report(queue_stats(&dir, json)),
            Err(code) => code,
        },
        Command::Demo {
            duration,
            cut_at,
            cut_for,
        } => {
            init_logging("fieldgate=info,rumqttd=off,warn");
            report(runtime().block_on(demo::run(demo::Options {
                duration,
                cut_at,
                cut_for,
            })))
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("fieldgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn read(a: ReadArgs) -> anyhow::Result<()> {
    use fieldgate::bus::serial::{Endpoint, Parity, SerialSettings};
    use fieldgate::config::{Bus, Transport};
    use fieldgate::modbus::Table;
    let transport = if let Some(cfg) = &a.config {
        let name = a.bus.as_deref().unwrap_or_default();
        let config = Config::load(cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
        let bus = config.buses.into_iter().find(|b| b.name == name);
        bus.ok_or_else(|| anyhow::anyhow!("no bus `{name}` in {}", cfg.display()))?
            .transport
    } else if let Some(port) = &a.port {
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
        let host = a.host.clone().unwrap_or_default();
        if a.rtu_over_tcp {
            Transport::ModbusRtu {
                endpoint: Endpoint::Tcp {
                    host,
                    port: a.tcp_port,
                },
                timeout: a.timeout,
                retries: 0,
                turnaround: Duration::ZERO,
            }
        } else {
            Transport::ModbusTcp {
                host,
                port: a.tcp_port,
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
    let req = fieldgate::modbus::ReadRequest {
        table,
        start,
        count: a.count,
        points: vec![],
    };
    let mut link = fieldgate::bus::Link::new(&Bus {
        name: "read".into(),
        transport,
    })
    .ok_or_else(|| {
        anyhow::anyhow!("that is a serial_line bus; `read` reads Modbus registers and bits")
    })?;
    match link.read(a.unit, &req).await? {
        fieldgate::bus::Data::Words(w) => print!(
            "{}",
            fieldgate::commission::describe_words(start, &w[..a.count as usize])
        ),
        fieldgate::bus::Data::Bits(b) => print!(
            "{}",
            fieldgate::commission::describe_bits(start, &b[..a.count as usize])
        ),
    }
    Ok(())
}

fn queue_stats(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let store = fieldgate::store::Store::open_read_only(dir)
        .with_context(|| format!("no readable queue in {}", dir.display()))?;
    let s = store.stats()?;
    let now = fieldgate::message::now_ms();
    let age = s
        .oldest_ts_ms
        .map(|t| Duration::from_secs(((now - t).max(0) / 1000) as u64));
    if json {
        let mut v = serde_json::to_value(s)?;
        v["oldest_age_s"] = serde_json::json!(age.map(|a| a.as_secs()));
        println!("{v}");
        return Ok(());
    }
    println!("queue            {}", store.path().display());
    println!("depth            {} readings", s.depth);
    println!(
        "oldest           {}",
        age.map_or("-".to_string(), |a| format!(
            "{} ago",
            humantime::format_duration(a)
        ))
    );
    println!("bytes in use     {} (file {})", s.bytes, s.file_bytes);
    println!("last seq         {}", s.last_seq);
    println!(
        "dropped          {} (oldest {}, newest {}, expired {})",
        s.dropped(),
        s.dropped_oldest,
        s.dropped_newest,
        s.dropped_expired
    );
    if s.clock_steps > 0 {
        println!(
            "clock steps      {} (readings polled before a step carry the old clock's ts)",
            s.clock_steps
        );
    }
    if s.set_aside > 0 {
        println!(
            "set aside        {} (could never be published; see the aside table)",
            s.set_aside
        );
    }
    println!(
        "acknowledged     {} since start, {} in all",
        s.acked_since_start, s.acked_total
    );
    Ok(())
}

async fn run(path: PathBuf, config: Config) -> anyhow::Result<()> {
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

/// `fieldgate status`: the figures a running gateway last wrote.
fn status(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let path = dir.join("status.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no status in {} (is the gateway running?)", path.display()))?;
    let age = std::fs::metadata(&path)?
        .modified()?
        .elapsed()
        .unwrap_or_default();
    if json {
        println!("{text}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&text)?;
    println!(
        "status written {} ago{}",
        humantime::format_duration(Duration::from_secs(age.as_secs())),
        if age > Duration::from_secs(300) {
            " — the gateway may not be running"
        } else {
            ""
        }
    );
    println!(
        "uptime           {}",
        humantime::format_duration(Duration::from_secs(v["uptime_s"].as_u64().unwrap_or(0)))
    );
    let q = &v["queue"];
    println!(
        "queue            {} readings, oldest {} s, {} bytes; dropped {}; acknowledged {} since start",
        q["depth"], q["oldest_age_s"], q["bytes"], q["dropped"]["total"], q["acked_since_start"]
    );
    if let Some(buses) = v["buses"].as_object() {
        for (name, b) in buses {
            println!(
                "bus {name:<12} {} requests, {} lines, errors {}, utilisation {:.1}%",
                b["requests"],
                b["lines"],
                b["errors"],
                b["utilisation"].as_f64().unwrap_or(0.0) * 100.0
            );
            if let Some(devices) = b["devices"].as_object() {
                for (d, s) in devices {
                    let state = match s["online"].as_bool() {
                        Some(true) => "online",
                        Some(false) => "OFFLINE",
                        None => "unknown",
                    };
                    let last = s["last_success_ms"]
                        .as_i64()
                        .map(fieldgate::message::format_ts)
                        .unwrap_or_else(|| "never".into());
                    println!(
                        "  {d:<14} {state:<8} last success {last}, polls {}, failed {}",
                        s["polls"], s["failed_polls"]
                    );
                }
            }
        }
    }
    Ok(())
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

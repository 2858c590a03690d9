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
    /// Validate a config and every device model it uses; print the read plan.
    Check { config: PathBuf },
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
        Command::Check { config } => match load(&config) {
            Ok(c) => {
                print!("{}", c.summary());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config } => {
            init_logging("info");
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(runtime().block_on(run(config)))
        }
        Command::Queue {
            command:
                QueueCommand::Stats {
                    config,
                    state_dir,
                    json,
                },
        } => {
            let dir = match (config, state_dir) {
                (_, Some(d)) => d,
                (Some(c), None) => match load(&c) {
                    Ok(c) => c.gateway.state_dir,
                    Err(code) => return code,
                },
                (None, None) => unreachable!("clap requires one"),
            };
            report(queue_stats(&dir, json))
        }
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
    println!(
        "acknowledged     {} since start, {} in all",
        s.acked_since_start, s.acked_total
    );
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    tokio::spawn(stop_on_signal(cancel.clone()));
    fieldgate::gateway::run(config, cancel).await?;
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

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

//! The `fieldgate` command: `run`, `check`, `read`, `status`, `queue stats` and (with the test
//! kit) `demo`, each in its file under `cli/`. The binary edge: errors become exit codes and
//! messages here (`anyhow`, printed with their cause chain; exit 78 for a bad config).

mod cli;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
#[cfg(feature = "testkit")]
use std::time::Duration;

use clap::{Parser, Subcommand};
use fieldgate::config::{Config, EX_CONFIG};

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
    /// one device model file (`fieldgate check mappings/eastron-sdm120.yaml`).
    Check { config: PathBuf },
    /// Commissioning: read registers or bits once and print every interpretation
    /// (u16, i16, u32, i32, f32, f64 … in all four word/byte orders).
    Read(cli::read::ReadArgs),
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
    #[cfg(feature = "testkit")]
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

/// Where the queue is: a config's `gateway.state_dir`, or the directory itself.
#[derive(clap::Args)]
struct StateDir {
    /// The gateway's config (its gateway.state_dir is read).
    #[arg(long, conflicts_with = "state_dir")]
    config: Option<PathBuf>,
    /// Or the state directory itself (default /var/lib/fieldgate).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Depth, oldest age, bytes, dropped, set-aside and acknowledged counts.
    Stats {
        #[command(flatten)]
        dir: StateDir,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the readings set aside (refused by the broker, or never publishable), with why.
    Aside {
        #[command(flatten)]
        dir: StateDir,
        /// Only those whose reason starts with this (e.g. "not authorized").
        #[arg(long)]
        reason: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Put the readings set aside back in the queue (after fixing the broker's ACL): the
    /// running gateway publishes them with their original timestamps.
    Requeue {
        #[command(flatten)]
        dir: StateDir,
        /// Only those whose reason starts with this; all without it.
        #[arg(long)]
        reason: Option<String>,
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
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
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
            report(runtime().block_on(cli::run::run(path, config)))
        }
        Command::Status {
            config,
            state_dir,
            json,
        } => match state_dir_of(config, state_dir) {
            Ok(dir) => report(cli::status::show(&dir, json)),
            Err(code) => code,
        },
        Command::Read(args) => report(runtime().block_on(cli::read::read(args))),
        Command::Queue { command } => {
            let (QueueCommand::Stats { dir, .. }
            | QueueCommand::Aside { dir, .. }
            | QueueCommand::Requeue { dir, .. }) = &command;
            match state_dir_of(dir.config.clone(), dir.state_dir.clone()) {
                Err(code) => code,
                Ok(d) => report(match &command {
                    QueueCommand::Stats { json, .. } => cli::queue::stats(&d, *json),
                    QueueCommand::Aside {
                        reason,
                        limit,
                        json,
                        ..
                    } => cli::queue::aside(&d, reason.as_deref(), *limit, *json),
                    QueueCommand::Requeue { reason, .. } => {
                        cli::queue::requeue(&d, reason.as_deref())
                    }
                }),
            }
        }
        #[cfg(feature = "testkit")]
        Command::Demo {
            duration,
            cut_at,
            cut_for,
        } => {
            init_logging("fieldgate=info,rumqttd=off,warn");
            report(runtime().block_on(cli::demo::run(cli::demo::Options {
                duration,
                cut_at,
                cut_for,
            })))
        }
    }
}

/// One thread for every task: the gateway's work is I/O waits and a few microseconds per
/// reading, so a second worker only adds cross-thread wake-ups and a stack. Nothing blocks it:
/// the queue's SQLite calls run on the store thread, the file opens in `spawn_blocking`.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
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

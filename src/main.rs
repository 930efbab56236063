//! The `pulsegate` binary: parses the command line and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pulsegate::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// Exit codes, as documented in README.md.
const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "pulsegate",
    version,
    about = "A TCP proxy that finds and evicts half-open connections before they hang your clients",
    long_about = "pulsegate sits between applications (and their connection pools) and their \
backends — PostgreSQL, MySQL, Redis, HTTP, any TCP server. It probes idle connections and \
watches busy ones, and when a backend or a client vanishes without a FIN or RST it resets \
the other side within seconds, so connection pools reconnect instead of hanging for minutes.",
    after_help = "Exit codes: 0 success; 1 runtime failure (e.g. cannot bind); 2 invalid config \
or command line; 3 missing privileges (demo)."
)]
struct Cli {
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter: error, warn, info, debug, trace, or per module
    /// (e.g. `info,pulsegate::liveness=debug`).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file until SIGTERM/SIGINT (a second signal
    /// exits at once).
    Run {
        /// The TOML config file, e.g. config/pulsegate.toml.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config file: print the effective config with every default,
    /// the worst-case detection time per listener, and warnings. Exit 0 if
    /// valid, 2 if not.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show the problem and the fix in one command: in a private network
    /// namespace, a direct client hangs on a vanished backend while a client
    /// through pulsegate is reset within seconds. Needs root.
    Demo,
    /// Lab helper process (echo server or idle client) for the demo and
    /// the namespace tests.
    #[command(hide = true)]
    LabBackend(pulsegate::lab::BackendArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(cli.log_format, &cli.log_level) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config),
        Command::Demo => match pulsegate::demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(pulsegate::demo::exit_code(&e))
            }
        },
        Command::LabBackend(args) => match pulsegate::lab::run_backend(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: lab-backend: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match pulsegate::config::load(path) {
        Ok(config) => {
            print!("{}", pulsegate::check::report(&config));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match pulsegate::config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(async {
        let bound = match pulsegate::proxy::bind_all(&config).await {
            Ok(bound) => bound,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone()));
        pulsegate::proxy::serve(bound, shutdown).await;
        tracing::info!("all listeners drained; exiting");
        ExitCode::SUCCESS
    })
}

/// First SIGTERM/SIGINT: graceful drain. Second: exit at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!(
            "cannot install signal handlers; SIGTERM will kill pulsegate without draining"
        );
        return;
    };
    let mut received = 0;
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        received += 1;
        if received == 1 {
            tracing::info!(
                signal = name,
                "shutting down: draining sessions (send it again to exit at once)"
            );
            shutdown.cancel();
        } else {
            tracing::warn!(signal = name, "second signal: exiting now");
            std::process::exit(i32::from(EXIT_RUNTIME));
        }
    }
}

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
or command line; 3 missing privileges (demo, bench)."
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
    /// Talk to a running pulsegate's admin server: health, ready, status,
    /// metrics, reload, drain. Exit 0 on success, 1 on failure, 2 when a
    /// reload was refused as invalid.
    Admin {
        /// The admin server, as `http://HOST:PORT`.
        #[arg(long, global = true, default_value = "http://127.0.0.1:9900")]
        url: String,
        /// File holding the bearer token (default: $PULSEGATE_ADMIN_TOKEN).
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
        /// Deadline for each request, e.g. 5s.
        #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Load tests in a private network namespace (root).
    #[cfg(feature = "bench")]
    Bench {
        #[command(subcommand)]
        bench: BenchCommand,
    },
    /// Lab helper process (echo server or idle client) for the demo and
    /// the namespace tests.
    #[command(hide = true)]
    LabBackend(pulsegate::lab::BackendArgs),
}

#[cfg(feature = "bench")]
#[derive(Subcommand)]
enum BenchCommand {
    /// Failover under load: clients through pulsegate, HAProxy and
    /// directly, the same fault on the same backends for all (black: a dead
    /// or frozen primary; gray: loss, latency, a flapping partition, one
    /// dropped flow, a role flip), then time until every client is served
    /// again, failed and hung requests, false evictions, writes to the
    /// wrong role and latency percentiles (terminal table, JSON report, SVG
    /// timeline); `--matrix` runs every fault. Needs root.
    Failover(Box<pulsegate::bench::FailoverArgs>),
}

#[derive(Subcommand)]
enum AdminAction {
    /// GET /healthz: exit 0 while the proxy serves (a HEALTHCHECK).
    Health,
    /// GET /readyz: exit 0 when every listener has a usable backend.
    Ready,
    /// GET /status: listeners, backends, sessions, recent evictions.
    Status,
    /// GET /metrics: the Prometheus exposition.
    Metrics,
    /// POST /reload: re-read the config file and apply it.
    Reload,
    /// POST /drain: stop accepting and let sessions finish, then exit
    /// (or stay up with --stay). A Kubernetes preStop hook.
    Drain {
        /// Stay up once drained instead of exiting.
        #[arg(long)]
        stay: bool,
        /// Block until the drain is over (or this long passed), e.g. 25s.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
    },
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
        Command::Admin {
            url,
            token_file,
            timeout,
            action,
        } => admin(url, token_file, timeout, action),
        #[cfg(feature = "bench")]
        Command::Bench {
            bench: BenchCommand::Failover(args),
        } => match pulsegate::bench::run_failover(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(e.exit_code())
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

fn admin(
    url: String,
    token_file: Option<PathBuf>,
    timeout: std::time::Duration,
    action: AdminAction,
) -> ExitCode {
    use pulsegate::admin::command::{self, AdminCommand};
    let command = match action {
        AdminAction::Health => AdminCommand::Health,
        AdminAction::Ready => AdminCommand::Ready,
        AdminAction::Status => AdminCommand::Status,
        AdminAction::Metrics => AdminCommand::Metrics,
        AdminAction::Reload => AdminCommand::Reload,
        AdminAction::Drain { stay, wait } => AdminCommand::Drain { stay, wait },
    };
    let target = command::Target {
        url,
        token_file,
        token_env: "PULSEGATE_ADMIN_TOKEN".to_string(),
        timeout,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    ExitCode::from(runtime.block_on(command::run(&target, &command)))
}

fn check(path: &std::path::Path) -> ExitCode {
    match pulsegate::config::load(path) {
        Ok(config) => {
            print!("{}", pulsegate::preflight::report(&config));
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
    let admin = config
        .raw
        .admin
        .as_ref()
        .zip(config.admin_bind)
        .map(|(admin, bind)| pulsegate::admin::AdminSettings::from_config(admin, bind));
    let admin = match admin.transpose() {
        Ok(admin) => admin,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(serve(config, admin, path.to_path_buf()))
}

async fn serve(
    config: pulsegate::config::ValidConfig,
    admin: Option<pulsegate::admin::AdminSettings>,
    path: PathBuf,
) -> ExitCode {
    let signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let bound = match pulsegate::Bound::bind(config, admin).await {
        Ok(bound) => bound,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let server = pulsegate::Server::start(bound, Some(path));
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(signals, server.handle(), shutdown.clone()));
    server.run(shutdown).await;
    tracing::info!("exiting");
    ExitCode::SUCCESS
}

/// The signals `run` handles, installed before anything binds so that an
/// early SIGHUP (a `systemctl reload` right after start) cannot kill the
/// process with the default action.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// SIGHUP: reload. First SIGTERM/SIGINT: graceful drain, then exit (also
/// when an admin drain said to stay). Second: exit at once.
async fn watch_signals(
    mut signals: Signals,
    server: pulsegate::Handle,
    shutdown: CancellationToken,
) {
    let mut received = 0;
    loop {
        let name = tokio::select! {
            _ = signals.term.recv() => "SIGTERM",
            _ = signals.int.recv() => "SIGINT",
            _ = signals.hup.recv() => {
                tracing::info!(signal = "SIGHUP", "reloading the config");
                // The outcome is logged and shown in /status by reload().
                let _ = server.reload().await;
                continue;
            }
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

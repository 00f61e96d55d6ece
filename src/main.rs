//! The `botrelay` binary: parses the command line, loads the config, and runs the relay or a
//! one-shot command. Exit codes: 0 success, 1 runtime failure, 2 invalid config or usage.

use botrelay::config::{Config, ConfigError, DEFAULT_PATH};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "botrelay", version, about = "A durable webhook relay for Messenger bots")]
struct Cli {
    /// Config file (TOML). Every key can be overridden by BOTRELAY__SECTION__KEY.
    #[arg(long, global = true, env = "BOTRELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Serve,
    /// Load and validate the config; print every problem and exit 2, or the active sinks and exit 0.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let explicit = cli.config.is_some();
    let path = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    let config = match Config::load(&path, explicit) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("botrelay: {error}");
            if matches!(error, ConfigError::Invalid(_)) {
                eprintln!("(config file: {}; see config/botrelay.example.toml)", path.display());
            }
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => check_config(&config, &path),
        Command::Serve => serve(config),
    }
}

fn check_config(config: &Config, path: &std::path::Path) -> ExitCode {
    println!("config OK ({})", path.display());
    for sink in &config.sinks {
        let kinds: Vec<&str> = sink.kinds.iter().map(|kind| kind.as_str()).collect();
        println!("  active sink {:<16} kinds: {}", sink.name.as_str(), kinds.join(", "));
    }
    for (name, reason) in &config.disabled_sinks {
        println!("  disabled sink {:<14} {reason}", name.as_str());
    }
    if config.sinks.is_empty() {
        println!("  no sink is active: events will be stored and acknowledged, and go nowhere");
    }
    ExitCode::SUCCESS
}

fn serve(config: Config) -> ExitCode {
    let redactor = botrelay::telemetry::Redactor::new(config.secrets());
    botrelay::telemetry::init(&config.log, redactor);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("botrelay: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let public = tokio::net::TcpListener::bind(config.server.listen).await?;
        let admin = tokio::net::TcpListener::bind(config.admin.listen).await?;
        botrelay::run(config, botrelay::Listeners { public, admin }, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("botrelay: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = interrupt => {}
            () = terminate => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

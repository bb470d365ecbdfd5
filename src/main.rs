//! The `upgate` binary: parse arguments (clap), load the configuration, set up logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use upgate::config::Config;

/// With `--features mimalloc`: mimalloc instead of glibc malloc, less CPU per request, more
/// resident memory (benches/README.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Multi-tenant upload gateway: upload sessions in front of object storage.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file; environment variables override it. Without one the embedded
    /// default runs (in-memory store, ./data, 127.0.0.1:8080, the development tenant).
    #[arg(short, long, global = true, env = "UPGATE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API and the admin listener (the default).
    Serve,
    /// Create the seed story's fixtures in the configured store and print their ids.
    DevSeed,
    /// Print the SHA-256 digest of an API key, for `api_keys_sha256`.
    HashKey {
        /// The API key.
        key: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::HashKey { key } = &command {
        println!("{}", Config::hash_key(key));
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("upgate: {e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    let telemetry = upgate::telemetry::init(config.log_format);
    let result = match command {
        Command::DevSeed => upgate::dev_seed::run(config).await,
        Command::Serve | Command::HashKey { .. } => serve(config).await,
    };
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "upgate stopped with an error");
            eprintln!("upgate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), upgate::StartError> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %config.listen, admin = %config.admin_listen, environment = ?config.environment, "upgate listening");
    upgate::run(listener, config, shutdown_signal()).await
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

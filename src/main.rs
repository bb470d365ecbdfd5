//! The `upgate` binary: parse arguments, load the configuration, set up logging, run.
//!
//! ```text
//! upgate [--config FILE]             serve (UPGATE_CONFIG=FILE works too)
//! upgate [--config FILE] dev-seed    create the seed fixtures in the configured store, print ids
//! upgate hash-key KEY                print the SHA-256 digest to put in api_keys_sha256
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use upgate::config::Config;

/// With `--features mimalloc`: mimalloc instead of glibc malloc, less CPU per request, more
/// resident memory (benches/README.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn usage() -> ExitCode {
    eprintln!("usage: upgate [--config FILE] [serve | dev-seed | hash-key KEY]");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut config_path: Option<PathBuf> = std::env::var_os("UPGATE_CONFIG").map(PathBuf::from);
    let mut command = String::from("serve");
    let mut rest = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => config_path = Some(PathBuf::from(p)),
                None => return usage(),
            },
            "-h" | "--help" => return usage(),
            "serve" | "dev-seed" | "hash-key" => command = arg,
            _ => rest.push(arg),
        }
    }
    if command == "hash-key" {
        let [key] = rest.as_slice() else {
            return usage();
        };
        println!("{}", Config::hash_key(key));
        return ExitCode::SUCCESS;
    }
    if !rest.is_empty() {
        return usage();
    }
    let config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("upgate: {e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    let telemetry = upgate::telemetry::init(config.log_format);
    let result = match command.as_str() {
        "dev-seed" => upgate::dev_seed::run(config).await,
        _ => serve(config).await,
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

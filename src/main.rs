//! The `turnpike` command line: parse, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use turnpike::config::{Config, LogFormat};

#[derive(Parser)]
#[command(name = "turnpike", version, about = "A STUN/TURN relay daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the STUN/TURN server.
    Serve {
        /// Configuration file.
        #[arg(short, long, default_value = "turnserver.toml")]
        config: PathBuf,
        /// Log format (overrides log_format in the config).
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
        /// Log filter, e.g. "debug" or "turnpike=trace" (overrides log_level in the config).
        #[arg(long)]
        log_level: Option<String>,
    },
    /// Validate a configuration file and print the effective configuration, secrets redacted.
    CheckConfig {
        #[arg(short, long, default_value = "turnserver.toml")]
        config: PathBuf,
    },
}

fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(level).with_context(|| format!("invalid log level {level:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            log_format,
            log_level,
        } => {
            let cfg = Config::load(&config)?;
            let format = match log_format {
                Some(LogFormatArg::Json) => LogFormat::Json,
                Some(LogFormatArg::Text) => LogFormat::Text,
                None => cfg.log_format,
            };
            let level = log_level.unwrap_or_else(|| cfg.log_level.clone());
            init_logging(format, &level)?;
            turnpike::daemon::serve(cfg)?;
            Ok(())
        }
        Command::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            cfg.load_rest_secrets()?;
            println!("# {}: valid", config.display());
            print!("{}", cfg.to_redacted_toml());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turnpike: {e:#}");
            ExitCode::FAILURE
        }
    }
}

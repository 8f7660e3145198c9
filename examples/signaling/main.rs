//! A small meeting page in front of turnpike: rooms by URL, WebSocket
//! signaling, a mesh of RTCPeerConnections, short-lived TURN credentials.
//!
//! ```text
//! cargo run --example signaling -- --config turnserver.toml
//! # then open http://127.0.0.1:8080/ in two browser tabs
//! ```
//!
//! The TURN credentials are minted with the daemon's own REST secret
//! (`auth.secret_file` / `auth.secret_env` of the config given), so run the
//! daemon with the same config. The secret never leaves this process.
//!
//! Modules: `rooms` (room registry, pure), `protocol` (wire messages),
//! `ice` (credential minting), `server` (HTTP routes and state), `session`
//! (one WebSocket member, its message budget the daemon's own token bucket).

mod ice;
mod protocol;
mod rooms;
mod server;
mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::Parser;
use tracing_subscriber::EnvFilter;
use turnpike::config::Config;

use crate::ice::IceMinter;
use crate::rooms::{Limits, Registry};
use crate::server::{AppState, Settings};

#[derive(Parser, Debug)]
#[command(
    name = "signaling",
    about = "turnpike example: a small meeting page with WebSocket signaling and TURN credentials"
)]
struct Cli {
    /// The daemon's config file; its REST secret (auth.secret_file or
    /// auth.secret_env) mints the TURN credentials.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,

    /// HTTP address to serve the page and the WebSocket on (port 0 = any).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// STUN/TURN URL handed to the page (repeatable). Default: for each
    /// request, stun:<host>:<port> and turn:<host>:<port>?transport=udp,
    /// where <host> is the page's Host header and <port> the daemon's first
    /// listen port.
    #[arg(long = "turn-url", value_name = "URL")]
    turn_urls: Vec<String>,

    /// Participants per room.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=16))]
    room_size: u16,

    /// Lifetime of minted TURN credentials, seconds (at most the daemon's
    /// auth.rest_max_ttl_secs).
    #[arg(long, default_value_t = 3600)]
    ttl: u64,

    /// Rooms open at once.
    #[arg(long, default_value_t = 1000)]
    max_rooms: usize,

    /// WebSocket connections open at once.
    #[arg(long, default_value_t = 4000)]
    max_connections: usize,

    /// Accept WebSocket connections from pages of this origin too, e.g.
    /// "https://meet.example.com" (repeatable). The page's own origin is
    /// always accepted.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    allow_origins: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config_path = cli.config.display().to_string();
    let config = Config::load(&cli.config).with_context(|| format!("loading {config_path}"))?;
    let secrets = config
        .load_rest_secrets()
        .with_context(|| format!("reading the REST secret configured in {config_path}"))?;
    let Some(secret) = secrets.into_iter().next() else {
        bail!(
            "{config_path} configures no REST secret, and this example mints TURN credentials \
             with the daemon's REST secret (it must not invent one the daemon does not know).\n\
             Create one and point the config at it, then restart turnpike with that config:\n\
             \n    openssl rand -hex 32 > rest-secret && chmod 600 rest-secret\n\
             \n  and in {config_path}, under [auth]:\n\
             \n    secret_file = \"rest-secret\"\n\
             \n  (or secret_env = \"TURNPIKE_REST_SECRET\" with that variable set for both)"
        );
    };
    if cli.max_rooms == 0 || cli.max_connections == 0 {
        bail!("--max-rooms and --max-connections must be at least 1");
    }
    let turn_port = config
        .listen
        .iter()
        .map(SocketAddr::port)
        .find(|&p| p != 0)
        .unwrap_or(3478);
    let derived = cli.turn_urls.is_empty();
    let ice = IceMinter::new(
        secret,
        config.auth.rest_separator,
        cli.ttl,
        config.auth.rest_max_ttl_secs,
        cli.turn_urls,
        turn_port,
    )
    .map_err(anyhow::Error::msg)?;

    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let addr = listener.local_addr().context("local address")?;

    let room_size = usize::from(cli.room_size);
    let registry = Registry::new(Limits {
        room_size,
        max_rooms: cli.max_rooms,
        max_members: cli.max_connections,
    });
    let settings = Settings {
        room_size,
        max_connections: cli.max_connections,
        fallback_host: server::fallback_host(addr),
        allow_origins: cli.allow_origins,
    };
    let state = Arc::new(AppState::new(registry, ice, settings));
    let app = server::router(state.clone());

    if derived {
        tracing::info!(
            "ICE servers: stun:<host>:{turn_port} and turn:<host>:{turn_port}?transport=udp, \
             <host> from each request's Host header (override with --turn-url)"
        );
    }
    tracing::info!(
        room_size,
        ttl_secs = state.ice.ttl_secs(),
        "minting TURN credentials with the REST secret from {config_path}"
    );
    // Tests and scripts read this line to find the port.
    println!("signaling listening on http://{addr}");

    axum::serve(listener, app).await.context("HTTP server")?;
    Ok(())
}

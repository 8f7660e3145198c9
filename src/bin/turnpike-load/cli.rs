//! The command line (the contract the benchmark scripts are written against: flags and JSON
//! field names are kept, new ones only added).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  turnpike-load alloc --server 127.0.0.1:3478 --user alice --password-file pw \\
      --count 5000 --in-flight 32 --server-pid \"$(pidof turnpike)\"
  turnpike-load relay --server 127.0.0.1:3478 --user bench --secret-file secret \\
      --clients 20 --rate 20000 --duration-secs 5 --json
  turnpike-load relay --server 127.0.0.1:3478 --user alice --password-file pw \\
      --rate 0 --window 1 --clients 1        # RTT with one packet in flight
  turnpike-load binding --server 127.0.0.1:3478 --duration-secs 5

Exit status: 0 ok, 1 the run failed (cause on stderr), 2 --timeout-secs hit, 64 usage error.";

#[derive(Parser, Debug)]
#[command(
    name = "turnpike-load",
    version,
    about = "Load generator for any TURN server over UDP: allocation rate, relay throughput, \
             loss and RTT, STUN Binding rate, with the server's CPU and memory",
    after_help = EXAMPLES
)]
pub struct Cli {
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(Subcommand, Debug)]
pub enum Mode {
    /// Hold N allocations at once (Allocate with the 401 round, CreatePermission, ChannelBind,
    /// Refresh), then delete them: allocations/s, setup latency, server CPU and RSS.
    Alloc(AllocArgs),
    /// Relay messages through K allocations to an echo peer (or between pairs of clients):
    /// delivered msgs/s, loss, RTT, server CPU per message.
    Relay(RelayArgs),
    /// STUN Binding requests: answers/s, RTT, server CPU per request.
    Binding(BindingArgs),
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// The server's UDP address.
    #[arg(long, value_name = "HOST:PORT")]
    pub server: String,
    /// Long-term credential user (with --password/--password-file), or the user part of the
    /// usernames minted from a TURN REST secret (with --secret-file).
    #[arg(long)]
    pub user: Option<String>,
    /// Static password (for quick tests; prefer --password-file).
    #[arg(long, conflicts_with_all = ["password_file", "secret_file"])]
    pub password: Option<String>,
    /// File holding the static password (first line).
    #[arg(long, value_name = "FILE", conflicts_with = "secret_file")]
    pub password_file: Option<PathBuf>,
    /// File holding a TURN REST shared secret (first line): each allocation mints its own
    /// EXPIRY:USER-N username.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Realm for the long-term key (learned from the 401 otherwise).
    #[arg(long)]
    pub realm: Option<String>,
    /// Source address of the client sockets and the built-in echo peer (default 127.0.0.1 when
    /// the server is on loopback, else the address the route to the server leaves from).
    #[arg(long, value_name = "IP")]
    pub local_ip: Option<IpAddr>,
    /// Sample this process's CPU and RSS (the server's) around the measured phase.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// One JSON object on stdout instead of the human report.
    #[arg(long)]
    pub json: bool,
    /// Hard bound on the whole run; exit status 2 when hit.
    #[arg(long, value_name = "T", default_value_t = 60)]
    pub timeout_secs: u64,
}

#[derive(Args, Debug, Clone)]
pub struct AllocArgs {
    #[command(flatten)]
    pub common: Common,
    /// Allocations held at once.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub count: usize,
    /// Allocations being set up at the same time.
    #[arg(long, value_name = "M", default_value_t = 32)]
    pub in_flight: usize,
    /// How long all N stay held before they are deleted.
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub hold_secs: f64,
    /// CreatePermission/ChannelBind target (default: the built-in echo peer).
    #[arg(long, value_name = "IP:PORT")]
    pub peer: Option<SocketAddr>,
}

#[derive(Args, Debug, Clone)]
pub struct RelayArgs {
    #[command(flatten)]
    pub common: Common,
    /// Client allocations (pairs of them with --client-to-client).
    #[arg(long, value_name = "K", default_value_t = 20)]
    pub clients: usize,
    /// Messages per second over all clients, paced evenly; 0 floods.
    #[arg(long, value_name = "R", default_value_t = 20000)]
    pub rate: u64,
    /// How long to send.
    #[arg(long, value_name = "D", conflicts_with = "messages")]
    pub duration_secs: Option<f64>,
    /// Messages to send in all (instead of a duration).
    #[arg(long, value_name = "N")]
    pub messages: Option<u64>,
    /// Payload bytes per message (24 at least: sequence number and send time).
    #[arg(long, value_name = "B", default_value_t = 160)]
    pub size: usize,
    /// Send indications and Data indications instead of ChannelData.
    #[arg(long)]
    pub send_indication: bool,
    /// K/2 pairs of allocations relaying to each other's relayed address: one sends, the
    /// other echoes.
    #[arg(long)]
    pub client_to_client: bool,
    /// At most W unanswered messages per client (default: 32 when flooding, no limit when
    /// paced).
    #[arg(long, value_name = "W")]
    pub window: Option<u32>,
    /// An external UDP echo peer instead of the built-in one.
    #[arg(long, value_name = "IP:PORT")]
    pub peer: Option<SocketAddr>,
    /// Wait this long for late answers before counting loss.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub drain_ms: u64,
    /// Allocations being set up at the same time.
    #[arg(long, value_name = "M", default_value_t = 32)]
    pub in_flight: usize,
}

#[derive(Args, Debug, Clone)]
pub struct BindingArgs {
    #[command(flatten)]
    pub common: Common,
    /// Client sockets.
    #[arg(long, value_name = "K", default_value_t = 4)]
    pub clients: usize,
    /// Requests per second over all sockets, paced evenly; 0 floods.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub rate: u64,
    /// How long to send.
    #[arg(long, value_name = "D", conflicts_with = "requests")]
    pub duration_secs: Option<f64>,
    /// Requests to send in all (instead of a duration).
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,
    /// At most W unanswered requests per socket.
    #[arg(long, value_name = "W", default_value_t = 32)]
    pub window: u32,
    /// Wait this long for late answers before counting them lost.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub drain_ms: u64,
}

/// Largest payload: a Send indication around it must fit a receive slot.
pub const MAX_SIZE: usize = 1900;

//! The sans-IO protocol core: every STUN/TURN decision, none of the I/O.
//!
//! Nothing in here touches a socket, reads a clock, or draws randomness of its own: time comes in as
//! an argument, relay sockets are opened and closed by [`server::Command`]s the I/O layer carries out,
//! and the tests drive it with bytes and simulated time.

pub mod allocation;
pub mod auth;
pub mod bucket;
pub mod codec;
pub mod discovery;
pub mod error;
pub mod mac;
pub mod policy;
pub mod quota;
pub mod ratelimit;
pub mod request;
pub mod server;
pub mod stats;
pub mod timers;

use std::net::SocketAddr;

/// The client-facing transport of a 5-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// One byte that binds nonces to the transport.
    pub fn tag(self) -> u8 {
        match self {
            Transport::Udp => 17,
            Transport::Tcp => 6,
            Transport::Tls => 56,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// What identifies a client to the server (RFC 8656 §2): transport, client address, and the
/// server address the client talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub transport: Transport,
    pub client: SocketAddr,
    pub local: SocketAddr,
}

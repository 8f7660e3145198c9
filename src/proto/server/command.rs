//! What the core asks of the I/O layer on the slow path, and how the I/O layer answers. The core
//! never binds or closes a socket itself: it queues a [`Command`], the I/O layer drains the queue
//! with [`Core::poll_command`](super::Core::poll_command) after every call into the core, and
//! answers each [`OpenRelay`] with [`Core::relay_opened`](super::Core::relay_opened) and each
//! [`Command::ConnectPeer`] with [`Core::peer_connected`](super::Core::peer_connected).

use std::net::{IpAddr, SocketAddr};

use crate::proto::allocation::RelayId;
use crate::proto::FiveTuple;

/// Names one peer connection of a TCP allocation (RFC 6062 CONNECTION-ID). The low byte is the
/// index of the shard that owns it, so a ConnectionBind accepted by another shard can be sent
/// to the right one without a shared table.
pub type ConnectionId = u32;

/// A slow-path effect for the I/O layer to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Open a relay socket for `id`; answer with `Core::relay_opened`.
    OpenRelay(OpenRelay),
    /// Close relay `id`'s socket: its allocation, or that family's half of it, ended.
    CloseRelay(RelayId),
    /// Close the socket reserved under this token: nobody claimed it in time.
    DropReservation(u64),
    /// Open a TCP connection from the relay's address `from` to `peer` (RFC 6062 §5.2); answer
    /// with `Core::peer_connected`.
    ConnectPeer {
        id: ConnectionId,
        from: SocketAddr,
        peer: SocketAddr,
    },
    /// Close peer connection `id`, whatever its state: still connecting, waiting for its
    /// ConnectionBind, or piped (then its client data connection closes with it).
    ClosePeer(ConnectionId),
    /// The client connection `client` is now the data connection of peer connection `id`: once
    /// the ConnectionBind success just replied is written, bytes pass raw between the two.
    Pipe { id: ConnectionId, client: FiveTuple },
    /// The ConnectionBind that just arrived on `client` names a peer connection of shard
    /// `shard`: move the client connection there, with its unread bytes from that request on.
    HandOver { client: FiveTuple, shard: u8 },
    /// Send `message` to the client of `to`: an answer or indication that is not the reply of
    /// the call that made it (a Connect's answer, a ConnectionAttempt).
    ToClient { to: FiveTuple, message: Box<[u8]> },
}

/// What a relay is: a UDP socket, or a listening TCP socket (RFC 6062).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayTransport {
    Udp,
    Tcp,
}

/// Where a relay socket comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelaySource {
    /// Bind a fresh port of the relay range on `ip`.
    Bind {
        ip: IpAddr,
        /// EVEN-PORT: the port must be even.
        even_port: bool,
        /// EVEN-PORT with the R bit: also reserve the next port and hand back a token for it.
        reserve_next: bool,
    },
    /// Take the socket reserved under this token (any shard may have reserved it). The core has
    /// already checked that the reservation is live.
    Reserved(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenRelay {
    pub id: RelayId,
    pub transport: RelayTransport,
    pub source: RelaySource,
    /// DONT-FRAGMENT in the Allocate: set DF on everything this socket sends.
    pub dont_fragment: bool,
}

/// A relay socket the I/O layer opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenedRelay {
    pub local: SocketAddr,
    /// The token of the neighbour port reserved with it (EVEN-PORT R=1), if one was asked for.
    pub reservation_token: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayOpenError {
    #[error("every relay port is in use")]
    NoPort,
    #[error("unknown or expired reservation token")]
    UnknownToken,
    /// The operating system refused the socket (out of file descriptors, say).
    #[error("relay socket refused: {0}")]
    Os(std::io::ErrorKind),
}

/// Why the relay's TCP connection to a peer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerConnectError {
    /// Refused, unreachable, reset: whatever the kernel said.
    #[error("peer connection failed: {0}")]
    Os(std::io::ErrorKind),
}

//! What the core asks of the I/O layer on the slow path, and how the I/O layer answers. The core
//! never binds or closes a socket itself: it queues a [`Command`], the I/O layer drains the queue
//! with [`Core::poll_command`](super::Core::poll_command) after every call into the core, and
//! answers each [`OpenRelay`] with [`Core::relay_opened`](super::Core::relay_opened).

use std::net::{IpAddr, SocketAddr};

use crate::proto::allocation::RelayId;

/// A slow-path effect for the I/O layer to carry out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Open a relay socket for `id`; answer with `Core::relay_opened`.
    OpenRelay(OpenRelay),
    /// Close relay `id`'s socket: its allocation, or that family's half of it, ended.
    CloseRelay(RelayId),
    /// Close the socket reserved under this token: nobody claimed it in time.
    DropReservation(u64),
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

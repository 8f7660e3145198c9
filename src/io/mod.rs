//! Sockets and threads. Knows nothing of STUN beyond "hand bytes to the core".

pub mod interfaces;
pub mod relay;
pub mod shard;
pub mod tcp;
pub mod tcp_relay;
pub mod udp;

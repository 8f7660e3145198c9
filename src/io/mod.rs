//! Sockets and threads. Knows nothing of STUN beyond "hand bytes to the core".

pub mod connection;
pub mod gate;
pub mod interfaces;
pub mod mailbox;
pub mod proxy;
pub mod random;
pub mod relay;
pub mod send_batch;
pub mod shard;
pub mod stream_stats;
pub mod tcp;
pub mod tcp_relay;
pub mod tls;
pub mod udp;
pub mod usage;

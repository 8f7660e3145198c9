//! turnpike: a STUN/TURN relay daemon.
//!
//! `proto` is the sans-IO protocol core; `io` moves bytes between sockets and the core;
//! `daemon` wires configuration, shards and signals together.

#![warn(unreachable_pub)]

pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod logging;
pub mod proto;

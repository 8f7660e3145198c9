//! What the core counts: per-shard counters the control plane sums and exposes.

use super::auth::AuthReject;

/// Per-shard counters; the control plane sums them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub allocations_created: u64,
    pub allocations_ended: u64,
    pub binding_requests: u64,
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
    pub dropped_no_permission: u64,
    pub dropped_bandwidth: u64,
    pub dropped_malformed: u64,
    pub denied_peers: u64,
    pub quota_rejections: u64,
    /// Refused credentials, indexed by [`AuthFailure`].
    pub auth_failures: [u64; AuthFailure::COUNT],
    pub stale_nonces: u64,
    pub rate_limited: u64,
}

/// Why a request with MESSAGE-INTEGRITY was refused (a bounded metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    WrongPassword,
    UnknownUser,
    Expired,
    ExpiryTooFarAhead,
    MalformedUsername,
    UnsupportedAlgorithm,
    Revoked,
}

impl AuthFailure {
    pub const COUNT: usize = 7;
    pub const ALL: [AuthFailure; Self::COUNT] = [
        AuthFailure::WrongPassword,
        AuthFailure::UnknownUser,
        AuthFailure::Expired,
        AuthFailure::ExpiryTooFarAhead,
        AuthFailure::MalformedUsername,
        AuthFailure::UnsupportedAlgorithm,
        AuthFailure::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::WrongPassword => "wrong_password",
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::Expired => "expired",
            AuthFailure::ExpiryTooFarAhead => "expiry_too_far_ahead",
            AuthFailure::MalformedUsername => "malformed_username",
            AuthFailure::UnsupportedAlgorithm => "unsupported_algorithm",
            AuthFailure::Revoked => "revoked",
        }
    }

    pub(crate) fn from_reject(r: AuthReject) -> Self {
        match r {
            AuthReject::UnknownUser => AuthFailure::UnknownUser,
            AuthReject::Expired => AuthFailure::Expired,
            AuthReject::ExpiryTooFarAhead => AuthFailure::ExpiryTooFarAhead,
            AuthReject::MalformedRestUsername => AuthFailure::MalformedUsername,
            AuthReject::UnsupportedAlgorithm => AuthFailure::UnsupportedAlgorithm,
            AuthReject::Revoked => AuthFailure::Revoked,
        }
    }
}

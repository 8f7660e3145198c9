//! Why a request is refused and why an allocation ends: the core's two outcome vocabularies.

use std::fmt;

/// Most attribute types one 420 response lists; a request naming more is still refused, with the
/// first few named.
pub const MAX_UNKNOWN: usize = 8;

/// Unknown comprehension-required attribute types of one request, in the order they appeared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnknownAttributes {
    types: [u16; MAX_UNKNOWN],
    len: u8,
}

impl UnknownAttributes {
    /// Records `kind` once; types past [`MAX_UNKNOWN`] are not listed.
    pub fn push(&mut self, kind: u16) {
        let n = self.len as usize;
        if n < MAX_UNKNOWN && !self.types[..n].contains(&kind) {
            self.types[n] = kind;
            self.len += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u16] {
        &self.types[..self.len as usize]
    }
}

/// A refused STUN/TURN request. Each variant is one RFC 8489 / RFC 8656 error code; the one exit
/// that turns it into a response adds what that code needs (REALM and NONCE for 401 and 438,
/// UNKNOWN-ATTRIBUTES for 420) and signs it when the request was authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnError {
    /// 400: a required attribute is missing or malformed, or two attributes contradict each other.
    BadRequest,
    /// 401: no credentials, or credentials we do not accept; the answer is a fresh challenge.
    Unauthenticated,
    /// 403: the peer address is one this server never relays to.
    Forbidden,
    /// 420: comprehension-required attributes the method does not understand.
    UnknownAttributes(UnknownAttributes),
    /// 437: no allocation on this 5-tuple, or one exists where Allocate wants to make one.
    AllocationMismatch,
    /// 438: the nonce is not one we issued recently; the answer carries a fresh one.
    StaleNonce,
    /// 440: the requested address family is not served here.
    AddressFamilyNotSupported,
    /// 441: the credentials differ from the ones the allocation was made with.
    WrongCredentials,
    /// 442: a relay transport other than UDP or TCP was requested.
    UnsupportedTransport,
    /// 443: the peer's address family has no relay in this allocation.
    PeerAddressFamilyMismatch,
    /// 446: a Connect names a peer this TCP allocation already has a connection to (RFC 6062 §5.2).
    ConnectionAlreadyExists,
    /// 447: the relay's TCP connection to the peer failed or timed out (RFC 6062 §5.2).
    ConnectionFailure,
    /// 486: the user holds its quota of allocations.
    AllocationQuotaReached,
    /// 508: the server is out of something (relay ports, total allocations, permission or
    /// channel slots) or is draining.
    InsufficientCapacity,
}

impl TurnError {
    pub fn code(&self) -> u16 {
        match self {
            TurnError::BadRequest => 400,
            TurnError::Unauthenticated => 401,
            TurnError::Forbidden => 403,
            TurnError::UnknownAttributes(_) => 420,
            TurnError::AllocationMismatch => 437,
            TurnError::StaleNonce => 438,
            TurnError::AddressFamilyNotSupported => 440,
            TurnError::WrongCredentials => 441,
            TurnError::UnsupportedTransport => 442,
            TurnError::PeerAddressFamilyMismatch => 443,
            TurnError::ConnectionAlreadyExists => 446,
            TurnError::ConnectionFailure => 447,
            TurnError::AllocationQuotaReached => 486,
            TurnError::InsufficientCapacity => 508,
        }
    }

    /// The reason phrase the RFCs suggest for the code.
    pub fn reason(&self) -> &'static str {
        match self {
            TurnError::BadRequest => "Bad Request",
            TurnError::Unauthenticated => "Unauthenticated",
            TurnError::Forbidden => "Forbidden",
            TurnError::UnknownAttributes(_) => "Unknown Attribute",
            TurnError::AllocationMismatch => "Allocation Mismatch",
            TurnError::StaleNonce => "Stale Nonce",
            TurnError::AddressFamilyNotSupported => "Address Family not Supported",
            TurnError::WrongCredentials => "Wrong Credentials",
            TurnError::UnsupportedTransport => "Unsupported Transport Protocol",
            TurnError::PeerAddressFamilyMismatch => "Peer Address Family Mismatch",
            TurnError::ConnectionAlreadyExists => "Connection Already Exists",
            TurnError::ConnectionFailure => "Connection Timeout or Failure",
            TurnError::AllocationQuotaReached => "Allocation Quota Reached",
            TurnError::InsufficientCapacity => "Insufficient Capacity",
        }
    }

    /// 401 and 438 are answered with a challenge: REALM, a fresh NONCE, PASSWORD-ALGORITHMS.
    pub fn is_challenge(&self) -> bool {
        matches!(self, TurnError::Unauthenticated | TurnError::StaleNonce)
    }
}

impl fmt::Display for TurnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.reason())
    }
}

/// Why an allocation (or one family's relay of it) ended; the "allocation ended" log line says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// Its lifetime ran out without a Refresh.
    Expired,
    /// A Refresh with LIFETIME 0.
    DeletedByClient,
    /// An operator ended it through the sessions API.
    Admin,
    /// Its user's credentials were revoked.
    Revoked,
    /// The daemon is shutting down.
    Shutdown,
    /// The client's TCP or TLS connection closed (RFC 8656 §3.1: the allocation goes with it).
    ConnectionClosed,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::DeletedByClient => "deleted by client",
            EndReason::Admin => "ended by admin",
            EndReason::Revoked => "user revoked",
            EndReason::Shutdown => "server shutdown",
            EndReason::ConnectionClosed => "connection closed",
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_attributes_are_listed_once_and_bounded() {
        let mut u = UnknownAttributes::default();
        assert!(u.is_empty());
        for kind in [0x7000, 0x7001, 0x7000] {
            u.push(kind);
        }
        assert_eq!(u.as_slice(), &[0x7000, 0x7001]);
        for kind in 0..20 {
            u.push(0x7100 + kind);
        }
        assert_eq!(u.as_slice().len(), MAX_UNKNOWN);
    }

    #[test]
    fn every_error_names_its_rfc_code() {
        let all = [
            (TurnError::BadRequest, 400),
            (TurnError::Unauthenticated, 401),
            (TurnError::Forbidden, 403),
            (
                TurnError::UnknownAttributes(UnknownAttributes::default()),
                420,
            ),
            (TurnError::AllocationMismatch, 437),
            (TurnError::StaleNonce, 438),
            (TurnError::AddressFamilyNotSupported, 440),
            (TurnError::WrongCredentials, 441),
            (TurnError::UnsupportedTransport, 442),
            (TurnError::PeerAddressFamilyMismatch, 443),
            (TurnError::ConnectionAlreadyExists, 446),
            (TurnError::ConnectionFailure, 447),
            (TurnError::AllocationQuotaReached, 486),
            (TurnError::InsufficientCapacity, 508),
        ];
        for (e, code) in all {
            assert_eq!(e.code(), code);
            assert_eq!(e.is_challenge(), code == 401 || code == 438);
            assert!(!e.reason().is_empty());
        }
    }
}

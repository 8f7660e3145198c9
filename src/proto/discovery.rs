//! RFC 5780 NAT behaviour discovery: the server answers Binding requests on two IP addresses and
//! two ports (IP1:P1, IP1:P2, IP2:P1, IP2:P2), says in OTHER-ADDRESS where the crossing address
//! is, and on a CHANGE-REQUEST answers from another IP and/or port so a client can tell how its
//! NAT maps and filters. This module is the address arithmetic only; the core decides when it
//! applies, the I/O layer binds the listeners and sends from the address the core names.
//!
//! Not supported: PADDING and RESPONSE-PORT (both comprehension-required, so requests carrying
//! them get 420). PADDING would make every answer MTU-sized for a 28-byte request, and
//! RESPONSE-PORT sends the answer to a port the request did not come from: both turn the server
//! into a reflector for spoofed sources, and the mapping and filtering tests need neither.

use std::net::SocketAddr;

/// CHANGE-REQUEST (RFC 5780 §7.2): answer from the other IP, the other port, or both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeRequest {
    pub ip: bool,
    pub port: bool,
}

impl ChangeRequest {
    const CHANGE_IP: u8 = 0x04;
    const CHANGE_PORT: u8 = 0x02;

    /// `None` unless the value is the attribute's 4 bytes; flag bits RFC 5780 does not define
    /// are ignored.
    pub fn decode(value: &[u8]) -> Option<ChangeRequest> {
        let v: [u8; 4] = value.try_into().ok()?;
        Some(ChangeRequest {
            ip: v[3] & Self::CHANGE_IP != 0,
            port: v[3] & Self::CHANGE_PORT != 0,
        })
    }

    pub fn encode(self) -> [u8; 4] {
        let mut v = [0u8; 4];
        if self.ip {
            v[3] |= Self::CHANGE_IP;
        }
        if self.port {
            v[3] |= Self::CHANGE_PORT;
        }
        v
    }

    /// Whether the answer has to leave from somewhere else than the request arrived.
    pub fn changes_anything(self) -> bool {
        self.ip || self.port
    }
}

/// One address family's discovery addresses: the primary UDP listener (IP1:P1) and the alternate
/// IP and port (IP2:P2). The server listens on all four combinations of the two IPs and ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatDiscovery {
    pub primary: SocketAddr,
    pub alternate: SocketAddr,
    /// TCP listeners stand on the four addresses too, so answers over TCP name OTHER-ADDRESS:
    /// mapping discovery works over TCP, while filtering discovery needs answers from another
    /// address, which a connection cannot carry.
    pub tcp: bool,
}

/// Where a discovery answer leaves from and what it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The answer's source address, sent as RESPONSE-ORIGIN.
    pub source: SocketAddr,
    /// OTHER-ADDRESS: the address differing in both IP and port from where the request arrived.
    pub other: SocketAddr,
}

impl NatDiscovery {
    /// The address on the primary or alternate IP and the primary or alternate port.
    pub fn address(&self, alternate_ip: bool, alternate_port: bool) -> SocketAddr {
        let ip = if alternate_ip {
            self.alternate.ip()
        } else {
            self.primary.ip()
        };
        let port = if alternate_port {
            self.alternate.port()
        } else {
            self.primary.port()
        };
        SocketAddr::new(ip, port)
    }

    /// The three listeners discovery needs besides the primary one: IP1:P2, IP2:P1, IP2:P2.
    pub fn extra_listeners(&self) -> [SocketAddr; 3] {
        [
            self.address(false, true),
            self.address(true, false),
            self.address(true, true),
        ]
    }

    /// Whether `local` is one of the four, as (on the alternate IP, on the alternate port).
    pub fn position(&self, local: SocketAddr) -> Option<(bool, bool)> {
        let ip = if local.ip() == self.primary.ip() {
            false
        } else if local.ip() == self.alternate.ip() {
            true
        } else {
            return None;
        };
        let port = if local.port() == self.primary.port() {
            false
        } else if local.port() == self.alternate.port() {
            true
        } else {
            return None;
        };
        Some((ip, port))
    }

    /// The answer to a request that arrived on `local` (RFC 5780 §6.1, Table 1); `None` when
    /// `local` is not one of the four addresses.
    pub fn answer(&self, local: SocketAddr, change: ChangeRequest) -> Option<Origin> {
        let (ip, port) = self.position(local)?;
        Some(Origin {
            source: self.address(ip ^ change.ip, port ^ change.port),
            other: self.address(!ip, !port),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> NatDiscovery {
        NatDiscovery {
            primary: "192.0.2.1:3478".parse().unwrap(),
            alternate: "192.0.2.2:3479".parse().unwrap(),
            tcp: false,
        }
    }

    #[test]
    fn change_request_reads_the_two_flags_and_nothing_else() {
        let flags = |b: u8| ChangeRequest::decode(&[0, 0, 0, b]).unwrap();
        assert_eq!(flags(0), ChangeRequest::default());
        assert_eq!(
            flags(0x04),
            ChangeRequest {
                ip: true,
                port: false
            }
        );
        assert_eq!(
            flags(0x02),
            ChangeRequest {
                ip: false,
                port: true
            }
        );
        assert_eq!(
            flags(0x06),
            ChangeRequest {
                ip: true,
                port: true
            }
        );
        // Undefined bits (and the RFC 3489 bits in other bytes) change nothing.
        assert_eq!(
            ChangeRequest::decode(&[0xff, 0xff, 0xff, 0xf9]).unwrap(),
            ChangeRequest::default()
        );
        assert_eq!(ChangeRequest::decode(&[0, 0, 4]), None);
        assert_eq!(ChangeRequest::decode(&[0, 0, 0, 4, 0]), None);
        for c in [flags(0), flags(2), flags(4), flags(6)] {
            assert_eq!(ChangeRequest::decode(&c.encode()), Some(c));
        }
    }

    #[test]
    fn every_arrival_and_flag_combination_follows_table_1() {
        let p = pair();
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let cases = [
            // (arrived on, change ip, change port, source, other)
            (
                "192.0.2.1:3478",
                false,
                false,
                "192.0.2.1:3478",
                "192.0.2.2:3479",
            ),
            (
                "192.0.2.1:3478",
                true,
                false,
                "192.0.2.2:3478",
                "192.0.2.2:3479",
            ),
            (
                "192.0.2.1:3478",
                false,
                true,
                "192.0.2.1:3479",
                "192.0.2.2:3479",
            ),
            (
                "192.0.2.1:3478",
                true,
                true,
                "192.0.2.2:3479",
                "192.0.2.2:3479",
            ),
            (
                "192.0.2.2:3478",
                false,
                false,
                "192.0.2.2:3478",
                "192.0.2.1:3479",
            ),
            (
                "192.0.2.2:3478",
                true,
                true,
                "192.0.2.1:3479",
                "192.0.2.1:3479",
            ),
            (
                "192.0.2.1:3479",
                true,
                false,
                "192.0.2.2:3479",
                "192.0.2.2:3478",
            ),
            (
                "192.0.2.2:3479",
                false,
                true,
                "192.0.2.2:3478",
                "192.0.2.1:3478",
            ),
            (
                "192.0.2.2:3479",
                true,
                true,
                "192.0.2.1:3478",
                "192.0.2.1:3478",
            ),
        ];
        for (local, ip, port, source, other) in cases {
            assert_eq!(
                p.answer(a(local), ChangeRequest { ip, port }),
                Some(Origin {
                    source: a(source),
                    other: a(other)
                }),
                "{local} ip={ip} port={port}"
            );
        }
        for stranger in ["192.0.2.3:3478", "192.0.2.1:3480", "[2001:db8::1]:3478"] {
            assert_eq!(p.answer(a(stranger), ChangeRequest::default()), None);
        }
        assert_eq!(
            p.extra_listeners(),
            [
                a("192.0.2.1:3479"),
                a("192.0.2.2:3478"),
                a("192.0.2.2:3479")
            ]
        );
    }
}

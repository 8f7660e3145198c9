//! STUN/TURN requests decoded once into one struct per method, each parser beside the list of
//! comprehension-required attributes it understands. Adding an attribute means a constant in the
//! codec and a line in one parser here; the handlers in `server` never read raw attributes.
//!
//! Authentication attributes (USERNAME, REALM, NONCE, the integrity attributes, PASSWORD-ALGORITHM)
//! are read by the credential check, not by these parsers: every authenticated method shares them.

use std::net::SocketAddr;

use super::codec::{attr, decode_xor_address, Message, CHANNEL_MAX, CHANNEL_MIN};
use super::discovery::ChangeRequest;
use super::error::{TurnError, UnknownAttributes};
use super::Transport;

/// Comprehension-required attributes of the long-term credential mechanism (RFC 8489 §9.2).
const CREDENTIALS_KNOWN: &[u16] = &[
    attr::USERNAME,
    attr::MESSAGE_INTEGRITY,
    attr::MESSAGE_INTEGRITY_SHA256,
    attr::REALM,
    attr::NONCE,
    attr::PASSWORD_ALGORITHM,
    // Meaningless in a request, and harmless: some clients echo it.
    attr::ERROR_CODE,
];

/// Every comprehension-required attribute some TURN method understands. A TURN request is refused
/// with 420 only for attributes no method knows: clients are known to carry one method's attribute
/// into another's request (DONT-FRAGMENT or REQUESTED-TRANSPORT in a Refresh, say), which RFC 8656
/// does not forbid and which is no reason to fail a call.
const TURN_KNOWN: &[&[u16]] = &[
    CREDENTIALS_KNOWN,
    Allocate::KNOWN,
    Refresh::KNOWN,
    CreatePermission::KNOWN,
    ChannelBind::KNOWN,
    Send::KNOWN,
    Connect::KNOWN,
    ConnectionBind::KNOWN,
];

/// Unknown comprehension-required attributes of `msg`, judged by `known`. An all-zero
/// CHANGE-REQUEST asks for nothing (RFC 5780 clients probe with it) and is never unknown.
fn unknown_attributes(msg: &Message, known: impl Fn(u16) -> bool) -> UnknownAttributes {
    let mut unknown = UnknownAttributes::default();
    for a in msg.attributes() {
        let ignorable_change_request =
            a.kind == attr::CHANGE_REQUEST && a.value.iter().all(|b| *b == 0);
        if attr::is_comprehension_required(a.kind) && !known(a.kind) && !ignorable_change_request {
            unknown.push(a.kind);
        }
    }
    unknown
}

/// 420 for a TURN request (Allocate, Refresh, CreatePermission, ChannelBind) carrying attributes
/// that no TURN method understands.
pub fn check_turn_attributes(msg: &Message) -> Result<(), TurnError> {
    let unknown = unknown_attributes(msg, |k| TURN_KNOWN.iter().any(|list| list.contains(&k)));
    match unknown.is_empty() {
        true => Ok(()),
        false => Err(TurnError::UnknownAttributes(unknown)),
    }
}

fn u32_value(msg: &Message, kind: u16) -> Option<u32> {
    msg.get(kind)
        .and_then(|a| <[u8; 4]>::try_from(a.value).ok())
        .map(u32::from_be_bytes)
}

/// An address family as REQUESTED-ADDRESS-FAMILY and ADDITIONAL-ADDRESS-FAMILY spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Index into an allocation's `[IPv4 relay, IPv6 relay]`.
    pub fn index(self) -> usize {
        self as usize
    }

    /// `None` for a malformed value, `Some(None)` for a well-formed but unknown family.
    fn decode(value: &[u8]) -> Option<Option<Family>> {
        match value {
            [0x01, _, _, _] => Some(Some(Family::V4)),
            [0x02, _, _, _] => Some(Some(Family::V6)),
            [_, _, _, _] => Some(None),
            _ => None,
        }
    }
}

/// Which relays an Allocate asks for (RFC 8656 §7.2, RFC 6156 dual allocation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Families {
    pub v4: bool,
    pub v6: bool,
}

impl Families {
    pub fn wants(&self, family: Family) -> bool {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }
}

/// EVEN-PORT (RFC 8656 §14.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvenPort {
    /// The R bit: also reserve the next port and hand back a RESERVATION-TOKEN for it.
    pub reserve_next: bool,
}

/// An Allocate request (RFC 8656 §7.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocate {
    /// The relay transport (REQUESTED-TRANSPORT): UDP, or TCP (RFC 6062).
    pub transport: Transport,
    /// LIFETIME as asked; the handler clamps it.
    pub lifetime: Option<u32>,
    pub families: Families,
    pub even_port: Option<EvenPort>,
    /// Claims the port another Allocate reserved with EVEN-PORT R=1.
    pub reservation: Option<u64>,
    /// DONT-FRAGMENT: set DF on everything the relays send.
    pub dont_fragment: bool,
}

impl Allocate {
    pub const KNOWN: &'static [u16] = &[
        attr::REQUESTED_TRANSPORT,
        attr::LIFETIME,
        attr::REQUESTED_ADDRESS_FAMILY,
        attr::EVEN_PORT,
        attr::RESERVATION_TOKEN,
        attr::DONT_FRAGMENT,
    ];

    pub fn parse(msg: &Message) -> Result<Self, TurnError> {
        let transport = match msg.get(attr::REQUESTED_TRANSPORT).map(|a| a.value) {
            Some([17, _, _, _]) => Transport::Udp,
            Some([6, _, _, _]) => Transport::Tcp,
            Some([_, _, _, _]) => return Err(TurnError::UnsupportedTransport),
            _ => return Err(TurnError::BadRequest),
        };
        let requested = msg
            .get(attr::REQUESTED_ADDRESS_FAMILY)
            .map(|a| Family::decode(a.value));
        let additional = msg
            .get(attr::ADDITIONAL_ADDRESS_FAMILY)
            .map(|a| Family::decode(a.value));
        let token = msg.get(attr::RESERVATION_TOKEN).map(|a| a.value);
        let even_port = msg.get(attr::EVEN_PORT).map(|a| a.value);
        // RFC 8656 §7.2: these combinations contradict each other.
        let contradictory = (token.is_some() && (even_port.is_some() || requested.is_some()))
            || (additional.is_some() && (requested.is_some() || token.is_some()));
        // RFC 6062 §5.1: a TCP relay has no port pairs and sends no datagrams to fragment.
        let udp_only =
            even_port.is_some() || token.is_some() || msg.get(attr::DONT_FRAGMENT).is_some();
        if contradictory || (transport == Transport::Tcp && udp_only) {
            return Err(TurnError::BadRequest);
        }
        let reservation = match token.map(<[u8; 8]>::try_from) {
            Some(Ok(t)) => Some(u64::from_be_bytes(t)),
            Some(Err(_)) => return Err(TurnError::BadRequest),
            None => None,
        };
        let even_port = match even_port {
            Some([flags, ..]) => Some(EvenPort {
                reserve_next: flags & 0x80 != 0,
            }),
            Some([]) => return Err(TurnError::BadRequest),
            None => None,
        };
        let (v4, v6) = match (requested, additional) {
            (Some(Some(Some(Family::V4))) | None, None) => (true, false),
            (Some(Some(Some(Family::V6))), None) => (false, true),
            (None, Some(Some(Some(Family::V6)))) => (true, true),
            (Some(_), None) => return Err(TurnError::AddressFamilyNotSupported),
            (_, Some(_)) => return Err(TurnError::BadRequest),
        };
        Ok(Allocate {
            transport,
            lifetime: u32_value(msg, attr::LIFETIME),
            families: Families { v4, v6 },
            even_port,
            reservation,
            dont_fragment: msg.get(attr::DONT_FRAGMENT).is_some(),
        })
    }
}

/// A Refresh request (RFC 8656 §7.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refresh {
    /// LIFETIME as asked; 0 deletes.
    pub lifetime: Option<u32>,
    /// Refresh or delete only this family's relay of a dual allocation (RFC 8656 §7.3).
    pub family: Option<Family>,
}

impl Refresh {
    pub const KNOWN: &'static [u16] = &[attr::LIFETIME, attr::REQUESTED_ADDRESS_FAMILY];

    pub fn parse(msg: &Message) -> Result<Self, TurnError> {
        let family = match msg
            .get(attr::REQUESTED_ADDRESS_FAMILY)
            .map(|a| Family::decode(a.value))
        {
            Some(Some(Some(f))) => Some(f),
            Some(_) => return Err(TurnError::AddressFamilyNotSupported),
            None => None,
        };
        Ok(Refresh {
            lifetime: u32_value(msg, attr::LIFETIME),
            family,
        })
    }
}

/// Most peers one CreatePermission may name; more is refused with 508 rather than truncated.
pub const MAX_PERMISSION_PEERS: usize = 32;

/// A CreatePermission request (RFC 8656 §9): one or more peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreatePermission {
    peers: [SocketAddr; MAX_PERMISSION_PEERS],
    len: usize,
}

impl CreatePermission {
    pub const KNOWN: &'static [u16] = &[attr::XOR_PEER_ADDRESS];

    pub fn parse(msg: &Message) -> Result<Self, TurnError> {
        let txid = msg.transaction_id();
        let mut out = CreatePermission {
            peers: [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_PERMISSION_PEERS],
            len: 0,
        };
        for a in msg
            .attributes()
            .filter(|a| a.kind == attr::XOR_PEER_ADDRESS)
        {
            let peer = decode_xor_address(a.value, &txid).ok_or(TurnError::BadRequest)?;
            if out.len == MAX_PERMISSION_PEERS {
                return Err(TurnError::InsufficientCapacity);
            }
            out.peers[out.len] = peer;
            out.len += 1;
        }
        if out.len == 0 {
            return Err(TurnError::BadRequest);
        }
        Ok(out)
    }

    pub fn peers(&self) -> &[SocketAddr] {
        &self.peers[..self.len]
    }
}

/// A ChannelBind request (RFC 8656 §11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelBind {
    /// In `CHANNEL_MIN..=CHANNEL_MAX`.
    pub number: u16,
    pub peer: SocketAddr,
}

impl ChannelBind {
    pub const KNOWN: &'static [u16] = &[attr::CHANNEL_NUMBER, attr::XOR_PEER_ADDRESS];

    pub fn parse(msg: &Message) -> Result<Self, TurnError> {
        let number = msg
            .get(attr::CHANNEL_NUMBER)
            .and_then(|a| <[u8; 4]>::try_from(a.value).ok())
            .map(|v| u16::from_be_bytes([v[0], v[1]]))
            .filter(|n| (CHANNEL_MIN..=CHANNEL_MAX).contains(n));
        let peer = msg
            .get(attr::XOR_PEER_ADDRESS)
            .and_then(|a| decode_xor_address(a.value, &msg.transaction_id()));
        match (number, peer) {
            (Some(number), Some(peer)) => Ok(ChannelBind { number, peer }),
            _ => Err(TurnError::BadRequest),
        }
    }
}

/// A Connect request (RFC 6062 §4.3): open a TCP connection from the relay to this peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    pub peer: SocketAddr,
}

impl Connect {
    pub const KNOWN: &'static [u16] = &[attr::XOR_PEER_ADDRESS];

    pub fn parse(msg: &Message) -> Result<Self, TurnError> {
        msg.get(attr::XOR_PEER_ADDRESS)
            .and_then(|a| decode_xor_address(a.value, &msg.transaction_id()))
            .map(|peer| Connect { peer })
            .ok_or(TurnError::BadRequest)
    }
}

/// A ConnectionBind request (RFC 6062 §4.4): makes the connection it arrives on the data
/// connection of one peer connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionBind {
    pub id: u32,
}

impl ConnectionBind {
    pub const KNOWN: &'static [u16] = &[attr::CONNECTION_ID];

    pub fn parse(msg: &Message) -> Result<Self, TurnError> {
        msg.get(attr::CONNECTION_ID)
            .and_then(|a| <[u8; 4]>::try_from(a.value).ok())
            .map(|v| ConnectionBind {
                id: u32::from_be_bytes(v),
            })
            .ok_or(TurnError::BadRequest)
    }
}

/// A Send indication (RFC 8656 §11.1). Indications are never answered: one that does not decode
/// is discarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Send {
    pub peer: SocketAddr,
    /// Where the DATA value sits in the datagram, so the payload is relayed without a copy.
    pub data_start: usize,
    pub data_end: usize,
    /// DONT-FRAGMENT: set DF on this datagram.
    pub dont_fragment: bool,
}

impl Send {
    pub const KNOWN: &'static [u16] = &[attr::XOR_PEER_ADDRESS, attr::DATA, attr::DONT_FRAGMENT];

    /// `None` when the indication must be discarded: an attribute missing or malformed, or a
    /// comprehension-required one we do not understand (an indication cannot get a 420, RFC 8489
    /// §6.3.2).
    pub fn parse(msg: &Message) -> Option<Self> {
        if !unknown_attributes(msg, |k| Self::KNOWN.contains(&k)).is_empty() {
            return None;
        }
        let peer = decode_xor_address(
            msg.get(attr::XOR_PEER_ADDRESS)?.value,
            &msg.transaction_id(),
        )?;
        let data = msg.get(attr::DATA)?;
        Some(Send {
            peer,
            data_start: data.offset,
            data_end: data.offset + data.value.len(),
            dont_fragment: msg.get(attr::DONT_FRAGMENT).is_some(),
        })
    }
}

/// A Binding request (RFC 8489 §3, RFC 5780 §6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// CHANGE-REQUEST's flags; none when the attribute is absent.
    pub change: ChangeRequest,
}

impl Binding {
    /// Binding requests may carry ICE attributes that change nothing in the answer. PADDING and
    /// RESPONSE-PORT are not here: RFC 5780 obliges a server that understands them to pad the
    /// answer or send it elsewhere, which we refuse to do (see `discovery`), so they get 420.
    pub const KNOWN: &'static [u16] = &[
        attr::USERNAME,
        attr::MESSAGE_INTEGRITY,
        attr::MESSAGE_INTEGRITY_SHA256,
        attr::REALM,
        attr::NONCE,
        attr::PRIORITY,
        attr::USE_CANDIDATE,
    ];

    /// `change_supported`: the request arrived where alternate addresses exist. Elsewhere a
    /// CHANGE-REQUEST asking for a change is unknown, 420 (RFC 5780 §6.1).
    pub fn parse(msg: &Message, change_supported: bool) -> Result<Self, TurnError> {
        let unknown = unknown_attributes(msg, |k| {
            Self::KNOWN.contains(&k) || (change_supported && k == attr::CHANGE_REQUEST)
        });
        if !unknown.is_empty() {
            return Err(TurnError::UnknownAttributes(unknown));
        }
        let change = match msg.get(attr::CHANGE_REQUEST) {
            Some(a) if change_supported => {
                ChangeRequest::decode(a.value).ok_or(TurnError::BadRequest)?
            }
            // Absent, or an all-zero one that asks for nothing where nothing could change.
            _ => ChangeRequest::default(),
        };
        Ok(Binding { change })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::codec::{method, Class, MessageWriter};

    fn message(m: u16, fill: impl FnOnce(&mut MessageWriter)) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut w = MessageWriter::new(&mut buf, m, Class::Request, [7; 12]);
        fill(&mut w);
        buf
    }

    fn allocate(fill: impl FnOnce(&mut MessageWriter)) -> Result<Allocate, TurnError> {
        let buf = message(method::ALLOCATE, fill);
        Allocate::parse(&Message::parse(&buf).unwrap())
    }

    #[test]
    fn allocate_decodes_every_attribute_it_knows() {
        let a = allocate(|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .u32_attr(attr::LIFETIME, 1200)
                .attr(attr::EVEN_PORT, &[0x80])
                .attr(attr::DONT_FRAGMENT, &[]);
        })
        .unwrap();
        assert_eq!(
            a,
            Allocate {
                transport: Transport::Udp,
                lifetime: Some(1200),
                families: Families {
                    v4: true,
                    v6: false
                },
                even_port: Some(EvenPort { reserve_next: true }),
                reservation: None,
                dont_fragment: true,
            }
        );
        let dual = allocate(|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        })
        .unwrap();
        assert_eq!(dual.families, Families { v4: true, v6: true });
        let token = allocate(|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::RESERVATION_TOKEN, &5u64.to_be_bytes());
        })
        .unwrap();
        assert_eq!(token.reservation, Some(5));
    }

    #[test]
    fn allocate_refusals_carry_their_rfc_codes() {
        let udp = |w: &mut MessageWriter| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        };
        assert_eq!(allocate(|_| {}), Err(TurnError::BadRequest));
        assert_eq!(
            allocate(|w| {
                w.attr(attr::REQUESTED_TRANSPORT, &[132, 0, 0, 0]);
            }),
            Err(TurnError::UnsupportedTransport)
        );
        let tcp = |w: &mut MessageWriter| {
            w.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
        };
        assert_eq!(allocate(tcp).map(|a| a.transport), Ok(Transport::Tcp));
        // RFC 6062 §5.1: the UDP-only attributes make a TCP Allocate a bad request.
        for (kind, value) in [
            (attr::EVEN_PORT, &[0u8][..]),
            (attr::RESERVATION_TOKEN, &[1; 8][..]),
            (attr::DONT_FRAGMENT, &[][..]),
        ] {
            assert_eq!(
                allocate(|w| {
                    tcp(w);
                    w.attr(kind, value);
                }),
                Err(TurnError::BadRequest),
                "attribute {kind:#06x}"
            );
        }
        assert_eq!(
            allocate(|w| {
                udp(w);
                w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[3, 0, 0, 0]);
            }),
            Err(TurnError::AddressFamilyNotSupported)
        );
        assert_eq!(
            allocate(|w| {
                udp(w);
                w.attr(attr::RESERVATION_TOKEN, &[1; 8])
                    .attr(attr::EVEN_PORT, &[0]);
            }),
            Err(TurnError::BadRequest)
        );
        assert_eq!(
            allocate(|w| {
                udp(w);
                w.attr(attr::RESERVATION_TOKEN, &[1; 7]);
            }),
            Err(TurnError::BadRequest)
        );
        assert_eq!(
            allocate(|w| {
                udp(w);
                w.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[1, 0, 0, 0]);
            }),
            Err(TurnError::BadRequest)
        );
    }

    #[test]
    fn refresh_reads_its_family() {
        let parse = |fill: &dyn Fn(&mut MessageWriter)| {
            let buf = message(method::REFRESH, |w| fill(w));
            Refresh::parse(&Message::parse(&buf).unwrap())
        };
        assert_eq!(
            parse(&|w| {
                w.u32_attr(attr::LIFETIME, 0)
                    .attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
            }),
            Ok(Refresh {
                lifetime: Some(0),
                family: Some(Family::V6)
            })
        );
        assert_eq!(
            parse(&|w| {
                w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[9, 0, 0, 0]);
            }),
            Err(TurnError::AddressFamilyNotSupported)
        );
    }

    #[test]
    fn create_permission_needs_a_peer_and_caps_the_count() {
        let parse = |n: usize| {
            let buf = message(method::CREATE_PERMISSION, |w| {
                for i in 0..n {
                    w.xor_address(attr::XOR_PEER_ADDRESS, ([198, 51, 100, i as u8], 1).into());
                }
            });
            CreatePermission::parse(&Message::parse(&buf).unwrap()).map(|p| p.peers().len())
        };
        assert_eq!(parse(0), Err(TurnError::BadRequest));
        assert_eq!(parse(3), Ok(3));
        assert_eq!(parse(MAX_PERMISSION_PEERS), Ok(MAX_PERMISSION_PEERS));
        assert_eq!(
            parse(MAX_PERMISSION_PEERS + 1),
            Err(TurnError::InsufficientCapacity)
        );
    }

    #[test]
    fn channel_bind_numbers_outside_the_range_are_bad_requests() {
        let parse = |number: u16| {
            let buf = message(method::CHANNEL_BIND, |w| {
                w.attr(
                    attr::CHANNEL_NUMBER,
                    &[(number >> 8) as u8, number as u8, 0, 0],
                )
                .xor_address(attr::XOR_PEER_ADDRESS, ([198, 51, 100, 1], 9).into());
            });
            ChannelBind::parse(&Message::parse(&buf).unwrap())
        };
        assert_eq!(parse(CHANNEL_MIN).map(|c| c.number), Ok(CHANNEL_MIN));
        assert_eq!(parse(CHANNEL_MAX).map(|c| c.number), Ok(CHANNEL_MAX));
        assert_eq!(parse(CHANNEL_MIN - 1), Err(TurnError::BadRequest));
        assert_eq!(parse(CHANNEL_MAX + 1), Err(TurnError::BadRequest));
    }

    #[test]
    fn connect_and_connection_bind_need_their_attribute() {
        let buf = message(method::CONNECT, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, ([198, 51, 100, 1], 9).into());
        });
        assert_eq!(
            Connect::parse(&Message::parse(&buf).unwrap()),
            Ok(Connect {
                peer: ([198, 51, 100, 1], 9).into()
            })
        );
        let buf = message(method::CONNECT, |_| {});
        assert_eq!(
            Connect::parse(&Message::parse(&buf).unwrap()),
            Err(TurnError::BadRequest)
        );
        let bind = |value: &[u8]| {
            let buf = message(method::CONNECTION_BIND, |w| {
                w.attr(attr::CONNECTION_ID, value);
            });
            ConnectionBind::parse(&Message::parse(&buf).unwrap())
        };
        assert_eq!(bind(&[1, 2, 3, 4]), Ok(ConnectionBind { id: 0x0102_0304 }));
        assert_eq!(bind(&[1, 2, 3]), Err(TurnError::BadRequest));
    }

    #[test]
    fn send_reads_dont_fragment_and_refuses_unknown_required_attributes() {
        let indication = |extra: Option<u16>| {
            let mut buf = Vec::new();
            let mut w = MessageWriter::new(&mut buf, method::SEND, Class::Indication, [3; 12]);
            w.xor_address(attr::XOR_PEER_ADDRESS, ([198, 51, 100, 1], 9).into())
                .attr(attr::DATA, b"hello")
                .attr(attr::DONT_FRAGMENT, &[]);
            if let Some(kind) = extra {
                w.attr(kind, &[0; 4]);
            }
            buf
        };
        let buf = indication(None);
        let s = Send::parse(&Message::parse(&buf).unwrap()).unwrap();
        assert!(s.dont_fragment);
        assert_eq!(&buf[s.data_start..s.data_end], b"hello");
        let buf = indication(Some(0x7777));
        assert_eq!(Send::parse(&Message::parse(&buf).unwrap()), None);
        // Comprehension-optional attributes are no reason to discard.
        let buf = indication(Some(0x8777));
        assert!(Send::parse(&Message::parse(&buf).unwrap()).is_some());
    }

    #[test]
    fn turn_requests_are_refused_only_for_attributes_no_method_knows() {
        let buf = message(method::REFRESH, |w| {
            w.attr(attr::DONT_FRAGMENT, &[])
                .attr(attr::CHANGE_REQUEST, &[0; 4]);
        });
        assert_eq!(
            check_turn_attributes(&Message::parse(&buf).unwrap()),
            Ok(())
        );
        let buf = message(method::REFRESH, |w| {
            w.attr(0x0031, &[1]).attr(0x0031, &[2]).attr(0x0032, &[]);
        });
        match check_turn_attributes(&Message::parse(&buf).unwrap()) {
            Err(TurnError::UnknownAttributes(u)) => assert_eq!(u.as_slice(), &[0x0031, 0x0032]),
            other => panic!("expected 420, got {other:?}"),
        }
    }
}

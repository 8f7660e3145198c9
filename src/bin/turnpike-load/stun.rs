//! TURN requests the generator sends and what it reads from the answers, built with the
//! library's own codec; and the payload every relayed message carries.

use std::net::SocketAddr;

use turnpike::proto::auth::{long_term_key, rest_password, LongTermKey, PasswordAlgorithm};
use turnpike::proto::codec::{attr, decode_xor_address, method, Class, Message, MessageWriter};

/// How allocations authenticate.
#[derive(Clone, Debug)]
pub enum Credential {
    /// No credential: fine for Binding; an Allocate then fails with the server's 401.
    None,
    Static {
        user: String,
        password: String,
    },
    /// TURN REST: each allocation mints `EXPIRY:USER-N`, so per-user quotas do not bite.
    Rest {
        user: String,
        secret: Vec<u8>,
    },
}

/// Usernames minted from a REST secret stay valid this long.
const REST_TTL_SECS: u64 = 3600;

impl Credential {
    /// (username, password) for allocation number `n`.
    pub fn for_allocation(&self, n: usize, unix_now: u64) -> Option<(String, String)> {
        match self {
            Credential::None => None,
            Credential::Static { user, password } => Some((user.clone(), password.clone())),
            Credential::Rest { user, secret } => {
                let name = format!("{}:{user}-{n}", unix_now + REST_TTL_SECS);
                let password = rest_password(secret, &name);
                Some((name, password))
            }
        }
    }
}

pub fn key(user: &str, realm: &str, password: &str) -> LongTermKey {
    long_term_key(PasswordAlgorithm::Md5, user, realm, password)
}

/// What an authenticated request needs besides its own attributes.
pub struct Auth<'a> {
    pub user: &'a str,
    pub realm: &'a str,
    pub nonce: &'a [u8],
    pub key: &'a LongTermKey,
}

/// The requests of an allocation's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Allocate,
    CreatePermission(SocketAddr),
    ChannelBind(SocketAddr, u16),
    Refresh(u32),
    Binding,
}

impl Request {
    fn method(self) -> u16 {
        match self {
            Request::Allocate => method::ALLOCATE,
            Request::CreatePermission(_) => method::CREATE_PERMISSION,
            Request::ChannelBind(..) => method::CHANNEL_BIND,
            Request::Refresh(_) => method::REFRESH,
            Request::Binding => method::BINDING,
        }
    }
}

/// Writes `req` into `buf`; signed when `auth` is given (the 401 round goes without).
pub fn write_request(buf: &mut Vec<u8>, req: Request, txid: [u8; 12], auth: Option<&Auth>) {
    let mut w = MessageWriter::new(buf, req.method(), Class::Request, txid);
    match req {
        // REQUESTED-TRANSPORT: UDP (17), RFC 8656 §14.7.
        Request::Allocate => {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        }
        Request::CreatePermission(peer) => {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        }
        Request::ChannelBind(peer, channel) => {
            let c = channel.to_be_bytes();
            w.attr(attr::CHANNEL_NUMBER, &[c[0], c[1], 0, 0])
                .xor_address(attr::XOR_PEER_ADDRESS, peer);
        }
        Request::Refresh(lifetime) => {
            w.u32_attr(attr::LIFETIME, lifetime);
        }
        Request::Binding => {}
    }
    if let Some(a) = auth {
        w.attr(attr::USERNAME, a.user.as_bytes())
            .attr(attr::REALM, a.realm.as_bytes())
            .attr(attr::NONCE, a.nonce)
            .integrity(a.key.as_bytes());
    }
}

/// The parts of a response the generator acts on.
#[derive(Debug, Default)]
pub struct Answer {
    pub txid: [u8; 12],
    pub success: bool,
    /// ERROR-CODE as a number (401, 438, ...), 0 when absent.
    pub code: u16,
    pub realm: Option<String>,
    pub nonce: Option<Vec<u8>>,
    pub relayed: Option<SocketAddr>,
}

/// A success or error response to one of our requests; None for anything else.
pub fn read_answer(dgram: &[u8]) -> Option<Answer> {
    let msg = Message::parse(dgram).ok()?;
    let success = match msg.class {
        Class::Success => true,
        Class::Error => false,
        _ => return None,
    };
    let txid = msg.transaction_id();
    let mut a = Answer {
        txid,
        success,
        ..Answer::default()
    };
    for at in msg.attributes() {
        match at.kind {
            attr::ERROR_CODE if at.value.len() >= 4 => {
                a.code = u16::from(at.value[2] & 0x7) * 100 + u16::from(at.value[3]);
            }
            attr::REALM => a.realm = Some(String::from_utf8_lossy(at.value).into_owned()),
            attr::NONCE => a.nonce = Some(at.value.to_vec()),
            attr::XOR_RELAYED_ADDRESS => a.relayed = decode_xor_address(at.value, &txid),
            _ => {}
        }
    }
    Some(a)
}

/// Bytes a payload starts with: run tag, client index, sequence number, send time, hold time.
pub const PAYLOAD_HEADER: usize = 32;
/// Where the hold time sits in a payload.
pub const HOLD_AT: usize = 24;

/// What the generator writes at the start of every relayed payload, so an echo can be tied to
/// its send: a run tag (strangers and stale packets are not counted), the sending client, a
/// sequence number unique in the run (duplicates count once), the send time (CLOCK_REALTIME
/// ns, the clock of the kernel's receive stamps) and how long our own echo held the message
/// before sending it back (subtracted from the RTT: a batching echo does not inflate it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub tag: u32,
    pub client: u32,
    pub seq: u64,
    pub sent_ns: u64,
    pub hold_ns: u64,
}

/// Adds `ns` to the hold time of one of our payloads (`tag` checked) being echoed.
pub fn add_hold(payload: &mut [u8], tag: u32, ns: u64) {
    if payload.len() < PAYLOAD_HEADER || payload[0..4] != tag.to_be_bytes() {
        return;
    }
    let at = &mut payload[HOLD_AT..HOLD_AT + 8];
    let held = u64::from_be_bytes((&*at).try_into().expect("8 bytes"));
    at.copy_from_slice(&held.saturating_add(ns).to_be_bytes());
}

impl Stamp {
    pub fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.tag.to_be_bytes());
        out[4..8].copy_from_slice(&self.client.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..24].copy_from_slice(&self.sent_ns.to_be_bytes());
        out[24..32].copy_from_slice(&self.hold_ns.to_be_bytes());
    }

    pub fn read(payload: &[u8]) -> Option<Stamp> {
        if payload.len() < PAYLOAD_HEADER {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes(payload[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_be_bytes(payload[i..i + 8].try_into().expect("8"));
        Some(Stamp {
            tag: u32_at(0),
            client: u32_at(4),
            seq: u64_at(8),
            sent_ns: u64_at(16),
            hold_ns: u64_at(24),
        })
    }
}

/// The application data inside a datagram from the server: a ChannelData message's payload,
/// or a Data indication's DATA attribute.
pub fn relayed_payload(dgram: &[u8]) -> Option<&[u8]> {
    if let Some(cd) = turnpike::proto::codec::parse_channel_data(dgram) {
        return Some(&dgram[cd.start..cd.end]);
    }
    let msg = Message::parse(dgram).ok()?;
    if msg.method != method::DATA || msg.class != Class::Indication {
        return None;
    }
    msg.get(attr::DATA).map(|a| a.value)
}

/// A Send indication to `peer` with a `size`-byte payload area (zeros): a template whose
/// payload bytes are overwritten per message. Returns the payload's offset in the message.
pub fn send_indication_template(buf: &mut Vec<u8>, peer: SocketAddr, size: usize) -> usize {
    let payload = vec![0u8; size];
    MessageWriter::new(buf, method::SEND, Class::Indication, [7u8; 12])
        .xor_address(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, &payload);
    let padding = (4 - size % 4) % 4;
    buf.len() - padding - size
}

/// A ChannelData template: 4-byte header, then `size` bytes (UDP needs no padding).
pub fn channel_data_template(buf: &mut Vec<u8>, channel: u16, size: usize) -> usize {
    buf.clear();
    buf.extend_from_slice(&channel.to_be_bytes());
    buf.extend_from_slice(&(size as u16).to_be_bytes());
    buf.resize(4 + size, 0);
    4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips() {
        let s = Stamp {
            tag: 0xdead_beef,
            client: 7,
            seq: 1 << 40,
            sent_ns: 123_456_789,
            hold_ns: 5,
        };
        let mut b = [0u8; 160];
        s.write(&mut b);
        assert_eq!(Stamp::read(&b), Some(s));
        assert_eq!(Stamp::read(&b[..31]), None);
        add_hold(&mut b, 0xdead_beef, 10);
        add_hold(&mut b, 0x1234_5678, 1000); // not ours: untouched
        assert_eq!(Stamp::read(&b).unwrap().hold_ns, 15);
    }

    #[test]
    fn send_indication_payload_is_where_the_template_says() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut buf = Vec::new();
        let at = send_indication_template(&mut buf, peer, 161);
        buf[at] = 0xAB;
        buf[at + 160] = 0xCD;
        let msg = Message::parse(&buf).unwrap();
        let data = msg.get(attr::DATA).unwrap().value;
        assert_eq!((data.len(), data[0], data[160]), (161, 0xAB, 0xCD));
    }

    #[test]
    fn channel_data_payload_is_read_back() {
        let mut buf = Vec::new();
        let at = channel_data_template(&mut buf, 0x4000, 30);
        buf[at] = 9;
        let p = relayed_payload(&buf).unwrap();
        assert_eq!((p.len(), p[0]), (30, 9));
    }

    #[test]
    fn error_answers_carry_code_realm_and_nonce() {
        let mut buf = Vec::new();
        MessageWriter::new(&mut buf, method::ALLOCATE, Class::Error, [1; 12])
            .error_code(401, "Unauthorized")
            .attr(attr::REALM, b"r")
            .attr(attr::NONCE, b"n");
        let a = read_answer(&buf).unwrap();
        assert_eq!((a.success, a.code), (false, 401));
        assert_eq!(
            (a.realm.as_deref(), a.nonce.as_deref()),
            (Some("r"), Some(&b"n"[..]))
        );
    }

    #[test]
    fn signed_requests_verify_with_the_long_term_key() {
        let k = key("u", "r", "p");
        let mut buf = Vec::new();
        let auth = Auth {
            user: "u",
            realm: "r",
            nonce: b"nonce",
            key: &k,
        };
        write_request(&mut buf, Request::Refresh(0), [3; 12], Some(&auth));
        let msg = Message::parse(&buf).unwrap();
        assert!(msg.verify_integrity(k.as_bytes()));
        assert_eq!(msg.method, method::REFRESH);
    }
}

//! The client side of the protocol, sans I/O: the requests of an allocation's life written
//! with the library's own codec, and what a client reads from the answers. Used by the load
//! generator (`turnpike-load`) and `turnpike probe`; the transport is theirs.

use std::net::SocketAddr;

use crate::proto::auth::{long_term_key, rest_password, LongTermKey, PasswordAlgorithm};
use crate::proto::codec::{attr, decode_xor_address, method, Class, Message, MessageWriter};

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
    /// XOR-MAPPED-ADDRESS: where the server sees the client.
    pub mapped: Option<SocketAddr>,
    /// LIFETIME, seconds.
    pub lifetime: Option<u32>,
    /// SOFTWARE, when the server sends one.
    pub software: Option<String>,
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
            attr::XOR_MAPPED_ADDRESS => a.mapped = decode_xor_address(at.value, &txid),
            attr::LIFETIME if at.value.len() == 4 => {
                a.lifetime = Some(u32::from_be_bytes(at.value.try_into().expect("4 bytes")));
            }
            attr::SOFTWARE => a.software = Some(String::from_utf8_lossy(at.value).into_owned()),
            _ => {}
        }
    }
    Some(a)
}

/// The application data inside a datagram from the server: a ChannelData message's payload,
/// or a Data indication's DATA attribute.
pub fn relayed_payload(dgram: &[u8]) -> Option<&[u8]> {
    if let Some(cd) = crate::proto::codec::parse_channel_data(dgram) {
        return Some(&dgram[cd.start..cd.end]);
    }
    let msg = Message::parse(dgram).ok()?;
    if msg.method != method::DATA || msg.class != Class::Indication {
        return None;
    }
    msg.get(attr::DATA).map(|a| a.value)
}

#[cfg(test)]
mod tests {
    use super::*;

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

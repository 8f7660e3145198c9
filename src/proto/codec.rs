//! STUN wire format (RFC 8489) and the TURN framing that rides beside it (RFC 8656 ChannelData).
//!
//! Parsing borrows the datagram and never allocates: [`Message::parse`] validates the header and
//! every attribute length once, and remembers where the integrity and fingerprint attributes sit,
//! so later look-ups are plain walks over a few dozen bytes. Writing goes into a caller-owned
//! `Vec<u8>` that is cleared and reused, so steady-state responses do not allocate either.
//!
//! We write our own codec instead of using a general STUN crate because the relay needs two things
//! those crates do not give together: zero-copy access to DATA and ChannelData payloads inside the
//! receive buffer, and headers written *in front of* a payload that is already in place.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ring::hmac;

use super::mac;

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
pub const HEADER_LEN: usize = 20;
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// Methods (RFC 8489 §18.2, RFC 8656 §17).
pub mod method {
    pub const BINDING: u16 = 0x001;
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;
    /// RFC 6062 §6.1: TCP relays.
    pub const CONNECT: u16 = 0x00A;
    pub const CONNECTION_BIND: u16 = 0x00B;
    pub const CONNECTION_ATTEMPT: u16 = 0x00C;
}

/// Attribute types we understand (RFC 8489 §18.3, RFC 8656 §18, RFC 5780, RFC 6156, RFC 6062).
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const CHANGE_REQUEST: u16 = 0x0003;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    /// RFC 5780; neither is honoured (see `proto::discovery`), so both get 420.
    pub const PADDING: u16 = 0x0026;
    pub const RESPONSE_PORT: u16 = 0x0027;
    /// RFC 6062 §6.2: names one peer connection of a TCP allocation.
    pub const CONNECTION_ID: u16 = 0x002A;
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    pub const ICMP: u16 = 0x8004;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    pub const OTHER_ADDRESS: u16 = 0x802C;

    /// Attributes 0x0000-0x7FFF must be understood or the request is refused with 420.
    pub fn is_comprehension_required(t: u16) -> bool {
        t < 0x8000
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }
}

/// Packs method and class into the 14-bit interleaved message type (RFC 8489 §5).
fn message_type(method: u16, class: Class) -> u16 {
    let c = class.bits();
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 0b01) << 4)
        | ((c & 0b10) << 7)
}

fn split_message_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = match ((t >> 4) & 0b01) | ((t >> 7) & 0b10) {
        0b00 => Class::Request,
        0b01 => Class::Indication,
        0b10 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("shorter than a STUN header")]
    TooShort,
    #[error("not a STUN message")]
    NotStun,
    #[error("length field does not match the datagram")]
    BadLength,
    #[error("attribute runs past the end of the message")]
    BadAttribute,
    #[error("FINGERPRINT is not the last attribute")]
    FingerprintNotLast,
    #[error("FINGERPRINT does not match")]
    BadFingerprint,
}

/// A parsed STUN message borrowing its datagram.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    buf: &'a [u8],
    pub method: u16,
    pub class: Class,
    /// Offset of the MESSAGE-INTEGRITY attribute header, if present.
    integrity_at: Option<usize>,
    integrity_sha256_at: Option<usize>,
    has_fingerprint: bool,
}

/// One attribute: type and value (padding excluded).
#[derive(Debug, Clone, Copy)]
pub struct Attribute<'a> {
    pub kind: u16,
    pub value: &'a [u8],
    /// Offset of the value inside the message buffer, for zero-copy payload ranges.
    pub offset: usize,
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

const fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// True when the datagram looks like STUN (two zero bits and the magic cookie), not ChannelData.
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN && buf[0] & 0xC0 == 0 && read_u32(buf, 4) == MAGIC_COOKIE
}

impl<'a> Message<'a> {
    /// Validates the header, every attribute length, the position rules for MESSAGE-INTEGRITY(-SHA256)
    /// and FINGERPRINT, and the FINGERPRINT value itself. Trailing bytes after the STUN message are refused.
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, ParseError> {
        if buf.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        if buf[0] & 0xC0 != 0 || read_u32(buf, 4) != MAGIC_COOKIE {
            return Err(ParseError::NotStun);
        }
        let body_len = read_u16(buf, 2) as usize;
        if body_len % 4 != 0 || HEADER_LEN + body_len != buf.len() {
            return Err(ParseError::BadLength);
        }
        let (method, class) = split_message_type(read_u16(buf, 0));
        let mut msg = Message {
            buf,
            method,
            class,
            integrity_at: None,
            integrity_sha256_at: None,
            has_fingerprint: false,
        };
        let mut at = HEADER_LEN;
        while at < buf.len() {
            if at + 4 > buf.len() {
                return Err(ParseError::BadAttribute);
            }
            let kind = read_u16(buf, at);
            let len = read_u16(buf, at + 2) as usize;
            let next = at + 4 + padded(len);
            if next > buf.len() {
                return Err(ParseError::BadAttribute);
            }
            if msg.has_fingerprint {
                return Err(ParseError::FingerprintNotLast);
            }
            // RFC 8489 §14.5, §14.6: after MESSAGE-INTEGRITY only MESSAGE-INTEGRITY-SHA256 and
            // FINGERPRINT count, after MESSAGE-INTEGRITY-SHA256 only FINGERPRINT; anything else
            // there is ignored (a client may append SOFTWARE), never a reason to drop.
            let after_sha256 = msg.integrity_sha256_at.is_some();
            match kind {
                attr::MESSAGE_INTEGRITY if msg.integrity_at.is_none() && !after_sha256 => {
                    if len != 20 {
                        return Err(ParseError::BadAttribute);
                    }
                    msg.integrity_at = Some(at);
                }
                attr::MESSAGE_INTEGRITY_SHA256 if !after_sha256 => {
                    // 16..=32 bytes, a multiple of 4.
                    if !(16..=32).contains(&len) || len % 4 != 0 {
                        return Err(ParseError::BadAttribute);
                    }
                    msg.integrity_sha256_at = Some(at);
                }
                attr::FINGERPRINT => {
                    if len != 4 {
                        return Err(ParseError::BadAttribute);
                    }
                    let expected = crc32fast::hash(&buf[..at]) ^ FINGERPRINT_XOR;
                    if read_u32(buf, at + 4) != expected {
                        return Err(ParseError::BadFingerprint);
                    }
                    msg.has_fingerprint = true;
                }
                _ => {}
            }
            at = next;
        }
        Ok(msg)
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }

    pub fn transaction_id(&self) -> [u8; 12] {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.buf[8..20]);
        t
    }

    pub fn has_fingerprint(&self) -> bool {
        self.has_fingerprint
    }

    pub fn has_integrity(&self) -> bool {
        self.integrity_at.is_some()
    }

    pub fn has_integrity_sha256(&self) -> bool {
        self.integrity_sha256_at.is_some()
    }

    /// Attributes protected by integrity: everything before the first integrity attribute.
    pub fn attributes(&self) -> Attributes<'a> {
        let end = self
            .integrity_at
            .or(self.integrity_sha256_at)
            .unwrap_or(self.buf.len());
        Attributes {
            buf: self.buf,
            at: HEADER_LEN,
            end,
        }
    }

    pub fn get(&self, kind: u16) -> Option<Attribute<'a>> {
        self.attributes().find(|a| a.kind == kind)
    }

    /// Verifies MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5) in constant time.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        let Some(at) = self.integrity_at else {
            return false;
        };
        let header = mac_header(self.buf, at, 24);
        let full = mac::sign_sha1(&mac::sha1_key(key), &[&header, &self.buf[HEADER_LEN..at]]);
        constant_time_eq(&full, &self.buf[at + 4..at + 24])
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6), accepting truncated tags of 16..=32 bytes.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> bool {
        let Some(at) = self.integrity_sha256_at else {
            return false;
        };
        let len = read_u16(self.buf, at + 2) as usize;
        let tag = &self.buf[at + 4..at + 4 + len];
        let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
        ctx.update(&mac_header(self.buf, at, 4 + len));
        ctx.update(&self.buf[HEADER_LEN..at]);
        constant_time_eq(&ctx.sign().as_ref()[..len], tag)
    }
}

/// The MAC covers the message up to the integrity attribute, with the header length rewritten to end
/// right after that attribute (RFC 8489 §14.5): this header, then the datagram's attributes up to
/// `at`, which are left untouched.
fn mac_header(buf: &[u8], at: usize, attr_total: usize) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&buf[..HEADER_LEN]);
    let fake_len = (at - HEADER_LEN + attr_total) as u16;
    header[2..4].copy_from_slice(&fake_len.to_be_bytes());
    header
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // black_box keeps the optimiser from turning the loop back into an early exit.
    std::hint::black_box(diff) == 0
}

pub struct Attributes<'a> {
    buf: &'a [u8],
    at: usize,
    end: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Attribute<'a>;
    fn next(&mut self) -> Option<Attribute<'a>> {
        if self.at + 4 > self.end {
            return None;
        }
        // Lengths were validated by Message::parse.
        let kind = read_u16(self.buf, self.at);
        let len = read_u16(self.buf, self.at + 2) as usize;
        let offset = self.at + 4;
        self.at = offset + padded(len);
        Some(Attribute {
            kind,
            value: &self.buf[offset..offset + len],
            offset,
        })
    }
}

/// XOR-address decoding (RFC 8489 §14.2). `txid` is needed for IPv6.
pub fn decode_xor_address(value: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    if value.len() < 4 {
        return None;
    }
    let port = read_u16(value, 2) ^ (MAGIC_COOKIE >> 16) as u16;
    match (value[1], value.len()) {
        (0x01, 8) => {
            let ip = read_u32(value, 4) ^ MAGIC_COOKIE;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (0x02, 20) => {
            let mut ip = [0u8; 16];
            let mask = xor_mask(txid);
            for i in 0..16 {
                ip[i] = value[4 + i] ^ mask[i];
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

/// Plain (non-XOR) address decoding, for MAPPED-ADDRESS style attributes.
pub fn decode_address(value: &[u8]) -> Option<SocketAddr> {
    if value.len() < 4 {
        return None;
    }
    let port = read_u16(value, 2);
    match (value[1], value.len()) {
        (0x01, 8) => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(value[4], value[5], value[6], value[7])),
            port,
        )),
        (0x02, 20) => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&value[4..20]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

fn xor_mask(txid: &[u8; 12]) -> [u8; 16] {
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    mask[4..].copy_from_slice(txid);
    mask
}

/// Encodes an address attribute value (XOR-ed when `txid` is given) into `out`; returns its length.
fn encode_address(addr: SocketAddr, txid: Option<&[u8; 12]>, out: &mut [u8; 20]) -> usize {
    let xor = txid.is_some();
    let port = if xor {
        addr.port() ^ (MAGIC_COOKIE >> 16) as u16
    } else {
        addr.port()
    };
    out[0] = 0;
    out[2..4].copy_from_slice(&port.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = 0x01;
            let mut v = u32::from(ip);
            if xor {
                v ^= MAGIC_COOKIE;
            }
            out[4..8].copy_from_slice(&v.to_be_bytes());
            8
        }
        IpAddr::V6(ip) => {
            out[1] = 0x02;
            let mut v = ip.octets();
            if let Some(txid) = txid {
                let mask = xor_mask(txid);
                for i in 0..16 {
                    v[i] ^= mask[i];
                }
            }
            out[4..20].copy_from_slice(&v);
            20
        }
    }
}

/// Builds a STUN message into a reused buffer.
pub struct MessageWriter<'b> {
    buf: &'b mut Vec<u8>,
    txid: [u8; 12],
}

impl<'b> MessageWriter<'b> {
    pub fn new(buf: &'b mut Vec<u8>, method: u16, class: Class, txid: [u8; 12]) -> Self {
        buf.clear();
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&txid);
        MessageWriter { buf, txid }
    }

    fn set_length(&mut self) {
        let len = (self.buf.len() - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn attr(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&kind.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        let pad = padded(value.len()) - value.len();
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self.set_length();
        self
    }

    pub fn u32_attr(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_be_bytes())
    }

    pub fn xor_address(&mut self, kind: u16, addr: SocketAddr) -> &mut Self {
        let mut v = [0u8; 20];
        let txid = self.txid;
        let n = encode_address(addr, Some(&txid), &mut v);
        self.attr(kind, &v[..n])
    }

    pub fn address(&mut self, kind: u16, addr: SocketAddr) -> &mut Self {
        let mut v = [0u8; 20];
        let n = encode_address(addr, None, &mut v);
        self.attr(kind, &v[..n])
    }

    /// ERROR-CODE (RFC 8489 §14.8): class/number split and a short reason phrase.
    pub fn error_code(&mut self, code: u16, reason: &str) -> &mut Self {
        let mut v = [0u8; 4 + 64];
        v[2] = (code / 100) as u8;
        v[3] = (code % 100) as u8;
        let r = &reason.as_bytes()[..reason.len().min(64)];
        v[4..4 + r.len()].copy_from_slice(r);
        self.attr(attr::ERROR_CODE, &v[..4 + r.len()])
    }

    /// Appends MESSAGE-INTEGRITY computed with `key` over everything written so far.
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        let start = self.buf.len();
        self.attr(attr::MESSAGE_INTEGRITY, &[0u8; 20]);
        let tag = mac::sign_sha1(&mac::sha1_key(key), &[&self.buf[..start]]);
        self.buf[start + 4..start + 24].copy_from_slice(&tag);
        self
    }

    pub fn integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let start = self.buf.len();
        self.attr(attr::MESSAGE_INTEGRITY_SHA256, &[0u8; 32]);
        let k = hmac::Key::new(hmac::HMAC_SHA256, key);
        let tag = hmac::sign(&k, &self.buf[..start]);
        self.buf[start + 4..start + 36].copy_from_slice(tag.as_ref());
        self
    }

    pub fn fingerprint(&mut self) -> &mut Self {
        let start = self.buf.len();
        self.attr(attr::FINGERPRINT, &[0u8; 4]);
        let crc = crc32fast::hash(&self.buf[..start]) ^ FINGERPRINT_XOR;
        self.buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
        self
    }
}

/// A ChannelData message (RFC 8656 §12.4): 4-byte header, then the application data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData {
    pub channel: u16,
    /// Range of the payload inside the datagram.
    pub start: usize,
    pub end: usize,
}

/// Channel numbers a client may bind. RFC 8656 §12 narrowed the range to 0x4000-0x4FFF, but
/// RFC 5766 clients still in use (coturn's own `turnutils_uclient` among them) pick numbers up to
/// 0x7FFF. The reservation of 0x5000-0x7FFF only matters to a client demultiplexing DTLS-SRTP on
/// the same socket, so the server accepts the RFC 5766 range: anything with the 0b01 prefix.
pub const CHANNEL_MIN: u16 = 0x4000;
pub const CHANNEL_MAX: u16 = 0x7FFF;

/// Parses a ChannelData datagram. Over UDP the datagram may carry padding past the length field;
/// a length field that claims more than the datagram holds is refused.
pub fn parse_channel_data(buf: &[u8]) -> Option<ChannelData> {
    if buf.len() < 4 || buf[0] & 0xC0 != 0x40 {
        return None;
    }
    let channel = read_u16(buf, 0);
    let len = read_u16(buf, 2) as usize;
    if 4 + len > buf.len() {
        return None;
    }
    Some(ChannelData {
        channel,
        start: 4,
        end: 4 + len,
    })
}

/// Why a byte stream (TCP, TLS) cannot be read as TURN frames any further: the connection is
/// closed, since nothing after a broken frame can be found again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("neither a STUN message nor ChannelData")]
    NotTurn,
    #[error("a STUN length that is not a multiple of 4")]
    BadLength,
}

/// The length of the frame at the start of a TCP or TLS stream (RFC 8656 §12.5: STUN messages
/// and ChannelData back to back, ChannelData padded to a multiple of 4), or `Ok(None)` while
/// its header has not fully arrived. The frame's bytes may still be arriving.
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, StreamError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = read_u16(buf, 2) as usize;
    match buf[0] >> 6 {
        0b00 if len % 4 != 0 => Err(StreamError::BadLength),
        0b00 => Ok(Some(HEADER_LEN + len)),
        0b01 => Ok(Some(4 + padded(len))),
        _ => Err(StreamError::NotTurn),
    }
}

/// Pads a ChannelData frame `buf[start..end]` to a multiple of 4 for a stream transport, using
/// up to [`TAILROOM`] bytes behind it; returns the new end.
pub fn pad_for_stream(buf: &mut [u8], start: usize, end: usize) -> usize {
    let padded_end = start + padded(end - start);
    buf[end..padded_end].fill(0);
    padded_end
}

/// Room a receive buffer keeps in front of peer data so a Data indication header
/// (20 header + 24 XOR-PEER-ADDRESS for IPv6 + 4 DATA header) can be written in place.
pub const HEADROOM: usize = 48;
/// Room behind the payload for the DATA attribute's padding.
pub const TAILROOM: usize = 3;

/// Writes a ChannelData header in front of `buf[start..end]`; returns the frame's range.
/// `start` must be >= 4. UDP needs no padding (RFC 8656 §12.5).
pub fn frame_channel_data(
    buf: &mut [u8],
    start: usize,
    end: usize,
    channel: u16,
) -> (usize, usize) {
    let len = (end - start) as u16;
    let h = start - 4;
    buf[h..h + 2].copy_from_slice(&channel.to_be_bytes());
    buf[h + 2..h + 4].copy_from_slice(&len.to_be_bytes());
    (h, end)
}

/// Writes a Data indication (XOR-PEER-ADDRESS + DATA) around `buf[start..end]`, using the
/// headroom before and up to three bytes of tailroom after; returns the frame's range.
/// `start` must be >= HEADROOM and `buf.len() >= end + TAILROOM`.
pub fn frame_data_indication(
    buf: &mut [u8],
    start: usize,
    end: usize,
    peer: SocketAddr,
    txid: &[u8; 12],
) -> (usize, usize) {
    let payload_len = end - start;
    let mut addr = [0u8; 20];
    let addr_len = encode_address(peer, Some(txid), &mut addr);
    let header_len = HEADER_LEN + 4 + addr_len + 4;
    let h = start - header_len;
    let pad = padded(payload_len) - payload_len;
    let body_len = (header_len - HEADER_LEN + payload_len + pad) as u16;
    let mut w = h;
    let mut put = |bytes: &[u8]| {
        buf[w..w + bytes.len()].copy_from_slice(bytes);
        w += bytes.len();
    };
    put(&message_type(method::DATA, Class::Indication).to_be_bytes());
    put(&body_len.to_be_bytes());
    put(&MAGIC_COOKIE.to_be_bytes());
    put(txid);
    put(&attr::XOR_PEER_ADDRESS.to_be_bytes());
    put(&(addr_len as u16).to_be_bytes());
    put(&addr[..addr_len]);
    put(&attr::DATA.to_be_bytes());
    put(&(payload_len as u16).to_be_bytes());
    buf[end..end + pad].fill(0);
    (h, end + pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_frames_are_found_back_to_back_and_partial_headers_wait() {
        let mut stream = Vec::new();
        MessageWriter::new(&mut stream, method::BINDING, Class::Request, [1; 12])
            .attr(attr::SOFTWARE, b"abc");
        let stun_len = stream.len();
        // ChannelData of 5 bytes, padded to 8 on a stream.
        stream.extend_from_slice(&[0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0]);
        assert_eq!(stream_frame_len(&stream), Ok(Some(stun_len)));
        assert_eq!(stream_frame_len(&stream[stun_len..]), Ok(Some(12)));
        for cut in 0..4 {
            assert_eq!(stream_frame_len(&stream[..cut]), Ok(None), "{cut} bytes");
        }
        // The header decides; the body may still be on its way.
        assert_eq!(stream_frame_len(&stream[..4]), Ok(Some(stun_len)));
        assert_eq!(
            stream_frame_len(&[0x80, 0, 0, 0]),
            Err(StreamError::NotTurn)
        );
        assert_eq!(stream_frame_len(&[0, 1, 0, 6]), Err(StreamError::BadLength));
    }

    #[test]
    fn channel_data_for_a_stream_is_padded_with_zeros() {
        let mut buf = vec![0xEE; HEADROOM + 5 + TAILROOM];
        let (s, e) = frame_channel_data(&mut buf, HEADROOM, HEADROOM + 5, 0x4001);
        let end = pad_for_stream(&mut buf, s, e);
        assert_eq!(end - s, 12);
        assert_eq!(&buf[e..end], &[0, 0, 0]);
        let (s, e) = frame_channel_data(&mut buf, HEADROOM, HEADROOM + 4, 0x4001);
        assert_eq!(pad_for_stream(&mut buf, s, e), e, "already a multiple of 4");
    }

    #[test]
    fn constant_time_eq_basics() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"xbc", b"abc"));
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // RFC 5769 §2.1: sample request, short-term password "VOkJxbRl1RmTxUk/WvJxBt".
    const RFC5769_REQUEST: &str = "
        00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
        00 24 00 04 6e 00 01 ff 80 29 00 08 93 2f f9 b1 51 26 3b 36
        00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20 00 08 00 14
        9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
        80 28 00 04 e5 7a 3b cf";

    // RFC 5769 §2.2: IPv4 response.
    const RFC5769_RESPONSE_V4: &str = "
        01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20 00 20 00 08
        00 01 a1 47 e1 12 a6 43 00 08 00 14 2b 91 f5 99 fd 9e 90 c3
        8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7 80 28 00 04 c0 7d 4c 96";

    // RFC 5769 §2.3: IPv6 response.
    const RFC5769_RESPONSE_V6: &str = "
        01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20 00 20 00 14
        00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
        00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75
        bf e3 ed 41 80 28 00 04 c8 fb 0b 4c";

    // RFC 5769 §2.4: request with long-term authentication.
    const RFC5769_LONG_TERM: &str = "
        00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
        00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3
        82 b9 00 00 00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36
        4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41 00 14 00 0b
        65 78 61 6d 70 6c 65 2e 6f 72 67 00 00 08 00 14 f6 70 24 65
        6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66";

    #[test]
    fn rfc5769_request_parses_and_verifies() {
        let buf = hex(RFC5769_REQUEST);
        let m = Message::parse(&buf).unwrap();
        assert_eq!(m.method, method::BINDING);
        assert_eq!(m.class, Class::Request);
        assert!(m.has_fingerprint());
        assert_eq!(m.get(attr::USERNAME).unwrap().value, b"evtj:h6vY");
        assert!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        assert!(!m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBT"));
    }

    #[test]
    fn rfc5769_responses_decode_mapped_address() {
        for (vector, expected) in [
            (RFC5769_RESPONSE_V4, "192.0.2.1:32853"),
            (
                RFC5769_RESPONSE_V6,
                "[2001:db8:1234:5678:11:2233:4455:6677]:32853",
            ),
        ] {
            let buf = hex(vector);
            let m = Message::parse(&buf).unwrap();
            assert_eq!(m.class, Class::Success);
            let a = m.get(attr::XOR_MAPPED_ADDRESS).unwrap();
            let addr = decode_xor_address(a.value, &m.transaction_id()).unwrap();
            assert_eq!(addr, expected.parse().unwrap());
            assert!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        }
    }

    #[test]
    fn rfc5769_long_term_vector_verifies_with_md5_key() {
        let buf = hex(RFC5769_LONG_TERM);
        let m = Message::parse(&buf).unwrap();
        assert_eq!(m.get(attr::REALM).unwrap().value, b"example.org".as_slice());
        // MD5("<U+30DE><U+30C8><U+30EA><U+30C3><U+30AF><U+30B9>:example.org:TheMatrIX")
        let key = {
            use md5::{Digest, Md5};
            let mut h = Md5::new();
            h.update("\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}:example.org:TheMatrIX");
            h.finalize()
        };
        assert!(m.verify_integrity(&key));
    }

    #[test]
    fn writer_round_trips_with_integrity_and_fingerprint() {
        let mut out = Vec::new();
        let txid = [7u8; 12];
        let peer: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        MessageWriter::new(&mut out, method::ALLOCATE, Class::Success, txid)
            .xor_address(attr::XOR_RELAYED_ADDRESS, peer)
            .u32_attr(attr::LIFETIME, 600)
            .error_code(438, "Stale Nonce")
            .integrity(b"key")
            .integrity_sha256(b"key")
            .fingerprint();
        let m = Message::parse(&out).unwrap();
        assert_eq!(m.method, method::ALLOCATE);
        assert_eq!(m.class, Class::Success);
        assert_eq!(m.transaction_id(), txid);
        let a = m.get(attr::XOR_RELAYED_ADDRESS).unwrap();
        assert_eq!(decode_xor_address(a.value, &txid), Some(peer));
        assert!(m.verify_integrity(b"key"));
        assert!(m.verify_integrity_sha256(b"key"));
        assert!(!m.verify_integrity_sha256(b"kex"));
        let e = m.get(attr::ERROR_CODE).unwrap().value;
        assert_eq!((e[2], e[3], &e[4..]), (4, 38, b"Stale Nonce".as_slice()));
    }

    #[test]
    fn message_type_round_trips_for_every_method_and_class() {
        for m in 0..0x1000u16 {
            for c in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                assert_eq!(split_message_type(message_type(m, c)), (m, c));
            }
        }
        assert_eq!(message_type(method::BINDING, Class::Request), 0x0001);
        assert_eq!(message_type(method::BINDING, Class::Success), 0x0101);
        assert_eq!(message_type(method::ALLOCATE, Class::Error), 0x0113);
        assert_eq!(message_type(method::DATA, Class::Indication), 0x0017);
    }

    #[test]
    fn malformed_messages_are_refused() {
        let good = hex(RFC5769_REQUEST);
        assert_eq!(
            Message::parse(&good[..19]).unwrap_err(),
            ParseError::TooShort
        );
        let mut bad = good.clone();
        bad[4] ^= 1;
        assert_eq!(Message::parse(&bad).unwrap_err(), ParseError::NotStun);
        assert_eq!(
            Message::parse(&good[..good.len() - 4]).unwrap_err(),
            ParseError::BadLength
        );
        let mut bad = good.clone();
        bad[good.len() - 1] ^= 1;
        assert_eq!(
            Message::parse(&bad).unwrap_err(),
            ParseError::BadFingerprint
        );
        // An attribute whose length runs past the end.
        let mut bad = good.clone();
        bad[22..24].copy_from_slice(&0x0100u16.to_be_bytes());
        assert_eq!(Message::parse(&bad).unwrap_err(), ParseError::BadAttribute);
    }

    #[test]
    fn attributes_after_integrity_are_ignored() {
        // SOFTWARE appended after MESSAGE-INTEGRITY: the message counts, the attribute does not.
        let mut out = Vec::new();
        MessageWriter::new(&mut out, method::BINDING, Class::Request, [1; 12])
            .u32_attr(attr::LIFETIME, 7)
            .integrity(b"k")
            .attr(attr::SOFTWARE, b"appended")
            .u32_attr(attr::LIFETIME, 1);
        let m = Message::parse(&out).expect("parses");
        assert!(m.verify_integrity(b"k"));
        assert!(m.get(attr::SOFTWARE).is_none());
        assert_eq!(m.get(attr::LIFETIME).unwrap().value, 7u32.to_be_bytes());
        // After MESSAGE-INTEGRITY-SHA256 a MESSAGE-INTEGRITY is ignored too, and a second
        // MESSAGE-INTEGRITY after the first; FINGERPRINT still counts and must be last.
        let mut out = Vec::new();
        MessageWriter::new(&mut out, method::BINDING, Class::Request, [2; 12])
            .integrity_sha256(b"k")
            .integrity(b"k")
            .fingerprint();
        let m = Message::parse(&out).expect("parses");
        assert!(m.has_integrity_sha256() && !m.has_integrity() && m.has_fingerprint());
        assert!(m.verify_integrity_sha256(b"k"));
        let mut out = Vec::new();
        MessageWriter::new(&mut out, method::BINDING, Class::Request, [3; 12])
            .integrity(b"k")
            .integrity(b"other");
        let m = Message::parse(&out).expect("parses");
        assert!(m.verify_integrity(b"k"));
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes() {
        // Deterministic xorshift so a failure reproduces.
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let base = hex(RFC5769_LONG_TERM);
        for _ in 0..20_000 {
            let mut b = base.clone();
            let flips = (next() % 8) as usize;
            for _ in 0..flips {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            let cut = (next() as usize) % (b.len() + 1);
            b.truncate(cut);
            if let Ok(m) = Message::parse(&b) {
                for a in m.attributes() {
                    let _ = decode_xor_address(a.value, &m.transaction_id());
                }
                let _ = m.verify_integrity(b"x");
                let _ = m.verify_integrity_sha256(b"x");
            }
            let _ = parse_channel_data(&b);
        }
    }

    #[test]
    fn channel_data_parses_with_udp_padding_and_refuses_overlong_length() {
        let frame = [0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c', 0];
        assert_eq!(
            parse_channel_data(&frame),
            Some(ChannelData {
                channel: 0x4001,
                start: 4,
                end: 7
            })
        );
        assert_eq!(parse_channel_data(&[0x40, 0x01, 0x00, 0x09, 1, 2]), None);
        assert_eq!(parse_channel_data(&[0x00, 0x01, 0x00, 0x00]), None);
    }

    #[test]
    fn data_indication_framed_in_place_parses() {
        for peer in ["198.51.100.7:9", "[2001:db8::7]:9"] {
            let peer: SocketAddr = peer.parse().unwrap();
            let mut buf = vec![0u8; HEADROOM + 5 + TAILROOM];
            buf[HEADROOM..HEADROOM + 5].copy_from_slice(b"hello");
            let txid = [3u8; 12];
            let (s, e) = frame_data_indication(&mut buf, HEADROOM, HEADROOM + 5, peer, &txid);
            let m = Message::parse(&buf[s..e]).unwrap();
            assert_eq!((m.method, m.class), (method::DATA, Class::Indication));
            assert_eq!(m.get(attr::DATA).unwrap().value, b"hello");
            let p = m.get(attr::XOR_PEER_ADDRESS).unwrap();
            assert_eq!(decode_xor_address(p.value, &txid), Some(peer));
        }
    }

    #[test]
    fn channel_data_framed_in_place() {
        let mut buf = vec![0u8; 4 + 3];
        buf[4..].copy_from_slice(b"xyz");
        let (s, e) = frame_channel_data(&mut buf, 4, 7, 0x4abc);
        assert_eq!(&buf[s..e], &[0x4a, 0xbc, 0, 3, b'x', b'y', b'z']);
    }
}

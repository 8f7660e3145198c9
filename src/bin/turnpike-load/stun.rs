//! What every relayed message carries, and message templates the generator overwrites per
//! message; the requests and answers themselves are the library's (`turnpike::client`).

use std::net::SocketAddr;

use turnpike::proto::codec::{attr, method, Class, MessageWriter};

pub use turnpike::client::*;

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
    use turnpike::proto::codec::Message;

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
}

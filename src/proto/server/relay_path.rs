//! The hot path: ChannelData and Send indications from clients, datagrams from peers. Every call
//! returns a value naming bytes already in the caller's buffer; nothing here allocates or locks.
//!
//! Relay to relay (two clients of this core talking to each other, the most common call of all)
//! never reaches the kernel: the payload goes through the receiving relay's own checks, counters
//! and budget as if its socket had read it, and leaves as the receiving client's reply.

use std::net::SocketAddr;
use std::time::Instant;

use super::{ClientAction, Core, PeerAction};
use crate::proto::allocation::RelayId;
use crate::proto::codec::{self, frame_channel_data, frame_data_indication, Message, HEADROOM};
use crate::proto::request::Send;
use crate::proto::{FiveTuple, Transport};

impl Core {
    pub(super) fn channel_data(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        data: &[u8],
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        let Some(cd) = codec::parse_channel_data(data) else {
            self.stats.dropped_malformed += 1;
            return ClientAction::Drop;
        };
        let Some(&slot) = self.by_client.get(ft) else {
            return ClientAction::Drop;
        };
        let a = self.alloc_mut(slot);
        let target = a
            .channel(cd.channel, now)
            .map(|c| c.peer)
            .filter(|peer| a.has_permission(peer.ip(), now))
            .and_then(|peer| a.relay_for(&peer).map(|r| (r.id, peer)));
        let Some((relay, peer)) = target else {
            a.counters.dropped_packets += 1;
            self.stats.dropped_no_permission += 1;
            return ClientAction::Drop;
        };
        let payload = (cd.start, cd.end);
        self.forward_to_peer(slot, now, relay, peer, data, payload, false, reply)
    }

    pub(super) fn send_indication(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message,
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        let Some(&slot) = self.by_client.get(ft) else {
            return ClientAction::Drop;
        };
        let Some(send) = Send::parse(msg) else {
            self.stats.dropped_malformed += 1;
            return ClientAction::Drop;
        };
        let Some(peer) = self.peer_verdict(send.peer) else {
            return ClientAction::Drop;
        };
        let a = self.alloc_mut(slot);
        // A TCP allocation's relays are listeners: its peers are reached through Connect.
        let relay = a.relay_for(&peer).filter(|_| !a.tcp).map(|r| r.id);
        let Some(relay) = relay.filter(|_| a.has_permission(peer.ip(), now)) else {
            a.counters.dropped_packets += 1;
            self.stats.dropped_no_permission += 1;
            return ClientAction::Drop;
        };
        let payload = (send.data_start, send.data_end);
        let df = send.dont_fragment;
        self.forward_to_peer(slot, now, relay, peer, msg.bytes(), payload, df, reply)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_to_peer(
        &mut self,
        slot: u32,
        now: Instant,
        relay: RelayId,
        peer: SocketAddr,
        data: &[u8],
        (start, end): (usize, usize),
        dont_fragment: bool,
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        let len = end - start;
        let a = self.alloc_mut(slot);
        if let Some(b) = a.to_peer_budget.as_mut() {
            if !b.take(len as u64, now) {
                a.counters.dropped_packets += 1;
                self.stats.dropped_bandwidth += 1;
                return ClientAction::Drop;
            }
        }
        a.counters.to_peer_packets += 1;
        a.counters.to_peer_bytes += len as u64;
        let from = a.relays[relay.v6 as usize].map(|r| r.local);
        self.stats.to_peer_packets += 1;
        self.stats.to_peer_bytes += len as u64;
        if let (Some(&target), Some(from)) = (self.own_relays.get(&peer), from) {
            return self.deliver_in_process(now, target, from, &data[start..end], reply);
        }
        ClientAction::ToPeer {
            relay,
            peer,
            start,
            end,
            dont_fragment,
        }
    }

    /// A payload one of our relays sent to another relay of this core: handled exactly as the
    /// receiving socket would have handled it (its permission, channel, budget and counters),
    /// framed for its client in `reply`.
    fn deliver_in_process(
        &mut self,
        now: Instant,
        target: RelayId,
        from: SocketAddr,
        payload: &[u8],
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        let (start, end) = (HEADROOM, HEADROOM + payload.len());
        reply.clear();
        reply.resize(end + codec::TAILROOM, 0);
        reply[start..end].copy_from_slice(payload);
        self.stats.relayed_in_process += 1;
        let PeerAction::ToClient { to, start, end } =
            self.handle_peer(now, target, from, reply, start, end)
        else {
            return ClientAction::Drop;
        };
        // ChannelData is padded to 4 bytes on a stream (RFC 8656 §12.5); the I/O layer does
        // this for what relay sockets read, and a reply goes out as it is.
        let end = if to.transport != Transport::Udp && reply[start] >> 6 == 0b01 {
            codec::pad_for_stream(reply, start, end)
        } else {
            end
        };
        reply.copy_within(start..end, 0);
        reply.truncate(end - start);
        ClientAction::Reply { to }
    }

    /// Where a datagram that relay `relay` is about to send to `peer` can go without the kernel:
    /// the shard whose UDP relay socket `peer` is, when that is another shard, and the address
    /// the datagram is from (`relay`'s own). The I/O layer then hands it to that shard, which
    /// takes it through [`Self::deliver_from_shard`] as if its socket had read it.
    pub fn handover_target(&self, relay: RelayId, peer: &SocketAddr) -> Option<(u8, SocketAddr)> {
        let ours = match peer {
            SocketAddr::V4(_) => self.config.relay_v4,
            SocketAddr::V6(_) => self.config.relay_v6,
        };
        if ours.map(|r| r.local) != Some(peer.ip()) {
            return None;
        }
        let owner = self.shared.live_relays.udp_owner(peer)?;
        if owner == self.shard {
            return None;
        }
        let a = self.slots.get(relay.slot as usize)?.alloc.as_deref()?;
        let from = a.relays[relay.v6 as usize].filter(|r| r.id == relay)?.local;
        Some((owner, from))
    }

    /// A datagram another shard's relay at `from` sent to this shard's relay at `to` (see
    /// [`Self::handover_target`]), laid out in `buf` as [`Self::handle_peer`] expects. A relay
    /// that has ended meanwhile drops it, as its closed port would have.
    pub fn deliver_from_shard(
        &mut self,
        now: Instant,
        to: SocketAddr,
        from: SocketAddr,
        buf: &mut [u8],
        start: usize,
        end: usize,
    ) -> PeerAction {
        let Some(&relay) = self.own_relays.get(&to) else {
            return PeerAction::Drop;
        };
        self.stats.relayed_in_process += 1;
        self.handle_peer(now, relay, from, buf, start, end)
    }

    /// A datagram a relay socket received from `from`. The payload sits at `buf[start..end]` with at
    /// least [`HEADROOM`] bytes before it and [`codec::TAILROOM`] after, so the frame is written in place.
    pub fn handle_peer(
        &mut self,
        now: Instant,
        relay: RelayId,
        from: SocketAddr,
        buf: &mut [u8],
        start: usize,
        end: usize,
    ) -> PeerAction {
        debug_assert!(start >= HEADROOM && buf.len() >= end + codec::TAILROOM);
        // Field borrows, not `self` methods: the shared config is read in place (cloning its Arc
        // per packet would bounce one reference count between every shard's core).
        let Core {
            slots,
            config,
            stats,
            rng,
            ..
        } = self;
        let Some(a) = slots
            .get_mut(relay.slot as usize)
            .filter(|s| s.gen == relay.gen)
            .and_then(|s| s.alloc.as_mut())
        else {
            return PeerAction::Drop;
        };
        let len = end - start;
        // A relay past its own expiry (one family of a dual allocation) relays nothing more,
        // even before the timer closes it.
        let live = a.relays[relay.v6 as usize].is_some_and(|r| r.id == relay && r.expires > now);
        if !live || !a.has_permission(from.ip(), now) {
            a.counters.dropped_packets += 1;
            stats.dropped_no_permission += 1;
            return PeerAction::Drop;
        }
        if let Some(b) = a.to_client_budget.as_mut() {
            if !b.take(len as u64, now) {
                a.counters.dropped_packets += 1;
                stats.dropped_bandwidth += 1;
                return PeerAction::Drop;
            }
        }
        // Each frame has a 16-bit length: a payload past what it can carry (possible only on
        // stream transports) would otherwise be framed with a wrapped length.
        let channel = a.channel_for_peer(from, now).map(|c| c.number);
        let limit = match channel {
            Some(_) => u16::MAX as usize,
            // A Data indication must still fit a UDP datagram after its header is added.
            None => u16::MAX as usize - HEADROOM,
        };
        if len > limit {
            a.counters.dropped_packets += 1;
            stats.dropped_malformed += 1;
            return PeerAction::Drop;
        }
        let (s, e) = match channel {
            Some(number) => frame_channel_data(buf, start, end, number),
            None => {
                let txid = random_txid(rng);
                frame_data_indication(buf, start, end, config.policy.present(from), &txid)
            }
        };
        a.counters.to_client_packets += 1;
        a.counters.to_client_bytes += len as u64;
        let to = a.five_tuple;
        stats.to_client_packets += 1;
        stats.to_client_bytes += len as u64;
        PeerAction::ToClient {
            to,
            start: s,
            end: e,
        }
    }
}

/// xorshift64*: deterministic under test (seeded by the caller), unpredictable enough for Data
/// indication transaction ids, which nothing verifies.
pub(super) fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

pub(super) fn random_txid(state: &mut u64) -> [u8; 12] {
    let a = next_random(state).to_le_bytes();
    let b = next_random(state).to_le_bytes();
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&a);
    t[8..].copy_from_slice(&b[..4]);
    t
}

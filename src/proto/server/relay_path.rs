//! The hot path: ChannelData and Send indications from clients, datagrams from peers. Every call
//! returns a value naming bytes already in the caller's buffer; nothing here allocates or locks.

use std::net::SocketAddr;
use std::time::Instant;

use super::{ClientAction, Core, PeerAction};
use crate::proto::allocation::RelayId;
use crate::proto::codec::{self, frame_channel_data, frame_data_indication, Message, HEADROOM};
use crate::proto::request::Send;
use crate::proto::FiveTuple;

impl Core {
    pub(super) fn channel_data(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        data: &[u8],
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
        self.forward_to_peer(slot, now, relay, peer, cd.start, cd.end, false)
    }

    pub(super) fn send_indication(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message,
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
        let (start, end) = (send.data_start, send.data_end);
        self.forward_to_peer(slot, now, relay, peer, start, end, send.dont_fragment)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_to_peer(
        &mut self,
        slot: u32,
        now: Instant,
        relay: RelayId,
        peer: SocketAddr,
        start: usize,
        end: usize,
        dont_fragment: bool,
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
        self.stats.to_peer_packets += 1;
        self.stats.to_peer_bytes += len as u64;
        ClientAction::ToPeer {
            relay,
            peer,
            start,
            end,
            dont_fragment,
        }
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

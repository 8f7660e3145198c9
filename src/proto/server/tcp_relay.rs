//! TCP relays (RFC 6062): Connect, incoming peer connections (ConnectionAttempt), ConnectionBind,
//! and the two 30-second timers. The core only keeps the book: which peer connection belongs to
//! which allocation, in which state, until when. The I/O layer owns the sockets and the pipes;
//! it is told what to do through [`Command`]s and reports back through `peer_connected`,
//! `peer_accepted`, `record_piped` and `connection_closed` (a data connection's close is its
//! pipe's end, whichever side ended it).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::command::{Command, ConnectionId, PeerConnectError};
use super::relay_path::{next_random, random_txid};
use super::respond::{Answer, Signer, Success};
use super::Core;
use crate::proto::allocation::RelayId;
use crate::proto::codec::{attr, method, Class, MessageWriter};
use crate::proto::error::TurnError;
use crate::proto::request::{Connect, ConnectionBind};
use crate::proto::{FiveTuple, Transport};

/// RFC 6062 §5.2: a Connect that has not reached its peer by then fails with 447.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// RFC 6062 §5.2, §5.3: a peer connection with no ConnectionBind by then is closed.
pub const BIND_TIMEOUT: Duration = Duration::from_secs(30);
/// Peer connections one allocation may hold at once, in any state: each costs the server two
/// sockets and two pipe buffers, and one client must not be able to take them all.
pub const MAX_CONNECTIONS_PER_ALLOCATION: usize = 64;

enum State {
    /// The I/O layer is connecting; the Connect is answered when it reports.
    Connecting {
        control: FiveTuple,
        answer: Answer,
        signer: Signer,
    },
    /// Connected (or accepted), waiting for a ConnectionBind.
    Unbound,
    /// Piped to this client data connection.
    Bound { client: FiveTuple },
}

struct PeerConnection {
    slot: u32,
    gen: u32,
    relay: RelayId,
    /// As the peer policy spells it: what 446 compares.
    peer: SocketAddr,
    state: State,
    /// Connecting or unbound: when the connection is given up.
    deadline: Option<Instant>,
}

/// Every peer connection of this core's TCP allocations.
#[derive(Default)]
pub(super) struct TcpConnections {
    by_id: HashMap<ConnectionId, PeerConnection>,
    /// Peer connections per allocation slot, so an allocation's end finds its own.
    by_slot: HashMap<u32, Vec<ConnectionId>>,
    /// Bound client data connections.
    by_client: HashMap<FiveTuple, ConnectionId>,
    deadlines: BTreeSet<(Instant, ConnectionId)>,
}

impl TcpConnections {
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(t, _)| t)
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    fn insert(&mut self, id: ConnectionId, c: PeerConnection) {
        if let Some(t) = c.deadline {
            self.deadlines.insert((t, id));
        }
        self.by_slot.entry(c.slot).or_default().push(id);
        self.by_id.insert(id, c);
    }

    fn remove(&mut self, id: ConnectionId) -> Option<PeerConnection> {
        let c = self.by_id.remove(&id)?;
        if let Some(t) = c.deadline {
            self.deadlines.remove(&(t, id));
        }
        if let State::Bound { client } = &c.state {
            self.by_client.remove(client);
        }
        if let Some(ids) = self.by_slot.get_mut(&c.slot) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_slot.remove(&c.slot);
            }
        }
        Some(c)
    }

    fn set_deadline(&mut self, id: ConnectionId, at: Option<Instant>) {
        let Some(c) = self.by_id.get_mut(&id) else {
            return;
        };
        if let Some(t) = c.deadline {
            self.deadlines.remove(&(t, id));
        }
        c.deadline = at;
        if let Some(t) = at {
            self.deadlines.insert((t, id));
        }
    }

    fn of_slot(&self, slot: u32) -> &[ConnectionId] {
        self.by_slot.get(&slot).map_or(&[], |v| v)
    }
}

impl Core {
    /// The shard index this core's connection ids carry (see [`ConnectionId`]).
    pub fn set_shard(&mut self, index: usize) {
        // More than 256 shards share tags; a ConnectionBind then may go to a shard that does
        // not know its id and is refused with 400, never bound to someone else's connection.
        self.shard = index as u8;
    }

    /// Peer connections of TCP allocations, in any state.
    pub fn peer_connection_count(&self) -> usize {
        self.tcp.len()
    }

    fn new_connection_id(&mut self) -> ConnectionId {
        loop {
            let id = (next_random(&mut self.rng) as u32 & !0xFF) | u32::from(self.shard);
            if !self.tcp.by_id.contains_key(&id) {
                return id;
            }
        }
    }

    /// Connect (RFC 6062 §5.2) on a live allocation: answered when the I/O layer reports.
    pub(super) fn connect(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        slot: u32,
        request: Connect,
        answer: &Answer,
        signer: &Signer,
    ) -> Result<Success, TurnError> {
        if !self.alloc_mut(slot).tcp {
            return Err(TurnError::BadRequest);
        }
        let target = self.admit_peer(slot, request.peer)?;
        let duplicate = self
            .tcp
            .of_slot(slot)
            .iter()
            .any(|id| self.tcp.by_id[id].peer == target);
        if duplicate {
            return Err(TurnError::ConnectionAlreadyExists);
        }
        if self.tcp.of_slot(slot).len() >= MAX_CONNECTIONS_PER_ALLOCATION {
            self.stats.quota_rejections += 1;
            return Err(TurnError::InsufficientCapacity);
        }
        let a = self.alloc_mut(slot);
        let relay = *a
            .relay_for(&target)
            .ok_or(TurnError::PeerAddressFamilyMismatch)?;
        let gen = self.slots[slot as usize].gen;
        let id = self.new_connection_id();
        self.tcp.insert(
            id,
            PeerConnection {
                slot,
                gen,
                relay: relay.id,
                peer: target,
                state: State::Connecting {
                    control: *ft,
                    answer: *answer,
                    signer: *signer,
                },
                deadline: Some(now + CONNECT_TIMEOUT),
            },
        );
        self.commands.push_back(Command::ConnectPeer {
            id,
            from: relay.local,
            peer: target,
        });
        Ok(Success::Pending)
    }

    /// The I/O layer's answer to [`Command::ConnectPeer`]. True when the connection is to be
    /// kept (awaiting its ConnectionBind); false when nobody wants it any more (the Connect timed
    /// out, or its allocation ended) or it failed: the I/O layer then closes it.
    pub fn peer_connected(
        &mut self,
        now: Instant,
        id: ConnectionId,
        result: Result<(), PeerConnectError>,
    ) -> bool {
        let Some(c) = self.tcp.by_id.get_mut(&id) else {
            return false;
        };
        let State::Connecting {
            control,
            answer,
            signer,
        } = c.state
        else {
            return false;
        };
        let mut message = Vec::new();
        match result {
            Ok(()) => {
                c.state = State::Unbound;
                self.tcp.set_deadline(id, Some(now + BIND_TIMEOUT));
                self.stats.tcp_connects_ok += 1;
                let mut w =
                    MessageWriter::new(&mut message, answer.method, Class::Success, answer.txid);
                w.attr(attr::CONNECTION_ID, &id.to_be_bytes());
                self.finish(&mut w, &answer, Some(&signer));
            }
            Err(e) => {
                tracing::debug!(peer = %c.peer, error = %e, "connect to peer failed");
                self.tcp.remove(id);
                self.stats.tcp_connects_failed += 1;
                let err = TurnError::ConnectionFailure;
                self.refuse(now, &control, &answer, err, Some(&signer), &mut message);
            }
        }
        self.commands.push_back(Command::ToClient {
            to: control,
            message: message.into(),
        });
        result.is_ok()
    }

    /// A peer connected to TCP relay `relay` (RFC 6062 §5.3). `Some(id)`: keep the connection
    /// under `id` (the client is told with a ConnectionAttempt); `None`: close it, the peer has
    /// no permission or the relay is gone.
    pub fn peer_accepted(
        &mut self,
        now: Instant,
        relay: RelayId,
        peer: SocketAddr,
    ) -> Option<ConnectionId> {
        let slot = relay.slot;
        let a = self.slot(slot, relay.gen)?;
        let live = a.tcp && a.relays.iter().flatten().any(|r| r.id == relay);
        if !live {
            return None;
        }
        let target = self.peer_verdict(peer)?;
        let a = self.alloc_mut(slot);
        let control = a.five_tuple;
        if !a.has_permission(target.ip(), now) {
            tracing::debug!(peer = %peer, "incoming peer connection without permission closed");
            self.stats.dropped_no_permission += 1;
            return None;
        }
        let ids = self.tcp.of_slot(slot);
        if ids.len() >= MAX_CONNECTIONS_PER_ALLOCATION
            || ids.iter().any(|id| self.tcp.by_id[id].peer == target)
        {
            return None;
        }
        let id = self.new_connection_id();
        self.tcp.insert(
            id,
            PeerConnection {
                slot,
                gen: relay.gen,
                relay,
                peer: target,
                state: State::Unbound,
                deadline: Some(now + BIND_TIMEOUT),
            },
        );
        let mut message = Vec::new();
        let txid = random_txid(&mut self.rng);
        let mut w = MessageWriter::new(
            &mut message,
            method::CONNECTION_ATTEMPT,
            Class::Indication,
            txid,
        );
        w.xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::CONNECTION_ID, &id.to_be_bytes());
        self.commands.push_back(Command::ToClient {
            to: control,
            message: message.into(),
        });
        Some(id)
    }

    /// ConnectionBind (RFC 6062 §5.4) on a connection without an allocation.
    pub(super) fn connection_bind(
        &mut self,
        ft: &FiveTuple,
        username: &str,
        request: ConnectionBind,
    ) -> Result<Success, TurnError> {
        if ft.transport == Transport::Udp || self.tcp.by_client.contains_key(ft) {
            return Err(TurnError::BadRequest);
        }
        let shard = request.id as u8;
        if shard != self.shard {
            self.commands
                .push_back(Command::HandOver { client: *ft, shard });
            return Ok(Success::Pending);
        }
        let Some(c) = self.tcp.by_id.get(&request.id) else {
            return Err(TurnError::BadRequest);
        };
        if !matches!(c.state, State::Unbound) {
            return Err(TurnError::BadRequest);
        }
        let owner = self
            .slot(c.slot, c.gen)
            .map(|a| *a.username == *username)
            .ok_or(TurnError::BadRequest)?;
        if !owner {
            return Err(TurnError::WrongCredentials);
        }
        let id = request.id;
        self.tcp.set_deadline(id, None);
        if let Some(c) = self.tcp.by_id.get_mut(&id) {
            c.state = State::Bound { client: *ft };
        }
        self.tcp.by_client.insert(*ft, id);
        self.commands.push_back(Command::Pipe { id, client: *ft });
        Ok(Success::Plain)
    }

    /// A bound client data connection closed (and its pipe with it). False when `ft` is none.
    pub(super) fn data_connection_closed(&mut self, ft: &FiveTuple) -> bool {
        match self.tcp.by_client.get(ft).copied() {
            Some(id) => {
                self.tcp.remove(id);
                true
            }
            None => false,
        }
    }

    /// Bytes a pipe passed since its last report (the I/O layer reports as it runs and at its
    /// end).
    pub fn record_piped(&mut self, to_peer: u64, to_client: u64) {
        self.stats.tcp_piped_to_peer_bytes += to_peer;
        self.stats.tcp_piped_to_client_bytes += to_client;
    }

    /// Connects that ran past [`CONNECT_TIMEOUT`] (answered 447) and peer connections nobody
    /// bound within [`BIND_TIMEOUT`] (closed).
    pub(super) fn tcp_timeouts(&mut self, now: Instant) {
        while let Some(&(t, id)) = self.tcp.deadlines.first() {
            if t > now {
                return;
            }
            let Some(c) = self.tcp.remove(id) else {
                continue;
            };
            self.commands.push_back(Command::ClosePeer(id));
            if let State::Connecting {
                control,
                answer,
                signer,
            } = c.state
            {
                self.stats.tcp_connects_failed += 1;
                let mut message = Vec::new();
                let err = TurnError::ConnectionFailure;
                self.refuse(now, &control, &answer, err, Some(&signer), &mut message);
                self.commands.push_back(Command::ToClient {
                    to: control,
                    message: message.into(),
                });
            }
        }
    }

    /// Closes the peer connections of an allocation slot, or only those of one relay.
    pub(super) fn close_peer_connections(&mut self, slot: u32, relay: Option<RelayId>) {
        let ids: Vec<ConnectionId> = self
            .tcp
            .of_slot(slot)
            .iter()
            .copied()
            .filter(|id| relay.is_none_or(|r| self.tcp.by_id[id].relay == r))
            .collect();
        for id in ids {
            self.tcp.remove(id);
            self.commands.push_back(Command::ClosePeer(id));
        }
    }
}

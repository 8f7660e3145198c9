//! Allocate and Refresh (RFC 8656 §7). An Allocate takes its quota and a slot, then asks the I/O
//! layer for relay sockets and waits; its success is written when the last socket is in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::command::{
    Command, OpenRelay, OpenedRelay, RelayOpenError, RelaySource, RelayTransport,
};
use super::respond::{Answer, Signer, Success};
use super::{ClientAction, Core, RelayAddress};
use crate::proto::allocation::{
    Allocation, Answers, Counters, Relay, RelayId, Reservation, RESERVATION_LIFETIME,
};
use crate::proto::bucket::{Rate, TokenBucket};
use crate::proto::codec::{attr, Class, MessageWriter};
use crate::proto::error::{EndReason, TurnError};
use crate::proto::quota::{QuotaError, QuotaKey};
use crate::proto::request::{Allocate, Refresh};
use crate::proto::{FiveTuple, Transport};

/// Permission and channel entries a new allocation has room for before its tables grow.
const FIRST_PERMISSIONS: usize = 2;
const FIRST_CHANNELS: usize = 1;

/// An Allocate granted everything but its relay sockets, which the I/O layer is opening.
pub(super) struct PendingAllocate {
    pub(super) ft: FiveTuple,
    pub(super) answer: Answer,
    signer: Signer,
    pub(super) slot: u32,
    gen: u32,
    username: Box<str>,
    quota_key: QuotaKey,
    /// Quota units taken: one, or two when a neighbour port is reserved too.
    units: u32,
    request: Allocate,
    /// Per family, the relay address asked for (as configured when the Allocate came).
    addresses: [Option<RelayAddress>; 2],
    /// Sockets asked for and not answered yet.
    outstanding: u8,
    relays: [Option<Relay>; 2],
    reservation: Option<u64>,
    failure: Option<RelayOpenError>,
}

impl Core {
    pub(super) fn allocate(
        &mut self,
        ft: &FiveTuple,
        answer: &Answer,
        signer: &Signer,
        username: &str,
        request: Allocate,
    ) -> Result<Success, TurnError> {
        // RFC 6062 §5.1: a TCP relay is offered only to a client on a TCP or TLS connection,
        // whose data connections come to the same listener.
        if request.transport == Transport::Tcp && ft.transport == Transport::Udp {
            return Err(TurnError::BadRequest);
        }
        let config = Arc::clone(&self.config);
        let families = request.families;
        let v4 = config.relay_v4.filter(|_| families.v4);
        let v6 = config.relay_v6.filter(|_| families.v6);
        // A dual request is served with the IPv4 relay alone when IPv6 is unavailable
        // (ADDRESS-ERROR-CODE in the success).
        if (families.v4 && v4.is_none()) || (families.v6 && !families.v4 && v6.is_none()) {
            return Err(TurnError::AddressFamilyNotSupported);
        }
        let quota_user = config.auth.quota_user(username);
        let quota_key = if config.auth.is_static_user(username) {
            QuotaKey::per_source(quota_user, ft.client.ip())
        } else {
            QuotaKey::rest(quota_user)
        };
        let reserve_next = request.even_port.is_some_and(|e| e.reserve_next);
        // A reserved neighbour port is capacity held for this user until it is claimed or dies
        // with this allocation, so it takes a unit of the quota too.
        let units = if reserve_next { 2 } else { 1 };
        if let Err(q) = self.shared.take_quota(&quota_key, units, &config.limits) {
            self.stats.quota_rejections += 1;
            return Err(match q {
                QuotaError::User => TurnError::AllocationQuotaReached,
                _ => TurnError::InsufficientCapacity,
            });
        }
        // The reservation is ours to claim only while the core that made it still holds it.
        if let Some(t) = request.reservation {
            if !self.shared.quotas.end_reservation(t) {
                self.shared.quotas.give_back(&quota_key, units);
                return Err(TurnError::InsufficientCapacity);
            }
        }
        let (slot, gen) = self.take_slot();
        let addresses = [v4, v6];
        let mut outstanding = 0;
        for (i, address) in addresses.iter().enumerate() {
            let Some(address) = address else { continue };
            let source = match request.reservation {
                Some(token) => RelaySource::Reserved(token),
                None => RelaySource::Bind {
                    ip: address.local,
                    even_port: request.even_port.is_some() && i == 0,
                    reserve_next: reserve_next && i == 0,
                },
            };
            let id = RelayId {
                slot,
                gen,
                v6: i == 1,
            };
            let transport = match request.transport {
                Transport::Tcp => RelayTransport::Tcp,
                _ => RelayTransport::Udp,
            };
            self.commands.push_back(Command::OpenRelay(OpenRelay {
                id,
                transport,
                source,
                dont_fragment: request.dont_fragment,
            }));
            outstanding += 1;
        }
        self.pending.push(PendingAllocate {
            ft: *ft,
            answer: *answer,
            signer: *signer,
            slot,
            gen,
            username: username.into(),
            quota_key,
            units,
            request,
            addresses,
            outstanding,
            relays: [None, None],
            reservation: None,
            failure: None,
        });
        Ok(Success::Pending)
    }

    /// The I/O layer's answer to [`Command::OpenRelay`]. When it is the last one an Allocate waits
    /// for, the Allocate is answered: the action says where to send `reply`.
    pub fn relay_opened(
        &mut self,
        now: Instant,
        id: RelayId,
        result: Result<OpenedRelay, RelayOpenError>,
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        let Some(i) = self
            .pending
            .iter()
            .position(|p| p.slot == id.slot && p.gen == id.gen)
        else {
            // Nobody waits for it any more (abandoned at shutdown): give the socket back.
            if let Ok(opened) = result {
                self.commands.push_back(Command::CloseRelay(id));
                if let Some(token) = opened.reservation_token {
                    self.commands.push_back(Command::DropReservation(token));
                }
            }
            return ClientAction::Drop;
        };
        let p = &mut self.pending[i];
        let family = id.v6 as usize;
        p.outstanding = p.outstanding.saturating_sub(1);
        let stray = match (result, p.addresses[family]) {
            (Ok(opened), Some(address)) if p.relays[family].is_none() => {
                p.reservation = p.reservation.or(opened.reservation_token);
                p.relays[family] = Some(Relay {
                    id,
                    local: opened.local,
                    advertised: SocketAddr::new(address.advertised, opened.local.port()),
                    expires: now,
                });
                None
            }
            // An answer to nothing we asked: never keep a socket we cannot account for.
            (Ok(opened), _) => Some(opened),
            (Err(e), _) => {
                p.failure = p.failure.or(Some(e));
                None
            }
        };
        let done = p.outstanding == 0;
        if let Some(opened) = stray {
            self.commands.push_back(Command::CloseRelay(id));
            if let Some(token) = opened.reservation_token {
                self.commands.push_back(Command::DropReservation(token));
            }
        }
        if !done {
            return ClientAction::Drop;
        }
        let p = self.pending.swap_remove(i);
        self.complete_allocate(now, p, reply)
    }

    /// Gives back everything a pending Allocate holds; its answers, if they still come, close
    /// their sockets (see `relay_opened`).
    pub(super) fn abandon(&mut self, p: PendingAllocate) {
        for r in p.relays.iter().flatten() {
            self.commands.push_back(Command::CloseRelay(r.id));
        }
        if let Some(token) = p.reservation {
            self.commands.push_back(Command::DropReservation(token));
        }
        self.free_slot(p.slot);
        self.shared.quotas.give_back(&p.quota_key, p.units);
    }

    fn complete_allocate(
        &mut self,
        now: Instant,
        p: PendingAllocate,
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        let (ft, answer, signer) = (p.ft, p.answer, p.signer);
        if let Some(e) = p.failure {
            if let Some(suppressed) = self.relay_failures.should_log(now) {
                tracing::warn!(
                    client = %ft.client,
                    error = %e,
                    similar_failures_not_logged = suppressed,
                    "allocation refused: relay socket unavailable"
                );
            }
            self.abandon(p);
            let err = TurnError::InsufficientCapacity;
            return self.refuse(now, &ft, &answer, err, Some(&signer), reply);
        }
        let config = Arc::clone(&self.config);
        let reservation = p.reservation.map(|token| {
            self.shared.quotas.hold_for_reservation(token, &p.quota_key);
            Reservation {
                token,
                expires: now + RESERVATION_LIFETIME,
            }
        });
        if p.units == 2 && reservation.is_none() {
            // Nothing to hold for (no port was reserved): return the unit.
            self.shared.quotas.give_back(&p.quota_key, 1);
        }
        // RFC 8656 §7.2: a LIFETIME of 0 in an Allocate is no request at all: the default applies.
        let lifetime = match self.lifetime(p.request.lifetime) {
            Duration::ZERO => config.limits.default_lifetime,
            l => l,
        };
        let mut relays = p.relays;
        let tcp = p.request.transport == Transport::Tcp;
        for r in relays.iter_mut().flatten() {
            r.expires = now + lifetime;
            self.relay_live(r, tcp);
        }
        let bw = config.limits.bandwidth_bytes_per_sec;
        // One second of burst per direction.
        let budget = (bw > 0).then(|| TokenBucket::new(Rate::new(bw, bw), now));
        let allocation = Box::new(Allocation {
            id: super::relay_path::next_random(&mut self.rng),
            five_tuple: ft,
            username: p.username,
            quota_key: p.quota_key,
            reservation,
            created: now,
            expires: now + lifetime,
            relays,
            tcp,
            // Room for what nearly every allocation asks for next (ICE: a permission or two
            // and a channel), so those requests find their table ready.
            permissions: Vec::with_capacity(FIRST_PERMISSIONS),
            channels: Vec::with_capacity(FIRST_CHANNELS),
            answers: Answers::default(),
            counters: Counters::default(),
            to_peer_budget: budget,
            to_client_budget: budget,
        });
        tracing::info!(
            allocation_id = %format_args!("{:016x}", allocation.id),
            user = &*allocation.username,
            client = %ft.client,
            transport = ft.transport.as_str(),
            relay = %super::DisplayRelays(&relays),
            lifetime_secs = lifetime.as_secs(),
            "allocation created"
        );
        self.slots[p.slot as usize].alloc = Some(allocation);
        self.by_client.insert(ft, p.slot);
        self.arm(p.slot);
        self.stats.allocations_created += 1;

        let mut w = MessageWriter::new(reply, answer.method, Class::Success, answer.txid);
        for r in relays.iter().flatten() {
            w.xor_address(attr::XOR_RELAYED_ADDRESS, r.advertised);
        }
        if p.request.families.v6 && p.request.families.v4 && relays[1].is_none() {
            // RFC 8656 §7.2: the IPv6 half of a dual allocation is not served.
            let err = TurnError::AddressFamilyNotSupported;
            let reason = err.reason().as_bytes();
            let mut v = [0u8; 4 + 28];
            v[0] = 0x02;
            v[2] = (err.code() / 100) as u8;
            v[3] = (err.code() % 100) as u8;
            v[4..4 + reason.len()].copy_from_slice(reason);
            w.attr(attr::ADDRESS_ERROR_CODE, &v[..4 + reason.len()]);
        }
        w.u32_attr(attr::LIFETIME, lifetime.as_secs() as u32);
        if let Some(r) = reservation {
            w.attr(attr::RESERVATION_TOKEN, &r.token.to_be_bytes());
        }
        w.xor_address(attr::XOR_MAPPED_ADDRESS, ft.client);
        self.finish(&mut w, &answer, Some(&signer));
        self.alloc_mut(p.slot).answers = Answers::new(answer.txid, reply);
        ClientAction::Reply { to: ft }
    }

    /// Refresh: extends or deletes the allocation, or with REQUESTED-ADDRESS-FAMILY only that
    /// family's relay of a dual allocation (RFC 8656 §7.3).
    pub(super) fn refresh(
        &mut self,
        now: Instant,
        slot: u32,
        request: Refresh,
    ) -> Result<Success, TurnError> {
        let family = request.family.map(|f| f.index());
        if family.is_some_and(|f| self.alloc_mut(slot).relays[f].is_none()) {
            return Err(TurnError::PeerAddressFamilyMismatch);
        }
        let lifetime = self.lifetime(request.lifetime);
        match family {
            _ if !lifetime.is_zero() => {
                self.alloc_mut(slot).extend(family, now + lifetime);
                self.arm(slot);
            }
            Some(f) => self.end_relay(slot, f, now, EndReason::DeletedByClient),
            None => self.end_allocation(slot, now, EndReason::DeletedByClient),
        }
        Ok(Success::Refresh {
            lifetime_secs: lifetime.as_secs() as u32,
        })
    }
}

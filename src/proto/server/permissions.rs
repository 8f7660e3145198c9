//! CreatePermission and ChannelBind (RFC 8656 §9, §11), and the peer checks both share.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::respond::Success;
use super::Core;
use crate::proto::allocation::BindError;
use crate::proto::error::TurnError;
use crate::proto::policy::{canonical_ip, Verdict};
use crate::proto::request::{ChannelBind, CreatePermission, MAX_PERMISSION_PEERS};

impl Core {
    /// The peer policy plus one rule it cannot know: on our own relay address, only ports we
    /// have open as relays are peers. Returns the address to send to.
    pub(super) fn peer_verdict(&mut self, peer: SocketAddr) -> Option<SocketAddr> {
        // `canonical` is the one spelling every check compares (embedded IPv4 reduced, our
        // external address translated); `send_to` keeps the family the relay socket needs.
        let (send_to, canonical) = match self.config.policy.check(peer) {
            Verdict::Allow { send_to, canonical } => (send_to, canonical),
            Verdict::Deny(why) => {
                self.stats.denied_peers += 1;
                tracing::debug!(peer = %peer, reason = why.as_str(), "peer denied");
                return None;
            }
        };
        let config = &self.config;
        let ours = [config.relay_v4, config.relay_v6]
            .iter()
            .flatten()
            .any(|r| canonical_ip(r.local) == canonical.ip());
        // A loopback test rig that opened loopback explicitly keeps its echo peers.
        let opened_loopback = canonical.ip().is_loopback() && config.policy.allows_loopback();
        if ours && !opened_loopback && !self.shared.live_relays.contains(&canonical) {
            self.stats.denied_peers += 1;
            tracing::debug!(peer = %peer, "peer denied: our relay address, but not one of our relay ports");
            return None;
        }
        Some(send_to)
    }

    /// Policy (403), then a relay of the peer's family in this allocation (443).
    pub(super) fn admit_peer(
        &mut self,
        slot: u32,
        peer: SocketAddr,
    ) -> Result<SocketAddr, TurnError> {
        let target = self.peer_verdict(peer).ok_or(TurnError::Forbidden)?;
        if self.alloc_mut(slot).relay_for(&target).is_none() {
            return Err(TurnError::PeerAddressFamilyMismatch);
        }
        Ok(target)
    }

    pub(super) fn create_permission(
        &mut self,
        now: Instant,
        slot: u32,
        request: &CreatePermission,
    ) -> Result<Success, TurnError> {
        let mut ips = [IpAddr::from([0u8; 4]); MAX_PERMISSION_PEERS];
        let peers = request.peers();
        for (ip, peer) in ips.iter_mut().zip(peers) {
            *ip = self.admit_peer(slot, *peer)?.ip();
        }
        let ips = &ips[..peers.len()];
        let limits = &self.config.limits;
        let (limit, lifetime) = (
            limits.permissions_per_allocation,
            limits.permission_lifetime,
        );
        let a = self.alloc_mut(slot);
        if !a.can_permit_all(ips, now, limit) {
            self.stats.quota_rejections += 1;
            return Err(TurnError::InsufficientCapacity);
        }
        for ip in ips {
            a.permit(*ip, now + lifetime, now, limit);
        }
        Ok(Success::Plain)
    }

    pub(super) fn channel_bind(
        &mut self,
        now: Instant,
        slot: u32,
        request: ChannelBind,
    ) -> Result<Success, TurnError> {
        let target = self.admit_peer(slot, request.peer)?;
        let limits = &self.config.limits;
        let (channel_limit, channel_lifetime) =
            (limits.channels_per_allocation, limits.channel_lifetime);
        let (permission_limit, permission_lifetime) = (
            limits.permissions_per_allocation,
            limits.permission_lifetime,
        );
        let a = self.alloc_mut(slot);
        match a.check_bind(request.number, target, now, channel_limit) {
            Ok(()) => {}
            Err(BindError::Conflict) => return Err(TurnError::BadRequest),
            Err(BindError::Full) => {
                self.stats.quota_rejections += 1;
                return Err(TurnError::InsufficientCapacity);
            }
        }
        // A channel binding also installs or refreshes the permission (RFC 8656 §12.2).
        if !a.permit(
            target.ip(),
            now + permission_lifetime,
            now,
            permission_limit,
        ) {
            self.stats.quota_rejections += 1;
            return Err(TurnError::InsufficientCapacity);
        }
        a.bind(request.number, target, now + channel_lifetime, now);
        Ok(Success::Plain)
    }
}

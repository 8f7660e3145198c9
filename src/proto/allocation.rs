//! Allocation state (RFC 8656 §5): relay addresses, permissions, channels and their lifetimes.
//!
//! Permissions and channels live in small vectors scanned linearly: quotas keep them to a few dozen
//! entries and a real call uses one or two, where a scan beats hashing. Expired entries are ignored
//! by every look-up and swept when a new entry needs the room, so no timer exists per entry.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::bucket::TokenBucket;
use super::quota::QuotaKey;
use super::FiveTuple;

/// RFC 8656 §7.2: a port reserved by EVEN-PORT with the R bit is held for about 30 seconds.
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

/// The neighbour port an allocation reserved (EVEN-PORT, R bit) and has not seen claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub token: u64,
    pub expires: Instant,
}

/// Names one relay socket. The I/O layer stores sockets by (slot, v6) and checks `gen`, so a
/// packet that races an allocation's end never reaches the slot's next occupant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RelayId {
    pub slot: u32,
    pub gen: u32,
    pub v6: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relay {
    pub id: RelayId,
    /// The socket's bound address.
    pub local: SocketAddr,
    /// What XOR-RELAYED-ADDRESS tells the client (the external address behind 1:1 NAT).
    pub advertised: SocketAddr,
    /// Each family's relay of a dual allocation is refreshed and deleted on its own (RFC 8656 §7.3).
    pub expires: Instant,
}

#[derive(Clone, Copy, Debug)]
pub struct Permission {
    pub ip: IpAddr,
    pub expires: Instant,
}

#[derive(Clone, Copy, Debug)]
pub struct Channel {
    pub number: u16,
    pub peer: SocketAddr,
    pub expires: Instant,
}

/// Traffic through one allocation, reported when it ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
    pub dropped_packets: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindError {
    /// The channel number is bound to another peer, or the peer to another channel number.
    Conflict,
    /// The allocation holds its quota of channels.
    Full,
}

pub struct Allocation {
    /// For telling allocations apart in usage records, logs and the sessions API: unique (64
    /// pseudo-random bits from the core's generator), not secret.
    pub id: u64,
    pub five_tuple: FiveTuple,
    pub username: Box<str>,
    /// What the allocation's quota unit is counted under; its user is the name the per-user
    /// quota counts by (the user part of a REST username).
    pub quota_key: QuotaKey,
    /// Ends with the allocation unless claimed first.
    pub reservation: Option<Reservation>,
    pub created: Instant,
    /// When the last relay ends, and with it the allocation: the latest of the relays' expiries.
    pub expires: Instant,
    /// Index 0 is the IPv4 relay, 1 the IPv6 relay (RFC 8656 dual allocation).
    pub relays: [Option<Relay>; 2],
    /// A TCP allocation (RFC 6062): its relays listen for TCP and its peers are reached with
    /// Connect, not with Send, ChannelData or channels.
    pub tcp: bool,
    pub permissions: Vec<Permission>,
    pub channels: Vec<Channel>,
    /// What a retransmitted request is answered with.
    pub answers: Answers,
    pub counters: Counters,
    pub to_peer_budget: Option<TokenBucket>,
    pub to_client_budget: Option<TokenBucket>,
}

/// Room kept after the Allocate's success for the last other answer: a signed success with
/// FINGERPRINT and a LIFETIME (60 bytes with MESSAGE-INTEGRITY, 72 with its SHA-256 form), so
/// answers to CreatePermission, ChannelBind and Refresh never grow the buffer.
const LAST_ANSWER_ROOM: usize = 96;

/// The answers a retransmission gets again, in one buffer: the Allocate's success, kept for the
/// allocation's life (a client whose success was lost retransmits the Allocate, possibly after
/// other requests), then the latest other request's answer.
#[derive(Debug, Default)]
pub struct Answers {
    buf: Vec<u8>,
    allocate_len: usize,
    allocate_txid: [u8; 12],
    /// The latest other request's transaction id, once there is one.
    last_txid: Option<[u8; 12]>,
}

impl Answers {
    pub fn new(allocate_txid: [u8; 12], success: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(success.len() + LAST_ANSWER_ROOM);
        buf.extend_from_slice(success);
        Answers {
            buf,
            allocate_len: success.len(),
            allocate_txid,
            last_txid: None,
        }
    }

    /// Our earlier answer to the request with this transaction id, if we keep it.
    pub fn get(&self, txid: &[u8; 12]) -> Option<&[u8]> {
        if *txid == self.allocate_txid && self.allocate_len > 0 {
            return Some(&self.buf[..self.allocate_len]);
        }
        (self.last_txid.as_ref() == Some(txid)).then(|| &self.buf[self.allocate_len..])
    }

    /// Keeps `answer` as the latest answer, in place of the one before.
    pub fn remember(&mut self, txid: [u8; 12], answer: &[u8]) {
        self.buf.truncate(self.allocate_len);
        self.buf.extend_from_slice(answer);
        self.last_txid = Some(txid);
    }
}

impl Allocation {
    /// Extends one family's relay (`Some(index)`) or all of them to `until`.
    pub fn extend(&mut self, family: Option<usize>, until: Instant) {
        for (i, r) in self.relays.iter_mut().enumerate() {
            if let Some(r) = r.as_mut().filter(|_| family.is_none_or(|f| f == i)) {
                r.expires = until;
            }
        }
        self.sync_expiry();
    }

    /// Takes one family's relay out of the allocation.
    pub fn remove_relay(&mut self, family: usize) -> Option<Relay> {
        let r = self.relays[family].take();
        self.sync_expiry();
        r
    }

    fn sync_expiry(&mut self) {
        if let Some(latest) = self.relays.iter().flatten().map(|r| r.expires).max() {
            self.expires = latest;
        }
    }

    pub fn relay_for(&self, peer: &SocketAddr) -> Option<&Relay> {
        self.relays[peer.is_ipv6() as usize].as_ref()
    }

    pub fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|p| p.ip == ip && p.expires > now)
    }

    /// Installs or refreshes a permission; `false` when the quota is full of live entries.
    pub fn permit(&mut self, ip: IpAddr, expires: Instant, now: Instant, limit: usize) -> bool {
        if let Some(p) = self.permissions.iter_mut().find(|p| p.ip == ip) {
            p.expires = expires;
            return true;
        }
        self.permissions.retain(|p| p.expires > now);
        if self.permissions.len() >= limit {
            return false;
        }
        self.permissions.push(Permission { ip, expires });
        true
    }

    /// Whether `permit` would succeed for every ip in `ips` (CreatePermission is all or nothing).
    pub fn can_permit_all(&self, ips: &[IpAddr], now: Instant, limit: usize) -> bool {
        let live = self.permissions.iter().filter(|p| p.expires > now).count();
        let new = ips
            .iter()
            .enumerate()
            .filter(|(i, ip)| !ips[..*i].contains(ip) && !self.has_entry(**ip))
            .count();
        live + new <= limit
    }

    fn has_entry(&self, ip: IpAddr) -> bool {
        self.permissions.iter().any(|p| p.ip == ip)
    }

    pub fn channel(&self, number: u16, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
    }

    pub fn channel_for_peer(&self, peer: SocketAddr, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
    }

    /// Checks a ChannelBind without changing anything (RFC 8656 §11.2 rules).
    pub fn check_bind(
        &self,
        number: u16,
        peer: SocketAddr,
        now: Instant,
        limit: usize,
    ) -> Result<(), BindError> {
        let mut exact = false;
        for c in self.channels.iter().filter(|c| c.expires > now) {
            match (c.number == number, c.peer == peer) {
                (true, true) => exact = true,
                (true, false) | (false, true) => return Err(BindError::Conflict),
                _ => {}
            }
        }
        let live = self.channels.iter().filter(|c| c.expires > now).count();
        if !exact && live >= limit {
            return Err(BindError::Full);
        }
        Ok(())
    }

    /// Binds or refreshes a channel already accepted by `check_bind`.
    pub fn bind(&mut self, number: u16, peer: SocketAddr, expires: Instant, now: Instant) {
        if let Some(c) = self
            .channels
            .iter_mut()
            .find(|c| c.number == number && c.peer == peer)
        {
            c.expires = expires;
            return;
        }
        self.channels.retain(|c| c.expires > now);
        self.channels.push(Channel {
            number,
            peer,
            expires,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Transport;

    fn alloc(now: Instant) -> Allocation {
        Allocation {
            id: 1,
            five_tuple: FiveTuple {
                transport: Transport::Udp,
                client: "192.0.2.1:1000".parse().unwrap(),
                local: "192.0.2.2:3478".parse().unwrap(),
            },
            username: "u".into(),
            quota_key: QuotaKey::rest("u"),
            reservation: None,
            created: now,
            expires: now + Duration::from_secs(600),
            relays: [None, None],
            tcp: false,
            permissions: Vec::new(),
            channels: Vec::new(),
            answers: Answers::default(),
            counters: Counters::default(),
            to_peer_budget: None,
            to_client_budget: None,
        }
    }

    #[test]
    fn permissions_expire_and_make_room() {
        let t0 = Instant::now();
        let mut a = alloc(t0);
        let ip1: IpAddr = "198.51.100.1".parse().unwrap();
        let ip2: IpAddr = "198.51.100.2".parse().unwrap();
        assert!(a.permit(ip1, t0 + Duration::from_secs(300), t0, 1));
        assert!(a.has_permission(ip1, t0 + Duration::from_secs(299)));
        assert!(!a.has_permission(ip1, t0 + Duration::from_secs(300)));
        assert!(!a.permit(ip2, t0 + Duration::from_secs(300), t0, 1));
        let later = t0 + Duration::from_secs(301);
        assert!(a.permit(ip2, later + Duration::from_secs(300), later, 1));
        assert!(a.has_permission(ip2, later));
        assert!(!a.has_permission(ip1, later));
    }

    #[test]
    fn can_permit_all_counts_duplicates_once() {
        let t0 = Instant::now();
        let mut a = alloc(t0);
        let ip1: IpAddr = "198.51.100.1".parse().unwrap();
        let ip2: IpAddr = "198.51.100.2".parse().unwrap();
        a.permit(ip1, t0 + Duration::from_secs(300), t0, 2);
        assert!(a.can_permit_all(&[ip1, ip2, ip2], t0, 2));
        assert!(!a.can_permit_all(&[ip2, "198.51.100.3".parse().unwrap()], t0, 2));
    }

    #[test]
    fn answers_keep_the_allocate_success_and_the_latest_other_answer() {
        let mut a = Answers::new([1; 12], b"allocate");
        assert_eq!(a.get(&[1; 12]), Some(&b"allocate"[..]));
        assert_eq!(a.get(&[2; 12]), None);
        let room = a.buf.capacity();
        a.remember([2; 12], b"permission");
        a.remember([3; 12], b"bind");
        assert_eq!(a.get(&[1; 12]), Some(&b"allocate"[..]));
        assert_eq!(
            a.get(&[2; 12]),
            None,
            "only the latest other answer is kept"
        );
        assert_eq!(a.get(&[3; 12]), Some(&b"bind"[..]));
        a.remember([4; 12], &[0; 72]);
        assert_eq!(a.buf.capacity(), room, "a signed answer fits the room kept");
        assert_eq!(Answers::default().get(&[0; 12]), None);
    }

    #[test]
    fn channel_rules() {
        let t0 = Instant::now();
        let mut a = alloc(t0);
        let p1: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        let p2: SocketAddr = "198.51.100.1:5001".parse().unwrap();
        let exp = t0 + Duration::from_secs(600);
        assert_eq!(a.check_bind(0x4000, p1, t0, 1), Ok(()));
        a.bind(0x4000, p1, exp, t0);
        // Refresh of the same binding is fine even at the quota.
        assert_eq!(a.check_bind(0x4000, p1, t0, 1), Ok(()));
        assert_eq!(a.check_bind(0x4000, p2, t0, 1), Err(BindError::Conflict));
        assert_eq!(a.check_bind(0x4001, p1, t0, 1), Err(BindError::Conflict));
        assert_eq!(a.check_bind(0x4001, p2, t0, 1), Err(BindError::Full));
        assert_eq!(a.channel(0x4000, t0).unwrap().peer, p1);
        assert!(a.channel(0x4000, exp).is_none());
        // After expiry the number may go to another peer.
        assert_eq!(a.check_bind(0x4000, p2, exp, 1), Ok(()));
    }
}

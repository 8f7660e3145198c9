//! 24 hours of simulated time through one core, in seconds of real time.
//!
//! Thousands of clients allocate (plain, dual-stack, EVEN-PORT with reservations, claims of other
//! clients' reservations), refresh, delete, create permissions and channels, relay both ways, and
//! go silent so their allocations expire; revocations and reloads happen in between, and malformed,
//! unauthenticated and wrongly signed traffic is mixed in. Every simulated hour, and at the end, the
//! core's tables, its timer structure and the shared quota counters must be exactly what the live
//! objects need, and every invariant must hold.

use super::*;

/// A deterministic generator: the same run every time, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What a client believes about itself, from the answers it got.
#[derive(Default, Clone)]
struct ClientModel {
    nonce: Option<Vec<u8>>,
    allocated: bool,
    /// Clients that go quiet stop refreshing, and their allocations must expire.
    quiet: bool,
    token: Option<Vec<u8>>,
    peers: Vec<SocketAddr>,
    /// An allocation's requests all carry the username it was made with (else 441).
    creds: Option<Creds>,
}

const CLIENTS: usize = 3000;
const SOURCES: usize = 60;
const HOURS: u64 = 24;
const STEP_SECS: u64 = 5;
const OPS_PER_STEP: usize = 16;

fn soak_limits() -> Limits {
    Limits {
        allocations_per_user: 25,
        total_allocations: 1500,
        permissions_per_allocation: 6,
        channels_per_allocation: 3,
        unauth_replies_per_sec: 0,
        ..Limits::default()
    }
}

fn five_tuple(i: usize) -> FiveTuple {
    let source = IpAddr::from([203, 0, 113, 1 + (i % SOURCES) as u8]);
    FiveTuple {
        client: SocketAddr::new(source, 10_000 + i as u16),
        ..client(0)
    }
}

/// Client `i`'s credentials: a third share one static user (as apps do), the rest are REST users.
fn credentials(i: usize, now_unix: u64) -> Creds {
    match i % 3 {
        0 => alice(),
        _ => rest(&format!("user{}", i % 97), now_unix + 3600, SECRET),
    }
}

fn peer_pool(rng: &mut Rng) -> SocketAddr {
    match rng.below(10) {
        // Denied: loopback, private, our own host, our relay address off a live port.
        0 => peer("127.0.0.1:5000"),
        1 => peer("[::ffff:10.0.0.1]:5000"),
        2 => peer("192.0.2.99:3478"),
        3 => peer("[64:ff9b::c000:20a]:60001"),
        4..=6 => SocketAddr::new(IpAddr::from([198, 51, 100, rng.below(20) as u8 + 1]), 4000),
        _ => SocketAddr::new(
            format!("2001:db8:1::{}", rng.below(20) + 1)
                .parse()
                .unwrap(),
            4000,
        ),
    }
}

impl Harness {
    fn now_unix(&self) -> u64 {
        self.shared.unix_time(self.now)
    }

    /// One authenticated request from client `i`, answering a 401/438 with a retry as clients do.
    fn soak_request(
        &mut self,
        i: usize,
        model: &mut ClientModel,
        m: u16,
        fill: &dyn Fn(&mut MessageWriter),
    ) -> (Class, Option<u16>) {
        let ft = five_tuple(i);
        let creds = model
            .creds
            .get_or_insert_with(|| credentials(i, self.shared.unix_time(self.now)))
            .clone();
        for _ in 0..2 {
            let nonce = match &model.nonce {
                Some(n) => n.clone(),
                None => {
                    let n = self.nonce(&ft);
                    model.nonce = Some(n.clone());
                    n
                }
            };
            let txid = self.txid();
            let req = self.request(m, txid, &creds, &nonce, |w| fill(w));
            let answer = self.call(&ft, &req);
            if matches!(answer.1, Some(401 | 438)) {
                model.nonce = self.reply_attr(attr::NONCE);
                continue;
            }
            return answer;
        }
        (Class::Error, Some(401))
    }

    fn step_client(&mut self, rng: &mut Rng, models: &mut [ClientModel], i: usize) {
        let ft = five_tuple(i);
        let mut model = std::mem::take(&mut models[i]);
        if model.allocated && !self.core.by_client.contains_key(&ft) {
            // It expired (a quiet client) or was revoked, killed or deleted: start over.
            model = ClientModel {
                nonce: model.nonce,
                ..ClientModel::default()
            };
        }
        if !model.allocated {
            // A fresh credential for a fresh allocation, as an app mints one per call.
            model.creds = None;
        }
        if !model.allocated {
            if model.quiet && rng.chance(90) {
                models[i] = model;
                return;
            }
            let even = rng.chance(15);
            let dual = !even && rng.chance(20);
            let claim = (!even && !dual && rng.chance(10))
                .then(|| {
                    let j = rng.below(CLIENTS as u64) as usize;
                    models[j].token.clone()
                })
                .flatten();
            let lifetime = [0u32, 60, 600, 3600, 100_000][rng.below(5) as usize];
            let (class, code) = self.soak_request(i, &mut model, method::ALLOCATE, &|w| {
                w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
                if even {
                    w.attr(attr::EVEN_PORT, &[0x80]);
                }
                if dual {
                    w.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
                }
                if let Some(t) = &claim {
                    w.attr(attr::RESERVATION_TOKEN, t);
                }
                w.u32_attr(attr::LIFETIME, lifetime);
            });
            match (class, code) {
                (Class::Success, None) => {
                    model.allocated = true;
                    model.quiet = rng.chance(20);
                    model.token = self.reply_attr(attr::RESERVATION_TOKEN);
                }
                // 401: a revoked user's fresh credential.
                (Class::Error, Some(401 | 486 | 508)) => {}
                other => panic!("allocate answered {other:?}"),
            }
            models[i] = model;
            return;
        }
        if model.quiet {
            models[i] = model;
            return;
        }
        match rng.below(10) {
            0 => {
                let lifetime = if rng.chance(30) { 0 } else { 600 };
                let (class, code) = self.soak_request(i, &mut model, method::REFRESH, &|w| {
                    w.u32_attr(attr::LIFETIME, lifetime);
                });
                if code == Some(401) {
                    // Its REST credential expired: it can no longer refresh, so it goes quiet.
                    model.quiet = true;
                } else {
                    assert_eq!((class, code), (Class::Success, None), "refresh");
                }
                if lifetime == 0 && code.is_none() {
                    model.allocated = false;
                    model.token = None;
                    model.peers.clear();
                }
            }
            1..=3 => {
                let p = peer_pool(rng);
                let (class, code) =
                    self.soak_request(i, &mut model, method::CREATE_PERMISSION, &|w| {
                        w.xor_address(attr::XOR_PEER_ADDRESS, p);
                    });
                match (class, code) {
                    (Class::Success, None) => model.peers.push(p),
                    (Class::Error, Some(401 | 403 | 443 | 508)) => {}
                    other => panic!("CreatePermission {p} answered {other:?}"),
                }
            }
            4 | 5 => {
                let p = peer_pool(rng);
                let number = 0x4000 + rng.below(4) as u16;
                let (class, code) = self.soak_request(i, &mut model, method::CHANNEL_BIND, &|w| {
                    w.attr(
                        attr::CHANNEL_NUMBER,
                        &[(number >> 8) as u8, number as u8, 0, 0],
                    )
                    .xor_address(attr::XOR_PEER_ADDRESS, p);
                });
                match (class, code) {
                    (Class::Success, None) => model.peers.push(p),
                    (Class::Error, Some(400 | 401 | 403 | 443 | 508)) => {}
                    other => panic!("ChannelBind answered {other:?}"),
                }
            }
            6 => {
                if let Some(&p) = model.peers.last() {
                    let _ = self.send_indication(&ft, p, b"soak");
                    let mut cd = vec![0x40, 0x00, 0, 4];
                    cd.extend_from_slice(b"data");
                    let _ = self.send(&ft, &cd);
                }
            }
            7 => {
                let slot = self.core.by_client[&ft];
                let relays = self.core.slots[slot as usize]
                    .alloc
                    .as_ref()
                    .unwrap()
                    .relays;
                if let (Some(relay), Some(&p)) =
                    (relays.iter().flatten().next(), model.peers.last())
                {
                    let _ = self.peer_sends(relay.local, p, b"from the peer");
                }
            }
            _ => {
                // Keepalive that is no TURN request at all.
                let _ =
                    self.core
                        .handle_client(self.now, &ft, b"\x00\x11\x00\x00", &mut self.reply);
            }
        }
        models[i] = model;
    }

    /// Traffic from nobody in particular: garbage, unauthenticated and wrongly signed requests.
    fn noise(&mut self, rng: &mut Rng) {
        let ft = FiveTuple {
            client: SocketAddr::new(IpAddr::from([198, 18, 0, rng.below(200) as u8]), 999),
            ..client(0)
        };
        let mut junk = vec![0u8; rng.below(120) as usize];
        junk.iter_mut().for_each(|b| *b = rng.next() as u8);
        let _ = self.send(&ft, &junk);
        if rng.chance(50) {
            let nonce = self.nonce(&ft);
            let txid = self.txid();
            let req = self.request(
                method::ALLOCATE,
                txid,
                &creds("alice", "wrong"),
                &nonce,
                |w| {
                    w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
                },
            );
            assert_eq!(self.call(&ft, &req), (Class::Error, Some(401)));
        }
    }

    /// Every table, timer and counter is exactly what the live allocations need.
    fn check_accounting(&mut self, peak: usize) {
        let now = self.now;
        let core = &self.core;
        let live: Vec<(u32, &Allocation)> = core
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.alloc.as_deref().map(|a| (i as u32, a)))
            .collect();
        assert_eq!(core.allocation_count(), live.len());
        assert_eq!(core.by_client.len(), live.len());
        assert_eq!(
            core.timers.len(),
            live.len(),
            "one timer entry per live allocation"
        );
        assert_eq!(core.slots.len(), live.len() + core.free_slots.len());
        assert!(core.slots.len() <= peak, "slot table grew past the peak");
        let stats = core.stats();
        assert_eq!(
            stats.allocations_created - stats.allocations_ended,
            live.len() as u64
        );

        let mut units: HashMap<QuotaKey, u32> = HashMap::new();
        let mut lapsed = Vec::new();
        let mut reserved = 0;
        let mut relays_open = 0;
        for &(slot, a) in &live {
            assert_eq!(core.by_client.get(&a.five_tuple), Some(&slot));
            assert!(a.expires > now, "a live allocation is not past its expiry");
            let due = a
                .reservation
                .map_or(a.expires, |r| r.expires.min(a.expires));
            assert_eq!(core.timers.deadline(slot), Some(due));
            *units.entry(a.quota_key.clone()).or_default() += 1;
            if let Some(r) = a.reservation {
                assert!(r.expires > now);
                // Unclaimed as far as this core knows; a claim removes it from the shared table.
                if self.core_relays_hold(r.token) {
                    *units.entry(a.quota_key.clone()).or_default() += 1;
                    reserved += 1;
                }
            }
            for r in a.relays.iter().flatten() {
                relays_open += 1;
                assert_eq!(
                    core.relays.open.get(&r.id),
                    Some(&r.local),
                    "relay socket open"
                );
                assert!(self.shared.live_relays.contains(&r.local));
            }
            assert!(a.permissions.len() <= core.config.limits.permissions_per_allocation);
            assert!(a.channels.len() <= core.config.limits.channels_per_allocation);
            // A binding outlives the permission it installed (600 s against 300 s, RFC 8656
            // §12): such a channel must relay nothing until the permission is refreshed.
            for c in a.channels.iter().filter(|c| c.expires > now) {
                if !a.has_permission(c.peer.ip(), now) {
                    lapsed.push((a.five_tuple, c.number));
                }
            }
        }
        assert_eq!(
            core.relays.open.len(),
            relays_open,
            "no relay socket outlives its allocation"
        );
        assert_eq!(
            core.relays.reserved.len(),
            reserved,
            "no reserved socket outlives its owner"
        );
        assert_eq!(self.shared.reserved_ports(), reserved);
        assert_eq!(self.shared.quotas().snapshot(), units, "quota counters");
        let total: u32 = units.values().sum();
        assert_eq!(self.shared.total_allocations(), total);
        for (ft, number) in lapsed {
            let mut cd = number.to_be_bytes().to_vec();
            cd.extend_from_slice(&[0, 4, 1, 2, 3, 4]);
            assert_eq!(
                self.send(&ft, &cd),
                ClientAction::Drop,
                "channel {number:#x} without a permission relayed"
            );
        }
    }

    fn core_relays_hold(&self, token: u64) -> bool {
        self.core.relays.reserved.contains_key(&token)
    }
}

#[test]
fn a_simulated_day_leaks_nothing_and_keeps_every_invariant() {
    let mut h = Harness::with(config(soak_limits(), false, true));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut models = vec![ClientModel::default(); CLIENTS];
    let mut peak = 0;
    let mut revoked = 0;
    let steps_per_hour = 3600 / STEP_SECS;
    for step in 1..=HOURS * steps_per_hour {
        for _ in 0..OPS_PER_STEP {
            // Half the requests come from a tenth of the clients: those in a call right now.
            let i = if rng.chance(50) {
                rng.below(CLIENTS as u64 / 10)
            } else {
                rng.below(CLIENTS as u64)
            } as usize;
            h.step_client(&mut rng, &mut models, i);
            peak = peak.max(h.core.allocation_count());
        }
        if rng.chance(20) {
            h.noise(&mut rng);
        }
        h.advance(STEP_SECS);
        if step % steps_per_hour == 0 {
            // A reload with the same settings, then a revocation: allocations survive the first,
            // the revoked user's end at once.
            let cfg = (*h.core.config).clone();
            h.core.set_config(Arc::new(cfg));
            let mut cfg = (*h.core.config).clone();
            let user = format!("user{}", rng.below(97));
            cfg.auth.revoke_user(&user, h.now_unix() + 7200);
            h.core.set_config(Arc::new(cfg));
            revoked += h
                .core
                .end_user(&user, h.now, crate::proto::error::EndReason::Revoked);
            h.check_accounting(peak);
        }
    }
    let stats = *h.core.stats();
    eprintln!(
        "soak: {} allocations created, {} ended, peak {peak} live, {revoked} revoked, {} relayed to peers, {} to clients",
        stats.allocations_created,
        stats.allocations_ended,
        stats.to_peer_packets,
        stats.to_client_packets
    );
    // The run must have exercised what it claims to.
    assert!(stats.allocations_created > 10_000, "{stats:?}");
    assert!(stats.allocations_ended > 10_000);
    assert!(stats.to_peer_packets > 1_000 && stats.to_client_packets > 1_000);
    assert!(
        stats.denied_peers > 100 && stats.quota_rejections > 100,
        "{stats:?}"
    );
    assert!(!h.core.relays.dropped_reservations.is_empty());
    assert!(peak > 500);

    h.core
        .close_all(h.now, crate::proto::error::EndReason::Shutdown);
    h.check_accounting(peak);
    assert_eq!(h.core.timers.len(), 0);
    assert_eq!(h.shared.total_allocations(), 0);
    assert!(h.core.relays.open.is_empty() && h.core.relays.reserved.is_empty());
}

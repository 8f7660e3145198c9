//! What the request paths cost the heap, counted by this test binary's own global allocator:
//! heap calls per Allocate, CreatePermission, ChannelBind and Refresh once the core's tables are
//! warm, bytes held per live allocation, and what is left after every allocation is deleted.
//!
//! The core is driven in process, as the shard drives it, with relay sockets answered by a
//! stand-in that allocates nothing, so every heap call counted is the core's. Counting is per
//! thread: the test harness's other threads (and its output) never reach the counters.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use turnpike::proto::auth::{long_term_key, Authenticator, PasswordAlgorithm, StaticUser};
use turnpike::proto::codec::{attr, method, Class, Message, MessageWriter};
use turnpike::proto::policy::{PeerPolicy, PolicyConfig};
use turnpike::proto::server::{
    ClientAction, Command, Core, CoreConfig, Limits, OpenedRelay, RelayAddress, Shared,
};
use turnpike::proto::{FiveTuple, Transport};

struct Counting;

thread_local! {
    static CALLS: Cell<u64> = const { Cell::new(0) };
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

fn count(calls: u64, bytes: i64) {
    // `try_with`: a thread being torn down may still free memory after its counters are gone.
    let _ = CALLS.try_with(|c| c.set(c.get() + calls));
    let _ = LIVE.try_with(|l| l.set(l.get() + bytes));
}

// SAFETY: every call goes to the system allocator unchanged; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(1, layout.size() as i64);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(1, layout.size() as i64);
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(0, -(layout.size() as i64));
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(1, new_size as i64 - layout.size() as i64);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap calls and live bytes of this thread so far.
fn heap() -> (u64, i64) {
    (CALLS.with(Cell::get), LIVE.with(Cell::get))
}

const REALM: &str = "memory.realm";
const USER: &str = "loaduser";
const PASSWORD: &str = "loadpass";
const UNIX0: u64 = 1_800_000_000;
const HELD: usize = 5000;
const RELAY_IP: [u8; 4] = [192, 0, 2, 10];
const PEER: &str = "198.51.100.1:5000";
const CHANNEL: u16 = 0x4000;

fn core(t0: Instant) -> Core {
    let auth = Authenticator::new(
        REALM.into(),
        HashMap::from([(USER.to_string(), StaticUser::Password(PASSWORD.into()))]),
        None,
    );
    let relay = IpAddr::from(RELAY_IP);
    let policy = PeerPolicy::new(PolicyConfig {
        allow: vec!["198.51.100.0/24".parse().unwrap()],
        relay_ips: vec![relay],
        relay_ports: (10_000, 29_999),
        service_endpoints: vec!["0.0.0.0:3478".parse().unwrap()],
        ..PolicyConfig::default()
    });
    let config = CoreConfig {
        software: None,
        auth,
        policy,
        // What a load test configures: one static user from one address, no quota in the way.
        limits: Limits {
            allocations_per_user: 0,
            total_allocations: 0,
            unauth_replies_per_sec: 0,
            ..Limits::default()
        },
        relay_v4: Some(RelayAddress {
            local: relay,
            advertised: relay,
        }),
        relay_v6: None,
        nat_discovery: Vec::new(),
    };
    let shared = Arc::new(Shared::new([7; 32], 600, t0, UNIX0));
    Core::new(Arc::new(config), shared, 1)
}

fn client(i: usize) -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        client: SocketAddr::new(IpAddr::from([203, 0, 113, 1 + (i / 50_000) as u8]), {
            10_000 + (i % 50_000) as u16
        }),
        local: "192.0.2.10:3478".parse().unwrap(),
    }
}

/// Client-side buffers, all sized once so building a request allocates nothing.
struct Driver {
    core: Core,
    now: Instant,
    key: Vec<u8>,
    request: Vec<u8>,
    reply: Vec<u8>,
    nonces: Vec<Vec<u8>>,
    txid: u64,
    next_port: u16,
}

impl Driver {
    fn new() -> Self {
        let now = Instant::now();
        let key = long_term_key(PasswordAlgorithm::Md5, USER, REALM, PASSWORD);
        Driver {
            core: core(now),
            now,
            key: key.as_bytes().to_vec(),
            request: Vec::with_capacity(2048),
            reply: Vec::with_capacity(2048),
            nonces: (0..HELD).map(|_| Vec::with_capacity(128)).collect(),
            txid: 0,
            next_port: 10_000,
        }
    }

    fn build(&mut self, m: u16, nonce: Option<usize>, fill: impl FnOnce(&mut MessageWriter)) {
        self.txid += 1;
        let mut txid = [0u8; 12];
        txid[..8].copy_from_slice(&self.txid.to_be_bytes());
        self.request.clear();
        let mut w = MessageWriter::new(&mut self.request, m, Class::Request, txid);
        fill(&mut w);
        if let Some(i) = nonce {
            w.attr(attr::USERNAME, USER.as_bytes())
                .attr(attr::REALM, REALM.as_bytes())
                .attr(attr::NONCE, &self.nonces[i])
                .integrity(&self.key);
        }
        w.fingerprint();
    }

    /// Sends the built request from client `i` and carries out the core's commands as the
    /// shard would; returns the answer's class and error code.
    fn send(&mut self, i: usize) -> (Class, Option<u16>) {
        let ft = client(i);
        let mut action = self
            .core
            .handle_client(self.now, &ft, &self.request, &mut self.reply);
        while let Some(command) = self.core.poll_command() {
            if let Command::OpenRelay(req) = command {
                let port = self.next_port;
                self.next_port = if port == 29_999 { 10_000 } else { port + 1 };
                let opened = OpenedRelay {
                    local: SocketAddr::new(IpAddr::from(RELAY_IP), port),
                    reservation_token: None,
                };
                action = self
                    .core
                    .relay_opened(self.now, req.id, Ok(opened), &mut self.reply);
            }
        }
        assert!(
            matches!(action, ClientAction::Reply { .. }),
            "no answer to client {i}"
        );
        let msg = Message::parse(&self.reply).expect("the answer parses");
        let code = msg.get(attr::ERROR_CODE).map(|a| {
            let v = a.value;
            u16::from(v[2] & 7) * 100 + u16::from(v[3])
        });
        (msg.class, code)
    }

    /// The 401 round: the answer's NONCE is kept for client `i`'s authenticated requests.
    fn challenge(&mut self, i: usize) {
        self.build(method::ALLOCATE, None, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        });
        assert_eq!(self.send(i), (Class::Error, Some(401)));
        let msg = Message::parse(&self.reply).unwrap();
        let nonce = msg.get(attr::NONCE).expect("a 401 carries a nonce").value;
        self.nonces[i].clear();
        self.nonces[i].extend_from_slice(nonce);
    }

    fn allocate(&mut self, i: usize) {
        self.build(method::ALLOCATE, Some(i), |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        });
        assert_eq!(self.send(i), (Class::Success, None), "Allocate {i}");
    }

    fn create_permission(&mut self, i: usize) {
        let peer: SocketAddr = PEER.parse().unwrap();
        self.build(method::CREATE_PERMISSION, Some(i), |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
        assert_eq!(self.send(i), (Class::Success, None), "CreatePermission {i}");
    }

    fn channel_bind(&mut self, i: usize) {
        let peer: SocketAddr = PEER.parse().unwrap();
        self.build(method::CHANNEL_BIND, Some(i), |w| {
            w.u32_attr(attr::CHANNEL_NUMBER, u32::from(CHANNEL) << 16)
                .xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
        assert_eq!(self.send(i), (Class::Success, None), "ChannelBind {i}");
    }

    fn refresh(&mut self, i: usize, lifetime: u32) {
        self.build(method::REFRESH, Some(i), |w| {
            w.u32_attr(attr::LIFETIME, lifetime);
        });
        assert_eq!(self.send(i), (Class::Success, None), "Refresh {i}");
    }
}

/// Heap calls and bytes of each step, summed over `HELD` allocations.
#[derive(Default, Debug)]
struct Cost {
    challenge: u64,
    allocate: u64,
    create_permission: u64,
    channel_bind: u64,
    refresh: u64,
    delete: u64,
    /// Live bytes with every allocation held, above the start.
    held_bytes: i64,
    /// Live bytes after every allocation is deleted, above the start.
    after_bytes: i64,
}

/// One round: `HELD` allocations set up the way the load generator does it (401, Allocate,
/// CreatePermission, ChannelBind, Refresh), all held, then all deleted with Refresh lifetime 0.
fn round(d: &mut Driver) -> Cost {
    let mut cost = Cost::default();
    let start = heap().1;
    let step = |d: &mut Driver, f: fn(&mut Driver, usize), i: usize, sum: &mut u64| {
        let before = heap().0;
        f(d, i);
        *sum += heap().0 - before;
    };
    // `challenge` copies the nonce into a buffer sized for it up front, so the driver's own
    // work never shows in the counts.
    for i in 0..HELD {
        step(d, Driver::challenge, i, &mut cost.challenge);
        step(d, Driver::allocate, i, &mut cost.allocate);
        step(d, Driver::create_permission, i, &mut cost.create_permission);
        step(d, Driver::channel_bind, i, &mut cost.channel_bind);
        step(d, |d, i| d.refresh(i, 600), i, &mut cost.refresh);
    }
    assert_eq!(d.core.allocation_count(), HELD);
    cost.held_bytes = heap().1 - start;
    for i in 0..HELD {
        step(d, |d, i| d.refresh(i, 0), i, &mut cost.delete);
    }
    assert_eq!(d.core.allocation_count(), 0);
    // Tables shrink on the timer path, as the shard calls it after its deletions.
    d.now += Duration::from_secs(1);
    d.core.handle_timeout(d.now);
    while d.core.poll_command().is_some() {}
    cost.after_bytes = heap().1 - start;
    cost
}

#[test]
fn request_paths_allocate_little_and_the_heap_returns_after_deletes() {
    let mut d = Driver::new();
    // The first round grows every table from nothing; the second shows the steady state of a
    // server that has seen this many allocations before.
    let first = round(&mut d);
    let warm = round(&mut d);
    let per = |n: u64| n as f64 / HELD as f64;
    eprintln!(
        "size of an allocation's record: {} bytes",
        std::mem::size_of::<turnpike::proto::allocation::Allocation>()
    );
    eprintln!("first round: {first:?}");
    eprintln!("warm round:  {warm:?}");
    eprintln!(
        "per allocation (warm): 401 {:.2} calls, Allocate {:.2}, CreatePermission {:.2}, \
         ChannelBind {:.2}, Refresh {:.2}, delete {:.2}; {:.0} bytes held; {} bytes left after all \
         deleted (first round: {} left)",
        per(warm.challenge),
        per(warm.allocate),
        per(warm.create_permission),
        per(warm.channel_bind),
        per(warm.refresh),
        per(warm.delete),
        warm.held_bytes as f64 / HELD as f64,
        warm.after_bytes,
        first.after_bytes,
    );
    assert_eq!(warm.challenge, 0, "a 401 allocates nothing");
    assert_eq!(
        warm.create_permission, 0,
        "CreatePermission on a live allocation allocates nothing"
    );
    assert_eq!(warm.channel_bind, 0, "ChannelBind allocates nothing");
    assert_eq!(warm.refresh, 0, "Refresh allocates nothing");
    assert!(
        per(warm.allocate) <= ALLOCATE_CALLS,
        "Allocate: {:.2} heap calls each, at most {ALLOCATE_CALLS} expected",
        per(warm.allocate)
    );
    assert!(
        per(warm.delete) <= 0.1,
        "deleting an allocation allocates nothing (amortised table shrinking aside)"
    );
    assert!(
        warm.held_bytes as f64 / HELD as f64 <= HELD_BYTES_PER_ALLOCATION,
        "{} bytes held per allocation, at most {HELD_BYTES_PER_ALLOCATION} expected",
        warm.held_bytes / HELD as i64
    );
    for (name, c) in [("first", &first), ("warm", &warm)] {
        assert!(
            c.after_bytes <= LEFT_AFTER_DELETES,
            "{name} round: {} bytes still held after every allocation was deleted, at most \
             {LEFT_AFTER_DELETES} expected: the core's tables must shrink",
            c.after_bytes
        );
    }
}

/// Heap calls an Allocate may make: the allocation itself, its username and quota key, its
/// answers for retransmissions, its permission and channel tables (measured: 6, and 0.01 for
/// the tables growing back).
const ALLOCATE_CALLS: f64 = 6.1;
/// Core heap per held allocation with one permission and one channel, the core's tables
/// included (measured: about 1120 bytes).
const HELD_BYTES_PER_ALLOCATION: f64 = 1280.0;
/// What may stay after every allocation is deleted: tables at their floor capacity.
const LEFT_AFTER_DELETES: i64 = 16 * 1024;

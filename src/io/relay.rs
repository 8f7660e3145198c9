//! Relay sockets: bound on demand from the configured port range, owned by the shard whose core
//! created the allocation, and looked up by slot index on the packet path (no hashing, no lock).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use socket2::{Domain, Protocol, Socket, Type};

use super::random::RandomPool;
use super::udp::{register, setsockopt_int, RegisteredSocket};
use crate::proto::allocation::RelayId;
use crate::proto::server::{OpenRelay, OpenedRelay, RelayOpenError, RelaySource};

/// Random probes before falling back to a linear scan of the range.
const RANDOM_PROBES: usize = 32;

/// Sockets of ports reserved by EVEN-PORT R=1, claimable from any shard with their token. The
/// core decides when a reservation ends (claimed, expired, or its allocation gone); this only
/// holds the sockets meanwhile.
#[derive(Default)]
pub struct Reservations {
    held: Mutex<HashMap<u64, Bound>>,
}

impl Reservations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Bound>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn put(&self, token: u64, socket: Bound) {
        self.lock().insert(token, socket);
    }

    fn take(&self, token: u64) -> Option<Bound> {
        self.lock().remove(&token)
    }
}

/// A relay socket and the address it is bound to: known from the bind, so no getsockname.
type Bound = (std::net::UdpSocket, SocketAddr);

/// A UDP socket for `ip`'s family, non-blocking and close-on-exec from its one `socket` call
/// (no fcntl round trips), IPv6 sockets IPv6 only (one socket per family keeps address-family
/// handling explicit). Not bound yet: a bind refused for a taken port leaves it unbound, so one
/// socket serves every port probed.
fn relay_socket(ip: IpAddr) -> io::Result<Socket> {
    let domain = Domain::for_address(SocketAddr::new(ip, 0));
    let socket = Socket::new(domain, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    if ip.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

struct Entry {
    gen: u32,
    socket: Rc<RegisteredSocket>,
    task: Option<JoinHandle<()>>,
    /// DONT-FRAGMENT in the Allocate: every datagram leaves with DF.
    dont_fragment: bool,
    /// Whether the socket is in DF mode now; a Send indication's own DONT-FRAGMENT switches it.
    df_now: bool,
}

pub struct ShardRelays {
    ports: (u16, u16),
    /// Indexed by allocation slot, then [IPv4, IPv6].
    table: Vec<[Option<Entry>; 2]>,
    /// Sockets opened during a core call; the shard spawns their receive tasks right after.
    pending: Vec<(RelayId, Rc<RegisteredSocket>)>,
    reservations: Arc<Reservations>,
    rng: RandomPool,
    open_count: usize,
    /// The most sockets open since the heap was last trimmed (see `trim_heap`).
    peak_since_trim: usize,
}

impl ShardRelays {
    pub fn new(ports: (u16, u16), reservations: Arc<Reservations>) -> Self {
        ShardRelays {
            ports,
            table: Vec::new(),
            pending: Vec::new(),
            reservations,
            rng: RandomPool::default(),
            open_count: 0,
            peak_since_trim: 0,
        }
    }

    pub fn open_count(&self) -> usize {
        self.open_count
    }

    /// The socket for sending to a peer, if the relay still exists, with DF set for this
    /// datagram when it or its allocation asked for it (RFC 8656 §7.2, §11.2).
    pub fn socket_for_send(
        &mut self,
        id: RelayId,
        dont_fragment: bool,
    ) -> Option<&std::net::UdpSocket> {
        self.registered_for_send(id, dont_fragment)
            .map(|s| s.get_ref())
    }

    /// [`Self::socket_for_send`], shared: a send queue holds it until its flush.
    pub fn registered_for_send(
        &mut self,
        id: RelayId,
        dont_fragment: bool,
    ) -> Option<&Rc<RegisteredSocket>> {
        let e = self.entry_mut(id)?;
        let want = e.dont_fragment || dont_fragment;
        if want != e.df_now {
            // Only Send indications that differ from their predecessor pay these syscalls;
            // ChannelData never asks.
            set_dont_fragment(e.socket.get_ref(), id.v6, want);
            e.df_now = want;
        }
        Some(&e.socket)
    }

    pub fn take_pending(&mut self) -> Vec<(RelayId, Rc<RegisteredSocket>)> {
        std::mem::take(&mut self.pending)
    }

    pub fn set_task(&mut self, id: RelayId, task: JoinHandle<()>) {
        match self.entry_mut(id) {
            Some(e) => e.task = Some(task),
            // Closed before its task started.
            None => task.abort(),
        }
    }

    fn entry_mut(&mut self, id: RelayId) -> Option<&mut Entry> {
        self.table
            .get_mut(id.slot as usize)
            .and_then(|e| e[id.v6 as usize].as_mut())
            .filter(|e| e.gen == id.gen)
    }

    fn random_u64(&self) -> u64 {
        self.rng.next_u64()
    }

    fn install(
        &mut self,
        id: RelayId,
        (socket, local): Bound,
        dont_fragment: bool,
    ) -> io::Result<SocketAddr> {
        if dont_fragment {
            set_dont_fragment(&socket, id.v6, true);
        }
        let socket = Rc::new(register(socket)?);
        let slot = id.slot as usize;
        if self.table.len() <= slot {
            self.table.resize_with(slot + 1, || [None, None]);
        }
        self.pending.push((id, Rc::clone(&socket)));
        self.table[slot][id.v6 as usize] = Some(Entry {
            gen: id.gen,
            socket,
            task: None,
            dont_fragment,
            df_now: dont_fragment,
        });
        self.open_count += 1;
        self.peak_since_trim = self.peak_since_trim.max(self.open_count);
        Ok(local)
    }

    /// Binds a port from the range: random probes first (unpredictable ports, few collisions),
    /// then a scan so a nearly full range still finds its last free ports. Any error other than
    /// "port in use" (out of file descriptors, say) ends the search at once: no other port
    /// would fare better, and scanning 16k ports per Allocate would stall the shard. A probe
    /// of a taken port costs one refused bind, not a socket opened and closed.
    fn bind_in_range(
        &self,
        ip: IpAddr,
        even: bool,
        with_next: bool,
    ) -> Result<(Bound, Option<Bound>), io::Error> {
        let (lo, hi) = self.ports;
        let span = (hi - lo) as u64 + 1;
        let taken = |e: &io::Error| e.kind() == io::ErrorKind::AddrInUse;
        // Unbound sockets carried from one probe to the next.
        let mut spare: Option<Socket> = None;
        let mut spare_next: Option<Socket> = None;
        // Ok(None): this port (or its neighbour) is taken, try another.
        let mut try_port = |port: u16| -> io::Result<Option<(Bound, Option<Bound>)>> {
            if (even && port % 2 != 0) || (with_next && (port == u16::MAX || port + 1 > hi)) {
                return Ok(None);
            }
            let first = match spare.take() {
                Some(s) => s,
                None => relay_socket(ip)?,
            };
            let addr = SocketAddr::new(ip, port);
            match first.bind(&addr.into()) {
                Ok(()) => {}
                Err(e) if taken(&e) => {
                    spare = Some(first);
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
            if !with_next {
                return Ok(Some(((first.into(), addr), None)));
            }
            let next = match spare_next.take() {
                Some(s) => s,
                None => relay_socket(ip)?,
            };
            let next_addr = SocketAddr::new(ip, port + 1);
            match next.bind(&next_addr.into()) {
                Ok(()) => Ok(Some(((first.into(), addr), Some((next.into(), next_addr))))),
                // `first` is bound now and closes here; the neighbour's socket is still unbound.
                Err(e) if taken(&e) => {
                    spare_next = Some(next);
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        };
        for _ in 0..RANDOM_PROBES {
            let port = lo + (self.random_u64() % span) as u16;
            let port = if even { port & !1 } else { port };
            if port < lo {
                continue;
            }
            if let Some(found) = try_port(port)? {
                return Ok(found);
            }
        }
        let start = self.random_u64() % span;
        for i in 0..span {
            if let Some(found) = try_port(lo + ((start + i) % span) as u16)? {
                return Ok(found);
            }
        }
        Err(io::ErrorKind::AddrInUse.into())
    }
}

/// Trimming is worth its cost once this many allocations' memory (about 2 KiB each) is free.
const TRIM_FROM: usize = 64;
/// ... and once the last relay of at least this many closes.
const TRIM_LAST_FROM: usize = 16;

/// Hands the heap's free pages back to the system after half the relays open at the peak have
/// closed (so at most once per halving, never per packet). glibc's malloc returns memory on
/// its own only from the top of a heap: what ended allocations freed in the middle of the
/// shard threads' arenas would stay resident for good (measured: 8% of the growth returned
/// after 5000 allocations ended; 92% with this). It was chosen over jemalloc and mimalloc:
/// jemalloc returns as much only with a background purging thread and a 1 s decay (and adds a
/// C build and 17 MB of binary), and mimalloc held 5.3 KiB per allocation against glibc's
/// 2.0 and returned 8%. One call walks every arena, a millisecond or so for tens of MB.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn open_error(e: io::Error) -> RelayOpenError {
    match e.kind() {
        io::ErrorKind::AddrInUse => RelayOpenError::NoPort,
        kind => RelayOpenError::Os(kind),
    }
}

/// DF on (never fragment locally, EMSGSIZE past the path MTU) or back to the kernel's default
/// path-MTU discovery. A failure leaves the socket as it was, which costs at most a fragment.
fn set_dont_fragment(socket: &std::net::UdpSocket, v6: bool, on: bool) {
    let (level, name, value) = match v6 {
        true => (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, i32::from(on)),
        false => (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            if on {
                libc::IP_PMTUDISC_DO
            } else {
                libc::IP_PMTUDISC_WANT
            },
        ),
    };
    // Best effort: a refused option costs at most a fragment, never the datagram.
    let _ = setsockopt_int(socket.as_raw_fd(), level, name, value);
}

impl ShardRelays {
    /// Carries out the core's [`OpenRelay`].
    pub fn open(&mut self, req: &OpenRelay) -> Result<OpenedRelay, RelayOpenError> {
        // No log here: the core logs refusals, throttled, since a client can cause them at will.
        let (socket, next) = match req.source {
            RelaySource::Bind {
                ip,
                even_port,
                reserve_next,
            } => self
                .bind_in_range(ip, even_port, reserve_next)
                .map_err(open_error)?,
            RelaySource::Reserved(token) => {
                let socket = self
                    .reservations
                    .take(token)
                    .ok_or(RelayOpenError::UnknownToken)?;
                (socket, None)
            }
        };
        let local = self
            .install(req.id, socket, req.dont_fragment)
            .map_err(open_error)?;
        let reservation_token = next.map(|next| {
            let token = self.random_u64();
            self.reservations.put(token, next);
            token
        });
        Ok(OpenedRelay {
            local,
            reservation_token,
        })
    }

    pub fn drop_reservation(&mut self, token: u64) {
        self.reservations.take(token);
    }

    pub fn close(&mut self, id: RelayId) {
        let Some(slot) = self.table.get_mut(id.slot as usize) else {
            return;
        };
        let entry = &mut slot[id.v6 as usize];
        if entry.as_ref().is_some_and(|e| e.gen == id.gen) {
            if let Some(e) = entry.take() {
                if let Some(task) = e.task {
                    task.abort();
                }
                self.open_count -= 1;
            }
        }
        self.pending.retain(|(p, _)| *p != id);
        self.shrink();
        let halved = self.open_count <= self.peak_since_trim / 2;
        // The last relay of a burst closing trims too, however small the last halving was.
        let last = self.open_count == 0 && self.peak_since_trim >= TRIM_LAST_FROM;
        if (self.peak_since_trim >= TRIM_FROM && halved) || last {
            trim_heap();
            self.peak_since_trim = self.open_count;
        }
    }

    /// Cuts the table's empty tail and gives back its room once it is mostly empty; the core
    /// reuses its lowest free slots first, so after a burst of allocations ends the tail is
    /// empty. Each cut entry was pushed once, so the work is amortised.
    fn shrink(&mut self) {
        while self
            .table
            .last()
            .is_some_and(|e| e[0].is_none() && e[1].is_none())
        {
            self.table.pop();
        }
        if self.table.capacity() > 64.max(4 * self.table.len()) {
            self.table.shrink_to(2 * self.table.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::server::RelayTransport;

    fn df_mode(socket: &std::net::UdpSocket) -> i32 {
        sockopt(socket, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER)
    }

    fn sockopt(socket: &std::net::UdpSocket, level: i32, name: i32) -> i32 {
        let mut value: i32 = -1;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: valid fd, out-pointers sized as advertised.
        unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                name,
                &mut value as *mut i32 as *mut libc::c_void,
                &mut len,
            );
        }
        value
    }

    #[test]
    fn a_send_indication_sets_df_for_its_datagram_and_the_next_one_clears_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut relays = ShardRelays::new((40000, 60000), Arc::default());
            let id = RelayId {
                slot: 0,
                gen: 0,
                v6: false,
            };
            let req = OpenRelay {
                id,
                transport: RelayTransport::Udp,
                source: RelaySource::Bind {
                    ip: "127.0.0.1".parse().unwrap(),
                    even_port: false,
                    reserve_next: false,
                },
                dont_fragment: false,
            };
            relays.open(&req).unwrap();
            let default = df_mode(relays.socket_for_send(id, false).unwrap());
            assert_ne!(default, libc::IP_PMTUDISC_DO);
            assert_eq!(
                df_mode(relays.socket_for_send(id, true).unwrap()),
                libc::IP_PMTUDISC_DO
            );
            assert_eq!(
                df_mode(relays.socket_for_send(id, false).unwrap()),
                libc::IP_PMTUDISC_WANT
            );
            // An allocation that asked for DF keeps it on every datagram.
            let df_id = RelayId { slot: 1, ..id };
            relays
                .open(&OpenRelay {
                    id: df_id,
                    transport: RelayTransport::Udp,
                    dont_fragment: true,
                    ..req
                })
                .unwrap();
            assert_eq!(
                df_mode(relays.socket_for_send(df_id, false).unwrap()),
                libc::IP_PMTUDISC_DO
            );
            // IPv6 has no fragmenting routers; DF there means "do not fragment locally".
            let v6 = RelayId {
                slot: 2,
                v6: true,
                ..id
            };
            let v6_open = OpenRelay {
                id: v6,
                transport: RelayTransport::Udp,
                source: RelaySource::Bind {
                    ip: "::1".parse().unwrap(),
                    even_port: false,
                    reserve_next: false,
                },
                dont_fragment: false,
            };
            if relays.open(&v6_open).is_ok() {
                let dontfrag = |r: &mut ShardRelays, df| {
                    sockopt(
                        r.socket_for_send(v6, df).unwrap(),
                        libc::IPPROTO_IPV6,
                        libc::IPV6_DONTFRAG,
                    )
                };
                assert_eq!(dontfrag(&mut relays, true), 1);
                assert_eq!(dontfrag(&mut relays, false), 0);
            }
        });
    }
}

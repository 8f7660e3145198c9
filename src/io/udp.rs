//! UDP listener sockets: SO_REUSEPORT so every shard binds the same address and the kernel spreads
//! clients by 5-tuple hash; batched receive (recvmmsg) and per-datagram source-address control
//! (IP_PKTINFO) through `quinn-udp`, so a wildcard listener answers from the address it was asked on.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState, BATCH_SIZE};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Largest datagram a listener accepts; anything bigger is not a TURN message.
pub const MAX_DATAGRAM: usize = 65536;
const SOCKET_BUFFER: usize = 4 << 20;

pub struct Listener {
    pub socket: UdpSocket,
    state: UdpSocketState,
    pub bound: SocketAddr,
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a valid pointer to an int of the advertised size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A UDP socket with the buffers and options every turnpike socket wants.
pub fn bind_udp(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // One socket per family keeps address-family handling explicit.
        socket.set_only_v6(true)?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Asks for big kernel buffers: bursts from many clients must not overflow a shard's queue.
/// Unprivileged processes are capped at net.core.[rw]mem_max, so failure is only logged.
fn enlarge_buffers(socket: &Socket) {
    if socket.set_recv_buffer_size(SOCKET_BUFFER).is_err()
        || socket.set_send_buffer_size(SOCKET_BUFFER).is_err()
    {
        tracing::debug!("could not enlarge socket buffers");
    }
    let fd = socket.as_raw_fd();
    // As root, go past the sysctl cap; harmless when it fails.
    let _ = setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        SOCKET_BUFFER as i32,
    );
    let _ = setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        SOCKET_BUFFER as i32,
    );
}

impl Listener {
    /// Must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let socket = bind_udp(addr, true)?;
        enlarge_buffers(&socket);
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        // quinn-udp tunes the socket for QUIC; a relay must forward datagrams as they are:
        // no GRO coalescing, fragmentation allowed as the route decides, no timestamps.
        let fd = socket.as_raw_fd();
        let _ = setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 0);
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 0);
        if addr.is_ipv4() {
            let _ = setsockopt_int(
                fd,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_WANT,
            );
        } else {
            let _ = setsockopt_int(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_WANT,
            );
            let _ = setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0);
        }
        let bound = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an inet socket"))?;
        let socket = UdpSocket::from_std(socket.into())?;
        Ok(Listener {
            socket,
            state,
            bound,
        })
    }

    fn is_wildcard(&self) -> bool {
        self.bound.ip().is_unspecified()
    }

    /// Receives up to [`BATCH_SIZE`] datagrams without blocking.
    pub fn try_recv_batch(&self, bufs: &mut RecvBatch) -> io::Result<usize> {
        let RecvBatch { storage, meta } = bufs;
        let mut slices: [IoSliceMut; BATCH_SIZE] = {
            let mut chunks = storage.chunks_mut(MAX_DATAGRAM);
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()))
        };
        self.socket.try_io(Interest::READABLE, || {
            self.state
                .recv(UdpSockRef::from(&self.socket), &mut slices, &mut meta[..])
        })
    }

    /// The local address of a received datagram: the listener's own, or the one pktinfo reported.
    pub fn local_for(&self, meta: &RecvMeta) -> SocketAddr {
        match (self.is_wildcard(), meta.dst_ip) {
            (true, Some(ip)) => SocketAddr::new(canonical(ip), self.bound.port()),
            _ => self.bound,
        }
    }

    /// Sends without blocking; a full socket buffer drops the datagram, as UDP may. Goes
    /// straight to the kernel: we never wait for writability, so tokio's readiness cache (empty
    /// until the reactor has polled the socket once) must not veto the send.
    pub fn try_send(&self, data: &[u8], to: SocketAddr, from: SocketAddr) -> io::Result<()> {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: data,
            segment_size: None,
            src_ip: self.is_wildcard().then_some(from.ip()),
        };
        self.state
            .try_send(UdpSockRef::from(&self.socket), &transmit)
    }

    /// Whether datagrams for the 5-tuple local address `local` leave through this listener.
    pub fn serves(&self, local: SocketAddr) -> bool {
        self.bound.port() == local.port()
            && self.bound.is_ipv4() == local.is_ipv4()
            && (self.is_wildcard() || self.bound.ip() == local.ip())
    }
}

/// pktinfo on an IPv6 socket may report IPv4-mapped addresses; keep one spelling per address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Receive buffers for one batch, allocated once per listener task.
pub struct RecvBatch {
    storage: Box<[u8]>,
    pub meta: [RecvMeta; BATCH_SIZE],
}

impl RecvBatch {
    pub fn new() -> Self {
        RecvBatch {
            storage: vec![0u8; MAX_DATAGRAM * BATCH_SIZE].into_boxed_slice(),
            meta: [RecvMeta::default(); BATCH_SIZE],
        }
    }

    pub fn datagram(&self, i: usize) -> &[u8] {
        let start = i * MAX_DATAGRAM;
        &self.storage[start..start + self.meta[i].len.min(MAX_DATAGRAM)]
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

//! UDP listener sockets: SO_REUSEPORT so every shard binds the same address and the kernel spreads
//! clients by 5-tuple hash; batched receive (recvmmsg) and per-datagram source-address control
//! (IP_PKTINFO) through `quinn-udp`, so a wildcard listener answers from the address it was asked on.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState, BATCH_SIZE};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

/// Largest datagram a listener accepts; anything bigger is not a TURN message.
pub const MAX_DATAGRAM: usize = 65536;
const SOCKET_BUFFER: usize = 4 << 20;

/// A socket registered with the shard's reactor. Reads go straight to the kernel and readiness is
/// cleared by hand when a batch comes back short (the queue was empty), which saves the extra
/// read that would otherwise only return EAGAIN: about one syscall in eight on a busy relay.
pub type RegisteredSocket = AsyncFd<std::net::UdpSocket>;

/// Registers a socket for read readiness only: sends never wait (a full UDP buffer drops the
/// datagram), so write readiness would only add wake-ups. Must run inside a tokio runtime.
pub fn register(socket: std::net::UdpSocket) -> io::Result<RegisteredSocket> {
    // SAFETY: the AsyncFd owns the socket, so its descriptor stays open and the same for as
    // long as the registration exists.
    let registered =
        unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }?;
    Ok(registered)
}

pub struct Listener {
    socket: RegisteredSocket,
    state: UdpSocketState,
    pub bound: SocketAddr,
}

pub(super) fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
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
        let socket = register(std::net::UdpSocket::from(socket))?;
        Ok(Listener {
            socket,
            state,
            bound,
        })
    }

    fn is_wildcard(&self) -> bool {
        self.bound.ip().is_unspecified()
    }

    pub async fn readable(&self) -> io::Result<AsyncFdReadyGuard<'_, std::net::UdpSocket>> {
        self.socket.readable().await
    }

    /// Receives up to [`BATCH_SIZE`] datagrams without blocking; WouldBlock when none is queued.
    pub fn recv_batch(&self, bufs: &mut RecvBatch) -> io::Result<usize> {
        let RecvBatch { storage, meta } = bufs;
        let mut slices: [IoSliceMut; BATCH_SIZE] = {
            let mut chunks = storage.chunks_mut(MAX_DATAGRAM);
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()))
        };
        self.state.recv(
            UdpSockRef::from(self.socket.get_ref()),
            &mut slices,
            &mut meta[..],
        )
    }

    /// The local address of a received datagram: the listener's own, or the one pktinfo reported.
    pub fn local_for(&self, meta: &RecvMeta) -> SocketAddr {
        match (self.is_wildcard(), meta.dst_ip) {
            (true, Some(ip)) => SocketAddr::new(canonical(ip), self.bound.port()),
            _ => self.bound,
        }
    }

    /// The source address a datagram sent for 5-tuple local address `local` must name: a
    /// wildcard listener answers from the address it was asked on (IP_PKTINFO), a bound one
    /// needs none.
    pub fn source_for(&self, local: SocketAddr) -> Option<IpAddr> {
        self.is_wildcard().then_some(local.ip())
    }

    /// UDP GSO segments per send this socket supports (1: none).
    pub fn gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Whether datagrams for the 5-tuple local address `local` leave through this listener.
    pub fn serves(&self, local: SocketAddr) -> bool {
        self.bound.port() == local.port()
            && self.bound.is_ipv4() == local.is_ipv4()
            && (self.is_wildcard() || self.bound.ip() == local.ip())
    }
}

/// Sends go straight to the kernel (batched, see `send_batch`): we never wait for
/// writability, so tokio's readiness cache (empty until the reactor has polled the socket
/// once) must not veto a send.
impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.get_ref().as_raw_fd()
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

/// Datagrams a relay socket receives per system call.
pub const PEER_BATCH: usize = 8;
/// One receive slot: headroom for the Data indication header, the datagram, tailroom for padding.
pub const PEER_SLOT: usize =
    crate::proto::codec::HEADROOM + MAX_DATAGRAM + crate::proto::codec::TAILROOM;

/// Receive slots shared by every relay socket of a shard (one thread: one socket reads at a
/// time), so ten thousand allocations do not cost ten thousand 64 KiB buffers.
pub struct PeerBatch {
    pub storage: Box<[u8]>,
    pub received: [(usize, SocketAddr); PEER_BATCH],
}

impl PeerBatch {
    pub fn new() -> Self {
        PeerBatch {
            storage: vec![0u8; PEER_SLOT * PEER_BATCH].into_boxed_slice(),
            received: [(0, SocketAddr::from(([0, 0, 0, 0], 0))); PEER_BATCH],
        }
    }

    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.storage[i * PEER_SLOT..(i + 1) * PEER_SLOT]
    }

    pub fn slot(&self, i: usize) -> &[u8] {
        &self.storage[i * PEER_SLOT..(i + 1) * PEER_SLOT]
    }
}

impl Default for PeerBatch {
    fn default() -> Self {
        Self::new()
    }
}

/// recvmmsg into the batch's slots (each datagram lands after the headroom); returns how many
/// arrived, WouldBlock when none was queued.
pub fn recv_peer_batch(socket: &std::net::UdpSocket, batch: &mut PeerBatch) -> io::Result<usize> {
    let headroom = crate::proto::codec::HEADROOM;
    // SAFETY: all-zero bytes are valid values of these plain C structs.
    let mut names: [libc::sockaddr_storage; PEER_BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; PEER_BATCH] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; PEER_BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..PEER_BATCH {
        let start = i * PEER_SLOT + headroom;
        let slot = &mut batch.storage[start..start + MAX_DATAGRAM];
        iovs[i] = libc::iovec {
            iov_base: slot.as_mut_ptr().cast(),
            iov_len: slot.len(),
        };
        msgs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        msgs[i].msg_hdr.msg_namelen =
            std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every pointer refers to the arrays above or to the batch's storage, all alive and
    // exclusively borrowed for the duration of the call; the lengths match the buffers.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            PEER_BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for i in 0..n {
        let mut storage = socket2::SockAddrStorage::zeroed();
        // SAFETY: both are sockaddr_storage-sized plain C structs; view_as gives the same bytes.
        unsafe { *storage.view_as::<libc::sockaddr_storage>() = names[i] };
        // SAFETY: the kernel wrote a socket address of msg_namelen bytes into names[i].
        let addr = unsafe { SockAddr::new(storage, msgs[i].msg_hdr.msg_namelen) };
        let from = addr
            .as_socket()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        batch.received[i] = (msgs[i].msg_len as usize, from);
    }
    Ok(n)
}

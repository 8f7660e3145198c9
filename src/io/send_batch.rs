//! Outgoing datagram batches. Frames produced while a shard handles one wake-up are copied into a
//! queue and leave together: one `sendmmsg` per socket instead of one `sendmsg` per datagram, and
//! runs of equal-size datagrams to one destination ride as one UDP GSO super-datagram (the kernel
//! splits it, the receiver sees the individual datagrams). On loopback a relayed packet costs
//! mostly syscalls, so this is where the CPU goes.
//!
//! Storage is allocated once per queue: the frames live in one arena, the kernel's message headers
//! in a scratch block rebuilt at each flush. A copy per frame (160-1200 bytes typically) is the
//! price of letting the receive slots be reused before the flush.

use std::cell::Cell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Datagrams a queue holds before it must be flushed.
pub const QUEUE_DATAGRAMS: usize = 64;
/// Bytes of frames a queue holds. Bigger than the largest possible datagram, so a frame always
/// fits an empty queue.
const ARENA_BYTES: usize = 160 * 1024;
/// Largest GSO segment: a datagram that still fits a 1500-byte MTU behind IPv6 headers. Bigger
/// segments may exceed the route's MTU, which the kernel refuses for GSO (EINVAL) where a plain
/// send would fragment, so those go one by one.
const GSO_MAX_SEGMENT: usize = 1452;
/// Bytes in one GSO super-datagram: well under the 64 KiB an IP packet can carry.
const GSO_MAX_BYTES: usize = 60 * 1024;
/// The kernel's UDP_MAX_SEGMENTS on every kernel that has UDP GSO.
const GSO_MAX_SEGMENTS: usize = 64;
/// Room for one IPV6_PKTINFO (the larger pktinfo) and one UDP_SEGMENT control message.
const CTRL_BYTES: usize = 64;

/// What one flush did, in datagrams (a GSO super-datagram counts as its segments).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub sent: usize,
    /// Lost to send errors: the kernel refused them, or its buffer was full.
    pub dropped: usize,
    /// sendmmsg calls made.
    pub syscalls: usize,
    /// Messages handed to the kernel (datagrams or GSO super-datagrams), retries included.
    pub messages: usize,
}

impl std::ops::AddAssign for Flushed {
    fn add_assign(&mut self, o: Flushed) {
        self.sent += o.sent;
        self.dropped += o.dropped;
        self.syscalls += o.syscalls;
        self.messages += o.messages;
    }
}

#[derive(Clone, Copy)]
struct Queued {
    to: SocketAddr,
    /// Source address for a wildcard socket (IP_PKTINFO / IPV6_PKTINFO); None: the bound one.
    src: Option<IpAddr>,
    /// Index into the queue's targets: the socket this datagram leaves through.
    target: u8,
    start: u32,
    len: u32,
}

#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Ctrl([u8; CTRL_BYTES]);

/// The kernel's view of one batch; pointers into it and into the arena are set at each flush.
struct Scratch {
    /// Queue indices of the target being flushed, in queue order.
    order: [u8; QUEUE_DATAGRAMS],
    msgs: [libc::mmsghdr; QUEUE_DATAGRAMS],
    iovs: [libc::iovec; QUEUE_DATAGRAMS],
    names: [libc::sockaddr_in6; QUEUE_DATAGRAMS],
    ctrl: [Ctrl; QUEUE_DATAGRAMS],
    /// Per message: the position in `order` of its first datagram, and how many it carries.
    first: [u8; QUEUE_DATAGRAMS],
    segments: [u8; QUEUE_DATAGRAMS],
}

/// How a failed sendmmsg message is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnError {
    /// Interrupted before anything was sent: call again.
    Retry,
    /// The socket's buffer is full: the rest of this socket's batch would fail the same way, and
    /// UDP may drop; waiting for writability would stall every other client of the shard.
    DropRest,
    /// A problem of this datagram or its destination (EMSGSIZE, ECONNREFUSED, EACCES...): the
    /// others in the batch still go.
    SkipOne,
    /// A GSO super-datagram the kernel or device refused as such: send its segments one by one.
    Split,
}

fn on_error(e: &io::Error, gso: bool) -> OnError {
    match e.raw_os_error() {
        Some(libc::EINTR) => OnError::Retry,
        Some(libc::EAGAIN) | Some(libc::ENOBUFS) => OnError::DropRest,
        _ if gso => OnError::Split,
        _ => OnError::SkipOne,
    }
}

/// A bounded queue of datagrams for one or more sockets of type `T`.
pub struct SendQueue<T> {
    arena: Vec<u8>,
    queued: Vec<Queued>,
    /// The sockets of the queued datagrams; held here so none closes before the flush.
    targets: Vec<Rc<T>>,
    /// Segments per GSO super-datagram; 1 turns GSO off (unsupported, or refused once).
    gso_segments: usize,
    scratch: Box<Scratch>,
}

impl<T: AsRawFd> SendQueue<T> {
    /// `gso_segments`: what the kernel supports (quinn-udp's `max_gso_segments`), 1 for none.
    pub fn new(gso_segments: usize) -> Self {
        SendQueue {
            arena: Vec::with_capacity(ARENA_BYTES),
            queued: Vec::with_capacity(QUEUE_DATAGRAMS),
            targets: Vec::with_capacity(QUEUE_DATAGRAMS),
            gso_segments: gso_segments.clamp(1, GSO_MAX_SEGMENTS),
            // SAFETY: all-zero bytes are valid values of these plain C structs and integers.
            scratch: Box::new(unsafe { std::mem::zeroed() }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.queued.len() >= QUEUE_DATAGRAMS
    }

    /// Whether a frame of `len` bytes fits without a flush first.
    pub fn has_room(&self, len: usize) -> bool {
        !self.is_full() && self.arena.len() + len <= ARENA_BYTES
    }

    /// Copies a datagram into the queue; false when it does not fit (see [`Self::has_room`]).
    pub fn push(
        &mut self,
        target: &Rc<T>,
        to: SocketAddr,
        src: Option<IpAddr>,
        frame: &[u8],
    ) -> bool {
        if !self.has_room(frame.len()) {
            return false;
        }
        // Flood from one client: the same socket as the datagram before.
        let target = match self.targets.iter().rposition(|t| Rc::ptr_eq(t, target)) {
            Some(i) => i,
            None => {
                self.targets.push(Rc::clone(target));
                self.targets.len() - 1
            }
        };
        let start = self.arena.len();
        // Never reallocates: has_room kept the arena within the capacity reserved at creation.
        self.arena.extend_from_slice(frame);
        self.queued.push(Queued {
            to,
            src,
            target: target as u8,
            start: start as u32,
            len: frame.len() as u32,
        });
        true
    }

    /// Sends everything queued, one sendmmsg per socket (more only after an error), and empties
    /// the queue.
    pub fn flush(&mut self) -> Flushed {
        let mut done = Flushed::default();
        for target in 0..self.targets.len() {
            let mut count = 0;
            for (i, q) in self.queued.iter().enumerate() {
                if q.target as usize == target {
                    self.scratch.order[count] = i as u8;
                    count += 1;
                }
            }
            let fd = self.targets[target].as_raw_fd();
            done += self.send_target(fd, count);
        }
        self.arena.clear();
        self.queued.clear();
        self.targets.clear();
        done
    }

    /// Sends the `count` datagrams listed in `scratch.order` through `fd`.
    fn send_target(&mut self, fd: RawFd, count: usize) -> Flushed {
        let mut done = Flushed::default();
        let mut pos = 0;
        // After a refused super-datagram, the rest of this socket's batch goes without GSO.
        let mut gso = self.gso_segments;
        'build: while pos < count {
            let messages = self.build(pos, count, gso);
            let mut i = 0;
            while i < messages {
                // SAFETY: msgs[i..messages] were filled by build() with pointers into the
                // scratch block and the arena, both alive and unchanged until this call returns.
                let rc = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.scratch.msgs.as_mut_ptr().add(i),
                        (messages - i) as libc::c_uint,
                        0,
                    )
                };
                done.syscalls += 1;
                if rc > 0 {
                    let sent = rc as usize;
                    done.messages += sent;
                    for k in i..i + sent {
                        done.sent += self.scratch.segments[k] as usize;
                    }
                    i += sent;
                    continue;
                }
                // rc == 0 never happens for a non-empty batch; treat it as a full buffer.
                let err = if rc == 0 {
                    io::Error::from_raw_os_error(libc::EAGAIN)
                } else {
                    io::Error::last_os_error()
                };
                let segments = self.scratch.segments[i] as usize;
                match on_error(&err, segments > 1) {
                    OnError::Retry => {}
                    OnError::DropRest => {
                        done.messages += 1;
                        for k in i..messages {
                            done.dropped += self.scratch.segments[k] as usize;
                        }
                        tracing::trace!(error = %err, "send buffer full, batch dropped");
                        break 'build;
                    }
                    OnError::SkipOne => {
                        done.messages += 1;
                        done.dropped += segments;
                        tracing::trace!(error = %err, "datagram refused");
                        i += 1;
                    }
                    OnError::Split => {
                        done.messages += 1;
                        if err.raw_os_error() == Some(libc::EIO) {
                            // The device cannot segment: stop trying. Other refusals (EINVAL
                            // past a small route MTU, a bad destination) concern this
                            // destination only.
                            tracing::debug!(error = %err, "UDP GSO refused, sending datagrams singly");
                            self.gso_segments = 1;
                        }
                        gso = 1;
                        pos += self.scratch.first[i] as usize;
                        continue 'build;
                    }
                }
            }
            break;
        }
        done
    }

    /// Fills the kernel's message headers for the datagrams at `order[pos..count]`, joining
    /// runs into GSO super-datagrams of at most `gso` segments; returns the message count.
    /// Message k's `first` is relative to `pos`.
    fn build(&mut self, pos: usize, count: usize, gso: usize) -> usize {
        let s = &mut *self.scratch;
        let mut messages = 0;
        let mut p = pos;
        while p < count {
            let head = self.queued[s.order[p] as usize];
            let seg = head.len as usize;
            // A run: same destination and source, equal sizes (the last may be shorter).
            let mut n = 1;
            let mut bytes = seg;
            if gso > 1 && seg <= GSO_MAX_SEGMENT {
                while p + n < count && n < gso {
                    let next = self.queued[s.order[p + n] as usize];
                    let len = next.len as usize;
                    if next.to != head.to
                        || next.src != head.src
                        || len > seg
                        || bytes + len > GSO_MAX_BYTES
                    {
                        break;
                    }
                    n += 1;
                    bytes += len;
                    if len < seg {
                        break;
                    }
                }
            }
            let m = messages;
            for k in 0..n {
                let q = self.queued[s.order[p + k] as usize];
                s.iovs[p + k] = libc::iovec {
                    // sendmmsg only reads through this pointer.
                    iov_base: self.arena[q.start as usize..].as_ptr() as *mut libc::c_void,
                    iov_len: q.len as usize,
                };
            }
            let namelen = encode_addr(&head.to, &mut s.names[m]);
            let hdr = &mut s.msgs[m].msg_hdr;
            hdr.msg_name = (&mut s.names[m] as *mut libc::sockaddr_in6).cast();
            hdr.msg_namelen = namelen;
            hdr.msg_iov = &mut s.iovs[p];
            hdr.msg_iovlen = n;
            let ctrl_len = encode_ctrl(&mut s.ctrl[m], head.src, (n > 1).then_some(seg as u16));
            if ctrl_len == 0 {
                hdr.msg_control = std::ptr::null_mut();
            } else {
                hdr.msg_control = s.ctrl[m].0.as_mut_ptr().cast();
            }
            hdr.msg_controllen = ctrl_len;
            hdr.msg_flags = 0;
            s.msgs[m].msg_len = 0;
            s.first[m] = (p - pos) as u8;
            s.segments[m] = n as u8;
            messages += 1;
            p += n;
        }
        messages
    }
}

/// Writes `addr` as the kernel's sockaddr_in or sockaddr_in6; returns its length.
fn encode_addr(addr: &SocketAddr, out: &mut libc::sockaddr_in6) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in is smaller than sockaddr_in6 and no more aligned.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_in6).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            *out = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                // std keeps these as the kernel wants them (the standard library passes them on
                // unchanged too).
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Writes the control messages of one datagram: its source address (a wildcard socket answers
/// from the address it was asked on) and the GSO segment size; returns their length in bytes.
fn encode_ctrl(ctrl: &mut Ctrl, src: Option<IpAddr>, segment: Option<u16>) -> usize {
    let mut used = 0;
    match src {
        Some(IpAddr::V4(v4)) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            used += put_cmsg(
                &mut ctrl.0[used..],
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                info,
            );
        }
        Some(IpAddr::V6(v6)) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                ipi6_ifindex: 0,
            };
            used += put_cmsg(
                &mut ctrl.0[used..],
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                info,
            );
        }
        None => {}
    }
    if let Some(size) = segment {
        used += put_cmsg(&mut ctrl.0[used..], libc::SOL_UDP, libc::UDP_SEGMENT, size);
    }
    used
}

/// Writes one control message at the start of `buf` (8-byte aligned: every message before it
/// took a CMSG_SPACE multiple of 8 from an aligned start); returns the space it takes.
fn put_cmsg<V: Copy>(buf: &mut [u8], level: i32, ty: i32, value: V) -> usize {
    let size = std::mem::size_of::<V>() as libc::c_uint;
    // SAFETY: pure arithmetic on sizes.
    let (space, len) = unsafe { (libc::CMSG_SPACE(size), libc::CMSG_LEN(size)) };
    let space = space as usize;
    // CTRL_BYTES holds the largest pair this module writes; a smaller buffer is a bug here.
    assert!(buf.len() >= space, "control buffer too small");
    let header = libc::cmsghdr {
        cmsg_len: len as _,
        cmsg_level: level,
        cmsg_type: ty,
    };
    let data = std::mem::size_of::<libc::cmsghdr>();
    // SAFETY: both writes stay within `buf` (checked above: space covers header and value);
    // unaligned writes need no alignment of the destination.
    unsafe {
        std::ptr::write_unaligned(buf.as_mut_ptr().cast::<libc::cmsghdr>(), header);
        std::ptr::write_unaligned(buf.as_mut_ptr().add(data).cast::<V>(), value);
    }
    buf[data + size as usize..space].fill(0);
    space
}

/// Wakes the task that flushes a shard's queues. Requested when a queue turns non-empty; the
/// flush task then runs after every task already scheduled in this reactor tick, so frames that
/// many relay sockets produced in one tick leave together.
#[derive(Default)]
pub struct FlushSignal {
    requested: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl FlushSignal {
    pub fn request(&self) {
        if !self.requested.replace(true) {
            if let Some(waker) = self.waker.take() {
                waker.wake();
            }
        }
    }

    /// Resolves once a flush was requested since the last time it resolved.
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.requested.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn receiver(ip: &str) -> UdpSocket {
        let s = UdpSocket::bind((ip, 0)).unwrap();
        // Room for a whole flush of the largest datagrams (net.core.rmem_max permitting).
        let _ = socket2::SockRef::from(&s).set_recv_buffer_size(1 << 20);
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    fn recv_all(s: &UdpSocket, n: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut buf = [0u8; 70000];
        (0..n)
            .map(|_| {
                let (len, from) = s.recv_from(&mut buf).unwrap();
                (buf[..len].to_vec(), from)
            })
            .collect()
    }

    fn nothing_more(s: &UdpSocket) {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 16];
        assert!(s.recv_from(&mut buf).is_err(), "unexpected extra datagram");
    }

    fn kernel_gso() -> usize {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        quinn_udp::UdpSocketState::new(quinn_udp::UdpSockRef::from(&s))
            .unwrap()
            .max_gso_segments()
    }

    fn payload(tag: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| tag.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn a_queue_takes_datagrams_until_full_then_flushes_them_in_order_in_one_call() {
        let rx = receiver("127.0.0.1");
        let to = rx.local_addr().unwrap();
        let tx = Rc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        // No GSO: every datagram is its own message, so the count of messages is checked too.
        let mut q = SendQueue::new(1);
        let mut n = 0;
        while q.has_room(100) {
            assert!(q.push(&tx, to, None, &payload(n as u8, 100 + n)));
            n += 1;
        }
        assert_eq!(n, QUEUE_DATAGRAMS);
        assert!(q.is_full());
        assert!(!q.push(&tx, to, None, b"x"), "a full queue refuses");
        let done = q.flush();
        assert_eq!(
            done,
            Flushed {
                sent: n,
                dropped: 0,
                syscalls: 1,
                messages: n
            }
        );
        assert!(q.is_empty() && q.has_room(100));
        for (i, (data, _)) in recv_all(&rx, n).into_iter().enumerate() {
            assert_eq!(data, payload(i as u8, 100 + i));
        }
        nothing_more(&rx);
        assert_eq!(
            q.flush(),
            Flushed::default(),
            "an empty flush makes no call"
        );
    }

    #[test]
    fn the_arena_bounds_the_bytes_queued_and_a_largest_datagram_fits_an_empty_queue() {
        let rx = receiver("127.0.0.1");
        let to = rx.local_addr().unwrap();
        let tx = Rc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let mut q = SendQueue::new(1);
        let big = payload(7, 65507);
        assert!(q.push(&tx, to, None, &big));
        assert!(q.push(&tx, to, None, &big));
        assert!(!q.has_room(65507), "a third would exceed the arena");
        assert!(!q.push(&tx, to, None, &big));
        assert_eq!(q.flush().sent, 2);
        let got = recv_all(&rx, 2);
        assert!(got.iter().all(|(d, _)| *d == big));
    }

    #[test]
    fn datagrams_for_several_sockets_leave_through_their_own_socket_in_order() {
        let rx = receiver("127.0.0.1");
        let to = rx.local_addr().unwrap();
        let a = Rc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let b = Rc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let mut q = SendQueue::new(1);
        for i in 0..6u8 {
            let via = if i % 2 == 0 { &a } else { &b };
            assert!(q.push(via, to, None, &[i]));
        }
        let done = q.flush();
        assert_eq!((done.sent, done.syscalls), (6, 2));
        let got = recv_all(&rx, 6);
        let from_a: Vec<u8> = got
            .iter()
            .filter(|(_, f)| *f == a.local_addr().unwrap())
            .map(|(d, _)| d[0])
            .collect();
        let from_b: Vec<u8> = got
            .iter()
            .filter(|(_, f)| *f == b.local_addr().unwrap())
            .map(|(d, _)| d[0])
            .collect();
        assert_eq!(from_a, [0, 2, 4]);
        assert_eq!(from_b, [1, 3, 5]);
    }

    #[test]
    fn a_refused_destination_costs_only_its_own_datagram() {
        let rx = receiver("127.0.0.1");
        let to = rx.local_addr().unwrap();
        // Port 0 is refused by the kernel (EINVAL) for that message only; sendmmsg reports the
        // ones sent before it, the rest must go in a second call.
        let refused: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let tx = Rc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        for gso in [1, kernel_gso()] {
            let mut q = SendQueue::new(gso);
            assert!(q.push(&tx, to, None, b"one"));
            assert!(q.push(&tx, to, None, b"two"));
            assert!(q.push(&tx, refused, None, b"lost"));
            assert!(q.push(&tx, to, None, b"three"));
            assert!(q.push(&tx, refused, None, b"lost"));
            let done = q.flush();
            assert_eq!((done.sent, done.dropped), (3, 2), "gso {gso}");
            assert!(done.syscalls >= 2, "a partial batch is resent: {done:?}");
            let got: Vec<Vec<u8>> = recv_all(&rx, 3).into_iter().map(|(d, _)| d).collect();
            assert_eq!(got, [&b"one"[..], b"two", b"three"]);
            nothing_more(&rx);
        }
    }

    #[test]
    fn a_gso_run_arrives_as_the_same_datagrams_sent_singly() {
        let gso = kernel_gso();
        let rx = receiver("127.0.0.1");
        let to = rx.local_addr().unwrap();
        let tx = Rc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        // Five of 1200 bytes and a shorter last one (a run may end short), then another size.
        let mut sent = Vec::new();
        for i in 0..5 {
            sent.push(payload(i, 1200));
        }
        sent.push(payload(9, 700));
        sent.push(payload(10, 1000));
        let mut single = SendQueue::new(1);
        let mut batched = SendQueue::new(gso);
        for d in &sent {
            assert!(single.push(&tx, to, None, d));
            assert!(batched.push(&tx, to, None, d));
        }
        let one_by_one = single.flush();
        let by_gso = batched.flush();
        assert_eq!(one_by_one.messages, sent.len());
        assert_eq!((by_gso.sent, by_gso.dropped), (sent.len(), 0));
        if gso > 1 {
            assert_eq!(by_gso.messages, 2, "one super-datagram of six, then one");
        }
        let got: Vec<Vec<u8>> = recv_all(&rx, 2 * sent.len())
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert_eq!(got[..sent.len()], sent[..]);
        assert_eq!(got[sent.len()..], sent[..]);
        nothing_more(&rx);
    }

    #[test]
    fn gso_never_joins_different_destinations_or_oversized_segments() {
        let gso = kernel_gso();
        let rx1 = receiver("127.0.0.1");
        let rx2 = receiver("127.0.0.1");
        let (to1, to2) = (rx1.local_addr().unwrap(), rx2.local_addr().unwrap());
        let tx = Rc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let mut q = SendQueue::new(gso);
        for i in 0..4 {
            assert!(q.push(&tx, if i % 2 == 0 { to1 } else { to2 }, None, &[i; 200]));
        }
        let big = payload(3, 2000);
        assert!(q.push(&tx, to1, None, &big));
        assert!(q.push(&tx, to1, None, &big));
        let done = q.flush();
        assert_eq!((done.sent, done.messages), (6, 6));
        let got1: Vec<Vec<u8>> = recv_all(&rx1, 4).into_iter().map(|(d, _)| d).collect();
        let got2: Vec<Vec<u8>> = recv_all(&rx2, 2).into_iter().map(|(d, _)| d).collect();
        assert_eq!(got1, [vec![0u8; 200], vec![2u8; 200], big.clone(), big]);
        assert_eq!(got2, [vec![1u8; 200], vec![3u8; 200]]);
    }

    #[test]
    fn a_wildcard_socket_answers_from_the_source_address_of_each_datagram() {
        let rx = receiver("127.0.0.1");
        let to = rx.local_addr().unwrap();
        let wildcard = Rc::new(UdpSocket::bind("0.0.0.0:0").unwrap());
        let port = wildcard.local_addr().unwrap().port();
        let one: IpAddr = "127.0.0.1".parse().unwrap();
        let two: IpAddr = "127.0.0.2".parse().unwrap();
        for gso in [1, kernel_gso()] {
            let mut q = SendQueue::new(gso);
            // Equal sizes to one destination: a GSO run only while the source stays the same.
            for src in [one, one, two, two, one] {
                assert!(q.push(&wildcard, to, Some(src), &[7; 100]));
            }
            let done = q.flush();
            assert_eq!(done.sent, 5);
            if gso > 1 {
                assert_eq!(done.messages, 3);
            }
            let from: Vec<SocketAddr> = recv_all(&rx, 5).into_iter().map(|(_, f)| f).collect();
            let want: Vec<SocketAddr> = [one, one, two, two, one]
                .iter()
                .map(|ip| SocketAddr::new(*ip, port))
                .collect();
            assert_eq!(from, want, "gso {gso}");
        }
    }

    #[test]
    fn an_ipv6_wildcard_socket_sets_its_source_too() {
        let Ok(rx) = UdpSocket::bind("[::1]:0") else {
            return; // no IPv6 on this host
        };
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let socket = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        socket.set_only_v6(true).unwrap();
        socket
            .bind(&"[::]:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let wildcard = Rc::new(UdpSocket::from(socket));
        let mut q = SendQueue::new(1);
        let src: IpAddr = "::1".parse().unwrap();
        assert!(q.push(&wildcard, rx.local_addr().unwrap(), Some(src), b"v6"));
        assert_eq!(q.flush().sent, 1);
        let got = recv_all(&rx, 1);
        assert_eq!(got[0].0, b"v6");
        assert_eq!(got[0].1.ip(), src);
    }

    #[test]
    fn errors_are_sorted_by_what_they_say_about_the_rest_of_the_batch() {
        let e = io::Error::from_raw_os_error;
        assert_eq!(on_error(&e(libc::EINTR), false), OnError::Retry);
        assert_eq!(on_error(&e(libc::EAGAIN), false), OnError::DropRest);
        assert_eq!(on_error(&e(libc::ENOBUFS), true), OnError::DropRest);
        assert_eq!(on_error(&e(libc::EMSGSIZE), false), OnError::SkipOne);
        assert_eq!(on_error(&e(libc::ECONNREFUSED), false), OnError::SkipOne);
        assert_eq!(on_error(&e(libc::EINVAL), true), OnError::Split);
        assert_eq!(on_error(&e(libc::EMSGSIZE), true), OnError::Split);
    }

    #[test]
    fn a_refused_super_datagram_is_resent_as_single_datagrams() {
        if kernel_gso() <= 1 {
            return;
        }
        // A GSO run aimed at port 0: refused as a whole, then each segment is refused singly,
        // and the datagrams after it in the batch still arrive.
        let rx = receiver("127.0.0.1");
        let to = rx.local_addr().unwrap();
        let refused: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let tx = Rc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let mut q = SendQueue::new(kernel_gso());
        for _ in 0..3 {
            assert!(q.push(&tx, refused, None, &[1; 100]));
        }
        for _ in 0..3 {
            assert!(q.push(&tx, to, None, &[2; 100]));
        }
        let done = q.flush();
        assert_eq!((done.sent, done.dropped), (3, 3));
        assert_eq!(
            q.gso_segments,
            kernel_gso(),
            "one bad destination keeps GSO on"
        );
        let got = recv_all(&rx, 3);
        assert!(got.iter().all(|(d, _)| *d == [2; 100]));
        nothing_more(&rx);
    }

    #[test]
    fn a_requested_flush_runs_once_after_the_tasks_already_scheduled() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        let log = Rc::new(std::cell::RefCell::new(Vec::new()));
        let signal = Rc::new(FlushSignal::default());
        local.block_on(&rt, async {
            let flusher = {
                let (log, signal) = (Rc::clone(&log), Rc::clone(&signal));
                tokio::task::spawn_local(async move {
                    loop {
                        signal.wait().await;
                        log.borrow_mut().push("flush");
                    }
                })
            };
            tokio::task::yield_now().await;
            let producers: Vec<_> = (0..3)
                .map(|i| {
                    let (log, signal) = (Rc::clone(&log), Rc::clone(&signal));
                    tokio::task::spawn_local(async move {
                        log.borrow_mut().push(["a", "b", "c"][i]);
                        signal.request();
                    })
                })
                .collect();
            for p in producers {
                p.await.unwrap();
            }
            tokio::task::yield_now().await;
            assert_eq!(*log.borrow(), ["a", "b", "c", "flush"]);
            signal.request();
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            assert_eq!(*log.borrow(), ["a", "b", "c", "flush", "flush"]);
            flusher.abort();
        });
    }
}

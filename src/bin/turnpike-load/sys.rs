//! Thin wrappers over the Linux calls the generator's loops are made of: UDP sockets, epoll,
//! timerfd, recvmmsg/sendmmsg batches, the monotonic clock, rlimits and rusage.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// The largest datagram a batch slot holds: a 1200-byte payload in a Send indication fits
/// with room to spare, and anything longer is not ours.
pub const SLOT: usize = 2048;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// SO_TIMESTAMPNS (asm-generic, as on x86_64 and aarch64): the kernel stamps each datagram
/// with CLOCK_REALTIME when it arrives.
const SO_TIMESTAMPNS: libc::c_int = 35;

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Monotonic nanoseconds: phases, deadlines, retransmission timers.
pub fn now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Wall-clock nanoseconds: what payloads carry as their send time, since the kernel's receive
/// timestamps (SO_TIMESTAMPNS) are on this clock. A clock step during a run shows as one
/// odd RTT, no more.
pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// Asks the kernel to stamp each received datagram, so an RTT is exact even when the loop
/// reads its replies a tick later, in a batch.
pub fn enable_rx_timestamps(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: on is a valid c_int for the call.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// CPU time of one of this process's threads in nanoseconds (/proc schedstat: no syscall in
/// the measured thread, nanosecond resolution).
pub fn thread_cpu_ns(tid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Asks for `bytes` of receive and send buffer; as root past net.core.[rw]mem_max (the
/// FORCE options), which otherwise caps it silently at about 208 KiB. Best effort.
pub fn enlarge_buffers(fd: RawFd, bytes: i32) {
    for opt in [
        libc::SO_RCVBUF,
        libc::SO_SNDBUF,
        libc::SO_RCVBUFFORCE,
        libc::SO_SNDBUFFORCE,
    ] {
        // SAFETY: a c_int option value of the size given, on a descriptor we own.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
        }
    }
}

/// One client socket per allocation (the server keys allocations by 5-tuple), non-blocking and
/// connected to the server, so the kernel filters strangers and reports ICMP unreachables.
pub fn client_socket(local: SocketAddr, server: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(server),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    s.bind(&local.into())?;
    s.connect(&server.into())?;
    enable_rx_timestamps(s.as_raw_fd())?;
    Ok(s)
}

/// The local address the kernel routes toward `server` from: what a wildcard --local-ip means
/// for the built-in echo peer, which must name a concrete address to the server.
pub fn route_source(server: SocketAddr) -> io::Result<std::net::IpAddr> {
    let unspecified: SocketAddr = match server {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let s = client_socket(unspecified, server)?;
    let local = s
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))?;
    Ok(local.ip())
}

/// Raises the soft open-file limit to the hard one: 5000 allocations are 5000 sockets.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

fn timeval_us(t: libc::timeval) -> u64 {
    t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64
}

/// CPU (user + system) used so far by this whole process, or by the calling thread only,
/// in microseconds: getrusage has microsecond resolution where /proc stat has ticks.
pub fn cpu_us(thread_only: bool) -> u64 {
    // SAFETY: zeroed rusage is valid; getrusage only writes it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let who = if thread_only {
        libc::RUSAGE_THREAD
    } else {
        libc::RUSAGE_SELF
    };
    // SAFETY: ru is a valid rusage.
    unsafe { libc::getrusage(who, &mut ru) };
    timeval_us(ru.ru_utime) + timeval_us(ru.ru_stime)
}

/// Level-triggered epoll over the client sockets; each registration carries a token.
pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; the fd is owned from here on.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll {
            // SAFETY: fd is a fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
        })
    }

    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: ev is valid for the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        Ok(())
    }

    /// Waits up to `timeout` and returns the ready tokens (EINTR is an empty wake-up).
    pub fn wait(&mut self, timeout: Duration, tokens: &mut Vec<u64>) -> io::Result<()> {
        tokens.clear();
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: the events buffer is valid for its length.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        tokens.extend(self.events[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

/// A periodic timer, the pacing tick: a paced loop sleeps on it alone and then takes every
/// reply that arrived meanwhile in one pass, instead of waking once per reply.
pub struct TimerFd {
    fd: OwnedFd,
}

impl TimerFd {
    pub fn periodic(every: Duration) -> io::Result<TimerFd> {
        // SAFETY: plain syscall; the fd is owned from here on.
        let fd = cvt(unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) })?;
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ts = libc::timespec {
            tv_sec: every.as_secs() as libc::time_t,
            tv_nsec: every.subsec_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: spec is valid; a null old value is allowed.
        cvt(unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) })?;
        Ok(TimerFd { fd })
    }

    /// Sleeps until the next expiry (at once if one is pending): one blocking read.
    pub fn wait(&self) {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into n.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }
}

/// Buffers for one recvmmsg or sendmmsg call of up to `cap` datagrams, optionally with their
/// source or destination addresses (the echo peer needs them; connected sockets do not).
pub struct Batch {
    bufs: Vec<u8>,
    lens: Vec<usize>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    names: Vec<libc::sockaddr_storage>,
    with_names: bool,
    /// Control-message room per slot (u64s for cmsghdr alignment) and the receive timestamps
    /// found there (0: none).
    ctrl: Vec<[u64; 8]>,
    rx_ns: Vec<u64>,
}

// The raw pointers inside point only into the batch's own vectors.
unsafe impl Send for Batch {}

impl Batch {
    pub fn new(cap: usize, with_names: bool) -> Batch {
        let mut b = Batch {
            bufs: vec![0u8; cap * SLOT],
            lens: vec![0; cap],
            iovs: Vec::with_capacity(cap),
            // SAFETY: all-zero mmsghdr and sockaddr_storage are valid values.
            hdrs: vec![unsafe { std::mem::zeroed() }; cap],
            names: vec![unsafe { std::mem::zeroed() }; cap],
            with_names,
            ctrl: vec![[0u64; 8]; cap],
            rx_ns: vec![0; cap],
        };
        for i in 0..cap {
            let base = b.bufs[i * SLOT..].as_mut_ptr();
            b.iovs.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: SLOT,
            });
        }
        b
    }

    pub fn cap(&self) -> usize {
        self.lens.len()
    }

    /// Slot `i`'s whole buffer, to write a datagram into before [`Batch::send`].
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * SLOT..(i + 1) * SLOT]
    }

    /// Datagram `i` as received (or as set for sending).
    pub fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i * SLOT..i * SLOT + self.lens[i]]
    }

    /// Datagram `i`, writable: an echo updates the hold time in place.
    pub fn datagram_mut(&mut self, i: usize) -> &mut [u8] {
        let len = self.lens[i];
        &mut self.bufs[i * SLOT..i * SLOT + len]
    }

    pub fn set_len(&mut self, i: usize, len: usize) {
        self.lens[i] = len.min(SLOT);
    }

    fn prepare(&mut self, n: usize, receiving: bool) {
        for i in 0..n {
            self.iovs[i].iov_len = if receiving { SLOT } else { self.lens[i] };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            if receiving {
                h.msg_hdr.msg_control = self.ctrl[i].as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 8]>() as _;
            } else {
                h.msg_hdr.msg_control = std::ptr::null_mut();
                h.msg_hdr.msg_controllen = 0;
            }
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
            if self.with_names {
                h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                if receiving {
                    h.msg_hdr.msg_namelen =
                        std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                }
            } else {
                h.msg_hdr.msg_name = std::ptr::null_mut();
                h.msg_hdr.msg_namelen = 0;
            }
        }
    }

    /// Receives up to `cap` datagrams without blocking (or, with `wait`, blocking until the
    /// first); Ok(0) when nothing is queued.
    pub fn recv(&mut self, fd: RawFd, wait: bool) -> io::Result<usize> {
        let cap = self.cap();
        self.prepare(cap, true);
        let flags = if wait {
            libc::MSG_WAITFORONE
        } else {
            libc::MSG_DONTWAIT
        };
        // SAFETY: every header points into this batch's buffers, valid for the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                cap as u32,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let n = n as usize;
        for i in 0..n {
            self.lens[i] = self.hdrs[i].msg_len as usize;
            self.rx_ns[i] = rx_timestamp(&self.hdrs[i].msg_hdr);
        }
        Ok(n)
    }

    /// When the kernel received datagram `i` (CLOCK_REALTIME ns), if it said.
    pub fn rx_ns(&self, i: usize) -> Option<u64> {
        Some(self.rx_ns[i]).filter(|&t| t > 0)
    }

    /// Sends datagrams `0..n` (to the names they were received from, for a named batch);
    /// returns how many left. A full socket buffer is a short count, not an error.
    pub fn send(&mut self, fd: RawFd, n: usize) -> io::Result<usize> {
        if n == 0 {
            return Ok(0);
        }
        self.prepare(n, false);
        let mut done = 0;
        while done < n {
            // SAFETY: every header points into this batch's buffers, valid for the call.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[done..].as_mut_ptr(),
                    (n - done) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(done),
                    io::ErrorKind::Interrupted => continue,
                    _ if done > 0 => Ok(done),
                    _ => Err(e),
                };
            }
            done += r as usize;
        }
        Ok(done)
    }
}

/// The SCM_TIMESTAMPNS control message of a received datagram, or 0.
fn rx_timestamp(hdr: &libc::msghdr) -> u64 {
    // SAFETY: the kernel filled msg_control up to msg_controllen; the CMSG macros stay inside.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == SO_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                return ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    0
}

/// Sends one datagram on a connected socket; a full buffer counts as not sent.
pub fn send_one(fd: RawFd, buf: &[u8]) -> io::Result<bool> {
    // SAFETY: buf is valid for its length.
    let r = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
            _ => Err(e),
        };
    }
    Ok(true)
}

//! The built-in UDP echo peer: one socket, its own thread, recvmmsg in and the same buffers
//! back out with sendmmsg to where each came from.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::stun;
use crate::sys::{self, Batch};

/// How often the blocked receive wakes up to look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

pub struct EchoPeer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    tid: Arc<AtomicI32>,
    echoed: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// How the echo thread waits for work.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// With a tick, a busy peer sleeps a tick between batches instead of waking per datagram
    /// (a paced run: many small wake-ups would cost more CPU than the server spends); the time
    /// each payload waited is written into it and taken off its RTT. Without one, it answers
    /// at once (floods and RTT runs, where batches form by themselves).
    pub tick: Option<Duration>,
    /// The run's payload tag: only our own payloads get a hold time written.
    pub tag: u32,
}

impl EchoPeer {
    pub fn start(ip: std::net::IpAddr, pace: Pace) -> io::Result<EchoPeer> {
        let bind = SocketAddr::new(ip, 0);
        let sock = Socket::new(
            Domain::for_address(bind),
            Type::DGRAM.cloexec(),
            Some(Protocol::UDP),
        )?;
        // Bursts from many allocations arrive at once: room for them beats drops we would
        // count as the server's loss.
        sys::enlarge_buffers(sock.as_raw_fd(), 4 << 20);
        sock.set_read_timeout(Some(POLL))?;
        sock.bind(&bind.into())?;
        sys::enable_rx_timestamps(sock.as_raw_fd())?;
        let addr = sock
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("echo peer: not an IP socket"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let tid = Arc::new(AtomicI32::new(0));
        let echoed = Arc::new(AtomicU64::new(0));
        let (s, t, e) = (stop.clone(), tid.clone(), echoed.clone());
        let thread = std::thread::Builder::new()
            .name("echo-peer".into())
            .spawn(move || {
                t.store(sys::gettid(), Ordering::Release);
                run(sock, pace, &s, &e)
            })?;
        // The CPU reading needs the thread's id: wait the moment it takes to start.
        while tid.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        Ok(EchoPeer {
            addr,
            stop,
            tid,
            echoed,
            thread: Some(thread),
        })
    }

    /// CPU the echo thread has used so far, in microseconds.
    pub fn cpu_us(&self) -> u64 {
        sys::thread_cpu_ns(self.tid.load(Ordering::Acquire)) / 1000
    }

    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(sock: Socket, pace: Pace, stop: &AtomicBool, echoed: &AtomicU64) {
    let fd = sock.as_raw_fd();
    let mut batch = Batch::new(64, true);
    let mut busy = false;
    let mut batch_was_full = false;
    while !stop.load(Ordering::Relaxed) {
        // Idle: block until the first datagram (or the read timeout), then take what is
        // queued. Busy and paced: sleep a tick, then take everything without blocking, batch
        // after batch until one comes back short: a tick can hold more than one batch, and
        // taking only one per tick would cap the echo rate and overflow the socket.
        let n = match (pace.tick, busy) {
            _ if batch_was_full => batch.recv(fd, false).unwrap_or(0),
            (Some(tick), true) => {
                std::thread::sleep(tick);
                batch.recv(fd, false).unwrap_or(0)
            }
            _ => batch.recv(fd, true).unwrap_or(0),
        };
        batch_was_full = n == batch.cap();
        busy = n > 0;
        if n == 0 {
            continue;
        }
        if pace.tick.is_some() {
            let now = sys::realtime_ns();
            for i in 0..n {
                if let Some(rx) = batch.rx_ns(i) {
                    stun::add_hold(batch.datagram_mut(i), pace.tag, now.saturating_sub(rx));
                }
            }
        }
        let sent = batch.send(fd, n).unwrap_or(0);
        echoed.fetch_add(sent as u64, Ordering::Relaxed);
    }
}

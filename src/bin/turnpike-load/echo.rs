//! The built-in UDP echo peer: one socket, its own thread, recvmmsg in and the same buffers
//! back out with sendmmsg to where each came from.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::sys::{self, Batch};

/// How often the blocked receive wakes up to look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

pub struct EchoPeer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    cpu_us: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl EchoPeer {
    pub fn start(ip: std::net::IpAddr) -> io::Result<EchoPeer> {
        let bind = SocketAddr::new(ip, 0);
        let sock = Socket::new(
            Domain::for_address(bind),
            Type::DGRAM.cloexec(),
            Some(Protocol::UDP),
        )?;
        // Bursts from many allocations arrive at once: room for them beats drops we would
        // count as the server's loss.
        let _ = sock.set_recv_buffer_size(4 << 20);
        let _ = sock.set_send_buffer_size(4 << 20);
        sock.set_read_timeout(Some(POLL))?;
        sock.bind(&bind.into())?;
        let addr = sock
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("echo peer: not an IP socket"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let cpu_us = Arc::new(AtomicU64::new(0));
        let echoed = Arc::new(AtomicU64::new(0));
        let (s, c, e) = (stop.clone(), cpu_us.clone(), echoed.clone());
        let thread = std::thread::Builder::new()
            .name("echo-peer".into())
            .spawn(move || run(sock, &s, &c, &e))?;
        Ok(EchoPeer {
            addr,
            stop,
            cpu_us,
            echoed,
            thread: Some(thread),
        })
    }

    /// CPU the echo thread has used so far, in microseconds.
    pub fn cpu_us(&self) -> u64 {
        self.cpu_us.load(Ordering::Relaxed)
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

fn run(sock: Socket, stop: &AtomicBool, cpu_us: &AtomicU64, echoed: &AtomicU64) {
    let fd = sock.as_raw_fd();
    let mut batch = Batch::new(64, true);
    let mut wakeups = 0u32;
    while !stop.load(Ordering::Relaxed) {
        // Blocks until the first datagram (or the read timeout), then takes what is queued.
        let n = batch.recv(fd, true).unwrap_or(0);
        if n > 0 {
            let sent = batch.send(fd, n).unwrap_or(0);
            echoed.fetch_add(sent as u64, Ordering::Relaxed);
        }
        // The CPU reading is a syscall of its own: not on every wake-up of a busy peer.
        wakeups = wakeups.wrapping_add(1);
        if n == 0 || wakeups % 128 == 0 {
            cpu_us.store(sys::cpu_us(true), Ordering::Relaxed);
        }
    }
    cpu_us.store(sys::cpu_us(true), Ordering::Relaxed);
}

//! TCP relays (RFC 6062) on the I/O side: the listening relay sockets, the relay's connections
//! to peers, and the pipe between a peer connection and its client data connection. The core
//! decides (who may connect, which id is bound to what, when a connection is given up); this
//! module only carries it out and reports back.
//!
//! The pipe sees the client side through [`ClientWire`] (read bytes, write bytes, through TLS
//! or not), so a TLS data connection pipes the same way as a plain one. Each direction holds at
//! most [`PIPE_BUFFER`] bytes (plus one read): while it is full nothing is read from the side
//! that fills it, so a slow reader on one side stops the reading on the other (TCP
//! backpressure end to end, never unbounded buffering).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::proto::allocation::RelayId;
use crate::proto::server::{
    ConnectionId, Core, OpenRelay, OpenedRelay, PeerConnectError, RelayOpenError, RelaySource,
};
use crate::proto::FiveTuple;

use super::random::RandomPool;
use super::tcp::{self, StreamConn};

/// Bytes one pipe direction holds at most.
pub const PIPE_BUFFER: usize = 64 * 1024;
/// A long-lived pipe reports its bytes this often, so the metrics move while it runs.
const REPORT_EVERY: u64 = 256 * 1024;
/// Random probes for a free relay port before a scan of the range.
const RANDOM_PROBES: usize = 32;

/// What the shard offers the tasks of this module: its core, this module's table, and the
/// command loop that carries out what the core asked for.
pub trait Host: 'static {
    fn core(&mut self) -> &mut Core;
    fn tcp_relays(&mut self) -> &mut TcpRelays;
    fn run_commands(&mut self, now: Instant);
}

/// Starts the accept task of every listener and the task of every Connect the core asked for
/// during the last calls.
pub fn spawn_tasks<H: Host>(host: &Rc<RefCell<H>>, relays: &mut TcpRelays) {
    for (id, listener) in relays.take_pending() {
        let task = tokio::task::spawn_local(accept_peers(Rc::clone(host), id, listener));
        relays.set_listener_task(id, task);
    }
    for (id, from, peer) in relays.take_connects() {
        let task = tokio::task::spawn_local(connect_peer(Rc::clone(host), id, from, peer));
        relays.set_connecting(id, task);
    }
}

enum Peer {
    Connecting(JoinHandle<()>),
    /// Connected or accepted; nothing is read from it until it is piped, so what the peer sends
    /// meanwhile waits in the kernel (bounded by TCP's window).
    Established(TcpStream),
    /// Piped; notified to stop the pipe.
    Piped(Rc<Notify>),
}

/// What becomes of a client connection after a ConnectionBind.
#[derive(Debug)]
pub enum Handover {
    /// Pipe it to this peer connection.
    Pipe {
        id: ConnectionId,
        peer: TcpStream,
        stop: Rc<Notify>,
    },
    /// Move it to this shard, which owns the peer connection it names.
    Move { shard: u8 },
    /// The peer connection is gone: close the client connection.
    Close,
}

/// One shard's TCP relays: listeners by relay, peer connections by id.
pub struct TcpRelays {
    ports: (u16, u16),
    rng: RandomPool,
    listeners: HashMap<RelayId, JoinHandle<()>>,
    /// Listeners opened during a core call; the shard starts their accept tasks right after.
    pending: Vec<(RelayId, TcpListener)>,
    peers: HashMap<ConnectionId, Peer>,
    /// Client connections the core just bound or handed over, for their tasks to pick up.
    handovers: HashMap<FiveTuple, Handover>,
    /// Connects asked for during a core call; the shard starts their tasks right after.
    connects: Vec<(ConnectionId, SocketAddr, SocketAddr)>,
}

impl TcpRelays {
    pub fn new(ports: (u16, u16)) -> Self {
        TcpRelays {
            ports,
            rng: RandomPool::default(),
            listeners: HashMap::new(),
            pending: Vec::new(),
            peers: HashMap::new(),
            handovers: HashMap::new(),
            connects: Vec::new(),
        }
    }

    pub fn listener_count(&self) -> usize {
        self.listeners.len() + self.pending.len()
    }

    /// Carries out an [`OpenRelay`] for a TCP relay: a listening socket on a port of the range.
    pub fn open(&mut self, req: &OpenRelay) -> Result<OpenedRelay, RelayOpenError> {
        // The core never asks for EVEN-PORT or reservations with TCP (RFC 6062 §5.1).
        let RelaySource::Bind { ip, .. } = req.source else {
            return Err(RelayOpenError::UnknownToken);
        };
        let listener = self.bind_in_range(ip).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => RelayOpenError::NoPort,
            kind => RelayOpenError::Os(kind),
        })?;
        let local = listener
            .local_addr()
            .map_err(|e| RelayOpenError::Os(e.kind()))?;
        let listener = TcpListener::from_std(listener).map_err(|e| RelayOpenError::Os(e.kind()))?;
        self.pending.push((req.id, listener));
        Ok(OpenedRelay {
            local,
            reservation_token: None,
        })
    }

    /// Closes relay `id`'s listener if it is a TCP relay (its peer connections are closed by
    /// the core one by one).
    pub fn close(&mut self, id: RelayId) {
        if let Some(task) = self.listeners.remove(&id) {
            task.abort();
        }
        self.pending.retain(|(i, _)| *i != id);
    }

    fn random_u64(&self) -> u64 {
        self.rng.next_u64()
    }

    fn bind_in_range(&self, ip: IpAddr) -> io::Result<std::net::TcpListener> {
        let (lo, hi) = self.ports;
        let span = (hi - lo) as u64 + 1;
        let try_port = |port: u16| match bind_listener(SocketAddr::new(ip, port)) {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
            Err(e) => Err(e),
        };
        for _ in 0..RANDOM_PROBES {
            if let Some(l) = try_port(lo + (self.random_u64() % span) as u16)? {
                return Ok(l);
            }
        }
        let start = self.random_u64() % span;
        for i in 0..span {
            if let Some(l) = try_port(lo + ((start + i) % span) as u16)? {
                return Ok(l);
            }
        }
        Err(io::ErrorKind::AddrInUse.into())
    }

    /// Listeners opened during the last core calls, for the shard to start their accept tasks.
    pub fn take_pending(&mut self) -> Vec<(RelayId, TcpListener)> {
        std::mem::take(&mut self.pending)
    }

    /// [`Command::ConnectPeer`](crate::proto::server::Command::ConnectPeer): queued until the
    /// shard starts its task.
    pub fn connect(&mut self, id: ConnectionId, from: SocketAddr, peer: SocketAddr) {
        self.connects.push((id, from, peer));
    }

    pub fn take_connects(&mut self) -> Vec<(ConnectionId, SocketAddr, SocketAddr)> {
        std::mem::take(&mut self.connects)
    }

    pub fn set_listener_task(&mut self, id: RelayId, task: JoinHandle<()>) {
        self.listeners.insert(id, task);
    }

    pub fn set_connecting(&mut self, id: ConnectionId, task: JoinHandle<()>) {
        self.peers.insert(id, Peer::Connecting(task));
    }

    fn set_established(&mut self, id: ConnectionId, stream: TcpStream) {
        self.peers.insert(id, Peer::Established(stream));
    }

    /// [`Command::ClosePeer`](crate::proto::server::Command::ClosePeer).
    pub fn close_peer(&mut self, id: ConnectionId) {
        self.connects.retain(|(i, ..)| *i != id);
        match self.peers.remove(&id) {
            Some(Peer::Connecting(task)) => task.abort(),
            // A stored permit: a pipe not started yet stops as soon as it starts.
            Some(Peer::Piped(stop)) => stop.notify_one(),
            Some(Peer::Established(_)) | None => {}
        }
    }

    /// [`Command::Pipe`](crate::proto::server::Command::Pipe): hands the peer connection to the
    /// client connection's task.
    pub fn pipe(&mut self, id: ConnectionId, client: FiveTuple) {
        let handover = match self.peers.remove(&id) {
            Some(Peer::Established(peer)) => {
                let stop = Rc::new(Notify::new());
                self.peers.insert(id, Peer::Piped(Rc::clone(&stop)));
                Handover::Pipe { id, peer, stop }
            }
            _ => Handover::Close,
        };
        self.handovers.insert(client, handover);
    }

    /// [`Command::HandOver`](crate::proto::server::Command::HandOver).
    pub fn hand_over(&mut self, client: FiveTuple, shard: u8) {
        self.handovers.insert(client, Handover::Move { shard });
    }

    /// Whether the client connection's task must stop reading TURN frames. Asked after every
    /// stream frame: the map is empty nearly always, and then nothing is hashed.
    pub fn has_handover(&self, client: &FiveTuple) -> bool {
        !self.handovers.is_empty() && self.handovers.contains_key(client)
    }

    pub fn take_handover(&mut self, client: &FiveTuple) -> Option<Handover> {
        self.handovers.remove(client)
    }

    /// A pipe ended on its own: forget its peer entry.
    pub fn pipe_ended(&mut self, id: ConnectionId) {
        if matches!(self.peers.get(&id), Some(Peer::Piped(_))) {
            self.peers.remove(&id);
        }
    }
}

/// A listening relay socket. Bound without SO_REUSEPORT, so the bind fails on a port anyone
/// holds; SO_REUSEPORT is set after the bind, so the relay's own connections to peers can bind
/// the same address (RFC 6062 §5.2: they come from the relayed address) while no other
/// listener can.
fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Ports with connections in TIME_WAIT stay usable for a new relay.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.set_reuse_port(true)?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A TCP connection from the relay's address to the peer.
async fn connect_from(from: SocketAddr, peer: SocketAddr) -> io::Result<TcpStream> {
    let socket = match from {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(from)?;
    let stream = socket.connect(peer).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Accepts peers on a TCP relay until the relay closes (the task is aborted).
pub async fn accept_peers<H: Host>(host: Rc<RefCell<H>>, relay: RelayId, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors, say: the listener stays, the next accept may succeed.
            Err(e) => {
                tracing::debug!(error = %e, "tcp relay accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut st = host.borrow_mut();
        let now = Instant::now();
        if let Some(id) = st.core().peer_accepted(now, relay, peer) {
            st.tcp_relays().set_established(id, stream);
        }
        st.run_commands(now);
    }
}

/// Carries out a [`Command::ConnectPeer`](crate::proto::server::Command::ConnectPeer). The core
/// owns the 30-second limit: at its end it closes the connection, which aborts this task.
pub async fn connect_peer<H: Host>(
    host: Rc<RefCell<H>>,
    id: ConnectionId,
    from: SocketAddr,
    peer: SocketAddr,
) {
    let result = connect_from(from, peer).await;
    let mut st = host.borrow_mut();
    let now = Instant::now();
    let outcome = match &result {
        Ok(_) => Ok(()),
        Err(e) => Err(PeerConnectError::Os(e.kind())),
    };
    let keep = st.core().peer_connected(now, id, outcome);
    match result {
        Ok(stream) if keep => st.tcp_relays().set_established(id, stream),
        _ => {
            st.tcp_relays().peers.remove(&id);
        }
    }
    st.run_commands(now);
}

/// The client side of a pipe, as the connection task holds it: plain TCP, or TLS on it.
pub trait ClientWire {
    /// Where a socket read goes: `plain` itself, or a scratch buffer for ciphertext.
    fn read_target<'a>(&self, plain: &'a mut Vec<u8>, raw: &'a mut Vec<u8>) -> &'a mut Vec<u8>;
    /// Moves what was read into `raw` to `plain` (decrypted); true at the end of the session.
    fn absorb(&mut self, raw: &mut Vec<u8>, plain: &mut Vec<u8>) -> io::Result<bool>;
    /// Writes what the socket takes now of what is queued on `conn` (encrypted).
    fn flush(&mut self, conn: &StreamConn, stream: &TcpStream) -> io::Result<usize>;
    /// Whether anything waits for the socket: bytes queued on `conn`, or the layer's own.
    fn has_output(&self, conn: &StreamConn) -> bool;
}

/// Bytes one pipe passed, per direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Piped {
    pub to_peer: u64,
    pub to_client: u64,
}

impl Piped {
    fn add(&mut self, o: Piped) {
        self.to_peer += o.to_peer;
        self.to_client += o.to_client;
    }
}

/// Passes bytes both ways between a client data connection and a peer connection until either
/// side ends (end of stream or error) or `stop` is notified; then both close (closing one side
/// closes the other). What one side sent before it ended is still delivered to the other.
/// `first`: client bytes read past the ConnectionBind, for the peer before anything else.
/// `conn` is the client's output queue, here the peer-to-client buffer. `report` gets the bytes
/// passed since its last call, every [`REPORT_EVERY`] bytes and at the end; the return value is
/// the whole.
pub async fn pipe<W: ClientWire>(
    client: &TcpStream,
    wire: &mut W,
    conn: &StreamConn,
    peer: &TcpStream,
    first: Vec<u8>,
    stop: &Notify,
    report: &mut impl FnMut(Piped),
) -> Piped {
    let mut up = first;
    let mut raw = Vec::new();
    let (mut total, mut piped) = (Piped::default(), Piped::default());
    // One side ended: nothing more is read, what is buffered goes out, then both close.
    let mut ending = false;
    let queued = || conn.with_queue(|q| q.len());
    let end: io::Result<()> = loop {
        match write_some(peer, &mut up) {
            Ok(n) => piped.to_peer += n as u64,
            Err(e) => break Err(e),
        }
        let before = queued();
        if let Err(e) = wire.flush(conn, client) {
            break Err(e);
        }
        piped.to_client += (before - queued()) as u64;
        if piped.to_peer + piped.to_client >= REPORT_EVERY {
            total.add(piped);
            report(std::mem::take(&mut piped));
        }
        if ending && up.is_empty() && !wire.has_output(conn) {
            break Ok(());
        }
        let read_client = !ending && up.len() < PIPE_BUFFER;
        let read_peer = !ending && queued() < PIPE_BUFFER;
        let (to_peer, to_client) = (!up.is_empty(), wire.has_output(conn));
        tokio::select! {
            () = stop.notified() => break Ok(()),
            ready = client.readable(), if read_client => {
                if let Err(e) = ready {
                    break Err(e);
                }
                match tcp::read_some(client, wire.read_target(&mut up, &mut raw)) {
                    Ok(0) => ending = true,
                    Ok(_) => match wire.absorb(&mut raw, &mut up) {
                        Ok(ended) => ending |= ended,
                        Err(e) => break Err(e),
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => break Err(e),
                }
            }
            ready = peer.readable(), if read_peer => {
                if let Err(e) = ready {
                    break Err(e);
                }
                match conn.with_queue(|q| tcp::read_some(peer, q)) {
                    Ok(0) => ending = true,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => break Err(e),
                }
            }
            ready = client.writable(), if to_client => {
                if let Err(e) = ready {
                    break Err(e);
                }
            }
            ready = peer.writable(), if to_peer => {
                if let Err(e) = ready {
                    break Err(e);
                }
            }
        }
    };
    if let Err(e) = end {
        tracing::debug!(error = %e, "tcp relay pipe ended");
    }
    total.add(piped);
    report(piped);
    total
}

/// Writes what `peer` takes now of `out`; the rest stays.
fn write_some(peer: &TcpStream, out: &mut Vec<u8>) -> io::Result<usize> {
    let mut written = 0;
    while written < out.len() {
        match peer.try_write(&out[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    out.drain(..written);
    Ok(written)
}

/// A pipe ended (on its own, or stopped): its peer entry goes.
pub fn pipe_ended<H: Host>(host: &RefCell<H>, id: ConnectionId) {
    host.borrow_mut().tcp_relays().pipe_ended(id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Plain TCP, as the connection task's wire is without TLS.
    struct Plain;

    impl ClientWire for Plain {
        fn read_target<'a>(&self, plain: &'a mut Vec<u8>, _: &'a mut Vec<u8>) -> &'a mut Vec<u8> {
            plain
        }
        fn absorb(&mut self, _: &mut Vec<u8>, _: &mut Vec<u8>) -> io::Result<bool> {
            Ok(false)
        }
        fn flush(&mut self, conn: &StreamConn, stream: &TcpStream) -> io::Result<usize> {
            conn.flush(stream)
        }
        fn has_output(&self, conn: &StreamConn) -> bool {
            conn.has_output()
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A connected pair: the tokio end the pipe holds, and a blocking far end for the test,
    /// with small kernel buffers so that backpressure shows at once.
    async fn link() -> (TcpStream, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let far = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (near, _) = listener.accept().await.unwrap();
        for sock in [socket2::SockRef::from(&near), socket2::SockRef::from(&far)] {
            let _ = sock.set_recv_buffer_size(4096);
            let _ = sock.set_send_buffer_size(4096);
        }
        far.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (near, far)
    }

    #[test]
    fn a_pipe_passes_both_ways_and_ends_when_one_side_closes() {
        runtime().block_on(async {
            let (client, mut client_far) = link().await;
            let (peer, mut peer_far) = link().await;
            let far = std::thread::spawn(move || {
                client_far.write_all(b" and more").unwrap();
                let mut got = [0u8; 14];
                peer_far.read_exact(&mut got).unwrap();
                // The bytes read past the ConnectionBind come first.
                assert_eq!(&got, b"early and more");
                peer_far.write_all(b"back").unwrap();
                let mut back = [0u8; 4];
                client_far.read_exact(&mut back).unwrap();
                assert_eq!(&back, b"back");
                // The client hangs up: the pipe ends and the peer sees the end of its stream.
                drop(client_far);
                let mut rest = Vec::new();
                peer_far.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty());
            });
            let (conn, stop) = (StreamConn::default(), Notify::new());
            let mut reported = Piped::default();
            let piped = pipe(
                &client,
                &mut Plain,
                &conn,
                &peer,
                b"early".to_vec(),
                &stop,
                &mut |p| reported.add(p),
            )
            .await;
            assert_eq!(reported, piped, "every byte reported once");
            // Its owner closes both once the pipe returns.
            drop((client, peer));
            far.join().unwrap();
            assert_eq!(
                piped,
                Piped {
                    to_peer: 14,
                    to_client: 4
                }
            );
        });
    }

    #[test]
    fn a_peer_that_does_not_read_stops_the_reading_from_the_client() {
        runtime().block_on(async {
            let (client, client_far) = link().await;
            let (peer, peer_far) = link().await;
            let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let count = std::sync::Arc::clone(&written);
            // The client floods; the peer reads nothing.
            std::thread::spawn(move || {
                let mut client_far = client_far;
                client_far
                    .set_write_timeout(Some(Duration::from_secs(3)))
                    .unwrap();
                let chunk = [7u8; 4096];
                for _ in 0..4096 {
                    if client_far.write_all(&chunk).is_err() {
                        break;
                    }
                    count.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
                }
            });
            let (conn, stop) = (StreamConn::default(), Notify::new());
            let stopper = async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                stop.notify_one();
            };
            let (mut wire, mut ignore) = (Plain, |_| {});
            let (piped, ()) = tokio::join!(
                pipe(
                    &client,
                    &mut wire,
                    &conn,
                    &peer,
                    Vec::new(),
                    &stop,
                    &mut ignore
                ),
                stopper
            );
            let written = written.load(std::sync::atomic::Ordering::Relaxed);
            // The client got out what the (small) kernel buffers of both links hold and one
            // pipe buffer, not the 16 MiB it tried.
            assert!(
                written < 1 << 20,
                "{written} bytes went into a pipe nobody reads"
            );
            assert!(piped.to_peer < 1 << 20, "{piped:?}");
            drop(peer_far);
        });
    }

    #[test]
    fn a_stop_ends_the_pipe() {
        runtime().block_on(async {
            let (client, _client_far) = link().await;
            let (peer, _peer_far) = link().await;
            let (conn, stop) = (StreamConn::default(), Notify::new());
            // A permit stored before the pipe starts: the allocation ended in between.
            stop.notify_one();
            let piped = tokio::time::timeout(
                Duration::from_secs(5),
                pipe(
                    &client,
                    &mut Plain,
                    &conn,
                    &peer,
                    Vec::new(),
                    &stop,
                    &mut |_| {},
                ),
            )
            .await
            .expect("the pipe stops");
            assert_eq!(piped, Piped::default());
        });
    }
}

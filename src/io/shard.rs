//! One shard: a thread with a current-thread tokio runtime, its own SO_REUSEPORT listeners, the
//! relay sockets of the allocations it created, and one protocol core. Nothing on the packet path
//! leaves the thread or takes a lock.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::relay::{Reservations, ShardRelays};
use super::tcp::{self, StreamConn};
use super::tcp_relay::{self, Handover, TcpRelays};
use super::udp::{recv_peer_batch, Listener, PeerBatch, RecvBatch, RegisteredSocket, PEER_BATCH};
use crate::proto::allocation::RelayId;
use crate::proto::codec::{self, HEADROOM};
use crate::proto::error::EndReason;
use crate::proto::server::{
    ClientAction, Command, Core, CoreConfig, PeerAction, RelayTransport, SessionInfo, Shared, Stats,
};
use crate::proto::{FiveTuple, Transport};

/// Datagrams handled per wake-up before yielding, so one busy socket cannot starve the others.
const BUDGET_PER_WAKE: usize = 256;

/// What a shard reports to the control plane about itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShardReport {
    pub core: Stats,
    pub allocations: usize,
    pub relay_sockets: usize,
    pub send_errors: u64,
}

/// Control-plane requests to a shard. Handled between packets on the shard's own thread.
pub enum ShardCommand {
    /// A reloaded configuration; allocations, permissions and channels stay.
    SetConfig(Arc<CoreConfig>),
    /// Refuse new allocations from now on.
    Drain,
    Report(oneshot::Sender<ShardReport>),
    Sessions(oneshot::Sender<Vec<SessionInfo>>),
    Kill {
        slot: u32,
        gen: u32,
        reply: oneshot::Sender<bool>,
    },
    EndUser {
        user: String,
        reply: oneshot::Sender<usize>,
    },
    /// A client connection another shard accepted, whose ConnectionBind names a TCP relay
    /// connection of this shard (RFC 6062); `buffered` starts with that request.
    Adopt {
        stream: std::net::TcpStream,
        client: SocketAddr,
        buffered: Vec<u8>,
    },
}

pub struct ShardSetup {
    pub index: usize,
    pub listen: Vec<SocketAddr>,
    /// Clones of the daemon's listening TCP sockets: every shard accepts from each.
    pub tcp_listeners: Vec<std::net::TcpListener>,
    pub config: Arc<CoreConfig>,
    pub shared: Arc<Shared>,
    pub relay_ports: (u16, u16),
    pub reservations: Arc<Reservations>,
    pub shutdown: watch::Receiver<bool>,
    pub commands: mpsc::UnboundedReceiver<ShardCommand>,
    /// Every shard's command sender, by index (this one's included): where client connections
    /// are moved to (see `ShardCommand::Adopt`).
    pub siblings: Arc<[mpsc::UnboundedSender<ShardCommand>]>,
    pub seed: u64,
}

struct ShardState {
    core: Core,
    relays: ShardRelays,
    /// Reserved ports belong to no shard; shard 0 counts them once for the whole server.
    counts_reservations: bool,
    listeners: Vec<Rc<Listener>>,
    /// The TCP clients this shard accepted, by 5-tuple.
    streams: HashMap<FiveTuple, Rc<StreamConn>>,
    reply: Vec<u8>,
    peers: PeerBatch,
    send_errors: u64,
    tcp_relays: TcpRelays,
    siblings: Arc<[mpsc::UnboundedSender<ShardCommand>]>,
}

impl tcp_relay::Host for ShardState {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }
    fn tcp_relays(&mut self) -> &mut TcpRelays {
        &mut self.tcp_relays
    }
    fn run_commands(&mut self, now: Instant) {
        ShardState::run_commands(self, now)
    }
    fn adopt_elsewhere(
        &self,
        shard: u8,
        stream: std::net::TcpStream,
        client: SocketAddr,
        buffered: Vec<u8>,
    ) -> bool {
        let adopt = ShardCommand::Adopt {
            stream,
            client,
            buffered,
        };
        let sibling = self.siblings.get(shard as usize);
        sibling.is_some_and(|s| s.send(adopt).is_ok())
    }
}

impl ShardState {
    /// Sends the frame the core wrote into peer batch slot `slot`.
    fn send_frame_to_client(&mut self, to: &FiveTuple, slot: usize, start: usize, end: usize) {
        if to.transport != Transport::Udp {
            let buf = self.peers.slot_mut(slot);
            // ChannelData is padded to 4 bytes on a stream (RFC 8656 §12.5).
            let end = if buf[start] >> 6 == 0b01 {
                codec::pad_for_stream(buf, start, end)
            } else {
                end
            };
            let frame = &self.peers.slot(slot)[start..end];
            if !self.streams.get(to).is_some_and(|c| c.queue(frame)) {
                self.send_errors += 1;
            }
            return;
        }
        let Some(listener) = self.listeners.iter().find(|l| l.serves(to.local)) else {
            return;
        };
        let frame = &self.peers.slot(slot)[start..end];
        if let Err(e) = listener.try_send(frame, to.client, to.local) {
            self.send_errors += 1;
            tracing::trace!(error = %e, client = %to.client, "send to client failed");
        }
    }

    fn send_to_peer(&mut self, relay: RelayId, peer: SocketAddr, payload: &[u8], df: bool) {
        let Some(socket) = self.relays.socket_for_send(relay, df) else {
            return;
        };
        // Straight to the kernel: tokio's try_send_to consults a readiness cache that is still
        // empty for a socket opened a moment ago, and would drop a client's first datagram.
        // An unreachable peer (ICMP, ENETUNREACH, a full buffer) costs this datagram, never the
        // allocation.
        if let Err(e) = socket2::SockRef::from(socket).send_to(payload, &peer.into()) {
            self.send_errors += 1;
            tracing::trace!(error = %e, peer = %peer, "send to peer failed");
        }
    }

    /// Queues a frame on a stream client's connection; a connection too far behind loses it.
    fn queue_on_stream(&mut self, to: &FiveTuple, frame: &[u8]) {
        if !self.streams.get(to).is_some_and(|c| c.queue(frame)) {
            self.send_errors += 1;
        }
    }

    /// Sends the reply buffer to a client over the listener or connection its 5-tuple names.
    fn send_reply(&mut self, to: &FiveTuple, reply: &[u8]) {
        if to.transport != Transport::Udp {
            return self.queue_on_stream(to, reply);
        }
        let Some(listener) = self.listeners.iter().find(|l| l.serves(to.local)) else {
            return;
        };
        if let Err(e) = listener.try_send(reply, to.client, to.local) {
            self.send_errors += 1;
            tracing::trace!(error = %e, "reply send failed");
        }
    }

    /// One datagram or stream frame from a client, through the core and out again.
    fn client_frame(&mut self, now: Instant, ft: &FiveTuple, data: &[u8]) {
        let mut reply = std::mem::take(&mut self.reply);
        match self.core.handle_client(now, ft, data, &mut reply) {
            ClientAction::Drop => {}
            ClientAction::Reply { to } => self.send_reply(&to, &reply),
            ClientAction::ToPeer {
                relay,
                peer,
                start,
                end,
                dont_fragment,
            } => self.send_to_peer(relay, peer, &data[start..end], dont_fragment),
        }
        self.reply = reply;
        self.run_commands(now);
    }

    /// Carries out what the core asked for during the last calls: relay sockets opened (and the
    /// Allocate answers that waited for them sent), closed, reservations dropped.
    fn run_commands(&mut self, now: Instant) {
        while let Some(command) = self.core.poll_command() {
            match command {
                Command::OpenRelay(req) => {
                    let result = match req.transport {
                        RelayTransport::Udp => self.relays.open(&req),
                        RelayTransport::Tcp => self.tcp_relays.open(&req),
                    };
                    let mut reply = std::mem::take(&mut self.reply);
                    if let ClientAction::Reply { to } =
                        self.core.relay_opened(now, req.id, result, &mut reply)
                    {
                        self.send_reply(&to, &reply);
                    }
                    self.reply = reply;
                }
                Command::CloseRelay(id) => {
                    self.relays.close(id);
                    self.tcp_relays.close(id);
                }
                Command::DropReservation(token) => self.relays.drop_reservation(token),
                Command::ConnectPeer { id, from, peer } => self.tcp_relays.connect(id, from, peer),
                Command::ClosePeer(id) => self.tcp_relays.close_peer(id),
                Command::Pipe { id, client } => self.tcp_relays.pipe(id, client),
                Command::HandOver { client, shard } => self.tcp_relays.hand_over(client, shard),
                Command::ToClient { to, message } => self.send_reply(&to, &message),
            }
        }
    }

    fn report(&mut self) -> ShardReport {
        ShardReport {
            core: *self.core.stats(),
            allocations: self.core.allocation_count(),
            // A reserved port's socket is open and its port taken, claimed or not.
            relay_sockets: self.relays.open_count()
                + self.tcp_relays.listener_count()
                + if self.counts_reservations {
                    self.core.shared().reserved_ports()
                } else {
                    0
                },
            send_errors: self.send_errors,
        }
    }
}

type Shard = Rc<RefCell<ShardState>>;

/// Binds the listeners and runs the shard until shutdown; returns its final counters. Reports
/// binding errors before serving through `bound`, so the daemon can refuse to start instead of
/// running half-bound.
pub fn run(
    setup: ShardSetup,
    bound: std::sync::mpsc::Sender<io::Result<Vec<SocketAddr>>>,
) -> ShardReport {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = bound.send(Err(e));
            return ShardReport::default();
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(setup, bound))
}

async fn serve(
    setup: ShardSetup,
    bound: std::sync::mpsc::Sender<io::Result<Vec<SocketAddr>>>,
) -> ShardReport {
    let mut listeners = Vec::new();
    for addr in &setup.listen {
        match Listener::bind(*addr) {
            Ok(l) => listeners.push(Rc::new(l)),
            Err(e) => {
                let _ = bound.send(Err(io::Error::new(
                    e.kind(),
                    format!("udp listener {addr}: {e}"),
                )));
                return ShardReport::default();
            }
        }
    }
    let _ = bound.send(Ok(listeners.iter().map(|l| l.bound).collect()));

    let relays = ShardRelays::new(setup.relay_ports, Arc::clone(&setup.reservations));
    let mut core = Core::new(setup.config, setup.shared, setup.seed);
    core.set_shard(setup.index);
    let state: Shard = Rc::new(RefCell::new(ShardState {
        core,
        relays,
        counts_reservations: setup.index == 0,
        listeners: listeners.clone(),
        streams: HashMap::new(),
        reply: Vec::with_capacity(1500),
        peers: PeerBatch::new(),
        send_errors: 0,
        tcp_relays: TcpRelays::new(setup.relay_ports),
        siblings: setup.siblings,
    }));
    for listener in listeners {
        tokio::task::spawn_local(listen(Rc::clone(&state), listener));
    }
    for listener in setup.tcp_listeners {
        match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => {
                tokio::task::spawn_local(accept(Rc::clone(&state), l));
            }
            Err(e) => tracing::error!(error = %e, "tcp listener not served by this shard"),
        }
    }
    tokio::task::spawn_local(timers(Rc::clone(&state)));
    tokio::task::spawn_local(commands(Rc::clone(&state), setup.commands));

    let mut shutdown = setup.shutdown;
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    let mut st = state.borrow_mut();
    let now = Instant::now();
    st.core.close_all(now, EndReason::Shutdown);
    st.run_commands(now);
    st.report()
}

async fn commands(state: Shard, mut rx: mpsc::UnboundedReceiver<ShardCommand>) {
    while let Some(cmd) = rx.recv().await {
        let mut st = state.borrow_mut();
        let now = Instant::now();
        // A dropped reply channel only means the asker gave up; nothing to do about it.
        match cmd {
            ShardCommand::SetConfig(config) => st.core.set_config(config),
            ShardCommand::Drain => st.core.set_draining(true),
            ShardCommand::Report(reply) => {
                let _ = reply.send(st.report());
            }
            ShardCommand::Sessions(reply) => {
                let _ = reply.send(st.core.sessions(now));
            }
            ShardCommand::Kill { slot, gen, reply } => {
                let _ = reply.send(st.core.end_session(slot, gen, now, EndReason::Admin));
            }
            ShardCommand::EndUser { user, reply } => {
                let _ = reply.send(st.core.end_user(&user, now, EndReason::Revoked));
            }
            ShardCommand::Adopt {
                stream,
                client,
                buffered,
            } => match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => {
                    let task = connection(Rc::clone(&state), stream, client, buffered);
                    tokio::task::spawn_local(task);
                }
                Err(e) => tracing::debug!(error = %e, "moved client connection lost"),
            },
        }
        st.run_commands(now);
    }
}

async fn listen(state: Shard, listener: Rc<Listener>) {
    let mut batch = RecvBatch::new();
    loop {
        let Ok(mut ready) = listener.readable().await else {
            return;
        };
        let mut handled = 0;
        while handled < BUDGET_PER_WAKE {
            let n = match listener.recv_batch(&mut batch) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "listener receive error");
                    handled += 1;
                    continue;
                }
            };
            handled += n;
            let now = Instant::now();
            let mut guard = state.borrow_mut();
            let st = &mut *guard;
            for i in 0..n {
                let meta = &batch.meta[i];
                let ft = FiveTuple {
                    transport: Transport::Udp,
                    client: meta.addr,
                    local: listener.local_for(meta),
                };
                st.client_frame(now, &ft, batch.datagram(i));
            }
            spawn_relay_tasks(&state, st);
            if n < quinn_udp::BATCH_SIZE {
                // A short batch means the queue was empty: skip the read that would say EAGAIN.
                // tokio keeps readiness if a datagram arrived since it was reported.
                ready.clear_ready();
                break;
            }
        }
        drop(ready);
        if handled >= BUDGET_PER_WAKE {
            tokio::task::yield_now().await;
        }
    }
}

async fn accept(state: Shard, listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                tokio::task::spawn_local(connection(Rc::clone(&state), stream, client, Vec::new()));
            }
            // Out of file descriptors, say: the listener stays, the next accept may succeed.
            Err(e) => {
                tracing::debug!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One TCP client, from accept to close; its allocation ends with the connection. `buffered`:
/// bytes already read from it (by the shard that moved it here).
async fn connection(
    state: Shard,
    stream: tokio::net::TcpStream,
    client: SocketAddr,
    buffered: Vec<u8>,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let ft = FiveTuple {
        transport: Transport::Tcp,
        client,
        local,
    };
    let conn = Rc::new(StreamConn::default());
    state.borrow_mut().streams.insert(ft, Rc::clone(&conn));
    match serve_stream(&state, &stream, &ft, &conn, buffered).await {
        Err(e) => tracing::debug!(client = %client, error = %e, "tcp connection closed"),
        Ok(None) => {}
        Ok(Some((handover, rest))) => {
            // RFC 6062: after its ConnectionBind the connection carries no more TURN.
            let _ = flush_all(&stream, &conn).await;
            let moved = tcp_relay::hand_over(&state, stream, &ft, handover, rest).await;
            if moved {
                state.borrow_mut().streams.remove(&ft);
                return;
            }
        }
    }
    let mut st = state.borrow_mut();
    st.streams.remove(&ft);
    let now = Instant::now();
    st.core.connection_closed(&ft, now);
    st.run_commands(now);
}

/// Writes everything queued for the client.
async fn flush_all(stream: &tokio::net::TcpStream, conn: &StreamConn) -> io::Result<()> {
    while conn.has_output() {
        stream.writable().await?;
        conn.flush(stream)?;
    }
    Ok(())
}

/// Serves TURN frames until the connection ends, or until a ConnectionBind hands it over: then
/// the handover, and the bytes after that request (or from it on, for a move to another shard).
async fn serve_stream(
    state: &Shard,
    stream: &tokio::net::TcpStream,
    ft: &FiveTuple,
    conn: &StreamConn,
    mut buf: Vec<u8>,
) -> io::Result<Option<(Handover, Vec<u8>)>> {
    if let Some(handover) = client_frames(state, ft, &mut buf)? {
        return Ok(Some(handover));
    }
    let mut idle_until = tokio::time::Instant::now() + tcp::IDLE_WITHOUT_ALLOCATION;
    loop {
        let writing = conn.has_output();
        tokio::select! {
            () = tokio::time::sleep_until(idle_until) => {
                if !state.borrow().core.has_allocation(ft) {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "idle without an allocation"));
                }
                idle_until = tokio::time::Instant::now() + tcp::IDLE_WITHOUT_ALLOCATION;
            }
            ready = stream.readable() => {
                ready?;
                idle_until = tokio::time::Instant::now() + tcp::IDLE_WITHOUT_ALLOCATION;
                match tcp::read_some(stream, &mut buf) {
                    Ok(true) => {}
                    Ok(false) => return Ok(None),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
                if let Some(handover) = client_frames(state, ft, &mut buf)? {
                    return Ok(Some(handover));
                }
            }
            ready = stream.writable(), if writing => ready?,
            () = conn.queued(), if !writing => {}
        }
        conn.flush(stream)?;
    }
}

/// The complete frames in `buf`, through the core; stops at a ConnectionBind that hands the
/// connection over (RFC 6062), with the bytes that are no longer TURN.
fn client_frames(
    state: &Shard,
    ft: &FiveTuple,
    buf: &mut Vec<u8>,
) -> io::Result<Option<(Handover, Vec<u8>)>> {
    let mut guard = state.borrow_mut();
    let st = &mut *guard;
    let now = Instant::now();
    let (mut at, mut handed_at) = (0, None);
    let used = tcp::complete_frames(buf, |frame| {
        st.client_frame(now, ft, frame);
        let start = at;
        at += frame.len();
        let stop = st.tcp_relays.has_handover(ft);
        handed_at = handed_at.or(stop.then_some(start));
        !stop
    })?;
    spawn_relay_tasks(state, st);
    if let Some(h) = handed_at.and_then(|_| st.tcp_relays.take_handover(ft)) {
        // A moved connection's new shard reads the ConnectionBind again.
        let from = match h {
            Handover::Move { .. } => handed_at.unwrap_or(used),
            _ => used,
        };
        return Ok(Some((h, buf.split_off(from))));
    }
    buf.drain(..used);
    Ok(None)
}

/// Starts the receive task of every relay socket the core opened during the last calls.
fn spawn_relay_tasks(state: &Shard, st: &mut ShardState) {
    for (id, socket) in st.relays.take_pending() {
        let task = tokio::task::spawn_local(relay(Rc::clone(state), id, socket));
        st.relays.set_task(id, task);
    }
    tcp_relay::spawn_tasks(state, &mut st.tcp_relays);
}

async fn relay(state: Shard, id: RelayId, socket: Rc<RegisteredSocket>) {
    loop {
        let Ok(mut ready) = socket.readable().await else {
            return;
        };
        let mut handled = 0;
        while handled < BUDGET_PER_WAKE {
            let mut guard = state.borrow_mut();
            let st = &mut *guard;
            let n = match recv_peer_batch(socket.get_ref(), &mut st.peers) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                Err(e) => {
                    // ICMP errors surface here on some kernels; they never end the allocation.
                    tracing::trace!(error = %e, "relay receive error");
                    handled += 1;
                    continue;
                }
            };
            handled += n;
            let now = Instant::now();
            for i in 0..n {
                let (len, from) = st.peers.received[i];
                let action = st.core.handle_peer(
                    now,
                    id,
                    from,
                    st.peers.slot_mut(i),
                    HEADROOM,
                    HEADROOM + len,
                );
                if let PeerAction::ToClient { to, start, end } = action {
                    st.send_frame_to_client(&to, i, start, end);
                }
            }
            if n < PEER_BATCH {
                // The queue was empty: no EAGAIN read needed (see the listener).
                ready.clear_ready();
                break;
            }
        }
        drop(ready);
        if handled >= BUDGET_PER_WAKE {
            tokio::task::yield_now().await;
        }
    }
}

async fn timers(state: Shard) {
    loop {
        let next = state.borrow().core.poll_timeout();
        let cap = Instant::now() + Duration::from_secs(1);
        let wake = next.map_or(cap, |t| t.min(cap));
        tokio::time::sleep_until(wake.into()).await;
        let now = Instant::now();
        let mut st = state.borrow_mut();
        st.core.handle_timeout(now);
        st.run_commands(now);
    }
}

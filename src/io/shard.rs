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

use super::connection::{self, ListenerKind, StreamSettings};
use super::mailbox::{Mailboxes, Parcel};
use super::relay::{Reservations, ShardRelays};
use super::send_batch::{FlushSignal, SendQueue};
use super::stream_stats::ConnectionStats;
use super::tcp::StreamConn;
use super::tcp_relay::{self, TcpRelays};
use super::udp::{recv_peer_batch, Listener, PeerBatch, RecvBatch, RegisteredSocket, PEER_BATCH};
use super::usage::UsageLog;
use crate::proto::allocation::RelayId;
use crate::proto::codec::{self, HEADROOM};
use crate::proto::error::EndReason;
use crate::proto::server::{
    ByTransport, ClientAction, Command, Core, CoreConfig, PeerAction, RelayTransport, SessionInfo,
    Shared, Stats,
};
use crate::proto::{FiveTuple, Transport};

/// Datagrams handled per wake-up before yielding, so one busy socket cannot starve the others.
const BUDGET_PER_WAKE: usize = 256;

/// What a shard reports to the control plane about itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShardReport {
    pub core: Stats,
    /// Allocations in force, by the transport their client uses.
    pub allocations: ByTransport,
    pub connections: ConnectionStats,
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
    /// connection of this shard (RFC 6062).
    Adopt(connection::MovedConnection),
}

pub struct ShardSetup {
    pub index: usize,
    pub listen: Vec<SocketAddr>,
    /// Clones of the daemon's listening TCP and TLS sockets: every shard accepts from each.
    pub tcp_listeners: Vec<(std::net::TcpListener, ListenerKind)>,
    pub streams: Arc<StreamSettings>,
    pub config: Arc<CoreConfig>,
    pub shared: Arc<Shared>,
    pub relay_ports: (u16, u16),
    pub reservations: Arc<Reservations>,
    pub shutdown: watch::Receiver<bool>,
    pub commands: mpsc::UnboundedReceiver<ShardCommand>,
    /// Every shard's command sender, by index (this one's included): where client connections
    /// are moved to (see `ShardCommand::Adopt`).
    pub siblings: Arc<[mpsc::UnboundedSender<ShardCommand>]>,
    /// Where relay-to-relay datagrams for other shards' relays go (none with one shard).
    pub mailboxes: Option<Arc<Mailboxes>>,
    /// Where usage records go, and how often live allocations get one (none: only at the end).
    pub usage: Option<(UsageLog, Option<Duration>)>,
    pub seed: u64,
}

pub(super) struct ShardState {
    pub(super) core: Core,
    relays: ShardRelays,
    /// Reserved ports belong to no shard; shard 0 counts them once for the whole server.
    counts_reservations: bool,
    listeners: Vec<Rc<Listener>>,
    /// The TCP and TLS clients this shard serves, by 5-tuple.
    pub(super) streams: HashMap<FiveTuple, Rc<StreamConn>>,
    pub(super) connections: ConnectionStats,
    reply: Vec<u8>,
    peers: PeerBatch,
    /// Datagrams for UDP clients, one queue per listener (same index), and for peers: flushed
    /// together once every task of this reactor tick has run (see `flusher`).
    client_out: Vec<SendQueue<Listener>>,
    peer_out: SendQueue<RegisteredSocket>,
    flush: Rc<FlushSignal>,
    send_errors: u64,
    pub(super) tcp_relays: TcpRelays,
    siblings: Arc<[mpsc::UnboundedSender<ShardCommand>]>,
    mailboxes: Option<Arc<Mailboxes>>,
    /// Datagrams for other shards' relays, by shard: posted with the flush.
    handovers: Vec<Parcel>,
    usage: Option<UsageLog>,
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
}

impl ShardState {
    /// Moves a client connection to shard `shard`; false when there is no such shard.
    pub(super) fn adopt_elsewhere(&self, shard: u8, moved: connection::MovedConnection) -> bool {
        let sibling = self.siblings.get(shard as usize);
        sibling.is_some_and(|s| s.send(ShardCommand::Adopt(moved)).is_ok())
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
                self.connections.of(to.transport).frames_dropped += 1;
            }
            return;
        }
        let Some(i) = self.listeners.iter().position(|l| l.serves(to.local)) else {
            return;
        };
        let listener = &self.listeners[i];
        let frame = &self.peers.slot(slot)[start..end];
        enqueue(
            &mut self.client_out[i],
            listener,
            to.client,
            listener.source_for(to.local),
            frame,
            &self.flush,
            &mut self.send_errors,
        );
    }

    fn send_to_peer(&mut self, relay: RelayId, peer: SocketAddr, payload: &[u8], df: bool) {
        if df {
            // DONT-FRAGMENT is a socket option, read at send time: what is queued leaves first,
            // then this datagram alone (Send indications with DF are rare).
            self.flush_sends();
            let Some(socket) = self.relays.socket_for_send(relay, true) else {
                return;
            };
            // Straight to the kernel: tokio's try_send_to consults a readiness cache that is
            // still empty for a socket opened a moment ago, and would drop the first datagram.
            if let Err(e) = socket2::SockRef::from(socket).send_to(payload, &peer.into()) {
                self.send_errors += 1;
                tracing::trace!(error = %e, peer = %peer, "send to peer failed");
            }
            return;
        }
        let Some(socket) = self.relays.registered_for_send(relay, false) else {
            return;
        };
        // An unreachable peer (ICMP, ENETUNREACH, a full buffer) costs this datagram, never the
        // allocation.
        enqueue(
            &mut self.peer_out,
            socket,
            peer,
            None,
            payload,
            &self.flush,
            &mut self.send_errors,
        );
    }

    fn hand_over(&mut self, shard: u8, to: SocketAddr, from: SocketAddr, payload: &[u8]) {
        let shard = usize::from(shard);
        if self.handovers.len() <= shard {
            self.handovers.resize_with(shard + 1, Parcel::default);
        }
        if self.handovers[shard].is_empty() {
            self.flush.request();
        }
        self.handovers[shard].push(to, from, payload);
    }

    /// Sends every queued datagram: peers first (other shards' relays among them), so echoes
    /// come back sooner. A handover a shard cannot take counts as a send error, as a full
    /// socket buffer would.
    pub(super) fn flush_sends(&mut self) {
        let mut dropped = self.peer_out.flush().dropped;
        if let Some(mailboxes) = &self.mailboxes {
            for (shard, parcel) in self.handovers.iter_mut().enumerate() {
                if !parcel.is_empty() {
                    dropped += mailboxes.post(shard as u8, parcel);
                }
            }
        }
        for queue in &mut self.client_out {
            dropped += queue.flush().dropped;
        }
        self.send_errors += dropped as u64;
    }

    /// Queues a frame on a stream client's connection; a connection too far behind loses it.
    fn queue_on_stream(&mut self, to: &FiveTuple, frame: &[u8]) {
        if !self.streams.get(to).is_some_and(|c| c.queue(frame)) {
            self.connections.of(to.transport).frames_dropped += 1;
        }
    }

    /// Sends the reply buffer to a client over the listener or connection its 5-tuple names.
    fn send_reply(&mut self, to: &FiveTuple, reply: &[u8]) {
        if to.transport != Transport::Udp {
            return self.queue_on_stream(to, reply);
        }
        let Some(i) = self.listeners.iter().position(|l| l.serves(to.local)) else {
            return;
        };
        let listener = &self.listeners[i];
        enqueue(
            &mut self.client_out[i],
            listener,
            to.client,
            listener.source_for(to.local),
            reply,
            &self.flush,
            &mut self.send_errors,
        );
    }

    /// One datagram or stream frame from a client, through the core and out again.
    pub(super) fn client_frame(&mut self, now: Instant, ft: &FiveTuple, data: &[u8]) {
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
            } => {
                // One shard (no mailboxes): nothing to look up per datagram.
                let target = match self.mailboxes {
                    Some(_) => self.core.handover_target(relay, &peer),
                    None => None,
                };
                match target {
                    // Another shard's relay: DF does not matter where nothing is fragmented.
                    Some((shard, from)) => self.hand_over(shard, peer, from, &data[start..end]),
                    None => self.send_to_peer(relay, peer, &data[start..end], dont_fragment),
                }
            }
        }
        self.reply = reply;
        self.run_commands(now);
    }

    /// Carries out what the core asked for during the last calls: relay sockets opened (and the
    /// Allocate answers that waited for them sent), closed, reservations dropped.
    pub(super) fn run_commands(&mut self, now: Instant) {
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
        while let Some(record) = self.core.poll_usage() {
            if let Some(usage) = &self.usage {
                usage.write(&record);
            }
        }
    }

    fn report(&mut self) -> ShardReport {
        ShardReport {
            core: *self.core.stats(),
            allocations: self.core.allocations_by_transport(),
            connections: self.connections,
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

/// Copies a datagram into `queue`, flushing first when it has no room and after when it is full;
/// a flush is requested when the queue turns non-empty.
fn enqueue<T: std::os::fd::AsRawFd>(
    queue: &mut SendQueue<T>,
    socket: &Rc<T>,
    to: SocketAddr,
    src: Option<std::net::IpAddr>,
    frame: &[u8],
    flush: &FlushSignal,
    send_errors: &mut u64,
) {
    if !queue.has_room(frame.len()) {
        *send_errors += queue.flush().dropped as u64;
    }
    if queue.is_empty() {
        flush.request();
    }
    if !queue.push(socket, to, src, frame) {
        // Larger than an empty queue holds: no datagram is.
        *send_errors += 1;
        return;
    }
    if queue.is_full() {
        *send_errors += queue.flush().dropped as u64;
    }
}

pub(super) type Shard = Rc<RefCell<ShardState>>;

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
    // GSO is a kernel feature: what the first listener found holds for relay sockets too.
    let gso = listeners.first().map_or(1, |l| l.gso_segments());
    let client_out = listeners
        .iter()
        .map(|l| SendQueue::new(l.gso_segments()))
        .collect();
    let flush = Rc::new(FlushSignal::default());
    let mut core = Core::new(setup.config, setup.shared, setup.seed);
    core.set_shard(setup.index);
    core.set_usage_records(setup.usage.is_some());
    let (usage, usage_interval) = setup.usage.unzip();
    let state: Shard = Rc::new(RefCell::new(ShardState {
        core,
        relays,
        counts_reservations: setup.index == 0,
        listeners: listeners.clone(),
        streams: HashMap::new(),
        connections: ConnectionStats::default(),
        reply: Vec::with_capacity(1500),
        peers: PeerBatch::new(),
        client_out,
        peer_out: SendQueue::new(gso),
        flush: Rc::clone(&flush),
        send_errors: 0,
        tcp_relays: TcpRelays::new(setup.relay_ports),
        siblings: setup.siblings,
        mailboxes: setup.mailboxes.clone(),
        handovers: Vec::new(),
        usage,
    }));
    for listener in listeners {
        tokio::task::spawn_local(listen(Rc::clone(&state), listener));
    }
    for (listener, kind) in setup.tcp_listeners {
        match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => {
                let settings = Arc::clone(&setup.streams);
                tokio::task::spawn_local(connection::accept(Rc::clone(&state), l, kind, settings));
            }
            Err(e) => tracing::error!(error = %e, "tcp listener not served by this shard"),
        }
    }
    tokio::task::spawn_local(timers(Rc::clone(&state)));
    tokio::task::spawn_local(flusher(Rc::clone(&state), flush));
    tokio::task::spawn_local(commands(Rc::clone(&state), setup.commands));
    if let Some(interval) = usage_interval.flatten() {
        tokio::task::spawn_local(interim_usage(Rc::clone(&state), interval));
    }
    if let Some(mailboxes) = setup.mailboxes {
        tokio::task::spawn_local(handovers(Rc::clone(&state), mailboxes, setup.index));
    }

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
    st.flush_sends();
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
            ShardCommand::Adopt(moved) => connection::adopt(&state, moved),
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

/// Starts the receive task of every relay socket the core opened during the last calls.
pub(super) fn spawn_relay_tasks(state: &Shard, st: &mut ShardState) {
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

/// An interim usage record for every live allocation, each `interval`.
async fn interim_usage(state: Shard, interval: Duration) {
    let mut ticks = tokio::time::interval_at((Instant::now() + interval).into(), interval);
    // A stalled shard catches up with one round of records, not one per missed tick.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = Instant::now();
        let mut st = state.borrow_mut();
        st.core.interim_usage(now);
        st.run_commands(now);
    }
}

/// Datagrams other shards' relays sent to this shard's relays: each goes through the core as if
/// the relay socket had read it (see `mailbox`).
async fn handovers(state: Shard, mailboxes: Arc<Mailboxes>, index: usize) {
    let mut parcel = Parcel::default();
    loop {
        mailboxes.collect(index, &mut parcel).await;
        let now = Instant::now();
        let mut guard = state.borrow_mut();
        let st = &mut *guard;
        for (to, from, payload) in parcel.iter() {
            let end = HEADROOM + payload.len();
            let buf = st.peers.slot_mut(0);
            if end + codec::TAILROOM > buf.len() {
                continue; // longer than any datagram a relay socket reads
            }
            buf[HEADROOM..end].copy_from_slice(payload);
            let action = st
                .core
                .deliver_from_shard(now, to, from, buf, HEADROOM, end);
            if let PeerAction::ToClient { to, start, end } = action {
                st.send_frame_to_client(&to, 0, start, end);
            }
        }
        parcel.clear();
    }
}

/// Flushes the send queues once the tasks woken in this reactor tick have run: tokio's LocalSet
/// runs a task woken now after those already scheduled.
async fn flusher(state: Shard, signal: Rc<FlushSignal>) {
    loop {
        signal.wait().await;
        state.borrow_mut().flush_sends();
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

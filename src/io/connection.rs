//! One TCP or TLS client connection, from accept to close: admission (total and per source),
//! the PROXY header where the listener expects one, plain or TLS told apart by the first byte,
//! the TLS handshake under a deadline, then frames to the core and queued output back out. The
//! connection belongs to the shard whose task accepted it; its allocation ends when it closes.
//!
//! Before the handshake completes (or, on plain TCP, before the first frame) the daemon holds
//! the socket, a read buffer and the TLS state only: the core has not heard of the client.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};

use super::gate::{Admitted, ConnectionGate, Refusal, SourceAdmitted};
use super::proxy::{self, ProxyHeader};
use super::shard::{spawn_relay_tasks, Shard};
use super::stream_stats::StreamCounters;
use super::tcp::{self, StreamConn};
use super::tcp_relay::{self, ClientWire, Handover};
use super::tls::{TlsContext, TlsFailure, TlsSession, HANDSHAKE_RECORD};
use crate::proto::policy::canonical_ip;
use crate::proto::{FiveTuple, Transport};

/// How one listening socket serves its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerKind {
    /// TLS and plain TCP on the one port, told apart by the first byte; else plain only.
    pub tls: bool,
    /// Every connection starts with a PROXY protocol header from a load balancer.
    pub proxy_protocol: bool,
}

/// The reloadable rules for new connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPolicy {
    /// A connection without an allocation that sends nothing for this long is closed.
    pub idle: Duration,
    /// From accept until the PROXY header is read and the TLS handshake is done.
    pub setup_timeout: Duration,
    /// Who may send a PROXY header; empty = any source (the listener is firewalled).
    pub trusted_proxies: Vec<IpNet>,
}

/// What every shard's stream listeners share.
#[derive(Debug)]
pub struct StreamSettings {
    pub tls: Option<Arc<TlsContext>>,
    pub gate: Arc<ConnectionGate>,
    policy: RwLock<Arc<StreamPolicy>>,
}

impl StreamSettings {
    pub fn new(
        tls: Option<Arc<TlsContext>>,
        gate: Arc<ConnectionGate>,
        policy: StreamPolicy,
    ) -> Arc<Self> {
        Arc::new(StreamSettings {
            tls,
            gate,
            policy: RwLock::new(Arc::new(policy)),
        })
    }

    pub fn policy(&self) -> Arc<StreamPolicy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn set_policy(&self, policy: StreamPolicy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }
}

fn listener_transport(kind: ListenerKind) -> Transport {
    if kind.tls {
        Transport::Tls
    } else {
        Transport::Tcp
    }
}

/// Accepts from one listening socket (a clone of it, shared with the other shards' tasks).
pub(super) async fn accept(
    state: Shard,
    listener: TcpListener,
    kind: ListenerKind,
    settings: Arc<StreamSettings>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match settings.gate.admit() {
                Ok(place) => {
                    let task = connection(
                        Rc::clone(&state),
                        stream,
                        peer,
                        kind,
                        Arc::clone(&settings),
                        place,
                    );
                    tokio::task::spawn_local(task);
                }
                // Dropping the stream closes it: the cheapest answer to a flood.
                Err(_) => {
                    state
                        .borrow_mut()
                        .connections
                        .of(listener_transport(kind))
                        .refused_total += 1;
                    tracing::debug!(client = %peer, "connection refused: connections_total reached");
                }
            },
            // Out of file descriptors, say: the listener stays, the next accept may succeed.
            Err(e) => {
                tracing::debug!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Why a connection ended, for the counters and the debug log.
#[derive(Debug, thiserror::Error)]
enum Closed {
    /// The client closed it, or a socket error.
    #[error("{0}")]
    Io(io::Error),
    #[error("idle without an allocation")]
    Idle,
    #[error("setup (PROXY header, TLS handshake) not done in time")]
    SetupTimeout,
    #[error("tls: {0}")]
    Tls(rustls::Error),
    #[error("the client hung up during the TLS handshake")]
    TlsHungUp,
    #[error("proxy protocol: {0}")]
    Proxy(String),
    /// A 5-tuple already served (a PROXY header repeating a live client's address).
    #[error("a connection with the same addresses is open")]
    Duplicate,
    #[error("not TURN: {0}")]
    NotTurn(io::Error),
    /// A ConnectionBind made it a TCP relay data connection (RFC 6062); `Vec`: the bytes after.
    #[error("bound to a TCP relay peer connection")]
    Handover(Handover, Vec<u8>),
    #[error("its TCP relay pipe ended")]
    Piped,
    #[error("moved to shard {0}, which owns its peer connection")]
    Moved(u8),
    #[error("its TCP relay peer connection is gone")]
    PeerGone,
}

/// A client connection on its way to the shard that owns the peer connection its ConnectionBind
/// names (RFC 6062): everything its task held, so it goes on there as it was.
#[derive(Debug)]
pub struct MovedConnection {
    stream: std::net::TcpStream,
    ft: FiveTuple,
    wire: Wire,
    /// Plaintext not handled yet, from the ConnectionBind on.
    frames: Vec<u8>,
    settings: Arc<StreamSettings>,
    places: (Admitted, SourceAdmitted),
}

impl From<io::Error> for Closed {
    fn from(e: io::Error) -> Self {
        Closed::Io(e)
    }
}

async fn connection(
    state: Shard,
    stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    settings: Arc<StreamSettings>,
    _place: Admitted,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let policy = settings.policy();
    let deadline = tokio::time::Instant::now() + policy.setup_timeout;
    let listener_transport = listener_transport(kind);
    let count = |f: fn(&mut StreamCounters), transport: Transport| {
        f(state.borrow_mut().connections.of(transport));
    };
    let mut buf = Vec::new();

    let mut client = peer;
    if kind.proxy_protocol {
        match read_proxy_header(&stream, &mut buf, peer, &policy, deadline).await {
            Ok(ProxyHeader::Proxied { source, .. }) => client = source,
            Ok(ProxyHeader::Local) => {}
            Err(closed) => {
                tracing::debug!(client = %peer, reason = %closed, "connection closed before its PROXY header");
                let f: fn(&mut StreamCounters) = match closed {
                    Closed::SetupTimeout => |c| c.setup_timeouts += 1,
                    _ => |c| c.proxy_errors += 1,
                };
                return count(f, listener_transport);
            }
        }
    }
    let _source_place = match settings.gate.admit_source(client.ip()) {
        Ok(place) => place,
        Err(Refusal::PerSource | Refusal::Total) => {
            tracing::debug!(client = %client, "connection refused: connections_per_source reached");
            return count(|c| c.refused_per_source += 1, listener_transport);
        }
    };

    let tls = match &settings.tls {
        Some(ctx) if kind.tls => {
            if buf.is_empty() {
                match read_with_deadline(&stream, &mut buf, deadline).await {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(Closed::SetupTimeout) => {
                        return count(|c| c.setup_timeouts += 1, listener_transport)
                    }
                    Err(_) => return,
                }
            }
            (buf[0] == HANDSHAKE_RECORD).then(|| Arc::clone(ctx))
        }
        _ => None,
    };
    let ft = FiveTuple {
        transport: if tls.is_some() {
            Transport::Tls
        } else {
            Transport::Tcp
        },
        client,
        local,
    };
    let mut wire = match tls {
        Some(ctx) => Wire::Tls(TlsSession::default(), ctx),
        None => Wire::Plain,
    };
    let conn = Rc::new(StreamConn::default());
    let mut served = Served {
        registered: false,
        accepted: false,
    };
    let result = serve(
        &state,
        &stream,
        &ft,
        &conn,
        &mut wire,
        buf,
        Vec::new(),
        &policy,
        deadline,
        &mut served,
    )
    .await;
    let result = match result {
        Closed::Handover(handover, rest) => {
            let places = (_place, _source_place);
            let moving = Moving {
                wire,
                rest,
                settings,
                places,
            };
            hand_over(&state, stream, &ft, &conn, handover, moving).await
        }
        other => other,
    };
    close(&state, &ft, &result, &served);
}

/// The shard's bookkeeping for a connection that ended here.
fn close(state: &Shard, ft: &FiveTuple, result: &Closed, served: &Served) {
    let mut guard = state.borrow_mut();
    let st = &mut *guard;
    let counters = st.connections.of(ft.transport);
    match result {
        Closed::Idle => counters.closed_idle += 1,
        Closed::SetupTimeout => counters.setup_timeouts += 1,
        // A setup failure only: a bad record on a session set up is the client's business (the
        // debug line below says it), not a handshake or certificate problem to alert on.
        Closed::Tls(_) if !served.accepted => counters.tls_errors += 1,
        Closed::TlsHungUp => counters.tls_closed_in_handshake += 1,
        _ => {}
    }
    if served.accepted {
        counters.open -= 1;
    }
    tracing::debug!(client = %ft.client, transport = ?ft.transport, reason = %result, "connection closed");
    if served.registered {
        st.streams.remove(ft);
        let now = Instant::now();
        st.core.connection_closed(ft, now);
        st.run_commands(now);
    }
}

/// What a connection needs to go on after its ConnectionBind, here or on another shard.
struct Moving {
    wire: Wire,
    rest: Vec<u8>,
    settings: Arc<StreamSettings>,
    places: (Admitted, SourceAdmitted),
}

/// A TCP relay data connection (RFC 6062) after its ConnectionBind: once the answer is out,
/// a pipe to its peer connection, or a move to the shard that owns that.
async fn hand_over(
    state: &Shard,
    stream: TcpStream,
    ft: &FiveTuple,
    conn: &StreamConn,
    handover: Handover,
    moving: Moving,
) -> Closed {
    let Moving {
        mut wire,
        rest,
        settings,
        places,
    } = moving;
    while wire.has_output(conn) {
        if let Err(e) = wire.flush(conn, &stream) {
            return e.into();
        }
        if wire.has_output(conn) {
            if let Err(e) = stream.writable().await {
                return e.into();
            }
        }
    }
    match handover {
        Handover::Close => Closed::PeerGone,
        Handover::Pipe { id, peer, stop } => {
            let mut report = |p: tcp_relay::Piped| {
                let mut guard = state.borrow_mut();
                let st = &mut *guard;
                st.core.record_piped(p.to_peer, p.to_client);
                let c = st.connections.of(ft.transport);
                c.bytes_in += p.to_peer;
                c.bytes_out += p.to_client;
            };
            tcp_relay::pipe(&stream, &mut wire, conn, &peer, rest, &stop, &mut report).await;
            tcp_relay::pipe_ended(state, id);
            Closed::Piped
        }
        Handover::Move { shard } => {
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => return e.into(),
            };
            let moved = MovedConnection {
                stream,
                ft: *ft,
                wire,
                frames: rest,
                settings,
                places,
            };
            match state.borrow().adopt_elsewhere(shard, moved) {
                true => Closed::Moved(shard),
                false => Closed::PeerGone,
            }
        }
    }
}

/// Serves a connection another shard moved here (see [`MovedConnection`]).
pub(super) fn adopt(state: &Shard, moved: MovedConnection) {
    tokio::task::spawn_local(adopted(Rc::clone(state), moved));
}

async fn adopted(state: Shard, moved: MovedConnection) {
    let MovedConnection {
        stream,
        ft,
        mut wire,
        frames,
        settings,
        places,
    } = moved;
    let Ok(stream) = TcpStream::from_std(stream) else {
        return;
    };
    let conn = Rc::new(StreamConn::default());
    {
        let mut st = state.borrow_mut();
        if st.streams.contains_key(&ft) {
            return;
        }
        st.streams.insert(ft, Rc::clone(&conn));
        // Counted as accepted by the shard that accepted it; open here from now on.
        st.connections.of(ft.transport).open += 1;
    }
    let mut served = Served {
        registered: true,
        accepted: true,
    };
    let policy = settings.policy();
    let deadline = tokio::time::Instant::now() + policy.setup_timeout;
    let result = serve(
        &state,
        &stream,
        &ft,
        &conn,
        &mut wire,
        Vec::new(),
        frames,
        &policy,
        deadline,
        &mut served,
    )
    .await;
    let result = match result {
        Closed::Handover(handover, rest) => {
            let moving = Moving {
                wire,
                rest,
                settings,
                places,
            };
            hand_over(&state, stream, &ft, &conn, handover, moving).await
        }
        other => other,
    };
    close(&state, &ft, &result, &served);
}

/// Reads until the PROXY header is whole; the bytes after it stay in `buf`.
async fn read_proxy_header(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    peer: SocketAddr,
    policy: &StreamPolicy,
    deadline: tokio::time::Instant,
) -> Result<ProxyHeader, Closed> {
    let from = canonical_ip(peer.ip());
    if !policy.trusted_proxies.is_empty()
        && !policy.trusted_proxies.iter().any(|net| net.contains(&from))
    {
        return Err(Closed::Proxy(format!(
            "{from} is not in proxy_protocol.trusted"
        )));
    }
    loop {
        match proxy::parse(buf) {
            Ok(Some((header, len))) => {
                buf.drain(..len);
                return Ok(header);
            }
            Ok(None) => {}
            Err(e) => return Err(Closed::Proxy(e.to_string())),
        }
        if read_with_deadline(stream, buf, deadline).await? == 0 {
            return Err(Closed::Proxy(
                "closed before the header was complete".into(),
            ));
        }
    }
}

/// One read, appended to `buf`; 0 at the end of the stream.
async fn read_with_deadline(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    deadline: tokio::time::Instant,
) -> Result<usize, Closed> {
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return Err(Closed::SetupTimeout),
            ready = stream.readable() => {
                ready?;
                match tcp::read_some(stream, buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// The byte layer under the frames.
enum Wire {
    Plain,
    Tls(TlsSession, Arc<TlsContext>),
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Wire::Plain => "plain",
            Wire::Tls(..) => "tls",
        })
    }
}

impl Wire {
    fn is_handshaking(&self) -> bool {
        match self {
            Wire::Plain => false,
            Wire::Tls(session, _) => session.is_handshaking(),
        }
    }

    fn has_output(&self, conn: &StreamConn) -> bool {
        match self {
            Wire::Plain => conn.has_output(),
            Wire::Tls(session, _) => session.has_output(conn.has_output()),
        }
    }

    /// Where the next read goes: straight into the frame buffer on plain TCP, into a scratch
    /// buffer for ciphertext on TLS.
    fn read_target<'a>(&self, frames: &'a mut Vec<u8>, raw: &'a mut Vec<u8>) -> &'a mut Vec<u8> {
        match self {
            Wire::Plain => frames,
            Wire::Tls(..) => raw,
        }
    }

    /// Decrypts ciphertext from `raw` into `frames`; true when the client ended the session.
    fn absorb(&mut self, raw: &mut Vec<u8>, frames: &mut Vec<u8>) -> Result<bool, TlsFailure> {
        let Wire::Tls(session, ctx) = self else {
            return Ok(false);
        };
        let ended = session.receive(ctx, raw, frames);
        raw.clear();
        ended
    }

    fn flush(&mut self, conn: &StreamConn, stream: &TcpStream) -> io::Result<usize> {
        match self {
            Wire::Plain => conn.flush(stream),
            Wire::Tls(session, _) => conn.with_queue(|out| session.flush(out, stream)),
        }
    }
}

impl ClientWire for Wire {
    fn read_target<'a>(&self, plain: &'a mut Vec<u8>, raw: &'a mut Vec<u8>) -> &'a mut Vec<u8> {
        Wire::read_target(self, plain, raw)
    }
    fn absorb(&mut self, raw: &mut Vec<u8>, plain: &mut Vec<u8>) -> io::Result<bool> {
        Wire::absorb(self, raw, plain)
            .map_err(|f| io::Error::new(io::ErrorKind::InvalidData, f.error))
    }
    fn flush(&mut self, conn: &StreamConn, stream: &TcpStream) -> io::Result<usize> {
        Wire::flush(self, conn, stream)
    }
    fn has_output(&self, conn: &StreamConn) -> bool {
        Wire::has_output(self, conn)
    }
}

struct Served {
    /// In the shard's table of streams (and so known to the core).
    registered: bool,
    /// Counted as accepted and open.
    accepted: bool,
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    state: &Shard,
    stream: &TcpStream,
    ft: &FiveTuple,
    conn: &Rc<StreamConn>,
    wire: &mut Wire,
    initial: Vec<u8>,
    plain: Vec<u8>,
    policy: &StreamPolicy,
    setup_deadline: tokio::time::Instant,
    served: &mut Served,
) -> Closed {
    // `plain`: frames already decrypted (a connection moved here from another shard).
    let (mut frames, mut raw) = (plain, Vec::new());
    wire.read_target(&mut frames, &mut raw)
        .extend_from_slice(&initial);
    let mut idle_until = tokio::time::Instant::now() + policy.idle;
    // The bytes read during setup are handled before the first wait.
    let mut got_bytes = true;
    loop {
        if got_bytes {
            got_bytes = false;
            let ended = match wire.absorb(&mut raw, &mut frames) {
                Ok(ended) => ended,
                Err(failure) => {
                    // Best effort: the socket closes next whatever happens.
                    let _ = stream.try_write(&failure.alert);
                    return Closed::Tls(failure.error);
                }
            };
            if !wire.is_handshaking() && !served.registered {
                if let Err(closed) = register(state, ft, conn, served) {
                    return closed;
                }
            }
            if served.registered && !frames.is_empty() {
                let mut guard = state.borrow_mut();
                let st = &mut *guard;
                let now = Instant::now();
                // A ConnectionBind ends the frames (RFC 6062): what follows is the peer's.
                let (mut at, mut handed_at) = (0, None);
                let used = match tcp::complete_frames(&frames, |frame| {
                    st.client_frame(now, ft, frame);
                    let start = at;
                    at += frame.len();
                    let stop = st.tcp_relays.has_handover(ft);
                    handed_at = handed_at.or(stop.then_some(start));
                    !stop
                }) {
                    Ok(used) => used,
                    Err(e) => return Closed::NotTurn(e),
                };
                spawn_relay_tasks(state, st);
                if let Some(h) = handed_at.and_then(|_| st.tcp_relays.take_handover(ft)) {
                    // A connection moving to another shard is read from its ConnectionBind on
                    // there.
                    let from = match h {
                        Handover::Move { .. } => handed_at.unwrap_or(used),
                        _ => used,
                    };
                    return Closed::Handover(h, frames.split_off(from));
                }
                frames.drain(..used);
            }
            if ended {
                // The client closed its side (close_notify) after its last requests: their
                // answers are queued and still go out, as on plain TCP below.
                flush_before_close(state, ft, conn, wire, stream);
                return Closed::Io(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let handshaking = wire.is_handshaking();
        let writing = wire.has_output(conn);
        let wake = if handshaking {
            setup_deadline
        } else {
            idle_until
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {
                if handshaking {
                    return Closed::SetupTimeout;
                }
                if !state.borrow().core.has_allocation(ft) {
                    return Closed::Idle;
                }
                idle_until = tokio::time::Instant::now() + policy.idle;
            }
            ready = stream.readable() => {
                if let Err(e) = ready {
                    return e.into();
                }
                idle_until = tokio::time::Instant::now() + policy.idle;
                match tcp::read_some(stream, wire.read_target(&mut frames, &mut raw)) {
                    Ok(0) if handshaking => return Closed::TlsHungUp,
                    Ok(0) => {
                        // A half-close after the last requests (`shutdown(SHUT_WR)`): their
                        // answers are queued and the client may still read them.
                        flush_before_close(state, ft, conn, wire, stream);
                        return Closed::Io(io::ErrorKind::UnexpectedEof.into());
                    }
                    Ok(n) => {
                        state.borrow_mut().connections.of(ft.transport).bytes_in += n as u64;
                        got_bytes = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return e.into(),
                }
            }
            ready = stream.writable(), if writing => {
                if let Err(e) = ready {
                    return e.into();
                }
            }
            () = conn.queued(), if !writing => {}
        }
        match wire.flush(conn, stream) {
            Ok(0) => {}
            Ok(n) => state.borrow_mut().connections.of(ft.transport).bytes_out += n as u64,
            Err(e) => return e.into(),
        }
    }
}

/// Writes what is queued for a client that has closed its side, as far as the socket takes it
/// now: one try, no waiting, so a client that never reads cannot hold the connection open.
fn flush_before_close(
    state: &Shard,
    ft: &FiveTuple,
    conn: &StreamConn,
    wire: &mut Wire,
    stream: &TcpStream,
) {
    if let Ok(n) = wire.flush(conn, stream) {
        state.borrow_mut().connections.of(ft.transport).bytes_out += n as u64;
    }
}

/// Puts the connection in the shard's table, where the core's output for it is queued.
fn register(
    state: &Shard,
    ft: &FiveTuple,
    conn: &Rc<StreamConn>,
    served: &mut Served,
) -> Result<(), Closed> {
    let mut st = state.borrow_mut();
    if st.streams.contains_key(ft) {
        return Err(Closed::Duplicate);
    }
    st.streams.insert(*ft, Rc::clone(conn));
    let counters = st.connections.of(ft.transport);
    counters.accepted += 1;
    counters.open += 1;
    served.registered = true;
    served.accepted = true;
    Ok(())
}

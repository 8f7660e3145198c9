//! `turnpike probe`: checks any STUN/TURN server from the outside, coturn included, the way a
//! client would use it. Per URI: resolve, connect (TCP/TLS), Binding (the mapped address),
//! Allocate with the 401 round (the relayed address and what kind of address it is), a second
//! allocation, the two relaying to each other (a channel one way, Send/Data the other, with its
//! round-trip time), and the probe's own UDP socket as a peer of the relay (whether the relay
//! address answers from where the probe stands). Both allocations are deleted at the end.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{read_answer, relayed_payload, write_request, Answer, Auth, Request};
use crate::proto::auth::{long_term_key, LongTermKey, PasswordAlgorithm};
use crate::proto::codec::{attr, decode_xor_address, method, Class, Message, MessageWriter};
use crate::proto::policy::{class_of, AddressClass};

/// What a probe's URIs are checked with.
pub struct ProbeSettings {
    pub user: String,
    pub password: String,
    /// How long one answer may take (retransmitting over UDP meanwhile).
    pub timeout: Duration,
    /// PEM roots for turns: instead of the system's.
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Stun,
    Turn,
    Turns,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// A parsed `stun:`, `turn:` or `turns:` URI (RFC 7064, RFC 7065).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub text: String,
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub transport: Transport,
}

impl Uri {
    pub fn parse(text: &str) -> Result<Uri, String> {
        let bad = |why: &str| format!("{text:?}: {why}");
        let (scheme, rest) = text
            .split_once(':')
            .ok_or_else(|| bad("not a stun:, turn: or turns: URI"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "stun" => Scheme::Stun,
            "turn" => Scheme::Turn,
            "turns" => Scheme::Turns,
            _ => return Err(bad("the scheme must be stun, turn or turns")),
        };
        let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
        let transport = match query {
            "" => None,
            q => match q
                .strip_prefix("transport=")
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                Some("udp") => Some(Transport::Udp),
                Some("tcp") => Some(Transport::Tcp),
                _ => return Err(bad("the only query is transport=udp or transport=tcp")),
            },
        };
        let transport = match (scheme, transport) {
            (Scheme::Turns, Some(Transport::Udp)) => {
                return Err(bad(
                    "turns: runs over TLS: transport=udp (DTLS) is not supported",
                ))
            }
            (Scheme::Turns, _) => Transport::Tls,
            (Scheme::Stun, Some(_)) => return Err(bad("stun: URIs take no transport")),
            (_, t) => t.unwrap_or(Transport::Udp),
        };
        let default_port = if scheme == Scheme::Turns { 5349 } else { 3478 };
        let (host, port) = split_host_port(hostport).ok_or_else(|| bad("bad host or port"))?;
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| bad("bad port"))?,
        };
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(bad("bad host"));
        }
        Ok(Uri {
            text: text.to_owned(),
            scheme,
            host: host.to_owned(),
            port,
            transport,
        })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            a => Some((host, Some(a.strip_prefix(':')?))),
        };
    }
    match s.split_once(':') {
        Some((h, p)) if !p.contains(':') => Some((h, Some(p))),
        Some(_) => None,
        None => Some((s, None)),
    }
}

/// One step's outcome: passed, failed, or not possible here (skipped, with why).
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    pub ms: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        }
    }
}

/// Everything checked for one URI.
#[derive(Debug, Clone)]
pub struct Report {
    pub uri: String,
    pub server: Option<SocketAddr>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.outcome != Outcome::Fail)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "uri": self.uri,
            "server": self.server.map(|s| s.to_string()),
            "ok": self.ok(),
            "checks": self.checks.iter().map(|c| serde_json::json!({
                "check": c.name,
                "result": c.outcome.as_str().to_ascii_lowercase(),
                "detail": c.detail,
                "ms": c.ms,
            })).collect::<Vec<_>>(),
        })
    }

    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{} ({})\n",
            self.uri,
            self.server.map_or("unresolved".into(), |s| s.to_string())
        );
        for c in &self.checks {
            let ms = c.ms.map(|ms| format!(" [{ms:.1} ms]")).unwrap_or_default();
            out.push_str(&format!(
                "  {:4}  {:16} {}{ms}\n",
                c.outcome.as_str(),
                c.name,
                c.detail
            ));
        }
        out
    }

    fn push(&mut self, name: &'static str, outcome: Outcome, detail: String, ms: Option<f64>) {
        self.checks.push(Check {
            name,
            outcome,
            detail,
            ms,
        });
    }
}

/// Probes one URI; never panics on what a server sends.
pub fn probe(uri: &Uri, settings: &ProbeSettings) -> Report {
    let mut report = Report {
        uri: uri.text.clone(),
        server: None,
        checks: Vec::new(),
    };
    let server = match (uri.host.as_str(), uri.port).to_socket_addrs() {
        Ok(mut addrs) => match addrs.next() {
            Some(a) => a,
            None => {
                report.push("resolve", Outcome::Fail, "no address".into(), None);
                return report;
            }
        },
        Err(e) => {
            report.push("resolve", Outcome::Fail, e.to_string(), None);
            return report;
        }
    };
    report.server = Some(server);
    let mut a = match Conn::open(uri, server, settings) {
        Ok((c, ms)) => {
            if uri.transport != Transport::Udp {
                let what = format!("{} connection from {}", uri.transport.as_str(), c.local());
                report.push("connect", Outcome::Pass, what, Some(ms));
            }
            c
        }
        Err(e) => {
            report.push("connect", Outcome::Fail, e, None);
            return report;
        }
    };

    // Binding.
    let started = Instant::now();
    let seen_as = match a.transact(Request::Binding, None, settings.timeout) {
        Some(ans) if ans.success => {
            let mapped = ans
                .mapped
                .map_or("no XOR-MAPPED-ADDRESS".into(), |m| format!("mapped {m}"));
            let sw = ans
                .software
                .map(|s| format!(", SOFTWARE {s:?}"))
                .unwrap_or_default();
            report.push(
                "binding",
                Outcome::Pass,
                format!("{mapped}{sw}"),
                Some(ms_since(started)),
            );
            ans.mapped
        }
        Some(ans) => {
            report.push(
                "binding",
                Outcome::Fail,
                format!("error {}", ans.code),
                None,
            );
            return report;
        }
        None => {
            report.push("binding", Outcome::Fail, no_answer(settings), None);
            return report;
        }
    };
    if uri.scheme == Scheme::Stun {
        return report;
    }

    // Two allocations.
    let started = Instant::now();
    let first = match a.allocate(settings) {
        Ok(relayed) => {
            let what = format!(
                "relayed {relayed} ({}), after the 401 round",
                describe_class(relayed.ip())
            );
            // Reached at a public address but handing out a private one: clients elsewhere
            // get a relay address they cannot reach (behind 1:1 NAT without its external
            // address configured, typically).
            let hidden = class_of(server.ip()) == AddressClass::Public
                && class_of(relayed.ip()) != AddressClass::Public;
            let outcome = if hidden { Outcome::Fail } else { Outcome::Pass };
            let what = if hidden {
                format!("{what}: the server is reached at the public {}, so clients elsewhere cannot use it (relay.external_address?)", server.ip())
            } else {
                what
            };
            report.push("allocate", outcome, what, Some(ms_since(started)));
            relayed
        }
        Err(e) => {
            report.push("allocate", Outcome::Fail, e, None);
            return report;
        }
    };
    let second = Conn::open(uri, server, settings)
        .map_err(|e| format!("second connection: {e}"))
        .and_then(|(mut b, _)| b.allocate(settings).map(|r| (b, r)));
    let (mut b, relayed_b) = match second {
        Ok(x) => {
            report.push(
                "second allocate",
                Outcome::Pass,
                format!("relayed {}", x.1),
                None,
            );
            x
        }
        Err(e) => {
            report.push("second allocate", Outcome::Fail, e, None);
            a.delete(settings);
            return report;
        }
    };

    relay_to_relay(&mut report, &mut a, first, &mut b, relayed_b, settings);
    direct_peer(&mut report, &mut a, first, seen_as, settings);

    a.delete(settings);
    b.delete(settings);
    report
}

const CHANNEL: u16 = 0x4000;

/// a binds a channel to b's relay and sends on it; b gets a Data indication from a's relay and
/// answers with a Send indication, which reaches a on its channel.
fn relay_to_relay(
    report: &mut Report,
    a: &mut Conn,
    relayed_a: SocketAddr,
    b: &mut Conn,
    relayed_b: SocketAddr,
    settings: &ProbeSettings,
) {
    let steps = (|| {
        a.expect_success(
            Request::CreatePermission(relayed_b),
            settings,
            "a's permission",
        )?;
        b.expect_success(
            Request::CreatePermission(relayed_a),
            settings,
            "b's permission",
        )?;
        a.expect_success(
            Request::ChannelBind(relayed_b, CHANNEL),
            settings,
            "ChannelBind",
        )?;
        let payload = format!("turnpike probe {:x}", rand_u64());
        let started = Instant::now();
        let mut frame = CHANNEL.to_be_bytes().to_vec();
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        frame.extend_from_slice(payload.as_bytes());
        let deadline = started + settings.timeout;
        // Over UDP either leg can be lost: resend until the deadline.
        loop {
            a.send(&frame)?;
            if let Some(got) = b.recv_data(deadline.min(Instant::now() + RESEND)) {
                if got.payload == payload.as_bytes() {
                    if got.from != Some(relayed_a) {
                        return Err(format!("b's data came from {:?}, not a's relay", got.from));
                    }
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err("a's ChannelData never reached b".into());
            }
        }
        let mut send = Vec::new();
        MessageWriter::new(&mut send, method::SEND, Class::Indication, txid())
            .xor_address(attr::XOR_PEER_ADDRESS, relayed_a)
            .attr(attr::DATA, payload.as_bytes());
        loop {
            b.send(&send)?;
            if let Some(got) = a.recv_data(deadline.min(Instant::now() + RESEND)) {
                if got.payload == payload.as_bytes() {
                    if got.channel != Some(CHANNEL) {
                        return Err("b's answer reached a, but not on a's channel".into());
                    }
                    return Ok(ms_since(started));
                }
            }
            if Instant::now() >= deadline {
                return Err("b's Send indication never reached a".into());
            }
        }
    })();
    match steps {
        Ok(ms) => report.push(
            "relay to relay",
            Outcome::Pass,
            "ChannelData a -> b as a Data indication, Send b -> a on a's channel (round trip)"
                .into(),
            Some(ms),
        ),
        Err(e) => report.push("relay to relay", Outcome::Fail, e, None),
    }
}

/// The probe's own UDP socket as a peer: the relay address must take its datagram (the relay
/// port range is reachable from here) and the relay must reach it back. Permissions go by IP
/// (RFC 8656 §9), so the address the server saw the client at serves for the permission; the
/// socket's own mapped port comes back in the Data indication, and the answer goes there.
fn direct_peer(
    report: &mut Report,
    a: &mut Conn,
    relayed: SocketAddr,
    seen_as: Option<SocketAddr>,
    settings: &ProbeSettings,
) {
    let Some(seen_as) = seen_as else {
        let why = "the Binding answer had no XOR-MAPPED-ADDRESS: cannot tell this host's address";
        return report.push("direct peer", Outcome::Skip, why.into(), None);
    };
    let peer = match UdpSocket::bind(any_port_like(relayed)) {
        Ok(s) => s,
        Err(e) => return report.push("direct peer", Outcome::Skip, e.to_string(), None),
    };
    let ip = seen_as.ip();
    match a.transact(
        Request::CreatePermission(seen_as),
        Some(settings),
        settings.timeout,
    ) {
        Some(ans) if ans.success => {}
        Some(ans) if ans.code == 403 => {
            let why = format!("the server's peer policy refuses {ip} (403), as it should for a private or loopback address");
            return report.push("direct peer", Outcome::Skip, why, None);
        }
        Some(ans) => {
            let why = format!("CreatePermission for {ip}: error {}", ans.code);
            return report.push("direct peer", Outcome::Fail, why, None);
        }
        None => return report.push("direct peer", Outcome::Fail, no_answer(settings), None),
    }
    let started = Instant::now();
    let deadline = started + settings.timeout;
    let payload = format!("turnpike probe peer {:x}", rand_u64());
    let inbound = loop {
        let _ = peer.send_to(payload.as_bytes(), relayed);
        if let Some(got) = a.recv_data(deadline.min(Instant::now() + RESEND)) {
            if got.payload == payload.as_bytes() {
                break got.from;
            }
        }
        if Instant::now() >= deadline {
            let why = format!(
                "{relayed} did not pass a datagram from this host to the client: the relay ports are not reachable from here (firewall?)"
            );
            return report.push("direct peer", Outcome::Fail, why, None);
        }
    };
    let ms = ms_since(started);
    let Some(from) = inbound else {
        let why = "the relayed datagram came without XOR-PEER-ADDRESS".to_owned();
        return report.push("direct peer", Outcome::Fail, why, None);
    };
    let mut send = Vec::new();
    MessageWriter::new(&mut send, method::SEND, Class::Indication, txid())
        .xor_address(attr::XOR_PEER_ADDRESS, from)
        .attr(attr::DATA, payload.as_bytes());
    let mut buf = vec![0u8; 2048];
    let back = loop {
        let _ = a.send(&send);
        let _ = peer.set_read_timeout(Some(RESEND));
        if let Ok((n, source)) = peer.recv_from(&mut buf) {
            if source == relayed && &buf[..n] == payload.as_bytes() {
                break true;
            }
        }
        if Instant::now() >= deadline {
            break false;
        }
    };
    if back {
        let what = format!("{from} <-> {relayed}: the relay address answers from here, both ways");
        report.push("direct peer", Outcome::Pass, what, Some(ms));
    } else {
        let why = format!("{from} -> {relayed} passed, but nothing came back from the relay");
        report.push("direct peer", Outcome::Fail, why, None);
    }
}

fn describe_class(ip: IpAddr) -> String {
    match class_of(ip) {
        AddressClass::Public => "public".into(),
        c => format!("{c:?}: unreachable for clients elsewhere").to_ascii_lowercase(),
    }
}

fn no_answer(settings: &ProbeSettings) -> String {
    format!("no answer within {:.1} s", settings.timeout.as_secs_f64())
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Over UDP, a request or a data leg is sent again after this long without an answer.
const RESEND: Duration = Duration::from_millis(250);

/// The wildcard address of `addr`'s family, any port: where a socket that talks to it binds.
fn any_port_like(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // Without an OS generator the bytes stay zero: payloads and transaction ids are then merely
    // predictable, which a probe can live with.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b
}

fn rand_u64() -> u64 {
    u64::from_le_bytes(random())
}

fn txid() -> [u8; 12] {
    random()
}

/// Application data that reached a client.
struct Data {
    payload: Vec<u8>,
    /// The channel it came on, for ChannelData.
    channel: Option<u16>,
    /// The peer a Data indication names.
    from: Option<SocketAddr>,
}

enum Stream {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// One client connection (a UDP socket or a stream) and its allocation's credentials.
struct Conn {
    stream: Stream,
    /// Bytes read from a stream, not yet a whole message.
    pending: Vec<u8>,
    auth: Option<(String, String, Vec<u8>, LongTermKey)>,
}

impl Conn {
    fn open(uri: &Uri, server: SocketAddr, s: &ProbeSettings) -> Result<(Conn, f64), String> {
        let started = Instant::now();
        let stream = match uri.transport {
            Transport::Udp => {
                let sock = UdpSocket::bind(any_port_like(server)).map_err(|e| e.to_string())?;
                sock.connect(server).map_err(|e| e.to_string())?;
                Stream::Udp(sock)
            }
            Transport::Tcp | Transport::Tls => {
                let tcp = TcpStream::connect_timeout(&server, s.timeout)
                    .map_err(|e| format!("{server}: {e}"))?;
                let _ = tcp.set_nodelay(true);
                // A server that stops reading must not hold a send past the timeout either.
                tcp.set_write_timeout(Some(s.timeout))
                    .map_err(|e| e.to_string())?;
                if uri.transport == Transport::Tcp {
                    Stream::Tcp(tcp)
                } else {
                    Stream::Tls(Box::new(tls_connect(tcp, &uri.host, s)?))
                }
            }
        };
        Ok((
            Conn {
                stream,
                pending: Vec::new(),
                auth: None,
            },
            ms_since(started),
        ))
    }

    fn local(&self) -> String {
        let addr = match &self.stream {
            Stream::Udp(s) => s.local_addr(),
            Stream::Tcp(s) => s.local_addr(),
            Stream::Tls(s) => s.sock.local_addr(),
        };
        addr.map_or_else(|_| "?".into(), |a| a.to_string())
    }

    fn send(&mut self, msg: &[u8]) -> Result<(), String> {
        let r = match &mut self.stream {
            Stream::Udp(s) => s.send(msg).map(drop),
            stream => {
                // ChannelData is padded to 4 bytes on a stream (RFC 8656 §12.5).
                let mut framed = msg.to_vec();
                if msg.first().is_some_and(|b| b >> 6 == 0b01) {
                    framed.resize(msg.len().next_multiple_of(4), 0);
                }
                match stream {
                    Stream::Tcp(s) => s.write_all(&framed),
                    Stream::Tls(s) => s.write_all(&framed).and_then(|()| s.flush()),
                    Stream::Udp(_) => unreachable!("handled above"),
                }
            }
        };
        r.map_err(|e| format!("send: {e}"))
    }

    /// The next whole message from the server, or None at the deadline.
    fn recv(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        loop {
            if let Some(msg) = self.take_framed() {
                return Some(msg);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let left = Some(left.max(Duration::from_millis(1)));
            let n = match &mut self.stream {
                Stream::Udp(s) => {
                    s.set_read_timeout(left).ok()?;
                    match s.recv(&mut buf) {
                        Ok(n) => return Some(buf[..n].to_vec()),
                        Err(e) if timed_out(&e) => return None,
                        // An ICMP error (port unreachable): keep listening until the deadline.
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    }
                }
                Stream::Tcp(s) => {
                    s.set_read_timeout(left).ok()?;
                    s.read(&mut buf)
                }
                Stream::Tls(s) => {
                    // By hand rather than StreamOwned::read, which reads the socket again and
                    // again with the same timeout while a record is incomplete: a server
                    // dripping bytes would hold the probe past its deadline.
                    match s.conn.reader().read(&mut buf) {
                        Ok(n) => Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            s.sock.set_read_timeout(left).ok()?;
                            match s.conn.read_tls(&mut s.sock) {
                                Ok(0) => return None,
                                Ok(_) => {
                                    s.conn.process_new_packets().ok()?;
                                    continue;
                                }
                                Err(e) => Err(e),
                            }
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match n {
                Ok(0) => return None,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if timed_out(&e) => return None,
                Err(_) => return None,
            }
        }
    }

    /// A whole STUN message or ChannelData frame off the front of a stream's bytes.
    fn take_framed(&mut self) -> Option<Vec<u8>> {
        let p = &self.pending;
        if p.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([p[2], p[3]]));
        let (whole, used) = if p[0] >> 6 == 0b01 {
            (4 + len, (4 + len).next_multiple_of(4))
        } else {
            (20 + len, 20 + len)
        };
        if p.len() < used {
            return None;
        }
        let msg = p[..whole].to_vec();
        self.pending.drain(..used);
        Some(msg)
    }

    /// Sends a request (signed once credentials are known) and returns its answer, skipping
    /// anything else; retransmits over UDP.
    fn transact(
        &mut self,
        req: Request,
        signed: Option<&ProbeSettings>,
        timeout: Duration,
    ) -> Option<Answer> {
        let id = txid();
        let mut msg = Vec::new();
        let auth = signed.and(self.auth.as_ref());
        let auth = auth.map(|(user, realm, nonce, key)| Auth {
            user,
            realm,
            nonce,
            key,
        });
        write_request(&mut msg, req, id, auth.as_ref());
        let deadline = Instant::now() + timeout;
        let udp = matches!(self.stream, Stream::Udp(_));
        loop {
            self.send(&msg).ok()?;
            let until = if udp {
                deadline.min(Instant::now() + RESEND)
            } else {
                deadline
            };
            while let Some(reply) = self.recv(until) {
                if let Some(ans) = read_answer(&reply).filter(|a| a.txid == id) {
                    return Some(ans);
                }
            }
            if !udp || Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// Allocate, with the 401 round; Ok(the relayed address).
    fn allocate(&mut self, s: &ProbeSettings) -> Result<SocketAddr, String> {
        let challenge = self
            .transact(Request::Allocate, None, s.timeout)
            .ok_or_else(|| format!("Allocate: {}", no_answer(s)))?;
        if challenge.success {
            return Err("the server allocated without authentication".into());
        }
        let (Some(realm), Some(nonce)) = (challenge.realm, challenge.nonce) else {
            return Err(format!(
                "Allocate: error {} without REALM and NONCE",
                challenge.code
            ));
        };
        let key = long_term_key(PasswordAlgorithm::Md5, &s.user, &realm, &s.password);
        self.auth = Some((s.user.clone(), realm, nonce, key));
        for _ in 0..2 {
            let ans = self
                .transact(Request::Allocate, Some(s), s.timeout)
                .ok_or_else(|| format!("authenticated Allocate: {}", no_answer(s)))?;
            if ans.code == 438 {
                if let (Some(a), Some(nonce)) = (self.auth.as_mut(), ans.nonce) {
                    a.2 = nonce;
                    continue;
                }
            }
            if !ans.success {
                let why = match ans.code {
                    401 => "401: wrong user, password or realm".to_owned(),
                    c => format!("error {c}"),
                };
                return Err(format!("authenticated Allocate: {why}"));
            }
            return ans
                .relayed
                .ok_or_else(|| "success without XOR-RELAYED-ADDRESS".to_owned());
        }
        Err("authenticated Allocate: 438 (stale nonce) twice".into())
    }

    fn expect_success(
        &mut self,
        req: Request,
        s: &ProbeSettings,
        what: &str,
    ) -> Result<(), String> {
        match self.transact(req, Some(s), s.timeout) {
            Some(a) if a.success => Ok(()),
            Some(a) => Err(format!("{what}: error {}", a.code)),
            None => Err(format!("{what}: {}", no_answer(s))),
        }
    }

    /// Application data relayed to this client, until the deadline.
    fn recv_data(&mut self, deadline: Instant) -> Option<Data> {
        while let Some(msg) = self.recv(deadline) {
            let Some(payload) = relayed_payload(&msg) else {
                continue;
            };
            let payload = payload.to_vec();
            if msg[0] >> 6 == 0b01 {
                let channel = Some(u16::from_be_bytes([msg[0], msg[1]]));
                return Some(Data {
                    payload,
                    channel,
                    from: None,
                });
            }
            let parsed = Message::parse(&msg).ok()?;
            let from = parsed
                .get(attr::XOR_PEER_ADDRESS)
                .and_then(|a| decode_xor_address(a.value, &parsed.transaction_id()));
            return Some(Data {
                payload,
                channel: None,
                from,
            });
        }
        None
    }

    /// Refresh with LIFETIME 0: the allocation ends now rather than at its expiry.
    fn delete(&mut self, s: &ProbeSettings) {
        let _ = self.transact(Request::Refresh(0), Some(s), s.timeout);
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn tls_connect(
    tcp: TcpStream,
    host: &str,
    s: &ProbeSettings,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let files: Vec<std::path::PathBuf> = match &s.ca_file {
        Some(f) => vec![f.clone()],
        None => SYSTEM_ROOTS.iter().map(Into::into).collect(),
    };
    let mut roots = rustls::RootCertStore::empty();
    for file in files.iter().filter(|f| f.exists() || s.ca_file.is_some()) {
        let certs =
            CertificateDer::pem_file_iter(file).map_err(|e| format!("{}: {e}", file.display()))?;
        for cert in certs.flatten() {
            let _ = roots.add(cert);
        }
    }
    if roots.is_empty() {
        return Err("no trusted roots (--ca-file, or the system's bundle)".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    // Complete the handshake now, so a certificate problem is the connect step's failure; each
    // read gets only what is left of the timeout.
    let deadline = Instant::now() + s.timeout;
    while stream.conn.is_handshaking() {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or("TLS handshake: timed out")?;
        stream
            .sock
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        if stream.conn.wants_write() {
            stream
                .conn
                .write_tls(&mut stream.sock)
                .map_err(|e| format!("TLS handshake: {e}"))?;
            continue;
        }
        match stream.conn.read_tls(&mut stream.sock) {
            Ok(0) => return Err("TLS handshake: the server closed the connection".into()),
            Ok(_) => {
                stream
                    .conn
                    .process_new_packets()
                    .map_err(|e| format!("TLS handshake: {e}"))?;
            }
            Err(e) if timed_out(&e) => return Err("TLS handshake: timed out".into()),
            Err(e) => return Err(format!("TLS handshake: {e}")),
        }
    }
    // The handshake's last flight (the client's Finished).
    while stream.conn.wants_write() {
        stream
            .conn
            .write_tls(&mut stream.sock)
            .map_err(|e| format!("TLS handshake: {e}"))?;
    }
    Ok(stream)
}

/// Where Debian and Ubuntu, Fedora and RHEL, and Alpine keep their CA bundles.
const SYSTEM_ROOTS: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_as_rfc_7064_and_7065_say() {
        let u = Uri::parse("turn:turn.example.com?transport=tcp").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.transport),
            (Scheme::Turn, "turn.example.com", 3478, Transport::Tcp)
        );
        let u = Uri::parse("turns:[2001:db8::1]").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.transport),
            ("2001:db8::1", 5349, Transport::Tls)
        );
        let u = Uri::parse("stun:192.0.2.1:3479").unwrap();
        assert_eq!(
            (u.scheme, u.port, u.transport),
            (Scheme::Stun, 3479, Transport::Udp)
        );
        assert_eq!(
            Uri::parse("TURN:h:1?transport=UDP").unwrap().transport,
            Transport::Udp
        );
        for bad in [
            "http://example.com",
            "turn:",
            "turn:h:0",
            "turn:h:99999",
            "turn:h?transport=sctp",
            "turns:h?transport=udp",
            "stun:h?transport=tcp",
            "turn:2001:db8::1",
            "turn:user@h",
        ] {
            assert!(Uri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_frames_are_split_whole_and_unpadded() {
        let mut c = Conn {
            stream: Stream::Udp(UdpSocket::bind("127.0.0.1:0").unwrap()),
            pending: Vec::new(),
            auth: None,
        };
        let mut stun = Vec::new();
        MessageWriter::new(&mut stun, method::BINDING, Class::Success, [1; 12]);
        // ChannelData of 5 bytes, padded to 8 on the stream, then a STUN message in two parts.
        c.pending
            .extend_from_slice(&[0x40, 0x00, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]);
        c.pending.extend_from_slice(&stun[..10]);
        assert_eq!(
            c.take_framed().unwrap(),
            vec![0x40, 0x00, 0, 5, 1, 2, 3, 4, 5]
        );
        assert_eq!(c.take_framed(), None);
        c.pending.extend_from_slice(&stun[10..]);
        assert_eq!(c.take_framed().unwrap(), stun);
        assert!(c.pending.is_empty());
    }
}

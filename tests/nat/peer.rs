//! One WebRTC peer (webrtc-rs) that meets another through the example signaling server:
//! joins a room over WebSocket, takes its ICE servers from the `welcome` message, trickles
//! candidates, and reports what happened (candidates, states, selected pair, traffic).
//!
//! Roles: the caller offers (to the peer already in the room, or to the next one that joins),
//! opens a DataChannel "echo", sends an RTP video track; the callee answers, echoes every
//! DataChannel message, counts the RTP packets it receives and tells the count when asked
//! ("count?" -> "rtp=N"), and stops on "bye".
//!
//! Every wait is bounded. Call [`run_blocking`] on a thread that is already inside the
//! client's network namespace: the runtime it builds, and so every socket, lives there.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::{MediaEngine, MIME_TYPE_VP8};
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::APIBuilder;
use webrtc::data_channel::RTCDataChannel;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::ice_transport::ice_candidate::RTCIceCandidateInit;
use webrtc::ice_transport::ice_connection_state::RTCIceConnectionState;
use webrtc::ice_transport::ice_server::RTCIceServer;
use webrtc::interceptor::registry::Registry;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::policy::ice_transport_policy::RTCIceTransportPolicy;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::rtp::header::Header;
use webrtc::rtp::packet::Packet;
use webrtc::rtp_transceiver::rtp_codec::RTCRtpCodecCapability;
use webrtc::track::track_local::track_local_static_rtp::TrackLocalStaticRTP;
use webrtc::track::track_local::{TrackLocal, TrackLocalWriter};

type WsStream = futures_util::stream::SplitStream<WebSocketStream<MaybeTlsStream<TcpStream>>>;

/// One signaling or setup step.
const STEP: Duration = Duration::from_secs(5);
/// ICE agent timeouts, the same in both phases: no inbound traffic for 3 s = disconnected,
/// still checking after 3 + 5 s = failed; a keepalive every second keeps a quiet but working
/// path from looking disconnected.
const ICE_DISCONNECTED: Duration = Duration::from_secs(3);
const ICE_FAILED: Duration = Duration::from_secs(5);
const ICE_KEEPALIVE: Duration = Duration::from_secs(1);
const RTP_PAYLOAD_TYPE: u8 = 96;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Caller,
    Callee,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IceMode {
    /// Only the `stun:` URLs of the welcome message.
    StunOnly,
    /// Every ICE server of the welcome message (STUN and TURN with its credential).
    Turn,
}

#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub label: String,
    pub role: Role,
    /// `ws://host:port/ws/<room>?name=<name>`
    pub ws_url: String,
    pub mode: IceMode,
    /// How long to wait for the peer connection to reach `connected`.
    pub connect_within: Duration,
    /// DataChannel messages the caller sends (and expects echoed).
    pub dc_messages: usize,
    /// RTP packets the caller sends on its video track.
    pub rtp_packets: usize,
}

#[derive(Clone, Debug, Default)]
pub struct PeerReport {
    pub label: String,
    pub ice_urls: Vec<String>,
    /// "typ address:port @Nms" of each local candidate gathered, N counted from the start
    /// of negotiation.
    pub local_candidates: Vec<String>,
    /// "typ address:port" of each candidate received from the other peer.
    pub remote_candidates: Vec<String>,
    /// ICE connection states, with the time since negotiation started.
    pub ice_states: Vec<(Duration, String)>,
    /// Peer connection (ICE + DTLS) connected, measured from negotiation start (caller: just
    /// before it creates its offer; callee: when the offer arrives).
    pub connected_after: Option<Duration>,
    pub final_pc_state: String,
    pub final_ice_state: String,
    /// (local type, local address, remote type, remote address) of the selected pair.
    pub selected_pair: Option<(String, String, String, String)>,
    pub dc_echoed: usize,
    pub dc_echo_time: Option<Duration>,
    pub rtp_sent: usize,
    /// Caller: what the callee said it received.
    pub rtp_received_by_remote: Option<usize>,
    /// Callee: packets read from the remote track, and its codec.
    pub rtp_received: usize,
    pub remote_track_codec: Option<String>,
    pub notes: Vec<String>,
}

impl PeerReport {
    pub fn count_local(&self, typ: &str) -> usize {
        count_type(&self.local_candidates, typ)
    }
    pub fn count_remote(&self, typ: &str) -> usize {
        count_type(&self.remote_candidates, typ)
    }
}

fn count_type(list: &[String], typ: &str) -> usize {
    list.iter()
        .filter(|c| c.split_whitespace().next() == Some(typ))
        .count()
}

/// Builds a tokio runtime on the current thread's network namespace and runs the peer,
/// bounded by `limit` in all.
pub fn run_blocking(spec: PeerSpec, limit: Duration) -> Result<PeerReport, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("{}: tokio runtime: {e}", spec.label))?;
    let label = spec.label.clone();
    let result = rt.block_on(async move {
        match timeout(limit, run(spec)).await {
            Ok(r) => r,
            Err(_) => Err(format!("{label}: did not finish within {limit:?}")),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

/// State the webrtc callbacks write into.
#[derive(Default)]
struct Shared {
    local_candidates: Mutex<Vec<(Instant, String)>>,
    remote_candidates: Mutex<Vec<String>>,
    ice_states: Mutex<Vec<(Instant, String)>>,
    remote_id: Mutex<Option<String>>,
}

pub async fn run(spec: PeerSpec) -> Result<PeerReport, String> {
    let label = spec.label.clone();
    let mut report = PeerReport {
        label: label.clone(),
        ..Default::default()
    };

    let (ws, _) = timeout(STEP, connect_async(spec.ws_url.as_str()))
        .await
        .map_err(|_| format!("{label}: WebSocket connect to {} timed out", spec.ws_url))?
        .map_err(|e| format!("{label}: WebSocket connect to {}: {e}", spec.ws_url))?;
    let (mut sink, mut stream) = ws.split();
    let welcome = timeout(STEP, next_json(&mut stream))
        .await
        .map_err(|_| format!("{label}: no welcome message within {STEP:?}"))??;
    if welcome["type"] != "welcome" {
        return Err(format!("{label}: expected welcome, got {welcome}"));
    }
    let ice_servers = ice_servers_from(&welcome, spec.mode)
        .map_err(|e| format!("{label}: welcome message: {e}"))?;
    report.ice_urls = ice_servers.iter().flat_map(|s| s.urls.clone()).collect();

    // Outgoing signaling; callbacks hold clones of `out_tx`, so the writer stops on `stop`
    // (after sending what is queued), not when the channel closes.
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        loop {
            let text = tokio::select! {
                text = out_rx.recv() => text,
                _ = &mut stop_rx => {
                    while let Ok(text) = out_rx.try_recv() {
                        let _ = sink.send(Message::text(text)).await;
                    }
                    None
                }
            };
            let Some(text) = text else { break };
            if sink.send(Message::text(text)).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let pc = new_peer_connection(ice_servers)
        .await
        .map_err(|e| format!("{label}: new peer connection: {e}"))?;
    let shared = Arc::new(Shared::default());
    install_common_handlers(&pc, &shared, &out_tx);
    let (state_tx, mut state_rx) = watch::channel(RTCPeerConnectionState::New);
    pc.on_peer_connection_state_change(Box::new(move |s| {
        let _ = state_tx.send(s);
        Box::pin(async {})
    }));

    let media = match spec.role {
        Role::Caller => Media::Caller(
            CallerMedia::attach(&pc)
                .await
                .map_err(|e| format!("{label}: {e}"))?,
        ),
        Role::Callee => Media::Callee(CalleeMedia::attach(&pc)),
    };

    let mut sig = Signaling {
        label: label.clone(),
        role: spec.role,
        pc: Arc::clone(&pc),
        out: out_tx.clone(),
        shared: Arc::clone(&shared),
        remote_described: false,
        pending: Vec::new(),
        started: None,
    };
    if spec.role == Role::Caller {
        if let Some(peer) = welcome["peers"][0]["id"].as_str() {
            sig.offer_to(peer).await?;
        }
    }

    // Until connected, failed, or the deadline; signaling keeps flowing meanwhile.
    let deadline = tokio::time::Instant::now() + spec.connect_within;
    let connected = loop {
        tokio::select! {
            changed = state_rx.changed() => {
                if changed.is_err() {
                    break false;
                }
                let state = *state_rx.borrow();
                match state {
                    RTCPeerConnectionState::Connected => break true,
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => break false,
                    _ => {}
                }
            }
            msg = next_json(&mut stream) => sig.handle(msg?).await?,
            _ = tokio::time::sleep_until(deadline) => {
                report.notes.push(format!("not connected within {:?}", spec.connect_within));
                break false;
            }
        }
    };
    let started = sig.started.unwrap_or_else(Instant::now);
    if connected {
        report.connected_after = Some(started.elapsed());
    }

    // Late candidates keep arriving; keep handling them in the background.
    let late = tokio::spawn(async move {
        while let Ok(v) = next_json(&mut stream).await {
            if sig.handle(v).await.is_err() {
                break;
            }
        }
    });

    if connected && spec.mode == IceMode::Turn {
        match &media {
            Media::Caller(m) => m.exchange(&spec, &mut report).await,
            Media::Callee(m) => m.serve(&mut report).await,
        }
    }

    report.selected_pair = selected_pair(&pc).await;
    report.final_pc_state = pc.connection_state().to_string();
    report.final_ice_state = pc.ice_connection_state().to_string();
    if let Media::Callee(m) = &media {
        report.rtp_received = m.rtp_count.load(Ordering::SeqCst);
        report.remote_track_codec = m.codec.lock().unwrap().clone();
    }
    if timeout(STEP, pc.close()).await.is_err() {
        report.notes.push("pc.close() did not finish".into());
    }

    late.abort();
    let _ = late.await;
    let _ = out_tx.send(json!({"type": "leave"}).to_string());
    let _ = stop_tx.send(());
    if timeout(STEP, writer).await.is_err() {
        report.notes.push("signaling writer did not finish".into());
    }
    drop(media);
    drop(pc);

    report.local_candidates = shared
        .local_candidates
        .lock()
        .unwrap()
        .iter()
        .map(|(t, c)| {
            format!(
                "{c} @{}ms",
                t.saturating_duration_since(started).as_millis()
            )
        })
        .collect();
    report.remote_candidates = shared.remote_candidates.lock().unwrap().clone();
    report.ice_states = shared
        .ice_states
        .lock()
        .unwrap()
        .iter()
        .map(|(t, s)| (t.saturating_duration_since(started), s.clone()))
        .collect();
    Ok(report)
}

/// ICE servers from the welcome message's `ice.iceServers` (RTCIceServer JSON).
fn ice_servers_from(welcome: &Value, mode: IceMode) -> Result<Vec<RTCIceServer>, String> {
    let list = welcome["ice"]["iceServers"]
        .as_array()
        .ok_or("no ice.iceServers array")?;
    let mut out = Vec::new();
    for s in list {
        let urls: Vec<String> = s["urls"]
            .as_array()
            .ok_or("iceServers entry without urls")?
            .iter()
            .filter_map(|u| u.as_str())
            .filter(|u| mode == IceMode::Turn || u.starts_with("stun:"))
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            continue;
        }
        out.push(RTCIceServer {
            urls,
            username: s["username"].as_str().unwrap_or("").to_owned(),
            credential: s["credential"].as_str().unwrap_or("").to_owned(),
        });
    }
    if out.is_empty() {
        return Err(format!("no usable ICE server for {mode:?} in {list:?}"));
    }
    Ok(out)
}

async fn new_peer_connection(
    ice_servers: Vec<RTCIceServer>,
) -> Result<Arc<RTCPeerConnection>, webrtc::Error> {
    let mut media = MediaEngine::default();
    media.register_default_codecs()?;
    let registry = register_default_interceptors(Registry::new(), &mut media)?;
    let mut settings = SettingEngine::default();
    // IPv4 UDP only, no mDNS: the namespaces have IPv4 only, and nothing else is under test.
    settings.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
    settings.set_network_types(vec![NetworkType::Udp4]);
    settings.set_ice_timeouts(
        Some(ICE_DISCONNECTED),
        Some(ICE_FAILED),
        Some(ICE_KEEPALIVE),
    );
    let api = APIBuilder::new()
        .with_media_engine(media)
        .with_interceptor_registry(registry)
        .with_setting_engine(settings)
        .build();
    let config = RTCConfiguration {
        ice_servers,
        ice_transport_policy: RTCIceTransportPolicy::All,
        ..Default::default()
    };
    Ok(Arc::new(api.new_peer_connection(config).await?))
}

fn install_common_handlers(
    pc: &RTCPeerConnection,
    shared: &Arc<Shared>,
    out: &mpsc::UnboundedSender<String>,
) {
    let s = Arc::clone(shared);
    let out = out.clone();
    pc.on_ice_candidate(Box::new(move |c| {
        if let Some(c) = c {
            s.local_candidates.lock().unwrap().push((
                Instant::now(),
                format!("{} {}:{}", c.typ, c.address, c.port),
            ));
            let to = s.remote_id.lock().unwrap().clone();
            match (to, c.to_json()) {
                (Some(to), Ok(init)) => {
                    let _ = out.send(
                        json!({"type": "candidate", "to": to, "candidate": init}).to_string(),
                    );
                }
                (to, init) => {
                    eprintln!("local candidate not signalled: to={to:?} init={init:?}")
                }
            }
        }
        Box::pin(async {})
    }));
    let s = Arc::clone(shared);
    pc.on_ice_connection_state_change(Box::new(move |st: RTCIceConnectionState| {
        s.ice_states
            .lock()
            .unwrap()
            .push((Instant::now(), st.to_string()));
        Box::pin(async {})
    }));
}

async fn selected_pair(pc: &RTCPeerConnection) -> Option<(String, String, String, String)> {
    let pair = pc
        .sctp()
        .transport()
        .ice_transport()
        .get_selected_candidate_pair()
        .await?;
    Some((
        pair.local.typ.to_string(),
        format!("{}:{}", pair.local.address, pair.local.port),
        pair.remote.typ.to_string(),
        format!("{}:{}", pair.remote.address, pair.remote.port),
    ))
}

/// Next text message as JSON (pings and binary frames skipped). Cancel safe.
async fn next_json(stream: &mut WsStream) -> Result<Value, String> {
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map_err(|e| format!("signaling sent non-JSON {t:?}: {e}"));
            }
            Some(Ok(Message::Close(c))) => return Err(format!("signaling closed: {c:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("signaling WebSocket: {e}")),
            None => return Err("signaling WebSocket ended".into()),
        }
    }
}

// ------------------------------------------------------------------ signaling

struct Signaling {
    label: String,
    role: Role,
    pc: Arc<RTCPeerConnection>,
    out: mpsc::UnboundedSender<String>,
    shared: Arc<Shared>,
    remote_described: bool,
    /// Candidates that came before the remote description.
    pending: Vec<RTCIceCandidateInit>,
    /// When negotiation started (offer sent / offer received).
    started: Option<Instant>,
}

impl Signaling {
    fn send(&self, v: Value) {
        let _ = self.out.send(v.to_string());
    }

    async fn offer_to(&mut self, peer: &str) -> Result<(), String> {
        let label = &self.label;
        *self.shared.remote_id.lock().unwrap() = Some(peer.to_owned());
        self.started = Some(Instant::now());
        let offer = self
            .pc
            .create_offer(None)
            .await
            .map_err(|e| format!("{label}: create_offer: {e}"))?;
        self.pc
            .set_local_description(offer.clone())
            .await
            .map_err(|e| format!("{label}: set_local_description(offer): {e}"))?;
        self.send(json!({"type": "offer", "to": peer, "sdp": offer.sdp}));
        Ok(())
    }

    async fn set_remote(&mut self, desc: RTCSessionDescription) -> Result<(), String> {
        let label = &self.label;
        self.pc
            .set_remote_description(desc)
            .await
            .map_err(|e| format!("{label}: set_remote_description: {e}"))?;
        self.remote_described = true;
        for c in std::mem::take(&mut self.pending) {
            self.pc
                .add_ice_candidate(c)
                .await
                .map_err(|e| format!("{label}: add_ice_candidate: {e}"))?;
        }
        Ok(())
    }

    async fn handle(&mut self, v: Value) -> Result<(), String> {
        let label = self.label.clone();
        let kind = v["type"].as_str().unwrap_or("");
        let from = v["from"].as_str().unwrap_or("").to_owned();
        match kind {
            "peer-joined" => {
                let no_peer_yet = self.shared.remote_id.lock().unwrap().is_none();
                if self.role == Role::Caller && no_peer_yet {
                    let id = v["peer"]["id"]
                        .as_str()
                        .ok_or(format!("{label}: peer-joined without id: {v}"))?
                        .to_owned();
                    self.offer_to(&id).await?;
                }
            }
            "offer" if self.role == Role::Callee => {
                self.started = Some(Instant::now());
                *self.shared.remote_id.lock().unwrap() = Some(from.clone());
                let sdp = v["sdp"].as_str().unwrap_or("").to_owned();
                let offer = RTCSessionDescription::offer(sdp)
                    .map_err(|e| format!("{label}: bad offer: {e}"))?;
                self.set_remote(offer).await?;
                let answer = self
                    .pc
                    .create_answer(None)
                    .await
                    .map_err(|e| format!("{label}: create_answer: {e}"))?;
                self.pc
                    .set_local_description(answer.clone())
                    .await
                    .map_err(|e| format!("{label}: set_local_description(answer): {e}"))?;
                self.send(json!({"type": "answer", "to": from, "sdp": answer.sdp}));
            }
            "answer" if self.role == Role::Caller => {
                let sdp = v["sdp"].as_str().unwrap_or("").to_owned();
                let answer = RTCSessionDescription::answer(sdp)
                    .map_err(|e| format!("{label}: bad answer: {e}"))?;
                self.set_remote(answer).await?;
            }
            "candidate" => {
                if v["candidate"].is_null() {
                    return Ok(()); // end of candidates
                }
                let init: RTCIceCandidateInit = serde_json::from_value(v["candidate"].clone())
                    .map_err(|e| format!("{label}: bad candidate {v}: {e}"))?;
                self.shared
                    .remote_candidates
                    .lock()
                    .unwrap()
                    .push(describe_candidate(&init.candidate));
                if self.remote_described {
                    self.pc
                        .add_ice_candidate(init)
                        .await
                        .map_err(|e| format!("{label}: add_ice_candidate: {e}"))?;
                } else {
                    self.pending.push(init);
                }
            }
            "error" => return Err(format!("{label}: signaling error: {v}")),
            _ => {} // pong, peer-left, messages for another role
        }
        Ok(())
    }
}

/// "typ address:port" from an SDP candidate line.
fn describe_candidate(line: &str) -> String {
    // candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> ...
    let f: Vec<&str> = line.split_whitespace().collect();
    let typ = f
        .iter()
        .position(|w| *w == "typ")
        .and_then(|i| f.get(i + 1))
        .copied()
        .unwrap_or("?");
    let (addr, port) = (
        f.get(4).copied().unwrap_or("?"),
        f.get(5).copied().unwrap_or("?"),
    );
    format!("{typ} {addr}:{port}")
}

// ------------------------------------------------------------------ media

enum Media {
    Caller(CallerMedia),
    Callee(CalleeMedia),
}

struct CallerMedia {
    dc: Arc<RTCDataChannel>,
    opened: Mutex<Option<oneshot::Receiver<()>>>,
    replies: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    track: Arc<TrackLocalStaticRTP>,
}

impl CallerMedia {
    async fn attach(pc: &RTCPeerConnection) -> Result<CallerMedia, String> {
        let dc = pc
            .create_data_channel("echo", None)
            .await
            .map_err(|e| format!("create_data_channel: {e}"))?;
        let (open_tx, open_rx) = oneshot::channel();
        dc.on_open(Box::new(move || {
            let _ = open_tx.send(());
            Box::pin(async {})
        }));
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        dc.on_message(Box::new(move |msg| {
            let _ = reply_tx.send(String::from_utf8_lossy(&msg.data).into_owned());
            Box::pin(async {})
        }));
        let track = Arc::new(TrackLocalStaticRTP::new(
            RTCRtpCodecCapability {
                mime_type: MIME_TYPE_VP8.to_owned(),
                clock_rate: 90_000,
                ..Default::default()
            },
            "video".to_owned(),
            "turnpike-nat-test".to_owned(),
        ));
        let sender = pc
            .add_track(Arc::clone(&track) as Arc<dyn TrackLocal + Send + Sync>)
            .await
            .map_err(|e| format!("add_track: {e}"))?;
        // Read RTCP so the interceptors (NACK, reports) run; ends when the pc closes.
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            while sender.read(&mut buf).await.is_ok() {}
        });
        Ok(CallerMedia {
            dc,
            opened: Mutex::new(Some(open_rx)),
            replies: tokio::sync::Mutex::new(reply_rx),
            track,
        })
    }

    async fn reply(&self, within: Duration) -> Option<String> {
        let mut rx = self.replies.lock().await;
        timeout(within, rx.recv()).await.ok().flatten()
    }

    /// DataChannel echo of `dc_messages`, then `rtp_packets` RTP packets, then asks the
    /// callee how many arrived.
    async fn exchange(&self, spec: &PeerSpec, report: &mut PeerReport) {
        let opened = self.opened.lock().unwrap().take();
        if let Some(rx) = opened {
            if timeout(STEP, rx).await.is_err() {
                report
                    .notes
                    .push(format!("data channel not open within {STEP:?}"));
                return;
            }
        }
        let t = Instant::now();
        for i in 0..spec.dc_messages {
            if let Err(e) = self.dc.send_text(format!("echo-{i}")).await {
                report.notes.push(format!("data channel send {i}: {e}"));
                return;
            }
        }
        for i in 0..spec.dc_messages {
            match self.reply(STEP).await {
                Some(m) if m == format!("echo-{i}") => report.dc_echoed += 1,
                Some(m) => report
                    .notes
                    .push(format!("echo {i}: expected \"echo-{i}\", got {m:?}")),
                None => {
                    report
                        .notes
                        .push(format!("echo {i}: nothing within {STEP:?}"));
                    break;
                }
            }
        }
        report.dc_echo_time = Some(t.elapsed());

        // Media only after the data channel proved both sides' DTLS is up, so no packet is
        // lost to a receiver still setting up SRTP.
        for i in 0..spec.rtp_packets {
            let packet = Packet {
                header: Header {
                    version: 2,
                    marker: true,
                    payload_type: RTP_PAYLOAD_TYPE,
                    sequence_number: 1000 + i as u16,
                    timestamp: 3000 * i as u32,
                    ssrc: 1,
                    ..Default::default()
                },
                // VP8 payload descriptor (S bit, partition 0) + a fake keyframe-sized body.
                payload: [&[0x10u8][..], &[0x9d; 400][..]].concat().into(),
            };
            match self.track.write_rtp(&packet).await {
                Ok(_) => report.rtp_sent += 1,
                Err(e) => report.notes.push(format!("write_rtp {i}: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }

        // Ask until everything arrived or 5 s passed.
        let until = Instant::now() + STEP;
        loop {
            if self.dc.send_text("count?").await.is_err() {
                break;
            }
            match self.reply(STEP).await {
                Some(m) => {
                    if let Some(n) = m.strip_prefix("rtp=").and_then(|n| n.parse().ok()) {
                        report.rtp_received_by_remote = Some(n);
                        if n >= spec.rtp_packets {
                            break;
                        }
                    } else {
                        report.notes.push(format!("count?: unexpected reply {m:?}"));
                    }
                }
                None => {
                    report.notes.push("count?: no reply".into());
                    break;
                }
            }
            if Instant::now() > until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = self.dc.send_text("bye").await;
        // Give "bye" a moment to leave before the caller closes.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct CalleeMedia {
    rtp_count: Arc<AtomicUsize>,
    codec: Arc<Mutex<Option<String>>>,
    bye: Mutex<Option<oneshot::Receiver<()>>>,
}

impl CalleeMedia {
    fn attach(pc: &RTCPeerConnection) -> CalleeMedia {
        let rtp_count = Arc::new(AtomicUsize::new(0));
        let codec = Arc::new(Mutex::new(None));
        let (bye_tx, bye_rx) = oneshot::channel::<()>();
        let bye_tx = Arc::new(Mutex::new(Some(bye_tx)));

        let count = Arc::clone(&rtp_count);
        let counted = Arc::clone(&count);
        pc.on_data_channel(Box::new(move |dc: Arc<RTCDataChannel>| {
            let weak = Arc::downgrade(&dc);
            let count = Arc::clone(&counted);
            let bye_tx = Arc::clone(&bye_tx);
            dc.on_message(Box::new(move |msg| {
                let weak = weak.clone();
                let count = Arc::clone(&count);
                let bye_tx = Arc::clone(&bye_tx);
                Box::pin(async move {
                    let Some(dc) = weak.upgrade() else { return };
                    match &msg.data[..] {
                        b"count?" => {
                            let n = count.load(Ordering::SeqCst);
                            let _ = dc.send_text(format!("rtp={n}")).await;
                        }
                        b"bye" => {
                            if let Some(tx) = bye_tx.lock().unwrap().take() {
                                let _ = tx.send(());
                            }
                        }
                        _ => {
                            let _ = dc.send(&msg.data).await;
                        }
                    }
                })
            }));
            Box::pin(async {})
        }));

        let codec_slot = Arc::clone(&codec);
        pc.on_track(Box::new(move |track, _receiver, _transceiver| {
            let count = Arc::clone(&count);
            *codec_slot.lock().unwrap() = Some(track.codec().capability.mime_type.clone());
            tokio::spawn(async move {
                while track.read_rtp().await.is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            });
            Box::pin(async {})
        }));

        CalleeMedia {
            rtp_count,
            codec,
            bye: Mutex::new(Some(bye_rx)),
        }
    }

    /// Echoes and counts (in the handlers) until the caller says "bye".
    async fn serve(&self, report: &mut PeerReport) {
        let bye = self.bye.lock().unwrap().take();
        if let Some(rx) = bye {
            let limit = Duration::from_secs(30);
            if timeout(limit, rx).await.is_err() {
                report.notes.push(format!("no \"bye\" within {limit:?}"));
            }
        }
    }
}

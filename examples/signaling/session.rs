//! One WebSocket member: join, relay messages within the room, leave.
//!
//! Whatever a client sends, the worst outcome is an error message or its own
//! socket closing; the task never panics on input and other sockets and
//! rooms are not affected.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use crate::ice::rest_user_from_name;
use crate::protocol::{parse_client, ClientMsg, ErrorCode, PeerInfo, ServerMsg, MAX_MESSAGE_BYTES};
use crate::rooms::{JoinError, RouteError};
use crate::server::{mint_for_session, AppState, ConnectionSlot, Handle};
use turnpike::proto::bucket::{Rate, TokenBucket};

/// Messages a socket may send at once, then per second sustained. Joining a
/// full room trickles some 10 to 30 candidates per peer; a client sending
/// more than this for long is broken or hostile.
const BURST: u32 = 200;
const PER_SEC: u32 = 50;
/// Messages queued for a socket before it counts as too slow.
const OUTBOX_LEN: usize = 512;
const PING_EVERY: Duration = Duration::from_secs(20);
/// No frame at all (pongs included) for this long: the peer is gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for the client's close reply after ours.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Close codes beyond RFC 6455's (4000-4999 are for applications).
const CLOSE_ROOM_FULL: u16 = 4001;

/// Why the server ends a session.
struct Ending {
    error: Option<(ErrorCode, &'static str)>,
    code: u16,
}

impl Ending {
    fn error(code: ErrorCode, message: &'static str, close: u16) -> Self {
        Self {
            error: Some((code, message)),
            code: close,
        }
    }
}

pub async fn run(
    state: Arc<AppState>,
    mut socket: WebSocket,
    room: String,
    name: String,
    host: String,
    _slot: ConnectionSlot,
) {
    let (tx, mut rx) = mpsc::channel::<String>(OUTBOX_LEN);
    let kick = Arc::new(Notify::new());
    let handle = Handle::new(tx, kick.clone());

    let (id, existing) = match join(&state, &room, &name, handle) {
        Ok(joined) => joined,
        Err(e) => {
            let (code, message, close) = match e {
                JoinError::RoomFull => (ErrorCode::RoomFull, "this room is full", CLOSE_ROOM_FULL),
                JoinError::TooManyRooms => (
                    ErrorCode::TooManyRooms,
                    "too many rooms are open, try again later",
                    close_code::AGAIN,
                ),
                JoinError::ServerFull | JoinError::DuplicateId => (
                    ErrorCode::ServerFull,
                    "the server is full, try again later",
                    close_code::AGAIN,
                ),
            };
            info!(%room, ?e, "join refused");
            finish(&mut socket, Ending::error(code, message, close)).await;
            return;
        }
    };

    let ice = mint_for_session(&state, &host, &rest_user_from_name(&name));
    let welcome = ServerMsg::Welcome {
        id: &id,
        room: &room,
        name: &name,
        room_size: state.settings.room_size,
        peers: existing
            .into_iter()
            .map(|m| PeerInfo {
                id: m.id,
                name: m.name,
            })
            .collect(),
        ice: &ice,
    }
    .to_json();

    let ending = if socket.send(Message::Text(welcome.into())).await.is_ok() {
        serve(&state, &mut socket, &room, &id, &mut rx, &kick).await
    } else {
        None
    };

    // Leave before the goodbye: the others learn at once, whatever the
    // closing handshake does.
    let left = ServerMsg::PeerLeft { id: &id }.to_json();
    {
        let mut registry = state.registry();
        for m in registry.leave(&room, &id).unwrap_or_default() {
            m.handle.deliver(left.clone());
        }
    }
    match &ending {
        Some(e) if e.error.is_some() => {
            warn!(%room, peer = %id, error = ?e.error, "closed by server")
        }
        _ => info!(%room, peer = %id, "left"),
    }
    if let Some(ending) = ending {
        finish(&mut socket, ending).await;
    }
}

fn join(
    state: &AppState,
    room: &str,
    name: &str,
    handle: Handle,
) -> Result<(String, Vec<crate::rooms::Member<Handle>>), JoinError> {
    loop {
        let id = state.new_peer_id();
        let joined = ServerMsg::PeerJoined {
            peer: PeerInfo {
                id: id.clone(),
                name: name.to_owned(),
            },
        }
        .to_json();
        let mut registry = state.registry();
        match registry.join(room, id.clone(), name.to_owned(), handle.clone()) {
            Ok(existing) => {
                // Under the lock: everyone sees arrivals and departures in
                // one order.
                for m in &existing {
                    m.handle.deliver(joined.clone());
                }
                info!(
                    %room,
                    peer = %id,
                    rooms = registry.room_count(),
                    members = registry.member_count(),
                    "joined"
                );
                return Ok((id, existing));
            }
            Err(JoinError::DuplicateId) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The member's main loop. `None`: the client went away (nothing to send).
async fn serve(
    state: &AppState,
    socket: &mut WebSocket,
    room: &str,
    id: &str,
    rx: &mut mpsc::Receiver<String>,
    kick: &Notify,
) -> Option<Ending> {
    let mut bucket = TokenBucket::new(Rate::new(PER_SEC.into(), BURST.into()), Instant::now());
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            incoming = socket.recv() => {
                let msg = match incoming {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        // Includes frames over the hard size limit.
                        debug!(%room, peer = %id, error = %e, "socket error");
                        return None;
                    }
                    None => return None,
                };
                let now = Instant::now();
                last_heard = now;
                if matches!(msg, Message::Close(_)) {
                    return None;
                }
                if !bucket.take(1, now) {
                    return Some(Ending::error(
                        ErrorCode::RateLimited,
                        "too many messages, slow down",
                        close_code::POLICY,
                    ));
                }
                let reply = match msg {
                    Message::Text(text) => match on_text(state, room, id, text.as_str()) {
                        Ok(reply) => reply,
                        Err(ending) => return Some(ending),
                    },
                    Message::Binary(_) => Some(error_json(
                        ErrorCode::BinaryUnsupported,
                        "binary messages are not supported, send JSON text",
                    )),
                    // Pings are answered by the WebSocket layer.
                    _ => None,
                };
                if let Some(reply) = reply {
                    if socket.send(Message::Text(reply.into())).await.is_err() {
                        return None;
                    }
                }
            }
            Some(out) = rx.recv() => {
                if socket.send(Message::Text(out.into())).await.is_err() {
                    return None;
                }
            }
            () = kick.notified() => {
                return Some(Ending::error(
                    ErrorCode::TooSlow,
                    "too many messages queued for this socket",
                    close_code::POLICY,
                ));
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > IDLE_TIMEOUT {
                    debug!(%room, peer = %id, "idle timeout");
                    return None;
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return None;
                }
            }
        }
    }
}

fn error_json(code: ErrorCode, message: &str) -> String {
    ServerMsg::Error { code, message }.to_json()
}

/// Handles one text message: `Ok(reply to the sender)` or the end.
fn on_text(state: &AppState, room: &str, id: &str, text: &str) -> Result<Option<String>, Ending> {
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(Ending::error(
            ErrorCode::TooLarge,
            "message larger than 64 KiB",
            close_code::SIZE,
        ));
    }
    let msg = match parse_client(text) {
        Ok(msg) => msg,
        Err(e) => return Ok(Some(error_json(e.code, &e.message))),
    };
    let (to, relayed) = match &msg {
        ClientMsg::Offer { to, sdp } => (to, ServerMsg::Offer { from: id, sdp }.to_json()),
        ClientMsg::Answer { to, sdp } => (to, ServerMsg::Answer { from: id, sdp }.to_json()),
        ClientMsg::Candidate { to, candidate } => (
            to,
            ServerMsg::Candidate {
                from: id,
                candidate: candidate.as_ref(),
            }
            .to_json(),
        ),
        ClientMsg::Ping => return Ok(Some(ServerMsg::Pong.to_json())),
        ClientMsg::Leave => {
            return Err(Ending {
                error: None,
                code: close_code::NORMAL,
            })
        }
    };
    let routed = state
        .registry()
        .route(room, id, to)
        .map(|handle| handle.deliver(relayed));
    Ok(match routed {
        Ok(()) => None,
        Err(RouteError::ToSelf) => Some(error_json(
            ErrorCode::UnknownPeer,
            "cannot send a message to yourself",
        )),
        Err(RouteError::UnknownPeer | RouteError::NotMember) => Some(error_json(
            ErrorCode::UnknownPeer,
            "no such peer in this room (it may have left)",
        )),
    })
}

/// Sends the error (if any) and a close frame, then waits briefly for the
/// client's close so the error is not lost to a TCP reset.
async fn finish(socket: &mut WebSocket, ending: Ending) {
    if let Some((code, message)) = ending.error {
        let _ = socket
            .send(Message::Text(error_json(code, message).into()))
            .await;
    }
    let reason = ending.error.map_or("bye", |(_, m)| m);
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: ending.code,
            reason: reason.into(),
        })))
        .await;
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

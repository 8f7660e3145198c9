//! HTTP side: shared state, routes, static page, `/api/ice`, WebSocket upgrade.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use turnpike::control::unix_now;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ring::rand::SystemRandom;
use serde::Deserialize;
use tokio::sync::{mpsc, Notify};

use crate::ice::{host_of, valid_rest_user, IceMinter};
use crate::protocol::MAX_MESSAGE_BYTES;
use crate::rooms::{clean_display_name, valid_room_name, Registry};
use crate::session;

const INDEX_HTML: &str = include_str!("static/index.html");
const APP_JS: &str = include_str!("static/app.js");
const STYLE_CSS: &str = include_str!("static/style.css");

/// Frames or messages above this are refused by the WebSocket layer itself
/// (connection dropped). Between `MAX_MESSAGE_BYTES` and this, the session
/// answers with an error and a 1009 close.
const HARD_MESSAGE_LIMIT: usize = 2 * MAX_MESSAGE_BYTES;

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; media-src 'self' blob: mediastream:; connect-src 'self' ws: wss:; \
    object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'";

/// What a member's session is reached by: its outbox and a "you are too
/// slow, go away" signal for when the outbox is full.
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<String>,
    kick: Arc<Notify>,
}

impl Handle {
    pub fn new(tx: mpsc::Sender<String>, kick: Arc<Notify>) -> Self {
        Self { tx, kick }
    }

    /// Never blocks: a member that does not drain its outbox is disconnected
    /// rather than slowing down (or growing memory for) everyone else.
    pub fn deliver(&self, msg: String) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(msg) {
            self.kick.notify_one();
        }
    }
}

pub struct Settings {
    pub room_size: usize,
    pub max_connections: usize,
    /// Host used in derived ICE URLs when a request has no usable Host header.
    pub fallback_host: String,
    /// Extra WebSocket origins accepted besides the page's own.
    pub allow_origins: Vec<String>,
}

pub struct AppState {
    registry: Mutex<Registry<Handle>>,
    pub ice: IceMinter,
    pub settings: Settings,
    connections: AtomicUsize,
    rng: SystemRandom,
    fallback_ids: AtomicU64,
}

impl AppState {
    pub fn new(registry: Registry<Handle>, ice: IceMinter, settings: Settings) -> Self {
        Self {
            registry: Mutex::new(registry),
            ice,
            settings,
            connections: AtomicUsize::new(0),
            rng: SystemRandom::new(),
            fallback_ids: AtomicU64::new(0),
        }
    }

    /// Nothing panics while holding the lock, but if something ever did,
    /// the registry is still consistent (every method updates it last).
    pub fn registry(&self) -> MutexGuard<'_, Registry<Handle>> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// 16 hex digits, random: ids are compared by the page to pick the
    /// polite side of perfect negotiation, so they must be distinct.
    pub fn new_peer_id(&self) -> String {
        let bytes: [u8; 8] = match ring::rand::generate(&self.rng) {
            Ok(r) => r.expose(),
            Err(_) => {
                let n = self.fallback_ids.fetch_add(1, Ordering::Relaxed);
                (n ^ 0x5eed_5eed_5eed_5eed).to_be_bytes()
            }
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn host_for(&self, headers: &HeaderMap) -> String {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(host_of)
            .unwrap_or_else(|| self.settings.fallback_host.clone())
    }
}

/// One open (or opening) WebSocket, counted against `--max-connections`.
pub struct ConnectionSlot(Arc<AppState>);

impl ConnectionSlot {
    fn acquire(state: &Arc<AppState>) -> Option<Self> {
        let max = state.settings.max_connections;
        state
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(state.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/r/{room}", get(room_page))
        .route("/static/app.js", get(app_js))
        .route("/static/style.css", get(style_css))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/api/ice", get(api_ice))
        .route("/ws/{room}", get(ws_upgrade))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn room_page(Path(room): Path<String>) -> Response {
    if valid_room_name(&room) {
        asset("text/html; charset=utf-8", INDEX_HTML)
    } else {
        (
            StatusCode::BAD_REQUEST,
            "invalid room name: use 1 to 64 of A-Z a-z 0-9 _ -",
        )
            .into_response()
    }
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

#[derive(Deserialize)]
struct IceQuery {
    user: Option<String>,
}

async fn api_ice(
    State(state): State<Arc<AppState>>,
    Query(q): Query<IceQuery>,
    headers: HeaderMap,
) -> Response {
    let user = q.user.unwrap_or_else(|| "guest".to_owned());
    if !valid_rest_user(&user) {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({
                "error": "user must be 1 to 64 of A-Z a-z 0-9 _ . @ -"
            })),
        )
            .into_response();
    }
    let host = state.host_for(&headers);
    Json(state.ice.mint(&host, &user, unix_now())).into_response()
}

pub fn mint_for_session(state: &AppState, host: &str, user: &str) -> crate::ice::IceResponse {
    state.ice.mint(host, user, unix_now())
}

#[derive(Deserialize)]
struct WsQuery {
    name: Option<String>,
}

/// Browsers always send Origin on WebSocket requests; a page on another
/// site must not be able to join rooms (and collect TURN credentials) with
/// our visitors' browsers. Clients without Origin (not browsers) pass.
fn origin_allowed(headers: &HeaderMap, allow: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if allow.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|authority| authority.eq_ignore_ascii_case(host))
}

async fn ws_upgrade(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    Query(q): Query<WsQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !valid_room_name(&room) {
        return (StatusCode::BAD_REQUEST, "invalid room name").into_response();
    }
    if !origin_allowed(&headers, &state.settings.allow_origins) {
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let Some(slot) = ConnectionSlot::acquire(&state) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    let host = state.host_for(&headers);
    let name = clean_display_name(q.name.as_deref().unwrap_or(""));
    ws.max_message_size(HARD_MESSAGE_LIMIT)
        .max_frame_size(HARD_MESSAGE_LIMIT)
        .on_upgrade(move |socket| session::run(state, socket, room, name, host, slot))
}

/// Host for derived ICE URLs when the Host header is missing or unusable.
pub fn fallback_host(listen: SocketAddr) -> String {
    match listen {
        a if a.ip().is_unspecified() => "127.0.0.1".to_owned(),
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn origins() {
        let allow = vec!["https://app.example".to_owned()];
        assert!(origin_allowed(&headers(&[("host", "a:8080")]), &allow));
        assert!(origin_allowed(
            &headers(&[("host", "a:8080"), ("origin", "http://a:8080")]),
            &allow
        ));
        assert!(origin_allowed(
            &headers(&[("host", "a"), ("origin", "https://A")]),
            &allow
        ));
        assert!(origin_allowed(
            &headers(&[("host", "a"), ("origin", "https://app.example")]),
            &allow
        ));
        assert!(!origin_allowed(
            &headers(&[("host", "a:8080"), ("origin", "http://evil.example")]),
            &allow
        ));
        assert!(!origin_allowed(
            &headers(&[("host", "a"), ("origin", "null")]),
            &allow
        ));
        assert!(!origin_allowed(&headers(&[("origin", "http://a")]), &allow));
    }

    #[test]
    fn fallback_hosts() {
        assert_eq!(fallback_host("0.0.0.0:80".parse().unwrap()), "127.0.0.1");
        assert_eq!(fallback_host("10.0.0.1:80".parse().unwrap()), "10.0.0.1");
        assert_eq!(fallback_host("[::1]:80".parse().unwrap()), "[::1]");
    }
}

//! The HTTP control plane: health, readiness, Prometheus metrics, and behind a bearer token the
//! credential minting and admin routes. Errors are JSON `{"error": "..."}` naming what is wrong,
//! and never contain a secret or token.

// Handlers return `Response` as their error: it is the error path of an HTTP request, where the
// size of the value does not matter.
#![allow(clippy::result_large_err)]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::credentials::{self, MintError};
use super::metrics::{self, Extra};
use super::{unix_now, ControlState, REST_REVOCATION_RULE, STATIC_REVOCATION_RULE};
use crate::proto::auth::parse_rest_username;
use crate::proto::codec::constant_time_eq;

/// Requests are tiny JSON objects; anything bigger is refused with 413 before it is read.
const BODY_LIMIT: usize = 16 * 1024;

type AppState = Arc<ControlState>;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_route))
        .route("/api/v1/credentials", post(mint_credentials))
        .route("/api/v1/turn", get(rest_turn))
        .route("/api/v1/revoke", post(revoke))
        .route("/api/v1/unrevoke", post(unrevoke))
        .route("/api/v1/revoked", post(revoked))
        .route("/api/v1/sessions", get(sessions))
        .route("/api/v1/sessions/{id}", delete(kill_session))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    // Shards that do not answer cannot serve.
    if state.shards.reports().await.iter().any(Option::is_none) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shard unresponsive\n").into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn metrics_route(State(state): State<AppState>) -> Response {
    let answers = state.shards.reports().await;
    let unresponsive = answers.iter().filter(|r| r.is_none()).count();
    let reports: Vec<_> = answers.into_iter().flatten().collect();
    let extra = Extra {
        reloads_ok: state.reloads_ok.load(Ordering::Relaxed),
        reloads_failed: state.reloads_failed.load(Ordering::Relaxed),
        relay_port_span: state.relay_port_span,
        draining: state.draining.load(Ordering::Relaxed),
        shards_unresponsive: unresponsive,
        uptime_secs: state.started.elapsed().as_secs(),
        tls_not_after: state.streams.tls.as_ref().map(|t| t.not_after()),
        fleet_connected: state.fleet.get().map(|f| f.connected()),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(&reports, &extra),
    )
        .into_response()
}

/// Bearer token check; the routes below call it first.
fn authorize(state: &ControlState, headers: &HeaderMap) -> Result<(), Response> {
    let live = state.lock_live();
    let Some(token) = live.api_token.as_deref() else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "the /api/v1 routes are disabled: set api.token_file",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.trim().as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(unauthorized("wrong bearer token")),
        None => Err(unauthorized("missing Authorization: Bearer <token>")),
    }
}

fn unauthorized(message: &str) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))
}

/// Mints with the configuration in force; TTL defaults and caps come from `[api]`. A credential
/// the server would refuse as revoked is not handed out: 409.
fn mint(
    state: &ControlState,
    user: &str,
    ttl: Option<u64>,
) -> Result<credentials::Minted, Response> {
    let live = state.lock_live();
    let config = &live.config;
    // The API caps a longer TTL (the CLI refuses it: an explicit flag should not be ignored).
    let ttl = ttl
        .unwrap_or(credentials::default_ttl(config))
        .min(credentials::max_ttl(config));
    let host = credentials::public_host(config, state.advertised);
    let uris = credentials::default_uris(&state.listeners, &host);
    let minted = credentials::mint_for(config, &live.rest_secrets, user, ttl, unix_now(), uris)
        .map_err(|e| match e {
            MintError::NoSecret => error(StatusCode::SERVICE_UNAVAILABLE, e),
            _ => error(StatusCode::BAD_REQUEST, e),
        })?;
    // The user part as the server reads it back from the username, under the same rule.
    let refused = parse_rest_username(&minted.username, config.auth.rest_separator)
        .and_then(|(expiry, part)| live.core.auth.rest_refused_until(part, expiry));
    if let Some(until) = refused {
        return Err(error(
            StatusCode::CONFLICT,
            format!(
                "user {user:?} is revoked until {} (unix {until}): the server would refuse this \
                 credential; POST /api/v1/unrevoke lifts the revocation",
                credentials::rfc3339(until)
            ),
        ));
    }
    Ok(minted)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialRequest {
    user: String,
    ttl: Option<u64>,
}

async fn mint_credentials(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let req: CredentialRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match mint(&state, &req.user, req.ttl) {
        Ok(m) => Json(credentials::ice_json(&m)).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct RestQuery {
    service: Option<String>,
    username: Option<String>,
    ttl: Option<u64>,
}

/// draft-uberti-behave-turn-rest: `GET /api/v1/turn?service=turn&username=alice`.
async fn rest_turn(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<RestQuery>, QueryRejection>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad query string: {}", e.body_text()),
            )
        }
    };
    if q.service.as_deref() != Some("turn") {
        return error(StatusCode::BAD_REQUEST, "service must be \"turn\"");
    }
    let Some(user) = q.username else {
        return error(StatusCode::BAD_REQUEST, "username is required");
    };
    match mint(&state, &user, q.ttl) {
        Ok(m) => Json(credentials::rest_json(&m)).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    user: String,
}

/// The authorised `{"user": ...}` body of revoke and unrevoke.
fn user_request(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<RevokeRequest, Response> {
    authorize(state, headers)?;
    let req: RevokeRequest = parse_json(body)?;
    if req.user.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "user must not be empty"));
    }
    Ok(req)
}

async fn revoke(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match user_request(&state, &headers, &body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let r = state.revoke(&req.user, unix_now()).await;
    if let Some(fleet) = state.fleet.get() {
        fleet.revoked(&req.user);
    }
    let mut body = json!({
        "user": req.user,
        "ended_allocations": r.ended,
        "refused_until": credentials::rfc3339(r.until),
        "refused_until_unix": r.until,
        "rest_rule": REST_REVOCATION_RULE,
        "static_user": r.static_user,
    });
    if r.static_user {
        body["static_rule"] = json!(STATIC_REVOCATION_RULE);
    }
    Json(body).into_response()
}

/// Lifts a revocation made by `POST /api/v1/revoke`: REST credentials of the user and the static
/// user of that name are accepted again. Unknown or not revoked: 200 with both flags false.
async fn unrevoke(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match user_request(&state, &headers, &body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let lifted = state.unrevoke(&req.user);
    if let Some(fleet) = state.fleet.get() {
        fleet.unrevoked(&req.user);
    }
    Json(json!({
        "user": req.user,
        "was_revoked": lifted.rest || lifted.static_user,
        "rest_revocation_lifted": lifted.rest,
        "static_revocation_lifted": lifted.static_user,
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokedRequest {
    username: String,
}

/// Whether the running daemon refuses credentials of this username as revoked (revocations
/// live in the daemon, not in the file): what `turnpike verify-credential` asks after its own
/// check of the configuration.
async fn revoked(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let req: RevokedRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let revoked = state.lock_live().core.auth.is_revoked(&req.username);
    Json(json!({ "username": req.username, "revoked": revoked })).into_response()
}

/// Session ids name the shard, the slot and its generation: unique, and stale ids never hit a
/// newer allocation.
fn session_id(shard: usize, slot: u32, gen: u32) -> String {
    format!("{shard}-{slot}-{gen}")
}

/// The API's own spelling only: `session_id` of the parsed parts must give `id` back, so no
/// sign, leading zero, space or other byte slips through (`"+1-02-3"` is refused).
pub fn parse_session_id(id: &str) -> Option<(usize, u32, u32)> {
    let mut parts = id.split('-');
    let shard = parts.next()?.parse().ok()?;
    let slot = parts.next()?.parse().ok()?;
    let gen = parts.next()?.parse().ok()?;
    if parts.next().is_some() || session_id(shard, slot, gen) != id {
        return None;
    }
    Some((shard, slot, gen))
}

async fn sessions(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let list: Vec<_> = state
        .shards
        .sessions()
        .await
        .into_iter()
        .map(|(shard, s)| {
            json!({
                "id": session_id(shard, s.slot, s.gen),
                "allocation_id": format!("{:016x}", s.allocation_id),
                "user": s.username,
                "client": s.client.to_string(),
                "transport": s.transport.as_str(),
                "relay": s.relays.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "age_secs": s.age_secs,
                "expires_in_secs": s.expires_in_secs,
                "to_peer_bytes": s.counters.to_peer_bytes,
                "to_peer_packets": s.counters.to_peer_packets,
                "to_client_bytes": s.counters.to_client_bytes,
                "to_client_packets": s.counters.to_client_packets,
                "permissions": s.permissions,
                "channels": s.channels,
            })
        })
        .collect();
    Json(json!({ "sessions": list })).into_response()
}

async fn kill_session(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let Some((shard, slot, gen)) = parse_session_id(&id) else {
        return error(
            StatusCode::BAD_REQUEST,
            "session id must be <shard>-<slot>-<generation> in decimal without signs or \
             leading zeros, as GET /api/v1/sessions lists it, e.g. 0-12-3",
        );
    };
    if state.shards.kill(shard, slot, gen).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, format!("no session {id}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_round_trip_and_reject_junk() {
        assert_eq!(
            parse_session_id(&session_id(1, 22, 333)),
            Some((1, 22, 333))
        );
        for id in ["0-0-0", "12-345-6789", "3-4294967295-4294967295"] {
            assert_eq!(
                parse_session_id(id).map(|(a, b, c)| session_id(a, b, c)),
                Some(id.into())
            );
        }
        for junk in [
            "",
            "1",
            "1-2",
            "1-2-3-4",
            "a-b-c",
            "-1-2-3",
            "1--2",
            "+1-2-3",
            "1-+2-3",
            "01-2-3",
            "1-2-03",
            " 1-2-3",
            "1-2-3 ",
            "1-2-3\r\nDELETE /api/v1/sessions/0-0-0",
            "1-2-3\n",
            "1-2-4294967296",
            "\u{0661}-2-3",
        ] {
            assert_eq!(parse_session_id(junk), None, "{junk}");
        }
    }
}

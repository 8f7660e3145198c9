//! The HTTP control plane against the real daemon: bearer auth, credential minting in both
//! shapes, request validation, revocation (REST and static users, un-revoke, no minting for a
//! revoked user; HTTP and `turnpike revoke`/`unrevoke`), sessions (HTTP and `turnpike sessions`),
//! and Prometheus metrics that follow what the relay does.

mod common;

use std::time::Duration;

use common::{
    expected_rest_password, field, http, out_text, parse_rfc3339_utc, rest_credential, run_cli,
    unix_now, Api, Daemon, EchoPeer, Options, TurnClient, API_TOKEN, PASSWORD, SECRET, USER,
};
use turnpike::config::UserSecret;

const CHANNEL: u16 = 0x4001;
const STEP: Duration = Duration::from_secs(3);

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

/// Nothing secret in `text`: the REST secret, the API token, the static password.
fn assert_no_secret(what: &str, text: &str) {
    for secret in [SECRET, API_TOKEN, PASSWORD] {
        assert!(!text.contains(secret), "{what} leaks {secret:?}:\n{text}");
    }
}

// ------------------------------------------------------------------ auth on /api/v1

#[test]
fn api_routes_need_the_bearer_token() {
    let d = Daemon::with(Options::with_api());
    let routes = [
        ("GET", "/api/v1/sessions", None),
        ("POST", "/api/v1/credentials", Some(r#"{"user":"alice"}"#)),
        ("GET", "/api/v1/turn?service=turn&username=alice", None),
        ("POST", "/api/v1/revoke", Some(r#"{"user":"alice"}"#)),
        ("POST", "/api/v1/unrevoke", Some(r#"{"user":"alice"}"#)),
        ("DELETE", "/api/v1/sessions/0-0-0", None),
    ];
    let wrong = "Bearer not-the-token-0123456789abcdef";
    for (method, path, body) in routes {
        for headers in [
            vec![],
            vec![("Authorization", wrong)],
            vec![("Authorization", API_TOKEN)], // no "Bearer " scheme
        ] {
            let r = http(
                d.api_addr(),
                method,
                path,
                &headers,
                body.map(str::as_bytes),
            );
            assert_eq!(
                r.status, 401,
                "{method} {path} with {headers:?}: {}",
                r.body
            );
            assert_eq!(
                r.header("www-authenticate").map(str::to_ascii_lowercase),
                Some("bearer".into()),
                "{method} {path}: WWW-Authenticate"
            );
            r.error_message();
            assert_no_secret("401 body", &r.body);
        }
    }
    // Not revoked by the attempts above: alice still allocates with a REST credential.
    let (u, p) = rest_credential("alice", unix_now() + 600);
    TurnClient::new(d.addr, &u, &p).must_allocate();
    // The right token works.
    assert_eq!(d.api("GET", "/api/v1/sessions", None).status, 200);
    assert_no_secret("daemon log", &d.log());
    assert!(
        !d.log().contains("not-the-token"),
        "the wrong token is logged"
    );
}

#[test]
fn api_routes_answer_403_without_a_token_file() {
    let d = Daemon::with(Options {
        api: Api::NoToken,
        ..Options::default()
    });
    for (method, path, body) in [
        ("GET", "/api/v1/sessions", None),
        ("POST", "/api/v1/credentials", Some(r#"{"user":"alice"}"#)),
        ("GET", "/api/v1/turn?service=turn&username=alice", None),
    ] {
        for headers in [
            vec![],
            vec![("Authorization", "Bearer anything-at-all-0123456789")],
        ] {
            let r = http(
                d.api_addr(),
                method,
                path,
                &headers,
                body.map(str::as_bytes),
            );
            assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
            assert!(r.error_message().contains("token_file"), "{}", r.body);
        }
    }
    // Health and metrics need no token.
    assert_eq!(d.get("/healthz").status, 200);
    assert_eq!(d.get("/readyz").status, 200);
    d.metrics();
}

// ------------------------------------------------------------------ minting

#[test]
fn minting_returns_both_shapes_with_capped_ttl_and_rejects_bad_requests() {
    let d = Daemon::with(Options::with_api().edit(|c| {
        c.api.default_ttl_secs = 600;
        c.api.max_ttl_secs = 7200;
        c.public_host = "turn.example.test".into();
    }));

    // POST /api/v1/credentials: the iceServers shape.
    let before = unix_now();
    let r = d.api(
        "POST",
        "/api/v1/credentials",
        Some(r#"{"user":"alice","ttl":999999}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .contains("application/json"));
    let v = r.json();
    assert_eq!(v["ttl"], 7200, "TTL capped at api.max_ttl_secs");
    let server = &v["iceServers"][0];
    let username = server["username"].as_str().expect("username").to_owned();
    let credential = server["credential"]
        .as_str()
        .expect("credential")
        .to_owned();
    let (expiry, user) = username.split_once(':').expect("expiry:user");
    let expiry: u64 = expiry.parse().unwrap();
    assert_eq!(user, "alice");
    assert!((before + 7200..=unix_now() + 7200).contains(&expiry));
    assert_eq!(
        parse_rfc3339_utc(v["expires_at"].as_str().unwrap()),
        Some(expiry)
    );
    assert_eq!(credential, expected_rest_password(&username));
    let urls = server["urls"].as_array().expect("urls");
    assert!(urls
        .iter()
        .any(|u| u.as_str().unwrap().starts_with("stun:turn.example.test:")));
    assert!(urls.iter().any(
        |u| u.as_str().unwrap().starts_with("turn:turn.example.test:")
            && u.as_str().unwrap().ends_with("?transport=udp")
    ));

    // Default TTL, and a small explicit one.
    let v = d
        .api("POST", "/api/v1/credentials", Some(r#"{"user":"bob"}"#))
        .json();
    assert_eq!(v["ttl"], 600, "api.default_ttl_secs");
    let v = d
        .api(
            "POST",
            "/api/v1/credentials",
            Some(r#"{"user":"bob","ttl":120}"#),
        )
        .json();
    assert_eq!(v["ttl"], 120);

    // GET /api/v1/turn: the draft-uberti shape.
    let r = d.api("GET", "/api/v1/turn?service=turn&username=alice", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let rest_user = v["username"].as_str().unwrap().to_owned();
    assert!(rest_user.ends_with(":alice"));
    assert_eq!(
        v["password"].as_str().unwrap(),
        expected_rest_password(&rest_user)
    );
    assert_eq!(v["ttl"], 600);
    assert!(v["uris"].as_array().is_some_and(|u| !u.is_empty()));
    let v = d
        .api(
            "GET",
            "/api/v1/turn?service=turn&username=carol&ttl=86400",
            None,
        )
        .json();
    assert_eq!(v["ttl"], 7200, "capped on the REST route too");

    // Bad requests: 400 with a JSON error that says what is wrong.
    let bad: [(&str, &str, Option<&str>, &str); 15] = [
        ("POST", "/api/v1/credentials", Some("{"), "json"),
        ("POST", "/api/v1/credentials", Some("not json"), "json"),
        (
            "POST",
            "/api/v1/credentials",
            Some(r#"{"user":"a","color":"red"}"#),
            "color",
        ),
        ("POST", "/api/v1/credentials", Some("{}"), "user"),
        ("POST", "/api/v1/credentials", Some(r#"{"ttl":60}"#), "user"),
        (
            "POST",
            "/api/v1/credentials",
            Some(r#"{"user":"a","ttl":0}"#),
            "ttl",
        ),
        (
            "POST",
            "/api/v1/credentials",
            Some(r#"{"user":"a","ttl":-5}"#),
            "json",
        ),
        (
            "POST",
            "/api/v1/credentials",
            Some(r#"{"user":"a","ttl":"1h"}"#),
            "json",
        ),
        (
            "POST",
            "/api/v1/credentials",
            Some(r#"{"user":""}"#),
            "user",
        ),
        (
            "GET",
            "/api/v1/turn?service=turn&username=alice&ttl=abc",
            None,
            "query",
        ),
        (
            "GET",
            "/api/v1/turn?service=stun&username=alice",
            None,
            "service",
        ),
        ("GET", "/api/v1/turn?username=alice", None, "service"),
        ("GET", "/api/v1/turn?service=turn", None, "username"),
        ("POST", "/api/v1/revoke", Some("{}"), "user"),
        ("POST", "/api/v1/revoke", Some(r#"{"user":""}"#), "user"),
    ];
    for (method, path, body, says) in bad {
        let r = d.api(method, path, body);
        assert_eq!(r.status, 400, "{method} {path} {body:?}: {}", r.body);
        let msg = r.error_message();
        assert!(
            msg.to_lowercase().contains(says),
            "{method} {path} {body:?}: the error should mention {says:?}: {msg}"
        );
        assert_no_secret("400 body", &r.body);
    }

    // A body over 16 KiB: 413, whatever it holds, with or without a token.
    let big = format!(r#"{{"user":"{}"}}"#, "a".repeat(16 * 1024));
    let r = d.api("POST", "/api/v1/credentials", Some(&big));
    assert_eq!(r.status, 413, "{}", r.body);
    assert_no_secret("413 body", &r.body);
    let r = http(
        d.api_addr(),
        "POST",
        "/api/v1/revoke",
        &[],
        Some(big.as_bytes()),
    );
    assert!(matches!(r.status, 401 | 413), "{}", r.status);
    // Exactly at the limit it is read (and refused for its contents, not its size).
    let at_limit = format!(r#"{{"user":"a","pad":"{}"}}"#, "b".repeat(16 * 1024 - 21));
    assert_eq!(at_limit.len(), 16 * 1024);
    let r = d.api("POST", "/api/v1/credentials", Some(&at_limit));
    assert_eq!(r.status, 400, "{}", r.body);

    // An unknown route: 404 JSON.
    let r = d.api("GET", "/api/v1/nope", None);
    assert_eq!(r.status, 404);
    r.error_message();

    // Still serving: minting works and the minted credential allocates and relays.
    let r = d.api(
        "POST",
        "/api/v1/credentials",
        Some(r#"{"user":"erin","ttl":300}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let peer = EchoPeer::start();
    let mut c = TurnClient::new(
        d.addr,
        v["iceServers"][0]["username"].as_str().unwrap(),
        v["iceServers"][0]["credential"].as_str().unwrap(),
    );
    c.must_allocate();
    c.must_bind_channel(CHANNEL, peer.addr);
    c.echo_round_trips(CHANNEL, 3);
    assert_eq!(d.get("/healthz").status, 200);

    assert_no_secret("daemon log", &d.log());
}

// ------------------------------------------------------------------ revoke

#[test]
fn revoke_ends_the_users_allocations_and_refuses_new_ones() {
    let d = Daemon::with(Options::with_api());
    let peer = EchoPeer::start();
    let (xu, xp) = rest_credential("xavier", unix_now() + 3600);
    let mut x = TurnClient::new(d.addr, &xu, &xp);
    x.must_allocate();
    x.must_bind_channel(CHANNEL, peer.addr);
    x.echo_round_trips(CHANNEL, 3);
    // Another of xavier's allocations with a different credential, and one of yolanda's.
    let (xu2, xp2) = rest_credential("xavier", unix_now() + 1800);
    let mut x2 = TurnClient::new(d.addr, &xu2, &xp2);
    x2.must_allocate();
    let (yu, yp) = rest_credential("yolanda", unix_now() + 3600);
    let mut y = TurnClient::new(d.addr, &yu, &yp);
    y.must_allocate();
    y.must_bind_channel(CHANNEL, peer.addr);

    let r = d.api("POST", "/api/v1/revoke", Some(r#"{"user":"xavier"}"#));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["user"], "xavier");
    assert_eq!(v["ended_allocations"], 2);
    let until = parse_rfc3339_utc(v["refused_until"].as_str().unwrap()).expect("RFC 3339");
    assert!(until >= unix_now() + common::REST_MAX_TTL_SECS - 5, "{v}");

    let ended = d.wait_events("allocation ended", 2, STEP, |e| {
        field(e, "reason") == "user revoked"
    });
    let mut users: Vec<&str> = ended.iter().map(|e| field(e, "user")).collect();
    users.sort();
    let mut want = [xu.as_str(), xu2.as_str()];
    want.sort();
    assert_eq!(users, want);

    // The relay stops forwarding: nothing reaches the peer, nothing comes back.
    let echoed = peer.count();
    x.send_channel_data(CHANNEL, b"after revoke");
    assert!(x
        .recv_channel_data(CHANNEL, Duration::from_millis(300))
        .is_none());
    assert_eq!(peer.count(), echoed, "the peer got data after the revoke");
    // The old allocation's client is refused too (its credential is revoked).
    assert_eq!(x.refresh(600).code(), Some(401));

    // A fresh credential for xavier is refused; yolanda is untouched and still allocates.
    let (xu3, xp3) = rest_credential("xavier", unix_now() + 600);
    let before = d.metric("turnpike_auth_failures_total{reason=\"revoked\"}");
    assert_eq!(
        TurnClient::new(d.addr, &xu3, &xp3).allocate().code(),
        Some(401)
    );
    assert!(d.metric("turnpike_auth_failures_total{reason=\"revoked\"}") > before);
    y.echo_round_trips(CHANNEL, 2);
    let (yu2, yp2) = rest_credential("yolanda", unix_now() + 600);
    TurnClient::new(d.addr, &yu2, &yp2).must_allocate();
    // Static users are not affected: alice still allocates.
    TurnClient::new(d.addr, USER, PASSWORD).must_allocate();
    assert_no_secret("daemon log", &d.log());
}

/// Waits until `n` reloads were applied.
fn reloaded(d: &Daemon, n: usize) {
    d.wait_metric("turnpike_reloads_total{result=\"ok\"}", n as f64, STEP);
}

#[test]
fn revoking_a_static_user_holds_until_unrevoke_or_a_changed_password() {
    let mut d = Daemon::with(Options::with_api());
    let peer = EchoPeer::start();
    let mut a = TurnClient::new(d.addr, USER, PASSWORD);
    a.must_allocate();
    a.must_bind_channel(CHANNEL, peer.addr);

    let r = d.api(
        "POST",
        "/api/v1/revoke",
        Some(&format!(r#"{{"user":"{USER}"}}"#)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["ended_allocations"], 1, "{v}");
    assert_eq!(v["static_user"], true, "{v}");
    let rule = v["static_rule"]
        .as_str()
        .expect("static_rule documents the rule");
    assert!(
        rule.contains("/api/v1/unrevoke") && rule.contains("reload") && rule.contains("password"),
        "{rule}"
    );
    assert!(v["refused_until_unix"].as_u64().is_some(), "{v}");

    // Refused at once and for good: a fresh allocation is a 401, the metric says "revoked".
    let revoked = "turnpike_auth_failures_total{reason=\"revoked\"}";
    let before = d.metric(revoked);
    assert_eq!(
        TurnClient::new(d.addr, USER, PASSWORD).allocate().code(),
        Some(401)
    );
    assert!(d.metric(revoked) > before);
    // A plain reload (same password) keeps the revocation.
    d.sighup();
    reloaded(&d, 1);
    assert_eq!(
        TurnClient::new(d.addr, USER, PASSWORD).allocate().code(),
        Some(401),
        "a reload must not un-revoke"
    );
    // Other users are untouched.
    let (u, p) = rest_credential("zoe", unix_now() + 600);
    TurnClient::new(d.addr, &u, &p).must_allocate();

    // Un-revoke: she allocates again.
    let r = d.api(
        "POST",
        "/api/v1/unrevoke",
        Some(&format!(r#"{{"user":"{USER}"}}"#)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["was_revoked"], true, "{v}");
    assert_eq!(v["static_revocation_lifted"], true, "{v}");
    TurnClient::new(d.addr, USER, PASSWORD).must_allocate();
    // Un-revoking again, or someone never revoked: 200, nothing lifted.
    let v = d
        .api("POST", "/api/v1/unrevoke", Some(r#"{"user":"nobody"}"#))
        .json();
    assert_eq!(v["was_revoked"], false, "{v}");
    for (body, says) in [("{}", "user"), (r#"{"user":""}"#, "user"), ("x", "json")] {
        let r = d.api("POST", "/api/v1/unrevoke", Some(body));
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(
            r.error_message().to_lowercase().contains(says),
            "{}",
            r.body
        );
    }

    // Revoked again; a reload that gives her a new password lifts it (the old one is wrong now).
    assert_eq!(
        d.api(
            "POST",
            "/api/v1/revoke",
            Some(&format!(r#"{{"user":"{USER}"}}"#))
        )
        .status,
        200
    );
    assert_eq!(
        TurnClient::new(d.addr, USER, PASSWORD).allocate().code(),
        Some(401)
    );
    let new_password = "a-brand-new-password";
    d.edit_config(|c| c.auth.users[0].secret = UserSecret::Password(new_password.into()));
    d.sighup();
    reloaded(&d, 2);
    TurnClient::new(d.addr, USER, new_password).must_allocate();
    assert_eq!(
        TurnClient::new(d.addr, USER, PASSWORD).allocate().code(),
        Some(401)
    );
    assert_no_secret("daemon log", &d.log());
}

#[test]
fn minting_for_a_revoked_user_is_a_409_until_unrevoked() {
    let d = Daemon::with(Options::with_api());
    assert_eq!(
        d.api("POST", "/api/v1/revoke", Some(r#"{"user":"mallory"}"#))
            .status,
        200
    );
    let routes = [
        ("POST", "/api/v1/credentials", Some(r#"{"user":"mallory"}"#)),
        (
            "POST",
            "/api/v1/credentials",
            Some(r#"{"user":"mallory","ttl":60}"#),
        ),
        ("GET", "/api/v1/turn?service=turn&username=mallory", None),
    ];
    for (method, path, body) in routes {
        let r = d.api(method, path, body);
        assert_eq!(r.status, 409, "{method} {path}: {}", r.body);
        let msg = r.error_message();
        assert!(
            msg.contains("mallory") && msg.contains("revoked until"),
            "{msg}"
        );
        assert_no_secret("409 body", &r.body);
    }
    // Others still get credentials.
    assert_eq!(
        d.api("POST", "/api/v1/credentials", Some(r#"{"user":"trent"}"#))
            .status,
        200
    );
    // After un-revoking, minting works and the credential allocates.
    assert_eq!(
        d.api("POST", "/api/v1/unrevoke", Some(r#"{"user":"mallory"}"#))
            .json()["rest_revocation_lifted"],
        true
    );
    let r = d.api("POST", "/api/v1/credentials", Some(r#"{"user":"mallory"}"#));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    TurnClient::new(
        d.addr,
        v["iceServers"][0]["username"].as_str().unwrap(),
        v["iceServers"][0]["credential"].as_str().unwrap(),
    )
    .must_allocate();
}

#[test]
fn revoke_and_unrevoke_through_the_cli() {
    let d = Daemon::with(Options::with_api());
    let config = d.client_config();
    let cfg = config.to_str().unwrap();
    TurnClient::new(d.addr, USER, PASSWORD).must_allocate();

    // verify-credential asks the running daemon, where revocations live.
    let verify = |username: &str, password: &str| {
        let args = [
            "verify-credential",
            "--config",
            cfg,
            "--username",
            username,
            "--password",
            "-",
        ];
        run_cli(&args, Some(&format!("{password}\n")))
    };
    let expiry = unix_now() + 600;
    let (rest_user, rest_password) = rest_credential("carol", expiry);
    assert!(verify(USER, PASSWORD).status.success());
    assert!(verify(&rest_user, &rest_password).status.success());

    let o = run_cli(&["revoke", "--config", cfg, USER], None);
    let (out, err) = out_text(&o);
    assert!(o.status.success(), "revoke: {out}{err}");
    let v = json(&out);
    assert_eq!(v["user"], USER);
    assert_eq!(v["static_user"], true);
    assert_eq!(v["ended_allocations"], 1);
    assert_eq!(
        TurnClient::new(d.addr, USER, PASSWORD).allocate().code(),
        Some(401)
    );
    let o = verify(USER, PASSWORD);
    let (out, err) = out_text(&o);
    assert!(!o.status.success(), "a revoked user is refused: {out}{err}");
    assert!(err.contains("revoked"), "{err}");
    assert!(run_cli(&["revoke", "--config", cfg, "carol"], None)
        .status
        .success());
    let o = verify(&rest_user, &rest_password);
    assert!(!o.status.success(), "{:?}", out_text(&o));

    let o = run_cli(&["unrevoke", "--config", cfg, USER], None);
    let (out, err) = out_text(&o);
    assert!(o.status.success(), "unrevoke: {out}{err}");
    assert_eq!(json(&out)["was_revoked"], true, "{out}");
    TurnClient::new(d.addr, USER, PASSWORD).must_allocate();
    assert!(verify(USER, PASSWORD).status.success());

    // An empty user is refused before any request.
    let o = run_cli(&["revoke", "--config", cfg, ""], None);
    assert!(!o.status.success() && o.status.code().is_some());
    assert_no_secret("CLI output", &format!("{:?}", out_text(&o)));
}

// ------------------------------------------------------------------ sessions

fn sessions(d: &Daemon) -> Vec<serde_json::Value> {
    let r = d.api("GET", "/api/v1/sessions", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["sessions"]
        .as_array()
        .expect("sessions array")
        .clone()
}

fn session_of<'a>(list: &'a [serde_json::Value], c: &TurnClient) -> &'a serde_json::Value {
    let client = c.local().to_string();
    let found: Vec<_> = list
        .iter()
        .filter(|s| s["client"] == client.as_str())
        .collect();
    assert_eq!(found.len(), 1, "one session for {client} in {list:?}");
    found[0]
}

#[test]
fn sessions_list_and_kill_over_http() {
    let d = Daemon::with(Options::with_api());
    assert!(sessions(&d).is_empty());
    let peer = EchoPeer::start();
    let mut c = TurnClient::new(d.addr, USER, PASSWORD);
    let relay = c.must_allocate();
    c.must_bind_channel(CHANNEL, peer.addr);
    let (ru, rp) = rest_credential("rest-user", unix_now() + 600);
    let mut other = TurnClient::new(d.addr, &ru, &rp);
    let other_relay = other.must_allocate();

    let list = sessions(&d);
    assert_eq!(list.len(), 2, "{list:?}");
    let s = session_of(&list, &c);
    assert_eq!(s["user"], USER);
    assert_eq!(s["transport"], "udp");
    assert_eq!(s["relay"], serde_json::json!([relay.to_string()]));
    assert_eq!(s["to_peer_packets"], 0);
    assert_eq!(s["permissions"], 1);
    assert_eq!(s["channels"], 1);
    let o = session_of(&list, &other);
    assert_eq!(o["user"], ru.as_str());
    assert_eq!(o["relay"], serde_json::json!([other_relay.to_string()]));
    assert_ne!(s["id"], o["id"]);

    // Counters move after relaying: 5 round trips of known sizes.
    c.echo_round_trips(CHANNEL, 5);
    let s = session_of(&sessions(&d), &c).clone();
    let payload_bytes: usize = (0..5)
        .map(|i| format!("round trip {i} from {}", c.local()).len())
        .sum();
    assert_eq!(s["to_peer_packets"], 5);
    assert_eq!(s["to_client_packets"], 5);
    assert_eq!(s["to_peer_bytes"], payload_bytes);
    assert_eq!(s["to_client_bytes"], payload_bytes);

    // DELETE ends it: 204, the relay stops, the log says so; a second DELETE is 404.
    let id = s["id"].as_str().unwrap().to_owned();
    let r = d.api("DELETE", &format!("/api/v1/sessions/{id}"), None);
    assert_eq!(r.status, 204, "{}", r.body);
    d.wait_events("allocation ended", 1, STEP, |e| {
        field(e, "client") == c.local().to_string()
    });
    let echoed = peer.count();
    c.send_channel_data(CHANNEL, b"after kill");
    assert!(c
        .recv_channel_data(CHANNEL, Duration::from_millis(300))
        .is_none());
    assert_eq!(peer.count(), echoed);
    let r = d.api("DELETE", &format!("/api/v1/sessions/{id}"), None);
    assert_eq!(r.status, 404, "{}", r.body);
    r.error_message();
    for junk in ["junk", "1-2", "a-b-c", "1-2-3-4", "99999999999-0-0"] {
        let r = d.api("DELETE", &format!("/api/v1/sessions/{junk}"), None);
        assert!(
            matches!(r.status, 400 | 404),
            "DELETE {junk}: {} {}",
            r.status,
            r.body
        );
    }
    let r = d.api("DELETE", "/api/v1/sessions/junk", None);
    assert_eq!(r.status, 400);
    r.error_message();
    // Only the API's own spelling: these name shard 1 (which exists) in other spellings, and
    // %0D%0A decodes to CR LF. All 400, none 404.
    for other in ["01-0-0", "+1-0-0", "1-00-0", "1-0-0%0D%0A", "1-0-0%20"] {
        let r = d.api("DELETE", &format!("/api/v1/sessions/{other}"), None);
        assert_eq!(r.status, 400, "DELETE {other}: {}", r.body);
        assert!(r.error_message().contains("session id"), "{}", r.body);
    }
    // A well-formed id of a shard that does not exist.
    assert_eq!(d.api("DELETE", "/api/v1/sessions/7-0-0", None).status, 404);

    // Only the other session is left, and it still works.
    let list = sessions(&d);
    assert_eq!(list.len(), 1);
    session_of(&list, &other);
    assert_eq!(other.refresh(600).outcome(), (true, None));
}

#[test]
fn sessions_list_and_kill_through_the_cli() {
    let d = Daemon::with(Options::with_api());
    let config = d.client_config();
    let cfg = config.to_str().unwrap();
    let peer = EchoPeer::start();
    let mut c = TurnClient::new(d.addr, USER, PASSWORD);
    let relay = c.must_allocate();
    c.must_bind_channel(CHANNEL, peer.addr);
    c.echo_round_trips(CHANNEL, 2);

    let o = run_cli(&["sessions", "--config", cfg, "list"], None);
    let (out, err) = out_text(&o);
    assert!(o.status.success(), "sessions list: {out}{err}");
    let v = json(&out);
    let list = v["sessions"].as_array().expect("sessions");
    assert_eq!(list.len(), 1, "{out}");
    assert_eq!(list[0]["user"], USER);
    assert_eq!(list[0]["client"], c.local().to_string().as_str());
    assert_eq!(list[0]["relay"], serde_json::json!([relay.to_string()]));
    assert_eq!(list[0]["to_peer_packets"], 2);
    let id = list[0]["id"].as_str().unwrap().to_owned();

    let o = run_cli(&["sessions", "--config", cfg, "kill", &id], None);
    let (out, err) = out_text(&o);
    assert!(o.status.success(), "sessions kill: {out}{err}");
    assert!(out.contains(&id), "{out}");
    d.wait_events("allocation ended", 1, STEP, |e| {
        field(e, "client") == c.local().to_string()
    });
    assert!(sessions(&d).is_empty());

    // Killing it again fails, naming the 404; a junk id is refused before any request.
    let o = run_cli(&["sessions", "--config", cfg, "kill", &id], None);
    let (_, err) = out_text(&o);
    assert!(!o.status.success() && err.contains("404"), "{err}");
    let o = run_cli(&["sessions", "--config", cfg, "kill", "junk"], None);
    let (_, err) = out_text(&o);
    assert!(
        !o.status.success() && err.contains("not a session id"),
        "{err}"
    );
    assert_no_secret("CLI stderr", &err);

    // With the daemon's own config (api.listen port 0) the CLI fails cleanly, not hangs.
    let o = run_cli(
        &[
            "sessions",
            "--config",
            d.config_path().to_str().unwrap(),
            "list",
        ],
        None,
    );
    assert!(!o.status.success() && o.status.code().is_some());
}

// ------------------------------------------------------------------ metrics and health

#[test]
fn metrics_follow_allocations_relaying_and_auth_failures() {
    let d = Daemon::with(Options::with_api());
    let r = d.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain"),
        "{:?}",
        r.headers
    );
    let r = d.get("/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(d.get("/readyz").status, 200);

    let alloc = "turnpike_allocations{transport=\"udp\"}";
    let to_peer = "turnpike_relayed_packets_total{direction=\"to_peer\"}";
    let to_client = "turnpike_relayed_packets_total{direction=\"to_client\"}";
    let wrong_pw = "turnpike_auth_failures_total{reason=\"wrong_password\"}";
    let m0 = d.metrics();
    assert_eq!(m0[alloc], 0.0);
    // Bounded labels only: no per-user or per-address series.
    for series in m0.keys() {
        let labels = series
            .split_once('{')
            .map_or("", |(_, l)| l.trim_end_matches('}'));
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let key = pair.split_once('=').unwrap().0;
            assert!(
                ["transport", "direction", "reason", "result"].contains(&key),
                "unexpected label {key:?} in {series}"
            );
        }
        assert!(!series.contains("127.0.0.1"), "address in {series}");
    }

    let peer = EchoPeer::start();
    let mut c = TurnClient::new(d.addr, USER, PASSWORD);
    c.must_allocate();
    assert_eq!(d.metric(alloc), 1.0);
    c.must_bind_channel(CHANNEL, peer.addr);
    c.echo_round_trips(CHANNEL, 7);
    let m1 = d.metrics();
    assert_eq!(m1[to_peer] - m0[to_peer], 7.0);
    assert_eq!(m1[to_client] - m0[to_client], 7.0);
    assert_eq!(m1["turnpike_allocations_created_total"], 1.0);
    assert_eq!(m1["turnpike_relay_sockets_open"], 1.0);

    let mut bad = TurnClient::new(d.addr, USER, "not-the-password");
    assert_eq!(bad.allocate().code(), Some(401));
    let m2 = d.metrics();
    let grew = m2[wrong_pw] - m1[wrong_pw];
    assert!((1.0..=5.0).contains(&grew), "wrong_password grew by {grew}");

    assert_eq!(c.refresh(0).outcome(), (true, None));
    let m3 = d.metrics();
    assert_eq!(m3[alloc], 0.0);
    assert_eq!(m3["turnpike_allocations_ended_total"], 1.0);
    assert_eq!(m3["turnpike_relay_sockets_open"], 0.0);
    assert_eq!(m3["turnpike_draining"], 0.0);
    assert_eq!(m3["turnpike_shards"], 2.0);
    assert_eq!(m3["turnpike_shards_unresponsive"], 0.0);
}

/// Regression: the API once listed the configured port (0 in tests), not the bound one.
#[test]
fn api_minted_uris_carry_the_bound_listener_port() {
    let d = Daemon::with(Options::with_api());
    let v = d
        .api("POST", "/api/v1/credentials", Some(r#"{"user":"alice"}"#))
        .json();
    let port = d.addr.port();
    assert_eq!(
        v["iceServers"][0]["urls"],
        serde_json::json!([
            format!("stun:127.0.0.1:{port}"),
            format!("turn:127.0.0.1:{port}?transport=udp")
        ])
    );
}

// ------------------------------------------------------------------ usage records

/// The usage file's records once `done` holds for them (the writer thread is a few ms behind).
fn usage_records(
    path: &std::path::Path,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let records: Vec<serde_json::Value> = text.lines().map(json).collect();
        if done(&records) {
            return records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not yet in {}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client's traffic counted in its usage records exactly as it sent and received it: an
/// interim record while it lives, an end record with the reason; logrotate's SIGHUP starts a
/// new file; the allocations a shutdown ends are recorded before the process exits.
#[test]
fn usage_records_count_what_a_client_sent_and_follow_a_rotation_and_the_shutdown() {
    let dir = common::TempDir::new("usage");
    let path = dir.path().join("usage.jsonl");
    let file = path.clone();
    let mut d = Daemon::with(Options::with_api().edit(move |c| {
        c.usage.file = Some(file.clone());
        c.usage.interval_secs = 1;
    }));
    let peer = EchoPeer::start();
    let mut a = TurnClient::new(d.addr, USER, PASSWORD);
    let relay = a.must_allocate();
    a.must_bind_channel(CHANNEL, peer.addr);
    let sizes: Vec<usize> = (1..=20).map(|i| i * 10).collect();
    let mut received = 0;
    for &n in &sizes {
        a.send_channel_data(CHANNEL, &vec![7u8; n]);
        if a.recv(STEP).is_some() {
            received += 1;
        }
    }
    assert_eq!(received, sizes.len(), "every echo came back");
    let sent_bytes: usize = sizes.iter().sum();
    let sessions = d.api("GET", "/api/v1/sessions", None).json();
    let allocation_id = sessions["sessions"][0]["allocation_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Interim records each second, carrying the totals so far (a tick may have come while
    // the packets were still going out).
    let interim = usage_records(&path, |rs| rs.iter().any(|r| r["to_peer_packets"] == 20));
    for r in &interim {
        assert_eq!(r["type"], "interim", "{r}");
        assert_eq!(r["allocation_id"], allocation_id.as_str(), "{r}");
        assert!(r.get("reason").is_none(), "{r}");
    }

    assert_eq!(a.refresh(0).class(), turnpike::proto::codec::Class::Success);
    let is_end = |r: &serde_json::Value| r["type"] == "end";
    let records = usage_records(&path, |rs| rs.iter().any(is_end));
    let end = records.iter().find(|r| is_end(r)).unwrap();
    assert_eq!(
        records.iter().filter(|r| is_end(r)).count(),
        1,
        "{records:?}"
    );
    assert_eq!(end["allocation_id"], allocation_id.as_str(), "{end}");
    assert_eq!(end["reason"], "deleted by client", "{end}");
    assert_eq!(end["user"], USER, "{end}");
    assert_eq!(end["client"], a.local().to_string(), "{end}");
    assert_eq!(end["transport"], "udp", "{end}");
    assert_eq!(end["relays"][0], relay.to_string(), "{end}");
    assert_eq!(end["to_peer_packets"], sizes.len(), "{end}");
    assert_eq!(end["to_peer_bytes"], sent_bytes, "{end}");
    assert_eq!(end["to_client_packets"], sizes.len(), "{end}");
    assert_eq!(end["to_client_bytes"], sent_bytes, "{end}");
    assert_eq!(end["dropped_packets"], 0, "{end}");
    let (start, at) = (
        end["start_unix"].as_u64().unwrap(),
        end["at_unix"].as_u64().unwrap(),
    );
    assert!(
        start <= at && at <= unix_now() && unix_now() - start < 60,
        "{end}"
    );

    // logrotate: the file moves away, SIGHUP, the next records start a new file.
    let rotated = dir.path().join("usage.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    d.sighup();
    d.wait_metric("turnpike_reloads_total{result=\"ok\"}", 1.0, STEP);
    let mut b = TurnClient::new(d.addr, USER, PASSWORD);
    b.must_allocate();
    // Left open: the shutdown ends it, and its record is written before the process exits.
    d.sigterm();
    assert!(
        d.wait_exit(Duration::from_secs(40)).is_some(),
        "the daemon exits"
    );
    let after = usage_records(&path, |rs| rs.iter().any(is_end));
    let ends: Vec<_> = after.iter().filter(|r| is_end(r)).collect();
    assert_eq!(ends.len(), 1, "{after:?}");
    assert_eq!(ends[0]["client"], b.local().to_string(), "{after:?}");
    assert_eq!(ends[0]["reason"], "server shutdown", "{after:?}");
    let old = usage_records(&rotated, |rs| rs.iter().any(is_end));
    assert!(
        old.iter().all(|r| r["client"] == a.local().to_string()),
        "only a's records before the rotation: {old:?}"
    );
}

// ------------------------------------------------------------------ the Grafana dashboard

/// Every query of deploy/grafana/turnpike.json names metrics a daemon (with TLS, so the
/// certificate gauge is there) exports, and groups or filters only by labels they carry.
#[test]
fn the_grafana_dashboard_asks_only_for_metrics_and_labels_the_daemon_exports() {
    let cert = common::TestCert::new();
    let d = Daemon::with(Options::with_api().edit(cert.listen_on("127.0.0.1")));
    let mut labels: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for series in d.metrics().keys() {
        let (name, rest) = series.split_once('{').unwrap_or((series, ""));
        let entry = labels.entry(name.to_owned()).or_default();
        for pair in rest
            .trim_end_matches('}')
            .split(',')
            .filter(|p| !p.is_empty())
        {
            entry.push(pair.split('=').next().unwrap().to_owned());
        }
    }
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/turnpike.json");
    let dashboard = json(&std::fs::read_to_string(path).unwrap());
    let word = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries += 1;
            let expr = target["expr"].as_str().unwrap();
            let legend = target["legendFormat"].as_str().unwrap_or("");
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("turnpike_"))
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for name in &names {
                assert!(
                    labels.contains_key(*name),
                    "{name} (in {expr}) is not exported"
                );
            }
            // Labels grouped by, filtered on, or shown in the legend.
            let mut used: Vec<String> = Vec::new();
            for part in expr.split("by (").skip(1) {
                used.extend(
                    part.split(')')
                        .next()
                        .unwrap()
                        .split(',')
                        .map(|l| l.trim().to_owned()),
                );
            }
            for part in expr.split('{').skip(1) {
                let inner = part.split('}').next().unwrap();
                used.extend(inner.split(',').filter_map(|kv| {
                    let k = kv.split(['=', '~', '!']).next()?.trim();
                    (!k.is_empty() && word(k)).then(|| k.to_owned())
                }));
            }
            for part in legend.split("{{").skip(1) {
                used.push(part.split("}}").next().unwrap().trim().to_owned());
            }
            for label in used.iter().filter(|l| *l != "instance") {
                assert!(
                    names.iter().any(|n| labels[*n].contains(label)),
                    "label {label} (in {expr}, legend {legend:?}) is on none of {names:?}"
                );
            }
        }
    }
    assert!(queries >= 20, "{queries} queries");
}

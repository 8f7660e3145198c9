//! Behaviour of `examples/signaling`: the example binary is started on
//! loopback with a temporary config and driven with WebSocket and plain
//! HTTP clients.
//!
//! The binary is the one cargo builds next to `turnpike` for `cargo test`
//! (`target/<profile>/examples/signaling`). `cargo test --test
//! signaling_example` alone does not build examples: run `cargo build
//! --example signaling` first in that case.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};
use turnpike::config::{AuthConfig, Config};
use turnpike::proto::auth::rest_password;

use common::{collect_stderr, signaling_listen_addr, unix_now, TempDir};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const STEP: Duration = Duration::from_secs(5);
const TURN_PORT: u16 = 34780;

// ------------------------------------------------------------------ server

/// A distinct secret per server, long enough for the daemon's 16-byte floor.
fn fresh_secret() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("sig-test-secret-{}-{nanos:09}-xyzzy", std::process::id())
}

/// Writes a config whose `[auth]` table `auth` sets and returns its path.
fn write_config(dir: &TempDir, auth: impl FnOnce(&mut AuthConfig)) -> PathBuf {
    let mut c = Config {
        listen: vec![(Ipv4Addr::LOCALHOST, TURN_PORT).into()],
        ..Config::default()
    };
    auth(&mut c.auth);
    let path = dir.path().join("turnpike.toml");
    std::fs::write(&path, common::config_toml(&c)).expect("write config");
    path
}

/// `[auth]` with `rest-secret` and a cap on REST lifetimes.
fn secret_and_ttl(max_ttl_secs: u64) -> impl FnOnce(&mut AuthConfig) {
    move |auth| {
        auth.secret_file = Some("rest-secret".into());
        auth.rest_max_ttl_secs = max_ttl_secs;
    }
}

struct Server {
    child: Child,
    addr: SocketAddr,
    secret: String,
    stderr: Arc<Mutex<String>>,
    _dir: TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Server {
    let dir = TempDir::new("signaling-test");
    let secret = fresh_secret();
    std::fs::write(dir.path().join("rest-secret"), format!("{secret}\n")).expect("write secret");
    let config = write_config(&dir, secret_and_ttl(7200));
    let mut child = Command::new(common::example_binary())
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the signaling example");
    let stderr = collect_stderr(&mut child);
    let addr = match signaling_listen_addr(&mut child, Duration::from_secs(30)) {
        Some(addr) => addr.parse().expect("listen address"),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the example did not print its address; stderr:\n{}",
                stderr.lock().unwrap()
            );
        }
    };
    Server {
        child,
        addr,
        secret,
        stderr,
        _dir: dir,
    }
}

/// Runs the example expecting it to refuse to start; returns its stderr.
fn start_fails(auth: impl FnOnce(&mut AuthConfig), args: &[&str]) -> String {
    let dir = TempDir::new("signaling-test");
    std::fs::write(
        dir.path().join("rest-secret"),
        format!("{}\n", fresh_secret()),
    )
    .unwrap();
    let config = write_config(&dir, auth);
    let mut child = Command::new(common::example_binary())
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("TURNPIKE_TEST_UNSET_VAR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the signaling example");
    let stderr = collect_stderr(&mut child);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the example started although it should have refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "exit status {status}");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(!out.contains("listening"), "stdout: {out}");
    // Let the drain thread catch the last bytes.
    std::thread::sleep(Duration::from_millis(100));
    let text = stderr.lock().unwrap().clone();
    text
}

// -------------------------------------------------------------- WebSocket

async fn connect(addr: SocketAddr, room: &str, name: &str) -> Ws {
    let url = format!("ws://{addr}/ws/{room}?name={name}");
    let (ws, _) = tokio::time::timeout(STEP, connect_async(url))
        .await
        .expect("connect timed out")
        .expect("connect");
    ws
}

/// Next text message as JSON; control frames are skipped.
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("timed out waiting for a message")
            .expect("socket ended")
            .expect("socket error");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server sent JSON"),
            Message::Close(f) => panic!("socket closed: {f:?}"),
            _ => {}
        }
    }
}

/// No text message for `wait`.
async fn silent(ws: &mut Ws, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Text(t)))) => panic!("unexpected message: {t}"),
            Ok(Some(Ok(Message::Close(f)))) => panic!("unexpected close: {f:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("socket ended: {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

async fn send_raw(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// Joins and returns the socket and the welcome message.
async fn join(addr: SocketAddr, room: &str, name: &str) -> (Ws, Value) {
    let mut ws = connect(addr, room, name).await;
    let welcome = recv(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

fn id(welcome: &Value) -> String {
    welcome["id"].as_str().expect("id").to_owned()
}

/// Reads until the socket ends. Returns the text messages seen and the close
/// code (None: no close frame, the connection just ended).
async fn until_closed(ws: &mut Ws) -> (Vec<Value>, Option<u16>) {
    let mut texts = Vec::new();
    loop {
        let next = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("socket not closed in time");
        match next {
            Some(Ok(Message::Text(t))) => {
                texts.push(serde_json::from_str(t.as_str()).expect("JSON"));
            }
            Some(Ok(Message::Close(f))) => return (texts, f.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (texts, None),
        }
    }
}

// ------------------------------------------------------------------- HTTP

struct HttpResponse {
    status: u16,
    headers: String,
    body: String,
}

async fn http_get(addr: SocketAddr, path: &str, host: Option<&str>) -> HttpResponse {
    let host = host.map_or_else(|| addr.to_string(), str::to_owned);
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut raw))
        .await
        .expect("HTTP response timed out")
        .expect("read");
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let headers = head.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        s = &rest[size + 2..];
    }
}

/// Checks an `{"iceServers":[...],"ttl":..}` object minted for `user`.
fn check_ice(ice: &Value, secret: &str, user: &str, ttl: u64, host: &str) {
    assert_eq!(ice["ttl"], ttl, "{ice}");
    let servers = ice["iceServers"].as_array().expect("iceServers");
    assert_eq!(servers.len(), 2, "{ice}");
    assert_eq!(
        servers[0]["urls"],
        json!([format!("stun:{host}:{TURN_PORT}")])
    );
    assert!(servers[0].get("credential").is_none());
    let turn = &servers[1];
    assert_eq!(
        turn["urls"],
        json!([format!("turn:{host}:{TURN_PORT}?transport=udp")])
    );
    let username = turn["username"].as_str().expect("username");
    let (expiry, name) = username.split_once(':').expect("expiry:user");
    assert_eq!(name, user);
    let expiry: u64 = expiry.parse().expect("numeric expiry");
    let now = unix_now();
    assert!(
        expiry >= now + ttl - 10 && expiry <= now + ttl + 10,
        "expiry {expiry} not about now {now} + ttl {ttl}"
    );
    assert_eq!(
        turn["credential"].as_str().expect("credential"),
        rest_password(secret.as_bytes(), username),
        "password must be base64(HMAC-SHA1(secret, username))"
    );
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn peers_meet_relay_only_within_their_room_and_see_leaves() {
    let server = start(&[]);
    let addr = server.addr;
    let (mut a, wa) = join(addr, "room1", "Ada").await;
    assert_eq!(wa["room"], "room1");
    assert_eq!(wa["roomSize"], 4);
    assert_eq!(wa["peers"], json!([]));
    let (mut b, wb) = join(addr, "room1", "Bob").await;
    let (ida, idb) = (id(&wa), id(&wb));
    assert_ne!(ida, idb);
    assert_eq!(wb["peers"], json!([{"id": ida, "name": "Ada"}]));
    let joined = recv(&mut a).await;
    assert_eq!(
        joined,
        json!({"type": "peer-joined", "peer": {"id": idb, "name": "Bob"}})
    );

    // Somebody in another room hears nothing of room1.
    let (mut c, wc) = join(addr, "room2", "Cy").await;
    assert_eq!(wc["peers"], json!([]));

    send(
        &mut a,
        json!({"type": "offer", "to": idb, "sdp": "v=0 offer"}),
    )
    .await;
    assert_eq!(
        recv(&mut b).await,
        json!({"type": "offer", "from": ida, "sdp": "v=0 offer"})
    );
    send(
        &mut b,
        json!({"type": "answer", "to": ida, "sdp": "v=0 answer"}),
    )
    .await;
    assert_eq!(
        recv(&mut a).await,
        json!({"type": "answer", "from": idb, "sdp": "v=0 answer"})
    );
    let candidate = json!({
        "candidate": "candidate:1 1 udp 2113937151 192.0.2.1 5000 typ relay",
        "sdpMid": "0",
        "sdpMLineIndex": 0
    });
    send(
        &mut a,
        json!({"type": "candidate", "to": idb, "candidate": candidate}),
    )
    .await;
    assert_eq!(
        recv(&mut b).await,
        json!({"type": "candidate", "from": ida, "candidate": candidate})
    );

    // Room1 cannot address room2 even knowing the id.
    let idc = id(&wc);
    send(&mut a, json!({"type": "offer", "to": idc, "sdp": "v=0"})).await;
    let err = recv(&mut a).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "unknown-peer");
    silent(&mut c, Duration::from_millis(300)).await;
    silent(&mut b, Duration::from_millis(50)).await;

    // An explicit leave, then a dropped socket: both are seen as peer-left.
    let (mut d, wd) = join(addr, "room1", "Dee").await;
    let idd = id(&wd);
    assert_eq!(recv(&mut a).await["type"], "peer-joined");
    assert_eq!(recv(&mut b).await["type"], "peer-joined");
    send(&mut d, json!({"type": "leave"})).await;
    let (_, code) = until_closed(&mut d).await;
    assert_eq!(code, Some(1000));
    assert_eq!(recv(&mut a).await, json!({"type": "peer-left", "id": idd}));
    assert_eq!(recv(&mut b).await, json!({"type": "peer-left", "id": idd}));

    drop(b);
    assert_eq!(recv(&mut a).await, json!({"type": "peer-left", "id": idb}));
    send(&mut a, json!({"type": "offer", "to": idb, "sdp": "v=0"})).await;
    assert_eq!(recv(&mut a).await["code"], "unknown-peer");
    silent(&mut c, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn room_full_gets_an_error_then_a_close() {
    let server = start(&["--room-size", "2"]);
    let addr = server.addr;
    let (mut a, wa) = join(addr, "small", "A").await;
    assert_eq!(wa["roomSize"], 2);
    let (b, _) = join(addr, "small", "B").await;
    assert_eq!(recv(&mut a).await["type"], "peer-joined");

    let mut c = connect(addr, "small", "C").await;
    let (texts, code) = until_closed(&mut c).await;
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert_eq!(texts[0]["type"], "error");
    assert_eq!(texts[0]["code"], "room-full");
    assert_eq!(code, Some(4001));
    // The refused one was never announced.
    silent(&mut a, Duration::from_millis(200)).await;

    // Other rooms are open; a leave frees the seat.
    join(addr, "other", "C").await;
    drop(b);
    assert_eq!(recv(&mut a).await["type"], "peer-left");
    let (_, wc) = join(addr, "small", "C").await;
    assert_eq!(wc["peers"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_input_gets_errors_and_the_socket_keeps_working() {
    let server = start(&[]);
    let addr = server.addr;
    let (mut a, wa) = join(addr, "junk", "A").await;
    let (mut b, wb) = join(addr, "junk", "B").await;
    assert_eq!(recv(&mut a).await["type"], "peer-joined");
    let (mut quiet, _) = join(addr, "calm", "Q").await;

    let cases: &[(&str, &str)] = &[
        ("not json at all", "bad-json"),
        ("{\"type\":", "bad-json"),
        ("[1,2,3]", "bad-message"),
        ("{\"to\":\"x\"}", "bad-message"),
        ("{\"type\":\"dance\"}", "unknown-type"),
        ("{\"type\":\"offer\"}", "bad-message"),
        ("{\"type\":\"offer\",\"to\":5,\"sdp\":\"\"}", "bad-message"),
        (
            "{\"type\":\"offer\",\"to\":\"nobody\",\"sdp\":\"v=0\"}",
            "unknown-peer",
        ),
    ];
    for (input, code) in cases {
        send_raw(&mut a, input).await;
        let err = recv(&mut a).await;
        assert_eq!(err["type"], "error", "{input}");
        assert_eq!(err["code"], *code, "{input}: {err}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // To oneself.
    send(
        &mut a,
        json!({"type": "offer", "to": id(&wa), "sdp": "v=0"}),
    )
    .await;
    assert_eq!(recv(&mut a).await["code"], "unknown-peer");
    // Binary frames.
    a.send(Message::binary(vec![0u8, 1, 2])).await.unwrap();
    assert_eq!(recv(&mut a).await["code"], "binary-unsupported");

    // Still alive and still routing.
    send(&mut a, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut a).await, json!({"type": "pong"}));
    send(
        &mut a,
        json!({"type": "offer", "to": id(&wb), "sdp": "v=0"}),
    )
    .await;
    assert_eq!(recv(&mut b).await["from"], id(&wa));

    // The other room saw none of it and works.
    silent(&mut quiet, Duration::from_millis(200)).await;
    send(&mut quiet, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut quiet).await["type"], "pong");
}

#[tokio::test]
async fn oversize_messages_close_the_socket_and_spare_the_others() {
    let server = start(&[]);
    let addr = server.addr;
    let (mut a, _) = join(addr, "big", "A").await;
    let (mut b, wb) = join(addr, "big", "B").await;
    assert_eq!(recv(&mut a).await["type"], "peer-joined");
    let (mut other, _) = join(addr, "elsewhere", "O").await;

    // Just over 64 KiB: an error, then close 1009.
    let sdp = "a".repeat(64 * 1024 + 100);
    send(&mut b, json!({"type": "offer", "to": "x", "sdp": sdp})).await;
    let (texts, code) = until_closed(&mut b).await;
    assert_eq!(code, Some(1009));
    assert_eq!(texts.last().expect("error message")["code"], "too-large");
    assert_eq!(
        recv(&mut a).await,
        json!({"type": "peer-left", "id": id(&wb)})
    );

    // Far over: the connection is dropped (perhaps while still sending).
    let (mut c, _) = join(addr, "big", "C").await;
    assert_eq!(recv(&mut a).await["type"], "peer-joined");
    let _ = c.send(Message::text("x".repeat(1 << 20))).await;
    let (_, _code) = until_closed(&mut c).await;
    assert_eq!(recv(&mut a).await["type"], "peer-left");

    send(&mut a, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut a).await["type"], "pong");
    send(&mut other, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut other).await["type"], "pong");
}

#[tokio::test]
async fn a_flood_closes_the_socket() {
    let server = start(&[]);
    let addr = server.addr;
    let (mut a, _) = join(addr, "flood", "A").await;
    let (mut f, wf) = join(addr, "flood", "F").await;
    assert_eq!(recv(&mut a).await["type"], "peer-joined");

    let ping = json!({"type": "ping"}).to_string();
    for _ in 0..1000 {
        if f.feed(Message::text(ping.clone())).await.is_err() {
            break;
        }
    }
    let _ = f.flush().await;
    let (texts, code) = until_closed(&mut f).await;
    assert_eq!(code, Some(1008));
    let pongs = texts.iter().filter(|t| t["type"] == "pong").count();
    assert!(
        (50..1000).contains(&pongs),
        "{pongs} pongs before the close"
    );
    assert_eq!(texts.last().unwrap()["code"], "rate-limited");
    assert_eq!(
        recv(&mut a).await,
        json!({"type": "peer-left", "id": id(&wf)})
    );

    // The room and the server carry on.
    let (_, wn) = join(addr, "flood", "N").await;
    assert_eq!(wn["peers"].as_array().unwrap().len(), 1);
    assert_eq!(recv(&mut a).await["type"], "peer-joined");
}

#[tokio::test]
async fn ice_credentials_are_minted_with_the_daemons_secret() {
    let server = start(&["--ttl", "600"]);
    let addr = server.addr;

    let r = http_get(addr, "/api/ice?user=ada", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.contains("application/json"), "{}", r.headers);
    assert!(
        r.headers.contains("cache-control: no-store"),
        "{}",
        r.headers
    );
    let ice: Value = serde_json::from_str(&r.body).unwrap();
    check_ice(&ice, &server.secret, "ada", 600, "127.0.0.1");

    // Derived URLs follow the Host the page was loaded from.
    let r = http_get(addr, "/api/ice?user=bo.b", Some("meet.example.com:8080")).await;
    let ice: Value = serde_json::from_str(&r.body).unwrap();
    check_ice(&ice, &server.secret, "bo.b", 600, "meet.example.com");
    let r = http_get(addr, "/api/ice?user=x", Some("[::1]:8080")).await;
    let ice: Value = serde_json::from_str(&r.body).unwrap();
    check_ice(&ice, &server.secret, "x", 600, "[::1]");

    // No user: "guest". Bad users are refused.
    let r = http_get(addr, "/api/ice", None).await;
    let ice: Value = serde_json::from_str(&r.body).unwrap();
    check_ice(&ice, &server.secret, "guest", 600, "127.0.0.1");
    for bad in ["a:b", "a%20b", "", "%00"] {
        let r = http_get(addr, &format!("/api/ice?user={bad}"), None).await;
        assert_eq!(r.status, 400, "user={bad}");
    }

    // The welcome carries credentials too, for a REST user made of the name.
    let (_, w) = join(addr, "creds", "Zoe").await;
    check_ice(&w["ice"], &server.secret, "Zoe", 600, "127.0.0.1");
}

#[tokio::test]
async fn turn_urls_can_be_given() {
    let server = start(&[
        "--turn-url",
        "turn:turn.example.net:3478?transport=udp",
        "--turn-url",
        "turns:turn.example.net:5349?transport=tcp",
        "--turn-url",
        "stun:turn.example.net:3478",
    ]);
    let r = http_get(server.addr, "/api/ice?user=u", None).await;
    let ice: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(ice["ttl"], 3600);
    let servers = ice["iceServers"].as_array().unwrap();
    assert_eq!(servers[0]["urls"], json!(["stun:turn.example.net:3478"]));
    assert_eq!(
        servers[1]["urls"],
        json!([
            "turn:turn.example.net:3478?transport=udp",
            "turns:turn.example.net:5349?transport=tcp"
        ])
    );
    let username = servers[1]["username"].as_str().unwrap();
    assert_eq!(
        servers[1]["credential"].as_str().unwrap(),
        rest_password(server.secret.as_bytes(), username)
    );
}

#[tokio::test]
async fn the_secret_never_leaves_the_server() {
    let server = start(&[]);
    let addr = server.addr;
    let mut seen = String::new();
    for path in [
        "/",
        "/r/some-room",
        "/static/app.js",
        "/static/style.css",
        "/api/ice?user=ada",
    ] {
        let r = http_get(addr, path, None).await;
        assert_eq!(r.status, 200, "{path}");
        seen.push_str(&r.headers);
        seen.push_str(&r.body);
    }
    let (mut a, w) = join(addr, "s", "A").await;
    seen.push_str(&w.to_string());
    let (_, wb) = join(addr, "s", "B").await;
    seen.push_str(&wb.to_string());
    seen.push_str(&recv(&mut a).await.to_string());
    assert!(seen.contains("iceServers"));
    assert!(
        !seen.contains(&server.secret),
        "the REST secret was sent out"
    );
    let logs = server.stderr.lock().unwrap().clone();
    assert!(!logs.contains(&server.secret), "the REST secret was logged");
}

#[tokio::test]
async fn pages_and_names() {
    let server = start(&[]);
    let addr = server.addr;
    let page = http_get(addr, "/", None).await;
    assert_eq!(page.status, 200);
    assert!(page.headers.contains("text/html"));
    assert!(page.headers.contains("content-security-policy"));
    assert!(page.body.contains("/static/app.js"));
    let room = http_get(addr, "/r/Team_42-x", None).await;
    assert_eq!(room.body, page.body);
    let js = http_get(addr, "/static/app.js", None).await;
    assert!(js.headers.contains("text/javascript"));
    assert!(js.body.contains("window.turnpikeTest"));
    for bad in ["/r/a%20b", "/r/a.b", &format!("/r/{}", "x".repeat(65))] {
        assert_eq!(http_get(addr, bad, None).await.status, 400, "{bad}");
    }
    assert_eq!(http_get(addr, "/nope", None).await.status, 404);

    // Invalid room names never reach the signaling server.
    let url = format!("ws://{addr}/ws/a.b");
    assert!(connect_async(url).await.is_err());
    // Display names are cleaned up.
    let (_, w) = join(addr, "names", "%20%20Al%0Aan%20%20").await;
    assert_eq!(w["name"], "Alan");
    let (_, w) = join(addr, "names", "").await;
    assert_eq!(w["name"], "guest");
}

#[tokio::test]
async fn other_sites_cannot_open_the_websocket() {
    let server = start(&[]);
    let addr = server.addr;
    let mut request = format!("ws://{addr}/ws/room")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Origin", HeaderValue::from_static("http://evil.example"));
    assert!(connect_async(request).await.is_err());

    let mut request = format!("ws://{addr}/ws/room")
        .into_client_request()
        .unwrap();
    let origin = HeaderValue::from_str(&format!("http://{addr}")).unwrap();
    request.headers_mut().insert("Origin", origin);
    let (mut ws, _) = connect_async(request).await.expect("same origin is fine");
    assert_eq!(recv(&mut ws).await["type"], "welcome");
}

#[test]
fn refuses_to_start_without_a_rest_secret() {
    let stderr = start_fails(|_| {}, &[]);
    assert!(stderr.contains("no REST secret"), "{stderr}");
    assert!(stderr.contains("secret_file"), "{stderr}");

    let stderr = start_fails(
        |auth| auth.secret_env = Some("TURNPIKE_TEST_UNSET_VAR".into()),
        &[],
    );
    assert!(stderr.contains("TURNPIKE_TEST_UNSET_VAR"), "{stderr}");

    // A TTL the daemon would refuse.
    let stderr = start_fails(secret_and_ttl(3600), &["--ttl", "7200"]);
    assert!(stderr.contains("rest_max_ttl_secs"), "{stderr}");
}

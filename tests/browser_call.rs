//! Browser check (issue 3): two headless Chromium pages join one room of the
//! signaling example with "relay only" on, and each must see the other's
//! camera through turnpike.
//!
//! Everything runs on loopback: turnpike (`peers.allow_loopback_peers`,
//! relay address 127.0.0.1, via `tests/common`), the signaling example
//! (`target/<profile>/examples/signaling`, minting TURN credentials with the
//! daemon's REST secret), and one Chromium with fake camera and microphone,
//! driven over the DevTools protocol (`tests/browser/cdp.rs`); no Node.
//!
//! Asserted, within bounded waits: both pages are in the same room and list
//! each other; each page's remote `<video>` has frames (`videoWidth > 0`) and
//! its inbound video `bytesReceived` grows over one second; the selected
//! candidate pair is relay/relay on both sides, the relays crossing (one
//! page's local candidate is the other's remote) and both allocated by
//! turnpike (its "allocation created" log lines); the stats panel the user
//! sees says `relay ↔ relay`; no signaling errors and no uncaught exceptions.
//! A screenshot of one page goes to `target/browser-call.png`.
//!
//! Needs Chromium (Debian: `apt-get install chromium`; or set
//! `TURNPIKE_CHROMIUM=/path/to/chrome`). Without it the test fails when `CI`
//! is set and is skipped, loudly, otherwise. Like `signaling_example`, it
//! needs the example built: a plain `cargo test` builds it,
//! `cargo test --test browser_call` alone does not (`cargo build --example
//! signaling` first).

mod browser;
mod common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use browser::cdp::{Cdp, Page};
use browser::chromium::{self, Chromium};

const ROOM: &str = "browser-check";
const NAMES: [&str; 2] = ["alice", "bob"];
/// From navigation to "joined" (page load, fake camera, WebSocket welcome).
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// From both joined to video flowing both ways through the relay.
const MEDIA_TIMEOUT: Duration = Duration::from_secs(30);
/// The two samples of `bytesReceived` that must differ.
const SAMPLE_GAP: Duration = Duration::from_secs(1);
/// Everything, as a last resort against a wedged browser.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(250);

/// Installed before the page's own scripts: keeps every RTCPeerConnection
/// the page creates, so the test can read the same `getStats()` as the page.
const PC_HOOK: &str = r#"(() => {
  const Native = window.RTCPeerConnection;
  if (!Native) return;
  const all = [];
  Object.defineProperty(window, '__browserCallPcs', { value: all });
  window.RTCPeerConnection = class extends Native {
    constructor(...args) { super(...args); all.push(this); }
  };
})();"#;

/// One look at a page: the test hook's state, the remote video elements, the
/// stats panel text, and `getStats()` of each open connection.
const PROBE: &str = r#"(async () => {
  const t = window.turnpikeTest;
  if (!t) return { loaded: false, readyState: document.readyState, href: location.href };
  const videos = [...document.querySelectorAll('#tiles .tile.remote')].map((tile) => {
    const v = tile.querySelector('video');
    const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : null;
    return {
      peer: tile.dataset.peer,
      width: v.videoWidth, height: v.videoHeight, readyState: v.readyState,
      paused: v.paused, currentTime: v.currentTime,
      frames: q ? q.totalVideoFrames : null,
      path: tile.querySelector('.s-path').textContent,
      local: tile.querySelector('.s-local').textContent,
      remote: tile.querySelector('.s-remote').textContent,
      in: tile.querySelector('.s-in').textContent,
    };
  });
  const conns = [];
  for (const pc of (window.__browserCallPcs || [])) {
    if (pc.connectionState === 'closed') continue;
    const r = await pc.getStats();
    let pair = null;
    r.forEach((s) => {
      if (!pair && s.type === 'transport' && s.selectedCandidatePairId) {
        pair = r.get(s.selectedCandidatePairId) || null;
      }
    });
    const cand = (id) => {
      const c = id ? r.get(id) : null;
      return c ? { type: c.candidateType, address: c.address, port: c.port,
        protocol: c.protocol, relayProtocol: c.relayProtocol || null, url: c.url || null } : null;
    };
    const videoIn = [];
    r.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') {
        videoIn.push({ bytesReceived: s.bytesReceived || 0, framesDecoded: s.framesDecoded || 0,
          frameWidth: s.frameWidth || 0, frameHeight: s.frameHeight || 0 });
      }
    });
    conns.push({
      connectionState: pc.connectionState, iceConnectionState: pc.iceConnectionState,
      iceTransportPolicy: pc.getConfiguration().iceTransportPolicy,
      pair: pair ? { state: pair.state, local: cand(pair.localCandidateId),
        remote: cand(pair.remoteCandidateId) } : null,
      videoIn,
    });
  }
  return { loaded: true, id: t.id(), room: t.room(), name: t.name(), phase: t.phase(),
    relayOnly: t.relayOnly(), media: t.media(), peers: t.peers(), errors: t.errors(),
    pageStats: t.stats(), videos, conns };
})()"#;

// ------------------------------------------------------------------- test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pages_see_each_others_video_through_the_relay() {
    let Some(binary) = chromium::find() else {
        let why = format!(
            "no Chromium found (looked for ${} and chromium, chromium-browser, \
             google-chrome-stable, google-chrome on PATH); install it with \
             `apt-get install chromium`",
            chromium::BINARY_ENV
        );
        if std::env::var_os("CI").is_some() {
            panic!("browser_call: {why} (CI is set, so this is a failure, not a skip)");
        }
        // Straight to the process's stderr: the test harness would swallow
        // eprintln! of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** browser_call SKIPPED: {why} (set CI to make this a failure) ***\n"
        );
        return;
    };
    let started = Instant::now();

    // Relay address 127.0.0.1; the pages' relays are each other's peers.
    let daemon = common::Daemon::with(common::Options {
        allow_loopback_peers: true,
        ..common::Options::default()
    });
    let signaling = Signaling::start(daemon.addr);
    let browser = Chromium::launch(&binary).unwrap_or_else(|e| panic!("browser_call: {e}"));
    let mut call = Call {
        pages: Vec::new(),
        base: format!("http://{}", signaling.addr),
    };

    let outcome = match tokio::time::timeout(TEST_TIMEOUT, call.run(&browser, &daemon)).await {
        Ok(r) => r,
        Err(_) => Err(format!("the test did not finish within {TEST_TIMEOUT:?}")),
    };
    if let Err(why) = outcome {
        let shot = call.screenshot().await;
        let report = call.diagnostics(&browser, &signaling).await;
        // Dropping `daemon` while panicking prints turnpike's log.
        panic!("browser_call: {why}\n(screenshot: {shot})\n{report}");
    }
    eprintln!(
        "browser_call: passed in {:.1} s; screenshot in {}",
        started.elapsed().as_secs_f64(),
        screenshot_path().display()
    );
    // Pages and the DevTools connection go first, then the browser, the
    // signaling server and turnpike (drop order of the locals, reversed).
    drop(call);
}

struct Call {
    pages: Vec<Page>,
    base: String,
}

impl Call {
    async fn run(&mut self, browser: &Chromium, daemon: &common::Daemon) -> Result<(), String> {
        let cdp = Cdp::connect(&browser.ws_url).await?;
        for name in NAMES {
            let page = cdp.new_page(name).await?;
            page.add_init_script(PC_HOOK).await?;
            self.pages.push(page);
        }

        // One after the other: the second is the newcomer and makes the offer.
        let mut ids = Vec::new();
        for (page, name) in self.pages.iter().zip(NAMES) {
            let url = format!("{}/r/{ROOM}?autostart=1&relay=1&name={name}", self.base);
            page.navigate(&url).await?;
            ids.push(wait_joined(page).await?);
        }

        // Wait until both pages see the other's video through a relay pair.
        let deadline = Instant::now() + MEDIA_TIMEOUT;
        let first = loop {
            let probes = self.probe_all().await?;
            let mut missing = Vec::new();
            for (i, probe) in probes.iter().enumerate() {
                let label = &self.pages[i].label;
                let other = &ids[1 - i];
                hard_failures(label, probe)?;
                missing.extend(
                    not_yet(probe, other)
                        .into_iter()
                        .map(|m| format!("{label}: {m}")),
                );
            }
            if missing.is_empty() {
                break probes;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no two-way relayed video within {MEDIA_TIMEOUT:?} of both joining; \
                     still missing:\n  {}",
                    missing.join("\n  ")
                ));
            }
            tokio::time::sleep(POLL).await;
        };
        tokio::time::sleep(SAMPLE_GAP).await;
        let second = self.probe_all().await?;

        for i in 0..2 {
            let (label, other) = (&self.pages[i].label, &self.pages[1 - i].label);
            let (a, b) = (&first[i], &second[i]);
            hard_failures(label, b)?;
            let (before, after) = (video_bytes(a), video_bytes(b));
            if after <= before {
                return Err(format!(
                    "{label}: inbound video bytesReceived did not grow over {SAMPLE_GAP:?} \
                     ({before} then {after}): {other}'s video stopped arriving"
                ));
            }
            let videos = b["videos"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            if videos.len() != 1 || videos[0]["width"].as_u64().unwrap_or(0) == 0 {
                return Err(format!(
                    "{label}: expected one remote video showing frames, got {videos:?}"
                ));
            }
            eprintln!(
                "browser_call: {label} receives {other}'s video {}x{}, {} frames decoded, \
                 {before} -> {after} bytes in {SAMPLE_GAP:?}, pair {}",
                videos[0]["width"],
                videos[0]["height"],
                b["conns"][0]["videoIn"][0]["framesDecoded"],
                pair_summary(b),
            );
        }

        // The two relays cross: my local candidate is your remote one.
        let local = |p: &Value| candidate_addr(&p["conns"][0]["pair"]["local"]);
        let remote = |p: &Value| candidate_addr(&p["conns"][0]["pair"]["remote"]);
        let (a, b) = (&second[0], &second[1]);
        if local(a) != remote(b) || local(b) != remote(a) {
            return Err(format!(
                "the selected pairs do not match up: {} has {} -> {}, {} has {} -> {}",
                NAMES[0],
                local(a),
                remote(a),
                NAMES[1],
                local(b),
                remote(b)
            ));
        }

        // Both relays are turnpike allocations, for the users the pages joined as.
        let created = daemon.events("allocation created");
        for (probe, name) in second.iter().zip(NAMES) {
            let relay = local(probe);
            let found = created.iter().any(|e| {
                common::field(e, "relay").split(',').any(|r| r == relay)
                    && common::field(e, "user").ends_with(&format!(":{name}"))
            });
            if !found {
                return Err(format!(
                    "{name}'s relay candidate {relay} is not among turnpike's \
                     \"allocation created\" lines: {created:?}"
                ));
            }
        }

        for page in &self.pages {
            let errors = page.eval("turnpikeTest.errors()").await?;
            if errors.as_array().is_none_or(|e| !e.is_empty()) {
                return Err(format!("{}: turnpikeTest.errors() = {errors}", page.label));
            }
            let exceptions = page.exceptions();
            if !exceptions.is_empty() {
                return Err(format!(
                    "{}: uncaught exceptions on the page:\n  {}",
                    page.label,
                    exceptions.join("\n  ")
                ));
            }
        }

        let shot = self.screenshot().await;
        if !shot.starts_with('/') {
            return Err(format!("screenshot: {shot}"));
        }
        Ok(())
    }

    async fn probe_all(&self) -> Result<Vec<Value>, String> {
        let mut out = Vec::new();
        for page in &self.pages {
            out.push(page.eval(PROBE).await?);
        }
        Ok(out)
    }

    /// Saves the second page (the newcomer) to `target/browser-call.png`;
    /// returns the path, or why not.
    async fn screenshot(&self) -> String {
        let Some(page) = self.pages.last() else {
            return "none (no page open)".into();
        };
        let path = screenshot_path();
        match tokio::time::timeout(Duration::from_secs(10), page.screenshot_png()).await {
            Ok(Ok(png)) => match std::fs::write(&path, png) {
                Ok(()) => path.display().to_string(),
                Err(e) => format!("cannot write {}: {e}", path.display()),
            },
            Ok(Err(e)) => format!("none ({e})"),
            Err(_) => "none (timed out)".into(),
        }
    }

    /// Everything a failure report needs from the pages and the servers.
    async fn diagnostics(&self, browser: &Chromium, signaling: &Signaling) -> String {
        let mut out = String::new();
        for page in &self.pages {
            let _ = writeln!(out, "==== page {} ====", page.label);
            for (what, expr) in [("state", PROBE), ("log", "turnpikeTest.log().join('\\n')")] {
                let v = page.eval_within(expr, Duration::from_secs(3)).await;
                let text = match v {
                    Ok(Value::String(s)) => s,
                    Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
                    Err(e) => format!("unavailable: {e}"),
                };
                let _ = writeln!(out, "---- {what} ----\n{text}");
            }
            let _ = writeln!(out, "---- console ----\n{}", page.console().join("\n"));
        }
        let _ = writeln!(
            out,
            "==== chromium stderr (last 40 lines, D-Bus and ALSA noise left out) ====\n{}",
            browser.stderr_tail(40)
        );
        let _ = writeln!(
            out,
            "==== signaling stderr ====\n{}",
            signaling.stderr.lock().unwrap()
        );
        out
    }
}

/// Waits until the page says it joined; returns its member id.
async fn wait_joined(page: &Page) -> Result<String, String> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        // Errors while the page is still loading (no context yet) are normal.
        let last = match page
            .eval("window.turnpikeTest ? [turnpikeTest.phase(), turnpikeTest.id()] : null")
            .await
        {
            Ok(v) if v[0] == "joined" && v[1].is_string() => {
                return Ok(v[1].as_str().unwrap().to_owned())
            }
            Ok(v) if v[0] == "error" => {
                return Err(format!("{}: joining failed (phase \"error\")", page.label))
            }
            Ok(v) => format!("phase/id {v}"),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(format!(
                "{}: not joined within {JOIN_TIMEOUT:?} of navigating; last: {last}",
                page.label
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What rules the call out at once, rather than "not yet".
fn hard_failures(label: &str, p: &Value) -> Result<(), String> {
    if let Some(errors) = p["errors"].as_array() {
        if !errors.is_empty() {
            return Err(format!("{label}: the page reports errors: {errors:?}"));
        }
    }
    if p["loaded"] == true && p["room"] != ROOM {
        return Err(format!("{label}: in room {} instead of {ROOM}", p["room"]));
    }
    for c in p["conns"].as_array().map(Vec::as_slice).unwrap_or_default() {
        if c["iceTransportPolicy"] != "relay" {
            return Err(format!(
                "{label}: a connection with iceTransportPolicy {} (relay=1 ignored)",
                c["iceTransportPolicy"]
            ));
        }
        let pair = &c["pair"];
        for end in ["local", "remote"] {
            let t = &pair[end]["type"];
            if !t.is_null() && t != "relay" {
                return Err(format!(
                    "{label}: selected candidate pair has a {end} candidate of type {t}, \
                     not relay: {}",
                    pair_summary(p)
                ));
            }
        }
    }
    Ok(())
}

/// What the page still lacks for "I see the other one's video through the
/// relay"; empty when everything is there.
fn not_yet(p: &Value, other_id: &str) -> Vec<String> {
    let mut missing = Vec::new();
    if p["loaded"] != true {
        return vec![format!("page not loaded ({p})")];
    }
    if p["phase"] != "joined" {
        missing.push(format!("phase is {}", p["phase"]));
    }
    let peers = p["peers"].as_array().map(Vec::as_slice).unwrap_or_default();
    match peers {
        [peer] if peer["id"] == other_id => {
            if peer["connectionState"] != "connected" {
                missing.push(format!(
                    "connection to the other page is {} (ICE {})",
                    peer["connectionState"], peer["iceConnectionState"]
                ));
            }
        }
        _ => missing.push(format!(
            "expected exactly the other page ({other_id}) as peer, have {peers:?}"
        )),
    }
    let conns = p["conns"].as_array().map(Vec::as_slice).unwrap_or_default();
    match conns {
        [c] => {
            if c["pair"]["local"]["type"] != "relay" || c["pair"]["remote"]["type"] != "relay" {
                missing.push(format!("selected pair is {}", pair_summary(p)));
            }
            if video_bytes(p) == 0 {
                missing.push(format!("no inbound video bytes ({})", c["videoIn"]));
            }
        }
        _ => missing.push(format!(
            "{} open RTCPeerConnections, expected 1",
            conns.len()
        )),
    }
    let videos = p["videos"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    match videos {
        [v] => {
            if v["width"].as_u64().unwrap_or(0) == 0 {
                missing.push(format!(
                    "remote <video> has no frame yet (videoWidth 0, readyState {})",
                    v["readyState"]
                ));
            }
            // What the user reads in the tile's stats panel.
            if !v["path"]
                .as_str()
                .unwrap_or_default()
                .starts_with("relay ↔ relay")
            {
                missing.push(format!("stats panel path reads {}", v["path"]));
            }
        }
        _ => missing.push(format!("{} remote video tiles, expected 1", videos.len())),
    }
    missing
}

fn video_bytes(p: &Value) -> u64 {
    p["conns"][0]["videoIn"]
        .as_array()
        .map(|v| v.iter().filter_map(|s| s["bytesReceived"].as_u64()).sum())
        .unwrap_or(0)
}

fn candidate_addr(c: &Value) -> String {
    format!("{}:{}", c["address"].as_str().unwrap_or("?"), c["port"])
}

fn pair_summary(p: &Value) -> String {
    let pair = &p["conns"][0]["pair"];
    if pair.is_null() {
        return "none selected".into();
    }
    let end = |c: &Value| {
        format!(
            "{} {}",
            c["type"].as_str().unwrap_or("?"),
            candidate_addr(c)
        )
    };
    format!("{} -> {}", end(&pair["local"]), end(&pair["remote"]))
}

/// `target/browser-call.png`, next to the profile directories cargo builds
/// into (`target/<profile>/turnpike`).
fn screenshot_path() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_turnpike"));
    let target = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")));
    target.join("browser-call.png")
}

// -------------------------------------------------------- signaling server

/// The signaling example on 127.0.0.1:0, minting credentials with the
/// daemon's REST secret and pointing pages at the daemon's UDP port.
struct Signaling {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    dir: PathBuf,
}

impl Signaling {
    fn start(turn: SocketAddr) -> Signaling {
        let dir =
            std::env::temp_dir().join(format!("turnpike-browser-call-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        std::fs::write(dir.join("rest-secret"), format!("{}\n", common::SECRET))
            .expect("write secret");
        let config = dir.join("turnpike.toml");
        // Only the secret matters here: --turn-url gives the daemon's port.
        let mut c = turnpike::config::Config::default();
        c.auth.secret_file = Some("rest-secret".into());
        std::fs::write(&config, common::config_toml(&c)).expect("write config");

        let mut child = Command::new(common::example_binary())
            .arg("--config")
            .arg(&config)
            .args(["--listen", "127.0.0.1:0"])
            .arg(format!("--turn-url=turn:{turn}?transport=udp"))
            .args(["--room-size", "2"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the signaling example");

        let stderr = common::collect_stderr(&mut child);
        let listen = common::signaling_listen_addr(&mut child, Duration::from_secs(15));
        let mut server = Signaling {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            stderr,
            dir,
        };
        match listen {
            Some(addr) => server.addr = addr.parse().expect("signaling listen address"),
            None => panic!(
                "the signaling example printed no address within 15 s; stderr:\n{}",
                server.stderr.lock().unwrap()
            ),
        }
        server
    }
}

impl Drop for Signaling {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

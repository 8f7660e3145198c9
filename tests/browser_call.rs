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
//! The second test is the firewall case: two Chromiums, each in a network
//! namespace behind a NAT that drops all UDP and lets out only TCP to the
//! server's port 443, call over `turns:` (then `turn:?transport=tcp`) to
//! that port only; Chromium trusts the test CA through an NSS database (see
//! `browsers_behind_udp_blocking_firewalls_call_over_443_tls_and_tcp`). It
//! needs root, `ip`, `nft` and `certutil` too.
//!
//! Needs Chromium (Debian: `apt-get install chromium`; or set
//! `TURNPIKE_CHROMIUM=/path/to/chrome`). Without it the test fails when `CI`
//! is set and is skipped, loudly, otherwise. Like `signaling_example`, it
//! needs the example built: a plain `cargo test` builds it,
//! `cargo test --test browser_call` alone does not (`cargo build --example
//! signaling` first).

mod browser;
mod common;
#[path = "nat/netns.rs"]
#[macro_use]
mod netns;
#[path = "nat/firewall_server.rs"]
mod firewall_server;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use browser::cdp::{Cdp, Page};
use browser::chromium::{self, Chromium, Launch};
use firewall_server::{Server, TLS_PORT};
use netns::{NatKind, SetupError, Topology, CLA_IP, CLB_IP, NATA_PUBLIC, NATB_PUBLIC, SERVER_IP};

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
    let _gate = ONE_AT_A_TIME.lock().await;
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

// ------------------------------------------- the firewall case, over TURN/TLS

/// Page side of the firewall call: one RTCPeerConnection with the given
/// configuration, a canvas video track (no camera: about:blank is no secure
/// context), and for the caller a DataChannel "echo" (the callee echoes).
/// Everything the test reads later lands in `window.__fw`.
const FW_SETUP: &str = r#"((config, role) => {
  const t0 = performance.now();
  const ms = () => Math.round(performance.now() - t0);
  const fw = { role, ms, states: [], errors: [], candidates: [], echoes: [], echoed: 0 };
  window.__fw = fw;
  const pc = new RTCPeerConnection(config);
  fw.pc = pc;
  pc.onicecandidate = (e) => {
    if (e.candidate) fw.candidates.push(e.candidate.candidate + ' @' + ms() + 'ms');
  };
  pc.onicecandidateerror = (e) =>
    fw.errors.push({ url: e.url, code: e.errorCode, text: e.errorText, at: ms() });
  pc.onconnectionstatechange = () => {
    fw.states.push(pc.connectionState + '@' + ms() + 'ms');
    if (pc.connectionState === 'connected' && fw.connectedMs === undefined) fw.connectedMs = ms();
  };
  fw.gathered = (within) => new Promise((resolve) => {
    if (pc.iceGatheringState === 'complete') return resolve(true);
    const timer = setTimeout(() => resolve(false), within);
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') { clearTimeout(timer); resolve(true); }
    });
  });
  const canvas = document.createElement('canvas');
  canvas.width = 320; canvas.height = 240;
  document.body.appendChild(canvas);
  const g = canvas.getContext('2d');
  let n = 0;
  setInterval(() => {
    n++;
    g.fillStyle = `hsl(${(n * 7) % 360} 80% 50%)`;
    g.fillRect(0, 0, 320, 240);
    g.fillStyle = '#000';
    g.font = '40px sans-serif';
    g.fillText(role + ' ' + n, 10, 130);
  }, 33);
  const stream = canvas.captureStream(30);
  for (const t of stream.getTracks()) pc.addTrack(t, stream);
  pc.ontrack = (e) => {
    const v = document.createElement('video');
    v.muted = true; v.autoplay = true; v.playsInline = true;
    v.srcObject = e.streams[0] || new MediaStream([e.track]);
    document.body.appendChild(v);
    fw.video = v;
  };
  if (role === 'caller') {
    fw.dc = pc.createDataChannel('echo');
    fw.dc.onopen = () => { fw.dcOpenMs = ms(); };
    fw.dc.onmessage = (e) => fw.echoes.push(e.data);
  } else {
    pc.ondatachannel = (e) => {
      fw.dcOpenMs = ms();
      const dc = e.channel;
      dc.onmessage = (m) => { fw.echoed++; dc.send(m.data); };
    };
  }
  return true;
})"#;

/// Caller: offer, all candidates gathered (no trickle: the test carries the
/// SDP from one browser to the other).
const FW_OFFER: &str = r#"(async () => {
  const fw = window.__fw;
  fw.negotiationMs = fw.ms();
  await fw.pc.setLocalDescription();
  fw.gatherComplete = await fw.gathered(15000);
  fw.gatheredMs = fw.ms();
  return fw.pc.localDescription.sdp;
})()"#;

/// Callee: takes the offer (`%SDP%`), answers once gathering is done.
const FW_ANSWER: &str = r#"(async () => {
  const fw = window.__fw;
  fw.negotiationMs = fw.ms();
  await fw.pc.setRemoteDescription({ type: 'offer', sdp: %SDP% });
  await fw.pc.setLocalDescription();
  fw.gatherComplete = await fw.gathered(15000);
  fw.gatheredMs = fw.ms();
  return fw.pc.localDescription.sdp;
})()"#;

const FW_TAKE_ANSWER: &str = r#"(async () => {
  await window.__fw.pc.setRemoteDescription({ type: 'answer', sdp: %SDP% });
  return true;
})()"#;

/// Caller: 20 messages on the DataChannel, then waits for their echoes.
const FW_ECHO: &str = r#"(async () => {
  const fw = window.__fw;
  const t = performance.now();
  for (let i = 0; i < 20; i++) fw.dc.send('echo-' + i);
  while (fw.echoes.length < 20 && performance.now() - t < 8000) {
    await new Promise((r) => setTimeout(r, 20));
  }
  return { echoes: fw.echoes, ms: Math.round(performance.now() - t) };
})()"#;

/// One look at a firewall page: states, errors, candidates, the selected
/// pair (with the local relay candidate's `relayProtocol` and TURN `url`)
/// and inbound video.
const FW_PROBE: &str = r#"(async () => {
  const fw = window.__fw;
  if (!fw) return { loaded: false };
  const pc = fw.pc;
  const r = await pc.getStats();
  let pair = null;
  r.forEach((s) => {
    if (!pair && s.type === 'transport' && s.selectedCandidatePairId) {
      pair = r.get(s.selectedCandidatePairId) || null;
    }
  });
  const cand = (id) => {
    const c = id ? r.get(id) : null;
    return c ? { type: c.candidateType, address: c.address, port: c.port, protocol: c.protocol,
      relayProtocol: c.relayProtocol || null, url: c.url || null } : null;
  };
  const video = { bytesReceived: 0, framesDecoded: 0, frameWidth: 0 };
  r.forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'video') {
      video.bytesReceived += s.bytesReceived || 0;
      video.framesDecoded += s.framesDecoded || 0;
      video.frameWidth = s.frameWidth || video.frameWidth;
    }
  });
  return { loaded: true, connectionState: pc.connectionState,
    iceConnectionState: pc.iceConnectionState,
    iceTransportPolicy: pc.getConfiguration().iceTransportPolicy,
    states: fw.states, errors: fw.errors, candidates: fw.candidates,
    gatherComplete: fw.gatherComplete, negotiationMs: fw.negotiationMs,
    gatheredMs: fw.gatheredMs, connectedMs: fw.connectedMs,
    dcOpenMs: fw.dcOpenMs, echoed: fw.echoed,
    pair: pair ? { state: pair.state, local: cand(pair.localCandidateId),
      remote: cand(pair.remoteCandidateId) } : null,
    video, videoWidth: fw.video ? fw.video.videoWidth : 0 };
})()"#;

/// From both descriptions set to connected, DataChannel open and video
/// decoded on both sides.
const FW_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// The whole firewall test, as a last resort against a wedged browser.
const FW_TEST_TIMEOUT: Duration = Duration::from_secs(75);

/// The browser tests one at a time: each runs Chromium (this one two of
/// them), and the machine may have two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The firewall case in the browser: two headless Chromiums, one in each
/// client namespace of the network in `tests/nat/netns.rs` with
/// `NatKind::UdpBlocked` (every UDP datagram dropped at both NATs, both ways;
/// out only TCP to 203.0.113.10:443), call each other with
/// `iceServers: [{urls: "turns:203.0.113.10:443?transport=tcp"}]` only and
/// `iceTransportPolicy: "relay"`; then, in new pages of the same browsers,
/// with only `turn:203.0.113.10:443?transport=tcp` (plain TCP on the TLS
/// port). No `stun:` URL (behind such a firewall it only delays gathering)
/// and no signaling server: the test carries offer and answer between the
/// pages over DevTools.
///
/// Chromium trusts the run's test CA (rcgen, `tests/common`) through an NSS
/// database in a `HOME` of its own (`certutil -N` then `certutil -A -t C,,`,
/// from libnss3-tools), the way a user's system would, and checks the
/// certificate's IP SAN against the URL; certificate errors are NOT ignored.
/// A third Chromium with an empty NSS database is the control: its `turns:`
/// gathering fails (icecandidateerror 701, no relay candidate).
///
/// Asserted, for each call: both connect; each selected pair is relay/relay
/// with the local candidate's `relayProtocol` "tls" (resp. "tcp") and url
/// the one given, the relays crossing; video frames are decoded on both
/// sides and bytes grow; 20 DataChannel messages come back; turnpike logged
/// a `tls` (resp. `tcp`) allocation for each relay in use from that
/// browser's NAT, and `/metrics` showed two such allocations at once. For
/// the control, turnpike counted the failed TLS handshake (so Chromium did
/// reach the server and refused the certificate). Before the call, UDP datagrams from each client to
/// the server are seen dropped at its NAT (the full firewall proof is in
/// tests/firewall_call.rs, on the same kind of network); the UDP dropped
/// during the call is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_behind_udp_blocking_firewalls_call_over_443_tls_and_tcp() {
    const TEST: &str =
        "browser_call::browsers_behind_udp_blocking_firewalls_call_over_443_tls_and_tcp";
    let ci = std::env::var_os("CI").is_some();
    let skip = |why: &str| {
        if ci {
            panic!("{TEST}: {why} (CI is set, so this is a failure, not a skip)");
        }
        let _ = writeln!(
            std::io::stderr(),
            "\n*** {TEST} SKIPPED: {why} (set CI to make this a failure) ***\n"
        );
    };
    let Some(binary) = chromium::find() else {
        return skip("no Chromium found; install it with `apt-get install chromium`");
    };
    if netns::run(&["certutil", "-H"], None).is_err()
        && netns::run(&["sh", "-c", "command -v certutil"], None).is_err()
    {
        return skip("no certutil; install it with `apt-get install libnss3-tools`");
    }
    if let Err(why) = netns::preflight() {
        return skip(&why);
    }
    let _gate = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    netns::remove_stale();
    // Declared first: dropped last, after the browsers and turnpike in it.
    let topo = match Topology::create_with("br", NatKind::UdpBlocked { tcp_port: TLS_PORT }) {
        Ok(t) => t,
        Err(SetupError::Unavailable(why)) => {
            return skip(&format!("cannot build the namespace network: {why}"))
        }
        Err(SetupError::Failed(e)) => panic!("building the namespace network failed: {e}"),
    };
    let server = Server::start(&topo, "browser");
    let homes = common::TempDir::new("browser-firewall-homes");
    let mut fw = FirewallCall {
        topo: &topo,
        server: &server,
        binary: &binary,
        homes: homes.path(),
        pages: Vec::new(),
        cdps: Vec::new(),
        browsers: Vec::new(),
    };
    let outcome = match tokio::time::timeout(FW_TEST_TIMEOUT, fw.run()).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the test did not finish within {FW_TEST_TIMEOUT:?}"
        )),
    };
    if let Err(why) = outcome {
        let report = fw.diagnostics().await;
        panic!(
            "{TEST}: {why}\n{report}\n==== turnpike ====\n{}",
            server.log()
        );
    }
    say!(
        "browser_call firewall: passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(fw);
    drop(server);
    drop(topo);
}

struct FirewallCall<'a> {
    topo: &'a Topology,
    server: &'a Server,
    binary: &'a Path,
    homes: &'a Path,
    /// The pages of the call under way: caller (in cla), callee (in clb);
    /// or the control's page.
    pages: Vec<Page>,
    /// DevTools connections, one per browser, same order.
    cdps: Vec<Arc<Cdp>>,
    browsers: Vec<Chromium>,
}

impl FirewallCall<'_> {
    /// The only ICE server URL of a call whose TURN connections are over
    /// `transport` ("tls" or "tcp", as turnpike and `relayProtocol` say).
    fn url(transport: &str) -> String {
        match transport {
            "tls" => format!("turns:{SERVER_IP}:{TLS_PORT}?transport=tcp"),
            _ => format!("turn:{SERVER_IP}:{TLS_PORT}?transport=tcp"),
        }
    }

    /// A `HOME` with an NSS database, holding the test CA when `trust`.
    fn home(&self, name: &str, trust: bool) -> Result<PathBuf, String> {
        let home = self.homes.join(name);
        let db = home.join(".pki/nssdb");
        std::fs::create_dir_all(&db).map_err(|e| format!("create {}: {e}", db.display()))?;
        let db_arg = format!("sql:{}", db.display());
        netns::run(&["certutil", "-N", "-d", &db_arg, "--empty-password"], None)?;
        if trust {
            let ca = self.server.cert.ca.to_str().expect("utf-8 path");
            netns::run(
                &[
                    "certutil",
                    "-A",
                    "-d",
                    &db_arg,
                    "-t",
                    "C,,",
                    "-n",
                    "turnpike test CA",
                    "-i",
                    ca,
                ],
                None,
            )?;
        }
        let listed = netns::run(&["certutil", "-L", "-d", &db_arg], None)?;
        if trust != listed.contains("turnpike test CA") {
            return Err(format!("NSS database {db_arg} lists:\n{listed}"));
        }
        Ok(home)
    }

    /// Chromium in client namespace `client`, trusting the CA or not;
    /// returns its index in `cdps`.
    async fn launch(&mut self, client: &str, name: &str, trust: bool) -> Result<usize, String> {
        let home = self.home(&format!("{client}-{name}"), trust)?;
        let ns = self.topo.ns(client);
        let browser = Chromium::launch_with(
            self.binary,
            &Launch {
                netns: Some(&ns),
                home: Some(&home),
                // No name lookups at all inside the test network.
                args: vec![format!(
                    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {SERVER_IP}"
                )],
            },
        )?;
        // The DevTools endpoint is on the namespace's loopback: connect there.
        let ws_url = browser.ws_url.clone();
        let addr: SocketAddr = ws_url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("DevTools URL {ws_url}"))?;
        self.browsers.push(browser);
        let who = client.to_owned();
        let tcp = firewall_server::in_ns(&ns, "devtools", move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| format!("connect to DevTools at {addr} in {who}: {e}"))
        })?;
        self.cdps.push(Cdp::connect_over(&ws_url, tcp).await?);
        Ok(self.cdps.len() - 1)
    }

    /// A new page in browser `browser`, set up as `role` with `url` as its
    /// only ICE server.
    async fn page(
        &mut self,
        browser: usize,
        label: &str,
        role: &str,
        url: &str,
    ) -> Result<(), String> {
        let page = self.cdps[browser].new_page(label).await?;
        let (user, credential) = self.server.credential(&format!("browser-{role}"));
        let config = serde_json::json!({
            "iceServers": [{ "urls": [url], "username": user, "credential": credential }],
            "iceTransportPolicy": "relay",
        });
        page.eval(&format!("{FW_SETUP}({config}, {})", Value::from(role)))
            .await?;
        self.pages.push(page);
        Ok(())
    }

    async fn probe(&self, i: usize) -> Result<Value, String> {
        self.pages[i].eval(FW_PROBE).await
    }

    async fn run(&mut self) -> Result<(), String> {
        let t = Instant::now();
        // The clients' UDP dies at their NATs (tests/firewall_call.rs proves the
        // firewall in full; this shows it is in force on this network too).
        for (client, local_ip) in [("cla", CLA_IP), ("clb", CLB_IP)] {
            let before = self.udp_dropped()?;
            firewall_server::in_ns(&self.topo.ns(client), "udp-probe", move || {
                let sock = std::net::UdpSocket::bind((local_ip, 0))
                    .map_err(|e| format!("bind {local_ip}: {e}"))?;
                for i in 0..3u8 {
                    sock.send_to(&[i; 20], (SERVER_IP, firewall_server::BLOCKED_PORT))
                        .map_err(|e| format!("send: {e}"))?;
                }
                Ok(())
            })?;
            let after = self.udp_dropped()?;
            let dropped = if client == "cla" {
                after.0 - before.0
            } else {
                after.1 - before.1
            };
            if dropped < 3 {
                return Err(format!(
                    "{client}: 3 UDP datagrams to the server, {dropped} dropped at its NAT"
                ));
            }
        }
        self.launch("cla", "caller", true).await?;
        self.launch("clb", "callee", true).await?;
        say!(
            "browser_call firewall: two Chromiums up (cla, clb) after {:?}",
            t.elapsed()
        );
        for transport in ["tls", "tcp"] {
            self.close_pages().await;
            let url = FirewallCall::url(transport);
            self.page(0, &format!("caller in cla ({transport})"), "caller", &url)
                .await?;
            self.page(1, &format!("callee in clb ({transport})"), "callee", &url)
                .await?;
            self.call(transport).await?;
        }
        self.control().await
    }

    /// The call between the two pages open, whose TURN connections must be
    /// over `transport`.
    async fn call(&mut self, transport: &str) -> Result<(), String> {
        let udp_before = self.udp_dropped()?;
        // Offer and answer, carried by the test.
        let t_call = Instant::now();
        let offer = self.pages[0]
            .eval_within(FW_OFFER, Duration::from_secs(20))
            .await?;
        let offer = offer
            .as_str()
            .ok_or("the offer is not a string")?
            .to_owned();
        let answer = self.pages[1]
            .eval_within(
                &FW_ANSWER.replace("%SDP%", &Value::from(offer.clone()).to_string()),
                Duration::from_secs(20),
            )
            .await?;
        let answer = answer
            .as_str()
            .ok_or("the answer is not a string")?
            .to_owned();
        self.pages[0]
            .eval(&FW_TAKE_ANSWER.replace("%SDP%", &Value::from(answer.clone()).to_string()))
            .await?;
        for (what, sdp) in [("offer", &offer), ("answer", &answer)] {
            let cands: Vec<&str> = sdp
                .lines()
                .filter(|l| l.starts_with("a=candidate:"))
                .collect();
            if cands.is_empty() || !cands.iter().all(|c| c.contains(" typ relay")) {
                return Err(format!(
                    "the {what}'s candidates are not all relay (or none): {cands:?}"
                ));
            }
        }

        // Until both are connected with video decoded and the DataChannel open.
        let series = format!("turnpike_allocations{{transport=\"{transport}\"}}");
        let mut max_allocs = 0f64;
        let deadline = Instant::now() + FW_CONNECT_TIMEOUT;
        let (first, connected_after) = loop {
            if let Ok(m) = firewall_server::metrics(self.topo) {
                max_allocs = max_allocs.max(m.get(&series).copied().unwrap_or(0.0));
            }
            let probes = [self.probe(0).await?, self.probe(1).await?];
            let mut missing = Vec::new();
            for (p, page) in probes.iter().zip(&self.pages) {
                let label = &page.label;
                if p["iceTransportPolicy"] != "relay" {
                    return Err(format!(
                        "{label}: iceTransportPolicy {}",
                        p["iceTransportPolicy"]
                    ));
                }
                if p["connectionState"] == "failed" {
                    return Err(format!("{label}: the connection failed: {p:#}"));
                }
                if p["connectionState"] != "connected" {
                    missing.push(format!("{label}: connection {}", p["connectionState"]));
                }
                if p["dcOpenMs"].is_null() {
                    missing.push(format!("{label}: DataChannel not open"));
                }
                if p["video"]["framesDecoded"].as_u64().unwrap_or(0) == 0 {
                    missing.push(format!("{label}: no video frame decoded"));
                }
            }
            if missing.is_empty() {
                break (probes, t_call.elapsed());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not connected within {FW_CONNECT_TIMEOUT:?}: {}\ncaller: {:#}\ncallee: {:#}",
                    missing.join("; "),
                    probes[0],
                    probes[1]
                ));
            }
            tokio::time::sleep(POLL).await;
        };

        let echo = self.pages[0]
            .eval_within(FW_ECHO, Duration::from_secs(12))
            .await?;
        let echoes: Vec<&str> = echo["echoes"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let want: Vec<String> = (0..20).map(|i| format!("echo-{i}")).collect();
        if echoes != want {
            return Err(format!("DataChannel echoes: {echoes:?}"));
        }
        tokio::time::sleep(SAMPLE_GAP).await;
        let second = [self.probe(0).await?, self.probe(1).await?];
        if let Ok(m) = firewall_server::metrics(self.topo) {
            max_allocs = max_allocs.max(m.get(&series).copied().unwrap_or(0.0));
        }

        let url = FirewallCall::url(transport);
        for i in 0..2 {
            let (a, b) = (&first[i], &second[i]);
            let label = &self.pages[i].label;
            let pair = &b["pair"];
            for end in ["local", "remote"] {
                if pair[end]["type"] != "relay" {
                    return Err(format!("{label}: selected pair {pair}: {end} is not relay"));
                }
            }
            if pair["local"]["relayProtocol"] != transport || pair["local"]["url"] != url.as_str() {
                return Err(format!(
                    "{label}: the local relay candidate came over {} from {}, not {transport} \
                     from {url}",
                    pair["local"]["relayProtocol"], pair["local"]["url"]
                ));
            }
            let (before, after) = (
                a["video"]["bytesReceived"].as_u64().unwrap_or(0),
                b["video"]["bytesReceived"].as_u64().unwrap_or(0),
            );
            if after <= before {
                return Err(format!(
                    "{label}: inbound video bytes did not grow ({before} then {after})"
                ));
            }
            if let Some(errors) = b["errors"].as_array().filter(|e| !e.is_empty()) {
                return Err(format!("{label}: icecandidateerror: {errors:?}"));
            }
        }
        let addr = |c: &Value| format!("{}:{}", c["address"].as_str().unwrap_or("?"), c["port"]);
        let (a, b) = (&second[0]["pair"], &second[1]["pair"]);
        if addr(&a["local"]) != addr(&b["remote"]) || addr(&b["local"]) != addr(&a["remote"]) {
            return Err(format!("the selected pairs do not cross: {a} / {b}"));
        }

        // turnpike's side: an allocation over `transport` for each relay in
        // use, from the browser's NAT.
        let created = self.server.events("allocation created");
        for (i, public_ip) in [(0, NATA_PUBLIC), (1, NATB_PUBLIC)] {
            let relay = addr(&second[i]["pair"]["local"]);
            let found = created.iter().any(|e| {
                firewall_server::str_field(e, "transport") == transport
                    && firewall_server::str_field(e, "client").starts_with(&format!("{public_ip}:"))
                    && firewall_server::str_field(e, "relay")
                        .split(',')
                        .any(|r| r == relay)
            });
            if !found {
                return Err(format!(
                    "no {transport} allocation from {public_ip} with relay {relay} in turnpike's log: \
                     {created:?}"
                ));
            }
        }
        if max_allocs < 2.0 {
            return Err(format!("{series} never reached 2 (max {max_allocs})"));
        }
        for e in created
            .iter()
            .filter(|e| firewall_server::str_field(e, "transport") == transport)
        {
            say!(
                "browser_call firewall: turnpike: allocation created user={} client={} \
                 transport={} relay={}",
                firewall_server::str_field(e, "user"),
                firewall_server::str_field(e, "client"),
                firewall_server::str_field(e, "transport"),
                firewall_server::str_field(e, "relay")
            );
        }
        let udp_after = self.udp_dropped()?;

        for (p, page) in second.iter().zip(&self.pages) {
            let since =
                |k: &str| p[k].as_i64().unwrap_or(-1) - p["negotiationMs"].as_i64().unwrap_or(0);
            say!(
                "browser_call firewall: {}: from its setLocal/RemoteDescription: gathered in \
                 {} ms (complete: {}), connected in {} ms; pair {} {} ({}) <-> {} {}; video \
                 {}px, {} frames decoded; candidates {}",
                page.label,
                since("gatheredMs"),
                p["gatherComplete"],
                since("connectedMs"),
                p["pair"]["local"]["type"],
                addr(&p["pair"]["local"]),
                p["pair"]["local"]["relayProtocol"],
                p["pair"]["remote"]["type"],
                addr(&p["pair"]["remote"]),
                p["video"]["frameWidth"],
                p["video"]["framesDecoded"],
                p["candidates"]
            );
        }
        say!(
            "browser_call firewall: {url} only: from the offer to both connected with video \
             {connected_after:?}; 20 DataChannel echoes in {} ms; turnpike held \
             {max_allocs} {transport} allocations at once; UDP dropped at nata/natb during \
             the call: {}/{}",
            echo["ms"],
            udp_after.0 - udp_before.0,
            udp_after.1 - udp_before.1,
        );
        Ok(())
    }

    /// The control: a browser whose NSS database lacks the CA gets no relay
    /// over `turns:`.
    async fn control(&mut self) -> Result<(), String> {
        self.close_pages().await;
        self.cdps.clear();
        self.browsers.clear();
        let tls_setup_failed = |m: &std::collections::BTreeMap<String, f64>| -> f64 {
            m.iter()
                .filter(|(k, _)| {
                    k.starts_with("turnpike_connection_setup_failures_total{")
                        && k.contains("transport=\"tls\"")
                })
                .map(|(_, v)| v)
                .sum()
        };
        let failed_before = tls_setup_failed(&firewall_server::metrics(self.topo)?);
        let browser = self.launch("cla", "untrusting", false).await?;
        let url = FirewallCall::url("tls");
        self.page(browser, "untrusting in cla", "caller", &url)
            .await?;
        let page = self.pages.last().unwrap();
        page.eval_within(FW_OFFER, Duration::from_secs(20)).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let control = loop {
            let p = page.eval(FW_PROBE).await?;
            let failed = p["errors"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["code"] == 701));
            if failed || Instant::now() > deadline {
                break p;
            }
            tokio::time::sleep(POLL).await;
        };
        let relays = control["candidates"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter(|c| c.to_string().contains(" typ relay"))
                    .count()
            })
            .unwrap_or(0);
        let errors = control["errors"].as_array().cloned().unwrap_or_default();
        if relays != 0 || !errors.iter().any(|e| e["code"] == 701) {
            return Err(format!(
                "control: without the CA in its NSS database Chromium still got {relays} relay \
                 candidates (errors {errors:?}): the certificate is not being checked"
            ));
        }
        // ... because it refused the certificate, not because it never got there.
        let mut failed_after = failed_before;
        let deadline = Instant::now() + Duration::from_secs(5);
        while failed_after <= failed_before && Instant::now() < deadline {
            failed_after = tls_setup_failed(&firewall_server::metrics(self.topo)?);
            tokio::time::sleep(POLL).await;
        }
        if failed_after <= failed_before {
            return Err(format!(
                "control: Chromium without the CA failed (701) but turnpike saw no failed TLS \
                 handshake (turnpike_connection_setup_failures_total{{transport=\"tls\"}} \
                 stayed {failed_before}): it did not even reach the server"
            ));
        }
        say!(
            "browser_call firewall: control without the CA: no relay candidate, \
             icecandidateerror {}; turnpike counted {} failed TLS handshake(s)",
            Value::from(errors),
            failed_after - failed_before
        );
        Ok(())
    }

    /// Ends the call under way: closes its connections and pages.
    async fn close_pages(&mut self) {
        for page in &self.pages {
            let _ = page
                .eval_within(
                    "window.__fw && window.__fw.pc.close()",
                    Duration::from_secs(3),
                )
                .await;
            let _ = page.close().await;
        }
        self.pages.clear();
    }

    /// Packets counted by the `udp_dropped` rule of nata and natb.
    fn udp_dropped(&self) -> Result<(u64, u64), String> {
        Ok((
            self.topo.nft_counter("nata", "udp_dropped")?,
            self.topo.nft_counter("natb", "udp_dropped")?,
        ))
    }

    async fn diagnostics(&self) -> String {
        let mut out = String::new();
        for page in &self.pages {
            let v = page.eval_within(FW_PROBE, Duration::from_secs(3)).await;
            let text = match v {
                Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
                Err(e) => format!("unavailable: {e}"),
            };
            let _ = writeln!(
                out,
                "==== page {} ====\n{text}\n---- console ----\n{}",
                page.label,
                page.console().join("\n")
            );
        }
        for (i, b) in self.browsers.iter().enumerate() {
            let _ = writeln!(
                out,
                "==== chromium {i} stderr (last 30 lines) ====\n{}",
                b.stderr_tail(30)
            );
        }
        out
    }
}

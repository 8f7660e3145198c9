//! Finding and launching a headless Chromium for the browser tests.
//!
//! The browser runs in its own process group with a fresh profile directory;
//! dropping [`Chromium`] ends the whole group (SIGTERM, then SIGKILL) and
//! deletes the profile.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Environment variable naming the browser binary, overriding the search.
pub const BINARY_ENV: &str = "TURNPIKE_CHROMIUM";

const NAMES: [&str; 4] = [
    "chromium",
    "chromium-browser",
    "google-chrome-stable",
    "google-chrome",
];
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(3);
const MAX_STDERR_LINES: usize = 2000;
/// stderr lines that say nothing about the test: no D-Bus and no sound card
/// in containers, and the Debian wrapper's shell warning.
const NOISE: [&str; 5] = [
    ":ERROR:dbus/",
    "ALSA lib ",
    "alsa_util.cc",
    "/usr/bin/chromium: ",
    "Fontconfig error",
];

/// `$TURNPIKE_CHROMIUM`, else the first of chromium, chromium-browser,
/// google-chrome-stable, google-chrome found executable on `PATH`.
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(BINARY_ENV) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    NAMES.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    })
}

fn is_executable(p: &Path) -> bool {
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where and how to start the browser, beyond the defaults of
/// [`Chromium::launch`].
#[derive(Default)]
pub struct Launch<'a> {
    /// Run it inside this network namespace (`ip netns exec NS`, which
    /// execs the browser in the same process): its DevTools endpoint is then
    /// on that namespace's loopback.
    pub netns: Option<&'a str>,
    /// `HOME` for the browser: where it finds its NSS certificate database
    /// (`$HOME/.pki/nssdb`).
    pub home: Option<&'a Path>,
    /// More command-line switches.
    pub args: Vec<String>,
}

/// A running headless browser. Dropping it ends the browser and every
/// process it started, and deletes its profile directory.
pub struct Chromium {
    child: Option<Child>,
    /// `ws://127.0.0.1:PORT/devtools/browser/...`
    pub ws_url: String,
    profile: PathBuf,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Chromium {
    /// Starts `binary` headless with fake camera and microphone, and waits
    /// for its `DevTools listening on ws://...` line.
    pub fn launch(binary: &Path) -> Result<Chromium, String> {
        Chromium::launch_with(binary, &Launch::default())
    }

    /// [`Chromium::launch`] with the extras of `how`.
    pub fn launch_with(binary: &Path, how: &Launch) -> Result<Chromium, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let profile = std::env::temp_dir().join(format!(
            "turnpike-chromium-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile)
            .map_err(|e| format!("cannot create {}: {e}", profile.display()))?;

        let mut command = match how.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        if let Some(home) = how.home {
            command.env("HOME", home);
        }
        let spawned = command
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                "--autoplay-policy=no-user-gesture-required",
                "--mute-audio",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(&how.args)
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: Drop ends the renderers and helpers too.
            .process_group(0)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&profile);
                return Err(format!("cannot start {}: {e}", binary.display()));
            }
        };

        // The reader owns stderr until EOF, so the browser never blocks on a
        // full pipe; it hands over the DevTools address when it sees it.
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        let pipe = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.trim().strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.to_owned());
                }
                let mut lines = sink.lock().unwrap();
                if lines.len() >= MAX_STDERR_LINES {
                    lines.remove(0);
                }
                lines.push(line);
            }
        });

        let mut browser = Chromium {
            child: Some(child),
            ws_url: String::new(),
            profile,
            stderr,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(url) => {
                    browser.ws_url = url;
                    return Ok(browser);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "{} closed stderr without printing its DevTools address; stderr:\n{}",
                        binary.display(),
                        browser.stderr_tail(40)
                    ));
                }
            }
            if let Some(status) = browser.exited() {
                return Err(format!(
                    "{} exited during start ({status}); stderr:\n{}",
                    binary.display(),
                    browser.stderr_tail(40)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} printed no DevTools address within {START_TIMEOUT:?}; stderr:\n{}",
                    binary.display(),
                    browser.stderr_tail(40)
                ));
            }
        }
    }

    /// The last `n` lines the browser wrote to stderr, leaving out the
    /// noise of a machine without D-Bus or sound card.
    pub fn stderr_tail(&self, n: usize) -> String {
        let lines = self.stderr.lock().unwrap();
        let useful: Vec<&str> = lines
            .iter()
            .map(String::as_str)
            .filter(|l| !NOISE.iter().any(|n| l.contains(n)))
            .collect();
        useful[useful.len().saturating_sub(n)..].join("\n")
    }

    /// The exit status if the browser has exited, without reaping it.
    fn exited(&self) -> Option<String> {
        let pid = self.child.as_ref()?.id() as libc::id_t;
        // SAFETY: waitid on our own child with WNOWAIT: it stays a zombie, so
        // its pid (and our process group id) cannot be reused meanwhile.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            if rc == 0 && info.si_pid() != 0 {
                Some(format!("status {}", info.si_status()))
            } else {
                None
            }
        }
    }

    fn signal_group(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on the process group we created for our child,
            // whose leader is not reaped yet, so the group id is still ours.
            unsafe { libc::kill(-(child.id() as libc::pid_t), signal) };
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        if self.child.is_some() {
            // The browser alone first, so it can shut down in order.
            if let Some(child) = &self.child {
                // SAFETY: kill(2) on our own child, not reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            }
            let deadline = Instant::now() + STOP_GRACE;
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Whatever is left of the group (helpers outliving the browser).
            self.signal_group(libc::SIGKILL);
            if let Some(mut child) = self.child.take() {
                let _ = child.wait();
            }
        }
        // Helpers may still be flushing into the profile for a moment.
        for _ in 0..10 {
            if std::fs::remove_dir_all(&self.profile).is_ok() || !self.profile.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

//! A throw-away test network made of network namespaces that only this run owns, and the means
//! to put processes and threads inside it.
//!
//! ```text
//!                 ns pub: "the internet", 203.0.113.0/24
//!        br0 203.0.113.10: turnpike :3478 :3479, signaling :8080
//!             pa /                                 \ pb
//!    wan 203.0.113.21  ns nata           ns natb  wan 203.0.113.22
//!    lan 192.0.2.1                                lan 198.51.100.1
//!               |    masquerade random,fully-random   |
//!               |    forward: lan->wan; wan->lan only |
//!               |    ct state established,related     |
//!    eth0 192.0.2.10   ns cla             ns clb  eth0 198.51.100.10
//! ```
//!
//! Rules this module keeps:
//! - Only documentation ranges, only inside namespaces named `tpnat<pid>-*`. Every interface
//!   is created directly inside a test namespace (`ip -n NS link add ... peer ... netns NS2`);
//!   the host's interfaces, routes and firewall are never touched, and every `nft` command
//!   runs inside a NAT namespace.
//! - Cleanup three ways: [`Topology`]'s `Drop` (normal end and panics); a watchdog process
//!   started before the first namespace, in its own process group, which deletes them when
//!   this process dies in any way (SIGINT, SIGTERM, SIGKILL: it waits for EOF on a pipe only
//!   this process holds); and [`remove_stale`] at start, for namespaces of runs whose test
//!   process is gone.
//! - Every external command and every wait is bounded.
//!
//! Besides that topology, [`Netns`] is one lone namespace of the same kind (same prefix, same
//! cleanup), for tests that need a host of their own, e.g. one with several addresses
//! (`tests/hardening.rs`, which includes this file by path).
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

/// `eprintln!` straight to the process's stderr, past libtest's output capture: the NAT test's
/// measurements and a skip notice must show in CI logs even when the test passes.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Common prefix of every namespace this test creates; the pid follows.
pub const PREFIX: &str = "tpnat";

pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const NATA_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 21);
pub const NATB_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 22);
pub const CLA_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const CLB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const NATA_LAN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const NATB_LAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// Limit for one `ip`/`nft` command.
const CMD_TIMEOUT: Duration = Duration::from_secs(10);
/// SIGTERM to SIGKILL for the processes we start.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// The short names of the namespaces, in creation order.
const NAMESPACES: [&str; 5] = ["pub", "nata", "natb", "cla", "clb"];
/// Test binaries that create namespaces with [`PREFIX`] (the start of their `comm`): a
/// namespace whose pid is one of these, still running, is not stale.
const OWNERS: [&str; 4] = ["nat_call", "hardening", "firewall_call", "browser_call"];

// ------------------------------------------------------------------ skipping

/// Says why the test cannot run here. Loud on stderr; a failure (panic) when `CI` is set.
pub fn cannot_run(test: &str, reason: &str) {
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    if ci {
        panic!(
            "{test} cannot run here: {reason}\n\
             CI is set, so this is a failure, not a skip: the network namespace tests must \
             run in CI (as root, with iproute2, and nftables for the NAT test)."
        );
    }
    let bar = "!".repeat(78);
    say!(
        "\n{bar}\n!! SKIPPED {test}: {reason}\n\
         !! NOTHING WAS TESTED. It needs root, `ip` (iproute2), network namespaces, and for\n\
         !! the NAT test `nft` (nftables). With CI set this is a failure instead of a skip.\n\
         {bar}\n"
    );
}

/// Root, `ip` and `nft`: what the NAT test needs before it tries anything.
pub fn preflight() -> Result<(), String> {
    preflight_ip()?;
    run(&["nft", "--version"], None).map_err(|e| format!("`nft` (nftables) unusable: {e}"))?;
    Ok(())
}

/// Root and `ip`: what a test on a lone [`Netns`] needs before it tries anything.
pub fn preflight_ip() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root (network namespaces need it)".into());
    }
    run(&["ip", "-V"], None).map_err(|e| format!("`ip` (iproute2) unusable: {e}"))?;
    Ok(())
}

// ------------------------------------------------------------------ commands

/// Runs a command (bounded by [`CMD_TIMEOUT`]); stdout on success, a message naming the
/// command and its stderr otherwise.
pub fn run(argv: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let shown = argv.join(" ");
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin piped");
        pipe.write_all(text.as_bytes())
            .map_err(|e| format!("`{shown}`: writing stdin: {e}"))?;
    }
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(CMD_TIMEOUT) {
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => Err(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(e)) => Err(format!("`{shown}`: {e}")),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped (the waiting thread
            // has not returned).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            Err(format!("`{shown}` did not finish within {CMD_TIMEOUT:?}"))
        }
    }
}

fn ns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Kills what still runs inside namespace `name` (processes this test started) and deletes it.
fn destroy(name: &str) {
    if !ns_path(name).exists() {
        return;
    }
    if let Ok(pids) = run(&["ip", "netns", "pids", name], None) {
        let me = std::process::id();
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            if pid != me {
                // SAFETY: plain kill(2); the pid lives in a namespace only this test creates.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
    if let Err(e) = run(&["ip", "netns", "del", name], None) {
        say!("nat test: cleanup: {e}");
    }
}

/// Deletes namespaces left behind by earlier runs: those whose test process (`tpnat<pid>-*`)
/// is no longer alive. Our own (same pid) are left to their owners, which may be other tests
/// of this process running now; creating one deletes a leftover of the same name first.
pub fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        // Alive = us, or a running test binary of ours with that pid (a reused pid is not).
        let alive = pid == me
            || std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| OWNERS.iter().any(|o| comm.starts_with(o)));
        if !alive {
            say!("nat test: removing leftover namespace {name}");
            destroy(&name);
        }
    }
}

// ------------------------------------------------------------------ topology

/// Why the topology could not be built.
#[derive(Debug)]
pub enum SetupError {
    /// This machine cannot do it (`ip netns add` or nftables refused): skip, or fail in CI.
    Unavailable(String),
    /// A real error in the setup.
    Failed(String),
}

/// What the two NAT routers let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatKind {
    /// Symmetric NAT ([`SYMMETRIC_NAT_RULES`]): everything out, only answers in.
    Symmetric,
    /// The same NAT behind a firewall ([`firewall_rules`]): every UDP datagram dropped, both
    /// ways (counted in the named counter `udp_dropped`); out only TCP to `SERVER_IP:port`;
    /// anything else dropped (counted in `other_dropped`). The public side also gets routes to
    /// the two LANs (via the NATs' public addresses), so that a datagram sent from "the
    /// internet" to a client reaches the NAT's filter and is seen to be dropped there.
    UdpBlocked { tcp_port: u16 },
}

/// The namespaces of one run. Dropping it kills what runs inside them and deletes them.
pub struct Topology {
    pub prefix: String,
    pub kind: NatKind,
    created: Vec<String>,
    watchdog: Option<(Child, ChildStdin)>,
}

impl Topology {
    /// Full namespace name for a short one ("pub", "nata", "natb", "cla", "clb").
    pub fn ns(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    /// The symmetric-NAT network, namespaces `tpnat<pid>-<short>`.
    pub fn create() -> Result<Topology, SetupError> {
        Topology::create_with("", NatKind::Symmetric)
    }

    /// A network of `kind`; `tag` (letters and digits, may be empty) tells apart the networks
    /// one process has at once: namespaces `tpnat<pid>-<tag>-<short>`.
    pub fn create_with(tag: &str, kind: NatKind) -> Result<Topology, SetupError> {
        assert!(
            tag.chars().all(|c| c.is_ascii_alphanumeric()),
            "topology tag {tag:?}"
        );
        let prefix = if tag.is_empty() {
            format!("{PREFIX}{}", std::process::id())
        } else {
            format!("{PREFIX}{}-{tag}", std::process::id())
        };
        let names: Vec<String> = NAMESPACES.iter().map(|s| format!("{prefix}-{s}")).collect();
        for n in &names {
            destroy(n);
        }
        let watchdog = spawn_watchdog(&names).map_err(SetupError::Unavailable)?;
        let mut topo = Topology {
            prefix,
            kind,
            created: Vec::new(),
            watchdog: Some(watchdog),
        };
        for n in &names {
            run(&["ip", "netns", "add", n], None).map_err(SetupError::Unavailable)?;
            topo.created.push(n.clone());
        }
        let [pub_, nata, natb, cla, clb] = NAMESPACES.map(|s| topo.ns(s));
        let fail = SetupError::Failed;
        for n in &names {
            ip(n, "link set lo up").map_err(fail)?;
        }

        // The "internet": a bridge holding the server address, one port per NAT.
        ip(&pub_, "link add br0 type bridge").map_err(fail)?;
        ip(
            &pub_,
            &format!("link add pa type veth peer name wan netns {nata}"),
        )
        .map_err(fail)?;
        ip(
            &pub_,
            &format!("link add pb type veth peer name wan netns {natb}"),
        )
        .map_err(fail)?;
        for port in ["pa", "pb"] {
            ip(&pub_, &format!("link set {port} master br0")).map_err(fail)?;
            ip(&pub_, &format!("link set {port} up")).map_err(fail)?;
        }
        ip(&pub_, &format!("addr add {SERVER_IP}/24 dev br0")).map_err(fail)?;
        ip(&pub_, "link set br0 up").map_err(fail)?;

        // NAT routers and their LANs. No default routes anywhere: the NATs reach only
        // 203.0.113.0/24, the public side has no route into the LANs.
        for (nat, client, public, lan, client_ip) in [
            (&nata, &cla, NATA_PUBLIC, NATA_LAN, CLA_IP),
            (&natb, &clb, NATB_PUBLIC, NATB_LAN, CLB_IP),
        ] {
            ip(
                nat,
                &format!("link add lan type veth peer name eth0 netns {client}"),
            )
            .map_err(fail)?;
            ip(nat, &format!("addr add {public}/24 dev wan")).map_err(fail)?;
            ip(nat, &format!("addr add {lan}/24 dev lan")).map_err(fail)?;
            ip(nat, "link set wan up").map_err(fail)?;
            ip(nat, "link set lan up").map_err(fail)?;
            run(
                &[
                    "ip",
                    "netns",
                    "exec",
                    nat,
                    "sh",
                    "-c",
                    "echo 1 > /proc/sys/net/ipv4/ip_forward",
                ],
                None,
            )
            .map_err(fail)?;
            // nftables missing from the kernel is the machine's problem, not the test's.
            let rules = match kind {
                NatKind::Symmetric => SYMMETRIC_NAT_RULES.to_owned(),
                NatKind::UdpBlocked { tcp_port } => firewall_rules(tcp_port),
            };
            run(
                &["ip", "netns", "exec", nat, "nft", "-f", "-"],
                Some(&rules),
            )
            .map_err(|e| SetupError::Unavailable(format!("nftables: {e}")))?;
            ip(client, &format!("addr add {client_ip}/24 dev eth0")).map_err(fail)?;
            ip(client, "link set eth0 up").map_err(fail)?;
            ip(client, &format!("route add default via {lan}")).map_err(fail)?;
            if let NatKind::UdpBlocked { .. } = kind {
                ip(&pub_, &format!("route add {client_ip}/32 via {public}")).map_err(fail)?;
            }
        }
        Ok(topo)
    }

    /// Packets counted so far by the named nftables counter `name` in NAT namespace `short`
    /// (the [`NatKind::UdpBlocked`] rules have `udp_dropped` and `other_dropped`).
    pub fn nft_counter(&self, short: &str, name: &str) -> Result<u64, String> {
        let ns = self.ns(short);
        let out = run(
            &[
                "ip", "netns", "exec", &ns, "nft", "list", "counter", "inet", "tpnat", name,
            ],
            None,
        )?;
        // ... counter udp_dropped { packets 3 bytes 132 } ...
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "packets")
            .and_then(|w| w[1].parse().ok())
            .ok_or_else(|| format!("no packet count in `nft list counter` of {ns}: {out}"))
    }

    /// The NAT rules of namespace `short`, as nftables lists them (for the report).
    pub fn nat_rules(&self, short: &str) -> String {
        run(
            &[
                "ip",
                "netns",
                "exec",
                &self.ns(short),
                "nft",
                "list",
                "ruleset",
            ],
            None,
        )
        .unwrap_or_else(|e| e)
    }
}

/// Symmetric NAT: a fresh, random public port for every new 5-tuple (so a mapping depends on
/// the destination), and nothing in from outside unless it answers traffic from inside.
const SYMMETRIC_NAT_RULES: &str = r#"
table ip tpnat {
    chain nat_post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade random,fully-random
    }
    chain lan_guard {
        type filter hook forward priority filter; policy drop;
        iifname "lan" oifname "wan" accept
        iifname "wan" oifname "lan" ct state established,related accept
    }
}
"#;

/// The firewall in front of a UDP-blocked NAT (see [`NatKind::UdpBlocked`]): `inet`, so IPv6
/// is dropped too (there is none configured, but nothing relies on that). UDP is dropped before
/// anything can accept it, in both directions, and counted.
pub fn firewall_rules(tcp_port: u16) -> String {
    format!(
        r#"
table inet tpnat {{
    counter udp_dropped {{ }}
    counter other_dropped {{ }}
    chain nat_post {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade random,fully-random
    }}
    chain lan_guard {{
        type filter hook forward priority filter; policy drop;
        meta l4proto udp counter name "udp_dropped" drop
        iifname "lan" oifname "wan" ip daddr {SERVER_IP} tcp dport {tcp_port} accept
        iifname "wan" oifname "lan" ct state established,related accept
        counter name "other_dropped" drop
    }}
}}
"#
    )
}

fn ip(ns: &str, args: &str) -> Result<String, String> {
    let mut argv = vec!["ip", "-n", ns];
    argv.extend(args.split_whitespace());
    run(&argv, None)
}

/// A shell in its own process group (so a terminal's Ctrl-C does not reach it) that waits
/// for EOF on its stdin, i.e. for this process to end however it ends, then kills whatever
/// still runs in our namespaces and deletes them. Our own `Drop` normally got there first.
fn spawn_watchdog(names: &[String]) -> Result<(Child, ChildStdin), String> {
    const SCRIPT: &str = r#"read -r _line
for ns in "$@"; do
    [ -e "/var/run/netns/$ns" ] || continue
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
done
exit 0"#;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("tpnat-watchdog")
        .args(names)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the cleanup watchdog (sh): {e}"))?;
    let stdin = child.stdin.take().expect("stdin piped");
    Ok((child, stdin))
}

/// Ends a watchdog whose namespaces are already deleted: EOF on its stdin, then a bounded wait.
fn stop_watchdog((mut child, stdin): (Child, ChildStdin)) {
    drop(stdin); // EOF: the watchdog finds nothing left and exits
    let deadline = Instant::now() + CMD_TIMEOUT;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in self.created.iter().rev() {
            destroy(n);
        }
        if let Some(watchdog) = self.watchdog.take() {
            stop_watchdog(watchdog);
        }
        let left: Vec<&String> = self
            .created
            .iter()
            .filter(|n| ns_path(n).exists())
            .collect();
        if self.created.is_empty() {
            // Nothing was created (e.g. `ip netns add` refused).
        } else if left.is_empty() {
            say!("nat test: namespaces {}-* deleted", self.prefix);
        } else {
            say!("nat test: WARNING: could not delete namespaces {left:?}");
        }
    }
}

// ------------------------------------------------------------------ one lone namespace

/// One namespace of this run, `tpnat<pid>-<short>`, with `lo` up and nothing else: the test
/// adds what it needs ([`Netns::ip`]). Dropping it kills what runs inside and deletes it; a
/// watchdog (as for [`Topology`]) deletes it if this process dies first.
pub struct Netns {
    pub name: String,
    created: bool,
    watchdog: Option<(Child, ChildStdin)>,
}

impl Netns {
    /// `short`: letters and digits, distinct among the namespaces this process has at once.
    pub fn create(short: &str) -> Result<Netns, SetupError> {
        assert!(
            !short.is_empty() && short.chars().all(|c| c.is_ascii_alphanumeric()),
            "namespace name {short:?}"
        );
        let name = format!("{PREFIX}{}-{short}", std::process::id());
        destroy(&name);
        let watchdog =
            spawn_watchdog(std::slice::from_ref(&name)).map_err(SetupError::Unavailable)?;
        let mut ns = Netns {
            name,
            created: false,
            watchdog: Some(watchdog),
        };
        run(&["ip", "netns", "add", &ns.name], None).map_err(SetupError::Unavailable)?;
        ns.created = true;
        ns.ip("link set lo up").map_err(SetupError::Failed)?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS` (ARGS split on whitespace), bounded.
    pub fn ip(&self, args: &str) -> Result<String, String> {
        ip(&self.name, args)
    }

    /// Runs `f` on a thread inside this namespace (see [`spawn_in`]) and waits for it, bounded:
    /// for opening sockets that live here and are then used from anywhere.
    pub fn run_in<T, F>(&self, what: &str, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        spawn_in(&self.name, what, f)
            .and_then(|t| t.join(CMD_TIMEOUT))
            .unwrap_or_else(|e| panic!("in namespace {}: {e}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.created {
            destroy(&self.name);
        }
        if let Some(watchdog) = self.watchdog.take() {
            stop_watchdog(watchdog);
        }
        if self.created && ns_path(&self.name).exists() {
            say!("netns: WARNING: could not delete namespace {}", self.name);
        }
    }
}

// ------------------------------------------------------------------ threads in a namespace

/// A thread running inside a namespace; [`NsThread::join`] waits for it, bounded.
pub struct NsThread<T> {
    name: String,
    rx: mpsc::Receiver<std::thread::Result<T>>,
}

/// Runs `f` on a new thread that first moves itself into namespace `ns` (setns(2) on that
/// thread only). Sockets it opens, and threads it spawns (a tokio runtime's workers and
/// blocking pool), live in that namespace; the rest of the process stays where it was.
pub fn spawn_in<T, F>(ns: &str, name: &str, f: F) -> Result<NsThread<T>, String>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = ns_path(ns);
    let file = File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let result = catch_unwind(AssertUnwindSafe(|| {
                // SAFETY: setns(2) with a namespace fd we hold open; it changes only the
                // network namespace of the calling thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    panic!("setns({}): {}", path.display(), io::Error::last_os_error());
                }
                drop(file);
                f()
            }));
            let _ = tx.send(result);
        })
        .map_err(|e| format!("spawn thread {name}: {e}"))?;
    Ok(NsThread {
        name: name.to_owned(),
        rx,
    })
}

impl<T> NsThread<T> {
    pub fn join(self, timeout: Duration) -> Result<T, String> {
        match self.rx.recv_timeout(timeout) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(panic)) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "(non-string panic)".into());
                Err(format!("thread {} panicked: {msg}", self.name))
            }
            Err(_) => Err(format!(
                "thread {} did not finish within {timeout:?}",
                self.name
            )),
        }
    }
}

// ------------------------------------------------------------------ processes in a namespace

/// A program started with `ip netns exec`; its stdout and stderr lines are collected.
/// Dropping it sends SIGTERM, then SIGKILL after a grace period; it also gets SIGKILL if
/// the thread that started it dies (PR_SET_PDEATHSIG).
pub struct NsProcess {
    name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl NsProcess {
    pub fn spawn(
        ns: &str,
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<NsProcess, String> {
        NsProcess::spawn_inner(ns, name, program, args, envs, false)
    }

    /// Like [`NsProcess::spawn`], with a pipe to its stdin for [`NsProcess::send_line`].
    pub fn spawn_interactive(
        ns: &str,
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<NsProcess, String> {
        NsProcess::spawn_inner(ns, name, program, args, envs, true)
    }

    fn spawn_inner(
        ns: &str,
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        interactive: bool,
    ) -> Result<NsProcess, String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(if interactive {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
        // `ip netns exec` then execs the program in the same process, which keeps the flag.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} in {ns}: {e}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout piped");
        let err = child.stderr.take().expect("stderr piped");
        collect_lines(out, Arc::clone(&lines));
        collect_lines(err, Arc::clone(&lines));
        let stdin = child.stdin.take();
        Ok(NsProcess {
            name: name.to_owned(),
            child: Some(child),
            stdin,
            lines,
        })
    }

    /// Writes `line` and a newline to the process's stdin (see [`NsProcess::spawn_interactive`]).
    pub fn send_line(&mut self, line: &str) -> Result<(), String> {
        let name = &self.name;
        let pipe = self
            .stdin
            .as_mut()
            .ok_or_else(|| format!("{name} has no stdin pipe"))?;
        pipe.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| pipe.flush())
            .map_err(|e| format!("writing to {name}'s stdin: {e}"))
    }

    /// Waits (bounded) for the process to exit by itself; true if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while let Some(Ok(None)) = self.child.as_mut().map(|c| c.try_wait()) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50)); // let the readers finish
        true
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn log(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits (bounded) for a line matching `pred`; fails early if the process exits.
    pub fn wait_for_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let lines = Arc::clone(&self.lines);
        self.wait_for(what, timeout, || {
            lines.lock().unwrap().iter().find(|l| pred(l)).cloned()
        })
    }

    /// Waits (bounded) until `probe` returns something; fails early if the process exits.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = probe() {
                return Ok(found);
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                std::thread::sleep(Duration::from_millis(100)); // let the readers finish
                return Err(format!(
                    "{} exited ({status}) before {what}; output:\n{}",
                    self.name,
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: no {what} within {timeout:?}; output:\n{}",
                    self.name,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn collect_lines(stream: impl Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_GRACE;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- {} output ----\n{}\n----", self.name, self.log());
        }
    }
}

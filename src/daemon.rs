//! `turnpike serve`: turns a validated config into a running server — resolves addresses, builds the
//! core configuration, starts one shard per core, and handles signals.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, ConfigError, RelayIp};
use crate::control::{self, credentials, unix_now, ControlState, Live, Shards};
use crate::io::connection::{ListenerKind, StreamSettings};
use crate::io::gate::ConnectionGate;
use crate::io::interfaces::interface_addresses;
use crate::io::relay::Reservations;
use crate::io::shard::{self, ShardReport, ShardSetup};
use crate::io::tls::TlsContext;
use crate::io::udp::bind_udp;
use crate::proto::discovery::NatDiscovery;
use crate::proto::policy::{self, PeerPolicy, PolicyConfig};
use crate::proto::server::{CoreConfig, Limits, RelayAddress, Shared};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Setup(String),
    #[error("cannot bind {what}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tls certificate: {0}")]
    Tls(#[from] crate::io::tls::TlsError),
    #[error("cannot write the ready file {}", path.display())]
    ReadyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How long a quick-start credential printed at start stays valid.
const QUICKSTART_TTL: Duration = Duration::from_secs(24 * 3600);

fn random_bytes<const N: usize>() -> Result<[u8; N], DaemonError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| DaemonError::Setup("the system random number generator failed".into()))?;
    Ok(b)
}

/// The first public IPv4 address of an interface that is up, else the first one other hosts
/// can reach at all (a private one); never loopback, link-local or unspecified.
fn primary_ipv4() -> Option<Ipv4Addr> {
    let found: Vec<Ipv4Addr> = interface_addresses()
        .into_iter()
        .filter(|a| a.up)
        .filter_map(|a| match a.ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .filter(|ip| policy::class_of(IpAddr::V4(*ip)).can_relay())
        .collect();
    found
        .iter()
        .find(|ip| policy::is_public(IpAddr::V4(**ip)))
        .or(found.first())
        .copied()
}

/// Where relay sockets bind and what they advertise, per family.
#[derive(Debug, Clone, Copy)]
pub struct ResolvedRelays {
    pub v4: Option<RelayAddress>,
    pub v6: Option<RelayAddress>,
}

pub fn resolve_relays(config: &Config) -> ResolvedRelays {
    let local_v4 = match config.relay.address {
        RelayIp::Ip(ip) => ip,
        RelayIp::Auto => primary_ipv4().unwrap_or_else(|| {
            tracing::warn!("no non-loopback IPv4 interface found: relaying on 127.0.0.1, reachable from this host only");
            Ipv4Addr::LOCALHOST
        }),
    };
    let v4 = RelayAddress {
        local: IpAddr::V4(local_v4),
        advertised: IpAddr::V4(config.relay.external_address.unwrap_or(local_v4)),
    };
    let v6 = config.relay.address_v6.map(|local| RelayAddress {
        local: IpAddr::V6(local),
        advertised: IpAddr::V6(config.relay.external_address_v6.unwrap_or(local)),
    });
    for r in std::iter::once(&v4).chain(v6.as_ref()) {
        if !policy::is_public(r.advertised) {
            tracing::warn!(
                relay = %r.advertised,
                class = %policy::class_of(r.advertised),
                "the advertised relay address is not a public address: clients outside this network cannot reach it; \
                 set relay.external_address to the public address"
            );
        }
    }
    ResolvedRelays { v4: Some(v4), v6 }
}

/// The RFC 5780 address sets `config` asks for. TCP joins in where `tcp_listen` holds the
/// primary address: then the daemon binds TCP listeners on the other three as well.
pub fn nat_discovery(config: &Config) -> Vec<NatDiscovery> {
    config
        .nat_discovery
        .families()
        .map(|a| NatDiscovery {
            primary: a.primary,
            alternate: a.alternate,
            tcp: config.tcp_listen.contains(&a.primary),
        })
        .collect()
}

/// Builds the core's view of the configuration. `rest_secrets` are already loaded; `listeners`
/// are every service endpoint as bound and `discovery` the RFC 5780 listeners bound at start
/// (neither changes on a reload).
pub fn core_config(
    config: &Config,
    relays: &ResolvedRelays,
    rest_secrets: Vec<Vec<u8>>,
    listeners: &[SocketAddr],
    discovery: &[NatDiscovery],
) -> Result<CoreConfig, DaemonError> {
    let auth = credentials::authenticator(config, rest_secrets)
        .map_err(|e| DaemonError::Setup(e.to_string()))?;
    let relay_ips: Vec<IpAddr> = relays
        .v4
        .iter()
        .chain(relays.v6.iter())
        .map(|r| r.local)
        .collect();
    let external_ips = relays
        .v4
        .iter()
        .chain(relays.v6.iter())
        .filter(|r| r.advertised != r.local)
        .map(|r| (r.advertised, r.local))
        .collect();
    let policy = PeerPolicy::new(PolicyConfig {
        allow: config.peers.allow.clone(),
        deny: config.peers.deny.clone(),
        allow_loopback: config.peers.allow_loopback_peers,
        relay_ips,
        external_ips,
        relay_ports: (config.relay.port_min, config.relay.port_max),
        service_endpoints: listeners.to_vec(),
        // Read on every start and reload: a wildcard listener answers on each of them.
        host_ips: interface_addresses().into_iter().map(|a| a.ip).collect(),
    });
    let l = &config.limits;
    let limits = Limits {
        allocations_per_user: l.allocations_per_user,
        total_allocations: l.total_allocations,
        permissions_per_allocation: l.permissions_per_allocation as usize,
        channels_per_allocation: l.channels_per_allocation as usize,
        default_lifetime: Duration::from_secs(l.default_lifetime_secs),
        max_lifetime: Duration::from_secs(l.max_lifetime_secs),
        permission_lifetime: Duration::from_secs(l.permission_lifetime_secs),
        channel_lifetime: Duration::from_secs(l.channel_lifetime_secs),
        bandwidth_bytes_per_sec: l.allocation_bandwidth_bytes_per_sec,
        unauth_replies_per_sec: l.unauth_replies_per_sec,
        unauth_replies_burst: l.unauth_replies_burst,
    };
    Ok(CoreConfig {
        software: (!config.software.is_empty()).then(|| config.software.clone()),
        auth,
        policy,
        limits,
        relay_v4: relays.v4,
        relay_v6: relays.v6,
        nat_discovery: discovery.to_vec(),
    })
}

/// Binds port-0 listeners once to learn their port, so every shard binds the same one.
fn concrete_listeners(
    listen: &[SocketAddr],
) -> Result<(Vec<SocketAddr>, Vec<socket2::Socket>), DaemonError> {
    let mut addrs = Vec::new();
    let mut holders = Vec::new();
    for addr in listen {
        if addr.port() != 0 {
            // SO_REUSEPORT would let us share a port another server (or a second turnpike)
            // already holds, and the kernel would silently split clients between the two.
            // A bind without it fails if anyone holds the port: refuse to start instead.
            bind_udp(*addr, false).map_err(|source| DaemonError::Bind {
                what: format!("udp listener {addr} (is another TURN server running on it?)"),
                source,
            })?;
            addrs.push(*addr);
            continue;
        }
        let s = bind_udp(*addr, true).map_err(|source| DaemonError::Bind {
            what: format!("udp listener {addr}"),
            source,
        })?;
        let bound = s
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| DaemonError::Setup(format!("udp listener {addr}: no local address")))?;
        addrs.push(bound);
        holders.push(s);
    }
    Ok((addrs, holders))
}

/// The quick-start output when no credentials are configured: an ephemeral secret, one credential,
/// and the `iceServers` JSON for `new RTCPeerConnection(...)`.
fn quickstart(
    secret: &[u8],
    config: &Config,
    relays: &ResolvedRelays,
    listeners: &credentials::Listeners,
) {
    let ttl = QUICKSTART_TTL.as_secs().min(config.auth.rest_max_ttl_secs);
    let host = credentials::public_host(config, relays.v4.map(|r| r.advertised));
    let uris = credentials::default_uris(listeners, &host);
    let secrets = [secret.to_vec()];
    let minted = match credentials::mint_for(config, &secrets, "quickstart", ttl, unix_now(), uris)
    {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "could not mint the quick-start credential");
            return;
        }
    };
    tracing::warn!(
        "NO CREDENTIALS CONFIGURED: generated an EPHEMERAL REST secret for this run only; \
         credentials minted from it stop working when the daemon restarts. \
         Set auth.secret_file or auth.secret_env (or add [[auth.users]]) for production."
    );
    println!("turnpike quick-start credential (valid {} h):", ttl / 3600);
    println!("  username: {}", minted.username);
    println!("  password: {}", minted.password);
    println!("iceServers for new RTCPeerConnection(...):");
    println!("{}", credentials::ice_json(&minted));
}

/// Every relay socket is a file descriptor: lift the soft limit to the hard one (systemd's
/// LimitNOFILE, or the shell's ulimit -Hn), and say so when it caps the relay range.
fn raise_fd_limit(config: &Config) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    let ports = u64::from(config.relay.port_max - config.relay.port_min) + 1;
    // Room for a relay socket per port and family, plus client connections and the rest.
    grow_fd_table(lim.rlim_cur.min(2 * ports + 4096));
    if lim.rlim_cur < ports + 256 {
        tracing::warn!(
            open_files_limit = lim.rlim_cur,
            relay_ports = ports,
            "the open-files limit caps concurrent allocations below the relay port range; \
             raise it (LimitNOFILE= in the systemd unit, ulimit -n)"
        );
    }
}

/// Grows the kernel's file descriptor table to `fds` entries now, while that is cheap. The
/// table doubles as descriptors are opened, and in a process with several threads each doubling
/// waits for an RCU grace period with the table's lock held: measured here at 5 to 15 ms at 256,
/// 512, 1024, 2048 and 4096 descriptors, every shard stalled in `socket()` meanwhile, which made
/// the slowest 1 % of allocations 10 times slower than the median. Tables never shrink, so one
/// descriptor duplicated high and closed again leaves it grown (about 8 bytes per entry).
fn grow_fd_table(fds: u64) {
    let Ok(top) = libc::c_int::try_from(fds.saturating_sub(1)) else {
        return;
    };
    // SAFETY: eventfd, fcntl(F_DUPFD) and close on descriptors this function owns.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_CLOEXEC);
        if fd < 0 {
            return;
        }
        let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, top);
        if high >= 0 {
            libc::close(high);
        }
        libc::close(fd);
    }
}

/// What `serve --ready-file` publishes once every listener, relay range and the API are bound:
/// where a supervisor, a script or a test finds this daemon without reading its log. Only what
/// a reload cannot change (those keys wait for a restart), so the file is written once per run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    pub pid: u32,
    /// As bound: a configured port 0 is the port the kernel picked; a wildcard stays one.
    pub listen: Vec<ReadyListener>,
    /// The HTTP API as bound; null when `api.listen` is unset.
    pub api: Option<SocketAddr>,
    /// One entry per family: where relay sockets bind, and the address clients are told.
    pub relay: Vec<ReadyRelay>,
    pub relay_ports: ReadyPorts,
    /// RFC 5780 address sets (empty when off); the daemon listens on all four combinations of
    /// each set's IPs and ports, over TCP too where `tcp` says so.
    pub nat_discovery: Vec<ReadyDiscovery>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReadyDiscovery {
    pub primary: SocketAddr,
    pub alternate: SocketAddr,
    pub tcp: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReadyListener {
    pub transport: &'static str,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReadyRelay {
    pub local: IpAddr,
    pub advertised: IpAddr,
}

/// Inclusive, as in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReadyPorts {
    pub min: u16,
    pub max: u16,
}

impl Readiness {
    pub fn new(
        listeners: &credentials::Listeners,
        api: Option<SocketAddr>,
        relays: &ResolvedRelays,
        relay_ports: (u16, u16),
        discovery: &[NatDiscovery],
    ) -> Readiness {
        Readiness {
            pid: std::process::id(),
            listen: [
                ("udp", &listeners.udp),
                ("tcp", &listeners.tcp),
                ("tls", &listeners.tls),
            ]
            .into_iter()
            .flat_map(|(transport, addrs)| {
                addrs
                    .iter()
                    .map(move |&addr| ReadyListener { transport, addr })
            })
            .collect(),
            api,
            relay: relays
                .v4
                .iter()
                .chain(relays.v6.iter())
                .map(|r| ReadyRelay {
                    local: r.local,
                    advertised: r.advertised,
                })
                .collect(),
            relay_ports: ReadyPorts {
                min: relay_ports.0,
                max: relay_ports.1,
            },
            nat_discovery: discovery
                .iter()
                .map(|d| ReadyDiscovery {
                    primary: d.primary,
                    alternate: d.alternate,
                    tcp: d.tcp,
                })
                .collect(),
        }
    }

    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self)
            .expect("numbers, strings and addresses always serialize");
        text.push('\n');
        text
    }

    /// Writes the document to a temp file beside `path`, then renames it into place: a reader
    /// that polls for `path` finds nothing or all of it, never a half-written file.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let name = path.file_name().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
        })?;
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let result =
            std::fs::write(&tmp, self.to_json()).and_then(|()| std::fs::rename(&tmp, path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// The published ready file; removed when the daemon stops (also on an error or a panic), so
/// its presence means "serving".
struct ReadyFile(PathBuf);

impl Drop for ReadyFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot remove the ready file");
            }
        }
    }
}

/// Runs the server until SIGINT or SIGTERM (then drains) and returns once it has stopped.
/// With `ready_file`, publishes [`Readiness`] there when READY=1 goes to systemd.
pub fn serve(
    config: Config,
    config_path: PathBuf,
    ready_file: Option<PathBuf>,
) -> Result<(), DaemonError> {
    raise_fd_limit(&config);
    let mut rest_secrets = config.load_rest_secrets()?;
    let nonce_keys = config.load_nonce_keys()?;
    // Opened before serving, so a path that cannot be written stops the start. The guard lives
    // to the end of `serve`: the shards' last records (their allocations ended by the shutdown)
    // are written before it returns.
    let (usage, _usage_guard) = match &config.usage.file {
        Some(path) => {
            let (log, guard) = crate::io::usage::UsageLog::open(path)
                .map_err(|e| DaemonError::Setup(format!("usage.file {}: {e}", path.display())))?;
            (Some(log), Some(guard))
        }
        None => (None, None),
    };
    let usage_interval =
        (config.usage.interval_secs > 0).then(|| Duration::from_secs(config.usage.interval_secs));
    let api_token = config.load_api_token()?;
    let relays = resolve_relays(&config);
    let (listeners, holders) = concrete_listeners(&config.listen)?;
    let discovery = nat_discovery(&config);
    // Fixed ports (validation says so): bound once without SO_REUSEPORT, like any fixed
    // listener, so a port someone else holds stops the start.
    let udp_discovery: Vec<SocketAddr> = discovery
        .iter()
        .flat_map(NatDiscovery::extra_listeners)
        .collect();
    concrete_listeners(&udp_discovery)?;
    let ephemeral = rest_secrets.is_empty() && config.auth.users.is_empty();
    if ephemeral {
        let secret = base64::engine::general_purpose::STANDARD_NO_PAD.encode(random_bytes::<24>()?);
        rest_secrets.push(secret.into_bytes());
    }
    let ephemeral_secret = ephemeral.then(|| rest_secrets[0].clone());
    // Bound before any shard starts, so a taken port stops the daemon before it serves anything.
    let api_listener = match config.api.listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| DaemonError::Bind {
                    what: format!("api listener {addr}"),
                    source,
                })?;
            Some(l)
        }
        None => None,
    };
    // TCP and TLS listening sockets, bound once; every shard accepts from a clone of each.
    let proxied = |addr: &SocketAddr| config.proxy_protocol.listeners.contains(addr);
    let mut stream_listeners = Vec::new();
    for (list, tls) in [(&config.tcp_listen, false), (&config.tls_listen, true)] {
        for addr in list {
            let transport = if tls { "tls" } else { "tcp" };
            let bind_error = |source| DaemonError::Bind {
                what: format!(
                    "{transport} listener {addr} (is another TURN server running on it?)"
                ),
                source,
            };
            let socket = crate::io::tcp::bind_tcp(*addr).map_err(bind_error)?;
            let bound = socket.local_addr().map_err(bind_error)?;
            let kind = ListenerKind {
                tls,
                proxy_protocol: proxied(addr),
            };
            stream_listeners.push((socket, bound, kind));
        }
    }
    let bound_of = |tls: bool| -> Vec<SocketAddr> {
        stream_listeners
            .iter()
            .filter(|(_, _, kind)| kind.tls == tls)
            .map(|(_, bound, _)| *bound)
            .collect()
    };
    let bound = credentials::Listeners {
        udp: listeners.clone(),
        tcp: bound_of(false),
        tls: bound_of(true),
    };
    let certificate = match config.tls_listen.is_empty() {
        true => None,
        false => control::load_certificate(&config)?,
    };
    let tls = match certificate {
        Some(certificate) => {
            for warning in control::certificate_warnings(&config, &certificate) {
                tracing::warn!("{warning}");
            }
            Some(TlsContext::new(certificate)?)
        }
        None => None,
    };
    let streams = StreamSettings::new(
        tls,
        ConnectionGate::new(
            config.limits.connections_total,
            config.limits.connections_per_source,
        ),
        control::stream_policy(&config),
    );
    // Our own service endpoints are never valid peers: the TURN listeners and the HTTP API, as
    // bound (a configured port 0 is whatever port the kernel picked).
    let tcp_discovery = discovery
        .iter()
        .filter(|d| d.tcp)
        .flat_map(NatDiscovery::extra_listeners)
        .map(|addr| {
            crate::io::tcp::bind_tcp(addr).map_err(|source| DaemonError::Bind {
                what: format!("tcp nat discovery listener {addr}"),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut endpoints = listeners.clone();
    endpoints.extend(bound.tcp.iter().chain(&bound.tls));
    endpoints.extend(&udp_discovery);
    endpoints.extend(tcp_discovery.iter().filter_map(|l| l.local_addr().ok()));
    // The discovery-only TCP listeners serve plain TCP, no PROXY header; they mint no URIs.
    let plain = ListenerKind {
        tls: false,
        proxy_protocol: false,
    };
    stream_listeners.extend(tcp_discovery.into_iter().map(|l| {
        let bound = l
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        (l, bound, plain)
    }));
    if let Some(l) = &api_listener {
        let bound = l.local_addr().map_err(|source| DaemonError::Bind {
            what: "api listener".into(),
            source,
        })?;
        endpoints.push(bound);
    }
    let core = Arc::new(core_config(
        &config,
        &relays,
        rest_secrets.clone(),
        &endpoints,
        &discovery,
    )?);
    let shared = Arc::new(Shared::new(
        random_bytes::<32>()?,
        config.auth.nonce_lifetime_secs,
        Instant::now(),
        unix_now(),
    ));
    shared.set_nonce_keys(&nonce_keys);
    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let reservations = Arc::new(Reservations::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut handles = Vec::new();
    let (senders, mut receivers): (Vec<_>, Vec<_>) =
        (0..threads).map(|_| mpsc::unbounded_channel()).unzip();
    let siblings: Arc<[_]> = senders.clone().into();
    let mailboxes = crate::io::mailbox::Mailboxes::new(threads).map(Arc::new);
    for (index, command_rx) in receivers.drain(..).enumerate() {
        let setup = ShardSetup {
            index,
            listen: listeners.iter().chain(&udp_discovery).copied().collect(),
            tcp_listeners: stream_listeners
                .iter()
                .map(|(l, _, kind)| l.try_clone().map(|l| (l, *kind)))
                .collect::<Result<_, _>>()
                .map_err(|source| DaemonError::Bind {
                    what: "tcp listener (clone for a shard)".into(),
                    source,
                })?,
            streams: Arc::clone(&streams),
            config: Arc::clone(&core),
            shared: Arc::clone(&shared),
            relay_ports: (config.relay.port_min, config.relay.port_max),
            reservations: Arc::clone(&reservations),
            shutdown: shutdown_rx.clone(),
            commands: command_rx,
            siblings: Arc::clone(&siblings),
            mailboxes: mailboxes.clone(),
            usage: usage.clone().map(|log| (log, usage_interval)),
            seed: u64::from_le_bytes(random_bytes::<8>()?),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(format!("turnpike-shard-{index}"))
            .spawn(move || shard::run(setup, tx))
            .map_err(|e| DaemonError::Setup(format!("cannot start shard thread: {e}")))?;
        match rx.recv() {
            Ok(Ok(_)) => handles.push(handle),
            Ok(Err(source)) => {
                let _ = shutdown_tx.send(true);
                return Err(DaemonError::Bind {
                    what: format!("shard {index}"),
                    source,
                });
            }
            Err(_) => {
                return Err(DaemonError::Setup(format!(
                    "shard {index} died while starting"
                )))
            }
        }
    }
    // Every shard holds the port now; the placeholders must not take a share of the traffic.
    drop(holders);

    let build_relays = relays;
    let build_endpoints = endpoints.clone();
    let build_discovery = discovery.clone();
    let state = Arc::new(ControlState {
        shards: Shards::new(senders),
        shared: Arc::clone(&shared),
        usage,
        fleet: Default::default(),
        live: Mutex::new(Live {
            config: config.clone(),
            core,
            rest_secrets,
            api_token,
            ephemeral_secret: ephemeral_secret.clone(),
        }),
        config_path,
        build_core: Box::new(move |cfg, secrets| {
            core_config(
                cfg,
                &build_relays,
                secrets,
                &build_endpoints,
                &build_discovery,
            )
            .map_err(|e| control::ReloadError::Core(Box::new(e)))
        }),
        draining: AtomicBool::new(false),
        reloads_ok: AtomicU64::new(0),
        reloads_failed: AtomicU64::new(0),
        relay_port_span: u64::from(config.relay.port_max - config.relay.port_min) + 1,
        advertised: relays.v4.map(|r| r.advertised),
        listeners: bound.clone(),
        streams: Arc::clone(&streams),
        started: Instant::now(),
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DaemonError::Setup(format!("control runtime: {e}")))?;
    // Held until the shards have stopped: once the file is gone, its ports are free again.
    let mut published = None;
    let result = runtime.block_on(async {
        if let Some(url) = &config.fleet.redis_url {
            let instance = match config.fleet.instance.as_str() {
                "" => control::fleet::default_instance(),
                name => name.to_owned(),
            };
            tracing::info!(instance = %instance, "fleet: sharing revocations through Redis");
            let fleet = control::fleet::Fleet::start(
                url,
                instance,
                Arc::downgrade(&state),
                tokio::runtime::Handle::current(),
            )
            .map_err(DaemonError::Setup)?;
            if let Some(usage) = &state.usage {
                usage.mirror_to(fleet.usage_sender());
            }
            let _ = state.fleet.set(fleet);
        }
        let mut api_bound = None;
        if let Some(std_listener) = api_listener {
            let listener = tokio::net::TcpListener::from_std(std_listener)
                .map_err(|e| DaemonError::Setup(format!("api listener: {e}")))?;
            let bound = listener
                .local_addr()
                .map_err(|e| DaemonError::Setup(format!("api listener: {e}")))?;
            api_bound = Some(bound);
            tracing::info!(addr = %bound, "http api listening");
            let app = control::api::router(Arc::clone(&state));
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "http api stopped");
                }
            });
        }
        for l in &listeners {
            tracing::info!(addr = %l, transport = "udp", "listening");
        }
        for (_, addr, kind) in &stream_listeners {
            let transport = if kind.tls { "tls+tcp" } else { "tcp" };
            tracing::info!(addr = %addr, transport, proxy_protocol = kind.proxy_protocol, "listening");
        }
        for d in &discovery {
            tracing::info!(
                primary = %d.primary,
                alternate = %d.alternate,
                tcp = d.tcp,
                "RFC 5780 NAT discovery on both addresses and ports"
            );
        }
        if let Some(path) = ready_file {
            // Refuse rather than serve without it: whoever asked for the file waits for it, and
            // an exit status names the bad path now, where a missing file is only a timeout.
            let ports = (config.relay.port_min, config.relay.port_max);
            Readiness::new(&bound, api_bound, &relays, ports, &discovery)
                .write(&path)
                .map_err(|source| DaemonError::ReadyFile {
                    path: path.clone(),
                    source,
                })?;
            published = Some(ReadyFile(path));
        }
        tracing::info!(
            threads,
            relay_v4 = %relays.v4.map_or("-".into(), |r| format!("{} (advertised {})", r.local, r.advertised)),
            relay_v6 = %relays.v6.map_or("-".into(), |r| format!("{} (advertised {})", r.local, r.advertised)),
            ports = %format!("{}-{}", config.relay.port_min, config.relay.port_max),
            realm = %config.realm,
            "turnpike ready"
        );
        if let Some(secret) = &ephemeral_secret {
            quickstart(secret, &config, &relays, &bound);
        }
        control::notify::ready(&format!(
            "serving on {} udp, {} tcp and {} tls listener(s)",
            bound.udp.len(),
            bound.tcp.len(),
            bound.tls.len()
        ));
        control::run_until_stopped(Arc::clone(&state))
            .await
            .map_err(|e| DaemonError::Setup(format!("signal handler: {e}")))
    });

    tracing::info!("shutting down");
    if let Some(fleet) = state.fleet.get() {
        fleet.stop();
    }
    let _ = shutdown_tx.send(true);
    let finals: Vec<ShardReport> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
    // The API's socket closes with its runtime.
    drop(runtime);
    drop(published);
    let total = control::metrics::sum(&finals);
    tracing::info!(
        allocations = total.core.allocations_created,
        to_peer_packets = total.core.to_peer_packets,
        to_client_packets = total.core.to_client_packets,
        send_errors = total.send_errors,
        "stopped"
    );
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growing_the_fd_table_leaves_no_descriptor_open() {
        let open = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        // Other tests open and close files meanwhile, so one clean try of five is the proof: a
        // leak would show on every try.
        let clean = (0..5).any(|_| {
            let before = open();
            grow_fd_table(2048);
            grow_fd_table(u64::MAX); // past c_int: ignored, not wrapped
            open() <= before
        });
        assert!(clean, "grow_fd_table left descriptors open");
    }

    fn sample() -> Readiness {
        let relays = ResolvedRelays {
            v4: Some(RelayAddress {
                local: "10.0.0.5".parse().unwrap(),
                advertised: "203.0.113.7".parse().unwrap(),
            }),
            v6: Some(RelayAddress {
                local: "2001:db8::5".parse().unwrap(),
                advertised: "2001:db8::5".parse().unwrap(),
            }),
        };
        Readiness::new(
            &credentials::Listeners {
                udp: vec![
                    "0.0.0.0:3478".parse().unwrap(),
                    "[::1]:41000".parse().unwrap(),
                ],
                tcp: vec!["0.0.0.0:3478".parse().unwrap()],
                tls: vec!["0.0.0.0:443".parse().unwrap()],
            },
            Some("127.0.0.1:8080".parse().unwrap()),
            &relays,
            (49152, 49200),
            &[NatDiscovery {
                primary: "192.0.2.1:3478".parse().unwrap(),
                alternate: "192.0.2.2:3479".parse().unwrap(),
                tcp: true,
            }],
        )
    }

    #[test]
    fn readiness_json_names_pid_listeners_api_relays_ports_and_discovery() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "pid": std::process::id(),
                "listen": [
                    {"transport": "udp", "addr": "0.0.0.0:3478"},
                    {"transport": "udp", "addr": "[::1]:41000"},
                    {"transport": "tcp", "addr": "0.0.0.0:3478"},
                    {"transport": "tls", "addr": "0.0.0.0:443"},
                ],
                "api": "127.0.0.1:8080",
                "relay": [
                    {"local": "10.0.0.5", "advertised": "203.0.113.7"},
                    {"local": "2001:db8::5", "advertised": "2001:db8::5"},
                ],
                "relay_ports": {"min": 49152, "max": 49200},
                "nat_discovery": [
                    {"primary": "192.0.2.1:3478", "alternate": "192.0.2.2:3479", "tcp": true},
                ],
            })
        );
        let no_api = Readiness {
            api: None,
            ..sample()
        };
        let v: serde_json::Value = serde_json::from_str(&no_api.to_json()).unwrap();
        assert!(v["api"].is_null(), "{v}");
    }

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(tag: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("turnpike-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_ready_file_replaces_an_old_one_and_leaves_no_temp_file() {
        let dir = temp_dir("ready-write");
        let path = dir.0.join("ready.json");
        std::fs::write(&path, "left by an earlier run").unwrap();
        sample().write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), sample().to_json());
        assert_eq!(entries(&dir.0), ["ready.json"]);
        drop(ReadyFile(path));
        assert!(entries(&dir.0).is_empty(), "removed on drop");
    }

    #[test]
    fn a_ready_file_that_cannot_be_written_is_an_error_and_leaves_nothing() {
        let dir = temp_dir("ready-fail");
        // The target is a directory: the rename fails after the temp file was written.
        let path = dir.0.join("taken");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), "").unwrap();
        assert!(sample().write(&path).is_err());
        assert_eq!(entries(&dir.0), ["taken"], "the temp file is gone");
        assert!(sample().write(&dir.0.join("missing/ready.json")).is_err());
        assert!(
            sample().write(Path::new("/")).is_err(),
            "a path without a file name"
        );
    }
}

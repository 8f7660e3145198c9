//! The control plane: signals (reload, drain), sd_notify, and the HTTP API with metrics and
//! health. It runs on the main thread's own runtime and talks to shards only through commands,
//! so nothing here can slow the packet path.

pub mod api;
pub mod client;
pub mod credentials;
pub mod fleet;
pub mod metrics;
pub mod notify;
pub mod probe;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, ConfigError};
use crate::io::connection::{StreamPolicy, StreamSettings};
use crate::io::shard::{ShardCommand, ShardReport};
use crate::io::tls::{ServedCertificate, TlsError, EXPIRY_WARNING_SECS};
use crate::proto::auth::Unrevoked;
use crate::proto::server::{CoreConfig, SessionInfo, Shared};

/// How long the control plane waits for a shard to answer before reporting it as stuck.
const SHARD_TIMEOUT: Duration = Duration::from_secs(2);

/// What a static-user revocation means, for the API's answer and the log.
pub const STATIC_REVOCATION_RULE: &str = "refused until POST /api/v1/unrevoke, or until a \
     reload whose configuration changes or removes this user's password or key";

/// What a REST revocation means.
pub const REST_REVOCATION_RULE: &str = "REST credentials of this user that expire at or before \
     refused_until are refused, across reloads, until POST /api/v1/unrevoke";

/// Seconds since the Unix epoch, 0 if the clock is set before it: the one wall-clock read
/// behind REST expiries, revocations and minted credentials (the core gets it as an argument).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What `ControlState::revoke` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// Allocations ended.
    pub ended: usize,
    /// REST credentials of the user expiring at or before this unix time are refused.
    pub until: u64,
    /// The name is a static user, now refused until un-revoked or her credential changes.
    pub static_user: bool,
}

/// Command channels to every shard.
pub struct Shards {
    senders: Vec<mpsc::UnboundedSender<ShardCommand>>,
}

impl Shards {
    pub fn new(senders: Vec<mpsc::UnboundedSender<ShardCommand>>) -> Self {
        Shards { senders }
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    fn send_all(&self, make: impl Fn() -> ShardCommand) {
        for s in &self.senders {
            let _ = s.send(make());
        }
    }

    /// Asks every shard and collects the answers of those that reply in time.
    async fn ask<T>(&self, make: impl Fn(oneshot::Sender<T>) -> ShardCommand) -> Vec<Option<T>> {
        let mut waiting = Vec::new();
        for s in &self.senders {
            let (tx, rx) = oneshot::channel();
            let _ = s.send(make(tx));
            waiting.push(rx);
        }
        let mut out = Vec::new();
        for rx in waiting {
            out.push(
                tokio::time::timeout(SHARD_TIMEOUT, rx)
                    .await
                    .ok()
                    .and_then(Result::ok),
            );
        }
        out
    }

    pub fn set_config(&self, config: &Arc<CoreConfig>) {
        self.send_all(|| ShardCommand::SetConfig(Arc::clone(config)));
    }

    pub fn drain(&self) {
        self.send_all(|| ShardCommand::Drain);
    }

    /// Every shard's counters; None for a shard that did not answer (stuck).
    pub async fn reports(&self) -> Vec<Option<ShardReport>> {
        self.ask(ShardCommand::Report).await
    }

    pub async fn sessions(&self) -> Vec<(usize, SessionInfo)> {
        let answers = self.ask(ShardCommand::Sessions).await;
        answers
            .into_iter()
            .enumerate()
            .flat_map(|(shard, s)| s.unwrap_or_default().into_iter().map(move |i| (shard, i)))
            .collect()
    }

    pub async fn kill(&self, shard: usize, slot: u32, gen: u32) -> bool {
        let Some(sender) = self.senders.get(shard) else {
            return false;
        };
        let (tx, rx) = oneshot::channel();
        let _ = sender.send(ShardCommand::Kill {
            slot,
            gen,
            reply: tx,
        });
        matches!(tokio::time::timeout(SHARD_TIMEOUT, rx).await, Ok(Ok(true)))
    }

    pub async fn end_user(&self, user: &str) -> usize {
        self.ask(|reply| ShardCommand::EndUser {
            user: user.to_owned(),
            reply,
        })
        .await
        .into_iter()
        .flatten()
        .sum()
    }
}

/// The configuration in force and what was derived from it; replaced whole on reload.
pub struct Live {
    pub config: Config,
    pub core: Arc<CoreConfig>,
    pub rest_secrets: Vec<Vec<u8>>,
    pub api_token: Option<String>,
    /// Generated at start when no credentials were configured; kept across reloads that still
    /// configure none, so minted quick-start credentials stay valid.
    pub ephemeral_secret: Option<Vec<u8>>,
}

/// Rebuilds the core configuration from a freshly loaded file. The caller checks restart-only keys.
pub type CoreBuilder =
    dyn Fn(&Config, Vec<Vec<u8>>) -> Result<CoreConfig, ReloadError> + Send + Sync;

/// Why a reload left the previous configuration in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file, or a secret or token file it names, is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The core could not be built from the new file.
    #[error("{0}")]
    Core(Box<dyn std::error::Error + Send + Sync>),
    /// The TLS certificate or key named by the file cannot be served.
    #[error("tls certificate: {0}")]
    Tls(#[from] TlsError),
}

/// The rules for new TCP and TLS connections, as the file sets them.
pub fn stream_policy(config: &Config) -> StreamPolicy {
    StreamPolicy {
        idle: Duration::from_secs(config.limits.connection_idle_secs),
        setup_timeout: Duration::from_secs(config.tls.handshake_timeout_secs),
        trusted_proxies: config.proxy_protocol.trusted.clone(),
    }
}

/// The certificate `[tls]` names, loaded and checked; None when the file names none.
pub fn load_certificate(config: &Config) -> Result<Option<ServedCertificate>, TlsError> {
    let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) else {
        return Ok(None);
    };
    let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
    ServedCertificate::load(cert, key, now).map(Some)
}

/// What an operator should hear about a certificate that loads: an expiry within 14 days, and
/// a `public_host` (the name minted `turns:` URIs carry) that the certificate does not cover,
/// which browsers refuse.
pub fn certificate_warnings(config: &Config, cert: &ServedCertificate) -> Vec<String> {
    let mut out = Vec::new();
    let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
    let left = cert.remaining_secs(now);
    if left < EXPIRY_WARNING_SECS {
        out.push(format!(
            "the TLS certificate expires in {} days; renew it and reload (systemctl reload turnpike)",
            left / 86400
        ));
    }
    let names = cert.names.join(", ");
    if config.public_host.is_empty() {
        out.push(format!(
            "public_host is empty, so minted turns: URIs name the relay address; set it to the \
             certificate's name ({names})"
        ));
    } else if !cert
        .names
        .iter()
        .any(|n| crate::io::tls::name_covers(n, &config.public_host))
    {
        out.push(format!(
            "the TLS certificate does not cover public_host {:?} (it names: {names}); clients \
             checking the name will refuse turns: URIs",
            config.public_host
        ));
    }
    out
}

pub struct ControlState {
    pub shards: Shards,
    pub shared: Arc<Shared>,
    /// The usage file, reopened on every reload (logrotate's postrotate).
    pub usage: Option<crate::io::usage::UsageLog>,
    /// `[fleet]`: where revocations are published; set once the control runtime runs.
    pub fleet: std::sync::OnceLock<fleet::Fleet>,
    pub live: Mutex<Live>,
    pub config_path: PathBuf,
    pub build_core: Box<CoreBuilder>,
    pub draining: AtomicBool,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub relay_port_span: u64,
    pub advertised: Option<std::net::IpAddr>,
    /// The bound listeners (a configured port 0 resolved), for minted URIs.
    pub listeners: credentials::Listeners,
    /// What the TCP and TLS listeners share: the certificate, connection limits and rules,
    /// which a reload replaces.
    pub streams: Arc<StreamSettings>,
    pub started: Instant,
}

impl ControlState {
    pub fn lock_live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SIGHUP: re-read the file; apply secrets, users, peer policy, limits and the API token to
    /// every shard without touching allocations. A broken file changes nothing.
    pub fn reload(&self) -> Result<(), ReloadError> {
        // Whatever the file says now: a rotated usage file must not be written to on.
        if let Some(usage) = &self.usage {
            usage.reopen();
        }
        let result = self.try_reload();
        match &result {
            Ok(()) => {
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(path = %self.config_path.display(), "configuration reloaded");
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %self.config_path.display(), error = %e, "reload refused; the previous configuration stays in force");
            }
        }
        result
    }

    fn try_reload(&self) -> Result<(), ReloadError> {
        let config = Config::load(&self.config_path)?;
        warn_about_permissions(&config, &self.config_path);
        let mut secrets = config.load_rest_secrets()?;
        let nonce_keys = config.load_nonce_keys()?;
        let api_token = config.load_api_token()?;
        let mut live = self.lock_live();
        let old = &live.config;
        let restart_only = [
            ("listen", old.listen != config.listen),
            ("tcp_listen", old.tcp_listen != config.tcp_listen),
            ("tls_listen", old.tls_listen != config.tls_listen),
            (
                "proxy_protocol.listeners",
                old.proxy_protocol.listeners != config.proxy_protocol.listeners,
            ),
            ("threads", old.threads != config.threads),
            ("relay", old.relay != config.relay),
            ("api.listen", old.api.listen != config.api.listen),
            ("nat_discovery", old.nat_discovery != config.nat_discovery),
            ("usage", old.usage != config.usage),
            ("fleet", old.fleet != config.fleet),
            (
                "auth.nonce_lifetime_secs",
                old.auth.nonce_lifetime_secs != config.auth.nonce_lifetime_secs,
            ),
        ];
        for (key, changed) in restart_only {
            if changed {
                tracing::warn!(
                    key,
                    "changed in the file, but takes effect only after a restart"
                );
            }
        }
        if secrets.is_empty() && config.auth.users.is_empty() {
            if let Some(s) = &live.ephemeral_secret {
                secrets.push(s.clone());
            }
        }
        let mut core = (self.build_core)(&config, secrets.clone())?;
        // The listeners serving TLS are the running ones: a file without them waits for a restart.
        let certificate = match &self.streams.tls {
            Some(_) => load_certificate(&config)?,
            None => None,
        };
        for warning in certificate
            .iter()
            .flat_map(|c| certificate_warnings(&config, c))
        {
            tracing::warn!("{warning}");
        }
        // Revocations outlive reloads: a revoked user must stay refused.
        core.auth.carry_revocations_from(&live.core.auth);
        let core = Arc::new(core);
        self.shards.set_config(&core);
        if let (Some(tls), Some(certificate)) = (&self.streams.tls, certificate) {
            tls.replace(certificate);
        }
        let limits = &config.limits;
        self.streams
            .gate
            .set_limits(limits.connections_total, limits.connections_per_source);
        self.streams.set_policy(stream_policy(&config));
        match (nonce_keys.is_empty(), live.config.nonce_keys_configured()) {
            (false, _) => self.shared.set_nonce_keys(&nonce_keys),
            (true, true) => tracing::warn!(
                "auth.nonce_key_file and auth.nonce_key_env are no longer set: the shared nonce \
                 keys stay in force until a restart"
            ),
            // Still this process's own random key.
            (true, false) => {}
        }
        live.config = config;
        live.core = core;
        live.rest_secrets = secrets;
        live.api_token = api_token;
        Ok(())
    }

    /// Refuses a user's REST credentials until every one minted now would have expired, refuses
    /// the static user of that name (if any) until un-revoked or her credential changes on a
    /// reload, and ends their allocations. Also prunes REST revocations that have run out.
    pub async fn revoke(&self, user: &str, now_unix: u64) -> Revoked {
        let (until, static_user) = {
            let mut live = self.lock_live();
            let until = now_unix + live.config.auth.rest_max_ttl_secs;
            let mut core = (*live.core).clone();
            core.auth.prune_revocations(now_unix);
            core.auth.revoke_user(user, until);
            let static_user = core.auth.revoke_static_user(user);
            let core = Arc::new(core);
            self.shards.set_config(&core);
            live.core = core;
            (until, static_user)
        };
        let ended = self.shards.end_user(user).await;
        tracing::info!(user, ended, static_user, "user revoked");
        Revoked {
            ended,
            until,
            static_user,
        }
    }

    /// Lifts every revocation of `user` (REST and static). Shards get a new configuration only
    /// when something changed.
    pub fn unrevoke(&self, user: &str) -> Unrevoked {
        let mut live = self.lock_live();
        let mut core = (*live.core).clone();
        let lifted = core.auth.unrevoke_user(user);
        if lifted != Unrevoked::default() {
            let core = Arc::new(core);
            self.shards.set_config(&core);
            live.core = core;
            tracing::info!(
                user,
                rest = lifted.rest,
                static_user = lifted.static_user,
                "user un-revoked"
            );
        }
        lifted
    }

    /// Drops REST revocations whose covered credentials have all expired; returns how many.
    /// Shards get a new configuration only when there was something to drop.
    pub fn prune_revocations(&self, now_unix: u64) -> usize {
        let mut live = self.lock_live();
        let n = live.core.auth.prunable_revocations(now_unix);
        if n > 0 {
            let mut core = (*live.core).clone();
            core.auth.prune_revocations(now_unix);
            let core = Arc::new(core);
            self.shards.set_config(&core);
            live.core = core;
            tracing::debug!(pruned = n, "expired revocations dropped");
        }
        n
    }
}

/// Logs a WARN for each file holding secrets that others may read or change (see
/// `Config::permission_warnings`); at start and on every reload.
pub fn warn_about_permissions(config: &Config, config_path: &std::path::Path) {
    for w in config.permission_warnings(config_path) {
        tracing::warn!(
            key = w.key,
            path = %w.path.display(),
            mode = %format_args!("{:04o}", w.mode),
            "{}",
            w.message
        );
    }
}

/// Waits for SIGTERM/SIGINT (drain, then return) while handling SIGHUP (reload), the watchdog
/// and status lines. A second SIGTERM/SIGINT ends the drain at once.
pub async fn run_until_stopped(state: Arc<ControlState>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let watchdog = notify::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                notify::reloading();
                let result = state.reload();
                notify::ready(&match result {
                    Ok(()) => "configuration reloaded".to_string(),
                    Err(e) => format!("reload refused: {e}"),
                });
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                // Only a server whose shards all answer is alive.
                if state.shards.reports().await.iter().all(Option::is_some) {
                    notify::watchdog();
                }
            }
            _ = status_tick.tick() => {
                notify::status(&format!("serving {} allocations", state.shared.total_allocations()));
                state.prune_revocations(unix_now());
            }
        }
    }
    drain(&state, &mut term, &mut int).await;
    Ok(())
}

async fn drain(
    state: &ControlState,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) {
    let drain_for = Duration::from_secs(state.lock_live().config.drain_secs);
    state.draining.store(true, Ordering::Relaxed);
    state.shards.drain();
    notify::stopping();
    let deadline = tokio::time::Instant::now() + drain_for;
    tracing::info!(
        allocations = state.shared.total_allocations(),
        drain_secs = drain_for.as_secs(),
        "draining: new allocations refused, existing ones relay until they end or the drain time is up"
    );
    loop {
        if state.shared.total_allocations() == 0 {
            tracing::info!("drained: no allocation left");
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                tracing::info!(allocations = state.shared.total_allocations(), "drain time is up");
                return;
            }
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::{core_config, ResolvedRelays};
    use crate::proto::auth::{AuthReject, LongTermKey, PasswordAlgorithm};
    use crate::proto::server::RelayAddress;

    const NOW: u64 = 1_700_000_000;
    const SECRET: &str = "0123456789abcdef-control-test";

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config_text(password: &str) -> String {
        format!(
            "realm = \"r\"\n[relay]\naddress = \"127.0.0.1\"\n[auth]\nsecret_file = \"secret\"\n\
             rest_max_ttl_secs = 3600\n[[auth.users]]\nname = \"alice\"\npassword = \"{password}\"\n"
        )
    }

    /// A control plane with no shards, on a config file in a temp dir.
    fn state(tag: &str) -> (Dir, ControlState) {
        let dir =
            std::env::temp_dir().join(format!("turnpike-control-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), SECRET).unwrap();
        let path = dir.join("turnpike.toml");
        std::fs::write(&path, config_text("one")).unwrap();
        let config = Config::load(&path).unwrap();
        let relays = ResolvedRelays {
            v4: Some(RelayAddress {
                local: [127, 0, 0, 1].into(),
                advertised: [127, 0, 0, 1].into(),
            }),
            v6: None,
        };
        let build = move |c: &Config, s: Vec<Vec<u8>>| {
            core_config(c, &relays, s, &[], &[]).map_err(|e| ReloadError::Core(Box::new(e)))
        };
        let secrets = config.load_rest_secrets().unwrap();
        let core = Arc::new(build(&config, secrets.clone()).unwrap());
        let policy = stream_policy(&config);
        let state = ControlState {
            shards: Shards::new(Vec::new()),
            shared: Arc::new(Shared::new([1; 32], 600, Instant::now(), NOW)),
            usage: None,
            fleet: Default::default(),
            live: Mutex::new(Live {
                config,
                core,
                rest_secrets: secrets,
                api_token: None,
                ephemeral_secret: None,
            }),
            config_path: path,
            build_core: Box::new(build),
            draining: AtomicBool::new(false),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            relay_port_span: 1,
            advertised: None,
            listeners: credentials::Listeners::default(),
            streams: StreamSettings::new(None, crate::io::gate::ConnectionGate::new(1, 0), policy),
            started: Instant::now(),
        };
        (Dir(dir), state)
    }

    fn check(state: &ControlState, username: &str, now: u64) -> Result<(), AuthReject> {
        let mut out: Vec<LongTermKey> = Vec::new();
        let live = state.lock_live();
        live.core
            .auth
            .candidate_keys(username, PasswordAlgorithm::Md5, now, &mut out)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn revoke_prunes_and_the_tick_prunes_expired_rest_revocations() {
        let (_dir, s) = state("prune");
        let r = block_on(s.revoke("bob", NOW));
        assert_eq!((r.until, r.static_user, r.ended), (NOW + 3600, false, 0));
        let bob = format!("{}:bob", NOW + 60);
        assert_eq!(check(&s, &bob, NOW), Err(AuthReject::Revoked));
        // Nothing to prune while a covered credential can still be valid.
        assert_eq!(s.prune_revocations(NOW + 3600), 0);
        assert_eq!(check(&s, &bob, NOW), Err(AuthReject::Revoked));
        // The periodic prune drops it once every covered credential has expired.
        assert_eq!(s.prune_revocations(NOW + 3601), 1);
        assert!(format!("{:?}", s.lock_live().core.auth).contains("revoked_users: 0"));
        // A revoke prunes too: carol's old entry goes when dave is revoked later.
        block_on(s.revoke("carol", NOW));
        block_on(s.revoke("dave", NOW + 4000));
        let auth = format!("{:?}", s.lock_live().core.auth);
        assert!(auth.contains("revoked_users: 1"), "{auth}");
        // Static revocations are never pruned by time.
        assert!(block_on(s.revoke("alice", NOW)).static_user);
        assert_eq!(s.prune_revocations(u64::MAX), 2);
        assert_eq!(check(&s, "alice", u64::MAX), Err(AuthReject::Revoked));
    }

    #[test]
    fn static_revocation_survives_a_plain_reload_and_ends_with_unrevoke_or_a_new_password() {
        let (dir, s) = state("static");
        assert!(check(&s, "alice", NOW).is_ok());
        let r = block_on(s.revoke("alice", NOW));
        assert!(r.static_user);
        assert_eq!(check(&s, "alice", NOW), Err(AuthReject::Revoked));
        // REST credentials with her name are revoked too.
        let rest = format!("{}:alice", NOW + 60);
        assert_eq!(check(&s, &rest, NOW), Err(AuthReject::Revoked));

        // A reload of the same file keeps both.
        s.reload().unwrap();
        assert_eq!(check(&s, "alice", NOW), Err(AuthReject::Revoked));
        assert_eq!(check(&s, &rest, NOW), Err(AuthReject::Revoked));
        // Un-revoke lifts both, and only sends a new config when something changed.
        let lifted = s.unrevoke("alice");
        assert!(lifted.rest && lifted.static_user);
        assert!(check(&s, "alice", NOW).is_ok());
        assert!(check(&s, &rest, NOW).is_ok());
        assert_eq!(s.unrevoke("alice"), Unrevoked::default());

        // Revoked again, then a reload with a new password lifts the static part only.
        block_on(s.revoke("alice", NOW));
        std::fs::write(dir.0.join("turnpike.toml"), config_text("two")).unwrap();
        s.reload().unwrap();
        assert!(check(&s, "alice", NOW).is_ok());
        assert_eq!(check(&s, &rest, NOW), Err(AuthReject::Revoked));
    }
}

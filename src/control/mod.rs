//! The control plane: signals (reload, drain), sd_notify, and the HTTP API with metrics and
//! health. It runs on the main thread's own runtime and talks to shards only through commands,
//! so nothing here can slow the packet path.

pub mod api;
pub mod client;
pub mod credentials;
pub mod metrics;
pub mod notify;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::io::shard::{ShardCommand, ShardReport};
use crate::proto::server::{CoreConfig, SessionInfo, Shared};

/// How long the control plane waits for a shard to answer before reporting it as stuck.
const SHARD_TIMEOUT: Duration = Duration::from_secs(2);

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
pub type CoreBuilder = dyn Fn(&Config, Vec<Vec<u8>>) -> Result<CoreConfig, String> + Send + Sync;

pub struct ControlState {
    pub shards: Shards,
    pub shared: Arc<Shared>,
    pub live: Mutex<Live>,
    pub config_path: PathBuf,
    pub build_core: Box<CoreBuilder>,
    pub draining: AtomicBool,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub relay_port_span: u64,
    pub advertised: Option<std::net::IpAddr>,
    /// The bound UDP listeners (a configured port 0 resolved), for minted URIs.
    pub listeners: Vec<std::net::SocketAddr>,
    pub started: Instant,
}

impl ControlState {
    pub fn lock_live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SIGHUP: re-read the file; apply secrets, users, peer policy, limits and the API token to
    /// every shard without touching allocations. A broken file changes nothing.
    pub fn reload(&self) -> Result<(), String> {
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

    fn try_reload(&self) -> Result<(), String> {
        let config = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        let mut secrets = config.load_rest_secrets().map_err(|e| e.to_string())?;
        let api_token = config.load_api_token().map_err(|e| e.to_string())?;
        let mut live = self.lock_live();
        let old = &live.config;
        let restart_only = [
            ("listen", old.listen != config.listen),
            ("threads", old.threads != config.threads),
            ("relay", old.relay != config.relay),
            ("api.listen", old.api.listen != config.api.listen),
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
        // Revocations outlive reloads: a revoked user must stay refused.
        core.auth.carry_revocations_from(&live.core.auth);
        let core = Arc::new(core);
        self.shards.set_config(&core);
        live.config = config;
        live.core = core;
        live.rest_secrets = secrets;
        live.api_token = api_token;
        Ok(())
    }

    /// Refuses a user's REST credentials until every one minted now would have expired, and ends
    /// their allocations. Returns (allocations ended, refused until unix time).
    pub async fn revoke(&self, user: &str, now_unix: u64) -> (usize, u64) {
        let until = {
            let mut live = self.lock_live();
            let until = now_unix + live.config.auth.rest_max_ttl_secs;
            let mut core = (*live.core).clone();
            core.auth.revoke_user(user, until);
            let core = Arc::new(core);
            self.shards.set_config(&core);
            live.core = core;
            until
        };
        let ended = self.shards.end_user(user).await;
        tracing::info!(user, ended, "user revoked");
        (ended, until)
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

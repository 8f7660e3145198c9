//! `[fleet]`: instances that share revocations through Redis, and say they are alive.
//!
//! A revoke on one instance (the HTTP API or `turnpike revoke`) is stored in the hash
//! `turnpike:revoked` (user -> the unix time it was revoked) and published on
//! `turnpike:revocations`; every other instance applies it as its own revoke (ends the user's
//! allocations there, refuses her credentials). An instance that was away (restarting, or cut
//! off from Redis) catches up from the hash when it connects. An unrevoke moves the user to
//! `turnpike:unrevoked` and is published the same way. Every few seconds each instance writes `turnpike:instance:NAME`
//! (allocations held, when), expiring unless renewed.
//!
//! The per-user allocation quota holds across the fleet too: with each heartbeat an instance
//! writes its per-key counts to `turnpike:quota:NAME` (expiring with the heartbeat) and reads
//! the others', which its Allocates then add to their own count. It is as fresh as the last
//! heartbeat (up to 5 s behind, so a burst of Allocates across instances can pass the cap by
//! that much); while Redis is away each instance counts only its own.
//!
//! With `[usage] file` set too, every usage record is also added to the stream
//! `turnpike:usage` (fields `instance` and `record`, the file's JSON line; trimmed to about a
//! million entries), for a billing consumer that reads the whole fleet in one place. The file
//! stays the record of truth: what Redis misses while away (beyond 100k queued) is only there.
//!
//! An unrevoke leaves a tombstone in `turnpike:unrevoked`, so an instance cut off at the time
//! lifts the revocation when it is back; a Redis that lost its data lifts nothing.
//!
//! Redis is never on the packet path, nor on the API's: one thread of its own talks to it, and
//! the API hands it what to publish through a bounded queue. While Redis is unreachable the
//! instance serves with its own view, says so once in the log, exports
//! `turnpike_fleet_connected 0`, and publishes what it queued once Redis is back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{unix_now, ControlState};

const REVOKED: &str = "turnpike:revoked";
/// User -> when she was un-revoked: what an instance cut off at the time applies when it is back
/// (a tombstone, so that a Redis that lost its data un-revokes nobody).
const UNREVOKED: &str = "turnpike:unrevoked";
const CHANNEL: &str = "turnpike:revocations";
const INSTANCE_PREFIX: &str = "turnpike:instance:";
/// Per instance, a hash of quota key -> units held there (see `QuotaKey::fleet_name`).
const QUOTA_PREFIX: &str = "turnpike:quota:";
/// The names of the instances that have beaten: where the others find their quota hashes
/// without KEYS, which would block a Redis that holds much else.
const MEMBERS: &str = "turnpike:members";
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A heartbeat key outlives three missed beats.
const HEARTBEAT_TTL_SECS: u64 = 15;
/// Revocations waiting for Redis beyond this many are dropped (and logged): they are in force
/// on this instance already.
const QUEUE: usize = 10_000;
/// Usage records waiting for Redis beyond this many are left to the file alone.
const USAGE_QUEUE: usize = 100_000;
/// The stream of usage records, trimmed to about this many entries.
const USAGE_STREAM: &str = "turnpike:usage";
const USAGE_STREAM_LEN: u64 = 1_000_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Revoke(String),
    Unrevoke(String),
}

/// The API's side: what to publish, and whether Redis is there.
pub struct Fleet {
    outgoing: SyncSender<Change>,
    usage: SyncSender<String>,
    connected: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
}

impl Fleet {
    /// Starts the fleet thread for `state` (it stops once the state is gone). `runtime` runs the
    /// revokes other instances publish, as the API runs its own.
    pub fn start(
        url: &str,
        instance: String,
        state: Weak<ControlState>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Fleet, String> {
        let client = redis::Client::open(url).map_err(|e| format!("fleet.redis_url: {e}"))?;
        let (outgoing, queue) = mpsc::sync_channel(QUEUE);
        let (usage, usage_queue) = mpsc::sync_channel(USAGE_QUEUE);
        let connected = Arc::new(AtomicBool::new(false));
        let stopped = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            stopped: Arc::clone(&stopped),
            retry: Vec::new(),
            client,
            instance,
            state,
            runtime,
            queue,
            usage_queue,
            connected: Arc::clone(&connected),
        };
        std::thread::Builder::new()
            .name("turnpike-fleet".into())
            .spawn(move || worker.run())
            .map_err(|e| format!("fleet thread: {e}"))?;
        Ok(Fleet {
            outgoing,
            usage,
            connected,
            stopped,
        })
    }

    /// Where usage records go to be added to the stream `turnpike:usage`.
    pub fn usage_sender(&self) -> SyncSender<String> {
        self.usage.clone()
    }

    /// The daemon is stopping: the thread applies nothing more (the runtime it applies through
    /// is about to go) and ends at its next look.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn revoked(&self, user: &str) {
        self.send(Change::Revoke(user.to_owned()));
    }

    pub fn unrevoked(&self, user: &str) {
        self.send(Change::Unrevoke(user.to_owned()));
    }

    fn send(&self, change: Change) {
        if let Err(TrySendError::Full(c)) = self.outgoing.try_send(change) {
            tracing::error!(change = ?c, "fleet: too many changes waiting for Redis; this one stays local");
        }
    }
}

struct Worker {
    stopped: Arc<AtomicBool>,
    /// Changes a failed publish left over: they go first after the reconnect.
    retry: Vec<Change>,
    client: redis::Client,
    instance: String,
    state: Weak<ControlState>,
    runtime: tokio::runtime::Handle,
    queue: Receiver<Change>,
    usage_queue: Receiver<String>,
    connected: Arc<AtomicBool>,
}

/// A published change, as JSON: who, what, and which instance did it.
fn message(instance: &str, change: &Change) -> String {
    let (op, user) = match change {
        Change::Revoke(u) => ("revoke", u),
        Change::Unrevoke(u) => ("unrevoke", u),
    };
    serde_json::json!({ "op": op, "user": user, "origin": instance }).to_string()
}

impl Worker {
    fn stopping(&self) -> bool {
        self.stopped.load(Ordering::Relaxed) || self.state.strong_count() == 0
    }

    /// The state, unless the daemon is stopping.
    fn live_state(&self) -> Option<Arc<ControlState>> {
        if self.stopped.load(Ordering::Relaxed) {
            return None;
        }
        self.state.upgrade()
    }

    fn run(mut self) {
        let mut backoff = Duration::from_secs(1);
        let mut was_up = None;
        while !self.stopping() {
            let err = self.session(&mut was_up);
            if self.stopping() {
                return;
            }
            self.connected.store(false, Ordering::Relaxed);
            // Alone now: the quota counts what this instance holds, as without a fleet.
            if let Some(state) = self.live_state() {
                state.shared.quotas().set_held_elsewhere(HashMap::new());
            }
            match was_up {
                Some(true) | None => tracing::warn!(
                    error = %err,
                    "fleet: Redis unreachable; serving alone with this instance's revocations until it is back"
                ),
                Some(false) => tracing::debug!(error = %err, "fleet: Redis still unreachable"),
            }
            if was_up == Some(true) {
                backoff = Duration::from_secs(1);
            }
            was_up = Some(false);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Connected until an error: catches up, then publishes, listens and beats.
    fn session(&mut self, was_up: &mut Option<bool>) -> redis::RedisError {
        let connect = || -> redis::RedisResult<redis::Connection> {
            let c = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
            c.set_read_timeout(Some(IO_TIMEOUT))?;
            c.set_write_timeout(Some(IO_TIMEOUT))?;
            Ok(c)
        };
        let (mut commands, mut listen) = match (connect(), connect()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        let mut sub = listen.as_pubsub();
        if let Err(e) = sub.subscribe(CHANNEL) {
            return e;
        }
        // Short reads: the same thread publishes and beats between messages.
        if let Err(e) = sub.set_read_timeout(Some(Duration::from_millis(200))) {
            return e;
        }
        // What this instance did while away goes first, so the catch-up below reads a state
        // that includes it (a revoke here after an unrevoke elsewhere wins, and vice versa).
        let pending = std::mem::take(&mut self.retry);
        for (i, change) in pending.iter().enumerate() {
            if let Err(e) = self.publish(&mut commands, change) {
                self.retry = pending[i..].to_vec();
                return e;
            }
        }
        while let Ok(change) = self.queue.try_recv() {
            if let Err(e) = self.publish(&mut commands, &change) {
                self.retry.push(change);
                return e;
            }
        }
        if let Err(e) = self.catch_up(&mut commands) {
            return e;
        }
        self.connected.store(true, Ordering::Relaxed);
        if *was_up != Some(true) {
            tracing::info!(instance = %self.instance, "fleet: connected to Redis");
        }
        *was_up = Some(true);
        let mut next_beat = Instant::now();
        loop {
            if self.stopping() {
                return redis::RedisError::from((redis::ErrorKind::Client, "shutting down"));
            }
            if Instant::now() >= next_beat {
                if let Err(e) = self.beat(&mut commands) {
                    return e;
                }
                next_beat = Instant::now() + HEARTBEAT;
            }
            loop {
                match self.queue.recv_timeout(Duration::ZERO) {
                    Ok(change) => {
                        if let Err(e) = self.publish(&mut commands, &change) {
                            // Not lost: it goes first after the reconnect.
                            self.retry.push(change);
                            return e;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        return redis::RedisError::from((redis::ErrorKind::Client, "stopped"))
                    }
                }
            }
            // Usage records, a bounded number per round so revocations never wait long.
            for _ in 0..1000 {
                let Ok(record) = self.usage_queue.try_recv() else {
                    break;
                };
                let added = redis::cmd("XADD")
                    .arg(USAGE_STREAM)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(USAGE_STREAM_LEN)
                    .arg("*")
                    .arg("instance")
                    .arg(&self.instance)
                    .arg("record")
                    .arg(&record)
                    .query::<String>(&mut commands);
                if let Err(e) = added {
                    // The file has it; the stream misses this one.
                    return e;
                }
            }
            match sub.get_message() {
                Ok(msg) => {
                    if let Ok(payload) = msg.get_payload::<String>() {
                        self.apply(&payload);
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return e,
            }
        }
    }

    fn publish(&self, con: &mut redis::Connection, change: &Change) -> redis::RedisResult<()> {
        let (set, clear, user) = match change {
            Change::Revoke(user) => (REVOKED, UNREVOKED, user),
            Change::Unrevoke(user) => (UNREVOKED, REVOKED, user),
        };
        redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(set)
            .arg(user)
            .arg(unix_now())
            .ignore()
            .cmd("HDEL")
            .arg(clear)
            .arg(user)
            .ignore()
            .cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(message(&self.instance, change))
            .ignore()
            .query::<()>(con)
    }

    /// Applies every revocation and unrevocation in the hashes: what the others did while this
    /// instance was away.
    fn catch_up(&self, con: &mut redis::Connection) -> redis::RedisResult<()> {
        let revoked: Vec<(String, u64)> = redis::cmd("HGETALL").arg(REVOKED).query(con)?;
        let unrevoked: Vec<(String, u64)> = redis::cmd("HGETALL").arg(UNREVOKED).query(con)?;
        let Some(state) = self.live_state() else {
            return Ok(());
        };
        for (user, _) in unrevoked {
            if state.lock_live().core.auth.is_user_revoked(&user) {
                state.unrevoke(&user);
                tracing::info!(
                    user,
                    "fleet: un-revoked by another instance while this one was away"
                );
            }
        }
        let now = unix_now();
        for (user, revoked_at) in revoked {
            let (already, still_counts) = {
                let live = state.lock_live();
                // A REST revocation runs rest_max_ttl_secs from when it was made (every
                // credential minted before it has expired by then); a static user's holds until
                // an unrevoke.
                let rest_live = revoked_at + live.config.auth.rest_max_ttl_secs > now;
                let auth = &live.core.auth;
                (
                    auth.is_user_revoked(&user),
                    rest_live || auth.is_static_user(&user),
                )
            };
            if !already && still_counts {
                // As of when it was made, so the REST cut-off is the one the others apply.
                self.runtime
                    .block_on(state.revoke(&user, revoked_at.min(now)));
            }
        }
        Ok(())
    }

    fn beat(&self, con: &mut redis::Connection) -> redis::RedisResult<()> {
        let Some(state) = self.live_state() else {
            return Ok(());
        };
        let reports = self.runtime.block_on(state.shards.reports());
        let allocations: usize = reports
            .iter()
            .flatten()
            .map(|r| r.allocations.udp + r.allocations.tcp + r.allocations.tls)
            .sum();
        let beat = serde_json::json!({ "allocations": allocations, "at_unix": unix_now() });
        let quotas = state.shared.quotas();
        let mine = format!("{QUOTA_PREFIX}{}", self.instance);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(format!("{INSTANCE_PREFIX}{}", self.instance))
            .arg(beat.to_string())
            .arg("EX")
            .arg(HEARTBEAT_TTL_SECS)
            .ignore()
            .cmd("SADD")
            .arg(MEMBERS)
            .arg(&self.instance)
            .ignore()
            .cmd("DEL")
            .arg(&mine)
            .ignore();
        let held = quotas.held_here();
        if !held.is_empty() {
            pipe.cmd("HSET").arg(&mine);
            for (key, n) in &held {
                pipe.arg(key).arg(n);
            }
            pipe.ignore()
                .cmd("EXPIRE")
                .arg(&mine)
                .arg(HEARTBEAT_TTL_SECS)
                .ignore();
        }
        pipe.query::<()>(con)?;
        // What the others hold, for the per-user quota. An instance that stopped beating drops
        // out when its hash expires, and from the member set once its heartbeat has too.
        let members: Vec<String> = redis::cmd("SMEMBERS").arg(MEMBERS).query(con)?;
        let mut elsewhere: HashMap<String, u32> = HashMap::new();
        for name in members.iter().filter(|n| **n != self.instance) {
            let alive: bool = redis::cmd("EXISTS")
                .arg(format!("{INSTANCE_PREFIX}{name}"))
                .query(con)?;
            if !alive {
                redis::cmd("SREM").arg(MEMBERS).arg(name).query::<()>(con)?;
                continue;
            }
            let counts: HashMap<String, u32> = redis::cmd("HGETALL")
                .arg(format!("{QUOTA_PREFIX}{name}"))
                .query(con)?;
            for (key, n) in counts {
                *elsewhere.entry(key).or_insert(0) += n;
            }
        }
        quotas.set_held_elsewhere(elsewhere);
        Ok(())
    }

    /// A change another instance published; our own come back too and are skipped.
    fn apply(&self, payload: &str) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) else {
            return tracing::warn!("fleet: ignoring a message that is not JSON");
        };
        if v["origin"].as_str() == Some(&self.instance) {
            return;
        }
        let (Some(op), Some(user)) = (v["op"].as_str(), v["user"].as_str()) else {
            return tracing::warn!("fleet: ignoring a message without op and user");
        };
        let Some(state) = self.live_state() else {
            return;
        };
        let origin = v["origin"].as_str().unwrap_or("?");
        match op {
            "revoke" => {
                let r = self.runtime.block_on(state.revoke(user, unix_now()));
                tracing::info!(
                    user,
                    origin,
                    ended = r.ended,
                    "fleet: revoked by another instance"
                );
            }
            "unrevoke" => {
                state.unrevoke(user);
                tracing::info!(user, origin, "fleet: un-revoked by another instance");
            }
            _ => tracing::warn!(op, "fleet: ignoring an unknown operation"),
        }
    }
}

/// This host's name, for `fleet.instance` left empty.
pub fn default_instance() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into a buffer we own.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = buf.split(|&b| b == 0).next().unwrap_or(&[]);
    match std::str::from_utf8(name) {
        Ok(n) if ok && !n.is_empty() => n.to_owned(),
        _ => format!("turnpike-{}", std::process::id()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_operation_the_user_and_the_origin() {
        let m: serde_json::Value =
            serde_json::from_str(&message("a", &Change::Revoke("alice".into()))).unwrap();
        assert_eq!(
            (m["op"].as_str(), m["user"].as_str(), m["origin"].as_str()),
            (Some("revoke"), Some("alice"), Some("a"))
        );
        let m: serde_json::Value =
            serde_json::from_str(&message("b", &Change::Unrevoke("bob".into()))).unwrap();
        assert_eq!(m["op"], "unrevoke");
        assert!(!default_instance().is_empty());
    }
}

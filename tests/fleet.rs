//! `[fleet]` against a real redis-server on loopback (started here, stopped by PID): a revoke on
//! one instance ends the user's allocations on the other and refuses her there; an instance that
//! starts later catches up; an unrevoke travels too; with Redis gone every instance keeps serving
//! and says so in its metrics.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, Options, TurnClient, PASSWORD, USER};

/// redis-server on a free loopback port, no persistence, stopped by PID when dropped.
struct Redis {
    child: Child,
    url: String,
}

impl Redis {
    fn start() -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server missing in CI"
            );
            eprintln!("skipped: redis-server is not installed (scripts/test.sh installs it)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Some(Redis::start_on(port))
    }

    /// A fresh, empty Redis on `port`.
    fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Redis {
            child,
            url: format!("redis://127.0.0.1:{port}/0"),
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn member(redis: &Redis, name: &'static str) -> Daemon {
    member_with(redis, name, Options::with_api())
}

fn member_with(redis: &Redis, name: &'static str, opts: Options) -> Daemon {
    let url = redis.url.clone();
    let d = Daemon::with(opts.edit(move |c| {
        c.fleet.redis_url = Some(url.clone());
        c.fleet.instance = name.to_owned();
    }));
    d.wait_metric("turnpike_fleet_connected", 1.0, Duration::from_secs(10));
    d
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `d` with Allocates, deleting each one that succeeds, until one gets `code` (None:
/// success): how a test waits for a quota view that follows the heartbeats.
fn wait_for_allocate_outcome(d: &Daemon, code: Option<u16>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = TurnClient::new(d.addr, USER, PASSWORD);
        let r = c.allocate();
        let got = r.outcome().1;
        if r.outcome().0 && code.is_some() {
            c.refresh(0);
        }
        if got == code {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Allocate never answered {code:?}; last {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn allocates(d: &Daemon) -> bool {
    TurnClient::new(d.addr, USER, PASSWORD).allocate().outcome() == (true, None)
}

#[test]
fn a_revoke_on_one_instance_holds_on_all_and_redis_going_away_stops_nothing() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let a = member(&redis, "a");
    let b = member(&redis, "b");
    let mut on_b = TurnClient::new(b.addr, USER, PASSWORD);
    on_b.must_allocate();

    let r = a.api(
        "POST",
        "/api/v1/revoke",
        Some(&format!(r#"{{"user":"{USER}"}}"#)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // b ends her allocation and refuses her from now on.
    b.wait_events("allocation ended", 1, Duration::from_secs(10), |e| {
        e["reason"] == "user revoked"
    });
    assert!(!allocates(&b), "b still allocates for a revoked user");
    assert!(!allocates(&a));

    // An instance that was not there catches up when it connects.
    let c = member(&redis, "c");
    wait_until("c refuses the revoked user", || !allocates(&c));

    // Heartbeats: each instance says it is alive.
    let keys = Command::new("redis-cli")
        .args(["-u", &redis.url, "--raw", "KEYS", "turnpike:instance:*"])
        .output();
    if let Ok(out) = keys {
        let text = String::from_utf8_lossy(&out.stdout);
        for name in ["a", "b", "c"] {
            assert!(
                text.contains(&format!("turnpike:instance:{name}")),
                "{text}"
            );
        }
    }

    // Unrevoke on b: a and c accept her again.
    let r = b.api(
        "POST",
        "/api/v1/unrevoke",
        Some(&format!(r#"{{"user":"{USER}"}}"#)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_until("a accepts her again", || allocates(&a));
    wait_until("c accepts her again", || allocates(&c));

    // Redis goes away: every instance keeps serving alone, and says so.
    redis.stop();
    for d in [&a, &b, &c] {
        wait_until("turnpike_fleet_connected 0", || {
            d.metric("turnpike_fleet_connected") == 0.0
        });
        assert!(allocates(d), "serving without Redis");
    }
    // A revoke while Redis is away still holds where it was made.
    let r = a.api(
        "POST",
        "/api/v1/revoke",
        Some(&format!(r#"{{"user":"{USER}"}}"#)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!allocates(&a));
    // Said once in the log (which the test reads a few ms behind the daemon).
    a.wait_log(Duration::from_secs(5), "the fleet warning", |l| {
        l.contains("Redis unreachable")
    });
    assert!(allocates(&b), "b has not heard of it yet");

    // Redis is back (empty: no persistence): a publishes what it queued, and b follows.
    let port: u16 = redis
        .url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/0")
        .parse()
        .unwrap();
    let _redis = Redis::start_on(port);
    a.wait_metric("turnpike_fleet_connected", 1.0, Duration::from_secs(20));
    wait_until("b refuses her again", || !allocates(&b));
}

#[test]
fn the_per_user_quota_holds_across_the_fleet() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let two = || Options::with_api().edit(|c| c.limits.allocations_per_user = 2);
    let a = member_with(&redis, "qa", two());
    let b = member_with(&redis, "qb", two());
    // Both of the user's allocations (from this source) on a: b refuses a third once a's
    // heartbeat has told it.
    let mut held: Vec<TurnClient> = (0..2)
        .map(|_| TurnClient::new(a.addr, USER, PASSWORD))
        .collect();
    for c in &mut held {
        c.must_allocate();
    }
    wait_for_allocate_outcome(&b, Some(486));
    // a lets go: b allocates again.
    for c in &mut held {
        assert!(c.refresh(0).outcome().0);
    }
    wait_for_allocate_outcome(&b, None);
}

#[test]
fn usage_records_also_go_to_the_fleets_stream() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let dir = common::TempDir::new("fleet-usage");
    let file = dir.path().join("usage.jsonl");
    let path = file.clone();
    let d = member_with(
        &redis,
        "us",
        Options::with_api().edit(move |c| c.usage.file = Some(path.clone())),
    );
    let mut c = TurnClient::new(d.addr, USER, PASSWORD);
    c.must_allocate();
    assert!(c.refresh(0).outcome().0);
    let client = c.local().to_string();
    wait_until("the end record in the stream", || {
        let out = Command::new("redis-cli")
            .args([
                "-u",
                &redis.url,
                "--raw",
                "XRANGE",
                "turnpike:usage",
                "-",
                "+",
            ])
            .output()
            .expect("redis-cli (redis-tools, installed with redis-server)");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().any(|l| {
            l.starts_with('{')
                && serde_json::from_str::<serde_json::Value>(l).is_ok_and(|r| {
                    r["type"] == "end"
                        && r["client"] == client.as_str()
                        && r["reason"] == "deleted by client"
                })
        }) && text.lines().any(|l| l == "us")
    });
    // The file has the same record (written by its own thread, a few ms apart).
    wait_until("the end record in the file", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains(&client))
    });
}

/// A TCP proxy in front of Redis that the test can cut and restore: one instance cut off while
/// the others still reach Redis.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn to(redis: &Redis) -> Proxy {
        use std::sync::atomic::Ordering;
        let target: String = redis
            .url
            .trim_start_matches("redis://")
            .trim_end_matches("/0")
            .into();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, l) = (cut.clone(), live.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: refused while cut
                }
                let Ok(up) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let mut list = l.lock().unwrap();
                list.push(conn.try_clone().unwrap());
                list.push(up.try_clone().unwrap());
                for (mut from, mut to) in [
                    (conn.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, conn),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { addr, cut, live }
    }

    fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn an_instance_cut_off_during_an_unrevoke_lifts_the_revocation_when_it_is_back() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let proxy = Proxy::to(&redis);
    let a = member(&redis, "ua");
    let url = proxy.url();
    let c = Daemon::with(Options::with_api().edit(move |cfg| {
        cfg.fleet.redis_url = Some(url.clone());
        cfg.fleet.instance = "uc".to_owned();
    }));
    c.wait_metric("turnpike_fleet_connected", 1.0, Duration::from_secs(10));
    let body = format!(r#"{{"user":"{USER}"}}"#);
    assert_eq!(a.api("POST", "/api/v1/revoke", Some(&body)).status, 200);
    wait_until("c refuses her", || !allocates(&c));

    proxy.cut();
    wait_until("c is cut off", || {
        c.metric("turnpike_fleet_connected") == 0.0
    });
    assert_eq!(a.api("POST", "/api/v1/unrevoke", Some(&body)).status, 200);
    assert!(allocates(&a));
    assert!(!allocates(&c), "c cannot have heard of it");

    proxy.restore();
    c.wait_metric("turnpike_fleet_connected", 1.0, Duration::from_secs(30));
    wait_until("c accepts her again", || allocates(&c));
}

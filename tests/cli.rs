//! The command line beside `serve`: `credentials` (every format, TTL cap, the minted credential
//! allocating on a running daemon), `verify-credential` (every refusal reason, the password from
//! stdin or a file, never argv), `check-config` (redaction, key and line of a bad file, warnings
//! about secrets others can read), `sessions kill` refusing ids that could smuggle a request,
//! and the shipped systemd unit.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{
    expected_rest_password, out_text, parse_rfc3339_utc, rest_credential, run_cli, unix_now,
    write_config_dir, Daemon, EchoPeer, Options, TempDir, TurnClient, PASSWORD, REALM, SECRET,
    USER,
};
use turnpike::config::UserSecret;

/// Relay ports for configs that no daemon runs with.
const UNUSED_PORTS: (u16, u16) = (40000, 40099);

fn cli_config(opts: &Options) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new("cli");
    let config = write_config_dir(dir.path(), opts, UNUSED_PORTS);
    (dir, config)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Runs the CLI and insists it succeeded; returns stdout.
fn ok(args: &[&str], stdin: Option<&str>) -> String {
    let o = run_cli(args, stdin);
    let (out, err) = out_text(&o);
    assert!(
        o.status.success(),
        "turnpike {args:?} failed ({}):\nstdout: {out}\nstderr: {err}",
        o.status
    );
    out
}

/// Runs the CLI and insists it failed with an exit status (not a signal); returns stderr.
fn fails(args: &[&str], stdin: Option<&str>) -> String {
    let o = run_cli(args, stdin);
    let (out, err) = out_text(&o);
    assert!(
        !o.status.success() && o.status.code().is_some(),
        "turnpike {args:?} should have failed with an exit code ({}):\nstdout: {out}\nstderr: {err}",
        o.status
    );
    err
}

/// Splits a REST username `<expiry>:<user>`.
fn split_rest(username: &str) -> (u64, &str) {
    let (expiry, user) = username.split_once(':').expect("expiry:user");
    (expiry.parse().expect("numeric expiry"), user)
}

// ------------------------------------------------------------------ credentials

#[test]
fn credentials_ice_shape_allocates_on_a_running_daemon() {
    let d = Daemon::start();
    let config = d.client_config();
    let before = unix_now();
    let out = ok(
        &[
            "credentials",
            "--config",
            path(&config),
            "--user",
            "alice",
            "--ttl",
            "1h",
        ],
        None,
    );
    let after = unix_now();
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    let server = &v["iceServers"][0];
    let urls: Vec<&str> = server["urls"]
        .as_array()
        .expect("urls array")
        .iter()
        .map(|u| u.as_str().expect("url string"))
        .collect();
    assert_eq!(
        urls,
        [
            format!("stun:127.0.0.1:{}", d.addr.port()),
            format!("turn:127.0.0.1:{}?transport=udp", d.addr.port())
        ],
        "URIs name the listener on the relay address"
    );
    let username = server["username"].as_str().expect("username");
    let credential = server["credential"].as_str().expect("credential");
    assert_eq!(v["ttl"], 3600);
    let (expiry, user) = split_rest(username);
    assert_eq!(user, "alice");
    assert!(
        (before + 3600..=after + 3600).contains(&expiry),
        "expiry {expiry} is now + 1h"
    );
    let expires_at = v["expires_at"].as_str().expect("expires_at string");
    assert_eq!(
        parse_rfc3339_utc(expires_at),
        Some(expiry),
        "expires_at {expires_at:?} is RFC 3339 UTC and matches the username's expiry"
    );
    assert_eq!(credential, expected_rest_password(username));

    // The daemon accepts it: allocate and relay through an echo peer.
    let peer = EchoPeer::start();
    let mut c = TurnClient::new(d.addr, username, credential);
    c.must_allocate();
    c.must_bind_channel(0x4000, peer.addr);
    c.echo_round_trips(0x4000, 3);
    let created = d.wait_events("allocation created", 1, Duration::from_secs(2), |e| {
        common::field(e, "client") == c.local().to_string()
    });
    assert_eq!(common::field(&created[0], "user"), username);
}

#[test]
fn credentials_rest_and_env_formats_parse() {
    let opts = Options::default().edit(|c| c.public_host = "turn.example.test".into());
    let (_dir, config) = cli_config(&opts);

    let out = ok(
        &[
            "credentials",
            "--config",
            path(&config),
            "--user",
            "bob",
            "--ttl",
            "30m",
            "--format",
            "rest",
        ],
        None,
    );
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    let username = v["username"].as_str().expect("username");
    assert_eq!(split_rest(username).1, "bob");
    assert_eq!(
        v["password"].as_str(),
        Some(&*expected_rest_password(username))
    );
    assert_eq!(v["ttl"], 1800);
    let uris: Vec<&str> = v["uris"]
        .as_array()
        .expect("uris")
        .iter()
        .filter_map(|u| u.as_str())
        .collect();
    // The file's listener port is 0 here (no daemon runs with this file): only the host counts.
    assert!(
        uris.iter()
            .any(|u| u.starts_with("stun:turn.example.test:"))
            && uris
                .iter()
                .any(|u| u.starts_with("turn:turn.example.test:") && u.ends_with("?transport=udp")),
        "URIs use public_host: {uris:?}"
    );

    // --uri overrides the URIs.
    let out = ok(
        &[
            "credentials",
            "--config",
            path(&config),
            "--user",
            "bob",
            "--format",
            "rest",
            "--uri",
            "turn:relay.example.test:3478?transport=udp",
        ],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["uris"],
        serde_json::json!(["turn:relay.example.test:3478?transport=udp"])
    );
    assert_eq!(v["ttl"], 3600, "default TTL is api.default_ttl_secs");

    let env = ok(
        &[
            "credentials",
            "--config",
            path(&config),
            "--user",
            "carol",
            "--ttl",
            "90s",
            "--format",
            "env",
        ],
        None,
    );
    let vars: std::collections::BTreeMap<&str, String> = env
        .lines()
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not K=V: {l:?}"));
            (k, v.trim_matches('\'').to_owned())
        })
        .collect();
    let keys: Vec<&str> = vars.keys().copied().collect();
    assert_eq!(
        keys,
        [
            "TURN_EXPIRES_AT",
            "TURN_PASSWORD",
            "TURN_TTL",
            "TURN_URIS",
            "TURN_USERNAME"
        ]
    );
    assert_eq!(vars["TURN_TTL"], "90");
    let (expiry, user) = split_rest(&vars["TURN_USERNAME"]);
    assert_eq!(user, "carol");
    assert_eq!(parse_rfc3339_utc(&vars["TURN_EXPIRES_AT"]), Some(expiry));
    assert_eq!(
        vars["TURN_PASSWORD"],
        expected_rest_password(&vars["TURN_USERNAME"])
    );
    // And a shell evaluates it to the same values.
    let sh = std::process::Command::new("sh")
        .arg("-c")
        .arg("eval \"$TURNPIKE_ENV\"; printf '%s|%s|%s' \"$TURN_USERNAME\" \"$TURN_PASSWORD\" \"$TURN_URIS\"")
        .env("TURNPIKE_ENV", &env)
        .output()
        .expect("run sh");
    assert_eq!(
        String::from_utf8_lossy(&sh.stdout),
        format!(
            "{}|{}|{}",
            vars["TURN_USERNAME"], vars["TURN_PASSWORD"], vars["TURN_URIS"]
        )
    );
}

#[test]
fn credentials_ttl_above_the_cap_is_an_error() {
    let (_dir, config) = cli_config(&Options::default());
    let c = path(&config);
    // The cap is min(api.max_ttl_secs = 86400, auth.rest_max_ttl_secs = 172800).
    ok(
        &["credentials", "--config", c, "--user", "a", "--ttl", "1d"],
        None,
    );
    let err = fails(
        &[
            "credentials",
            "--config",
            c,
            "--user",
            "a",
            "--ttl",
            "86401",
        ],
        None,
    );
    assert!(err.contains("ttl"), "stderr names the ttl: {err}");
    assert!(err.contains("86400"), "stderr names the cap: {err}");
    fails(
        &["credentials", "--config", c, "--user", "a", "--ttl", "2d"],
        None,
    );
    let err = fails(
        &["credentials", "--config", c, "--user", "a", "--ttl", "5x"],
        None,
    );
    assert!(err.contains("5x"), "{err}");

    // A lower api.max_ttl_secs lowers the cap.
    let (_dir2, config2) = cli_config(
        &Options {
            api: common::Api::NoToken,
            ..Options::default()
        }
        .edit(|c| c.api.max_ttl_secs = 7200),
    );
    let c2 = path(&config2);
    ok(
        &["credentials", "--config", c2, "--user", "a", "--ttl", "2h"],
        None,
    );
    let err = fails(
        &["credentials", "--config", c2, "--user", "a", "--ttl", "3h"],
        None,
    );
    assert!(err.contains("7200"), "stderr names the cap: {err}");
    // The secret never shows, even in errors.
    assert!(!err.contains(SECRET));
}

// ------------------------------------------------------------------ verify-credential

/// `verify-credential` with the password on stdin (`--password -`).
fn verify(config: &Path, username: &str, password: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "verify-credential",
        "--config",
        path(config),
        "--username",
        username,
        "--password",
        "-",
    ];
    args.extend_from_slice(extra);
    run_cli(&args, Some(&format!("{password}\n")))
}

fn refused(o: &std::process::Output, reason: &str) {
    let (out, err) = out_text(o);
    assert!(
        !o.status.success() && o.status.code().is_some(),
        "expected a refusal ({reason}), got {}:\n{out}{err}",
        o.status
    );
    assert!(
        err.to_lowercase().contains(reason),
        "stderr should say {reason:?}: {err}"
    );
    assert!(!err.contains(SECRET) && !out.contains(SECRET));
}

#[test]
fn verify_credential_accepts_good_pairs_and_names_each_refusal() {
    let (_dir, config) = cli_config(&Options::default());
    let now = unix_now();

    let (u, p) = rest_credential("alice", now + 600);
    let o = verify(&config, &u, &p, &[]);
    assert!(o.status.success(), "{:?}", out_text(&o));
    assert!(out_text(&o).0.contains("accepted"), "{:?}", out_text(&o));
    let o = verify(&config, USER, PASSWORD, &[]);
    assert!(o.status.success(), "{:?}", out_text(&o));
    let o = verify(&config, USER, PASSWORD, &["--realm", REALM]);
    assert!(o.status.success(), "the right realm: {:?}", out_text(&o));

    let (u, p) = rest_credential("alice", now - 60);
    refused(&verify(&config, &u, &p, &[]), "expired");
    let (u, p) = rest_credential("alice", now + common::REST_MAX_TTL_SECS + 3600);
    refused(&verify(&config, &u, &p, &[]), "too far ahead");
    let (u, _) = rest_credential("alice", now + 600);
    let (_, other) = rest_credential("alice", now + 601);
    refused(
        &verify(&config, &u, &other, &[]),
        "no configured rest secret matches",
    );
    refused(
        &verify(&config, USER, "not-the-password", &[]),
        "wrong password",
    );
    refused(
        &verify(&config, USER, PASSWORD, &["--realm", "other.realm"]),
        "wrong realm",
    );
    // Not a static user, not a REST username.
    refused(&verify(&config, "mallory", "x", &[]), "unknown user");

    // Without any REST secret, a REST-looking name is an unknown user.
    let dir = TempDir::new("cli-nosecret");
    let text = Options::default()
        .edit(|c| c.auth.secret_file = None)
        .config_text(UNUSED_PORTS);
    let bare = dir.path().join("turnpike.toml");
    std::fs::write(&bare, text).unwrap();
    let (u, p) = rest_credential("alice", now + 600);
    refused(&verify(&bare, &u, &p, &[]), "unknown user");
}

#[test]
fn verify_credential_reads_the_password_from_stdin() {
    let (_dir, config) = cli_config(&Options::default());
    let (u, p) = rest_credential("dave", unix_now() + 600);
    let args = [
        "verify-credential",
        "--config",
        path(&config),
        "--username",
        &u,
        "--password",
        "-",
    ];
    let out = ok(&args, Some(&format!("{p}\n")));
    assert!(out.contains("dave"), "{out}");
    assert!(!out.contains(&p), "the password is not echoed: {out}");
    // The wrong password on stdin is refused, so stdin was really read.
    let o = run_cli(&args, Some("bm90LXRoZS1wYXNzd29yZA==\n"));
    refused(&o, "no configured rest secret matches");
    // Static user through stdin, without a trailing newline.
    let out = ok(
        &[
            "verify-credential",
            "--config",
            path(&config),
            "--username",
            USER,
            "--password",
            "-",
        ],
        Some(PASSWORD),
    );
    assert!(out.contains("static user"), "{out}");
}

#[test]
fn verify_credential_refuses_a_password_on_the_command_line() {
    let (_dir, config) = cli_config(&Options::default());
    let (u, p) = rest_credential("erin", unix_now() + 600);
    let args = [
        "verify-credential",
        "--config",
        path(&config),
        "--username",
        &u,
        "--password",
        &p,
    ];
    // Refused even though the pair is good.
    let err = fails(&args, None);
    assert!(err.contains("command line"), "says why: {err}");
    assert!(
        err.contains("--password -") && err.contains("--password-file"),
        "says how to pass it instead: {err}"
    );
    assert!(!err.contains(&p), "the password is not echoed: {err}");
    // A static user's password too; and giving no password at all is a usage error.
    let err = fails(
        &[
            "verify-credential",
            "--config",
            path(&config),
            "--username",
            USER,
            "--password",
            PASSWORD,
        ],
        None,
    );
    assert!(!err.contains(PASSWORD), "{err}");
    let err = fails(
        &[
            "verify-credential",
            "--config",
            path(&config),
            "--username",
            USER,
        ],
        None,
    );
    assert!(err.contains("--password"), "{err}");
}

#[test]
fn verify_credential_reads_the_password_from_a_file() {
    let (dir, config) = cli_config(&Options::default());
    let (u, p) = rest_credential("frank", unix_now() + 600);
    let file = dir.path().join("password");
    std::fs::write(&file, format!("{p}\r\n")).unwrap();
    let out = ok(
        &[
            "verify-credential",
            "--config",
            path(&config),
            "--username",
            &u,
            "--password-file",
            path(&file),
        ],
        None,
    );
    assert!(out.contains("frank") && !out.contains(&p), "{out}");
    std::fs::write(&file, PASSWORD).unwrap();
    let o = run_cli(
        &[
            "verify-credential",
            "--config",
            path(&config),
            "--username",
            USER,
            "--password-file",
            path(&file),
        ],
        None,
    );
    assert!(o.status.success(), "{:?}", out_text(&o));
    std::fs::write(&file, "not-the-password\n").unwrap();
    let o = run_cli(
        &[
            "verify-credential",
            "--config",
            path(&config),
            "--username",
            USER,
            "--password-file",
            path(&file),
        ],
        None,
    );
    refused(&o, "wrong password");
    // A missing file names the file; both sources at once is a usage error.
    let missing = dir.path().join("missing-password");
    let err = fails(
        &[
            "verify-credential",
            "--config",
            path(&config),
            "--username",
            USER,
            "--password-file",
            path(&missing),
        ],
        None,
    );
    assert!(err.contains("missing-password"), "{err}");
    fails(
        &[
            "verify-credential",
            "--config",
            path(&config),
            "--username",
            USER,
            "--password",
            "-",
            "--password-file",
            path(&file),
        ],
        Some(PASSWORD),
    );
}

// ------------------------------------------------------------------ check-config

#[test]
fn check_config_prints_the_effective_config_with_passwords_redacted() {
    let opts = Options {
        extra_users: vec![("bob".into(), "bob-secret-password-42".into())],
        api: common::Api::Token,
        ..Options::default()
    };
    let (_dir, config) = cli_config(&opts);
    let out = ok(&["check-config", "--config", path(&config)], None);
    assert!(out.contains("valid"), "{out}");
    // The effective config parses as TOML and carries the values set in the file.
    let body: String = out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let v: toml::Value = toml::from_str(&body).unwrap_or_else(|e| panic!("not TOML ({e}):\n{out}"));
    assert_eq!(v["realm"].as_str(), Some(REALM));
    assert_eq!(v["relay"]["port_min"].as_integer(), Some(40000));
    let users = v["auth"]["users"].as_array().expect("users listed");
    let names: Vec<&str> = users.iter().filter_map(|u| u["name"].as_str()).collect();
    assert_eq!(names, [USER, "bob"]);
    for secret in [
        PASSWORD,
        "bob-secret-password-42",
        SECRET,
        common::API_TOKEN,
    ] {
        assert!(!out.contains(secret), "{secret:?} leaked:\n{out}");
    }
}

#[test]
fn check_config_names_key_and_line_of_a_bad_file() {
    let dir = TempDir::new("cli-bad");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "realm = \"x\"\n\n[limits]\nallocations_per_user = 3\ntotal_alocations = 5\n",
    )
    .unwrap();
    let err = fails(&["check-config", "--config", path(&bad)], None);
    assert!(err.contains("total_alocations"), "names the key: {err}");
    assert!(
        err.contains(&format!("{}:5", bad.display())),
        "names file and line 5: {err}"
    );

    // A bad value: key and line too.
    std::fs::write(
        &bad,
        "realm = \"x\"\nthreads = 1\n[limits]\nmax_lifetime_secs = 5\n",
    )
    .unwrap();
    let err = fails(&["check-config", "--config", path(&bad)], None);
    assert!(err.contains("max_lifetime_secs"), "names the key: {err}");
    assert!(
        err.contains(&format!("{}:4", bad.display())),
        "line 4: {err}"
    );

    // A missing file names the file.
    let missing = dir.path().join("missing.toml");
    let err = fails(&["check-config", "--config", path(&missing)], None);
    assert!(err.contains("missing.toml"), "{err}");
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The WARN lines `check-config` prints on stderr.
fn warnings(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.contains("WARN")).collect()
}

/// A config with a TLS listener serving `cert` (key and chain from `key_of`), public_host set.
fn tls_config(
    cert: &common::TestCert,
    key_of: &common::TestCert,
    host: &str,
) -> (TempDir, std::path::PathBuf) {
    let (cert_file, key_file, host) = (cert.cert.clone(), key_of.key.clone(), host.to_owned());
    let opts = Options::default().edit(move |c| {
        c.tls_listen = vec!["127.0.0.1:5349".parse().unwrap()];
        c.tls.cert_file = Some(cert_file.clone());
        c.tls.key_file = Some(key_file.clone());
        c.public_host = host.clone();
    });
    let (dir, config) = cli_config(&opts);
    for f in [&key_of.key, &config, &dir.path().join("secret.txt")] {
        chmod(f, 0o600);
    }
    (dir, config)
}

#[test]
fn check_config_validates_the_tls_certificate_and_key() {
    let good = common::TestCert::new();
    let (_d, config) = tls_config(&good, &good, "turn.test");
    let o = run_cli(&["check-config", "--config", path(&config)], None);
    let (out, err) = out_text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        warnings(&err).is_empty(),
        "a good certificate warns of nothing: {err}"
    );

    // A key from another pair: refused, and so is the start of the daemon.
    let other = common::TestCert::new();
    let (_d, config) = tls_config(&good, &other, "turn.test");
    let err = fails(&["check-config", "--config", path(&config)], None);
    assert!(err.contains("private key does not belong"), "{err}");

    // An expired certificate is an error; one expiring within 14 days a warning.
    let expired = common::TestCert::with_names(&["turn.test"], -1);
    let (_d, config) = tls_config(&expired, &expired, "turn.test");
    let err = fails(&["check-config", "--config", path(&config)], None);
    assert!(err.contains("expired"), "{err}");
    let soon = common::TestCert::with_names(&["turn.test"], 5);
    let (_d, config) = tls_config(&soon, &soon, "turn.test");
    let o = run_cli(&["check-config", "--config", path(&config)], None);
    let (out, err) = out_text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        warnings(&err)
            .iter()
            .any(|w| w.contains("expires in 4 days") || w.contains("expires in 5 days")),
        "{err}"
    );

    // public_host must be a name the certificate covers, or browsers refuse turns:.
    let (_d, config) = tls_config(&good, &good, "turn.example.com");
    let o = run_cli(&["check-config", "--config", path(&config)], None);
    let (_, err) = out_text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        warnings(&err)
            .iter()
            .any(|w| w.contains("does not cover public_host")),
        "{err}"
    );

    // Unreadable and empty files are named.
    let missing = TempDir::new("nocert");
    let gone = common::TestCert::new();
    let (_d, config) = tls_config(&gone, &gone, "turn.test");
    let cert_path = gone.cert.clone();
    drop(gone);
    let err = fails(&["check-config", "--config", path(&config)], None);
    assert!(err.contains(cert_path.to_str().unwrap()), "{err}");
    let empty = common::TestCert::new();
    std::fs::write(&empty.cert, "").unwrap();
    let (_d, config) = tls_config(&empty, &empty, "turn.test");
    let err = fails(&["check-config", "--config", path(&config)], None);
    assert!(err.contains("no PEM certificate"), "{err}");
    drop(missing);

    // A key others can read is a warning, like every other secret file.
    let loose = common::TestCert::new();
    let (_d, config) = tls_config(&loose, &loose, "turn.test");
    chmod(&loose.key, 0o644);
    let o = run_cli(&["check-config", "--config", path(&config)], None);
    let (_, err) = out_text(&o);
    assert!(
        warnings(&err).iter().any(|w| w.contains("tls.key_file")),
        "{err}"
    );
}

#[test]
fn the_daemon_refuses_to_start_with_a_broken_certificate() {
    let good = common::TestCert::new();
    let other = common::TestCert::new();
    let (_d, config) = tls_config(&good, &other, "turn.test");
    let o = run_cli(&["serve", "--config", path(&config)], None);
    let (out, err) = out_text(&o);
    assert!(!o.status.success(), "{out}{err}");
    assert!(err.contains("private key does not belong"), "{err}");
}

#[test]
fn check_config_warns_about_secrets_others_can_read() {
    let (dir, config) = cli_config(&Options::with_api());
    let secret = dir.path().join("secret.txt");
    let token = dir.path().join("api.token");
    for f in [&secret, &token, &config] {
        chmod(f, 0o600);
    }
    let check = || {
        let o = run_cli(&["check-config", "--config", path(&config)], None);
        let (out, err) = out_text(&o);
        assert!(
            o.status.success(),
            "warnings never fail the check: {out}{err}"
        );
        assert!(out.contains("valid"), "{out}");
        assert!(warnings(&out).is_empty(), "warnings go to stderr: {out}");
        err
    };
    let err = check();
    assert!(warnings(&err).is_empty(), "all 0600: no warning: {err}");

    // A world-readable secret file: one WARN naming the key, the file, the mode and the fix.
    chmod(&secret, 0o644);
    let err = check();
    let w = warnings(&err);
    assert_eq!(w.len(), 1, "{err}");
    for part in [
        "auth.secret_file",
        path(&secret),
        "0644",
        &format!("chmod 600 {}", secret.display()),
    ] {
        assert!(w[0].contains(part), "{part:?} missing: {}", w[0]);
    }
    assert!(!err.contains(SECRET), "the secret is not shown: {err}");

    // A group-readable token file, and the config file holding a clear static password.
    chmod(&secret, 0o600);
    chmod(&token, 0o640);
    chmod(&config, 0o644);
    let err = check();
    let w = warnings(&err);
    assert_eq!(w.len(), 2, "{err}");
    assert!(
        w.iter()
            .any(|l| l.contains("api.token_file") && l.contains("0640")),
        "{err}"
    );
    assert!(
        w.iter().any(|l| l.contains(path(&config))
            && l.contains("password")
            && l.contains("chmod 600")),
        "{err}"
    );
    assert!(
        !err.contains(PASSWORD) && !err.contains(common::API_TOKEN),
        "{err}"
    );

    // Without clear passwords, a readable config file is fine.
    chmod(&token, 0o600);
    let text = Options::with_api()
        .edit(|c| c.auth.users[0].secret = UserSecret::Md5KeyHex("ab".repeat(16)))
        .config_text(UNUSED_PORTS);
    std::fs::write(&config, text).unwrap();
    chmod(&config, 0o644);
    let err = check();
    assert!(warnings(&err).is_empty(), "{err}");

    // Owned by someone else (needs root to set up).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(&secret, Some(65534), None).unwrap();
        let err = check();
        let w = warnings(&err);
        assert_eq!(w.len(), 1, "{err}");
        assert!(
            w[0].contains("uid 65534") && w[0].contains("chown root"),
            "{err}"
        );
    }
}

#[test]
fn serve_warns_about_a_world_readable_secret_file() {
    let d = Daemon::start();
    let secret = d.dir().join("secret.txt");
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    // The start-up lines first: the snapshot must be taken after they are all in.
    let start = d.start_log_len();
    let warned = d.log_lines()[..start]
        .iter()
        .any(|l| l.contains("WARN") && l.contains(path(&secret)) && l.contains("chmod 600"));
    // The harness writes files with the umask's mode (0644 under the usual 022).
    assert_eq!(
        warned,
        mode & 0o077 != 0,
        "secret.txt has mode {mode:04o}; log:\n{}",
        d.log()
    );
}

// ------------------------------------------------------------------ sessions kill

/// A stand-in for the daemon's API: records every request it gets, answers 204.
struct FakeApi {
    addr: std::net::SocketAddr,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeApi {
    fn start() -> FakeApi {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&requests);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { break };
                conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = vec![0u8; 8192];
                let n = conn.read(&mut buf).unwrap_or(0);
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
            }
        });
        FakeApi { addr, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

#[test]
fn sessions_kill_refuses_ids_that_are_not_the_apis_format_and_sends_nothing() {
    let api = FakeApi::start();
    let (dir, _) = cli_config(&Options::with_api());
    let api_addr = api.addr;
    let text = Options::with_api()
        .edit(move |c| c.api.listen = Some(api_addr))
        .config_text(UNUSED_PORTS);
    let config = dir.path().join("client.toml");
    std::fs::write(&config, text).unwrap();
    let c = path(&config);

    for bad in [
        "0-1-2\r\nDELETE /api/v1/sessions/0-0-0",
        "0-1-2 HTTP/1.1\r\nHost: x\r\n\r\nPOST /api/v1/revoke",
        "0-1-2\n",
        "../revoke",
        "0-1-2/../../revoke",
        "+0-1-2",
        "00-1-2",
        "0-1-2?x=1",
        "junk",
        "",
    ] {
        let err = fails(&["sessions", "--config", c, "kill", bad], None);
        assert!(err.contains("not a session id"), "{bad:?}: {err}");
        assert!(
            err.contains("sessions list"),
            "says where ids come from: {err}"
        );
        assert!(!err.contains(common::API_TOKEN), "{err}");
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        api.requests(),
        Vec::<String>::new(),
        "nothing may reach the API"
    );

    // A well-formed id goes out as exactly one request with exactly that path.
    let out = ok(&["sessions", "--config", c, "kill", "0-12-3"], None);
    assert!(out.contains("0-12-3"), "{out}");
    let got = api.requests();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("DELETE /api/v1/sessions/0-12-3 HTTP/1.1\r\n"),
        "{:?}",
        got[0]
    );
    assert_eq!(got[0].matches("HTTP/1.1").count(), 1, "{:?}", got[0]);
}

// ------------------------------------------------------------------ systemd unit

const UNIT: &str = include_str!("../systemd/turnpike.service");

type Check = dyn Fn(&str) -> bool;

#[test]
fn systemd_unit_has_the_promised_settings() {
    let settings: Vec<(&str, &str)> = UNIT
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .collect();
    let has =
        |k: &str, pred: &dyn Fn(&str) -> bool| settings.iter().any(|(a, v)| *a == k && pred(v));
    let cases: [(&str, &Check); 13] = [
        ("Type", &|v| v == "notify"),
        ("AmbientCapabilities", &|v| v == "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", &|v| v == "CAP_NET_BIND_SERVICE"),
        ("NoNewPrivileges", &|v| v == "yes"),
        ("ProtectSystem", &|v| v == "strict"),
        ("ProtectHome", &|v| {
            v == "yes" || v == "read-only" || v == "tmpfs"
        }),
        ("PrivateTmp", &|v| v == "yes"),
        ("RestrictAddressFamilies", &|v| {
            v.contains("AF_INET") && v.contains("AF_INET6") && v.contains("AF_UNIX")
        }),
        ("LimitNOFILE", &|v| {
            v.parse::<u64>().is_ok_and(|n| n >= 16384 + 64)
        }),
        ("ExecReload", &|v| {
            v.contains("-HUP") && v.contains("$MAINPID")
        }),
        ("WatchdogSec", &|v| !v.is_empty() && v != "0"),
        ("LoadCredential", &|v| v.starts_with("rest-secret:")),
        ("ExecStart", &|v| v.contains("turnpike serve --config")),
    ];
    for (key, pred) in cases {
        assert!(has(key, pred), "{key}= missing or unexpected in the unit");
    }
    assert!(has("LoadCredential", &|v| v.starts_with("api-token:")));
    // The unit waits longer than the default drain before SIGKILL.
    assert!(has("TimeoutStopSec", &|v| v
        .parse::<u64>()
        .is_ok_and(|n| n > 30)));
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(analyze) = analyze else {
        if std::env::var_os("CI").is_some() {
            panic!("systemd-analyze is missing: install the `systemd` package (scripts/test.sh does when CI is set)");
        }
        eprintln!("SKIPPED systemd_analyze_verify_accepts_the_unit: systemd-analyze not installed (apt-get install systemd)");
        return;
    };
    let dir = TempDir::new("unit");
    let bin = common::turnpike_bin();
    let mut replaced = 0;
    let unit: String = UNIT
        .lines()
        .map(|l| {
            if l.starts_with("ExecStart=") {
                replaced += 1;
                format!("ExecStart={bin} serve --config /etc/turnpike/turnserver.toml")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(replaced, 1, "one ExecStart= line");
    let file = dir.path().join("turnpike.service");
    std::fs::write(&file, unit + "\n").unwrap();
    let o = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&file)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("run systemd-analyze");
    let (out, err) = out_text(&o);
    // Unknown keys and bad values are only warnings (exit 0), printed as "<file>:<line>: ...".
    let complaints: Vec<&str> = out
        .lines()
        .chain(err.lines())
        .filter(|l| l.contains("turnpike.service"))
        .collect();
    assert!(
        o.status.success() && complaints.is_empty(),
        "systemd-analyze verify ({}):\n{out}{err}",
        o.status
    );
}

/// `turnpike check-config ... | head -1`: a reader that is gone before the output is written ends
/// the command quietly (SIGPIPE, as any Unix tool), never with a "failed printing" panic.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let (_dir, config) = cli_config(&Options::default());
    let mut fds = [0; 2];
    // SAFETY: a valid array of two ints for pipe(2).
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds were just created and are owned here alone.
    let (read, write) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(read);
    let out = std::process::Command::new(common::turnpike_bin())
        .args(["check-config", "--config", path(&config)])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(write))
        .output()
        .expect("run turnpike");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("Broken pipe"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{}: {err}",
        out.status
    );
}

/// `serve --ready-file` that cannot be written: the start fails with a status and the path.
#[test]
fn serve_refuses_to_start_without_its_ready_file() {
    let (dir, config) = cli_config(&Options::default());
    let ready = dir.path().join("no-such-dir/turnpike.ready");
    let err = fails(
        &[
            "serve",
            "--config",
            path(&config),
            "--ready-file",
            path(&ready),
        ],
        None,
    );
    assert!(err.contains(path(&ready)), "names the path: {err}");
    let help = ok(&["serve", "--help"], None);
    assert!(help.contains("--ready-file"), "{help}");
}

/// The Kubernetes manifests agree with the daemon: the ConfigMap's turnserver.toml is a valid
/// config, the probes reach its API where it listens, and the pod outlives the drain.
/// (scripts/test.sh checks the manifests against Kubernetes' schemas with kubernetes-validate.)
#[test]
fn kubernetes_manifests_agree_with_the_daemon() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let configmap = std::fs::read_to_string(dir.join("configmap.yaml")).unwrap();
    let (_, block) = configmap
        .split_once("turnserver.toml: |\n")
        .expect("configmap.yaml holds turnserver.toml");
    let toml: String = block
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let config = turnpike::config::Config::parse(&toml, "configmap.yaml")
        .unwrap_or_else(|e| panic!("configmap.yaml's turnserver.toml: {e}\n{toml}"));
    let api = config.api.listen.expect("the probes need the API");
    assert!(
        api.ip().is_loopback(),
        "{api}: the API stays on the node's loopback"
    );
    let daemonset = std::fs::read_to_string(dir.join("daemonset.yaml")).unwrap();
    let probes: Vec<&str> = daemonset
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("port: "))
        .collect();
    assert_eq!(
        probes,
        vec![format!("port: {}", api.port()); 2],
        "probe ports"
    );
    assert_eq!(
        daemonset.matches("host: 127.0.0.1").count(),
        2,
        "probes on loopback"
    );
    let grace: u64 = daemonset
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .expect("a grace period")
        .parse()
        .unwrap();
    assert!(
        config.drain_secs + 10 <= grace,
        "drain {} vs grace {grace}",
        config.drain_secs
    );
    for secret in [
        &config.auth.secret_file,
        &config.auth.nonce_key_file,
        &config.api.token_file,
    ] {
        let path = secret.as_ref().expect("a secret file");
        assert!(
            path.starts_with("/etc/turnpike/secrets"),
            "{}",
            path.display()
        );
        let key = path.file_name().unwrap().to_str().unwrap();
        let secrets = std::fs::read_to_string(dir.join("secret.yaml")).unwrap();
        assert!(
            secrets.contains(&format!("  {key}: \"\"")),
            "secret.yaml has {key}, empty"
        );
    }
}

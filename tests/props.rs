//! Property tests on stable Rust: the fuzz targets of `fuzz/` (the same functions, from
//! `turnpike::fuzzing`) on random and mutated inputs from a seeded generator, a few seconds in
//! release mode. A failure prints the input in hex: it is also an input for the fuzz target.
//!
//! `TURNPIKE_PROPS_SEED=<n>` changes the generator's seed, `TURNPIKE_PROPS_SCALE=<n>` runs n
//! times as many cases. `cargo test --release --test props -- --ignored write_seed_corpus`
//! rewrites `fuzz/corpus/` from `fuzzing::seed_corpus()`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use turnpike::fuzzing::{self, Coverage, Op, Request, TARGETS};
use turnpike::proto::codec::{attr, method, Class, MessageWriter};

/// xorshift64*, seeded: every run of the suite tries the same cases unless told otherwise.
struct Rng(u64);

impl Rng {
    fn new(stream: u64) -> Self {
        let seed = std::env::var("TURNPIKE_PROPS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x7475_726e_7069_6b65u64);
        Rng((seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn scale(cases: usize) -> usize {
    let k = std::env::var("TURNPIKE_PROPS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1usize);
    cases * k.max(1)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `target` on `input`; a panic prints the input as a fuzz reproducer, then goes on.
fn run<R>(name: &str, target: impl Fn(&[u8]) -> R, input: &[u8]) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(input))) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "fuzz target {name} failed; input ({} bytes, hex):",
                input.len()
            );
            eprintln!("{}", hex(input));
            eprintln!(
                "reproduce: echo <hex> | xxd -r -p > crash; \
                 cd fuzz && cargo +nightly fuzz run {name} ../crash"
            );
            std::panic::resume_unwind(e)
        }
    }
}

fn target(name: &str) -> fn(&[u8]) {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no target {name}"))
}

fn seeds() -> BTreeMap<&'static str, Vec<Vec<u8>>> {
    let mut by_target: BTreeMap<&'static str, Vec<Vec<u8>>> = BTreeMap::new();
    for (t, _, bytes) in fuzzing::seed_corpus() {
        by_target.entry(t).or_default().push(bytes);
    }
    by_target
}

/// libFuzzer-style mutations of one seed (bit flips, magic bytes, inserts, deletes, cuts,
/// duplicated runs, splices with another seed).
fn mutate(rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = b.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                b[i] = [0, 0xFF, 0x7F, 0x80, 0x40, 0x01, 0x14][rng.below(7)];
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let ins = rng.bytes(n);
                b.splice(i..i, ins);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = (1 + rng.below(8)).min(len - i);
                b.drain(i..i + n);
            }
            4 => b.truncate(rng.below(len + 1)),
            5 if len > 1 => {
                let i = rng.below(len);
                let n = (1 + rng.below(16)).min(len - i);
                let run = b[i..i + n].to_vec();
                let at = rng.below(len + 1);
                b.splice(at..at, run);
            }
            6 if !other.is_empty() => {
                let cut = rng.below(b.len() + 1);
                let from = rng.below(other.len());
                b.truncate(cut);
                b.extend_from_slice(&other[from..]);
            }
            _ if len >= 4 => {
                // A length field: STUN's at 2..4, or a ChannelData length.
                let v = (rng.below(70) as u16).to_be_bytes();
                b[2..4].copy_from_slice(&v);
            }
            _ => {}
        }
    }
    b
}

/// A STUN message with random attributes, sometimes signed and fingerprinted: random bytes
/// alone rarely get past the header checks.
fn random_stun(rng: &mut Rng) -> Vec<u8> {
    const KINDS: [u16; 10] = [
        attr::XOR_PEER_ADDRESS,
        attr::XOR_MAPPED_ADDRESS,
        attr::MAPPED_ADDRESS,
        attr::LIFETIME,
        attr::DATA,
        attr::USERNAME,
        attr::CHANNEL_NUMBER,
        attr::ERROR_CODE,
        0x7777,
        0xC001,
    ];
    let methods = [
        method::BINDING,
        method::ALLOCATE,
        method::SEND,
        method::DATA,
    ];
    let classes = [
        Class::Request,
        Class::Indication,
        Class::Success,
        Class::Error,
    ];
    let mut out = Vec::new();
    let txid: [u8; 12] = rng.bytes(12).try_into().unwrap_or([0; 12]);
    let m = methods[rng.below(methods.len())];
    let mut w = MessageWriter::new(&mut out, m, classes[rng.below(4)], txid);
    for _ in 0..rng.below(6) {
        let kind = KINDS[rng.below(KINDS.len())];
        let len = [4, 8, 20, rng.below(40)][rng.below(4)];
        let mut v = rng.bytes(len);
        if len > 1 && rng.below(2) == 0 {
            v[1] = 1 + rng.below(2) as u8;
        }
        w.attr(kind, &v);
    }
    match rng.below(4) {
        0 => {
            w.integrity(b"VOkJxbRl1RmTxUk/WvJxBt");
        }
        1 => {
            w.integrity_sha256(b"VOkJxbRl1RmTxUk/WvJxBt");
        }
        _ => {}
    }
    if rng.below(2) == 0 {
        w.fingerprint();
    }
    out
}

/// A random step drawn the way a client goes about it: mostly signed, well-formed requests and
/// relayed data, on the busiest client and the plain peers. Selectors are what `Op` decodes.
fn random_op(rng: &mut Rng) -> Op {
    let byte = |rng: &mut Rng| rng.next() as u8;
    let usually_zero = |rng: &mut Rng| {
        if rng.below(100) < 85 {
            0
        } else {
            rng.next() as u8
        }
    };
    let peer = |rng: &mut Rng| {
        if rng.below(100) < 85 {
            rng.below(10) as u8
        } else {
            rng.next() as u8
        }
    };
    let len = |rng: &mut Rng| rng.below(300) as u16;
    match rng.below(20) {
        0..=7 => {
            let mut q = Request {
                client: byte(rng),
                method: byte(rng),
                auth: if rng.below(100) < 75 { 0 } else { byte(rng) },
                channel: rng.next() as u16,
                flags: usually_zero(rng),
                ..Request::default()
            };
            match rng.below(100) {
                0..=84 => {}
                85..=89 => q.params[3] = 2, // LIFETIME 0: a Refresh deletes
                _ => q.params = [byte(rng), byte(rng), byte(rng), byte(rng)],
            }
            q.peers = (0..1 + rng.below(3)).map(|_| peer(rng)).collect();
            if rng.below(100) < 8 {
                let n = rng.below(9);
                q.extra.push((rng.next() as u16, rng.bytes(n)));
            }
            if rng.below(100) < 4 {
                q.mutations.push((rng.next() as u16, byte(rng)));
            }
            Op::Request(q)
        }
        8..=10 => Op::Send {
            client: byte(rng),
            peer: peer(rng),
            len: len(rng),
        },
        11..=13 => Op::ChannelData {
            client: byte(rng),
            channel: rng.next() as u16,
            len: len(rng),
            flags: usually_zero(rng),
        },
        14..=16 => Op::Peer {
            relay: rng.below(4) as u8,
            from: peer(rng),
            len: len(rng),
        },
        17 => Op::Advance {
            secs: rng.next() as u16,
        },
        18 if rng.below(2) == 0 => {
            let n = rng.below(64);
            Op::Raw {
                client: byte(rng),
                bytes: rng.bytes(n),
            }
        }
        18 => Op::Retransmit { client: byte(rng) },
        _ => Op::Admin {
            what: byte(rng),
            arg: byte(rng),
        },
    }
}

/// A random session in the fuzz input format (so a failure replays in `core_ops`).
fn random_session(rng: &mut Rng) -> Vec<u8> {
    let n = 10 + rng.below(39);
    let ops: Vec<Op> = (0..n).map(|_| random_op(rng)).collect();
    Op::encode_all(&ops)
}

#[test]
fn codec_targets_hold_on_random_and_mutated_inputs() {
    let seeds = seeds();
    for (i, name) in ["stun_message", "address", "channel_data"]
        .iter()
        .enumerate()
    {
        let f = target(name);
        let pool = &seeds[name];
        let mut rng = Rng::new(i as u64);
        for _ in 0..scale(20_000) {
            let base = &pool[rng.below(pool.len())];
            let other = &pool[rng.below(pool.len())];
            let input = match rng.below(4) {
                0 => {
                    let n = rng.below(64);
                    rng.bytes(n)
                }
                1 => random_stun(&mut rng),
                _ => mutate(&mut rng, base, other),
            };
            run(name, f, &input);
        }
    }
}

#[test]
fn core_targets_hold_on_random_and_mutated_sequences() {
    let seeds = seeds();
    let mut rng = Rng::new(10);
    let ops = &seeds["core_ops"];
    for _ in 0..scale(4_000) {
        let input = match rng.below(3) {
            0 => {
                let n = 100 + rng.below(1400);
                rng.bytes(n)
            }
            1 => random_session(&mut rng),
            _ => {
                let base = &ops[rng.below(ops.len())];
                let other = &ops[rng.below(ops.len())];
                mutate(&mut rng, base, other)
            }
        };
        run("core_ops", fuzzing::run_ops, &input);
    }
    let datagrams = &seeds["core_datagram"];
    for _ in 0..scale(2_000) {
        let base = &datagrams[rng.below(datagrams.len())];
        let other = &datagrams[rng.below(datagrams.len())];
        let input = mutate(&mut rng, base, other);
        run("core_datagram", fuzzing::run_datagram, &input);
    }
}

/// The random sequences must get through authentication to every relay path, or the test
/// above would pass by exercising nothing but 401s.
#[test]
fn harness_reaches_authenticated_success_paths() {
    let mut rng = Rng::new(20);
    let mut total = Coverage::default();
    for _ in 0..scale(1_500) {
        let input = random_session(&mut rng);
        total.add(&run("core_ops", fuzzing::run_ops, &input));
    }
    eprintln!("coverage of random sequences: {total:#?}");
    let reached = [
        ("allocations", total.allocations),
        ("dual allocations", total.dual_allocations),
        ("SHA-256 successes", total.sha256_successes),
        ("REST successes", total.rest_successes),
        ("refreshes", total.refreshes),
        ("deletions", total.deletions),
        ("expirations", total.expirations),
        ("permissions", total.permissions),
        ("channels", total.channels),
        ("Send indications relayed", total.to_peer_send),
        ("ChannelData relayed", total.to_peer_channel),
        ("Data indications to clients", total.to_client_data),
        ("ChannelData to clients", total.to_client_channel),
    ];
    for (what, n) in reached {
        assert!(n > 0, "random sequences reached no {what}: {total:#?}");
    }
    for code in [400, 401, 403, 420, 437, 438] {
        assert!(
            total.error_codes.contains_key(&code),
            "random sequences never got a {code}: {total:#?}"
        );
    }
}

#[test]
fn scripted_seed_sessions_reach_what_they_script() {
    let seeds = seeds();
    let mut total = Coverage::default();
    for input in &seeds["core_ops"] {
        total.add(&run("core_ops", fuzzing::run_ops, input));
    }
    assert!(total.reservations > 0 && total.replays > 0 && total.admin_ends > 0);
    assert!(
        total.relayed_in_process >= 3,
        "relay to relay in process not reached: {total:#?}"
    );
    assert!(
        total.moved_replies > 0,
        "no RFC 5780 answer moved: {total:#?}"
    );
    for code in [400, 401, 403, 420, 437, 438, 440, 442, 443, 486, 508] {
        assert!(
            total.error_codes.contains_key(&code),
            "no {code}: {total:#?}"
        );
    }
    // The signed datagram seeds get past MESSAGE-INTEGRITY with the nonce the session holds.
    let setup = fuzzing::run_datagram_coverage(&[]);
    for (t, name, bytes) in fuzzing::seed_corpus() {
        if t != "core_datagram" {
            continue;
        }
        let c = run(t, fuzzing::run_datagram_coverage, &bytes);
        let gained = match name.as_str() {
            "refresh" => c.refreshes > setup.refreshes,
            "refresh-delete" => c.deletions > setup.deletions,
            "permission" | "permission-sha256" => c.permissions > setup.permissions,
            "channel-bind" | "channel-rebind" => c.channels > setup.channels,
            "send-indication" => c.to_peer_send > 0,
            "channel-data" => c.to_peer_channel > 0,
            _ => true,
        };
        assert!(gained, "datagram seed {name} did not succeed: {c:#?}");
    }
}

#[test]
fn op_encoding_round_trips() {
    let mut rng = Rng::new(30);
    for _ in 0..scale(2000) {
        let n = rng.below(200);
        let ops = Op::decode_all(&rng.bytes(n));
        let again = Op::decode_all(&Op::encode_all(&ops));
        assert_eq!(ops, again);
    }
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every target has its `fuzz_targets/<name>.rs` and a non-empty checked-in corpus, and every
/// corpus file runs clean (a regression suite for whatever the fuzzer once found).
#[test]
fn checked_in_corpus_replays_cleanly() {
    let dir = fuzz_dir();
    let files: Vec<String> = std::fs::read_dir(dir.join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".rs")
                .map(String::from)
        })
        .collect();
    for f in &files {
        assert!(
            TARGETS.iter().any(|(n, _)| n == f),
            "{f}.rs is not in TARGETS"
        );
    }
    for (name, f) in TARGETS {
        assert!(
            files.iter().any(|x| x == name),
            "no fuzz/fuzz_targets/{name}.rs"
        );
        let corpus = dir.join("corpus").join(name);
        let entries: Vec<_> = std::fs::read_dir(&corpus)
            .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
            .filter_map(|e| e.ok())
            .collect();
        assert!(!entries.is_empty(), "empty corpus for {name}");
        for e in entries {
            let bytes = std::fs::read(e.path()).expect("corpus file");
            run(name, f, &bytes);
        }
    }
}

/// Rewrites `fuzz/corpus/<target>/` from `fuzzing::seed_corpus()`.
#[test]
#[ignore]
fn write_seed_corpus() {
    let root = fuzz_dir().join("corpus");
    for (name, _) in TARGETS {
        let d = root.join(name);
        if d.exists() {
            std::fs::remove_dir_all(&d).expect("clear corpus");
        }
        std::fs::create_dir_all(&d).expect("corpus dir");
    }
    let mut n = 0;
    for (t, name, bytes) in fuzzing::seed_corpus() {
        std::fs::write(root.join(t).join(name), bytes).expect("write seed");
        n += 1;
    }
    eprintln!("wrote {n} seed files under {}", root.display());
}

/// Replays one input without nightly: `TURNPIKE_REPLAY=<target>:<file> TURNPIKE_FUZZ_TRACE=1
/// cargo test --release --test props -- --ignored --nocapture replay_one_input`.
#[test]
#[ignore]
fn replay_one_input() {
    let spec = std::env::var("TURNPIKE_REPLAY").expect("TURNPIKE_REPLAY=<target>:<file>");
    let (name, file) = spec.split_once(':').expect("<target>:<file>");
    let bytes = std::fs::read(file).expect("input file");
    run(name, target(name), &bytes);
}

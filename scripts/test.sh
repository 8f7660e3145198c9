#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test in release mode.
# Works on a fresh Debian machine as root: installs what the tests need when CI is set or a
# tool is missing: coturn's client tools (tests/coturn_clients.rs, reference server for
# bench/), iproute2 and nftables (tests/nat_call.rs builds network namespaces with NATs),
# chromium and libnss3-tools' certutil (tests/browser_call.rs; certutil makes the NSS database
# through which Chromium trusts the test CA for turns:), systemd (systemd-analyze verify of the
# unit), and aiortc (with its aioice) from PyPI in a virtual environment, target/py-aiortc
# (tests/firewall_call.rs: WebRTC peers with TURN over TCP and TLS; tests/streams.rs: aioice as
# an independent TURN/TCP and TURN/TLS client), redis-server (tests/fleet.rs) and
# kubernetes-validate from PyPI (the manifests in deploy/kubernetes). Ends with a short run of
# every fuzz target (scripts/fuzz.sh; needs a nightly toolchain, installs cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
step="setup"
trap 'echo "test.sh: FAILED during: $step ($(( $(date +%s) - started ))s)" >&2' ERR

need_apt=0
[ -n "${CI:-}" ] && need_apt=1
for tool in turnutils_uclient turnutils_peer turnutils_stunclient turnutils_natdiscovery nft ip chromium certutil systemd-analyze python3 redis-server; do
    command -v "$tool" >/dev/null 2>&1 || need_apt=1
done

PACKAGES="coturn iproute2 nftables chromium fonts-liberation libnss3-tools systemd python3 python3-venv redis-server"

# Debian starts coturn's own turnserver when the package is installed; we only want its client
# tools (and redis-server's binary, which tests/fleet.rs starts on a port of its own). Never touch a coturn (or any turnserver) that was here before this script ran: a
# developer's machine may run a production one. So: when coturn is not installed yet, forbid
# service starts during our apt-get install with a temporary policy-rc.d (only if the machine
# has none of its own), and afterwards stop, by PID, only turnserver processes that did not exist
# before the install and only if coturn was not installed before.
POLICY_RC_D=/usr/sbin/policy-rc.d
policy_rc_d_ours=0
remove_policy_rc_d() {
    if [ "$policy_rc_d_ours" = 1 ]; then
        $SUDO rm -f "$POLICY_RC_D"
        policy_rc_d_ours=0
    fi
}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# The PIDs of the processes named $1 (turnserver, redis-server).
server_pids() {
    if command -v pgrep >/dev/null 2>&1; then
        pgrep -x "$1" 2>/dev/null | sort || true
    else
        pidof "$1" 2>/dev/null | tr ' ' '\n' | sort || true
    fi
}

if [ "$need_apt" = 1 ]; then
    step="apt-get install"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || {
            echo "test.sh: need root (or sudo) to install $PACKAGES" >&2
            exit 1
        }
        SUDO="sudo"
    fi
    # Debian starts redis-server's own service on install too: the same care as for coturn.
    declare -A before pids_before
    for pkg in coturn redis-server; do
        before[$pkg]=0
        installed "$pkg" && before[$pkg]=1
    done
    pids_before[turnserver]=$(server_pids turnserver)
    pids_before[redis-server]=$(server_pids redis-server)
    if [ ! -e "$POLICY_RC_D" ]; then
        trap remove_policy_rc_d EXIT
        # invoke-rc.d and deb-systemd-invoke ask policy-rc.d; 101 = "action forbidden".
        printf '#!/bin/sh\n# temporary, from turnpike scripts/test.sh\nexit 101\n' |
            $SUDO tee "$POLICY_RC_D" >/dev/null
        $SUDO chmod 755 "$POLICY_RC_D"
        policy_rc_d_ours=1
    fi
    echo "==> apt-get install $PACKAGES"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -q --no-install-recommends $PACKAGES
    remove_policy_rc_d
    for pair in coturn:turnserver redis-server:redis-server; do
        pkg=${pair%%:*} proc=${pair#*:}
        [ "${before[$pkg]}" = 0 ] || continue
        # Only if something started it anyway (an existing policy-rc.d that allows starts):
        # the processes that are new since the install began, by PID.
        for pid in $(comm -13 <(printf '%s\n' "${pids_before[$proc]}") <(server_pids "$proc")); do
            echo "==> stopping $proc pid $pid, started by the $pkg install"
            $SUDO kill "$pid" 2>/dev/null || true
        done
    done
fi

# tests/firewall_call.rs runs its WebRTC peers with aiortc (webrtc-rs has no TURN over TCP or
# TLS), pinned, in a virtual environment of its own under the target directory; tests/streams.rs
# uses the aioice that comes with it.
AIORTC_VERSION=1.16.0
PY_VENV="${CARGO_TARGET_DIR:-target}/py-aiortc"
if ! "$PY_VENV/bin/python3" -c "import aiortc, sys; sys.exit(aiortc.__version__ != '$AIORTC_VERSION')" 2>/dev/null; then
    step="python venv with aiortc $AIORTC_VERSION"
    echo "==> $step in $PY_VENV"
    rm -rf "$PY_VENV"
    python3 -m venv "$PY_VENV"
    "$PY_VENV/bin/python3" -m pip install -q --disable-pip-version-check "aiortc==$AIORTC_VERSION"
fi

# deploy/kubernetes/*.yaml against Kubernetes' own schemas: kubernetes-validate from PyPI,
# pinned, in a virtual environment of its own; strict, so a misspelt field fails too.
K8S_VALIDATE_VERSION=1.31.0
K8S_VENV="${CARGO_TARGET_DIR:-target}/py-k8s"
if [ "$("$K8S_VENV/bin/kubernetes-validate" --version 2>/dev/null)" != "$K8S_VALIDATE_VERSION" ]; then
    step="python venv with kubernetes-validate $K8S_VALIDATE_VERSION"
    echo "==> $step in $K8S_VENV"
    rm -rf "$K8S_VENV"
    python3 -m venv "$K8S_VENV"
    "$K8S_VENV/bin/python3" -m pip install -q --disable-pip-version-check \
        "kubernetes-validate==$K8S_VALIDATE_VERSION"
fi
step="kubernetes-validate deploy/kubernetes"
echo "==> $step"
"$K8S_VENV/bin/kubernetes-validate" --strict --quiet -k 1.31.0 deploy/kubernetes/*.yaml

step="cargo fmt --check"
echo "==> $step"
cargo fmt --all -- --check

step="cargo clippy"
echo "==> $step"
cargo clippy --all-targets -- -D warnings

# The tests need an optimised daemon, not the shipped binary's link-time optimisation and debug
# info: without them the twenty-odd test binaries link in a fraction of the time on two cores.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_DEBUG=0

step="cargo build --release --examples"
echo "==> $step"
# tests/signaling_example.rs runs target/release/examples/signaling; `cargo test --all-targets`
# compiles examples in test mode and does not leave that binary behind.
cargo build --release --examples

step="cargo test --release"
echo "==> $step"
# Release: the relay tests push real traffic through the daemon. One build serves all targets.
cargo test --release --all-targets

step="fuzz smoke"
echo "==> $step"
# Every cargo-fuzz target for a bounded time when a nightly toolchain is there (fuzz.sh says so
# and returns 0 when it is not); tests/props.rs above runs the same targets on stable.
scripts/fuzz.sh "${FUZZ_SMOKE_SECS:-20}"

echo "test.sh: OK: fmt, clippy, all tests and the fuzz smoke passed in $(( $(date +%s) - started ))s"

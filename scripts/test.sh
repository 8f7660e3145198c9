#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test in release mode.
# Works on a fresh Debian machine as root: installs what the tests need when CI is set or a
# tool is missing: coturn's client tools (tests/coturn_clients.rs, reference server for
# bench/), iproute2 and nftables (tests/nat_call.rs builds network namespaces with NATs),
# chromium (tests/browser_call.rs) and systemd (systemd-analyze verify of the unit).
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
step="setup"
trap 'echo "test.sh: FAILED during: $step ($(( $(date +%s) - started ))s)" >&2' ERR

need_apt=0
[ -n "${CI:-}" ] && need_apt=1
for tool in turnutils_uclient turnutils_peer turnutils_stunclient nft ip chromium systemd-analyze; do
    command -v "$tool" >/dev/null 2>&1 || need_apt=1
done

PACKAGES="coturn iproute2 nftables chromium fonts-liberation systemd"
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
    echo "==> apt-get install $PACKAGES"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -q --no-install-recommends $PACKAGES
    # Debian may start coturn's own turnserver on install; we only want its client tools.
    # No systemd in containers: `service` (sysvinit script) first, then the process itself.
    $SUDO service coturn stop >/dev/null 2>&1 || true
    $SUDO pkill -x turnserver >/dev/null 2>&1 || true
fi

step="cargo fmt --check"
echo "==> $step"
cargo fmt --all -- --check

step="cargo clippy"
echo "==> $step"
cargo clippy --all-targets -- -D warnings

step="cargo build --release --examples"
echo "==> $step"
# tests/signaling_example.rs runs target/release/examples/signaling; `cargo test --all-targets`
# compiles examples in test mode and does not leave that binary behind.
cargo build --release --examples

step="cargo test --release"
echo "==> $step"
# Release: the relay tests push real traffic through the daemon. One build serves all targets.
cargo test --release --all-targets

echo "test.sh: OK: fmt, clippy and all tests passed in $(( $(date +%s) - started ))s"

#!/usr/bin/env python3
"""The README's picture of deploy/grafana/turnpike.json: the same panels, plotted from a real
run instead of a Grafana screenshot.

Starts a release turnpike on loopback with its API, scrapes /metrics every 0.5 s while
turnpike-load drives it through a bounded script (allocations held and released, paced relay
load, client-to-client relaying, a burst of wrong passwords), and plots the panels' queries
(rates over 2 s) with matplotlib into the PNG named on the command line.

Usage: bench/dashboard_plot.py OUT.png [--turnpike-bin PATH] [--load-bin PATH]
Needs: matplotlib (e.g. in a venv: pip install matplotlib), cargo build --release. Loopback
only; stops only the processes it starts; its temporary directory is removed at the end.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers  # noqa: E402

SERIES = re.compile(r'^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$')


def scrape(url):
    out = {}
    with urllib.request.urlopen(url, timeout=2) as r:
        for line in r.read().decode().splitlines():
            m = SERIES.match(line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--turnpike-bin", default="target/release/turnpike")
    ap.add_argument("--load-bin", default="target/release/turnpike-load")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="turnpike-dash-")
    port, api = servers.free_port(), servers.free_port()
    conf = os.path.join(work, "turnpike.toml")
    with open(conf, "w") as f:
        f.write(f"""listen = ["127.0.0.1:{port}"]
realm = "dash"
drain_secs = 0
[relay]
address = "127.0.0.1"
port_min = 20000
port_max = 29999
[[auth.users]]
name = "dash"
password = "dashboard-password"
[limits]
allocations_per_user = 0
[peers]
allow_loopback_peers = true
[api]
listen = "127.0.0.1:{api}"
""")
    os.chmod(conf, 0o600)
    log = open(os.path.join(work, "turnpike.log"), "w")
    srv = subprocess.Popen([args.turnpike_bin, "serve", "--config", conf], stderr=log)
    samples = []
    stop = threading.Event()
    try:
        servers.wait_udp_ready(port, srv)
        t0 = time.monotonic()

        def sampler():
            while not stop.is_set():
                try:
                    samples.append((time.monotonic() - t0, scrape(f"http://127.0.0.1:{api}/metrics")))
                except OSError:
                    pass
                time.sleep(0.5)

        th = threading.Thread(target=sampler)
        th.start()
        load = [args.load_bin]
        common = ["--server", f"127.0.0.1:{port}", "--user", "dash", "--timeout-secs", "60"]

        def run(mode, extra, password="dashboard-password"):
            subprocess.run(load + [mode] + common + ["--password", password] + extra,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=90)

        time.sleep(2)
        run("alloc", ["--count", "3000", "--in-flight", "16", "--hold-secs", "4"])
        time.sleep(1)
        run("relay", ["--clients", "20", "--rate", "10000", "--duration-secs", "8"])
        run("relay", ["--clients", "20", "--rate", "20000", "--duration-secs", "6", "--size", "1200"])
        run("relay", ["--clients", "20", "--rate", "10000", "--duration-secs", "6", "--client-to-client"])
        run("alloc", ["--count", "200", "--in-flight", "8", "--hold-secs", "1"], password="wrong")
        time.sleep(3)
        stop.set()
        th.join()
    finally:
        stop.set()
        srv.terminate()
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    plot(samples, args.out)


def total(sample, prefix):
    return sum(v for k, v in sample.items() if k == prefix or k.startswith(prefix + "{"))


def rate(samples, prefix, window=4):
    out = []
    for i in range(window, len(samples)):
        (t1, a), (t0, b) = samples[i], samples[i - window]
        out.append((t1, (total(a, prefix) - total(b, prefix)) / (t1 - t0)))
    return out


def plot(samples, out):
    fig, axes = plt.subplots(3, 2, figsize=(13, 10), sharex=True)
    fig.suptitle("turnpike: the Grafana dashboard's panels over a run of turnpike-load (loopback)")

    def draw(ax, title, lines, unit):
        for label, pts in lines:
            if pts:
                ax.plot([t for t, _ in pts], [v for _, v in pts], label=label)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)

    gauge = lambda p: [(t, total(s, p)) for t, s in samples]  # noqa: E731
    draw(axes[0][0], "Allocations", [("udp", gauge('turnpike_allocations{transport="udp"}'))], "allocations")
    draw(axes[0][1], "Allocations started / ended",
         [("created", rate(samples, "turnpike_allocations_created_total")),
          ("ended", rate(samples, "turnpike_allocations_ended_total"))], "per second")
    draw(axes[1][0], "Relayed packets",
         [("to peer", rate(samples, 'turnpike_relayed_packets_total{direction="to_peer"}')),
          ("to client", rate(samples, 'turnpike_relayed_packets_total{direction="to_client"}')),
          ("relay to relay (in process)", rate(samples, "turnpike_relay_to_relay_packets_total"))],
         "packets/s")
    draw(axes[1][1], "Relayed bandwidth",
         [("to peer", [(t, v * 8 / 1e6) for t, v in rate(samples, 'turnpike_relayed_bytes_total{direction="to_peer"}')]),
          ("to client", [(t, v * 8 / 1e6) for t, v in rate(samples, 'turnpike_relayed_bytes_total{direction="to_client"}')])],
         "Mbit/s")
    draw(axes[2][0], "Relay ports free", [("free", gauge("turnpike_relay_ports_free")),
                                          ("sockets open", gauge("turnpike_relay_sockets_open"))], "ports")
    draw(axes[2][1], "Authentication failures and drops",
         [("wrong password", rate(samples, 'turnpike_auth_failures_total{reason="wrong_password"}')),
          ("dropped packets", rate(samples, "turnpike_dropped_packets_total")),
          ("send errors", rate(samples, "turnpike_send_errors_total"))], "per second")
    for ax in axes[2]:
        ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f"wrote {out} from {len(samples)} scrapes")


if __name__ == "__main__":
    main()

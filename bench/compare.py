#!/usr/bin/env python3
"""Side-by-side relay benchmark: the same turnutils_uclient load against turnpike and Debian's
coturn, both on loopback, alternating A B A B in one run (the machines are shared and noisy, so
only same-run ratios mean anything).

Each uclient message goes client -> TURN -> UDP echo peer -> TURN -> client: two relayed
packets (one each way). Reported per server and scenario (medians over the rounds): relayed
packets/s, loss %, server CPU seconds (utime + stime of the server process) per million relayed
packets, and the turnpike/coturn ratios.

Usage: bench/compare.py [--rounds 3] [--quick] [--json results.json]
Needs: coturn (turnserver, turnutils_uclient, turnutils_peer) and a release build of turnpike.
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TURNPIKE = os.path.join(ROOT, "target", "release", "turnpike")
USER, PASSWORD, REALM = "bench", "benchpass", "bench.realm"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """utime + stime of a process and all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_udp_ready(port, timeout=10.0):
    """A STUN Binding request answered means the server is up."""
    req = bytes.fromhex("000100002112a442") + os.urandom(12)
    deadline = time.time() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.time() < deadline:
            try:
                s.sendto(req, ("127.0.0.1", port))
                s.recvfrom(2048)
                return
            except OSError:
                time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not answer a Binding request")


class Server:
    def __init__(self, name, argv, port, workdir):
        self.name, self.port = name, port
        self.log = open(os.path.join(workdir, f"{name}.log"), "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_udp_ready(port)

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def start_turnpike(workdir, threads):
    port = free_udp_port()
    conf = os.path.join(workdir, "turnpike.toml")
    with open(conf, "w") as f:
        f.write(f"""
listen = ["127.0.0.1:{port}"]
threads = {threads}
realm = "{REALM}"
log_level = "warn"
[relay]
address = "127.0.0.1"
port_min = 20000
port_max = 29999
[[auth.users]]
name = "{USER}"
password = "{PASSWORD}"
[limits]
allocations_per_user = 0
unauth_replies_per_sec = 0
[peers]
allow_loopback_peers = true
""")
    return Server("turnpike", [TURNPIKE, "serve", "--config", conf], port, workdir)


def start_coturn(workdir, threads):
    port = free_udp_port()
    argv = [
        "turnserver", "-n", "--listening-ip=127.0.0.1", f"--listening-port={port}",
        "--relay-ip=127.0.0.1", "--min-port=10000", "--max-port=19999",
        "--lt-cred-mech", f"--user={USER}:{PASSWORD}", f"--realm={REALM}",
        "--allow-loopback-peers", "--no-cli", "--no-tls", "--no-dtls",
        "--log-file=stdout", "--simple-log", "--no-stdout-log",
        f"--pidfile={workdir}/coturn.pid",
    ]
    if threads:
        argv.append(f"--relay-threads={threads}")
    return Server("coturn", argv, port, workdir)


def run_uclient(server, peer_port, clients, messages, interval_ms, length, timeout):
    argv = [
        "turnutils_uclient", "-p", str(server.port), "-u", USER, "-w", PASSWORD,
        "-e", "127.0.0.1", "-r", str(peer_port), "-m", str(clients), "-n", str(messages),
        "-l", str(length), "-z", str(interval_ms), "-c", "127.0.0.1",
    ]
    cpu0, t0 = server.cpu(), time.time()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout).stdout
    wall, cpu = time.time() - t0, server.cpu() - cpu0
    sent = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", out)
    if not sent:
        raise RuntimeError(f"{server.name}: uclient printed no totals:\n{out[-2000:]}")
    tx, rx = map(int, sent[-1])
    return {"sent": tx, "received": rx, "wall_s": wall, "cpu_s": cpu}


# Each message crosses the relay twice (client -> peer and peer -> client): two relayed packets.
HOPS = 2


def summarize(samples):
    rx = statistics.median(s["received"] / s["wall_s"] for s in samples)
    loss = statistics.median(100.0 * (s["sent"] - s["received"]) / max(s["sent"], 1) for s in samples)
    cpu = statistics.median(s["cpu_s"] / max(s["received"] * HOPS, 1) * 1e6 for s in samples)
    return {"relayed_pkts_per_s": rx * HOPS, "loss_pct": loss, "cpu_s_per_million_pkts": cpu}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="server threads (0 = both servers' default)")
    ap.add_argument("--quick", action="store_true", help="small load, for a smoke run")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()

    for tool in ("turnserver", "turnutils_uclient", "turnutils_peer"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            sys.exit(f"{tool} not found: apt-get install coturn")
    if not os.path.exists(TURNPIKE):
        sys.exit("build first: cargo build --release")

    scale = 0.1 if args.quick else 1.0
    # (name, clients, messages per client, interval ms, bytes)
    scenarios = [
        ("paced", 20, int(6000 * scale), 1, 160),
        ("flood", 10, int(20000 * scale), 0, 160),
    ]
    workdir = tempfile.mkdtemp(prefix="turnpike-bench-")
    peer_port = free_udp_port()
    peer = subprocess.Popen(["turnutils_peer", "-L", "127.0.0.1", "-p", str(peer_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = {}
    results = {}
    try:
        servers["turnpike"] = start_turnpike(workdir, args.threads)
        servers["coturn"] = start_coturn(workdir, args.threads)
        for name, clients, messages, interval, length in scenarios:
            samples = {"turnpike": [], "coturn": []}
            for r in range(args.rounds):
                for which in ("turnpike", "coturn"):
                    s = run_uclient(servers[which], peer_port, clients, messages, interval, length, timeout=300)
                    samples[which].append(s)
                    print(f"{name} round {r + 1} {which:8s}: sent {s['sent']} recv {s['received']} "
                          f"in {s['wall_s']:.2f}s, server cpu {s['cpu_s']:.2f}s", flush=True)
            results[name] = {k: summarize(v) for k, v in samples.items()}
        for k, s in servers.items():
            results.setdefault("rss_kib_after", {})[k] = s.rss_kib()
    finally:
        for s in servers.values():
            s.stop()
        peer.terminate()

    print()
    print(f"{'scenario':12s} {'server':9s} {'relayed pkt/s':>14s} {'loss %':>7s} {'cpu s/M pkts':>13s}")
    for name, _, _, _, _ in scenarios:
        for which in ("turnpike", "coturn"):
            r = results[name][which]
            print(f"{name:12s} {which:9s} {r['relayed_pkts_per_s']:14.0f} {r['loss_pct']:7.2f} "
                  f"{r['cpu_s_per_million_pkts']:13.2f}")
        tp, ct = results[name]["turnpike"], results[name]["coturn"]
        ratio_tput = tp["relayed_pkts_per_s"] / max(ct["relayed_pkts_per_s"], 1e-9)
        ratio_cpu = tp["cpu_s_per_million_pkts"] / max(ct["cpu_s_per_million_pkts"], 1e-9)
        results[name]["ratios"] = {"throughput_turnpike_over_coturn": ratio_tput,
                                   "cpu_per_msg_turnpike_over_coturn": ratio_cpu}
        print(f"{name:12s} ratio     throughput x{ratio_tput:.2f}, CPU per packet x{ratio_cpu:.2f} (turnpike / coturn)")
    print("(a relayed packet is one datagram through the relay; each uclient message is two:")
    print(" client -> TURN -> echo peer, and echo peer -> TURN -> client)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Side-by-side relay benchmark: the same turnutils_uclient load against turnpike and Debian's
coturn, both on loopback, alternating A B A B in one run (the machines are shared and noisy, so
only same-run ratios mean anything).

Each uclient message goes client -> TURN -> UDP echo peer -> TURN -> client: two relayed
packets (one each way). The client leg runs over one of three transports (--transports):

  udp  plain UDP (uclient's default)
  tcp  TURN over TCP (uclient -t), RFC 8656 section 3.1 framing, relays to the peer still UDP
  tls  TURN over TLS over TCP (uclient -t -S; -S alone would be DTLS). Both servers get the same
       self-signed P-256 certificate, made with openssl in a temporary directory for this run.

Reported per transport, scenario and server (medians over the rounds): relayed packets/s, loss
%, server CPU seconds (utime + stime of the server process, all threads) per million relayed
packets, and the turnpike/coturn ratios.

How packets are counted
  udp: by the client (uclient's tot_recv_msgs x 2), as before: coturn keeps UDP allocations
       after uclient exits, so it has no per-run server-side count.
  tcp, tls: by the servers: turnpike's /metrics (turnpike_relayed_packets_total, both
       directions) and coturn's per-session "peer usage: rp=.., sp=.." log lines (coturn runs
       with -v, which logs a few lines per session, none per packet). uclient cannot count TLS:
       it takes each SSL_read() as one message, and both servers put several frames into one
       TLS record when several are queued, so uclient silently discards those records (both
       servers lose 30-90 % by uclient's count while their own counters show every packet
       relayed; TCP is reliable, so what a server wrote reaches the client). uclient's own
       count is still printed and kept as "uclient loss"; for TLS it measures uclient, not the
       server. Loss = messages sent that the server did not relay back to the client.
  Rate: relayed packets over the time the server was busy relaying: its CPU time is sampled
       every 20 ms and the span holding the middle 90 % of the run's server CPU is taken
       (uclient's wall time includes ~100 ms per client of connection setup and, on TLS, ~10 s
       of waiting for the messages it discarded).

Scenarios: paced (20 clients x 6000 messages, -z 1) and flood (10 clients x 20000, -z 0), both
160-byte messages (-l 160), no RTCP (-c), no client-to-client (-y) mode (uclient's -y loses ~10 %
on TLS against coturn too).

--syscalls: instead of the timed rounds, one short paced run per server and transport with
`strace -c -f -p PID` attached, printing syscalls per relayed packet (strace slows the server
several times over; the counts, not the times, are the result).

Usage: bench/compare.py [--transports udp,tcp,tls] [--scenarios paced,flood] [--rounds 3]
                        [--threads N] [--quick] [--json results.json] [--syscalls]
Needs: coturn (turnserver, turnutils_uclient, turnutils_peer), openssl (for tls), strace (for
--syscalls) and a release build of turnpike (cargo build --release).

Every load is bounded (message counts; each uclient run is killed after 300 s), loopback only;
only the processes this script starts are stopped (by PID), and its temporary directory
(configs, logs, certificate and key) is removed at the end.

Results on this machine kind (2 shared cores, loopback) are in bench/README.md.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from servers import Coturn as CoturnServer, Turnpike as TurnpikeServer
from servers import PASSWORD, TURNPIKE, USER, cpu_seconds, free_port, make_certificate

TRANSPORTS = ("udp", "tcp", "tls")
# Each message crosses the relay twice (client -> peer and peer -> client): two relayed packets.
HOPS = 2


def udp_rcvbuf_errors():
    """The host's count of UDP datagrams dropped for a full receive buffer (all sockets)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def socket_drops(port):
    """Datagrams dropped so far by the UDP socket bound to 127.0.0.1:port (0 if none)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want:
                return int(fields[-1])
    return 0


class Turnpike(TurnpikeServer):
    """turnpike on UDP, TCP and TLS, with /metrics for its own packet counts."""

    def __init__(self, workdir, threads, cert, key):
        super().__init__(workdir, TURNPIKE, threads=threads, cert=cert, key=key, streams=True,
                         api=True, log_level="warn")

    def relayed_mark(self):
        """Something relayed_since() can count from."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api}/metrics", timeout=5) as r:
            text = r.read().decode()
        count = dict(re.findall(
            r'^turnpike_relayed_packets_total\{direction="(to_peer|to_client)"\} (\d+)$', text, re.M))
        return int(count.get("to_peer", 0)), int(count.get("to_client", 0))

    def relayed_since(self, mark, clients):
        """(to peer, to client): packets the server says it relayed since `mark`."""
        now = self.relayed_mark()
        return now[0] - mark[0], now[1] - mark[1]


class Coturn(CoturnServer):
    """coturn on UDP, TCP and TLS, verbose for its per-session packet counts."""

    PEER_USAGE = re.compile(r"peer usage: realm=<[^>]*>, username=<" + re.escape(USER)
                            + r">, rp=(\d+), rb=\d+, sp=(\d+)")

    def __init__(self, workdir, threads, cert, key):
        super().__init__(workdir, threads=threads, cert=cert, key=key, streams=True, verbose=True)

    def _usage(self):
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return [(int(rp), int(sp)) for rp, sp in self.PEER_USAGE.findall(f.read())]

    def relayed_mark(self):
        return len(self._usage())

    def relayed_since(self, mark, clients):
        # A stream session's line comes when its connection closes, a moment after uclient
        # exits. UDP sessions stay until their allocations expire: no count for them.
        deadline = time.time() + 3.0
        while True:
            usage = self._usage()[mark:]
            if len(usage) >= clients or time.time() > deadline:
                break
            time.sleep(0.1)
        if len(usage) < clients:
            return None
        # rp: received from the peer (relayed to the client); sp: sent to the peer.
        return sum(sp for _, sp in usage), sum(rp for rp, _ in usage)


class CpuSampler(threading.Thread):
    """Samples a process's CPU time every 20 ms, to find when it was busy."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop_flag = pid, [], threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            self.samples.append((time.monotonic(), cpu_seconds(self.pid)))
            time.sleep(0.02)

    def finish(self):
        self.stop_flag.set()
        self.join()
        self.samples.append((time.monotonic(), cpu_seconds(self.pid)))

    def busy_span(self, lo=0.05, hi=0.95):
        """Seconds between the samples where the run's CPU use passed lo and hi of its total."""
        t0, c0 = self.samples[0]
        total = self.samples[-1][1] - c0
        if total <= 0:
            return None
        start = next(t for t, c in self.samples if c - c0 >= lo * total)
        end = next(t for t, c in self.samples if c - c0 >= hi * total)
        return max(end - start, 0.02)


def uclient_argv(server, transport, peer_port, clients, messages, interval_ms, length):
    argv = ["turnutils_uclient"]
    if transport == "tcp":
        argv.append("-t")
    elif transport == "tls":
        argv += ["-t", "-S"]
    argv += [
        "-p", str(server.ports[transport]), "-u", USER, "-w", PASSWORD,
        "-e", "127.0.0.1", "-r", str(peer_port), "-m", str(clients), "-n", str(messages),
        "-l", str(length), "-z", str(interval_ms), "-c", "127.0.0.1",
    ]
    return argv


def run_uclient(server, transport, peer_port, clients, messages, interval_ms, length, timeout):
    argv = uclient_argv(server, transport, peer_port, clients, messages, interval_ms, length)
    mark = server.relayed_mark()
    host_drops0, peer_drops0 = udp_rcvbuf_errors(), socket_drops(peer_port)
    sampler = CpuSampler(server.pid)
    cpu0, t0 = server.cpu(), time.time()
    sampler.start()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout).stdout
    wall = time.time() - t0
    sampler.finish()
    cpu = server.cpu() - cpu0
    host_drops, peer_drops = udp_rcvbuf_errors() - host_drops0, socket_drops(peer_port) - peer_drops0
    sent = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", out)
    if not sent:
        raise RuntimeError(f"{server.name}: uclient printed no totals:\n{out[-2000:]}")
    tx, rx = map(int, sent[-1])
    server_relayed = None if transport == "udp" else server.relayed_since(mark, clients)
    if transport != "udp" and server_relayed is None:
        raise RuntimeError(f"{server.name}: no server-side packet count for {transport}")
    if server_relayed is None:
        relayed, delivered = rx * HOPS, rx
    else:
        relayed, delivered = sum(server_relayed), server_relayed[1]
    return {
        "sent": tx, "received": rx, "server_relayed": server_relayed,
        "relayed": relayed, "delivered": delivered,
        "wall_s": wall, "busy_s": sampler.busy_span(), "cpu_s": cpu,
        # Where lost datagrams went: the echo peer's socket, or any UDP socket of the host
        # (the servers' relay and listener sockets, the peer, and whatever else runs here).
        "peer_socket_drops": peer_drops, "host_udp_rcvbuf_errors": host_drops,
        "tls_versions": dict(
            (v, len(re.findall(rf"connected with cipher \S+, method={re.escape(v)}\b", out)))
            for v in ("TLSv1.2", "TLSv1.3")) if transport == "tls" else None,
    }


def summarize(samples):
    def med(f):
        return statistics.median(f(s) for s in samples)

    return {
        "relayed_pkts_per_s": med(lambda s: s["relayed"] / (s["busy_s"] or s["wall_s"])),
        # Messages sent that did not come back: by uclient's count on udp, by the server's count
        # of packets it relayed to the client on tcp and tls.
        "loss_pct": med(lambda s: 100.0 * max(0, s["sent"] - s["delivered"]) / max(s["sent"], 1)),
        "uclient_loss_pct": med(lambda s: 100.0 * (s["sent"] - s["received"]) / max(s["sent"], 1)),
        "cpu_s_per_million_pkts": med(lambda s: s["cpu_s"] / max(s["relayed"], 1) * 1e6),
        "rounds": len(samples),
        "samples": samples,
    }


# --- syscall counts -------------------------------------------------------------------------

STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def strace_counts(path):
    """{syscall: (calls, errors)} from an `strace -c` summary."""
    counts = {}
    with open(path) as f:
        for line in f:
            m = STRACE_LINE.match(line)
            if m and m.group(3) != "total":
                counts[m.group(3)] = (int(m.group(1)), int(m.group(2) or 0))
    return counts


def syscall_run(server, transport, peer_port, workdir, clients, messages, interval, length):
    out = os.path.join(workdir, f"strace-{server.name}-{transport}.txt")
    strace = subprocess.Popen(["strace", "-c", "-f", "-qq", "-o", out, "-p", str(server.pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attach to every thread before the load starts
    try:
        s = run_uclient(server, transport, peer_port, clients, messages, interval, length, timeout=300)
    finally:
        strace.send_signal(signal.SIGINT)
        strace.wait(30)
    counts = strace_counts(out)
    relayed = s["relayed"]
    per_pkt = {k: c / relayed for k, (c, _) in counts.items()}
    return {"relayed": relayed, "calls": counts, "per_relayed_packet": per_pkt,
            "total_per_relayed_packet": sum(per_pkt.values())}


def print_syscalls(results):
    for transport, by_server in results.items():
        names = sorted({k for r in by_server.values() for k in r["calls"]},
                       key=lambda k: -max(r["per_relayed_packet"].get(k, 0) for r in by_server.values()))
        print(f"\nsyscalls per relayed packet, {transport} "
              "(" + ", ".join(f"{w}: {r['relayed']} packets" for w, r in by_server.items()) + ")")
        print(f"{'syscall':18s} " + " ".join(f"{w:>10s}" for w in by_server))
        for k in names:
            vals = [r["per_relayed_packet"].get(k, 0) for r in by_server.values()]
            if max(vals) < 0.005:
                continue
            errs = [r["calls"].get(k, (0, 0))[1] for r in by_server.values()]
            note = "  (errors: " + ", ".join(str(e) for e in errs) + ")" if any(errs) else ""
            print(f"{k:18s} " + " ".join(f"{v:10.3f}" for v in vals) + note)
        print(f"{'total':18s} " + " ".join(f"{r['total_per_relayed_packet']:10.3f}" for r in by_server.values()))


# --- main -----------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transports", default="udp",
                    help="comma-separated, of udp,tcp,tls (default: udp)")
    ap.add_argument("--scenarios", default="paced,flood", help="comma-separated, of paced,flood")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="server threads (0 = both servers' default)")
    ap.add_argument("--quick", action="store_true",
                    help="a tenth of the load, a smoke run only: connection setup then dominates the figures")
    ap.add_argument("--syscalls", action="store_true",
                    help="count syscalls per relayed packet with strace -c instead of timing")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()

    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    bad = [t for t in transports if t not in TRANSPORTS]
    if bad or not transports:
        sys.exit(f"--transports: choose from {','.join(TRANSPORTS)}")
    scale = 0.1 if args.quick else 1.0
    # (name, clients, messages per client, interval ms, bytes)
    all_scenarios = {
        "paced": (20, int(6000 * scale), 1, 160),
        "flood": (10, int(20000 * scale), 0, 160),
    }
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not scenarios or any(s not in all_scenarios for s in scenarios):
        sys.exit(f"--scenarios: choose from {','.join(all_scenarios)}")
    if args.rounds < 1:
        sys.exit("--rounds: at least 1")

    tools = ["turnserver", "turnutils_uclient", "turnutils_peer", "openssl"]
    if args.syscalls:
        tools.append("strace")
    for tool in tools:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (apt-get install coturn openssl strace)")
    if not os.path.exists(TURNPIKE):
        sys.exit("build first: cargo build --release")

    workdir = tempfile.mkdtemp(prefix="turnpike-bench-")
    servers = {}
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "cpus": os.cpu_count(), "threads": args.threads}
    peer = None
    try:
        cert, key = make_certificate(workdir)
        peer_port = free_port()
        peer = subprocess.Popen(["turnutils_peer", "-L", "127.0.0.1", "-p", str(peer_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers["turnpike"] = Turnpike(workdir, args.threads, cert, key)
        servers["coturn"] = Coturn(workdir, args.threads, cert, key)

        if args.syscalls:
            clients, messages, interval, length = 10, int(3000 * scale), 1, 160
            sys_results = {}
            for transport in transports:
                for which in ("turnpike", "coturn"):
                    r = syscall_run(servers[which], transport, peer_port, workdir,
                                    clients, messages, interval, length)
                    sys_results.setdefault(transport, {})[which] = r
                    print(f"{transport} {which}: {r['relayed']} relayed packets, "
                          f"{r['total_per_relayed_packet']:.2f} syscalls each", flush=True)
            results["syscalls"] = sys_results
            print_syscalls(sys_results)
        else:
            for transport in transports:
                for name in scenarios:
                    clients, messages, interval, length = all_scenarios[name]
                    samples = {"turnpike": [], "coturn": []}
                    for r in range(args.rounds):
                        for which in ("turnpike", "coturn"):
                            s = run_uclient(servers[which], transport, peer_port, clients, messages,
                                            interval, length, timeout=300)
                            samples[which].append(s)
                            counted = ("" if s["server_relayed"] is None else
                                       " server relayed {} to peer, {} to client".format(*s["server_relayed"]))
                            print(f"{transport} {name} round {r + 1} {which:8s}: sent {s['sent']} "
                                  f"uclient recv {s['received']}{counted} in {s['wall_s']:.2f}s "
                                  f"(busy {s['busy_s'] or 0:.2f}s), server cpu {s['cpu_s']:.2f}s, "
                                  f"UDP drops: peer socket {s['peer_socket_drops']}, "
                                  f"host {s['host_udp_rcvbuf_errors']}",
                                  flush=True)
                    res = {k: summarize(v) for k, v in samples.items()}
                    tp, ct = res["turnpike"], res["coturn"]
                    res["ratios"] = {
                        "throughput_turnpike_over_coturn":
                            tp["relayed_pkts_per_s"] / max(ct["relayed_pkts_per_s"], 1e-9),
                        "cpu_per_pkt_turnpike_over_coturn":
                            tp["cpu_s_per_million_pkts"] / max(ct["cpu_s_per_million_pkts"], 1e-9),
                    }
                    results.setdefault(transport, {})[name] = res
            results["rss_kib_after"] = {k: s.rss_kib() for k, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
        if peer is not None:
            peer.terminate()
            try:
                peer.wait(5)
            except subprocess.TimeoutExpired:
                peer.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    if not args.syscalls:
        print()
        print(f"{'transport':9s} {'scenario':8s} {'server':9s} {'relayed pkt/s':>14s} {'loss %':>7s} "
              f"{'uclient loss %':>14s} {'cpu s/M pkts':>13s}")
        for transport in transports:
            for name in scenarios:
                res = results[transport][name]
                for which in ("turnpike", "coturn"):
                    r = res[which]
                    print(f"{transport:9s} {name:8s} {which:9s} {r['relayed_pkts_per_s']:14.0f} "
                          f"{r['loss_pct']:7.2f} {r['uclient_loss_pct']:14.2f} "
                          f"{r['cpu_s_per_million_pkts']:13.2f}")
                q = res["ratios"]
                print(f"{transport:9s} {name:8s} {'ratio':9s} throughput x{q['throughput_turnpike_over_coturn']:.2f}, "
                      f"CPU per packet x{q['cpu_per_pkt_turnpike_over_coturn']:.2f} (turnpike / coturn)")
        print("(a relayed packet is one datagram or frame through the relay; each uclient message is")
        print(" two: client -> TURN -> echo peer, and echo peer -> TURN -> client. loss %: udp by")
        print(" uclient's count, tcp/tls by the servers' own counts; uclient cannot count TLS, see --help)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""turnpike beside Debian's coturn under our own load generator (turnpike-load), on loopback,
alternating A B A B in one run: the machines are shared and noisy, so only same-run ratios of
medians mean anything.

Each round runs every scenario against turnpike, then coturn, each on a fresh server (so RSS
and allocation tables start clean), the generator with --server-pid and --json:

  paced    relay: 20 clients, 160 B ChannelData, 20k msgs/s, 5 s
  flood    relay: 10 clients, --rate 0, 5 s
  maxrate  the highest loss-free paced rate: 10 clients, 20k 40k 60k 80k ... 160k msgs/s, 3 s
           each, stopping at the first step with loss > 0.1 % or that delivers under 90 % of
           its rate (a rate the generator could not offer is not a rate the server sustained)
  c2c      relay --client-to-client: 20 clients (10 pairs on this server), paced 20k, 5 s
  sendind  relay --send-indication (Send/Data instead of ChannelData), 20 clients, paced 20k
  alloc    alloc --count 5000 --in-flight 32: allocations/s, setup p50/p99, server CPU and RSS
           per allocation, RSS growth returned after all are deleted, kernel UDP socket memory
  rtt      relay --clients 1 --rate 0 --window 1 (one packet in flight), 3 s: p50/p99/max
  binding  binding --rate 0, 5 s: requests/s, server CPU per request
  video    relay: 20 clients, 1200 B ChannelData, paced 10k msgs/s, 5 s

One relay "message" is one payload sent by a client and its echo received back by the same
client: two relayed packets (client -> TURN -> echo peer -> TURN -> client); CPU per message
is the server's utime + stime (all threads) over the send phase and the drain, divided by the
messages delivered (the generator's figures; see its --help).

Printed: every figure's median for both servers, the ratio turnpike/coturn and the spread
(min-max over rounds), then issue 10's targets with pass/fail, the generator's self-check
warnings (the generator used more CPU than the server: such figures measure the generator),
scenarios skipped and runs that failed. Fewer than 3 rounds is a smoke run, not a report.

A scenario the generator cannot run yet (its `MODE --help` lacks a flag the scenario needs, or
it answers a usage error) is skipped with a note, so the script runs against a generator that
is still growing.

Configurations (bench/servers.py): one static user, loopback peers allowed, relay ports outside
the kernel's ephemeral range (coturn 10000-19999, turnpike 20000-29999), turnpike with
limits.unauth_replies_per_sec = 0 and limits.allocations_per_user = 0 (coturn has neither
limit by default), UDP listeners only, both logging at their default level (one line or a few
per allocation) into a file, both on their default thread count unless --threads.

Usage: bench/load_compare.py [--rounds 3] [--quick] [--only paced,alloc,...] [--threads N]
                             [--json results.json] [--load-bin PATH] [--turnpike-bin PATH]
Needs: coturn (turnserver) and release builds of turnpike and turnpike-load
(cargo build --release). Every load is bounded in count and time (the generator's
--timeout-secs, and each generator process is killed 15 s after that); loopback only; only the
processes this script starts are stopped (by PID), and its temporary directory (configs,
password file, logs) is removed at the end.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import servers
from servers import PAGE_KIB, PASSWORD, USER

LOAD = os.path.join(servers.ROOT, "target", "release", "turnpike-load")
SERVERS = ("turnpike", "coturn")
# A paced step counts as loss-free at or under this loss, and only if it delivered at least
# this share of the rate asked for.
LOSS_FREE_PCT = 0.1
RATE_REACHED = 0.9
# Generator usage errors: the contract says exit 64; clap's own default is 2 with this text.
USAGE_MARKERS = ("unexpected argument", "unrecognized subcommand", "unrecognized option",
                 "unknown option", "invalid value", "Usage:")


# --- scenarios ------------------------------------------------------------------------------

def get(path):
    """A figure from a generator JSON object, by dotted path; None if absent or null."""
    def f(j):
        for k in path.split("."):
            if not isinstance(j, dict) or j.get(k) is None:
                return None
            j = j[k]
        return j
    return f


def socket_kib_per_alloc(j):
    """Kernel UDP socket buffer memory (host-wide /proc/net/sockstat) held per allocation."""
    pages, ok = j.get("sockstat_udp_mem_pages"), j.get("ok")
    if not isinstance(pages, dict) or not ok:
        return None
    return (pages["held"] - pages["idle"]) * PAGE_KIB / ok


def failed_allocs(j):
    failed = j.get("failed")
    return sum(failed.values()) if isinstance(failed, dict) else None


# Per scenario, the figures printed: (key, label, extractor). TARGETS below say which of them
# issue 10 judges and how.
RELAY_FIGURES = [
    ("msgs_per_sec", "delivered msgs/s", get("msgs_per_sec")),
    ("loss_pct", "loss %", get("loss_pct")),
    ("cpu_us", "server CPU us/msg", get("server_cpu_us_per_msg")),
    ("rtt_p50", "RTT p50 us", get("rtt_us.p50")),
    ("rtt_p99", "RTT p99 us", get("rtt_us.p99")),
]
SCENARIO_FIGURES = {
    "paced": RELAY_FIGURES,
    "flood": RELAY_FIGURES,
    "maxrate": [
        ("best_rate", "highest loss-free paced msgs/s", get("best_rate")),
        ("best_cpu_us", "server CPU us/msg at that rate", get("best_cpu_us")),
    ],
    "c2c": RELAY_FIGURES,
    "sendind": RELAY_FIGURES,
    "alloc": [
        ("allocs_per_sec", "allocations/s", get("allocs_per_sec")),
        ("failed", "failed allocations", failed_allocs),
        ("setup_p50", "setup p50 us", get("setup_us.p50")),
        ("setup_p99", "setup p99 us", get("setup_us.p99")),
        ("cpu_us", "server CPU us/allocation", get("server_cpu_us_per_alloc")),
        ("rss_per_alloc", "RSS KiB per held allocation", get("rss_kib_per_alloc")),
        ("returned", "fraction of RSS growth returned", get("returned_fraction")),
        ("sock_kib", "UDP socket KiB per allocation (sockstat)", socket_kib_per_alloc),
    ],
    "rtt": [
        ("rtt_p50", "RTT p50 us", get("rtt_us.p50")),
        ("rtt_p99", "RTT p99 us", get("rtt_us.p99")),
        ("rtt_max", "RTT max us", get("rtt_us.max")),
        ("cpu_us", "server CPU us/msg", get("server_cpu_us_per_msg")),
    ],
    "binding": [
        ("per_sec", "requests/s", get("per_sec")),
        ("cpu_us", "server CPU us/request", get("server_cpu_us_per_req")),
        ("rtt_p50", "RTT p50 us", get("rtt_us.p50")),
        ("rtt_p99", "RTT p99 us", get("rtt_us.p99")),
    ],
    "video": RELAY_FIGURES,
}

# Issue 10's targets: (what, scenario, figure key, test on the ratio or on turnpike's own value)
TARGETS = [
    ("CPU per relayed message, paced 20k: ratio <= 0.65", "paced", "cpu_us", "ratio", "<=", 0.65),
    ("CPU per relayed message, flood: ratio <= 0.65", "flood", "cpu_us", "ratio", "<=", 0.65),
    ("higher loss-free paced rate than coturn", "maxrate", "best_rate", "medians", ">", None),
    ("client-to-client CPU per message: ratio <= 0.4", "c2c", "cpu_us", "ratio", "<=", 0.4),
    ("allocations/s (32 in flight): ratio >= 3", "alloc", "allocs_per_sec", "ratio", ">=", 3.0),
    ("RSS per held allocation: ratio <= 0.25", "alloc", "rss_per_alloc", "ratio", "<=", 0.25),
    ("RSS growth returned after deletes: turnpike >= 0.80", "alloc", "returned", "turnpike", ">=", 0.8),
    ("relay RTT p99, one in flight: ratio <= 1.0", "rtt", "rtt_p99", "ratio", "<=", 1.0),
    ("STUN Binding CPU per request: ratio <= 0.5", "binding", "cpu_us", "ratio", "<=", 0.5),
]
OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, ">": lambda a, b: a > b}


def scenario_table(quick):
    """name -> (mode, mode arguments, generator time bound in s); maxrate's arguments are one
    step's, without --rate."""
    d = "1" if quick else "5"
    return {
        "paced": ("relay", ["--clients", "20", "--size", "160", "--rate", "20000", "--duration-secs", d], 40),
        "flood": ("relay", ["--clients", "10", "--size", "160", "--rate", "0", "--duration-secs", d], 40),
        "maxrate": ("relay", ["--clients", "10", "--size", "160", "--duration-secs", "1" if quick else "3"], 30),
        "c2c": ("relay", ["--client-to-client", "--clients", "20", "--size", "160", "--rate", "20000",
                          "--duration-secs", d], 40),
        "sendind": ("relay", ["--send-indication", "--clients", "20", "--size", "160", "--rate", "20000",
                              "--duration-secs", d], 40),
        "alloc": ("alloc", ["--count", "1000" if quick else "5000", "--in-flight", "32", "--hold-secs", "1"], 90),
        "rtt": ("relay", ["--clients", "1", "--rate", "0", "--window", "1", "--duration-secs",
                          "1" if quick else "3"], 30),
        "binding": ("binding", ["--rate", "0", "--duration-secs", d], 40),
        "video": ("relay", ["--clients", "20", "--size", "1200", "--rate", "10000", "--duration-secs", d], 40),
    }


def search_steps(quick):
    return [20000, 40000, 80000] if quick else [20000, 40000, 60000, 80000, 100000, 120000, 140000,
                                                 160000]


# --- the generator ---------------------------------------------------------------------------

class Generator:
    def __init__(self, binary, workdir):
        self.binary = binary
        self.help = {}  # mode -> its --help text, or None if the mode does not exist
        pw = os.path.join(workdir, "password")
        with open(pw, "w") as f:
            f.write(PASSWORD + "\n")
        os.chmod(pw, 0o600)
        self.password_file = pw

    def mode_help(self, mode):
        if mode not in self.help:
            p = subprocess.run([self.binary, mode, "--help"], capture_output=True, text=True,
                               timeout=10)
            self.help[mode] = p.stdout + p.stderr if p.returncode == 0 else None
        return self.help[mode]

    def missing(self, mode, args):
        """Why this generator cannot run `mode args`, or None if it can, from its --help."""
        text = self.mode_help(mode)
        if text is None:
            return f"turnpike-load has no `{mode}` mode"
        needed = [a for a in args if a.startswith("--")] + ["--server-pid", "--json", "--timeout-secs"]
        absent = [a for a in needed if a not in text]
        if absent:
            return f"turnpike-load {mode} has no {', '.join(absent)}"
        return None

    def credentials(self, mode):
        if "--password-file" in (self.mode_help(mode) or ""):
            return ["--user", USER, "--password-file", self.password_file]
        return ["--user", USER, "--password", PASSWORD]

    def run(self, mode, server, args, bound):
        """One generator run against `server`: a dict with rc, wall_s, and json (the parsed
        object), or error / unsupported (a usage error: the generator lacks something)."""
        argv = [self.binary, mode, "--server", f"127.0.0.1:{server.ports['udp']}",
                *self.credentials(mode), "--server-pid", str(server.pid), "--json",
                "--timeout-secs", str(bound), *args]
        shown = [a if a != PASSWORD else "***" for a in argv]
        t0 = time.monotonic()
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=bound + 15)
        except subprocess.TimeoutExpired:
            return {"argv": shown, "rc": None, "wall_s": time.monotonic() - t0,
                    "error": f"generator killed after {bound + 15} s"}
        res = {"argv": shown, "rc": p.returncode, "wall_s": round(time.monotonic() - t0, 3)}
        stderr_lines = [line for line in p.stderr.splitlines() if line.strip()]
        if stderr_lines:
            res["stderr_tail"] = stderr_lines[-5:]
        try:
            j = json.loads(p.stdout)
            if isinstance(j, dict):
                res["json"] = j
        except ValueError:
            pass
        if p.returncode == 0 and "json" in res:
            return res
        last = stderr_lines[-1] if stderr_lines else f"exit status {p.returncode}"
        if p.returncode == 64 or any(m in p.stderr for m in USAGE_MARKERS):
            res["unsupported"] = last
        elif p.returncode == 0:
            res["error"] = "stdout was not one JSON object"
        elif p.returncode == 2:
            res["error"] = f"timed out after {bound} s: {last}"
        else:
            res["error"] = last
        if not server.alive():
            res["error"] = f"{server.name} exited (status {server.proc.returncode}): " \
                           f"{server.log_tail(3).strip()}"
        return res


def search(gen, server, args, bound, steps):
    """The highest paced rate (msgs/s) the server relays loss-free, stepping up the rate."""
    out = {"steps": [], "best_rate": 0, "best_cpu_us": None, "stopped": "top step reached"}
    for rate in steps:
        r = gen.run("relay", server, [*args, "--rate", str(rate)], bound)
        r["rate"] = rate
        out["steps"].append(r)
        if "json" not in r or r.get("rc") != 0:
            out["stopped"] = f"at {rate}: {r.get('error') or r.get('unsupported')}"
            if "unsupported" in r:
                out["unsupported"] = r["unsupported"]
            break
        j = r["json"]
        loss, got = j.get("loss_pct") or 0.0, j.get("msgs_per_sec") or 0.0
        if loss > LOSS_FREE_PCT:
            out["stopped"] = f"at {rate}: loss {loss:.2f} %"
            break
        if got < RATE_REACHED * rate:
            out["stopped"] = f"at {rate}: delivered only {got:.0f} msgs/s"
            break
        out["best_rate"], out["best_cpu_us"] = rate, j.get("server_cpu_us_per_msg")
        if j.get("self_check", "ok") != "ok":
            out["self_check"] = j["self_check"]
    return out


# --- summary ---------------------------------------------------------------------------------

def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float) and abs(v) < 1000:
        return f"{v + 0.0:.3g}"  # + 0.0: no "-0" for a negative zero
    return f"{v:.0f}" if isinstance(v, float) else str(v)


def summarize(runs, scenarios):
    """scenario -> figure key -> {label, turnpike/coturn: {median, min, max, n}, ratio}."""
    summary = {}
    for name in scenarios:
        figs = {}
        for key, label, extract in SCENARIO_FIGURES[name]:
            row = {"label": label}
            for which in SERVERS:
                vals = [extract(r["json"]) for r in runs
                        if r["scenario"] == name and r["server"] == which and "json" in r
                        and "error" not in r]
                vals = [v for v in vals if isinstance(v, (int, float))]
                row[which] = ({"median": statistics.median(vals), "min": min(vals),
                               "max": max(vals), "n": len(vals)} if vals else None)
            tp, ct = row["turnpike"], row["coturn"]
            # A ratio of a figure that can be zero or negative (loss, returned memory) says
            # nothing: only positive medians get one.
            row["ratio"] = (tp["median"] / ct["median"]
                            if tp and ct and tp["median"] > 0 and ct["median"] > 0 else None)
            figs[key] = row
        summary[name] = figs
    return summary


def verdicts(summary, skipped):
    out = []
    for what, scen, key, on, op, bound in TARGETS:
        row = summary.get(scen, {}).get(key)
        if row is None:
            why = f"skipped ({skipped[scen]})" if scen in skipped else "not run"
            out.append({"target": what, "value": None, "verdict": why})
            continue
        tp, ct = ((row[w] or {}).get("median") for w in SERVERS)
        if on == "medians":
            # Compared directly: a ratio is undefined when neither was loss-free at the
            # first step (both 0).
            if tp is None or ct is None:
                out.append({"target": what, "value": None, "verdict": "no figure"})
                continue
            verdict = "pass" if OPS[op](tp, ct) else ("FAIL (same)" if tp == ct else "FAIL")
            out.append({"target": what, "value": row["ratio"], "turnpike": tp, "coturn": ct,
                        "verdict": f"{verdict}: {fmt(tp)} vs {fmt(ct)}"})
            continue
        value = row["ratio"] if on == "ratio" else tp
        if value is None:
            out.append({"target": what, "value": None, "verdict": "no figure"})
            continue
        verdict = "pass" if OPS[op](value, bound) else "FAIL"
        out.append({"target": what, "value": value, "verdict": verdict})
    return out


def print_report(summary, targets, runs, skipped, rounds, loadavg):
    print()
    print("host load average (1 min) at start {:.1f}, at end {:.1f} on {} cores: higher than the "
          "core count means other work shared the machine".format(loadavg[0][0], loadavg[1][0],
                                                                 os.cpu_count()))
    if rounds < 3:
        print(f"*** {rounds} round(s): a smoke run, not a report (a report needs --rounds 3 or more) ***")
    head = f"{'figure':52s} {'turnpike':>10s} {'coturn':>10s} {'ratio':>6s}   {'turnpike spread':>19s} {'coturn spread':>19s}"
    print(head)
    print("-" * len(head))
    for name, figs in summary.items():
        for key, row in figs.items():
            tp, ct = row["turnpike"], row["coturn"]
            spread = [f"{fmt(s['min'])}..{fmt(s['max'])}" if s else "-" for s in (tp, ct)]
            ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
            print(f"{name + ': ' + row['label']:52s} {fmt(tp and tp['median']):>10s} "
                  f"{fmt(ct and ct['median']):>10s} {ratio:>6s}   {spread[0]:>19s} {spread[1]:>19s}")
    print()
    print(f"{'target (issue 10)':56s} {'measured':>9s}  verdict")
    for t in targets:
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"{t['target']:56s} {v:>9s}  {t['verdict']}")
    warnings = [r for r in runs if r.get("json", {}).get("self_check", "ok") != "ok"]
    warnings += [dict(r, json={"self_check": r["search"]["self_check"]}) for r in runs
                 if "self_check" in r.get("search", {})]
    if warnings:
        print("\ngenerator self-check warnings (these figures are limited by the generator):")
        for r in warnings:
            print(f"  round {r['round']} {r['scenario']} {r['server']}: {r['json']['self_check']}")
    if skipped:
        print("\nskipped:")
        for name, why in skipped.items():
            print(f"  {name}: {why}")
    failed = [r for r in runs if "error" in r]
    if failed:
        print("\nfailed runs:")
        for r in failed:
            print(f"  round {r['round']} {r['scenario']} {r['server']}: {r['error']}")


def progress_line(r):
    if "error" in r:
        return f"FAILED: {r['error']}"
    j = r.get("json", {})
    if r["scenario"] == "maxrate":
        s = r["search"]
        if not s["best_rate"]:
            return f"not loss-free at the first step (stopped {s['stopped']})"
        return (f"loss-free up to {s['best_rate']} msgs/s (stopped {s['stopped']}), "
                f"CPU {fmt(s['best_cpu_us'])} us/msg there")
    parts = []
    for key, label, extract in SCENARIO_FIGURES[r["scenario"]]:
        v = extract(j)
        if v is not None:
            parts.append(f"{label} {fmt(v)}")
    check = j.get("self_check", "ok")
    return ", ".join(parts) + ("" if check == "ok" else f"  [self-check: {check}]")


# --- main ------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--rounds", type=int, help="rounds of A B (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="1 round, 1 s loads, 1000 allocations: a smoke test, not a report")
    ap.add_argument("--only", help="comma-separated scenarios (default: all, in the order above)")
    ap.add_argument("--threads", type=int, default=0,
                    help="server threads: turnpike threads, coturn --relay-threads (0 = defaults)")
    ap.add_argument("--json", help="write every raw result and the summary here")
    ap.add_argument("--load-bin", default=LOAD, help="turnpike-load binary (default: %(default)s)")
    ap.add_argument("--turnpike-bin", default=servers.TURNPIKE,
                    help="turnpike binary (default: %(default)s)")
    args = ap.parse_args()

    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        sys.exit("--rounds: at least 1")
    table = scenario_table(args.quick)
    scenarios = list(table) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in table]
    if bad or not scenarios:
        sys.exit(f"--only: choose from {','.join(table)}")
    if shutil.which("turnserver") is None:
        sys.exit("turnserver not found (apt-get install coturn)")
    for path, what in ((args.load_bin, "--load-bin"), (args.turnpike_bin, "--turnpike-bin")):
        if not os.access(path, os.X_OK):
            sys.exit(f"{what}: {path} is not an executable (cargo build --release)")
    fd_limit = servers.raise_fd_limit()

    workdir = tempfile.mkdtemp(prefix="turnpike-loadbench-")
    gen = Generator(args.load_bin, workdir)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
               "loadavg_start": os.getloadavg(), "rounds": rounds, "quick": args.quick,
               "threads": args.threads, "fd_limit": fd_limit, "load_bin": args.load_bin,
               "turnpike_bin": args.turnpike_bin, "scenarios": scenarios}
    runs, skipped, live = [], {}, []
    try:
        for name in scenarios:
            mode, margs, _ = table[name]
            why = gen.missing(mode, margs)
            if why:
                skipped[name] = why
                print(f"skipping {name}: {why}", flush=True)
        for rnd in range(1, rounds + 1):
            for name in scenarios:
                if name in skipped:
                    continue
                mode, margs, bound = table[name]
                for which in SERVERS:
                    run = {"round": rnd, "scenario": name, "server": which}
                    try:
                        server = (servers.Turnpike(workdir, args.turnpike_bin, threads=args.threads)
                                  if which == "turnpike" else servers.Coturn(workdir, threads=args.threads))
                    except RuntimeError as e:
                        run["error"] = f"did not start: {e}"
                        runs.append(run)
                        print(f"round {rnd} {name:8s} {which:8s}: {run['error']}", flush=True)
                        continue
                    live.append(server)
                    try:
                        if name == "maxrate":
                            s = search(gen, server, margs, bound, search_steps(args.quick))
                            run["search"] = s
                            run["json"] = {"best_rate": s["best_rate"], "best_cpu_us": s["best_cpu_us"]}
                            if "unsupported" in s:
                                run["unsupported"] = s["unsupported"]
                            elif not s["steps"] or "json" not in s["steps"][0]:
                                run["error"] = s["stopped"]
                                del run["json"]
                        else:
                            run.update(gen.run(mode, server, margs, bound))
                        run["server_rss_kib_end"] = server.rss_kib() if server.alive() else None
                    finally:
                        server.stop()
                        live.remove(server)
                    runs.append(run)
                    if "unsupported" in run:
                        skipped[name] = f"usage error from turnpike-load: {run['unsupported']}"
                        print(f"skipping {name}: {skipped[name]}", flush=True)
                        break
                    print(f"round {rnd} {name:8s} {which:8s}: {progress_line(run)}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: reporting what ran", file=sys.stderr)
    finally:
        for s in live:
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    done = [s for s in scenarios if s not in skipped]
    summary = summarize([r for r in runs if "unsupported" not in r], done)
    targets = verdicts(summary, skipped)
    loadavg_end = os.getloadavg()
    print_report(summary, targets, runs, skipped, rounds, (results["loadavg_start"], loadavg_end))
    results.update(loadavg_end=loadavg_end, runs=runs, skipped=skipped, summary=summary,
                   targets=targets)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

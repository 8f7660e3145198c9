#!/usr/bin/env bash
# The same relay load against turnpike at 1, 2, 4, 8 and 16 shards: delivered msgs/s and server
# CPU per message for each shard count. Written for a rented 16-core machine (a few minutes of
# it); runs anywhere with --max-threads. See --help.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: bench/scaling.sh [options] [OUTDIR]

Runs turnpike (threads = 1 2 4 8 16 shards, each on a fresh server) under two relay loads from
turnpike-load, 160 B ChannelData to the generator's built-in UDP echo peer, and reports for
each shard count: delivered msgs/s, loss, server CPU per message (utime + stime of the server,
all threads, over the generators' whole run, divided by the messages delivered) and the
generators' own CPU. With --coturn, Debian's coturn at the same --relay-threads for reference.

Loads: flood (--rate 0) and paced (--rate R msgs/s in total), each D seconds, K clients in total
split over G generator processes run at once (their msgs/s summed). Enough clients matter: the
kernel's SO_REUSEPORT hash spreads 5-tuples over the shards, so 16 shards want many more than 16.

Pinning (taskset, only on 4 or more cores): generator i runs on the two cores
N-2G+2i and N-2G+2i+1 (the last 2G cores of N); the server on cores 0 .. N-2G-1. Shard counts
above N-2G share those server cores (the table says so). Fewer than 4 cores, or --no-pin: no
pinning (generator and server share every core; CPU per message still counts, msgs/s less).

Options:
  --max-threads N    skip shard counts above N (default: the number of cores, $(nproc) here)
  --threads "LIST"   shard counts to run (default "1 2 4 8 16")
  --duration S       seconds per load (default 5)
  --rate R           total paced rate, msgs/s (default 100000)
  --clients K        clients in total (default 64)
  --generators G     generator processes (default 2 on 16+ cores, else 1)
  --coturn           also coturn at --relay-threads = each shard count (needs turnserver)
  --no-pin           no taskset
  --load-bin PATH    default target/release/turnpike-load
  --turnpike-bin P   default target/release/turnpike
  --out DIR          results directory (default \$OUT, else the positional OUTDIR, else
                     ./scaling-<date>); it gets summary.txt, scaling.tsv, raw/ (each generator's
                     JSON) and logs/ (server logs)
Builds nothing. Loopback only; every load bounded (the generator's --timeout-secs and
timeout(1)); only the processes this script starts are stopped, by PID; its configs and password
file live in a temporary directory removed at exit. Time: about (D + 3) s per load per shard
count per server, so the defaults take ~70 s for turnpike alone, ~140 s with --coturn.
EOF
}

THREADS_LIST="1 2 4 8 16"
MAX_THREADS=$(nproc)
DURATION=5
RATE=100000
CLIENTS=64
GENERATORS=""
COTURN=0
PIN=1
LOAD_BIN="$ROOT/target/release/turnpike-load"
TURNPIKE_BIN="$ROOT/target/release/turnpike"
OUTDIR="${OUT:-}"

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --max-threads) MAX_THREADS=$2; shift 2 ;;
    --threads) THREADS_LIST=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --generators) GENERATORS=$2; shift 2 ;;
    --coturn) COTURN=1; shift ;;
    --no-pin) PIN=0; shift ;;
    --load-bin) LOAD_BIN=$2; shift 2 ;;
    --turnpike-bin) TURNPIKE_BIN=$2; shift 2 ;;
    --out) OUTDIR=$2; shift 2 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 64 ;;
    *) OUTDIR=$1; shift ;;
  esac
done

for n in "$MAX_THREADS" "$DURATION" "$RATE" "$CLIENTS" ${GENERATORS:+"$GENERATORS"}; do
  case "$n" in ''|*[!0-9]*) echo "not a whole number: $n" >&2; exit 64 ;; esac
done
for bin in "$LOAD_BIN" "$TURNPIKE_BIN"; do
  [ -x "$bin" ] || { echo "$bin: not an executable (this script builds nothing)" >&2; exit 1; }
done
if [ "$COTURN" = 1 ] && ! command -v turnserver >/dev/null; then
  echo "--coturn: turnserver not found, running turnpike only" >&2
  COTURN=0
fi

NCPU=$(nproc)
if [ -z "$GENERATORS" ]; then
  if [ "$NCPU" -ge 16 ]; then GENERATORS=2; else GENERATORS=1; fi
fi
[ "$GENERATORS" -ge 1 ] || { echo "--generators: at least 1" >&2; exit 64; }
[ "$CLIENTS" -ge "$GENERATORS" ] || { echo "--clients: at least one per generator" >&2; exit 64; }
if [ "$PIN" = 1 ] && { [ "$NCPU" -lt 4 ] || [ $((NCPU - 2 * GENERATORS)) -lt 1 ] || ! command -v taskset >/dev/null; }; then
  PIN=0
fi
if [ "$PIN" = 1 ]; then
  SERVER_CORES=$((NCPU - 2 * GENERATORS))
  SERVER_CPUS="0-$((SERVER_CORES - 1))"
else
  SERVER_CORES=$NCPU
fi

THREADS=()
for t in $THREADS_LIST; do
  [ "$t" -le "$MAX_THREADS" ] && THREADS+=("$t")
done
[ ${#THREADS[@]} -gt 0 ] || { echo "no shard count at or under --max-threads $MAX_THREADS" >&2; exit 64; }

OUTDIR=${OUTDIR:-"$PWD/scaling-$(date -u +%Y%m%d-%H%M%S)"}
mkdir -p "$OUTDIR/raw" "$OUTDIR/logs"
WORK=$(mktemp -d /tmp/turnpike-scaling.XXXXXX)
SERVER_PID=""
GEN_PIDS=()

cleanup() {
  for p in "${GEN_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  stop_server
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The servers and 64 generator sockets need few descriptors, but 16 shards of coturn and its
# per-client sockets add up: take the hard limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# A port outside the ephemeral range (32768-60999) and the relay ranges, bound by nobody.
pick_port() {
  local p hex
  for _ in $(seq 100); do
    p=$((30000 + RANDOM % 2700))
    hex=$(printf ':%04X ' "$p")
    if ! cat /proc/net/udp /proc/net/udp6 /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -q "$hex"; then
      echo "$p"; return
    fi
  done
  echo "no free port" >&2; exit 1
}

udp_bound() { grep -c "0100007F:$(printf '%04X' "$1") " /proc/net/udp || true; }

pin_server() { if [ "$PIN" = 1 ]; then echo taskset -c "$SERVER_CPUS"; fi; }
pin_generator() { if [ "$PIN" = 1 ]; then local c=$((NCPU - 2 * GENERATORS + 2 * $1)); echo taskset -c "$c,$((c + 1))"; fi; }

# start_server NAME THREADS LOG: sets SERVER_PID and PORT.
start_server() {
  local name=$1 threads=$2 log=$3
  PORT=$(pick_port)
  if [ "$name" = turnpike ]; then
    cat >"$WORK/turnpike.toml" <<EOF
listen = ["127.0.0.1:$PORT"]
threads = $threads
realm = "bench.realm"
log_level = "info"
drain_secs = 0
[relay]
address = "127.0.0.1"
port_min = 20000
port_max = 29999
[[auth.users]]
name = "bench"
password = "benchpass"
[limits]
allocations_per_user = 0
unauth_replies_per_sec = 0
[peers]
allow_loopback_peers = true
EOF
    chmod 600 "$WORK/turnpike.toml"
    $(pin_server) "$TURNPIKE_BIN" serve --config "$WORK/turnpike.toml" >"$log" 2>&1 &
  else
    $(pin_server) turnserver -n --listening-ip=127.0.0.1 --listening-port="$PORT" \
      --relay-ip=127.0.0.1 --min-port=10000 --max-port=19999 --lt-cred-mech \
      --user=bench:benchpass --realm=bench.realm --allow-loopback-peers --no-cli --no-dtls \
      --no-tls --no-tcp --relay-threads="$threads" --log-file=stdout --simple-log \
      --no-stdout-log --pidfile="$WORK/coturn.pid" --db="$WORK/turndb" >"$log" 2>&1 &
  fi
  SERVER_PID=$!
  for _ in $(seq 100); do
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "$name exited at start:" >&2; tail -5 "$log" >&2; SERVER_PID=""; exit 1; }
    if [ "$(udp_bound "$PORT")" -ge 1 ]; then
      if [ "$name" = coturn ] || grep -q "turnpike ready" "$log"; then
        sleep 0.5  # coturn says nothing when its relay threads are up; give them a moment
        return
      fi
    fi
    sleep 0.1
  done
  echo "$name did not bind 127.0.0.1:$PORT within 10 s" >&2; exit 1
}

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

printf 'benchpass\n' >"$WORK/password"
chmod 600 "$WORK/password"
if "$LOAD_BIN" relay --help 2>&1 | grep -q -- --password-file; then
  CRED=(--user bench --password-file "$WORK/password")
else
  CRED=(--user bench --password benchpass)
fi

# A number from a generator's JSON object (first match of the key), empty if absent or null.
jnum() { grep -o "\"$2\"[[:space:]]*:[[:space:]]*[-0-9.eE+]*" "$1" | head -1 | sed 's/.*:[[:space:]]*//'; }

TSV="$OUTDIR/scaling.tsv"
printf 'server\tthreads\tserver_cores\tload\tclients\trate\tmsgs_per_sec\tloss_pct\tserver_cpu_us_per_msg\tserver_cpu_s\tload_cpu_s\n' >"$TSV"

# run_load NAME THREADS LOAD RATE: G generators at once against the running server.
run_load() {
  local name=$1 threads=$2 load=$3 rate=$4 i clients per_rate c0 c1 failed=0
  local tag="$name-t$threads-$load"
  GEN_PIDS=()
  c0=$(cpu_ticks "$SERVER_PID")
  for ((i = 0; i < GENERATORS; i++)); do
    clients=$((CLIENTS / GENERATORS + (i < CLIENTS % GENERATORS ? 1 : 0)))
    per_rate=$((rate / GENERATORS))
    timeout -k 5 $((DURATION + 45)) $(pin_generator "$i") "$LOAD_BIN" relay \
      --server "127.0.0.1:$PORT" "${CRED[@]}" --json --timeout-secs $((DURATION + 30)) \
      --clients "$clients" --rate "$per_rate" --size 160 --duration-secs "$DURATION" \
      >"$OUTDIR/raw/$tag-g$i.json" 2>"$OUTDIR/logs/$tag-g$i.stderr" &
    GEN_PIDS+=($!)
  done
  for p in "${GEN_PIDS[@]}"; do wait "$p" || failed=$((failed + 1)); done
  GEN_PIDS=()
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "$tag: $name exited during the load:" >&2; tail -5 "$OUTDIR/logs/$name-t$threads.log" >&2
    SERVER_PID=""; exit 1
  fi
  c1=$(cpu_ticks "$SERVER_PID")
  if [ "$failed" -gt 0 ]; then
    echo "$tag: $failed generator(s) failed: $(tail -qn1 "$OUTDIR"/logs/"$tag"-g*.stderr | head -3)" >&2
    printf '%s\t%s\t%s\t%s\t%s\t%s\tfailed\t\t\t\t\n' "$name" "$threads" "$SERVER_CORES" "$load" "$CLIENTS" "$rate" >>"$TSV"
    echo "$tag: failed" >>"$OUTDIR/summary.txt"
    return
  fi
  local sent=0 delivered=0 mps=0 load_cpu=0 f
  for f in "$OUTDIR"/raw/"$tag"-g*.json; do
    sent=$(awk -v a="$sent" -v b="$(jnum "$f" sent)" 'BEGIN{print a + b}')
    delivered=$(awk -v a="$delivered" -v b="$(jnum "$f" delivered)" 'BEGIN{print a + b}')
    mps=$(awk -v a="$mps" -v b="$(jnum "$f" msgs_per_sec)" 'BEGIN{print a + b}')
    load_cpu=$(awk -v a="$load_cpu" -v b="$(jnum "$f" load_cpu_s)" 'BEGIN{print a + b}')
  done
  awk -v name="$name" -v t="$threads" -v sc="$SERVER_CORES" -v load="$load" -v k="$CLIENTS" \
    -v rate="$rate" -v mps="$mps" -v sent="$sent" -v del="$delivered" -v ticks=$((c1 - c0)) \
    -v hz="$CLK_TCK" -v lcpu="$load_cpu" 'BEGIN {
      cpu = ticks / hz
      loss = sent > 0 ? 100 * (sent - del) / sent : 0
      us = del > 0 ? cpu * 1e6 / del : 0
      printf "%s\t%d\t%d\t%s\t%d\t%d\t%.0f\t%.3f\t%.2f\t%.2f\t%.2f\n", name, t, sc, load, k, rate, mps, loss, us, cpu, lcpu
    }' >>"$TSV"
  tail -n1 "$TSV" | awk -F'\t' '{printf "%-8s %2s shards  %-5s %9s msgs/s  loss %6s %%  %6s us CPU/msg  (server %s s, generators %s s)\n", $1, $2, $4, $7, $8, $9, $10, $11}' |
    tee -a "$OUTDIR/summary.txt"
}

{
  echo "scaling run $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname): $NCPU cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "shard counts: ${THREADS[*]}; loads: flood and paced $RATE msgs/s, $DURATION s each, $CLIENTS clients over $GENERATORS generator(s), 160 B ChannelData"
  if [ "$PIN" = 1 ]; then
    echo "pinning: server on cores $SERVER_CPUS ($SERVER_CORES cores); generator i on cores $((NCPU - 2 * GENERATORS))+2i, +2i+1"
  else
    echo "pinning: none (fewer than 4 cores, --no-pin, or no taskset): generators and server share all $NCPU cores"
  fi
  echo "turnpike: $TURNPIKE_BIN; turnpike-load: $LOAD_BIN"
} | tee "$OUTDIR/summary.txt"

SERVERS=(turnpike)
[ "$COTURN" = 1 ] && SERVERS+=(coturn)
for t in "${THREADS[@]}"; do
  for name in "${SERVERS[@]}"; do
    start_server "$name" "$t" "$OUTDIR/logs/$name-t$t.log"
    run_load "$name" "$t" flood 0
    run_load "$name" "$t" paced "$RATE"
    stop_server
  done
done

{
  echo
  echo "server   shards cores load   msgs/s     loss %  us CPU/msg  server s  generators s"
  tail -n +2 "$TSV" | awk -F'\t' '{printf "%-8s %6s %5s %-5s %9s %9s %11s %9s %13s%s\n", $1, $2, $3, $4, $7, $8, $9, $10, $11, ($11 + 0 > $10 + 0 ? "  (generators busier than the server: generator-limited)" : "")}'
  echo "(us CPU/msg: server utime+stime over the whole generator run / messages delivered; a message is two relayed packets)"
} | tee -a "$OUTDIR/summary.txt"
echo "results in $OUTDIR"

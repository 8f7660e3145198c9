#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ one at a time, SECONDS each (default 60):
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Each target starts from its checked-in seeds (fuzz/corpus/<target>/, left untouched) plus
# what earlier runs found (fuzz/run/<target>/, ignored by git). Prints runs, execs/s and the
# coverage totals of libFuzzer's final stats per target, and exits non-zero if any target
# crashed or hung: the input is then under fuzz/artifacts/<target>/. Replay one with
#   cd fuzz && cargo +nightly fuzz run <target> artifacts/<target>/<file>
#
# cargo-fuzz needs a nightly toolchain. Without one this says so and exits 0: tests/props.rs
# runs the same targets on stable in `cargo test`.
# FUZZ_SANITIZER=address (default none: the core is safe Rust, and ASan halves the speed).
set -euo pipefail

secs="${1:-60}"
shift || true
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: no nightly toolchain (rustup toolchain install nightly): fuzzers not run."
    echo "fuzz.sh: note: the stable property tests (tests/props.rs) cover the same targets."
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

sanitizer="${FUZZ_SANITIZER:-none}"
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

echo "fuzz.sh: building ${#targets[@]} targets (sanitizer: $sanitizer)"
if [ "$#" -gt 0 ]; then
    for t in "${targets[@]}"; do cargo +nightly fuzz build -s "$sanitizer" "$t"; done
else
    cargo +nightly fuzz build -s "$sanitizer"
fi

failed=()
summary=()
total_runs=0
for t in "${targets[@]}"; do
    mkdir -p "run/$t" "artifacts/$t"
    log="run/$t.log"
    echo "fuzz.sh: $t for ${secs}s"
    set +e
    cargo +nightly fuzz run -s "$sanitizer" "$t" "run/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    runs=$(LC_ALL=C sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    eps=$(LC_ALL=C sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    final=$(grep -a -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$log" | tail -n 1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$final")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$final")
    corp=$(sed -n 's/.* corp: \([^ ]*\).*/\1/p' <<<"$final")
    line=$(printf '%-14s runs %-10s exec/s %-7s cov %-6s ft %-7s corpus %s' \
        "$t" "${runs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        line="$line  FAILED (exit $rc)"
        echo "fuzz.sh: $t failed; the end of $log:"
        grep -a -A 3 -E "panicked at" "$log" | head -n 8 | cut -c 1-300 || true
        grep -a -E "ERROR: libFuzzer|Test unit written|cargo fuzz run" "$log" | head -n 4 | cut -c 1-300 || true
    fi
    echo "$line"
    summary+=("$line")
    total_runs=$((total_runs + ${runs:-0}))
done

echo
echo "fuzz.sh: ${secs}s per target"
printf '%s\n' "${summary[@]}"
echo "total runs: $total_runs"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: FAILED: ${failed[*]} (inputs under fuzz/artifacts/)"
    exit 1
fi
echo "fuzz.sh: no crash"

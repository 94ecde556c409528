#!/usr/bin/env bash
# Fuzzes strangler's parsers: `routing_yaml` (arbitrary routing.yaml → parse → validate → table)
# and `path_match` (arbitrary request target → normalise → lookup → upstream path).
#
#   scripts/fuzz.sh                 # every target, 120 s each
#   scripts/fuzz.sh 600 path_match  # one target, 10 minutes (or FUZZ_SECONDS=600)
#
# Installs cargo-fuzz if missing. cargo-fuzz passes nightly-only flags (-Z sanitizer, sancov);
# with only a stable toolchain, RUSTC_BOOTSTRAP=1 lets stable accept them. Set
# FUZZ_TOOLCHAIN=nightly to use a nightly toolchain instead, FUZZ_SANITIZER=none to build
# without AddressSanitizer (faster; panics are still caught), FUZZ_JOBS=N for N workers.
#
# Seeds live in fuzz/seeds/<target>/ (committed); the working corpus is fuzz/corpus/<target>/
# (ignored by git) and grows across runs. Crashes land in fuzz/artifacts/<target>/ (ignored);
# reproduce one with `cargo fuzz run <target> fuzz/artifacts/<target>/crash-…`.
# Prints one summary line per target and exits 1 if any target crashed.
set -uo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${FUZZ_SECONDS:-120}"
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then SECONDS_PER_TARGET="$1"; shift; fi
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(routing_yaml path_match)
SANITIZER="${FUZZ_SANITIZER:-address}"
JOBS="${FUZZ_JOBS:-1}"

if ! command -v cargo-fuzz >/dev/null 2>&1 && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install --locked cargo-fuzz || cargo install cargo-fuzz || { echo "cargo-fuzz install failed"; exit 2; }
fi

# libFuzzer (built by libfuzzer-sys) needs a C++ compiler.
if ! command -v c++ >/dev/null 2>&1; then
  echo "== installing a C++ compiler (libFuzzer is C++)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi

if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
  CARGO=(cargo "+${FUZZ_TOOLCHAIN}")
else
  export RUSTC_BOOTSTRAP=1
  CARGO=(cargo)
fi

LOGDIR="fuzz/target/logs"
mkdir -p "$LOGDIR"
status=0
summary=()
for t in "${TARGETS[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
  echo "== building $t (sanitizer: $SANITIZER)"
  if ! (cd fuzz && "${CARGO[@]}" fuzz build --sanitizer "$SANITIZER" "$t"); then
    echo "build of $t failed"; status=2; continue
  fi
  before=$(ls "fuzz/artifacts/$t" | wc -l)
  log="$LOGDIR/$t.log"
  echo "== fuzzing $t for ${SECONDS_PER_TARGET}s (log: $log)"
  parallel=()
  [ "$JOBS" -gt 1 ] && parallel=(-jobs="$JOBS" -workers="$JOBS")
  rm -f fuzz/fuzz-*.log
  (cd fuzz && "${CARGO[@]}" fuzz run --sanitizer "$SANITIZER" "$t" "corpus/$t" -- \
      -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 "${parallel[@]}" \
      -max_len=8192 -timeout=10 -rss_limit_mb=2048) >"$log" 2>&1
  rc=$?
  # With -jobs>1 libFuzzer runs workers whose output goes to fuzz-N.log: count those instead.
  if [ "$JOBS" -gt 1 ]; then
    cat fuzz/fuzz-*.log >"$log.workers" 2>/dev/null; rm -f fuzz/fuzz-*.log
    stats="$log.workers"
  else
    stats="$log"
  fi
  after=$(ls "fuzz/artifacts/$t" | wc -l)
  execs=$(grep -h 'stat::number_of_executed_units' "$stats" | awk '{s+=$2} END {print s+0}')
  rate=$(grep -h 'stat::average_exec_per_sec' "$stats" | awk '{s+=$2} END {print s+0}')
  cov=$(grep -hoE 'cov: [0-9]+' "$stats" | tail -1 | awk '{print $2}')
  corpus=$(ls "fuzz/corpus/$t" | wc -l)
  crashes=$((after - before))
  line="$t: ${SECONDS_PER_TARGET}s, $execs executions (~$rate/s), coverage ${cov:-?} edges, corpus $corpus files, new crash artifacts: $crashes, exit $rc"
  echo "$line"
  summary+=("$line")
  if [ "$crashes" -gt 0 ] || [ $rc -ne 0 ]; then
    status=1
    grep -hE 'panicked|ERROR|SUMMARY' "$log" | head -20
    ls "fuzz/artifacts/$t" | tail -n "$crashes"
  fi
done
echo
echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
exit $status

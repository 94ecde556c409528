#!/usr/bin/env bash
# Memory across reloads that replace the whole table: an idle proxy serves a generated
# ROUTES-route table (scripts/gen-routing.sh); N times, every route is renamed (and its path
# with it: /svc0/... becomes /g7svc0/...), the file is rewritten (temp file + rename) and
# `POST /reload` waited for (the watcher may have loaded it first), and a few requests go to
# routes of the new generation, so that each reload retires every route's metric series and
# the requests create new ones. After each reload it samples the proxy's RSS; after the first,
# every tenth and the last, also the size of /metrics (bytes and series), and prints them.
#
# A leak of retired routes (metric series, counters, per-route state) grows both figures with N;
# without one they are flat after the first reloads. Exits 1 when the series count at the end
# differs from the one after the first reload, or when RSS trends up: the highest sample of
# the second half of the run above the highest of the first half by more than GROWTH_KIB
# (default 8192), both after the first WARMUP reloads (default 50). RSS swings by tens of MiB
# between reloads of a large table (the allocator keeps part of a reload's transient memory,
# and the highest sample climbs to its plateau over the first few dozen reloads), so a single
# sample against another would mistake the swing for a leak. Prints the peak RSS (VmHWM) too.
#
#   scripts/reload-churn.sh                 # N=200 ROUTES=10000
#   N=400 ROUTES=100 scripts/reload-churn.sh
#
# The backends are never reached (port 9): the requests are answered 502 by the proxy, which
# still counts them per route. Needs curl, sha256sum and python3.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
N=${N:-200}
WARMUP=${WARMUP:-50}
ROUTES=${ROUTES:-10000}
GROWTH_KIB=${GROWTH_KIB:-8192}
STRANGLER_BIN=${STRANGLER_BIN:-$ROOT/target/release/strangler}
[ -x "$STRANGLER_BIN" ] || (cd "$ROOT" && cargo build --release >&2)

TMP=$(mktemp -d /tmp/strangler-churn.XXXXXX)
PID=
trap stop_strangler EXIT
"$ROOT/scripts/gen-routing.sh" "$ROUTES" 9 >"$TMP/base.yaml"
generation() { sed "s#svc#g$1svc#g" "$TMP/base.yaml"; }
generation 0 >"$TMP/routing.yaml"
start_strangler warn
rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
echo "reload-churn: $ROUTES routes ($(wc -c <"$TMP/base.yaml") bytes), $N reloads renaming every route"
echo "reload  RSS_KiB  metrics_bytes  series"
first_series= peak_1=0 peak_2=0
for i in $(seq 1 "$N"); do
    generation "$i" >"$TMP/.next.yaml" && mv "$TMP/.next.yaml" "$TMP/routing.yaml"
    sha=$(sha256sum "$TMP/routing.yaml" | cut -d' ' -f1)
    if ! curl -sf -X POST "http://127.0.0.1:$ADMIN/reload" | grep -q "\"$sha\""; then
        echo "reload-churn: reload $i was not applied" >&2; cat "$TMP/proxy.log" >&2; exit 1
    fi
    for r in 0 1 2 3; do # GET the {id} and sub routes of a few resources of this generation
        curl -s -o /dev/null "http://127.0.0.1:$PORT/g${i}svc$r/resource$r/42"
        curl -s -o /dev/null "http://127.0.0.1:$PORT/g${i}svc$r/resource$r/42/sub"
    done
    kib=$(rss)
    if [ "$i" -gt "$WARMUP" ] && [ "$i" -le $(((N + WARMUP) / 2)) ]; then
        [ "$kib" -le "$peak_1" ] || peak_1=$kib
    elif [ "$i" -gt "$WARMUP" ]; then
        [ "$kib" -le "$peak_2" ] || peak_2=$kib
    fi
    if [ "$i" -eq 1 ] || [ $((i % 10)) -eq 0 ] || [ "$i" -eq "$N" ]; then
        curl -sf "http://127.0.0.1:$ADMIN/metrics" >"$TMP/metrics.txt"
        bytes=$(wc -c <"$TMP/metrics.txt")
        series=$(grep -vc '^#' "$TMP/metrics.txt")
        [ -n "$first_series" ] || first_series=$series
        printf '%6d  %7d  %13d  %6d\n' "$i" "$kib" "$bytes" "$series"
    fi
done
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
half=$(((N + WARMUP) / 2))
status=0
if [ "$series" -ne "$first_series" ]; then
    echo "reload-churn: FAIL: $series series at the end, $first_series after the first reload"
    status=1
fi
if [ "$N" -ge $((WARMUP + 20)) ] && [ $((peak_2 - peak_1)) -gt "$GROWTH_KIB" ]; then
    echo "reload-churn: FAIL: RSS trends up: highest $peak_1 KiB over reloads $((WARMUP + 1))-$half, $peak_2 KiB after"
    status=1
fi
if [ "$status" -eq 0 ] && [ "$N" -ge $((WARMUP + 20)) ]; then
    echo "reload-churn: pass (series constant; RSS highest $peak_1 KiB over reloads $((WARMUP + 1))-$half, $peak_2 KiB after; VmHWM $hwm KiB)"
elif [ "$status" -eq 0 ]; then
    echo "reload-churn: pass (series constant; VmHWM $hwm KiB; too few reloads to judge RSS: N < WARMUP + 20)"
fi
exit "$status"

#!/usr/bin/env bash
# Soak test (not run by CI): DURATION seconds (default 600) of wrk load against a release build
# of strangler in front of two `strangler demo-service` backends. The load mixes plain, split,
# failover, shadowed, rewritten and unmatched routes, GETs and POSTs with a body, backend 503s
# (`?status=503`; the proxy answers 503 itself only when out of descriptors or memory) and answers slower than their backend's
# `timeout` (`?delay_ms=`), while
#   - routing.yaml is rewritten every second (a route's `to` flips between legacy and new),
#   - the `new` backend process is killed and restarted every 30 s (RESTART_EVERY),
#   - routes are rolled back and resumed at random over the admin API every few seconds, and
#     `payments` is pinned by its own `rollback` block each time its 503s cross the threshold,
#   - SIGHUP and `POST /reload` arrive every few seconds, and /metrics and /routes are scraped
#     every second, as Prometheus and an operator would.
# At the end it prints the requests served, status codes and upstream errors by kind (from
# /metrics), shadow comparisons, reloads, rollbacks, failovers, wrk's own error counts, and the
# proxy's RSS and open fds sampled every 30 s. It exits 1 (after the report) when a request got
# a code other than 2xx/499/502/503/504, the proxy logged a panic, an admin call failed, a
# reload failed, RSS trended up after the first minute (the highest sample of the second half
# more than 8 MiB above the first half's), open fds did not come back down after the load, or
# the proxy did not exit 0 on SIGTERM.
#
#   scripts/soak.sh                      # 10 minutes
#   DURATION=120 scripts/soak.sh         # 2 minutes
#   CONNECTIONS=64 THREADS=2 scripts/soak.sh
#
# Everything listens on 127.0.0.1 on free ports; every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-600}"
RESTART_EVERY="${RESTART_EVERY:-30}"
CONNECTIONS="${CONNECTIONS:-32}"
THREADS="${THREADS:-2}"
BIN="${STRANGLER_BIN:-target/release/strangler}"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need curl; then
  echo "== installing wrk and curl"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk curl >/dev/null
fi
if [ -z "${STRANGLER_BIN:-}" ]; then
  if [ ! -x "$BIN" ] || [ -n "$(find src Cargo.toml Cargo.lock -newer "$BIN" -print -quit)" ]; then
    echo "== cargo build --release"
    cargo build --release --quiet
  fi
fi

WORK="$(mktemp -d /tmp/strangler-soak.XXXXXX)"
PIDS=()
LOOP_PIDS=()
NEW_PID=""
cleanup() {
  set +e
  for p in "${LOOP_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${LOOP_PIDS[@]}"; do wait "$p" 2>/dev/null; done
  [ -f "$WORK/new.pid" ] && kill "$(cat "$WORK/new.pid")" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
}
trap cleanup EXIT

# A free port: bound by nobody right now, and below the ephemeral range, so that connecting to
# `new` while it is down can never become a TCP self-connect (the kernel picking the same port
# as the source port), which would make the proxy read its own request as the answer.
used_ports=" "
eph_low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
free_port() {
  local p
  while :; do
    p=$(( (RANDOM % (eph_low - 10000)) + 10000 ))
    case "$used_ports" in *" $p "*) continue ;; esac
    if ! ss -Htln "( sport = :$p )" | grep -q .; then
      used_ports+="$p "
      echo "$p"
      return
    fi
  done
}

P_LEGACY=$(free_port); P_NEW=$(free_port); P_PROXY=$(free_port); P_ADMIN=$(free_port)
ADMIN="http://127.0.0.1:$P_ADMIN"

"$BIN" demo-service --name legacy --listen "127.0.0.1:$P_LEGACY" >"$WORK/legacy.log" 2>&1 &
PIDS+=($!)
start_new() {
  # (bash reports "Killed" for each earlier instance: that is the restart loop at work.)
  "$BIN" demo-service --name new --listen "127.0.0.1:$P_NEW" >>"$WORK/new.log" 2>&1 &
  echo $! >"$WORK/new.pid"
}
start_new

write_config() { # $1: backend of `bookings`
  cat >"$WORK/.routing.yaml.tmp" <<YAML
backends:
  legacy: {url: 'http://127.0.0.1:$P_LEGACY'}
  new: {url: 'http://127.0.0.1:$P_NEW', timeout: 5s, connect_timeout: 1s}
  slow: {url: 'http://127.0.0.1:$P_NEW', timeout: 300ms, connect_timeout: 1s}
default: legacy
routes:
  - {name: bookings, path: /bookings, to: $1}
  - {name: tours, path: /tours, to: new, split: 50, sticky: 'header:X-Client-Id'}
  - {name: departures, path: /departures, to: new, failover: true, rewrite: /v2/departures}
  - {name: maps, path: '/itineraries/{id}/itinerary_maps', methods: [GET, HEAD], to: new}
  - {name: customers, path: /customers, to: legacy, shadow: new, shadow_ignore: [/service, /headers/x-strangler-shadow]}
  - name: payments
    path: /payments
    to: new
    rollback: {error_rate: 20%, min_requests: 20, window: 10s}
  - {name: reports, path: /reports, to: slow}
YAML
  mv "$WORK/.routing.yaml.tmp" "$WORK/routing.yaml"
}
write_config new

"$BIN" run -c "$WORK/routing.yaml" --listen "127.0.0.1:$P_PROXY" --admin "127.0.0.1:$P_ADMIN" \
  --threads 2 >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=($PROXY_PID)
for _ in $(seq 1 150); do
  curl -fs "$ADMIN/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "$ADMIN/healthz" >/dev/null || { echo "strangler did not start:"; cat "$WORK/proxy.log"; exit 1; }

rss() { awk '/VmRSS/ {print $2 " kB"}' "/proc/$PROXY_PID/status"; }
fds() { ls "/proc/$PROXY_PID/fd" | wc -l; }
RSS_START=$(rss); FD_START=$(fds)

# wrk: a mix of routed, split, failover, shadowed and unmatched paths, with sticky keys; one
# request in 9 a POST with a 2 KiB body, one in 53 slower than `slow`'s timeout (both periods
# prime to the 14 paths, so that neither hides a path), and a quarter of `payments` answered
# 503 by the backend (above its rollback's 20 %).
cat >"$WORK/mix.lua" <<'LUA'
local paths = {"/bookings/42", "/bookings/", "/tours/1", "/departures", "/itineraries/7/itinerary_maps",
               "/itineraries/7", "/flights", "/customers/3?x=1", "/customers/4", "/payments/1",
               "/payments/2", "/payments/3", "/payments/4?status=503", "/reports/1"}
local body = string.rep("x", 2048)
local n = 0
request = function()
  n = n + 1
  local h = {["X-Client-Id"] = "c" .. (n % 97)}
  if n % 53 == 0 then return wrk.format("GET", "/reports/2?delay_ms=600", h) end
  if n % 9 == 0 then
    h["Content-Type"] = "text/plain"
    return wrk.format("POST", "/bookings/42", h, body)
  end
  return wrk.format("GET", paths[(n % #paths) + 1], h)
end
LUA

echo "== soak: ${DURATION}s, $CONNECTIONS connections, proxy :$P_PROXY, admin :$P_ADMIN, legacy :$P_LEGACY, new :$P_NEW (work dir $WORK)"
echo "start: RSS $RSS_START, open fds $FD_START"

# 0. RSS and open fds every 30 s, so growth over time shows (start and end alone mix the
#    idle-to-working-set jump with a leak).
( set +e; while :; do
    sleep 30
    echo "$(date +%T) RSS $(rss), open fds $(fds)" >>"$WORK/samples.log"
  done ) &
LOOP_PIDS+=($!)
# 1. routing.yaml rewritten every second.
( set +e; i=0; while :; do
    i=$((i + 1)); if [ $((i % 2)) -eq 0 ]; then write_config new; else write_config legacy; fi
    sleep 1
  done ) &
LOOP_PIDS+=($!)
# 2. `new` killed (SIGKILL: in-flight requests are cut) and restarted every RESTART_EVERY s.
( set +e; while :; do
    sleep "$RESTART_EVERY"
    pid=$(cat "$WORK/new.pid")
    kill -KILL "$pid" 2>/dev/null
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    down_at=$(date +%s.%N)
    echo "$(date +%T.%3N) new killed" >>"$WORK/events.log"
    sleep 1
    for _ in 1 2 3 4 5; do
      start_new
      for _ in $(seq 1 40); do
        curl -s -o /dev/null "http://127.0.0.1:$P_NEW/" && break
        sleep 0.05
      done
      curl -s -o /dev/null "http://127.0.0.1:$P_NEW/" && break
      kill "$(cat "$WORK/new.pid")" 2>/dev/null
    done
    echo "$(date +%T.%3N) new restarted (down $(awk -v a="$down_at" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}') s)" >>"$WORK/events.log"
  done ) &
LOOP_PIDS+=($!)
# 3. random rollbacks and resumes over the admin API.
( set +e; routes=(bookings tours departures maps customers payments reports); while :; do
    sleep $(( (RANDOM % 4) + 2 ))
    r=${routes[$((RANDOM % ${#routes[@]}))]}
    if [ $((RANDOM % 2)) -eq 0 ]; then act=rollback; else act=resume; fi
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$ADMIN/routes/$r/$act")
    echo "$(date +%T) $act $r -> $code" >>"$WORK/events.log"
    if [ $((RANDOM % 10)) -eq 0 ]; then
      curl -s -o /dev/null -X POST "$ADMIN/rollback"; echo "$(date +%T) rollback --all" >>"$WORK/events.log"
    fi
  done ) &
LOOP_PIDS+=($!)
# 4. SIGHUP every 7 s and `POST /reload` every 5 s, beside the rewrites.
( set +e; while :; do sleep 7; kill -HUP "$PROXY_PID"; done ) &
LOOP_PIDS+=($!)
( set +e; while :; do
    sleep 5
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$ADMIN/reload")
    [ "$code" = 200 ] || echo "$(date +%T) admin call failed: POST /reload -> $code" >>"$WORK/events.log"
  done ) &
LOOP_PIDS+=($!)
# 5. /metrics and /routes scraped every second.
( set +e; while :; do
    sleep 1
    for path in metrics routes; do
      code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "$ADMIN/$path")
      [ "$code" = 200 ] || echo "$(date +%T) admin call failed: GET /$path -> $code" >>"$WORK/events.log"
    done
  done ) &
LOOP_PIDS+=($!)

wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s --latency -s "$WORK/mix.lua" \
  "http://127.0.0.1:$P_PROXY" >"$WORK/wrk.txt" 2>&1 || true

set +e # the report below greps for what may be absent
RSS_END=$(rss); FD_END=$(fds)
for p in "${LOOP_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
LOOP_PIDS=()
# Let connections settle, then measure again.
sleep 2
RSS_IDLE=$(rss); FD_IDLE=$(fds)
curl -fs "$ADMIN/metrics" >"$WORK/metrics.txt"

echo
echo "== wrk"
sed -n '1,40p' "$WORK/wrk.txt"
echo
echo "== strangler_requests_total by code"
grep '^strangler_requests_total{' "$WORK/metrics.txt" |
  sed -E 's/.*code="([0-9]+)".* ([0-9.e+]+)$/\1 \2/' |
  awk '{s[$1]+=$2; t+=$2} END {for (c in s) printf "  %s: %d\n", c, s[c]; printf "  total: %d\n", t}' | sort
echo "== strangler_requests_total by route and backend (code != 200)"
grep '^strangler_requests_total{' "$WORK/metrics.txt" | grep -v 'code="200"' | sed 's/^/  /'
echo "== strangler_upstream_errors_total by kind"
grep '^strangler_upstream_errors_total{' "$WORK/metrics.txt" |
  sed -E 's/.*kind="([a-z]+)".* ([0-9.e+]+)$/\1 \2/' |
  awk '{s[$1]+=$2} END {for (k in s) printf "  %s: %d\n", k, s[k]}' | sort
grep '^strangler_upstream_errors_total{' "$WORK/metrics.txt" | sed 's/^/    /'
echo "== reloads, rollbacks, failovers, shadow comparisons"
grep -E '^strangler_config_reloads_total|^strangler_rollbacks_total|^strangler_failovers_total|^strangler_config_valid|^strangler_shadow_total' "$WORK/metrics.txt" | sed 's/^/  /'
kills=$(grep -c 'new killed' "$WORK/events.log" 2>/dev/null); admin_calls=$(grep -cE 'rollback|resume' "$WORK/events.log" 2>/dev/null)
admin_failures=$(grep -c 'admin call failed' "$WORK/events.log" 2>/dev/null)
echo "== events: ${kills:-0} kills and restarts of new, ${admin_calls:-0} admin rollbacks/resumes, ${admin_failures:-0} failed admin calls (scrapes, POST /reload)"
grep 'admin call failed' "$WORK/events.log" | head -5 | sed 's/^/  /'
echo "  audit lines in the proxy log (pins, resumes, route changes): $(grep -c 'audit' "$WORK/proxy.log")"
grep 'new ' "$WORK/events.log" | sed 's/^/  /'
echo "== proxy process"
echo "  samples every 30 s under load:"
sed 's/^/    /' "$WORK/samples.log" 2>/dev/null
echo "  RSS:      start $RSS_START, end of load $RSS_END, 2 s after $RSS_IDLE"
echo "  open fds: start $FD_START, end of load $FD_END, 2 s after $FD_IDLE"
est() { ss -Htn state established "( dport = :$1 )" | wc -l; }
echo "  upstream connections held open (keep-alive pool, idle timeout 60 s): legacy $(est "$P_LEGACY"), new $(est "$P_NEW")"
# 499: wrk cuts its connections when its time is up, mid-request. 502/504: `new` down, or
# slower than `slow`'s timeout. 503: the backend's own (`?status=503`; the proxy makes one only
# when out of descriptors or memory, with backend="none").
unexpected=$(grep '^strangler_requests_total{' "$WORK/metrics.txt" |
  grep -vE 'code="(2[0-9][0-9]|499|502|503|504)"' | awk '{s+=$2} END {print s+0}')
echo "  requests with a code other than 2xx/499/502/503/504: $unexpected"
panics=0
if grep -qE 'panicked|FATAL' "$WORK/proxy.log"; then
  panics=1
  echo "  proxy log has panics:"; grep -E 'panicked|FATAL' "$WORK/proxy.log" | head -5
fi
kill -TERM "$PROXY_PID"
wait "$PROXY_PID"; rc=$?
echo "  proxy exit on SIGTERM: $rc"

# The verdict. RSS: the samples after the first minute (the working set is reached in it) and
# the one at the end of the load, in two halves; the highest of the second may not exceed the
# highest of the first by more than 8 MiB (one sample against another would take RSS's swing
# for a trend). fds 2 s after the load: at most the start plus the keep-alive pools (legacy,
# new and slow: one idle connection per client connection each at most) and some slack.
rss_halves=$( { sed -n '2,$s/.*RSS \([0-9]*\) kB.*/\1/p' "$WORK/samples.log" 2>/dev/null; echo "${RSS_END%% kB}"; } |
  awk '{v[NR] = $1} END {
         if (NR < 4) exit
         h = int(NR / 2)
         for (i = 1; i <= NR; i++) if (i <= h) { if (v[i] > a) a = v[i] } else { if (v[i] > b) b = v[i] }
         print a, b }')
failures=()
[ "$unexpected" -eq 0 ] || failures+=("$unexpected requests with an unexpected code")
[ "$panics" -eq 0 ] || failures+=("a panic in the proxy log")
[ "${admin_failures:-0}" -eq 0 ] || failures+=("$admin_failures failed admin calls")
reload_errors=$(grep -E '^strangler_config_reloads_total\{result="error"\}' "$WORK/metrics.txt" | awk '{s+=$2} END {print s+0}')
[ "$reload_errors" -eq 0 ] || failures+=("$reload_errors failed reloads")
if [ -n "$rss_halves" ]; then
  read -r rss_first rss_second <<<"$rss_halves"
  echo "  RSS highest after the first minute: first half $rss_first kB, second half $rss_second kB"
  [ $((rss_second - rss_first)) -le 8192 ] ||
    failures+=("RSS trends up: highest $rss_first kB in the first half, $rss_second kB in the second")
fi
fd_limit=$(( FD_START + 3 * CONNECTIONS + 16 ))
[ "$FD_IDLE" -le "$fd_limit" ] || failures+=("$FD_IDLE open fds after the load (limit $fd_limit)")
[ "$rc" -eq 0 ] || failures+=("exit $rc on SIGTERM")
if [ ${#failures[@]} -eq 0 ]; then
  echo "== verdict: pass"
else
  echo "== verdict: FAIL"; printf '  %s\n' "${failures[@]}"
  exit 1
fi

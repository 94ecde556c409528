#!/usr/bin/env bash
# End-to-end check of the Grafana dashboard against a live proxy: every panel query must return
# data from a Prometheus that scrapes a running `strangler demo`.
#
#   scripts/check-dashboards-live.sh [path/to/strangler]
#
# Starts, on free loopback ports, `strangler demo` with a routing.yaml that uses every feature the
# dashboard shows (plain, split, shadow, failover and auto-rollback routes; a backend `dead` that
# nothing listens on), and a Prometheus (Debian's /usr/bin/prometheus) scraping it every second
# with deploy/prometheus/alerts.yml loaded. Sends ~20 s of traffic, rolls a route back by hand and
# resumes it, reloads the config (once broken, once good), then runs
# ${SHARED:-../shared}/tools/check-dashboards --live against that Prometheus on dashboards/*.json
# as they are, after checking that each query variable's label_values() query finds values and
# that no query uses a variable the checker does not substitute (it knows only $route, $backend
# and the interval variables; job, instance and the like belong to the ad hoc filter, which
# Grafana adds to every query itself). Everything started here is stopped on exit. Exit status:
# the checker's (also 1 if a variable finds no value or a query uses another variable, if
# strangler:default_backend does not name the demo's default backend alone, or if a rule in
# alerts.yml fails to evaluate on the live data).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD

BIN=${1:-}
if [ -z "$BIN" ]; then
  if [ -x target/release/strangler ]; then BIN=target/release/strangler; else BIN=target/debug/strangler; fi
fi
[ -x "$BIN" ] || { echo "strangler binary not found: $BIN (cargo build first, or pass its path)" >&2; exit 2; }
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

CHECKER=${SHARED:-../shared}/tools/check-dashboards
[ -x "$CHECKER" ] || { echo "dashboard checker not found: $CHECKER (set SHARED=path/to/shared)" >&2; exit 2; }
CHECKER=$(cd "$(dirname "$CHECKER")" && pwd)/$(basename "$CHECKER")

PROMETHEUS=${PROMETHEUS:-$(command -v prometheus || echo /usr/bin/prometheus)}
if [ ! -x "$PROMETHEUS" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null
    PROMETHEUS=/usr/bin/prometheus
  else
    echo "prometheus not found: apt-get install prometheus (or set PROMETHEUS=...)" >&2
    exit 2
  fi
fi

# The proxy must not pick up the caller's settings.
unset STRANGLER_CONFIG STRANGLER_LISTEN STRANGLER_ADMIN STRANGLER_ADMIN_TOKEN

TMP=$(mktemp -d "${TMPDIR:-/tmp}/strangler-live.XXXXXX")
PROXY_PID=
PROM_PID=
cleanup() {
  local rc=$?
  for pid in $PROXY_PID $PROM_PID; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in $PROXY_PID $PROM_PID; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "$rc" != 0 ] && [ -f "$TMP/strangler.log" ]; then
    echo "--- last lines of the strangler log:" >&2
    tail -n 30 "$TMP/strangler.log" >&2
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '%s live-check: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Wait until a command succeeds, up to $1 seconds.
wait_for() {
  local timeout=$1 what=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then log "timed out after ${timeout}s waiting for $what"; return 1; fi
    if [ -n "$PROXY_PID" ] && ! kill -0 "$PROXY_PID" 2>/dev/null; then log "strangler exited"; return 1; fi
    sleep 0.2
  done
}

# Six free loopback ports at once (held together, so they differ); `dead` stays unused.
read -r P_LEGACY P_NEW P_DEAD P_LISTEN P_ADMIN P_PROM < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
PROXY=http://127.0.0.1:$P_LISTEN
ADMIN=http://127.0.0.1:$P_ADMIN
PROM=http://127.0.0.1:$P_PROM

cat >"$TMP/routing.yaml" <<EOF
# Written by scripts/check-dashboards-live.sh: one route per feature the dashboard shows.
backends:
  legacy:
    url: http://127.0.0.1:$P_LEGACY
  new:
    url: http://127.0.0.1:$P_NEW
  dead:                       # nothing listens here
    url: http://127.0.0.1:$P_DEAD
    connect_timeout: 1s
default: legacy
routes:
  - name: bookings            # state new; rolled back and resumed by hand below
    path: /bookings
    to: new
  - name: tours               # state canary: half of the clients on new
    path: /tours
    to: new
    split: 50
    sticky: header:X-Client-Id
  - name: customers           # state shadow: GETs copied to new and compared
    path: /customers
    to: legacy
    shadow: new
  - name: invoices            # state legacy
    path: /invoices
    to: legacy
  - name: departures          # dead backend, every request fails over to legacy
    path: /departures
    to: dead
    failover: true
  - name: itineraries         # dead backend, rolled back automatically after 5 requests
    path: /itineraries
    to: dead
    rollback:
      error_rate: 50%
      min_requests: 5
      window: 60s
EOF
cp "$TMP/routing.yaml" "$TMP/routing.good.yaml"

log "starting $BIN demo (proxy :$P_LISTEN, admin :$P_ADMIN)"
(cd "$TMP" && exec "$BIN" demo -c "$TMP/routing.yaml" --listen "127.0.0.1:$P_LISTEN" --admin "127.0.0.1:$P_ADMIN") \
  >"$TMP/strangler.log" 2>&1 &
PROXY_PID=$!
wait_for 60 "admin /healthz" curl -fsS "$ADMIN/healthz"
wait_for 30 "the demo services behind the proxy" curl -fsS "$PROXY/bookings"
wait_for 30 "the demo services behind the proxy" curl -fsS "$PROXY/invoices"

cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $REPO/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: strangler
    static_configs:
      - targets: ["127.0.0.1:$P_ADMIN"]
EOF
log "starting $PROMETHEUS on :$P_PROM"
"$PROMETHEUS" --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
  --web.listen-address="127.0.0.1:$P_PROM" >"$TMP/prometheus.log" 2>&1 &
PROM_PID=$!

# Prints the first value of an instant query's result, or nothing.
prom_value() {
  curl -fsS --get "$PROM/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}
scraped() { [ "$(prom_value 'up{job="strangler"}')" = 1 ]; }
wait_for 60 "Prometheus to scrape the admin listener" scraped

# One round of requests to every route, as client $1: GETs (and POSTs) that match each route,
# unmatched paths for route="default", a path the proxy refuses (400), and the demo services'
# ?status=NNN (errors on both sides of the split) and ?delay_ms=N (latency).
round() {
  curl -s -H "X-Client-Id: client-$1" \
    "$PROXY/bookings" "$PROXY/bookings/$1" "$PROXY/tours" "$PROXY/tours/$1" \
    "$PROXY/customers" "$PROXY/customers/$1" "$PROXY/invoices/$1" "$PROXY/departures" \
    "$PROXY/itineraries/$1" "$PROXY/" "$PROXY/unmatched/$1" "$PROXY/bookings/$1?status=404" \
    "$PROXY/tours/$1?status=503" "$PROXY/tours/$1?delay_ms=$(($1 % 7 * 5))" >/dev/null || true
  curl -s --path-as-is "$PROXY/bookings/../etc" >/dev/null || true   # answered 400 by the proxy
  curl -s -X POST -H 'Content-Type: application/json' -d "{\"n\": $1}" \
    "$PROXY/bookings" "$PROXY/customers" >/dev/null || true
}
traffic() {
  local end=$((SECONDS + $1))
  while [ "$SECONDS" -lt "$end" ]; do
    CLIENT=$((CLIENT + 1))
    round "$CLIENT"
  done
}
admin_post() {
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$ADMIN$1") || true
  log "POST $1 -> $code"
}

CLIENT=0
log "sending traffic"
traffic 8
admin_post /routes/bookings/rollback
traffic 3
admin_post /routes/bookings/resume
admin_post /reload
printf 'no_such_key: true\n' >>"$TMP/routing.yaml"      # invalid: unknown key
sleep 1.5                                               # the watcher's reload fails
admin_post /reload
cp "$TMP/routing.good.yaml" "$TMP/routing.next.yaml" && mv "$TMP/routing.next.yaml" "$TMP/routing.yaml"
sleep 1.5
admin_post /reload
traffic 8
TRAFFIC_END=$(date +%s)

# Let Prometheus scrape what the last requests counted, and evaluate the rules once more.
scraped_after_end() {
  local ts
  ts=$(prom_value 'timestamp(up{job="strangler"})')
  [ -n "$ts" ] && python3 -c "import sys; sys.exit(0 if float('$ts') >= $TRAFFIC_END + 2 else 1)"
}
wait_for 30 "a scrape after the traffic" scraped_after_end
sleep 2

log "route states (GET /routes):"
curl -fsS "$ADMIN/routes" | python3 -c '
import json, sys
for r in json.load(sys.stdin):
    print("  %-12s %-12s pinned=%s" % (r.get("name"), r.get("state"), json.dumps(r.get("pinned"))))' >&2 || true
log "requests sent: $CLIENT rounds"

# The checker replaces $route and $backend by their "All" value (.*) and the interval variables by
# fixed ranges, nothing else: a query with any other variable would find no data there, or not
# parse. And each query variable's own label_values(SELECTOR, LABEL) must find at least one value
# on the live data.
rc=0
python3 - "$PROM" dashboards/*.json <<'EOF' || rc=1
import json, os, re, sys, urllib.parse, urllib.request

prom, files = sys.argv[1], sys.argv[2:]
KNOWN = {"route", "backend", "__rate_interval", "__interval", "__range"}
bad = 0


def exprs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                yield v
            else:
                yield from exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from exprs(v)


for f in files:
    dash = json.load(open(f))
    for q in exprs(dash):
        unknown = sorted(set(re.findall(r"\$\{?([A-Za-z_]\w*)", q)) - KNOWN)
        if unknown:
            print(f"VARIABLE  {os.path.basename(f)}: ${', $'.join(unknown)} in a query, which "
                  f"check-dashboards does not substitute: {q}")
            bad += 1
    variables = [v for v in dash.get("templating", {}).get("list", []) if v.get("type") == "query"]
    for v in variables:
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q or "")
        if not m:
            print(f"VARIABLE  {os.path.basename(f)} / {v['name']}: not label_values(SELECTOR, LABEL): {q!r}")
            bad += 1
            continue
        selector = re.sub(r"\$\{?\w+(?::\w+)?\}?", ".*", m.group(1))
        url = (prom.rstrip("/") + "/api/v1/label/" + m.group(2) + "/values?"
               + urllib.parse.urlencode({"match[]": selector}))
        values = json.load(urllib.request.urlopen(url, timeout=10)).get("data", [])
        print(f"variable  {os.path.basename(f)} / {v['name']}: {len(values)} value(s) {values[:6]}")
        if not values:
            print(f"NO VALUES {os.path.basename(f)} / {v['name']}: {q}")
            bad += 1
sys.exit(1 if bad else 0)
EOF
log "running $CHECKER --live $PROM on dashboards/*.json"
"$CHECKER" dashboards/*.json --live "$PROM" || rc=$?

# The rules and the "Traffic on migrated backends" panel read the default backend from
# strangler_default_backend: the recording rule must name the demo's `default: legacy`, alone.
default_backends=$(curl -fsS --get "$PROM/api/v1/query" --data-urlencode 'query=strangler:default_backend' |
  python3 -c 'import json, sys
r = json.load(sys.stdin)["data"]["result"]
print(" ".join(sorted("%s/%s" % (s["metric"].get("job"), s["metric"].get("backend")) for s in r)))') || true
if [ "$default_backends" = "strangler/legacy" ]; then
  log "strangler:default_backend: job/backend $default_backends"
else
  log "strangler:default_backend is '$default_backends', not strangler/legacy alone (does the binary export strangler_default_backend?)"
  [ "$rc" != 0 ] || rc=1
fi

# The alert rules must evaluate on real series (no many-to-many matches, no errors).
bad_rules=$(curl -fsS "$PROM/api/v1/rules" | python3 -c '
import json, sys
for g in json.load(sys.stdin)["data"]["groups"]:
    for r in g["rules"]:
        if r.get("health") != "ok":
            print("  %s: %s %s" % (g["name"], r["name"], r.get("lastError", r.get("health"))))')
if [ -n "$bad_rules" ]; then
  log "alert rules failing on live data:"; printf '%s\n' "$bad_rules" >&2
  [ "$rc" != 0 ] || rc=1
else
  log "alert rules: all evaluate"
fi
exit "$rc"

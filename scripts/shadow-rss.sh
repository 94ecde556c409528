#!/usr/bin/env bash
# Memory of many shadow comparisons at once (README, "Choices where the spec is silent":
# shadow requests). Eight routes, each `to: legacy` with `shadow: new`; both backends answer
# the same ~1 MiB body, `new` DELAY seconds later, so that every copy in flight holds the
# primary's captured body while it waits for its own. N clients ask at once; the proxy's peak
# RSS (VmHWM) is printed, with the shadow results, then the same without `shadow:`.
#
#   scripts/shadow-rss.sh            # N=256 DELAY=1
#
# Environment: N, DELAY, STRANGLER_BIN (default target/release/strangler, built if missing).
# Needs curl and python3.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
N=${N:-256}
DELAY=${DELAY:-1}
STRANGLER_BIN=${STRANGLER_BIN:-$ROOT/target/release/strangler}
[ -x "$STRANGLER_BIN" ] || (cd "$ROOT" && cargo build --release >&2)
TMP=$(mktemp -d /tmp/strangler-shadow-rss.XXXXXX)
PIDS=()
PID=
trap 'stop_pids; stop_strangler' EXIT

cat >"$TMP/backend.py" <<'EOF'
import sys, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
port, delay = int(sys.argv[1]), float(sys.argv[2])
body = b",".join(b'{"id":%d,"name":"customer %d"}' % (i, i) for i in range(40000))[: 1 << 20]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        time.sleep(delay)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 1024
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
EOF
cat >"$TMP/clients.py" <<'EOF'
import sys, threading, urllib.request
port, n = int(sys.argv[1]), int(sys.argv[2])
ok = []
def get(i):
    urllib.request.urlopen(f"http://127.0.0.1:{port}/m{i % 8 + 1}/x", timeout=120).read()
    ok.append(i)
threads = [threading.Thread(target=get, args=(i,)) for i in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
print(f"{len(ok)} of {n} answered")
EOF
LEGACY=$(free_port)
NEW=$(free_port)
python3 "$TMP/backend.py" "$LEGACY" 0 &
PIDS+=($!)
python3 "$TMP/backend.py" "$NEW" "$DELAY" &
PIDS+=($!)

echo "shadow-rss: $N clients at once, 8 routes, ~1 MiB answers, new $DELAY s later"
for shadow in ", shadow: new" ""; do
    {
        echo "backends:"
        echo "  legacy: {url: 'http://127.0.0.1:$LEGACY'}"
        echo "  new: {url: 'http://127.0.0.1:$NEW', timeout: 60s}"
        echo "default: legacy"
        echo "routes:"
        for i in 1 2 3 4 5 6 7 8; do echo "  - {name: m$i, path: /m$i, to: legacy$shadow}"; done
    } >"$TMP/routing.yaml"
    start_strangler warn
    python3 "$TMP/clients.py" "$PORT" "$N"
    # Every copy counted (or, without shadow, at once).
    want=$([ -n "$shadow" ] && echo "$N" || echo 0)
    for _ in $(seq 1 600); do
        got=$(curl -sf "http://127.0.0.1:$ADMIN/metrics" \
            | awk '/^strangler_shadow_total/ { s += $NF } END { print s + 0 }')
        [ "$got" -ge "$want" ] && break
        sleep 0.1
    done
    results=$(curl -sf "http://127.0.0.1:$ADMIN/metrics" \
        | awk '/^strangler_shadow_total/ { match($0, /result="[a-z]+"/)
                                          r[substr($0, RSTART + 8, RLENGTH - 9)] += $NF }
               END { for (k in r) printf " %s %d", k, r[k] }')
    label=$([ -n "$shadow" ] && echo "with shadow" || echo "no shadow")
    echo "  $label: peak RSS $(awk '/VmHWM/ { printf "%.0f MiB", $2 / 1024 }' "/proc/$PID/status")${results:+;$results}"
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
done

#!/usr/bin/env bash
# Memory of a streamed 1 GiB body (issue 5, item 5: "a 1 GiB response through the proxy grows
# its RSS by under 16 MiB"; SPEC §4). For each case a fresh `strangler run --threads 1` serves
# one small warm-up request, its VmRSS is read, the 1 GiB transfer runs, and its peak (VmHWM)
# is read: the growth is peak − before.
#
#   scripts/stream-rss.sh              # all cases, 1 GiB each
#   SIZE_MB=256 scripts/stream-rss.sh  # a quicker run
#
# Cases: a download read as fast as curl can; a download read at RATE (a client slower than
# its backend, so the proxy's pipeline stays full); the same download on a shadowed route (the
# primary's body is hashed for the comparison, and the shadow's own 1 GiB answer is read and
# hashed beside it); a 1 GiB upload (request body) to a backend that discards it.
# Environment: SIZE_MB (1024), RATE (curl --limit-rate for the slow client, 200M),
# STRANGLER_BIN (default target/release/strangler, built if missing).
# Needs nginx, curl, python3. Prints a markdown table.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
SIZE_MB=${SIZE_MB:-1024}
RATE=${RATE:-200M}
STRANGLER_BIN=${STRANGLER_BIN:-$ROOT/target/release/strangler}
for t in nginx curl python3; do
    command -v "$t" >/dev/null || { echo "stream-rss.sh: missing $t" >&2; exit 1; }
done
[ -x "$STRANGLER_BIN" ] || (cd "$ROOT" && cargo build --release >&2)

W=$(mktemp -d /tmp/strangler-stream.XXXXXX)
chmod 755 "$W"   # nginx workers run as nobody
mkdir -p "$W/www" "$W/logs"
PIDS=()
PROXY=
cleanup() {
    [ -n "$PROXY" ] && kill "$PROXY" 2>/dev/null && wait "$PROXY" 2>/dev/null
    stop_pids
    rm -rf "$W"
}
trap cleanup EXIT
wait_http() { # URL: until it answers (10 s)
    for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
    echo "stream-rss.sh: $1 never answered" >&2; exit 1
}
BP=$(free_port); SP=$(free_port)

# The body: a sparse file, served by nginx with sendfile (the backend costs no memory).
truncate -s "${SIZE_MB}M" "$W/www/big"
echo small >"$W/www/small"
cat >"$W/nginx.conf" <<EOC
worker_processes 1; daemon off; pid $W/nginx.pid; error_log $W/logs/error.log warn;
events { worker_connections 256; }
http { access_log off; sendfile on; default_type application/octet-stream;
  client_body_temp_path $W/body; proxy_temp_path $W/proxy; fastcgi_temp_path $W/f; uwsgi_temp_path $W/u; scgi_temp_path $W/s;
  server { listen 127.0.0.1:$BP; root $W/www;
    location / { rewrite ^.*/(big|small)\$ /\$1 break; return 404; } } }
EOC
nginx -p "$W" -c "$W/nginx.conf" >"$W/logs/nginx.out" 2>&1 &
PIDS+=($!)

# The upload sink: reads the request body and throws it away.
cat >"$W/sink.py" <<'EOP'
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def do_POST(self):
        left = int(self.headers.get("Content-Length", "0"))
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        body = str(left).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
EOP
python3 "$W/sink.py" "$SP" &
PIDS+=($!)
wait_http "http://127.0.0.1:$BP/small"
wait_http "http://127.0.0.1:$SP/"

cat >"$W/routing.yaml" <<EOY
backends:
  legacy:
    url: http://127.0.0.1:$BP
  new:
    url: http://127.0.0.1:$BP
  sink:
    url: http://127.0.0.1:$SP
default: legacy
routes:
  - name: plain
    path: /plain
    to: new
  - name: shadowed
    path: /shadowed
    to: legacy
    shadow: new
  - name: upload
    path: /upload
    to: sink
EOY
"$STRANGLER_BIN" check -c "$W/routing.yaml" >/dev/null

# ADMIN_PORT CASE: the non-zero shadow counts, once every shadow of the case (the warm-up's
# and the transfer's, if the route is shadowed) has its result: shadows finish on their own.
shadow_counts() {
    local n=0 lines
    while :; do
        lines=$(curl -fs "http://127.0.0.1:$1/metrics" | awk '/^strangler_shadow_total/ && $2 != "0"')
        n=$(echo "$lines" | awk 'NF { s += $2 } END { print s + 0 }')
        { [ "$n" = 0 ] || [ "$n" -ge 2 ]; } && break
        sleep 0.1
    done
    [ -n "$lines" ] && echo "$lines" | awk -v c="$2" '{ print c ": " $0 }' >>"$W/shadow"
    return 0
}
kib() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$PROXY/status"; }
# CASE WARMUP_URL COMMAND...: a fresh proxy, a warm-up request, the transfer, the growth.
run_case() {
    local name=$1 warm=$2; shift 2
    local pp ap before peak
    pp=$(free_port); ap=$(free_port)
    RUST_LOG=warn "$STRANGLER_BIN" run -c "$W/routing.yaml" --listen "127.0.0.1:$pp" \
        --admin "127.0.0.1:$ap" --threads 1 --state "$W/state.json" 2>>"$W/logs/proxy.log" &
    PROXY=$!
    wait_http "http://127.0.0.1:$ap/healthz"
    curl -fs -o /dev/null "http://127.0.0.1:$pp$warm"
    before=$(kib VmRSS)
    local t0=$SECONDS
    "${@//PORT/$pp}" >"$W/out" 2>>"$W/logs/curl.log" || { echo "stream-rss.sh: $name failed" >&2; cat "$W/logs/curl.log" >&2; exit 1; }
    peak=$(kib VmHWM)
    shadow_counts "$ap" "$name"
    printf '| %s | %s | %.1f | %.1f | **%.1f** | %s |\n' "$name" "$(cat "$W/out")" \
        "$(echo "$before / 1024" | bc -l)" "$(echo "$peak / 1024" | bc -l)" \
        "$(echo "($peak - $before) / 1024" | bc -l)" "$((SECONDS - t0))"
    kill "$PROXY"; wait "$PROXY" 2>/dev/null || true; PROXY=
}

echo "Streaming ${SIZE_MB} MiB through \`strangler run --threads 1\` ($("$STRANGLER_BIN" --version)), $(date -u +%FT%TZ):"
echo
echo "| case | bytes through | VmRSS before, MiB | VmHWM after, MiB | growth, MiB | seconds |"
echo "|---|---:|---:|---:|---:|---:|"
GET=(curl -fsS -o /dev/null -w '%{size_download}')
run_case "download" /plain/small "${GET[@]}" "http://127.0.0.1:PORT/plain/big"
run_case "download, client reading at $RATE/s" /plain/small "${GET[@]}" --limit-rate "$RATE" "http://127.0.0.1:PORT/plain/big"
run_case "download on a shadowed route" /shadowed/small "${GET[@]}" "http://127.0.0.1:PORT/shadowed/big"
run_case "upload (request body)" /upload curl -fsS -o /dev/null -w '%{size_upload}' -X POST \
    -H 'Content-Type: application/octet-stream' -T "$W/www/big" "http://127.0.0.1:PORT/upload"
echo
echo "Shadow comparisons counted (\`strangler_shadow_total\` after each case; the shadowed route's"
echo "bodies, over 1 MiB, are compared by length and hash, SPEC §5):"
echo
echo '```'
cat "$W/shadow" 2>/dev/null || echo "(none)"
echo '```'

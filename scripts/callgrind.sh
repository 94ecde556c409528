#!/usr/bin/env bash
# Instructions per proxied request, the figure this noisy machine cannot blur: the proxy runs
# under valgrind's callgrind (pinned to core 0) in front of nginx serving 1 KiB; after a 2 s
# warm-up the instrumentation is switched on for SECONDS of `wrk -t1 -c16` (core 1), and the
# dump's total instructions are divided by the requests wrk completed.
#
#   scripts/callgrind.sh                 # strangler, 10 s
#   scripts/callgrind.sh bare 15         # the bare Pingora baseline (examples/pingora_bare.rs)
#   ROUTES=10000 scripts/callgrind.sh    # strangler with a 10 000-route table (bench.sh's strangler-10k)
#   HEADER='Connection: keep-alive' scripts/callgrind.sh   # each request also sends that header
#
# Prints `TARGET requests=N Ir=T Ir/req=T/N` and the callgrind file; break the figure down with
# `callgrind_annotate --inclusive=yes FILE`. Needs valgrind, nginx, wrk, curl, taskset.
# The reload watcher reads and hashes the file once a second (its fallback poll), off the
# request path: ~30M instructions per look at a 10 000-route file under valgrind, which hides
# the CPU's SHA extensions (~0.5 ms natively). When the profile holds any, it is printed apart
# (`poll=P`) with the figure per request without it (`Ir/req-poll=…`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
TARGET=${1:-strangler}
SECONDS_ON=${2:-10}
for t in valgrind callgrind_control callgrind_annotate nginx wrk curl taskset python3; do
    command -v "$t" >/dev/null || { echo "callgrind.sh: missing $t" >&2; exit 1; }
done
case $TARGET in
    strangler) BIN=${STRANGLER_BIN:-$ROOT/target/release/strangler} ;;
    bare) BIN=$ROOT/target/release/examples/pingora_bare ;;
    *) echo "callgrind.sh: TARGET is strangler or bare" >&2; exit 2 ;;
esac
if [ ! -x "$BIN" ]; then
    if [ "$TARGET" = bare ]; then (cd "$ROOT" && cargo build --release --example pingora_bare >&2)
    else (cd "$ROOT" && cargo build --release >&2); fi
fi

W=$(mktemp -d /tmp/strangler-callgrind.XXXXXX)
chmod 755 "$W"
mkdir -p "$W/www" "$W/logs"
PIDS=()
cleanup() {
    stop_pids
    rm -rf "$W"
}
trap cleanup EXIT
BP=$(free_port); PP=$(free_port); AP=$(free_port)
head -c 1024 /dev/zero | tr '\0' 'a' >"$W/www/b1k"
cat >"$W/nginx.conf" <<EOC
worker_processes 1; daemon off; pid $W/nginx.pid; error_log $W/logs/error.log warn;
events { worker_connections 4096; }
http { access_log off; sendfile on; keepalive_requests 1000000; default_type application/octet-stream;
  client_body_temp_path $W/body; proxy_temp_path $W/proxy; fastcgi_temp_path $W/f; uwsgi_temp_path $W/u; scgi_temp_path $W/s;
  server { listen 127.0.0.1:$BP; root $W/www; location / { rewrite ^.*/(b1k)\$ /\$1 break; return 404; } } }
EOC
taskset -c 1 nginx -p "$W" -c "$W/nginx.conf" >"$W/logs/nginx.out" 2>&1 &
PIDS+=($!)
ROUTES=${ROUTES:-10}
"$ROOT/scripts/gen-routing.sh" "$ROUTES" "$BP" >"$W/routing.yaml"
VG=(valgrind --tool=callgrind --instr-atstart=no "--callgrind-out-file=$W/callgrind.out")
if [ "$TARGET" = bare ]; then
    RUST_LOG=warn taskset -c 0 "${VG[@]}" "$BIN" "127.0.0.1:$PP" "127.0.0.1:$BP" >"$W/proxy.log" 2>&1 &
else
    RUST_LOG=warn taskset -c 0 "${VG[@]}" "$BIN" run -c "$W/routing.yaml" --listen "127.0.0.1:$PP" \
        --admin "127.0.0.1:$AP" --threads 1 >"$W/proxy.log" 2>&1 &
fi
P=$!
PIDS+=("$P")
# The GET {id} route of the table: of its first resource, or (10 000 routes) of its last
# service's last resource, as bench.sh asks.
if [ "$ROUTES" -ge 10000 ]; then URL=http://127.0.0.1:$PP/svc49/resource49/42/b1k
else URL=http://127.0.0.1:$PP/svc0/resource1/42/b1k; fi
for _ in $(seq 1 300); do curl -sf -o /dev/null "$URL" && break; sleep 0.2; done
WRK=(wrk -t1 -c16)
if [ -n "${HEADER:-}" ]; then WRK+=(-H "$HEADER"); fi
taskset -c 1 "${WRK[@]}" -d2s "$URL" >/dev/null
callgrind_control -i on "$P" >/dev/null
taskset -c 1 "${WRK[@]}" "-d${SECONDS_ON}s" "$URL" >"$W/wrk.txt"
callgrind_control -d "$P" >/dev/null
callgrind_control -i off "$P" >/dev/null
REQ=$(awk '/requests in/ { print $1 }' "$W/wrk.txt")
DUMPS=("$W"/callgrind.out.*)   # the dump taken above (callgrind.out itself is the exit's)
F=${DUMPS[0]}
TOT=$(callgrind_annotate "$F" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
if [ -z "$TOT" ] || [ -z "$REQ" ]; then
    echo "callgrind.sh: no totals in $F or no requests" >&2
    exit 1
fi
POLL_IR=$(callgrind_annotate --inclusive=yes "$F" 2>/dev/null |
    awk '/strangler::config::sha256_hex/ && !n++ { gsub(",", "", $1); print $1 }')
if [ -n "$POLL_IR" ] && [ "$POLL_IR" -gt 0 ]; then
    echo "$TARGET requests=$REQ Ir=$TOT Ir/req=$((TOT / REQ)) poll=$POLL_IR Ir/req-poll=$(((TOT - POLL_IR) / REQ))"
else
    echo "$TARGET requests=$REQ Ir=$TOT Ir/req=$((TOT / REQ))"
fi
cp "$F" "/tmp/callgrind.$TARGET.out"
echo "callgrind file: /tmp/callgrind.$TARGET.out"

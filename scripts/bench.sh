#!/usr/bin/env bash
# End-to-end throughput/latency/CPU/RSS comparison: no proxy vs nginx reverse proxy vs a bare
# Pingora proxy vs strangler (10 routes, 10 000 routes, and 10 000 routes with routing.yaml
# rewritten every 100 ms under the load), for 1 KiB and 1 MiB bodies.
#
#   scripts/bench.sh            # prints a markdown report on stdout
#   scripts/bench.sh --write    # ... and appends it to BENCHMARKS.md
#
# Environment:
#   DURATION=15     seconds per measured wrk run (after a 1 s warm-up run)
#   REPS=3          interleaved repetitions; the report shows medians
#   CONNS=64        wrk connections (wrk uses 1 thread, pinned with taskset -c $WRK_CPU)
#   TARGETS="direct nginx pingora-bare strangler-10 strangler-10k strangler-10k-reload"
#   SIZES="1k 1m"   a subset of either, for a quicker run
#   RELOAD_EVERY=0.1  seconds between rewrites of routing.yaml in strangler-10k-reload
#   PROXY_CPU=0     core for the proxy under test (nginx worker / strangler --threads 1)
#   WRK_CPU=1       core for wrk
#   BACKEND_CPU=1   core for the backend nginx (1 worker). With 2 cores the proxy gets core 0
#                   to itself; wrk and the backend share core 1.
#   STRANGLER_BIN   default target/release/strangler (built with `cargo build --release` if missing)
#   (the bare Pingora baseline, target/release/examples/pingora_bare, is built when missing)
#
# Needs nginx and wrk (Debian packages; installed with apt-get if missing), curl, taskset, python3.
# Every process runs from a temp dir on free loopback ports and is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-15}
REPS=${REPS:-3}
CONNS=${CONNS:-64}
RELOAD_EVERY=${RELOAD_EVERY:-0.1}
PROXY_CPU=${PROXY_CPU:-0}
WRK_CPU=${WRK_CPU:-1}
BACKEND_CPU=${BACKEND_CPU:-1}
STRANGLER_BIN=${STRANGLER_BIN:-$ROOT/target/release/strangler}
WRITE=0
for a in "$@"; do
    case "$a" in
        --write) WRITE=1 ;;
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $a" >&2; exit 2 ;;
    esac
done

log() { echo "bench: $*" >&2; }

# --- tools -----------------------------------------------------------------------------------
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
    log "installing nginx and wrk"
    # Keep the package from starting nginx as a system service.
    POLICY=/usr/sbin/policy-rc.d
    ADDED_POLICY=0
    if [ ! -e "$POLICY" ]; then printf '#!/bin/sh\nexit 101\n' >"$POLICY"; chmod +x "$POLICY"; ADDED_POLICY=1; fi
    apt-get install -y nginx wrk >&2 || { apt-get update >&2 && apt-get install -y nginx wrk >&2; }
    [ "$ADDED_POLICY" = 1 ] && rm -f "$POLICY"
fi
for t in nginx wrk curl taskset python3; do command -v "$t" >/dev/null || { log "missing $t"; exit 1; }; done
if [ ! -x "$STRANGLER_BIN" ]; then
    log "building strangler (release)"
    (cd "$ROOT" && cargo build --release >&2)
fi
# The baseline: a bare Pingora proxy built with the same profile (examples/pingora_bare.rs).
BARE_BIN=$ROOT/target/release/examples/pingora_bare
if [ ! -x "$BARE_BIN" ] || [ "$ROOT/examples/pingora_bare.rs" -nt "$BARE_BIN" ]; then
    log "building the bare Pingora baseline (release)"
    (cd "$ROOT" && cargo build --release --example pingora_bare >&2)
fi

# --- temp dir, cleanup -----------------------------------------------------------------------
TMP=$(mktemp -d /tmp/strangler-bench.XXXXXX)
chmod 755 "$TMP"   # nginx workers run as nobody
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]:-}"; do
        if [ -n "$p" ]; then kill "$p" 2>/dev/null || true; fi
    done
    for p in "${PIDS[@]:-}"; do
        if [ -n "$p" ]; then wait "$p" 2>/dev/null || true; fi
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback TCP port (not listening now, and not handed out before in this run).
USED_PORTS=" "
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 40000))
        case "$USED_PORTS" in *" $p "*) continue ;; esac
        if ! ss -Htln "sport = :$p" | grep -q .; then
            USED_PORTS+="$p "
            echo "$p"
            return
        fi
    done
}

wait_http() { # URL — until it answers at all (any status), 10 s at most
    for _ in $(seq 1 100); do
        curl -s -o /dev/null --max-time 1 "$1" && return 0
        sleep 0.1
    done
    log "no answer from $1"; return 1
}

stop() { # PID — TERM, wait, drop from PIDS
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" != "$1" ] && keep+=("$p"); done
    PIDS=("${keep[@]:-}")
}

# --- backend: nginx with fixed bodies --------------------------------------------------------
mkdir -p "$TMP/www" "$TMP/backend/logs" "$TMP/proxy/logs"
head -c 1024 /dev/zero | tr '\0' 'a' >"$TMP/www/b1k"
head -c 1048576 /dev/zero | tr '\0' 'a' >"$TMP/www/b1m"
BACKEND_PORT=$(free_port)
cat >"$TMP/backend/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/backend/nginx.pid;
error_log $TMP/backend/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path $TMP/backend/body;
    proxy_temp_path $TMP/backend/proxy;
    fastcgi_temp_path $TMP/backend/fastcgi;
    uwsgi_temp_path $TMP/backend/uwsgi;
    scgi_temp_path $TMP/backend/scgi;
    server {
        listen 127.0.0.1:$BACKEND_PORT reuseport;
        root $TMP/www;
        # Any path ending in /b1k or /b1m is that body: proxies can forward route-shaped paths.
        location / { rewrite ^.*/(b1[km])\$ /\$1 break; return 404; }
    }
}
EOF
taskset -c "$BACKEND_CPU" nginx -p "$TMP/backend" -c "$TMP/backend/nginx.conf" \
    >"$TMP/backend/logs/stdout" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$BACKEND_PORT/b1k"

# --- routing tables (scripts/gen-routing.sh: the shapes of benches/routing.rs) ----------------
routing_yaml() { # N FILE
    "$ROOT/scripts/gen-routing.sh" "$1" "$BACKEND_PORT" >"$2"
}
mkdir -p "$TMP/s10" "$TMP/s10k"
routing_yaml 10 "$TMP/s10/routing.yaml"
routing_yaml 10000 "$TMP/s10k/routing.yaml"
# strangler-10k-reload alternates between two versions of the 10 000-route table that differ in
# one route's backend, so that every rewrite is a real reload (parse, validate, swap).
mkdir -p "$TMP/s10kr"
cp "$TMP/s10k/routing.yaml" "$TMP/s10kr/a.yaml"
awk '!done && /^    to: new$/ { print "    to: legacy"; done = 1; next } { print }' \
    "$TMP/s10kr/a.yaml" >"$TMP/s10kr/b.yaml"
cmp -s "$TMP/s10kr/a.yaml" "$TMP/s10kr/b.yaml" && { log "reload tables do not differ"; exit 1; }
cp "$TMP/s10kr/a.yaml" "$TMP/s10kr/routing.yaml"
# Each table's request hits the GET {id} route of its last complete resource.
PATH_10=/svc0/resource1/42      # 10 routes: resource 1 is the last complete one
PATH_10K=/svc49/resource49/42   # 10 000 routes: resource 2499

# --- proxies under test ----------------------------------------------------------------------
PROXY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
cat >"$TMP/proxy/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/proxy/nginx.pid;
error_log $TMP/proxy/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $TMP/proxy/body;
    proxy_temp_path $TMP/proxy/proxy;
    fastcgi_temp_path $TMP/proxy/fastcgi;
    uwsgi_temp_path $TMP/proxy/uwsgi;
    scgi_temp_path $TMP/proxy/scgi;
    upstream backend {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$PROXY_PORT;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
        }
    }
}
EOF

PROXY_PID=    # the process whose CPU and RSS are measured
start_target() { # TARGET
    PROXY_PID=
    case "$1" in
        direct) URL_BASE="http://127.0.0.1:$BACKEND_PORT"; REQ_PATH=$PATH_10 ;;
        nginx)
            taskset -c "$PROXY_CPU" nginx -p "$TMP/proxy" -c "$TMP/proxy/nginx.conf" \
                >"$TMP/proxy/logs/stdout" 2>&1 &
            MASTER=$!; PIDS+=("$MASTER")
            URL_BASE="http://127.0.0.1:$PROXY_PORT"; REQ_PATH=$PATH_10
            wait_http "$URL_BASE/"
            PROXY_PID=$(pgrep -P "$MASTER" | head -n1) # the single worker
            ;;
        pingora-bare)
            RUST_LOG=warn taskset -c "$PROXY_CPU" "$BARE_BIN" "127.0.0.1:$PROXY_PORT" \
                "127.0.0.1:$BACKEND_PORT" >"$TMP/bare.log" 2>&1 &
            PROXY_PID=$!; PIDS+=("$PROXY_PID")
            URL_BASE="http://127.0.0.1:$PROXY_PORT"; REQ_PATH=$PATH_10
            wait_http "$URL_BASE/"
            ;;
        strangler-10 | strangler-10k | strangler-10k-reload)
            local dir=$TMP/s10 path=$PATH_10
            [ "$1" = strangler-10k ] && { dir=$TMP/s10k; path=$PATH_10K; }
            [ "$1" = strangler-10k-reload ] && { dir=$TMP/s10kr; path=$PATH_10K; }
            RUST_LOG=warn taskset -c "$PROXY_CPU" "$STRANGLER_BIN" run -c "$dir/routing.yaml" \
                --listen "127.0.0.1:$PROXY_PORT" --admin "127.0.0.1:$ADMIN_PORT" --threads 1 \
                >"$dir/log" 2>&1 &
            PROXY_PID=$!; PIDS+=("$PROXY_PID")
            URL_BASE="http://127.0.0.1:$PROXY_PORT"; REQ_PATH=$path
            wait_http "http://127.0.0.1:$ADMIN_PORT/healthz"
            wait_http "$URL_BASE/"
            ;;
    esac
}
# Rewrites routing.yaml every $RELOAD_EVERY s (write beside it, then rename over it, as deploy
# tools do), alternating the two versions, until stopped. Runs on the wrk core.
REWRITER=
start_rewriter() {
    # One long-lived process (no fork per rewrite), so that the load generator's core loses
    # as little as possible to it.
    python3 - "$TMP/s10kr" "$RELOAD_EVERY" <<'PY' &
import os, sys, time
d, every = sys.argv[1], float(sys.argv[2])
versions = [open(os.path.join(d, f), "rb").read() for f in ("b.yaml", "a.yaml")]
tmp, dst = os.path.join(d, ".next.yaml"), os.path.join(d, "routing.yaml")
i = 0
while True:
    with open(tmp, "wb") as f:
        f.write(versions[i % 2])
    os.replace(tmp, dst)
    i += 1
    time.sleep(every)
PY
    REWRITER=$!
    taskset -pc "$WRK_CPU" "$REWRITER" >/dev/null
    PIDS+=("$REWRITER")
}
stop_rewriter() { [ -n "$REWRITER" ] && stop "$REWRITER"; REWRITER=; }
metric() { # 'NAME{LABELS}' -> its value on the strangler under test (0 when absent)
    curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk -v m="$1" 'index($0, m " ") == 1 { v = $2 } END { print v + 0 }'
}
reload_stats() { # -> "successes errors duration_sum_seconds"
    echo "$(metric 'strangler_config_reloads_total{result="success"}')" \
        "$(metric 'strangler_config_reloads_total{result="error"}')" \
        "$(metric strangler_config_reload_duration_seconds_sum)"
}

stop_target() { # TARGET
    case "$1" in
        direct) ;;
        nginx) stop "$MASTER" ;;
        *) stop "$PROXY_PID" ;;
    esac
}

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # PID -> "utime+stime utime" (all threads) in clock ticks
    local s
    s=$(cat "/proc/$1/stat")
    s=${s##*) }                # drop "pid (comm) "; fields now start at 3 (state)
    awk '{ print $12 + $13, $12 }' <<<"$s"
}
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

to_ms() { # wrk latency like 812.00us / 1.23ms / 1.02s -> ms
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
        else { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    }'
}

RESULTS=$TMP/results.tsv   # rep size target rps p50 p99 cpu_us rss_mib non2xx errors user_us
: >"$RESULTS"
RELOADS=$TMP/reloads.tsv   # rep size reloads failed_reloads mean_reload_ms
: >"$RELOADS"
read -r -a TARGETS <<<"${TARGETS:-direct nginx pingora-bare strangler-10 strangler-10k strangler-10k-reload}"
read -r -a SIZES <<<"${SIZES:-1k 1m}"
WRK_CMD="taskset -c $WRK_CPU wrk -t1 -c$CONNS -d${DURATION}s --latency URL"

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for rep in $(seq 1 "$REPS"); do
    for size in "${SIZES[@]}"; do
        for target in "${TARGETS[@]}"; do
            start_target "$target"
            url="$URL_BASE$REQ_PATH/b$size"
            code=$(curl -s -o "$TMP/check" -w '%{http_code}' "$url")
            [ "$size" = 1k ] && want=1024 || want=1048576
            got=$(stat -c %s "$TMP/check")
            if [ "$code" != 200 ] || [ "$got" != "$want" ]; then
                log "$target $url: HTTP $code, $got bytes (want 200, $want)"; exit 1
            fi
            taskset -c "$WRK_CPU" wrk -t1 -c"$CONNS" -d1s "$url" >/dev/null # warm-up
            if [ "$target" = strangler-10k-reload ]; then
                read -r r0 e0 d0 <<<"$(reload_stats)"
                start_rewriter
            fi
            t0=0; u0=0; [ -n "$PROXY_PID" ] && read -r t0 u0 <<<"$(cpu_ticks "$PROXY_PID")"
            out=$(taskset -c "$WRK_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$url")
            t1=0; u1=0; [ -n "$PROXY_PID" ] && read -r t1 u1 <<<"$(cpu_ticks "$PROXY_PID")"
            if [ "$target" = strangler-10k-reload ]; then
                stop_rewriter
                read -r r1 e1 d1 <<<"$(reload_stats)"
                awk -v rep="$rep" -v s="$size" -v r=$((r1 - r0)) -v e=$((e1 - e0)) -v d0="$d0" -v d1="$d1" \
                    'BEGIN { ms = r > 0 ? (d1 - d0) / r * 1000 : 0; printf "%s\t%s\t%d\t%d\t%.1f\n", rep, s, r, e, ms }' \
                    >>"$RELOADS"
                log "rep $rep $size: $((r1 - r0)) reloads, $((e1 - e0)) failed"
            fi
            rss=-; [ -n "$PROXY_PID" ] && rss=$(awk -v k="$(hwm_kib "$PROXY_PID")" 'BEGIN { printf "%.1f", k / 1024 }')
            stop_target "$target"
            reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
            rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
            p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
            p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
            non2xx=$(awk '/Non-2xx/ { print $NF }' <<<"$out"); non2xx=${non2xx:-0}
            errs=$(awk '/Socket errors/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' <<<"$out"); errs=${errs:-0}
            cpu=-; user=-
            if [ -n "$PROXY_PID" ]; then
                cpu=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", d / hz * 1e6 / n }')
                user=$(awk -v d=$((u1 - u0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", d / hz * 1e6 / n }')
            fi
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$size" "$target" "$rps" \
                "$p50" "$p99" "$cpu" "$rss" "$non2xx" "$errs" "$user" >>"$RESULTS"
            # Which kind (connect, read, write, timeout): a timeout is a stall, not a failure.
            kinds=$(awk '/Socket errors/ { gsub(",", ""); printf " (connect %s, read %s, write %s, timeout %s)", $4, $6, $8, $10 }' <<<"$out")
            log "rep $rep $size $target: $rps req/s, p50 $p50 ms, p99 $p99 ms, cpu $cpu us/req (user $user), rss $rss MiB, non-2xx $non2xx, socket errors $errs$kinds"
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ----------------------------------------------------------------------------------
median() { # COLUMN SIZE TARGET
    awk -F'\t' -v c="$1" -v s="$2" -v t="$3" '$2 == s && $3 == t && $c != "-" { print $c }' "$RESULTS" |
        sort -g | awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "-"; exit }
            if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
sum_col() { awk -F'\t' -v c="$1" -v s="$2" -v t="$3" '$2 == s && $3 == t { n += $c } END { print n + 0 }' "$RESULTS"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }

report() {
    echo
    echo "## End-to-end run $(date -u +%Y-%m-%dT%H:%MZ) (scripts/bench.sh)"
    echo
    echo "DURATION=${DURATION}s per run (+1 s warm-up), REPS=$REPS interleaved (medians shown), $CONNS connections;"
    echo "proxy on core $PROXY_CPU, wrk on core $WRK_CPU, backend nginx (1 worker) on core $BACKEND_CPU."
    echo "Load average before: $LOAD_BEFORE; after: $LOAD_AFTER ($(nproc) cores)."
    echo
    echo "| body | target | req/s | p50 ms | p99 ms | CPU µs/req | of which user | peak RSS MiB | non-2xx | socket errors |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    local size target
    for size in "${SIZES[@]}"; do
        for target in "${TARGETS[@]}"; do
            echo "| $size | $target | $(median 4 "$size" "$target") | $(median 5 "$size" "$target") | $(median 6 "$size" "$target") | $(median 7 "$size" "$target") | $(median 11 "$size" "$target") | $(median 8 "$size" "$target") | $(sum_col 9 "$size" "$target") | $(sum_col 10 "$size" "$target") |"
        done
    done
    echo
    echo "| body | req/s strangler-10 / nginx | CPU/req strangler-10 / nginx | p99 strangler-10 / nginx | req/s strangler-10k / strangler-10 | req/s strangler-10 / pingora-bare | CPU/req strangler-10 / pingora-bare |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for size in "${SIZES[@]}"; do
        echo "| $size | $(ratio "$(median 4 "$size" strangler-10)" "$(median 4 "$size" nginx)") | $(ratio "$(median 7 "$size" strangler-10)" "$(median 7 "$size" nginx)") | $(ratio "$(median 6 "$size" strangler-10)" "$(median 6 "$size" nginx)") | $(ratio "$(median 4 "$size" strangler-10k)" "$(median 4 "$size" strangler-10)") | $(ratio "$(median 4 "$size" strangler-10)" "$(median 4 "$size" pingora-bare)") | $(ratio "$(median 7 "$size" strangler-10)" "$(median 7 "$size" pingora-bare)") |"
    done
    if [ -s "$RELOADS" ]; then
        local col3 col5
        echo
        echo "Reload under load (strangler-10k-reload: the 10 000-route routing.yaml rewritten every ${RELOAD_EVERY} s during the run):"
        echo
        echo "| body | req/s reload / strangler-10k | failed requests (all reps) | reloads per run (median) | failed reloads (all reps) | mean reload ms (median of runs) |"
        echo "|---|---:|---:|---:|---:|---:|"
        for size in "${SIZES[@]}"; do
            col3=$(awk -F'\t' -v s="$size" '$2 == s { print $3 }' "$RELOADS" | sort -g | awk '{ v[NR] = $1 } END { print NR ? v[int((NR + 1) / 2)] : "-" }')
            col5=$(awk -F'\t' -v s="$size" '$2 == s { print $5 }' "$RELOADS" | sort -g | awk '{ v[NR] = $1 } END { print NR ? v[int((NR + 1) / 2)] : "-" }')
            echo "| $size | $(ratio "$(median 4 "$size" strangler-10k-reload)" "$(median 4 "$size" strangler-10k)") | $(($(sum_col 9 "$size" strangler-10k-reload) + $(sum_col 10 "$size" strangler-10k-reload))) | $col3 | $(awk -F'\t' -v s="$size" '$2 == s { n += $4 } END { print n + 0 }' "$RELOADS") | $col5 |"
        done
    fi
    echo
    echo "Per-run figures (rep, body, target, req/s, p50 ms, p99 ms, CPU µs/req, RSS MiB, non-2xx, socket errors, user-space CPU µs/req):"
    echo
    echo '```'
    cat "$RESULTS"
    echo '```'
    echo
    echo "Tools: $(nginx -v 2>&1); $(wrk -v 2>&1 | head -n1 | cut -d' ' -f1-3); $("$STRANGLER_BIN" --version 2>/dev/null || echo strangler); $(rustc --version 2>/dev/null || echo 'rustc ?'); $(uname -srm)."
    echo
    echo "Commands (URL = http://127.0.0.1:PORT/PATH/b1k or /b1m):"
    echo
    echo '```'
    echo "$WRK_CMD        # after: wrk -t1 -c$CONNS -d1s URL (warm-up)"
    echo "taskset -c $BACKEND_CPU nginx -p DIR -c backend.conf             # worker_processes 1; daemon off; sendfile; access_log off"
    echo "taskset -c $PROXY_CPU nginx -p DIR -c proxy.conf               # worker_processes 1; upstream keepalive 64; proxy_http_version 1.1; default proxy buffering"
    echo "RUST_LOG=warn taskset -c $PROXY_CPU $STRANGLER_BIN run -c routing.yaml --listen 127.0.0.1:P --admin 127.0.0.1:P2 --threads 1"
    echo "paths: direct, nginx, strangler-10: $PATH_10/b{1k,1m}; strangler-10k: $PATH_10K/b{1k,1m} (GET {id} route of the last resource)"
    echo "strangler-10k-reload: as strangler-10k, while every $RELOAD_EVERY s a python loop writes the other version to .next.yaml and renames it over routing.yaml (on core $WRK_CPU)"
    echo "reloads: strangler_config_reloads_total{result=...} and strangler_config_reload_duration_seconds_sum from /metrics, before and after the run"
    echo "CPU/req = (utime+stime of the proxy process [nginx: its worker] from /proc/PID/stat, after - before the measured run) / requests; \"of which user\" = the utime part"
    echo "RSS = VmHWM of the same process, read at the end of its run (each process serves one body size, one run)"
    echo '```'
}

report | tee "$TMP/report.md"
if [ "$WRITE" = 1 ]; then
    cat "$TMP/report.md" >>"$ROOT/BENCHMARKS.md"
    log "appended to $ROOT/BENCHMARKS.md"
fi

# Helpers the measurement scripts share (sourced, not run): `. "$ROOT/scripts/lib.sh"`.

# A loopback TCP port free at this moment (the kernel's pick for port 0).
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Stops every process in the PIDS array and waits for each.
stop_pids() {
    local p
    for p in "${PIDS[@]:-}"; do
        if [ -n "$p" ]; then kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; fi
    done
}

# For the scripts that time an idle proxy (reload-time.sh, reload-churn.sh): starts
# "$STRANGLER_BIN" run on "$TMP/routing.yaml" with one worker thread, `RUST_LOG=$1`, its log
# in "$TMP/proxy.log", on free ports; sets PORT, ADMIN and PID, and returns once the admin API
# answers (30 s at most, else the log is shown and it fails).
start_strangler() {
    PORT=$(free_port)
    ADMIN=$(free_port)
    RUST_LOG=$1 "$STRANGLER_BIN" run -c "$TMP/routing.yaml" --listen "127.0.0.1:$PORT" \
        --admin "127.0.0.1:$ADMIN" --threads 1 >"$TMP/proxy.log" 2>&1 &
    PID=$!
    local _
    for _ in $(seq 1 300); do
        curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/routes" && return 0
        sleep 0.1
    done
    echo "strangler did not start:" >&2
    cat "$TMP/proxy.log" >&2
    return 1
}

# The EXIT trap of the same scripts: stops the proxy that start_strangler started, if any,
# and removes "$TMP".
stop_strangler() {
    if [ -n "${PID:-}" ]; then kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; fi
    rm -rf "$TMP"
}

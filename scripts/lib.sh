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

#!/usr/bin/env bash
# Reload cost in a running strangler: an idle proxy serves a generated ROUTES-route table
# (scripts/gen-routing.sh), the file is rewritten N times (two versions that differ in one
# route's backend; write to a temp file + rename, PAUSE s apart), and each reload's log line
# gives its phases. Prints every line's phases and the median time from the start of the read
# to the swap (read and parse + validate + swap), the figure the issue's "< 50 ms" is about.
#
#   scripts/reload-time.sh            # N=12 ROUTES=10000 PAUSE=1.2
#   N=16 scripts/reload-time.sh
#
# Environment: N, ROUTES, PAUSE, STRANGLER_BIN (default target/release/strangler, built if
# missing). Anything else (MIMALLOC_PURGE_DELAY=100, ...) reaches the proxy.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
N=${N:-12}
ROUTES=${ROUTES:-10000}
PAUSE=${PAUSE:-1.2}
STRANGLER_BIN=${STRANGLER_BIN:-$ROOT/target/release/strangler}
[ -x "$STRANGLER_BIN" ] || (cd "$ROOT" && cargo build --release >&2)

TMP=$(mktemp -d /tmp/strangler-reload.XXXXXX)
PID=
trap stop_strangler EXIT
# The backends are never contacted: the port only has to parse.
"$ROOT/scripts/gen-routing.sh" "$ROUTES" 9 >"$TMP/a.yaml"
awk '!done && /^    to: new$/ { print "    to: legacy"; done = 1; next } { print }' \
    "$TMP/a.yaml" >"$TMP/b.yaml"
cp "$TMP/a.yaml" "$TMP/routing.yaml"
start_strangler info
for i in $(seq 1 "$N"); do
    if [ $((i % 2)) = 1 ]; then src=b; else src=a; fi
    cp "$TMP/$src.yaml" "$TMP/.next.yaml" && mv "$TMP/.next.yaml" "$TMP/routing.yaml"
    sleep "$PAUSE"
done
kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
echo "reload-time: $ROUTES routes ($(wc -c <"$TMP/a.yaml") bytes), $N rewrites $PAUSE s apart"
grep 'reloaded ' "$TMP/proxy.log" | sed 's/.*) in /  /; s/, sha256.*//'
grep 'reloaded ' "$TMP/proxy.log" \
    | sed 's/.*read and parse \([0-9.]*\); validate \([0-9.]*\); swap \([0-9.]*\).*/\1 \2 \3/' \
    | python3 -c '
import statistics as st, sys
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
if not rows:
    sys.exit("reload-time: no reload logged")
to_swap = [sum(r) for r in rows]
med = lambda k: st.median(r[k] for r in rows)
print("reloads %d; read -> swap median %.1f ms (min %.1f, max %.1f); medians: read and parse %.1f, validate %.1f, swap %.1f"
      % (len(rows), st.median(to_swap), min(to_swap), max(to_swap), med(0), med(1), med(2)))'

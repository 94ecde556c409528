#!/usr/bin/env bash
# Validate the Prometheus configuration, the alert rules and their unit tests.
#   scripts/check-prometheus-rules.sh
# Needs promtool (Debian/Ubuntu: apt-get install prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null
  else
    echo "promtool not found: install prometheus (apt-get install prometheus)" >&2
    exit 1
  fi
fi

promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
promtool check config deploy/prometheus/prometheus.yml

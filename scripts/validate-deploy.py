#!/usr/bin/env python3
"""Structure checks for strangler's deployment files (deploy/): what a schema cannot see.

Checks that the Kubernetes manifests, the compose file, the Dockerfile and the systemd unit agree
with each other and with the contract (SPEC.md): probes on /healthz at the admin port, a preStop
drain whose preStop + drain timeout fit in the grace period (and a systemd TimeoutStopSec above
the drain timeout), a ConfigMap mounted as a directory (never subPath, which never sees updates),
the state file on a writable volume (set by the image's ENV, so an overridden CMD keeps it), an
admin token wherever the admin listener leaves loopback, images tagged with the crate version
(never `latest`), the alert rules in the PrometheusRule equal to deploy/prometheus/alerts.yml, and
routing.yaml files that validate (with `strangler check` when a built binary is at hand).

    python3 scripts/validate-deploy.py                       # one line per check; exit 1 on failure
    python3 scripts/validate-deploy.py --extract DIR         # also write files for promtool
    python3 scripts/validate-deploy.py --write-prometheusrule
        # regenerate deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/alerts.yml

Needs PyYAML. scripts/validate-deploy.sh runs this along with the external validators.
"""

import argparse
import ipaddress
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUSRULE = K8S / "prometheusrule.yaml"
NOT_IN_KUSTOMIZATION = {"secret.example.yaml", "kustomization.yaml"}

ADMIN_PORT = 9900
PROXY_PORT = 8080

failures = 0


def report(ok, name, detail=""):
    """One line per check, as validate-deploy.sh prints its own."""
    global failures
    if ok:
        print(f"ok    {name}")
    else:
        failures += 1
        print(f"FAIL  {name}: {detail}")


def check(name, fn):
    """Run one check: fn returns a list of problems (empty when fine)."""
    try:
        problems = fn()
    except Exception as e:  # a broken file must fail its check, not stop the others
        problems = [f"{type(e).__name__}: {e}"]
    report(not problems, name, "; ".join(problems))


def rel(p):
    return os.path.relpath(p, ROOT)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ----------------------------------------------------------------------------------------------
# routing.yaml (SPEC §2): a static check, and `strangler check` when a binary exists.

BACKEND_KEYS = {"url", "trailing_slash", "host", "connect_timeout", "timeout"}
ROUTE_KEYS = {
    "name", "path", "methods", "to", "split", "sticky", "shadow", "shadow_ignore", "exact",
    "failover", "rewrite", "rollback",
}
ROLLBACK_KEYS = {"error_rate", "min_requests", "window"}
DURATION = re.compile(r"^\d+(\.\d+)?(ms|s|m|h)$")


def percent(v):
    """A percentage as SPEC §2 writes it (`10`, `12.5`, `"10%"`); NaN when it is none."""
    if isinstance(v, bool):
        return float("nan")
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v).strip().removesuffix("%"))
    except ValueError:
        return float("nan")


def routing_problems(doc, where):
    """The parts of SPEC §2's validation that need no binary."""
    p = []
    if not isinstance(doc, dict):
        return [f"{where}: not a mapping"]
    extra = set(doc) - {"backends", "default", "routes", "trusted_proxies"}
    if extra:
        p.append(f"{where}: unknown keys {sorted(extra)}")
    backends = doc.get("backends") or {}
    if not isinstance(backends, dict) or not backends:
        p.append(f"{where}: no backends")
        backends = {}
    for name, b in backends.items():
        if not isinstance(b, dict):
            p.append(f"{where}: backend {name} is not a mapping")
            continue
        if set(b) - BACKEND_KEYS:
            p.append(f"{where}: backend {name}: unknown keys {sorted(set(b) - BACKEND_KEYS)}")
        u = urlsplit(str(b.get("url", "")))
        if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/"):
            p.append(f"{where}: backend {name}: url {b.get('url')!r} is not http(s)://host:port")
        for k in ("connect_timeout", "timeout"):
            if k in b and not DURATION.match(str(b[k])):
                p.append(f"{where}: backend {name}: bad duration {k}: {b[k]!r}")
    if doc.get("default") not in backends:
        p.append(f"{where}: default {doc.get('default')!r} is not a backend")
    names = set()
    for i, r in enumerate(doc.get("routes") or []):
        if not isinstance(r, dict):
            p.append(f"{where}: routes[{i}] is not a mapping")
            continue
        if set(r) - ROUTE_KEYS:
            p.append(f"{where}: routes[{i}]: unknown keys {sorted(set(r) - ROUTE_KEYS)}")
        name = r.get("name", r.get("path"))
        if name == "default":
            p.append(f"{where}: routes[{i}]: `default` is a reserved route name")
        if name in names:
            p.append(f"{where}: routes[{i}]: duplicate route name {name!r}")
        names.add(name)
        if not str(r.get("path", "")).startswith("/"):
            p.append(f"{where}: routes[{i}]: path {r.get('path')!r} does not start with /")
        for k in ("to", "shadow"):
            if k in r and r[k] not in backends:
                p.append(f"{where}: routes[{i}]: {k}: {r[k]!r} is not a backend")
        if "to" not in r:
            p.append(f"{where}: routes[{i}]: no `to`")
        if "split" in r and not 0 <= percent(r["split"]) <= 100:
            p.append(f"{where}: routes[{i}]: split {r['split']!r} outside 0..100")
        rb = r.get("rollback")
        if rb is not None:
            if not isinstance(rb, dict) or set(rb) - ROLLBACK_KEYS:
                p.append(f"{where}: routes[{i}]: bad rollback block")
            elif "window" in rb and not DURATION.match(str(rb["window"])):
                p.append(f"{where}: routes[{i}]: bad rollback window {rb['window']!r}")
    return p


def find_binary():
    candidates = [os.environ.get("STRANGLER_BIN")] if os.environ.get("STRANGLER_BIN") else []
    candidates += [ROOT / "target" / "release" / "strangler", ROOT / "target" / "debug" / "strangler"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return str(c)
    return None


def strangler_check(binary, text, label):
    """`strangler check -c FILE` on a copy of the routing table; returns problems."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "routing.yaml"
        path.write_text(text)
        r = subprocess.run([binary, "check", "-c", str(path)], check=False, capture_output=True,
                           text=True, timeout=60, cwd=d)
        if r.returncode != 0:
            out = (r.stdout + r.stderr).strip().replace(str(path), label)
            return [f"exit {r.returncode}: {out[-800:]}"]
    return []


def routing_checks(text, label, binary):
    # The binary's own validator is the one that counts; the static subset stands in for it
    # only where no binary was built.
    if binary:
        check(f"routing: strangler check -c {label}", lambda: strangler_check(binary, text, label))
    else:
        check(f"routing: {label} matches SPEC §2 (static subset; no built binary)",
              lambda: routing_problems(yaml.safe_load(text), label))


# ----------------------------------------------------------------------------------------------
# Kubernetes


def k8s_manifests():
    """{file name: [documents]} for every manifest in deploy/kubernetes."""
    out = {}
    for path in sorted(K8S.glob("*.y*ml")):
        out[path.name] = load_docs(path)
    return out


def by_kind(manifests, kind, name=None):
    found = [
        d for f, docs in manifests.items() if f not in NOT_IN_KUSTOMIZATION for d in docs
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return found


def one(manifests, kind, name=None):
    found = by_kind(manifests, kind, name)
    if len(found) != 1:
        raise ValueError(f"expected one {kind}{' ' + name if name else ''}, found {len(found)}")
    return found[0]


def container(dep):
    cs = dep["spec"]["template"]["spec"]["containers"]
    return next(c for c in cs if c["name"] == "strangler")


def arg_value(args, flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def seconds(d):
    """A strangler duration (10s, 500ms, 1m) in seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(d).strip())
    if not m:
        raise ValueError(f"not a duration: {d!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


DEFAULT_DRAIN = "10s"  # strangler run --drain-timeout's default


def cpu_cores(q):
    """A Kubernetes CPU quantity (250m, 1, "2") in cores."""
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def crate_version():
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.MULTILINE)
    if not m:
        raise ValueError("no version in Cargo.toml")
    return m.group(1)


def image_name_tag(image):
    """registry:5000/strangler:0.1.0 -> (registry:5000/strangler, 0.1.0); no tag -> tag None
    (what `latest` means)."""
    ref = str(image).split("@")[0]
    head, _, last = ref.rpartition("/")
    name, _, tag = last.partition(":")
    return (f"{head}/{name}" if head else name), (tag or None)


def image_tag(image):
    return image_name_tag(image)[1]


def is_loopback(addr):
    host = addr.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def container_port(c, port):
    """A Service targetPort or probe port (name or number) -> the container port number."""
    for p in c.get("ports", []):
        if port in (p.get("name"), p.get("containerPort")):
            return p["containerPort"]
    return None


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def k8s_checks(binary):
    manifests = {}

    def parse():
        nonlocal manifests
        manifests = k8s_manifests()
        p = []
        for f, docs in manifests.items():
            if not docs:
                p.append(f"{f}: empty")
            for d in docs:
                if f == "kustomization.yaml":
                    continue
                for k in ("apiVersion", "kind"):
                    if not d.get(k):
                        p.append(f"{f}: no {k}")
                if not (d.get("metadata") or {}).get("name"):
                    p.append(f"{f}: no metadata.name")
        return p

    check("k8s: every manifest parses, with apiVersion, kind, metadata.name", parse)
    if not manifests:
        return

    def kustomization():
        k = manifests["kustomization.yaml"][0]
        p = []
        listed = k.get("resources", [])
        for r in listed:
            if not (K8S / r).is_file():
                p.append(f"lists {r}, which does not exist")
        for f in manifests:
            if f not in NOT_IN_KUSTOMIZATION and f not in listed:
                p.append(f"{f} is not listed in resources")
        if "secret.example.yaml" in listed:
            p.append("secret.example.yaml must not be deployed by kustomize")
        for gen in k.get("configMapGenerator", []):
            if not (gen.get("options") or {}).get("disableNameSuffixHash"):
                p.append(f"configMapGenerator {gen.get('name')}: a hash suffix rolls every pod on "
                         "each edit instead of hot-reloading")
        return p

    check("k8s: kustomization lists every manifest, and only files that exist", kustomization)

    dep = c = pod = None

    def deployment():
        nonlocal dep, c, pod
        dep = one(manifests, "Deployment", "strangler")
        pod = dep["spec"]["template"]["spec"]
        c = container(dep)
        p = []
        if dep["spec"].get("replicas") != 3:
            p.append(f"replicas is {dep['spec'].get('replicas')}, not 3")
        if not selects(dep["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"]):
            p.append("selector does not match the pod template's labels")
        return p

    check("k8s: Deployment strangler, 3 replicas", deployment)
    if dep is None:
        return

    def probes():
        p = []
        for probe in ("readinessProbe", "livenessProbe"):
            h = (c.get(probe) or {}).get("httpGet") or {}
            if h.get("path") != "/healthz":
                p.append(f"{probe} is not httpGet /healthz")
            elif container_port(c, h.get("port")) != ADMIN_PORT:
                p.append(f"{probe} port {h.get('port')!r} is not the admin port {ADMIN_PORT}")
        return p

    check("k8s: readiness and liveness probes on /healthz at the admin port", probes)

    def drain():
        p = []
        pre = ((c.get("lifecycle") or {}).get("preStop")) or {}
        if not (pre.get("exec") or pre.get("sleep") or pre.get("httpGet")):
            p.append("no preStop hook")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        cmd = (pre.get("exec") or {}).get("command") or []
        pre_s = int(cmd[-1]) if len(cmd) >= 2 and cmd[-2].endswith("sleep") and cmd[-1].isdigit() else \
            int((pre.get("sleep") or {}).get("seconds", 0))
        if grace - pre_s < 15:
            p.append(f"terminationGracePeriodSeconds {grace} leaves under 15 s to drain after preStop")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        drain_s = seconds(arg_value(c.get("args", []), "--drain-timeout")
                          or env.get("STRANGLER_DRAIN_TIMEOUT") or DEFAULT_DRAIN)
        if pre_s + drain_s >= grace:
            p.append(f"preStop {pre_s} s + drain timeout {drain_s:g} s do not fit in "
                     f"terminationGracePeriodSeconds {grace}: the kubelet would SIGKILL mid-drain")
        if drain_s < 15:
            p.append(f"drain timeout {drain_s:g} s: requests to a slow backend (timeout 30 s by "
                     "default) are cut at every rollout; use what the grace period leaves")
        return p

    check("k8s: preStop drain hook, preStop + drain timeout fit in the grace period", drain)

    def resources():
        r = c.get("resources") or {}
        p = []
        for kind in ("requests", "limits"):
            if not r.get(kind):
                p.append(f"no resources.{kind}")
        if "memory" not in (r.get("limits") or {}):
            p.append("no memory limit")
        req_cpu = (r.get("requests") or {}).get("cpu")
        lim_cpu = (r.get("limits") or {}).get("cpu")
        # README, Sizing: at least one whole core per replica.
        if req_cpu is None or cpu_cores(req_cpu) < 1:
            p.append(f"requests.cpu {req_cpu!r} is under one core (README: at least one whole core)")
        elif lim_cpu is not None and cpu_cores(lim_cpu) < cpu_cores(req_cpu):
            p.append(f"limits.cpu {lim_cpu!r} is below requests.cpu {req_cpu!r}")
        return p

    check("k8s: resources.requests (at least one core) and resources.limits", resources)

    def image():
        want = crate_version()
        p = []
        img = c.get("image", "")
        if image_tag(img) in (None, "latest"):
            p.append(f"image {img!r} has no version tag")
        elif image_tag(img) != want:
            p.append(f"image {img!r} is not the crate version {want}")
        k = manifests["kustomization.yaml"][0]
        for i in k.get("images", []):
            if i.get("name") == image_name_tag(img)[0] and not i.get("digest") and str(i.get("newTag")) != want:
                p.append(f"kustomization images: newTag {i.get('newTag')!r} is not the crate version {want}")
        return p

    check("k8s: the image is pinned to the crate version (no `latest`)", image)

    def security():
        p = []
        psc = pod.get("securityContext") or {}
        csc = c.get("securityContext") or {}
        if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
            p.append("runAsNonRoot not set")
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        if uid in (None, 0):
            p.append(f"runAsUser is {uid!r}")
        if csc.get("readOnlyRootFilesystem") is not True:
            p.append("readOnlyRootFilesystem is not true")
        if csc.get("allowPrivilegeEscalation") is not False:
            p.append("allowPrivilegeEscalation is not false")
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            p.append("capabilities not dropped")
        return p

    check("k8s: non-root, read-only root filesystem, no privilege escalation", security)

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = c.get("volumeMounts", [])

    def config_volume():
        p = []
        cm_vols = [n for n, v in volumes.items() if "configMap" in v]
        if not cm_vols:
            return ["no ConfigMap volume"]
        for n in cm_vols:
            cm_name = volumes[n]["configMap"]["name"]
            if not by_kind(manifests, "ConfigMap", cm_name):
                p.append(f"volume {n} names ConfigMap {cm_name}, which is not in deploy/kubernetes")
            if volumes[n]["configMap"].get("items"):
                p.append(f"volume {n}: `items` would hide keys added later")
            ms = [m for m in mounts if m["name"] == n]
            if not ms:
                p.append(f"volume {n} is not mounted")
            for m in ms:
                if m.get("subPath") or m.get("subPathExpr"):
                    p.append(f"volume {n} is mounted with subPath: it would never see updates")
                if m["mountPath"].rstrip("/") != "/etc/strangler":
                    p.append(f"volume {n} is mounted at {m['mountPath']}, not /etc/strangler")
        env = {e["name"]: e for e in c.get("env", [])}
        cfg = arg_value(c.get("args", []), "-c") or (env.get("STRANGLER_CONFIG") or {}).get("value")
        if cfg != "/etc/strangler/routing.yaml":
            p.append(f"config path is {cfg!r}, not /etc/strangler/routing.yaml")
        return p

    check("k8s: ConfigMap mounted as a directory at /etc/strangler, no subPath", config_volume)

    def state():
        path = arg_value(c.get("args", []), "--state")
        if not path:
            return ["no --state: the default sits beside routing.yaml, in the read-only ConfigMap"]
        for m in mounts:
            if path.startswith(m["mountPath"].rstrip("/") + "/"):
                v = volumes.get(m["name"], {})
                if m.get("readOnly") or "configMap" in v or "secret" in v:
                    return [f"--state {path} is on read-only volume {m['name']}"]
                if not ("emptyDir" in v or "persistentVolumeClaim" in v or "ephemeral" in v):
                    return [f"--state {path} is on volume {m['name']}, not an emptyDir or a PVC"]
                return []
        return [f"--state {path} is on the read-only root filesystem"]

    check("k8s: --state on a writable emptyDir volume", state)

    def token():
        args = c.get("args", [])
        env = {e["name"]: e for e in c.get("env", [])}
        admin = arg_value(args, "--admin") or (env.get("STRANGLER_ADMIN") or {}).get("value") or "127.0.0.1:9900"
        p = []
        if is_loopback(admin):
            p.append(f"admin listener {admin} is loopback: probes and Prometheus cannot reach it")
        ref = ((env.get("STRANGLER_ADMIN_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef")
        if not ref:
            p.append("STRANGLER_ADMIN_TOKEN is not taken from a Secret (required: admin binds non-loopback)")
            return p
        if ref.get("optional"):
            p.append("the token secretKeyRef is optional: the pod would start and then be refused")
        ex = [d for d in manifests.get("secret.example.yaml", []) if d.get("kind") == "Secret"]
        if not ex or ex[0]["metadata"]["name"] != ref.get("name"):
            p.append(f"secret.example.yaml does not define Secret {ref.get('name')}")
        elif ref.get("key") not in {**(ex[0].get("stringData") or {}), **(ex[0].get("data") or {})}:
            p.append(f"secret.example.yaml has no key {ref.get('key')}")
        if any(d.get("kind") == "Secret" for f, docs in manifests.items()
               if f not in NOT_IN_KUSTOMIZATION for d in docs):
            p.append("a Secret is deployed by the kustomization: keep real tokens out of the repo")
        return p

    check("k8s: admin binds non-loopback and STRANGLER_ADMIN_TOKEN comes from a Secret", token)

    labels = dep["spec"]["template"]["metadata"]["labels"]

    def services():
        p = []
        svc = one(manifests, "Service", "strangler")
        if not selects(svc["spec"].get("selector"), labels):
            p.append("Service strangler does not select the pods")
        ports = svc["spec"].get("ports", [])
        if not any(sp["port"] == PROXY_PORT and container_port(c, sp.get("targetPort", sp["port"])) == PROXY_PORT
                   for sp in ports):
            p.append(f"Service strangler has no port {PROXY_PORT} to the proxy port")
        admins = [s for s in by_kind(manifests, "Service")
                  if any(container_port(c, sp.get("targetPort", sp["port"])) == ADMIN_PORT
                         for sp in s["spec"].get("ports", []))]
        if len(admins) != 1:
            return p + [f"expected one admin Service, found {len(admins)}"]
        a = admins[0]
        if a["spec"].get("clusterIP") != "None":
            p.append(f"admin Service {a['metadata']['name']} is not headless (clusterIP: None): "
                     "the fleet CLI could reach only one replica")
        if not any(sp["port"] == ADMIN_PORT for sp in a["spec"]["ports"]):
            p.append(f"admin Service port is not {ADMIN_PORT}")
        if not selects(a["spec"].get("selector"), labels):
            p.append("admin Service does not select the pods")
        if a["spec"].get("type", "ClusterIP") != "ClusterIP":
            p.append("admin Service must stay inside the cluster")
        return p

    check("k8s: Service :8080 and headless admin Service :9900 select the pods", services)

    def pdb():
        d = one(manifests, "PodDisruptionBudget")
        p = []
        # maxUnavailable, not minAvailable: a minAvailable at or above a scaled-down replica
        # count would block every node drain.
        if d["spec"].get("maxUnavailable") != 1 or "minAvailable" in d["spec"]:
            p.append(f"want maxUnavailable: 1 and no minAvailable, got {d['spec']!r}")
        if not selects(d["spec"]["selector"].get("matchLabels"), labels):
            p.append("does not select the pods")
        return p

    check("k8s: PodDisruptionBudget maxUnavailable 1 selects the pods", pdb)

    def monitor():
        mons = by_kind(manifests, "PodMonitor") + by_kind(manifests, "ServiceMonitor")
        if len(mons) != 1:
            return [f"expected one PodMonitor or ServiceMonitor, found {len(mons)}"]
        m = mons[0]
        p = []
        if m["kind"] == "PodMonitor":
            if not selects(m["spec"]["selector"].get("matchLabels"), labels):
                p.append("PodMonitor does not select the pods")
            eps = m["spec"].get("podMetricsEndpoints", [])
            if not any(container_port(c, e.get("port")) == ADMIN_PORT and e.get("path", "/metrics") == "/metrics"
                       for e in eps):
                p.append("no endpoint scrapes /metrics on the admin port")
            job = labels.get(m["spec"].get("jobLabel", ""))
        else:
            job = m["spec"].get("jobLabel")
        # The alerts select up{job="strangler"}.
        if job != "strangler":
            p.append(f"scrape job would be {job!r}, the alert rules expect job=\"strangler\"")
        return p

    check("k8s: PodMonitor scrapes /metrics on the admin port as job=\"strangler\"", monitor)

    def rules():
        if not ALERTS.is_file():
            return [f"{rel(ALERTS)} is missing"]
        pr = one(manifests, "PrometheusRule")
        want = yaml.safe_load(ALERTS.read_text())["groups"]
        if pr["spec"].get("groups") != want:
            return [(f"groups differ from {rel(ALERTS)}: run "
                     "python3 scripts/validate-deploy.py --write-prometheusrule")]
        return []

    check("k8s: PrometheusRule carries exactly the groups of deploy/prometheus/alerts.yml", rules)

    try:
        cm = one(manifests, "ConfigMap", volumes[next(n for n, v in volumes.items() if "configMap" in v)]
                 ["configMap"]["name"])
        text = cm["data"]["routing.yaml"]
    except Exception as e:
        report(False, "k8s: ConfigMap has routing.yaml", str(e))
        return
    routing_checks(text, "deploy/kubernetes/configmap.yaml#routing.yaml", binary)


# ----------------------------------------------------------------------------------------------
# docker compose


def compose_checks(binary):
    path = DEPLOY / "compose.yaml"
    compose = {}

    def parse():
        nonlocal compose
        compose = load_docs(path)[0]
        return [] if compose.get("services") else ["no services"]

    check("compose: deploy/compose.yaml parses", parse)
    if not compose:
        return
    services = compose["services"]
    base = path.parent

    def binds():
        p = []
        for name, s in services.items():
            b = s.get("build")
            if b:
                ctx = base / (b["context"] if isinstance(b, dict) else b)
                if not ctx.is_dir():
                    p.append(f"{name}: build context {ctx} missing")
                elif isinstance(b, dict) and not (ctx / b.get("dockerfile", "Dockerfile")).is_file():
                    p.append(f"{name}: dockerfile {b.get('dockerfile')} missing in the context")
            for v in s.get("volumes", []):
                src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
                if src.startswith((".", "/")) and not (base / src).exists():
                    p.append(f"{name}: bind mount source {src} does not exist")
        return p

    check("compose: build contexts and bind-mount sources exist", binds)

    def images():
        want = crate_version()
        p = []
        for name, s in services.items():
            img = s.get("image", "")
            if s.get("build") and image_tag(img) != want:
                p.append(f"{name}: image {img!r} (built here) is not tagged with the crate version {want}")
        return p

    check("compose: the image built here is tagged with the crate version", images)

    def mount_source(svc, target):
        for v in services[svc].get("volumes", []):
            parts = v.split(":")
            if parts[1].rstrip("/") == target.rstrip("/"):
                return (base / parts[0]).resolve()
        return None

    def strangler():
        s = services.get("strangler")
        if not s:
            return ["no strangler service"]
        p = []
        env = s.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        if not env.get("STRANGLER_ADMIN_TOKEN"):
            p.append("no STRANGLER_ADMIN_TOKEN: the image's admin listener binds 0.0.0.0 and would be refused")
        src = mount_source("strangler", "/etc/strangler")
        if not src or not src.is_dir():
            p.append("/etc/strangler is not a mounted directory (a single-file bind mount misses edits)")
        elif not (src / "routing.yaml").is_file():
            p.append(f"{src}/routing.yaml missing")
        if not any(str(v).split(":")[1].startswith("/var/lib/strangler") for v in s.get("volumes", [])):
            p.append("no writable volume for the state file at /var/lib/strangler")
        return p

    check("compose: strangler has a token, the config directory and a state volume", strangler)

    routing_text = (DEPLOY / "compose" / "routing.yaml").read_text()

    def backends():
        doc = yaml.safe_load(routing_text)
        p = []
        for name, b in (doc.get("backends") or {}).items():
            u = urlsplit(b["url"])
            s = services.get(u.hostname)
            if not s:
                p.append(f"backend {name}: no compose service {u.hostname}")
                continue
            cmd = s.get("command") or []
            cmd = shlex.split(cmd) if isinstance(cmd, str) else cmd
            if cmd[:1] != ["demo-service"]:
                p.append(f"service {u.hostname} is not a demo-service")
                continue
            listen = arg_value(cmd, "--listen") or ""
            if not listen.endswith(f":{u.port}"):
                p.append(f"backend {name} port {u.port}, but {u.hostname} listens on {listen}")
            if arg_value(cmd, "--name") != name:
                p.append(f"service {u.hostname} is named {arg_value(cmd, '--name')}, backend is {name}")
            hc = s.get("healthcheck") or {}
            if not hc.get("disable") and not hc.get("test"):
                p.append(f"service {u.hostname} inherits the image's proxy health check")
        return p

    check("compose: routing.yaml backends are the demo-service containers", backends)

    def prometheus():
        s = services.get("prometheus")
        if not s:
            return ["no prometheus service"]
        cfg_src = mount_source("prometheus", "/etc/prometheus/prometheus.yml")
        if not cfg_src:
            return ["prometheus.yml is not mounted at /etc/prometheus/prometheus.yml"]
        cfg = yaml.safe_load(cfg_src.read_text())
        p = []
        targets = [t for sc in cfg.get("scrape_configs", []) for st in sc.get("static_configs", [])
                   for t in st.get("targets", []) if sc.get("job_name") == "strangler"]
        if f"strangler:{ADMIN_PORT}" not in targets:
            p.append(f"job strangler does not scrape strangler:{ADMIN_PORT} (targets {targets})")
        for rf in cfg.get("rule_files", []):
            in_container = Path("/etc/prometheus") / rf
            src = mount_source("prometheus", str(in_container.parent))
            if not src or not (src / in_container.name).is_file():
                p.append(f"rule file {rf} is not mounted from the repository")
            elif src / in_container.name != ALERTS.resolve():
                p.append(f"rule file {rf} is not deploy/prometheus/alerts.yml")
        if not cfg.get("rule_files"):
            p.append("no rule_files: the alerts would not be loaded")
        return p

    check("compose: Prometheus scrapes strangler:9900 and loads deploy/prometheus/alerts.yml", prometheus)

    def grafana():
        s = services.get("grafana")
        if not s:
            return ["no grafana service"]
        p = []
        env = s.get("environment") or {}
        if str(env.get("GF_AUTH_ANONYMOUS_ENABLED")).lower() != "true":
            p.append("anonymous access not enabled")
        if env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") != "Viewer":
            p.append("anonymous role is not Viewer")
        prov = mount_source("grafana", "/etc/grafana/provisioning")
        if not prov or not prov.is_dir():
            return p + ["provisioning directory not mounted at /etc/grafana/provisioning"]
        for f in sorted((prov / "dashboards").glob("*.y*ml")):
            for prv in yaml.safe_load(f.read_text()).get("providers", []):
                dpath = prv.get("options", {}).get("path")
                src = mount_source("grafana", dpath) if dpath else None
                if not src or not any(src.glob("*.json")):
                    p.append(f"dashboard provider path {dpath} is not mounted with dashboards")
        for f in sorted((prov / "datasources").glob("*.y*ml")):
            for ds in yaml.safe_load(f.read_text()).get("datasources", []):
                u = urlsplit(ds.get("url", ""))
                if ds.get("type") == "prometheus" and (u.hostname not in services or u.port != 9090):
                    p.append(f"datasource {ds.get('name')} url {ds.get('url')} is not the prometheus service")
        home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
        if home:
            src = mount_source("grafana", str(Path(home).parent))
            if not src or not (src / Path(home).name).is_file():
                p.append(f"home dashboard {home} is not mounted")
        return p

    check("compose: Grafana provisioning, dashboards and datasource line up", grafana)

    routing_checks(routing_text, "deploy/compose/routing.yaml", binary)


# ----------------------------------------------------------------------------------------------
# Dockerfile and systemd


def dockerfile_checks():
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]

    def instr(name):
        return [ln[len(name):].strip() for ln in lines if ln.upper().startswith(name + " ")]

    def structure():
        p = []
        froms = instr("FROM")
        if len(froms) < 2:
            p.append("not multi-stage")
        if not any("cargo build --release --locked" in r for r in instr("RUN")):
            p.append("no `cargo build --release --locked`")
        if not any("Cargo.lock" in c for c in instr("COPY")):
            p.append("Cargo.lock is not copied before the sources (dependency layer)")
        if set(" ".join(instr("EXPOSE")).split()) != {"8080", "9900"}:
            p.append("EXPOSE is not 8080 9900")
        if not any(u.split(":")[0] == "10001" for u in instr("USER")):
            p.append("USER is not 10001")
        hc = " ".join(instr("HEALTHCHECK"))
        if "9900" not in hc:
            p.append("no HEALTHCHECK against the admin listener")
        if instr("ENTRYPOINT") != ['["strangler"]']:
            p.append(f"ENTRYPOINT is {instr('ENTRYPOINT')}")
        env = {}
        for e in instr("ENV"):
            for kv in shlex.split(e):
                if "=" in kv:
                    k, v = kv.split("=", 1)
                    env[k] = v
        # The addresses and the state file come from ENV, so a command line that replaces CMD
        # keeps them (flags there still win).
        if env.get("STRANGLER_LISTEN") != "0.0.0.0:8080" or env.get("STRANGLER_ADMIN") != "0.0.0.0:9900":
            p.append("ENV does not set STRANGLER_LISTEN=0.0.0.0:8080 and STRANGLER_ADMIN=0.0.0.0:9900")
        if not env.get("STRANGLER_STATE", "").startswith("/var/lib/strangler/"):
            p.append("ENV does not set STRANGLER_STATE under /var/lib/strangler (the volume)")
        if env.get("STRANGLER_CONFIG") != "/etc/strangler/routing.yaml":
            p.append("STRANGLER_CONFIG is not /etc/strangler/routing.yaml")
        cmd = instr("CMD")
        if not cmd:
            p.append("no CMD")
        else:
            import json
            args = json.loads(cmd[-1])
            if args[:1] != ["run"]:
                p.append(f"CMD does not start with run: {args}")
            for flag in ("--listen", "--admin", "--state"):
                if arg_value(args, flag) is not None:
                    p.append(f"CMD sets {flag}: an overridden CMD would lose it; set it in ENV")
        if not (DEPLOY / "Dockerfile.dockerignore").is_file():
            p.append("no deploy/Dockerfile.dockerignore")
        else:
            ign = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
            for must in ("target", ".git"):
                if must not in ign:
                    p.append(f"Dockerfile.dockerignore does not exclude {must}")
        return p

    check("docker: Dockerfile stages, user, ports, health check, entrypoint", structure)


def systemd_checks():
    text = (DEPLOY / "systemd" / "strangler.service").read_text()
    directives = {}
    for ln in text.splitlines():
        ln = ln.strip()
        if ln and not ln.startswith(("#", ";", "[")) and "=" in ln:
            k, v = ln.split("=", 1)
            directives.setdefault(k.strip(), []).append(v.strip())

    def unit():
        want = {
            "DynamicUser": "yes", "ProtectSystem": "strict", "StateDirectory": "strangler",
            "Restart": "always", "KillSignal": "SIGTERM", "TimeoutStopSec": "40",
            "LimitNOFILE": "65536", "NoNewPrivileges": "yes", "ProtectHome": "yes", "PrivateTmp": "yes",
        }
        p = [f"{k}={directives.get(k)} (want {v})" for k, v in want.items() if directives.get(k, [None])[-1] != v]
        start = " ".join(directives.get("ExecStart", []))
        for part in ("/usr/local/bin/strangler run", "-c /etc/strangler/routing.yaml",
                     "--state /var/lib/strangler/state.json"):
            if part not in start:
                p.append(f"ExecStart lacks {part!r}")
        # `strangler reload` (POST /reload) waits for the proxy's verdict: a rejected file fails
        # `systemctl reload`. A bare SIGHUP would report success either way.
        if directives.get("ExecReload", []) != ["/usr/local/bin/strangler reload"]:
            p.append(f"ExecReload is {directives.get('ExecReload')}, not `/usr/local/bin/strangler reload` alone")
        env = {}
        for e in directives.get("Environment", []):
            for kv in shlex.split(e):
                if "=" in kv:
                    k, v = kv.split("=", 1)
                    env[k] = v
        drain = arg_value(shlex.split(start), "--drain-timeout") or env.get("STRANGLER_DRAIN_TIMEOUT") or DEFAULT_DRAIN
        stop = directives.get("TimeoutStopSec", ["90"])[-1]
        if seconds(drain) + 5 > seconds(stop if not stop.isdigit() else stop + "s"):
            p.append(f"TimeoutStopSec={stop} is not at least the drain timeout {drain} + 5 s")
        if not (DEPLOY / "systemd" / "strangler.env").is_file():
            p.append("no deploy/systemd/strangler.env")
        return p

    check("systemd: strangler.service directives", unit)


# ----------------------------------------------------------------------------------------------
# Generated files and extracts


def write_prometheusrule():
    """Regenerate the PrometheusRule from alerts.yml, keeping its text (comments, block scalars)."""
    text = ALERTS.read_text()
    m = re.search(r"^groups:\s*$", text, re.MULTILINE)
    if not m:
        sys.exit(f"{rel(ALERTS)}: no top-level `groups:`")
    body = "".join(("  " + ln) if ln.strip() else ln for ln in text[m.start():].splitlines(True))
    out = (
        "# GENERATED from deploy/prometheus/alerts.yml by\n"
        "#   python3 scripts/validate-deploy.py --write-prometheusrule\n"
        "# Do not edit by hand: edit alerts.yml and regenerate (validate-deploy checks they agree).\n"
        "#\n"
        "# The alerts select up{job=\"strangler\"}: podmonitor.yaml sets that job name. Add the label\n"
        "# your Prometheus's ruleSelector matches (kube-prometheus-stack: `release`).\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: strangler\n"
        "  labels:\n"
        "    app.kubernetes.io/name: strangler\n"
        "spec:\n" + body
    )
    if not out.endswith("\n"):
        out += "\n"
    if yaml.safe_load(out)["spec"]["groups"] != yaml.safe_load(text)["groups"]:
        sys.exit("generated PrometheusRule does not round-trip; alerts.yml needs a manual copy")
    PROMETHEUSRULE.write_text(out)
    print(f"wrote {rel(PROMETHEUSRULE)}")


def extract(dest):
    """Files for the external validators: promtool, systemd-analyze."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    manifests = k8s_manifests()
    pr = one(manifests, "PrometheusRule")
    (dest / "prometheusrule-groups.yml").write_text(yaml.safe_dump({"groups": pr["spec"]["groups"]}, sort_keys=False))
    # The compose Prometheus's view: /etc/prometheus/prometheus.yml and rules/alerts.yml beside it.
    prom = dest / "compose-prometheus"
    (prom / "rules").mkdir(parents=True, exist_ok=True)
    (prom / "prometheus.yml").write_text((DEPLOY / "compose" / "prometheus.yml").read_text())
    (prom / "rules" / "alerts.yml").write_text(ALERTS.read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extract", metavar="DIR", help="also write files for promtool into DIR")
    ap.add_argument("--write-prometheusrule", action="store_true",
                    help="regenerate deploy/kubernetes/prometheusrule.yaml from alerts.yml and exit")
    a = ap.parse_args()
    if a.write_prometheusrule:
        write_prometheusrule()
        return 0
    binary = find_binary()
    if binary:
        print(f"info  using {rel(binary) if binary.startswith(str(ROOT)) else binary} for `strangler check`")
    k8s_checks(binary)
    compose_checks(binary)
    dockerfile_checks()
    systemd_checks()
    if a.extract:
        try:
            extract(a.extract)
        except Exception as e:
            report(False, "extract files for promtool", str(e))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

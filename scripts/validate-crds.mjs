// Validates the Prometheus Operator resources in deploy/kubernetes (PodMonitor, ServiceMonitor,
// PrometheusRule) offline, against the CRD schemas that the npm package
// @kubernetes-models/prometheus-operator compiles in, plus a strict pass that rejects unknown
// fields (the API server would silently prune them, so a typo such as `intervall:` would deploy
// and do nothing).
//
// scripts/validate-deploy.sh copies this file into a scratch npm project that has
// @kubernetes-models/prometheus-operator and yaml installed, and runs:
//   node validate-crds.mjs deploy/kubernetes/*.yaml
// One line per resource; exit 1 when any fails.
import { readFileSync, existsSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const GROUP = "monitoring.coreos.com/v1";
const KINDS = new Set(["PodMonitor", "ServiceMonitor", "PrometheusRule"]);
const MODELS = new URL(
  "./node_modules/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/",
  import.meta.url,
);
const TYPE_PREFIX = "IComGithubPrometheusOperatorPrometheusOperatorPkgApisMonitoringV1";

// Field names of a model class, read from its .d.ts (the class lists inherited fields too).
const fieldCache = new Map();
function fields(cls) {
  if (fieldCache.has(cls)) return fieldCache.get(cls);
  const file = new URL(`${cls}.d.ts`, MODELS);
  let out = null;
  if (existsSync(file)) {
    const m = readFileSync(file, "utf8").match(
      /export declare class \w+ extends Model<[^\n]*\{\n([\s\S]*?)\n\}/,
    );
    if (m) {
      out = new Map();
      for (const line of m[1].split("\n")) {
        const f = line.match(/^ {4}"([^"]+)"\??: (.+?);?$/);
        if (f) out.set(f[1], f[2]);
      }
    }
  }
  fieldCache.set(cls, out);
  return out;
}

function modelType(t) {
  let m = t.match(new RegExp(`^Array<${TYPE_PREFIX}(\\w+)>$`));
  if (m) return { cls: m[1], array: true };
  m = t.match(new RegExp(`^${TYPE_PREFIX}(\\w+)$`));
  if (m) return { cls: m[1], array: false };
  return null; // a scalar, a map, or an apimachinery type: not descended into
}

function unknownFields(value, cls, path, errors) {
  const fs = fields(cls);
  if (!fs || value === null || typeof value !== "object" || Array.isArray(value)) return;
  for (const [key, v] of Object.entries(value)) {
    if (!fs.has(key)) {
      errors.push(`${path}/${key}: unknown field`);
      continue;
    }
    const t = modelType(fs.get(key));
    if (!t) continue;
    if (t.array && Array.isArray(v)) v.forEach((x, i) => unknownFields(x, t.cls, `${path}/${key}/${i}`, errors));
    else if (!t.array) unknownFields(v, t.cls, `${path}/${key}`, errors);
  }
}

let failed = 0;
let seen = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length) {
      failed++;
      console.log(`FAIL  crd: ${file}: ${doc.errors[0].message}`);
      continue;
    }
    const obj = doc.toJS();
    if (!obj || !KINDS.has(obj.kind)) continue;
    seen++;
    const name = `crd: ${file}: ${obj.kind}/${obj.metadata?.name}`;
    const errors = [];
    if (obj.apiVersion !== GROUP) errors.push(`apiVersion ${obj.apiVersion}, not ${GROUP}`);
    try {
      const mod = await import(`@kubernetes-models/prometheus-operator/${GROUP}/${obj.kind}`);
      new mod[obj.kind](obj).validate();
    } catch (e) {
      errors.push(String(e.message || e).split("\n").slice(0, 5).join("; "));
    }
    unknownFields(obj, obj.kind, "", errors);
    if (errors.length) {
      failed++;
      console.log(`FAIL  ${name}: ${errors.join("; ")}`);
    } else {
      console.log(`ok    ${name} (CRD schema, no unknown fields)`);
    }
  }
}
if (seen === 0) {
  console.log("FAIL  crd: no PodMonitor, ServiceMonitor or PrometheusRule found");
  failed++;
}
process.exit(failed ? 1 : 0);

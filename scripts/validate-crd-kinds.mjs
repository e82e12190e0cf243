// Validates the custom resources whose CRDs are not in the repository (trust-manager's Bundle and
// the Prometheus Operator kinds) with the JSON-schema validators the npm packages
// @kubernetes-models/cert-manager and @kubernetes-models/prometheus-operator ship (generated from
// those projects' API types, compiled with ajv). Called by scripts/validate-manifests.py.
//
// Those schemas, like the CRDs they come from, do not forbid unknown fields. To be strict like the
// API server's fieldValidation=Strict, every object is validated through a Proxy that records
// which keys the validator looks at: a key of an object whose schema lists properties (the
// validator read some of its keys) and does not enumerate it (a map) that was never read is
// unknown to the schema.
//
// Usage: node validate-crd-kinds.mjs NODE_MODULES_DIR < [{"id": ..., "doc": {...}}, ...]
// Prints [{"id": ..., "errors": ["path: message", ...]}, ...]; exit 2 on a usage error.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const KINDS = {
  "trust.cert-manager.io/v1alpha1 Bundle": ["@kubernetes-models/cert-manager/trust.cert-manager.io/v1alpha1/index.js", "Bundle"],
  "monitoring.coreos.com/v1 ServiceMonitor": ["@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js", "ServiceMonitor"],
  "monitoring.coreos.com/v1 PodMonitor": ["@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js", "PodMonitor"],
  "monitoring.coreos.com/v1 PrometheusRule": ["@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js", "PrometheusRule"],
};

const nodeModules = process.argv[2];
if (!nodeModules) {
  console.error("usage: node validate-crd-kinds.mjs NODE_MODULES_DIR < objects.json");
  process.exit(2);
}

// Wraps `value` so that reads and enumerations of every nested object are recorded in `seen`.
function tracked(value, path, seen) {
  if (value === null || typeof value !== "object") return value;
  const info = { path, value, read: new Set(), enumerated: false };
  seen.push(info);
  const children = new Map();
  return new Proxy(value, {
    get(target, key, receiver) {
      const v = Reflect.get(target, key, receiver);
      if (typeof key !== "string") return v;
      info.read.add(key);
      if (v === null || typeof v !== "object") return v;
      if (!children.has(key)) children.set(key, tracked(v, path.concat([key]), seen));
      return children.get(key);
    },
    has(target, key) {
      if (typeof key === "string") info.read.add(key);
      return Reflect.has(target, key);
    },
    ownKeys(target) {
      info.enumerated = true;
      return Reflect.ownKeys(target);
    },
  });
}

const fmt = (path) => (path.length ? path.join(".") : "(root)");

async function check(doc) {
  const key = `${doc.apiVersion} ${doc.kind}`;
  const entry = KINDS[key];
  if (!entry) return [`no validator for ${key}`];
  const mod = await import(pathToFileURL(join(nodeModules, entry[0])).href);
  const Model = mod[entry[1]];
  const seen = [];
  const data = tracked(structuredClone(doc), [], seen);
  const errors = [];
  try {
    Model.prototype.validate.call(data);
  } catch (e) {
    for (const err of e.errors || [{ instancePath: "", message: e.message }]) {
      const path = err.instancePath.split("/").filter((s) => s !== "");
      const extra = err.params && err.params.allowedValues ? ` ${JSON.stringify(err.params.allowedValues)}` : "";
      errors.push(`${fmt(path)}: ${err.message}${extra}`);
    }
  }
  for (const info of seen) {
    if (Array.isArray(info.value) || info.enumerated || info.read.size === 0) continue;
    for (const k of Object.keys(info.value)) {
      if (!info.read.has(k)) errors.push(`${fmt(info.path.concat([k]))}: unknown field (not in the schema)`);
    }
  }
  return errors;
}

const input = JSON.parse(readFileSync(0, "utf8"));
const out = [];
for (const { id, doc } of input) out.push({ id, errors: await check(doc) });
process.stdout.write(JSON.stringify(out));

#!/usr/bin/env python3
"""Validates Kubernetes manifests offline, strictly (an unknown field is an error, as with the API
server's fieldValidation=Strict), for one or more Kubernetes versions.

  * built-in kinds: the JSON schemas kubernetes-validate bundles (Kubernetes 1.25 ... 1.37);
  * kinds of the CRDs in --crds folders (cert-manager's, tests/data/crds by default): the CRD's
    openAPIV3Schema, made strict (properties without x-kubernetes-preserve-unknown-fields accept
    no other key), with nullable and x-kubernetes-int-or-string understood; CEL rules
    (x-kubernetes-validations) and formats are not evaluated;
  * trust-manager Bundle and the Prometheus Operator kinds (no CRD file here): the validators of
    the npm packages @kubernetes-models/{cert-manager,prometheus-operator}, through
    scripts/validate-crd-kinds.mjs (--node-modules; installed by scripts/k8s-tools.sh).

Also checked for every object: metadata.name (or generateName) is there and well formed, label and
annotation keys and label values are well formed, no object appears twice, and with
--require-namespace every namespaced object names its namespace and no cluster-scoped one does (what
`kubectl apply -f` of a rendered chart needs).

Usage: validate-manifests.py [-k 1.29]... [--crds DIR]... [--node-modules DIR]
                             [--require-namespace] [-q] FILE|- ...
Exit status: 0 valid, 1 invalid, 2 usage or parse error. The last line gives the counts.
Runs with the Python of the venv scripts/k8s-tools.sh installs (kubernetes-validate, PyYAML).
"""
import argparse
import copy
import glob
import json
import os
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CRDS = os.path.join(ROOT, "tests", "data", "crds")
DEFAULT_NODE_MODULES = os.path.join(ROOT, ".tools", "k8s", "node", "node_modules")
NODE_SCRIPT = os.path.join(ROOT, "scripts", "validate-crd-kinds.mjs")

# Kinds validated by scripts/validate-crd-kinds.mjs, with their scope.
NODE_KINDS = {
    ("trust.cert-manager.io/v1alpha1", "Bundle"): "Cluster",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "Namespaced",
    ("monitoring.coreos.com/v1", "PodMonitor"): "Namespaced",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "Namespaced",
}
# Built-in cluster-scoped kinds (everything else built-in is namespaced).
CLUSTER_SCOPED = {
    "Namespace", "Node", "PersistentVolume", "ClusterRole", "ClusterRoleBinding",
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration", "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding", "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding",
    "CustomResourceDefinition", "APIService", "PriorityClass", "StorageClass", "CSIDriver", "CSINode",
    "VolumeAttachment", "RuntimeClass", "IngressClass", "FlowSchema", "PriorityLevelConfiguration",
    "CertificateSigningRequest", "ClusterTrustBundle", "DeviceClass", "ResourceSlice",
}

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def strict_schema(node):
    """A CRD openAPIV3Schema as a strict JSON schema (draft 2020-12)."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions", "$defs"):
            out[key] = {k: strict_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = strict_schema(value)
        elif key in ("x-kubernetes-validations", "format", "description", "example"):
            continue  # CEL is not evaluated; formats are not checked
        else:
            out[key] = value
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = out.get("anyOf", []) + [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else out["type"] + ["null"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


class Crds:
    def __init__(self):
        self.kinds = {}  # (group, kind) -> {"versions": {v: (schema, served)}, "scope", "crd"}

    def add(self, crd, where):
        spec = crd.get("spec") or {}
        group, kind = spec.get("group"), (spec.get("names") or {}).get("kind")
        entry = {"versions": {}, "scope": spec.get("scope", "Namespaced"), "crd": where}
        for v in spec.get("versions") or []:
            schema = ((v.get("schema") or {}).get("openAPIV3Schema")) or {}
            schema = strict_schema(schema)
            # metadata is checked separately (ObjectMeta); the CRD's own is just "type: object".
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            entry["versions"][v["name"]] = (schema, v.get("served", True))
        self.kinds[(group, kind)] = entry

    def load_dir(self, folder):
        for path in sorted(glob.glob(os.path.join(folder, "**", "*.y*ml"), recursive=True)):
            with open(path, encoding="utf-8") as fh:
                for doc in yaml.safe_load_all(fh):
                    if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                        self.add(doc, os.path.relpath(path, ROOT))


def load(path):
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    return [(f"{path}#{i}", d) for i, d in enumerate(docs)]


def check_meta(doc):
    errs = []
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return ["metadata: missing"]
    name = meta.get("name") or meta.get("generateName")
    if not name:
        errs.append("metadata.name: missing")
    elif not isinstance(name, str) or len(name) > 253 or not DNS_SUBDOMAIN.match(name.rstrip("-")):
        errs.append(f"metadata.name: {name!r} is not a DNS subdomain")
    ns = meta.get("namespace")
    if ns is not None and (not isinstance(ns, str) or len(ns) > 63 or not DNS_LABEL.match(ns)):
        errs.append(f"metadata.namespace: {ns!r} is not a DNS label")
    for field in ("labels", "annotations"):
        values = meta.get(field) or {}
        if not isinstance(values, dict):
            errs.append(f"metadata.{field}: not a map")
            continue
        for k, v in values.items():
            prefix, _, local = str(k).rpartition("/")
            if (prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix))) or \
                    len(local) > 63 or not QUALIFIED_NAME.match(local):
                errs.append(f"metadata.{field}: bad key {k!r}")
            if not isinstance(v, str):
                errs.append(f"metadata.{field}.{k}: value is not a string")
            elif field == "labels" and (len(v) > 63 or not LABEL_VALUE.match(v)):
                errs.append(f"metadata.labels.{k}: bad value {v!r}")
    return errs


def path_of(err):
    return ".".join(str(p) for p in err.absolute_path) or "(root)"


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="YAML files (multi-document) or - for stdin")
    ap.add_argument("-k", "--kube-version", action="append", dest="versions",
                    help="Kubernetes version to validate built-in kinds for (repeatable; default 1.29)")
    ap.add_argument("--crds", action="append", help=f"folder of CRD YAML files (repeatable; default {os.path.relpath(DEFAULT_CRDS, ROOT)})")
    ap.add_argument("--node-modules", default=DEFAULT_NODE_MODULES, help="node_modules with @kubernetes-models/*")
    ap.add_argument("--require-namespace", action="store_true",
                    help="namespaced objects must set metadata.namespace, cluster-scoped ones must not")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only problems and the summary")
    args = ap.parse_args(argv)
    versions = args.versions or ["1.29"]

    crds = Crds()
    for folder in args.crds or [DEFAULT_CRDS]:
        if not os.path.isdir(folder):
            print(f"FATAL no such CRD folder: {folder}")
            return 2
        crds.load_dir(folder)

    objects = []
    for f in args.files:
        try:
            objects += load(f)
        except (OSError, yaml.YAMLError) as e:
            print(f"FATAL {f}: {e}")
            return 2
    for where, doc in objects:
        if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
            crds.add(doc, where)

    problems = {}  # where -> [messages]
    checked = {}   # where -> what it was checked against
    seen = {}
    node_batch = []
    for where, doc in objects:
        errs = problems.setdefault(where, [])
        if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
            errs.append("not a Kubernetes object (apiVersion or kind missing)")
            continue
        api_version, kind = str(doc["apiVersion"]), str(doc["kind"])
        group, _, version = api_version.rpartition("/")
        meta = doc.get("metadata") or {}
        errs += check_meta(doc)
        key = (group, kind, meta.get("namespace"), meta.get("name"))
        if meta.get("name"):
            if key in seen:
                errs.append(f"duplicate object (also {seen[key]})")
            seen[key] = where

        crd = crds.kinds.get((group, kind))
        if crd is not None:
            scope = crd["scope"]
            if version not in crd["versions"]:
                errs.append(f"{api_version} is not a version of CRD {crd['crd']}")
            else:
                schema, served = crd["versions"][version]
                if not served:
                    errs.append(f"{api_version} is not served by CRD {crd['crd']}")
                body = copy.deepcopy(doc)
                body["metadata"] = {}
                for e in jsonschema.Draft202012Validator(schema).iter_errors(body):
                    errs.append(f"{path_of(e)}: {e.message}")
                checked[where] = f"CRD {crd['crd']}"
        elif (api_version, kind) in NODE_KINDS:
            scope = NODE_KINDS[(api_version, kind)]
            node_batch.append({"id": where, "doc": doc})
            checked[where] = "npm @kubernetes-models schema"
        else:
            scope = "Cluster" if kind in CLUSTER_SCOPED else "Namespaced"
            got = []
            for v in versions:
                try:
                    got.append(kubernetes_validate.validate(doc, v, strict=True))
                except kv_utils.ValidationError as e:
                    path = ".".join(str(p) for p in e.path) or "(root)"
                    errs.append(f"Kubernetes {v} (schema {e.version}): {path}: {e.message}")
                except kv_utils.SchemaNotFoundError:
                    errs.append(f"unknown kind {api_version} {kind} for Kubernetes {v} (no schema, no CRD)")
                    break
                except kv_utils.VersionNotSupportedError:
                    print(f"FATAL kubernetes-validate has no schemas for Kubernetes {v}")
                    return 2
            checked[where] = "Kubernetes " + ", ".join(versions) + " (strict)"
        if args.require_namespace:
            if scope == "Namespaced" and not meta.get("namespace"):
                errs.append("metadata.namespace: missing on a namespaced object")
            if scope == "Cluster" and meta.get("namespace"):
                errs.append("metadata.namespace: set on a cluster-scoped object")

    if node_batch:
        if not os.path.isdir(os.path.join(args.node_modules, "@kubernetes-models")):
            print(f"FATAL {args.node_modules} has no @kubernetes-models (run scripts/k8s-tools.sh)")
            return 2
        run = subprocess.run(["node", NODE_SCRIPT, args.node_modules], input=json.dumps(node_batch),
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"FATAL {NODE_SCRIPT} failed: {run.stderr.strip()}")
            return 2
        for result in json.loads(run.stdout):
            problems[result["id"]] += result["errors"]

    bad = 0
    for where, doc in objects:
        what = f"{where} {doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}" \
            if isinstance(doc, dict) else where
        if problems[where]:
            bad += 1
            for msg in problems[where]:
                print(f"ERROR {what}: {msg}")
        elif not args.quiet:
            print(f"OK    {what}: {checked.get(where, '')}")
    print(f"{len(objects) - bad} valid, {bad} invalid ({len(objects)} objects; Kubernetes {', '.join(versions)}; "
          f"{len(crds.kinds)} CRD kinds)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

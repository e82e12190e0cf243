#!/usr/bin/env bash
# The whole test suite, on a fresh machine (Debian 12, Rust stable), in one command:
#
#   bash scripts/test.sh [NEXTEST ARGS...]      e.g. `bash scripts/test.sh e2e` runs only matching tests
#
# 1. installs what the tests need when it is missing: cargo-nextest (cargo install --locked),
#    rustfmt and clippy (rustup), the chart tools (scripts/k8s-tools.sh .tools/k8s), and the Python
#    package prometheus_client (pip; its strict OpenMetrics parser reads /metrics in the tests),
#    and kosoku + sslyze in a venv (scripts/conformance-tools.sh .tools/conformance), and nginx
#    and HAProxy (apt-get; the comparison harness's smoke test runs against them);
# 2. cargo fmt --all -- --check, then cargo clippy --workspace --all-targets -- -D warnings
#    (the workspace: wsgate and the bench/ crate);
# 3. builds a real kube-apiserver 1.20.2 + etcd once (scripts/kube-apiserver.sh build: 4-13 minutes
#    on 2 cores the first time, cached in ~/.cache/wsgate after that), starts it on 127.0.0.1 in a
#    temporary folder and stops it again on any exit;
# 4. cargo nextest run --workspace --run-ignored all: every test, the ignored end-to-end ones
#    included (WSGATE_E2E_KUBECONFIG points them at that apiserver); wsgate-bench is built first
#    for the harness's smoke test.
# Prints how long each step took. Environment:
#   WSGATE_TEST_SKIP_LINT=1   skip step 2 (for quick local iterations; CI never sets it)
#   PYTHON                    the Python that gets prometheus_client (default python3)
#   WSGATE_K8S_CACHE          where the apiserver build is kept (see scripts/kube-apiserver.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

T_START=$(date +%s)
STEP="" TIMES=() RUN_DIR=""
step() { # NAME COMMAND...: runs COMMAND, prints and records its duration
  local t0 d
  STEP="$1"; shift
  printf '\n==> %s\n' "$STEP"
  t0=$(date +%s)
  "$@"
  d=$(( $(date +%s) - t0 ))
  printf '<== %s: %dm%02ds\n' "$STEP" $((d / 60)) $((d % 60))
  TIMES+=("$(printf '  %-36s %3dm%02ds' "$STEP" $((d / 60)) $((d % 60)))")
  STEP=""
}
finish() {
  local rc=$? d=$(( $(date +%s) - T_START ))
  if [ -n "$RUN_DIR" ]; then
    bash scripts/kube-apiserver.sh stop "$RUN_DIR" || rc=1
    rm -rf "$RUN_DIR"
  fi
  printf '\ntest.sh: time per step\n'
  [ ${#TIMES[@]} -eq 0 ] || printf '%s\n' "${TIMES[@]}"
  printf '  %-36s %3dm%02ds\n' total $((d / 60)) $((d % 60))
  if [ "$rc" -ne 0 ]; then
    printf 'test.sh: FAILED%s (exit %d)\n' "${STEP:+ in step \"$STEP\"}" "$rc" >&2
  fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# ------------------------------------------------------------------ 1. tools
APT_UPDATED=0
apt_install() { # PKG...: Debian packages, for what a minimal machine may lack
  command -v apt-get >/dev/null || { echo "test.sh: install $* (no apt-get here)" >&2; return 1; }
  [ "$APT_UPDATED" = 1 ] || { apt-get update -q; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

install_tools() {
  local missing=() c
  for c in curl openssl node npm "$PY"; do command -v "$c" >/dev/null || missing+=("$c"); done
  "$PY" -m pip --version >/dev/null 2>&1 || missing+=("$PY -m pip")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing: ${missing[*]}"
    apt_install ca-certificates curl openssl nodejs npm python3 python3-venv python3-pip
  fi
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
  cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest
  cargo nextest --version 2>&1 | sed -n 1p

  bash scripts/k8s-tools.sh .tools/k8s
  echo "chart tools in .tools/k8s"

  if ! "$PY" -c 'import prometheus_client.openmetrics.parser' 2>/dev/null; then
    local pip=("$PY" -m pip install --quiet --disable-pip-version-check prometheus_client==0.26.0)
    # A Debian-managed python refuses plain pip installs (PEP 668); the package is only for tests.
    "${pip[@]}" || "${pip[@]}" --break-system-packages
  fi
  echo "prometheus_client $("$PY" -c 'import importlib.metadata as m; print(m.version("prometheus_client"))') for $(command -v "$PY")"

  # The conformance tests: Autobahn's cases (kosoku) and sslyze's Mozilla profile check.
  bash scripts/conformance-tools.sh .tools/conformance >/dev/null
  echo "conformance tools in .tools/conformance"

  # The comparison harness's smoke test (tests/it/bench_smoke.rs) runs nginx and HAProxy.
  command -v nginx >/dev/null && command -v haproxy >/dev/null || apt_install nginx-light haproxy
  echo "$(nginx -v 2>&1), $(haproxy -v | sed -n 1p)"
}
step "install tools" install_tools

# ------------------------------------------------------------------ 2. lint
if [ "${WSGATE_TEST_SKIP_LINT:-0}" = 1 ]; then
  echo "WSGATE_TEST_SKIP_LINT=1: skipping cargo fmt and cargo clippy"
else
  step "cargo fmt --check" cargo fmt --all -- --check
  step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
fi

# ------------------------------------------------------------------ 3. kube-apiserver
step "build kube-apiserver (once, cached)" bash scripts/kube-apiserver.sh build
step "build tests" cargo nextest run --workspace --no-run
step "build wsgate-bench" cargo build -p wsgate-bench
RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/wsgate-k8s.XXXXXX")"
step "start kube-apiserver" bash scripts/kube-apiserver.sh start "$RUN_DIR"

# ------------------------------------------------------------------ 4. every test
step "cargo nextest run --run-ignored all" \
  env WSGATE_E2E_KUBECONFIG="$RUN_DIR/kubeconfig" cargo nextest run --workspace --run-ignored all --no-fail-fast "$@"

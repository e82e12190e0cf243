#!/usr/bin/env bash
# The performance comparison of issue 12, in one command, on a fresh Debian 12 machine with Rust:
#
#   bash bench/run.sh [wsgate-bench run FLAGS...]     e.g. --rounds 1 --memory-connections 2000
#
# 1. installs nginx, HAProxy and Caddy with apt-get when they are missing (and taskset);
# 2. raises the open-files limit to the hard limit (the idle-memory figure holds 9000
#    connections, two sockets each in a proxy);
# 3. builds wsgate and wsgate-bench in release mode;
# 4. runs `wsgate-bench run`: every target pinned to CPU 0 (one worker each), the load generator
#    and the echo app on CPU 1, measurements interleaved across targets for 3 rounds; prints the
#    table of medians and writes raw.csv, raw.json, machine.json and summary.md into
#    bench/results/<UTC timestamp>/ (or --out DIR).
# Flags: `wsgate-bench run --help`. Environment: CARGO_TARGET_DIR (default ./target),
# BENCH_TARGET_CPUS / BENCH_LOAD_CPUS (default 0 and 1; the same CPU on a one-CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v caddy >/dev/null || missing+=(caddy)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  echo "run.sh: installing ${missing[*]}"
  sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -gt 1048576 ]; then hard=1048576; fi
ulimit -n "$hard"

target="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p wsgate -p wsgate-bench --bins

if [ "$(nproc)" -ge 2 ]; then
  tcpu="${BENCH_TARGET_CPUS:-0}" lcpu="${BENCH_LOAD_CPUS:-1}"
else
  tcpu="${BENCH_TARGET_CPUS:-0}" lcpu="${BENCH_LOAD_CPUS:-0}"
fi
exec taskset -c "$lcpu" "$target/release/wsgate-bench" run \
  --wsgate "$target/release/wsgate" --target-cpus "$tcpu" --load-cpus "$lcpu" "$@"

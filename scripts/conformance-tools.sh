#!/usr/bin/env bash
# Installs the conformance tools the `conformance` tests need, from PyPI only, into one venv:
#   DIR/bin/kosoku    kosoku 0.1.0, the Autobahn TestSuite's WebSocket cases run by a native
#                     fuzzing client (no TLS of its own: the tests bridge it to wsgate's mTLS port)
#   DIR/bin/sslyze    sslyze 6.3.1, the TLS scanner that checks a server against Mozilla's
#                     TLS profiles (--mozilla_config=modern)
#   DIR/bin/python    the venv's python
# Every package, direct or not, is pinned to one version (below); a change to this file
# re-installs.
#
# Usage: scripts/conformance-tools.sh [DIR]   (default: .tools/conformance in the repository)
# Idempotent and safe to run from several processes at once (flock on DIR/.lock): the first run
# takes about 15 s, later runs only compare a stamp. Prints the tools' paths. Needs bash, flock,
# sha256sum and python3 (3.10 or later) with pip and venv. Linux x86_64 or aarch64 (kosoku and
# nassl ship native wheels; sslyze itself is a pure-Python source package).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.tools/conformance}"
PY="${PYTHON:-python3}"

REQUIREMENTS='
kosoku==0.1.0
sslyze==6.3.1
nassl==5.4.0
tls_parser==2.0.2
cryptography==46.0.7
cffi==2.1.1
pycparser==3.12
pydantic==2.14.4
pydantic_core==2.50.5
annotated-types==0.8.0
typing-inspection==0.4.5
typing_extensions==4.16.0
'

die() { echo "conformance-tools.sh: $*" >&2; exit 1; }
for tool in flock sha256sum "$PY"; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$PY is older than Python 3.10"

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
exec 9>"$DIR/.lock"
flock 9

print_paths() {
  echo "kosoku=$DIR/bin/kosoku"
  echo "sslyze=$DIR/bin/sslyze"
  echo "python=$DIR/bin/python"
}

want_stamp="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
if [ "$(cat "$DIR/.stamp" 2>/dev/null)" = "$want_stamp" ] \
   && [ -x "$DIR/bin/kosoku" ] && [ -x "$DIR/bin/sslyze" ] && [ -x "$DIR/bin/python" ]; then
  print_paths
  exit 0
fi
rm -f "$DIR/.stamp"

echo "conformance-tools.sh: python venv in $DIR (kosoku, sslyze)" >&2
[ -x "$DIR/bin/python" ] || "$PY" -m venv "$DIR"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
printf '%s' "$REQUIREMENTS" > "$tmp/requirements.txt"
"$DIR/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  --prefer-binary -r "$tmp/requirements.txt" >&2 \
  || die "pip install failed"
"$DIR/bin/kosoku" --help >/dev/null || die "kosoku does not run"
"$DIR/bin/sslyze" --help >/dev/null || die "sslyze does not run"

echo "$want_stamp" > "$DIR/.stamp"
echo "conformance-tools.sh: installed in $DIR" >&2
print_paths

#!/usr/bin/env bash
# A real kube-apiserver v1.20.2 + etcd on 127.0.0.1, for wsgate's end-to-end tests (tests/it/e2e.rs).
#
#   scripts/kube-apiserver.sh build            build kube-apiserver + unpack etcd into the cache (once)
#   scripts/kube-apiserver.sh start RUN_DIR    start etcd + apiserver for RUN_DIR; write RUN_DIR/kubeconfig, RUN_DIR/env
#   scripts/kube-apiserver.sh stop RUN_DIR     stop what `start` started for RUN_DIR
#
# build: everything comes from Debian bookworm through apt-get, with a private apt configuration
# (the host's /etc/apt is neither read nor changed; nothing is installed on the host):
#   * the `kubernetes` source package (1.20.5+really1.20.2: the full 1.20.2 tree with vendor/),
#     built with Debian's golang-1.19-go by Kubernetes' own `make WHAT=cmd/kube-apiserver`;
#   * the vendored github.com/modern-go/reflect2 v1.0.1 is replaced by Debian's 1.0.2 first
#     (v1.0.1 built with Go >= 1.18 crashes the apiserver when it applies a webhook's patch);
#   * etcd 3.4 from the etcd-server / etcd-client packages.
# Result: CACHE/bin/{kube-apiserver,etcd,etcdctl} and CACHE/BUILDINFO; about 270 MB once done,
# 2.7 GB at peak. A second run exits at once; an interrupted run resumes. About 4-13 minutes on
# 2 cores. Needs amd64 Debian 12 with apt, dpkg, tar, xz, perl (as root or a user apt accepts).
#
# start: both processes listen on 127.0.0.1 only, detached (setsid), logs in RUN_DIR/logs. Ports are
# free ones chosen at start (20000-32767, below Linux's ephemeral range) unless given. It waits for
# /readyz, then creates the namespaces and their `default` ServiceAccount (no controller-manager
# runs here, so nothing else would). RUN_DIR/env exports KUBECONFIG, WSGATE_E2E_KUBECONFIG,
# WSGATE_K8S_RUN_DIR, WSGATE_K8S_SERVER, WSGATE_K8S_CA_BUNDLE (base64, for caBundle),
# WSGATE_K8S_WEBHOOK_CERT/KEY (a serving certificate for 127.0.0.1 signed by RUN_DIR/pki/ca.crt).
# Already running for RUN_DIR: says so and exits 0. PKI and etcd data are kept across stop/start.
#
# stop: SIGTERM (then SIGKILL after 15 s) to the PIDs recorded in RUN_DIR, only while that process's
# command line still names RUN_DIR (a recycled PID is never hit). Keeps RUN_DIR.
#
# Environment (all optional):
#   WSGATE_K8S_CACHE           build output (default $HOME/.cache/wsgate/k8s-1.20.2)
#   WSGATE_K8S_KEEP_BUILD=1    keep the 2.5 GB build tree after a successful build
#   DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR   default http://deb.debian.org/debian{,-security}
#   WSGATE_K8S_API_PORT, WSGATE_K8S_ETCD_PORT, WSGATE_K8S_ETCD_PEER_PORT   fixed ports
#   WSGATE_K8S_NAMESPACES      namespaces to create with a default ServiceAccount (default "default")
#   WSGATE_K8S_APISERVER_ARGS  extra kube-apiserver flags (word-split)
#   WSGATE_K8S_READY_TIMEOUT   seconds to wait for /readyz (default 90)
set -euo pipefail

KUBE_VERSION=v1.20.2
KUBE_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56   # upstream tag v1.20.2
SUITE=bookworm
CACHE="${WSGATE_K8S_CACHE:-$HOME/.cache/wsgate/k8s-1.20.2}"
BIN="$CACHE/bin"

T0=$(date +%s)
say() { printf 'kube-apiserver.sh: %s\n' "$*"; }
log() { printf '[kube-apiserver.sh %s +%4ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - T0 ))" "$*"; }
die() { printf 'kube-apiserver.sh: error: %s\n' "$*" >&2; exit 1; }
elapsed() { local s=$(( $(date +%s) - T0 )); printf '%dm%02ds' $((s / 60)) $((s % 60)); }
usage() { sed -n '2,6s/^# \{0,1\}//p' "$0" >&2; exit 64; }

apiserver_ok() { [ -x "$BIN/kube-apiserver" ] && [ "$("$BIN/kube-apiserver" --version 2>/dev/null)" = "Kubernetes $KUBE_VERSION" ]; }
etcd_ok() { [ -x "$BIN/etcd" ] && "$BIN/etcd" --version >/dev/null 2>&1; }

# ================================================================== build
cmd_build() {
  if apiserver_ok && etcd_ok; then
    say "$BIN/kube-apiserver is Kubernetes $KUBE_VERSION and etcd is there; nothing to do"
    return 0
  fi
  [ "$(uname -m)" = x86_64 ] || die "only amd64 is supported (Debian's golang-1.19-go and etcd-server for amd64)"
  local c
  for c in apt-get dpkg dpkg-deb tar xz gzip perl flock; do
    command -v "$c" >/dev/null || die "'$c' not found; the build needs a Debian system"
  done
  KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
  [ -r "$KEYRING" ] || die "$KEYRING missing (package debian-archive-keyring)"

  mkdir -p "$CACHE"
  CACHE="$(cd "$CACHE" && pwd)"
  BIN="$CACHE/bin"
  exec 8>"$CACHE/.build.lock"
  flock -n 8 || die "another build is already running for $CACHE"

  BUILD="$CACHE/build"          # everything temporary
  DL="$BUILD/downloads"         # .deb files and the source package
  ROOT="$BUILD/root"            # dpkg -x target: Go, reflect2, etcd
  TOOLROOT="$BUILD/tools"       # dpkg -x target: build tools the host lacks
  WRAP="$BUILD/wrap"            # wrappers for those tools, first on PATH
  TREE="$BUILD/src/kubernetes-1.20.2"
  APTDIR="$CACHE/apt"
  mkdir -p "$BIN" "$DL" "$ROOT" "$WRAP" "$BUILD/src"
  log "building into $CACHE"

  setup_apt
  local pkgs=() tool_pkgs=()
  etcd_ok || pkgs+=(etcd-server etcd-client)
  if ! apiserver_ok; then
    pkgs+=(golang-1.19-go golang-1.19-src golang-github-modern-go-reflect2-dev)
    # Kubernetes' make needs make and rsync (hack/lib/golang.sh copies binaries with rsync);
    # dpkg-source needs patch and the Dpkg perl modules.
    command -v make >/dev/null || tool_pkgs+=(make)
    command -v patch >/dev/null || tool_pkgs+=(patch)
    command -v dpkg-source >/dev/null || tool_pkgs+=(dpkg-dev libdpkg-perl)
    if ! command -v rsync >/dev/null; then
      tool_pkgs+=(rsync)
      ldconfig -p 2>/dev/null | grep -q 'libpopt\.so\.0 ' || tool_pkgs+=(libpopt0)
      ldconfig -p 2>/dev/null | grep -q 'libxxhash\.so\.0 ' || tool_pkgs+=(libxxhash0)
    fi
  fi
  fetch_debs ${pkgs[@]+"${pkgs[@]}"} ${tool_pkgs[@]+"${tool_pkgs[@]}"}

  if ! etcd_ok; then
    unpack_deb etcd-server "$ROOT"
    unpack_deb etcd-client "$ROOT"
    install -m 0755 "$ROOT/usr/bin/etcd" "$BIN/etcd"
    install -m 0755 "$ROOT/usr/bin/etcdctl" "$BIN/etcdctl"
    etcd_ok || die "$BIN/etcd does not run: $("$BIN/etcd" --version 2>&1 | tail -1)"
    log "etcd $(deb_version etcd-server) -> $BIN/etcd"
  fi
  if ! apiserver_ok; then
    [ ${#tool_pkgs[@]} -eq 0 ] || wrap_tools "${tool_pkgs[@]}"
    build_apiserver
  fi
  write_buildinfo
  if [ "${WSGATE_K8S_KEEP_BUILD:-0}" = 1 ]; then
    log "keeping the build tree $BUILD"
  else
    log "removing the build tree ($(du -sh "$CACHE" 2>/dev/null | cut -f1) in $CACHE); WSGATE_K8S_KEEP_BUILD=1 keeps it"
    rm -rf "$BUILD" "$APTDIR/state/lists" "$APTDIR/cache"
  fi
  log "done: $("$BIN/kube-apiserver" --version), etcd $("$BIN/etcd" --version | sed -n 's/^etcd Version: //p'); total $(elapsed)"
}

# A private apt: its own sources.list, lists, cache and an empty dpkg status, through APT_CONFIG.
setup_apt() {
  local mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  local secmirror="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
  MIRRORS="$mirror $SUITE, $secmirror $SUITE-security"
  mkdir -p "$APTDIR"/etc/{apt.conf.d,preferences.d,sources.list.d,trusted.gpg.d} \
           "$APTDIR"/state/lists/partial "$APTDIR"/cache/archives/partial "$APTDIR"/log
  : > "$APTDIR/state/status.empty"
  : > "$APTDIR/etc/apt.conf"
  cat > "$APTDIR/etc/sources.list" <<EOF
deb [signed-by=$KEYRING] $mirror $SUITE main
deb [signed-by=$KEYRING] $mirror $SUITE-updates main
deb [signed-by=$KEYRING] $secmirror $SUITE-security main
deb-src [signed-by=$KEYRING] $mirror $SUITE main
deb-src [signed-by=$KEYRING] $mirror $SUITE-updates main
deb-src [signed-by=$KEYRING] $secmirror $SUITE-security main
EOF
  cat > "$APTDIR/apt.conf" <<EOF
Dir::Etc "$APTDIR/etc/";
Dir::Etc::main "$APTDIR/etc/apt.conf";
Dir::State "$APTDIR/state/";
Dir::State::status "$APTDIR/state/status.empty";
Dir::Cache "$APTDIR/cache/";
Dir::Log "$APTDIR/log/";
APT::Sandbox::User "root";
Acquire::Languages "none";
Acquire::Retries "3";
EOF
  APT_UPDATED=0
}
apt_() { APT_CONFIG="$APTDIR/apt.conf" apt-get -q "$@"; }
apt_update() {
  [ "$APT_UPDATED" = 1 ] && return 0
  log "apt-get update (private lists in $APTDIR)"
  apt_ update >"$APTDIR/log/update.log" 2>&1 || { tail -20 "$APTDIR/log/update.log" >&2; die "apt-get update failed"; }
  APT_UPDATED=1
}

fetch_debs() { # PKG... -> $DL (packages whose .deb is there already are skipped)
  local want=() p
  for p in "$@"; do compgen -G "$DL/${p}_*.deb" >/dev/null || want+=("$p"); done
  [ ${#want[@]} -eq 0 ] && return 0
  apt_update
  log "apt-get download ${want[*]}"
  (cd "$DL" && apt_ download "${want[@]}") >"$APTDIR/log/download.log" 2>&1 \
    || { sed 's/^/    /' "$APTDIR/log/download.log" >&2; die "apt-get download failed"; }
  for p in "${want[@]}"; do compgen -G "$DL/${p}_*.deb" >/dev/null || die "download of $p failed"; done
}
deb_of() { local f; f=$(compgen -G "$DL/${1}_*.deb" | sort -V | tail -1); [ -n "$f" ] || die "no .deb for $1"; echo "$f"; }
deb_version() { dpkg-deb -f "$(deb_of "$1")" Version; }
unpack_deb() { # PKG DEST (once per .deb)
  local stamp="$2/.unpacked-$1" deb
  deb="$(deb_of "$1")"
  [ "$(cat "$stamp" 2>/dev/null)" = "$(basename "$deb")" ] && return 0
  dpkg -x "$deb" "$2"
  basename "$deb" > "$stamp"
}

wrap_tools() { # PKG...: unpack host tools from .debs and put wrappers for them first on PATH
  log "the host lacks some build tools; using unpacked Debian packages: $*"
  local libpath="$TOOLROOT/usr/lib/x86_64-linux-gnu:$TOOLROOT/lib/x86_64-linux-gnu" p t
  mkdir -p "$TOOLROOT"
  for p in "$@"; do unpack_deb "$p" "$TOOLROOT"; done
  for t in make patch rsync dpkg-source; do
    [ -x "$TOOLROOT/usr/bin/$t" ] || continue
    cat > "$WRAP/$t" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$libpath\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" PERL5LIB="$TOOLROOT/usr/share/perl5\${PERL5LIB:+:\$PERL5LIB}" exec "$TOOLROOT/usr/bin/$t" "\$@"
EOF
    chmod +x "$WRAP/$t"
    "$WRAP/$t" --version >/dev/null 2>&1 || die "unpacked $t does not run"
  done
}

build_apiserver() {
  export PATH="$WRAP:$PATH"
  unpack_deb golang-1.19-src "$ROOT"
  unpack_deb golang-1.19-go "$ROOT"
  unpack_deb golang-github-modern-go-reflect2-dev "$ROOT"
  GOROOT_DIR="$ROOT/usr/lib/go-1.19"
  "$GOROOT_DIR/bin/go" version >/dev/null || die "the unpacked Go does not run"
  log "toolchain: $("$GOROOT_DIR/bin/go" version)"

  if [ ! -f "$TREE/.wsgate-prepared" ]; then
    apt_update
    log "apt-get source --download-only kubernetes"
    (cd "$DL" && apt_ source --download-only kubernetes) >"$APTDIR/log/source.log" 2>&1 \
      || { sed 's/^/    /' "$APTDIR/log/source.log" >&2; die "apt-get source failed"; }
  fi
  local dsc
  dsc="$(compgen -G "$DL/kubernetes_*.dsc" | sort -V | tail -1)"
  [ -n "$dsc" ] || die "apt-get source kubernetes fetched no .dsc"
  SRCVER="$(sed -n 's/^Version: //p' "$dsc" | head -1)"
  case "$SRCVER" in
    *really1.20.2*|1.20.2*) ;;
    *) die "Debian's kubernetes source is $SRCVER, not 1.20.2" ;;
  esac
  if [ ! -f "$TREE/.wsgate-prepared" ]; then
    rm -rf "$TREE" "$TREE.partial"
    log "dpkg-source -x kubernetes $SRCVER (Debian's patches: kubectl printing only)"
    # dpkg-source warns "cannot verify inline signature": apt already checked the hashes.
    dpkg-source --no-copy -x "$dsc" "$TREE.partial" >"$BUILD/dpkg-source.log" 2>&1 \
      || { cat "$BUILD/dpkg-source.log" >&2; die "dpkg-source -x failed"; }
    rm -rf "$TREE.partial/vendor/github.com/modern-go/reflect2"
    cp -a "$ROOT/usr/share/gocode/src/github.com/modern-go/reflect2" "$TREE.partial/vendor/github.com/modern-go/reflect2"
    log "vendor/github.com/modern-go/reflect2 replaced by Debian's $(deb_version golang-github-modern-go-reflect2-dev)"
    mv "$TREE.partial" "$TREE"
    echo "$SRCVER" > "$TREE/.wsgate-prepared"
  fi
  # An interrupted run can leave empty generator binaries that make would take as up to date.
  [ ! -d "$TREE/_output/bin" ] || find "$TREE/_output/bin" -maxdepth 1 -type f -size 0 -delete

  # Kubernetes 1.20 builds in GOPATH mode, and its code generators must run first: plain
  # `go build` fails on both counts, so its own make does the work.
  local makelog="$BUILD/make.log" tm rc
  log "make WHAT=cmd/kube-apiserver (several minutes; log: $makelog)"
  tm=$(date +%s)
  ( while sleep 60; do log "make still running ($(( ($(date +%s) - tm) / 60 )) min)"; done ) &
  HEARTBEAT=$!
  trap 'kill "$HEARTBEAT" 2>/dev/null || true' EXIT
  set +e
  (
    unset GOOS GOARCH GOPATH GOBIN GOFLAGS GO111MODULE GOCACHE GOMODCACHE CC CXX
    export GOROOT="$GOROOT_DIR" PATH="$GOROOT_DIR/bin:$PATH" GOENV=off GOPROXY=off GOTOOLCHAIN=local
    command -v gcc >/dev/null || export CGO_ENABLED=0
    export KUBE_GIT_VERSION="$KUBE_VERSION" KUBE_GIT_COMMIT="$KUBE_COMMIT" KUBE_GIT_TREE_STATE=clean
    export KUBE_BUILD_PLATFORMS=linux/amd64
    cd "$TREE" && make WHAT=cmd/kube-apiserver
  ) >"$makelog" 2>&1
  rc=$?
  set -e
  kill "$HEARTBEAT" 2>/dev/null || true
  wait "$HEARTBEAT" 2>/dev/null || true
  if [ "$rc" -ne 0 ]; then
    tail -30 "$makelog" >&2
    die "make failed (exit $rc); full log in $makelog. Running build again resumes."
  fi
  log "make finished in $(( ($(date +%s) - tm) / 60 ))m$(( ($(date +%s) - tm) % 60 ))s"
  install -m 0755 "$TREE/_output/local/bin/linux/amd64/kube-apiserver" "$BIN/kube-apiserver"
  apiserver_ok || die "the built binary reports '$("$BIN/kube-apiserver" --version 2>&1)', not Kubernetes $KUBE_VERSION"
}

write_buildinfo() {
  [ -n "${SRCVER:-}" ] || return 0   # only etcd was (re)installed: keep the old BUILDINFO
  cat > "$CACHE/BUILDINFO" <<EOF
kube-apiserver   $("$BIN/kube-apiserver" --version) (Debian source package kubernetes $SRCVER, make WHAT=cmd/kube-apiserver)
go               $("$GOROOT_DIR/bin/go" version | cut -d' ' -f3) (golang-1.19-go $(deb_version golang-1.19-go))
reflect2         vendor/github.com/modern-go/reflect2 replaced by golang-github-modern-go-reflect2-dev $(deb_version golang-github-modern-go-reflect2-dev)
etcd             $("$BIN/etcd" --version | sed -n 's/^etcd Version: //p')
mirror           $MIRRORS
built            $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(elapsed)
EOF
}

# ================================================================== start / stop
run_dir() { # RUN_DIR argument -> absolute RUN_DIR (created)
  [ -n "${1:-}" ] || usage
  mkdir -p "$1"
  RUN_DIR="$(cd "$1" && pwd)"
  P="$RUN_DIR/pki"
}

ours() { # NAME -> prints the PID in RUN_DIR/NAME.pid if that process is alive and names RUN_DIR
  local f="$RUN_DIR/$1.pid" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  case "$(tr '\0' ' ' < "/proc/$pid/cmdline")" in *"$RUN_DIR/"*) echo "$pid" ;; *) return 1 ;; esac
}

api() { # METHOD PATH [JSON] -> HTTP status (000: no connection); body in RUN_DIR/.last-response
  local code
  code=$(curl -s -o "$RUN_DIR/.last-response" -w '%{http_code}' --max-time 10 \
    --cacert "$P/ca.crt" --cert "$P/admin.crt" --key "$P/admin.key" \
    -X "$1" -H 'Content-Type: application/json' ${3:+--data "$3"} "$SERVER$2" 2>/dev/null) || true
  echo "${code:-000}"
}

remembered() { # VAR -> the port RUN_DIR/ports recorded for VAR at the last start, if any
  [ ! -f "$RUN_DIR/ports" ] || sed -n "s/^$1=//p" "$RUN_DIR/ports"
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() { # VAR: $WSGATE_K8S_VAR if set, else the port this RUN_DIR used last if free, else a free one
  local var="$1" env="WSGATE_K8S_$1" port
  if [ -n "${!env:-}" ]; then
    port="${!env}"
    ! port_busy "$port" || die "port $port on 127.0.0.1 ($env) is in use"
  else
    port="$(remembered "$var")"
    while [ -z "$port" ] || port_busy "$port" || [[ " ${TAKEN:-} " == *" $port "* ]]; do
      port=$(( 20000 + RANDOM % 12768 ))
    done
  fi
  TAKEN="${TAKEN:-} $port"
  printf -v "$var" '%s' "$port"
}

make_pki() { # one CA signs everything; RSA 2048, kept across restarts
  rm -rf "$P.partial" && mkdir -p "$P.partial" && chmod 700 "$P.partial"
  (
    cd "$P.partial"
    cat > openssl.cnf <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
EOF
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=wsgate-k8s test CA" -config openssl.cnf -extensions ca 2>/dev/null
    leaf() { # NAME SUBJECT EKU [SANS]
      openssl req -new -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" -config openssl.cnf 2>/dev/null
      {
        echo "basicConstraints = critical,CA:FALSE"
        echo "keyUsage = critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage = $3"
        echo "subjectKeyIdentifier = hash"
        echo "authorityKeyIdentifier = keyid"
        [ -z "${4:-}" ] || echo "subjectAltName = $4"
      } > "$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 3650 \
        -extfile "$1.ext" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    leaf apiserver "/CN=kube-apiserver" serverAuth \
      "IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.0.0.1"
    leaf admin "/O=system:masters/CN=admin" clientAuth
    leaf webhook "/CN=wsgate-webhook" serverAuth "IP:127.0.0.1,DNS:localhost"
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    base64 -w0 ca.crt > ca.b64
    rm -f ca.srl openssl.cnf
  ) || die "certificate generation failed"
  rm -rf "$P" && mv "$P.partial" "$P"
}

cmd_start() {
  run_dir "${1:-}"
  local namespaces="${WSGATE_K8S_NAMESPACES:-default}" ready_timeout="${WSGATE_K8S_READY_TIMEOUT:-90}"
  local a e c t0 ok ns s
  if ! apiserver_ok || ! etcd_ok; then die "no kube-apiserver $KUBE_VERSION + etcd in $BIN: run '$0 build' first"; fi
  for c in openssl curl setsid base64 flock; do command -v "$c" >/dev/null || die "'$c' not found"; done
  mkdir -p "$RUN_DIR/logs"
  exec 9>"$RUN_DIR/.lock"   # closed (9>&-) for etcd and the apiserver, so that they do not hold it
  flock -n 9 || die "another start/stop is running for $RUN_DIR"

  if a=$(ours apiserver) && e=$(ours etcd); then
    SERVER="https://127.0.0.1:$(remembered API_PORT)"
    [ "$(api GET /readyz)" = 200 ] || die "apiserver (pid $a) and etcd (pid $e) run for $RUN_DIR but /readyz fails; see $RUN_DIR/logs"
    say "already running for $RUN_DIR (apiserver pid $a, etcd pid $e), $SERVER"
    return 0
  fi
  if ours apiserver >/dev/null || ours etcd >/dev/null; then
    die "only one of etcd/apiserver is running for $RUN_DIR; run '$0 stop $RUN_DIR' first"
  fi
  rm -f "$RUN_DIR/apiserver.pid" "$RUN_DIR/etcd.pid" "$RUN_DIR/env" "$RUN_DIR/kubeconfig"

  local old_peer
  old_peer="$(remembered ETCD_PEER_PORT)"
  pick_port API_PORT; pick_port ETCD_PORT; pick_port ETCD_PEER_PORT
  printf 'API_PORT=%s\nETCD_PORT=%s\nETCD_PEER_PORT=%s\n' "$API_PORT" "$ETCD_PORT" "$ETCD_PEER_PORT" > "$RUN_DIR/ports"
  SERVER="https://127.0.0.1:$API_PORT"
  if [ ! -f "$P/ca.crt" ] || [ ! -f "$P/webhook.crt" ]; then make_pki; say "created PKI in $P"; fi

  # etcd keeps its peer URL in its data: with another peer port, start from empty data.
  [ "$old_peer" = "$ETCD_PEER_PORT" ] || rm -rf "$RUN_DIR/etcd"
  setsid "$BIN/etcd" --name wsgate-k8s --data-dir "$RUN_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "wsgate-k8s=http://127.0.0.1:$ETCD_PEER_PORT" \
    --logger zap --log-level warn \
    </dev/null >"$RUN_DIR/logs/etcd.log" 2>&1 9>&- &
  echo $! > "$RUN_DIR/etcd.pid"
  ok=0
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"' && { ok=1; break; }
    ours etcd >/dev/null || break
    sleep 0.2
  done
  [ "$ok" = 1 ] || { tail -20 "$RUN_DIR/logs/etcd.log" >&2; die "etcd did not become healthy; see $RUN_DIR/logs/etcd.log ('$0 stop $RUN_DIR' cleans up)"; }

  # shellcheck disable=SC2086  # WSGATE_K8S_APISERVER_ARGS is word-split on purpose
  setsid "$BIN/kube-apiserver" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" --insecure-port=0 \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
    --client-ca-file="$P/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --api-audiences=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --authorization-mode=Node,RBAC --allow-privileged=true \
    --enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultTolerationSeconds,Priority,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota \
    --feature-gates=BoundServiceAccountTokenVolume=true \
    --endpoint-reconciler-type=none --profiling=false --v=1 \
    ${WSGATE_K8S_APISERVER_ARGS:-} \
    </dev/null >"$RUN_DIR/logs/apiserver.log" 2>&1 9>&- &
  echo $! > "$RUN_DIR/apiserver.pid"
  t0=$(date +%s) ok=0
  while [ $(( $(date +%s) - t0 )) -lt "$ready_timeout" ]; do
    [ "$(api GET /readyz)" = 200 ] && { ok=1; break; }
    ours apiserver >/dev/null || break
    sleep 0.3
  done
  if [ "$ok" != 1 ]; then
    tail -20 "$RUN_DIR/logs/apiserver.log" >&2
    die "kube-apiserver not ready after $(( $(date +%s) - t0 ))s; see $RUN_DIR/logs/apiserver.log ('$0 stop $RUN_DIR' cleans up)"
  fi
  say "kube-apiserver ready after $(( $(date +%s) - t0 ))s at $SERVER"

  # No kube-controller-manager runs, so nothing creates ServiceAccounts, and the ServiceAccount
  # admission plugin refuses Pods whose ServiceAccount is missing.
  for ns in $namespaces; do
    for _ in $(seq 50); do   # "default" is created by the apiserver itself, shortly after /readyz
      s=$(api GET "/api/v1/namespaces/$ns")
      [ "$s" = 200 ] && break
      if [ "$s" = 404 ] && [ "$ns" != default ]; then
        s=$(api POST /api/v1/namespaces "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$ns\"}}")
        case "$s" in 201|409) break ;; *) die "creating namespace $ns: HTTP $s $(cat "$RUN_DIR/.last-response")" ;; esac
      fi
      sleep 0.2
    done
    s=$(api POST "/api/v1/namespaces/$ns/serviceaccounts" '{"apiVersion":"v1","kind":"ServiceAccount","metadata":{"name":"default"}}')
    case "$s" in 201|409) ;; *) die "creating serviceaccount $ns/default: HTTP $s $(cat "$RUN_DIR/.last-response")" ;; esac
  done
  rm -f "$RUN_DIR/.last-response"

  (
    umask 077
    cat > "$RUN_DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: wsgate-k8s
  cluster:
    server: $SERVER
    certificate-authority-data: $(base64 -w0 "$P/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 "$P/admin.crt")
    client-key-data: $(base64 -w0 "$P/admin.key")
contexts:
- name: wsgate-k8s
  context: {cluster: wsgate-k8s, user: admin, namespace: default}
current-context: wsgate-k8s
EOF
    cat > "$RUN_DIR/env" <<EOF
export KUBECONFIG=$RUN_DIR/kubeconfig
export WSGATE_E2E_KUBECONFIG=$RUN_DIR/kubeconfig
export WSGATE_K8S_RUN_DIR=$RUN_DIR
export WSGATE_K8S_SERVER=$SERVER
export WSGATE_K8S_CA_BUNDLE=$(cat "$P/ca.b64")
export WSGATE_K8S_WEBHOOK_CERT=$P/webhook.crt
export WSGATE_K8S_WEBHOOK_KEY=$P/webhook.key
EOF
  )
  say "namespaces with a default ServiceAccount: $namespaces"
  say "kubeconfig: $RUN_DIR/kubeconfig (or: source $RUN_DIR/env); stop with: $0 stop $RUN_DIR"
}

cmd_stop() {
  [ -n "${1:-}" ] || usage
  [ -d "$1" ] || { say "$1 does not exist; nothing to stop"; return 0; }
  run_dir "$1"
  exec 9>"$RUN_DIR/.lock"
  flock -w 30 9 || die "$RUN_DIR is locked by another start/stop"
  local rc=0 name pid
  for name in apiserver etcd; do   # the apiserver first, then its storage
    [ -f "$RUN_DIR/$name.pid" ] || continue
    if ! pid=$(ours "$name"); then
      say "$name is not running"; rm -f "$RUN_DIR/$name.pid"; continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do ours "$name" >/dev/null || break; sleep 0.1; done
    if ours "$name" >/dev/null; then
      say "$name (pid $pid) did not exit after SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
    fi
    if ours "$name" >/dev/null; then
      printf 'kube-apiserver.sh: %s (pid %s) is still there\n' "$name" "$pid" >&2; rc=1
    else
      say "stopped $name (pid $pid)"; rm -f "$RUN_DIR/$name.pid"
    fi
  done
  return "$rc"
}

case "${1:-}" in
  build) [ $# -eq 1 ] || usage; cmd_build ;;
  start) [ $# -eq 2 ] || usage; cmd_start "$2" ;;
  stop)  [ $# -eq 2 ] || usage; cmd_stop "$2" ;;
  *) usage ;;
esac

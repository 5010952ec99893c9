# shellcheck shell=bash disable=SC2034  # sets variables for the scripts that source it
# bench/lib.sh: the setup the benchmark scripts in bench/ share. Not run on
# its own: a script sets its knobs (at least BENCH_DIR), sources this file and
# calls bench_init.
#
# Knobs every script has (environment variables):
#   NIXERY_BIN=path  (default: cargo build --release, then
#                     ${CARGO_TARGET_DIR:-target}/release/nixery-local)
#   BUILD=1          (0: do not run cargo build)

BUILD=${BUILD:-1}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$REPO_ROOT/$TARGET_DIR
NIXERY_BIN=${NIXERY_BIN:-$TARGET_DIR/release/nixery-local}

OCI_MANIFEST=application/vnd.oci.image.manifest.v1+json
# What containerd 1.6 sends as Accept for a manifest.
CTR_ACCEPT="application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*"
PKGS=$REPO_ROOT/tests/pkgs # the test package set (big, medium, hello, ...)

ERRORS=()   # err: what went wrong but let the run go on
CHILDREN=() # background servers, stopped at exit
ON_EXIT=()  # functions run at exit, after the children are stopped
declare -A PID BASE # per server: its process, its http://127.0.0.1:PORT
declare -A WRK_HEADER # per server: one more request header wrk sends (-H), if any

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
err() { log "ERROR: $*"; ERRORS+=("$*"); }
record() { local IFS=$'\t'; printf '%s\n' "$*" >>"$RAW"; } # FIELD... (the value last)
in_list() { [[ " $2 " == *" $1 "* ]]; } # WORD "LIST"
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; } # T0 T1

need_tools() { # TOOL...
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
  done
}

# bench_init: this run's results dir, OUT=$BENCH_DIR/results/
# $RESULTS_PREFIX<timestamp>, its raw numbers file RAW, and the exit traps.
bench_init() {
  RUN_ID=$(date +%Y%m%dT%H%M%S)
  OUT=$BENCH_DIR/results/${RESULTS_PREFIX-}$RUN_ID
  RAW=$OUT/raw.tsv
  mkdir -p "$OUT"
  : >"$RAW"
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# shellcheck disable=SC2317  # invoked via trap
bench_cleanup() {
  local rc=$? pid hook
  # Servers, plus any still-running background curls/strace of this shell.
  for pid in "${CHILDREN[@]}" $(jobs -p); do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${CHILDREN[@]}" $(jobs -p); do
    wait "$pid" 2>/dev/null || true
  done
  for hook in "${ON_EXIT[@]}"; do "$hook" || true; done
  exit "$rc"
}

stop_pid() { # PID: stop a child and forget it
  local p
  local -a keep=()
  [[ -n ${1-} ]] || return 0
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for p in "${CHILDREN[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  CHILDREN=("${keep[@]}")
}

stop_server() { # NAME (nixery or a docker-registry)
  stop_pid "${PID[$1]-}"
  PID[$1]=
}

# --------------------------------------------------------------------------
# Machine info
# --------------------------------------------------------------------------
machine_line() { # LABEL VALUE: to stderr and $OUT/machine.txt
  printf '%-16s %s\n' "$1:" "$2" | tee -a "$OUT/machine.txt" >&2
}

# machine_info [LABEL VALUE]...: date, commit (GIT_REV), CPU, memory, kernel
# and load, then the given lines.
machine_info() {
  GIT_REV=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo none)
  if [[ $GIT_REV != none && -n $(git -C "$REPO_ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    GIT_REV="$GIT_REV+dirty"
  fi
  machine_line date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  machine_line git "$GIT_REV"
  machine_line cpu "$(nproc) x $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
  machine_line memory "$(awk '/^MemTotal/ { printf "%.1f GiB", $2/1048576 }' /proc/meminfo)"
  machine_line kernel "$(uname -sr)"
  machine_line "loadavg (start)" "$(cut -d' ' -f1-3 /proc/loadavg)"
  while (($# >= 2)); do
    machine_line "$1" "$2"
    shift 2
  done
}

machine_end() { printf 'loadavg (end):   %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt" >&2; }

# --------------------------------------------------------------------------
# nixery-local
# --------------------------------------------------------------------------
build_nixery() { # unless BUILD=0; then checks NIXERY_BIN
  if [[ $BUILD == 1 ]]; then
    log "cargo build --release"
    (cd "$REPO_ROOT" && cargo build --release --bin nixery-local) >"$OUT/cargo-build.log" 2>&1 \
      || die "cargo build --release failed; see $OUT/cargo-build.log"
  fi
  [[ -x $NIXERY_BIN ]] || die "no nixery-local binary at $NIXERY_BIN"
}

# start_nixery LOG ARG...: nixery-local serve --listen 127.0.0.1:0 ARG...,
# stdout to $OUT/LOG.stdout, log appended to $OUT/LOG.log; waits (30 s at
# most) for its listen address. Sets PID[nixery] and BASE[nixery].
start_nixery() {
  local name=$1 line="" i
  shift
  "$NIXERY_BIN" serve --listen 127.0.0.1:0 "$@" >"$OUT/$name.stdout" 2>>"$OUT/$name.log" &
  PID[nixery]=$!
  CHILDREN+=("${PID[nixery]}")
  for i in $(seq 600); do
    line=$(grep -m1 -o 'listening on http://[0-9.:]*' "$OUT/$name.stdout" 2>/dev/null || true)
    [[ -n $line ]] && break
    kill -0 "${PID[nixery]}" 2>/dev/null || die "nixery-local serve exited; see $OUT/$name.log"
    sleep 0.05
  done
  [[ -n $line ]] || die "nixery-local did not print its listen address within 30 s; see $OUT/$name.log"
  BASE[nixery]=${line#listening on }
}

# --------------------------------------------------------------------------
# Nix images from the test package set
# --------------------------------------------------------------------------
# start_daemon STATE_DIR COMPRESSION LOG_NAME: start_nixery serving Nix
# images from $PKGS with no substituters; COMPRESSION is passed as
# --layer-compression, or not at all if it is "default". Sets DAEMON_BASE.
start_daemon() {
  local -a comp=()
  [[ $2 == default ]] || comp=(--layer-compression "$2")
  start_nixery "$3" --state-dir "$1" \
    --pkgs-path "$PKGS" --nix-option substituters= "${comp[@]}"
  DAEMON_BASE=${BASE[nixery]}
}

stop_daemon() { stop_server nixery; }

cpu_ticks() { # PID -> utime+stime+cutime+cstime in clock ticks
  awk '{ print $14 + $15 + $16 + $17 }' "/proc/$1/stat"
}
ticks_s() { awk -v a="$1" -v b="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", (b - a) / hz }'; } # TICKS0 TICKS1 -> CPU seconds

# Sum of layer sizes, layer count, of a manifest file.
manifest_layers() {
  python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(sum(l["size"] for l in m["layers"]), len(m["layers"]))' "$1"
}

# built_field LOG FIELD [FILTER]: FIELD (duration_ms, reused_layers, ...) of
# the last "built Nix image" line in LOG (that contains FILTER); empty if none.
built_field() {
  { grep 'built Nix image' "$1" || true; } | { grep -F -- "${3-}" || true; } | tail -1 \
    | { grep -o "$2=[^ ]*" || true; } | cut -d= -f2
}

# nix_realise ATTR...: nix-build of $PKGS's ATTRs, no substituters, log in
# $OUT/nix-build.log; their store paths in OUTS, in order. Run it before
# measuring, so that Nix builds nothing during the runs.
nix_realise() {
  local a
  local -a args=()
  for a in "$@"; do args+=(-A "$a"); done
  log "realising $* (nix-build)"
  nix-build --no-out-link --option substituters "" "$PKGS" "${args[@]}" \
    >"$OUT/nix-build.out" 2>"$OUT/nix-build.log" || die "nix-build failed; see $OUT/nix-build.log"
  mapfile -t OUTS <"$OUT/nix-build.out"
  ((${#OUTS[@]} == $#)) || die "nix-build printed ${#OUTS[@]} paths, expected $#"
}

# nix_closure PATH...: the store paths PATH... need, sorted, in CLOSURE, and
# their size in bytes in CLOSURE_BYTES.
nix_closure() {
  mapfile -t CLOSURE < <(nix-store -qR "$@" | sort)
  ((${#CLOSURE[@]})) || die "nix-store -qR $* printed nothing"
  CLOSURE_BYTES=$(du -scb "${CLOSURE[@]}" | tail -1 | cut -f1)
}

warm_paths() { # PATH...: reads them once, so the page cache is warm
  log "warming the page cache with $# store paths"
  tar -C / -cf - "${@#/}" | cat >/dev/null
}

# --------------------------------------------------------------------------
# docker-registry (CNCF distribution)
# --------------------------------------------------------------------------
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_http() { # URL PID WHAT: until URL answers 2xx (15 s at most)
  local i
  for i in $(seq 150); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    kill -0 "$2" 2>/dev/null || die "$3 exited; see $OUT"
    sleep 0.1
  done
  die "$3 not ready at $1"
}

# start_registry NAME ROOT [OPTION]...: docker-registry serve on a free
# loopback port, storage in ROOT, config in $OUT/NAME.yml, log appended to
# $OUT/NAME.log; waits until it answers. Sets PID[NAME] and BASE[NAME].
# Redirects are off, and so are upload purging and the access log unless:
#   cache=inmemory|none  blobdescriptor cache (default inmemory)
#   accesslog=FILE       access log on, appended to FILE
#   delete=true          deletes allowed
#   proxy=URL            pull-through cache of URL
start_registry() {
  local name=$1 root=$2 opt port cache=inmemory accesslog="" delete=false proxy="" extra=""
  shift 2
  for opt in "$@"; do
    case $opt in
      cache=*) cache=${opt#*=} ;;
      accesslog=*) accesslog=${opt#*=} ;;
      delete=*) delete=${opt#*=} ;;
      proxy=*) proxy=${opt#*=} ;;
      *) die "start_registry: unknown option $opt" ;;
    esac
  done
  [[ $cache == none ]] || extra="  cache:
    blobdescriptor: $cache"
  port=$(free_port)
  mkdir -p "$root"
  cat >"$OUT/$name.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: $([[ -n $accesslog ]] && echo false || echo true)
storage:
  filesystem:
    rootdirectory: $root
$extra
  delete:
    enabled: $delete
  redirect:
    disable: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$port
EOF
  [[ -z $proxy ]] || printf 'proxy:\n  remoteurl: %s\n' "$proxy" >>"$OUT/$name.yml"
  if [[ -n $accesslog ]]; then
    docker-registry serve "$OUT/$name.yml" >>"$accesslog" 2>>"$OUT/$name.log" &
  else
    docker-registry serve "$OUT/$name.yml" >>"$OUT/$name.log" 2>&1 &
  fi
  PID[$name]=$!
  CHILDREN+=("${PID[$name]}")
  BASE[$name]=http://127.0.0.1:$port
  wait_http "${BASE[$name]}/v2/" "${PID[$name]}" "docker-registry $name"
}

# --------------------------------------------------------------------------
# Test images
# --------------------------------------------------------------------------
# keystream BYTES: deterministic incompressible bytes (AES-128-CTR over
# zeros), the same on every run.
keystream() {
  head -c "$1" /dev/zero \
    | openssl enc -aes-128-ctr -nosalt -K 6e69786572792d6c6f63616c2d62656e -iv 00000000000000000000000000000000
}

# oci_layout DIR LAYER TAG CREATED_BY: a new OCI image layout in DIR with one
# image, tagged TAG, whose one layer (plain tar media type) is the file LAYER,
# moved in. Prints the layer's digest.
oci_layout() {
  local dir=$1 layer=$2 tag=$3 created_by=$4 hex size arch
  hex=$(sha256sum "$layer" | cut -d' ' -f1)
  size=$(stat -c %s "$layer")
  case $(uname -m) in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
  rm -rf "$dir"
  mkdir -p "$dir/blobs/sha256"
  mv "$layer" "$dir/blobs/sha256/$hex"
  python3 - "$dir" "$hex" "$size" "$tag" "$arch" "$created_by" <<'EOF'
import hashlib, json, os, sys
layout, layer_hex, size, tag, arch, created_by = sys.argv[1:]
mtype = "application/vnd.oci.image.manifest.v1+json"
def put(obj):
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    hexd = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", hexd), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + hexd, "size": len(data)}
config = put({
    "architecture": arch, "os": "linux", "config": {},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + layer_hex]},
    "history": [{"created_by": created_by}],
})
manifest = put({
    "schemaVersion": 2, "mediaType": mtype,
    "config": dict(mediaType="application/vnd.oci.image.config.v1+json", **config),
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": "sha256:" + layer_hex, "size": int(size)}],
})
index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": [dict(mediaType=mtype, annotations={"org.opencontainers.image.ref.name": tag}, **manifest)]}
with open(os.path.join(layout, "index.json"), "w") as f:
    json.dump(index, f, indent=2)
with open(os.path.join(layout, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
EOF
  echo "sha256:$hex"
}

# blob_layout: the image registry.sh and mirror.sh serve, bench/blob:1 with
# one $BLOB_MIB MiB layer of keystream, cached in $BENCH_DIR/layout-<N>m.
# Sets REPO_NAME, TAG, LAYOUT, BLOB_BYTES, LAYER_DIGEST, LAYER_HEX,
# MANIFEST_DIGEST and MANIFEST_SIZE.
blob_layout() {
  REPO_NAME=bench/blob
  TAG=1
  BLOB_BYTES=$((BLOB_MIB * 1024 * 1024))
  LAYOUT=$BENCH_DIR/layout-${BLOB_MIB}m
  if [[ ! -f $LAYOUT/.complete ]]; then
    log "building OCI layout in $LAYOUT (${BLOB_MIB} MiB layer)"
    keystream "$BLOB_BYTES" >"$LAYOUT.layer.tmp"
    [[ $(stat -c %s "$LAYOUT.layer.tmp") == "$BLOB_BYTES" ]] || die "layer has wrong size"
    oci_layout "$LAYOUT" "$LAYOUT.layer.tmp" "$TAG" "nixery-local bench/registry.sh" >/dev/null
    touch "$LAYOUT/.complete"
  fi
  read -r LAYER_DIGEST MANIFEST_DIGEST MANIFEST_SIZE < <(python3 - "$LAYOUT" <<'EOF'
import json, sys
layout = sys.argv[1]
desc = json.load(open(layout + "/index.json"))["manifests"][0]
m = json.load(open(layout + "/blobs/sha256/" + desc["digest"].split(":")[1]))
print(m["layers"][0]["digest"], desc["digest"], desc["size"])
EOF
  )
  LAYER_HEX=${LAYER_DIGEST#sha256:}
}

push_blob_layout() { # NAME: skopeo copy of blob_layout's image to docker-registry NAME
  log "pushing layout to $1 (skopeo; skips blobs already present)"
  skopeo copy --quiet --preserve-digests --dest-tls-verify=false \
    "oci:$LAYOUT:$TAG" "docker://${BASE[$1]#http://}/$REPO_NAME:$TAG" >>"$OUT/skopeo.log" 2>&1 \
    || die "skopeo copy failed; see $OUT/skopeo.log"
}

blob_url() { echo "${BASE[$1]}/v2/$REPO_NAME/blobs/$LAYER_DIGEST"; } # SERVER
manifest_url() { echo "${BASE[$1]}/v2/$REPO_NAME/manifests/$TAG"; } # SERVER

# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------
url_sha256() { curl -fsS "$1" | sha256sum | cut -d' ' -f1; } # URL -> hex digest of the body

# get_checked WHAT URL VAR BYTES: one GET to /dev/null that must answer 200
# with BYTES bytes; sets GOT to curl's %{VAR}. Otherwise records an error
# (WHAT says which run) and fails.
get_checked() {
  local r code size
  r=$(curl -sS -o /dev/null -w "%{http_code} %{size_download} %{$3}" "$2") \
    || { err "$1: download failed"; return 1; }
  read -r code size GOT <<<"$r"
  if [[ $code != 200 || $size != "$4" ]]; then
    err "$1 got HTTP $code, $size bytes"
    return 1
  fi
}

# curls_start N URL PREFIX: N GETs of URL at once in the background, each
# writing "HTTP_CODE BYTES" to PREFIX-<i>.txt; their PIDs in CURL_PIDS.
curls_start() {
  local i
  CURL_PIDS=()
  for i in $(seq "$1"); do
    curl -sS -o /dev/null -w '%{http_code} %{size_download}\n' "$2" >"$3-$i.txt" 2>&1 &
    CURL_PIDS+=($!)
  done
}

curls_running() { # any of CURL_PIDS still running?
  local c
  for c in "${CURL_PIDS[@]}"; do kill -0 "$c" 2>/dev/null && return 0; done
  return 1
}

curls_wait() { # for every one of CURL_PIDS to end
  local c
  for c in "${CURL_PIDS[@]}"; do wait "$c" || true; done
}

curls_ok() { # N PREFIX BYTES: how many of the N got 200 and BYTES bytes
  local i ok=0
  for i in $(seq "$1"); do
    [[ $(cat "$2-$i.txt") == "200 $3" ]] && ok=$((ok + 1))
  done
  echo "$ok"
}

# blob_once SERVER RUN: one checked GET of blob_layout's blob; records
# blob_Bps.
blob_once() { # SERVER RUN
  local speed
  get_checked "$1: blob run $2" "$(blob_url "$1")" speed_download "$BLOB_BYTES" || return 0
  speed=$GOT
  record blob_Bps "$1" "$2" "$speed"
  log "blob  run $2 $(printf '%-8s' "$1") $(awk -v s="$speed" 'BEGIN { printf "%7.0f MiB/s", s/1048576 }')"
}

wrk_lua() { # ACCEPT: $OUT/manifest.lua, a wrk script sending that Accept
  cat >"$OUT/manifest.lua" <<EOF
wrk.method = "GET"
wrk.headers["Accept"] = "$1"
EOF
}

wrk_rps() { awk '/^Requests\/sec:/ { print $2 }' "$1"; }                 # FILE
wrk_non2xx() { awk '/Non-2xx or 3xx responses:/ { print $NF }' "$1"; } # FILE
wrk_ms() { # FILE PERCENTILE (50%, 99%, ...) -> latency in ms
  awk -v p="$2" '$1 == p { v = $2; if (v ~ /us$/) v = v / 1000; else if (v ~ /ms$/) v = v + 0; else if (v ~ /s$/) v = v * 1000; print v }' "$1"
}

# wrk_once SERVER RUN: wrk on manifest_url with $OUT/manifest.lua (see
# wrk_lua) and WRK_HEADER[SERVER] for $WRK_DURATION; records wrk_rps and
# wrk_p99_ms, and an error for non-2xx answers or socket errors.
wrk_once() { # SERVER RUN
  local f=$OUT/wrk-$1-$2.txt rps non2xx sockerr
  local -a hdr=()
  [[ -z ${WRK_HEADER[$1]-} ]] || hdr=(-H "${WRK_HEADER[$1]}")
  wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" --latency -s "$OUT/manifest.lua" "${hdr[@]}" \
    "$(manifest_url "$1")" >"$f" 2>&1 || { err "$1: wrk failed (run $2), see $f"; return 0; }
  rps=$(wrk_rps "$f")
  non2xx=$(wrk_non2xx "$f")
  sockerr=$(grep -c '^  Socket errors:' "$f" || true)
  [[ -n $rps ]] || { err "$1: no Requests/sec in $f"; return 0; }
  [[ -z $non2xx ]] || err "$1: wrk run $2 saw $non2xx non-2xx/3xx responses"
  [[ $sockerr == 0 ]] || err "$1: wrk run $2 saw socket errors: $(grep 'Socket errors' "$f")"
  record wrk_rps "$1" "$2" "$rps"
  record wrk_p99_ms "$1" "$2" "$(wrk_ms "$f" 99%)"
  log "wrk   run $2 $(printf '%-8s' "$1") $rps req/s"
}

wrk_warmup() { # SERVER...: 2 s of wrk each, discarded
  local s
  local -a hdr
  for s in "$@"; do
    hdr=()
    [[ -z ${WRK_HEADER[$s]-} ]] || hdr=(-H "${WRK_HEADER[$s]}")
    wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d2s -s "$OUT/manifest.lua" "${hdr[@]}" "$(manifest_url "$s")" >/dev/null 2>&1 \
      || err "$s: wrk warm-up failed"
  done
}

# wrk_check SERVER WANT UNWANTED: 2 s of wrk on manifest_url, with
# $OUT/manifest.lua's requests and WRK_HEADER[SERVER], that checks every
# answer: 200, with WANT in the body and not UNWANTED. An error otherwise.
# A warm-up that also shows what the measured requests get.
wrk_check() {
  local lua=$OUT/check-$1.lua f=$OUT/wrk-check-$1.txt line
  local -a hdr=()
  [[ -z ${WRK_HEADER[$1]-} ]] || hdr=(-H "${WRK_HEADER[$1]}")
  {
    cat "$OUT/manifest.lua"
    cat <<EOF
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0; total = 0 end
function response(status, headers, body)
  total = total + 1
  if status ~= 200 or not body:find("$2", 1, true) or body:find("$3", 1, true) then bad = bad + 1 end
end
function done(summary, latency, requests)
  local b, t = 0, 0
  for _, th in ipairs(threads) do b = b + th:get("bad"); t = t + th:get("total") end
  io.write(string.format("checked: %d wrong of %d\n", b, t))
end
EOF
  } >"$lua"
  wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d2s -s "$lua" "${hdr[@]}" "$(manifest_url "$1")" >"$f" 2>&1 \
    || { err "$1: wrk check failed, see $f"; return 0; }
  line=$(grep '^checked: ' "$f" || true)
  if [[ $line =~ ^checked:\ 0\ wrong\ of\ [1-9] ]]; then
    log "wrk   $1: every answer has $2, none $3 (${line#checked: 0 wrong of } requests)"
  else
    err "$1: wrk got answers without $2 or with $3 (${line:-no count}; see $f)"
  fi
}

# --------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------
# in_turn RUN "A B ...": the list as it is on odd runs, reversed on even
# ones, so that which one goes first alternates.
in_turn() {
  local i
  local -a words rev=()
  read -ra words <<<"$2"
  if (($1 % 2)); then
    echo "${words[*]}"
  else
    for ((i = ${#words[@]} - 1; i >= 0; i--)); do rev+=("${words[i]}"); done
    echo "${rev[*]}"
  fi
}

# values METRIC [VARIANT]: the values recorded for METRIC (and VARIANT, the
# second field) in $RAW.
values() { awk -F'\t' -v m="$1" -v v="${2-}" '$1 == m && (v == "" || $2 == v) { print $NF }' "$RAW"; }
quantile() { # Q, values on stdin (nearest rank)
  sort -g | awk -v q="$1" '{ a[NR] = $1 } END { if (NR == 0) { print "nan"; exit } i = int(q * NR + 0.999999); if (i < 1) i = 1; if (i > NR) i = NR; print a[i] }'
}
median() { # values on stdin; mean of the middle two for an even count
  sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
med() { values "$@" | median; } # METRIC [VARIANT]
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "nan" }'; } # A B -> A/B
pass_if() { awk -v a="$1" -v b="$3" "BEGIN { print (a + 0 $2 b + 0) ? \"PASS\" : \"FAIL\" }"; } # A OP B

# summary_py ARG...: runs the Python program on stdin with ARG... after a
# prelude: vals[(metric, server)] from $RAW-style rows in argv[1] (md_path is
# argv[2], the rest in args), med(), ratio(), rfmt(), verdict(), and
# print_table() (also written as Markdown to md_path) and print_per_run().
summary_py() {
  {
    cat <<'EOF'
import collections, statistics, sys
raw, md_path, args = sys.argv[1], sys.argv[2], sys.argv[3:]
vals = collections.defaultdict(list)
for line in open(raw):
    metric, server, run, value = line.rstrip("\n").split("\t")
    if value:
        vals[(metric, server)].append(float(value))
MiB = 1048576

def med(metric, server):
    v = vals.get((metric, server))
    return statistics.median(v) if v else None

def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b

def rfmt(q):
    return "n/a" if q is None else f"{q:.2f}x"

def verdict(ok):
    return ok if ok == "" else "n/a" if ok is None else ("PASS" if ok else "FAIL")

def print_table(hdr, rows):
    widths = [max(len(r[i]) for r in rows + [hdr]) for i in range(len(hdr))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print()
    print(line(hdr))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    with open(md_path, "w") as f:
        f.write("| " + " | ".join(hdr) + " |\n")
        f.write("|" + "|".join("---" if i == 0 else "---:" for i in range(len(hdr))) + "|\n")
        for r in rows:
            f.write("| " + " | ".join(r) + " |\n")

def print_per_run(metric_width, server_width, min_runs=1):
    print("\nper-run values:")
    for (metric, server), v in sorted(vals.items()):
        if len(v) >= min_runs:
            print(f"  {metric:<{metric_width}} {server:<{server_width}} " + " ".join(f"{x:.6g}" for x in v))
EOF
    cat
  } | python3 - "$@"
}

# bench_finish: where the results are, the errors if any; exits 1 if there
# were errors, else 0.
bench_finish() {
  echo
  echo "results: $OUT"
  if ((${#ERRORS[@]})); then
    echo "ERRORS (${#ERRORS[@]}):"
    printf '  %s\n' "${ERRORS[@]}"
    exit 1
  fi
  exit 0
}

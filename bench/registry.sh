#!/usr/bin/env bash
# bench/registry.sh: issue #2 speed targets, nixery-local vs docker-registry
# (CNCF distribution) serving the same 1 GiB blob and OCI manifest on loopback.
#
#   1. blob throughput: curl -o /dev/null, %{speed_download}; median of $RUNS
#      alternating runs.                  Target: nixery/registry >= 1.0
#   2. manifest GET/s: wrk with the OCI manifest Accept header; median of
#      $WRK_RUNS alternating runs.        Target: nixery/registry >= 2.0
#   3. memory: VmRSS sampled, VmHWM at the end (peak reset with clear_refs=5
#      before the phase) while $RSS_CLIENTS curls stream the blob at once.
#                                          Target: nixery-local VmHWM < 64 MiB
#
# Prints a summary table with PASS/FAIL. Exit status is 0 whether or not the
# targets are met (this is a report), non-zero if something failed to run
# (server did not start, wrong bytes served, non-2xx responses, ...).
#
# Everything is cached in $BENCH_DIR (default /tmp/nixery-bench): the OCI
# layout with the 1 GiB layer (deterministic AES-CTR keystream) and the
# docker-registry storage are built once; nixery-local's state dir is
# re-imported on every run. Raw numbers and server logs are kept under
# $BENCH_DIR/results/<timestamp>/.
#
# Knobs (environment variables):
#   BENCH_DIR=/tmp/nixery-bench  BLOB_MIB=1024  RUNS=5
#   WRK_RUNS=3  WRK_THREADS=2  WRK_CONNS=32  WRK_DURATION=10s
#   RSS_CLIENTS=16  RSS_INTERVAL=0.1
#   REGISTRY_CACHE=inmemory  (docker-registry blobdescriptor cache: inmemory|none)
#   NIXERY_BIN=path          (default: cargo build --release, target/release/nixery-local)
#   BUILD=1                  (0: do not run cargo build)
#   SERVERS="nixery registry" (SERVERS=registry benchmarks docker-registry alone)
#   STRACE=0                 (1: also run strace -c -f on each server during one
#                             blob download and one wrk run; saved in results dir)
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/tmp/nixery-bench}
BLOB_MIB=${BLOB_MIB:-1024}
RUNS=${RUNS:-5}
WRK_RUNS=${WRK_RUNS:-3}
WRK_THREADS=${WRK_THREADS:-2}
WRK_CONNS=${WRK_CONNS:-32}
WRK_DURATION=${WRK_DURATION:-10s}
RSS_CLIENTS=${RSS_CLIENTS:-16}
RSS_INTERVAL=${RSS_INTERVAL:-0.1}
REGISTRY_CACHE=${REGISTRY_CACHE:-inmemory}
BUILD=${BUILD:-1}
SERVERS=${SERVERS:-nixery registry}
STRACE=${STRACE:-0}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NIXERY_BIN=${NIXERY_BIN:-$REPO_ROOT/target/release/nixery-local}

REPO_NAME=bench/blob
TAG=1
NIXERY_REF=docker.io/$REPO_NAME:$TAG
MANIFEST_TYPE=application/vnd.oci.image.manifest.v1+json
LAYER_TYPE=application/vnd.oci.image.layer.v1.tar
CONFIG_TYPE=application/vnd.oci.image.config.v1+json
BLOB_BYTES=$((BLOB_MIB * 1024 * 1024))

RUN_ID=$(date +%Y%m%dT%H%M%S)
OUT=$BENCH_DIR/results/$RUN_ID
RAW=$OUT/raw.tsv
mkdir -p "$OUT"
: >"$RAW"

ERRORS=()
CHILDREN=()

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
err() { log "ERROR: $*"; ERRORS+=("$*"); }
has() { [[ " $SERVERS " == *" $1 "* ]]; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW"; } # metric server run value

# shellcheck disable=SC2317  # invoked via trap
cleanup() {
  local rc=$? pid
  # Servers, plus any still-running background curls/strace of this shell.
  for pid in "${CHILDREN[@]}" $(jobs -p); do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${CHILDREN[@]}" $(jobs -p); do
    wait "$pid" 2>/dev/null || true
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

status_kib() { # PID FIELD -> value in kB from /proc/PID/status
  awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

for tool in curl wrk skopeo python3 sha256sum openssl docker-registry; do
  command -v "$tool" >/dev/null || die "missing tool: $tool"
done
[[ $SERVERS =~ ^(nixery|registry)( (nixery|registry))?$ ]] || die "bad SERVERS=$SERVERS"

# --------------------------------------------------------------------------
# Machine info
# --------------------------------------------------------------------------
GIT_REV=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo none)
if [[ $GIT_REV != none && -n $(git -C "$REPO_ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
  GIT_REV="$GIT_REV+dirty"
fi
{
  echo "date:            $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git:             $GIT_REV"
  echo "cpu:             $(nproc) x $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
  echo "memory:          $(awk '/^MemTotal/ { printf "%.1f GiB", $2/1048576 }' /proc/meminfo)"
  echo "kernel:          $(uname -sr)"
  echo "loadavg (start): $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "docker-registry: $(docker-registry --version 2>&1 | head -1)"
  echo "curl:            $(curl --version | head -1 | cut -d' ' -f1-2)"
  echo "wrk:             $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2 || true)"
  echo "skopeo:          $(skopeo --version)"
  echo "rustc:           $(rustc --version 2>/dev/null || echo n/a)"
  echo "params:          blob=${BLOB_MIB}MiB runs=$RUNS wrk=${WRK_RUNS}x(-t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION) rss_clients=$RSS_CLIENTS registry_cache=$REGISTRY_CACHE"
} | tee "$OUT/machine.txt" >&2

# --------------------------------------------------------------------------
# Build nixery-local
# --------------------------------------------------------------------------
if has nixery && [[ $BUILD == 1 ]]; then
  log "cargo build --release"
  (cd "$REPO_ROOT" && cargo build --release --bin nixery-local) >"$OUT/cargo-build.log" 2>&1 \
    || die "cargo build --release failed; see $OUT/cargo-build.log"
fi
if has nixery; then
  [[ -x $NIXERY_BIN ]] || die "no nixery-local binary at $NIXERY_BIN"
  echo "nixery-local:    $("$NIXERY_BIN" --version 2>/dev/null || echo "$NIXERY_BIN")" | tee -a "$OUT/machine.txt" >&2
fi

# --------------------------------------------------------------------------
# OCI layout with one ${BLOB_MIB} MiB layer (cached)
# --------------------------------------------------------------------------
LAYOUT=$BENCH_DIR/layout-${BLOB_MIB}m
if [[ ! -f $LAYOUT/.complete ]]; then
  log "building OCI layout in $LAYOUT (${BLOB_MIB} MiB layer)"
  rm -rf "$LAYOUT"
  mkdir -p "$LAYOUT/blobs/sha256"
  # Deterministic incompressible bytes: AES-128-CTR keystream over zeros.
  head -c "$BLOB_BYTES" /dev/zero \
    | openssl enc -aes-128-ctr -nosalt -K 6e69786572792d6c6f63616c2d62656e -iv 00000000000000000000000000000000 \
      >"$LAYOUT/layer.tmp"
  [[ $(stat -c %s "$LAYOUT/layer.tmp") == "$BLOB_BYTES" ]] || die "layer has wrong size"
  layer_hex=$(sha256sum "$LAYOUT/layer.tmp" | cut -d' ' -f1)
  mv "$LAYOUT/layer.tmp" "$LAYOUT/blobs/sha256/$layer_hex"
  python3 - "$LAYOUT" "$layer_hex" "$BLOB_BYTES" "$MANIFEST_TYPE" "$LAYER_TYPE" "$CONFIG_TYPE" "$TAG" <<'EOF'
import hashlib, json, os, sys
layout, layer_hex, size, mtype, ltype, ctype, tag = sys.argv[1:]
def put(obj):
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    hexd = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", hexd), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + hexd, "size": len(data)}
config = put({
    "architecture": "amd64", "os": "linux", "config": {},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + layer_hex]},
    "history": [{"created_by": "nixery-local bench/registry.sh"}],
})
manifest = put({
    "schemaVersion": 2, "mediaType": mtype,
    "config": dict(mediaType=ctype, **config),
    "layers": [{"mediaType": ltype, "digest": "sha256:" + layer_hex, "size": int(size)}],
})
index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": [dict(mediaType=mtype, annotations={"org.opencontainers.image.ref.name": tag}, **manifest)]}
with open(os.path.join(layout, "index.json"), "w") as f:
    json.dump(index, f, indent=2)
with open(os.path.join(layout, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
EOF
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
log "layer $LAYER_DIGEST, manifest $MANIFEST_DIGEST ($MANIFEST_SIZE bytes)"

declare -A BASE PID

# --------------------------------------------------------------------------
# docker-registry
# --------------------------------------------------------------------------
start_registry() {
  local port cache_yaml=""
  port=$(free_port)
  [[ $REGISTRY_CACHE == none ]] || cache_yaml="  cache:
    blobdescriptor: $REGISTRY_CACHE"
  mkdir -p "$BENCH_DIR/registry-storage"
  cat >"$OUT/registry-config.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $BENCH_DIR/registry-storage
  delete:
    enabled: false
  redirect:
    disable: true
  maintenance:
    uploadpurging:
      enabled: false
$cache_yaml
http:
  addr: 127.0.0.1:$port
EOF
  log "starting docker-registry on 127.0.0.1:$port"
  docker-registry serve "$OUT/registry-config.yml" >"$OUT/registry.log" 2>&1 &
  PID[registry]=$!
  CHILDREN+=("${PID[registry]}")
  BASE[registry]=http://127.0.0.1:$port
  local i
  for i in $(seq 100); do
    if curl -fsS -o /dev/null "${BASE[registry]}/v2/" 2>/dev/null; then break; fi
    kill -0 "${PID[registry]}" 2>/dev/null || die "docker-registry exited; see $OUT/registry.log"
    sleep 0.1
  done
  curl -fsS -o /dev/null "${BASE[registry]}/v2/" || die "docker-registry not ready"
  log "pushing layout to docker-registry (skopeo; skips blobs already present)"
  skopeo copy --quiet --preserve-digests --dest-tls-verify=false \
    "oci:$LAYOUT:$TAG" "docker://127.0.0.1:$port/$REPO_NAME:$TAG" >"$OUT/skopeo.log" 2>&1 \
    || die "skopeo copy failed; see $OUT/skopeo.log"
}

# --------------------------------------------------------------------------
# nixery-local
# --------------------------------------------------------------------------
start_nixery() {
  local state=$BENCH_DIR/nixery-state out i line
  rm -rf "$state"
  mkdir -p "$state"
  log "nixery-local import $NIXERY_REF"
  out=$("$NIXERY_BIN" import --state-dir "$state" "$LAYOUT" "$NIXERY_REF" 2>"$OUT/nixery-import.log") \
    || die "nixery-local import failed; see $OUT/nixery-import.log"
  echo "$out" >>"$OUT/nixery-import.log"
  log "  $out"
  [[ $out == *"$MANIFEST_DIGEST"* ]] || err "nixery-local import printed '$out', expected manifest $MANIFEST_DIGEST"
  "$NIXERY_BIN" serve --listen 127.0.0.1:0 --state-dir "$state" >"$OUT/nixery.stdout" 2>"$OUT/nixery.log" &
  PID[nixery]=$!
  CHILDREN+=("${PID[nixery]}")
  for i in $(seq 300); do
    line=$(grep -m1 -o 'listening on http://[0-9.:]*' "$OUT/nixery.stdout" 2>/dev/null || true)
    [[ -n $line ]] && break
    kill -0 "${PID[nixery]}" 2>/dev/null || die "nixery-local serve exited; see $OUT/nixery.log"
    sleep 0.1
  done
  [[ -n $line ]] || die "nixery-local did not print its listen address within 30s"
  BASE[nixery]=${line#listening on }
  log "nixery-local serving on ${BASE[nixery]} (pid ${PID[nixery]})"
}

has registry && start_registry
has nixery && start_nixery

blob_url() { echo "${BASE[$1]}/v2/$REPO_NAME/blobs/$LAYER_DIGEST"; }
manifest_url() { echo "${BASE[$1]}/v2/$REPO_NAME/manifests/$TAG"; }

# --------------------------------------------------------------------------
# Correctness checks (and page-cache warm-up)
# --------------------------------------------------------------------------
for s in $SERVERS; do
  got=$(curl -fsS -H "Accept: $MANIFEST_TYPE" "$(manifest_url "$s")" | sha256sum | cut -d' ' -f1) \
    || die "$s: manifest GET failed"
  [[ sha256:$got == "$MANIFEST_DIGEST" ]] || die "$s: manifest digest sha256:$got != $MANIFEST_DIGEST"
  ctype=$(curl -fsS -o /dev/null -w '%{content_type}' -H "Accept: $MANIFEST_TYPE" "$(manifest_url "$s")")
  log "$s: manifest OK ($ctype)"
  got=$(curl -fsS "$(blob_url "$s")" | sha256sum | cut -d' ' -f1) || die "$s: blob GET failed"
  [[ sha256:$got == "$LAYER_DIGEST" ]] || die "$s: blob digest sha256:$got != $LAYER_DIGEST"
  log "$s: blob OK (warm)"
done

# --------------------------------------------------------------------------
# 1. Blob throughput, alternating
# --------------------------------------------------------------------------
ORDER_A=$SERVERS
ORDER_B=$(echo "$SERVERS" | awk '{ for (i = NF; i > 0; i--) printf "%s%s", $i, (i > 1 ? " " : "") }')

blob_once() { # SERVER RUN
  local r code size speed
  r=$(curl -sS -o /dev/null -w '%{http_code} %{size_download} %{speed_download}' "$(blob_url "$1")") \
    || { err "$1: blob download failed (run $2)"; return 0; }
  read -r code size speed <<<"$r"
  if [[ $code != 200 || $size != "$BLOB_BYTES" ]]; then
    err "$1: blob run $2 got HTTP $code, $size bytes"
    return 0
  fi
  record blob_Bps "$1" "$2" "$speed"
  log "blob  run $2 $(printf '%-8s' "$1") $(awk -v s="$speed" 'BEGIN { printf "%7.0f MiB/s", s/1048576 }')"
}

for run in $(seq "$RUNS"); do
  if ((run % 2)); then order=$ORDER_A; else order=$ORDER_B; fi
  for s in $order; do blob_once "$s" "$run"; done
done

# --------------------------------------------------------------------------
# 2. Manifest GET/s with wrk, alternating
# --------------------------------------------------------------------------
cat >"$OUT/manifest.lua" <<EOF
wrk.method = "GET"
wrk.headers["Accept"] = "$MANIFEST_TYPE"
EOF

wrk_once() { # SERVER RUN
  local f=$OUT/wrk-$1-$2.txt rps non2xx sockerr
  wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" --latency -s "$OUT/manifest.lua" \
    "$(manifest_url "$1")" >"$f" 2>&1 || { err "$1: wrk failed (run $2), see $f"; return 0; }
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$f")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$f")
  sockerr=$(grep -c '^  Socket errors:' "$f" || true)
  [[ -n $rps ]] || { err "$1: no Requests/sec in $f"; return 0; }
  [[ -z $non2xx ]] || err "$1: wrk run $2 saw $non2xx non-2xx/3xx responses"
  [[ $sockerr == 0 ]] || err "$1: wrk run $2 saw socket errors: $(grep 'Socket errors' "$f")"
  record wrk_rps "$1" "$2" "$rps"
  record wrk_p99_ms "$1" "$2" "$(awk '$1 == "99%" { v = $2; if (v ~ /us$/) v = v / 1000; else if (v ~ /ms$/) v = v + 0; else if (v ~ /s$/) v = v * 1000; print v }' "$f")"
  log "wrk   run $2 $(printf '%-8s' "$1") $rps req/s"
}

for s in $SERVERS; do # short warm-up, discarded
  wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d2s -s "$OUT/manifest.lua" "$(manifest_url "$s")" >/dev/null 2>&1 \
    || err "$s: wrk warm-up failed"
done
for run in $(seq "$WRK_RUNS"); do
  if ((run % 2)); then order=$ORDER_A; else order=$ORDER_B; fi
  for s in $order; do wrk_once "$s" "$run"; done
done

# --------------------------------------------------------------------------
# 3. Memory while $RSS_CLIENTS clients stream the blob at once
# --------------------------------------------------------------------------
rss_phase() { # SERVER
  local s=$1 pid=${PID[$1]} samples=$OUT/rss-$1.tsv i t0 t1 c alive ok=0
  local -a cpids=()
  record hwm_lifetime_kib "$s" 0 "$(status_kib "$pid" VmHWM)"
  echo 5 >"/proc/$pid/clear_refs" || err "$s: cannot reset VmHWM (clear_refs)"
  printf 'VmRSS\tRssAnon\tRssFile\tThreads\n' >"$samples"
  t0=$(date +%s.%N)
  for i in $(seq "$RSS_CLIENTS"); do
    curl -sS -o /dev/null -w '%{http_code} %{size_download}\n' "$(blob_url "$s")" >"$OUT/rss-$s-client-$i.txt" 2>&1 &
    cpids+=($!)
  done
  while :; do
    awk '$1 == "VmRSS:" { r = $2 } $1 == "RssAnon:" { a = $2 } $1 == "RssFile:" { f = $2 }
         $1 == "Threads:" { t = $2 } END { printf "%s\t%s\t%s\t%s\n", r, a, f, t }' "/proc/$pid/status" >>"$samples" \
      || die "$s (pid $pid) died during the memory phase"
    alive=0
    for c in "${cpids[@]}"; do kill -0 "$c" 2>/dev/null && alive=1 && break; done
    ((alive)) || break
    sleep "$RSS_INTERVAL"
  done
  for c in "${cpids[@]}"; do wait "$c" || true; done
  t1=$(date +%s.%N)
  for i in $(seq "$RSS_CLIENTS"); do
    [[ $(cat "$OUT/rss-$s-client-$i.txt") == "200 $BLOB_BYTES" ]] && ok=$((ok + 1))
  done
  ((ok == RSS_CLIENTS)) || err "$s: only $ok/$RSS_CLIENTS concurrent downloads completed (see $OUT/rss-$s-client-*.txt)"
  local rss_max hwm
  rss_max=$(awk 'NR > 1 && $1 > m { m = $1 } END { print m + 0 }' "$samples")
  hwm=$(status_kib "$pid" VmHWM)
  record hwm_kib "$s" 0 "$hwm"
  record rss_max_kib "$s" 0 "$rss_max"
  # VmHWM is only folded in lazily by the kernel, so it can read a little
  # below a VmRSS sample; the target applies to the larger of the two.
  record peak_kib "$s" 0 "$((hwm > rss_max ? hwm : rss_max))"
  record rss_anon_max_kib "$s" 0 "$(awk 'NR > 1 && $2 > m { m = $2 } END { print m + 0 }' "$samples")"
  record rss_median_kib "$s" 0 "$(tail -n +2 "$samples" | cut -f1 | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')"
  record threads_max "$s" 0 "$(awk 'NR > 1 && $4 > m { m = $4 } END { print m + 0 }' "$samples")"
  record concurrent_Bps "$s" 0 "$(awk -v n="$RSS_CLIENTS" -v b="$BLOB_BYTES" -v t0="$t0" -v t1="$t1" 'BEGIN { print n * b / (t1 - t0) }')"
  log "rss   $(printf '%-8s' "$s") VmHWM $hwm kB, VmRSS max $rss_max kB over $(($(wc -l <"$samples") - 1)) samples, $ok/$RSS_CLIENTS clients OK"
}

for s in $SERVERS; do rss_phase "$s"; done

# --------------------------------------------------------------------------
# Optional: syscall mix per server (not part of the numbers above)
# --------------------------------------------------------------------------
if [[ $STRACE == 1 ]]; then
  command -v strace >/dev/null || die "STRACE=1 but strace is not installed"
  for s in $SERVERS; do
    strace -c -f -p "${PID[$s]}" -o "$OUT/strace-$s-blob.txt" & sp=$!
    sleep 1
    curl -sS -o /dev/null "$(blob_url "$s")"
    kill -INT "$sp"; wait "$sp" || true
    strace -c -f -p "${PID[$s]}" -o "$OUT/strace-$s-manifest.txt" & sp=$!
    sleep 1
    wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d5s -s "$OUT/manifest.lua" "$(manifest_url "$s")" >/dev/null 2>&1 || true
    kill -INT "$sp"; wait "$sp" || true
    log "strace summaries: $OUT/strace-$s-{blob,manifest}.txt"
  done
fi

echo "loadavg (end):   $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt" >&2

# --------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------
python3 - "$RAW" "$OUT/summary.md" "$RSS_CLIENTS" <<'EOF'
import collections, statistics, sys
raw, md_path, clients = sys.argv[1:]
vals = collections.defaultdict(list)
for line in open(raw):
    metric, server, run, value = line.rstrip("\n").split("\t")
    if value:
        vals[(metric, server)].append(float(value))

def med(metric, server):
    v = vals.get((metric, server))
    return statistics.median(v) if v else None

def fmt(v, scale, unit, prec=0):
    return "n/a" if v is None else f"{v / scale:,.{prec}f} {unit}".rstrip()

def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b

def verdict(ok):
    return ok if ok == "" else "n/a" if ok is None else ("PASS" if ok else "FAIL")

MiB = 1048576
rows = []
def row(name, metric, scale, unit, prec=0, target=None, kind="ratio"):
    n, r = med(metric, "nixery"), med(metric, "registry")
    q = ratio(n, r)
    if target is None:
        ok = ""
    elif kind == "ratio":
        ok = None if q is None else q >= target
    else:  # absolute upper bound on nixery's value
        ok = None if n is None else n < target
    tgt = "" if target is None else (f">= {target:.1f}x" if kind == "ratio" else f"< {target / scale:.0f} {unit}")
    rows.append((name, fmt(n, scale, unit, prec), fmt(r, scale, unit, prec),
                 "n/a" if q is None else f"{q:.2f}x", tgt, verdict(ok)))

row("blob GET throughput (median)", "blob_Bps", MiB, "MiB/s", target=1.0)
row("manifest GET/s (median, wrk)", "wrk_rps", 1, "req/s", target=2.0)
row("manifest p99 latency (median)", "wrk_p99_ms", 1, "ms", prec=2)
row(f"peak RSS, {clients} concurrent blob GETs", "peak_kib", 1024, "MiB", prec=1, target=64 * 1024, kind="max")
row("  VmHWM at end of phase", "hwm_kib", 1024, "MiB", prec=1)
row("  VmRSS max sampled", "rss_max_kib", 1024, "MiB", prec=1)
row("  VmRSS median sampled", "rss_median_kib", 1024, "MiB", prec=1)
row("  RssAnon max sampled", "rss_anon_max_kib", 1024, "MiB", prec=1)
row("  threads max", "threads_max", 1, "")
row("  aggregate throughput", "concurrent_Bps", MiB, "MiB/s")
row("VmHWM lifetime (before phase 3)", "hwm_lifetime_kib", 1024, "MiB", prec=1)

hdr = ("metric", "nixery-local", "docker-registry", "nixery/registry", "target", "result")
widths = [max(len(r[i]) for r in rows + [hdr]) for i in range(len(hdr))]
line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
print()
print(line(hdr))
print("  ".join("-" * w for w in widths))
for r in rows:
    print(line(r))

print("\nper-run values:")
for (metric, server), v in sorted(vals.items()):
    if len(v) > 1:
        print(f"  {metric:<12} {server:<9} " + " ".join(f"{x:.6g}" for x in v))

with open(md_path, "w") as f:
    f.write("| " + " | ".join(hdr) + " |\n")
    f.write("|" + "|".join("---" if i == 0 else "---:" for i in range(len(hdr))) + "|\n")
    for r in rows:
        f.write("| " + " | ".join(r) + " |\n")
EOF

echo
echo "results: $OUT"
if ((${#ERRORS[@]})); then
  echo "ERRORS (${#ERRORS[@]}):"
  printf '  %s\n' "${ERRORS[@]}"
  exit 1
fi
exit 0

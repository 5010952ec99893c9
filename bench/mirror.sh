#!/usr/bin/env bash
# bench/mirror.sh: issue #4 speed targets for the pull-through mirror.
#
# One upstream docker-registry (CNCF distribution) on loopback holds an image
# with a 1 GiB layer (the same deterministic layout as bench/registry.sh).
# The same blob is pulled with curl from three places, in the same run:
#   direct  straight from the upstream registry
#   nixery  through nixery-local (--upstream pointing at the upstream)
#   proxy   through docker-registry's own pull-through mode (proxy.remoteurl)
#
#   1. cold pull, 1 client: every run starts nixery-local / the proxy on an
#      empty state dir; median of $RUNS alternating runs.
#                                   Target: nixery/direct <= 1.10
#   2. upstream GETs of the blob per cold pull (from the upstream's own
#      access log).                 Target: nixery = 1
#   3. warm pull, 1 client (blob already cached); median of $RUNS.
#                                   Target: nixery faster than proxy
#   4. $CLIENTS concurrent cold pulls: wall time until every client is done,
#      and upstream GETs.           Targets: nixery GETs = 1,
#                                   nixery wall / nixery single cold <= 1.3
#
# UPSTREAM_MIBPS=N puts a relay in front of the upstream that paces every
# upstream connection to N MiB/s (a network-like upstream; the daemon, the
# proxy and the direct pulls all go through it). The default, 0, is raw
# loopback, where the upstream is as fast as the daemon's own disk.
#
# Prints a summary table with PASS/FAIL; exit status 0 whether or not the
# targets are met, non-zero if something failed to run (wrong bytes, non-200,
# a server that did not start, ...). Raw numbers and logs go to
# $BENCH_DIR/results/mirror-<timestamp>/.
#
# Knobs (environment variables):
#   BENCH_DIR=/tmp/nixery-bench  BLOB_MIB=1024  RUNS=3  CLIENTS=32
#   UPSTREAM_MIBPS=0             (0: no relay; N: pace each upstream connection)
#   NIXERY_BIN=path              (default: cargo build --release, target/release/nixery-local)
#   BUILD=1                      (0: do not run cargo build)
#   PROXY=1                      (0: skip docker-registry's proxy mode)
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/tmp/nixery-bench}
BLOB_MIB=${BLOB_MIB:-1024}
RUNS=${RUNS:-3}
CLIENTS=${CLIENTS:-32}
UPSTREAM_MIBPS=${UPSTREAM_MIBPS:-0}
BUILD=${BUILD:-1}
PROXY=${PROXY:-1}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NIXERY_BIN=${NIXERY_BIN:-$REPO_ROOT/target/release/nixery-local}

REPO_NAME=bench/blob
TAG=1
MANIFEST_TYPE=application/vnd.oci.image.manifest.v1+json
LAYER_TYPE=application/vnd.oci.image.layer.v1.tar
CONFIG_TYPE=application/vnd.oci.image.config.v1+json
BLOB_BYTES=$((BLOB_MIB * 1024 * 1024))

RUN_ID=$(date +%Y%m%dT%H%M%S)
OUT=$BENCH_DIR/results/mirror-$RUN_ID
RAW=$OUT/raw.tsv
mkdir -p "$OUT"
: >"$RAW"

SERVERS="direct nixery"
[[ $PROXY == 1 ]] && SERVERS="$SERVERS proxy"

ERRORS=()
CHILDREN=()
declare -A BASE PID STATE

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
err() { log "ERROR: $*"; ERRORS+=("$*"); }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW"; } # metric server run value

# shellcheck disable=SC2317  # invoked via trap
cleanup() {
  local rc=$? pid
  for pid in "${CHILDREN[@]}" $(jobs -p); do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${CHILDREN[@]}" $(jobs -p); do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$BENCH_DIR/mirror-nixery-state" "$BENCH_DIR/mirror-proxy-storage"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_http() { # URL PID WHAT
  local i
  for i in $(seq 150); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    kill -0 "$2" 2>/dev/null || die "$3 exited; see $OUT"
    sleep 0.1
  done
  die "$3 not ready at $1"
}

for tool in curl skopeo python3 sha256sum openssl docker-registry; do
  command -v "$tool" >/dev/null || die "missing tool: $tool"
done
if ((UPSTREAM_MIBPS > 0)); then command -v rustc >/dev/null || die "UPSTREAM_MIBPS needs rustc"; fi

# --------------------------------------------------------------------------
# Machine info and build
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
  echo "params:          blob=${BLOB_MIB}MiB runs=$RUNS clients=$CLIENTS upstream_mibps=$UPSTREAM_MIBPS servers='$SERVERS'"
} | tee "$OUT/machine.txt" >&2

if [[ $BUILD == 1 ]]; then
  log "cargo build --release"
  (cd "$REPO_ROOT" && cargo build --release --bin nixery-local) >"$OUT/cargo-build.log" 2>&1 \
    || die "cargo build --release failed; see $OUT/cargo-build.log"
fi
[[ -x $NIXERY_BIN ]] || die "no nixery-local binary at $NIXERY_BIN"

# --------------------------------------------------------------------------
# OCI layout with one ${BLOB_MIB} MiB layer (cached; shared with registry.sh)
# --------------------------------------------------------------------------
LAYOUT=$BENCH_DIR/layout-${BLOB_MIB}m
if [[ ! -f $LAYOUT/.complete ]]; then
  log "building OCI layout in $LAYOUT (${BLOB_MIB} MiB layer)"
  rm -rf "$LAYOUT"
  mkdir -p "$LAYOUT/blobs/sha256"
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
read -r LAYER_DIGEST MANIFEST_DIGEST < <(python3 - "$LAYOUT" <<'EOF'
import json, sys
layout = sys.argv[1]
desc = json.load(open(layout + "/index.json"))["manifests"][0]
m = json.load(open(layout + "/blobs/sha256/" + desc["digest"].split(":")[1]))
print(m["layers"][0]["digest"], desc["digest"])
EOF
)
LAYER_HEX=${LAYER_DIGEST#sha256:}
log "layer $LAYER_DIGEST, manifest $MANIFEST_DIGEST"

# --------------------------------------------------------------------------
# The upstream registry (access log on: it is how upstream GETs are counted)
# --------------------------------------------------------------------------
UP_PORT=$(free_port)
UP_HOST=127.0.0.1:$UP_PORT
UP_LOG=$OUT/upstream-access.log
mkdir -p "$BENCH_DIR/mirror-upstream-storage"
cat >"$OUT/upstream.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $BENCH_DIR/mirror-upstream-storage
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: false
  redirect:
    disable: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $UP_HOST
EOF
log "starting upstream docker-registry on $UP_HOST"
docker-registry serve "$OUT/upstream.yml" >"$UP_LOG" 2>"$OUT/upstream.log" &
PID[upstream]=$!
CHILDREN+=("${PID[upstream]}")
wait_http "http://$UP_HOST/v2/" "${PID[upstream]}" "upstream docker-registry"
log "pushing layout to the upstream (skopeo; skips blobs already present)"
skopeo copy --quiet --preserve-digests --dest-tls-verify=false \
  "oci:$LAYOUT:$TAG" "docker://$UP_HOST/$REPO_NAME:$TAG" >"$OUT/skopeo.log" 2>&1 \
  || die "skopeo copy failed; see $OUT/skopeo.log"

# The URL everybody uses to reach the upstream: the registry, or the relay.
UPSTREAM_URL=http://$UP_HOST
if ((UPSTREAM_MIBPS > 0)); then
  cat >"$OUT/relay.rs" <<'EOF'
// TCP relay: each connection's upstream->client direction is paced to RATE
// MiB/s (token bucket without idle credit); client->upstream is not paced.
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use std::thread;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (up, rate) = (a[1].clone(), a[2].parse::<f64>().unwrap() * 1048576.0);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{}", l.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let up = up.clone();
        thread::spawn(move || {
            let Ok(u) = TcpStream::connect(&up) else { return };
            let _ = (c.set_nodelay(true), u.set_nodelay(true));
            let (mut c1, mut u1) = (c.try_clone().unwrap(), u.try_clone().unwrap());
            thread::spawn(move || {
                let mut b = vec![0u8; 64 * 1024];
                while let Ok(n) = c1.read(&mut b) {
                    if n == 0 || u1.write_all(&b[..n]).is_err() { break }
                }
                let _ = u1.shutdown(Shutdown::Write);
            });
            let (mut u2, mut c2) = (u, c);
            let mut b = vec![0u8; 256 * 1024];
            let mut next = Instant::now();
            while let Ok(n) = u2.read(&mut b) {
                if n == 0 || c2.write_all(&b[..n]).is_err() { break }
                let now = Instant::now();
                if next < now { next = now; }
                next += Duration::from_secs_f64(n as f64 / rate);
                if next > now { thread::sleep(next - now); }
            }
            let _ = c2.shutdown(Shutdown::Write);
        });
    }
}
EOF
  rustc -O --edition 2021 -o "$OUT/relay" "$OUT/relay.rs" 2>"$OUT/relay-build.log" \
    || die "relay build failed; see $OUT/relay-build.log"
  coproc RELAY { exec "$OUT/relay" "$UP_HOST" "$UPSTREAM_MIBPS"; }
  PID[relay]=$RELAY_PID
  CHILDREN+=("$RELAY_PID")
  read -r relay_port <&"${RELAY[0]}" || die "relay did not start"
  UPSTREAM_URL=http://127.0.0.1:$relay_port
  log "upstream paced to $UPSTREAM_MIBPS MiB/s per connection via $UPSTREAM_URL"
fi
BASE[direct]=$UPSTREAM_URL

upstream_gets() { # GETs of the layer the upstream has completed so far
  grep -a -c "\"GET /v2/$REPO_NAME/blobs/$LAYER_DIGEST " "$UP_LOG" || true
}

# --------------------------------------------------------------------------
# nixery-local and the proxy-mode registry, each on an empty cache
# --------------------------------------------------------------------------
start_nixery() {
  local state=$BENCH_DIR/mirror-nixery-state line i
  rm -rf "$state"
  mkdir -p "$state"
  STATE[nixery]=$state
  "$NIXERY_BIN" serve --listen 127.0.0.1:0 --state-dir "$state" \
    --default-registry "$UP_HOST" --upstream "$UP_HOST=$UPSTREAM_URL" \
    >"$OUT/nixery.stdout" 2>>"$OUT/nixery.log" &
  PID[nixery]=$!
  CHILDREN+=("${PID[nixery]}")
  line=
  for i in $(seq 300); do
    line=$(grep -m1 -o 'listening on http://[0-9.:]*' "$OUT/nixery.stdout" 2>/dev/null || true)
    [[ -n $line ]] && break
    kill -0 "${PID[nixery]}" 2>/dev/null || die "nixery-local serve exited; see $OUT/nixery.log"
    sleep 0.1
  done
  [[ -n $line ]] || die "nixery-local did not print its listen address"
  BASE[nixery]=${line#listening on }
}

start_proxy() {
  local storage=$BENCH_DIR/mirror-proxy-storage port
  rm -rf "$storage"
  mkdir -p "$storage"
  STATE[proxy]=$storage
  port=$(free_port)
  cat >"$OUT/proxy.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $storage
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  redirect:
    disable: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$port
proxy:
  remoteurl: $UPSTREAM_URL
EOF
  docker-registry serve "$OUT/proxy.yml" >>"$OUT/proxy.log" 2>&1 &
  PID[proxy]=$!
  CHILDREN+=("${PID[proxy]}")
  BASE[proxy]=http://127.0.0.1:$port
  wait_http "${BASE[proxy]}/v2/" "${PID[proxy]}" "proxy docker-registry"
}

stop_server() { # nixery|proxy
  local pid=${PID[$1]:-}
  [[ -n $pid ]] || return 0
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  PID[$1]=
}

fresh() { # nixery|proxy|direct: a server with an empty cache
  case $1 in
    direct) ;;
    nixery) stop_server nixery; start_nixery ;;
    proxy) stop_server proxy; start_proxy ;;
  esac
}

cached_file() { # nixery|proxy -> where the committed blob lives
  case $1 in
    nixery) echo "${STATE[nixery]}/blobs/sha256/$LAYER_HEX" ;;
    proxy) echo "${STATE[proxy]}/docker/registry/v2/blobs/sha256/${LAYER_HEX:0:2}/$LAYER_HEX/data" ;;
  esac
}

wait_cached() { # nixery|proxy: until the blob is committed (60 s at most)
  local f i
  [[ $1 == direct ]] && return 0
  f=$(cached_file "$1")
  for i in $(seq 600); do
    [[ -f $f && $(stat -c %s "$f") == "$BLOB_BYTES" ]] && return 0
    sleep 0.1
  done
  err "$1: the blob was not in its cache 60 s after the pull ($f)"
}

blob_url() { echo "${BASE[$1]}/v2/$REPO_NAME/blobs/$LAYER_DIGEST"; }

pull_once() { # SERVER METRIC RUN
  local r code size t
  r=$(curl -sS -o /dev/null -w '%{http_code} %{size_download} %{time_total}' "$(blob_url "$1")") \
    || { err "$1: $2 download failed (run $3)"; return 0; }
  read -r code size t <<<"$r"
  if [[ $code != 200 || $size != "$BLOB_BYTES" ]]; then
    err "$1: $2 run $3 got HTTP $code, $size bytes"
    return 0
  fi
  record "$2" "$1" "$3" "$t"
  log "$(printf '%-6s run %s %-7s %6.2f s %7.0f MiB/s' "$2" "$3" "$1" "$t" "$(awk -v t="$t" -v b="$BLOB_BYTES" 'BEGIN { print b / t / 1048576 }')")"
}

ORDER_A=$SERVERS
ORDER_B=$(echo "$SERVERS" | awk '{ for (i = NF; i > 0; i--) printf "%s%s", $i, (i > 1 ? " " : "") }')

# Warm the upstream's page cache (and check its bytes) before measuring.
got=$(curl -fsS "$(blob_url direct)" | sha256sum | cut -d' ' -f1) || die "direct blob GET failed"
[[ sha256:$got == "$LAYER_DIGEST" ]] || die "upstream blob digest sha256:$got != $LAYER_DIGEST"

# --------------------------------------------------------------------------
# 1-2. Cold pulls, 1 client, alternating; upstream GETs per cold pull
# --------------------------------------------------------------------------
for run in $(seq "$RUNS"); do
  if ((run % 2)); then order=$ORDER_A; else order=$ORDER_B; fi
  for s in $order; do
    fresh "$s"
    before=$(upstream_gets)
    pull_once "$s" cold "$run"
    wait_cached "$s"
    sleep 0.3 # the proxy's second (store) download logs when it ends
    record cold_upstream_gets "$s" "$run" "$(($(upstream_gets) - before))"
  done
done

# Bytes through each cache are the upstream's (after the cold runs).
for s in $SERVERS; do
  [[ $s == direct ]] && continue
  got=$(curl -fsS "$(blob_url "$s")" | sha256sum | cut -d' ' -f1) || err "$s: verification GET failed"
  [[ sha256:$got == "$LAYER_DIGEST" ]] || err "$s: served sha256:$got, expected $LAYER_DIGEST"
done

# --------------------------------------------------------------------------
# 3. Warm pulls: the caches of the last cold runs are still there
# --------------------------------------------------------------------------
before=$(upstream_gets)
for run in $(seq "$RUNS"); do
  if ((run % 2)); then order=$ORDER_A; else order=$ORDER_B; fi
  for s in $order; do pull_once "$s" warm "$run"; done
done
# (direct pulls are upstream GETs too)
record warm_upstream_gets cache 0 "$(($(upstream_gets) - before - RUNS))"

# --------------------------------------------------------------------------
# 4. $CLIENTS concurrent cold pulls
# --------------------------------------------------------------------------
concurrent() { # SERVER
  local s=$1 i t0 t1 ok=0 before
  local -a cpids=()
  fresh "$s"
  before=$(upstream_gets)
  t0=$(date +%s.%N)
  for i in $(seq "$CLIENTS"); do
    curl -sS -o /dev/null -w '%{http_code} %{size_download}\n' "$(blob_url "$s")" >"$OUT/conc-$s-$i.txt" 2>&1 &
    cpids+=($!)
  done
  for i in "${cpids[@]}"; do wait "$i" || true; done
  t1=$(date +%s.%N)
  for i in $(seq "$CLIENTS"); do
    [[ $(cat "$OUT/conc-$s-$i.txt") == "200 $BLOB_BYTES" ]] && ok=$((ok + 1))
  done
  ((ok == CLIENTS)) || err "$s: only $ok/$CLIENTS concurrent pulls completed (see $OUT/conc-$s-*.txt)"
  wait_cached "$s"
  sleep 0.3
  record conc_s "$s" 0 "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
  record conc_upstream_gets "$s" 0 "$(($(upstream_gets) - before))"
  log "$(printf 'concurrent %-7s %d clients %6.2f s, %d upstream GETs' "$s" "$CLIENTS" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" "$(($(upstream_gets) - before))")"
}
for s in $SERVERS; do concurrent "$s"; done
stop_server nixery
stop_server proxy

echo "loadavg (end):   $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt" >&2

# --------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------
python3 - "$RAW" "$OUT/summary.md" "$CLIENTS" "$BLOB_BYTES" <<'EOF'
import collections, statistics, sys
raw, md_path, clients, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
vals = collections.defaultdict(list)
for line in open(raw):
    metric, server, run, value = line.rstrip("\n").split("\t")
    if value:
        vals[(metric, server)].append(float(value))
med = lambda m, s: statistics.median(vals[(m, s)]) if vals.get((m, s)) else None
MiB = 1048576

def secs(v):
    return "n/a" if v is None else f"{v:.2f} s ({size / v / MiB:,.0f} MiB/s)"
def conc(v):
    return "n/a" if v is None else f"{v:.2f} s ({clients * size / v / MiB:,.0f} MiB/s agg.)"
def num(v):
    return "n/a" if v is None else f"{v:g}"
def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b
def rfmt(q):
    return "n/a" if q is None else f"{q:.2f}x"
def verdict(ok):
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")

rows = []
cold = {s: med("cold", s) for s in ("direct", "nixery", "proxy")}
warm = {s: med("warm", s) for s in ("direct", "nixery", "proxy")}
cc = {s: med("conc_s", s) for s in ("direct", "nixery", "proxy")}
q = ratio(cold["nixery"], cold["direct"])
rows.append(("cold pull, 1 client (median)", secs(cold["direct"]), secs(cold["nixery"]), secs(cold["proxy"]),
              f"nixery/direct {rfmt(q)}", "<= 1.10x", verdict(None if q is None else q <= 1.10)))
qp = ratio(cold["nixery"], cold["proxy"])
rows.append(("  nixery vs proxy, cold", "", "", "", f"nixery/proxy {rfmt(qp)}", "< 1.0x", verdict(None if qp is None else qp < 1.0)))
g = {s: med("cold_upstream_gets", s) for s in ("nixery", "proxy")}
rows.append(("upstream GETs per cold pull (median)", "1", num(g["nixery"]), num(g["proxy"]), "", "nixery = 1",
             verdict(None if g["nixery"] is None else g["nixery"] == 1)))
qw = ratio(warm["nixery"], warm["proxy"])
rows.append(("warm pull, 1 client (median)", secs(warm["direct"]), secs(warm["nixery"]), secs(warm["proxy"]),
             f"nixery/proxy {rfmt(qw)}", "< 1.0x", verdict(None if qw is None else qw < 1.0)))
wg = med("warm_upstream_gets", "cache")
rows.append(("  upstream GETs during warm pulls", "", num(wg), "", "(nixery + proxy)", "0", verdict(None if wg is None else wg == 0)))
qc = ratio(cc["nixery"], cold["nixery"])
rows.append((f"{clients} concurrent cold pulls, wall", conc(cc["direct"]), conc(cc["nixery"]), conc(cc["proxy"]),
             f"nixery {clients}/1 {rfmt(qc)}", "<= 1.3x", verdict(None if qc is None else qc <= 1.3)))
cg = {s: med("conc_upstream_gets", s) for s in ("direct", "nixery", "proxy")}
rows.append((f"  upstream GETs, {clients} concurrent", num(cg["direct"]), num(cg["nixery"]), num(cg["proxy"]), "", "nixery = 1",
             verdict(None if cg["nixery"] is None else cg["nixery"] == 1)))
qcp = ratio(cc["nixery"], cc["proxy"])
rows.append((f"  nixery vs proxy, {clients} concurrent", "", "", "", f"nixery/proxy {rfmt(qcp)}", "< 1.0x", verdict(None if qcp is None else qcp < 1.0)))

hdr = ("metric", "direct", "nixery-local", "registry proxy", "ratio", "target", "result")
widths = [max(len(r[i]) for r in rows + [hdr]) for i in range(len(hdr))]
line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
print()
print(line(hdr))
print("  ".join("-" * w for w in widths))
for r in rows:
    print(line(r))
print("\nper-run values:")
for (metric, server), v in sorted(vals.items()):
    print(f"  {metric:<20} {server:<7} " + " ".join(f"{x:.6g}" for x in v))
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

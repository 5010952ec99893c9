#!/usr/bin/env bash
# bench/blobserve.sh: issue #6 speed, files from inside images over HTTP.
#
#   1. first-file latency for a cold image: a fresh daemon whose extracted
#      space is empty, one curl for a small file (resolve the manifest,
#      extract every layer, serve). Median of $RUNS, for
#        - "small": an image with one small layer,
#        - "big":   an image whose one layer holds a $FILE_MIB MiB file,
#        - "nix":   nix/hello from tests/pkgs on a fresh state dir, so the
#                   time includes building the image (only with nix-build).
#   2. warm throughput: the $FILE_MIB MiB file through /files/… against
#      the layer blob that holds it (tar, $FILE_MIB MiB + 3 KiB) through
#      /v2/…/blobs/… from the same daemon; curl -o /dev/null,
#      %{speed_download}, alternating (and alternating which goes first),
#      median of $WARM_RUNS.
#                                        Target: file/blob >= 1.0
#
# Exit status is 0 whether or not the target is met (this is a report),
# non-zero if something failed to run. Inputs are cached in $BENCH_DIR
# (default /tmp/nixery-bench-blobserve); raw numbers and daemon logs go to
# $BENCH_DIR/results/<timestamp>/.
#
# Knobs: BENCH_DIR  FILE_MIB=100  RUNS=5  WARM_RUNS=41  NIX=1 (0: skip the Nix image)
#        NIXERY_BIN=path (default target/release/nixery-local)  BUILD=1
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/tmp/nixery-bench-blobserve}
FILE_MIB=${FILE_MIB:-100}
RUNS=${RUNS:-5}
WARM_RUNS=${WARM_RUNS:-41}
NIX=${NIX:-1}
BUILD=${BUILD:-1}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NIXERY_BIN=${NIXERY_BIN:-$REPO_ROOT/target/release/nixery-local}

RUN_ID=$(date +%Y%m%dT%H%M%S)
OUT=$BENCH_DIR/results/$RUN_ID
RAW=$OUT/raw.tsv
mkdir -p "$OUT"
: >"$RAW"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RAW"; } # metric run value

DAEMON_PID=
ADDR=
cleanup() {
  if [[ -n $DAEMON_PID ]]; then kill "$DAEMON_PID" 2>/dev/null || true; wait "$DAEMON_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "nan"} else if (NR%2) {print a[(NR+1)/2]} else {print (a[NR/2]+a[NR/2+1])/2}}'; }

for cmd in curl sha256sum tar openssl; do
  command -v "$cmd" >/dev/null || die "$cmd is required"
done

if [[ $BUILD == 1 ]]; then
  log "cargo build --release"
  (cd "$REPO_ROOT" && cargo build --release --quiet) || die "build failed"
fi
[[ -x $NIXERY_BIN ]] || die "no binary at $NIXERY_BIN"

# --- inputs -----------------------------------------------------------------

# An OCI layout at $1 with tag $3 and one plain-tar layer $2.
make_layout() {
  local dir=$1 layer=$2 tag=$3
  rm -rf "$dir"; mkdir -p "$dir/blobs/sha256"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
  local ld lsize
  ld=$(sha256sum "$layer" | cut -d' ' -f1)
  lsize=$(stat -c %s "$layer")
  cp "$layer" "$dir/blobs/sha256/$ld"
  local arch
  case $(uname -m) in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
  local config
  config=$(printf '{"architecture":"%s","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$arch" "$ld")
  local cd csize
  printf '%s' "$config" >"$dir/config.tmp"
  cd=$(sha256sum "$dir/config.tmp" | cut -d' ' -f1); csize=$(stat -c %s "$dir/config.tmp")
  mv "$dir/config.tmp" "$dir/blobs/sha256/$cd"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$cd" "$csize" "$ld" "$lsize" >"$dir/manifest.tmp"
  local md msize
  md=$(sha256sum "$dir/manifest.tmp" | cut -d' ' -f1); msize=$(stat -c %s "$dir/manifest.tmp")
  mv "$dir/manifest.tmp" "$dir/blobs/sha256/$md"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
    "$md" "$msize" "$tag" >"$dir/index.json"
  echo "sha256:$ld"
}

SRC=$BENCH_DIR/src-$FILE_MIB
if [[ ! -f $SRC/big/big.bin ]]; then
  log "writing the ${FILE_MIB} MiB file"
  mkdir -p "$SRC/big" "$SRC/small/etc"
  openssl enc -aes-128-ctr -nosalt -pass pass:nixery-blobserve -pbkdf2 -in /dev/zero 2>/dev/null \
    | head -c $((FILE_MIB * 1024 * 1024)) >"$SRC/big/big.bin.tmp" || true # openssl dies of SIGPIPE
  [[ $(stat -c %s "$SRC/big/big.bin.tmp") == $((FILE_MIB * 1024 * 1024)) ]] || die "could not write the file"
  mv "$SRC/big/big.bin.tmp" "$SRC/big/big.bin"
fi
echo "hello from a small file" >"$SRC/big/small.txt"
echo "hello from a small image" >"$SRC/small/etc/motd"
for i in $(seq 1 50); do echo "file $i" >"$SRC/small/etc/f$i"; done
TARFLAGS=(--format=ustar --mtime=@1700000000 --owner=0 --group=0 --numeric-owner --sort=name)
tar "${TARFLAGS[@]}" -C "$SRC/big" -cf "$SRC/big.tar" big.bin small.txt
tar "${TARFLAGS[@]}" -C "$SRC/small" -cf "$SRC/small.tar" etc
BIG_LAYER=$(make_layout "$BENCH_DIR/layout-big" "$SRC/big.tar" 1)
make_layout "$BENCH_DIR/layout-small" "$SRC/small.tar" 1 >/dev/null
FILE_SHA=$(sha256sum "$SRC/big/big.bin" | cut -d' ' -f1)

STATE=$BENCH_DIR/state
rm -rf "$STATE"
"$NIXERY_BIN" import --state-dir "$STATE" "$BENCH_DIR/layout-big" docker.io/bench/big:1 >/dev/null
"$NIXERY_BIN" import --state-dir "$STATE" "$BENCH_DIR/layout-small" docker.io/bench/small:1 >/dev/null

# --- daemon -------------------------------------------------------------------

start_daemon() { # state-dir log-name [extra args…]
  local state=$1 name=$2; shift 2
  "$NIXERY_BIN" serve --listen 127.0.0.1:0 --state-dir "$state" --offline "$@" \
    >"$OUT/$name.stdout" 2>>"$OUT/$name.log" &
  DAEMON_PID=$!
  local i
  for i in $(seq 1 200); do
    ADDR=$(sed -n 's|^nixery-local listening on http://||p' "$OUT/$name.stdout")
    [[ -n $ADDR ]] && return 0
    sleep 0.05
  done
  die "daemon did not start (see $OUT/$name.log)"
}
stop_daemon() {
  kill "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true; DAEMON_PID=
}

# --- 1. cold first-file latency -----------------------------------------------

cold() { # metric path
  local metric=$1 path=$2 run t
  for run in $(seq 1 "$RUNS"); do
    rm -rf "$STATE/extracted"
    start_daemon "$STATE" cold
    t=$(curl -fsS -o /dev/null -w '%{time_total}' "http://$ADDR$path") || die "GET $path failed"
    record "$metric" "$run" "$t"
    stop_daemon
  done
}
log "cold first-file latency ($RUNS runs each)"
cold cold_small /files/bench/small:1/etc/motd
cold cold_big /files/bench/big:1/small.txt

if [[ $NIX == 1 ]] && command -v nix-build >/dev/null; then
  for run in $(seq 1 "$RUNS"); do
    rm -rf "$BENCH_DIR/nix-state"
    start_daemon "$BENCH_DIR/nix-state" nix --pkgs-path "$REPO_ROOT/tests/pkgs" --nix-option substituters=
    t=$(curl -fsS -o /dev/null -w '%{time_total}' "http://$ADDR/files/nix/hello:latest/bin/hello") \
      || die "GET nix/hello failed"
    record cold_nix "$run" "$t"
    # The same image again on a fresh extracted space: built, not extracted.
    stop_daemon
    rm -rf "$BENCH_DIR/nix-state/extracted"
    start_daemon "$BENCH_DIR/nix-state" nix --pkgs-path "$REPO_ROOT/tests/pkgs" --nix-option substituters=
    t=$(curl -fsS -o /dev/null -w '%{time_total}' "http://$ADDR/files/nix/hello:latest/bin/hello") \
      || die "GET nix/hello failed"
    record cold_nix_built "$run" "$t"
    stop_daemon
  done
fi

# --- 2. warm throughput: file vs blob -----------------------------------------

log "warm throughput ($WARM_RUNS alternating runs)"
rm -rf "$STATE/extracted"
start_daemon "$STATE" warm
curl -fsS -o /dev/null "http://$ADDR/files/bench/big:1/small.txt" || die "warm-up failed"
got=$(curl -fsS "http://$ADDR/files/bench/big:1/big.bin" | sha256sum | cut -d' ' -f1)
[[ $got == "$FILE_SHA" ]] || die "the file served is not the file in the image"
# Alternating, and which goes first alternates too.
fetch() { # metric url run
  local s
  s=$(curl -fsS -o /dev/null -w '%{speed_download}' "$2") || die "GET $2 failed"
  record "$1" "$3" "$s"
}
for run in $(seq 1 "$WARM_RUNS"); do
  if ((run % 2)); then
    fetch file_bps "http://$ADDR/files/bench/big:1/big.bin" "$run"
    fetch blob_bps "http://$ADDR/v2/bench/big/blobs/$BIG_LAYER" "$run"
  else
    fetch blob_bps "http://$ADDR/v2/bench/big/blobs/$BIG_LAYER" "$run"
    fetch file_bps "http://$ADDR/files/bench/big:1/big.bin" "$run"
  fi
done
EXTRACTIONS=$(grep -c "extracted layer" "$OUT/warm.log" || true)
stop_daemon

# --- report -------------------------------------------------------------------

med() { awk -F'\t' -v m="$1" '$1==m {print $3}' "$RAW" | median; }
ms() { awk -v s="$(med "$1")" 'BEGIN { if (s=="nan") print "n/a"; else printf "%.1f ms", s*1000 }'; }
mibs() { awk -v b="$(med "$1")" 'BEGIN { printf "%.0f MiB/s", b/1048576 }'; }
RATIO=$(awk -v f="$(med file_bps)" -v b="$(med blob_bps)" 'BEGIN { printf "%.2f", f/b }')
VERDICT=$(awk -v r="$RATIO" 'BEGIN { print (r >= 1.0) ? "PASS" : "FAIL" }')

cat <<EOF | tee "$OUT/summary.txt"
blobserve benchmark ($RUN_ID), medians of $RUNS cold and $WARM_RUNS warm runs, $(nproc) CPUs
  cold first file, small image (1 layer, 51 files):   $(ms cold_small)
  cold first file, ${FILE_MIB} MiB-file image (extract):  $(ms cold_big)
  cold first file, nix/hello (build + extract):       $(ms cold_nix)
  cold first file, nix/hello (built, extract only):   $(ms cold_nix_built)
  warm ${FILE_MIB} MiB file via /files:                 $(mibs file_bps)
  warm ${FILE_MIB} MiB blob via /v2/…/blobs:            $(mibs blob_bps)
  file/blob ratio: $RATIO (target >= 1.0) $VERDICT
  extractions during the warm phase: $EXTRACTIONS (expected 1)
raw numbers: $RAW
EOF

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
#        NIXERY_BIN=path  BUILD=1 (as in bench/lib.sh)
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/tmp/nixery-bench-blobserve}
FILE_MIB=${FILE_MIB:-100}
RUNS=${RUNS:-5}
WARM_RUNS=${WARM_RUNS:-41}
NIX=${NIX:-1}

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init

need_tools curl sha256sum tar openssl python3
build_nixery

# --- inputs -----------------------------------------------------------------

SRC=$BENCH_DIR/src-$FILE_MIB
if [[ ! -f $SRC/big/big.bin ]]; then
  log "writing the ${FILE_MIB} MiB file"
  mkdir -p "$SRC/big" "$SRC/small/etc"
  keystream $((FILE_MIB * 1024 * 1024)) >"$SRC/big/big.bin.tmp"
  [[ $(stat -c %s "$SRC/big/big.bin.tmp") == $((FILE_MIB * 1024 * 1024)) ]] || die "could not write the file"
  mv "$SRC/big/big.bin.tmp" "$SRC/big/big.bin"
fi
echo "hello from a small file" >"$SRC/big/small.txt"
echo "hello from a small image" >"$SRC/small/etc/motd"
for i in $(seq 1 50); do echo "file $i" >"$SRC/small/etc/f$i"; done
TARFLAGS=(--format=ustar --mtime=@1700000000 --owner=0 --group=0 --numeric-owner --sort=name)
tar "${TARFLAGS[@]}" -C "$SRC/big" -cf "$SRC/big.tar" big.bin small.txt
tar "${TARFLAGS[@]}" -C "$SRC/small" -cf "$SRC/small.tar" etc
BIG_LAYER=$(oci_layout "$BENCH_DIR/layout-big" "$SRC/big.tar" 1 "nixery-local bench/blobserve.sh")
oci_layout "$BENCH_DIR/layout-small" "$SRC/small.tar" 1 "nixery-local bench/blobserve.sh" >/dev/null
FILE_SHA=$(sha256sum "$SRC/big/big.bin" | cut -d' ' -f1)

STATE=$BENCH_DIR/state
rm -rf "$STATE"
"$NIXERY_BIN" import --state-dir "$STATE" "$BENCH_DIR/layout-big" docker.io/bench/big:1 >/dev/null
"$NIXERY_BIN" import --state-dir "$STATE" "$BENCH_DIR/layout-small" docker.io/bench/small:1 >/dev/null

# --- 1. cold first-file latency -----------------------------------------------

first_file() { # METRIC RUN LOG PATH STATE [ARG...]: a fresh daemon, one GET of PATH
  local metric=$1 run=$2 name=$3 path=$4 state=$5 t
  shift 5
  start_nixery "$name" --state-dir "$state" --offline "$@"
  t=$(curl -fsS -o /dev/null -w '%{time_total}' "${BASE[nixery]}$path") || die "GET $path failed"
  record "$metric" "$run" "$t"
  stop_server nixery
}
cold() { # metric path
  local run
  for run in $(seq 1 "$RUNS"); do
    rm -rf "$STATE/extracted"
    first_file "$1" "$run" cold "$2" "$STATE"
  done
}
log "cold first-file latency ($RUNS runs each)"
cold cold_small /files/bench/small:1/etc/motd
cold cold_big /files/bench/big:1/small.txt

if [[ $NIX == 1 ]] && command -v nix-build >/dev/null; then
  NIX_ARGS=(--pkgs-path "$REPO_ROOT/tests/pkgs" --nix-option substituters=)
  for run in $(seq 1 "$RUNS"); do
    rm -rf "$BENCH_DIR/nix-state"
    first_file cold_nix "$run" nix /files/nix/hello:latest/bin/hello "$BENCH_DIR/nix-state" "${NIX_ARGS[@]}"
    # The same image again on a fresh extracted space: built, not extracted.
    rm -rf "$BENCH_DIR/nix-state/extracted"
    first_file cold_nix_built "$run" nix /files/nix/hello:latest/bin/hello "$BENCH_DIR/nix-state" "${NIX_ARGS[@]}"
  done
fi

# --- 2. warm throughput: file vs blob -----------------------------------------

log "warm throughput ($WARM_RUNS alternating runs)"
rm -rf "$STATE/extracted"
start_nixery warm --state-dir "$STATE" --offline
ADDR=${BASE[nixery]}
curl -fsS -o /dev/null "$ADDR/files/bench/big:1/small.txt" || die "warm-up failed"
got=$(url_sha256 "$ADDR/files/bench/big:1/big.bin")
[[ $got == "$FILE_SHA" ]] || die "the file served is not the file in the image"
declare -A URL=([file]="$ADDR/files/bench/big:1/big.bin" [blob]="$ADDR/v2/bench/big/blobs/$BIG_LAYER")
# Alternating, and which goes first alternates too.
for run in $(seq 1 "$WARM_RUNS"); do
  for what in $(in_turn "$run" "file blob"); do
    s=$(curl -fsS -o /dev/null -w '%{speed_download}' "${URL[$what]}") || die "GET ${URL[$what]} failed"
    record "${what}_bps" "$run" "$s"
  done
done
EXTRACTIONS=$(grep -c "extracted layer" "$OUT/warm.log" || true)
stop_server nixery

# --- report -------------------------------------------------------------------

ms() { awk -v s="$(med "$1")" 'BEGIN { if (s=="nan") print "n/a"; else printf "%.1f ms", s*1000 }'; }
mibs() { awk -v b="$(med "$1")" 'BEGIN { printf "%.0f MiB/s", b/1048576 }'; }
RATIO=$(ratio "$(med file_bps)" "$(med blob_bps)")
VERDICT=$(pass_if "$RATIO" '>=' 1.0)

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

#!/usr/bin/env bash
# bench/ab.sh: one nixery-local build against another (a refactor must not
# slow the daemon down), on registry.sh's content: the bench/blob:1 image with
# one $BLOB_MIB MiB layer, imported into a state dir of each build's own.
#
#   1. manifest GET/s: wrk with the OCI manifest Accept header, by tag.
#   2. blob throughput: curl -o /dev/null, %{speed_download}.
#
# The two run side by side and are measured in turns, alternating which goes
# first; the summary gives the medians and subject/base ratios. Exit status is
# 0 whether or not the subject is faster, non-zero if something failed to run.
#
#   BASE_BIN=/path/to/old/nixery-local bench/ab.sh
#
# Knobs (environment variables):
#   BASE_BIN=path (required)  the baseline build, e.g. of the commit before
#                             the change: git worktree add /tmp/base REV, then
#                             CARGO_TARGET_DIR=/tmp/base-target cargo build --release
#   NIXERY_BIN, BUILD         the subject (see bench/lib.sh)
#   BENCH_DIR=/tmp/nixery-bench  BLOB_MIB=1024  RUNS=5
#   WRK_THREADS=2  WRK_CONNS=32  WRK_DURATION=10s
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/tmp/nixery-bench}
BLOB_MIB=${BLOB_MIB:-1024}
RUNS=${RUNS:-5}
WRK_THREADS=${WRK_THREADS:-2}
WRK_CONNS=${WRK_CONNS:-32}
WRK_DURATION=${WRK_DURATION:-10s}
RESULTS_PREFIX=ab-
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

[[ -n ${BASE_BIN-} && -x ${BASE_BIN-} ]] || die "set BASE_BIN to the baseline nixery-local binary"
need_tools curl wrk python3 openssl sha256sum
bench_init
machine_info base "$BASE_BIN" subject "$NIXERY_BIN" \
  params "blob=${BLOB_MIB}MiB runs=$RUNS wrk=-t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION"
build_nixery
blob_layout

# One state dir and daemon per build; start_nixery sets PID/BASE[nixery].
declare -A BIN=([base]=$BASE_BIN [subject]=$NIXERY_BIN)
for who in base subject; do
  state=$OUT/state-$who
  "${BIN[$who]}" import --state-dir "$state" "$LAYOUT" "docker.io/$REPO_NAME:$TAG" >>"$OUT/$who-import.log" 2>&1 \
    || die "$who: import failed; see $OUT/$who-import.log"
  NIXERY_BIN=${BIN[$who]} start_nixery "$who" --state-dir "$state" --offline
  PID[$who]=${PID[nixery]}
  BASE[$who]=${BASE[nixery]}
done

wrk_lua "$OCI_MANIFEST"
# Warm-ups: the page cache holds the blob, and each daemon has served once.
for who in base subject; do blob_once "$who" 0; done
wrk_warmup base subject
: >"$RAW"
for run in $(seq "$RUNS"); do
  for who in $(in_turn "$run" "base subject"); do wrk_once "$who" "$run"; done
done
for run in $(seq "$RUNS"); do
  for who in $(in_turn "$run" "base subject"); do blob_once "$who" "$run"; done
done
machine_end

wb=$(med wrk_rps base) ws=$(med wrk_rps subject)
bb=$(med blob_Bps base) bs=$(med blob_Bps subject)
mib() { awk -v b="$1" 'BEGIN { printf "%.0f MiB/s", b / 1048576 }'; }
{
  printf '\n%-28s %14s %14s %14s\n' metric base subject subject/base
  printf '%-28s %14s %14s %13sx\n' "manifest GET/s (median)" "$wb" "$ws" "$(ratio "$ws" "$wb")"
  printf '%-28s %14s %14s %13sx\n' "blob GET (median)" "$(mib "$bb")" "$(mib "$bs")" "$(ratio "$bs" "$bb")"
  printf '\nper-run values:\n'
  for m in wrk_rps blob_Bps; do
    for who in base subject; do
      printf '  %-10s %-8s %s\n' "$m" "$who" "$(values "$m" "$who" | tr '\n' ' ')"
    done
  done
  printf '\nresults: %s\n' "$OUT"
} | tee "$OUT/summary.txt"
((${#ERRORS[@]} == 0)) || die "${#ERRORS[@]} errors: ${ERRORS[*]}"

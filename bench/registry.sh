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
#   NIXERY_BIN=path          (default: cargo build --release, then
#                             ${CARGO_TARGET_DIR:-target}/release/nixery-local)
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
SERVERS=${SERVERS:-nixery registry}
STRACE=${STRACE:-0}

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init

has() { in_list "$1" "$SERVERS"; }

status_kib() { # PID FIELD -> value in kB from /proc/PID/status
  awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

need_tools curl wrk skopeo python3 sha256sum openssl docker-registry
[[ $SERVERS =~ ^(nixery|registry)( (nixery|registry))?$ ]] || die "bad SERVERS=$SERVERS"

machine_info \
  docker-registry "$(docker-registry --version 2>&1 | head -1)" \
  curl "$(curl --version | head -1 | cut -d' ' -f1-2)" \
  wrk "$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2 || true)" \
  skopeo "$(skopeo --version)" \
  rustc "$(rustc --version 2>/dev/null || echo n/a)" \
  params "blob=${BLOB_MIB}MiB runs=$RUNS wrk=${WRK_RUNS}x(-t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION) rss_clients=$RSS_CLIENTS registry_cache=$REGISTRY_CACHE"

if has nixery; then
  build_nixery
  machine_line nixery-local "$("$NIXERY_BIN" --version 2>/dev/null || echo "$NIXERY_BIN")"
fi

blob_layout
log "layer $LAYER_DIGEST, manifest $MANIFEST_DIGEST ($MANIFEST_SIZE bytes)"

if has registry; then
  start_registry registry "$BENCH_DIR/registry-storage" cache="$REGISTRY_CACHE"
  log "docker-registry serving on ${BASE[registry]} (pid ${PID[registry]})"
  push_blob_layout registry
fi

if has nixery; then
  state=$BENCH_DIR/nixery-state
  rm -rf "$state"
  mkdir -p "$state"
  log "nixery-local import docker.io/$REPO_NAME:$TAG"
  out=$("$NIXERY_BIN" import --state-dir "$state" "$LAYOUT" "docker.io/$REPO_NAME:$TAG" 2>"$OUT/nixery-import.log") \
    || die "nixery-local import failed; see $OUT/nixery-import.log"
  echo "$out" >>"$OUT/nixery-import.log"
  log "  $out"
  [[ $out == *"$MANIFEST_DIGEST"* ]] || err "nixery-local import printed '$out', expected manifest $MANIFEST_DIGEST"
  start_nixery nixery --state-dir "$state"
  log "nixery-local serving on ${BASE[nixery]} (pid ${PID[nixery]})"
fi

# --------------------------------------------------------------------------
# Correctness checks (and page-cache warm-up)
# --------------------------------------------------------------------------
for s in $SERVERS; do
  got=$(curl -fsS -H "Accept: $OCI_MANIFEST" "$(manifest_url "$s")" | sha256sum | cut -d' ' -f1) \
    || die "$s: manifest GET failed"
  [[ sha256:$got == "$MANIFEST_DIGEST" ]] || die "$s: manifest digest sha256:$got != $MANIFEST_DIGEST"
  ctype=$(curl -fsS -o /dev/null -w '%{content_type}' -H "Accept: $OCI_MANIFEST" "$(manifest_url "$s")")
  log "$s: manifest OK ($ctype)"
  got=$(url_sha256 "$(blob_url "$s")") || die "$s: blob GET failed"
  [[ sha256:$got == "$LAYER_DIGEST" ]] || die "$s: blob digest sha256:$got != $LAYER_DIGEST"
  log "$s: blob OK (warm)"
done

# --------------------------------------------------------------------------
# 1. Blob throughput, alternating
# --------------------------------------------------------------------------
for run in $(seq "$RUNS"); do
  for s in $(in_turn "$run" "$SERVERS"); do blob_once "$s" "$run"; done
done

# --------------------------------------------------------------------------
# 2. Manifest GET/s with wrk, alternating
# --------------------------------------------------------------------------
wrk_lua "$OCI_MANIFEST"
# shellcheck disable=SC2086  # one server name per word
wrk_warmup $SERVERS
for run in $(seq "$WRK_RUNS"); do
  for s in $(in_turn "$run" "$SERVERS"); do wrk_once "$s" "$run"; done
done

# --------------------------------------------------------------------------
# 3. Memory while $RSS_CLIENTS clients stream the blob at once
# --------------------------------------------------------------------------
rss_phase() { # SERVER
  local s=$1 pid=${PID[$1]} samples=$OUT/rss-$1.tsv t0 t1 ok
  record hwm_lifetime_kib "$s" 0 "$(status_kib "$pid" VmHWM)"
  echo 5 >"/proc/$pid/clear_refs" || err "$s: cannot reset VmHWM (clear_refs)"
  printf 'VmRSS\tRssAnon\tRssFile\tThreads\n' >"$samples"
  t0=$(now)
  curls_start "$RSS_CLIENTS" "$(blob_url "$s")" "$OUT/rss-$s-client"
  while :; do
    awk '$1 == "VmRSS:" { r = $2 } $1 == "RssAnon:" { a = $2 } $1 == "RssFile:" { f = $2 }
         $1 == "Threads:" { t = $2 } END { printf "%s\t%s\t%s\t%s\n", r, a, f, t }' "/proc/$pid/status" >>"$samples" \
      || die "$s (pid $pid) died during the memory phase"
    curls_running || break
    sleep "$RSS_INTERVAL"
  done
  curls_wait
  t1=$(now)
  ok=$(curls_ok "$RSS_CLIENTS" "$OUT/rss-$s-client" "$BLOB_BYTES")
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

machine_end

# --------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------
summary_py "$RAW" "$OUT/summary.md" "$RSS_CLIENTS" <<'EOF'
clients = args[0]

def fmt(v, scale, unit, prec=0):
    return "n/a" if v is None else f"{v / scale:,.{prec}f} {unit}".rstrip()

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
    rows.append((name, fmt(n, scale, unit, prec), fmt(r, scale, unit, prec), rfmt(q), tgt, verdict(ok)))

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

print_table(("metric", "nixery-local", "docker-registry", "nixery/registry", "target", "result"), rows)
print_per_run(12, 9, min_runs=2)
EOF

bench_finish

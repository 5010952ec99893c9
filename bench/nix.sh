#!/usr/bin/env bash
# bench/nix.sh: issue #3 speed targets for Nix images, on the test package
# set's `big` (~493 MB closure in 22 store paths, plus cacert and iana-etc)
# and `medium` (~420 MB, 17 paths shared with big).
#
#   1. cold build, per compression (gzip, zstd, none): time from the manifest
#      GET to its response for nix/big on a fresh state dir (the closure is
#      already in the Nix store, so this is evaluation + closure queries +
#      writing every layer), against a single-threaded shell pipeline over the
#      same store paths in the same run:
#        gzip: tar -c CLOSURE | gzip -6      zstd: tar -c CLOSURE | zstd -3 -T1
#        none: tar -c CLOSURE | sha256sum    (an uncompressed layer still
#                                             needs its digest)
#      Median of $RUNS runs, alternating which goes first. Page cache warm for
#      both.                        Target: daemon faster than its pipeline
#   2. end to end, per compression: fresh daemon state + fresh containerd,
#      `ctr images pull nix.local/big:latest` (build + fetch + unpack), then a
#      second fresh containerd pulls the now-cached image (fetch + unpack).
#      Median of $E2E_RUNS runs.    Chooses the default compression.
#   3. warm pull: manifest GET latency of the cached nix/big, $WARM_CURLS
#      sequential curls (time_total), and wrk -t1 -c1 for $WRK_DURATION.
#                                   Target: median < 5 ms
#   4. sharing: containerd pulls nix.local/big, then nix.local/medium; the
#      bytes containerd fetched for medium (new files in its content store)
#      vs medium's layers missing from big's manifest vs medium's total.
#                                   Target: only the new layers are fetched
#
# Prints a summary table. Exit status 0 whether or not targets are met (this
# is a report); non-zero if something failed to run. Raw numbers, daemon and
# containerd logs go to $BENCH_DIR/results/<timestamp>/.
#
# Needs root (containerd unpacks with overlayfs), nix-bin, busybox-static,
# containerd, runc, curl, wrk, zstd, gzip, GNU tar, python3.
#
# Knobs (environment variables):
#   BENCH_DIR=/tmp/nixery-bench-nix  RUNS=3  E2E_RUNS=3
#   COMPRESSIONS="gzip zstd none"    WARM_CURLS=200  WRK_DURATION=5s
#   PHASES="cold e2e warm share"     (any subset, in this order)
#   NIXERY_BIN=path  (default: cargo build --release, then
#                     ${CARGO_TARGET_DIR:-target}/release/nixery-local)
#   BUILD=1          (0: do not run cargo build)
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/tmp/nixery-bench-nix}
RUNS=${RUNS:-3}
E2E_RUNS=${E2E_RUNS:-3}
COMPRESSIONS=${COMPRESSIONS:-gzip zstd none}
WARM_CURLS=${WARM_CURLS:-200}
WRK_DURATION=${WRK_DURATION:-5s}
PHASES=${PHASES:-cold e2e warm share}

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init

CTRD_PID=
CTRD_DIR=
ON_EXIT+=(stop_containerd)

has_phase() { in_list "$1" "$PHASES"; }

[[ $(id -u) == 0 ]] || die "run as root: containerd unpacks with overlayfs"
need_tools nix-build nix-store busybox containerd ctr runc curl wrk zstd gzip tar python3 sha256sum
tar --version | head -1 | grep -q 'GNU tar' || die "GNU tar needed"

# --------------------------------------------------------------------------
# Machine info, binary, closure
# --------------------------------------------------------------------------
machine_info \
  nix "$(nix-build --version)" \
  containerd "$(containerd --version)" \
  unpigz "$(command -v unpigz || echo 'absent (containerd gunzips in Go)')" \
  tar/gzip/zstd "$(tar --version | head -1) / $(gzip --version | head -1) / $(zstd --version)" \
  rustc "$(rustc --version 2>/dev/null || echo n/a)" \
  params "runs=$RUNS e2e_runs=$E2E_RUNS compressions='$COMPRESSIONS' warm_curls=$WARM_CURLS wrk=$WRK_DURATION phases='$PHASES'"
build_nixery

nix_realise big medium cacert iana-etc
BIG=${OUTS[0]} MEDIUM=${OUTS[1]} CACERT=${OUTS[2]} IANA=${OUTS[3]}
# The image's closure: big plus the always-added cacert and iana-etc.
nix_closure "$BIG" "$CACERT" "$IANA"
mapfile -t MEDIUM_CLOSURE < <(nix-store -qR "$MEDIUM" "$CACERT" "$IANA" | sort)
REL=("${CLOSURE[@]#/}")
MEDIUM_BYTES=$(du -scb "${MEDIUM_CLOSURE[@]}" | tail -1 | cut -f1)
SHARED_PATHS=$(comm -12 <(printf '%s\n' "${CLOSURE[@]}") <(printf '%s\n' "${MEDIUM_CLOSURE[@]}") | wc -l)
{
  echo "big closure:     ${#CLOSURE[@]} paths, $CLOSURE_BYTES bytes ($BIG + cacert + iana-etc)"
  echo "medium closure:  ${#MEDIUM_CLOSURE[@]} paths, $MEDIUM_BYTES bytes, $SHARED_PATHS shared with big"
} | tee -a "$OUT/machine.txt" >&2
printf '%s\n' "${CLOSURE[@]}" >"$OUT/closure-big.txt"

warm_paths "${CLOSURE[@]}"

# --------------------------------------------------------------------------
# containerd (own config, root, state and socket; CRI off)
# --------------------------------------------------------------------------
start_containerd() {
  local i
  CTRD_DIR=$(mktemp -d /tmp/nlb.XXXXXX)
  mkdir -p "$CTRD_DIR/certs.d/nix.local"
  cat >"$CTRD_DIR/config.toml" <<EOF
version = 2
root = "$CTRD_DIR/root"
state = "$CTRD_DIR/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$CTRD_DIR/c.sock"

[ttrpc]
  address = "$CTRD_DIR/c.sock.ttrpc"

[metrics]
  address = ""
EOF
  containerd --config "$CTRD_DIR/config.toml" >>"$OUT/containerd.log" 2>&1 &
  CTRD_PID=$!
  CHILDREN+=("$CTRD_PID")
  for i in $(seq 200); do
    [[ -S $CTRD_DIR/c.sock ]] && ctr --address "$CTRD_DIR/c.sock" version >/dev/null 2>&1 && return 0
    kill -0 "$CTRD_PID" 2>/dev/null || die "containerd exited; see $OUT/containerd.log"
    sleep 0.1
  done
  die "containerd not ready after 20 s"
}

stop_containerd() {
  [[ -n $CTRD_DIR ]] || return 0
  stop_pid "$CTRD_PID"
  CTRD_PID=
  local m
  # Anything still mounted under the directory, deepest first.
  while read -r m; do umount -l "$m" 2>/dev/null || true; done \
    < <(awk -v d="$CTRD_DIR" 'index($5, d) == 1 { print length($5) "\t" $5 }' /proc/self/mountinfo | sort -rn | cut -f2)
  rm -rf "$CTRD_DIR"
  CTRD_DIR=
}

ctr_() { ctr --address "$CTRD_DIR/c.sock" --namespace bench "$@"; }

# Points nix.local at the running daemon (no upstream: the server is dead).
ctr_hosts() {
  cat >"$CTRD_DIR/certs.d/nix.local/hosts.toml" <<EOF
server = "https://127.0.0.1:1"

[host."$DAEMON_BASE"]
  capabilities = ["pull", "resolve"]
EOF
}

PULL_S=
ctr_pull() { # REF LOGNAME -> seconds in PULL_S ("nan" on failure)
  local t0 t1
  t0=$(now)
  if ! ctr_ images pull --hosts-dir "$CTRD_DIR/certs.d" "$1" >"$OUT/$2.txt" 2>&1; then
    err "ctr images pull $1 failed; see $OUT/$2.txt"
    PULL_S=nan
    return 0
  fi
  t1=$(now)
  PULL_S=$(elapsed "$t0" "$t1")
}

# "digest size" of every blob in containerd's content store.
ctr_blobs() {
  local d=$CTRD_DIR/root/io.containerd.content.v1.content/blobs/sha256
  [[ -d $d ]] || return 0
  find "$d" -type f -printf 'sha256:%f %s\n' | sort
}

# --------------------------------------------------------------------------
# 1. Cold build vs the shell pipeline
# --------------------------------------------------------------------------
pipeline() { # COMPRESSION
  case $1 in
    gzip) tar -C / -cf - "${REL[@]}" | gzip -6 >/dev/null ;;
    zstd) tar -C / -cf - "${REL[@]}" | zstd -3 -T1 -q >/dev/null ;;
    none) tar -C / -cf - "${REL[@]}" | sha256sum >/dev/null ;;
  esac
}

pipeline_once() { # COMPRESSION RUN
  local t0 t1 s
  t0=$(now)
  pipeline "$1" || { err "pipeline $1 failed (run $2)"; return 0; }
  t1=$(now)
  s=$(elapsed "$t0" "$t1")
  record cold_pipeline_s "$1" "$2" "$s"
  log "cold  run $2 $(printf '%-5s' "$1") pipeline $s s"
}

daemon_cold_once() { # COMPRESSION RUN
  local c=$1 run=$2 state=$BENCH_DIR/state-cold r code t ticks0 ticks1 ms bytes n
  rm -rf "$state"
  start_daemon "$state" "$c" "daemon-cold-$c-$run"
  ticks0=$(cpu_ticks "${PID[nixery]}")
  r=$(curl -sS -o "$OUT/manifest-big-$c.json" -w '%{http_code} %{time_total}' \
    -H "Accept: $OCI_MANIFEST" "$DAEMON_BASE/v2/nix/big/manifests/latest") \
    || { err "cold $c run $run: curl failed"; stop_daemon; return 0; }
  ticks1=$(cpu_ticks "${PID[nixery]}")
  read -r code t <<<"$r"
  stop_daemon
  if [[ $code != 200 ]]; then
    err "cold $c run $run: HTTP $code: $(head -c 400 "$OUT/manifest-big-$c.json")"
    return 0
  fi
  ms=$(built_field "$OUT/daemon-cold-$c-$run.log" duration_ms)
  read -r bytes n < <(manifest_layers "$OUT/manifest-big-$c.json")
  record cold_daemon_s "$c" "$run" "$t"
  record cold_daemon_cpu_s "$c" "$run" "$(ticks_s "$ticks0" "$ticks1")"
  [[ -n $ms ]] && record cold_daemon_logged_ms "$c" "$run" "$ms"
  record layer_bytes "$c" "$run" "$bytes"
  record layer_count "$c" "$run" "$n"
  log "cold  run $run $(printf '%-5s' "$c") daemon   $t s (logged ${ms:-?} ms, $n layers, $bytes bytes)"
}

if has_phase cold; then
  for c in $COMPRESSIONS; do
    for run in $(seq "$RUNS"); do
      for side in $(in_turn "$run" "daemon_cold_once pipeline_once"); do "$side" "$c" "$run"; done
    done
  done
fi

# --------------------------------------------------------------------------
# 2. End to end: build + ctr pull + unpack, then a cached pull + unpack
# --------------------------------------------------------------------------
if has_phase e2e; then
  for run in $(seq "$E2E_RUNS"); do
    for c in $COMPRESSIONS; do
      state=$BENCH_DIR/state-e2e
      rm -rf "$state"
      start_daemon "$state" "$c" "daemon-e2e-$c-$run"
      start_containerd
      ctr_hosts
      ctr_pull nix.local/big:latest "ctr-e2e-cold-$c-$run"
      s=$PULL_S
      [[ $s == nan ]] || record e2e_cold_s "$c" "$run" "$s"
      stop_containerd
      start_containerd
      ctr_hosts
      ctr_pull nix.local/big:latest "ctr-e2e-warm-$c-$run"
      w=$PULL_S
      [[ $w == nan ]] || record e2e_cached_s "$c" "$run" "$w"
      stop_containerd
      stop_daemon
      log "e2e   run $run $(printf '%-5s' "$c") build+pull+unpack $s s, cached pull+unpack $w s"
    done
  done
fi

# --------------------------------------------------------------------------
# 3. Warm manifest latency, 4. sharing (one gzip daemon)
# --------------------------------------------------------------------------
if has_phase warm || has_phase share; then
  state=$BENCH_DIR/state-warm
  rm -rf "$state"
  start_daemon "$state" gzip daemon-warm
  log "building nix/big for the warm and sharing phases"
  code=$(curl -sS -o "$OUT/manifest-big.json" -w '%{http_code}' -H "Accept: $OCI_MANIFEST" \
    "$DAEMON_BASE/v2/nix/big/manifests/latest") || die "warm: curl failed"
  [[ $code == 200 ]] || die "warm: nix/big HTTP $code: $(head -c 400 "$OUT/manifest-big.json")"
fi

if has_phase warm; then
  for variant in oci ns; do
    if [[ $variant == oci ]]; then
      url=$DAEMON_BASE/v2/nix/big/manifests/latest accept=$OCI_MANIFEST
    else
      url="$DAEMON_BASE/v2/big/manifests/latest?ns=nix.local" accept=$CTR_ACCEPT
    fi
    for i in $(seq 20); do curl -sS -o /dev/null -H "Accept: $accept" "$url"; done # warm-up
    for i in $(seq "$WARM_CURLS"); do
      r=$(curl -sS -o /dev/null -w '%{http_code} %{time_total}' -H "Accept: $accept" "$url") \
        || { err "warm curl failed"; continue; }
      read -r code t <<<"$r"
      [[ $code == 200 ]] || { err "warm $variant: HTTP $code"; continue; }
      record warm_curl_ms "$variant" "$i" "$(awk -v t="$t" 'BEGIN { printf "%.3f", t * 1000 }')"
    done
    log "warm  $variant curl median $(med warm_curl_ms "$variant") ms over $WARM_CURLS"
  done
  wrk_lua "$OCI_MANIFEST"
  f=$OUT/wrk-warm.txt
  if wrk -t1 -c1 -d"$WRK_DURATION" --latency -s "$OUT/manifest.lua" \
    "$DAEMON_BASE/v2/nix/big/manifests/latest" >"$f" 2>&1; then
    non2xx=$(wrk_non2xx "$f")
    [[ -z $non2xx ]] || err "wrk saw $non2xx non-2xx responses"
    record wrk_p50_ms oci 1 "$(wrk_ms "$f" 50%)"
    record wrk_p99_ms oci 1 "$(wrk_ms "$f" 99%)"
    record wrk_rps oci 1 "$(wrk_rps "$f")"
    log "warm  wrk -c1: p50 $(med wrk_p50_ms oci) ms, $(med wrk_rps oci) req/s"
  else
    err "wrk failed; see $f"
  fi
  [[ $(grep -c 'built Nix image' "$OUT/daemon-warm.log") == 1 ]] \
    || err "warm: the daemon built more than once (see $OUT/daemon-warm.log)"
fi

if has_phase share; then
  start_containerd
  ctr_hosts
  ctr_pull nix.local/big:latest ctr-share-big
  record share_big_pull_s gzip 1 "$PULL_S"
  ctr_blobs >"$OUT/ctr-blobs-after-big.txt"
  snaps_big=$(ctr_ snapshots ls | tail -n +2 | wc -l)
  # medium is built on this pull (its shared layers already exist).
  ctr_pull nix.local/medium:latest ctr-share-medium
  record share_medium_pull_s gzip 1 "$PULL_S"
  ctr_blobs >"$OUT/ctr-blobs-after-medium.txt"
  snaps_medium=$(ctr_ snapshots ls | tail -n +2 | wc -l)
  fetched=$(comm -13 "$OUT/ctr-blobs-after-big.txt" "$OUT/ctr-blobs-after-medium.txt" | awk '{ s += $2 } END { print s + 0 }')
  fetched_n=$(comm -13 "$OUT/ctr-blobs-after-big.txt" "$OUT/ctr-blobs-after-medium.txt" | wc -l)
  stop_containerd
  code=$(curl -sS -o "$OUT/manifest-medium.json" -w '%{http_code}' -H "Accept: $OCI_MANIFEST" \
    "$DAEMON_BASE/v2/nix/medium/manifests/latest")
  [[ $code == 200 ]] || die "share: nix/medium HTTP $code"
  read -r medium_total medium_layers new_bytes new_layers shared_layers prefix < <(python3 - "$OUT/manifest-big.json" "$OUT/manifest-medium.json" <<'EOF'
import json, sys
big = json.load(open(sys.argv[1]))
med = json.load(open(sys.argv[2]))
have = {l["digest"] for l in big["layers"]}
new = [l for l in med["layers"] if l["digest"] not in have]
# Layers containerd can reuse unpacked: snapshots are keyed by the chain of
# layers below them, so only a common prefix of the two lists is shared.
prefix = 0
for a, b in zip(big["layers"], med["layers"]):
    if a["digest"] != b["digest"]:
        break
    prefix += 1
print(sum(l["size"] for l in med["layers"]), len(med["layers"]),
      sum(l["size"] for l in new), len(new), len(med["layers"]) - len(new), prefix)
EOF
  )
  record share_medium_total_bytes gzip 1 "$medium_total"
  record share_medium_new_layer_bytes gzip 1 "$new_bytes"
  record share_ctr_fetched_bytes gzip 1 "$fetched"
  record share_ctr_fetched_blobs gzip 1 "$fetched_n"
  record share_medium_layers gzip 1 "$medium_layers"
  record share_shared_layers gzip 1 "$shared_layers"
  record share_new_layers gzip 1 "$new_layers"
  record share_common_prefix gzip 1 "$prefix"
  record share_new_snapshots gzip 1 "$((snaps_medium - snaps_big))"
  ms=$(built_field "$OUT/daemon-warm.log" duration_ms name=medium)
  [[ -n $ms ]] && record share_medium_build_ms gzip 1 "$ms"
  log "share medium: $medium_layers layers ($medium_total bytes), $shared_layers shared with big; new layers $new_layers ($new_bytes bytes); containerd fetched $fetched_n blobs, $fetched bytes; common prefix $prefix layers, $((snaps_medium - snaps_big)) new snapshots"
fi
stop_daemon

# --------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
{
  echo
  echo "## nixery-local Nix images ($RUN_ID, git $GIT_REV)"
  echo
  echo "closure of nix/big: ${#CLOSURE[@]} store paths, $(mib "$CLOSURE_BYTES")"
  if has_phase cold; then
    echo
    echo "### cold build of nix/big: time to manifest vs the single-threaded pipeline (median of $RUNS)"
    echo
    echo "| compression | daemon | (logged build) | daemon CPU | pipeline | pipeline/daemon | layers | layer bytes | target | result |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---|:---:|"
    for c in $COMPRESSIONS; do
      d=$(med cold_daemon_s "$c") p=$(med cold_pipeline_s "$c")
      q=$(ratio "$p" "$d")
      echo "| $c | ${d} s | $(med cold_daemon_logged_ms "$c") ms | $(med cold_daemon_cpu_s "$c") s | ${p} s | ${q}× | $(med layer_count "$c") | $(mib "$(med layer_bytes "$c")") | > 1.0× | $(pass_if "$q" '>' 1.0) |"
    done
    echo
    echo "per run (s):"
    for c in $COMPRESSIONS; do
      echo "  $c: daemon $(values cold_daemon_s "$c" | tr '\n' ' ')/ pipeline $(values cold_pipeline_s "$c" | tr '\n' ' ')"
    done
  fi
  if has_phase e2e; then
    echo
    echo "### end to end, nix.local/big with containerd (median of $E2E_RUNS)"
    echo
    echo "| compression | build + pull + unpack | cached: pull + unpack |"
    echo "|---|---:|---:|"
    for c in $COMPRESSIONS; do
      echo "| $c | $(med e2e_cold_s "$c") s | $(med e2e_cached_s "$c") s |"
    done
    echo
    echo "per run (s):"
    for c in $COMPRESSIONS; do
      echo "  $c: cold $(values e2e_cold_s "$c" | tr '\n' ' ')/ cached $(values e2e_cached_s "$c" | tr '\n' ' ')"
    done
  fi
  if has_phase warm; then
    echo
    echo "### warm manifest GET (cached nix/big)"
    echo
    echo "| client | median | p90 | p99 | target | result |"
    echo "|---|---:|---:|---:|---|:---:|"
    for variant in oci ns; do
      m=$(med warm_curl_ms "$variant")
      echo "| curl ×$WARM_CURLS, $variant | $m ms | $(values warm_curl_ms "$variant" | quantile 0.9) ms | $(values warm_curl_ms "$variant" | quantile 0.99) ms | < 5 ms | $(pass_if "$m" '<' 5) |"
    done
    m=$(med wrk_p50_ms oci)
    echo "| wrk -t1 -c1 $WRK_DURATION ($(med wrk_rps oci) req/s) | $m ms | | $(med wrk_p99_ms oci) ms | < 5 ms | $(pass_if "$m" '<' 5) |"
  fi
  if has_phase share; then
    echo
    echo "### sharing: containerd pulls nix.local/big, then nix.local/medium"
    echo
    f=$(med share_ctr_fetched_bytes gzip) n=$(med share_medium_new_layer_bytes gzip) t=$(med share_medium_total_bytes gzip)
    echo "| metric | value |"
    echo "|---|---:|"
    echo "| medium: layers / shared with big / new | $(med share_medium_layers gzip) / $(med share_shared_layers gzip) / $(med share_new_layers gzip) |"
    echo "| medium: all layers | $(mib "$t") |"
    echo "| medium: layers not in big's manifest | $(mib "$n") |"
    echo "| containerd fetched for medium (new content-store blobs: $(med share_ctr_fetched_blobs gzip), incl. manifest + config) | $(mib "$f") ($f bytes) |"
    echo "| pull big / pull medium (incl. its build) | $(med share_big_pull_s gzip) s / $(med share_medium_pull_s gzip) s |"
    echo "| medium build (logged) | $(med share_medium_build_ms gzip) ms |"
    echo "| common leading layers (unpacked snapshots containerd can reuse) | $(med share_common_prefix gzip) |"
    echo "| new snapshots containerd unpacked for medium | $(med share_new_snapshots gzip) |"
    # Target: containerd fetched only the new layers (+ manifest, config,
    # at most a few KiB).
    echo
    echo "sharing target (fetched <= new layers + 64 KiB): $(awk -v f="$f" -v n="$n" 'BEGIN { print (f <= n + 65536) ? "PASS" : "FAIL" }')"
  fi
  echo
  echo "loadavg (end): $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "raw numbers and logs: $OUT"
  if ((${#ERRORS[@]})); then
    echo
    echo "ERRORS:"
    printf '  %s\n' "${ERRORS[@]}"
  fi
} | tee "$OUT/summary.md"

((${#ERRORS[@]} == 0)) || exit 1

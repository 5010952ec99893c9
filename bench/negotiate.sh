#!/usr/bin/env bash
# bench/negotiate.sh: issue #10, what per-client layer-compression
# negotiation costs, on the test package set's `big` image (nix/big: 24
# store paths, ~470 MiB, 25 layers). With the default compression (zstd),
# the daemon tells a Docker engine before 23 by its User-Agent and builds it
# the same image with gzip layers, cached as a variant of its own.
#
#   1. second-variant build: a default daemon on a fresh state dir serves
#      nix/big to containerd's User-Agent (the zstd build), then to Docker
#      20.10's: that second GET builds the gzip variant and is what is timed
#      (curl's time_total, and the daemon's CPU over it). Baseline, in the
#      same loop: a fresh daemon with --layer-compression gzip building
#      nix/big for Docker 20.10's User-Agent, what a gzip-only daemon pays.
#      Median of $RUNS runs, alternating which goes first; the closure is
#      realised and in the page cache before the runs.
#                     Expect: negotiated/gzip-only ~ 1.0 (a gzip build, no more)
#   2. per-request overhead: wrk on the manifest GET of the cached nix/big
#      (both variants built) with Docker 20.10's User-Agent and with
#      containerd's, the same Accept (containerd's); median of $WRK_RUNS
#      alternating runs after a 2 s warm-up each, in which wrk checks that
#      every answer has the client's compression.
#                     Expect: docker/containerd req/s ~ 1.0
#   3. disk: bytes of the state dir's blobs/ after the zstd build, and after
#      both (every negotiated run); a gzip-only daemon's for comparison.
#                     Expect: both/zstd-only ~ 2.0 (gzip layers are not smaller)
#
# The answers are checked, and a failed check is an error: Docker 20.10
# gets gzip layers (Docker's or OCI's gzip media type, blobs starting with
# gzip's magic bytes), containerd gets zstd (`+zstd`, zstd's magic), the two
# manifests differ, and the cached image is served without a new build.
#
# Prints a summary table. Exit status 0 whatever the numbers (this is a
# report); non-zero if something failed to run or a check failed. Raw
# numbers, manifests, daemon and wrk logs go to
# $BENCH_DIR/results/<timestamp>/; the state dirs (~1 GiB) are removed at
# exit.
#
# Needs nix-bin, curl, wrk, python3, GNU tar.
#
# Knobs (environment variables):
#   BENCH_DIR=/tmp/nixery-bench-negotiate  RUNS=5
#   WRK_RUNS=5  WRK_THREADS=2  WRK_CONNS=32  WRK_DURATION=10s
#   DOCKER_UA='docker/20.10.24+dfsg1 go/go1.19.8 ... UpstreamClient(...)'
#   CONTAINERD_UA=containerd/1.6.20
#   NIXERY_BIN=path  (default: cargo build --release, then
#                     ${CARGO_TARGET_DIR:-target}/release/nixery-local)
#   BUILD=1          (0: do not run cargo build)
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/tmp/nixery-bench-negotiate}
RUNS=${RUNS:-5}
WRK_RUNS=${WRK_RUNS:-5}
WRK_THREADS=${WRK_THREADS:-2}
WRK_CONNS=${WRK_CONNS:-32}
WRK_DURATION=${WRK_DURATION:-10s}
DOCKER_UA=${DOCKER_UA:-'docker/20.10.24+dfsg1 go/go1.19.8 git-commit/5d6db84 kernel/6.1.0 os/linux arch/amd64 UpstreamClient(Docker-Client/20.10.24+dfsg1 \(linux\))'}
CONTAINERD_UA=${CONTAINERD_UA:-containerd/1.6.20}

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init

declare -A UA=([docker]=$DOCKER_UA [containerd]=$CONTAINERD_UA)
REPO_NAME=nix/big # for manifest_url (wrk)
TAG=latest

need_tools nix-build nix-store curl wrk python3 tar
tar --version | head -1 | grep -q 'GNU tar' || die "GNU tar needed"

machine_info \
  nix "$(nix-build --version)" \
  wrk "$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2 || true)" \
  rustc "$(rustc --version 2>/dev/null || echo n/a)" \
  params "runs=$RUNS wrk=${WRK_RUNS}x(-t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION)" \
  docker-ua "$DOCKER_UA" \
  containerd-ua "$CONTAINERD_UA"
build_nixery

nix_realise big cacert iana-etc
nix_closure "${OUTS[@]}"
machine_line "big closure" "${#CLOSURE[@]} paths, $CLOSURE_BYTES bytes"
warm_paths "${CLOSURE[@]}"

# --------------------------------------------------------------------------
# Requests and checks
# --------------------------------------------------------------------------
# get_big CLIENT FILE: the manifest of nix/big as CLIENT (docker or
# containerd) asks for it, into FILE; the seconds it took in GOT_S. Records
# an error and fails unless it answers 200.
get_big() {
  local r code
  r=$(curl -sS -o "$2" -w '%{http_code} %{time_total}' -H "Accept: $CTR_ACCEPT" \
    -H "User-Agent: ${UA[$1]}" "$DAEMON_BASE/v2/$REPO_NAME/manifests/$TAG") \
    || { err "$1: manifest GET failed"; return 1; }
  read -r code GOT_S <<<"$r"
  [[ $code == 200 ]] || { err "$1: manifest GET: HTTP $code: $(head -c 400 "$2")"; return 1; }
}

# check_manifest CLIENT FILE: FILE's layers have the compression CLIENT
# reads, in media type and in the first bytes of every layer blob (a Range
# GET each from the running daemon). An error otherwise.
check_manifest() {
  local out rc=0
  out=$(python3 - "$1" "$2" "$DAEMON_BASE/v2/$REPO_NAME/blobs/" 2>&1 <<'EOF'
import json, sys, urllib.request
client, path, blobs = sys.argv[1:]
m = json.load(open(path))
if client == "docker":
    types = ("application/vnd.docker.image.rootfs.diff.tar.gzip", "application/vnd.oci.image.layer.v1.tar+gzip")
    ok_type, magic = (lambda t: t in types), b"\x1f\x8b"
else:
    ok_type, magic = (lambda t: t.endswith("+zstd")), b"\x28\xb5\x2f\xfd"
bad = []
layers = m.get("layers") or []
if not layers:
    bad.append("no layers")
for l in layers:
    if not ok_type(l["mediaType"]):
        bad.append(f'{l["digest"][:19]}: media type {l["mediaType"]}')
        continue
    req = urllib.request.Request(blobs + l["digest"], headers={"Range": "bytes=0-3"})
    with urllib.request.urlopen(req, timeout=30) as r:
        head = r.read(4)
    if not head.startswith(magic):
        bad.append(f'{l["digest"][:19]}: starts with {head.hex()}')
if bad:
    print(f"{client}: {path.rsplit('/', 1)[-1]}: {len(bad)} of {len(layers)} layers wrong: " + "; ".join(bad[:2]))
    sys.exit(1)
print(f'{m.get("mediaType")}, {len(layers)} layers of {layers[0]["mediaType"]}')
EOF
  ) || rc=$?
  if ((rc)); then
    err "${out:-$1: checking $2 failed}"
    return 1
  fi
  log "check $1: $out"
}

# shellcheck disable=SC2317  # used by the functions in_turn invokes
blobs_bytes() { du -sb "$1/blobs" | cut -f1; } # STATE_DIR
builds_in() { grep -c 'built Nix image' "$1" || true; } # LOG -> how many builds it logged

# --------------------------------------------------------------------------
# 1. Second-variant build vs a gzip-only daemon; 3. disk
# --------------------------------------------------------------------------
NEG_STATE=$BENCH_DIR/state-negotiated
GZIP_STATE=$BENCH_DIR/state-gzip-only
# shellcheck disable=SC2317  # invoked at exit
rm_states() { rm -rf "$NEG_STATE" "$GZIP_STATE"; } # ~1 GiB
ON_EXIT+=(rm_states)

# shellcheck disable=SC2317  # invoked via in_turn
negotiated_once() { # RUN
  local run=$1 log=daemon-negotiated-$1 t0 t1 zf df
  zf=$OUT/manifest-containerd-$run.json df=$OUT/manifest-docker-$run.json
  rm -rf "$NEG_STATE"
  start_daemon "$NEG_STATE" default "$log"
  if get_big containerd "$zf"; then
    record first_zstd_s negotiated "$run" "$GOT_S"
    record blobs_bytes zstd_only "$run" "$(blobs_bytes "$NEG_STATE")"
    log "build run $run negotiated: zstd for containerd $GOT_S s"
    t0=$(cpu_ticks "${PID[nixery]}")
    if get_big docker "$df"; then
      t1=$(cpu_ticks "${PID[nixery]}")
      record build_s negotiated "$run" "$GOT_S"
      record build_cpu_s negotiated "$run" "$(ticks_s "$t0" "$t1")"
      record build_logged_ms negotiated "$run" "$(built_field "$OUT/$log.log" duration_ms)"
      record blobs_bytes both "$run" "$(blobs_bytes "$NEG_STATE")"
      log "build run $run negotiated: then gzip for Docker 20.10 $GOT_S s ($(ticks_s "$t0" "$t1") s CPU)"
      check_manifest containerd "$zf" || true
      check_manifest docker "$df" || true
      cmp -s "$zf" "$df" && err "run $run: Docker 20.10 and containerd got the same manifest"
      [[ $(builds_in "$OUT/$log.log") == 2 ]] \
        || err "run $run: the negotiated daemon logged $(builds_in "$OUT/$log.log") builds, expected 2"
    fi
  fi
  stop_daemon
}

# shellcheck disable=SC2317  # invoked via in_turn
gzip_only_once() { # RUN
  local run=$1 log=daemon-gzip-only-$1 state=$GZIP_STATE t0 t1 f
  f=$OUT/manifest-gzip-only-$run.json
  rm -rf "$state"
  start_daemon "$state" gzip "$log"
  t0=$(cpu_ticks "${PID[nixery]}")
  if get_big docker "$f"; then
    t1=$(cpu_ticks "${PID[nixery]}")
    record build_s gzip_only "$run" "$GOT_S"
    record build_cpu_s gzip_only "$run" "$(ticks_s "$t0" "$t1")"
    record build_logged_ms gzip_only "$run" "$(built_field "$OUT/$log.log" duration_ms)"
    record blobs_bytes gzip_only "$run" "$(blobs_bytes "$state")"
    log "build run $run gzip-only:  gzip for Docker 20.10 $GOT_S s ($(ticks_s "$t0" "$t1") s CPU)"
    check_manifest docker "$f" || true
  fi
  stop_daemon
}

for run in $(seq "$RUNS"); do
  for side in $(in_turn "$run" "negotiated_once gzip_only_once"); do "$side" "$run"; done
done

# The two daemons' gzip images should be the same bytes (layers are
# deterministic); reported, not an error.
SAME_GZIP=n/a
if [[ -f $OUT/manifest-docker-1.json && -f $OUT/manifest-gzip-only-1.json ]]; then
  cmp -s "$OUT/manifest-docker-1.json" "$OUT/manifest-gzip-only-1.json" && SAME_GZIP=yes || SAME_GZIP=no
  log "gzip variant and gzip-only daemon's manifest identical: $SAME_GZIP"
fi

# --------------------------------------------------------------------------
# 2. Warm manifest GETs, Docker 20.10 vs containerd, on the last negotiated
#    run's state (both variants cached)
# --------------------------------------------------------------------------
[[ -d $NEG_STATE/blobs ]] || die "no negotiated state dir to serve"
start_daemon "$NEG_STATE" default daemon-warm
for c in docker containerd; do
  BASE[$c]=$DAEMON_BASE
  WRK_HEADER[$c]="User-Agent: ${UA[$c]}"
  if get_big "$c" "$OUT/manifest-warm-$c.json"; then check_manifest "$c" "$OUT/manifest-warm-$c.json" || true; fi
done
wrk_lua "$CTR_ACCEPT"
wrk_check docker gzip zstd # the warm-up, checked
wrk_check containerd zstd gzip
for run in $(seq "$WRK_RUNS"); do
  for c in $(in_turn "$run" "docker containerd"); do wrk_once "$c" "$run"; done
done
for c in docker containerd; do # still the right variant for each, after the load
  get_big "$c" "$OUT/manifest-after-$c.json" || continue
  cmp -s "$OUT/manifest-warm-$c.json" "$OUT/manifest-after-$c.json" \
    || err "$c got a different manifest after the wrk runs"
done
cmp -s "$OUT/manifest-warm-docker.json" "$OUT/manifest-warm-containerd.json" \
  && err "warm: Docker 20.10 and containerd got the same manifest"
[[ $(builds_in "$OUT/daemon-warm.log") == 0 ]] \
  || err "warm: the daemon built again ($(builds_in "$OUT/daemon-warm.log") builds; see $OUT/daemon-warm.log)"
stop_daemon

machine_end

# --------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------
echo
echo "## per-client compression negotiation, nix/big ($RUN_ID, git $GIT_REV)"
echo "closure: ${#CLOSURE[@]} store paths, $CLOSURE_BYTES bytes; gzip variant = gzip-only daemon's image: $SAME_GZIP"
summary_py "$RAW" "$OUT/summary.md" "$RUNS" "$WRK_RUNS" <<'EOF'
runs, wrk_runs = args

def fmt(v, scale, unit, prec=2):
    return "n/a" if v is None else f"{v / scale:,.{prec}f} {unit}".rstrip()

rows = []
def row(name, metric, a, b, scale, unit, prec=2):
    x, y = med(metric, a), (med(metric, b) if b else None)
    rows.append((name, fmt(x, scale, unit, prec), "" if b is None else fmt(y, scale, unit, prec),
                 "" if b is None else rfmt(ratio(x, y))))

row(f"gzip build for Docker 20.10, time to manifest (median of {runs})", "build_s", "negotiated", "gzip_only", 1, "s")
row("  daemon CPU over it", "build_cpu_s", "negotiated", "gzip_only", 1, "s")
row("  logged build", "build_logged_ms", "negotiated", "gzip_only", 1, "ms", 0)
row("  (before it: zstd build for containerd)", "first_zstd_s", "negotiated", None, 1, "s")
row(f"warm manifest GET/s, wrk (median of {wrk_runs}): Docker 20.10 / containerd", "wrk_rps", "docker", "containerd", 1, "req/s", 0)
row("  p99 latency", "wrk_p99_ms", "docker", "containerd", 1, "ms")
row("state blobs: both variants / zstd only", "blobs_bytes", "both", "zstd_only", MiB, "MiB", 1)
row("  (gzip-only daemon)", "blobs_bytes", "gzip_only", None, MiB, "MiB", 1)

print_table(("metric", "subject", "baseline", "ratio"), rows)
print_per_run(16, 10)
EOF

bench_finish

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
#   NIXERY_BIN=path              (default: cargo build --release, then
#                                 ${CARGO_TARGET_DIR:-target}/release/nixery-local)
#   BUILD=1                      (0: do not run cargo build)
#   PROXY=1                      (0: skip docker-registry's proxy mode)
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/tmp/nixery-bench}
BLOB_MIB=${BLOB_MIB:-1024}
RUNS=${RUNS:-3}
CLIENTS=${CLIENTS:-32}
UPSTREAM_MIBPS=${UPSTREAM_MIBPS:-0}
PROXY=${PROXY:-1}

RESULTS_PREFIX=mirror-
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init

SERVERS="direct nixery"
[[ $PROXY == 1 ]] && SERVERS="$SERVERS proxy"

declare -A STATE

# shellcheck disable=SC2317  # invoked at exit
remove_caches() { rm -rf "$BENCH_DIR/mirror-nixery-state" "$BENCH_DIR/mirror-proxy-storage"; }
ON_EXIT+=(remove_caches)

need_tools curl skopeo python3 sha256sum openssl docker-registry
if ((UPSTREAM_MIBPS > 0)); then command -v rustc >/dev/null || die "UPSTREAM_MIBPS needs rustc"; fi

# --------------------------------------------------------------------------
# Machine info and build
# --------------------------------------------------------------------------
machine_info \
  docker-registry "$(docker-registry --version 2>&1 | head -1)" \
  curl "$(curl --version | head -1 | cut -d' ' -f1-2)" \
  params "blob=${BLOB_MIB}MiB runs=$RUNS clients=$CLIENTS upstream_mibps=$UPSTREAM_MIBPS servers='$SERVERS'"
build_nixery

# The same layout as registry.sh (cached, shared with it)
blob_layout
log "layer $LAYER_DIGEST, manifest $MANIFEST_DIGEST"

# --------------------------------------------------------------------------
# The upstream registry (access log on: it is how upstream GETs are counted)
# --------------------------------------------------------------------------
UP_LOG=$OUT/upstream-access.log
start_registry upstream "$BENCH_DIR/mirror-upstream-storage" accesslog="$UP_LOG"
UP_HOST=${BASE[upstream]#http://}
log "upstream docker-registry on $UP_HOST"
push_blob_layout upstream

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
start_mirror() {
  STATE[nixery]=$BENCH_DIR/mirror-nixery-state
  rm -rf "${STATE[nixery]}"
  mkdir -p "${STATE[nixery]}"
  start_nixery nixery --state-dir "${STATE[nixery]}" \
    --default-registry "$UP_HOST" --upstream "$UP_HOST=$UPSTREAM_URL"
}

start_proxy() {
  STATE[proxy]=$BENCH_DIR/mirror-proxy-storage
  rm -rf "${STATE[proxy]}"
  start_registry proxy "${STATE[proxy]}" delete=true proxy="$UPSTREAM_URL"
}

fresh() { # nixery|proxy|direct: a server with an empty cache
  case $1 in
    direct) ;;
    nixery) stop_server nixery; start_mirror ;;
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

pull_once() { # SERVER METRIC RUN
  local t
  get_checked "$1: $2 run $3" "$(blob_url "$1")" time_total "$BLOB_BYTES" || return 0
  t=$GOT
  record "$2" "$1" "$3" "$t"
  log "$(printf '%-6s run %s %-7s %6.2f s %7.0f MiB/s' "$2" "$3" "$1" "$t" "$(awk -v t="$t" -v b="$BLOB_BYTES" 'BEGIN { print b / t / 1048576 }')")"
}

# Warm the upstream's page cache (and check its bytes) before measuring.
got=$(url_sha256 "$(blob_url direct)") || die "direct blob GET failed"
[[ sha256:$got == "$LAYER_DIGEST" ]] || die "upstream blob digest sha256:$got != $LAYER_DIGEST"

# --------------------------------------------------------------------------
# 1-2. Cold pulls, 1 client, alternating; upstream GETs per cold pull
# --------------------------------------------------------------------------
for run in $(seq "$RUNS"); do
  for s in $(in_turn "$run" "$SERVERS"); do
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
  got=$(url_sha256 "$(blob_url "$s")") || err "$s: verification GET failed"
  [[ sha256:$got == "$LAYER_DIGEST" ]] || err "$s: served sha256:$got, expected $LAYER_DIGEST"
done

# --------------------------------------------------------------------------
# 3. Warm pulls: the caches of the last cold runs are still there
# --------------------------------------------------------------------------
before=$(upstream_gets)
for run in $(seq "$RUNS"); do
  for s in $(in_turn "$run" "$SERVERS"); do pull_once "$s" warm "$run"; done
done
# (direct pulls are upstream GETs too)
record warm_upstream_gets cache 0 "$(($(upstream_gets) - before - RUNS))"

# --------------------------------------------------------------------------
# 4. $CLIENTS concurrent cold pulls
# --------------------------------------------------------------------------
concurrent() { # SERVER
  local s=$1 t0 t1 ok before dt gets
  fresh "$s"
  before=$(upstream_gets)
  t0=$(now)
  curls_start "$CLIENTS" "$(blob_url "$s")" "$OUT/conc-$s"
  curls_wait
  t1=$(now)
  ok=$(curls_ok "$CLIENTS" "$OUT/conc-$s" "$BLOB_BYTES")
  ((ok == CLIENTS)) || err "$s: only $ok/$CLIENTS concurrent pulls completed (see $OUT/conc-$s-*.txt)"
  wait_cached "$s"
  sleep 0.3
  dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
  gets=$(($(upstream_gets) - before))
  record conc_s "$s" 0 "$dt"
  record conc_upstream_gets "$s" 0 "$gets"
  log "$(printf 'concurrent %-7s %d clients %6.2f s, %d upstream GETs' "$s" "$CLIENTS" "$dt" "$gets")"
}
for s in $SERVERS; do concurrent "$s"; done
stop_server nixery
stop_server proxy

machine_end

# --------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------
summary_py "$RAW" "$OUT/summary.md" "$CLIENTS" "$BLOB_BYTES" <<'EOF'
clients, size = int(args[0]), int(args[1])

def secs(v):
    return "n/a" if v is None else f"{v:.2f} s ({size / v / MiB:,.0f} MiB/s)"
def conc(v):
    return "n/a" if v is None else f"{v:.2f} s ({clients * size / v / MiB:,.0f} MiB/s agg.)"
def num(v):
    return "n/a" if v is None else f"{v:g}"

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

print_table(("metric", "direct", "nixery-local", "registry proxy", "ratio", "target", "result"), rows)
print_per_run(20, 7)
EOF

bench_finish

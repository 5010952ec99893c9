#!/usr/bin/env bash
# Checks the README's promise that `tests/run.sh` works on a fresh Debian
# machine: runs it in a NEW Debian bookworm (debootstrap's minbase, none of
# the test packages: tests/nspawn-root.sh plain) under systemd-nspawn, so
# tests/run.sh itself must install everything the suite needs.
#
#   tests/fresh-machine.sh                    # as root, on a clone of HEAD
#   tests/fresh-machine.sh --user             # as a user with sudo, as the
#                                             # README also promises
#   tests/fresh-machine.sh -- cargo --version # another command, in the clone
#
# Options:
#   --user           run as the user `tester` (NOPASSWD sudo) instead of root
#   --working-tree   copy the working tree's changes (tracked and untracked,
#                    not ignored) over the clone: uncommitted work is checked
#   --keep           keep the machine's root afterwards and print its path
#   --build-cache DIR  keep cargo's target dir and CARGO_HOME in DIR between
#                    runs (both: cargo rebuilds crates unpacked anew): for
#                    iterating on a failure, not for the check itself
#
# The machine is a fresh copy of the cached root each run. The host's Rust
# (rustup: $RUSTUP_HOME or ~/.rustup, and the proxies in $CARGO_HOME/bin or
# ~/.cargo/bin) is bound in read-only; CARGO_HOME inside is new, so crates
# come from crates.io. The machine shares the host's network because apt
# must reach Debian's mirror: this checks an installer, it is not a test
# server (the suite's servers listen on loopback; the booted-service test
# makes its own private network).
#
# Needs root, debootstrap, systemd-nspawn (systemd-container) and git.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
user=
working_tree=0
keep=0
build_cache=
command=(tests/run.sh)

die() { echo "fresh-machine: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --user) user=tester; shift ;;
        --working-tree) working_tree=1; shift ;;
        --keep) keep=1; shift ;;
        --build-cache) [ $# -ge 2 ] || die "--build-cache needs a directory"; build_cache=$2; shift 2 ;;
        --) shift; [ $# -gt 0 ] || die "-- needs a command"; command=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (systemd-nspawn needs it)"
command -v git >/dev/null || die "git missing (apt-get install git)"
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
[ -d "$rustup_home/toolchains" ] || die "no rustup toolchains in $rustup_home (set RUSTUP_HOME)"
[ -x "$cargo_bin/cargo" ] || die "no cargo in $cargo_bin (set CARGO_HOME)"

cached=$("$repo/tests/nspawn-root.sh" plain | tail -n1)
cache=$(dirname "$cached")
mkdir -p "$cache/runs"
root=$cache/runs/fresh-$$
rm -rf "$root"
# shellcheck disable=SC2317  # called by the trap
cleanup() {
    if [ "$keep" = 1 ]; then
        echo "fresh-machine: kept $root" >&2
    else
        rm -rf "$root"
    fi
}
trap cleanup EXIT
cp -a --reflink=auto "$cached" "$root"
# A hostname that resolves, as the Debian installer leaves it (sudo asks).
echo fresh-machine >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tfresh-machine\n' >"$root/etc/hosts"
# The host's own CAs (a TLS-inspecting egress proxy, say) belong to the
# network, not to the machine: the ca-certificates package that
# tests/run.sh installs adds them to the store cargo uses for crates.io.
if [ -d /usr/local/share/ca-certificates ]; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi

# The user and sudo, as on a developer's machine. apt runs in the machine
# with the host's network (the root has no sudo yet: minbase).
in_machine() {
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -q -D "$root" \
        --register=no --keep-unit --pipe -E DEBIAN_FRONTEND=noninteractive "$@" </dev/null
}
if [ -n "$user" ]; then
    in_machine sh -ec "apt-get update -q && apt-get install -y -q --no-install-recommends sudo && apt-get clean" >&2
    in_machine useradd --create-home --shell /bin/bash "$user"
    echo "$user ALL=(ALL:ALL) NOPASSWD: ALL" >"$root/etc/sudoers.d/$user"
    chmod 0440 "$root/etc/sudoers.d/$user"
    home=/home/$user
else
    home=/root
fi

# A clone of the checkout: what is committed, not what lies around.
git clone --quiet --no-hardlinks "$repo" "$root$home/nixery-local"
if [ "$working_tree" = 1 ]; then
    # Changed and new files (not ignored ones), and deletions.
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -) | tar -C "$root$home/nixery-local" -xf -
    (cd "$repo" && git ls-files -z --deleted) |
        (cd "$root$home/nixery-local" && xargs -0 -r rm -f --)
    echo "fresh-machine: with the working tree's changes" >&2
fi
if [ -n "$user" ]; then
    in_machine chown -R "$user:$user" "$home/nixery-local"
fi

echo "fresh-machine: running ${command[*]} as ${user:-root} in $root" >&2
start=$(date +%s)
status=0
extra=()
as_user=()
# Not nspawn's --user: that runs its stub PID 1 as the user too, and then
# root (through sudo) may not read PID 1's limits, which a nested nspawn
# does. On a real machine PID 1 is root's.
if [ -n "$user" ]; then
    as_user=(runuser -u "$user" --)
fi
cargo_home=$home/.cargo
if [ -n "$build_cache" ]; then
    mkdir -p "$build_cache/target" "$build_cache/cargo-home"
    build_cache=$(cd "$build_cache" && pwd)
    cargo_home=/var/tmp/cargo-home
    extra+=(--bind="$build_cache/target:/var/tmp/cargo-target" -E CARGO_TARGET_DIR=/var/tmp/cargo-target)
    extra+=(--bind="$build_cache/cargo-home:$cargo_home")
    [ -z "$user" ] || chown "$(stat -c %u:%g "$root$home")" "$build_cache/target" "$build_cache/cargo-home"
fi
# The suite runs containers (containerd, dockerd, podman) and boots a Debian
# itself, so the machine is as privileged as the host: every capability,
# keyctl and bpf allowed (runc and nspawn use them), and the host's cgroup
# tree bound in read-write (the legacy layout: nspawn's own is read-only,
# and its unified one has no controllers here). /tmp is the root's, on
# disk, not nspawn's small tmpfs: the tests put container roots there.
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=0 SYSTEMD_NSPAWN_TMPFS_TMP=0 systemd-nspawn -q -D "$root" \
    --register=no --keep-unit --as-pid2 --pipe --hostname=fresh-machine \
    --capability=all --system-call-filter='keyctl add_key request_key bpf' \
    --bind=/sys/fs/cgroup "${extra[@]}" \
    --bind-ro="$rustup_home:/opt/rustup" --bind-ro="$cargo_bin:/opt/cargo-bin" \
    --chdir="$home/nixery-local" \
    -E HOME="$home" -E RUSTUP_HOME=/opt/rustup -E CARGO_HOME="$cargo_home" \
    -E RUSTUP_AUTO_INSTALL=0 -E LANG=C.UTF-8 \
    -E PATH="/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "${as_user[@]}" "${command[@]}" </dev/null || status=$?
echo "fresh-machine: ${command[*]} as ${user:-root} exited $status after $(( $(date +%s) - start )) s" >&2
exit "$status"

#!/usr/bin/env bash
# Prepares a Debian bookworm root for systemd-nspawn and prints its path (the
# last line of stdout; progress goes to stderr).
#
#   tests/nspawn-root.sh booted   # for tests/service_booted.rs: systemd, Nix
#                                 # with its daemon, containerd, busybox, ...
#   tests/nspawn-root.sh plain    # for tests/fresh-machine.sh: debootstrap's
#                                 # minbase and nothing else
#
# Roots are kept between runs in $NIXERY_LOCAL_TEST_CACHE (default
# /var/cache/nixery-local-tests, outside the git clone), named by a hash of
# what goes into them, so changing the package list builds a new root. A root
# is built in a temporary directory and renamed into place when complete;
# a lock per root makes racing callers wait for one build. Callers copy the
# root and never change the cached one.
#
# Needs root, debootstrap and systemd-nspawn (systemd-container), and Debian's
# mirror (packages are downloaded with the host's network; nothing else is).
set -euo pipefail

kind=${1:-}
cache=${NIXERY_LOCAL_TEST_CACHE:-/var/cache/nixery-local-tests}
mirror=${NIXERY_LOCAL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm

die() { echo "nspawn-root: $*" >&2; exit 1; }

case "$kind" in
booted)
    packages=(
        systemd systemd-sysv dbus      # booted with systemd-nspawn -b
        nix-bin nix-setup-systemd      # Nix, multi-user: nix-daemon.socket
        containerd runc                # ctr pulls and runs through the service
        busybox-static                 # the tests' package set builds with it
        adduser                        # the .deb's postinst creates its user
        ca-certificates procps iproute2 curl  # the test's probes
    )
    ;;
plain)
    # A fresh machine: tests/run.sh must install everything else itself.
    packages=()
    ;;
*)
    die "usage: $0 booted|plain"
    ;;
esac

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and systemd-nspawn need it)"
command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"
command -v systemd-nspawn >/dev/null || die "systemd-nspawn missing (apt-get install systemd-container)"

# Bump when the recipe below changes in a way the package list does not show.
recipe=1
key=$(printf '%s\n' "$recipe" "$suite" "$mirror" minbase "${packages[@]}" | sha256sum | cut -c1-12)
name=$suite-$kind-$key
final=$cache/$name

mkdir -p "$cache"
exec 9>"$cache/.$name.lock"
flock 9
if [ -d "$final" ]; then
    echo "$final"
    exit 0
fi

# Leftovers of a build that died (we hold the lock, so none is running).
rm -rf "$cache/.tmp-$name".*
tmp=$(mktemp -d "$cache/.tmp-$name.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
echo "nspawn-root: building $final (debootstrap $suite from $mirror)" >&2
start=$(date +%s)

debootstrap --variant=minbase "$suite" "$root" "$mirror" >&2

# The same suites as a Debian install: updates and security fixes.
security=${mirror%/debian}/debian-security
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

if [ "${#packages[@]}" -gt 0 ]; then
    # Not booted: apt runs as the container's only process, with the host's
    # network to reach the mirror. Units are enabled, not started.
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -q -D "$root" \
        --register=no --keep-unit --pipe \
        -E DEBIAN_FRONTEND=noninteractive \
        sh -ec "apt-get update -q && apt-get install -y -q --no-install-recommends $(printf '%q ' "${packages[@]}") && apt-get clean" \
        </dev/null >&2
fi
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
# Each container gets its own machine id (nspawn makes one when it is empty).
: >"$root/etc/machine-id"

mv "$root" "$tmp/$name"
mv -T "$tmp/$name" "$final"
echo "nspawn-root: built $final in $(( $(date +%s) - start )) s" >&2
echo "$final"

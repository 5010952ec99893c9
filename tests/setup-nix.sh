#!/usr/bin/env bash
# Makes the host's Nix usable for the tests: Debian's nix-bin, single-user
# as root (no nix-daemon runs in CI), building with busybox and no network.
# Fails loudly if Nix cannot build: a Nix test that cannot run is a failure.
set -euo pipefail

command -v nix-build >/dev/null || { echo "setup-nix: nix-build missing (apt-get install nix-bin)" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "setup-nix: /bin/busybox missing (apt-get install busybox-static)" >&2; exit 1; }

# Single-user as root: no daemon runs in CI (Debian's environment.d sets
# NIX_REMOTE=daemon only in systemd user sessions).
unset NIX_REMOTE
mkdir -p /etc/nix
touch /etc/nix/nix.conf
# Debian ships sandbox = false; the builds read /bin/busybox from the host.
if ! grep -qs '^sandbox *= *false' /etc/nix/nix.conf; then
    echo 'sandbox = false' >> /etc/nix/nix.conf
fi
# Debian's nix-bin creates no build users: as root, Nix then refuses to
# build ("the group 'nixbld' ... does not exist") unless builds run as root.
# nix-setup-systemd creates the group; without it, build as root.
if ! getent group nixbld >/dev/null && ! grep -qs '^build-users-group' /etc/nix/nix.conf; then
    echo 'build-users-group =' >> /etc/nix/nix.conf
fi

# --init creates the database and /nix/var/nix. Doing it now avoids a race
# between the first Nix calls of tests running in parallel on a fresh store.
nix-store --init

# Prove a build works now rather than in the middle of a test.
# shellcheck disable=SC2016  # Nix code, not shell: $out is for Nix
out=$(nix-build --option substituters ""  --no-out-link -E 'derivation {
    name = "nixery-local-setup-check"; system = builtins.currentSystem;
    builder = "/bin/busybox"; args = [ "sh" "-c" "echo ok > $out" ]; }' 2>&1) || {
    echo "setup-nix: a trivial Nix build failed:" >&2
    echo "$out" >&2
    exit 1
}
echo "setup-nix: nix builds work ($(nix-build --version))"

#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine: installs the real
# clients and servers the tests drive, then formatting, lints and tests.
# Needs root (containerd runs containers); as a user, it asks sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

# Root: the containerd tests mount overlayfs and start containers. A user
# with sudo is asked once here; as root, sudo need not exist.
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || {
        echo "tests/run.sh: run as root: the containerd tests mount overlayfs and start containers (sudo is not installed)" >&2
        exit 1
    }
    exec sudo --preserve-env=PATH,CARGO_HOME,RUSTUP_HOME,HOME "$PWD/tests/run.sh" "$@"
fi

packages=(
    containerd runc      # a real containerd pulls and runs the images
    skopeo               # a second real client: inspect and copy
    podman               # podman 4.3 pulls through the drop-in setup writes (runs with runc)
    docker.io            # Debian's Docker 20.10: pulls Nix images (no zstd)
    docker-registry      # CNCF distribution, an upstream registry
    nix-bin              # builds the tests' package set for Nix images
    busybox-static       # the one binary in the test images and package set
    systemd              # systemd-analyze verifies the units
    systemd-container debootstrap  # service_booted.rs boots a Debian (cached in /var/cache/nixery-local-tests)
    chromium             # renders the status page headless
    adduser binutils dpkg-dev  # the .deb: its Depends, strip, dpkg-shlibdeps
    apache2-utils openssl  # htpasswd, a test CA and signed tokens for the upstream tests
    curl jq ca-certificates
    git                  # --pkgs-repo package sets (and their unit test) fetch with git
    gcc libc6-dev        # cargo links with cc; ring and zstd-sys compile C (rustup ships no linker)
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Nix runs single-user as root here, building with busybox and no sandbox.
tests/setup-nix.sh
unset NIX_REMOTE

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked

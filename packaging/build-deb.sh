#!/usr/bin/env bash
# Builds the Debian package: target/debian/nixery-local_<version>_<arch>.deb.
#
#   packaging/build-deb.sh                  # cargo build --release --locked, then package
#   packaging/build-deb.sh --binary PATH    # package an already-built binary
#
# Options:
#   --binary PATH        package PATH as /usr/bin/nixery-local instead of
#                        building (it must print the Cargo.toml version)
#   --out-dir DIR        where the .deb goes [default: target/debian]
#   --compression KIND   dpkg-deb -Z: xz, gzip, zstd or none [default: xz]
#   --no-strip           keep the binary's symbols and line tables
#
# Needs dpkg-deb (dpkg) and strip (binutils); dpkg-shlibdeps (dpkg-dev), if
# present, computes the versioned library dependencies. No cargo-deb, no
# debhelper: the maintainer scripts in packaging/debian/ are written out by
# hand. Prints the path of the .deb on stdout.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
binary=
out_dir=$repo/target/debian
compression=xz
strip=1

die() { echo "build-deb: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || die "--binary needs a path"; binary=$2; shift 2 ;;
        --out-dir) [ $# -ge 2 ] || die "--out-dir needs a directory"; out_dir=$2; shift 2 ;;
        --compression) [ $# -ge 2 ] || die "--compression needs a kind"; compression=$2; shift 2 ;;
        --no-strip) strip=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

command -v dpkg-deb >/dev/null || die "dpkg-deb missing (apt-get install dpkg)"

# The version is Cargo.toml's [package] version.
version=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$repo/Cargo.toml" | head -n1)
[ -n "$version" ] || die "no [package] version in Cargo.toml"
arch=$(dpkg --print-architecture)

if [ -z "$binary" ]; then
    command -v cargo >/dev/null || die "cargo missing"
    (cd "$repo" && cargo build --release --locked --bin nixery-local >&2)
    binary=${CARGO_TARGET_DIR:-$repo/target}/release/nixery-local
fi
[ -x "$binary" ] || die "$binary is not an executable"
# Never package a stale binary under a new version.
reported=$("$binary" --version) || die "$binary --version failed"
[ "$reported" = "nixery-local $version" ] ||
    die "$binary reports \"$reported\", but Cargo.toml says $version"

# Reproducible timestamps: the last commit's, unless the caller chose one.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || true)
    [ -n "$SOURCE_DATE_EPOCH" ] || unset SOURCE_DATE_EPOCH
fi
[ -z "${SOURCE_DATE_EPOCH:-}" ] || export SOURCE_DATE_EPOCH

work=$(mktemp -d "${TMPDIR:-/tmp}/nixery-local-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
# debian/<package>/ so dpkg-shlibdeps finds the binary where it expects it.
root=$work/debian/nixery-local
umask 022

install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" \
    "$root/usr/lib/systemd/user" "$root/etc/nixery-local" \
    "$root/usr/share/doc/nixery-local"

install -m 0755 "$binary" "$root/usr/bin/nixery-local"
if [ "$strip" = 1 ]; then
    # As dh_strip does for executables (Debian policy 10.1).
    "${STRIP:-strip}" --remove-section=.comment --remove-section=.note \
        "$root/usr/bin/nixery-local"
fi

install -m 0644 "$repo/systemd/nixery-local.service" "$repo/systemd/nixery-local.socket" \
    "$root/lib/systemd/system/"
install -m 0644 "$repo/systemd/user/nixery-local.service" "$root/usr/lib/systemd/user/"
# A conffile (DEBIAN/conffiles); postinst makes it root:nixery-local 0640.
install -m 0644 "$repo/packaging/config.toml" "$root/etc/nixery-local/config.toml"

install -m 0644 "$repo/packaging/debian/copyright" "$root/usr/share/doc/nixery-local/copyright"
gzip -9n <"$repo/README.md" >"$root/usr/share/doc/nixery-local/README.md.gz"
chmod 0644 "$root/usr/share/doc/nixery-local/README.md.gz"

for script in postinst prerm postrm; do
    install -m 0755 "$repo/packaging/debian/$script" "$root/DEBIAN/$script"
done
install -m 0644 "$repo/packaging/debian/conffiles" "$root/DEBIAN/conffiles"

# Library dependencies, versioned by the symbols the binary uses.
shlibs=
if command -v dpkg-shlibdeps >/dev/null; then
    printf 'Source: nixery-local\n\nPackage: nixery-local\nArchitecture: any\n' >"$work/debian/control"
    shlibs=$(cd "$work" && dpkg-shlibdeps -O debian/nixery-local/usr/bin/nixery-local) ||
        die "dpkg-shlibdeps failed"
    shlibs=${shlibs#shlibs:Depends=}
    rm "$work/debian/control"
fi
if [ -z "$shlibs" ]; then
    echo "build-deb: dpkg-shlibdeps missing (apt-get install dpkg-dev); unversioned library dependencies" >&2
    shlibs="libc6, libgcc-s1"
fi

installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
maintainer=${DEB_MAINTAINER:-nixery-local maintainers <nixery-local@localhost>}
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" \
    -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@SHLIBS_DEPENDS@|$shlibs|" \
    -e "s|@MAINTAINER@|$maintainer|" \
    "$repo/packaging/debian/control.in" >"$root/DEBIAN/control"
grep -q '@[A-Z_]*@' "$root/DEBIAN/control" && die "unreplaced placeholder in DEBIAN/control"
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"

# Same inputs, same .deb: no file is newer than SOURCE_DATE_EPOCH.
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
    find "$root" -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
fi

mkdir -p "$out_dir"
deb=$(cd "$out_dir" && pwd)/nixery-local_${version}_${arch}.deb
dpkg-deb --root-owner-group -Z"$compression" --build "$root" "$deb" >&2
echo "$deb"

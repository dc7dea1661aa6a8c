#!/usr/bin/env bash
# Install the .deb into a fresh Debian 12 chroot and check that it works
# there: `xenmig --version`, `man -w xenmig`, the bash completion loads, the
# example config is a conffile that xenmig reads, the hook is installed.
#
#   sudo scripts/test-package.sh [target/debian/xenmig_*.deb]
#
# The minimal bookworm root (debootstrap --variant=minbase, from
# deb.debian.org) is made once and cached as a tarball under
# /var/tmp/xenmig-pkgtest; every run unpacks a fresh copy of it, so nothing
# from an earlier run is left in the root. `--cache-only` just makes the
# cache. Needs root (chroot, mount) and the network for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test-package.sh: run as root (debootstrap, chroot)" >&2
    exit 1
fi
cache=/var/tmp/xenmig-pkgtest
base="$cache/bookworm-minbase.tar"
mkdir -p "$cache"
if [ ! -s "$base" ]; then
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    tmpbase=$(mktemp -d "$cache/base.XXXXXX")
    debootstrap --variant=minbase bookworm "$tmpbase" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 ||
        { tail -20 "$cache/debootstrap.log" >&2; rm -rf "$tmpbase"; exit 1; }
    tar -C "$tmpbase" -cf "$base.part" .
    mv "$base.part" "$base"
    rm -rf "$tmpbase"
fi
[ "${1:-}" = --cache-only ] && exit 0

deb=${1:-$(ls -t target/debian/xenmig_*_amd64.deb 2>/dev/null | head -1)}
[ -n "$deb" ] && [ -f "$deb" ] || { echo "no .deb: run scripts/package.sh first" >&2; exit 1; }

started=$(date +%s)
root=$(mktemp -d /var/tmp/xenmig-pkgtest-root.XXXXXX)
cleanup() {
    for m in dev/pts dev proc sys; do mountpoint -q "$root/$m" && umount -l "$root/$m"; done
    rm -rf "$root"
}
trap cleanup EXIT
tar -C "$root" -xf "$base"
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$deb" "$root/tmp/"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

# The operator's way: apt resolves Depends (lvm2, openssh-client). man-db
# and bash-completion are what an operator's shell has; minbase has neither.
in_root apt-get update -qq
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "/tmp/$(basename "$deb")" man-db bash-completion >/dev/null

fail() { echo "FAIL: $*" >&2; exit 1; }
version=$(in_root xenmig --version) || fail "xenmig --version"
echo "xenmig --version: $version"
want=$(dpkg-deb -f "$deb" Version)
[ "$version" = "xenmig ${want%%-*}" ] || fail "version '$version', package $want"
page=$(in_root man -w xenmig) || fail "man -w xenmig"
echo "man -w xenmig: $page"
in_root man -w xenmig-copy >/dev/null || fail "man -w xenmig-copy"
# bash-completion loads ours on demand: complete xenmig's commands.
words=$(in_root bash -c '. /usr/share/bash-completion/bash_completion
    _completion_loader xenmig
    complete -p xenmig >/dev/null || exit 1
    COMP_WORDS=(xenmig mi) COMP_CWORD=1; _xenmig xenmig mi xenmig; echo "${COMPREPLY[*]}"') ||
    fail "bash completion does not load"
echo "bash completion of 'xenmig mi': $words"
[[ " $words " == *" migrate "* ]] || fail "bash completion: '$words'"
# The example config is a conffile and reads as no settings at all.
dpkg-deb -I "$deb" conffiles | grep -qx /etc/xenmig/xenmig.yaml || fail "xenmig.yaml is not a conffile"
shown=$(in_root xenmig config) || fail "xenmig config"
grep -q "^# configuration file: /etc/xenmig/xenmig.yaml" <<<"$shown" || fail "xenmig config: $shown"
in_root test -x /usr/lib/xenmig/external-device-migrate || fail "the xend hook is not installed"
in_root xenmig domains >/dev/null 2>&1 && fail "xenmig domains worked without Xen?"
echo "PASS: installed and checked in a fresh bookworm chroot in $(( $(date +%s) - started )) s"

#!/bin/bash
# Install what the Xen lab needs on a Debian 12 host, from a fresh machine or
# one that already has some of it, in whichever version.
#
# Why an order matters: machines of this project's kind come with a
# backported qemu-utils (10.x) and no qemu-system-x86. bookworm's
# qemu-system-x86 (7.2) cannot sit next to that qemu-utils, and one
# `apt-get install qemu-system-x86 qemu-utils ...` stops with "held broken
# packages" because apt will not downgrade qemu-utils by itself. So:
#   1. qemu-system-x86 alone (apt may remove the newer qemu-utils for it);
#   2. qemu-utils at exactly the installed qemu-system-x86's version
#      (--allow-downgrades), with the other tools;
#   3. check that both programs run and print the versions the lab uses.
# Idempotent: when both programs already run at the same version, nothing
# is installed.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
[[ $(id -u) == 0 ]] || { echo "install-deps: must run as root" >&2; exit 1; }

say() { echo "install-deps: $*"; }
pkgver() { { dpkg-query -W -f '${Status} ${Version}\n' "$1" 2>/dev/null || true; } | awk '$3=="installed"{print $4}'; }

other=(debootstrap e2fsprogs cpio python3 gzip)
updated=no
update_once() { [[ $updated == yes ]] || { apt-get update -qq; updated=yes; }; }

sysver=$(pkgver qemu-system-x86)
utilsver=$(pkgver qemu-utils)
say "before: qemu-system-x86 ${sysver:-absent}, qemu-utils ${utilsver:-absent}"

if [[ -z $sysver ]] || ! command -v qemu-system-x86_64 >/dev/null; then
    update_once
    say "installing qemu-system-x86 first (a newer qemu-utils may be removed for it)"
    apt-get install -y -q qemu-system-x86
    sysver=$(pkgver qemu-system-x86)
fi
[[ -n $sysver ]] || { echo "install-deps: qemu-system-x86 did not install" >&2; exit 1; }

utilsver=$(pkgver qemu-utils)
missing=()
for t in debootstrap mkfs.ext4 cpio python3 gzip; do command -v $t >/dev/null || missing+=("$t"); done
if [[ $utilsver != "$sysver" ]] || ! command -v qemu-img >/dev/null || ((${#missing[@]})); then
    update_once
    say "installing qemu-utils=$sysver (was ${utilsver:-absent}) and ${other[*]}"
    apt-get install -y -q --allow-downgrades "qemu-utils=$sysver" "${other[@]}"
fi

qs=$(qemu-system-x86_64 --version | head -1) || { echo "install-deps: qemu-system-x86_64 does not run" >&2; exit 1; }
qi=$(qemu-img --version | head -1) || { echo "install-deps: qemu-img does not run" >&2; exit 1; }
say "lab runs with: $qs; $qi; debootstrap $(pkgver debootstrap)"

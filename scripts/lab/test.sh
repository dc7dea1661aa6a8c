#!/bin/bash
# The xenmig Xen lab, one command: build the dom0 image if needed (cached),
# build xenmig, make the payload disk, boot emulated Xen 4.17 hosts under QEMU,
# run the checks, shut everything down. Exit status 0 only if every check passed.
#
# Usage: sudo scripts/lab/test.sh [--hosts 1|2] [--keep]
#   XENMIG_LAB_CACHE   cache and run directories (default /var/tmp/xenmig-lab)
#   XENMIG_LAB_BIN     use this xenmig binary instead of building target/release/xenmig
# Needs root; installs qemu-system-x86, qemu-utils, debootstrap, e2fsprogs, cpio
# through scripts/lab/install-deps.sh when one of them is missing.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${XENMIG_LAB_CACHE:-/var/tmp/xenmig-lab}
START=$SECONDS

die() { echo "lab: FAILED: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, mknod)"
need_install=no
for t in qemu-system-x86_64 qemu-img debootstrap mkfs.ext4 cpio python3 gzip; do
    command -v $t >/dev/null || need_install=yes
done
if [[ $need_install == yes ]]; then
    echo "lab: installing what the lab needs (scripts/lab/install-deps.sh)"
    "$HERE/install-deps.sh" || die "scripts/lab/install-deps.sh failed"
fi

echo "lab: [1/4] dom0 image"
t=$SECONDS
IMAGE=$("$HERE/build.sh" | tail -1) || die "image build failed"
echo "lab: image $IMAGE ($((SECONDS - t)) s)"

echo "lab: [2/4] xenmig binary"
mkdir -p "$CACHE"
t=$SECONDS
BIN=${XENMIG_LAB_BIN:-}
if [[ -z $BIN ]]; then
    BIN=$REPO/target/release/xenmig
    # A failed build fails the lab: testing an older binary would report on
    # code that is not the code under test.
    if ! (cd "$REPO" && cargo build --release --bin xenmig) >"$CACHE/cargo-build.log" 2>&1; then
        tail -20 "$CACHE/cargo-build.log"
        die "cargo build --release failed (log: $CACHE/cargo-build.log)"
    fi
fi
[[ -x $BIN ]] || die "no xenmig binary at $BIN"
echo "lab: xenmig $BIN ($((SECONDS - t)) s)"
# The dom0s install xenmig from its .deb (so every lab run proves the
# package); with XENMIG_LAB_BIN they run that binary as it is.
DEB=
if [[ -z ${XENMIG_LAB_BIN:-} ]]; then
    t=$SECONDS
    if ! (cd "$REPO" && scripts/package.sh) >"$CACHE/package.log" 2>&1; then
        tail -20 "$CACHE/package.log"
        die "scripts/package.sh failed (log: $CACHE/package.log)"
    fi
    DEB=$(ls -t "$REPO"/target/debian/xenmig_*_amd64.deb | head -1)
    echo "lab: package $DEB ($((SECONDS - t)) s)"
fi

echo "lab: [3/4] payload disk"
mkdir -p "$CACHE"
PAYLOAD=$CACHE/payload.ext4
"$HERE/payload.sh" "$IMAGE" "$PAYLOAD" "$BIN" $DEB || die "payload disk failed"

echo "lab: [4/4] boot and check"
rc=0
python3 "$HERE/lab.py" test --image "$IMAGE" --payload "$PAYLOAD" "$@" || rc=$?
echo "lab: total $((SECONDS - START)) s"
[[ $rc == 0 ]] || die "lab checks failed (see the summary and serial logs above)"
echo "lab: all checks passed"

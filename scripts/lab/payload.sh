#!/bin/bash
# Make the lab's payload disk: a small ext4 image (mkfs.ext4 -d, no mounting)
# holding the xenmig binary under test and the lab guest (kernel, initramfs,
# xl config). Each dom0 mounts it read-only on /opt/xenmig (the third virtio disk, /dev/vdc),
# and /usr/local/bin/xenmig points into it, so a new binary never needs a new
# debootstrap.
#
# Usage: scripts/lab/payload.sh IMAGE_DIR OUT.ext4 [XENMIG_BINARY [XENMIG_DEB]]
# With XENMIG_DEB the dom0s install xenmig from that package at boot.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
IMG=${1:?image dir}
OUT=${2:?output image}
BIN=${3:-$HERE/../../target/release/xenmig}
[[ -x $BIN ]] || { echo "payload: no xenmig binary at $BIN (cargo build --release)" >&2; exit 1; }

STAGE=$(mktemp -d "${OUT%/*}/payload.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/guest" "$STAGE/initramfs"/{bin,sbin,etc,proc,sys,dev,mnt,mods,tmp}
cp "$BIN" "$STAGE/xenmig"
DEB=${4:-}
if [[ -n $DEB ]]; then cp "$DEB" "$STAGE/xenmig.deb"; fi
# guest initramfs: busybox (init and applets), modules, the heartbeat workload
R=$STAGE/initramfs
cp "$IMG/guest/busybox" "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do
    [[ -e $R/bin/$a ]] || ln -s busybox "$R/bin/$a"
done
ln -s ../bin/busybox "$R/sbin/init"
ln -s ../bin/busybox "$R/sbin/poweroff"
ln -s ../bin/busybox "$R/sbin/halt"
ln -s ../bin/busybox "$R/sbin/reboot"
ln -s bin/busybox "$R/init"
cp "$IMG"/guest/mods/* "$R/mods/"
cp "$HERE/guest/inittab" "$R/etc/inittab"
install -m 755 "$HERE/guest/init.sh" "$HERE/guest/heartbeat.sh" "$HERE/guest/stop.sh" "$R/etc/"
mknod -m 600 "$R/dev/console" c 5 1
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) >"$STAGE/guest/initrd.img"
rm -rf "$R"
cp "$IMG/vmlinuz" "$STAGE/guest/vmlinuz"
cp "$HERE/guest/g1.cfg" "$STAGE/guest/g1.cfg"
mkdir -p "$STAGE/lab"
install -m 755 "$HERE"/dom0/* "$STAGE/lab/"
# size: contents + 25% + 8 MiB
KB=$(du -sk "$STAGE" | cut -f1)
rm -f "$OUT"
mkfs.ext4 -q -F -L xenmig-pl -d "$STAGE" "$OUT" $(( (KB * 5 / 4 + 8192) ))k
echo "payload: $OUT ($(du -sh "$BIN" | cut -f1) xenmig, $(du -sh "$STAGE/guest/initrd.img" | cut -f1) guest initramfs)" >&2

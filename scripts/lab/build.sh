#!/bin/bash
# Build (or reuse) the lab's dom0 image: a Debian bookworm minbase root file
# system with Xen 4.17, packed without mounting (mkfs.ext4 -d, qemu-img convert).
#
# Output (cached): $XENMIG_LAB_CACHE/image-<key>/
#   dom0.qcow2      root file system (used read-only through throw-away overlays)
#   xen             uncompressed hypervisor (multiboot1, for QEMU -kernel)
#   vmlinuz initrd  dom0 kernel and initrd (multiboot modules); vmlinuz is also the guest kernel
#   guest/          busybox + the modules the guest initramfs needs (xen-blkfront, ext4, deps)
#   lab_key         ssh key (root on both dom0s accepts it)
# The key is a hash of packages.txt and this script: re-running is instant when
# neither changed. The xenmig binary is NOT part of the image (see payload.sh).
#
# Usage: scripts/lab/build.sh [--force]     prints the image directory on stdout's last line
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${XENMIG_LAB_CACHE:-/var/tmp/xenmig-lab}
MIRROR=${XENMIG_LAB_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm

KEY=$(cat "$HERE/packages.txt" "$HERE/build.sh" | sha256sum | cut -c1-16)
OUT=$CACHE/image-$KEY
if [[ -f $OUT/done && ${1:-} != --force ]]; then
    echo "build: cached image $OUT (key $KEY)" >&2
    echo "$OUT"
    exit 0
fi

[[ $(id -u) == 0 ]] || { echo "build: must run as root (debootstrap)" >&2; exit 1; }
for t in debootstrap mkfs.ext4 qemu-img ssh-keygen; do
    command -v $t >/dev/null || { echo "build: missing $t (apt-get install debootstrap e2fsprogs qemu-utils openssh-client)" >&2; exit 1; }
done

mkdir -p "$CACHE"
WORK=$CACHE/build-$KEY.$$
rm -rf "$WORK"; mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
PKGS=$(grep -v '^#' "$HERE/packages.txt" | grep . | paste -sd, -)

t0=$SECONDS
echo "build: debootstrap $SUITE from $MIRROR (log $WORK/debootstrap.log)" >&2
if ! debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -30 "$WORK/debootstrap.log" >&2
    cp "$WORK/debootstrap.log" "$CACHE/debootstrap-failed.log"
    echo "build: debootstrap failed; log kept at $CACHE/debootstrap-failed.log" >&2
    exit 1
fi
echo "build: debootstrap took $((SECONDS - t0)) s" >&2

# ---- dom0 configuration (files written into the tree, no chroot needed except ssh-keygen output) ----
cat >"$ROOT/etc/fstab" <<'EOF'
/dev/vda / ext4 rw,errors=remount-ro 0 1
/dev/vdc /opt/xenmig ext4 ro,nofail,x-systemd.device-timeout=90s 0 0
EOF
mkdir -p "$ROOT/opt/xenmig"
ln -sf /opt/xenmig/xenmig "$ROOT/usr/local/bin/xenmig"
echo xenlab >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n10.99.0.1 xenlab1\n10.99.0.2 xenlab2\n' >"$ROOT/etc/hosts"
# root logs in on the dom0 console (hvc0) without a password
mkdir -p "$ROOT/etc/systemd/system/serial-getty@hvc0.service.d"
cat >"$ROOT/etc/systemd/system/serial-getty@hvc0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,38400,9600 %I $TERM
EOF
# address and hostname from the dom0 command line: xenmig_ip=10.99.0.N xenmig_host=NAME
cat >"$ROOT/usr/local/sbin/xenmig-lab-net" <<'EOF'
#!/bin/sh
for w in $(cat /proc/cmdline); do
    case $w in xenmig_ip=*) ip=${w#xenmig_ip=};; xenmig_host=*) host=${w#xenmig_host=};; esac
done
[ -n "$host" ] && hostname "$host"
ip link set lo up
if [ -n "$ip" ]; then
    ip link set eth0 up && ip addr add "$ip/24" dev eth0
fi
exit 0
EOF
chmod 755 "$ROOT/usr/local/sbin/xenmig-lab-net"
cat >"$ROOT/etc/systemd/system/xenmig-lab-net.service" <<'EOF'
[Unit]
Description=xenmig lab: static address from the kernel command line
Before=network.target ssh.service
After=systemd-udevd.service
Wants=network.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/xenmig-lab-net
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/xenmig-lab-net.service "$ROOT/etc/systemd/system/multi-user.target.wants/xenmig-lab-net.service"
# guest console logs (xenconsoled --log=guest)
sed -i '/^XENCONSOLED_ARGS=/d' "$ROOT/etc/default/xen" 2>/dev/null || true
echo 'XENCONSOLED_ARGS="--log=guest"' >>"$ROOT/etc/default/xen"
mkdir -p "$ROOT/var/log/xen/console"
# no autoballooning surprises: dom0 memory is fixed on the Xen command line
sed -i 's/^#\?autoballoon=.*/autoballoon="off"/' "$ROOT/etc/xen/xl.conf" 2>/dev/null || true
# ssh between the dom0s: one key made at build time, accepted by root on both
ssh-keygen -q -t ed25519 -N '' -C xenmig-lab -f "$WORK/lab_key"
mkdir -p -m 700 "$ROOT/root/.ssh"
cp "$WORK/lab_key" "$ROOT/root/.ssh/id_ed25519"
cp "$WORK/lab_key.pub" "$ROOT/root/.ssh/id_ed25519.pub"
cp "$WORK/lab_key.pub" "$ROOT/root/.ssh/authorized_keys"
printf 'Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' >"$ROOT/root/.ssh/config"
chmod 600 "$ROOT/root/.ssh/"*
# quieter, faster boot
ln -sf /dev/null "$ROOT/etc/systemd/system/apt-daily.timer"
ln -sf /dev/null "$ROOT/etc/systemd/system/apt-daily-upgrade.timer"
ln -sf /dev/null "$ROOT/etc/systemd/system/systemd-timesyncd.service"
echo 'kernel.printk = 3 4 1 3' >"$ROOT/etc/sysctl.d/10-lab-quiet.conf"

# ---- boot files and guest parts ----
IMG=$WORK/out
mkdir -p "$IMG/guest/mods"
KVER=$(ls "$ROOT/lib/modules" | sort -V | tail -1)
XENGZ=$(ls "$ROOT"/boot/xen-4.17*.gz 2>/dev/null | head -1)
[[ -n $XENGZ ]] || { echo "build: no /boot/xen-4.17*.gz in the tree" >&2; ls "$ROOT/boot" >&2; exit 1; }
zcat "$XENGZ" >"$IMG/xen"
cp "$ROOT/boot/vmlinuz-$KVER" "$IMG/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$IMG/initrd"
cp "$ROOT/bin/busybox" "$IMG/guest/busybox"
echo "$KVER" >"$IMG/kver"
# modules the guest initramfs loads, with their dependencies, in load order
MODDIR=$ROOT/lib/modules/$KVER
resolve() {   # print the dependency closure of module $1 (relative paths), deps first
    local name=$1 line path deps d
    line=$(grep -E "(^|/)${name}\.ko(\.[a-z]+)?:" "$MODDIR/modules.dep" | head -1) || return 0
    [[ -n $line ]] || return 0
    path=${line%%:*}; deps=${line#*:}
    for d in $deps; do resolve "$(basename "${d%%.ko*}")"; done
    echo "$path"
}
: >"$IMG/guest/mods/order"
for m in xen-blkfront ext4 crc32c_generic; do
    if grep -qE "/${m//-/[-_]}\.ko" "$MODDIR/modules.builtin" 2>/dev/null; then continue; fi
    resolve "$m"
done | awk '!seen[$0]++' | while read -r p; do
    f=$(basename "$p")
    case $f in
        *.ko.xz) xz -dc "$MODDIR/$p" >"$IMG/guest/mods/${f%.xz}"; f=${f%.xz};;
        *.ko.zst) zstd -qdc "$MODDIR/$p" >"$IMG/guest/mods/${f%.zst}"; f=${f%.zst};;
        *) cp "$MODDIR/$p" "$IMG/guest/mods/$f";;
    esac
    echo "$f" >>"$IMG/guest/mods/order"
done
echo "build: guest modules: $(paste -sd' ' "$IMG/guest/mods/order")" >&2
cp "$WORK/lab_key" "$IMG/lab_key"

# downloaded .debs are dead weight in the image
rm -f "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/cache/apt/*.bin
# ---- pack without mounting ----
t1=$SECONDS
mkfs.ext4 -q -F -L xenlab-root -d "$ROOT" "$WORK/root.ext4" 3G
qemu-img convert -O qcow2 "$WORK/root.ext4" "$IMG/dom0.qcow2"
rm -f "$WORK/root.ext4"
echo "build: packing took $((SECONDS - t1)) s" >&2
cp "$HERE/packages.txt" "$IMG/packages.txt"
date -u +%FT%TZ >"$IMG/done"
rm -rf "$OUT"
mv "$IMG" "$OUT"
# older images are dead weight
for d in "$CACHE"/image-*; do [[ $d == "$OUT" ]] || rm -rf "$d"; done
echo "build: image $OUT ready in $((SECONDS - t0)) s" >&2
echo "$OUT"

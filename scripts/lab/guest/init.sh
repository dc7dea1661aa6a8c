#!/bin/sh
# sysinit of the lab guest (busybox init runs it once): load the block and ext4
# modules, wait for /dev/xvda, mount it on /mnt.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /mods/order); do insmod /mods/$m 2>/dev/null; done
i=0
while [ ! -b /dev/xvda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
if mount -t ext4 -o data=ordered /dev/xvda /mnt; then
    echo "guest: /dev/xvda mounted, counter=$(cat /mnt/counter 2>/dev/null || echo none)"
else
    echo "guest: ERROR cannot mount /dev/xvda"
fi

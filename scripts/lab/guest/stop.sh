#!/bin/sh
# Shutdown action: stop the writer, unmount the disk cleanly (e2fsck -fn must be clean).
killall heartbeat.sh 2>/dev/null
sleep 0.2
sync
umount /mnt 2>/dev/null || mount -o remount,ro /mnt
echo "guest: disk unmounted, bye"

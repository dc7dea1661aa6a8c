#!/bin/sh
# The lab guest's workload: every second, increment the counter kept on its
# disk (write a new file, fsync by sync, rename, sync) and print "heartbeat N".
if ! grep -q " /mnt " /proc/mounts; then
    echo "guest: ERROR no disk, no heartbeat"
    exec sleep 100000
fi
n=$(cat /mnt/counter 2>/dev/null || echo 0)
while :; do
    n=$((n + 1))
    echo "$n" >/mnt/counter.new && sync && mv /mnt/counter.new /mnt/counter && sync
    echo "heartbeat $n"
    sleep 1
done

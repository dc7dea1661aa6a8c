#!/bin/sh
# The lab guest's workload: every second, increment the counter kept on its
# disk (write a new file, fsync by sync, rename, sync) and print "heartbeat N".
# With xenmig_load=KB on the kernel command line (the benchmark guest), each
# second also overwrites KB KiB of a 16 MiB file at a rotating offset with
# fresh random data, fsynced: a steady write load for the disk passes.
if ! grep -q " /mnt " /proc/mounts; then
    echo "guest: ERROR no disk, no heartbeat"
    exec sleep 100000
fi
load=$(sed -n 's/.*xenmig_load=\([0-9]*\).*/\1/p' /proc/cmdline)
n=$(cat /mnt/counter 2>/dev/null || echo 0)
while :; do
    n=$((n + 1))
    if [ -n "$load" ]; then
        dd if=/dev/urandom of=/mnt/load bs=1024 count="$load" seek=$(( (n * load) % 16384 )) \
            conv=notrunc,fsync 2>/dev/null
    fi
    echo "$n" >/mnt/counter.new && sync && mv /mnt/counter.new /mnt/counter && sync
    echo "heartbeat $n"
    sleep 1
done

#!/usr/bin/env python3
"""How the lab guest's memory size sets the time of `xl save` and `xl
restore` (the memory copy every migration row of the lab pays), measured
side by side in one emulated dom0: the guest is created at each size in
turn, ROUNDS times, alternated.

    sudo python3 scripts/lab/guest_memory.py --image DIR --payload FILE [--sizes 128 96] [--rounds 3]

IMAGE and PAYLOAD as scripts/lab/test.sh builds them (its log prints both;
the payload is $XENMIG_LAB_CACHE/payload.ext4). Prints one line per save
and restore, then the medians per size.
"""
import argparse
import statistics
import time

from console import Host, log
from checks import check_lvm, wait_heartbeat_above
from lab import new_rundir


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--image", required=True)
    p.add_argument("--payload", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 96])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rundir = new_rundir()
    h = Host(1, args.image, args.payload, rundir, None)
    times = {m: {"save": [], "restore": []} for m in args.sizes}
    try:
        h.start()
        h.wait_shell(300)
        check_lvm(h)
        h.sh("lvcreate -q -y -L 32M -n g1 vg0 && mkfs.ext4 -q -F /dev/vg0/g1", 120)
        for r in range(args.rounds):
            for m in args.sizes:
                h.sh(f"sed -e 's/^memory = .*/memory = {m}/' -e 's/^maxmem = .*/maxmem = {m}/' "
                     f"/opt/xenmig/guest/g1.cfg > /tmp/g1-{m}.cfg && rm -f /var/log/xen/console/guest-g1.log")
                h.sh(f"xl create /tmp/g1-{m}.cfg", 120)
                wait_heartbeat_above(h, None, 180)
                for what, cmd in (("save", "xl save g1 /tmp/g1.save"), ("restore", "xl restore /tmp/g1.save")):
                    t = time.monotonic()
                    h.sh(cmd, 300)
                    dt = time.monotonic() - t
                    times[m][what].append(dt)
                    log(f"round {r + 1}: {m} MiB: xl {what} {dt:.1f} s")
                h.sh("xl destroy g1; rm -f /tmp/g1.save", 120)
    finally:
        h.stop()
    for m in args.sizes:
        print(f"{m} MiB: " + ", ".join(
            f"xl {what} median {statistics.median(t):.1f} s {[round(x, 1) for x in t]}"
            for what, t in times[m].items()))
    print(f"serial log: {h.serial_log}")


if __name__ == "__main__":
    main()

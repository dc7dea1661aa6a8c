#!/usr/bin/env bash
# Downtime of `xenmig copy --live` (generic change detection) against the
# seed's approach (every block re-hashed while frozen, `--rescan full`), for
# two disk sizes under the same write load, side by side in one run.
#
#   load:  a writer rewrites random 4 KiB blocks at a fixed rate (RATE per
#          second, the same for every size); the freeze is SIGSTOP of the
#          writer, the thaw SIGCONT.
#   1%:    no writer; the freeze command itself rewrites 1% of the blocks,
#          so the final pass has exactly 1% to send (its time is counted in
#          the downtime, as a real freeze would be).
#
# Sizes in MiB: SIZES (default "1024 4096"); ROUNDS (default 3); medians.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"1024 4096"}
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-500}
DIR=${BENCH_DIR:-/var/tmp/xenmig-bench}
cargo build --release --quiet
X=$PWD/target/release/xenmig
mkdir -p "$DIR"

writer() { # writer FILE: rewrite RATE random blocks per second, forever
    python3 - "$1" "$RATE" > /dev/null 2>&1 <<'PY' &
import os, random, sys, time
f = os.open(sys.argv[1], os.O_WRONLY); rate = int(sys.argv[2])
blocks = os.fstat(f).st_size // 4096
while True:
    t = time.time()
    for _ in range(rate // 10):
        os.pwrite(f, os.urandom(4096), random.randrange(blocks) * 4096)
    time.sleep(max(0, 0.1 - (time.time() - t)))
PY
    echo $!
}
change_1pct='python3 -c "import os,random,sys; f=os.open(sys.argv[1],os.O_WRONLY); n=os.fstat(f).st_size//4096; [os.pwrite(f,os.urandom(4096),b*4096) for b in random.sample(range(n),n//100)]"'
field() { python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(eval(sys.argv[2]))' "$1" "$2"; }
median() { python3 -c 'import sys,statistics; print("%.3f" % statistics.median(map(float, sys.argv[1:])))' $1; }
declare -A D P

for mib in $SIZES; do
    img=$DIR/live-$mib.img
    [ -f "$img" ] || head -c $((mib << 20)) /dev/urandom > "$img"
    cat "$img" > /dev/null
    for r in $(seq "$ROUNDS"); do
        for how in fast full; do
            rm -f "$DIR/live-dst.img"
            pid=$(writer "$img")
            sleep 1
            out=$("$X" copy -q --json --live --rescan $how --freeze-cmd "kill -STOP $pid" --thaw-cmd "kill -CONT $pid" "$img" "$DIR/live-dst.img")
            kill "$pid"; wait "$pid" 2>/dev/null || true
            D[load,$how,$mib]+="$(field "$out" 'r["downtime_seconds"]') "
            P[load,$how,$mib]="$(field "$out" 'len(r["passes"])') passes, final pass $(field "$out" 'r["passes"][-1]["changed_blocks"]') blocks"
            out=$("$X" copy -q --json --live --rescan $how --max-passes 2 --converge-blocks 0 --freeze-cmd "$change_1pct $img" "$img" "$DIR/live-dst.img")
            D[pct,$how,$mib]+="$(field "$out" 'r["downtime_seconds"]') "
            P[pct,$how,$mib]="final pass $(field "$out" 'r["passes"][-1]["changed_blocks"]') blocks"
        done
    done
done

echo "Write load $RATE blocks/s (random 4 KiB); $ROUNDS rounds, median downtime in seconds; $(nproc) cores."
echo
echo "| case | size MiB | xenmig (fast rescan) s | seed-style full rehash s | full/fast | notes (last round) |"
echo "|---|---|---|---|---|---|"
for case in load pct; do
    for mib in $SIZES; do
        f=$(median "${D[$case,fast,$mib]}"); g=$(median "${D[$case,full,$mib]}")
        label=$([ $case = load ] && echo "writer at $RATE blocks/s" || echo "1% changed in last pass")
        echo "| $label | $mib | $f | $g | $(python3 -c "print('%.2f' % ($g / max($f, 1e-9)))") | fast: ${P[$case,fast,$mib]} |"
    done
done
set -- $SIZES
if [ $# -ge 2 ]; then
    echo
    for case in load pct; do for how in fast full; do
        a=$(median "${D[$case,$how,$1]}"); b=$(median "${D[$case,$how,$2]}")
        echo "- $case, $how: downtime at $2 MiB / at $1 MiB = $(python3 -c "print('%.2f' % ($b / max($a, 1e-9)))")"
    done; done
fi

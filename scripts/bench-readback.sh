#!/usr/bin/env bash
# What the target's read-back costs (docs/benchmarks.md, "Read-back"): a
# local copy of a cached image (default 1 GiB: BENCH_MIB; ROUNDS rounds,
# medians), with the read-back (the default) and without (--no-readback),
# and optionally with another build (BASE, e.g. the commit before the
# read-back), side by side in one loop whose order rotates every round.
#   - cold: DST does not exist; everything non-zero is fetched and read back
#   - 90% there: DST holds the image with 10% of its 4 KiB blocks (scattered
#     at random) overwritten; only those are fetched and read back
# Every timed copy starts after `sync`, with DST's earlier content written
# out. Prints a Markdown table: wall-time medians and ratios, and CPU time
# (user + system) medians. Needs python3 and GNU time (/usr/bin/time).
#   scripts/bench-readback.sh [XENMIG [BASE]]   (default: target/release/xenmig, no BASE)
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${BENCH_MIB:-1024}
ROUNDS=${ROUNDS:-5}
DIR=${BENCH_DIR:-/var/tmp/xenmig-bench}
if [ $# -ge 1 ]; then X=$(realpath "$1"); else cargo build --release --quiet; X=$PWD/target/release/xenmig; fi
BASE=${2:+$(realpath "$2")}
mkdir -p "$DIR"
IMG=$DIR/image-$MIB.img
if [ ! -f "$IMG" ]; then
    echo "bench: making a $MIB MiB image (7/8 random data, 1/8 zeros)" >&2
    head -c $((MIB << 20)) /dev/urandom > "$IMG"
    dd if=/dev/zero of="$IMG" bs=1M seek=$((MIB / 2)) count=$((MIB / 8)) conv=notrunc status=none
fi
PART=$DIR/readback-90-$MIB.img
if [ ! -f "$PART" ]; then
    cp "$IMG" "$PART"
    python3 - "$PART" <<'PY'
import os, random, sys
random.seed(10)
f = os.open(sys.argv[1], os.O_WRONLY)
blocks = os.fstat(f).st_size // 4096
for b in random.sample(range(blocks), blocks // 10):
    os.pwrite(f, os.urandom(4096), b * 4096)
PY
fi
cat "$IMG" > /dev/null
DST=$DIR/readback-dst.img
export XENMIG_CONFIG=

# The flags for each variant, whichever of the two is the default.
if "$X" copy --help | grep -q -- --no-readback; then ON=(); OFF=(--no-readback); else ON=(--readback); OFF=(); fi

now() { date +%s.%N; }
declare -A T C
# run KEY CASE BIN ARGS...: prepare DST for CASE, then time one copy.
run() {
    local key=$1 case=$2 bin=$3; shift 3
    rm -f "$DST"
    if [ "$case" = part ]; then cp "$PART" "$DST"; fi
    sync
    local t0 t1
    t0=$(now)
    /usr/bin/time -f "%U %S" -o "$DIR/cpu" "$bin" copy -q "$@" "$IMG" "$DST" > /dev/null
    t1=$(now)
    T[$case-$key]+="$(echo "$t1 - $t0" | bc -l) "
    # CPU seconds (user + system) of the copy: less at the mercy of other
    # jobs on the machine than wall time.
    C[$case-$key]+="$(awk '{ print $1 + $2 }' "$DIR/cpu") "
    cmp "$IMG" "$DST"
}
median() { python3 -c 'import sys,statistics; print("%.3f" % statistics.median(map(float, sys.argv[1:])))' $1; }

variants=(off on)
if [ -n "$BASE" ]; then variants=(base off on); fi
n=${#variants[@]}
for r in $(seq "$ROUNDS"); do
    for case in cold part; do
        # Rotate the order, so that no variant always runs first.
        for k in $(seq 0 $((n - 1))); do
            v=${variants[$(((k + r) % n))]}
            case $v in
            base) run base "$case" "$BASE" ;;
            off) run off "$case" "$X" "${OFF[@]}" ;;
            on) run on "$case" "$X" "${ON[@]}" ;;
            esac
        done
    done
done
rm -f "$DST"

echo "Image: $MIB MiB (7/8 random, 1/8 zero), page-cached; DST on $(df --output=source,fstype "$DIR" | tail -1 | tr -s ' '); $ROUNDS rounds, medians (all runs: seconds)."
echo "$(uname -srm); $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| DST | without read-back s | with read-back s | ratio with/without |$([ -n "$BASE" ] && echo " previous build s | ratio with/previous |") CPU s without | CPU s with | CPU ratio |"
echo "|---|---|---|---|$([ -n "$BASE" ] && echo "---|---|")---|---|---|"
for case in cold part; do
    label=$([ $case = cold ] && echo "cold (absent)" || echo "90% there")
    off=$(median "${T[$case-off]}"); on=$(median "${T[$case-on]}")
    line="| $label | $off | $on | $(echo "scale=3; $on / $off" | bc -l) |"
    if [ -n "$BASE" ]; then
        base=$(median "${T[$case-base]}")
        line="$line $base | $(echo "scale=3; $on / $base" | bc -l) |"
    fi
    coff=$(median "${C[$case-off]}"); con=$(median "${C[$case-on]}")
    echo "$line $coff | $con | $(echo "scale=3; $con / $coff" | bc -l) |"
done
echo
for key in "${!T[@]}"; do echo "- $key: ${T[$key]}(CPU: ${C[$key]})"; done | sort

#!/bin/bash
# Which zstd level should the copy's stream use on a slow link (issue 11)?
# Measured before building it: per cell, the blocks a copy fetches (the
# source's non-zero 4 KiB blocks whose content the target's image holds
# nowhere and that no earlier block of the copy carried, in image order:
# what the stream compresses) are compressed as one stream with
# long-distance matching over a 2^27 window, single-threaded, at each
# level; bytes out and CPU seconds (user + system of the zstd process).
# Then a pipeline model picks the level per link rate: time = max(CPU
# seconds, output bytes / link rate); the smallest time wins (on a tie,
# the smaller output).
#
#   scripts/experiments/stream-levels.sh         # after images.sh --quick
#
# LEVELS (default "3 6 9 12 15 19"), CELLS (default "release return cold").
# The zstd CLI is a stand-in for the stream: xenmig flushes after each run,
# which costs a little ratio at every level alike.
set -euo pipefail
EXP=${EXP:-/var/tmp/xenmig-exp/quick}
IMG=$EXP/img
LEVELS=${LEVELS:-3 6 9 12 15 19}
CELLS=${CELLS:-release return cold}
tmp=$(mktemp -d /var/tmp/xenmig-levels.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# SRC REF OUT: the fetched blocks of SRC onto a target holding REF (none:
# empty) into OUT.
fetched() {
    python3 - "$@" <<'PY'
import hashlib, sys
src, ref, out = sys.argv[1:4]
bs = 4096
z = bytes(bs)
key = lambda b: hashlib.blake2b(b, digest_size=16).digest()
have = set()
if ref:
    with open(ref, "rb") as f:
        while b := f.read(bs):
            have.add(key(b))
with open(src, "rb") as f, open(out, "wb") as o:
    while b := f.read(bs):
        if b != z[:len(b)]:
            k = key(b)
            if k not in have:
                have.add(k)
                o.write(b)
PY
}

rows=$tmp/rows
for cell in $CELLS; do
    case $cell in
        release) src=$IMG/trixie.img ref=$IMG/bookworm.img ;;
        return) src=$IMG/return.img ref=$IMG/clone.img ;;
        clone) src=$IMG/clone.img ref=$IMG/bookworm.img ;;
        cold) src=$IMG/clone.img ref= ;;
        *) echo "$0: unknown cell $cell" >&2; exit 2 ;;
    esac
    fetched "$src" "$ref" "$tmp/in"
    raw=$(wc -c <"$tmp/in")
    for level in $LEVELS; do
        # One warm-up read so the first level does not pay the page cache.
        cat "$tmp/in" >/dev/null
        /usr/bin/time -f "%U %S" -o "$tmp/time" zstd -q -"$level" --long=27 --single-thread -c "$tmp/in" >"$tmp/out"
        read -r user sys <"$tmp/time"
        printf '%s %s %s %s %s\n' "$cell" "$raw" "$level" "$(wc -c <"$tmp/out")" "$(awk -v u="$user" -v s="$sys" 'BEGIN { print u + s }')" >>"$rows"
    done
done
python3 - "$rows" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
cells = {}
for cell, raw, level, out, cpu in rows:
    cells.setdefault(cell, (int(raw), []))[1].append((int(level), int(out), float(cpu)))
links = [("2 Mbit/s", 250e3), ("20 Mbit/s", 2.5e6), ("100 Mbit/s", 12.5e6)]
print("| cell | fetched MB (raw) | level | MB out | CPU s | MB/s in (1 thread) | " + " | ".join(f"model s at {n}" for n, _ in links) + " |")
print("|---|---|---|---|---|---|" + "---|" * len(links))
best = {}
for cell, (raw, ls) in cells.items():
    for n, rate in links:
        best[(cell, n)] = min(ls, key=lambda l: (max(l[2], l[1] / rate), l[1]))[0]
    for level, out, cpu in ls:
        ts = []
        for n, rate in links:
            t = f"{max(cpu, out / rate):.1f}"
            ts.append(f"**{t}**" if best[(cell, n)] == level else t)
        print(f"| {cell} | {raw / 1e6:.1f} | {level} | {out / 1e6:.2f} | {cpu:.2f} | {raw / 1e6 / max(cpu, 1e-3):.1f} | " + " | ".join(ts) + " |")
print()
print("| cell | " + " | ".join(f"level at {n}" for n, _ in links) + " |")
print("|---|" + "---|" * len(links))
for cell in cells:
    print(f"| {cell} | " + " | ".join(str(best[(cell, n)]) for n, _ in links) + " |")
PY

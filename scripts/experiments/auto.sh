#!/bin/bash
# `--compress auto` against the fixed codecs, and against a baseline
# build's auto, side by side in one run (issue 11, direction 5): run.sh's
# network (veth between namespaces, tc-shaped, real ssh) and its images.
#
#   sudo BEFORE=/path/to/old/xenmig scripts/experiments/auto.sh
#
# Per round, for each link: the baseline's xm-auto, then this build's
# xm-none, xm-lz4, xm-zstd and xm-auto (run.sh's methods), so that the
# rows compared ran minutes apart. Knobs: ROUNDS (3), LINKS ("0 100"),
# SCENARIOS ("release clone return cold"), SLOW_LINK (20: release and
# return also at this rate, with only xm-zstd and both autos; empty to
# skip), AFTER (default target/release/xenmig), OUT (a scratch dir).
# Prints a markdown table of medians: seconds and MB on the wire per
# method, and auto's time over the fastest fixed codec's.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
: "${BEFORE:?BEFORE=path of the baseline xenmig binary}"
AFTER=${AFTER:-${CARGO_TARGET_DIR:-$REPO/target}/release/xenmig}
ROUNDS=${ROUNDS:-3}
LINKS=${LINKS:-0 100}
SCENARIOS=${SCENARIOS:-release clone return cold}
SLOW_LINK=${SLOW_LINK-20}
OUT=${OUT:-$(mktemp -d /var/tmp/xenmig-auto.XXXXXX)}
mkdir -p "$OUT/before" "$OUT/after"
echo "auto.sh: results under $OUT" >&2

run() { # which binary links scenarios methods
    OUT=$OUT/$1 XENMIG=$2 LINKS=$3 SCENARIOS=$4 METHODS=$5 ROUNDS=1 SKIP_CELLS= \
        "$HERE/run.sh" --quick >>"$OUT/$1.log" 2>&1 || { tail -5 "$OUT/$1.log" >&2; exit 1; }
}
for round in $(seq "$ROUNDS"); do
    for link in $LINKS; do
        run before "$BEFORE" "$link" "$SCENARIOS" xm-auto
        run after "$AFTER" "$link" "$SCENARIOS" "xm-none xm-lz4 xm-zstd xm-auto"
    done
    if [ -n "$SLOW_LINK" ]; then
        run before "$BEFORE" "$SLOW_LINK" "release return" xm-auto
        run after "$AFTER" "$SLOW_LINK" "release return" "xm-zstd xm-auto"
    fi
    echo "auto.sh: round $round done $(date -u +%T)" >&2
done

python3 - "$OUT" <<'PY'
import csv, statistics, sys
out = sys.argv[1]
cells = {}
for which in ("before", "after"):
    for r in csv.DictReader(open(f"{out}/{which}/results-quick.csv")):
        m = r["method"] if which == "after" else "xm-auto (before)"
        c = cells.setdefault((r["scenario"], int(r["link_mbps"])), {})
        c.setdefault(m, []).append((float(r["seconds"]), int(r["wire_bytes"])))
methods = ["xm-none", "xm-lz4", "xm-zstd", "xm-auto (before)", "xm-auto"]
print("| scenario | link | " + " | ".join(methods) + " | auto / fastest fixed |")
print("|---|---|" + "---|" * (len(methods) + 1))
for (scen, link), c in sorted(cells.items(), key=lambda k: (k[0][0], -k[0][1] if k[0][1] else -10**6)):
    med = {m: (statistics.median(s for s, _ in v), statistics.median(b for _, b in v), len(v)) for m, v in c.items()}
    row = []
    for m in methods:
        row.append("%.2f s, %.1f MB (n=%d)" % (med[m][0], med[m][1] / 1e6, med[m][2]) if m in med else "")
    fixed = [med[m][0] for m in ("xm-none", "xm-lz4", "xm-zstd") if m in med]
    ratio = "%.2fx" % (med["xm-auto"][0] / min(fixed)) if fixed and "xm-auto" in med else ""
    print(f"| {scen} | {'unshaped' if link == 0 else f'{link} Mbit/s'} | " + " | ".join(row) + f" | {ratio} |")
PY

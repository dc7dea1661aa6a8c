#!/usr/bin/env python3
"""Medians per cell of any run.sh CSV, as a markdown table.

    python3 scripts/experiments/table.py docs/experiments/results-big.csv

One row per (scenario, link, method): rows measured, median seconds and
MB on the wire (veth bytes, both directions), and how many copies `cmp`
found identical. For a pass run into its own OUT directory (e.g. the 4 GiB
scenario), where report.py's full page does not apply.
"""
import csv
import statistics
import sys

ORDER = ["simple", "xm-none", "xm-zlib", "xm-lz4", "xm-zstd", "xm-auto", "xm-inplace", "xm-srcref", "precache",
         "rsync", "rsync-z", "casync", "zstd-patch"]
cells = {}
for r in csv.DictReader(open(sys.argv[1])):
    cells.setdefault((r["scenario"], int(r["link_mbps"]), r["method"]), []).append(r)
print("| scenario | link | method | rows | s (median) | MB on the wire (median) | identical |")
print("|---|---|---|---|---|---|---|")


def key(k):
    scen, link, method = k
    return (scen, -link if link else -10**6, ORDER.index(method) if method in ORDER else len(ORDER))


for k in sorted(cells, key=key):
    v = cells[k]
    s = statistics.median(float(x["seconds"]) for x in v)
    b = statistics.median(int(x["wire_bytes"]) for x in v)
    ok = sum(int(x["verified"]) for x in v)
    link = "unshaped" if k[1] == 0 else f"{k[1]} Mbit/s"
    print(f"| {k[0]} | {link} | {k[2]} | {len(v)} | {s:.2f} | {b / 1e6:.1f} | {ok} of {len(v)} |")

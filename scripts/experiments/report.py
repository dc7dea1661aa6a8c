#!/usr/bin/env python3
"""Tables and plots for docs/experiments.md from the measured files only.

    python3 scripts/experiments/report.py [--quick|--full] [--fixed SECONDS]

Reads docs/experiments/results-<mode>.csv (scripts/experiments/run.sh) and
docs/experiments/similarity-<mode>.jsonl (scripts/experiments/similarity.sh);
writes docs/experiments/results-<mode>.md and the PNG figures beside them.
Cells with several rounds show medians. Nothing is typed in by hand.
"""
import csv
import json
import os
import statistics
import sys
from collections import defaultdict

mode = "full" if "--full" in sys.argv else "quick"
FIXED = float(sys.argv[sys.argv.index("--fixed") + 1]) if "--fixed" in sys.argv else 3.0
here = os.path.dirname(os.path.abspath(__file__))
out = os.path.normpath(os.path.join(here, "../../docs/experiments"))
csv_path = os.path.join(out, f"results-{mode}.csv")
sim_path = os.path.join(out, f"similarity-{mode}.jsonl")

XM = ["xm-none", "xm-zlib", "xm-lz4", "xm-zstd", "xm-auto", "xm-alone", "xm-inplace", "xm-srcref", "precache"]
# simple-aes: simple with the cipher xenmig asks ssh for (run.sh; not in
# its default METHODS, so not in the full mode's estimate either).
PEERS = ["simple", "simple-aes", "rsync", "rsync-z", "casync", "zstd-patch"]
ORDER = ["simple", "simple-aes", "simple-sync"] + XM + PEERS[2:]
# simple-sync: simple-aes, then `sync DST` on the target (durable, as
# xenmig's copy is); shown in the tables, not a peer of the claims check.
NOT_DEFAULT = {"simple-aes", "simple-sync"}
SCEN = ["release", "clone", "return", "cold", "big"]
# The scenarios of both modes (big: images.sh --big, same size in both).
SCALED = SCEN[:4]
SCEN_TXT = {
    "release": "trixie, target has bookworm",
    "clone": "template clone, target has bookworm template",
    "return": "return migration, target has the pre-change clone",
    "cold": "cold: clone, target has nothing",
    "big": "return migration of a 4 GiB guest, target has its pre-change copy",
}
MB = 1e6
md = []


def link_name(l):
    return "unshaped" if l == 0 else f"{l} Mbit/s"


# ------------------------------------------------------------ similarity --
if os.path.exists(sim_path):
    md.append(f"### Similarity (`xenmig similarity --json`, 4 KiB blocks), {mode} images\n")
    md.append("| guest | target has | blocks | zero | found (of non-zero) | found or zero (of all) | missing |")
    md.append("|---|---|---|---|---|---|---|")
    for line in open(sim_path):
        d = json.loads(line)
        md.append(
            f"| {d['guest']} | {d['target_has']} | {d['blocks_total']} | {d['blocks_zero']} "
            f"({100 * d['blocks_zero'] / d['blocks_total']:.1f}%) | {d['blocks_found']} "
            f"(**{d['found_percent_of_nonzero']:.1f}%**) | {d['found_or_zero_percent']:.1f}% | {d['blocks_missing']} |"
        )
    md.append("")

# --------------------------------------------------------------- results --
rows = list(csv.DictReader(open(csv_path))) if os.path.exists(csv_path) else []
cells = defaultdict(list)
meta = {}
for r in rows:
    key = (r["scenario"], int(r["link_mbps"]), r["method"])
    cells[key].append(r)
    meta[r["scenario"]] = (r["source"], r["reference"], int(r["image_bytes"]), int(r["nonzero_bytes"]))


def med(key, field):
    v = [float(r[field]) for r in cells[key] if r[field] != ""]
    return statistics.median(v) if v else None


def ok(key):
    return all(r["verified"] == "1" for r in cells[key])


links = sorted({k[1] for k in cells}, key=lambda l: (l == 0, -l))
links = [l for l in links if l != 0] + ([0] if 0 in links else [])
scens = [s for s in SCEN if any(k[0] == s for k in cells)]
methods = [m for m in ORDER if any(k[2] == m for k in cells)]

if rows:
    md.append(f"### Images ({mode})\n")
    md.append("| scenario | source image | target holds | image size | allocated (non-hole) |")
    md.append("|---|---|---|---|---|")
    for s in scens:
        src, ref, size, nz = meta[s]
        md.append(f"| {s} | {src}.img | {ref} | {size / MB:.1f} MB | {nz / MB:.1f} MB |")
    md.append("")
    for s in scens:
        md.append(f"### {s}: {SCEN_TXT[s]}\n")
        hdr = "| method | " + " | ".join(f"{link_name(l)} s | {link_name(l)} MB wire" for l in links) + " |"
        md.append(hdr)
        md.append("|---|" + "---|---|" * len(links))
        for m in methods:
            if not any((s, l, m) in cells for l in links):
                continue
            parts = []
            for l in links:
                k = (s, l, m)
                if k not in cells:
                    parts += ["", ""]
                    continue
                t, b = med(k, "seconds"), med(k, "wire_bytes")
                flag = "" if ok(k) else " (FAILED)"
                n = len(cells[k])
                parts += [f"{t:.1f}{flag}" + (f" (n={n})" if n > 1 else ""), f"{b / MB:.1f}"]
            md.append(f"| {m} | " + " | ".join(parts) + " |")
        md.append("")

    # ------------------------------------------------------------ claims --
    md.append(f"### Claims check (fixed cost allowed: {FIXED:.0f} s)\n")
    md.append(
        "Bound: xenmig's time <= 1.1 x (its bytes on the veth x 8 / link rate) + fixed cost. "
        "Peers: simple, simple-aes (where measured), rsync, rsync-z, casync, zstd-patch (precache is xenmig itself, not a peer).\n"
    )
    md.append("| scenario | link | xenmig method | s | wire MB | bound s | within bound | fastest peer | peer s | xenmig faster |")
    md.append("|---|---|---|---|---|---|---|---|---|---|")
    for s in scens:
        for l in links:
            peers = [(med((s, l, p), "seconds"), p) for p in PEERS if (s, l, p) in cells and ok((s, l, p))]
            best_peer = min(peers) if peers else None
            for m in XM:
                k = (s, l, m)
                if k not in cells:
                    continue
                t, b = med(k, "seconds"), med(k, "wire_bytes")
                if l:
                    bound = 1.1 * b * 8 / (l * 1e6) + FIXED
                    within = "yes" if t <= bound else f"**no** ({t / (1.1 * b * 8 / (l * 1e6)):.1f}x the wire time)"
                    bs = f"{bound:.1f}"
                else:
                    bs, within = "n/a", "n/a (unshaped)"
                if m == "precache":
                    faster, bp, bpt = "n/a (no peer was given an identical image)", "", ""
                elif best_peer:
                    faster = "yes" if t < best_peer[0] else f"**no** ({t / best_peer[0]:.2f}x)"
                    bp, bpt = best_peer[1], f"{best_peer[0]:.1f}"
                else:
                    faster, bp, bpt = "n/a", "", ""
                if not ok(k):
                    within = faster = "FAILED"
                md.append(f"| {s} | {link_name(l)} | {m} | {t:.1f} | {b / MB:.1f} | {bs} | {within} | {bp} | {bpt} | {faster} |")
    md.append("")

    # ------------------------------------------- how long the runs take --
    starts = sorted(r["started"] for r in rows)
    per_link = defaultdict(float)
    for k, rs in cells.items():
        per_link[k[1]] += sum(float(r["seconds"]) for r in rs)
    md.append("### Run time\n")
    md.append("Sum of the measured method times per link (setup, preparation and verification come on top; "
              f"first row started {starts[0]}, last {starts[-1]}):\n")
    md.append("| link | methods' seconds | cells |")
    md.append("|---|---|---|")
    for l in links:
        md.append(f"| {link_name(l)} | {per_link[l]:.0f} | {sum(len(v) for k, v in cells.items() if k[1] == l)} |")
    md.append("")
    # Full mode estimate: every (scenario, method) cell at every full link,
    # 3 rounds, images SCALE times larger: CPU part from the unshaped run (or
    # the fastest measured), wire part from the bytes at the new rate.
    SCALE = float(sys.argv[sys.argv.index("--scale") + 1]) if "--scale" in sys.argv else 2.5
    est = defaultdict(float)
    for s in SCALED:
        for m in [x for x in ORDER if x not in NOT_DEFAULT]:
            ks = [k for k in cells if k[0] == s and k[2] == m]
            if not ks:
                continue
            cpu = min(med(k, "seconds") for k in ks)
            b = statistics.median(med(k, "wire_bytes") for k in ks)
            for l in (100, 0, 20, 2):
                wire_t = b * 8 / (l * 1e6) if l else 0
                est[l] += 3 * SCALE * max(cpu, wire_t)
    md.append(f"Estimated full mode (`run.sh --full`: links 100, unshaped, 20 and 2 Mbit/s, all four scenarios, "
              f"3 rounds, images ~{SCALE}x the quick ones; each cell max(CPU time, wire bytes / rate), scaled; "
              "unmeasured cells (e.g. Simple at 2 Mbit/s) from the bytes measured on other links):\n")
    md.append("| link | estimated hours |")
    md.append("|---|---|")
    for l in (100, 0, 20, 2):
        md.append(f"| {link_name(l)} | {est[l] / 3600:.1f} |")
    md.append(f"| total | {sum(est.values()) / 3600:.1f} |")
    md.append("")

    # ------------------------------------------------------------- plots --
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "simple": "#888888", "simple-aes": "#bbbbbb", "simple-sync": "#555555", "xm-none": "#1f77b4", "xm-zlib": "#4a90d9", "xm-lz4": "#7fb3e6",
        "xm-zstd": "#0b4f8a", "xm-auto": "#2ca02c", "xm-inplace": "#17becf", "precache": "#98df8a", "rsync": "#d62728",
        "rsync-z": "#ff9896", "casync": "#9467bd", "zstd-patch": "#ff7f0e",
    }
    figs = []

    def bars(ax, value, ylabel):
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            xs, ys = [], []
            for j, s in enumerate(scens):
                v = value(s, m)
                if v is not None:
                    xs.append(j + (i - len(methods) / 2 + 0.5) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=m, color=colors.get(m))
        ax.set_xticks(range(len(scens)))
        ax.set_xticklabels(scens)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)

    for l in links:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        bars(ax, lambda s, m: med((s, l, m), "seconds") if (s, l, m) in cells else None, "seconds (median)")
        ax.set_title(f"Time per method, {link_name(l)} link ({mode} images)")
        ax.legend(ncol=6, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
        name = f"time-{mode}-{l if l else 'unshaped'}.png"
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=90, bbox_inches="tight")
        plt.close(fig)
        figs.append((f"Time per method, {link_name(l)}", name))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ref_link = links[0]

    def wire_any(s, m):
        v = [med((s, l, m), "wire_bytes") for l in links if (s, l, m) in cells]
        return statistics.median(v) / MB if v else None

    bars(ax, wire_any, "MB on the veth (both directions, log scale)")
    ax.set_yscale("log")
    ax.set_title(f"Bytes on the wire per method ({mode} images; median over links)")
    ax.legend(ncol=6, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    name = f"bytes-{mode}.png"
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=90, bbox_inches="tight")
    plt.close(fig)
    figs.append(("Bytes on the wire per method", name))
    md.append("### Figures\n")
    for t, n in figs:
        md.append(f"![{t}](experiments/{n})\n")

path = os.path.join(out, f"results-{mode}.md")
text = "\n".join(md) + "\n"
open(path, "w").write(text)
print(path)
# Splice the same text into docs/experiments.md between its markers.
doc = os.path.join(out, "..", "experiments.md")
begin, end = f"<!-- BEGIN generated {mode} -->", f"<!-- END generated {mode} -->"
if os.path.exists(doc):
    d = open(doc).read()
    if begin in d and end in d:
        a, b = d.index(begin) + len(begin), d.index(end)
        open(doc, "w").write(d[:a] + "\n" + text + d[b:])
        print(os.path.normpath(doc))

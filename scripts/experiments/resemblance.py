#!/usr/bin/env python3
"""How much of a copy's stream content resembles a reference (session 19):
the share of content-defined anchors (a 32-bit gear hash over 32-byte
windows, one window in 4096, as `wire::sketch::anchors`) of 16 MiB samples
of the blocks SRC has and REF lacks (by SHA-1, in disk order: what the
stream carries) that REF holds too. Measured before xenmig's late
reference got its resemblance check (`copy::shared_ref::resemblance`).

    python3 scripts/experiments/resemblance.py bookworm trixie clone

(image names in /var/tmp/xenmig-exp/quick/img; needs numpy; ~15 s.) The
gear table here is numpy's, not xenmig's: the shares, not the anchors,
are what compare.
"""
import hashlib
import sys

import numpy as np

IMG = "/var/tmp/xenmig-exp/quick/img/"
GEAR = np.random.default_rng(5).integers(0, 2**32, 256, dtype=np.uint64).astype(np.uint32)
BITS = 12
SAMPLE = 16 << 20


def gear(buf):
    g = GEAR[np.frombuffer(buf, dtype=np.uint8)]
    h = np.zeros(len(g), dtype=np.uint32)
    for k in range(32):  # h_i = sum_k g[i-k] << k (mod 2^32)
        h[k:] += g[: len(g) - k] << np.uint32(k)
    return h


def anchors(buf):
    idx = np.nonzero((gear(buf) >> np.uint32(32 - BITS)) == 0)[0]
    return {bytes(buf[i - 31 : i + 1]) for i in idx[idx >= 31]}


def blocks(path):
    d = open(path, "rb").read()
    return [d[i : i + 4096] for i in range(0, len(d), 4096)]


def missing(src, ref, start):
    have = {hashlib.sha1(b).digest() for b in blocks(IMG + ref + ".img")}
    zero, out, at = bytes(4096), [], 0
    for b in blocks(IMG + src + ".img"):
        if b == zero or hashlib.sha1(b).digest() in have:
            continue
        if at >= start:
            out.append(b)
        at += 4096
        if at >= start + SAMPLE:
            break
    return b"".join(out)


ref = sys.argv[1]
data = open(IMG + ref + ".img", "rb").read()
held = set()
for i in range(0, len(data), 64 << 20):
    held |= anchors(data[max(0, i - 31) : i + (64 << 20)])
for src in sys.argv[2:]:
    for start in (0, 16 << 20, 48 << 20):
        a = anchors(missing(src, ref, start))
        print(f"{src} against {ref}, content from {start >> 20} MiB: {len(a)} anchors, "
              f"{100 * len(a & held) / max(1, len(a)):.1f}% in {ref}")

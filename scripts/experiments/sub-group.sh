#!/bin/bash
# Key bytes of groups that mostly match DST (issue 11, direction 4, next
# step), measured before building it. A group whose group digest the
# target cannot match (not in place, not all zeros, not a whole group of
# DST or a reference elsewhere) gets its per-block keys, 15 bytes each.
# Per cell, the key bytes of those groups:
#
#   today:  every block's key;
#   always: the target sends a 15-byte key per sub-group of S blocks of
#           what DST holds there; the source sends the keys of the blocks
#           of the sub-groups that differ;
#   zero-bit: as "always", but a sub-group that is all zeros in DST is a
#           bit, not a key (so a new, all-zero DST costs a bitmap only);
#   only-nonzero-dst: "always" only for groups where DST holds data, the
#           others get every key.
#
# And for return-inplace a tree of halvings (a key per half whose parent
# differs, down to leaves whose block keys travel).
#
# Frame headers are left out (about 20 bytes per group asked about).
# Blocks are 4 KiB, groups 1 MiB (256 blocks), the quick images' layout
# (flat: they have no partition table). Equality of SHA-1s stands for
# equality of blocks.
#
#   scripts/experiments/sub-group.sh       # after images.sh --quick
set -euo pipefail
EXP=${EXP:-/var/tmp/xenmig-exp/quick}
IMG=$EXP/img
for f in clone.img return.img bookworm.img trixie.img; do
    [ -f "$IMG/$f" ] || { echo "$0: $IMG/$f missing; run scripts/experiments/images.sh --quick first" >&2; exit 1; }
done
python3 - "$IMG" <<'EOF'
import hashlib, sys
BS, GB, K = 4096, 256, 15
Z = bytes(BS)
img = sys.argv[1] + "/"
cache = {}
tree = []
def blocks(p):
    if p not in cache:
        out = []
        with open(img + p, "rb") as f:
            while b := f.read(BS):
                out.append(None if b == Z[:len(b)] else hashlib.sha1(b).digest())
        cache[p] = out
    return cache[p]
print("| cell (DST holds, -r) | groups asked | S | today | always | zero-bit | only-nonzero-dst |")
print("|---|---|---|---|---|---|---|")
for name, src, old, ref in [
    ("return-inplace", "return.img", "clone.img", None),
    ("return", "return.img", None, "clone.img"),
    ("clone", "clone.img", None, "bookworm.img"),
    ("release", "trixie.img", None, "bookworm.img"),
    ("cold", "clone.img", None, None),
]:
    s = blocks(src)
    n = len(s)
    o = blocks(old) if old else [None] * n
    known = set()
    for im in [o] + ([blocks(ref)] if ref else []):
        known |= {tuple(im[g * GB:(g + 1) * GB]) for g in range((len(im) + GB - 1) // GB)}
    asked = []
    for g in range((n + GB - 1) // GB):
        a, b = g * GB, min(n, (g + 1) * GB)
        if s[a:b] == o[a:b] or all(x is None for x in s[a:b]) or tuple(s[a:b]) in known:
            continue
        asked.append((a, b))
    today = sum(b - a for a, b in asked) * K
    for S in (8, 16, 32):
        always = zbit = nzdst = 0
        for a, b in asked:
            subs = (b - a + S - 1) // S
            keys = nonzero = 0
            for c in range(a, b, S):
                e = min(b, c + S)
                if s[c:e] != o[c:e]:
                    keys += (e - c) * K
                if any(o[c:e]):
                    nonzero += 1
            always += subs * K + keys
            zbit += (subs + 7) // 8 + nonzero * K + keys
            nzdst += subs * K + keys if nonzero else (b - a) * K
        print(f"| {name} ({old or 'new'}, {ref or '-'}) | {len(asked)} | {S} | {today} | {always} | {zbit} | {nzdst} |")
    if name != "return-inplace":
        continue
    # A tree of halvings instead: a 15-byte key per half where its parent
    # differs, down to leaves of L blocks, whose keys then travel (a round
    # trip per level).
    for L in (4, 8, 16):
        tot = 0
        for a, b in asked:
            todo = [(a, b)]
            while todo:
                x, y = todo.pop()
                if y - x <= L:
                    tot += (y - x) * K if s[x:y] != o[x:y] else 0
                    continue
                m = (x + y) // 2
                for p, q in ((x, m), (m, y)):
                    tot += K
                    if s[p:q] != o[p:q]:
                        todo.append((p, q))
        tree.append(f"leaves of {L}: {tot}")
print()
print("return-inplace, a tree of halvings:", "; ".join(tree))
EOF

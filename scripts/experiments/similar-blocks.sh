#!/bin/bash
# Candidates found by similarity (issue 11, direction 4's second half),
# measured before building it. On the return-inplace cell (return.img onto
# DST = a copy of clone.img) the blocks a copy fetches are the source's
# non-zero blocks whose content DST holds nowhere. Those whose DST block at
# the same index is non-zero already go as sub-block deltas against it
# (CAP_SUB_DELTA); the others ("far" blocks: rewritten files that landed in
# free space, the new log) go whole. Does DST hold a similar block
# elsewhere for them, and what would a delta against it save?
#
# Per far block, a resemblance sketch (a 32-bit gear hash of every 32-byte
# window, `h = (h << 1) + G[byte]`, as a target and source would compute it
# in one pass), in two styles:
#   N-transform: 12 features, feature i = max over windows of m_i*h + a_i
#     (mod 2^32); grouped into super-features (SF) of F features each;
#   Finesse: feature = max h in each of 12 equal regions; 4 groups of 3
#     adjacent regions, sorted within each group; SF r = the r-th of each
#     group (3 SFs).
# Every non-zero DST block is sketched and indexed (SF slot, value) -> the
# first DST block with it (one entry per value: bounded memory). A far
# block's candidate is the DST block sharing the most SFs with it (ties:
# the lowest index). What would travel for a far block with a candidate is
# the existing encoding (`src/wire/subdelta.rs`): a bitmap and the 512-byte
# sub-blocks that differ from the candidate's, through the one zstd -3
# stream with everything else fetched (the same-index deltas as today);
# up: the candidate's signature (32 bytes per 4 KiB block); down: the
# sketches of every far block (4 bytes per SF); plus the frame headers of a
# delta request and answer (31 bytes besides the signature, the measured
# FetchDelta + Delta headers).
#
# Upper bound: every far block against the DST block with the most equal
# non-zero 512-byte sub-blocks at the same offsets, found by exhaustive
# search over all of DST (an index of every non-zero sub-block by offset and
# content): the most any candidate can save with this encoding.
# "unchanged DST only": candidates only among DST blocks the copy does not
# rewrite (in place, a rewritten candidate may be gone before its delta is
# applied: then the block is refetched whole, never wrong, but not saved).
#
#   scripts/experiments/similar-blocks.sh        # after images.sh --quick; needs python3 with numpy
set -euo pipefail
EXP=${EXP:-/var/tmp/xenmig-exp/quick}
IMG=$EXP/img
SRC=${SRC:-$IMG/return.img}
OLD=${OLD:-$IMG/clone.img}
for f in "$SRC" "$OLD"; do
    [ -f "$f" ] || { echo "$0: $f missing; run scripts/experiments/images.sh --quick first" >&2; exit 1; }
done
python3 -c 'import numpy' 2>/dev/null || { echo "$0: needs numpy (pip install numpy, or apt-get install python3-numpy)" >&2; exit 1; }
tmp=$(mktemp -d /var/tmp/xenmig-similar.XXXXXX)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$tmp"' EXIT

python3 - "$SRC" "$OLD" "$tmp" >"$tmp/encodings" <<'EOF'
import hashlib, sys
from collections import Counter, defaultdict
import numpy as np

src_path, old_path, out = sys.argv[1:4]
BS, SUB, W = 4096, 512, 32
NSUB = BS // SUB
src = np.fromfile(src_path, dtype=np.uint8)
old = np.fromfile(old_path, dtype=np.uint8)
assert len(src) % BS == 0 and len(old) % BS == 0
S = src.reshape(-1, BS)
O = old.reshape(-1, BS)
key = lambda b: hashlib.blake2b(b.tobytes(), digest_size=16).digest()
s_nz = S.any(axis=1)
o_nz = O.any(axis=1)
have = {key(O[i]) for i in np.flatnonzero(o_nz)}
fetched = [i for i in np.flatnonzero(s_nz) if key(S[i]) not in have]
def same_index(i):
    return i < len(O) and o_nz[i]
near = [i for i in fetched if same_index(i)]
far = [i for i in fetched if not same_index(i)]
unchanged = np.zeros(len(O), dtype=bool)
n = min(len(O), len(S))
unchanged[:n] = (O[:n] == S[:n]).all(axis=1)
print(f"counts {len(fetched)} {len(near)} {len(far)} {int(o_nz.sum())}")

# Gear table and transforms, fixed seeds (any random constants do).
rng = np.random.default_rng(11)
G = rng.integers(0, 2**32, size=256, dtype=np.uint64).astype(np.uint32)
M = (rng.integers(0, 2**32, size=12, dtype=np.uint64) | 1).astype(np.uint32)
A = rng.integers(0, 2**32, size=12, dtype=np.uint64).astype(np.uint32)

def gear(X):
    """32-bit gear hash of every full 32-byte window of each row."""
    g = G[X]
    L = BS - W + 1
    h = np.zeros((X.shape[0], L), dtype=np.uint32)
    for j in range(W):
        h += g[:, W - 1 - j: W - 1 - j + L] << np.uint32(j)
    return h

def features(X):
    """(ntrans features, finesse features) per row."""
    nt, fi = [], []
    for c in range(0, X.shape[0], 1024):
        h = gear(X[c:c + 1024])
        nt.append(np.stack([(h * M[t] + A[t]).max(axis=1) for t in range(12)], axis=1))
        regions = np.array_split(np.arange(h.shape[1]), 12)
        fi.append(np.stack([h[:, r[0]:r[-1] + 1].max(axis=1) for r in regions], axis=1))
    return np.concatenate(nt), np.concatenate(fi)

def sfs(nt, fi, style):
    """Super-features per row: list of tuples (one per SF slot)."""
    if style.startswith("nt"):
        f = int(style[2:])  # features per SF
        return [tuple(tuple(int(v) for v in row[s * f:(s + 1) * f]) for s in range(12 // f)) for row in nt]
    rows = []
    for row in fi:
        groups = [sorted(int(v) for v in row[g * 3:(g + 1) * 3]) for g in range(4)]
        rows.append(tuple(tuple(groups[g][r] for g in range(4)) for r in range(3)))
    return rows

dst_idx = np.flatnonzero(o_nz)
dnt, dfi = features(O[dst_idx])
fnt, ffi = features(S[far]) if far else (np.zeros((0, 12), np.uint32),) * 2

def pick(style, allowed):
    """far block -> (candidate DST block or None, SFs shared)."""
    d = sfs(dnt, dfi, style)
    index = [dict() for _ in d[0]] if d else []
    for b, row in zip(dst_idx, d):
        if not allowed[b]:
            continue
        for slot, v in enumerate(row):
            index[slot].setdefault(v, int(b))
    res = {}
    for i, row in zip(far, sfs(fnt, ffi, style)):
        c = Counter(index[slot][v] for slot, v in enumerate(row) if v in index[slot])
        if c:
            best = max(c.items(), key=lambda kv: (kv[1], -kv[0]))
            res[i] = best
        else:
            res[i] = (None, 0)
    return res, len(d[0]) if d else 0

# Exhaustive bound: most equal non-zero sub-blocks at the same offset.
def exhaustive(allowed):
    subidx = defaultdict(list)
    zsub = bytes(SUB)
    for b in dst_idx:
        if not allowed[b]:
            continue
        blk = O[b].tobytes()
        for k in range(NSUB):
            s = blk[k * SUB:(k + 1) * SUB]
            if s != zsub:
                subidx[(k, hashlib.blake2b(s, digest_size=16).digest())].append(int(b))
    res = {}
    for i in far:
        blk = S[i].tobytes()
        c = Counter()
        for k in range(NSUB):
            s = blk[k * SUB:(k + 1) * SUB]
            if s != zsub:
                c.update(subidx.get((k, hashlib.blake2b(s, digest_size=16).digest()), ()))
        res[i] = max(c.items(), key=lambda kv: (kv[1], -kv[0])) if c else (None, 0)
    return res

def delta(new, base):
    """subdelta::encode's body: bitmap, then the differing sub-blocks."""
    bits, lits = 0, []
    for k in range(NSUB):
        if not np.array_equal(new[k * SUB:(k + 1) * SUB], base[k * SUB:(k + 1) * SUB]):
            bits |= 1 << k
            lits.append(new[k * SUB:(k + 1) * SUB].tobytes())
    return bits.to_bytes(1, "little") + b"".join(lits), NSUB - len(lits)

def write(name, cands, sketch_bytes):
    """The down stream in block order; prints up, sketch and header bytes."""
    up = 32 * len(near)
    hdr = 31 * len(near)
    found = saved = 0
    with open(f"{out}/{name}.down", "wb") as w:
        for i in fetched:
            if same_index(i):
                w.write(delta(S[i], O[i])[0])
                continue
            c = cands.get(i, (None, 0))[0] if cands else None
            if c is None:
                w.write(S[i].tobytes())
                continue
            body, same = delta(S[i], O[c])
            w.write(body)
            found += 1
            saved += same
            up += 32
            hdr += 31
    print(f"enc {name} {up} {sketch_bytes} {hdr} {found} {saved}")

allow_all = np.ones(len(O), dtype=bool)
write("today", None, 0)
for style in ("nt4", "nt2", "nt1", "finesse"):
    for label, allowed in (("all", allow_all), ("unchanged", unchanged)):
        res, nsf = pick(style, allowed)
        write(f"{style}-{label}", res, 4 * nsf * len(far))
for label, allowed in (("all", allow_all), ("unchanged", unchanged)):
    write(f"bound-{label}", exhaustive(allowed), 0)
with open(f"{out}/far.raw", "wb") as w:
    for i in far:
        w.write(S[i].tobytes())
EOF

mb() { awk -v b="$1" 'BEGIN { printf "%.3f", b / 1e6 }'; }
read -r _ nfetched nnear nfar ndst < <(grep '^counts' "$tmp/encodings")
echo "Fetched blocks: $nfetched; $nnear with a non-zero DST block at the same index (same-index deltas), $nfar without (far); $ndst non-zero DST blocks indexed."
echo
echo "| candidates for far blocks | found | sub-blocks equal | down MB (zstd stream) | up MB (signatures) | sketch MB | delta headers MB | total MB |"
echo "|---|---|---|---|---|---|---|---|"
grep '^enc' "$tmp/encodings" | while read -r _ name up sk hdr found saved; do
    down=$(zstd -q -3 --long=27 -c "$tmp/$name.down" | wc -c)
    case $name in
        today) label="none (today: far blocks whole)" ;;
        nt4-*) label="N-transform, 3 SFs of 4 features" ;;
        nt2-*) label="N-transform, 6 SFs of 2 features" ;;
        nt1-*) label="N-transform, 12 SFs of 1 feature" ;;
        finesse-*) label="Finesse, 3 SFs of 4 features" ;;
        bound-*) label="exhaustive: most equal sub-blocks (bound)" ;;
    esac
    case $name in *-unchanged) label="$label, unchanged DST only" ;; esac
    echo "| $label | $found of $nfar | $saved | $(mb "$down") | $(mb "$up") | $(mb "$sk") | $(mb "$hdr") | $(mb $((down + up + sk + hdr))) |"
done
far=$(zstd -q -3 --long=27 -c "$tmp/far.raw" | wc -c)
farp=$(zstd -q -3 --long=30 --patch-from="$OLD" -c "$tmp/far.raw" | wc -c)
far19=$(zstd -q -19 --long=27 -c "$tmp/far.raw" | wc -c)
echo
echo "Far blocks alone, whole: $(mb "$far") MB (\`zstd -3\`), $(mb "$far19") MB (\`-19\`), $(mb "$farp") MB (\`-3 --patch-from=OLD\`: all of DST as dictionary)."
p=$(zstd -q -3 --long=30 --patch-from="$OLD" -c "$SRC" | wc -c)
echo "\`zstd -3 --long=30 --patch-from=OLD\` of the whole image: $(mb "$p") MB."

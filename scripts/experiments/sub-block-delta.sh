#!/bin/bash
# Changed blocks against their old version (issue 11, direction 4), measured
# before building it. On the return cell (return.img onto a target holding
# clone.img, its copy from before the changes) the blocks a copy fetches are
# the source's non-zero blocks whose content the target holds nowhere. Of
# those, the *candidates* have an old version: the target's block at the
# same index is non-zero. Per candidate encoding, what would travel:
#
#   (a) today: every fetched block whole, through the copy's zstd stream
#       (`zstd -3 --long=27` of the blocks in order);
#   (b) aligned sub-block dedup: for each candidate the target sends a
#       signature of its old block (H bytes per S-byte sub-block, up); the
#       source sends a bitmap of the sub-blocks that differ and only those,
#       through the same stream (down); other fetched blocks go whole;
#   (c) rsync-style within the block: the target sends a weak + strong hash
#       (H bytes) per S-byte chunk of the old block; the source finds those
#       chunks at any byte offset of its block (a rolling search) and sends
#       copy/literal instructions (3 bytes each) and the literal bytes.
#
# Down = zstd stream of what the source writes; up = signature bytes
# (random, incompressible, sent as they are). Frame headers are left out:
# each encoding needs about the same per block. Hash collisions are left
# out too: a rebuilt block is verified against its digest and refetched
# when wrong, so a short sub-block hash costs a refetch, never a wrong block.
#
#   scripts/experiments/sub-block-delta.sh       # after images.sh --quick
set -euo pipefail
EXP=${EXP:-/var/tmp/xenmig-exp/quick}
IMG=$EXP/img
SRC=${SRC:-$IMG/return.img}
OLD=${OLD:-$IMG/clone.img}
for f in "$SRC" "$OLD"; do
    [ -f "$f" ] || { echo "$0: $f missing; run scripts/experiments/images.sh --quick first" >&2; exit 1; }
done
tmp=$(mktemp -d /var/tmp/xenmig-subdelta.XXXXXX)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$tmp"' EXIT

# Writes $tmp/<encoding>.down (what the source would stream, uncompressed)
# and prints "<encoding> <up bytes>" per encoding, plus the block counts.
python3 - "$SRC" "$OLD" "$tmp" >"$tmp/encodings" <<'EOF'
import hashlib, sys
src, old, out = sys.argv[1:4]
BS = 4096
Z = bytes(BS)
key = lambda b: hashlib.blake2b(b, digest_size=16).digest()
have = set()
olds = []
with open(old, "rb") as f:
    while b := f.read(BS):
        have.add(key(b))
        olds.append(b)
fetched = []  # (new block, old block at the same index or None)
with open(src, "rb") as f:
    i = 0
    while b := f.read(BS):
        if b != Z[:len(b)] and key(b) not in have:
            o = olds[i] if i < len(olds) and olds[i] != Z[:len(olds[i])] else None
            fetched.append((b, o))
        i += 1
cand = sum(1 for _, o in fetched if o is not None)
print(f"counts {len(fetched)} {cand}")

def write(name, parts, up):
    with open(f"{out}/{name}.down", "wb") as w:
        for p in parts:
            w.write(p)
    print(f"enc {name} {up}")

write("a", [b for b, _ in fetched], 0)

# (b) aligned sub-blocks of S bytes, H-byte hashes up.
for S in (128, 256, 512):
    for H in (4, 8):
        parts, up = [], 0
        n = BS // S
        for b, o in fetched:
            if o is None:
                parts.append(b)
                continue
            up += n * H
            bits = 0
            lits = []
            for k in range(n):
                if b[k * S:(k + 1) * S] != o[k * S:(k + 1) * S]:
                    bits |= 1 << k
                    lits.append(b[k * S:(k + 1) * S])
            parts.append(bits.to_bytes((n + 7) // 8, "little"))
            parts.extend(lits)
        write(f"b-S{S}-H{H}", parts, up)

# (c) rsync within the block: chunks of S bytes of the old block, found at
# any offset of the new one (exact byte comparison stands for weak + strong
# hash); greedy left to right. An instruction is 3 bytes (copy chunk k /
# literal of length L).
for S in (64, 128, 256):
    for H in (8,):
        parts, up = [], 0
        for b, o in fetched:
            if o is None:
                parts.append(b)
                continue
            up += (BS // S) * H
            chunks = {}
            for k in range(BS // S):
                chunks.setdefault(o[k * S:(k + 1) * S], k)
            pos, lit = 0, bytearray()
            instr, lits = bytearray(), []
            while pos < len(b):
                k = chunks.get(b[pos:pos + S]) if pos + S <= len(b) else None
                if k is not None:
                    if lit:
                        instr += b"L" + len(lit).to_bytes(2, "little")
                        lits.append(bytes(lit))
                        lit = bytearray()
                    instr += b"C" + k.to_bytes(2, "little")
                    pos += S
                else:
                    lit.append(b[pos])
                    pos += 1
            if lit:
                instr += b"L" + len(lit).to_bytes(2, "little")
                lits.append(bytes(lit))
            parts.append(bytes(instr))
            parts.extend(lits)
        write(f"c-S{S}-H{H}", parts, up)
EOF

mb() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1e6 }'; }
read -r _ nfetched ncand < <(grep '^counts' "$tmp/encodings")
echo "Fetched blocks: $nfetched, of which $ncand have a non-zero old block at the same index."
echo
echo "| encoding | raw down MB | down MB (zstd stream) | up MB (signatures) | total MB |"
echo "|---|---|---|---|---|"
grep '^enc' "$tmp/encodings" | while read -r _ name up; do
    raw=$(wc -c <"$tmp/$name.down")
    down=$(zstd -q -3 --long=27 -c "$tmp/$name.down" | wc -c)
    case $name in
        a) label="(a) whole blocks (today)" ;;
        b-*) label="(b) aligned sub-blocks, ${name#b-}" ;;
        c-*) label="(c) rsync within the block, ${name#c-}" ;;
    esac
    echo "| $label | $(mb "$raw") | $(mb "$down") | $(mb "$up") | $(mb $((down + up))) |"
done
p=$(zstd -q -3 --long=30 --patch-from="$OLD" -c "$SRC" | wc -c)
echo "| \`zstd -3 --long=30 --patch-from=OLD\` (OLD on the source too) | | $(mb "$p") | 0 | $(mb "$p") |"

#!/bin/bash
# How much would the blocks both ends already share help as compression
# history for the missing ones (issue 11, direction 2)? Measured before
# building it, with zstd itself as the upper bound: per cell, the source's
# non-zero blocks are split into those the target's image holds (same
# content anywhere in it: what xenmig reuses) and the missing ones (what it
# fetches), and the missing ones are compressed
#   - as one stream (what `--compress zstd` now sends, window 2^27),
#   - with every shared block as a --patch-from dictionary (direction 2),
#   - with the target's whole image as the dictionary (direction 3: needs
#     the reference on the source too, as zstd --patch-from does).
#
#   scripts/experiments/shared-history.sh        # after images.sh --quick
set -euo pipefail
EXP=${EXP:-/var/tmp/xenmig-exp/quick}
IMG=$EXP/img
tmp=$(mktemp -d /var/tmp/xenmig-shared.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# SRC REF OUT: writes OUT.found and OUT.missing (non-zero blocks of SRC
# whose content REF holds anywhere, and the others, in image order).
split() {
    python3 - "$@" <<'EOF'
import hashlib, sys
src, ref, out = sys.argv[1:4]
bs = 4096
z = bytes(bs)
key = lambda b: hashlib.blake2b(b, digest_size=16).digest()
have = set()
with open(ref, "rb") as f:
    while b := f.read(bs):
        have.add(key(b))
with open(src, "rb") as f, open(out + ".found", "wb") as fo, open(out + ".missing", "wb") as mo:
    while b := f.read(bs):
        if b != z[:len(b)]:
            (fo if key(b) in have else mo).write(b)
EOF
}
size() { wc -c <"$1"; }
mb() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1e6 }'; }

echo "| cell | shared blocks MB | missing blocks MB | one stream (-3 --long=27) | + shared blocks as dictionary | + whole reference as dictionary |"
echo "|---|---|---|---|---|---|"
for cell in "release trixie.img bookworm.img" "clone clone.img bookworm.img" "return return.img clone.img"; do
    set -- $cell
    split "$IMG/$2" "$IMG/$3" "$tmp/$1"
    m=$tmp/$1.missing
    a=$(zstd -q -3 --long=27 -c "$m" | wc -c)
    b=$(zstd -q -3 --long=30 --patch-from="$tmp/$1.found" -c "$m" | wc -c)
    c=$(zstd -q -3 --long=30 --patch-from="$IMG/$3" -c "$m" | wc -c)
    echo "| $1 | $(mb "$(size "$tmp/$1.found")") | $(mb "$(size "$m")") | $(mb "$a") | $(mb "$b") | $(mb "$c") |"
    rm -f "$tmp/$1".*
done

#!/bin/bash
# The seed's Table 5.1 for real Debian releases: share of an image's blocks
# found in the images the target holds, zero blocks apart, from
# `xenmig similarity --json`. Writes docs/experiments/similarity-<mode>.jsonl
# (one report per line, with "guest" and "target_has" added).
#
#   scripts/experiments/similarity.sh [--quick|--full]
set -euo pipefail
MODE=quick
case "${1:-}" in --full) MODE=full ;; --quick|"") ;; *) echo "usage: $0 [--quick|--full]" >&2; exit 2 ;; esac
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${XENMIG:-$REPO/target/release/xenmig}
IMG=${EXP:-/var/tmp/xenmig-exp/$MODE}/img
OUT=$REPO/docs/experiments/similarity-$MODE.jsonl
: > "$OUT"
one() { # guest ref...
    local g=$1; shift
    local args=() r
    for r in "$@"; do args+=(-r "$IMG/$r.img"); done
    "$BIN" similarity -q --json "${args[@]}" "$IMG/$g.img" |
        python3 -c 'import json,sys; d=json.load(sys.stdin); d["guest"]=sys.argv[1]; d["target_has"]=" and ".join(sys.argv[2:]); print(json.dumps(d))' "$g" "$@" >> "$OUT"
}
R=(bullseye bookworm trixie)
for g in "${R[@]}"; do for r in "${R[@]}"; do [ "$g" = "$r" ] || one "$g" "$r"; done; done
one bookworm bullseye trixie
one clone bookworm
one return clone
one return bookworm
echo "$OUT" >&2

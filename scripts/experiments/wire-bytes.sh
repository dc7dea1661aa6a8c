#!/bin/bash
# Bytes on the wire, side by side in one run (issue 11): a baseline xenmig
# against this one, both with --compress zstd and auto, on the quick
# images' cold and release cells, next to `zstd -3 --long=30` of the
# source's non-zero blocks (what a whole-stream compressor with a 1 GiB
# window sends when it also skips zeros) and `zstd -3 --long=30
# --patch-from` (which needs the reference on the source too).
#
#   scripts/experiments/wire-bytes.sh            # after images.sh --quick
#
# Copies are local (a socket pair, unshaped): bytes do not depend on the
# link, except that `auto` picks its codec from the measured link rate, so
# its row here shows what it picks on a fast link, not on a slow one.
# RATE=BYTES_PER_S instead runs the target end as `xenmig serve` behind a
# stand-in for ssh that passes each direction through a rate limiter (a
# pipe at that rate, not tc on a veth as run.sh does; e.g. RATE=12500000
# for 100 Mbit/s), which is what `auto` needs to see a slow link.
# BEFORE: the baseline binary (default: built from commit $BASE, 9184316,
# the last commit before the stream, into $PREV_DIR); AFTER: default
# target/release/xenmig (built if missing). Prints a markdown table.
# Cell return-inplace is the return migration as `migrate` runs it: DST
# already holds the old copy (clone.img), no -r; what changed is fetched
# (and, with CAP_SUB_DELTA on both ends, sent against DST's old blocks).
# SRCREF=1: the AFTER binary also gets `--source-reference REF` in the
# cells that have a reference (release, clone, return: the source holds the
# target's reference too, the case `zstd --patch-from` needs), so its rows
# use the reference as the stream's dictionary (CAP_SHARED_REF); the
# BEFORE rows are as without it. CODECS (default "zstd auto") picks the
# --compress values compared.
# A stream whose level changed (`auto` on a slow link, CAP_STREAM_LEVELS)
# shows its levels in the codecs column ("levels 3>19").
set -euo pipefail
cd "$(dirname "$0")/../.."
EXP=${EXP:-/var/tmp/xenmig-exp/quick}
IMG=$EXP/img
BASE=${BASE:-9184316}
PREV_DIR=${PREV_DIR:-/var/tmp/xenmig-prev}
ROUNDS=${ROUNDS:-1}
CELLS=${CELLS:-cold release}   # also: clone return return-inplace
CODECS=${CODECS:-zstd auto}
SRCREF=${SRCREF:-}
for f in clone.img trixie.img bookworm.img return.img; do
    [ -f "$IMG/$f" ] || { echo "$0: $IMG/$f missing; run scripts/experiments/images.sh --quick first" >&2; exit 1; }
done
if [ -z "${BEFORE:-}" ]; then
    BEFORE=$PREV_DIR/$BASE/target/release/xenmig
    if [ ! -x "$BEFORE" ]; then
        rm -rf "${PREV_DIR:?}/$BASE"; mkdir -p "$PREV_DIR/$BASE"
        git archive "$BASE" | tar -x -C "$PREV_DIR/$BASE"
        (cd "$PREV_DIR/$BASE" && cargo build --release --bin xenmig -q)
    fi
fi
if [ -z "${AFTER:-}" ]; then
    cargo build --release --bin xenmig -q
    AFTER=${CARGO_TARGET_DIR:-$PWD/target}/release/xenmig
fi
tmp=$(mktemp -d /var/tmp/xenmig-wire.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if [ -n "${RATE:-}" ]; then
    cat >"$tmp/ratelimit.py" <<'EOF'
# Copy stdin to stdout at most RATE bytes/s (bursts of at most 64 KiB).
import os, sys, time
rate = float(sys.argv[1])
t0 = time.monotonic(); sent = 0
while b := os.read(0, 16384):
    sent += len(b)
    ahead = sent / rate - (time.monotonic() - t0)
    if ahead > 65536 / rate:
        time.sleep(ahead - 65536 / rate)
    v = memoryview(b)
    while v:
        v = v[os.write(1, v):]
EOF
    # Called as `SSH HOST COMMAND`: runs COMMAND here, both directions limited.
    cat >"$tmp/shape-ssh" <<EOF
#!/bin/bash
shift
python3 $tmp/ratelimit.py $RATE | sh -c "\$*" | python3 $tmp/ratelimit.py $RATE
EOF
    chmod +x "$tmp/shape-ssh"
fi

# The non-zero 4 KiB blocks of an image, in order, on stdout.
nonzero() {
    python3 - "$1" <<'EOF'
import sys
z = bytes(4096)
with open(sys.argv[1], "rb") as f:
    out = sys.stdout.buffer
    while b := f.read(4096):
        if b != z[:len(b)]:
            out.write(b)
EOF
}

mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }

# xenmig copy: prints "wire_bytes seconds codecs".
xm() { # binary codec src [ref [old [srcref]]]: old, if given, is DST's content beforehand
    local bin=$1 codec=$2 src=$3 ref=${4:-} old=${5:-} srcref=${6:-} args=()
    [ -n "$ref" ] && args=(-r "$ref")
    [ -n "$srcref" ] && args+=(--source-reference "$srcref")
    # What crosses the wire is the point: a local copy onto a new DST with
    # no reference would otherwise go direct, with no wire at all.
    "$bin" copy --help | grep -q -- --no-direct && args+=(--no-direct)
    local dst=$tmp/dst.img
    if [ -n "${RATE:-}" ]; then
        args+=(-s "$tmp/shape-ssh" --remote-xenmig "$bin")
        dst=h:$tmp/dst.img
    fi
    rm -f "$tmp/dst.img"
    [ -n "$old" ] && cp --sparse=always "$old" "$tmp/dst.img"
    local t0 t1 out rc=0
    t0=$(date +%s.%N)
    # (xm runs in a command substitution, where bash drops set -e: a failed
    # copy must be told apart from a wrong one here)
    out=$("$bin" -q copy --json --compress "$codec" "${args[@]}" "$src" "$dst") || rc=$?
    t1=$(date +%s.%N)
    [ "$rc" = 0 ] || { echo "$0: $bin copy of $src failed, exit status $rc" >&2; exit 1; }
    cmp -s "$src" "$tmp/dst.img" || { echo "$0: $bin made a wrong copy of $src" >&2; exit 1; }
    python3 -c '
import json, sys
r = json.loads(sys.argv[1])
assert r["verified"]
assert r["blocks_total"] == r["blocks_zero"] + r["blocks_reused"] + r["blocks_fetched"]
c = "" if not r.get("blocks_delta") else "%d deltas " % r["blocks_delta"]
c += ",".join("%s %.0f%%" % (k, 100 * v / max(1, r["bytes_fetched"])) for k, v in sorted(r["codecs"].items()))
if r.get("shared_reference"):
    c = "dictionary " + c
if len(r.get("stream_levels", [])) > 1:
    c += " levels " + ">".join(map(str, r["stream_levels"]))
print(r["bytes_wire"], "%.2f" % (float(sys.argv[3]) - float(sys.argv[2])), c)' "$out" "$t0" "$t1"
}

rows=$tmp/rows
for round in $(seq "$ROUNDS"); do
    for cell in $CELLS; do
        case $cell in
            cold) src=$IMG/clone.img ref= old= ;;
            release) src=$IMG/trixie.img ref=$IMG/bookworm.img old= ;;
            clone) src=$IMG/clone.img ref=$IMG/bookworm.img old= ;;
            return) src=$IMG/return.img ref=$IMG/clone.img old= ;;
            return-inplace) src=$IMG/return.img ref= old=$IMG/clone.img ;;
            *) echo "$0: unknown cell $cell" >&2; exit 2 ;;
        esac
        for codec in $CODECS; do
            for which in before after; do
                bin=$BEFORE; [ $which = after ] && bin=$AFTER
                srcref=; label="xenmig $which, --compress $codec"
                if [ -n "$SRCREF" ] && [ $which = after ] && [ -n "$ref" ]; then
                    srcref=$ref; label="$label --source-reference"
                fi
                res=$(xm "$bin" "$codec" "$src" "$ref" "$old" "$srcref")
                read -r bytes secs codecs <<<"$res"
                printf '%s\t%s\t%s\t%s\t%s\n' "$cell" "$label" "$bytes" "$secs" "$codecs" >>"$rows"
            done
        done
        [ "$round" = 1 ] || continue
        n=$(nonzero "$src" | zstd -q -3 --long=30 -c | wc -c)
        printf '%s\t%s\t%s\t\t\n' "$cell" "zstd -3 --long=30 of the non-zero blocks" "$n" >>"$rows"
        if [ -n "$ref$old" ]; then
            n=$(zstd -q -3 --long=30 --patch-from="${ref:-$old}" -c "$src" | wc -c)
            printf '%s\t%s\t%s\t\t\n' "$cell" "zstd -3 --long=30 --patch-from=REF (REF on the source too)" "$n" >>"$rows"
        fi
    done
done
# Medians over the rounds, rows in the order first measured.
python3 - "$rows" "$ROUNDS" "${RATE:-}" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    cell, method, b, s, codecs = line.rstrip("\n").split("\t")
    r = rows.setdefault((cell, method), {"b": [], "s": [], "codecs": set()})
    r["b"].append(int(b))
    if s:
        r["s"].append(float(s))
    if codecs:
        r["codecs"].add(codecs)
link = "a %.0f Mbit/s pipe" % (float(sys.argv[3]) * 8 / 1e6) if sys.argv[3] else "unshaped local copy"
print(f"| cell | method | MB on the wire | s, {link} (median of {sys.argv[2]}) | codecs (share of raw bytes fetched), per round |")
print("|---|---|---|---|---|")
for (cell, method), r in rows.items():
    s = "%.2f" % statistics.median(r["s"]) if r["s"] else ""
    print(f"| {cell} | {method} | {statistics.median(r['b']) / 1e6:.2f} | {s} | {'; '.join(sorted(r['codecs']))} |")
EOF

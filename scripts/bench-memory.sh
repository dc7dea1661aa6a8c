#!/bin/sh
# Peak memory per block of each end of a copy (docs/benchmarks.md, "Memory
# per block"). Each end is measured as the spawned end of `copy -s ""`, by
# GNU time's maximum resident set size (the kernel's VmHWM of that process
# alone); bytes per block is the slope between a small and a large image, so
# fixed costs (code, buffers, threads) drop out.
#   scripts/bench-memory.sh [XENMIG]   (default: target/release/xenmig)
set -eu
BIN=$(realpath "${1:-target/release/xenmig}")
W=$(mktemp -d /tmp/xenmig-mem.XXXXXX)
trap 'rm -rf "$W"' EXIT
cat > "$W/wrap" <<E
#!/bin/sh
exec /usr/bin/time -f %M -o $W/rss $BIN "\$@"
E
chmod +x "$W/wrap"
peak() { cat "$W/rss"; }
# source end: remote source, local target
src_kib() { rm -f "$W/dst"; "$BIN" copy -q "$@" -s "" --remote-xenmig "$W/wrap" "h:$IMG" "$W/dst" >/dev/null; peak; }
# target end: local source, remote target (fresh file, or onto a full copy)
tgt_kib() { rm -f "$W/dst"; "$BIN" copy -q "$@" -s "" --remote-xenmig "$W/wrap" "$IMG" "h:$W/dst" >/dev/null; peak; }
resume_kib() { cp --sparse=always "$IMG" "$W/dst"; "$BIN" copy -q -s "" --remote-xenmig "$W/wrap" "$IMG" "h:$W/dst" >/dev/null; peak; }
slope() { echo "$1 $2 $3" | awk '{ printf "%.1f", ($2 - $1) * 1024 / $3 }'; }

truncate -s 1G "$W/s1"; truncate -s 4G "$W/s4"
BLOCKS=$(( (3 << 30) / 4096 ))
for what in "source plain:src_kib" "source --live:src_kib --live" "target, fresh file:tgt_kib"; do
    name=${what%%:*}; cmd=${what#*:}
    IMG=$W/s1; a=$($cmd); IMG=$W/s4; b=$($cmd)
    echo "$name (sparse 1 and 4 GiB): $a KiB, $b KiB: $(slope $a $b $BLOCKS) bytes/block"
done
head -c 512M /dev/urandom > "$W/n1"; head -c 2G /dev/urandom > "$W/n4"
IMG=$W/n1; a=$(resume_kib); IMG=$W/n4; b=$(resume_kib)
echo "target onto its full earlier copy (random 0.5 and 2 GiB): $a KiB, $b KiB: $(slope $a $b $(( (3 << 29) / 4096 ))) bytes/block"

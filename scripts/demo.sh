#!/usr/bin/env bash
# The main job on a built-in example: a "host2" holds a template image; a
# guest disk that began as that template and then changed is copied onto
# host2, reusing the template's blocks. The far end runs as a separate
# `xenmig serve` process joined by pipes (`-s ""`), exactly as it would run
# behind ssh. Prints the report, then checks the copy byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
X=$PWD/target/release/xenmig
work=$(mktemp -d /tmp/xenmig-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/host1" "$work/host2"

echo "== making sample images in $work"
# Template: 48 MiB of "installed system" data, 16 MiB of free (zero) space.
head -c $((48 << 20)) /dev/urandom > "$work/host2/template.img"
truncate -s 64M "$work/host2/template.img"
# The guest: the template, then 3 MiB rewritten in place and 6 MiB written
# into free space.
cp "$work/host2/template.img" "$work/host1/guest.img"
dd if=/dev/urandom of="$work/host1/guest.img" bs=1M seek=10 count=3 conv=notrunc status=none
dd if=/dev/urandom of="$work/host1/guest.img" bs=1M seek=50 count=6 conv=notrunc status=none

echo "== xenmig copy host1/guest.img -> host2:guest.img, reusing host2's template"
"$X" copy -s "" --remote-xenmig "$X" -r "$work/host2/template.img" \
    "$work/host1/guest.img" "host2:$work/host2/guest.img"

echo "== again, now that host2 holds the guest (precache)"
"$X" copy -s "" --remote-xenmig "$X" "$work/host1/guest.img" "host2:$work/host2/guest.img"

cmp "$work/host1/guest.img" "$work/host2/guest.img" && echo "== copies are byte-identical"

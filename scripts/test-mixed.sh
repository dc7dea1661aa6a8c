#!/usr/bin/env bash
# Mixed versions: copies between this xenmig and the previous release's
# (commit 229ac52, the first landed one, protocol version 1), both ways,
# live and not: the newer end must speak the older one's version and
# accept its report. Builds the previous release once into
# $XENMIG_PREV_DIR (default /var/tmp/xenmig-prev). Prints one line per case
# and "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
PREV_COMMIT=${XENMIG_PREV_COMMIT:-229ac52}
PREV_DIR=${XENMIG_PREV_DIR:-/var/tmp/xenmig-prev}
NEW=$PWD/target/release/xenmig
cargo build --release --bin xenmig -q || { echo "test-mixed: cannot build this xenmig" >&2; exit 1; }
if [[ ! -x $PREV_DIR/$PREV_COMMIT/target/release/xenmig ]]; then
    rm -rf "$PREV_DIR/$PREV_COMMIT"; mkdir -p "$PREV_DIR/$PREV_COMMIT"
    git archive "$PREV_COMMIT" | tar -x -C "$PREV_DIR/$PREV_COMMIT" || { echo "test-mixed: no commit $PREV_COMMIT in this clone" >&2; exit 1; }
    (cd "$PREV_DIR/$PREV_COMMIT" && cargo build --release --bin xenmig -q) || { echo "test-mixed: cannot build $PREV_COMMIT" >&2; exit 1; }
fi
OLD=$PREV_DIR/$PREV_COMMIT/target/release/xenmig
tmp=$(mktemp -d /tmp/xenmig-mixed.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
head -c 6M /dev/urandom >"$tmp/src.img"
dd if=/dev/zero bs=1M count=2 >>"$tmp/src.img" 2>/dev/null
pass=0; fail=0
run() { # name, local binary, remote binary, extra args...
    local name=$1 local_bin=$2 remote_bin=$3; shift 3
    rm -f "$tmp/dst.img"
    if out=$("$local_bin" -q copy --json -s '' --remote-xenmig "$remote_bin" "$@" 2>"$tmp/err") \
        && cmp -s "$tmp/src.img" "$tmp/dst.img" && grep -q '"verified":true' <<<"$out"; then
        echo "PASS  $name"; pass=$((pass + 1))
    else
        echo "FAIL  $name: $(tail -c 400 "$tmp/err") $(tail -c 300 <<<"$out")"; fail=$((fail + 1))
    fi
}
run "new source -> old target"        "$NEW" "$OLD" "$tmp/src.img" "h:$tmp/dst.img"
run "old source -> new target"        "$NEW" "$OLD" "h:$tmp/src.img" "$tmp/dst.img"
run "new source -> old target, live"  "$NEW" "$OLD" --live "$tmp/src.img" "h:$tmp/dst.img"
run "old source -> new target, live"  "$NEW" "$OLD" --live "h:$tmp/src.img" "$tmp/dst.img"
run "old local end -> new remote end" "$OLD" "$NEW" "$tmp/src.img" "h:$tmp/dst.img"
echo "$pass passed, $fail failed"
[[ $fail == 0 ]]

#!/bin/bash
# The stream's level over real ssh (issue 11): a BEFORE xenmig against an
# AFTER one, alternated copy by copy, on run.sh's kind of link (two network
# namespaces joined by a veth, both directions shaped with tbf, sshd in the
# target's namespace) but with namespaces, interfaces and port of its own
# (lv-s, lv-d, port 2345), so that it never touches run.sh's.
#
#   sudo BEFORE=/path/xenmig AFTER=/path/xenmig LINKS="0 100 20" CELLS="release return-inplace" ROUNDS=10 \
#       scripts/experiments/levels.sh
#
# LINKS in Mbit/s (0: unshaped). Cells as in wire-bytes.sh: release (trixie
# onto a new DST with -r bookworm), return-inplace (return.img onto DST
# holding clone.img, no -r: `migrate`'s case). Every copy is checked with
# cmp and the report's counters. Prints one row per copy (link, cell,
# which, seconds, bytes on the veth, the stream's levels from the report)
# and a table of medians per cell. OUT (default /var/tmp/xenmig-levels)
# keeps the rows.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "$0: needs root (namespaces, tc, sshd)" >&2; exit 1; }
: "${BEFORE:?BEFORE=/path/to/xenmig}" "${AFTER:?AFTER=/path/to/xenmig}"
EXP=${EXP:-/var/tmp/xenmig-exp/quick}
IMG=$EXP/img
OUT=${OUT:-/var/tmp/xenmig-levels}
LINKS=${LINKS:-0 100 20}
CELLS=${CELLS:-release return-inplace}
ROUNDS=${ROUNDS:-10}
NS_S=lv-s NS_D=lv-d SRC_IP=10.231.7.1 DST_IP=10.231.7.2 PORT=2345
W=$OUT/work
mkdir -p "$W/tgt"
cleanup() {
    if [ -f "$W/sshd.pid" ]; then kill "$(cat "$W/sshd.pid")" 2>/dev/null || true; fi
    rm -f "$W/sshd.pid"
    ip netns del $NS_S 2>/dev/null || true
    ip netns del $NS_D 2>/dev/null || true
    rm -rf "$W/tgt"
    return 0
}
trap cleanup EXIT
cleanup
mkdir -p "$W/tgt"
ip netns add $NS_S
ip netns add $NS_D
ip link add lv-s type veth peer name lv-d
ip link set lv-s netns $NS_S
ip link set lv-d netns $NS_D
ip -n $NS_S addr add $SRC_IP/24 dev lv-s
ip -n $NS_D addr add $DST_IP/24 dev lv-d
for ns in $NS_S $NS_D; do ip -n $ns link set lo up; done
ip -n $NS_S link set lv-s up
ip -n $NS_D link set lv-d up
[ -f "$W/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$W/host_key"
[ -f "$W/client_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$W/client_key"
cp "$W/client_key.pub" "$W/authorized_keys"
chmod 600 "$W/authorized_keys"
mkdir -p /run/sshd
cat >"$W/sshd_config" <<CONF
ListenAddress $DST_IP
Port $PORT
HostKey $W/host_key
PidFile $W/sshd.pid
AuthorizedKeysFile $W/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
UseDNS no
CONF
ip netns exec $NS_D /usr/sbin/sshd -f "$W/sshd_config"
SSH="ssh -p $PORT -i $W/client_key -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
for _ in $(seq 50); do ip netns exec $NS_S $SSH root@$DST_IP true 2>/dev/null && break; sleep 0.1; done
ip netns exec $NS_S $SSH root@$DST_IP true

shape() { # rate in Mbit/s, 0 = unshaped; both directions (as run.sh)
    local r=$1
    for pair in "$NS_S lv-s" "$NS_D lv-d"; do
        set -- $pair
        ip netns exec $1 tc qdisc del dev $2 root 2>/dev/null || true
        if [ "$r" != 0 ]; then
            local burst=$((r * 1000000 / 8 / 100))
            [ $burst -lt 32768 ] && burst=32768
            ip netns exec $1 tc qdisc add dev $2 root tbf rate ${r}mbit burst $burst latency 200ms
        fi
    done
}
wire() {
    ip netns exec $NS_S sh -c 'echo $(( $(cat /sys/class/net/lv-s/statistics/tx_bytes) + $(cat /sys/class/net/lv-s/statistics/rx_bytes) ))'
}

rows=$OUT/rows.tsv
: >"$rows"
for link in $LINKS; do
    shape "$link"
    for cell in $CELLS; do
        case $cell in
            release) src=$IMG/trixie.img ref=$IMG/bookworm.img old= ;;
            return-inplace) src=$IMG/return.img ref= old=$IMG/clone.img ;;
            *) echo "$0: unknown cell $cell" >&2; exit 2 ;;
        esac
        for round in $(seq "$ROUNDS"); do
            for which in before after; do
                bin=$BEFORE; [ $which = after ] && bin=$AFTER
                dst=$W/tgt/dst.img
                rm -f "$dst"
                [ -n "$old" ] && cp --sparse=always "$old" "$dst"
                args=()
                [ -n "$ref" ] && args=(-r "$ref")
                sync
                b0=$(wire)
                t0=$(date +%s.%N)
                out=$(ip netns exec $NS_S "$bin" -q copy --json --compress auto "${args[@]}" -s "$SSH" \
                    --remote-xenmig "$bin" "$src" "root@$DST_IP:$dst")
                t1=$(date +%s.%N)
                b1=$(wire)
                cmp -s "$src" "$dst" || { echo "$0: $which made a wrong copy of $src" >&2; exit 1; }
                python3 -c '
import json, sys
r = json.loads(sys.argv[1])
assert r["verified"]
assert r["blocks_total"] == r["blocks_zero"] + r["blocks_reused"] + r["blocks_fetched"]
print("\t".join(sys.argv[2:6] + ["%.2f" % (float(sys.argv[7]) - float(sys.argv[6])), str(int(sys.argv[9]) - int(sys.argv[8])),
      ">".join(map(str, r.get("stream_levels", []))) or "-"]))' \
                    "$out" "$link" "$cell" "$which" "$round" "$t0" "$t1" "$b0" "$b1" | tee -a "$rows"
            done
        done
    done
done
python3 - "$rows" <<'EOF'
import statistics, sys
cells = {}
for line in open(sys.argv[1]):
    link, cell, which, _, s, b, levels = line.rstrip("\n").split("\t")
    c = cells.setdefault((link, cell, which), {"s": [], "b": [], "moved": 0, "levels": {}})
    c["s"].append(float(s)); c["b"].append(int(b))
    c["moved"] += ">" in levels
    c["levels"][levels] = c["levels"].get(levels, 0) + 1
print("| link | cell | xenmig | copies | s (median) | MB on the veth (median) | copies whose level moved | levels (copies) |")
print("|---|---|---|---|---|---|---|---|")
for (link, cell, which), c in cells.items():
    name = "unshaped" if link == "0" else f"{link} Mbit/s"
    lv = ", ".join(f"{k} ({v})" for k, v in sorted(c["levels"].items()))
    print(f"| {name} | {cell} | {which} | {len(c['s'])} | {statistics.median(c['s']):.2f} | {statistics.median(c['b']) / 1e6:.2f} | {c['moved']} | {lv} |")
EOF

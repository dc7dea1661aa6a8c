#!/bin/bash
# The seed's Figures 5.2-5.4 with real images and real peers, over a shaped
# link between two network namespaces (see docs/experiments.md).
#
#   sudo scripts/experiments/run.sh [--quick|--full]
#
# Needs the images of scripts/experiments/images.sh (same mode). Appends one
# CSV row per (scenario, link, method, round) to $OUT/results-<mode>.csv and
# keeps every xenmig JSON report next to it; docs are made from that CSV by
# scripts/experiments/report.py.
#
# Environment knobs (defaults depend on the mode):
#   LINKS      link rates in Mbit/s, 0 = unshaped          quick: "100 0 20"   full: "100 0 20 2"
#   SCENARIOS  release clone return cold                   quick: all four
#              (and big: a 4 GiB guest's return migration, after images.sh --big)
#   METHODS    simple xm-none xm-zlib xm-lz4 xm-zstd xm-auto xm-alone xm-inplace xm-srcref precache
#              rsync rsync-z casync zstd-patch
#              (xm-inplace: xenmig --compress auto onto a DST that already is a copy of
#              REF, no -r: the same starting point rsync gets; xm-srcref: auto with
#              --source-reference REF as well, REF on both hosts as zstd-patch needs;
#              xm-catalog: xm-auto's command line on a source host whose configuration
#              lists a catalog of every image here, `xenmig index` made before, untimed;
#              xm-alone: xm-auto's command line with REF on the target's host only;
#              simple-aes, not in the defaults: simple with ssh -c aes128-gcm, the
#              cipher xenmig itself asks for on a CPU with AES instructions;
#              simple-sync, not in the defaults: simple-aes, then `sync DST` on the
#              target, so that the copy is on the target's disk when it ends, as
#              xenmig's is (it fsyncs DST before it reports the copy verified))
#              Both namespaces share this host's files, so -r REF's path is on the
#              source's side too, and since session 19 xenmig looks for -r's paths
#              there (a pool's hosts keep templates at the same paths): every xm-*
#              method with a zstd stream may take REF as its dictionary. xm-alone
#              names REF by a path only the target's sshd sees (a bind mount in its
#              own mount namespace), as on a source host without the template.
#   ROUNDS     rounds per cell (methods interleaved within a round)   quick: 1   full: 3
#   SKIP_CELLS scenario:link cells left out                 quick: "cold:20"   full: none
#
# Network: namespaces xm-src (10.55.0.1) and xm-dst (10.55.0.2) joined by the
# veth pair xm-s/xm-d; both directions shaped with tbf to the link rate. An
# sshd (own config, port 2222, own host key and authorized_keys) listens on
# 10.55.0.2 inside xm-dst only; every ssh client runs inside xm-src, so every
# byte of every method crosses the veth, where it is counted
# (/sys/class/net/xm-s/statistics/{tx,rx}_bytes, both directions, IP+TCP+ssh
# framing included).
set -euo pipefail

MODE=quick
for a in "$@"; do
    case "$a" in
        --quick) MODE=quick ;;
        --full) MODE=full ;;
        *) echo "usage: $0 [--quick|--full]" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "$0: needs root (namespaces, tc, sshd)" >&2; exit 1; }

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${XENMIG:-$REPO/target/release/xenmig}
EXP=${EXP:-/var/tmp/xenmig-exp/$MODE}
IMG=$EXP/img
W=$EXP/run                # work dir: keys, sshd, target files, chunk store
OUT=${OUT:-$REPO/docs/experiments}
if [ "$MODE" = quick ]; then
    LINKS=${LINKS:-100 0 20}
    ROUNDS=${ROUNDS:-1}
    SKIP_CELLS=${SKIP_CELLS-cold:20}
else
    LINKS=${LINKS:-100 0 20 2}
    ROUNDS=${ROUNDS:-3}
    SKIP_CELLS=${SKIP_CELLS:-}
fi
SCENARIOS=${SCENARIOS:-release clone return cold}
METHODS=${METHODS:-simple xm-none xm-zlib xm-lz4 xm-zstd xm-auto xm-alone xm-inplace xm-srcref precache rsync rsync-z casync zstd-patch}
CSV=$OUT/results-$MODE.csv
JSONDIR=$OUT/raw-$MODE
mkdir -p "$W/tgt" "$OUT" "$JSONDIR"
[ -x "$BIN" ] || { echo "$0: build first: cargo build --release" >&2; exit 1; }
# Others rebuild target/release while this runs: measure a frozen copy, and say which.
cp "$BIN" "$W/xenmig.bin" && BIN=$W/xenmig.bin
echo "$(date -u +%FT%TZ) $(sha256sum "$BIN" | cut -c1-16) $(git -C "$REPO" log -1 --format=%h 2>/dev/null)" >> "$OUT/binary-$MODE.txt"
log() { echo "[run $(date +%T)] $*" >&2; }

for t in casync rsync zstd tc sshd; do
    command -v $t >/dev/null || { echo "$0: missing $t (apt-get install casync rsync zstd iproute2 openssh-server)" >&2; exit 1; }
done

# ---------------------------------------------------------------- network --
NS_S=xm-src NS_D=xm-dst
SRC_IP=10.55.0.1 DST_IP=10.55.0.2 PORT=2222 HTTP_PORT=8555
cleanup() {
    set +e
    [ -f "$W/sshd.pid" ] && kill "$(cat "$W/sshd.pid")" 2>/dev/null
    [ -f "$W/http.pid" ] && kill "$(cat "$W/http.pid")" 2>/dev/null
    rm -f "$W/sshd.pid" "$W/http.pid"
    ip netns del $NS_S 2>/dev/null
    ip netns del $NS_D 2>/dev/null
    rm -rf "$W/tgt" "$W/castr"
}
trap cleanup EXIT
cleanup
set -e
ip netns add $NS_S
ip netns add $NS_D
ip link add xm-s type veth peer name xm-d
ip link set xm-s netns $NS_S
ip link set xm-d netns $NS_D
ip -n $NS_S addr add $SRC_IP/24 dev xm-s
ip -n $NS_D addr add $DST_IP/24 dev xm-d
for ns in $NS_S $NS_D; do ip -n $ns link set lo up; done
ip -n $NS_S link set xm-s up
ip -n $NS_D link set xm-d up
# veth offloads (TSO/GSO) do not change byte counts; leave them as they are.

mkdir -p "$W/tgt" "$W/castr"
[ -f "$W/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$W/host_key"
[ -f "$W/client_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$W/client_key"
cp "$W/client_key.pub" "$W/authorized_keys"
chmod 600 "$W/authorized_keys"
mkdir -p /run/sshd
cat > "$W/sshd_config" <<CONF
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
# The target's sshd (and every command it runs) sees the images at a path of
# its own too, which the source's side does not have (xm-alone).
mkdir -p "$W/tgt-only"
ip netns exec $NS_D unshare --mount --propagation private \
    sh -c "mount --bind '$IMG' '$W/tgt-only' && exec /usr/sbin/sshd -f '$W/sshd_config'"
SSH="ssh -p $PORT -i $W/client_key -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
for _ in $(seq 50); do ip netns exec $NS_S $SSH root@$DST_IP true 2>/dev/null && break; sleep 0.1; done
ip netns exec $NS_S $SSH root@$DST_IP true
# casync's chunk store is served by HTTP from the source namespace; the target
# pulls the index and the chunks its seed lacks (casync's own remote design).
ip netns exec $NS_S python3 -m http.server $HTTP_PORT --bind $SRC_IP --directory "$W/castr" >/dev/null 2>&1 &
echo $! > "$W/http.pid"
log "namespaces, sshd on $DST_IP:$PORT, http on $SRC_IP:$HTTP_PORT up"

shape() { # rate in Mbit/s, 0 = unshaped; both directions
    local r=$1
    for pair in "$NS_S xm-s" "$NS_D xm-d"; do
        set -- $pair
        ip netns exec $1 tc qdisc del dev $2 root 2>/dev/null || true
        if [ "$r" != 0 ]; then
            local burst=$(( r * 1000000 / 8 / 100 ))   # 10 ms worth
            [ $burst -lt 32768 ] && burst=32768
            ip netns exec $1 tc qdisc add dev $2 root tbf rate ${r}mbit burst $burst latency 200ms
        fi
    done
}
wire() { # bytes both ways through the veth so far
    ip netns exec $NS_S sh -c 'echo $(( $(cat /sys/class/net/xm-s/statistics/tx_bytes) + $(cat /sys/class/net/xm-s/statistics/rx_bytes) ))'
}

# --------------------------------------------------------------- scenarios --
# name: source image, reference the target holds ("" = nothing)
# (big: a 4 GiB guest's return migration, images.sh --big; not in the defaults)
scen_src() { case $1 in release) echo trixie ;; clone) echo clone ;; return) echo return ;; cold) echo clone ;; big) echo big-return ;; esac; }
scen_ref() { case $1 in release) echo bookworm ;; clone) echo bookworm ;; return) echo clone ;; cold) echo "" ;; big) echo big ;; esac; }

OUTF=$W/tgt/out.img
[ -f "$CSV" ] || echo "mode,scenario,source,reference,link_mbps,method,round,seconds,wire_bytes,tool_wire_bytes,image_bytes,nonzero_bytes,verified,started" > "$CSV"

prepare() { # untimed: what the target holds before the method runs
    local m=$1 S=$2 R=$3
    rm -f "$OUTF"
    rm -rf "$W/castr"/*
    case $m in
        precache) cp --sparse=always "$S" "$OUTF" ;;
        rsync|rsync-z|xm-inplace) [ -n "$R" ] && cp --sparse=always "$R" "$OUTF" || true ;;
    esac
    sync "$W/tgt" 2>/dev/null || sync
}

method() { # timed: runs method $1 moving $2 to $OUTF on the target, reference $3
    local m=$1 S=$2 R=$3 J=$4
    local refarg=() zref=()
    [ -n "$R" ] && refarg=(-r "$R") && zref=(--patch-from="$R")
    case $m in
        simple)
            ip netns exec $NS_S sh -c "cat '$S' | $SSH root@$DST_IP 'cat > $OUTF'" ;;
        simple-aes)
            # Simple with the cipher xenmig asks ssh for on a CPU with AES
            # instructions (src/wire/ssh_cipher.rs): the same ssh cost per byte
            ip netns exec $NS_S sh -c "cat '$S' | $SSH -c aes128-gcm@openssh.com root@$DST_IP 'cat > $OUTF'" ;;
        simple-sync)
            # simple-aes made durable: DST on the disk when the command ends,
            # as xenmig's DST is (the other peers leave it in the page cache)
            ip netns exec $NS_S sh -c "cat '$S' | $SSH -c aes128-gcm@openssh.com root@$DST_IP 'cat > $OUTF && sync $OUTF'" ;;
        xm-inplace)
            # like rsync: DST already holds a copy of REF, xenmig gets no -r
            # (DST's own content is its reference) and rewrites it in place
            ip netns exec $NS_S "$BIN" copy -q --json --compress auto -s "$SSH" \
                --remote-xenmig "$BIN" "$S" "root@$DST_IP:$OUTF" > "$J" ;;
        xm-srcref)
            # auto, with REF on the source too (the case zstd-patch needs):
            # both ends start the stream with REF as its dictionary
            ip netns exec $NS_S "$BIN" copy -q --json --compress auto "${refarg[@]}" --source-reference "$R" -s "$SSH" \
                --remote-xenmig "$BIN" "$S" "root@$DST_IP:$OUTF" > "$J" ;;
        xm-alone)
            # the default command line, REF on the target's host only
            ip netns exec $NS_S "$BIN" copy -q --json --compress auto -r "$W/tgt-only/${R##*/}" -s "$SSH" \
                --remote-xenmig "$BIN" "$S" "root@$DST_IP:$OUTF" > "$J" ;;
        xm-catalog)
            # the default command line; the source host's configuration names
            # its catalog (source_references), which holds REF among others
            XENMIG_CONFIG=$W/catalog.yaml ip netns exec $NS_S "$BIN" copy -q --json --compress auto "${refarg[@]}" \
                -s "$SSH" --remote-xenmig "$BIN" "$S" "root@$DST_IP:$OUTF" > "$J" ;;
        xm-*|precache)
            local c=${m#xm-}; [ "$m" = precache ] && c=auto
            ip netns exec $NS_S "$BIN" copy -q --json --compress "$c" "${refarg[@]}" -s "$SSH" \
                --remote-xenmig "$BIN" "$S" "root@$DST_IP:$OUTF" > "$J" ;;
        rsync)
            ip netns exec $NS_S rsync --inplace --no-whole-file -e "$SSH" "$S" "root@$DST_IP:$OUTF" ;;
        rsync-z)
            ip netns exec $NS_S rsync --inplace --no-whole-file --compress --compress-choice=zstd -e "$SSH" "$S" "root@$DST_IP:$OUTF" ;;
        casync)
            # source: chunk + compress into the store (local, counted in the time);
            # target: fetch index and missing chunks by HTTP, rest from the seed.
            local seed=(); [ -n "$R" ] && seed=(--seed="$R")
            ip netns exec $NS_S casync make --compression=zstd --store="$W/castr/store" "$W/castr/src.caibx" "$S" >/dev/null
            ip netns exec $NS_D casync extract "${seed[@]}" --store="http://$SRC_IP:$HTTP_PORT/store" \
                "http://$SRC_IP:$HTTP_PORT/src.caibx" "$OUTF" ;;
        zstd-patch)
            # needs the reference on the source side too (it is a diff)
            ip netns exec $NS_S sh -c "zstd -q -T0 --long=30 ${zref[*]} -c '$S' | $SSH root@$DST_IP 'zstd -q -d --long=30 ${zref[*]} -f -o $OUTF'" ;;
        *) echo "unknown method $m" >&2; return 2 ;;
    esac
}

if [[ " $METHODS " == *" xm-catalog "* ]]; then
    # The source host's catalog of its images (untimed, as a pool's hosts
    # would keep one), named by a configuration only xm-catalog reads.
    "$BIN" index -q -o "$W/catalog.xmi" "$IMG"/*.img >/dev/null
    (umask 077; echo "source_references: [$W/catalog.xmi]" > "$W/catalog.yaml")
fi

for link in $LINKS; do
    shape "$link"
    for scen in $SCENARIOS; do
        case " $SKIP_CELLS " in *" $scen:$link "*) log "skip $scen at $link Mbit/s (SKIP_CELLS)"; continue ;; esac
        s=$(scen_src $scen); r=$(scen_ref $scen)
        S=$IMG/$s.img; R=""; [ -n "$r" ] && R=$IMG/$r.img
        [ -s "$S" ] || { echo "$0: no $S: run scripts/experiments/images.sh --$MODE" >&2; exit 1; }
        size=$(stat -c %s "$S")
        nonzero=$(( $(du -B1 "$S" | cut -f1) ))   # allocated bytes of the sparse image
        for round in $(seq "$ROUNDS"); do
            for m in $METHODS; do
                # cold: nothing on the target, so precache does not apply
                [ "$scen" = cold ] && { [ "$m" = precache ] || [ "$m" = xm-inplace ] || [ "$m" = xm-srcref ] || [ "$m" = xm-alone ]; } && continue
                prepare "$m" "$S" "$R"
                started=$(date -u +%FT%TZ)
                # (named by start time too: a later pass must not overwrite it)
                J=$JSONDIR/$scen-$link-$m-$round-$started.json
                b0=$(wire); t0=$(date +%s.%N)
                rc=0; method "$m" "$S" "$R" "$J" 2>"$W/err" || rc=$?
                t1=$(date +%s.%N); b1=$(wire)
                secs=$(echo "$t1 - $t0" | bc -l | sed 's/^\./0./')
                ok=0
                if [ $rc = 0 ] && cmp -s "$S" "$OUTF"; then ok=1; fi
                [ $rc = 0 ] || { log "$m failed rc=$rc:"; tail -5 "$W/err" >&2; }
                tool=""
                [ -s "$J" ] && tool=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("bytes_wire",""))' "$J" 2>/dev/null || true)
                printf '%s,%s,%s,%s,%s,%s,%s,%.3f,%s,%s,%s,%s,%s,%s\n' "$MODE" "$scen" "$s" "${r:-none}" "$link" "$m" "$round" \
                    "$secs" $((b1 - b0)) "$tool" "$size" "$nonzero" "$ok" "$started" >> "$CSV"
                log "$scen ${link}Mbit/s $m r$round: ${secs}s $((b1 - b0)) B on the wire, verified=$ok"
            done
        done
    done
done
shape 0
log "done: $CSV"

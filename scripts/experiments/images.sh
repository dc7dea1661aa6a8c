#!/bin/bash
# Test images for the seed's chapter 5 experiments, built from real Debian
# packages (see docs/experiments.md).
#
#   sudo scripts/experiments/images.sh [--quick|--full] [--rebuild|--repack] [--big]
#
# --rebuild runs debootstrap again; --repack only re-packs the kept roots
# (and rebuilds the images derived from them). --big also builds the 4 GiB
# pair (big.img, big-return.img; ~6 GiB of disk, a few minutes).
#
# Releases: debootstrap --variant=minbase of bullseye, bookworm and trixie with
# the same package selection, each packed into an ext4 image (4 KiB blocks)
# sized to its content + ~10%. Lineage built from the bookworm image:
#   clone.img   template clone: bookworm image, grown, extra packages unpacked
#               (dpkg-deb -x of .debs fetched with apt-get download) and user
#               data written into it
#   return.img  the clone after a "day of changes": ~5% of its files changed
#               (half patched in place, half rewritten as new files), logs added
#   big.img     (--big) a guest of real size: the clone grown to 4 GiB, with
#               the bullseye and trixie roots as chroots and ~1.5 GB of user
#               data (logs, a paged database file, incompressible blobs)
#   big-return.img  big.img after a day of changes: as return.img, plus
#               3000 database pages patched in place and a new log
# Everything lives under $EXP (default /var/tmp/xenmig-exp/<mode>), outside the
# repository; images are reused unless --rebuild is given.
set -euo pipefail

MODE=quick
REBUILD=0
REPACK=0
BIG=0
for a in "$@"; do
    case "$a" in
        --quick) MODE=quick ;;
        --full) MODE=full ;;
        --rebuild) REBUILD=1 ;;
        --repack) REBUILD=1; REPACK=1 ;;
        --big) BIG=1 ;;
        *) echo "usage: $0 [--quick|--full] [--rebuild|--repack] [--big]" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "$0: needs root (debootstrap, loop mounts)" >&2; exit 1; }

MIRROR=${MIRROR:-http://deb.debian.org/debian}
EXP=${EXP:-/var/tmp/xenmig-exp/$MODE}
if [ "$MODE" = quick ]; then
    INCLUDE=${INCLUDE:-systemd-sysv,openssh-server,python3}
else
    INCLUDE=${INCLUDE:-linux-image-amd64,systemd-sysv,openssh-server,python3,gcc,make}
fi
RELEASES=(bullseye bookworm trixie)
mkdir -p "$EXP/roots" "$EXP/img" "$EXP/debs"
log() { echo "[images $(date +%T)] $*" >&2; }

# Pack a directory into an ext4 image sized to its content + ~10% (content =
# its allocated 4 KiB blocks) + 24 MiB for the file system's own metadata
# (journal, inode tables); grow by 10% and retry if mkfs says it does not fit.
pack() {
    local dir=$1 img=$2 kib size
    kib=$(du -s -B1K "$dir" | cut -f1)
    local files
    files=$(find "$dir" -xdev | wc -l)
    size=$(( (kib * 11 / 10 + 24576) / 1024 ))
    for _ in 1 2 3 4 5; do
        rm -f "$img"
        if mkfs.ext4 -q -F -b 4096 -d "$dir" "$img" "${size}M" 2>"$img.log"; then
            rm -f "$img.log"
            log "$img: ${size} MiB from $((kib / 1024)) MiB of content ($files names)"
            return 0
        fi
        size=$((size * 11 / 10))
    done
    cat "$img.log" >&2
    return 1
}

build_release() {
    local rel=$1 root=$EXP/roots/$1
    if [ "$REBUILD" = 0 ] && [ -s "$EXP/img/$rel.img" ]; then
        log "$rel.img cached"
        return 0
    fi
    if [ "$REPACK" = 1 ] && [ -d "$root/usr" ]; then
        pack "$root" "$EXP/img/$rel.img"
        return
    fi
    rm -rf "$root"
    log "debootstrap $rel ($INCLUDE)"
    debootstrap --variant=minbase --include="$INCLUDE" "$rel" "$root" "$MIRROR" >"$EXP/debootstrap-$rel.log" 2>&1 ||
        { tail -20 "$EXP/debootstrap-$rel.log" >&2; return 1; }
    rm -f "$root"/var/cache/apt/archives/*.deb
    pack "$root" "$EXP/img/$rel.img"
}

if [ "$REBUILD" = 1 ]; then rm -f "$EXP"/img/*.img; fi

# The three debootstraps are network-bound: run them side by side.
pids=()
for rel in "${RELEASES[@]}"; do build_release "$rel" & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done

MNT=$EXP/mnt
mkdir -p "$MNT"
cleanup() { mountpoint -q "$MNT" && umount "$MNT" || true; }
trap cleanup EXIT

# A day of changes (return migrations): ~5% of the regular files, seeded.
day_of_changes() { # mount point, seed: ~5% of the regular files changed, a new log
    python3 - "$1" "$2" <<'PY'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(int(sys.argv[2]))
files = []
for d, _, names in os.walk(root):
    for n in names:
        p = os.path.join(d, n)
        if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) > 0:
            files.append(p)
files.sort()
chosen = rnd.sample(files, max(1, len(files) // 20))
inplace = rewritten = 0
for i, p in enumerate(chosen):
    size = os.path.getsize(p)
    if i % 2 == 0:
        # patched in place: a few bytes at a random offset (one block changes)
        with open(p, "r+b") as f:
            f.seek(rnd.randrange(size))
            f.write(rnd.randbytes(64))
        inplace += 1
    else:
        # rewritten as a new file (what an upgrade or an editor does): new blocks
        with open(p, "rb") as f:
            b = f.read()
        with open(p + ".new", "wb") as f:
            f.write(b + b"\n# changed\n" + rnd.randbytes(256))
        os.replace(p + ".new", p)
        rewritten += 1
logs = os.path.join(root, "var/log/app")
os.makedirs(logs, exist_ok=True)
with open(os.path.join(logs, "day.log"), "w") as f:
    for i in range(100000):
        f.write(f"2026-12-01T{i % 24:02d}:{i % 60:02d}:00 req={rnd.randint(0, 10**9)} ok\n")
print(f"changed {len(chosen)} of {len(files)} files ({inplace} in place, {rewritten} rewritten)", file=sys.stderr)
PY
}

# Template clone: the bookworm image, grown (the operator gives the guest room),
# extra packages unpacked into it and user data written.
if [ "$REBUILD" = 1 ] || [ ! -s "$EXP/img/clone.img" ]; then
    log "clone.img: from bookworm.img"
    cp --sparse=always "$EXP/img/bookworm.img" "$EXP/img/clone.tmp"
    truncate -s +128M "$EXP/img/clone.tmp"
    e2fsck -fy "$EXP/img/clone.tmp" >/dev/null 2>&1 || true
    resize2fs "$EXP/img/clone.tmp" >/dev/null 2>&1
    # Host is Debian 12, so apt-get download gives bookworm packages.
    EXTRA=${EXTRA:-nginx-light libnginx-mod-http-echo sqlite3 libsqlite3-0 git git-man curl libcurl4 python3-yaml python3-requests python3-urllib3 python3-idna python3-certifi python3-chardet vim-tiny less rsync}
    # (A fresh host's package lists may name versions no longer served:
    # apt-get update once, then again.)
    (cd "$EXP/debs" && { apt-get download $EXTRA >/dev/null 2>&1 || { apt-get update -qq && apt-get download $EXTRA; }; })
    mount -o loop "$EXP/img/clone.tmp" "$MNT"
    for d in "$EXP"/debs/*.deb; do dpkg-deb -x "$d" "$MNT"; done
    # User data: a small web site, a sqlite-like data file, and some
    # incompressible blobs (seeded, so a rebuild gives the same bytes).
    python3 - "$MNT" <<'PY'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(4)
site = os.path.join(root, "srv/www")
os.makedirs(site, exist_ok=True)
words = "grid xen migration block disk image hash cluster node guest domain".split()
for i in range(400):
    with open(os.path.join(site, f"page{i:04d}.html"), "w") as f:
        f.write("<html><body>\n")
        for _ in range(rnd.randint(20, 400)):
            f.write(" ".join(rnd.choice(words) for _ in range(12)) + "\n")
        f.write("</body></html>\n")
data = os.path.join(root, "srv/data")
os.makedirs(data, exist_ok=True)
with open(os.path.join(data, "measurements.csv"), "w") as f:
    for i in range(300000):
        f.write(f"{i},{rnd.random():.6f},{rnd.randint(0, 10**6)},{rnd.choice(words)}\n")
for i in range(4):
    with open(os.path.join(data, f"blob{i}.bin"), "wb") as f:
        f.write(rnd.randbytes(5 << 20))
PY
    sync
    umount "$MNT"
    mv "$EXP/img/clone.tmp" "$EXP/img/clone.img"
fi

# Return migration: the clone after a day of changes (~5% of regular files).
if [ "$REBUILD" = 1 ] || [ ! -s "$EXP/img/return.img" ]; then
    log "return.img: clone.img with ~5% of files changed"
    cp --sparse=always "$EXP/img/clone.img" "$EXP/img/return.tmp"
    mount -o loop "$EXP/img/return.tmp" "$MNT"
    day_of_changes "$MNT" 5
    sync
    umount "$MNT"
    mv "$EXP/img/return.tmp" "$EXP/img/return.img"
fi

# A guest of real size (--big): zstd --patch-from needs reference + image
# inside its window (at most 2 GiB); this pair is 4 GiB each.
if [ "$BIG" = 1 ] && { [ "$REBUILD" = 1 ] || [ ! -s "$EXP/img/big.img" ]; }; then
    log "big.img: clone.img grown to 4 GiB, two chroots and user data"
    cp --sparse=always "$EXP/img/clone.img" "$EXP/img/big.tmp"
    truncate -s 4G "$EXP/img/big.tmp"
    e2fsck -fy "$EXP/img/big.tmp" >/dev/null 2>&1 || true
    resize2fs "$EXP/img/big.tmp" >/dev/null 2>&1
    mount -o loop "$EXP/img/big.tmp" "$MNT"
    mkdir -p "$MNT/srv/chroot"
    for rel in bullseye trixie; do cp -a "$EXP/roots/$rel" "$MNT/srv/chroot/$rel"; done
    python3 - "$MNT" <<'PY'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(6)
words = "grid xen migration block disk image hash cluster node guest domain request user session".split()
arch = os.path.join(root, "srv/data/archive")
os.makedirs(arch, exist_ok=True)
for n in range(60):  # ~600 MB of logs
    with open(os.path.join(arch, f"app-{n:03d}.log"), "w") as f:
        lines = []
        for i in range(110000):
            lines.append(f"2026-11-{1 + n % 28:02d}T{i % 24:02d}:{i % 60:02d}:{i % 59:02d} node{rnd.randint(1, 64)} "
                         f"{rnd.choice(words)} id={rnd.randint(0, 10**9)} took={rnd.random():.4f}s\n")
        f.write("".join(lines))
db = os.path.join(root, "srv/data/db")
os.makedirs(db, exist_ok=True)
with open(os.path.join(db, "table.dat"), "wb") as f:  # 512 MiB of 4 KiB pages of records
    for page in range(131072):
        recs = b"".join(b"%08d|%-24s|%012d|" % (page * 64 + r, rnd.choice(words).encode(), rnd.randint(0, 10**12))
                        for r in range(64))
        f.write((recs + bytes(4096))[:4096])
blobs = os.path.join(root, "srv/data/blobs")
os.makedirs(blobs, exist_ok=True)
for n in range(40):  # 400 MiB incompressible
    with open(os.path.join(blobs, f"blob{n:02d}.bin"), "wb") as f:
        f.write(rnd.randbytes(10 << 20))
PY
    sync
    umount "$MNT"
    mv "$EXP/img/big.tmp" "$EXP/img/big.img"
fi
if [ "$BIG" = 1 ] && { [ "$REBUILD" = 1 ] || [ ! -s "$EXP/img/big-return.img" ]; }; then
    log "big-return.img: big.img after a day of changes"
    cp --sparse=always "$EXP/img/big.img" "$EXP/img/big-return.tmp"
    mount -o loop "$EXP/img/big-return.tmp" "$MNT"
    day_of_changes "$MNT" 7
    python3 - "$MNT" <<'PY'
import os, random, sys
rnd = random.Random(8)
with open(os.path.join(sys.argv[1], "srv/data/db/table.dat"), "r+b") as f:
    for page in rnd.sample(range(131072), 3000):  # updated rows, in place
        f.seek(page * 4096 + rnd.randrange(4096 - 64))
        f.write(rnd.randbytes(64))
PY
    sync
    umount "$MNT"
    mv "$EXP/img/big-return.tmp" "$EXP/img/big-return.img"
fi

ls -l "$EXP/img" >&2

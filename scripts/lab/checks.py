"""The lab's checks of xl and xenmig inside the dom0s (one function per check;
each returns a detail string, or (detail, figures), and raises LabError)."""
import json
import re
import time

from console import LabError, log

# ---- the guest's heartbeat, read from xenconsoled's log in dom0 ----
def heartbeats(host, logname="guest-g1.log"):
    for attempt in range(3):
        try:
            out = host.sh(f"/opt/xenmig/lab/hb {logname}", 30)
        except LabError as e:
            # seen under TCG while a guest boots: the pipeline hangs until Ctrl-C
            # (run() sends one on timeout); the next try works
            out = f"(timed out: {e})"
            log(f"{host.name}: hb hung (attempt {attempt + 1}), interrupted, retrying")
            continue
        words = out.split()
        if all(w.isdigit() for w in words):
            return [int(w) for w in words]
        # seen once under TCG: "Segmentation fault" from one of the pipeline's tools
        log(f"{host.name}: unexpected output from hb (attempt {attempt + 1}), retrying: "
            f"{out.strip()[:200]!r}")
    raise LabError(f"{host.name}: cannot read heartbeats: {out.strip()[:500]}")


def last_heartbeat(host, logname="guest-g1.log"):
    hb = heartbeats(host, logname)
    return hb[-1] if hb else None


def wait_heartbeat_above(host, value, timeout=90, logname="guest-g1.log"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hb = last_heartbeat(host, logname)
        if hb is not None and (value is None or hb > value):
            return hb
        time.sleep(2)
    rc, diag = host.run(f"xl list; tail -c 1500 /var/log/xen/console/{logname}; "
                        f"ls -l /var/log/xen/console/", 60)
    raise LabError(f"{host.name}: no heartbeat above {value} within {timeout}s in "
                   f"/var/log/xen/console/{logname} (dom0); serial log {host.serial_log}\n"
                   f"{diag}")


# ---- the checks ----
def check_xen(h):
    out = h.sh("xl info")
    m = re.search(r"^xen_version\s*:\s*(\S+)", out, re.M)
    if not m or not m.group(1).startswith("4.17"):
        raise LabError(f"xl info has no xen_version 4.17:\n{out}")
    return f"xen_version {m.group(1)}"


def check_lvm(h):
    h.sh("pvcreate -q /dev/vdb && vgcreate -q vg0 /dev/vdb", 120)
    out = h.sh("vgs --noheadings -o vg_name,vg_size vg0")
    if "vg0" not in out:
        raise LabError(f"vgs shows no vg0: {out}")
    return "vgs: " + " ".join(out.split())


def check_guest_start(h):
    h.sh("lvcreate -q -y -L 32M -n g1 vg0 && mkfs.ext4 -q -F /dev/vg0/g1", 120)
    h.sh("ls /var/log/xen/console/ >/dev/null && pgrep -a xenconsoled")
    t = time.monotonic()
    h.sh("xl create /opt/xenmig/guest/g1.cfg", 120)
    created = time.monotonic() - t
    first = wait_heartbeat_above(h, None, 120)
    wait_heartbeat_above(h, first + 1, 60)
    seq = heartbeats(h)
    if seq[:len(seq)] != list(range(seq[0], seq[0] + len(seq))):
        raise LabError(f"heartbeats not consecutive: {seq}")
    return (f"xl create {created:.1f} s, first heartbeat {time.monotonic() - t:.0f} s after; "
            f"heartbeats {seq[0]}..{seq[-1]}")


def check_pause(h, tool="xl"):
    """`tool pause` stops the heartbeat, `tool unpause` resumes it (xl or xenmig)."""
    h.sh(f"{tool} pause g1", 60)
    time.sleep(2)  # a heartbeat already in the console ring may still land
    a = last_heartbeat(h)
    time.sleep(6)
    b = last_heartbeat(h)
    state = h.sh("xl list g1 | tail -1")
    if a != b:
        raise LabError(f"heartbeat moved while paused by {tool}: {a} -> {b}")
    h.sh(f"{tool} unpause g1", 60)
    c = wait_heartbeat_above(h, b, 60)
    return f"paused at heartbeat {a}, still {b} 6 s later ({' '.join(state.split())}); " \
           f"after unpause {c}"


def check_save_restore(h, tool="xl"):
    """`tool save` then `tool restore`: the counter continues (xl or xenmig)."""
    t = time.monotonic()
    h.sh(f"{tool} save g1 /tmp/g1.save", 300)
    t_save = time.monotonic() - t
    before = last_heartbeat(h)
    size = h.sh("stat -c %s /tmp/g1.save").strip()
    if "g1" in h.sh("xl list | awk '{print $1}'"):
        raise LabError(f"g1 still listed after {tool} save")
    t = time.monotonic()
    h.sh(f"{tool} restore /tmp/g1.save", 300)
    t_restore = time.monotonic() - t
    after = wait_heartbeat_above(h, before, 60)
    after = wait_heartbeat_above(h, after, 60)
    seq = heartbeats(h)
    i = seq.index(before)
    nxt = seq[i + 1:i + 4]
    if not nxt or nxt[0] != before + 1 or nxt != list(range(before + 1, before + 1 + len(nxt))):
        raise LabError(f"counter did not continue after restore: last before {before}, "
                       f"then {nxt}")
    h.sh("rm -f /tmp/g1.save")
    return (f"{tool} save {t_save:.1f} s ({int(size) >> 20} MiB), {tool} restore {t_restore:.1f} s; "
            f"last heartbeat before save {before}, after restore {' '.join(map(str, nxt))}")


def check_deb_install(h):
    """Install xenmig from the .deb on the payload disk (`dpkg -i`), in place
    of the bare binary the image links to; every later check runs it."""
    if h.run("test -e /opt/xenmig/xenmig.deb")[0] != 0:
        return "no .deb on the payload (XENMIG_LAB_BIN): the bare binary is used"
    h.sh("dpkg -i /opt/xenmig/xenmig.deb >/tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log; false; }", 300)
    h.sh("rm -f /usr/local/bin/xenmig; hash -r")
    where = h.sh("command -v xenmig").strip()
    if where != "/usr/bin/xenmig":
        raise LabError(f"xenmig resolves to {where!r}, not the package's /usr/bin/xenmig")
    status = h.sh("dpkg-query -W -f='${Status} ${Version}' xenmig").strip()
    if not status.startswith("install ok installed"):
        raise LabError(f"dpkg says {status!r}")
    for f in ("/usr/share/man/man1/xenmig.1.gz", "/usr/share/bash-completion/completions/xenmig",
              "/etc/xenmig/xenmig.yaml"):
        if h.run(f"test -e {f}")[0] != 0:
            raise LabError(f"the package did not install {f}")
    version = h.sh("xenmig --version").strip()
    return f"{status}; {where}: {version}; man page, bash completion and /etc/xenmig/xenmig.yaml present"


def check_version(h):
    rc, out = h.run("xenmig --version")
    if rc != 0 or "xenmig" not in out:
        raise LabError(f"xenmig --version: status {rc}: {out}")
    return out.strip()


def check_copy(h):
    h.sh("xl pause g1")
    try:
        t = time.monotonic()
        rc, out = h.run("xenmig -q copy --json /dev/vg0/g1 /tmp/g1.img", 300)
        dt = time.monotonic() - t
        if rc != 0:
            raise LabError(f"xenmig copy: status {rc}:\n{out}")
        # O_DIRECT: compare with what the device holds, not dom0's page cache
        cmp_rc, cmp_out = h.run("dd if=/dev/vg0/g1 bs=1M iflag=direct status=none | cmp - /tmp/g1.img "
                                "&& echo IDENTICAL", 120)
        if cmp_rc != 0 or "IDENTICAL" not in cmp_out:
            raise LabError(f"copy differs from the LV: {cmp_out}\nxenmig said:\n{out}")
        js = [l for l in out.splitlines() if l.strip().startswith("{")]
        if not js or '"verified":true' not in js[-1].replace(" ", ""):
            raise LabError(f"xenmig copy --json did not report \"verified\":true:\n{out}")
    finally:
        h.run("xl unpause g1")
        h.run("rm -f /tmp/g1.img")
    return f"status 0 in {dt:.1f} s, cmp identical; JSON: {js[-1] if js else out.strip()[:300]}"


# ---- xenmig's own Xen layer and live copy, on the real guest ----
def check_xenmig_domains(h):
    out = h.sh("xenmig domains --json", 60)
    js = [l for l in out.splitlines() if l.strip().startswith(("{", "["))]
    text = " ".join(js) if js else out
    if '"g1"' not in text or "/dev/vg0/g1" not in text:
        raise LabError(f"xenmig domains --json does not list g1 with /dev/vg0/g1:\n{out}")
    table = h.sh("xenmig domains", 60)
    if "g1" not in table:
        raise LabError(f"xenmig domains does not list g1:\n{table}")
    rc, err = h.run("xenmig pause nosuchdomain", 60)
    if rc != 1 or "nosuchdomain" not in err:
        raise LabError(f"xenmig pause of a missing domain: status {rc}, said: {err}")
    return f"g1 listed with its LV; a missing domain: status 1, {err.strip()[:120]}"


def check_live_copy(h, rescan):
    """xenmig copy --live of the running guest's LV: the freeze is xl pause;
    the thaw first keeps a copy of the frozen LV to compare against."""
    before = last_heartbeat(h)
    t = time.monotonic()
    rc, out = h.run(
        f"xenmig -q copy --json --live --rescan {rescan} --freeze-cmd 'xl pause g1' "
        f"--thaw-cmd 'dd if=/dev/vg0/g1 of=/tmp/frozen.img bs=1M iflag=direct status=none && xl unpause g1' "
        f"/dev/vg0/g1 /tmp/live.img", 600)
    dt = time.monotonic() - t
    try:
        if rc != 0:
            raise LabError(f"xenmig copy --live --rescan {rescan}: status {rc}:\n{out}")
        js = [l for l in out.splitlines() if l.strip().startswith("{")]
        if not js:
            raise LabError(f"no JSON report:\n{out}")
        rep = json.loads(js[-1])
        if rep.get("verified") is not True or len(rep.get("passes", [])) < 2:
            raise LabError(f"not verified or fewer than 2 passes:\n{js[-1]}")
        # The guest writes every second, and dom0 must see it (its reads of
        # the LV must not come from a stale page cache): later passes find
        # changed blocks, or groups that changed under a pass.
        moved = sum(p["changed_blocks"] for p in rep["passes"][1:]) + \
            sum(p["groups_stale"] for p in rep["passes"])
        if moved == 0:
            raise LabError(f"no change seen while the guest wrote (stale reads?):\n{js[-1]}")
        crc, cout = h.run("cmp /tmp/frozen.img /tmp/live.img && echo IDENTICAL", 120)
        if crc != 0 or "IDENTICAL" not in cout:
            raise LabError(f"the copy differs from the frozen LV: {cout}")
        left = h.sh("lvs --noheadings -o lv_name vg0", 60)
        if "xenmigtrack" in left:
            raise LabError(f"tracking snapshots left behind: {left}")
        after = wait_heartbeat_above(h, before, 60)
    finally:
        h.run("xl unpause g1 2>/dev/null; rm -f /tmp/frozen.img /tmp/live.img")
    passes = ", ".join(f"{p['changed_blocks']}/{p['groups_stale']}" for p in rep["passes"])
    return (f"{dt:.1f} s, {len(rep['passes'])} passes (changed blocks/stale groups {passes}), "
            f"downtime {rep['downtime_seconds']:.2f} s, verified, cmp identical with the "
            f"frozen LV; guest ran on (heartbeat {before} -> {after})")


def check_live_bench(h):
    """Downtime of live copies at two LV sizes under the same write load (a
    dom0 writer rewriting random 4 KiB blocks with O_DIRECT as fast as it
    can; freeze = SIGSTOP of the writer). Only with XENMIG_LAB_BENCH=1."""
    rows = []
    for mib in (64, 512):
        lv = f"/dev/vg0/bench{mib}"
        h.sh(f"lvcreate -q -y -L {mib}M -n bench{mib} vg0 && "
             f"dd if=/dev/urandom of={lv} bs=1M count={mib} oflag=direct status=none", 600)
        blocks = mib * 256
        # set -m: the writer gets its own process group, stopped as a whole
        pid = h.sh(f"set -m; sh -c 'while :; do dd if=/dev/urandom of={lv} bs=4k count=1 "
                   f"seek=$(( $(od -An -N4 -tu4 /dev/urandom) % {blocks} )) oflag=direct "
                   f"conv=notrunc status=none; done' >/dev/null 2>&1 & echo $!").strip().split()[-1]
        try:
            for rescan in ("fast", "lvm-snapshot"):
                rc, out = h.run(f"xenmig -q copy --json --live --rescan {rescan} "
                                f"--freeze-cmd 'kill -s STOP -- -{pid}' --thaw-cmd 'kill -s CONT -- -{pid}' "
                                f"{lv} /tmp/bench.img", 1200)
                h.run("rm -f /tmp/bench.img")
                js = [l for l in out.splitlines() if l.strip().startswith("{")]
                if rc != 0 or not js:
                    raise LabError(f"live copy of {lv} ({rescan}): status {rc}:\n{out}")
                rep = json.loads(js[-1])
                if rep.get("verified") is not True:
                    raise LabError(f"not verified: {js[-1]}")
                rows.append((mib, rescan, rep["downtime_seconds"], len(rep["passes"]),
                             rep["passes"][-1]["changed_blocks"], rep["seconds"]))
        finally:
            h.run(f"kill -s KILL -- -{pid}; sleep 1; lvremove -q -y vg0/bench{mib}", 120)
    table = "; ".join(f"{m} MiB {r}: downtime {d:.2f} s, {p} passes, final {c} blocks, copy {t:.1f} s"
                      for m, r, d, p, c, t in rows)
    return table


def check_ssh(hosts):
    h1, h2 = hosts
    out = h1.sh(f"ping -c 2 -W 5 {h2.ip} >/dev/null && ssh -o ConnectTimeout=30 "
                f"root@{h2.ip} 'hostname; xl info | grep xen_version'", 120)
    if h2.name not in out:
        raise LabError(f"ssh to {h2.ip} said: {out}")
    return " ".join(out.split())


def clock_offset(src, dst):
    """dst's dom0 clock minus src's, from five ssh round trips (the one with
    the shortest round trip wins); returns (offset, error bound), seconds."""
    # A master connection first, so that the timed round trips pay for no
    # key exchange (a fresh ssh takes seconds under TCG).
    ssh = (f"ssh -o BatchMode=yes -o ControlMaster=auto -o ControlPath=/tmp/lab-cm-%r@%h "
           f"-o ControlPersist=60 root@{dst.ip}")
    out = src.sh(f"{ssh} true; for i in 1 2 3 4 5; do a=$(date +%s.%N); b=$({ssh} date +%s.%N); "
                 f"c=$(date +%s.%N); echo $a $b $c; done", 120)
    best = None
    for line in out.splitlines():
        try:
            a, b, c = map(float, line.split())
        except ValueError:
            continue
        if best is None or c - a < best[1]:
            best = (b - (a + c) / 2, c - a)
    if best is None:
        raise LabError(f"cannot measure the clock offset: {out!r}")
    return best[0], best[1] / 2


class HeartbeatGap:
    """Stamps heartbeats on both dom0s (dom0/hbstamp) around a migration."""
    def __init__(self, src, src_log, dst, dst_log):
        self.src, self.dst = src, dst
        for h, lg, out in ((src, src_log, "/tmp/hb-src"), (dst, dst_log, "/tmp/hb-dst")):
            # "( ... & )": started from a subshell, so the interactive shell
            # has no job to report "Done" about in a later command's output.
            h.sh(f"pkill -f hbstamp; rm -f {out}; (setsid /opt/xenmig/lab/hbstamp {lg} {out} "
                 f"</dev/null >/dev/null 2>&1 &)")

    def measure(self):
        """(gap seconds, error bound, last n on src, first n on dst) or None."""
        # tail first: each stamper then reads what is still in its pipe and
        # ends by itself (killed at once, those lines were lost); then
        # whatever is left after 10 s
        for h in (self.src, self.dst):
            h.run("pkill -f 'tail -n0 -F /var/log/xen/console'; for i in $(seq 50); do "
                  "pgrep -f /opt/xenmig/lab/hbstamp >/dev/null || break; sleep 0.2; done; "
                  "pkill -f hbstamp")

        def read(h, path):
            rows = []
            for line in h.sh(f"cat {path} 2>/dev/null").splitlines():
                f = line.split()
                if len(f) == 2 and f[1].isdigit():
                    rows.append((float(f[0]), int(f[1])))
            return rows
        s, d = read(self.src, "/tmp/hb-src"), read(self.dst, "/tmp/hb-dst")
        if not s or not d:
            return None
        off, err = clock_offset(self.src, self.dst)
        return (d[0][0] - off) - s[-1][0], err, s[-1][1], d[0][1]


def check_migrate(hosts):
    """xl migrate -p (target left paused), then the disk, then unpause.

    The guest must be running when xl migrate starts: libxc treats a page-table
    entry to a page outside the guest (Linux PV maps shared_info) as a race while
    the guest runs, but as fatal if it is paused ("Bad mfn for L1[...]"). So the
    disk cannot be copied before; it is copied in the window xl leaves with -p:
    the guest is suspended (its source disk quiescent) and waits paused on the
    target. That copy is what xenmig does in issue 3 part 2.
    """
    h1, h2 = hosts
    h2.run("xl destroy g1 2>/dev/null; lvs vg0/g1 >/dev/null 2>&1 || "
           "lvcreate -q -y -L 32M -n g1 vg0", 60)
    h2.run("rm -f /var/log/xen/console/guest-g1--incoming.log")
    h1.sh("xl list g1")
    gap = HeartbeatGap(h1, "guest-g1.log", h2, "guest-g1--incoming.log")
    t = time.monotonic()
    rc, out = h1.run(f"xl migrate -p g1 {h2.ip}", 600)
    t_mig = time.monotonic() - t
    if rc != 0:
        # xl resumes the guest at the sender when migration fails
        raise LabError(f"xl migrate: status {rc} after {t_mig:.0f} s:\n{out[-1500:]}")
    before = last_heartbeat(h1)
    listed1 = h1.sh("xl list | awk 'NR>1{print $1}'").split()
    state2 = h2.sh("xl list g1 | tail -1")
    if "g1" in listed1 or "--p--" not in state2:
        raise LabError(f"after migrate -p: {h1.name} lists {listed1}; {h2.name}: {state2}")
    t = time.monotonic()
    h1.sh(f"dd if=/dev/vg0/g1 bs=1M status=none | gzip -1 | ssh root@{h2.ip} "
          f"'gunzip | dd of=/dev/vg0/g1 bs=1M status=none'", 300)
    t_disk = time.monotonic() - t
    h2.sh("xl unpause g1")
    log_in = "guest-g1--incoming.log"
    after = wait_heartbeat_above(h2, None, 90, log_in)
    after = wait_heartbeat_above(h2, after, 60, log_in)
    seq = heartbeats(h2, log_in)
    if seq[0] != before + 1:
        raise LabError(f"counter did not continue on {h2.name}: last on {h1.name} {before}, "
                       f"first on {h2.name} {seq[0]} ({seq[:5]})")
    m = gap.measure()
    return (f"xl migrate -p {t_mig:.0f} s, disk copy {t_disk:.0f} s; heartbeat gap "
            f"{'%.2f s (+-%.2f)' % (m[0], m[1]) if m else 'not measured'}; last heartbeat on "
            f"{h1.name} {before}, on {h2.name} {' '.join(map(str, seq[:4]))}...",
            {"mode": "xl migrate -p + dd while suspended", "seconds": t_mig + t_disk,
             "xl_migrate_seconds": t_mig, "disk_copy_seconds": t_disk,
             "heartbeat_gap_seconds": m[0] if m else None,
             "heartbeat_gap_error_seconds": m[1] if m else None})


def counter_verdict(disk, last):
    """The one rule for the counter on disk against the last heartbeat printed.

    heartbeat.sh makes each value durable (write, sync, rename, sync) *before*
    it prints "heartbeat N", and stop.sh (or a kill) can end it anywhere in
    that loop. So nothing printed may be lost (disk >= last) and at most one
    write may have been in flight (disk <= last + 1). Returns which of the two
    cases happened; raises LabError on anything else.
    """
    try:
        d = int(disk)
    except (TypeError, ValueError):
        raise LabError(f"counter on disk {disk!r} is not a number (last heartbeat {last})")
    if last is None:
        raise LabError(f"counter on disk {d}, but no heartbeat was printed")
    if d == last:
        return f"counter on disk {d} = last heartbeat {last} (stopped after printing)"
    if d == last + 1:
        return (f"counter on disk {d} = last heartbeat {last} + 1 (stopped between the "
                f"durable write and its print)")
    if d < last:
        raise LabError(f"LOST WRITES: counter on disk {d} < last heartbeat printed {last}")
    raise LabError(f"counter on disk {d} > last heartbeat {last} + 1: more than one write "
                   f"unaccounted for")


def check_shutdown_fsck(h, logname):
    h.sh("xl shutdown -w g1", 180)
    last = last_heartbeat(h, logname)
    rc, out = h.run("e2fsck -fn /dev/vg0/g1", 120)
    if rc != 0:
        raise LabError(f"e2fsck -fn status {rc}:\n{out}")
    disk = h.sh("debugfs -R 'cat /counter' /dev/vg0/g1 2>/dev/null").strip()
    return "e2fsck -fn status 0, " + counter_verdict(disk, last)


def check_recreate(h):
    disk = int(h.sh("debugfs -R 'cat /counter' /dev/vg0/g1 2>/dev/null").strip())
    h.sh("mv /var/log/xen/console/guest-g1.log /var/log/xen/console/guest-g1.log.1")
    h.sh("xl create /opt/xenmig/guest/g1.cfg", 120)
    first = wait_heartbeat_above(h, None, 120)
    wait_heartbeat_above(h, first, 60)
    seq = heartbeats(h)
    if seq[0] != disk + 1:
        raise LabError(f"counter on disk {disk}, first heartbeat after xl create {seq[0]}")
    return f"counter on disk {disk}, heartbeats now {' '.join(map(str, seq[:4]))}"

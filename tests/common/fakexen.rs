//! A fake Xen world for host tests of `xenmig migrate` (no Xen, no LVM):
//! a source host (a [`SourceHost`] whose domain state lives in a file), a
//! fake `xl` (list, info, destroy, migrate, migrate-receive, speaking xl's
//! migration protocol byte for byte), fake lvm2 commands (`lvs`, `vgs`,
//! `lvcreate`, `lvchange`) whose LVs are regular files under
//! `/dev/xmts-ID/` (source VG) and `/dev/xmtt-ID/` (target VG), and a
//! wrapper that runs the real xenmig as the target's `remote_xenmig` with
//! the fakes first on PATH. Source and target are this machine (`ssh ""`);
//! the VGs differ so that the two disks are different files (hence `-C`).
//!
//! Faults are files in `STATE/faults/` (see the scripts): tests switch them
//! on and off between runs. Everything the fakes do is logged, one line
//! per event, in `STATE/log`.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::script::write_executable;
use xenmig::migrate::{DiskInfo, DomState, DomainInfo, MigrateError, MigrateOptions, SourceHost};

pub const DOMAIN: &str = "g1";
pub const DOMID: u32 = 7;
pub const HOST: &str = "tgt";
pub const UUID: &str = "5f8a2c1e-0000-4000-8000-00000000c0de";
/// Disk size: 2 MiB, 512 blocks of 4 KiB.
pub const DISK_BYTES: usize = 2 << 20;

const XL: &str = r#"#!/bin/bash
# Fake xl for xenmig's host tests. State: $S/src.state (the source domain),
# $S/tgt/NAME (the target's domains, content = xl list's state letters).
S=@STATE@; D=@DIR@; NAME=@NAME@; ID=@ID@
export PATH="$D/bin:$PATH" XENMIG_XL="$D/bin/xl"
log() { echo "$*" >> "$S/log"; }
le32() { printf "$(printf '\\%03o\\%03o\\%03o\\%03o' $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255)))"; }
f() { [ -e "$S/faults/$1" ]; }
fv() { v=$(cat "$S/faults/$1"); echo "${v:-0}"; }
# Atomic, as xenmig polls the source's state while xl changes it.
setsrc() { echo "$1" > "$S/src.state.$$"; mv "$S/src.state.$$" "$S/src.state"; }
cmd=$1; shift
case "$cmd" in
list)
  printf 'Name                                        ID   Mem VCPUs\tState\tTime(s)\n'
  printf '%-40s %5d %5d %5d     %s %10s\n' Domain-0 0 1024 2 r----- 1.0
  n=1
  for d in "$S"/tgt/*; do
    [ -e "$d" ] || continue
    printf '%-40s %5d %5d %5d     %s %10s\n' "$(basename "$d")" $((n++)) 128 1 "$(cat "$d")" 0.0
  done ;;
info)
  echo "free_memory            : 4096" ;;
destroy)
  t=$1
  if [ "$t" = "$ID" ]; then
    [ "$(cat "$S/src.state")" = gone ] && { echo "invalid domain identifier $t" >&2; exit 1; }
    setsrc gone; log "source: xl destroy $ID"; exit 0
  fi
  [ -e "$S/tgt/$t" ] || { echo "invalid domain identifier $t" >&2; exit 1; }
  if [ "$t" = "$NAME--incoming" ] && f destroy_races_rename; then
    # The receiver renamed and unpaused it just before the destroy.
    mv "$S/tgt/$t" "$S/tgt/$NAME"; echo "r-----" > "$S/tgt/$NAME"; log "target: $t renamed and unpaused before the destroy"
    echo "invalid domain identifier $t" >&2; exit 1
  fi
  rm -f "$S/tgt/$t"; log "target: xl destroy $t" ;;
migrate)
  # xl migrate [-C F] [-p] [-e] [--debug] -s SSHCOMMAND DOMAIN HOST
  ssh=ssh; recv_args=""; cfg=""
  while [ $# -gt 2 ]; do
    case "$1" in
      -s) ssh=$2; shift 2 ;;
      -C) cfg=$2; shift 2 ;;
      -p) recv_args="$recv_args -p"; shift ;;
      -e) recv_args="$recv_args -e"; shift ;;
      *) shift ;;
    esac
  done
  dom=$1; host=$2
  log "source: xl migrate $dom $host"
  trap 'touch "$S/xl.done"' EXIT
  echo $$ > "$S/xl.pid"
  coproc R { exec sh -c "exec $ssh $host xl migrate-receive$recv_args"; }
  exec 3<&"${R[0]}" 4>&"${R[1]}"
  banner=$(head -c 54 <&3)
  if [ "$banner" != "xl migration receiver ready, send binary domain data." ]; then
    log "source: no banner; nothing suspended"; exit 1
  fi
  # xl's save header (xl_saverestore.c): the domain config as JSON names
  # the disks; with -C (the operator's config) the target's paths.
  cfgdisk=$(cat "$S/src.disk"); dir=$(dirname "$cfgdisk")
  [ -n "$cfg" ] && { cfgdisk=$(cat "$S/tgt.disk"); dir=$(dirname "$cfgdisk"); }
  disks="{\"pdev_path\": \"$cfgdisk\", \"vdev\": \"xvda\"}"
  # A domain's further disks (World::add_disk): "VDEV LV" a line.
  if [ -f "$S/disks.extra" ]; then
    while read -r vdev lv; do disks="$disks, {\"pdev_path\": \"$dir/$lv\", \"vdev\": \"$vdev\"}"; done < "$S/disks.extra"
  fi
  json="{\"c_info\": {\"name\": \"$dom\"}, \"disks\": [$disks]}"
  clen=$(( ${#json} + 1 ))
  { printf 'Xen saved domain, xl format\n \0 \r'; le32 $((0x01020304)); le32 "$(f xl_header_flags && fv xl_header_flags || echo 3)"; le32 0; le32 $((clen + 4)); le32 $clen
    printf '%s\0' "$json"; } >&4
  # xl copies memory while the guest runs and writes (the disk passes go
  # on meanwhile), then suspends it.
  if [ -e "$S/guest_write_early" ]; then
    dd if="$S/guest_write_early" of="$(cat "$S/src.disk")" bs=4096 seek="$(cat "$S/guest_write_early.block")" conv=notrunc status=none
    log "source: guest wrote during the memory copy"
  fi
  f xl_memory_secs && sleep "$(fv xl_memory_secs)"
  # The guest writes once more before it suspends, on any of its disks
  # (World::guest_writes_to_before_suspend): the last delta carries it.
  for w in "$S"/guest_writes/*.data; do
    [ -e "$w" ] || continue
    lv=$(basename "$w" .data)
    dd if="$w" of="$(dirname "$(cat "$S/src.disk")")/$lv" bs=4096 seek="$(cat "${w%.data}.block")" conv=notrunc status=none
    log "source: guest wrote to $lv"
  done
  setsrc suspended; log "source: suspended"
  # The target's disk end dies the moment the guest is suspended: the last
  # delta, which starts then, must fail and READY be withheld.
  # (The fault's value, if any, names the one LV whose disk end dies.)
  if f kill_serve_at_suspend; then
    which=$(cat "$S/faults/kill_serve_at_suspend"); pids="$S/serve.pids"; [ -n "$which" ] && pids="$S/serve.pids.$which"
    while read -r p; do kill -9 "$p" 2>/dev/null; done < "$pids"; log "source: target disk end killed${which:+ ($which)}"
  fi
  if f xl_stream_fail; then
    log "source: stream failed; source resumed"; setsrc running; exit 1
  fi
  # failed_suspend in xl_migrate.c: xl gives up and does not resume.
  if f xl_fail_suspended; then log "source: xl failed, source left suspended"; exit 1; fi
  f xl_sleep_suspended && sleep "$(fv xl_sleep_suspended)"
  head -c 1000 /dev/zero >&4
  ready=$(head -c 34 <&3 | tr -d '\000')
  if [ "$ready" != "domain received, ready to unpause" ]; then
    log "source: no READY; source resumed"; setsrc running; exit 1
  fi
  log "source: READY received"
  f xl_sleep_before_go && sleep "$(fv xl_sleep_before_go)"
  printf 'domain is yours, you are cleared to unpause\000' >&4
  log "source: GO sent"
  # The link dies after GO; xl notices after a while (the fault's seconds).
  if f xl_lose_report; then sleep "$(fv xl_lose_report)"; log "source: report lost"; exit 3; fi
  msg=$(head -c 39 <&3 | tr -d '\000')
  st=$(head -c 1 <&3 | od -An -tu1 | tr -d ' ')
  if [ "$msg" != "my copy unpause results are as follows" ]; then
    log "source: no report (failed_badly)"; exit 1
  fi
  if [ "$st" = 0 ]; then setsrc gone; log "source: destroyed after status 0"; exit 0; fi
  setsrc running; log "source: target status $st; source resumed"; exit 1 ;;
migrate-receive)
  # Target side. In its own session, as on another host: killing the
  # source's process group does not kill it, it sees EOF instead.
  if [ -z "$XMT_SETSID" ]; then XMT_SETSID=1 exec setsid "$0" migrate-receive "$@"; fi
  paused=0; [ "$1" = -p ] && paused=1
  echo $$ > "$S/recv.pid"
  log "target: migrate-receive"
  f recv_no_banner && { log "target: receiver failed to start"; exit 1; }
  printf 'xl migration receiver ready, send binary domain data.\n'
  # xl's save header: the domain is built with the disk its config names.
  set -- $(head -c 48 | od -An -tu1 -v)
  [ $# = 48 ] || { log "target: short header ($# bytes)"; exit 1; }
  olen=$(( ${45} + ${46} * 256 + ${47} * 65536 + ${48} * 16777216 ))
  paths=$(head -c "$olen" | tail -c +5 | tr -d '\000' | grep -o '"pdev_path": "[^"]*"' | sed 's/.*: "\(.*\)"/\1/')
  for disk in $paths; do
    log "target: config names disk $disk"
    [ -f "$disk" ] || { log "target: restore failed: no disk $disk"; exit 1; }
  done
  n=$(head -c 1000 | wc -c)
  [ "$n" = 1000 ] || { log "target: short stream ($n bytes)"; exit 1; }
  printf "%s\n" "--p---" > "$S/tgt/$NAME--incoming"; log "target: $NAME--incoming built, paused"
  if f recv_fail_restore; then
    if f recv_leave_incoming; then log "target: restore failed, $NAME--incoming left"
    else rm -f "$S/tgt/$NAME--incoming"; log "target: restore failed, $NAME--incoming destroyed"; fi
    exit 1
  fi
  printf 'domain received, ready to unpause\000'
  log "target: READY sent"; touch "$S/ready.sent"
  go=$(head -c 44 | tr -d '\000')
  if [ "$go" != "domain is yours, you are cleared to unpause" ]; then
    log "target: no GO; $NAME--incoming left"; exit 1
  fi
  log "target: GO"
  if f recv_vanish_after_go; then rm -f "$S/tgt/$NAME--incoming"; log "target: died after GO, domain gone"; exit 1; fi
  if f recv_die_after_go; then log "target: died after GO, $NAME--incoming left"; exit 1; fi
  mv "$S/tgt/$NAME--incoming" "$S/tgt/$NAME" 2>/dev/null || { log "target: $NAME--incoming was destroyed before the unpause"; exit 1; }
  if [ $paused = 1 ]; then log "target: $NAME kept paused"; else echo "r-----" > "$S/tgt/$NAME"; log "target: $NAME unpaused"; fi
  f recv_sleep_after_go && sleep "$(fv recv_sleep_after_go)"
  printf 'my copy unpause results are as follows\000\000'
  log "target: status 0 sent" ;;
*)
  echo "fake xl: $cmd not faked" >&2; exit 1 ;;
esac
"#;

const LVM: &str = r#"#!/bin/bash
# Fake lvm2 for xenmig's host tests: an LV is a regular file /dev/VG/LV,
# tags in $S/tags/VG/LV (one a line), a VG exists if $S/vg/VG holds its size.
S=@STATE@
log() { echo "$*" >> "$S/log"; }
cmd=$(basename "$0")
last="${@: -1}"
vg_json() {
  v=$1; size=$(cat "$S/vg/$v"); used=0; n=0
  for l in /dev/$v/*; do [ -f "$l" ] || continue; used=$((used + $(stat -c %s "$l"))); n=$((n+1)); done
  printf '{"vg_name":"%s","vg_size":"%s","vg_free":"%s","vg_extent_size":"4194304","lv_count":"%s","pv_count":"1"}' "$v" "$size" $((size - used)) $n
}
lv_json() {
  v=$1; l=$2; attr="-wi-a-----"; [ -e "$S/open/$v/$l" ] && attr="-wi-ao----"
  tags=""; [ -f "$S/tags/$v/$l" ] && tags=$(paste -sd, "$S/tags/$v/$l")
  printf '{"lv_name":"%s","vg_name":"%s","lv_attr":"%s","lv_size":"%s","origin":"","lv_path":"/dev/%s/%s","lv_dm_path":"/dev/mapper/%s-%s","lv_tags":"%s"}' \
    "$l" "$v" "$attr" "$(stat -c %s "/dev/$v/$l")" "$v" "$l" "$v" "$l" "$tags"
}
no_vg() { echo "  Volume group \"$1\" not found" >&2; echo "  Cannot process volume group $1" >&2; exit 5; }
case "$cmd" in
vgs)
  case "$last" in vg_name,*) vgs=$(ls "$S/vg") ;; *) vgs=$last; [ -f "$S/vg/$last" ] || no_vg "$last" ;; esac
  out=""; for v in $vgs; do out="$out${out:+,}$(vg_json "$v")"; done
  printf '{"report":[{"vg":[%s]}]}\n' "$out" ;;
lvs)
  case "$last" in
    lv_name,*) sel=$(ls "$S/vg") ;;
    */*) v=${last%%/*}; [ -f "$S/vg/$v" ] || no_vg "$v"
         [ -f "/dev/$last" ] || { echo "  Failed to find logical volume \"$last\"" >&2; exit 5; }
         printf '{"report":[{"lv":[%s]}]}\n' "$(lv_json "$v" "${last#*/}")"; exit 0 ;;
    *) sel=$last; [ -f "$S/vg/$last" ] || no_vg "$last" ;;
  esac
  out=""
  for v in $sel; do for p in /dev/$v/*; do [ -f "$p" ] || continue; out="$out${out:+,}$(lv_json "$v" "$(basename "$p")")"; done; done
  printf '{"report":[{"lv":[%s]}]}\n' "$out" ;;
lvcreate)
  # lvcreate --yes -n LV -L SIZEb VG
  while [ $# -gt 1 ]; do case "$1" in -n) lv=$2; shift 2 ;; -L) size=${2%b}; shift 2 ;; *) shift ;; esac; done
  v=$1; [ -f "$S/vg/$v" ] || no_vg "$v"
  # The fault names the one LV whose creation fails (after the checks passed).
  if [ -e "$S/faults/lvcreate_fail" ] && [ "$lv" = "$(cat "$S/faults/lvcreate_fail")" ]; then
    echo "  device-mapper: create ioctl on $v-$lv failed: Device or resource busy" >&2; exit 5
  fi
  [ -e "/dev/$v/$lv" ] && { echo "  Logical Volume \"$lv\" already exists in volume group \"$v\"" >&2; exit 5; }
  free=$(vg_json "$v" | sed 's/.*"vg_free":"\([0-9]*\)".*/\1/')
  [ "$size" -le "$free" ] || { echo "  Volume group \"$v\" has insufficient free space ($free bytes): $size required." >&2; exit 5; }
  truncate -s "$size" "/dev/$v/$lv"; log "target: lvcreate $v/$lv $size"
  echo "  Logical volume \"$lv\" created." ;;
lvchange)
  # lvchange --addtag TAG VG/LV
  [ "$1" = --addtag ] || { echo "fake lvchange: $* not faked" >&2; exit 1; }
  [ -f "/dev/$3" ] || { echo "  Failed to find logical volume \"$3\"" >&2; exit 5; }
  mkdir -p "$(dirname "$S/tags/$3")"; echo "$2" >> "$S/tags/$3"; log "target: lvchange --addtag $2 $3" ;;
*)
  echo "fake lvm: $cmd not faked" >&2; exit 1 ;;
esac
"#;

/// The target's xenmig: the fakes first on PATH, then the real binary, in
/// a session of its own (as on another host).
const REMOTE: &str = r#"#!/bin/bash
S=@STATE@; D=@DIR@
export PATH="$D/bin:$PATH" XENMIG_XL="$D/bin/xl"
f() { [ -e "$S/faults/$1" ]; }
if [ "$1" = serve ]; then
  echo $$ >> "$S/serve.pids"
  f serve_fail && { echo "target: cannot open the disk (fault)" >&2; exit 1; }
  # Only the disk end of the DST this fault names fails.
  f serve_fail_dst && [ "$3" = "$(cat "$S/faults/serve_fail_dst")" ] && { echo "target: cannot open $3 (fault)" >&2; exit 1; }
  f serve_sleep && sleep "$(cat "$S/faults/serve_sleep")"
  if f faulty_disk_end; then
    # The disk end is a test binary's, writing DST through a FaultyDisk
    # (the file names the binary): the link on fds 3 and 4, the test
    # harness's own output dropped, the disk end's error on stderr. DST is
    # `serve --target`'s argument; the others go along (the disk end takes
    # --readback from them). setsid -w: its status and stderr reach the
    # source, as a remote end's do through ssh.
    XMT_FAULTY_DST=$3 XMT_SERVE_ARGS="$*" exec setsid -w bash -c 'echo $$ >> "$0"; exec "$@" 3<&0 4>&1 1>/dev/null' "$S/serve.pids" \
      "$(cat "$S/faults/faulty_disk_end")" --exact faulty_disk_end --ignored --nocapture --test-threads=1
  fi
  if f serve_cut; then
    # The link drops after N bytes from the source. (head, not dd: dd's
    # count_bytes counts reads, and a source writing in small pieces was
    # cut after a few of them, before any whole frame; with fullblock dd
    # holds back a partial block the target waits for, and so does head's
    # stdio buffer without stdbuf -o0.)
    # (exec: no shell keeps the source's pipe open behind head.)
    exec setsid bash -c 'echo $$ >> "$0"; exec "$@"' "$S/serve.pids" @XENMIG@ "$@" < <(stdbuf -o0 head -c "$(cat "$S/faults/serve_cut")")
  fi
  # setsid forks when this shell leads its process group (xenmig's Link::spawn
  # gives the peer a group of its own): the disk end records its own pid.
  # (Also in serve.pids.LV, LV being DST's name: one disk's end.)
  exec setsid bash -c 'echo $$ >> "$0"; echo $$ >> "$0.$1"; shift; exec "$@"' "$S/serve.pids" "$(basename "$3")" @XENMIG@ "$@"
fi
if [ "$1 $2" = "migrate-target cleanup" ] && f cleanup_fail; then echo "ssh: connect to host tgt: No route to host" >&2; exit 255; fi
if [ "$1 $2" = "migrate-target state" ] && f state_fail; then echo "ssh: connect to host tgt: No route to host" >&2; exit 255; fi
if [ "$1 $2" = "migrate-target prepare" ] && f prepare_sleep; then touch "$S/prepare.started"; sleep "$(cat "$S/faults/prepare_sleep")"; fi
if [ "$1 $2" = "migrate-target probe" ] && f probe_protocol; then
  setsid @XENMIG@ "$@" | sed "s/\"protocol\":[0-9]*/\"protocol\":$(cat "$S/faults/probe_protocol")/"; exit "${PIPESTATUS[0]}"
fi
exec setsid @XENMIG@ "$@"
"#;

/// An ssh that cannot connect.
const NO_SSH: &str = "#!/bin/sh\necho \"ssh: connect to host $1 port 22: Connection refused\" >&2\nexit 255\n";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One fake world; removes its /dev directories when dropped.
pub struct World {
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub id: String,
    pub src_vg: String,
    pub tgt_vg: String,
    /// The source disk's content before the migration (and after: xenmig
    /// never writes it; a fake guest write is applied to it too).
    pub src_before: Vec<u8>,
}

impl World {
    /// A world where the source runs DOMAIN on one 2 MiB disk and the
    /// target has a VG of `tgt_vg_bytes` with nothing in it.
    pub fn new(tgt_vg_bytes: u64) -> World {
        World::with_disk(tgt_vg_bytes, DISK_BYTES)
    }

    /// The same with a source disk of `disk_bytes` (of noise).
    pub fn with_disk(tgt_vg_bytes: u64, disk_bytes: usize) -> World {
        crate::common::require_root("/dev directories standing for volume groups");
        let tmp = tempfile::tempdir().unwrap();
        let id = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let dir = tmp.path().to_path_buf();
        let (src_vg, tgt_vg) = (format!("xmts-{id}"), format!("xmtt-{id}"));
        let s = dir.join("state");
        for d in ["bin", "state/tgt", "state/faults", "state/vg", "state/tags", "state/open", "journal", "run"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        let fill = |t: &str| {
            t.replace("@STATE@", s.to_str().unwrap())
                .replace("@DIR@", dir.to_str().unwrap())
                .replace("@NAME@", DOMAIN)
                .replace("@ID@", &DOMID.to_string())
                .replace("@XENMIG@", crate::common::bin().to_str().unwrap())
        };
        write_executable(&dir.join("bin/xl"), &fill(XL));
        write_executable(&dir.join("bin/lvm"), &fill(LVM));
        for c in ["lvs", "vgs", "lvcreate", "lvchange"] {
            std::os::unix::fs::symlink("lvm", dir.join("bin").join(c)).unwrap();
        }
        write_executable(&dir.join("remote-xenmig"), &fill(REMOTE));
        write_executable(&dir.join("no-ssh"), NO_SSH);
        fs::write(s.join("vg").join(&tgt_vg), tgt_vg_bytes.to_string()).unwrap();
        fs::create_dir_all(format!("/dev/{src_vg}")).unwrap();
        fs::create_dir_all(format!("/dev/{tgt_vg}")).unwrap();
        let disk = format!("/dev/{src_vg}/{DOMAIN}-disk");
        let src_before = crate::common::noise(7, disk_bytes);
        fs::write(&disk, &src_before).unwrap();
        fs::write(s.join("src.disk"), &disk).unwrap();
        fs::write(s.join("tgt.disk"), format!("/dev/{tgt_vg}/{DOMAIN}-disk")).unwrap();
        fs::write(s.join("src.state"), "running").unwrap();
        fs::write(s.join("log"), "").unwrap();
        let w = World { dir, _tmp: Some(tmp), id, src_vg, tgt_vg, src_before };
        w.save();
        w
    }

    fn save(&self) {
        let v = serde_json::json!({ "id": self.id, "src_vg": self.src_vg, "tgt_vg": self.tgt_vg });
        fs::write(self.dir.join("world.json"), v.to_string()).unwrap();
    }

    /// The world of a parent test, from a child process (not dropped there).
    pub fn load(dir: &Path) -> World {
        let v: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("world.json")).unwrap()).unwrap();
        let g = |k: &str| v[k].as_str().unwrap().to_string();
        World {
            dir: dir.into(),
            _tmp: None,
            id: g("id"),
            src_vg: g("src_vg"),
            tgt_vg: g("tgt_vg"),
            src_before: Vec::new(),
        }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn src_disk(&self) -> PathBuf {
        PathBuf::from(format!("/dev/{}/{DOMAIN}-disk", self.src_vg))
    }

    pub fn tgt_disk(&self) -> PathBuf {
        PathBuf::from(format!("/dev/{}/{DOMAIN}-disk", self.tgt_vg))
    }

    pub fn journal_file(&self) -> PathBuf {
        xenmig::migrate::journal::path_for(&self.dir.join("journal"), DOMAIN)
    }

    pub fn host(&self) -> FakeSource {
        FakeSource { state: self.state(), src_vg: self.src_vg.clone(), xl: self.dir.join("bin/xl") }
    }

    pub fn opts(&self) -> MigrateOptions {
        let mut o = MigrateOptions::new(DOMAIN, HOST);
        o.ssh = String::new();
        o.remote_xenmig = self.dir.join("remote-xenmig").display().to_string();
        o.target_vg = Some(self.tgt_vg.clone());
        // The VG changes (the two disks must be different files here), so
        // xenmig asks for -C; the fake xl ignores it.
        let cfg = self.dir.join("g1.cfg");
        fs::write(&cfg, "name = 'g1'\n").unwrap();
        o.config = Some(cfg);
        o.self_exe = crate::common::bin();
        o.journal_dir = self.dir.join("journal");
        o.run_dir = self.dir.join("run");
        o.memory_timeout = Duration::from_secs(60);
        if let Ok(ms) = fs::read_to_string(self.state().join("hold_precopy_ms")) {
            o.hold_precopy = Some(Duration::from_millis(ms.trim().parse().unwrap()));
        }
        if let Ok(ms) = fs::read_to_string(self.state().join("hold_ready_ms")) {
            o.hold_ready = Some(Duration::from_millis(ms.trim().parse().unwrap()));
        }
        o
    }

    pub fn fault(&self, name: &str, value: &str) {
        fs::write(self.state().join("faults").join(name), value).unwrap();
    }

    pub fn clear_faults(&self) {
        for e in fs::read_dir(self.state().join("faults")).unwrap() {
            fs::remove_file(e.unwrap().path()).unwrap();
        }
    }

    /// The source domain: "running", "suspended", "paused" or "gone".
    pub fn src_state(&self) -> String {
        fs::read_to_string(self.state().join("src.state")).unwrap().trim().to_string()
    }

    pub fn set_src_state(&self, s: &str) {
        fs::write(self.state().join("src.state"), s).unwrap();
    }

    /// The target's domains and their state letters, sorted.
    pub fn tgt_domains(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = fs::read_dir(self.state().join("tgt"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), fs::read_to_string(e.path()).unwrap().trim().to_string())
            })
            .collect();
        v.sort();
        v
    }

    pub fn add_tgt_domain(&self, name: &str, letters: &str) {
        fs::write(self.state().join("tgt").join(name), letters).unwrap();
    }

    /// Files in the target VG.
    pub fn tgt_lvs(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(format!("/dev/{}", self.tgt_vg))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    pub fn tgt_tags(&self) -> Vec<String> {
        self.tgt_tags_of(&format!("{DOMAIN}-disk"))
    }

    /// The target's tags of LV `lv`.
    pub fn tgt_tags_of(&self, lv: &str) -> Vec<String> {
        fs::read_to_string(self.state().join("tags").join(&self.tgt_vg).join(lv))
            .map(|t| t.lines().map(String::from).collect())
            .unwrap_or_default()
    }

    /// Give the domain one more disk: LV `lv` of the source VG, `bytes` of
    /// noise (`seed`), seen by the guest as `vdev`. Returns its content.
    pub fn add_disk(&self, vdev: &str, lv: &str, bytes: usize, seed: u64) -> Vec<u8> {
        let data = crate::common::noise(seed, bytes);
        fs::write(format!("/dev/{}/{lv}", self.src_vg), &data).unwrap();
        let mut list = fs::read_to_string(self.state().join("disks.extra")).unwrap_or_default();
        list.push_str(&format!("{vdev} {lv}\n"));
        fs::write(self.state().join("disks.extra"), list).unwrap();
        data
    }

    /// The fake guest writes `blocks` 4 KiB blocks at `block` of its disk
    /// `lv` (its first, or one [`add_disk`](Self::add_disk) gave it;
    /// content `before`)
    /// just before xl suspends it; returns that disk's content afterwards.
    pub fn guest_writes_to_before_suspend(&self, lv: &str, before: &[u8], block: usize, blocks: usize) -> Vec<u8> {
        self.guest_writes(lv, before, block, blocks, 97)
    }

    /// [`guest_writes_to_before_suspend`](Self::guest_writes_to_before_suspend),
    /// the data being noise of `seed`.
    fn guest_writes(&self, lv: &str, before: &[u8], block: usize, blocks: usize, seed: u64) -> Vec<u8> {
        let data = crate::common::noise(seed, blocks * 4096);
        let dir = self.state().join("guest_writes");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("{lv}.data")), &data).unwrap();
        fs::write(dir.join(format!("{lv}.block")), block.to_string()).unwrap();
        let mut after = before.to_vec();
        after[block * 4096..(block + blocks) * 4096].copy_from_slice(&data);
        after
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.state().join("log")).unwrap()
    }

    pub fn logged(&self, what: &str) -> bool {
        self.log().lines().any(|l| l == what)
    }

    /// The fake guest writes `blocks` 4 KiB blocks at `block` just before
    /// xl suspends it; returns the source content expected afterwards.
    pub fn guest_writes_before_suspend(&mut self, block: usize, blocks: usize) -> Vec<u8> {
        self.guest_writes(&format!("{DOMAIN}-disk"), &self.src_before, block, blocks, 99)
    }

    /// The fake guest writes `blocks` 4 KiB blocks at `block` once xl has
    /// started, and xl then copies memory for `secs` seconds before it
    /// suspends the guest. Returns the data written.
    pub fn guest_writes_during_memory(&self, block: usize, blocks: usize, secs: f64) -> Vec<u8> {
        let data = crate::common::noise(98, blocks * 4096);
        fs::write(self.state().join("guest_write_early"), &data).unwrap();
        fs::write(self.state().join("guest_write_early.block"), block.to_string()).unwrap();
        self.fault("xl_memory_secs", &secs.to_string());
        data
    }

    /// The fake guest no longer writes to its first disk before xl
    /// suspends it.
    pub fn no_guest_writes(&self) {
        let _ = fs::remove_file(self.state().join("guest_writes").join(format!("{DOMAIN}-disk.data")));
    }

    /// Hold the pre-copy this long after pass 1 began (`opts.hold_precopy`).
    pub fn hold_precopy(&self, d: Duration) {
        fs::write(self.state().join("hold_precopy_ms"), d.as_millis().to_string()).unwrap();
    }

    /// Hold READY this long before the last delta (`opts.hold_ready`).
    pub fn hold_ready(&self, d: Duration) {
        fs::write(self.state().join("hold_ready_ms"), d.as_millis().to_string()).unwrap();
    }

    pub fn pids(&self, file: &str) -> Vec<i32> {
        fs::read_to_string(self.state().join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn signal_serve(&self, sig: i32) {
        for pid in self.pids("serve.pids") {
            signal(pid, sig);
        }
    }

    /// Wait until `cond` holds (panics after `limit`).
    pub fn wait_for(&self, what: &str, limit: Duration, cond: impl Fn() -> bool) {
        let end = Instant::now() + limit;
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn journal_phase(&self) -> Option<String> {
        let t = fs::read_to_string(self.journal_file()).ok()?;
        let v: serde_json::Value = serde_json::from_str(&t).ok()?;
        v["phase"].as_str().map(String::from)
    }
}

/// Send `sig` to process `pid`, without unsafe code (nix's kill); a process
/// already gone is not an error here.
pub fn signal(pid: i32, sig: i32) {
    use nix::sys::signal::{kill, Signal};
    if let Ok(sig) = Signal::try_from(sig) {
        let _ = kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Whether process `pid` still exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if self._tmp.is_none() {
            return;
        }
        // Target ends we started and that may be stopped or still running.
        for pid in self.pids("serve.pids").into_iter().chain(self.pids("recv.pid")) {
            if alive(pid) {
                signal(pid, libc::SIGCONT);
                signal(pid, libc::SIGKILL);
            }
        }
        let _ = fs::remove_dir_all(format!("/dev/{}", self.src_vg));
        let _ = fs::remove_dir_all(format!("/dev/{}", self.tgt_vg));
    }
}

/// The source host: the domain's state in `STATE/src.state`.
pub struct FakeSource {
    state: PathBuf,
    src_vg: String,
    xl: PathBuf,
}

impl FakeSource {
    fn read(&self) -> String {
        fs::read_to_string(self.state.join("src.state")).unwrap().trim().to_string()
    }

    fn disk(&self, vdev: &str, lv: &str) -> DiskInfo {
        DiskInfo {
            vdev: vdev.into(),
            vg: self.src_vg.clone(),
            lv: lv.into(),
            // The fake LV is a file: its size is the disk's.
            size_bytes: fs::metadata(format!("/dev/{}/{lv}", self.src_vg)).unwrap().len(),
        }
    }

    fn log(&self, line: &str) {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().append(true).open(self.state.join("log")).unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

impl SourceHost for FakeSource {
    fn domain(&self, name: &str) -> Result<DomainInfo, MigrateError> {
        let st = self.read();
        if name != DOMAIN || st == "gone" {
            return Err(MigrateError::Preflight(format!("no domain {name} here")));
        }
        Ok(DomainInfo {
            id: DOMID,
            name: DOMAIN.into(),
            uuid: UUID.into(),
            paused: st == "paused",
            memory_kib: 131072,
            disks: std::iter::once(self.disk("xvda", &format!("{DOMAIN}-disk")))
                .chain(
                    fs::read_to_string(self.state.join("disks.extra"))
                        .unwrap_or_default()
                        .lines()
                        .filter_map(|l| l.split_once(' '))
                        .map(|(vdev, lv)| self.disk(vdev, lv)),
                )
                .collect(),
        })
    }

    fn state(&self, id: u32) -> Result<Option<DomState>, MigrateError> {
        assert_eq!(id, DOMID);
        Ok(match self.read().as_str() {
            "running" => Some(DomState::Running),
            "suspended" => Some(DomState::Suspended),
            "paused" => Some(DomState::Paused),
            "gone" => None,
            s => panic!("bad fake state {s}"),
        })
    }

    fn resume(&self, id: u32) -> Result<(), MigrateError> {
        assert_eq!(id, DOMID);
        if self.read() != "suspended" {
            return Err(MigrateError::Commit(format!("resume: domain is {}", self.read())));
        }
        fs::write(self.state.join("src.state.new"), "running").unwrap();
        fs::rename(self.state.join("src.state.new"), self.state.join("src.state")).unwrap();
        self.log("source: resumed by xenmig");
        Ok(())
    }

    fn tag_lv(&self, path: &str, tag: &str) -> Result<(), MigrateError> {
        self.log(&format!("source: tag {path} {tag}"));
        Ok(())
    }

    fn xl(&self) -> PathBuf {
        self.xl.clone()
    }
}

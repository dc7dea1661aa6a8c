//! The snapshot tracker against fake lvm2 commands (device-mapper does
//! not work on the build host; the lab runs the real ones): a source that
//! freezes while a snapshot is being taken is not waited for, the last
//! call finds every write since the current snapshot, and no snapshot is
//! left behind, also the one whose taking was abandoned.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/script.rs"]
mod script;
use script::write_executable;

use xenmig::blocks::layout::Layout;
use xenmig::copy::tracker::{Candidates, ChangeTracker, SnapTracker};
use xenmig::storage::dmsnap::encode_store;
use xenmig::storage::lvm::Lvm;

const SIZE: u64 = 1 << 20;

/// lvs, lvcreate and lvremove as shell scripts keeping their state in
/// `dir`: snapshots are files in `dir/snaps`, their COW devices empty
/// stores in `dir/mapper`; every create and remove is logged. lvcreate
/// waits for `dir/go` (at most 10 s) while `dir/slow` exists.
fn fake_lvm(dir: &Path, origin: &Path) {
    for d in ["snaps", "mapper", "bin"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(dir.join("empty-cow"), encode_store(4096, 1, &[])).unwrap();
    let d = dir.display();
    let scripts = [
        (
            "lvs",
            format!(
                r#"#!/bin/sh
# lvs ... [vg0/NAME]: that one LV, or all of them
for a; do want=$a; done
case $want in vg0/*) want=${{want#vg0/}} ;; *) want= ;; esac
printf '{{"report":[{{"lv":['
sep=
if [ -z "$want" ] || [ "$want" = disk ]; then
  printf '{{"lv_name":"disk","vg_name":"vg0","lv_size":"{SIZE}","lv_path":"{o}"}}'
  sep=,
fi
for f in {d}/snaps/*; do
  [ -e "$f" ] || continue
  n=$(basename "$f")
  [ -z "$want" ] || [ "$want" = "$n" ] || continue
  printf '%s{{"lv_name":"%s","vg_name":"vg0","lv_size":"8388608","origin":"disk","lv_path":"/dev/vg0/%s"}}' "$sep" "$n" "$n"
  sep=,
done
printf ']}}]}}\n'
"#,
                o = origin.display()
            ),
        ),
        (
            "lvcreate",
            format!(
                r#"#!/bin/sh
# --yes -s -n NAME -L SIZE ORIGIN
name=$4
i=0  # at most 10 s: a tracker that waits fails the test, not hangs it
while [ -e {d}/slow ] && [ ! -e {d}/go ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
cp {d}/empty-cow {d}/mapper/vg0-$name-cow
touch {d}/snaps/$name
echo "create $name" >> {d}/log
"#
            ),
        ),
        (
            "lvremove",
            format!(
                r#"#!/bin/sh
# --yes vg0/NAME
name=${{2#vg0/}}
rm {d}/snaps/$name {d}/mapper/vg0-$name-cow || exit 5
echo "remove $name" >> {d}/log
"#
            ),
        ),
    ];
    for (name, text) in scripts {
        write_executable(&dir.join("bin").join(name), &text);
    }
}

fn snapshots(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("snaps"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn only(c: Candidates) -> Vec<u64> {
    match c {
        Candidates::Only(b) => b.into_iter().collect(),
        other => panic!("expected the blocks the snapshot names, got {other:?}"),
    }
}

/// The COW device of the snapshot taken last gets these chunks (older
/// ones may still wait for their removal, which runs in a thread).
fn writes_since_current(dir: &Path, chunks: &[u64]) -> PathBuf {
    let log = std::fs::read_to_string(dir.join("log")).unwrap();
    let last = log.lines().filter_map(|l| l.strip_prefix("create ")).next_back().expect("a snapshot was taken");
    let cow = dir.join("mapper").join(format!("vg0-{last}-cow"));
    assert!(cow.exists(), "{} is gone", cow.display());
    std::fs::write(&cow, encode_store(4096, 1, chunks)).unwrap();
    cow
}

/// A tracker of a fresh origin file, with fake lvm2 commands in the
/// returned directory. O_DIRECT reads of the fake COW devices need a real
/// file system (tmpfs refuses them): the target directory's.
fn tracker() -> (tempfile::TempDir, SnapTracker) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path();
    let origin = dir.join("disk.img");
    std::fs::write(&origin, vec![0u8; SIZE as usize]).unwrap();
    fake_lvm(dir, &origin);
    let t = SnapTracker::start_with(Lvm::with_bin_dir(dir.join("bin")), &dir.join("mapper"), &origin, SIZE).unwrap();
    (tmp, t)
}

#[test]
fn a_frozen_source_does_not_wait_for_a_snapshot_and_none_is_left() {
    let (tmp, mut t) = tracker();
    let (dir, layout) = (tmp.path(), Layout::flat(SIZE, 4096).unwrap());
    let frozen = Arc::new(AtomicBool::new(false));
    t.watch_freeze(frozen.clone());

    // A pass while the source runs: a new snapshot, the old one's writes.
    writes_since_current(dir, &[2, 5]);
    assert_eq!(only(t.candidates(&layout, false).unwrap()), vec![2, 5]);

    // The next snapshot hangs in lvcreate, and the source freezes: the
    // pass returns at once, finding nothing.
    writes_since_current(dir, &[7]);
    std::fs::write(dir.join("slow"), "").unwrap();
    frozen.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    assert_eq!(only(t.candidates(&layout, false).unwrap()), Vec::<u64>::new());
    assert!(t0.elapsed() < Duration::from_secs(5), "waited {:?} for lvcreate", t0.elapsed());

    // The last call reads the current snapshot: the write made before the
    // abandoned pass is there.
    assert_eq!(only(t.candidates(&layout, true).unwrap()), vec![7]);

    // lvcreate finishes after all; dropping the tracker removes every
    // snapshot, the late one included.
    std::fs::write(dir.join("go"), "").unwrap();
    drop(t);
    assert_eq!(snapshots(dir), Vec::<String>::new());
    let log = std::fs::read_to_string(dir.join("log")).unwrap();
    let created = log.lines().filter(|l| l.starts_with("create ")).count();
    let removed = log.lines().filter(|l| l.starts_with("remove ")).count();
    assert_eq!((created, removed), (3, 3), "log:\n{log}");
}

#[test]
fn an_overflowed_snapshot_makes_the_pass_reread_everything() {
    let (tmp, mut t) = tracker();
    let (dir, layout) = (tmp.path(), Layout::flat(SIZE, 4096).unwrap());
    let cow = writes_since_current(dir, &[1]);
    std::fs::write(&cow, encode_store(4096, 0, &[1])).unwrap();
    assert!(matches!(t.candidates(&layout, true).unwrap(), Candidates::All(_)));
    drop(t);
    assert_eq!(snapshots(dir), Vec::<String>::new());
}

//! `xenmig copy --live`: copying while a writer keeps changing the source.

mod common;
#[path = "common/script.rs"]
mod script;

use common::*;
use script::write_executable;
use std::fs;
use std::path::Path;
use std::process::{Child, Command};

/// A background shell loop, killed (with its children) on drop.
struct Writer(Child);
impl Writer {
    fn start(script: &str) -> Writer {
        let child = Command::new("setsid").args(["sh", "-c", script]).spawn().expect("start writer");
        Writer(child)
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}
impl Drop for Writer {
    fn drop(&mut self) {
        // The writer leads its own session: kill the whole process group.
        let _ = Command::new("kill").args(["-s", "CONT", "--", &format!("-{}", self.0.id())]).status();
        let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", self.0.id())]).status();
        let _ = self.0.wait();
    }
}

/// A mounted loop ext4 file system, unmounted on drop.
struct Mounted(String);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").args(["-u", &self.0]).status();
        let _ = Command::new("umount").args(["-l", &self.0]).status();
    }
}

fn passes(v: &serde_json::Value) -> &Vec<serde_json::Value> {
    v["passes"].as_array().expect("passes in the report")
}

#[test]
fn live_copy_of_a_mounted_file_system_under_write_load() {
    require_root("loop-mounting ext4 and fsfreeze");
    let d = tempfile::tempdir().unwrap();
    let (img, dst, frozen, mnt) =
        (d.path().join("fs.img"), d.path().join("copy.img"), d.path().join("frozen.img"), d.path().join("mnt"));
    fs::create_dir(&mnt).unwrap();
    assert!(Command::new("truncate").args(["-s", "256M", s(&img)]).status().unwrap().success());
    assert!(Command::new("mkfs.ext4").args(["-q", "-F", s(&img)]).status().unwrap().success());
    assert!(Command::new("mount").args(["-o", "loop", s(&img), s(&mnt)]).status().unwrap().success());
    let _m = Mounted(s(&mnt).to_string());
    // Seed some data, then keep creating and rewriting files throughout.
    assert!(Command::new("sh")
        .args(["-c", &format!("for i in $(seq 40); do head -c 1M /dev/urandom > {0}/seed$i; done; sync", s(&mnt))])
        .status()
        .unwrap()
        .success());
    let writer = Writer::start(&format!(
        "i=0; while :; do head -c 200000 /dev/urandom > {0}/w$((i % 30)).tmp && mv {0}/w$((i % 30)).tmp {0}/w$((i % 30)); sync {0}/w$((i % 30)); i=$((i+1)); done",
        s(&mnt)
    ));
    std::thread::sleep(std::time::Duration::from_millis(500));
    // The thaw command first keeps a copy of the frozen source to compare.
    let freeze = format!("sync -f {0} && fsfreeze -f {0}", s(&mnt));
    let thaw = format!("cp {} {} && fsfreeze -u {}", s(&img), s(&frozen), s(&mnt));
    let v = copy_json(&["--live", "--max-passes", "4", "--freeze-cmd", &freeze, "--thaw-cmd", &thaw, s(&img), s(&dst)]);
    drop(writer);
    assert_eq!(fs::read(&frozen).unwrap(), fs::read(&dst).unwrap(), "target differs from the frozen source");
    let fsck = Command::new("e2fsck").args(["-fn", s(&dst)]).output().unwrap();
    assert!(fsck.status.success(), "e2fsck: {}", String::from_utf8_lossy(&fsck.stdout));
    let p = passes(&v);
    assert!(p.len() >= 2 && p.len() <= 4, "{v}");
    assert_eq!(p.last().unwrap()["final_pass"], true);
    assert!(p[..p.len() - 1].iter().all(|x| x["final_pass"] == false));
    assert!(v["downtime_seconds"].as_f64().unwrap() > 0.0);
    // The writer changed blocks after pass 1 started, so later passes had work.
    assert!(p[1..].iter().any(|x| x["changed_blocks"].as_u64().unwrap() > 0), "{v}");
}

#[test]
fn a_writer_that_never_converges_ends_at_the_pass_limit() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, frozen) = (d.path().join("a.img"), d.path().join("b.img"), d.path().join("frozen.img"));
    sample_image(&a, 31, 8192);
    // Rewrites 64 KiB at pseudo-random places, forever.
    let writer = Writer::start(&format!(
        "i=0; while :; do dd if=/dev/urandom of={} bs=64k seek=$(( (i * 37) % 500 )) count=1 conv=notrunc status=none; i=$((i+1)); done",
        s(&a)
    ));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = writer.pid();
    let freeze = format!("kill -s STOP -- -{pid}");
    let thaw = format!("cp {} {} && kill -s CONT -- -{pid}", s(&a), s(&frozen));
    let v = copy_json(&[
        "--live",
        "--max-passes",
        "2",
        "--converge-blocks",
        "0",
        "--freeze-cmd",
        &freeze,
        "--thaw-cmd",
        &thaw,
        s(&a),
        s(&b),
    ]);
    drop(writer);
    assert_eq!(passes(&v).len(), 2, "{v}");
    assert_eq!(fs::read(&frozen).unwrap(), fs::read(&b).unwrap());
}

#[test]
fn a_failing_freeze_thaws_and_reports_nothing_verified() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, thawed) = (d.path().join("a.img"), d.path().join("b.img"), d.path().join("thawed"));
    sample_image(&a, 32, 1000);
    let thaw = format!("touch {}", s(&thawed));
    let out = run(&[
        "copy",
        "--json",
        "--live",
        "--freeze-cmd",
        "echo cannot freeze >&2; exit 3",
        "--thaw-cmd",
        &thaw,
        s(&a),
        s(&b),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert!(v["error"].as_str().unwrap().contains("freeze command"), "{v}");
    assert!(thawed.exists(), "the thaw command did not run");
}

#[test]
fn a_target_lost_while_frozen_thaws_the_source() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, thawed, pidfile) =
        (d.path().join("a.img"), d.path().join("b.img"), d.path().join("thawed"), d.path().join("pid"));
    let data = sample_image(&a, 33, 2000);
    let remote = d.path().join("remote-xenmig");
    write_executable(&remote, &format!("#!/bin/sh\necho $$ > {}\nexec {} \"$@\"\n", s(&pidfile), bin().display()));
    // Freezing kills the target: the final pass can never complete.
    let freeze = format!("kill -9 $(cat {})", s(&pidfile));
    let thaw = format!("touch {}", s(&thawed));
    let target = format!("host:{}", s(&b));
    let out = run(&[
        "copy",
        "--json",
        "--live",
        "-s",
        "",
        "--remote-xenmig",
        s(&remote),
        "--freeze-cmd",
        &freeze,
        "--thaw-cmd",
        &thaw,
        s(&a),
        &target,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert!(thawed.exists(), "the source was left frozen");
    assert_eq!(fs::read(&a).unwrap(), data, "the source was modified");
    let _ = Path::new(&b);
}

#[test]
fn live_without_a_writer_converges_at_once() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let data = sample_image(&a, 34, 3000);
    let v = copy_json(&["--live", s(&a), s(&b)]);
    assert_eq!(fs::read(&b).unwrap(), data);
    let p = passes(&v);
    assert_eq!(p.len(), 2, "{v}");
    assert_eq!(p[1]["changed_blocks"], 0);
    assert_eq!(p[1]["groups"], 0);
}

#[test]
fn snapshot_tracking_of_a_plain_file_is_refused_before_the_target_is_touched() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    sample_image(&a, 35, 100);
    let out = run(&["copy", "--live", "--rescan", "lvm-snapshot", s(&a), s(&b)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("logical volume") || err.contains("change tracking"), "{err}");
    assert!(!b.exists(), "the target was created");
}

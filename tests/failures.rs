//! Bad peers, full and small targets: each gets a clear error, a non-zero
//! exit, no `verified`, and an untouched source.

mod common;
#[path = "common/script.rs"]
mod script;

use common::*;
use script::write_executable;
use std::fs;
use std::path::Path;
use std::process::Command;

fn digest_of(p: &Path) -> blake3::Hash {
    blake3::hash(&fs::read(p).unwrap())
}

/// A stand-in for the remote xenmig: a shell script run with `-s ""`.
fn fake_remote(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    write_executable(&p, &format!("#!/bin/sh\n{body}\n"));
    p.to_str().unwrap().to_string()
}

fn failed_copy(args: &[&str]) -> (String, serde_json::Value) {
    let mut all = vec!["copy", "--json"];
    all.extend_from_slice(args);
    let out = run(&all);
    assert_eq!(out.status.code(), Some(1), "xenmig {all:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report even on failure");
    assert_eq!(v["verified"], false);
    (String::from_utf8_lossy(&out.stderr).into_owned(), v)
}

#[test]
fn a_peer_that_sends_garbage_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.img");
    let garbage = fake_remote(d.path(), "garbage", "cat /dev/zero | head -c 100000; echo");
    let (err, _) = failed_copy(&["-s", "", "--remote-xenmig", &garbage, "somehost:/x.img", s(&b)]);
    assert!(err.contains("frame") || err.contains("peer"), "{err}");
    let text = fake_remote(d.path(), "text", "echo 'Welcome to host2! Last login: yesterday'");
    let (err, _) = failed_copy(&["-s", "", "--remote-xenmig", &text, "somehost:/x.img", s(&b)]);
    assert!(err.contains("unknown kind") || err.contains("peer"), "{err}");
}

#[test]
fn a_source_that_dies_mid_stream_fails_cleanly_and_a_rerun_resumes() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    sample_image(&a, 11, 8192); // 32 MiB
    let before = digest_of(&a);
    let dying = fake_remote(d.path(), "dying", &format!("{} \"$@\" | stdbuf -o0 head -c 12000000", bin().display()));
    let remote = format!("host:{}", s(&a));
    let (err, _) = failed_copy(&["--compress", "none", "-s", "", "--remote-xenmig", &dying, &remote, s(&b)]);
    assert!(err.contains("closed the connection"), "{err}");
    assert_eq!(digest_of(&a), before, "the source was modified");
    // Rerun onto the same target: what arrived is reused in place.
    let v = copy_json(&["--compress", "none", s(&a), s(&b)]);
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    assert!(v["blocks_in_place"].as_u64().unwrap() > 1000, "{v}");
}

#[test]
fn a_target_that_dies_mid_stream_fails_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    sample_image(&a, 12, 8192);
    let before = digest_of(&a);
    let dying = fake_remote(d.path(), "dying", &format!("stdbuf -o0 head -c 5000000 | {} \"$@\"", bin().display()));
    let remote = format!("host:{}", s(&b));
    let (err, _) = failed_copy(&["-s", "", "--remote-xenmig", &dying, s(&a), &remote]);
    assert!(!err.is_empty());
    assert_eq!(digest_of(&a), before);
}

#[test]
fn a_full_target_is_named_and_not_verified() {
    require_root("mounting a small tmpfs");
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount").args(["-t", "tmpfs", "-o", "size=2m", "tmpfs", s(&mnt)]).status().unwrap();
    assert!(ok.success(), "mount tmpfs");
    let a = d.path().join("a.img");
    sample_image(&a, 13, 2048); // 8 MiB, 6.4 MiB of data
    let before = digest_of(&a);
    let b = mnt.join("b.img");
    let out = run(&["copy", "--compress", "none", s(&a), s(&b)]);
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("b.img") && err.contains("No space left"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("verified"));
    assert_eq!(digest_of(&a), before);
}

/// A loop device over a file, detached on drop.
struct Loop(String);
impl Loop {
    fn new(backing: &Path) -> Loop {
        let out = Command::new("losetup").args(["--find", "--show", s(backing)]).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_devices_are_sized_by_ioctl_and_never_overrun() {
    require_root("loop devices");
    let d = tempfile::tempdir().unwrap();
    let (a, small, big) = (d.path().join("a.img"), d.path().join("small"), d.path().join("big"));
    let data = sample_image(&a, 14, 1024); // 4 MiB
    fs::write(&small, common::noise(1, 1 << 20)).unwrap();
    fs::write(&big, common::noise(2, 6 << 20)).unwrap();
    let small_before = digest_of(&small);
    {
        let dev = Loop::new(&small);
        let (err, _) = failed_copy(&[s(&a), &dev.0]);
        assert!(err.contains("smaller than") && err.contains(&dev.0), "{err}");
    }
    assert_eq!(digest_of(&small), small_before, "a too-small target was written");
    {
        let dev = Loop::new(&big);
        let v = copy_json(&[s(&a), &dev.0]);
        assert_eq!(v["image_size"], 4 << 20);
        // Zero blocks are written as zeros on a device that held data.
        let mut copy = fs::read(&dev.0).unwrap();
        assert_eq!(copy.len(), 6 << 20, "the device was resized");
        copy.truncate(4 << 20);
        assert!(copy == data, "device content differs from the source");
        // The device is read as a source too, by its ioctl size.
        let back = d.path().join("back.img");
        let v = copy_json(&[&dev.0, s(&back)]);
        assert_eq!(v["image_size"], 6 << 20);
    }
    assert_eq!(&fs::read(&big).unwrap()[..4 << 20], &data[..]);
}

#[test]
fn both_ends_remote_is_refused() {
    let (err, _) = failed_copy(&["h1:/a", "h2:/b"]);
    assert!(err.contains("both SRC and DST are remote"), "{err}");
}

//! Issue 10 ("Harden xenmig"): signals while frozen, busy targets, copying a
//! file onto itself, files created for root.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A background shell loop in its own session, killed (with its children)
/// on drop.
struct Writer(Child);
impl Writer {
    fn start(script: &str) -> Writer {
        Writer(Command::new("setsid").args(["sh", "-c", script]).spawn().expect("start writer"))
    }
}
impl Drop for Writer {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", self.0.id())]).status();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Wait for `child` at most `limit`; kill it if it is still running.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("xenmig did not exit within {limit:?} after the signal");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Start a live copy of a source under write load whose freeze command
/// never returns on its own; signal xenmig once frozen (twice if `twice`);
/// the thaw must run and the exit status be 1.
fn signal_while_frozen(sig: &str, twice: bool) {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let (frozen, thawed) = (d.path().join("frozen"), d.path().join("thawed"));
    sample_image(&a, 41, 4096);
    let _writer = Writer::start(&format!(
        "i=0; while :; do dd if=/dev/urandom of={} bs=4k seek=$(( (i * 37) % 4000 )) count=1 conv=notrunc status=none; i=$((i+1)); sleep 0.01; done",
        s(&a)
    ));
    let freeze = format!("touch {}; sleep 30", s(&frozen));
    // A thaw that takes a moment, so that a second signal lands during it.
    let thaw = format!("sleep 1; touch {}", s(&thawed));
    let mut child = Command::new(bin())
        .args(["copy", "-q", "--json", "--live", "--max-passes", "2", "--freeze-cmd", &freeze, "--thaw-cmd", &thaw])
        .args([s(&a), s(&b)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_for(&frozen, Duration::from_secs(60)), "the source was never frozen");
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-s", sig, &pid]).status().unwrap().success());
    if twice {
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill").args(["-s", sig, &pid]).status();
    }
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(thawed.exists(), "SIG{sig}: the thaw command did not run ({status}); stderr: {err}");
    assert_eq!(status.code(), Some(1), "SIG{sig}: {status}; stderr: {err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report on interruption");
    assert_eq!(v["verified"], false);
    assert!(err.contains("interrupted") && err.contains(&format!("SIG{sig}")), "{err}");
}

#[test]
fn sigterm_while_frozen_thaws_and_fails() {
    signal_while_frozen("TERM", false);
}

#[test]
fn sigint_twice_while_frozen_still_thaws() {
    signal_while_frozen("INT", true);
}

#[test]
fn sighup_while_frozen_thaws_and_fails() {
    signal_while_frozen("HUP", false);
}

#[test]
fn a_freeze_command_that_never_returns_times_out_and_thaws() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, thawed) = (d.path().join("a.img"), d.path().join("b.img"), d.path().join("thawed"));
    sample_image(&a, 42, 500);
    let thaw = format!("touch {}", s(&thawed));
    let t = Instant::now();
    let out = run(&[
        "copy",
        "-q",
        "--live",
        "--freeze-timeout",
        "2",
        "--freeze-cmd",
        "sleep 600",
        "--thaw-cmd",
        &thaw,
        s(&a),
        s(&b),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "the freeze was not cut short");
    assert!(thawed.exists(), "the thaw did not run");
    assert!(err.contains("freeze command") && err.contains("2 s"), "{err}");
}

/// A loop device over a fresh file, detached on drop.
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

struct Mounted(String);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", &self.0]).status();
    }
}

#[test]
fn a_mounted_block_device_is_refused_and_left_untouched() {
    require_root("loop devices and mounting");
    let d = tempfile::tempdir().unwrap();
    let (a, backing, mnt) = (d.path().join("a.img"), d.path().join("fs.img"), d.path().join("mnt"));
    fs::create_dir(&mnt).unwrap();
    let size = 32usize << 20;
    let src = noise(43, size);
    fs::write(&a, &src).unwrap();
    assert!(Command::new("truncate").args(["-s", &size.to_string(), s(&backing)]).status().unwrap().success());
    let dev = Loop::new(&backing);
    assert!(Command::new("mkfs.ext4").args(["-q", "-F", &dev.0]).status().unwrap().success());
    assert!(Command::new("mount").args([&dev.0, s(&mnt)]).status().unwrap().success());
    let _m = Mounted(s(&mnt).to_string());
    let out = run(&["copy", "-q", s(&a), &dev.0]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "copying onto a mounted device succeeded: {err}");
    assert!(err.contains(&dev.0), "the error does not name the device: {err}");
    assert!(err.contains(s(&mnt)), "the error does not name the mount point: {err}");
    // Not one block of the source reached the device.
    let now = fs::read(&dev.0).unwrap();
    let written = (0..size / 4096).filter(|&i| now[i * 4096..(i + 1) * 4096] == src[i * 4096..(i + 1) * 4096]).count();
    assert_eq!(written, 0, "{written} blocks of the source were written to the mounted device");
}

#[test]
fn copying_a_file_onto_itself_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.img");
    let data = sample_image(&a, 44, 300);
    let link = d.path().join("link.img");
    std::os::unix::fs::symlink(&a, &link).unwrap();
    let hard = d.path().join("hard.img");
    fs::hard_link(&a, &hard).unwrap();
    let dotted = format!("{}/./a.img", d.path().display());
    for dst in [s(&a), s(&link), s(&hard), &dotted] {
        let out = run(&["copy", "-q", s(&a), dst]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "copy {} {dst} was accepted: {err}", s(&a));
        assert!(err.contains("same"), "{err}");
    }
    assert_eq!(fs::read(&a).unwrap(), data);
}

#[test]
fn copying_a_block_device_onto_itself_is_refused() {
    require_root("loop devices");
    let d = tempfile::tempdir().unwrap();
    let backing = d.path().join("dev.img");
    sample_image(&backing, 45, 256);
    let dev = Loop::new(&backing);
    let link = d.path().join("dev-link");
    std::os::unix::fs::symlink(&dev.0, &link).unwrap();
    let out = run(&["copy", "-q", &dev.0, s(&link)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("same"), "{err}");
}

#[test]
fn hash_output_does_not_follow_a_planted_symlink() {
    let d = tempfile::tempdir().unwrap();
    let (a, out, victim) = (d.path().join("a.img"), d.path().join("a.xmh"), d.path().join("victim"));
    sample_image(&a, 46, 50);
    fs::write(&victim, b"precious").unwrap();
    // The name the old code wrote through.
    std::os::unix::fs::symlink(&victim, d.path().join("a.partial")).unwrap();
    let r = run(&["hash", "-q", "-o", s(&out), s(&a)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(fs::read(&victim).unwrap() == b"precious", "the symlink was followed");
    assert!(fs::symlink_metadata(d.path().join("a.partial")).unwrap().file_type().is_symlink());
    let r = run(&["show", s(&out)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // No temporary left behind.
    let left: Vec<_> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 4, "{left:?}");
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn files_made_from_a_private_source_are_private() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.img");
    sample_image(&a, 47, 100);
    fs::set_permissions(&a, fs::Permissions::from_mode(0o600)).unwrap();
    let (dst, hash, idx) = (d.path().join("b.img"), d.path().join("a.xmh"), d.path().join("a.xmi"));
    let r = run(&["copy", "-q", s(&a), s(&dst)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(mode(&dst), 0o600, "copy DST");
    let r = run(&["hash", "-q", "-o", s(&hash), s(&a)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(mode(&hash), 0o600, "hash file");
    let r = run(&["index", "-q", "-o", s(&idx), s(&a)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(mode(&idx), 0o600, "index file");
    // A readable source keeps giving readable copies (umask permitting).
    let c = d.path().join("c.img");
    fs::set_permissions(&a, fs::Permissions::from_mode(0o644)).unwrap();
    let r = run(&["copy", "-q", s(&a), s(&c)]);
    assert!(r.status.success());
    assert_eq!(mode(&c), 0o644);
}

#[test]
fn fifos_as_source_reference_or_show_file_are_refused_without_blocking() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, fifo) = (d.path().join("a.img"), d.path().join("b.img"), d.path().join("fifo"));
    sample_image(&a, 48, 20);
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for args in
        [vec!["copy", "-q", s(&fifo), s(&b)], vec!["copy", "-q", "-r", s(&fifo), s(&a), s(&b)], vec!["show", s(&fifo)]]
    {
        let mut child = Command::new(bin()).args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let status = wait_exit(&mut child, Duration::from_secs(10));
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("fifo"), "{args:?}: {err}");
    }
}

/// A remote end that fails before its first frame: the operator reads its
/// reason, not the broken pipe or closed link this end saw.
#[test]
fn a_remote_end_failing_before_its_first_frame_is_reported_in_its_own_words() {
    let d = tempfile::tempdir().unwrap();
    let (fifo, b) = (d.path().join("fifo"), d.path().join("b.img"));
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let remote = format!("h:{}", fifo.display());
    let out = run(&["-q", "copy", "-s", "", "--remote-xenmig", bin().to_str().unwrap(), &remote, s(&b)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or("");
    assert!(last.contains("the far end failed") && last.contains("neither a regular file nor a block device"), "{err}");
    assert!(!last.contains("Broken pipe") && !last.contains("closed the connection"), "{err}");
}

/// A hash file given as a reference is named for what it is, not hashed
/// as if it were an image.
#[test]
fn a_hash_file_as_reference_is_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, h) = (d.path().join("a.img"), d.path().join("b.img"), d.path().join("a.xmh"));
    sample_image(&a, 61, 16);
    assert!(run(&["-q", "hash", "-o", s(&h), s(&a)]).status.success());
    let out = run(&["-q", "copy", "-r", s(&h), s(&a), s(&b)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a.xmh") && err.contains("is a hash file"), "{err}");
}

/// Errors that quote their cause print it once (found by the fault matrix:
/// `serve` and `hash` printed "...: Broken pipe: Broken pipe").
#[test]
fn a_cause_is_printed_once() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("missing.img");
    for args in [vec!["hash", s(&missing)], vec!["serve", "--source", s(&missing)]] {
        let out = Command::new(bin()).args(&args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("missing.img") && err.matches("No such file or directory").count() == 1,
            "{args:?}: {err}"
        );
    }
}

//! `--bwlimit`: the sending end holds the limit.
//!
//! The long tests copy over real ssh to the loopback sshd that
//! scripts/test.sh starts (ignored in a plain `cargo test`, run there with
//! `--include-ignored`); the local ones run everywhere.
//!
//! Two rates are measured, by this test's own clock: the steady rate, from
//! the growth of the destination file's allocated bytes between 20% and 80%
//! of the image (the receiving side's view, independent of xenmig's
//! counters), which must be within 10% of the limit; and the average over
//! the whole copy (the report's `bytes_wire` over the wall time, start-up,
//! hashing and the final verification included), which can only be lower.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::*;

/// An image of incompressible data (no zero blocks, nothing to dedup).
fn dense_image(path: &Path, seed: u64, bytes: usize) {
    fs::write(path, noise(seed, bytes)).unwrap();
}

/// Run `xenmig copy --json ARGS`; the report and the wall-clock seconds.
fn timed_copy(args: &[&str]) -> (serde_json::Value, f64) {
    let (v, secs, _) = watched_copy(args, None);
    (v, secs)
}

/// Run `xenmig copy --json ARGS` while sampling the allocated bytes of
/// `dst` (a fresh file) every 50 ms; also returns the steady rate, from the
/// samples between 20% and 80% of `size` bytes.
fn watched_copy(args: &[&str], dst: Option<(&Path, u64)>) -> (serde_json::Value, f64, Option<f64>) {
    use std::os::unix::fs::MetadataExt;
    let started = Instant::now();
    let child = Command::new(bin())
        .env("XENMIG_CONFIG", "")
        .arg("copy")
        .arg("--json")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let mut samples: Vec<(f64, u64)> = Vec::new();
    if let Some((path, _)) = dst {
        // Until the child has exited: /proc/PID disappears once reaped.
        while !waiter.is_finished() && Path::new(&format!("/proc/{pid}")).exists() {
            if let Ok(m) = fs::metadata(path) {
                samples.push((started.elapsed().as_secs_f64(), m.blocks() * 512));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let out = waiter.join().unwrap();
    let secs = started.elapsed().as_secs_f64();
    let steady = dst.and_then(|(_, size)| {
        let first = samples.iter().find(|s| s.1 >= size / 5)?;
        let last = samples.iter().rev().find(|s| s.1 <= size * 4 / 5)?;
        (last.0 - first.0 > 1.0).then(|| (last.1 - first.1) as f64 / (last.0 - first.0))
    });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], true, "{v}");
    (v, secs, steady)
}

fn ssh_command() -> String {
    std::env::var("XENMIG_SSH")
        .expect("XENMIG_SSH must name the ssh command for the loopback sshd (scripts/test.sh sets it)")
}

/// The steady rate is within 10% of the limit; the whole copy's average
/// is not above it.
fn assert_rate(v: &serde_json::Value, secs: f64, steady: Option<f64>, limit: u64, what: &str) {
    let steady = steady.expect("enough samples of the destination's growth");
    let average = v["bytes_wire"].as_u64().unwrap() as f64 / secs;
    let (rs, ra) = (steady / limit as f64, average / limit as f64);
    eprintln!(
        "{what}: steady {steady:.0} B/s ({rs:.3} of the limit); whole copy {} bytes in {secs:.2} s = {average:.0} B/s ({ra:.3})",
        v["bytes_wire"]
    );
    assert!((0.9..=1.1).contains(&rs), "{what}: steady {steady:.0} B/s is not within 10% of {limit}");
    assert!(ra <= 1.02, "{what}: the whole copy averaged {average:.0} B/s, above {limit}");
    assert_eq!(v["bwlimit"], limit);
}

#[test]
#[ignore = "needs the loopback sshd that scripts/test.sh starts; 30 s"]
fn the_limit_holds_over_ssh_both_ways() {
    let ssh = ssh_command();
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (d.path().join("a.img"), d.path().join("b.img"), d.path().join("c.img"));
    let limit: u64 = 4 << 20;
    // 80 MiB at 4 MiB/s: a 20 s push.
    dense_image(&a, 5, 80 << 20);
    let bin = bin();
    let remote = |p: &Path| format!("root@127.0.0.1:{}", p.display());
    let common = ["-s", ssh.as_str(), "--remote-xenmig", s(&bin), "--compress", "none"];
    let mut args = common.to_vec();
    let (rb, rc) = (remote(&b), remote(&c));
    args.extend(["--bwlimit", "4M", s(&a), &rb]);
    let (v, secs, steady) = watched_copy(&args, Some((&b, 80 << 20)));
    assert_rate(&v, secs, steady, limit, "push, 20 s");
    // Pull: the remote `serve --source` is the sending end, limited by the
    // flag passed on to it. 32 MiB: 8 s.
    dense_image(&c, 6, 32 << 20);
    fs::remove_file(&b).unwrap();
    let mut args = common.to_vec();
    args.extend(["--bwlimit", "4M", &rc, s(&b)]);
    let (v, secs, steady) = watched_copy(&args, Some((&b, 32 << 20)));
    assert_rate(&v, secs, steady, limit, "pull, 8 s");
    assert_eq!(fs::read(&b).unwrap(), fs::read(&c).unwrap());
    // Side by side, the same pull without a limit is much faster: the
    // limit, not the link, set the pace above.
    fs::remove_file(&b).unwrap();
    let mut args = common.to_vec();
    args.extend([rc.as_str(), s(&b)]);
    let (v, free_secs) = timed_copy(&args);
    assert!(v.get("bwlimit").is_none(), "{v}");
    eprintln!("pull without a limit: {free_secs:.2} s against {secs:.2} s");
    assert!(free_secs < secs / 2.0, "unlimited {free_secs:.2} s, limited {secs:.2} s");
}

/// A local copy is limited too (the source thread's end of the pair), and
/// a slow limit with a short idle timeout does not time out: bytes keep
/// arriving, and the target's keep-alives are not held back.
#[test]
fn a_local_copy_is_limited_and_does_not_time_out() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    // 768 KiB at 128 KiB/s: at least 6 s, with a 1 s idle timeout.
    dense_image(&a, 7, 768 << 10);
    let (v, secs) = timed_copy(&["--compress", "none", "--bwlimit", "128K", "--idle-timeout", "1", s(&a), s(&b)]);
    let floor = v["bytes_wire"].as_u64().unwrap() as f64 / (128 << 10) as f64;
    // The bucket starts empty: a copy can never beat the limit.
    assert!(secs >= floor * 0.97, "{secs:.2} s for {floor:.2} s worth");
    assert_eq!(v["bwlimit"], 128 << 10);
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
}

#[test]
fn bad_rates_are_usage_errors() {
    for bad in ["10X", "fast", "-1", "1.5M"] {
        let out = Command::new(bin())
            .env("XENMIG_CONFIG", "")
            .args(["copy", &format!("--bwlimit={bad}"), "a", "b"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--bwlimit"), "{bad}");
    }
}

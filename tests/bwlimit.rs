//! `--bwlimit`: the sending end holds the limit.
//!
//! The long tests copy over real ssh, to the loopback sshd that
//! scripts/test.sh starts, and between two network namespaces joined by a
//! veth pair, with an sshd of the test's own in one of them (ignored in a
//! plain `cargo test`, run by scripts/test.sh with `--include-ignored`, as
//! root); the local ones run everywhere.
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

fn watched_copy(args: &[&str], dst: Option<(&Path, u64)>) -> (serde_json::Value, f64, Option<f64>) {
    watched_copy_in(&[], args, dst)
}

/// Run `PREFIX... xenmig copy --json ARGS` (PREFIX: for example `ip netns
/// exec NS`, which execs xenmig in the same process) while sampling the
/// allocated bytes of `dst` (a fresh file) every 50 ms; also returns the
/// steady rate, from the samples between 20% and 80% of `size` bytes.
fn watched_copy_in(prefix: &[&str], args: &[&str], dst: Option<(&Path, u64)>) -> (serde_json::Value, f64, Option<f64>) {
    use std::os::unix::fs::MetadataExt;
    let started = Instant::now();
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    let child = cmd
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

/// Two network namespaces joined by a veth pair (10.200.77.1/30 in the
/// source's, 10.200.77.2/30 in the target's), and an sshd of this test's
/// own in the target's namespace, listening on 10.200.77.2:2222 only.
/// Dropping it stops that sshd and deletes both namespaces (and with them
/// the veth pair), also when the test fails.
struct VethPair {
    src_ns: String,
    dst_ns: String,
    dir: tempfile::TempDir,
    ssh: String,
}

const VETH_SRC_IP: &str = "10.200.77.1";
const VETH_DST_IP: &str = "10.200.77.2";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl VethPair {
    fn new() -> VethPair {
        require_root("network namespaces and a veth pair");
        // Names unique to this process: other test runs may have theirs.
        let tag = std::process::id();
        let (src_ns, dst_ns) = (format!("xmbw-s-{tag}"), format!("xmbw-d-{tag}"));
        let dir = tempfile::tempdir().unwrap();
        // From here on the guard exists: whatever fails is cleaned up.
        let mut pair = VethPair { src_ns, dst_ns, dir, ssh: String::new() };
        let (s_dev, d_dev) = (format!("xmbs{tag}"), format!("xmbd{tag}"));
        ip(&["netns", "add", &pair.src_ns]);
        ip(&["netns", "add", &pair.dst_ns]);
        ip(&[
            "link",
            "add",
            &s_dev,
            "netns",
            &pair.src_ns,
            "type",
            "veth",
            "peer",
            "name",
            &d_dev,
            "netns",
            &pair.dst_ns,
        ]);
        ip(&["-n", &pair.src_ns, "addr", "add", &format!("{VETH_SRC_IP}/30"), "dev", &s_dev]);
        ip(&["-n", &pair.dst_ns, "addr", "add", &format!("{VETH_DST_IP}/30"), "dev", &d_dev]);
        for (ns, dev) in [(&pair.src_ns, &s_dev), (&pair.dst_ns, &d_dev)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        let d = pair.dir.path();
        for key in ["host_key", "client_key"] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key))
                .status()
                .unwrap();
            assert!(st.success(), "ssh-keygen");
        }
        fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        fs::create_dir_all("/run/sshd").unwrap();
        let config = format!(
            "ListenAddress {VETH_DST_IP}\nPort 2222\nHostKey {0}/host_key\nPidFile {0}/sshd.pid\n\
             AuthorizedKeysFile {0}/authorized_keys\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nUseDNS no\n\
             SetEnv PATH=/usr/local/bin:/usr/bin:/bin XENMIG_CONFIG=\n",
            d.display()
        );
        fs::write(d.join("sshd_config"), config).unwrap();
        // sshd forks into the background once it listens; its pid file
        // says which process to stop.
        let st = Command::new("ip")
            .args(["netns", "exec", &pair.dst_ns, "/usr/sbin/sshd", "-f"])
            .arg(d.join("sshd_config"))
            .status()
            .unwrap();
        assert!(st.success(), "sshd in {}", pair.dst_ns);
        pair.ssh = format!(
            "ssh -p 2222 -i {}/client_key -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            d.display()
        );
        // Wait until it answers from the source's namespace, across the
        // veth, before any copy is timed: polled, at most 10 s.
        let login = format!("root@{VETH_DST_IP}");
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let answered = d.join("sshd.pid").exists()
                && Command::new("ip")
                    .args(["netns", "exec", &pair.src_ns, "sh", "-c", &format!("{} {login} true", pair.ssh)])
                    .stderr(std::process::Stdio::null())
                    .status()
                    .unwrap()
                    .success();
            if answered {
                break;
            }
            assert!(Instant::now() < deadline, "the sshd in {} does not answer on {VETH_DST_IP}:2222", pair.dst_ns);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        pair
    }

    /// Bytes the veth carried from the source's namespace so far.
    fn bytes_sent(&self) -> u64 {
        let dev = format!("xmbs{}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "exec", &self.src_ns, "cat", &format!("/sys/class/net/{dev}/statistics/tx_bytes")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("tx_bytes of the veth")
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        if let Ok(pid) = fs::read_to_string(self.dir.path().join("sshd.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) on the pid our own sshd wrote; no memory
                // is involved.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        for ns in [&self.src_ns, &self.dst_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
#[ignore = "needs root and ip netns (scripts/test.sh runs it); 25 s"]
fn the_limit_holds_across_a_veth_pair_between_namespaces() {
    let net = VethPair::new();
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let limit: u64 = 6 << 20;
    // 120 MiB at 6 MiB/s: a 20 s push from the source's namespace to the
    // target's, every byte through the veth (and ssh).
    dense_image(&a, 8, 120 << 20);
    let bin = bin();
    let rb = format!("root@{VETH_DST_IP}:{}", b.display());
    let in_src = ["ip", "netns", "exec", net.src_ns.as_str()];
    let common = ["-s", net.ssh.as_str(), "--remote-xenmig", s(&bin), "--compress", "none"];
    let mut args = common.to_vec();
    args.extend(["--bwlimit", "6M", s(&a), &rb]);
    let before = net.bytes_sent();
    let (v, secs, steady) = watched_copy_in(&in_src, &args, Some((&b, 120 << 20)));
    let on_veth = net.bytes_sent() - before;
    eprintln!(
        "veth: {on_veth} bytes from the source's namespace in {secs:.2} s = {:.0} B/s ({:.3} of the limit; ssh and TCP included)",
        on_veth as f64 / secs,
        on_veth as f64 / secs / limit as f64
    );
    assert_rate(&v, secs, steady, limit, "veth push, 20 s");
    // The bytes did cross the veth: at least what xenmig wrote.
    assert!(on_veth >= v["bytes_wire"].as_u64().unwrap() / 2, "{on_veth} bytes on the veth");
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    // Side by side, the same push without a limit: the limit set the pace.
    fs::remove_file(&b).unwrap();
    let mut args = common.to_vec();
    args.extend([s(&a), rb.as_str()]);
    let (v, free_secs, _) = watched_copy_in(&in_src, &args, None);
    assert!(v.get("bwlimit").is_none(), "{v}");
    eprintln!("veth push without a limit: {free_secs:.2} s against {secs:.2} s");
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

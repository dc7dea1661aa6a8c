//! The xend hook (packaging/external-device-migrate) driven as xend drove
//! it (Xen 4.0's DevController.migrate): `-type vbd -step N -host DST
//! -domname NAME` once per device and step, steps 0 and 1 while the domain
//! runs, 2 and 3 after it is suspended, `-recover` after a failure. The
//! "remote" host is reached with an empty ssh command (the far end runs
//! here) and the disks are named by XENMIG_HOOK_DISKS instead of Xen.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

struct Site {
    dir: tempfile::TempDir,
    disks: String,
}

impl Site {
    /// Two source disks and their (absent) targets, a config with no ssh.
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("xenmig.yaml");
        fs::write(&cfg, format!("ssh: \"\"\nremote_xenmig: {}\nidle_timeout: 30\n", bin().display())).unwrap();
        let mut disks = Vec::new();
        for (i, blocks) in [(0, 600), (1, 300)] {
            let src = dir.path().join(format!("src{i}.img"));
            sample_image(&src, 40 + i, blocks);
            disks.push(format!("{}={}", src.display(), dir.path().join(format!("dst{i}.img")).display()));
        }
        Site { dir, disks: disks.join(" ") }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn hook(&self, args: &[&str]) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/external-device-migrate");
        Command::new(script)
            .args(args)
            .env("XENMIG", bin())
            .env("XENMIG_CONFIG", self.path("xenmig.yaml"))
            .env("XENMIG_HOOK_STATE", self.path("state"))
            .env("XENMIG_HOOK_DISKS", &self.disks)
            .output()
            .unwrap()
    }

    /// One step as xend made it: once per device (two vbds, one vif).
    fn step(&self, step: u32, recover: bool) -> Vec<Output> {
        let step = step.to_string();
        let mut outs = Vec::new();
        for ty in ["vbd", "vbd", "vif"] {
            let mut args = vec!["-type", ty, "-step", &step, "-host", "host2", "-domname", "web1"];
            if recover {
                args.push("-recover");
            }
            outs.push(self.hook(&args));
        }
        outs
    }

    fn step_ok(&self, step: u32) {
        for o in self.step(step, false) {
            assert!(o.status.success(), "step {step}: {}{}", text(&o.stdout), text(&o.stderr));
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_migration_moves_every_disk_verified() {
    let site = Site::new();
    site.step_ok(0);
    site.step_ok(1);
    // The guest keeps writing while the passes run.
    change_blocks(&site.path("src0.img"), 10, 20, 7);
    change_blocks(&site.path("src1.img"), 100, 5, 8);
    // xend suspends the domain: from here on nothing writes.
    site.step_ok(2);
    let outs = site.step(3, false);
    for o in &outs {
        assert!(o.status.success(), "step 3: {}{}", text(&o.stdout), text(&o.stderr));
    }
    assert!(text(&outs[0].stdout).contains("every disk verified on host2"), "{}", text(&outs[0].stdout));
    for i in 0..2 {
        assert_eq!(
            fs::read(site.path(&format!("src{i}.img"))).unwrap(),
            fs::read(site.path(&format!("dst{i}.img"))).unwrap()
        );
        // Each copy's report: verified, with a frozen last pass.
        let report: serde_json::Value =
            serde_json::from_slice(&fs::read(site.path(&format!("state/web1/disk-{i}.json"))).unwrap()).unwrap();
        assert_eq!(report["verified"], true);
        assert_eq!(report["passes"].as_array().unwrap().last().unwrap()["final_pass"], true);
    }
}

#[test]
fn recover_stops_the_copies_and_forgets_the_attempt() {
    let site = Site::new();
    site.step_ok(0);
    site.step_ok(1);
    // The memory transfer failed: xend recovers after step 1.
    for o in site.step(1, true) {
        assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    }
    assert!(!site.path("state/web1").exists(), "state left behind");
    // The copies are gone (the state was removed only after they exited).
    let ps = Command::new("pgrep")
        .args(["-f", &format!("copy --live.*{}", site.path("src0.img").display())])
        .output()
        .unwrap();
    assert!(ps.stdout.is_empty(), "a copy still runs: {}", text(&ps.stdout));
    // The source is untouched, and a new attempt starts afresh.
    site.step_ok(0);
    assert!(site.path("state/web1/checked").exists());
}

#[test]
fn a_failing_copy_fails_the_migration_and_usage_errors_are_refused() {
    let site = Site { disks: String::new(), ..Site::new() };
    let site = Site { disks: format!("{}=/nonexistent/dir/dst.img", site.path("src0.img").display()), ..site };
    site.step_ok(0);
    site.step_ok(1);
    // Step 2 or 3 reports the failed copy, naming its disk.
    let two = site.step(2, false);
    let failed = if two[0].status.success() { site.step(3, false) } else { two };
    assert_eq!(failed[0].status.code(), Some(1));
    assert!(text(&failed[0].stdout).contains("src0.img failed"), "{}", text(&failed[0].stdout));
    // Steps out of order, missing or bad arguments.
    let fresh = Site::new();
    let o = fresh.hook(&["-type", "vbd", "-step", "3", "-host", "h", "-domname", "web1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("step 3 before step 2"));
    assert_eq!(fresh.hook(&["-type", "vbd", "-step", "1"]).status.code(), Some(1));
    assert_eq!(fresh.hook(&["-type", "vbd", "-step", "7", "-host", "h", "-domname", "w"]).status.code(), Some(1));
    assert_eq!(fresh.hook(&["-type", "vbd", "-step", "0", "-host", "h", "-domname", "../x"]).status.code(), Some(1));
}

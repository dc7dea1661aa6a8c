//! A copy over real ssh, to the sshd that scripts/test.sh (and so CI)
//! starts on 127.0.0.1. Ignored in a plain `cargo test`, which has no sshd;
//! scripts/test.sh runs it with `--include-ignored` and sets XENMIG_SSH.

mod common;

use common::*;
use std::fs;

fn ssh_command() -> String {
    std::env::var("XENMIG_SSH")
        .expect("XENMIG_SSH must name the ssh command for the loopback sshd (scripts/test.sh sets it)")
}

#[test]
#[ignore = "needs the loopback sshd that scripts/test.sh starts"]
fn push_and_pull_over_ssh() {
    let ssh = ssh_command();
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (d.path().join("a.img"), d.path().join("b.img"), d.path().join("c.img"));
    let data = sample_image(&a, 21, 4096);
    let bin = bin();
    let remote = |p: &std::path::Path| format!("root@127.0.0.1:{}", p.display());
    let v = copy_json(&["-s", &ssh, "--remote-xenmig", s(&bin), s(&a), &remote(&b)]);
    assert_eq!(fs::read(&b).unwrap(), data);
    assert_eq!(v["blocks_fetched"], 4096 - 820);
    // Pull it back onto a copy with a few changed blocks.
    fs::copy(&a, &c).unwrap();
    change_blocks(&c, 7, 3, 5);
    let v = copy_json(&["-s", &ssh, "--remote-xenmig", s(&bin), &remote(&b), s(&c)]);
    assert_eq!(fs::read(&c).unwrap(), data);
    assert_eq!(v["blocks_fetched"], 3);
}

#[test]
#[ignore = "needs the loopback sshd that scripts/test.sh starts"]
fn a_missing_remote_program_is_a_clear_error() {
    let ssh = ssh_command();
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.img");
    sample_image(&a, 22, 10);
    let out = run(&["copy", "-s", &ssh, "--remote-xenmig", "/nonexistent/xenmig", s(&a), "root@127.0.0.1:/tmp/x.img"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is xenmig installed on the remote host") || err.contains("not found"), "{err}");
}

//! The Xen commands on a machine that is not a Xen dom0 (CI, developers):
//! they must fail with exit status 1 and a message saying what is missing
//! (no hypervisor, a library, or the bindings), never panic; usage errors
//! exit 2. And lvm2, where installed, must be classified for real.
//!
//! On a real dom0 (the lab) the hypervisor tests return early: the lab's
//! own checks (docs/xen.md) exercise the commands there.

use std::path::Path;
use std::process::{Command, Output};

use xenmig::storage::lvm::{Lvm, LvmError};
use xenmig::xen::{self, XenError};

fn xenmig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xenmig")).args(args).env("RUST_BACKTRACE", "0").output().expect("run xenmig")
}

fn is_dom0() -> bool {
    xen::check_dom0(Path::new("/")).is_ok()
}

/// The one explanation every Xen command must give here.
fn assert_explains_missing_xen(args: &[&str]) {
    let out = xenmig(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "xenmig {args:?}: expected exit 1, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "xenmig {args:?} panicked: {stderr}");
    let explained = match xen::BINDINGS_RELEASE {
        Some(release) => {
            stderr.contains("no Xen hypervisor here") && stderr.contains(&format!("Xen {release}"))
                || stderr.contains("cannot load lib")
        }
        None => stderr.contains("built without Xen bindings") && stderr.contains("install libxen-dev and libclang-dev"),
    };
    assert!(explained, "xenmig {args:?} did not say what is missing: {stderr}");
    assert!(out.stdout.is_empty(), "xenmig {args:?} printed on stdout: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn domains_without_hypervisor_exit_1_and_say_why() {
    if is_dom0() {
        return;
    }
    assert_explains_missing_xen(&["domains"]);
    assert_explains_missing_xen(&["domains", "--json"]);
    assert_explains_missing_xen(&["domains", "g1"]);
}

#[test]
fn domain_commands_without_hypervisor_exit_1() {
    if is_dom0() {
        return;
    }
    assert_explains_missing_xen(&["pause", "g1"]);
    assert_explains_missing_xen(&["unpause", "7"]);
    assert_explains_missing_xen(&["save", "g1", "/tmp/xenmig-test-g1.save"]);
    assert_explains_missing_xen(&["save", "-p", "g1", "/tmp/xenmig-test-g1.save"]);
    assert_explains_missing_xen(&["restore", "--paused", "/tmp/xenmig-test-g1.save"]);
    assert!(!Path::new("/tmp/xenmig-test-g1.save").exists());
}

#[test]
fn missing_arguments_are_usage_errors() {
    for args in [&["pause"][..], &["save", "g1"], &["restore"], &["domains", "--bogus"]] {
        let out = xenmig(args);
        assert_eq!(out.status.code(), Some(2), "xenmig {args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
    }
}

#[test]
fn library_open_reports_missing_hypervisor() {
    if is_dom0() {
        return;
    }
    match xen::Xen::open() {
        Err(XenError::NoHypervisor { detail, built_for }) => {
            assert!(detail.contains("/dev/xen/privcmd"), "{detail}");
            assert_eq!(Some(built_for.as_str()), xen::BINDINGS_RELEASE);
        }
        Err(XenError::NotDom0 { detail }) => assert!(!detail.is_empty()),
        Err(XenError::NoBindings { reason }) => {
            assert!(xen::BINDINGS_RELEASE.is_none(), "{reason}")
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("opened Xen on a host check_dom0 calls not dom0"),
    }
}

#[test]
fn lvm_names_a_missing_volume_group() {
    let lvm = Lvm::new();
    match lvm.vgs(Some("xenmig-no-such-vg")) {
        Err(LvmError::NoSuchVg { vg }) => assert_eq!(vg, "xenmig-no-such-vg"),
        Err(LvmError::NotInstalled { command }) => assert_eq!(command, "vgs"),
        // Not root: lvm cannot read its locks.
        Err(LvmError::NotPermitted { command, .. }) => assert!(command.starts_with("vgs")),
        other => panic!("expected a missing-VG error, got {other:?}"),
    }
    match lvm.lvs(Some("xenmig-no-such-vg")) {
        Err(LvmError::NoSuchVg { vg }) => assert_eq!(vg, "xenmig-no-such-vg"),
        Err(LvmError::NotInstalled { command }) => assert_eq!(command, "lvs"),
        Err(LvmError::NotPermitted { command, .. }) => assert!(command.starts_with("lvs")),
        other => panic!("expected a missing-VG error, got {other:?}"),
    }
}

#[test]
fn lvm_report_of_this_host_parses() {
    // Whatever this host has (often nothing), the real lvm2's JSON parses.
    match Lvm::new().lvs(None) {
        Ok(lvs) => {
            for lv in lvs {
                assert!(!lv.vg.is_empty() && !lv.name.is_empty(), "{lv:?}");
            }
        }
        Err(LvmError::NotInstalled { command }) => assert_eq!(command, "lvs"),
        Err(LvmError::NotPermitted { .. }) | Err(LvmError::NoDeviceMapper { .. }) => {}
        Err(e) => panic!("lvs failed unexpectedly: {e}"),
    }
}

//! Helpers shared by the integration tests: sample images and running the
//! binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xenmig"))
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An image of `blocks` 4 KiB blocks: mostly noise, every fifth block zero.
pub fn sample_image(path: &Path, seed: u64, blocks: usize) -> Vec<u8> {
    let mut data = noise(seed, blocks * 4096);
    for b in (0..blocks).step_by(5) {
        data[b * 4096..(b + 1) * 4096].fill(0);
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// Overwrite `count` blocks starting at `first` with fresh noise.
pub fn change_blocks(path: &Path, first: usize, count: usize, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&noise(seed, count * 4096), (first * 4096) as u64).unwrap();
}

pub fn run(args: &[&str]) -> Output {
    std::process::Command::new(bin()).args(args).output().expect("run xenmig")
}

/// Run a `copy --json` and parse its report; panics with stderr on failure.
pub fn copy_json(args: &[&str]) -> Value {
    let mut all = vec!["copy", "--json"];
    all.extend_from_slice(args);
    let out = run(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "xenmig {all:?} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("bad JSON {stdout}: {e}"));
    check_counters(&v);
    v
}

/// The report's counters must add up, and a success must be verified.
pub fn check_counters(v: &Value) {
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
    assert_eq!(n("blocks_total"), n("blocks_zero") + n("blocks_reused") + n("blocks_fetched"), "{v}");
    assert!(n("blocks_in_place") <= n("blocks_reused"));
    assert!(n("bytes_wire") >= n("bytes_payload_wire"));
    assert_eq!(v["verified"], Value::Bool(true));
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Tests that need root (loop devices, tmpfs) say so instead of passing.
pub fn require_root(what: &str) {
    assert!(is_root(), "this test needs root for {what}; run the suite as root (scripts/test.sh, as CI does)");
}

/// Text-like data: words drawn pseudo-randomly from a vocabulary, which
/// every zstd level compresses, the higher ones clearly better; no zero
/// blocks.
pub fn words(len: usize, seed: u32) -> Vec<u8> {
    let words =
        ["block ", "digest ", "xen ", "guest ", "disk ", "migrate ", "lvm ", "hash ", "zero ", "dom0 ", "link "];
    let mut x = seed;
    let mut data = Vec::with_capacity(len + 16);
    while data.len() < len {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        data.extend_from_slice(words[(x >> 16) as usize % words.len()].as_bytes());
        if x % 7 == 0 {
            data.extend_from_slice(format!("{} ", x % 1000).as_bytes());
        }
    }
    data.truncate(len);
    data
}

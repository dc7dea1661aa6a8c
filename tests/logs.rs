//! What xenmig writes on stderr without a terminal: one timestamped line
//! per phase, or JSON objects with `--log-format json`; on a terminal (a
//! pty made by util-linux `script`), the progress bar as before.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn xenmig(args: &[&str]) -> Output {
    Command::new(bin()).env("XENMIG_CONFIG", "").env_remove("RUST_LOG").args(args).output().unwrap()
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stderr.clone()).unwrap().lines().map(str::to_string).collect()
}

/// `2026-11-29T02:30:29.304Z`: RFC 3339, UTC, milliseconds.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 24
        && s.ends_with('Z')
        && [4, 7].iter().all(|&i| b[i] == b'-')
        && b[10] == b'T'
        && [13, 16].iter().all(|&i| b[i] == b':')
        && b[19] == b'.'
        && s.chars().enumerate().all(|(i, c)| [4, 7, 10, 13, 16, 19, 23].contains(&i) || c.is_ascii_digit())
}

fn images(d: &Path) -> (String, String) {
    let (a, b) = (d.join("a.img"), d.join("b.img"));
    sample_image(&a, 11, 512);
    (s(&a).to_string(), s(&b).to_string())
}

#[test]
fn without_a_terminal_each_phase_is_a_timestamped_line() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = images(d.path());
    let out = xenmig(&["copy", &a, &b]);
    assert!(out.status.success());
    let lines = stderr_lines(&out);
    assert!(!lines.is_empty(), "no phase line");
    for l in &lines {
        let (ts, rest) = l.split_once(' ').unwrap();
        assert!(is_timestamp(ts), "{l}");
        assert!(rest.starts_with("xenmig copy: "), "{l}");
    }
    assert!(lines.iter().any(|l| l.ends_with(&format!("copying ({} bytes)", 512 * 4096))), "{lines:?}");
    // A second copy onto the first scans the target first: two phases.
    let out = xenmig(&["copy", &a, &b]);
    let lines = stderr_lines(&out);
    assert!(lines[0].contains(" xenmig copy: scanning ("), "{lines:?}");
    // -q: nothing at all.
    let out = xenmig(&["copy", "-q", &a, &b]);
    assert!(out.status.success());
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn json_log_lines_for_collectors() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = images(d.path());
    // SHA-1 draws a warning (a log record): every line is one JSON object,
    // records and phases alike.
    let out = xenmig(&["--log-format", "json", "copy", "--hash", "sha1", &a, &b]);
    assert!(out.status.success());
    let objs: Vec<serde_json::Value> =
        stderr_lines(&out).iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect();
    assert!(objs.iter().all(|o| is_timestamp(o["ts"].as_str().unwrap()) && o["level"].is_string()), "{objs:?}");
    let phase = objs.iter().find(|o| o["event"] == "phase").expect("a phase event");
    assert_eq!(phase["command"], "copy");
    assert_eq!(phase["phase"], "copying");
    assert_eq!(phase["bytes"], 512 * 4096);
    assert!(
        objs.iter().any(|o| o["level"] == "warn" && o["message"].as_str().unwrap().contains("SHA-1")),
        "no log record: {objs:?}"
    );
    // A failure ends with an error object naming what failed.
    let missing = d.path().join("none.img");
    let out = xenmig(&["--log-format", "json", "copy", s(&missing), &b]);
    assert_eq!(out.status.code(), Some(1));
    let last: serde_json::Value = serde_json::from_str(stderr_lines(&out).last().unwrap()).unwrap();
    assert_eq!(last["level"], "error");
    assert!(last["message"].as_str().unwrap().contains("none.img"), "{last}");
}

#[test]
fn on_a_terminal_the_progress_bar_is_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = images(d.path());
    let cmd = format!("{} copy {a} {b}", bin().display());
    let out = Command::new("script").env("XENMIG_CONFIG", "").args(["-qec", &cmd, "/dev/null"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // `script` puts the pty's output (stdout and stderr) on its stdout.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("copying ["), "no bar: {text:?}");
    assert!(!text.contains("xenmig copy: copying ("), "a log line on a terminal: {text:?}");
}

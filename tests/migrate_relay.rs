//! The migrate relay as xl runs it, against a fake `xl migrate-receive`:
//! READY is held until xenmig answers; RELEASE passes it and the rest of
//! the handshake; ABORT (or xenmig going away) closes the transport without
//! READY, which is what makes xl resume the source.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use xenmig::migrate::relay::{BANNER, GO, READY, RESULT};

/// A fake receiver: banner, read the "memory" (ending in a NUL line), READY,
/// then wait for GO and report status 0; a log of what it saw goes to `log`.
fn receiver_script(log: &std::path::Path) -> String {
    format!(
        r#"printf 'xl migration receiver ready, send binary domain data.\n'
head -c 1000 >/dev/null; echo got-memory >>{log}
printf 'domain received, ready to unpause\000'
go=$(head -c 44 | tr -d '\000'); echo "got: $go" >>{log}
printf 'my copy unpause results are as follows\000\000'
"#,
        log = log.display()
    )
}

struct Relay {
    child: Child,
    listener: UnixListener,
}

fn start(dir: &std::path::Path) -> Relay {
    let sock = dir.join("ctl.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let log = dir.join("receiver.log");
    // As xl: `exec SSHCOMMAND HOST xl migrate-receive`; with an empty
    // transport the relay drops HOST and runs the rest here.
    let child = Command::new(common::bin())
        .args(["migrate-relay", "--control"])
        .arg(&sock)
        .args(["--ssh", "", "--", "HOST", "sh", "-c"])
        .arg(receiver_script(&log))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Relay { child, listener }
}

fn read_n(r: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    r.read_exact(&mut v).unwrap();
    v
}

/// Play xl up to the point where the relay holds READY: read the banner,
/// send the "memory", see the relay tell xenmig READY. Returns the control
/// socket (read and write halves) and xl's ends of the transport.
fn until_ready(
    relay: &mut Relay,
) -> (
    BufReader<std::os::unix::net::UnixStream>,
    std::os::unix::net::UnixStream,
    std::process::ChildStdin,
    std::process::ChildStdout,
) {
    let (ctl, _) = relay.listener.accept().unwrap();
    let mut ctl_r = BufReader::new(ctl.try_clone().unwrap());
    let mut xl_in = relay.child.stdin.take().unwrap();
    let mut xl_out = relay.child.stdout.take().unwrap();
    assert_eq!(read_n(&mut xl_out, BANNER.len()), BANNER);
    xl_in.write_all(&[7u8; 1000]).unwrap();
    let mut line = String::new();
    ctl_r.read_line(&mut line).unwrap();
    // How long ago xl's last byte went up, then READY.
    let idle = line.trim().strip_prefix("STREAM_IDLE ").unwrap_or_else(|| panic!("{line:?}"));
    assert!(idle.parse::<u64>().is_ok(), "{line:?}");
    line.clear();
    ctl_r.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY");
    (ctl_r, ctl, xl_in, xl_out)
}

#[test]
fn ready_is_held_until_release_then_the_handshake_completes() {
    let d = tempfile::tempdir().unwrap();
    let mut relay = start(d.path());
    let (ctl_r, mut ctl_w, mut xl_in, mut xl_out) = until_ready(&mut relay);

    // Held: nothing reaches "xl" while xenmig has not answered.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ready = read_n(&mut xl_out, READY.len());
        tx.send((ready, xl_out)).unwrap();
    });
    assert!(rx.recv_timeout(Duration::from_millis(700)).is_err(), "READY passed before RELEASE");

    ctl_w.write_all(b"RELEASE\n").unwrap();
    let (ready, mut xl_out) = rx.recv_timeout(Duration::from_secs(10)).expect("READY after RELEASE");
    assert_eq!(ready, READY);
    xl_in.write_all(GO).unwrap();
    drop(xl_in);
    let mut tail = Vec::new();
    xl_out.read_to_end(&mut tail).unwrap();
    let mut want = RESULT.to_vec();
    want.push(0);
    assert_eq!(tail, want);

    let mut events = Vec::new();
    for l in ctl_r.lines() {
        events.push(l.unwrap());
    }
    assert!(events.contains(&"GO".to_string()), "{events:?}");
    assert!(events.contains(&"RESULT 0".to_string()), "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("EOF"), "{events:?}");
    assert!(relay.child.wait().unwrap().success());
    let log = std::fs::read_to_string(d.path().join("receiver.log")).unwrap();
    assert!(log.contains("got: domain is yours, you are cleared to unpause"), "{log}");
}

#[test]
fn abort_closes_without_ready() {
    let d = tempfile::tempdir().unwrap();
    let mut relay = start(d.path());
    let (_ctl_r, mut ctl_w, _xl_in, mut xl_out) = until_ready(&mut relay);
    ctl_w.write_all(b"ABORT\n").unwrap();
    // xl reads EOF where READY should be: its failed_resume path.
    let mut rest = Vec::new();
    xl_out.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "bytes after ABORT: {rest:?}");
    assert_eq!(relay.child.wait().unwrap().code(), Some(1));
    let log = std::fs::read_to_string(d.path().join("receiver.log")).unwrap_or_default();
    assert!(!log.contains("got: domain is yours"), "the receiver got GO: {log}");
}

#[test]
fn xenmig_going_away_counts_as_abort() {
    let d = tempfile::tempdir().unwrap();
    let mut relay = start(d.path());
    let (ctl, _) = relay.listener.accept().unwrap();
    let mut ctl_r = BufReader::new(ctl.try_clone().unwrap());
    let mut xl_in = relay.child.stdin.take().unwrap();
    let mut xl_out = relay.child.stdout.take().unwrap();
    assert_eq!(read_n(&mut xl_out, BANNER.len()), BANNER);
    xl_in.write_all(&[7u8; 1000]).unwrap();
    let mut line = String::new();
    ctl_r.read_line(&mut line).unwrap();
    // How long ago xl's last byte went up, then READY.
    let idle = line.trim().strip_prefix("STREAM_IDLE ").unwrap_or_else(|| panic!("{line:?}"));
    assert!(idle.parse::<u64>().is_ok(), "{line:?}");
    line.clear();
    ctl_r.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY");
    drop(ctl_r);
    drop(ctl);
    let mut rest = Vec::new();
    xl_out.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "READY passed although xenmig went away");
    assert!(!relay.child.wait().unwrap().success());
}

#[test]
fn an_unreachable_control_socket_is_named() {
    let out = Command::new(common::bin())
        .args(["migrate-relay", "--control", "/nonexistent/ctl.sock", "--ssh", "", "--", "H", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/ctl.sock"), "{err}");
}

#[test]
fn xenmig_gone_before_ready_stops_the_transport_at_once() {
    let d = tempfile::tempdir().unwrap();
    let mut relay = start(d.path());
    let (ctl, _) = relay.listener.accept().unwrap();
    let mut xl_out = relay.child.stdout.take().unwrap();
    let _xl_in = relay.child.stdin.take().unwrap();
    assert_eq!(read_n(&mut xl_out, BANNER.len()), BANNER);
    // xenmig goes away while the memory stream is still running (the fake
    // receiver waits for it): the relay must not wait for the target.
    drop(ctl);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = xl_out.read_to_end(&mut rest);
        tx.send(rest).unwrap();
    });
    let rest = rx.recv_timeout(Duration::from_secs(10)).expect("the relay kept the stream open");
    assert!(rest.is_empty(), "bytes after xenmig went away: {rest:?}");
    assert!(!relay.child.wait().unwrap().success());
}

//! The relay: xl migrate's transport, so that xenmig decides when the
//! target may unpause.
//!
//! `xl migrate -s SSHCOMMAND DOMAIN HOST` runs `sh -c "exec SSHCOMMAND HOST
//! xl migrate-receive ..."` and speaks its protocol over that command's
//! stdin and stdout. xenmig passes `xenmig migrate-relay --control SOCKET
//! --ssh 'ssh ...' --` as SSHCOMMAND, so xl starts the relay, which starts
//! the real ssh and copies bytes both ways, except one message:
//!
//! ```text
//!  xl (source)           relay                     xl migrate-receive (target)
//!      |                   |  <- banner (54 bytes)  -----------|
//!      |  -- header, config, memory stream ------------------> |
//!      |                   |  <- READY (34 bytes) -------------|  domain built, paused
//!      |                   |-- "READY" --> xenmig              |
//!      |                   |      (xenmig sends the last disk delta, verifies it)
//!      |                   |<-- "RELEASE" or "ABORT" -- xenmig |
//!      |  <- READY --------|  (RELEASE only)                   |
//!      |  -- GO (44 bytes) ---------------------------------> |  unpause
//!      |  <- "my copy unpause results..." + status byte ------|
//! ```
//!
//! On ABORT (or if xenmig goes away) the relay exits without passing READY
//! on: xl sees its transport close before READY and resumes the source
//! (`failed_resume` in xl_migrate.c); xenmig removes `NAME--incoming` on
//! the target. The control socket carries one line per event: from the
//! relay `STREAM_IDLE <ms>` (how long ago xl's last byte went up, sent
//! just before READY), `READY`, `GO` (the source's GO went through),
//! `RESULT <status>`, `EOF`; to the relay `RELEASE` or `ABORT`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use thiserror::Error;

use super::xl_header;

/// What the target's xl sends first.
pub const BANNER: &[u8] = b"xl migration receiver ready, send binary domain data.\n";
/// The target has built the domain, paused, and waits for GO.
pub const READY: &[u8] = b"domain received, ready to unpause\0";
/// The source's point of no return.
pub const GO: &[u8] = b"domain is yours, you are cleared to unpause\0";
/// The target's report, followed by one status byte.
pub const RESULT: &[u8] = b"my copy unpause results are as follows\0";

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("cannot reach xenmig's control socket {path}: {source}")]
    Control { path: String, source: io::Error },
    #[error("cannot start the transport '{command}': {source}")]
    Spawn { command: String, source: io::Error },
    #[error("the transport command is empty")]
    NoCommand,
    #[error("relay I/O: {0}")]
    Io(#[from] io::Error),
    #[error("xenmig told the relay to abort: READY withheld, the source will be resumed")]
    Aborted,
}

/// Finds READY in the target's byte stream and holds it back: bytes before
/// it pass, bytes that may be its beginning wait for more.
#[derive(Default)]
pub struct ReadyScanner {
    held: Vec<u8>,
}

impl ReadyScanner {
    /// Feed `data`; returns the bytes that may go on to xl now and whether
    /// READY is complete (then it is held, not returned, and everything after
    /// it is returned by [`after_ready`](Self::after_ready)).
    pub fn feed(&mut self, data: &[u8]) -> (Vec<u8>, bool) {
        self.held.extend_from_slice(data);
        if let Some(at) = find(&self.held, READY) {
            let pass = self.held[..at].to_vec();
            self.held.drain(..at + READY.len());
            return (pass, true);
        }
        // Keep the longest tail that is a prefix of READY.
        let keep =
            (1..READY.len().min(self.held.len() + 1)).rev().find(|&k| self.held.ends_with(&READY[..k])).unwrap_or(0);
        let pass = self.held[..self.held.len() - keep].to_vec();
        self.held.drain(..self.held.len() - keep);
        (pass, false)
    }

    /// What came after READY in the same reads.
    pub fn after_ready(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Watches the target's bytes after READY for the result message and its
/// status byte.
#[derive(Default)]
pub struct ResultScanner {
    seen: Vec<u8>,
    done: bool,
}

impl ResultScanner {
    pub fn feed(&mut self, data: &[u8]) -> Option<u8> {
        if self.done {
            return None;
        }
        self.seen.extend_from_slice(data);
        let at = find(&self.seen, RESULT)?;
        let status = *self.seen.get(at + RESULT.len())?;
        self.done = true;
        Some(status)
    }
}

/// Run the relay: `transport` is the real transport's words (ssh and its
/// options), `rest` what xl appended (`HOST xl migrate-receive ...`).
/// Returns the transport's exit code.
///
/// `renames` (disk path pairs): rewrite the domain config at the head of
/// xl's stream first ([`xl_header::rewrite`]); if that fails the transport
/// is stopped, before xl has suspended anything, and xl gives up with the
/// guest still running.
pub fn run(
    control: &Path,
    renames: &[(String, String)],
    transport: &[String],
    rest: &[String],
) -> Result<i32, RelayError> {
    let ctl = UnixStream::connect(control)
        .map_err(|source| RelayError::Control { path: control.display().to_string(), source })?;
    let ctl_w = Arc::new(Mutex::new(ctl.try_clone()?));
    let ctl_r = BufReader::new(ctl);
    let tell = |w: &Arc<Mutex<UnixStream>>, line: &str| {
        let mut g = w.lock().unwrap();
        let _ = g.write_all(format!("{line}\n").as_bytes());
        let _ = g.flush();
    };

    let words: Vec<&String> = transport.iter().chain(rest.iter()).collect();
    let (program, args) = words.split_first().ok_or(RelayError::NoCommand)?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| RelayError::Spawn {
            command: words.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "),
            source,
        })?;
    let released = Arc::new(AtomicBool::new(false));
    // READY arrived and xenmig was asked: from then on its answer decides.
    let asked = Arc::new(AtomicBool::new(false));
    let mut to_target = child.stdin.take().expect("piped");
    let mut from_target = child.stdout.take().expect("piped");

    // xenmig's answers, read by a thread of their own: if xenmig goes away
    // before READY (killed, or it gave up waiting), the transport is stopped
    // at once, so that xl sees its stream end without READY and resumes the
    // source, instead of the relay waiting on the target for ever.
    let (answers_tx, answers) = std::sync::mpsc::channel::<String>();
    {
        let ready_seen = released.clone();
        let asked = asked.clone();
        let transport_pid = child.id() as libc::pid_t;
        thread::spawn(move || {
            let mut r = ctl_r;
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(n) if n > 0 => {
                        if answers_tx.send(line.trim().to_string()).is_err() {
                            return;
                        }
                    }
                    _ => {
                        if !ready_seen.load(Ordering::SeqCst) && !asked.load(Ordering::SeqCst) {
                            // SAFETY: a plain kill(2) of the transport this
                            // process started (its pid; it is our child, so it
                            // cannot have been reaped and reused yet).
                            unsafe { libc::kill(transport_pid, libc::SIGKILL) };
                        }
                        let _ = answers_tx.send(String::new());
                        return;
                    }
                }
            }
        });
    }

    // Up: xl -> target, blindly; after RELEASE the first GO.len() bytes are
    // GO (xl writes it as soon as it reads READY).
    let after_release = Arc::new(AtomicU64::new(0));
    // When the last of xl's bytes went up (ms since `started`): at READY,
    // the end of xl's stream (its last memory round), so that the report
    // can tell xl's last round from the target's restore.
    let started = Instant::now();
    let last_up_ms = Arc::new(AtomicU64::new(0));
    {
        let (released, after, w) = (released.clone(), after_release.clone(), ctl_w.clone());
        let last_up = last_up_ms.clone();
        let renames = renames.to_vec();
        let transport_pid = child.id() as libc::pid_t;
        thread::spawn(move || {
            let mut stdin = io::stdin().lock();
            if !renames.is_empty() {
                match xl_header::rewrite(&mut stdin, &mut to_target, &renames) {
                    Ok(n) => tell(&w, &format!("CONFIG {n} disk paths rewritten")),
                    Err(e) => {
                        log::error!("migrate-relay: {e}");
                        tell(&w, &format!("ERROR {e}"));
                        // SAFETY: kill(2) of the transport this process
                        // started and has not reaped (see above).
                        unsafe { libc::kill(transport_pid, libc::SIGKILL) };
                        return;
                    }
                }
            }
            let mut buf = vec![0u8; 256 * 1024];
            let mut told = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if to_target.write_all(&buf[..n]).is_err() {
                    break;
                }
                last_up.store(started.elapsed().as_millis() as u64, Ordering::SeqCst);
                if released.load(Ordering::SeqCst) && !told {
                    let total = after.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                    if total >= GO.len() as u64 {
                        told = true;
                        let mut g = w.lock().unwrap();
                        let _ = g.write_all(b"GO\n");
                        let _ = g.flush();
                    }
                }
            }
            // Closing our side tells the target's xl that the source is gone.
            drop(to_target);
        });
    }

    // Down: target -> xl, holding READY back until xenmig answers.
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let mut scanner = ReadyScanner::default();
    let mut result = ResultScanner::default();
    let mut ready_seen = false;
    loop {
        let n = match from_target.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let data = &buf[..n];
        if !ready_seen {
            let (pass, ready) = scanner.feed(data);
            stdout.write_all(&pass)?;
            stdout.flush()?;
            if !ready {
                continue;
            }
            ready_seen = true;
            asked.store(true, Ordering::SeqCst);
            let idle = (started.elapsed().as_millis() as u64).saturating_sub(last_up_ms.load(Ordering::SeqCst));
            tell(&ctl_w, &format!("STREAM_IDLE {idle}"));
            tell(&ctl_w, "READY");
            let answer = answers.recv().unwrap_or_default();
            if answer != "RELEASE" {
                // Exit without READY: xl resumes the source. Stop the
                // transport so that the target's xl sees the source go.
                let _ = child.kill();
                let _ = child.wait();
                return Err(RelayError::Aborted);
            }
            released.store(true, Ordering::SeqCst);
            stdout.write_all(READY)?;
            let rest = scanner.after_ready();
            stdout.write_all(&rest)?;
            stdout.flush()?;
            if let Some(s) = result.feed(&rest) {
                tell(&ctl_w, &format!("RESULT {s}"));
            }
            continue;
        }
        stdout.write_all(data)?;
        stdout.flush()?;
        if let Some(s) = result.feed(data) {
            tell(&ctl_w, &format!("RESULT {s}"));
        }
    }
    tell(&ctl_w, "EOF");
    let status = child.wait()?;
    Ok(status.code().unwrap_or(255))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_held_back_across_split_reads() {
        let mut s = ReadyScanner::default();
        let mut stream = BANNER.to_vec();
        stream.extend_from_slice(READY);
        stream.extend_from_slice(b"tail");
        let mut passed = Vec::new();
        let mut found = false;
        for chunk in stream.chunks(5) {
            let (p, r) = s.feed(chunk);
            passed.extend(p);
            if r {
                found = true;
                assert!(b"tail".starts_with(&s.after_ready()), "bytes after READY are kept for later");
                break;
            }
        }
        assert!(found, "READY not found");
        assert_eq!(passed, BANNER, "only the banner may pass before READY");
    }

    #[test]
    fn a_near_miss_passes_through() {
        let mut s = ReadyScanner::default();
        let (p, r) = s.feed(b"domain received, ready to unpausX");
        assert!(!r);
        assert_eq!(p, b"domain received, ready to unpausX");
    }

    #[test]
    fn the_status_byte_is_read_after_the_result_message() {
        let mut r = ResultScanner::default();
        assert_eq!(r.feed(&RESULT[..10]), None);
        assert_eq!(r.feed(&RESULT[10..]), None);
        assert_eq!(r.feed(&[0]), Some(0));
        let mut r = ResultScanner::default();
        let mut v = RESULT.to_vec();
        v.push(3);
        assert_eq!(r.feed(&v), Some(3));
    }

    #[test]
    fn the_messages_have_xls_lengths() {
        assert_eq!(BANNER.len(), 54);
        assert_eq!(READY.len(), 34);
        assert_eq!(GO.len(), 44);
    }
}

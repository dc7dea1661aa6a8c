//! Byte streams between the two ends, and where the ends are.
//!
//! A copy always runs the protocol between two ends. Locally they are two
//! threads joined by a socket pair; remotely the far end is `xenmig serve`
//! started through ssh (or any command given with `-s`, as `xl migrate -s`
//! does) and speaking on its stdin/stdout. Every link counts the bytes it
//! carries in both directions and the time spent blocked writing, which is
//! how `auto` compression learns the link rate.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use thiserror::Error;

use super::flow::{self, Flow, Spell};
use super::throttle::Throttle;

/// Where a spawned peer's stderr lines go (already sanitized). The library
/// prints nothing: the program sets this (xenmig's CLI: to its stderr);
/// unset, they go to the log at info level.
static PEER_LINES: std::sync::OnceLock<PeerLineSink> = std::sync::OnceLock::new();

type PeerLineSink = Box<dyn Fn(&str) + Send + Sync>;

/// Send the far end's stderr lines to `sink` (once per process).
pub fn set_peer_line_sink(sink: impl Fn(&str) + Send + Sync + 'static) {
    let _ = PEER_LINES.set(Box::new(sink));
}

fn pass_on(line: &str) {
    match PEER_LINES.get() {
        Some(sink) => sink(line),
        None => log::info!("peer: {line}"),
    }
}

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("cannot start '{command}': {source}")]
    Spawn { command: String, source: io::Error },
    #[error("cannot set up a local link: {0}")]
    Local(io::Error),
    #[error("the remote command '{command}' failed: {status}")]
    Remote { command: String, status: String },
    /// The far end failed and said why (its last words on stderr): what
    /// the operator needs, rather than the broken pipe this end saw.
    #[error("the far end failed ({status}): {said}")]
    RemoteSaid { status: String, said: String },
    #[error("host '{host}' starts with '-', which ssh would take for an option")]
    BadHost { host: String },
}

/// Where one end of a copy is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    /// `[user@]host:path`
    Remote {
        host: String,
        path: String,
    },
}

impl Location {
    /// Parse like scp: `host:path` is remote when the part before the first
    /// colon has no slash; `./a:b` or `/a:b` stay local.
    pub fn parse(s: &str) -> Location {
        if let Some((host, path)) = s.split_once(':') {
            if !host.is_empty() && !host.contains('/') {
                return Location::Remote { host: host.to_string(), path: path.to_string() };
            }
        }
        Location::Local(PathBuf::from(s))
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Location::Remote { .. })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Remote { host, path } => write!(f, "{host}:{path}"),
        }
    }
}

/// Byte and time counters of one link, shared with the threads using it.
#[derive(Debug, Default)]
pub struct LinkStats {
    read: AtomicU64,
    written: AtomicU64,
    /// Bytes of the writes that blocked (see [`write_blocked`]): the only
    /// ones that say how fast the link drains.
    blocked_bytes: AtomicU64,
    /// The rates of the last blocked writes.
    recent: Mutex<RecentRates>,
    /// Bytes written when the last blocked write ended.
    last_blocked_at: AtomicU64,
    /// The writes' pieces, for [`LinkStats::spell`] and
    /// [`LinkStats::busy_secs`].
    flow: Mutex<Flow>,
    /// The origin of `flow`'s times.
    origin: std::sync::OnceLock<Instant>,
}

/// A drain rate is reported only while writes keep blocking: after this
/// many bytes written without one blocking, the link drains faster than
/// this end writes (its compressor, or a target that was busy when the
/// rate was taken, was the bottleneck), and the old rate says nothing.
const RATE_STALE: u64 = 8 << 20;

/// Blocked bytes and writes needed before [`LinkStats::drain_rate`] answers.
const RATE_EVIDENCE: u64 = 256 << 10;
const RATE_WRITES: usize = 8;

/// The rates (bytes per second) of the last few blocked writes, in a ring.
/// Their lower quartile is the drain rate: a write that found the buffers
/// partly empty (at the start, or after the sender paused) blocked for only
/// part of its bytes and reads too fast, up to the speed of memory. Too
/// fast is the costly error, as `auto` then sends more bytes than a slow
/// link can carry; too slow (a write that waited for a descheduled ssh)
/// costs CPU at worst. An average over the whole copy would also let the
/// start of a copy weigh on its end.
#[derive(Debug, Default)]
pub(crate) struct RecentRates {
    rates: [f64; 15],
    len: usize,
    next: usize,
}

impl RecentRates {
    pub(crate) fn push(&mut self, rate: f64) {
        self.rates[self.next] = rate;
        self.next = (self.next + 1) % self.rates.len();
        self.len = (self.len + 1).min(self.rates.len());
    }

    pub(crate) fn lower_quartile(&self) -> Option<f64> {
        let mut r = self.rates[..self.len].to_vec();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 4).copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn clear(&mut self) {
        (self.len, self.next) = (0, 0);
    }
}

/// Whether a write of `bytes` that took `nanos` waited for the link rather
/// than only copying into buffers with room: longer than a fixed 250 µs
/// plus a copy at 4 GB/s. Writes into buffers with room finish far below
/// that; they say nothing about the link, and counting them made a slow
/// link look fast at the start of a copy, while ssh's and the kernel's
/// buffers (several MB) filled, and whenever the compressor was slower than
/// the link.
fn write_blocked(bytes: u64, nanos: u64) -> bool {
    nanos > 250_000 + bytes / 4
}

impl LinkStats {
    /// Every byte that crossed, both directions, framing included.
    pub fn total(&self) -> u64 {
        self.read.load(Ordering::Relaxed) + self.written.load(Ordering::Relaxed)
    }

    /// Bytes read from the peer so far.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Count `bytes` as written, without writing (tests of what reads the
    /// counters).
    #[cfg(test)]
    pub(crate) fn count_written_for_tests(&self, bytes: u64) {
        self.written.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes per second the link drained while our writes were blocked;
    /// None until enough writes blocked to tell (a link that never blocked
    /// a write is at least as fast as we wrote), and None again once
    /// [`RATE_STALE`] bytes went without a write blocking.
    pub fn drain_rate(&self) -> Option<f64> {
        let recent = self.recent.lock().unwrap();
        if self.blocked_bytes.load(Ordering::Relaxed) < RATE_EVIDENCE || recent.len < RATE_WRITES {
            return None;
        }
        if self.stale(self.written.load(Ordering::Relaxed)) {
            return None;
        }
        recent.lower_quartile()
    }

    /// Whether [`RATE_STALE`] bytes were written, up to `written`, since
    /// the last blocked write ended.
    fn stale(&self, written: u64) -> bool {
        written.saturating_sub(self.last_blocked_at.load(Ordering::Relaxed)) > RATE_STALE
    }

    /// The spell of steadily blocked writes running now (`wire::flow`),
    /// if any.
    pub fn spell(&self, now: Instant) -> Option<Spell> {
        self.flow.lock().unwrap().spell(self.ns(now))
    }

    /// Seconds the writer spent in writes so far, the running one included.
    pub fn busy_secs(&self, now: Instant) -> f64 {
        self.flow.lock().unwrap().busy_secs(self.ns(now))
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(*self.origin.get_or_init(Instant::now)).as_nanos() as u64
    }

    fn flow_begin(&self, at: Instant) {
        let at = self.ns(at);
        self.flow.lock().unwrap().begin_write(at);
    }

    fn flow_end(&self, at: Instant) {
        let at = self.ns(at);
        self.flow.lock().unwrap().end_write(at);
    }

    fn flow_piece(&self, start: Instant, end: Instant, bytes: u64) {
        let (s, e) = (self.ns(start), self.ns(end));
        self.flow.lock().unwrap().piece(s, e, bytes, write_blocked(bytes, e.saturating_sub(s)));
    }

    /// Count one write of `bytes` that took `nanos`.
    fn count_write(&self, bytes: u64, nanos: u64) {
        let before = self.written.fetch_add(bytes, Ordering::Relaxed);
        if write_blocked(bytes, nanos) {
            let mut recent = self.recent.lock().unwrap();
            let last = self.last_blocked_at.load(Ordering::Relaxed);
            if last == 0 {
                log::debug!("link: the first write to block came after {before} bytes");
            } else if self.stale(before) {
                // The rate went stale: its writes say nothing of the link
                // now either. Kept, one new blocked write would make their
                // old rate current again (a dip of a fast link read as the
                // link).
                recent.clear();
                self.blocked_bytes.store(0, Ordering::Relaxed);
            }
            self.blocked_bytes.fetch_add(bytes, Ordering::Relaxed);
            recent.push(bytes as f64 / (nanos as f64 / 1e9));
            self.last_blocked_at.store(before + bytes, Ordering::Relaxed);
        }
    }
}

struct CountingReader<R> {
    inner: R,
    stats: Arc<LinkStats>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.stats.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

struct CountingWriter<W> {
    inner: W,
    stats: Arc<LinkStats>,
    throttle: Arc<Throttle>,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = Instant::now();
        self.stats.flow_begin(t);
        // Inside the timed span: a limited link looks as slow as it is to
        // `auto`'s drain rate, which then compresses harder.
        let allowed = self.throttle.admit(buf.len());
        // In pieces, each timed for the link's flow (`wire::flow`); the
        // drain rate still takes the whole write, as before.
        let (mut n, mut piece_start) = (0, t);
        let result = loop {
            if n == allowed {
                break Ok(n);
            }
            let end = (n + flow::PIECE).min(allowed);
            match self.inner.write(&buf[n..end]) {
                Ok(0) => break Ok(n),
                Ok(k) => {
                    let now = Instant::now();
                    self.stats.flow_piece(piece_start, now, k as u64);
                    piece_start = now;
                    n += k;
                }
                // What went, went: the caller sees the error on its next write.
                Err(_) if n > 0 => break Ok(n),
                Err(e) => break Err(e),
            }
        };
        self.throttle.refund(allowed - n);
        let done = Instant::now();
        self.stats.flow_end(done);
        let n = result?;
        self.stats.count_write(n as u64, done.duration_since(t).as_nanos() as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub type Reader = Box<dyn Read + Send>;
pub type Writer = Box<dyn Write + Send>;

/// One end's view of a link: a reader, a writer and their counters.
pub struct Link {
    pub reader: Reader,
    pub writer: Writer,
    pub stats: Arc<LinkStats>,
    /// The bandwidth limit of what this end writes (none until set).
    pub throttle: Arc<Throttle>,
}

/// The process at the far end of a spawned link, if any.
pub struct Peer {
    child: Option<(Child, String)>,
    /// The child leads its own process group.
    own_group: bool,
    /// The last lines the child wrote to stderr (which are also copied to
    /// ours as they come).
    said: Arc<Mutex<String>>,
    said_done: Option<std::thread::JoinHandle<()>>,
}

/// Text from a peer or a remote command, made safe for the operator's
/// terminal: control characters (escape sequences among them) become `?`;
/// newlines and tabs stay.
pub fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_control() && c != '\n' && c != '\t' { '?' } else { c }).collect()
}

/// A far end that exited 127 did not find its program: say what to check.
fn with_hint(said: String, status: &std::process::ExitStatus) -> String {
    if status.code() == Some(127) {
        format!("{said} (is xenmig installed on the remote host? --remote-xenmig names its path there)")
    } else {
        said
    }
}

/// How much of a peer's stderr is kept for its error message.
const SAID_TAIL: usize = 2048;

const BUF: usize = 1 << 20;

impl Link {
    pub fn new(reader: impl Read + Send + 'static, writer: impl Write + Send + 'static) -> Link {
        let stats = Arc::new(LinkStats::default());
        let throttle = Arc::new(Throttle::default());
        let counting = CountingWriter { inner: writer, stats: stats.clone(), throttle: throttle.clone() };
        Link {
            reader: Box::new(BufReader::with_capacity(BUF, CountingReader { inner: reader, stats: stats.clone() })),
            writer: Box::new(BufWriter::with_capacity(BUF, counting)),
            stats,
            throttle,
        }
    }

    /// This process's stdin/stdout, for `xenmig serve`.
    pub fn stdio() -> Link {
        Link::new(io::stdin(), io::stdout())
    }

    /// Two connected ends in this process.
    pub fn pair() -> Result<(Link, Link), TransportError> {
        let (a, b) = UnixStream::pair().map_err(TransportError::Local)?;
        let a2 = a.try_clone().map_err(TransportError::Local)?;
        let b2 = b.try_clone().map_err(TransportError::Local)?;
        Ok((Link::new(a, a2), Link::new(b, b2)))
    }

    /// Run `remote_args` on `host` through `ssh_cmd` and talk to it on its
    /// stdin/stdout. An empty `ssh_cmd` runs the command here, as
    /// `xl migrate -s ""` does (useful for tests and for wrappers).
    pub fn spawn(ssh_cmd: &str, host: &str, remote_args: &[String]) -> Result<(Link, Peer), TransportError> {
        let remote = shell_words::join(remote_args);
        if !ssh_cmd.trim().is_empty() && host.starts_with('-') {
            return Err(TransportError::BadHost { host: host.to_string() });
        }
        let command = if ssh_cmd.trim().is_empty() {
            remote
        } else {
            let ssh_cmd = super::ssh_cipher::prefer_aes_gcm(ssh_cmd, host);
            format!("{ssh_cmd} {} {}", shell_words::quote(host), shell_words::quote(&remote))
        };
        let mut cmd = Command::new("sh");
        // `exec`: the child is ssh (or the local serve) itself, not a
        // wrapper whose death would leave it running.
        cmd.arg("-c")
            .arg(format!("exec {command}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group, so that abort() stops everything it
        // started; but not with a controlling terminal, where ssh must stay
        // in the foreground group to ask for a password.
        let own_group = std::fs::File::open("/dev/tty").is_err();
        if own_group {
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().map_err(|source| TransportError::Spawn { command: command.clone(), source })?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        // Pass the far end's messages on as they come (sanitized), and keep
        // the last of them for the error if it fails.
        let said = Arc::new(Mutex::new(String::new()));
        let keep = said.clone();
        let said_done = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = sanitize(&line);
                // Its final error reaches the operator once, in this end's
                // own error (from its Error frame, or from `failure`).
                if !line.starts_with("xenmig: error:") {
                    pass_on(&line);
                }
                let mut k = keep.lock().unwrap();
                k.push_str(&line);
                k.push('\n');
                if k.len() > SAID_TAIL {
                    let cut = k.len() - SAID_TAIL;
                    let cut = (cut..k.len()).find(|&i| k.is_char_boundary(i)).unwrap_or(k.len());
                    k.drain(..cut);
                }
            }
        });
        Ok((
            Link::new(stdout, stdin),
            Peer { child: Some((child, command)), own_group, said, said_done: Some(said_done) },
        ))
    }
}

impl Peer {
    /// No process: the peer is a thread of ours or the far end of stdio.
    pub fn none() -> Peer {
        Peer { child: None, own_group: false, said: Arc::default(), said_done: None }
    }

    /// After this end failed: if the far end has exited with an error (or
    /// does within `wait`), why, in its own words. Consumes nothing: the
    /// caller still closes or aborts the peer.
    pub fn failure(&mut self, wait: std::time::Duration) -> Option<TransportError> {
        let (child, _) = self.child.as_mut()?;
        let t = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if t.elapsed() < wait => std::thread::sleep(std::time::Duration::from_millis(20)),
                _ => return None,
            }
        };
        if status.success() {
            return None;
        }
        // Its stderr ends with it: let the copier finish.
        if let Some(h) = self.said_done.take() {
            let _ = h.join();
        }
        let said = with_hint(self.said.lock().unwrap().trim().to_string(), &status);
        (!said.is_empty()).then(|| TransportError::RemoteSaid { status: status.to_string(), said })
    }

    /// Wait for a spawned peer to exit (call after dropping the link).
    pub fn close(mut self) -> Result<(), TransportError> {
        if let Some((mut child, command)) = self.child.take() {
            let status = child.wait().map_err(|source| TransportError::Spawn { command: command.clone(), source })?;
            if let Some(h) = self.said_done.take() {
                let _ = h.join();
            }
            if !status.success() {
                let said = with_hint(self.said.lock().unwrap().trim().to_string(), &status);
                if !said.is_empty() {
                    return Err(TransportError::RemoteSaid { status: status.to_string(), said });
                }
                return Err(TransportError::Remote { command, status: status.to_string() });
            }
        }
        Ok(())
    }

    /// Stop a spawned peer without waiting for it to finish (on failure).
    ///
    /// The whole process group gets SIGTERM (a local `xenmig serve` then
    /// takes its error path: a frozen source is thawed), and SIGKILL if it
    /// has not exited after a few seconds.
    pub fn abort(mut self) {
        if let Some((mut child, _)) = self.child.take() {
            if !self.own_group {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            let pgid = child.id() as libc::pid_t;
            // SAFETY: kill(2) on the process group the child leads; the
            // child is not reaped yet, so the group id is still ours.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < std::time::Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    // The leader is gone; stragglers of its group too.
                    // SAFETY: as above; a group without members is ESRCH.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            // SAFETY: as above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {

    /// Only writes that waited for the link say how fast it drains; writes
    /// into buffers with room (a slow link's first megabytes) do not.
    #[test]
    fn drain_rate_counts_only_blocked_writes() {
        let s = LinkStats::default();
        for _ in 0..64 {
            s.count_write(64 << 10, 20_000); // 64 KiB in 20 µs: buffered
        }
        assert_eq!(s.written(), 4 << 20);
        assert_eq!(s.drain_rate(), None, "buffered writes made up a rate");
        // The first blocked writes found the buffers partly empty and read
        // faster than the link; then the link drains 64 KiB per 50 ms.
        s.count_write(64 << 10, 300_000);
        s.count_write(64 << 10, 5_000_000);
        for _ in 0..6 {
            s.count_write(64 << 10, 50_000_000); // 64 KiB in 50 ms: blocked
        }
        let r = s.drain_rate().expect("512 KiB of blocked writes");
        assert!((r - (64 << 10) as f64 / 0.05).abs() < 1.0, "rate {r}");
        assert_eq!(s.written(), (4 << 20) + (512 << 10));
        // The link slows down: the rate follows within a few writes.
        for _ in 0..15 {
            s.count_write(64 << 10, 100_000_000);
        }
        let r = s.drain_rate().unwrap();
        assert!((r - (64 << 10) as f64 / 0.1).abs() < 1.0, "rate {r}");
        // Then the writes stop blocking (our compressor became slower than
        // the link): after 8 MiB the old rate is no longer reported...
        for _ in 0..128 {
            s.count_write(64 << 10, 20_000);
        }
        assert!(s.drain_rate().is_some(), "exactly 8 MiB is not past it");
        s.count_write(64 << 10, 20_000);
        assert_eq!(s.drain_rate(), None, "a stale rate");
        // ...nor made current again by one write that blocks: the rate
        // starts over, from new writes only.
        s.count_write(64 << 10, 100_000_000);
        assert_eq!(s.drain_rate(), None, "the stale writes made a rate of one new one");
        for _ in 0..7 {
            s.count_write(64 << 10, 20_000_000);
        }
        let r = s.drain_rate().expect("8 new blocked writes, 512 KiB");
        assert!((r - (64 << 10) as f64 / 0.02).abs() < 1.0, "rate {r}: the stale writes counted");
    }
    use super::*;

    #[test]
    fn locations_parse_like_scp() {
        assert_eq!(Location::parse("disk.img"), Location::Local("disk.img".into()));
        assert_eq!(Location::parse("/dev/vg0/a:b"), Location::Local("/dev/vg0/a:b".into()));
        assert_eq!(Location::parse("./x:y"), Location::Local("./x:y".into()));
        assert_eq!(
            Location::parse("root@h2:/dev/vg0/guest"),
            Location::Remote { host: "root@h2".into(), path: "/dev/vg0/guest".into() }
        );
        assert!(Location::parse("h:img").is_remote());
    }

    #[test]
    fn pair_counts_both_directions() {
        let (mut a, mut b) = Link::pair().unwrap();
        a.writer.write_all(b"hello").unwrap();
        a.writer.flush().unwrap();
        let mut buf = [0u8; 5];
        b.reader.read_exact(&mut buf).unwrap();
        b.writer.write_all(b"hi").unwrap();
        b.writer.flush().unwrap();
        let mut buf2 = [0u8; 2];
        a.reader.read_exact(&mut buf2).unwrap();
        assert_eq!(a.stats.total(), 7);
        assert_eq!(b.stats.total(), 7);
    }

    #[test]
    fn hosts_that_look_like_ssh_options_are_refused() {
        let e = Link::spawn("ssh", "-oProxyCommand=touch /tmp/x", &["xenmig".into()]).err().expect("refused");
        assert!(matches!(e, TransportError::BadHost { .. }), "{e}");
    }

    #[test]
    fn abort_stops_the_whole_remote_command() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let (link, peer) = Link::spawn("", "unused", &["sh".into(), "-c".into(), script]).unwrap();
        let t = Instant::now();
        while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
            assert!(t.elapsed().as_secs() < 5, "the remote command did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        peer.abort();
        drop(link);
        std::thread::sleep(std::time::Duration::from_millis(200));
        // Gone, or a zombie waiting for a reaper that is not ours.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let alive = stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')) && !stat.is_empty();
        assert!(!alive, "the remote command's child {pid} survived abort()");
    }

    #[test]
    fn spawned_peer_failure_is_reported() {
        let (link, peer) = Link::spawn("", "unused", &["sh".into(), "-c".into(), "exit 3".into()]).unwrap();
        drop(link);
        let e = peer.close().unwrap_err().to_string();
        assert!(e.contains("exit status: 3"), "{e}");
    }
}

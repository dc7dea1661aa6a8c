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
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("cannot start '{command}': {source}")]
    Spawn { command: String, source: io::Error },
    #[error("cannot set up a local link: {0}")]
    Local(io::Error),
    #[error("the remote command '{command}' failed: {status}")]
    Remote { command: String, status: String },
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
    write_nanos: AtomicU64,
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

    /// Bytes per second the link drained while our writes were blocked;
    /// None until enough has been written to tell.
    pub fn drain_rate(&self) -> Option<f64> {
        let bytes = self.written.load(Ordering::Relaxed);
        let nanos = self.write_nanos.load(Ordering::Relaxed);
        if bytes < (1 << 20) || nanos == 0 {
            return None;
        }
        Some(bytes as f64 / (nanos as f64 / 1e9))
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
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = Instant::now();
        let n = self.inner.write(buf)?;
        self.stats.written.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.write_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
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
}

/// The process at the far end of a spawned link, if any.
pub struct Peer {
    child: Option<(Child, String)>,
}

const BUF: usize = 1 << 20;

impl Link {
    pub fn new(reader: impl Read + Send + 'static, writer: impl Write + Send + 'static) -> Link {
        let stats = Arc::new(LinkStats::default());
        Link {
            reader: Box::new(BufReader::with_capacity(BUF, CountingReader { inner: reader, stats: stats.clone() })),
            writer: Box::new(BufWriter::with_capacity(BUF, CountingWriter { inner: writer, stats: stats.clone() })),
            stats,
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
        let command = if ssh_cmd.trim().is_empty() {
            remote
        } else {
            format!("{ssh_cmd} {} {}", shell_words::quote(host), shell_words::quote(&remote))
        };
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| TransportError::Spawn { command: command.clone(), source })?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        Ok((Link::new(stdout, stdin), Peer { child: Some((child, command)) }))
    }
}

impl Peer {
    /// No process: the peer is a thread of ours or the far end of stdio.
    pub fn none() -> Peer {
        Peer { child: None }
    }

    /// Wait for a spawned peer to exit (call after dropping the link).
    pub fn close(self) -> Result<(), TransportError> {
        if let Some((mut child, command)) = self.child {
            let status = child.wait().map_err(|source| TransportError::Spawn { command: command.clone(), source })?;
            if !status.success() {
                return Err(TransportError::Remote { command, status: status.to_string() });
            }
        }
        Ok(())
    }

    /// Stop a spawned peer without waiting for it to finish (on failure).
    pub fn abort(self) {
        if let Some((mut child, _)) = self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
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
    fn spawned_peer_failure_is_reported() {
        let (link, peer) = Link::spawn("", "unused", &["sh".into(), "-c".into(), "exit 3".into()]).unwrap();
        drop(link);
        let e = peer.close().unwrap_err().to_string();
        assert!(e.contains("exit status: 3"), "{e}");
    }
}

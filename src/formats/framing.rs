//! Shared framing of xenmig's persisted binary files (hash files, indexes).
//!
//! Every file is: an 8-byte magic naming its kind, the format version as
//! two bytes `major, minor`, the body, and a 32-byte BLAKE3 checksum of
//! everything before it. The checksum is what turns a truncated or damaged
//! file into a clear error instead of wrong digests.
//!
//! Versioning rule (as firecracker's snapshots): a reader refuses a newer
//! major, with a message saying so; it reads every minor of its own major. A
//! minor release may only append fields at the end of the body, which older
//! readers of that major skip. Files written before this rule had a `u16`
//! version 1, whose little-endian bytes read as 1.0.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::blocks::digest::{Algorithm, Digest};
use crate::blocks::layout::{Layout, Segment};

const TRAILER: usize = 32;

/// A persisted format's version: `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FormatVersion {
    pub major: u8,
    pub minor: u8,
}

impl FormatVersion {
    pub const fn new(major: u8, minor: u8) -> FormatVersion {
        FormatVersion { major, minor }
    }
}

impl std::fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[derive(Debug, Error)]
pub enum FormatError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a xenmig {kind} file (bad magic)")]
    Magic { path: PathBuf, kind: &'static str },
    #[error(
        "{path} is format {found}.{found_minor}; this xenmig reads {known}.x (written by a newer xenmig: upgrade)"
    )]
    Version { path: PathBuf, found: u8, found_minor: u8, known: u8 },
    #[error("{path} is truncated or corrupt (checksum mismatch)")]
    Checksum { path: PathBuf },
    #[error("{path} is malformed: {what}")]
    Malformed { path: PathBuf, what: String },
}

/// Builds a file body in memory, then writes it atomically with its checksum.
pub struct FileWriter {
    buf: Vec<u8>,
    mode: u32,
}

/// An unpredictable name for a temporary file next to `path`.
fn temp_name(path: &Path) -> PathBuf {
    use std::io::Read;
    let mut r = [0u8; 12];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut r));
    if random.is_err() {
        // No /dev/urandom: still unique, if guessable; O_EXCL|O_NOFOLLOW
        // keeps it safe.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        r[..8].copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
        r[8..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let base = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    dir.join(format!(".{base}.{hex}.tmp"))
}

impl FileWriter {
    pub fn new(magic: &[u8; 8], version: FormatVersion) -> Self {
        let mut buf = Vec::new();
        buf.extend_from_slice(magic);
        buf.extend_from_slice(&[version.major, version.minor]);
        FileWriter { buf, mode: 0o600 }
    }
    /// Permission bits of the file written (before the umask); 0600 unless
    /// set, e.g. to those of the image it describes.
    pub fn mode(&mut self, mode: u32) {
        self.mode = mode & 0o777;
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    pub fn layout(&mut self, l: &Layout) {
        self.u64(l.size);
        self.u32(l.block_size);
        self.u32(l.segments.len() as u32);
        for s in &l.segments {
            self.u64(s.start);
            self.u64(s.len);
        }
    }
    /// Write to `path` through a temporary file and rename, so that a crash
    /// never leaves a half-written file under the final name. The temporary
    /// has an unpredictable name in the same directory and is created with
    /// `O_EXCL|O_NOFOLLOW`: a file or symlink planted there is never
    /// written through.
    pub fn finish(mut self, path: &Path) -> Result<(), FormatError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let sum = blake3::hash(&self.buf);
        self.buf.extend_from_slice(sum.as_bytes());
        let werr = |source| FormatError::Write { path: path.into(), source };
        let mut tries = 0;
        let (tmp, mut file) = loop {
            let tmp = temp_name(path);
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .mode(self.mode)
                .open(&tmp);
            match opened {
                Ok(f) => break (tmp, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
                Err(e) => return Err(werr(e)),
            }
        };
        let written = file.write_all(&self.buf).and_then(|_| file.sync_all()).and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(werr(e));
        }
        Ok(())
    }
}

/// Reads a checked file body; every read is bounds-checked.
pub struct FileReader {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    path: PathBuf,
    /// A newer minor than the reader knows: fields may follow what it reads.
    newer_minor: bool,
}

impl FileReader {
    pub fn open(
        path: &Path,
        magic: &[u8; 8],
        kind: &'static str,
        known: FormatVersion,
    ) -> Result<(Self, FormatVersion), FormatError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let ioerr = |source| FormatError::Io { path: path.into(), source };
        // O_NONBLOCK: a FIFO planted under the name must not block the open;
        // anything but a regular file is refused before reading.
        let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(ioerr)?;
        if !f.metadata().map_err(ioerr)?.is_file() {
            return Err(FormatError::Malformed { path: path.into(), what: "not a regular file".into() });
        }
        // The magic first: a large file of another kind is refused without
        // being read whole.
        let mut buf = vec![0u8; 8];
        let mut got = 0;
        while got < 8 {
            match f.read(&mut buf[got..]).map_err(ioerr)? {
                0 => break,
                n => got += n,
            }
        }
        if got < 8 || &buf[..8] != magic {
            return Err(FormatError::Magic { path: path.into(), kind });
        }
        f.read_to_end(&mut buf).map_err(ioerr)?;
        if buf.len() < 10 + TRAILER {
            return Err(FormatError::Checksum { path: path.into() });
        }
        let version = FormatVersion::new(buf[8], buf[9]);
        if version.major != known.major {
            return Err(FormatError::Version {
                path: path.into(),
                found: version.major,
                found_minor: version.minor,
                known: known.major,
            });
        }
        let end = buf.len() - TRAILER;
        if blake3::hash(&buf[..end]).as_bytes() != &buf[end..] {
            return Err(FormatError::Checksum { path: path.into() });
        }
        let newer_minor = version.minor > known.minor;
        Ok((FileReader { buf, pos: 10, end, path: path.into(), newer_minor }, version))
    }

    pub fn malformed(&self, what: impl Into<String>) -> FormatError {
        FormatError::Malformed { path: self.path.clone(), what: what.into() }
    }

    pub fn take(&mut self, n: usize) -> Result<&[u8], FormatError> {
        if self.end - self.pos < n {
            return Err(self.malformed(format!("ends early at byte {}", self.pos)));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn digest(&mut self) -> Result<Digest, FormatError> {
        Ok(self.take(32)?.try_into().unwrap())
    }
    pub fn algo(&mut self) -> Result<Algorithm, FormatError> {
        let c = self.u8()?;
        Algorithm::from_code(c).ok_or_else(|| self.malformed(format!("unknown digest algorithm code {c}")))
    }
    /// A count of items of `item_len` bytes each, checked against what is
    /// left so that a corrupt count cannot make us allocate terabytes.
    pub fn count(&mut self, item_len: usize) -> Result<usize, FormatError> {
        let n = self.u64()?;
        if n.saturating_mul(item_len as u64) > (self.end - self.pos) as u64 {
            return Err(self.malformed(format!("claims {n} entries, more than the file holds")));
        }
        Ok(n as usize)
    }
    pub fn layout(&mut self) -> Result<Layout, FormatError> {
        let size = self.u64()?;
        let bs = self.u32()?;
        let n = self.u32()? as usize;
        if n.saturating_mul(16) > self.end - self.pos {
            return Err(self.malformed("segment table larger than the file"));
        }
        let mut segs = Vec::with_capacity(n);
        for _ in 0..n {
            segs.push(Segment { start: self.u64()?, len: self.u64()? });
        }
        Layout::from_segments(size, bs, segs).map_err(|e| self.malformed(e))
    }
    pub fn done(&self) -> Result<(), FormatError> {
        if self.pos != self.end && !self.newer_minor {
            return Err(self.malformed(format!("{} unexpected trailing bytes", self.end - self.pos)));
        }
        Ok(())
    }
}

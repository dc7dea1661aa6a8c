//! Disk images: regular files or block devices, read and written by offset.
//!
//! Block devices report their size through `BLKGETSIZE64`, never through
//! `stat`, and are never grown or truncated. Regular files written as
//! targets are sized to the source and stay sparse where blocks are zero.
//! Reads and writes go through the [`Disk`] trait, whose provided methods
//! hold the rules every disk follows (short transfers, range checks).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};

use super::disk::Disk;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
    #[error("cannot read {path} at offset {offset}: {source}")]
    Read { path: PathBuf, offset: u64, source: io::Error },
    #[error("{path} ended at offset {offset}, before the {size} bytes it had when opened (did it shrink?)")]
    Short { path: PathBuf, offset: u64, size: u64 },
    #[error("cannot write {path} at offset {offset}: {source}")]
    Write { path: PathBuf, offset: u64, source: io::Error },
    #[error("target block device {path} holds {have} bytes, smaller than the {need}-byte source; nothing was written")]
    TooSmall { path: PathBuf, have: u64, need: u64 },
    #[error("cannot size {path} to {size} bytes: {source}")]
    Resize { path: PathBuf, size: u64, source: io::Error },
    #[error("cannot flush {path} to stable storage: {source}")]
    Sync { path: PathBuf, source: io::Error },
    #[error("target block device {path} is in use{}; refusing to write to it", holder.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Busy { path: PathBuf, holder: Option<String> },
    #[error("cannot stat {path}: {source}")]
    Stat { path: PathBuf, source: io::Error },
    #[error("cannot write {len} bytes at offset {offset} of {path}, which holds {size}")]
    OutOfRange { path: PathBuf, offset: u64, len: u64, size: u64 },
}

/// Who holds block device `rdev` (as `st_rdev`): the mount points of it
/// (from /proc/self/mountinfo) and its holders in sysfs (device-mapper
/// devices stacked on it, by name). None when nothing is found.
pub fn device_holders(rdev: u64) -> Option<String> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let id = format!("{major}:{minor}");
    let mut found = Vec::new();
    if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in info.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() > 4 && f[2] == id {
                found.push(format!("mounted on {}", unescape_mountinfo(f[4])));
            }
        }
    }
    let holders = PathBuf::from(format!("/sys/dev/block/{id}/holders"));
    if let Ok(dir) = std::fs::read_dir(&holders) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let dm = std::fs::read_to_string(holders.join(&name).join("dm/name")).ok();
            match dm {
                Some(dm) => found.push(format!("held by {name} ({})", dm.trim())),
                None => found.push(format!("held by {name}")),
            }
        }
    }
    (!found.is_empty()).then(|| found.join(", "))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What tells whether an open image changed: its size and, for a regular
/// file, its modification time (a block device has none worth reading).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub size: u64,
    /// Seconds and nanoseconds.
    pub modified: Option<(i64, i64)>,
}

impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.size)?;
        if let Some((s, ns)) = self.modified {
            write!(f, ", modified at {s}.{ns:09}")?;
        }
        Ok(())
    }
}

/// An open image.
#[derive(Debug)]
pub struct Image {
    file: File,
    path: PathBuf,
    size: u64,
    is_block_device: bool,
}

nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);

fn device_size(file: &File) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live local.
    unsafe { blk_getsize64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

fn probe(file: File, path: &Path) -> Result<Image, ImageError> {
    let meta = file.metadata().map_err(|source| ImageError::Open { path: path.into(), source })?;
    let ft = meta.file_type();
    let (size, is_block_device) = if ft.is_block_device() {
        let size = device_size(&file).map_err(|source| ImageError::Open { path: path.into(), source })?;
        (size, true)
    } else if ft.is_file() {
        (meta.len(), false)
    } else {
        return Err(ImageError::NotADisk { path: path.into() });
    };
    Ok(Image { file, path: path.into(), size, is_block_device })
}

impl Image {
    /// Open an image read-only: sources and references are only ever read.
    /// Opened with `O_NONBLOCK`, so that a FIFO (or another special file)
    /// is refused as [`ImageError::NotADisk`] instead of blocking the open;
    /// the flag is cleared once the file is known to be a disk.
    pub fn open_read(path: &Path) -> Result<Image, ImageError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| ImageError::Open { path: path.into(), source })?;
        let img = probe(file, path)?;
        nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&img.file),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(|e| ImageError::Open { path: path.into(), source: e.into() })?;
        img.drop_cache();
        Ok(img)
    }

    /// Forget this process's host's cached pages of a block device, so that
    /// the next reads come from the device. A Xen guest's disk is written by
    /// blkback underneath dom0's page cache: a dom0 read through the cache
    /// can return what the disk held before the guest wrote it (seen in the
    /// lab: a live copy found no changes). Clean pages only are dropped, and
    /// a regular file's cache is always current, so it is left alone.
    pub fn drop_cache(&self) {
        if self.is_block_device {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain advisory call on an open descriptor.
            let r = unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if r != 0 {
                log::warn!("cannot drop the page cache of {}: error {r}", self.path.display());
            }
        }
    }

    /// Open (or create) a target for a `size`-byte image. A block device
    /// must already be large enough; a regular file is set to `size` bytes,
    /// keeping whatever it held before so that it can serve as a reference.
    /// Returns the image and whether it held data before (false for a file
    /// created now).
    ///
    /// A block device is opened exclusively (`O_EXCL`): one that is mounted
    /// or claimed by another holder (device-mapper, md, another exclusive
    /// opener) is refused with [`ImageError::Busy`], naming the holder where
    /// it can be found. A file created now gets permission bits `mode`
    /// (before the umask).
    pub fn open_target(path: &Path, size: u64) -> Result<(Image, bool), ImageError> {
        Self::open_target_mode(path, size, 0o666)
    }

    /// [`open_target`](Self::open_target), creating a new file with `mode`.
    pub fn open_target_mode(path: &Path, size: u64, mode: u32) -> Result<(Image, bool), ImageError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let existing = std::fs::metadata(path).ok();
        let existed = existing.is_some();
        let file = match existing {
            Some(m) if m.file_type().is_block_device() => {
                OpenOptions::new().read(true).write(true).custom_flags(libc::O_EXCL).open(path).map_err(|source| {
                    if source.raw_os_error() == Some(libc::EBUSY) {
                        ImageError::Busy { path: path.into(), holder: device_holders(m.rdev()) }
                    } else {
                        ImageError::Open { path: path.into(), source }
                    }
                })?
            }
            _ => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(mode)
                .open(path)
                .map_err(|source| ImageError::Open { path: path.into(), source })?,
        };
        let mut img = probe(file, path)?;
        if img.is_block_device {
            if img.size < size {
                return Err(ImageError::TooSmall { path: path.into(), have: img.size, need: size });
            }
        } else if img.size != size {
            img.file.set_len(size).map_err(|source| ImageError::Resize { path: path.into(), size, source })?;
            img.size = size;
        }
        let had_data = existed && (img.is_block_device || img.file.metadata().map(|m| m.len() > 0).unwrap_or(false));
        Ok((img, had_data))
    }

    /// The same open file again (its own handle), for a reader on another
    /// thread.
    pub fn try_clone(&self) -> Result<Image, ImageError> {
        let file = self.file.try_clone().map_err(|source| ImageError::Open { path: self.path.clone(), source })?;
        Ok(Image { file, path: self.path.clone(), size: self.size, is_block_device: self.is_block_device })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// The image's [`Stamp`] now, read from the open descriptor (not the
    /// path, which may name another file by now).
    pub fn stamp(&self) -> Result<Stamp, ImageError> {
        use std::os::unix::fs::MetadataExt;
        let stat_err = |source| ImageError::Stat { path: self.path.clone(), source };
        if self.is_block_device {
            return Ok(Stamp { size: device_size(&self.file).map_err(stat_err)?, modified: None });
        }
        let m = self.file.metadata().map_err(stat_err)?;
        Ok(Stamp { size: m.len(), modified: Some((m.mtime(), m.mtime_nsec())) })
    }
}

impl Disk for Image {
    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.file.write_at(buf, offset)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        if self.is_block_device {
            return Ok(false);
        }
        use std::os::fd::AsRawFd;
        let (off, len) = match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Ok(false),
        };
        // SAFETY: fallocate on an open descriptor with plain integer
        // arguments; no memory is passed.
        let r = unsafe {
            libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len)
        };
        if r == 0 {
            Ok(true)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn drop_cache(&self) {
        Image::drop_cache(self)
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(len)) = (libc::off64_t::try_from(offset), libc::off64_t::try_from(len)) else { return };
        // SAFETY: a plain call on an open descriptor with integer arguments;
        // no memory is passed.
        let r = unsafe {
            libc::sync_file_range(std::os::fd::AsRawFd::as_raw_fd(&self.file), off, len, libc::SYNC_FILE_RANGE_WRITE)
        };
        if r != 0 {
            // Only a hint: the final fsync reports what matters.
            log::debug!(
                "cannot start writeback of {} at {offset}+{len}: {}",
                self.path.display(),
                io::Error::last_os_error()
            );
        }
    }

    fn evict(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else { return };
        if let Err(e) = nix::fcntl::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&self.file),
            off,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        ) {
            log::warn!("cannot drop the page cache of {} at {offset}+{len}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_file_is_sized_and_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.img");
        let (img, had) = Image::open_target(&p, 1 << 20).unwrap();
        assert!(!had);
        assert_eq!(img.size(), 1 << 20);
        img.write_at(&[7u8; 4096], 8192).unwrap();
        img.zero_range(8192, 4096).unwrap();
        let mut b = [1u8; 4096];
        img.read_at(&mut b, 8192).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let (_, had) = Image::open_target(&p, 1 << 20).unwrap();
        assert!(had);
    }

    #[test]
    fn short_reads_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.img");
        std::fs::write(&p, [0u8; 100]).unwrap();
        let img = Image::open_read(&p).unwrap();
        let mut b = [0u8; 200];
        let e = img.read_at(&mut b, 0).unwrap_err().to_string();
        assert!(e.contains("s.img") && e.contains("offset 100"), "{e}");
    }

    #[test]
    fn writes_past_the_end_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (img, _) = Image::open_target(&dir.path().join("t.img"), 8192).unwrap();
        assert!(img.write_at(&[1u8; 4096], 4096).is_ok());
        assert!(matches!(img.write_at(&[1u8; 4096], 4097), Err(ImageError::OutOfRange { .. })));
        assert!(matches!(img.write_at(&[1u8; 2], u64::MAX), Err(ImageError::OutOfRange { .. })));
        assert!(matches!(img.zero_range(u64::MAX - 10, 4096), Err(ImageError::OutOfRange { .. })));
        assert_eq!(std::fs::metadata(dir.path().join("t.img")).unwrap().len(), 8192);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn fifos_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let q = p.clone();
        std::thread::spawn(move || {
            let _ = tx.send(Image::open_read(&q).map(|_| ()));
        });
        let r = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("opening a FIFO blocked");
        let e = r.unwrap_err();
        assert!(matches!(e, ImageError::NotADisk { .. }), "{e}");
        assert!(e.to_string().contains("fifo"), "{e}");
    }

    #[test]
    fn directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = Image::open_read(dir.path()).unwrap_err();
        assert!(matches!(e, ImageError::NotADisk { .. }));
    }
}

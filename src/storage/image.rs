//! Disk images: regular files or block devices, read and written by offset.
//!
//! Block devices report their size through `BLKGETSIZE64`, never through
//! `stat`, and are never grown or truncated. Regular files written as
//! targets are sized to the source and stay sparse where blocks are zero.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
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
    pub fn open_read(path: &Path) -> Result<Image, ImageError> {
        let file = File::open(path).map_err(|source| ImageError::Open { path: path.into(), source })?;
        let img = probe(file, path)?;
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
    pub fn open_target(path: &Path, size: u64) -> Result<(Image, bool), ImageError> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| ImageError::Open { path: path.into(), source })?;
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

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(ImageError::Short {
                        path: self.path.clone(),
                        offset: offset + done as u64,
                        size: self.size,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(ImageError::Read { path: self.path.clone(), offset, source }),
            }
        }
        Ok(())
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.file.write_all_at(buf, offset).map_err(|source| ImageError::Write {
            path: self.path.clone(),
            offset,
            source,
        })
    }

    /// Make `[offset, offset+len)` read as zeros: a hole in a file, written
    /// zeros on a device (discard is not guaranteed to read back as zero).
    pub fn zero_range(&self, offset: u64, len: usize) -> Result<(), ImageError> {
        if !self.is_block_device {
            use std::os::fd::AsRawFd;
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
        }
        self.write_at(&vec![0u8; len], offset)
    }

    pub fn sync(&self) -> Result<(), ImageError> {
        self.file.sync_all().map_err(|source| ImageError::Sync { path: self.path.clone(), source })
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
    fn directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = Image::open_read(dir.path()).unwrap_err();
        assert!(matches!(e, ImageError::NotADisk { .. }));
    }
}

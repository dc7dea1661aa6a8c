//! What the copy engine needs of a disk: positioned reads and writes, zeroing,
//! flushing. [`Image`](super::image::Image) is the real one (files and block
//! devices); [`FaultyDisk`](super::faulty::FaultyDisk) is a test double that
//! injects errors, short transfers and silently changed writes.
//!
//! A trait rather than an enum with a test variant: the double wraps any
//! disk (a real file underneath, so what it lets through is really written),
//! and the engine's code paths carry no test arm. The rules that must hold
//! for every disk live here once, as provided methods built on one-syscall
//! primitives: reads and writes loop over short transfers, a write never
//! reaches past the image, a read that ends early is an error naming where.

use std::io;
use std::path::Path;

use super::image::ImageError;

pub trait Disk: Send + Sync + std::fmt::Debug {
    fn path(&self) -> &Path;
    /// Size in bytes (fixed while the disk is open).
    fn size(&self) -> u64;
    fn is_block_device(&self) -> bool;
    /// One positioned read, as pread(2): may return fewer bytes than asked,
    /// 0 at the end.
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// One positioned write, as pwrite(2): may write fewer bytes than given.
    fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// Deallocate `[offset, offset+len)` so that it reads as zeros.
    /// Ok(false): this disk cannot (a device, where a discard is not
    /// guaranteed to read back as zero).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool>;
    /// Flush to stable storage (fsync).
    fn flush(&self) -> io::Result<()>;
    /// Forget cached pages so that later reads come from the device (see
    /// [`Image::drop_cache`](super::image::Image::drop_cache)).
    fn drop_cache(&self);
    /// Drop the clean cached pages of `[offset, offset+len)`, of a file or
    /// a device alike, so that the next read of it comes from the storage
    /// (the target's read-back, after an fsync made the range clean).
    fn evict(&self, offset: u64, len: u64);
    /// Start writing `[offset, offset+len)` back to storage now, without
    /// waiting for it: a copy that writes a whole disk overlaps that I/O
    /// with the rest of its work, and its final fsync has less left to do.
    /// A hint only (the fsync is what makes the data durable); the default
    /// does nothing.
    fn start_writeback(&self, _offset: u64, _len: u64) {}

    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        let mut done = 0;
        while done < buf.len() {
            match self.pread(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(ImageError::Short {
                        path: self.path().into(),
                        offset: offset + done as u64,
                        size: self.size(),
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(ImageError::Read { path: self.path().into(), offset, source }),
            }
        }
        Ok(())
    }

    /// Write all of `buf` at `offset`, which must lie inside the image.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        check_range(self, offset, buf.len() as u64)?;
        let mut done = 0;
        while done < buf.len() {
            match self.pwrite(&buf[done..], offset + done as u64) {
                Ok(0) => {
                    let source = io::Error::new(io::ErrorKind::WriteZero, "the device accepted no more bytes");
                    return Err(ImageError::Write { path: self.path().into(), offset, source });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(ImageError::Write { path: self.path().into(), offset, source }),
            }
        }
        Ok(())
    }

    /// Make `[offset, offset+len)` read as zeros: a hole where the disk can
    /// punch one, written zeros otherwise.
    fn zero_range(&self, offset: u64, len: usize) -> Result<(), ImageError> {
        check_range(self, offset, len as u64)?;
        if let Ok(true) = self.punch_hole(offset, len as u64) {
            return Ok(());
        }
        self.write_at(&vec![0u8; len], offset)
    }

    fn sync(&self) -> Result<(), ImageError> {
        self.flush().map_err(|source| ImageError::Sync { path: self.path().into(), source })
    }
}

/// Refuse a write that would reach past the image's size.
fn check_range<D: Disk + ?Sized>(d: &D, offset: u64, len: u64) -> Result<(), ImageError> {
    match offset.checked_add(len) {
        Some(end) if end <= d.size() => Ok(()),
        _ => Err(ImageError::OutOfRange { path: d.path().into(), offset, len, size: d.size() }),
    }
}

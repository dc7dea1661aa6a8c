//! Reading a device-mapper snapshot's exception table: which chunks of the
//! origin were written since the snapshot was taken (the idea of lvmsync).
//!
//! A persistent snapshot's COW device starts with a header chunk
//! (`magic "SnAp"`, `valid`, `version` 1, chunk size in 512-byte sectors),
//! followed by metadata areas, each one chunk of little-endian
//! `(old_chunk u64, new_chunk u64)` pairs, and each followed by the data
//! chunks it describes: area `i` sits at chunk `1 + i * (per_area + 1)`,
//! where `per_area = chunk_bytes / 16`. A pair with `new_chunk == 0` ends
//! the table. `old_chunk` is the origin chunk that was written.
//!
//! The COW device is read with O_DIRECT: the kernel writes the table below
//! the page cache, so a cached read could miss the newest exceptions.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

const MAGIC: u32 = 0x7041_6e53;
const ALIGN: usize = 4096;

#[derive(Debug, Error)]
pub enum DmSnapError {
    #[error("cannot read the snapshot exception store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a persistent snapshot exception store ({what})")]
    Format { path: PathBuf, what: String },
}

/// Origin chunks written since the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExceptionTable {
    pub chunk_bytes: u64,
    /// False once the snapshot overflowed: the list is then incomplete and
    /// must not be trusted.
    pub valid: bool,
    pub old_chunks: Vec<u64>,
}

impl ExceptionTable {
    /// Byte ranges of the origin the exceptions cover.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.old_chunks.iter().map(|&c| (c * self.chunk_bytes, (c + 1) * self.chunk_bytes))
    }
}

/// Parse a table, reading chunks through `read(chunk_index, buf)`.
pub fn parse(
    path: &Path,
    mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> Result<ExceptionTable, DmSnapError> {
    let io_err = |source| DmSnapError::Io { path: path.into(), source };
    let bad = |what: String| DmSnapError::Format { path: path.into(), what };
    let mut head = vec![0u8; ALIGN];
    read(0, &mut head).map_err(io_err)?;
    let word = |b: &[u8], i: usize| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
    if word(&head, 0) != MAGIC {
        return Err(bad(format!("magic {:#x}", word(&head, 0))));
    }
    let (valid, version, sectors) = (word(&head, 1), word(&head, 2), word(&head, 3));
    if version != 1 {
        return Err(bad(format!("version {version}")));
    }
    let chunk_bytes = sectors as u64 * 512;
    if !chunk_bytes.is_power_of_two() || !(4096..=512 << 20).contains(&chunk_bytes) {
        return Err(bad(format!("chunk size of {sectors} sectors")));
    }
    let per_area = chunk_bytes / 16;
    let mut area = vec![0u8; chunk_bytes as usize];
    let mut old_chunks = Vec::new();
    for i in 0.. {
        read(1 + i * (per_area + 1), &mut area).map_err(io_err)?;
        for e in area.chunks_exact(16) {
            let old = u64::from_le_bytes(e[..8].try_into().unwrap());
            let new = u64::from_le_bytes(e[8..].try_into().unwrap());
            if new == 0 {
                return Ok(ExceptionTable { chunk_bytes, valid: valid != 0, old_chunks });
            }
            old_chunks.push(old);
        }
    }
    unreachable!("the loop returns at the end marker or on a read error")
}

/// A buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = Layout::from_size_align(len.max(ALIGN), ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, layout }
    }
    fn as_mut(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() >= len bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Read the exception table of the COW device at `path` (for an LVM
/// snapshot `vg/snap`: `/dev/mapper/vg-snap-cow`).
pub fn read_cow_device(path: &Path) -> Result<ExceptionTable, DmSnapError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|source| DmSnapError::Io { path: path.into(), source })?;
    // The header names the chunk size; until then read in 4 KiB units.
    let mut chunk_bytes = ALIGN as u64;
    let mut buf = Aligned::new(ALIGN);
    parse(path, |chunk, out| {
        if chunk == 0 {
            let b = buf.as_mut(ALIGN);
            file.read_exact_at(b, 0)?;
            out[..ALIGN].copy_from_slice(b);
            chunk_bytes = u32::from_le_bytes(b[12..16].try_into().unwrap()) as u64 * 512;
            buf = Aligned::new(chunk_bytes as usize);
            return Ok(());
        }
        let b = buf.as_mut(out.len());
        file.read_exact_at(b, chunk * chunk_bytes)?;
        out.copy_from_slice(b);
        Ok(())
    })
}

/// A persistent exception store as dm-snapshot lays it out: the header,
/// then areas of exceptions (`chunk_bytes / 16` each) followed by their
/// data chunks, here left zero. For tests and fake LVM commands: `old`
/// are the origin chunks that were written, in order; `valid` 0 marks an
/// overflowed snapshot.
pub fn encode_store(chunk_bytes: usize, valid: u32, old: &[u64]) -> Vec<u8> {
    let per_area = chunk_bytes / 16;
    let areas = old.len() / per_area + 1;
    let mut s = vec![0u8; chunk_bytes * (1 + areas * (per_area + 1))];
    s[..4].copy_from_slice(&MAGIC.to_le_bytes());
    s[4..8].copy_from_slice(&valid.to_le_bytes());
    s[8..12].copy_from_slice(&1u32.to_le_bytes());
    s[12..16].copy_from_slice(&((chunk_bytes / 512) as u32).to_le_bytes());
    for (n, &o) in old.iter().enumerate() {
        let (area, slot) = (n / per_area, n % per_area);
        let at = chunk_bytes * (1 + area * (per_area + 1)) + 16 * slot;
        let new_chunk = (2 + area * (per_area + 1) + slot) as u64;
        s[at..at + 8].copy_from_slice(&o.to_le_bytes());
        s[at + 8..at + 16].copy_from_slice(&new_chunk.to_le_bytes());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_bytes(s: &[u8]) -> Result<ExceptionTable, DmSnapError> {
        let cb = u32::from_le_bytes(s[12..16].try_into().unwrap()) as usize * 512;
        parse(Path::new("cow"), |chunk, out| {
            let at = if chunk == 0 { 0 } else { chunk as usize * cb };
            out.copy_from_slice(&s[at..at + out.len()]);
            Ok(())
        })
    }

    #[test]
    fn reads_exceptions_across_areas() {
        // 4 KiB chunks hold 256 exceptions per area: 600 spans three areas.
        let old: Vec<u64> = (0..600).map(|i| i * 7 % 1000).collect();
        let t = parse_bytes(&encode_store(4096, 1, &old)).unwrap();
        assert_eq!(t.chunk_bytes, 4096);
        assert!(t.valid);
        assert_eq!(t.old_chunks, old);
        assert_eq!(t.ranges().next(), Some((0, 4096)));
    }

    #[test]
    fn empty_and_invalidated_tables() {
        let t = parse_bytes(&encode_store(8192, 1, &[])).unwrap();
        assert!(t.old_chunks.is_empty());
        let t = parse_bytes(&encode_store(4096, 0, &[3])).unwrap();
        assert!(!t.valid);
    }

    #[test]
    fn not_a_store_is_named() {
        let mut s = encode_store(4096, 1, &[1]);
        s[0] = 0;
        let e = parse_bytes(&s).unwrap_err().to_string();
        assert!(e.contains("cow") && e.contains("magic"), "{e}");
        let mut s = encode_store(4096, 1, &[1]);
        s[8] = 2;
        assert!(parse_bytes(&s).unwrap_err().to_string().contains("version 2"));
    }

    #[test]
    fn reads_a_store_from_a_file_with_o_direct() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cow");
        std::fs::write(&p, encode_store(4096, 1, &[5, 9, 1])).unwrap();
        match read_cow_device(&p) {
            Ok(t) => assert_eq!(t.old_chunks, vec![5, 9, 1]),
            // Some file systems (tmpfs) refuse O_DIRECT; the parser is
            // covered above, this only checks the aligned reads.
            Err(DmSnapError::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

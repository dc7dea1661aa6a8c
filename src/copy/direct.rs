//! A direct local copy: both ends on this host and nothing on the target
//! side to reuse (a new DST, no references), so the wire protocol has
//! nothing to save. Each block is read once, hashed once and, unless it is
//! all zeros, written from the very buffer that was hashed, by the hashing
//! threads themselves (large sequential writes, a piece of up to 32 KiB of
//! consecutive non-zero blocks at a time); zero blocks stay holes.
//!
//! Everything the target decides stays in `target`: DST is refused, sized
//! and opened by `Target::open`, every group is settled, verified and
//! counted by `Target::settle_direct`, and the copy counts as verified
//! only through `Target::conclude` (every group verified, the image
//! digest equal to the source's, DST synced, read back if asked), as a copy
//! over the link does.
//!
//! What the protocol's second read of the source would catch, a source
//! that changes during the copy, is checked here instead: its size and
//! (for a file) its modification time must be the same after the copy as
//! before; otherwise the copy fails ([`EngineError::SourceChanged`]).

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::blocks::blockmap::{image_digest, BlockMap, Hashing, Piece};
use crate::blocks::digest::Digest;
use crate::blocks::layout::Layout;
use crate::storage::disk::Disk;
use crate::storage::image::{Image, ImageError};

use super::interrupt;
use super::references::layout_of;
use super::source::SourceOptions;
use super::target::{Target, TargetOptions};
use super::{EngineError, Progress, Report};

/// Whether a copy of a local SRC to the local `dst` can go direct: `dst`
/// does not exist yet (an existing one may hold blocks to reuse in place),
/// no references, not live (a live copy needs passes), no `--bwlimit` (it
/// limits the link). The caller has already refused SRC = DST.
pub fn eligible(source: &SourceOptions, target: &TargetOptions, dst: &Path) -> bool {
    source.live.is_none()
        && source.bwlimit.limit().is_none()
        && target.references.is_empty()
        && std::fs::symlink_metadata(dst).is_err()
}

/// Copy the local `src` to the local `dst` directly (see the module's
/// documentation); the report says `direct`.
pub fn copy(
    src: &Path,
    dst: &Path,
    source: &SourceOptions,
    target: &TargetOptions,
    progress: &Progress,
) -> Result<Report, EngineError> {
    copy_with(src, dst, source, target, progress, &|img| Box::new(img))
}

/// [`copy`], writing DST through `wrap(DST)`: the seam, as in
/// [`target::run_with`](super::target::run_with), where a test puts a
/// disk of its own around the real file.
pub fn copy_with(
    src: &Path,
    dst: &Path,
    source: &SourceOptions,
    target: &TargetOptions,
    progress: &Progress,
    wrap: &dyn Fn(Image) -> Box<dyn Disk>,
) -> Result<Report, EngineError> {
    let img = Image::open_read(src)?;
    let before = img.stamp()?;
    let layout = layout_of(&img, source.block_size, source.align)?;
    let algo = source.algo;
    let mut t = Target::open(dst, target, algo, layout.clone(), progress, wrap, None)?;
    progress.phase("copying", layout.size);
    let disk: Arc<dyn Disk> = t.disk();
    let writer = NonZeroWriter::new(&*disk, &layout);
    let write = |p: Piece| writer.write(&p);
    let mut groups: Vec<Digest> = Vec::with_capacity(layout.group_count() as usize);
    let mut failed = None;
    // (Each verified group goes to the device from the target's writeback
    // thread while the next ones are read and hashed.)
    let hashed = BlockMap::stream_with(
        &img,
        &layout,
        algo,
        Hashing { fast: false, with_data: Some(&write) },
        |first, batch| {
            for (k, h) in batch.iter().enumerate() {
                if let Err(e) = t.settle_direct(first + k as u64, h) {
                    failed = Some(e);
                    return false;
                }
                groups.push(h.digest);
            }
            interrupt::pending().is_none()
        },
        &|_| {},
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    if !hashed {
        interrupt::check()?;
    }
    let after = img.stamp()?;
    if after != before {
        return Err(EngineError::SourceChanged {
            path: src.into(),
            before: before.to_string(),
            after: after.to_string(),
        });
    }
    let mut report = t.conclude(image_digest(algo, &layout, &groups))?;
    report.direct = true;
    Ok(report)
}

/// Writes the pieces hashing hands on ([`Hashing::with_data`]) to a disk,
/// from the buffer that was hashed: the bytes written are the bytes
/// hashed. Also how a new DST is filled from its base reference
/// (`copy::references`).
pub(super) struct NonZeroWriter<'a> {
    disk: &'a dyn Disk,
    layout: &'a Layout,
    /// One writer at a time: concurrent buffered writes to one file spin on
    /// its inode lock in the kernel (measured: up to 2.6 s of system time
    /// for 1 GiB), where a waiter here sleeps.
    turn: Mutex<()>,
}

impl<'a> NonZeroWriter<'a> {
    pub(super) fn new(disk: &'a dyn Disk, layout: &'a Layout) -> Self {
        NonZeroWriter { disk, layout, turn: Mutex::new(()) }
    }

    /// Write the non-zero blocks of `p`, each run of consecutive ones with
    /// one write; zero blocks are left alone (holes in a new file; the
    /// target zeroes any that are not).
    pub(super) fn write(&self, p: &Piece) -> Result<(), ImageError> {
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        write_nonzero(self.disk, self.layout, p)
    }
}

/// [`NonZeroWriter::write`]'s work.
fn write_nonzero(disk: &dyn Disk, layout: &Layout, p: &Piece) -> Result<(), ImageError> {
    let n = p.zero.len();
    let mut k = 0;
    while k < n {
        if p.zero[k] {
            k += 1;
            continue;
        }
        let run = k + p.zero[k..].iter().take_while(|&&z| !z).count();
        let (from, _) = layout.extent(p.first + k as u64);
        let (last, len) = layout.extent(p.first + run as u64 - 1);
        let (a, b) = ((from - p.start) as usize, (last - p.start) as usize + len);
        disk.write_at(&p.bytes[a..b], from)?;
        k = run;
    }
    Ok(())
}

//! Reading back what the target wrote. The target checks every group
//! against the source's digests from what it *wrote*; a device (or another
//! writer) that stores other bytes than it was given would still pass that
//! check. Here the blocks this copy wrote are read again from the device,
//! hashed, and compared with the digests they were verified under.
//!
//! Only blocks written since the last read-back are read: blocks that were
//! already in place were read and hashed by the target's scan, and blocks
//! read back after a live pass are not read again unless written again.

use rayon::prelude::*;

use crate::blocks::blockmap::{byte_range, digest_range};
use crate::blocks::digest::{Algorithm, Digest};
use crate::blocks::layout::Layout;
use crate::storage::disk::Disk;
use crate::storage::image::ImageError;

use super::{EngineError, Progress};

/// The blocks written since the last read-back, one bit each (the target
/// keeps it beside its per-block state; an eighth of a byte per block).
#[derive(Debug, Default)]
pub struct Written {
    bits: Vec<u64>,
    count: u64,
}

impl Written {
    pub fn new(blocks: u64) -> Written {
        Written { bits: vec![0; blocks.div_ceil(64) as usize], count: 0 }
    }

    pub fn mark(&mut self, block: u64) {
        let (w, b) = ((block / 64) as usize, block % 64);
        if self.bits[w] & (1 << b) == 0 {
            self.bits[w] |= 1 << b;
            self.count += 1;
        }
    }

    pub fn contains(&self, block: u64) -> bool {
        self.bits[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Blocks marked.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn clear(&mut self) {
        self.bits.fill(0);
        self.count = 0;
    }

    /// Runs `(first, end)` of marked blocks in `[a, b)`.
    fn runs(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = a;
        while i < b {
            if !self.contains(i) {
                i += 1;
                continue;
            }
            let first = i;
            while i < b && self.contains(i) {
                i += 1;
            }
            out.push((first, i));
        }
        out
    }
}

/// Read back every block in `written` from `disk` and compare its digest
/// with `want[block]`. The caller has flushed `disk` (fsync) first. A
/// mismatch is [`EngineError::ReadBack`], naming the first differing run,
/// where it lies in the file and how many blocks differ in all.
pub fn check(
    disk: &dyn Disk,
    layout: &Layout,
    algo: Algorithm,
    written: &Written,
    want: &[Digest],
    progress: &Progress,
) -> Result<(), EngineError> {
    if written.count() == 0 {
        return Ok(());
    }
    let bytes: u64 =
        (0..layout.block_count()).filter(|&i| written.contains(i)).map(|i| layout.extent(i).1 as u64).sum();
    progress.phase("reading back", bytes);
    // One group per task, as the target's scan hashes (rayon, all cores):
    // reads of one group overlap the hashing of others, and at most a
    // group's worth of data per thread is held.
    let bad: Vec<Vec<u64>> = (0..layout.group_count())
        .into_par_iter()
        .map(|g| {
            let (a, b) = layout.group_range(g);
            let mut bad = Vec::new();
            let runs = written.runs(a, b);
            if let (Some(&(first, _)), Some(&(_, end))) = (runs.first(), runs.last()) {
                // What the device holds, not dom0's page cache: the write
                // left its pages cached, and reading those would return the
                // very bytes that were written whatever the device stored.
                // The range is clean after the caller's fsync, so dropping
                // it (POSIX_FADV_DONTNEED) makes the reads below go to the
                // device. (On tmpfs the cache is the storage; nothing drops.)
                // One call per group, from its first written block to its
                // last (not one per run: a target that held most of the
                // image has thousands of one-block runs; the clean pages
                // of blocks in between are dropped too, which is harmless).
                let (start, stop) = byte_range(layout, first, end);
                disk.evict(start, stop - start);
            }
            for (first, end) in runs {
                let (start, stop) = byte_range(layout, first, end);
                let mut buf = vec![0u8; (stop - start) as usize];
                disk.read_at(&mut buf, start)?;
                let got = digest_range(algo, layout, &buf, start, first, end, false);
                bad.extend((first..end).zip(got).filter(|(i, d)| *d != want[*i as usize]).map(|(i, _)| i));
                progress.inc(stop - start);
            }
            Ok(bad)
        })
        .collect::<Result<_, ImageError>>()?;
    let bad: Vec<u64> = bad.concat();
    let Some(&first) = bad.first() else {
        return Ok(());
    };
    let end = bad.iter().zip(first..).take_while(|(&b, i)| b == *i).count() as u64 + first;
    let (start, stop) = byte_range(layout, first, end);
    Err(EngineError::ReadBack {
        path: disk.path().into(),
        first,
        end,
        start,
        stop,
        differing: bad.len() as u64,
        read: written.count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::faulty::{Fault, FaultPlan, FaultyDisk, Op, Rule};
    use crate::storage::image::Image;

    #[test]
    fn runs_of_marked_blocks() {
        let mut w = Written::new(130);
        for i in [0, 1, 2, 5, 63, 64, 65, 129] {
            w.mark(i);
        }
        w.mark(1);
        assert_eq!(w.count(), 8);
        assert_eq!(w.runs(0, 130), vec![(0, 3), (5, 6), (63, 66), (129, 130)]);
        assert_eq!(w.runs(2, 64), vec![(2, 3), (5, 6), (63, 64)]);
        w.clear();
        assert_eq!((w.count(), w.runs(0, 130)), (0, vec![]));
    }

    /// Blocks 3 and 4 land changed: the check names blocks 3..5 and the
    /// file; a block not marked as written is not read.
    #[test]
    fn a_changed_write_is_found_and_named() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("t.img");
        let layout = Layout::flat(64 * 4096, 4096).unwrap();
        let (img, _) = Image::open_target(&path, layout.size).unwrap();
        let plan = FaultPlan::new(
            vec![
                Rule::once_at(Op::Write, 3 * 4096, 4 * 4096, Fault::Changed),
                Rule::once_at(Op::Write, 4 * 4096, 5 * 4096, Fault::Changed),
                Rule::once_at(Op::Write, 40 * 4096, 41 * 4096, Fault::Changed),
            ],
            true,
        );
        let disk = FaultyDisk::new(Box::new(img), plan.clone());
        let algo = Algorithm::Blake3;
        let mut want = vec![[0u8; 32]; 64];
        let mut written = Written::new(64);
        for i in (0..64u64).filter(|&i| i != 40) {
            let data = vec![i as u8 + 1; 4096];
            disk.write_at(&data, i * 4096).unwrap();
            want[i as usize] = algo.digest(&data);
            written.mark(i);
        }
        // Block 40 is written changed but not marked: not this check's.
        disk.write_at(&[9u8; 4096], 40 * 4096).unwrap();
        want[40] = algo.digest(&[9u8; 4096]);
        assert_eq!(plan.fired(), 3);
        disk.sync().unwrap();
        let e = check(&disk, &layout, algo, &written, &want, &Progress::hidden()).unwrap_err();
        match &e {
            EngineError::ReadBack { first: 3, end: 5, start: 12288, stop: 20480, differing: 2, read: 63, .. } => {}
            other => panic!("{other:?}"),
        }
        let text = e.to_string();
        assert!(text.contains("t.img") && text.contains("blocks 3..5"), "{text}");
        // Written as given: nothing to report.
        written.clear();
        written.mark(7);
        check(&disk, &layout, algo, &written, &want, &Progress::hidden()).unwrap();
    }
}

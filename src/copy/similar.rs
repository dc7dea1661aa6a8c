//! The target's index of DST's own blocks by resemblance sketch
//! (`wire::sketch`, capability `CAP_SIMILAR`): where a block the target
//! lacks and has no old version of at the same place may find a similar
//! block to be sent as a delta against.
//!
//! Built only when the first such block is missing (a copy that never
//! needs it never reads DST for it), from the blocks that still hold what
//! DST held (`usable`), at most [`MAX_ENTRIES`] entries: a disk with more
//! non-zero blocks than that is indexed in part, its later blocks are not
//! candidates. A DST with nothing usable (a new one) gives no index, and
//! the copy fetches such blocks whole without asking for sketches.

use crate::blocks::layout::Layout;
use crate::storage::disk::Disk;
use crate::storage::image::ImageError;
use rayon::prelude::*;

use crate::wire::sketch::{self, Index, Sketch, SFS};

/// Entries the index holds at most (about 40 bytes each: ~60 MB), one per
/// super-feature of each block: 2^19 blocks, 2 GiB of 4 KiB blocks.
pub(super) const MAX_ENTRIES: usize = SFS << 19;

/// Groups sketched in parallel between insertions (the sketches are put in
/// the index in block order, so the first block with a value keeps it).
const BATCH: u64 = 64;

/// Index the blocks of `dst` for which `usable(block)` holds (non-zero,
/// still as DST held them), reading one group per task on all cores
/// (rayon). None when no block was indexed.
pub(super) fn build(
    dst: &dyn Disk,
    layout: &Layout,
    usable: impl Fn(u64) -> bool,
    cap: usize,
) -> Result<Option<Index>, ImageError> {
    let wanted: Vec<bool> = (0..layout.block_count()).map(usable).collect();
    let sketch_group = |g: u64| -> Result<Vec<(u64, Sketch)>, ImageError> {
        let (a, b) = layout.group_range(g);
        let blocks: Vec<u64> = (a..b).filter(|&i| wanted[i as usize]).collect();
        let (Some(&first), Some(&last)) = (blocks.first(), blocks.last()) else { return Ok(Vec::new()) };
        let (start, _) = layout.extent(first);
        let (end_off, end_len) = layout.extent(last);
        let mut buf = vec![0u8; (end_off + end_len as u64 - start) as usize];
        dst.read_at(&mut buf, start)?;
        Ok(blocks
            .into_iter()
            .filter_map(|i| {
                let (off, len) = layout.extent(i);
                let at = (off - start) as usize;
                sketch::sketch(&buf[at..at + len]).map(|s| (i, s))
            })
            .collect())
    };
    let mut index = Index::new(cap);
    let mut indexed = 0u64;
    let groups = layout.group_count();
    'batches: for first in (0..groups).step_by(BATCH as usize) {
        let batch: Vec<Vec<(u64, Sketch)>> =
            (first..(first + BATCH).min(groups)).into_par_iter().map(sketch_group).collect::<Result<_, _>>()?;
        for (i, s) in batch.into_iter().flatten() {
            if !index.insert(i, &s) {
                break 'batches;
            }
            indexed += 1;
        }
    }
    log::debug!("similar blocks: {indexed} blocks of the old copy indexed ({} entries)", index.len());
    Ok((!index.is_empty()).then_some(index))
}

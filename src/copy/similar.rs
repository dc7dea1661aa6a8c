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
use crate::wire::sketch::{self, Index, SFS};

/// Entries the index holds at most (about 40 bytes each: ~60 MB), one per
/// super-feature of each block: 2^19 blocks, 2 GiB of 4 KiB blocks.
pub(super) const MAX_ENTRIES: usize = SFS << 19;

/// Index the blocks of `dst` for which `usable(block)` holds (non-zero,
/// still as DST held them), reading one group at a time. None when no
/// block was indexed.
pub(super) fn build(
    dst: &dyn Disk,
    layout: &Layout,
    usable: impl Fn(u64) -> bool,
    cap: usize,
) -> Result<Option<Index>, ImageError> {
    let mut index = Index::new(cap);
    let mut buf = Vec::new();
    let mut indexed = 0u64;
    'groups: for g in 0..layout.group_count() {
        let (a, b) = layout.group_range(g);
        let wanted: Vec<u64> = (a..b).filter(|&i| usable(i)).collect();
        let (Some(&first), Some(&last)) = (wanted.first(), wanted.last()) else { continue };
        let (start, _) = layout.extent(first);
        let (end_off, end_len) = layout.extent(last);
        buf.resize((end_off + end_len as u64 - start) as usize, 0);
        dst.read_at(&mut buf, start)?;
        for i in wanted {
            let (off, len) = layout.extent(i);
            let at = (off - start) as usize;
            if let Some(s) = sketch::sketch(&buf[at..at + len]) {
                if !index.insert(i, &s) {
                    break 'groups;
                }
                indexed += 1;
            }
        }
    }
    log::debug!("similar blocks: {indexed} blocks of DST indexed ({} entries)", index.len());
    Ok((!index.is_empty()).then_some(index))
}

//! DST's old blocks kept aside before the copy overwrites them, so that a
//! block found similar to one of them (`CAP_SIMILAR`) can still lean on it.
//!
//! Why: in place, DST is both the old copy the target indexes by sketch
//! and the image being rewritten. A block whose old place is about to be
//! rewritten could not be a delta's base (its bytes might be gone before
//! the delta came back), and one already rewritten was gone. On the quick
//! images' return migration at 2 Mbit/s, in place, 175 blocks came as
//! deltas against a similar block where 629 did with the old image as a
//! reference beside an empty DST, and the copy sent 13% more than
//! `zstd --patch-from` (docs/experiments.md, session 28).
//!
//! The target reads each old block once, just before its first write in
//! the copy, while there is room ([`kept_limit`] in all) and once the
//! index of similar blocks is wanted, never after the link was judged
//! fast (`Target::keep_aside`); a block written without being kept is
//! gone as a base for good. Nothing here is trusted
//! beyond that: a delta rebuilt on a kept block is checked against its
//! key like every other.

use std::collections::HashMap;

use super::readback::Written;

/// Most bytes of old blocks kept in memory per copy: 16,384 blocks of
/// 4 KiB. A return migration rewrites a few thousand (4,400 on the quick
/// images); a copy that rewrites more loses the rest as bases, as before.
pub const KEPT_BYTES: usize = 64 << 20;

/// The bytes a copy keeps at most, `available` the memory available when
/// it starts (None: unknown): [`KEPT_BYTES`], and at most an eighth of
/// that (a migration copies several disks at once on a dom0 of a few GiB).
pub fn kept_limit(available: Option<u64>) -> usize {
    available.map_or(KEPT_BYTES, |m| KEPT_BYTES.min(usize::try_from(m / 8).unwrap_or(usize::MAX)))
}

/// Where an old block's bytes are.
#[derive(Debug, PartialEq)]
pub enum Old<'a> {
    /// Still in DST: its first write in this copy is still to come.
    InDst,
    /// Kept here before its first write.
    Kept(&'a [u8]),
    /// Written without being kept (no room).
    Gone,
}

/// The old blocks kept, and which blocks were written once already.
///
/// Shared with the thread that indexes the old copy by sketch
/// (`copy::similar`), which reads DST while the target writes it: the
/// target marks a block rewritten (keeping its bytes) before it writes
/// it, and the indexer, having read a block, asks here where its old
/// bytes are, so that it indexes the old bytes whichever came first.
pub struct Kept {
    blocks: HashMap<u64, Vec<u8>>,
    bytes: usize,
    limit: usize,
    /// Written at least once in this copy: what DST holds there is no
    /// longer what was indexed.
    rewritten: Written,
}

impl Kept {
    /// Room for `limit` bytes, over an image of `blocks` blocks.
    pub fn new(blocks: u64, limit: usize) -> Kept {
        Kept { blocks: HashMap::new(), bytes: 0, limit, rewritten: Written::new(blocks) }
    }

    /// Where block `j`'s old bytes are now.
    pub fn old(&self, j: u64) -> Old<'_> {
        match self.blocks.get(&j) {
            Some(b) => Old::Kept(b),
            None if self.rewritten.contains(j) => Old::Gone,
            None => Old::InDst,
        }
    }

    /// Whether block `j`'s first write is still to come, or its old bytes
    /// were kept: either way a delta may lean on them.
    pub fn available(&self, j: u64) -> bool {
        !matches!(self.old(j), Old::Gone)
    }

    /// Whether block `j` is about to be written for the first time, and
    /// `len` more bytes fit: its old bytes should be read and kept.
    pub fn wants(&self, j: u64, len: usize) -> bool {
        !self.rewritten.contains(j) && self.bytes + len <= self.limit
    }

    /// Block `j` is written now; `old` its bytes before, if read to keep.
    pub fn overwritten(&mut self, j: u64, old: Option<Vec<u8>>) {
        if self.rewritten.contains(j) {
            return;
        }
        self.rewritten.mark(j);
        if let Some(old) = old.filter(|o| self.bytes + o.len() <= self.limit) {
            self.bytes += old.len();
            self.blocks.insert(j, old);
        }
    }

    /// Bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_kept_once_at_its_first_write_while_there_is_room() {
        let mut k = Kept::new(10, 8);
        assert!(k.available(3) && k.wants(3, 4));
        assert_eq!(k.old(3), Old::InDst);
        k.overwritten(3, Some(vec![1; 4]));
        assert_eq!(k.old(3), Old::Kept(&[1u8; 4]));
        // Its second write keeps the first bytes.
        assert!(!k.wants(3, 4));
        k.overwritten(3, Some(vec![2; 4]));
        assert_eq!(k.old(3), Old::Kept(&[1u8; 4]));
        // Room for one more; a third is written without being kept, and is
        // gone as a base.
        k.overwritten(4, Some(vec![5; 4]));
        assert!(!k.wants(5, 4) && k.available(5));
        k.overwritten(5, None);
        assert!(!k.available(5) && k.old(5) == Old::Gone);
        assert!(k.available(4) && k.available(6));
        assert_eq!(k.bytes(), 8);
    }

    #[test]
    fn the_limit_is_an_eighth_of_the_memory_available_at_most() {
        assert_eq!(kept_limit(None), KEPT_BYTES);
        assert_eq!(kept_limit(Some(1 << 40)), KEPT_BYTES);
        assert_eq!(kept_limit(Some(256 << 20)), 32 << 20);
    }
}

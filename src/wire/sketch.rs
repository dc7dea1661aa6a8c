//! A resemblance sketch of a block, and an index of the target's old copy's
//! blocks by it: how a target finds, for a block it lacks, a *similar*
//! block of its own to ask a sub-block delta against
//! ([`subdelta`](crate::wire::subdelta)).
//!
//! Why: on a return migration a third of the blocks a target fetches have
//! no old version at the same place (a rewritten file lands in free space),
//! so the same-index delta cannot reach them; DST often holds a similar
//! block elsewhere (the file's old copy). Measured before it was built
//! (`scripts/experiments/similar-blocks.sh`, docs/experiments.md): of the
//! 1847 such blocks of the return-inplace cell, this sketch finds a
//! candidate for 635 and saves 0.13-0.19 MB of 1.44, 76% of what an
//! exhaustive search over DST saves; more, smaller super-features or
//! Finesse's regions did worse.
//!
//! The sketch, as delta-compressing dedup systems make it ("N-transform"
//! super-features): a gear hash of every [`WINDOW`]-byte window
//! (`h = (h << 1) + GEAR[byte]` in 32 bits, so each window's hash depends
//! on exactly its bytes), [`FEATURES`] features each the maximum over the
//! block of a linear transform `m * h + a` of it, and every
//! [`PER_SF`] features hashed into one super-feature. Only windows whose
//! hash has its top [`SAMPLE_BITS`] bits zero are transformed (content-
//! defined sampling, as Odess does): two blocks sharing content sample the
//! same windows there, and the transforms, most of the work, run on one
//! window in 16 (the index of a 360 MB DST took 2.4 s without it). Two blocks sharing
//! most of their content share a super-feature with high probability; one
//! shared super-feature is a candidate, more is a better one. A sketch
//! says nothing for sure: the delta's result is checked against the
//! block's key, and a wrong candidate costs a refetch, never a wrong block.
//!
//! The constants are fixed by this module and part of the protocol: both
//! ends must compute the same sketch. They come from a fixed seed through
//! SplitMix64, so they are reproducible here without a table.

use std::collections::HashMap;

/// Bytes of the window the rolling hash covers (32-bit gear hash: the
/// shift moves a byte's contribution out after 32 steps).
pub const WINDOW: usize = 32;
/// Features per sketch.
pub const FEATURES: usize = 12;
/// Features hashed into one super-feature.
pub const PER_SF: usize = 4;
/// Windows are sampled where the hash's top this many bits are zero.
pub const SAMPLE_BITS: u32 = 4;
/// Super-features per sketch.
pub const SFS: usize = FEATURES / PER_SF;
/// Bytes of one sketch on the wire (little-endian u32 per super-feature).
pub const SKETCH_LEN: usize = SFS * 4;

/// A block's super-features.
pub type Sketch = [u32; SFS];

const fn splitmix(state: u64) -> (u64, u64) {
    let s = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (s, z ^ (z >> 31))
}

const fn gear_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut s = 0x5eed_0011_u64;
    let mut i = 0;
    while i < 256 {
        let (n, v) = splitmix(s);
        s = n;
        t[i] = (v >> 32) as u32;
        i += 1;
    }
    t
}

const fn transforms() -> ([u32; FEATURES], [u32; FEATURES]) {
    let mut m = [0u32; FEATURES];
    let mut a = [0u32; FEATURES];
    let mut s = 0x5eed_0012_u64;
    let mut i = 0;
    while i < FEATURES {
        let (n, v) = splitmix(s);
        s = n;
        // Odd multipliers: the transform is a permutation of the hashes.
        m[i] = (v >> 32) as u32 | 1;
        a[i] = v as u32;
        i += 1;
    }
    (m, a)
}

const GEAR: [u32; 256] = gear_table();
const TRANSFORMS: ([u32; FEATURES], [u32; FEATURES]) = transforms();

/// The sketch of `block`, or None when no window of it was sampled (shorter
/// than a window, or content such as a repeated byte whose windows all
/// hash alike): no feature to take.
pub fn sketch(block: &[u8]) -> Option<Sketch> {
    if block.len() < WINDOW {
        return None;
    }
    let (m, a) = TRANSFORMS;
    let mut h = 0u32;
    for &b in &block[..WINDOW - 1] {
        h = (h << 1).wrapping_add(GEAR[b as usize]);
    }
    let mut f = [0u32; FEATURES];
    let mut sampled = false;
    for &b in &block[WINDOW - 1..] {
        h = (h << 1).wrapping_add(GEAR[b as usize]);
        if h >> (32 - SAMPLE_BITS) != 0 {
            continue;
        }
        sampled = true;
        for t in 0..FEATURES {
            f[t] = f[t].max(m[t].wrapping_mul(h).wrapping_add(a[t]));
        }
    }
    if !sampled {
        return None;
    }
    let mut out = [0u32; SFS];
    for (s, chunk) in out.iter_mut().zip(f.chunks_exact(PER_SF)) {
        let mut bytes = [0u8; PER_SF * 4];
        for (dst, v) in bytes.chunks_exact_mut(4).zip(chunk) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        *s = xxhash_rust::xxh3::xxh3_64(&bytes) as u32;
    }
    Some(out)
}

/// Windows of `data` where the gear hash (as [`sketch`]'s) has its top
/// `bits` bits zero, one in 2^`bits` on average wherever the content is,
/// each as the 64-bit hash of its [`WINDOW`] bytes: content-defined
/// anchors, which two buffers sharing content share wherever in each it
/// lies (`copy::shared_ref::resemblance`). Not on the wire.
pub fn anchors(data: &[u8], bits: u32) -> Vec<u64> {
    let mut out = Vec::new();
    if data.len() < WINDOW {
        return out;
    }
    let mut h = 0u32;
    for &b in &data[..WINDOW - 1] {
        h = (h << 1).wrapping_add(GEAR[b as usize]);
    }
    for (i, &b) in data[WINDOW - 1..].iter().enumerate() {
        h = (h << 1).wrapping_add(GEAR[b as usize]);
        if h >> (32 - bits) == 0 {
            out.push(xxhash_rust::xxh3::xxh3_64(&data[i..i + WINDOW]));
        }
    }
    out
}

/// A sketch as it travels.
pub fn to_bytes(s: &Sketch) -> [u8; SKETCH_LEN] {
    let mut out = [0u8; SKETCH_LEN];
    for (dst, v) in out.chunks_exact_mut(4).zip(s) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// A sketch from the wire (`bytes` is exactly [`SKETCH_LEN`] long).
pub fn from_bytes(bytes: &[u8; SKETCH_LEN]) -> Sketch {
    let mut s = [0u32; SFS];
    for (v, src) in s.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = u32::from_le_bytes(src.try_into().expect("4 bytes"));
    }
    s
}

/// DST's blocks by super-feature: each value keeps the first block seen
/// with it, so memory is bounded by the number of entries, and insertion
/// stops at `cap` entries (a disk past that is indexed in part: its later
/// blocks are simply not candidates).
pub struct Index {
    slots: [HashMap<u32, u64>; SFS],
    entries: usize,
    cap: usize,
}

impl Index {
    /// An empty index of at most `cap` entries (one per super-feature of
    /// each block inserted; about 40 bytes each).
    pub fn new(cap: usize) -> Index {
        Index { slots: std::array::from_fn(|_| HashMap::new()), entries: 0, cap }
    }

    /// Whether more blocks can be inserted.
    pub fn full(&self) -> bool {
        self.entries + SFS > self.cap
    }

    /// Add `block` with its sketch; false (and nothing added) once full.
    pub fn insert(&mut self, block: u64, s: &Sketch) -> bool {
        if self.full() {
            return false;
        }
        for (slot, v) in self.slots.iter_mut().zip(s) {
            if let std::collections::hash_map::Entry::Vacant(e) = slot.entry(*v) {
                e.insert(block);
                self.entries += 1;
            }
        }
        true
    }

    /// The block sharing the most super-features with `s` (ties: the lowest
    /// block), and how many it shares; None when no block shares one.
    /// `usable` rules out blocks that can no longer serve (e.g. rewritten).
    pub fn best(&self, s: &Sketch, usable: impl Fn(u64) -> bool) -> Option<(u64, usize)> {
        let mut found: [(u64, usize); SFS] = [(0, 0); SFS];
        let mut n = 0;
        for (slot, v) in self.slots.iter().zip(s) {
            let Some(&b) = slot.get(v) else { continue };
            if !usable(b) {
                continue;
            }
            match found[..n].iter_mut().find(|(fb, _)| *fb == b) {
                Some(f) => f.1 += 1,
                None => {
                    found[n] = (b, 1);
                    n += 1;
                }
            }
        }
        found[..n].iter().copied().max_by(|x, y| x.1.cmp(&y.1).then(y.0.cmp(&x.0)))
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                let (n, v) = splitmix(s);
                s = n;
                v as u8
            })
            .collect()
    }

    #[test]
    fn a_small_edit_keeps_most_super_features_and_unrelated_blocks_share_none() {
        let a = noise(1, 4096);
        let mut b = a.clone();
        b[100..140].copy_from_slice(&noise(2, 40));
        let (sa, sb) = (sketch(&a).unwrap(), sketch(&b).unwrap());
        let shared = sa.iter().zip(&sb).filter(|(x, y)| x == y).count();
        assert!(shared >= 1, "a 1% edit should keep a super-feature: {sa:?} {sb:?}");
        let c = noise(3, 4096);
        let sc = sketch(&c).unwrap();
        assert_eq!(sa.iter().zip(&sc).filter(|(x, y)| x == y).count(), 0);
    }

    #[test]
    fn the_index_finds_similar_blocks_and_not_unrelated_ones() {
        let mut idx = Index::new(1 << 20);
        let blocks: Vec<Vec<u8>> = (0..200).map(|i| noise(100 + i, 4096)).collect();
        for (i, b) in blocks.iter().enumerate() {
            assert!(idx.insert(i as u64, &sketch(b).unwrap()));
        }
        // An eighth of each block rewritten: a sketch finds most, not all.
        // A feature survives when its maximum was not in the rewritten
        // eighth and the new bytes bring no larger one (~77%), a
        // super-feature when all 4 do, the block when one of 3 does: ~73%.
        let found = (0..200u64)
            .filter(|&i| {
                let mut edited = blocks[i as usize].clone();
                edited[2048..2560].copy_from_slice(&noise(9 + i, 512));
                idx.best(&sketch(&edited).unwrap(), |_| true).map(|(b, _)| b) == Some(i)
            })
            .count();
        assert!(found >= 140, "found {found} of 200");
        // Unrelated blocks: no candidate; a block ruled out: not offered.
        assert!((0..200).all(|i| idx.best(&sketch(&noise(5000 + i, 4096)).unwrap(), |_| true).is_none()));
        assert_eq!(idx.best(&sketch(&blocks[77]).unwrap(), |b| b != 77), None);
    }

    #[test]
    fn the_index_stops_at_its_cap() {
        let mut idx = Index::new(2 * SFS);
        assert!(idx.insert(0, &[1, 2, 3]));
        assert!(idx.insert(1, &[4, 5, 6]));
        assert!(idx.full());
        assert!(!idx.insert(2, &[7, 8, 9]));
        assert_eq!(idx.len(), 2 * SFS);
        assert_eq!(idx.best(&[7, 8, 9], |_| true), None);
        // The first block with a value keeps it; the most shared wins.
        assert_eq!(idx.best(&[1, 5, 6], |_| true), Some((1, 2)));
    }

    #[test]
    fn short_blocks_have_no_sketch_and_the_constants_are_fixed() {
        assert_eq!(sketch(&[0u8; WINDOW - 1]), None);
        assert_eq!(sketch(&noise(4, WINDOW - 1)), None);
        assert!(sketch(&noise(4, 4096)).is_some());
        // Both ends must compute the same sketch: a change of constants is
        // a protocol change (this value pins them).
        assert_eq!(sketch(&(0..=255u8).cycle().take(4096).collect::<Vec<_>>()), Some(PINNED));
    }

    const PINNED: Sketch = [473848551, 728128060, 2274217399];

    proptest! {
        #[test]
        fn wire_form_round_trips(s in any::<[u32; SFS]>()) {
            prop_assert_eq!(from_bytes(&to_bytes(&s)), s);
        }
        #[test]
        fn any_block_sketches_without_panic(b in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = sketch(&b);
        }
    }
}

//! The block map of an image: one digest per block, one per group of blocks,
//! and one for the whole image.
//!
//! It is a two-level hash tree. A group digest covers the full digests of
//! about 1 MiB of blocks, and the image digest covers the group digests plus
//! the image's size and block size. Comparing group digests first lets two
//! ends holding identical data agree after exchanging only 32 bytes per MiB;
//! checking every settled group against its full digest is what makes the
//! truncated per-block keys on the wire safe.
//!
//! Hashing runs on all cores (rayon), one group per task, and hands finished
//! groups to the caller in order so that a sender can stream them while the
//! rest of the image is still being hashed.

use rayon::prelude::*;

use crate::blocks::digest::{is_zero, Algorithm, Digest, ZeroDigests, DIGEST_LEN};
use crate::blocks::lanes::LANES;
use crate::blocks::layout::Layout;
use crate::storage::disk::Disk;
use crate::storage::image::ImageError;

const GROUP_LABEL: &[u8] = b"xenmig-group-v1";
/// Groups hashed per parallel batch: enough work for every core, small enough
/// that the first digests leave early.
const BATCH_GROUPS: u64 = 16;

#[derive(Clone, Debug)]
pub struct BlockMap {
    pub algo: Algorithm,
    pub layout: Layout,
    /// Full digest of each block, in block order.
    pub digests: Vec<Digest>,
    /// Whether each block is all zeros.
    pub zero: Vec<bool>,
    /// Digest of each group of `layout.group_blocks()` blocks.
    pub groups: Vec<Digest>,
    pub image_digest: Digest,
}

/// Digest of a group from the full digests of its blocks.
pub fn group_digest(algo: Algorithm, blocks: &[Digest]) -> Digest {
    algo.digest_of_digests(GROUP_LABEL, blocks.iter())
}

/// Digest of a whole image from its group digests.
pub fn image_digest(algo: Algorithm, layout: &Layout, groups: &[Digest]) -> Digest {
    let mut label = b"xenmig-image-v1".to_vec();
    label.extend_from_slice(&layout.size.to_le_bytes());
    label.extend_from_slice(&layout.block_size.to_le_bytes());
    algo.digest_of_digests(&label, groups.iter())
}

/// Byte range `[start, end)` covered by blocks `[first, end)`. Segments tile
/// the image, so consecutive blocks are contiguous on disk.
pub fn byte_range(layout: &Layout, first: u64, end: u64) -> (u64, u64) {
    let (start, _) = layout.extent(first);
    let (last, len) = layout.extent(end - 1);
    (start, last + len as u64)
}

/// Digests of blocks `[first, end)`, whose bytes `buf` holds from image
/// offset `start` (a run as received, or as read back), by [`digest_all`].
pub fn digest_range(
    algo: Algorithm,
    layout: &Layout,
    buf: &[u8],
    start: u64,
    first: u64,
    end: u64,
    parallel: bool,
) -> Vec<Digest> {
    let blocks: Vec<&[u8]> = (first..end)
        .map(|i| {
            let (off, len) = layout.extent(i);
            &buf[(off - start) as usize..(off - start) as usize + len]
        })
        .collect();
    digest_all(algo, &blocks, parallel)
}

/// Digests of `blocks`, hashed [`LANES`] side by side, the batches spread
/// over the rayon pool when `parallel` (a caller already on the pool per
/// group passes false).
pub fn digest_all(algo: Algorithm, blocks: &[&[u8]], parallel: bool) -> Vec<Digest> {
    let mut out = vec![[0u8; DIGEST_LEN]; blocks.len()];
    if parallel {
        blocks.par_chunks(LANES).zip(out.par_chunks_mut(LANES)).for_each(|(b, o)| algo.digest_each(b, o));
    } else {
        algo.digest_each(blocks, &mut out);
    }
    out
}

/// One hashed group: block digests, zero flags and the group digest.
#[derive(Clone)]
pub struct HashedGroup {
    pub blocks: Vec<Digest>,
    pub zero: Vec<bool>,
    pub digest: Digest,
    /// Fast non-cryptographic hash of each block (XXH3), read from the same
    /// buffer: a live copy compares it on later passes to find blocks that
    /// changed since they were hashed, without recomputing the strong digest.
    /// Empty unless [`Hashing::fast`] asked for it.
    pub fast: Vec<u64>,
}

/// Consecutive blocks of a group as read, handed to [`Hashing::with_data`]
/// in the hashing task once they are hashed.
pub struct Piece<'a> {
    /// The first block of the piece.
    pub first: u64,
    /// Byte offset of `bytes` in the image.
    pub start: u64,
    pub bytes: &'a [u8],
    /// Whether each block of the piece is all zeros.
    pub zero: &'a [bool],
}

/// What [`Hashing::with_data`] calls with each piece.
pub type OnPiece<'a> = dyn Fn(Piece) -> Result<(), ImageError> + Sync + 'a;

/// What hashing does besides the strong digests.
#[derive(Clone, Copy, Default)]
pub struct Hashing<'a> {
    /// Take each block's XXH3 too (only a live copy compares them).
    pub fast: bool,
    /// Called in the hashing task with the bytes of each piece while they
    /// are still at hand (a direct local copy writes them: the bytes
    /// written are the bytes hashed).
    pub with_data: Option<&'a OnPiece<'a>>,
}

/// Bytes read at a time within a group (at least one block): small enough
/// that the buffer stays in the core's L2 cache between the read's copy
/// and the hashing, which a whole 1 MiB group does not; large enough to
/// hold 16 blocks of 4 KiB, which `digest_each` hashes in 16 SIMD lanes.
const PIECE_BYTES: u64 = 64 << 10;

thread_local! {
    /// The read buffer of this hashing thread, reused from piece to piece:
    /// a fresh buffer per group costs page faults and zeroing (7% of
    /// `xenmig hash`'s cycles, measured).
    static PIECE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Read and hash group `g` of `img` under `layout`, doing `how` besides.
pub fn hash_group(
    img: &dyn Disk,
    layout: &Layout,
    algo: Algorithm,
    zeros: &ZeroDigests,
    g: u64,
    how: Hashing,
) -> Result<HashedGroup, ImageError> {
    let (first, end) = layout.group_range(g);
    let n = (end - first) as usize;
    let mut blocks = Vec::with_capacity(n);
    let mut zero = Vec::with_capacity(n);
    let mut fast = Vec::with_capacity(if how.fast { n } else { 0 });
    let per_piece = (PIECE_BYTES / layout.block_size as u64).max(1);
    PIECE_BUF.with_borrow_mut(|buf| {
        let mut a = first;
        while a < end {
            let b = (a + per_piece).min(end);
            let (start, stop) = byte_range(layout, a, b);
            // Only grows; every byte used is overwritten by the read.
            if buf.len() < (stop - start) as usize {
                buf.resize((stop - start) as usize, 0);
            }
            let piece = &mut buf[..(stop - start) as usize];
            img.read_at(piece, start)?;
            // The piece's non-zero blocks are hashed together, side by side
            // (`Algorithm::digest_each`); zero blocks take the cached digest.
            let mut data_blocks: Vec<&[u8]> = Vec::with_capacity((b - a) as usize);
            for i in a..b {
                let (off, len) = layout.extent(i);
                let data = &piece[(off - start) as usize..(off - start) as usize + len];
                if how.fast {
                    fast.push(xxhash_rust::xxh3::xxh3_64(data));
                }
                let z = is_zero(data);
                blocks.push(if z { zeros.get(len) } else { [0u8; DIGEST_LEN] });
                zero.push(z);
                if !z {
                    data_blocks.push(data);
                }
            }
            let mut digests = vec![[0u8; DIGEST_LEN]; data_blocks.len()];
            algo.digest_each(&data_blocks, &mut digests);
            let piece_blocks = &mut blocks[(a - first) as usize..];
            let piece_zero = &zero[(a - first) as usize..];
            for (slot, digest) in
                piece_blocks.iter_mut().zip(piece_zero).filter(|(_, &z)| !z).map(|(s, _)| s).zip(digests)
            {
                *slot = digest;
            }
            if let Some(f) = how.with_data {
                let zero = &zero[(a - first) as usize..];
                f(Piece { first: a, start, bytes: piece, zero })?;
            }
            a = b;
        }
        Ok::<(), ImageError>(())
    })?;
    let digest = group_digest(algo, &blocks);
    Ok(HashedGroup { blocks, zero, digest, fast })
}

impl BlockMap {
    /// Hash `img` under `layout` on all cores. `on_batch(first_group, groups)`
    /// sees each batch of finished groups in order; `progress(bytes)` counts
    /// bytes hashed.
    pub fn compute(
        img: &dyn Disk,
        layout: Layout,
        algo: Algorithm,
        mut on_batch: impl FnMut(u64, &[HashedGroup]),
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<BlockMap, ImageError> {
        let map = Self::compute_streaming(
            img,
            layout,
            algo,
            |g, b| {
                on_batch(g, b);
                true
            },
            progress,
        )?;
        Ok(map.expect("never stopped early"))
    }

    /// Like [`compute`](Self::compute), but `on_batch` returns whether to go
    /// on; Ok(None) means it asked to stop.
    pub fn compute_streaming(
        img: &dyn Disk,
        layout: Layout,
        algo: Algorithm,
        on_batch: impl FnMut(u64, &[HashedGroup]) -> bool,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Option<BlockMap>, ImageError> {
        Self::compute_with(img, layout, algo, Hashing::default(), on_batch, progress)
    }

    /// [`compute_streaming`](Self::compute_streaming), doing `how` besides
    /// the strong digests.
    pub fn compute_with(
        img: &dyn Disk,
        layout: Layout,
        algo: Algorithm,
        how: Hashing,
        mut on_batch: impl FnMut(u64, &[HashedGroup]) -> bool,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Option<BlockMap>, ImageError> {
        let n = layout.block_count() as usize;
        let mut digests = Vec::with_capacity(n);
        let mut zero = Vec::with_capacity(n);
        let mut groups = Vec::with_capacity(layout.group_count() as usize);
        let go_on = Self::stream_with(
            img,
            &layout,
            algo,
            how,
            |g, batch| {
                if !on_batch(g, batch) {
                    return false;
                }
                for h in batch {
                    digests.extend_from_slice(&h.blocks);
                    zero.extend_from_slice(&h.zero);
                    groups.push(h.digest);
                }
                true
            },
            progress,
        )?;
        if !go_on {
            return Ok(None);
        }
        let image_digest = image_digest(algo, &layout, &groups);
        Ok(Some(BlockMap { algo, layout, digests, zero, groups, image_digest }))
    }

    /// Hash `img` batch by batch and keep nothing: `on_batch` takes what it
    /// needs (a caller that keeps its own digests does not pay for a second
    /// copy). Ok(false) means `on_batch` asked to stop. XXH3s are taken
    /// too ([`Hashing::fast`]).
    pub fn stream(
        img: &dyn Disk,
        layout: &Layout,
        algo: Algorithm,
        on_batch: impl FnMut(u64, &[HashedGroup]) -> bool,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<bool, ImageError> {
        Self::stream_with(img, layout, algo, Hashing { fast: true, with_data: None }, on_batch, progress)
    }

    /// [`stream`](Self::stream), doing `how` besides the strong digests.
    pub fn stream_with(
        img: &dyn Disk,
        layout: &Layout,
        algo: Algorithm,
        how: Hashing,
        mut on_batch: impl FnMut(u64, &[HashedGroup]) -> bool,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<bool, ImageError> {
        let zeros = ZeroDigests::new(algo, layout.block_size as usize);
        let gcount = layout.group_count();
        let mut g = 0;
        while g < gcount {
            let end = (g + BATCH_GROUPS).min(gcount);
            let batch: Vec<HashedGroup> = (g..end)
                .into_par_iter()
                .map(|gi| {
                    let h = hash_group(img, layout, algo, &zeros, gi, how)?;
                    let (a, b) = layout.group_range(gi);
                    let (s, e) = byte_range(layout, a, b);
                    progress(e - s);
                    Ok(h)
                })
                .collect::<Result<_, ImageError>>()?;
            if !on_batch(g, &batch) {
                return Ok(false);
            }
            g = end;
        }
        Ok(true)
    }

    /// Hash without streaming or progress.
    pub fn of_image(img: &dyn Disk, layout: Layout, algo: Algorithm) -> Result<BlockMap, ImageError> {
        Self::compute(img, layout, algo, |_, _| {}, &|_| {})
    }

    pub fn zero_blocks(&self) -> u64 {
        self.zero.iter().filter(|&&z| z).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    use crate::storage::image::Image;

    fn image_with(data: &[u8]) -> (tempfile::NamedTempFile, Image) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        f.flush().unwrap();
        let img = Image::open_read(f.path()).unwrap();
        (f, img)
    }

    #[test]
    fn map_matches_direct_hashing() {
        let mut data = vec![0u8; 3 * 4096 + 100];
        data[4096..8192].fill(9);
        data[12288..].fill(3);
        let (_f, img) = image_with(&data);
        let layout = Layout::flat(data.len() as u64, 4096).unwrap();
        let m = BlockMap::of_image(&img, layout, Algorithm::Blake3).unwrap();
        assert_eq!(m.digests.len(), 4);
        assert_eq!(m.zero, vec![true, false, true, false]);
        assert_eq!(m.digests[1], Algorithm::Blake3.digest(&data[4096..8192]));
        assert_eq!(m.digests[3], Algorithm::Blake3.digest(&data[12288..]));
        assert_eq!(m.groups.len(), 1);
        assert_eq!(m.groups[0], group_digest(Algorithm::Blake3, &m.digests));
        assert_eq!(m.zero_blocks(), 2);
    }

    #[test]
    fn streaming_sees_every_group_in_order() {
        let data: Vec<u8> = (0..(40u32 << 20) / 4096 * 4096).map(|i| (i / 4096 % 251) as u8).collect();
        let (_f, img) = image_with(&data);
        let layout = Layout::flat(data.len() as u64, 4096).unwrap();
        let mut seen = Vec::new();
        let m = BlockMap::compute(&img, layout, Algorithm::Sha256, |g, b| seen.push((g, b.len())), &|_| {}).unwrap();
        assert_eq!(seen, vec![(0, 16), (16, 16), (32, 8)]);
        assert_eq!(m.groups.len(), 40);
    }

    /// The pieces handed to `with_data` tile the image once, in each
    /// group's order, with the bytes read and the zero flags hashed; XXH3s
    /// are taken only when asked for.
    #[test]
    fn pieces_cover_the_image_and_fast_hashes_are_optional() {
        let bs = 512usize;
        let mut data: Vec<u8> = (0..(3 << 20) + 700).map(|i| (i % 253) as u8).collect();
        data[bs * 5..bs * 9].fill(0);
        let (_f, img) = image_with(&data);
        let layout = Layout::flat(data.len() as u64, bs as u32).unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        let collect = |p: Piece| {
            seen.lock().unwrap().push((p.first, p.start, p.bytes.to_vec(), p.zero.to_vec()));
            Ok(())
        };
        let mut zero = Vec::new();
        let mut fast = Vec::new();
        let how = Hashing { fast: false, with_data: Some(&collect) };
        BlockMap::stream_with(
            &img,
            &layout,
            Algorithm::Blake3,
            how,
            |_, b| {
                b.iter().for_each(|h| {
                    zero.extend_from_slice(&h.zero);
                    fast.extend_from_slice(&h.fast);
                });
                true
            },
            &|_| {},
        )
        .unwrap();
        assert!(fast.is_empty(), "XXH3s taken without being asked for");
        let mut pieces = seen.into_inner().unwrap();
        pieces.sort_by_key(|p| p.0);
        let mut next = 0u64;
        let (mut bytes, mut flags) = (Vec::new(), Vec::new());
        for (first, start, b, z) in pieces {
            assert_eq!(first, next);
            assert_eq!(start, first * bs as u64);
            assert!(b.len() as u64 <= PIECE_BYTES.max(bs as u64));
            next += b.len().div_ceil(bs) as u64;
            bytes.extend_from_slice(&b);
            flags.extend_from_slice(&z[..b.len().div_ceil(bs)]);
        }
        assert_eq!(bytes, data);
        assert_eq!(flags, zero);
        assert_eq!(zero.iter().filter(|&&z| z).count(), 4);
        let mut fast = Vec::new();
        BlockMap::stream(
            &img,
            &layout,
            Algorithm::Blake3,
            |_, b| {
                b.iter().for_each(|h| fast.extend_from_slice(&h.fast));
                true
            },
            &|_| {},
        )
        .unwrap();
        assert_eq!(fast.len() as u64, layout.block_count());
        assert_eq!(fast[7], xxhash_rust::xxh3::xxh3_64(&data[7 * bs..8 * bs]));
    }

    #[test]
    fn image_digest_depends_on_content_and_size() {
        let (_f, a) = image_with(&[1u8; 8192]);
        let (_g, b) = image_with(&[2u8; 8192]);
        let la = Layout::flat(8192, 4096).unwrap();
        let ma = BlockMap::of_image(&a, la.clone(), Algorithm::Blake3).unwrap();
        let mb = BlockMap::of_image(&b, la, Algorithm::Blake3).unwrap();
        assert_ne!(ma.image_digest, mb.image_digest);
        let l512 = Layout::flat(8192, 512).unwrap();
        let m512 = BlockMap::of_image(&a, l512, Algorithm::Blake3).unwrap();
        assert_ne!(ma.image_digest, m512.image_digest);
    }
}

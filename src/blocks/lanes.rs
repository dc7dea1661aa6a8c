//! BLAKE3 of many small blocks at once, one SIMD lane per block.
//!
//! Why this exists: `blake3::hash` of one 4 KiB block has only 4 chunks to
//! hash side by side, so on AVX-512 it runs 4 of the 16 lanes the
//! compression kernel has (the 4-wide code path). Hashing chunk *c* of 16
//! different blocks in one call fills all 16. Measured on this project's
//! 2-core EPYC (`docs/benchmarks.md`, session 22): 2.5 GB/s per core for
//! `blake3::hash` per 4 KiB block, 5.6 GB/s batched 16 at a time, 7.2 GB/s
//! for one long input (what `b3sum` does).
//!
//! How: BLAKE3 cuts an input into 1 KiB chunks, hashes each chunk to a
//! chaining value (its counter = its position), and merges the values in
//! a binary tree whose root is the hash. For a block of 2^k chunks the tree
//! is complete. So for each chunk position `c`, the chunk at `c` of every
//! block goes through the crate's `hash_many` kernel in one call (counter
//! `c` for all, not incremented); then each level of parents of every
//! block goes through the same kernel in one call (64-byte inputs: two
//! chaining values), the last level with the root flag. Merging parents
//! one at a time instead (the crate's `hazmat` merges) took 19% of
//! `xenmig hash`'s cycles, against 43% for the chunks.
//!
//! The kernel is the crate's `platform` module, public but documented as
//! unstable ("for benchmarks only"). That is why Cargo.toml pins blake3 to
//! one exact version, and why every digest this module makes is checked
//! against `blake3::hash` in the tests below (every supported size, every
//! batch length, odd counts and mixed sizes): a crate update that changed
//! the kernel's contract fails to build or fails those tests, it cannot
//! silently change a digest. Only the tree's flags and IV are taken from
//! the BLAKE3 specification; the hashing itself is the crate's.

use blake3::platform::Platform;
use blake3::{IncrementCounter, CHUNK_LEN};
use std::sync::OnceLock;

use super::digest::Digest;

/// BLAKE3's initial chaining value (the specification's IV: SHA-256's),
/// which is the key of the plain hash mode.
const IV: [u32; 8] =
    [0x6A09_E667, 0xBB67_AE85, 0x3C6E_F372, 0xA54F_F53A, 0x510E_527F, 0x9B05_688C, 0x1F83_D9AB, 0x5BE0_CD19];
/// Flags of the specification: the first and last compression of a chunk.
const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 2;
/// A node merging two chaining values, and the tree's root.
const PARENT: u8 = 4;
const ROOT: u8 = 8;

/// Blocks hashed side by side per kernel call: AVX-512's 16 lanes. Wider
/// batches gain nothing (measured: 16 and 32 alike); narrower ones fall to
/// the 8- and 4-wide paths.
pub const LANES: usize = 16;

/// The most chunks of a block worth batching: from 16 chunks up,
/// `blake3::hash` fills 16 lanes on its own.
const MAX_CHUNKS: usize = 8;
const MAX_BATCHED: usize = MAX_CHUNKS * CHUNK_LEN;

fn platform() -> Platform {
    static DETECTED: OnceLock<Platform> = OnceLock::new();
    *DETECTED.get_or_init(Platform::detect)
}

/// Whether blocks of `len` bytes are hashed in lanes: a power of two
/// number of whole chunks (1-8), whose tree is complete.
pub fn batched(len: usize) -> bool {
    len.is_power_of_two() && (CHUNK_LEN..=MAX_BATCHED).contains(&len)
}

/// BLAKE3 of each of `blocks` (all `len` bytes, `batched(len)`), written
/// to `out` in order.
pub fn hash_equal(blocks: &[&[u8]], len: usize, out: &mut [Digest]) {
    assert!(batched(len), "a block of {len} bytes is not hashed in lanes");
    assert_eq!(blocks.len(), out.len());
    let platform = platform();
    for (batch, out) in blocks.chunks(LANES).zip(out.chunks_mut(LANES)) {
        hash_batch(platform, batch, len, out);
    }
}

/// BLAKE3 of at most [`LANES`] blocks of `len` bytes with `platform`'s
/// kernel: the one this CPU runs best, or in the tests each one it can
/// run (a host without AVX-512, or the Xen lab's emulated CPU, takes
/// another code path of the crate).
fn hash_batch(platform: Platform, blocks: &[&[u8]], len: usize, out: &mut [Digest]) {
    let n = blocks.len();
    let chunks = len / CHUNK_LEN;
    // One tree level of every block, block-major: node j of block i at
    // (i * width + j) * 32, so that the two children of a parent are
    // adjacent and a parent's 64-byte input is read in place.
    let mut level = [0u8; 32 * LANES * MAX_CHUNKS];
    let mut lane_out = [0u8; 32 * LANES * MAX_CHUNKS / 2];
    let mut inputs: [&[u8; CHUNK_LEN]; LANES] = [&[0u8; CHUNK_LEN]; LANES];
    for c in 0..chunks {
        for (slot, block) in inputs.iter_mut().zip(blocks) {
            assert_eq!(block.len(), len, "blocks hashed in lanes differ in size");
            *slot = block[c * CHUNK_LEN..(c + 1) * CHUNK_LEN].try_into().expect("a whole chunk");
        }
        // A block of one chunk is its own root: its last compression
        // carries ROOT, and the chaining value is then the hash.
        let end = if chunks == 1 { CHUNK_END | ROOT } else { CHUNK_END };
        platform.hash_many(
            &inputs[..n],
            &IV,
            c as u64,
            IncrementCounter::No,
            0,
            CHUNK_START,
            end,
            &mut lane_out[..32 * n],
        );
        for i in 0..n {
            let at = (i * chunks + c) * 32;
            level[at..at + 32].copy_from_slice(&lane_out[32 * i..32 * (i + 1)]);
        }
    }
    // Parents, a level at a time, every block's in one call; the level of
    // one node per block is the root, whose output is the hash.
    let mut width = chunks;
    while width > 1 {
        let parents = n * width / 2;
        let flags = if width == 2 { PARENT | ROOT } else { PARENT };
        let mut pairs: [&[u8; 64]; LANES * MAX_CHUNKS / 2] = [&[0u8; 64]; LANES * MAX_CHUNKS / 2];
        for (slot, pair) in pairs.iter_mut().zip(level[..64 * parents].chunks_exact(64)) {
            *slot = pair.try_into().expect("two chaining values");
        }
        platform.hash_many(&pairs[..parents], &IV, 0, IncrementCounter::No, flags, 0, 0, &mut lane_out[..32 * parents]);
        level[..32 * parents].copy_from_slice(&lane_out[..32 * parents]);
        width /= 2;
    }
    for (i, digest) in out.iter_mut().enumerate() {
        digest.copy_from_slice(&level[32 * i..32 * (i + 1)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plain(blocks: &[&[u8]]) -> Vec<Digest> {
        blocks.iter().map(|b| *blake3::hash(b).as_bytes()).collect()
    }

    #[test]
    fn every_batched_size_and_count_matches_blake3() {
        let mut seed = 7u64;
        for len in [1024, 2048, 4096, 8192] {
            assert!(batched(len));
            for count in [1, 2, 3, 15, 16, 17, 33] {
                let data: Vec<u8> = (0..len * count)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed as u8
                    })
                    .collect();
                let blocks: Vec<&[u8]> = data.chunks(len).collect();
                let mut out = vec![[0u8; 32]; count];
                hash_equal(&blocks, len, &mut out);
                assert_eq!(out, plain(&blocks), "{count} blocks of {len} bytes");
            }
        }
    }

    /// Every kernel this CPU can run (portable, SSE2, SSE4.1, AVX2,
    /// AVX-512), not only the one `Platform::detect` picks. (x86 only: the
    /// crate names its x86 kernels only there.)
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[test]
    fn every_kernel_this_cpu_runs_matches_blake3() {
        let kernels =
            [Some(Platform::portable()), Platform::sse2(), Platform::sse41(), Platform::avx2(), Platform::avx512()];
        let data: Vec<u8> = (0..17 * 8192u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for platform in kernels.into_iter().flatten() {
            for len in [1024, 2048, 4096, 8192] {
                let blocks: Vec<&[u8]> = data[..17 * len].chunks(len).collect();
                let mut out = vec![[0u8; 32]; 17];
                for (batch, out) in blocks.chunks(LANES).zip(out.chunks_mut(LANES)) {
                    hash_batch(platform, batch, len, out);
                }
                assert_eq!(out, plain(&blocks), "kernel of degree {}, {len}-byte blocks", platform.simd_degree());
            }
        }
    }

    #[test]
    fn only_whole_power_of_two_chunk_counts_are_batched() {
        for len in [512, 1000, 3072, 4095, 16384, 1 << 20] {
            assert!(!batched(len), "{len}");
        }
    }

    proptest! {
        #[test]
        fn random_blocks_match_blake3(
            exp in 0u32..4,
            data in proptest::collection::vec(any::<u8>(), 0..40 * 1024),
            zeroed in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let len = 1024usize << exp;
            let mut data = data;
            data.truncate(data.len() / len * len);
            // Some blocks all zero, as on a disk.
            for (i, z) in zeroed.iter().enumerate() {
                if *z && (i + 1) * len <= data.len() {
                    data[i * len..(i + 1) * len].fill(0);
                }
            }
            let blocks: Vec<&[u8]> = data.chunks(len).collect();
            let mut out = vec![[0u8; 32]; blocks.len()];
            hash_equal(&blocks, len, &mut out);
            prop_assert_eq!(out, plain(&blocks));
        }
    }
}

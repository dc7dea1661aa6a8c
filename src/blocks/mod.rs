//! Blocks: what a disk is cut into and how each block is named.
//!
//! - [`digest`]: block digest algorithms and the short wire key.
//! - [`lanes`]: BLAKE3 of many small blocks at once, one SIMD lane each.
//! - [`layout`]: how an image is cut into blocks (partition-aware).
//! - [`blockmap`]: per-block, per-group and whole-image digests, hashed on all cores.
//! - [`runs`]: runs of consecutive numbers: the range check, the cutting.

pub mod blockmap;
pub mod digest;
pub mod lanes;
pub mod layout;
pub mod runs;

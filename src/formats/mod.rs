//! Files xenmig writes and reads back: versioned, checksummed.
//!
//! - [`framing`]: the common header (magic, version) and checksum.
//! - [`hashfile`]: one image's block digests (`xenmig hash -o`).
//! - [`index`]: reference images' blocks, sorted for lookup (`xenmig index`).

pub mod framing;
pub mod hashfile;
pub mod index;

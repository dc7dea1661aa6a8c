//! The hash file (`xenmig hash`, the seed's `shafs`): an image's block map
//! on disk.
//!
//! Layout, little-endian (framing and checksum: see `fileformat`):
//!
//! ```text
//! "XENMIGH\0"  version 1.0 (two bytes: major, minor)
//! u8 algorithm (1 blake3, 2 sha256, 3 sha1)   u8 reserved=0
//! layout: u64 image size, u32 block size, u32 segment count,
//!         segment count x (u64 start, u64 length)
//! [32] image digest
//! u64 block count, then block count x [32] block digest
//!         (SHA-1 digests are zero-padded to 32 bytes; an all-zero block
//!          has the digest of zeros of its length)
//! [32] BLAKE3 checksum of all the above
//! ```
//!
//! Group digests are not stored: they are recomputed from the block digests
//! on load, which also checks them against the stored image digest.

use std::path::Path;

use crate::blocks::blockmap::{group_digest, image_digest, BlockMap};
use crate::blocks::digest::ZeroDigests;
use crate::formats::framing::{FileReader, FileWriter, FormatError, FormatVersion};

pub const MAGIC: &[u8; 8] = b"XENMIGH\0";
pub const VERSION: FormatVersion = FormatVersion::new(1, 0);

/// Write `map` to `path`, readable by its owner only.
pub fn write(map: &BlockMap, path: &Path) -> Result<(), FormatError> {
    write_mode(map, path, 0o600)
}

/// Write `map` to `path` with permission bits `mode` (before the umask):
/// those of the image it describes, so that a hash file tells no more
/// than the image does.
pub fn write_mode(map: &BlockMap, path: &Path, mode: u32) -> Result<(), FormatError> {
    let mut w = FileWriter::new(MAGIC, VERSION);
    w.mode(mode);
    w.u8(map.algo.code());
    w.u8(0);
    w.layout(&map.layout);
    w.bytes(&map.image_digest);
    w.u64(map.digests.len() as u64);
    for d in &map.digests {
        w.bytes(d);
    }
    w.finish(path)
}

pub fn read(path: &Path) -> Result<BlockMap, FormatError> {
    let (mut r, _version) = FileReader::open(path, MAGIC, "hash", VERSION)?;
    let algo = r.algo()?;
    r.u8()?;
    let layout = r.layout()?;
    let stored_image = r.digest()?;
    let n = r.count(32)?;
    if n as u64 != layout.block_count() {
        return Err(r.malformed(format!("holds {n} digests for a layout of {} blocks", layout.block_count())));
    }
    let mut digests = Vec::with_capacity(n);
    for _ in 0..n {
        digests.push(r.digest()?);
    }
    r.done()?;
    let zeros = ZeroDigests::new(algo, layout.block_size as usize);
    let zero = (0..n as u64).map(|i| zeros.is_zero_digest(&digests[i as usize], layout.extent(i).1)).collect();
    let groups: Vec<_> = (0..layout.group_count())
        .map(|g| {
            let (a, b) = layout.group_range(g);
            group_digest(algo, &digests[a as usize..b as usize])
        })
        .collect();
    let image = image_digest(algo, &layout, &groups);
    if image != stored_image {
        return Err(r.malformed("block digests do not add up to its image digest"));
    }
    Ok(BlockMap { algo, layout, digests, zero, groups, image_digest: image })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::digest::Algorithm;
    use crate::blocks::layout::Layout;
    use crate::storage::image::Image;

    fn sample_map(dir: &Path) -> BlockMap {
        let p = dir.join("img");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 7) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let img = Image::open_read(&p).unwrap();
        BlockMap::of_image(&img, Layout::flat(data.len() as u64, 4096).unwrap(), Algorithm::Sha1).unwrap()
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample_map(dir.path());
        let h = dir.path().join("img.xmh");
        write(&m, &h).unwrap();
        let back = read(&h).unwrap();
        assert_eq!(back.digests, m.digests);
        assert_eq!(back.zero, m.zero);
        assert_eq!(back.image_digest, m.image_digest);
        assert_eq!(back.algo, Algorithm::Sha1);
    }

    #[test]
    fn truncation_and_corruption_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample_map(dir.path());
        let h = dir.path().join("img.xmh");
        write(&m, &h).unwrap();
        let bytes = std::fs::read(&h).unwrap();
        std::fs::write(&h, &bytes[..bytes.len() - 100]).unwrap();
        let e = read(&h).unwrap_err();
        assert!(matches!(e, FormatError::Checksum { .. }), "{e}");
        assert!(e.to_string().contains("img.xmh"));
        let mut bad = bytes.clone();
        bad[200] ^= 1;
        std::fs::write(&h, &bad).unwrap();
        assert!(matches!(read(&h).unwrap_err(), FormatError::Checksum { .. }));
        std::fs::write(&h, b"not a hash file at all, just text....................................").unwrap();
        assert!(matches!(read(&h).unwrap_err(), FormatError::Magic { .. }));
        let mut future = bytes.clone();
        future[8] = 9;
        std::fs::write(&h, &future).unwrap();
        assert!(matches!(read(&h).unwrap_err(), FormatError::Version { found: 9, .. }));
        let e = read(&h).unwrap_err().to_string();
        assert!(e.contains("format 9.0") && e.contains("reads 1.x"), "{e}");
    }

    #[test]
    fn a_newer_minor_is_read_and_its_appended_fields_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample_map(dir.path());
        let h = dir.path().join("img.xmh");
        write(&m, &h).unwrap();
        // The same file as a 1.3 writer would make it: one more field at the
        // end of the body, then the checksum.
        let bytes = std::fs::read(&h).unwrap();
        let mut body = bytes[..bytes.len() - 32].to_vec();
        body[9] = 3;
        body.extend_from_slice(b"new field");
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        std::fs::write(&h, &body).unwrap();
        let back = read(&h).unwrap();
        assert_eq!(back.image_digest, m.image_digest);
    }
}

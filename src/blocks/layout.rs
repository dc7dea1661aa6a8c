//! How an image is cut into blocks.
//!
//! A plain image is one segment cut into `block_size` blocks from offset 0.
//! A disk with a legacy MBR whose partitions do not start on a block
//! boundary (the classic start at sector 63) would hash to entirely
//! different blocks than an aligned copy of the same file system. So the
//! image is split into *segments* (the gaps and each primary partition) and
//! each segment is cut into blocks from its own start; the last block of a
//! segment may be short. Both ends apply the same rule, so a file system
//! dedups against itself wherever it sits.

use serde::Serialize;

/// Sector size used by MBR partition tables.
const SECTOR: u64 = 512;
/// Groups span about this many bytes: large enough that group digests of an
/// identical image cost well under 0.01% of it.
pub const GROUP_BYTES: u64 = 1 << 20;

/// A contiguous byte range cut into blocks from its own start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Segment {
    pub start: u64,
    pub len: u64,
}

/// The block layout of one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub block_size: u32,
    pub segments: Vec<Segment>,
    /// Index of the first block of each segment (prefix sums).
    first_block: Vec<u64>,
    block_count: u64,
}

/// Whether to look for a partition table when cutting an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Align {
    /// Cut each MBR primary partition from its own start (default).
    #[default]
    Partitions,
    /// One segment from offset 0.
    Flat,
}

impl Align {
    /// What `--align` calls it (read back by `FromStr`).
    pub fn name(self) -> &'static str {
        match self {
            Align::Partitions => "partitions",
            Align::Flat => "flat",
        }
    }
}

impl std::fmt::Display for Align {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Align {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "partitions" | "auto" => Ok(Align::Partitions),
            "flat" | "none" => Ok(Align::Flat),
            _ => Err(format!("unknown alignment '{s}' (expected partitions or flat)")),
        }
    }
}

/// Valid block sizes: powers of two from 512 bytes to 1 MiB.
pub fn check_block_size(bs: u32) -> Result<(), String> {
    if bs.is_power_of_two() && (512..=1 << 20).contains(&bs) {
        Ok(())
    } else {
        Err(format!("block size {bs} is not a power of two from 512 to 1048576"))
    }
}

impl Layout {
    /// Build a layout from explicit segments, which must tile `[0, size)`.
    ///
    /// This is also what validates a layout a peer sent (ImageInfo) or a
    /// file holds: segments in order, non-empty, non-overlapping, without
    /// gaps, each ending inside the declared size, computed with checked
    /// arithmetic so that no length can wrap around 2^64 into a plausible
    /// total.
    pub fn from_segments(size: u64, block_size: u32, segments: Vec<Segment>) -> Result<Self, String> {
        check_block_size(block_size)?;
        let mut pos: u64 = 0;
        for s in &segments {
            if s.start != pos || s.len == 0 {
                return Err(format!("segments do not tile the image at offset {pos}"));
            }
            pos = match s.start.checked_add(s.len) {
                Some(end) if end <= size => end,
                _ => return Err(format!("segment {}+{} ends past the {size}-byte image", s.start, s.len)),
            };
        }
        if pos != size {
            return Err(format!("segments cover {pos} bytes, image has {size}"));
        }
        let bs = block_size as u64;
        let mut first_block = Vec::with_capacity(segments.len());
        let mut count: u64 = 0;
        for s in &segments {
            first_block.push(count);
            // Cannot overflow: the lengths add up to `size` exactly.
            count = count.checked_add(s.len.div_ceil(bs)).ok_or("block count overflows")?;
        }
        Ok(Layout { size, block_size, segments, first_block, block_count: count })
    }

    /// One segment covering the image.
    pub fn flat(size: u64, block_size: u32) -> Result<Self, String> {
        let segs = if size == 0 { vec![] } else { vec![Segment { start: 0, len: size }] };
        Self::from_segments(size, block_size, segs)
    }

    /// The layout of an image given its first sector.
    pub fn detect(first_sector: &[u8], size: u64, block_size: u32, align: Align) -> Result<Self, String> {
        // First: the partition check below divides by the block size.
        check_block_size(block_size)?;
        match align {
            Align::Flat => Self::flat(size, block_size),
            Align::Partitions => match mbr_partitions(first_sector, size) {
                Some(parts) if parts.iter().any(|p| p.start % block_size as u64 != 0) => {
                    Self::from_segments(size, block_size, tile(size, &parts))
                }
                _ => Self::flat(size, block_size),
            },
        }
    }

    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// Byte offset and length of block `i`.
    pub fn extent(&self, i: u64) -> (u64, usize) {
        debug_assert!(i < self.block_count);
        let seg_idx = match self.first_block.binary_search(&i) {
            Ok(s) => s,
            Err(s) => s - 1,
        };
        // Several segments can share a first block only if empty, which
        // from_segments forbids; pick the last with first_block <= i.
        let seg = self.segments[seg_idx];
        let bs = self.block_size as u64;
        let within = (i - self.first_block[seg_idx]) * bs;
        let len = (seg.len - within).min(bs);
        (seg.start + within, len as usize)
    }

    /// The block holding byte `offset` (which must be inside the image).
    pub fn block_at(&self, offset: u64) -> u64 {
        debug_assert!(offset < self.size);
        let seg_idx = self.segments.partition_point(|s| s.start <= offset) - 1;
        let seg = self.segments[seg_idx];
        self.first_block[seg_idx] + (offset - seg.start) / self.block_size as u64
    }

    /// Blocks per group for this block size.
    pub fn group_blocks(&self) -> u64 {
        (GROUP_BYTES / self.block_size as u64).max(1)
    }

    pub fn group_count(&self) -> u64 {
        self.block_count.div_ceil(self.group_blocks())
    }

    /// Block range `[first, end)` of group `g`.
    pub fn group_range(&self, g: u64) -> (u64, u64) {
        let gb = self.group_blocks();
        let first = g * gb;
        (first, (first + gb).min(self.block_count))
    }

    /// Whether the layout has more than one segment.
    pub fn is_partitioned(&self) -> bool {
        self.segments.len() > 1
    }
}

/// Primary partitions of a valid MBR, as (start, len) in bytes, sorted.
/// Returns None when the sector is not a plausible MBR; a file system boot
/// sector also ends in 0x55AA, so the entries are checked for sanity.
pub fn mbr_partitions(sector: &[u8], size: u64) -> Option<Vec<Segment>> {
    if sector.len() < 512 || sector[510] != 0x55 || sector[511] != 0xAA {
        return None;
    }
    let mut parts = Vec::new();
    for i in 0..4 {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        let status = e[0];
        let ptype = e[4];
        let lba = u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64;
        let sectors = u32::from_le_bytes(e[12..16].try_into().unwrap()) as u64;
        if ptype == 0 {
            continue;
        }
        if status != 0 && status != 0x80 {
            return None;
        }
        // 0xEE is a GPT protective entry: GPT partitions are 1 MiB aligned
        // in practice, so the flat layout already suits them.
        if ptype == 0xEE || lba == 0 || sectors == 0 {
            return None;
        }
        let (start, len) = (lba * SECTOR, sectors * SECTOR);
        if start + len > size {
            return None;
        }
        parts.push(Segment { start, len });
    }
    if parts.is_empty() {
        return None;
    }
    parts.sort_by_key(|p| p.start);
    if parts.windows(2).any(|w| w[0].start + w[0].len > w[1].start) {
        return None;
    }
    Some(parts)
}

/// Segments tiling `[0, size)`: the partitions plus the gaps between them.
fn tile(size: u64, parts: &[Segment]) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut pos = 0;
    for p in parts {
        if p.start > pos {
            out.push(Segment { start: pos, len: p.start - pos });
        }
        out.push(*p);
        pos = p.start + p.len;
    }
    if pos < size {
        out.push(Segment { start: pos, len: size - pos });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(entries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut s = vec![0u8; 512];
        for (i, &(t, lba, n)) in entries.iter().enumerate() {
            let e = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
            e[4] = t;
            e[8..12].copy_from_slice(&lba.to_le_bytes());
            e[12..16].copy_from_slice(&n.to_le_bytes());
        }
        s[510] = 0x55;
        s[511] = 0xAA;
        s
    }

    #[test]
    fn flat_layout_extents() {
        let l = Layout::flat(10_000, 4096).unwrap();
        assert_eq!(l.block_count(), 3);
        assert_eq!(l.extent(0), (0, 4096));
        assert_eq!(l.extent(2), (8192, 10_000 - 8192));
    }

    #[test]
    fn sector_63_partition_is_cut_from_its_start() {
        let size = 64 * 512 + 100 * 4096;
        let s = mbr(&[(0x83, 63, 8 * 100 + 1)]);
        let l = Layout::detect(&s, size, 4096, Align::Partitions).unwrap();
        assert_eq!(l.segments.len(), 2);
        assert_eq!(l.segments[1].start, 63 * 512);
        // The gap before the partition takes 8 blocks (the last one short);
        // block 8 is the partition's first block.
        assert_eq!(l.extent(7), (7 * 4096, 32256 - 7 * 4096));
        assert_eq!(l.extent(8), (63 * 512, 4096));
        assert_eq!(l.group_count(), 1);
        let flat = Layout::detect(&s, size, 4096, Align::Flat).unwrap();
        assert!(!flat.is_partitioned());
    }

    #[test]
    fn block_at_inverts_extent() {
        let size = 64 * 512 + 100 * 4096;
        let s = mbr(&[(0x83, 63, 8 * 100 + 1)]);
        let l = Layout::detect(&s, size, 4096, Align::Partitions).unwrap();
        for i in 0..l.block_count() {
            let (off, len) = l.extent(i);
            assert_eq!(l.block_at(off), i);
            assert_eq!(l.block_at(off + len as u64 - 1), i);
        }
    }

    #[test]
    fn aligned_partitions_keep_the_flat_layout() {
        let s = mbr(&[(0x83, 2048, 2048)]);
        let l = Layout::detect(&s, 4 << 20, 4096, Align::Partitions).unwrap();
        assert!(!l.is_partitioned());
    }

    #[test]
    fn implausible_tables_are_ignored() {
        let mut s = mbr(&[(0x83, 63, 100)]);
        s[446] = 0x12; // bad status byte
        assert!(mbr_partitions(&s, 1 << 20).is_none());
        let s = mbr(&[(0x83, 63, 1 << 30)]); // beyond the image
        assert!(mbr_partitions(&s, 1 << 20).is_none());
        let s = mbr(&[(0x83, 63, 100), (0x83, 100, 100)]); // overlap
        assert!(mbr_partitions(&s, 1 << 20).is_none());
        assert!(mbr_partitions(&[0u8; 512], 1 << 20).is_none());
    }

    fn seg(start: u64, len: u64) -> Segment {
        Segment { start, len }
    }

    /// Layouts a hostile peer could send in ImageInfo: each must be refused,
    /// never accepted with offsets that wrapped around 2^64.
    #[test]
    fn hostile_layouts_are_refused() {
        let k512 = 512u64 << 10;
        // Lengths that wrap to the declared size: 1 MiB of blocks for a
        // 512 KiB image.
        let wraps = vec![seg(0, 1 << 20), seg(1 << 20, 0u64.wrapping_sub(1 << 20).wrapping_add(k512))];
        assert!(Layout::from_segments(k512, 4096, wraps).is_err());
        // A segment near offset 2^64.
        let high = vec![seg(0, u64::MAX - 4095), seg(u64::MAX - 4095, 4096 + k512)];
        assert!(Layout::from_segments(k512, 4096, high).is_err());
        // A lone segment far past the image.
        assert!(Layout::from_segments(k512, 4096, vec![seg(u64::MAX - 10, 11)]).is_err());
        // Overlapping, out of order, gaps, empty, and beyond the size.
        assert!(Layout::from_segments(8192, 4096, vec![seg(0, 8192), seg(4096, 4096)]).is_err());
        assert!(Layout::from_segments(8192, 4096, vec![seg(4096, 4096), seg(0, 4096)]).is_err());
        assert!(Layout::from_segments(8192, 4096, vec![seg(0, 4096), seg(5000, 3192)]).is_err());
        assert!(Layout::from_segments(8192, 4096, vec![seg(0, 0), seg(0, 8192)]).is_err());
        assert!(Layout::from_segments(8192, 4096, vec![seg(0, 16384)]).is_err());
        assert!(Layout::from_segments(8192, 4096, vec![]).is_err());
        assert!(Layout::from_segments(0, 4096, vec![seg(0, 4096)]).is_err());
        // What honest peers send still works.
        assert!(Layout::from_segments(0, 4096, vec![]).is_ok());
        assert!(Layout::from_segments(u64::MAX, 1 << 20, vec![seg(0, u64::MAX)]).is_ok());
        let l = Layout::from_segments(8192 + 100, 4096, vec![seg(0, 100), seg(100, 8192)]).unwrap();
        assert_eq!(l.block_count(), 3);
        assert_eq!(l.extent(2), (4196, 4096));
    }

    /// Every extent of an accepted layout lies inside the image.
    #[test]
    fn accepted_layouts_keep_every_extent_inside_the_image() {
        let l = Layout::from_segments(u64::MAX, 1 << 20, vec![seg(0, u64::MAX - 7), seg(u64::MAX - 7, 7)]).unwrap();
        for i in [0, 1, l.block_count() - 2, l.block_count() - 1] {
            let (off, len) = l.extent(i);
            assert!(off.checked_add(len as u64).is_some_and(|e| e <= l.size), "block {i}: {off}+{len}");
        }
    }

    /// Found by fuzzing (fuzz/regressions/layout/): with a partition table
    /// that needs segments, an invalid block size of 0 divided by zero
    /// before it was checked.
    #[test]
    fn detect_refuses_a_bad_block_size_before_using_it() {
        let s = mbr(&[(0x83, 63, 100)]);
        for bs in [0, 3, 4095] {
            assert!(Layout::detect(&s, 1 << 20, bs, Align::Partitions).is_err());
            assert!(Layout::detect(&s, 1 << 20, bs, Align::Flat).is_err());
        }
    }

    #[test]
    fn block_sizes() {
        assert!(check_block_size(512).is_ok());
        assert!(check_block_size(1 << 20).is_ok());
        assert!(check_block_size(256).is_err());
        assert!(check_block_size(4095).is_err());
        assert!(check_block_size(2 << 20).is_err());
    }
}

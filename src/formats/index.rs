//! The index (`xenmig index`, the seed's `mkidx`): where each block digest
//! first occurs in one or more reference images, sorted for lookup.
//!
//! Layout, little-endian (framing and checksum: see `fileformat`):
//!
//! ```text
//! "XENMIGI\0"  version 1.0 (two bytes: major, minor)
//! u8 algorithm   u8 reserved=0   u32 block size
//! u32 image count, then per image:
//!     u32 path length, path (UTF-8, absolute)
//!     u64 modification time (ns since the epoch)
//!     [32] image digest
//!     layout (u64 size, u32 block size, u32 segments, segments x (u64, u64))
//! u64 block entry count, then per entry, sorted by key:
//!     [15] key (first 15 bytes of the block digest)  u32 image  u64 block
//! u64 group entry count, then per entry, sorted by key:
//!     [15] key (first 15 bytes of the group digest)  u32 image  u64 group
//! [32] BLAKE3 checksum
//! ```
//!
//! Zero blocks are not indexed (they never need a source). Only the first
//! occurrence of each key is kept. An index is a hint, never trusted: the
//! image may have changed since it was indexed, so the target re-reads and
//! re-hashes every block it takes from a reference before that block counts.

use std::path::{Path, PathBuf};

use crate::blocks::blockmap::BlockMap;
use crate::blocks::digest::{key_of, Algorithm, Digest, Key, KEY_LEN};
use crate::blocks::layout::Layout;
use crate::formats::framing::{FileReader, FileWriter, FormatError, FormatVersion};

pub const MAGIC: &[u8; 8] = b"XENMIGI\0";
pub const VERSION: FormatVersion = FormatVersion::new(1, 0);

/// One image an index covers.
#[derive(Clone, Debug)]
pub struct IndexedImage {
    pub path: PathBuf,
    pub mtime_ns: u64,
    pub image_digest: Digest,
    pub layout: Layout,
}

/// Where a key was found: image number and block (or group) number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub key: Key,
    pub image: u32,
    pub pos: u64,
}

#[derive(Clone, Debug)]
pub struct Index {
    pub algo: Algorithm,
    pub block_size: u32,
    pub images: Vec<IndexedImage>,
    pub blocks: Vec<Entry>,
    pub groups: Vec<Entry>,
}

/// Modification time of a file in nanoseconds, 0 if unknown.
pub fn mtime_ns(path: &Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn sort_first_occurrence(v: &mut Vec<Entry>) {
    v.sort_unstable();
    v.dedup_by_key(|e| e.key);
}

fn lookup(v: &[Entry], key: &Key) -> Option<Entry> {
    v.binary_search_by(|e| e.key.cmp(key)).ok().map(|i| v[i])
}

impl Index {
    pub fn new(algo: Algorithm, block_size: u32) -> Self {
        Index { algo, block_size, images: Vec::new(), blocks: Vec::new(), groups: Vec::new() }
    }

    /// Add an image's block map. Entries of earlier images win ties.
    pub fn add(&mut self, path: PathBuf, map: &BlockMap) {
        assert_eq!(map.algo, self.algo);
        assert_eq!(map.layout.block_size, self.block_size);
        let image = self.images.len() as u32;
        let mtime = mtime_ns(&path);
        self.images.push(IndexedImage {
            path,
            mtime_ns: mtime,
            image_digest: map.image_digest,
            layout: map.layout.clone(),
        });
        for (i, d) in map.digests.iter().enumerate() {
            if !map.zero[i] {
                self.blocks.push(Entry { key: key_of(d), image, pos: i as u64 });
            }
        }
        for (g, d) in map.groups.iter().enumerate() {
            self.groups.push(Entry { key: key_of(d), image, pos: g as u64 });
        }
        sort_first_occurrence(&mut self.blocks);
        sort_first_occurrence(&mut self.groups);
    }

    /// Append another index's images and entries.
    pub fn merge(&mut self, other: Index) {
        let base = self.images.len() as u32;
        self.images.extend(other.images);
        let shift = |e: Entry| Entry { image: e.image + base, ..e };
        self.blocks.extend(other.blocks.into_iter().map(shift));
        self.groups.extend(other.groups.into_iter().map(shift));
        sort_first_occurrence(&mut self.blocks);
        sort_first_occurrence(&mut self.groups);
    }

    pub fn find_block(&self, key: &Key) -> Option<Entry> {
        lookup(&self.blocks, key)
    }

    pub fn find_group(&self, key: &Key) -> Option<Entry> {
        lookup(&self.groups, key)
    }

    /// Write the index to `path`, readable by its owner only.
    pub fn write(&self, path: &Path) -> Result<(), FormatError> {
        self.write_mode(path, 0o600)
    }

    /// Write the index with permission bits `mode` (before the umask).
    pub fn write_mode(&self, path: &Path, mode: u32) -> Result<(), FormatError> {
        let mut w = FileWriter::new(MAGIC, VERSION);
        w.mode(mode);
        w.u8(self.algo.code());
        w.u8(0);
        w.u32(self.block_size);
        w.u32(self.images.len() as u32);
        for im in &self.images {
            let p = im.path.to_string_lossy();
            w.u32(p.len() as u32);
            w.bytes(p.as_bytes());
            w.u64(im.mtime_ns);
            w.bytes(&im.image_digest);
            w.layout(&im.layout);
        }
        for table in [&self.blocks, &self.groups] {
            w.u64(table.len() as u64);
            for e in table {
                w.bytes(&e.key);
                w.u32(e.image);
                w.u64(e.pos);
            }
        }
        w.finish(path)
    }

    pub fn read(path: &Path) -> Result<Index, FormatError> {
        let (mut r, _v) = FileReader::open(path, MAGIC, "index", VERSION)?;
        let algo = r.algo()?;
        r.u8()?;
        let block_size = r.u32()?;
        let nimg = r.u32()? as usize;
        let mut images = Vec::new();
        for _ in 0..nimg {
            let len = r.u32()? as usize;
            let p = String::from_utf8(r.take(len)?.to_vec()).map_err(|_| r.malformed("image path is not UTF-8"))?;
            let mtime_ns = r.u64()?;
            let image_digest = r.digest()?;
            let layout = r.layout()?;
            if layout.block_size != block_size {
                return Err(
                    r.malformed(format!("image {p} has block size {}, index has {block_size}", layout.block_size))
                );
            }
            images.push(IndexedImage { path: p.into(), mtime_ns, image_digest, layout });
        }
        let mut tables = [Vec::new(), Vec::new()];
        for (t, table) in tables.iter_mut().enumerate() {
            let n = r.count(KEY_LEN + 12)?;
            table.reserve(n);
            for _ in 0..n {
                let key: Key = r.take(KEY_LEN)?.try_into().unwrap();
                let image = r.u32()?;
                let pos = r.u64()?;
                let Some(im) = images.get(image as usize) else {
                    return Err(r.malformed(format!("entry names image {image}, index has {nimg}")));
                };
                let limit = if t == 0 { im.layout.block_count() } else { im.layout.group_count() };
                if pos >= limit {
                    return Err(r.malformed(format!("entry points past the end of {}", im.path.display())));
                }
                table.push(Entry { key, image, pos });
            }
            if table.windows(2).any(|w| w[0].key >= w[1].key) {
                return Err(r.malformed("entries are not sorted by key"));
            }
        }
        r.done()?;
        let [blocks, groups] = tables;
        Ok(Index { algo, block_size, images, blocks, groups })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::image::Image;

    fn map_of(path: &Path, data: &[u8]) -> BlockMap {
        std::fs::write(path, data).unwrap();
        let img = Image::open_read(path).unwrap();
        BlockMap::of_image(&img, Layout::flat(data.len() as u64, 4096).unwrap(), Algorithm::Blake3).unwrap()
    }

    #[test]
    fn first_occurrence_wins_and_zeros_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![5u8; 4 * 4096];
        data[4096..8192].fill(0);
        let a = dir.path().join("a");
        let m = map_of(&a, &data);
        let mut idx = Index::new(Algorithm::Blake3, 4096);
        idx.add(a.clone(), &m);
        assert_eq!(idx.blocks.len(), 1);
        assert_eq!(idx.find_block(&key_of(&m.digests[3])).unwrap().pos, 0);
        assert!(idx.find_block(&key_of(&m.digests[1])).is_none());
    }

    #[test]
    fn round_trip_several_images_and_reject_damage() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let ma = map_of(&a, &[1u8; 8192]);
        let mb = map_of(&b, &[2u8; 8192]);
        let mut idx = Index::new(Algorithm::Blake3, 4096);
        idx.add(a, &ma);
        let mut other = Index::new(Algorithm::Blake3, 4096);
        other.add(b, &mb);
        idx.merge(other);
        let f = dir.path().join("i.xmi");
        idx.write(&f).unwrap();
        let back = Index::read(&f).unwrap();
        assert_eq!(back.images.len(), 2);
        assert_eq!(back.find_block(&key_of(&mb.digests[0])).unwrap().image, 1);
        assert_eq!(back.find_group(&key_of(&ma.groups[0])).unwrap().image, 0);
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
        assert!(Index::read(&f).is_err());
    }
}

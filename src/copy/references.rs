//! The target's local sources of blocks: reference images (given as images,
//! hashed now, or as index files made earlier) and the target's own earlier
//! content.
//!
//! Nothing here is trusted: a block taken from a reference counts only after
//! it is re-read and its digest matches what the source said it must be.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::blocks::blockmap::BlockMap;
use crate::blocks::digest::{Algorithm, Key};
use crate::blocks::layout::{Align, Layout};
use crate::formats::index::{self, Index};
use crate::storage::disk::Disk;
use crate::storage::image::Image;

use super::EngineError;

/// An open reference image and the layout it was indexed with.
pub struct RefImage {
    pub image: Image,
    pub layout: Layout,
}

pub struct ReferenceSet {
    pub images: Vec<RefImage>,
    pub index: Index,
    /// The target's own earlier content, indexed compactly (looked up after
    /// `index`, as an image added last would be).
    own: Option<CompactIndex>,
    /// The first reference image laid out exactly as the image being
    /// copied, opened but not hashed yet (see [`SameLayout`]).
    same_layout: Option<SameLayout>,
}

/// A reference image with the very layout of the image being copied (same
/// size, block size and partitions): what a DST that holds nothing yet
/// starts from (`copy::target`'s base), block `i` of the one standing for
/// block `i` of the other. [`ReferenceSet::load`] only opens it and reads
/// its layout; [`ReferenceSet::add_same_layout`] hashes it, and fills DST
/// with it while it does.
pub struct SameLayout {
    path: PathBuf,
    image: Image,
    layout: Layout,
}

/// Where the blocks of one large image are, by the first 8 bytes of their
/// key: 12 bytes a block, where an [`Index`] entry takes 32. A prefix may
/// name a block with another key; every hit is re-read and checked, as
/// any block taken from a reference is, so such a hit is simply fetched.
struct CompactIndex {
    image: u32,
    /// (key prefix, big-endian block or group number), sorted.
    blocks: Vec<[u8; 12]>,
    groups: Vec<[u8; 12]>,
}

impl CompactIndex {
    fn entry(key: &[u8], pos: u32) -> [u8; 12] {
        let mut e = [0u8; 12];
        e[..8].copy_from_slice(&key[..8]);
        e[8..].copy_from_slice(&pos.to_be_bytes());
        e
    }

    fn find(v: &[[u8; 12]], key: &Key) -> Option<u64> {
        let i = v.partition_point(|e| e[..8] < key[..8]);
        v.get(i).filter(|e| e[..8] == key[..8]).map(|e| u32::from_be_bytes(e[8..].try_into().unwrap()) as u64)
    }
}

/// The first 8 bytes of a regular file, or None.
fn magic_of(path: &Path) -> Option<[u8; 8]> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut magic = [0u8; 8];
    // O_NONBLOCK and regular files only: a FIFO must not block here.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .and_then(|f| if f.metadata()?.is_file() { Ok(f) } else { Err(std::io::ErrorKind::InvalidInput.into()) })
        .and_then(|mut f| f.read_exact(&mut magic))
        .ok()
        .map(|_| magic)
}

/// Whether `path` starts with the index file magic.
pub fn is_index_file(path: &Path) -> bool {
    magic_of(path).is_some_and(|m| &m == index::MAGIC)
}

/// Whether `path` is a hash file (`xenmig hash -o`): digests without the
/// data, so no reference.
pub fn is_hash_file(path: &Path) -> bool {
    magic_of(path).is_some_and(|m| &m == crate::formats::hashfile::MAGIC)
}

/// How much of an image its references already hold (the seed's Table 5.1):
/// non-zero blocks found in them, zero blocks counted apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Similarity {
    pub blocks_total: u64,
    pub blocks_zero: u64,
    pub blocks_found: u64,
}

impl Similarity {
    pub fn blocks_missing(&self) -> u64 {
        self.blocks_total - self.blocks_zero - self.blocks_found
    }
    /// Found, in percent of the non-zero blocks.
    pub fn found_percent_of_nonzero(&self) -> f64 {
        percent(self.blocks_found, self.blocks_total - self.blocks_zero)
    }
    /// Found or zero, in percent of all blocks.
    pub fn found_or_zero_percent(&self) -> f64 {
        percent(self.blocks_found + self.blocks_zero, self.blocks_total)
    }
    pub fn zero_percent(&self) -> f64 {
        percent(self.blocks_zero, self.blocks_total)
    }
}

fn percent(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

/// Which blocks of `map` the references hold (by key; reads nothing).
pub fn similarity(map: &BlockMap, refs: &ReferenceSet) -> Similarity {
    let found = (0..map.digests.len())
        .filter(|&i| !map.zero[i] && refs.index.find_block(&crate::blocks::digest::key_of(&map.digests[i])).is_some())
        .count() as u64;
    Similarity { blocks_total: map.digests.len() as u64, blocks_zero: map.zero_blocks(), blocks_found: found }
}

/// The layout xenmig uses for an image it reads whole: partition-aware.
pub fn layout_of(img: &dyn Disk, block_size: u32, align: Align) -> Result<Layout, EngineError> {
    let mut first = vec![0u8; 512.min(img.size() as usize)];
    img.read_at(&mut first, 0)?;
    Layout::detect(&first, img.size(), block_size, align).map_err(EngineError::BadLayout)
}

impl ReferenceSet {
    pub fn empty(algo: Algorithm, block_size: u32) -> Self {
        ReferenceSet { images: Vec::new(), index: Index::new(algo, block_size), own: None, same_layout: None }
    }

    /// Open every reference: index files as they are, images hashed now,
    /// except, with `like`, the first image laid out exactly so: it is
    /// only opened, and its blocks are found only once the caller has
    /// called [`add_same_layout`](Self::add_same_layout) (with DST open:
    /// a reference that cannot be opened still stops the copy before DST
    /// is touched).
    pub fn load(
        paths: &[PathBuf],
        algo: Algorithm,
        block_size: u32,
        like: Option<&Layout>,
    ) -> Result<Self, EngineError> {
        let mut set = Self::empty(algo, block_size);
        for path in paths {
            if is_index_file(path) {
                set.add_index(path)?;
            } else if is_hash_file(path) {
                return Err(EngineError::Reference {
                    path: path.clone(),
                    what: "is a hash file (xenmig hash -o): it holds digests, not the blocks; give the image \
                           itself, or an index of it (xenmig index)"
                        .into(),
                });
            } else {
                let image = Image::open_read(path)?;
                let layout = layout_of(&image, block_size, Align::Partitions)?;
                if set.same_layout.is_none() && like == Some(&layout) {
                    set.same_layout = Some(SameLayout { path: path.clone(), image, layout });
                    continue;
                }
                let map = BlockMap::of_image(&image, layout, algo)?;
                set.add_image(path.clone(), image, &map);
            }
        }
        Ok(set)
    }

    fn add_index(&mut self, path: &Path) -> Result<(), EngineError> {
        let idx = Index::read(path)?;
        let err = |what: String| EngineError::Reference { path: path.into(), what };
        if idx.algo != self.index.algo || idx.block_size != self.index.block_size {
            return Err(err(format!(
                "index was built with {}/{} bytes, the source uses {}/{} bytes; rebuild it with `xenmig index --hash {} --block-size {}`",
                idx.algo, idx.block_size, self.index.algo, self.index.block_size, self.index.algo, self.index.block_size
            )));
        }
        for im in &idx.images {
            let image = Image::open_read(&im.path)
                .map_err(|e| err(format!("cannot open indexed image {}: {e}", im.path.display())))?;
            if image.size() != im.layout.size || index::mtime_ns(&im.path) != im.mtime_ns {
                log::warn!(
                    "{} changed since {} was built; its blocks will be checked and stale ones fetched instead",
                    im.path.display(),
                    path.display()
                );
            }
            self.images.push(RefImage { image, layout: im.layout.clone() });
        }
        self.index.merge(idx);
        Ok(())
    }

    /// Add an image whose block map is already known.
    pub fn add_image(&mut self, path: PathBuf, image: Image, map: &BlockMap) {
        let mut one = Index::new(self.index.algo, self.index.block_size);
        one.add(path, map);
        self.images.push(RefImage { image, layout: map.layout.clone() });
        self.index.merge(one);
    }

    /// Add the target's own earlier content, compactly indexed (see
    /// [`CompactIndex`]); an image of more than 2^32 blocks goes into the
    /// full index instead.
    pub fn add_own(&mut self, path: PathBuf, image: Image, map: &BlockMap) {
        self.add_own_parts(path, image, &map.layout, &map.digests, |i| map.zero[i], &map.groups)
    }

    /// [`add_own`](Self::add_own) from block digests, which blocks are
    /// zero (not indexed) and group digests, so that a caller which keeps
    /// the digests anyway need not hold a whole [`BlockMap`] besides.
    pub fn add_own_parts(
        &mut self,
        path: PathBuf,
        image: Image,
        layout: &Layout,
        digests: &[crate::blocks::digest::Digest],
        is_zero: impl Fn(usize) -> bool,
        groups: &[crate::blocks::digest::Digest],
    ) {
        if layout.block_count() > u32::MAX as u64 || self.own.is_some() {
            let zero = (0..digests.len()).map(&is_zero).collect();
            let map = BlockMap {
                algo: self.index.algo,
                layout: layout.clone(),
                digests: digests.to_vec(),
                zero,
                groups: groups.to_vec(),
                image_digest: crate::blocks::blockmap::image_digest(self.index.algo, layout, groups),
            };
            return self.add_image(path, image, &map);
        }
        let non_zero = (0..digests.len()).filter(|&i| !is_zero(i)).count();
        let mut blocks: Vec<[u8; 12]> = Vec::with_capacity(non_zero);
        for (i, d) in digests.iter().enumerate() {
            if !is_zero(i) {
                blocks.push(CompactIndex::entry(d, i as u32));
            }
        }
        blocks.sort_unstable();
        let mut groups: Vec<[u8; 12]> =
            groups.iter().enumerate().map(|(g, d)| CompactIndex::entry(d, g as u32)).collect();
        groups.sort_unstable();
        self.own = Some(CompactIndex { image: self.images.len() as u32, blocks, groups });
        self.images.push(RefImage { image, layout: layout.clone() });
    }

    /// Whether [`load`](Self::load) kept a reference laid out like the
    /// image being copied aside, for [`add_same_layout`](Self::add_same_layout).
    pub fn has_same_layout(&self) -> bool {
        self.same_layout.is_some()
    }

    /// Hash the reference laid out like the image being copied, if
    /// [`load`](Self::load) kept one aside, and add it as any other. With
    /// `fill` (a DST that holds nothing yet), write its non-zero blocks
    /// there from the very buffers hashed, so that DST then holds exactly
    /// what the returned digests say. Its number among the images, and its
    /// block map; None without such a reference.
    pub fn add_same_layout(
        &mut self,
        fill: Option<&dyn Disk>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Option<(u32, BlockMap)>, EngineError> {
        let Some(SameLayout { path, image, layout }) = self.same_layout.take() else { return Ok(None) };
        let algo = self.index.algo;
        let map = match fill {
            Some(dst) => {
                let writer = super::direct::NonZeroWriter::new(dst, &layout);
                let write = |p: crate::blocks::blockmap::Piece| writer.write(&p);
                let how = crate::blocks::blockmap::Hashing { fast: false, with_data: Some(&write) };
                BlockMap::compute_with(&image, layout.clone(), algo, how, |_, _| true, progress)?
                    .expect("never stopped early")
            }
            None => BlockMap::compute(&image, layout, algo, |_, _| {}, progress)?,
        };
        self.add_image(path, image, &map);
        Ok(Some((self.images.len() as u32 - 1, map)))
    }

    /// The first 8 bytes of the key of every non-zero block indexed
    /// (duplicates included): what the held set codes (`wire::held`).
    pub fn key_prefixes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.index.blocks.iter().map(|e| crate::wire::held::prefix(&e.key)).collect();
        if let Some(own) = &self.own {
            v.extend(own.blocks.iter().map(|e| crate::wire::held::prefix(e)));
        }
        v
    }

    /// A reference block with `key`: (image, block number).
    pub fn find_block(&self, key: &Key) -> Option<(u32, u64)> {
        if let Some(e) = self.index.find_block(key) {
            return Some((e.image, e.pos));
        }
        let own = self.own.as_ref()?;
        CompactIndex::find(&own.blocks, key).map(|pos| (own.image, pos))
    }

    /// A reference group with `key`: (image, group number).
    pub fn find_group(&self, key: &Key) -> Option<(u32, u64)> {
        if let Some(e) = self.index.find_group(key) {
            return Some((e.image, e.pos));
        }
        let own = self.own.as_ref()?;
        CompactIndex::find(&own.groups, key).map(|pos| (own.image, pos))
    }

    /// Read block `pos` of reference `image` into a new buffer, or None if it
    /// no longer exists there (image shrank) or has another length.
    pub fn read_block(&self, image: u32, pos: u64, want_len: usize) -> Option<Vec<u8>> {
        let r = &self.images[image as usize];
        if pos >= r.layout.block_count() {
            return None;
        }
        let (off, len) = r.layout.extent(pos);
        if len != want_len || off + len as u64 > r.image.size() {
            return None;
        }
        let mut buf = vec![0u8; len];
        match r.image.read_at(&mut buf, off) {
            Ok(()) => Some(buf),
            Err(e) => {
                log::warn!("reference read failed, fetching instead: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::digest::key_of;

    #[test]
    fn the_compact_index_finds_blocks_and_groups_by_prefix() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 3 << 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 4096 % 251) as u8 ^ (i / (1 << 20)) as u8;
        }
        data[4096..8192].fill(0);
        std::io::Write::write_all(&mut f, &data).unwrap();
        let img = Image::open_read(f.path()).unwrap();
        let layout = Layout::flat(data.len() as u64, 4096).unwrap();
        let map = BlockMap::of_image(&img, layout, Algorithm::Blake3).unwrap();
        let mut set = ReferenceSet::empty(Algorithm::Blake3, 4096);
        set.add_own(f.path().into(), Image::open_read(f.path()).unwrap(), &map);
        // The lowest block holding that content.
        let (img, pos) = set.find_block(&key_of(&map.digests[700])).unwrap();
        assert_eq!(img, 0);
        assert!(pos <= 700 && map.digests[pos as usize] == map.digests[700]);
        assert_eq!(set.find_block(&key_of(&map.digests[3])), Some((0, 3)));
        assert_eq!(set.find_block(&key_of(&map.digests[1])), None, "zero blocks are not indexed");
        assert_eq!(set.find_group(&key_of(&map.groups[2])), Some((0, 2)));
        assert_eq!(set.find_block(&[0xAB; crate::blocks::digest::KEY_LEN]), None);
    }
}

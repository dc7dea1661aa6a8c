//! The target's local sources of blocks: reference images (given as images,
//! hashed now, or as index files made earlier) and the target's own earlier
//! content.
//!
//! Nothing here is trusted: a block taken from a reference counts only after
//! it is re-read and its digest matches what the source said it must be.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::blocks::blockmap::BlockMap;
use crate::blocks::digest::Algorithm;
use crate::storage::image::Image;
use crate::formats::index::{self, Index};
use crate::blocks::layout::{Align, Layout};

use super::EngineError;

/// An open reference image and the layout it was indexed with.
pub struct RefImage {
    pub image: Image,
    pub layout: Layout,
}

pub struct ReferenceSet {
    pub images: Vec<RefImage>,
    pub index: Index,
}

/// Whether `path` starts with the index file magic.
pub fn is_index_file(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let mut magic = [0u8; 8];
    // O_NONBLOCK and regular files only: a FIFO must not block here.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .and_then(|f| if f.metadata()?.is_file() { Ok(f) } else { Err(std::io::ErrorKind::InvalidInput.into()) })
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|_| &magic == index::MAGIC)
        .unwrap_or(false)
}

/// The layout xenmig uses for an image it reads whole: partition-aware.
pub fn layout_of(img: &Image, block_size: u32, align: Align) -> Result<Layout, EngineError> {
    let mut first = vec![0u8; 512.min(img.size() as usize)];
    img.read_at(&mut first, 0)?;
    Layout::detect(&first, img.size(), block_size, align).map_err(EngineError::Other)
}

impl ReferenceSet {
    pub fn empty(algo: Algorithm, block_size: u32) -> Self {
        ReferenceSet { images: Vec::new(), index: Index::new(algo, block_size) }
    }

    /// Open every reference: index files as they are, images hashed now.
    pub fn load(paths: &[PathBuf], algo: Algorithm, block_size: u32) -> Result<Self, EngineError> {
        let mut set = Self::empty(algo, block_size);
        for path in paths {
            if is_index_file(path) {
                set.add_index(path)?;
            } else {
                let image = Image::open_read(path)?;
                let layout = layout_of(&image, block_size, Align::Partitions)?;
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

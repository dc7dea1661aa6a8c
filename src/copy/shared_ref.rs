//! A reference both hosts hold, as the prefix of the copy's zstd stream
//! (capability [`CAP_SHARED_REF`](crate::wire::protocol::CAP_SHARED_REF),
//! `wire::stream`): what the target offers, which of it the source holds
//! (`--source-reference`: images, patterns, or catalogs made by `xenmig
//! index`), and the reference's bytes in memory.
//!
//! A catalog is a host's list of templates by image digest: the source
//! reads none of them until the target offers one's digest, then reads
//! that one and uses it only if its bytes still hash to the listed digest,
//! so a catalog of many templates costs one read per copy, not many.
//!
//! Why: a template or an older release usually sits on every host of a
//! pool. A missing block that resembles some part of it (a new version of
//! a file the old release has) costs only the difference when both ends'
//! zstd contexts start with the reference as history, as `zstd
//! --patch-from` does (docs/experiments.md, "Direction 3").
//!
//! The rule both ends keep: the bytes used as the prefix are read once into
//! memory and hashed *from memory*; they are used only when that digest is
//! the one agreed. A file that changes later does not matter (nothing
//! reads it again), and a file that changed earlier is refused. Blocks
//! decoded with the prefix are still checked against their keys.
//!
//! Memory is the cost: each end holds the reference ([`MAX_SHARED_REF`] at
//! most), and the stream's window grows to cover reference and image.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::blocks::blockmap::BlockMap;
use crate::blocks::digest::{hex, Algorithm, Digest};
use crate::blocks::layout::{Align, Layout};
use crate::formats::index::Index;
use crate::storage::disk::Disk;
use crate::storage::image::Image;

use super::references::{is_hash_file, is_index_file, layout_of, ReferenceSet};
use super::EngineError;

/// Largest reference used as a dictionary (1 GiB): each end holds it in
/// memory for the whole copy. A larger one is not offered nor chosen (the
/// log says so once) and the copy proceeds with an empty history.
pub const MAX_SHARED_REF: u64 = 1 << 30;

/// Why a reference of `size` bytes is not used as a dictionary on this
/// host, if it is not: above [`MAX_SHARED_REF`], or more than half the
/// memory available now (it costs its size and, measured on the
/// experiments' images, about half as much again for the window it fills
/// and zstd's tables: docs/experiments.md).
pub fn too_large(size: u64) -> Option<String> {
    if size > MAX_SHARED_REF {
        return Some(format!("more than the {MAX_SHARED_REF}-byte limit for a shared dictionary"));
    }
    match super::target::mem_available() {
        Some(avail) if size.saturating_mul(2) > avail => {
            Some(format!("more than half the {avail} bytes of memory available"))
        }
        _ => None,
    }
}

/// A reference's bytes, and the image digest computed from exactly them.
pub struct SharedRef {
    pub path: PathBuf,
    pub digest: Digest,
    pub bytes: Arc<[u8]>,
}

/// Bytes in memory read through the [`Disk`] trait, so that they are
/// hashed by the same code as every image.
#[derive(Debug)]
struct Mem<'a> {
    path: &'a Path,
    bytes: &'a [u8],
}

impl Disk for Mem<'_> {
    fn path(&self) -> &Path {
        self.path
    }
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn is_block_device(&self) -> bool {
        false
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let at = (offset.min(self.bytes.len() as u64)) as usize;
        let n = buf.len().min(self.bytes.len() - at);
        buf[..n].copy_from_slice(&self.bytes[at..at + n]);
        Ok(n)
    }
    fn pwrite(&self, _: &[u8], _: u64) -> std::io::Result<usize> {
        Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "a reference in memory is read-only"))
    }
    fn punch_hole(&self, _: u64, _: u64) -> std::io::Result<bool> {
        Ok(false)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn drop_cache(&self) {}
    fn evict(&self, _: u64, _: u64) {}
}

/// Read all of `disk` into memory and hash those bytes with `layout` (None:
/// the partition-aware layout xenmig uses for a reference, detected from
/// the bytes).
pub fn load(
    path: &Path,
    disk: &dyn Disk,
    layout: Option<Layout>,
    algo: Algorithm,
    block_size: u32,
) -> Result<SharedRef, EngineError> {
    let size = disk.size();
    if size > MAX_SHARED_REF {
        return Err(EngineError::Reference {
            path: path.into(),
            what: format!("{size} bytes, more than the {MAX_SHARED_REF}-byte limit for a shared dictionary"),
        });
    }
    let mut bytes = vec![0u8; size as usize];
    disk.read_at(&mut bytes, 0)?;
    let mem = Mem { path, bytes: &bytes };
    let layout = match layout {
        Some(l) => l,
        None => layout_of(&mem, block_size, Align::Partitions)?,
    };
    if layout.size != size {
        return Err(EngineError::Reference {
            path: path.into(),
            what: format!("is {size} bytes now, {} when it was hashed", layout.size),
        });
    }
    let digest = BlockMap::of_image(&mem, layout, algo)?.image_digest;
    Ok(SharedRef { path: path.into(), digest, bytes: bytes.into() })
}

/// Refuse, before the copy starts, a `--source-reference` that cannot be
/// one: missing, unreadable, digests without the data, or a catalog that
/// is not one. (Patterns are expanded before: `refglob`.)
pub fn check_source_references(paths: &[PathBuf]) -> Result<(), EngineError> {
    for p in paths {
        if is_hash_file(p) {
            return Err(EngineError::Reference {
                path: p.clone(),
                what: "is a hash file; --source-reference needs the image itself (its bytes are the dictionary), \
                       or a catalog of images (xenmig index)"
                    .into(),
            });
        }
        if is_index_file(p) {
            Index::read(p).map_err(|e| EngineError::Reference { path: p.clone(), what: e.to_string() })?;
            continue;
        }
        Image::open_read(p).map_err(|e| EngineError::Reference { path: p.clone(), what: e.to_string() })?;
    }
    Ok(())
}

/// What the target offers: (image digest, size, index into `refs.images`)
/// of each reference that is still as it was hashed (size and mtime), is
/// not `dst`, and fits [`MAX_SHARED_REF`]; each digest once.
pub fn offers(refs: &ReferenceSet, dst: &Path) -> Vec<(Digest, u64, usize)> {
    let mut out: Vec<(Digest, u64, usize)> = Vec::new();
    for (i, im) in refs.index.images.iter().enumerate() {
        let Some(r) = refs.images.get(i) else { break };
        let same_file = std::fs::canonicalize(&im.path).ok() == std::fs::canonicalize(dst).ok();
        if same_file || out.iter().any(|(d, _, _)| *d == im.image_digest) {
            continue;
        }
        if let Some(why) = too_large(im.layout.size) {
            log::info!(
                "reference {} ({} bytes, {why}) is not offered as a shared dictionary (its blocks are still reused)",
                im.path.display(),
                im.layout.size
            );
            continue;
        }
        if r.image.size() != im.layout.size || crate::formats::index::mtime_ns(&im.path) != im.mtime_ns {
            continue; // changed since hashed: its digest would not describe it
        }
        out.push((im.image_digest, im.layout.size, i));
    }
    out
}

/// One of the source's references, as the copy starts.
pub enum SourceRef {
    /// An image named itself: read into memory and hashed at once (its
    /// digest is known only from its bytes).
    Loaded(SharedRef),
    /// An image a catalog lists (an index file made by `xenmig index`):
    /// read and hashed only if the target offers its digest, so that a
    /// host's catalog of many templates costs one read, of the one used.
    Listed { path: PathBuf, catalog: PathBuf, digest: Digest, layout: Layout, algo: Algorithm },
    /// A path the target named as one of its references (`-r`), found on
    /// this host too ([`same_path_candidates`]): its digest is unknown
    /// until it is read, so it is chosen by its size (the first offered of
    /// that size: `expect`) and used only if its bytes then hash to that
    /// digest. Only with `CAP_LATE_REF`, where that read is late and on a
    /// thread of its own.
    SamePath { path: PathBuf, size: u64, algo: Algorithm, block_size: u32, expect: Option<Digest> },
}

/// The target's references (`entries`, as given to `-r`: paths and
/// patterns) that exist on this host too, SRC (`src`) and index files
/// left out: hosts of a pool often hold the same templates at the same
/// paths, and one whose bytes match what the target offers serves as the
/// stream's dictionary as a `--source-reference` would. Nothing is read
/// here; what does not exist is left out, said at debug level.
pub fn same_path_candidates(entries: &[PathBuf], src: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let id = |p: &Path| {
        std::fs::metadata(p).ok().and_then(|m| match m.file_type() {
            t if t.is_block_device() => Some((0, m.rdev())),
            t if t.is_file() => Some((m.dev(), m.ino())),
            _ => None,
        })
    };
    let own = id(src);
    let mut out: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let found = match super::refglob::expand_entry(entry, Some(src)) {
            Ok(found) => found,
            Err(e) => {
                log::debug!("reference {} is not looked for on this host: {e}", entry.display());
                continue;
            }
        };
        for p in found {
            match id(&p) {
                None => log::debug!("reference {} is not on this host (or not an image)", p.display()),
                Some(i) if Some(i) == own || is_index_file(&p) => {}
                Some(_) if !out.contains(&p) => out.push(p),
                Some(_) => {}
            }
        }
    }
    out
}

/// The source's references (`paths`: images and catalogs, patterns
/// already expanded), as the copy starts (on a thread of its own, while
/// the target loads its own references: the offer then finds them ready).
/// Images are read into memory and hashed from there; a catalog's entries
/// are only listed; `same_path` (the target's `-r` paths found on this
/// host, [`same_path_candidates`]) are only sized, and come last. A
/// reference above [`MAX_SHARED_REF`], or a catalog made with another
/// digest or block size, is left out, said once in the log.
pub fn load_all(
    paths: &[PathBuf],
    same_path: &[PathBuf],
    algo: Algorithm,
    block_size: u32,
) -> Result<Vec<SourceRef>, EngineError> {
    let mut out = Vec::new();
    for p in paths {
        if is_index_file(p) {
            let idx = Index::read(p).map_err(|e| EngineError::Reference { path: p.clone(), what: e.to_string() })?;
            if idx.algo != algo || idx.block_size != block_size {
                log::warn!(
                    "source reference catalog {} was built with {}/{} bytes, this copy uses {algo}/{block_size}: not \
                     used (xenmig index --hash {algo} --block-size {block_size} makes one that is)",
                    p.display(),
                    idx.algo,
                    idx.block_size
                );
                continue;
            }
            for im in idx.images {
                if let Some(why) = too_large(im.layout.size) {
                    log::info!(
                        "{} in catalog {} ({why}) is not used as a shared dictionary",
                        im.path.display(),
                        p.display()
                    );
                    continue;
                }
                out.push(SourceRef::Listed {
                    path: im.path,
                    catalog: p.clone(),
                    digest: im.image_digest,
                    layout: im.layout,
                    algo,
                });
            }
            continue;
        }
        let img = Image::open_read(p)?;
        let size = img.size();
        if let Some(why) = too_large(size) {
            log::warn!("source reference {} ({size} bytes, {why}) is not used as a shared dictionary", p.display());
            continue;
        }
        out.push(SourceRef::Loaded(load(p, &img, None, algo, block_size)?));
    }
    // Last: a path the target named, found here too (only sized now).
    for p in same_path {
        if paths.contains(p) {
            continue;
        }
        let size = match Image::open_read(p) {
            Ok(img) => img.size(),
            Err(e) => {
                log::debug!("reference {} on this host is left out: {e}", p.display());
                continue;
            }
        };
        if too_large(size).is_none() {
            out.push(SourceRef::SamePath { path: p.clone(), size, algo, block_size, expect: None });
        }
    }
    Ok(out)
}

/// When a chosen reference becomes the stream's dictionary, with
/// `CAP_LATE_REF` agreed. A dictionary pays only where the bytes it saves
/// take longer on the link than reading, hashing and indexing it take
/// (about a second for 316 MB on each end, docs/experiments.md): a large
/// one is read on a thread of its own once the stream has carried enough
/// to be worth it, and taken when ready, so that a short copy (a return
/// migration) never waits for it and a long one (a new release) still
/// gets it for most of its bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatePolicy {
    /// A reference of at most this many bytes is the prefix from the
    /// stream's first piece: its cost is small.
    pub from_start_up_to: u64,
    /// A larger one is read, hashed and indexed once the stream has
    /// carried this much content, and taken at the next piece after that.
    pub after_content: u64,
    /// ... while the link drains below this many bytes a second (None:
    /// whatever the link): on a faster one the copy is bound by the CPUs,
    /// which the reading, judging and indexing would take from it, and
    /// the bytes it saves take little time. The same bound as `auto`'s
    /// (`wire::compress`: below it the link decides).
    pub max_link_rate: Option<f64>,
    /// ... if at least this share of the stream's recent content resembles
    /// it ([`resemblance`]): taking one the content does not resemble
    /// costs the stream its history for nothing (a template clone's new
    /// files: 0.5-1.4% against 12-47% for a new release, and +6.8% bytes
    /// after it; docs/experiments.md).
    pub min_resemblance: f64,
}

impl Default for LatePolicy {
    fn default() -> Self {
        LatePolicy {
            from_start_up_to: 64 << 20,
            after_content: 16 << 20,
            max_link_rate: Some(SLOW_LINK),
            min_resemblance: 0.05,
        }
    }
}

/// Bytes a second below which a link, not the CPUs, bounds a copy:
/// `auto`'s probe rate (30 MB/s).
pub const SLOW_LINK: f64 = crate::wire::compress::PROBE_RATE;

/// One anchor in 2^12 bytes: about 4000 in the 16 MiB a stream keeps of
/// its recent content, 80000 in a 316 MB reference.
const ANCHOR_BITS: u32 = 12;
/// Fewer anchors in the sample than this say nothing.
const MIN_ANCHORS: usize = 64;

/// The share of `sample`'s content-defined anchors (`wire::sketch::anchors`)
/// that `reference` holds too: how much of what the stream sends now a
/// dictionary of `reference` could reach (a new release's changed files
/// against the old release: 12-47%; a template clone's new files against
/// the template: under 2%). None when the sample is too small to tell.
/// The reference is scanned on all cores, a few tenths of a second for
/// 316 MB.
pub fn resemblance(reference: &[u8], sample: &[u8]) -> Option<f64> {
    use crate::wire::sketch::{anchors, WINDOW};
    use rayon::prelude::*;
    let want = anchors(sample, ANCHOR_BITS);
    if want.len() < MIN_ANCHORS {
        return None;
    }
    const PIECE: usize = 8 << 20;
    let pieces = reference.len().div_ceil(PIECE);
    let have: std::collections::HashSet<u64> = (0..pieces)
        .into_par_iter()
        .map(|k| {
            // Each piece starts a window early: no anchor is lost between two.
            let from = (k * PIECE).saturating_sub(WINDOW - 1);
            anchors(&reference[from..((k + 1) * PIECE).min(reference.len())], ANCHOR_BITS)
        })
        .flatten_iter()
        .collect();
    let found = want.iter().filter(|a| have.contains(a)).count();
    Some(found as f64 / want.len() as f64)
}

impl SourceRef {
    /// The image digest this reference has (a catalog's: as listed; one
    /// found by path: the one it was chosen for, if it was).
    pub fn digest(&self) -> Option<Digest> {
        match self {
            SourceRef::Loaded(r) => Some(r.digest),
            SourceRef::Listed { digest, .. } => Some(*digest),
            SourceRef::SamePath { expect, .. } => *expect,
        }
    }

    /// Where its bytes are.
    pub fn path(&self) -> &Path {
        match self {
            SourceRef::Loaded(r) => &r.path,
            SourceRef::Listed { path, .. } | SourceRef::SamePath { path, .. } => path,
        }
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            SourceRef::Loaded(r) => r.bytes.len() as u64,
            SourceRef::Listed { layout, .. } => layout.size,
            SourceRef::SamePath { size, .. } => *size,
        }
    }

    /// Its bytes, verified: a catalog's entry is read and hashed now and
    /// kept only if its bytes still have the digest the catalog lists (one
    /// that cannot be read, or changed since the catalog was made, is left
    /// out, said in the log: the catalog only saves reads, the bytes
    /// decide).
    pub fn into_verified(self) -> Option<SharedRef> {
        let (path, catalog, digest, layout, algo) = match self {
            SourceRef::Loaded(r) => return Some(r),
            SourceRef::Listed { path, catalog, digest, layout, algo } => (path, catalog, digest, layout, algo),
            SourceRef::SamePath { path, algo, block_size, expect, .. } => {
                let expect = expect?;
                let loaded = Image::open_read(&path)
                    .map_err(EngineError::from)
                    .and_then(|img| load(&path, &img, None, algo, block_size));
                return match loaded {
                    Ok(r) if r.digest == expect => Some(r),
                    Ok(r) => {
                        log::info!(
                            "{} on this host is not the target's reference {} of its size (its bytes hash to {}): not \
                             used",
                            path.display(),
                            hex(&expect),
                            hex(&r.digest)
                        );
                        None
                    }
                    Err(e) => {
                        log::info!("{} on this host is not used as the stream's dictionary: {e}", path.display());
                        None
                    }
                };
            }
        };
        let block_size = layout.block_size;
        let loaded = Image::open_read(&path)
            .map_err(EngineError::from)
            .and_then(|img| load(&path, &img, Some(layout), algo, block_size));
        match loaded {
            Ok(r) if r.digest == digest => Some(r),
            Ok(r) => {
                log::warn!(
                    "{} is listed in catalog {} with digest {}, its bytes now hash to {}: not used (make the catalog \
                     again: xenmig index)",
                    path.display(),
                    catalog.display(),
                    hex(&digest),
                    hex(&r.digest)
                );
                None
            }
            Err(e) => {
                log::warn!("{} (in catalog {}) is not used: {e}", path.display(), catalog.display());
                None
            }
        }
    }
}

/// The source's choice among the target's `offered` references: the first
/// of `refs` with an offered digest and size, verified now
/// ([`SourceRef::into_verified`]: a catalog entry that fails is passed
/// over for the next). Each reference left out is said once in the log.
pub fn choose(refs: Vec<SourceRef>, offered: &[(Digest, u64)]) -> Option<SharedRef> {
    let is_offered = |d: &Digest, s: u64| offered.iter().any(|&(od, os)| od == *d && os == s);
    for r in refs {
        match &r {
            SourceRef::Listed { digest, layout, .. } if !is_offered(digest, layout.size) => continue,
            // (Read and hashed before the copy could start: not worth it.)
            SourceRef::SamePath { .. } => continue,
            _ => {}
        }
        let Some(r) = r.into_verified() else { continue };
        #[cfg(test)]
        let r = forged::apply(r, offered);
        let size = r.bytes.len() as u64;
        if is_offered(&r.digest, size) {
            log::info!("shared reference: {} (digest {}) is the stream's dictionary", r.path.display(), hex(&r.digest));
            return Some(r);
        }
        log::info!(
            "source reference {} ({size} bytes, digest {}) is not one the target holds; not used",
            r.path.display(),
            hex(&r.digest)
        );
    }
    None
}

/// The source's choice with `CAP_LATE_REF`: the first of `refs` with an
/// offered digest and size, not read yet (a catalog's entry, or one found
/// at a `-r` path by its size, is verified only when the stream takes it;
/// if it fails then, the stream goes on without a dictionary: no other is
/// tried, the choice having been said).
pub fn pick(refs: Vec<SourceRef>, offered: &[(Digest, u64)]) -> Option<SourceRef> {
    let is_offered = |d: &Digest, s: u64| offered.iter().any(|&(od, os)| od == *d && os == s);
    for r in refs {
        #[cfg(test)]
        let r = match r {
            SourceRef::Loaded(r) => SourceRef::Loaded(forged::apply(r, offered)),
            listed => listed,
        };
        let r = match r {
            // The first offered of its size is the one its bytes may be.
            SourceRef::SamePath { path, size, algo, block_size, .. } => {
                let expect = offered.iter().find(|o| o.1 == size).map(|o| o.0);
                SourceRef::SamePath { path, size, algo, block_size, expect }
            }
            r => r,
        };
        let Some(digest) = r.digest() else { continue };
        if is_offered(&digest, r.size()) {
            log::info!("shared reference: {} chosen (digest {})", r.path().display(), hex(&digest));
            return Some(r);
        }
        if let SourceRef::Loaded(l) = &r {
            log::info!(
                "source reference {} ({} bytes, digest {}) is not one the target holds; not used",
                l.path.display(),
                r.size(),
                hex(&digest)
            );
        }
    }
    None
}

/// Tests only: a source reference whose digest is taken from the target's
/// offer of the same size instead of from its bytes, to see what a
/// dictionary that differs between the two ends does.
#[cfg(test)]
pub(crate) mod forged {
    use super::*;
    use std::sync::Mutex;

    static PATHS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub(crate) fn forge(path: &Path) {
        PATHS.lock().unwrap().push(path.into());
    }

    pub(super) fn apply(mut r: SharedRef, offered: &[(Digest, u64)]) -> SharedRef {
        if PATHS.lock().unwrap().contains(&r.path) {
            if let Some((d, _)) = offered.iter().find(|(_, s)| *s == r.bytes.len() as u64) {
                r.digest = *d;
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::source::{self, SourceOptions};
    use crate::copy::target::{self, TargetOptions};
    use crate::copy::Progress;
    use crate::wire::transport::Link;

    /// The share of a sample's anchors a reference holds: most for edits
    /// of the reference's data wherever they lie in it, next to none for
    /// unrelated bytes; nothing said of a sample too small to tell.
    #[test]
    fn resemblance_tells_edited_copies_from_unrelated_bytes() {
        let reference = noise(3, 24 << 20);
        // 4 MiB from three places of the reference, out of order, a byte
        // in every 512 changed.
        let mut edited =
            [&reference[20 << 20..22 << 20], &reference[1 << 20..2 << 20], &reference[9 << 20..10 << 20]].concat();
        for i in (0..edited.len()).step_by(512) {
            edited[i] ^= 0x11;
        }
        let similar = resemblance(&reference, &edited).unwrap();
        assert!(similar > 0.5, "{similar}");
        let unrelated = resemblance(&reference, &noise(4, 4 << 20)).unwrap();
        assert!(unrelated < 0.01, "{unrelated}");
        assert_eq!(resemblance(&reference, &edited[..64 << 10]), None);
    }

    /// What `-r` names is looked for on the source's host: existing images
    /// and pattern matches, in order, once each; never SRC itself (by
    /// another name too), an index file, a directory or a missing path.
    #[test]
    fn same_path_candidates_leave_out_src_and_what_is_not_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        for n in ["a.img", "b.img", "src.img"] {
            std::fs::write(p(n), [1u8; 4096]).unwrap();
        }
        std::os::unix::fs::symlink(p("src.img"), p("alias.img")).unwrap();
        std::fs::write(p("cat.xmi"), [&crate::formats::index::MAGIC[..], &[0u8; 64]].concat()).unwrap();
        std::fs::create_dir(p("d.img")).unwrap();
        let entries =
            [p("b.img"), p("missing.img"), dir.path().join("*.img"), p("alias.img"), p("src.img"), p("cat.xmi")];
        let got = same_path_candidates(&entries, &p("src.img"));
        assert_eq!(got, vec![p("b.img"), p("a.img")]);
    }

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        crate::test_data::Noise::new(seed | 1).bytes(len)
    }

    /// The two ends agree on a digest but hold different bytes (the
    /// source's digest forged): blocks decoded with the wrong dictionary
    /// fail their keys, the copy fails naming the shared reference, and
    /// DST holds no block that is not the source's, or its old copy's (the
    /// target's reference, laid out as SRC, which a new DST is filled from).
    #[test]
    fn a_dictionary_that_differs_between_the_ends_fails_clearly_never_writes_a_wrong_block() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 4096;
        let blocks = 64;
        let reference = noise(3, blocks * bs);
        // The source's copy: the same size, a byte in each 1000 other.
        let mut other = reference.clone();
        for x in other.iter_mut().step_by(1000) {
            *x = x.wrapping_add(1);
        }
        // SRC is made from the source's copy: its matches are bytes the
        // target's copy does not have.
        let mut image = other.clone();
        for b in 0..blocks {
            image[b * bs + 17 * b] ^= 0x40;
        }
        let [r_t, r_s, src, dst] = ["ref-t.img", "ref-s.img", "src.img", "dst.img"].map(|n| dir.path().join(n));
        std::fs::write(&r_t, &reference).unwrap();
        std::fs::write(&r_s, &other).unwrap();
        std::fs::write(&src, &image).unwrap();
        forged::forge(&r_s);
        let (a, b) = Link::pair().unwrap();
        let (dst2, r_t2) = (dst.clone(), r_t.clone());
        let t = std::thread::spawn(move || {
            let opts = TargetOptions { references: vec![r_t2], ..TargetOptions::default() };
            target::run(&dst2, &opts, b, &Progress::hidden())
        });
        let opts = SourceOptions {
            compress: "zstd".parse().unwrap(),
            source_references: vec![r_s.clone()],
            ..SourceOptions::default()
        };
        let s = source::run(&src, &opts, a, &Progress::hidden());
        let e = t.join().unwrap().expect_err("a wrong dictionary must not give a verified copy");
        assert!(s.is_err());
        assert!(matches!(e, EngineError::SharedRefMismatch { .. }), "not a clear error: {e}");
        if let EngineError::SharedRefMismatch { path, .. } = &e {
            assert_eq!(path, &r_t);
            assert!(e.to_string().contains("--source-reference"), "{e}");
        }
        let got = std::fs::read(&dst).unwrap_or_default();
        for (i, block) in got.chunks(bs).enumerate() {
            assert!(
                block.iter().all(|&x| x == 0)
                    || block == &image[i * bs..(i + 1) * bs]
                    || block == &reference[i * bs..(i + 1) * bs],
                "DST block {i} holds bytes that are neither the source's nor its old copy's"
            );
        }
    }

    #[test]
    fn the_limits_are_the_constant_and_the_memory_available() {
        assert!(too_large(MAX_SHARED_REF + 1).unwrap().contains("limit"));
        assert_eq!(too_large(4096), None);
        if let Some(avail) = crate::copy::target::mem_available() {
            if avail / 2 < MAX_SHARED_REF {
                assert!(too_large(avail / 2 + 1).unwrap().contains("memory available"));
            }
        }
    }

    #[test]
    fn bytes_in_memory_hash_as_the_file_does() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.img");
        std::fs::write(&p, noise(9, 70_000)).unwrap();
        let img = Image::open_read(&p).unwrap();
        let layout = layout_of(&img, 4096, Align::Partitions).unwrap();
        let want = BlockMap::of_image(&img, layout, Algorithm::Blake3).unwrap().image_digest;
        let r = load(&p, &img, None, Algorithm::Blake3, 4096).unwrap();
        assert_eq!(r.digest, want);
        assert_eq!(&r.bytes[..], &std::fs::read(&p).unwrap()[..]);
    }
}

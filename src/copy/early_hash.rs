//! The source's image hashed from before the handshake.
//!
//! A remote copy starts with ssh: on the experiments' hosts the connection,
//! key exchange and the far end's start took 0.28 s, about as long as
//! hashing a 400 MB image, and the source hashed only once the far end had
//! answered. A plain copy's first pass needs nothing from the target before
//! it hashes (the layout and the digest are this end's choice), so its
//! hashing starts as soon as the image is open and runs while ssh connects;
//! the first pass then announces the groups already hashed and waits only
//! for the rest.
//!
//! A live copy (`--live`, `migrate`) still hashes after the handshake. Its
//! change tracking starts before the handshake too, so nothing in the
//! order forbids it; but its first pass also takes each block's XXH3 for
//! the later passes, and it is what the lab proves on real Xen: moving it
//! waits for a change the lab measures.

use std::thread::{self, JoinHandle};

use crossbeam_channel::{bounded, Receiver};

use crate::blocks::blockmap::{BlockMap, HashedGroup, Hashing};
use crate::blocks::digest::Algorithm;
use crate::blocks::layout::Layout;
use crate::storage::image::{Image, ImageError};

use super::interrupt;
use super::Progress;

/// Batches (of 16 groups, 16 MiB of image) hashed ahead of the first pass
/// at most: 4 GiB, more than hashing covers while ssh connects. A
/// handshake that waits (ssh asking for a password or a host key) pauses
/// the hashing there rather than holding a second copy of a large disk's
/// digests.
const AHEAD_BATCHES: usize = 256;

enum Hashed {
    /// The groups from `first` on, in order.
    Batch(u64, Vec<HashedGroup>),
    /// Every group was hashed.
    Done,
    Failed(ImageError),
}

/// The hashing thread and what it has hashed so far. Dropping it stops the
/// thread at its next batch and waits for it, so a copy that fails before
/// its first pass leaves nothing reading the image.
pub(super) struct EarlyHash {
    rx: Option<Receiver<Hashed>>,
    thread: Option<JoinHandle<()>>,
}

impl EarlyHash {
    /// Start hashing `img` (its own handle on the source image) as laid out
    /// in `layout`, counting the bytes into `progress`.
    pub(super) fn start(img: Image, layout: Layout, algo: Algorithm, progress: Progress) -> EarlyHash {
        Self::start_ahead(img, layout, algo, progress, AHEAD_BATCHES)
    }

    /// [`start`](Self::start), hashing at most `ahead` batches ahead.
    fn start_ahead(img: Image, layout: Layout, algo: Algorithm, progress: Progress, ahead: usize) -> EarlyHash {
        let (tx, rx) = bounded(ahead);
        let thread = thread::spawn(move || {
            let hashed = BlockMap::stream_with(
                &img,
                &layout,
                algo,
                Hashing::default(),
                // Stop once nobody waits for the digests (the copy failed)
                // or a signal came.
                |first, batch| tx.send(Hashed::Batch(first, batch.to_vec())).is_ok() && interrupt::pending().is_none(),
                &|n| progress.inc(n),
            );
            let _ = tx.send(match hashed {
                Ok(true) => Hashed::Done,
                Ok(false) => return,
                Err(e) => Hashed::Failed(e),
            });
        });
        EarlyHash { rx: Some(rx), thread: Some(thread) }
    }

    /// Hand every batch, in order, to `on_batch` as
    /// [`BlockMap::stream_with`] would, waiting for those not hashed yet.
    /// Ok(false): `on_batch` said stop, or the hashing stopped for a signal.
    pub(super) fn feed(mut self, mut on_batch: impl FnMut(u64, &[HashedGroup]) -> bool) -> Result<bool, ImageError> {
        let rx = self.rx.take().expect("fed once");
        for m in rx.iter() {
            match m {
                Hashed::Batch(first, batch) => {
                    if !on_batch(first, &batch) {
                        return Ok(false);
                    }
                }
                Hashed::Done => return Ok(true),
                Hashed::Failed(e) => return Err(e),
            }
        }
        Ok(false)
    }
}

impl Drop for EarlyHash {
    fn drop(&mut self) {
        // Closing the channel first makes the thread's next send fail.
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::layout::Align;
    use crate::copy::progress::Meter;
    use crate::copy::references::layout_of;
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn image(blocks: usize) -> (tempfile::NamedTempFile, Image) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for i in 0..blocks {
            // Every eighth block zero, the others distinct.
            let b: Vec<u8> = if i % 8 == 0 { vec![0; 4096] } else { (0..4096).map(|j| (i * 31 + j) as u8).collect() };
            f.write_all(&b).unwrap();
        }
        f.flush().unwrap();
        let img = Image::open_read(f.path()).unwrap();
        (f, img)
    }

    #[test]
    fn feeds_the_same_batches_as_hashing_in_place() {
        let (_f, img) = image(3000);
        let layout = layout_of(&img, 4096, Align::default()).unwrap();
        let mut direct = Vec::new();
        BlockMap::stream_with(
            &img,
            &layout,
            Algorithm::Blake3,
            Hashing::default(),
            |first, b| {
                direct.extend(b.iter().map(|g| (first, g.digest, g.blocks.clone(), g.zero.clone())));
                true
            },
            &|_| {},
        )
        .unwrap();
        let early = EarlyHash::start(img.try_clone().unwrap(), layout.clone(), Algorithm::Blake3, Progress::hidden());
        let mut fed = Vec::new();
        let done = early
            .feed(|first, b| {
                fed.extend(b.iter().map(|g| (first, g.digest, g.blocks.clone(), g.zero.clone())));
                true
            })
            .unwrap();
        assert!(done);
        assert_eq!(fed.len() as u64, layout.group_count());
        assert_eq!(fed, direct);
    }

    #[test]
    fn stopping_the_feed_says_so_and_dropping_it_ends_the_thread() {
        let (_f, img) = image(3000);
        let layout = layout_of(&img, 4096, Align::default()).unwrap();
        let early = EarlyHash::start(img, layout, Algorithm::Blake3, Progress::hidden());
        let mut batches = 0;
        assert!(!early
            .feed(|_, _| {
                batches += 1;
                false
            })
            .unwrap());
        assert_eq!(batches, 1);
        // (feed consumed it: the drop above joined the thread, or the test
        // would hang here rather than pass)
        let (_g, img) = image(16);
        let layout = layout_of(&img, 4096, Align::default()).unwrap();
        drop(EarlyHash::start(img, layout, Algorithm::Blake3, Progress::hidden()));
    }

    /// Counts the bytes hashed.
    struct Count(AtomicU64);
    impl Meter for Count {
        fn phase(&self, _: &str, _: u64) {}
        fn inc(&self, bytes: u64) {
            self.0.fetch_add(bytes, Ordering::Relaxed);
        }
        fn message(&self, _: &str) {}
    }

    #[test]
    fn hashing_waits_for_a_feed_that_starts_late() {
        // 48 MiB, mostly holes: three batches of 16 groups.
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(48 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.as_file().write_all_at(&[7u8; 4096], 20 << 20).unwrap();
        let img = Image::open_read(f.path()).unwrap();
        let layout = layout_of(&img, 4096, Align::default()).unwrap();
        let count = Arc::new(Count(AtomicU64::new(0)));
        let early = EarlyHash::start_ahead(
            img.try_clone().unwrap(),
            layout.clone(),
            Algorithm::Blake3,
            Progress::new(count.clone()),
            1,
        );
        // One batch waits in the channel, one in the send: the third is
        // not hashed while nobody feeds.
        let hashed = || count.0.load(Ordering::Relaxed);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while hashed() < 32 << 20 && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(hashed(), 32 << 20);
        let mut fed = Vec::new();
        assert!(early
            .feed(|first, b| {
                fed.extend(b.iter().map(|g| (first, g.digest)));
                true
            })
            .unwrap());
        let direct = BlockMap::of_image(&img, layout, Algorithm::Blake3).unwrap();
        assert_eq!(fed.len(), 48);
        assert_eq!(fed.iter().map(|x| x.1).collect::<Vec<_>>(), direct.groups);
    }

    #[test]
    fn a_read_error_reaches_the_feed() {
        let (f, img) = image(3000);
        let layout = layout_of(&img, 4096, Align::default()).unwrap();
        // The image shrinks under the hashing: its last groups cannot be read.
        f.as_file().set_len(4096).unwrap();
        let early = EarlyHash::start(img, layout, Algorithm::Blake3, Progress::hidden());
        assert!(early.feed(|_, _| true).is_err());
    }
}

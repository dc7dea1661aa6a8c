//! The target's index of its old copy's blocks by resemblance sketch
//! (`wire::sketch`, capability `CAP_SIMILAR`): where a block the target
//! lacks and has no old version of at the same place may find a similar
//! block to be sent as a delta against. The old copy is DST as it was, or
//! the base reference of a new DST (`copy::target`).
//!
//! Only where the link is slow. Indexing costs about a quarter of a second
//! of both cores on the quick images (450 MB old copy), and saves about a
//! tenth of the bytes of the blocks it serves (0.15 of 1.6 MB on the
//! return cell): half a second at 2 Mbit/s, 15 ms at 100 Mbit/s, where
//! the quarter of a second was most of what a return copy took beyond
//! rsync's (docs/experiments.md). So from the first block that would need
//! it, the index is built on a thread of its own ([`Building`], one core
//! at a lower priority) while the target judges the link by what arrives
//! ([`verdict`]); the blocks' sketches are asked for at once and their
//! answers wait. Fast: the build is given up and the blocks are fetched
//! whole. Slow: once the index is built, each is asked for as a delta
//! against its most similar old block, or whole.
//!
//! The index holds the blocks marked usable (non-zero, still as the old
//! copy held them), at most [`MAX_ENTRIES`] entries: a disk with more
//! non-zero blocks than that is indexed in part, its later blocks are not
//! candidates. An old copy with nothing usable gives no index, and the
//! copy fetches such blocks whole without asking for sketches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use crate::blocks::layout::Layout;
use crate::storage::disk::Disk;
use crate::storage::image::ImageError;

use super::kept::{Kept, Old};
use super::EngineError;

use crate::wire::sketch::{self, Index, SFS};

/// Entries the index holds at most (about 40 bytes each: ~60 MB), one per
/// super-feature of each block: 2^19 blocks, 2 GiB of 4 KiB blocks.
pub(super) const MAX_ENTRIES: usize = SFS << 19;

/// Bytes that, arriving at least at [`SLOW_RATE`], show the link fast.
pub(super) const PROBE_BYTES: u64 = 256 << 10;
/// Below this rate (bytes a second) the link is slow: about 4 Mbit/s.
/// At 8 Mbit/s the index's quarter of a second of CPU saves about as much
/// link time (0.15 MB on the quick images' return copy), so between 4 and
/// 8 Mbit/s fetching the blocks whole loses next to nothing. Judging at
/// 8 Mbit/s misread CPU for the link: a return copy of a 4 GiB image at
/// 100 Mbit/s, both ends hashing on two shared cores, read 0.85 MB/s, and
/// its blocks waited 1.15 s for an index it then gave up; the same image
/// into a new DST read 1.22 MB/s (docs/experiments.md, session 31).
pub(super) const SLOW_RATE: f64 = 0.5e6;

/// Longest the link may stay idle, nothing else awaited, while blocks wait
/// for an index still being built: then the build is given up and they
/// are fetched whole. Half a second of a 2 Mbit/s link carries about
/// what the index saves on the quick images' return copy (0.15 MB);
/// waiting longer cannot pay, and a thread starved of CPU (it runs at a
/// lower priority) must not hold the copy.
pub(super) const IDLE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// What to do about the index while blocks wait for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Not known yet: the blocks go on waiting.
    Wait,
    /// The link is slow: the blocks wait for the index.
    Build,
    /// The link is fast, or nothing else is coming to judge it by: the
    /// build is given up and the waiting blocks are fetched whole.
    Skip,
}

/// The verdict on the link, `read` bytes having arrived in `elapsed`
/// since the first block began to wait; `idle`: no other reply is
/// awaited, so nothing more will arrive to judge by (and the copy would
/// only wait).
pub(super) fn verdict(read: u64, elapsed: std::time::Duration, idle: bool) -> Verdict {
    let secs = elapsed.as_secs_f64();
    if read >= PROBE_BYTES {
        return if read as f64 >= SLOW_RATE * secs { Verdict::Skip } else { Verdict::Build };
    }
    // (Less than PROBE_BYTES in this long is less than SLOW_RATE.)
    if secs >= PROBE_BYTES as f64 / SLOW_RATE {
        return Verdict::Build;
    }
    if idle {
        Verdict::Skip
    } else {
        Verdict::Wait
    }
}

/// How much lower than the copy's threads the index's runs (nice).
const NICE: i32 = 10;

/// An index being built on a thread of its own. Dropped (the copy ended,
/// or the link was judged fast), it tells the thread to stop.
pub(super) struct Building {
    handle: Option<thread::JoinHandle<Result<Option<Index>, ImageError>>>,
    stop: Arc<AtomicBool>,
}

impl Building {
    /// Index the blocks of `old` marked in `wanted` (non-zero, still as
    /// the old copy held them) on a thread of its own, at a lower
    /// priority, reading one group at a time. One core, and only what the
    /// copy leaves: built on both cores it delayed the source's judgement
    /// of a slow link (both ends on one 2-core host: the stream's level 19
    /// came after 1.6 s of slow drain instead of 0.6 s).
    /// `kept`: in place, where DST's old blocks go before their first
    /// write (`copy::kept`): a block rewritten while indexed is indexed as
    /// it was kept, or not at all.
    pub(super) fn spawn(
        old: Arc<dyn Disk>,
        kept: Option<Arc<Mutex<Kept>>>,
        layout: Layout,
        wanted: Vec<bool>,
        cap: usize,
    ) -> Building {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = thread::Builder::new()
            .name("xenmig-similar".into())
            .spawn(move || {
                // SAFETY: a plain syscall on this thread's own id; a
                // failure leaves the priority as it was, which is only
                // slower for the copy.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE);
                }
                build(&*old, kept.as_deref(), &layout, &wanted, cap, &stopped)
            })
            .expect("spawning a thread");
        Building { handle: Some(handle), stop }
    }

    /// The index once built (None inside where nothing was indexed); None
    /// while the thread still works.
    pub(super) fn take(&mut self) -> Result<Option<Option<Index>>, EngineError> {
        if !self.handle.as_ref().is_some_and(|h| h.is_finished()) {
            return Ok(None);
        }
        let handle = self.handle.take().expect("checked above");
        let index =
            handle.join().map_err(|_| EngineError::Aborted("the similar blocks' index thread panicked".into()))??;
        Ok(Some(index))
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// [`Building::spawn`]'s work, in the calling thread, until `stop`.
fn build(
    old: &dyn Disk,
    kept: Option<&Mutex<Kept>>,
    layout: &Layout,
    wanted: &[bool],
    cap: usize,
    stop: &AtomicBool,
) -> Result<Option<Index>, ImageError> {
    let started = std::time::Instant::now();
    let mut index = Index::new(cap);
    let mut indexed = 0u64;
    let mut buf = Vec::new();
    'groups: for g in 0..layout.group_count() {
        if stop.load(Ordering::Relaxed) {
            log::debug!("similar blocks: indexing stopped after {indexed} blocks");
            return Ok(None);
        }
        let (a, b) = layout.group_range(g);
        let blocks: Vec<u64> = (a..b).filter(|&i| wanted[i as usize]).collect();
        let (Some(&first), Some(&last)) = (blocks.first(), blocks.last()) else { continue };
        let (start, _) = layout.extent(first);
        let (end_off, end_len) = layout.extent(last);
        buf.resize((end_off + end_len as u64 - start) as usize, 0);
        old.read_at(&mut buf, start)?;
        for i in blocks {
            let (off, len) = layout.extent(i);
            let at = (off - start) as usize;
            // Read first, then asked where the old bytes are: the target
            // marks a block before it writes it (`copy::kept`).
            let kept = kept.map(|k| k.lock().expect("the kept blocks' lock"));
            let s = match kept.as_ref().map(|k| k.old(i)) {
                None | Some(Old::InDst) => sketch::sketch(&buf[at..at + len]),
                Some(Old::Kept(b)) => sketch::sketch(b),
                Some(Old::Gone) => None,
            };
            drop(kept);
            let Some(s) = s else { continue };
            if !index.insert(i, &s) {
                break 'groups;
            }
            indexed += 1;
        }
    }
    log::debug!(
        "similar blocks: {indexed} blocks of the old copy indexed ({} entries) in {:.2} s",
        index.len(),
        started.elapsed().as_secs_f64()
    );
    Ok((!index.is_empty()).then_some(index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_link_is_judged_by_what_arrives_while_blocks_wait() {
        let ms = Duration::from_millis;
        // 100 Mbit/s: 256 KiB within 21 ms.
        assert_eq!(verdict(PROBE_BYTES, ms(21), false), Verdict::Skip);
        // 2 Mbit/s: about 100 KB in 400 ms, 131 KB when the time is up
        // (256 KiB at 0.5 MB/s: 524 ms).
        assert_eq!(verdict(100_000, ms(400), false), Verdict::Wait);
        assert_eq!(verdict(131_000, ms(525), false), Verdict::Build);
        // Enough bytes, but slowly (a burst held in buffers counts too).
        assert_eq!(verdict(PROBE_BYTES + 1, ms(800), false), Verdict::Build);
        // Both ends busy on shared cores at 100 Mbit/s, 0.85 MB/s arriving
        // (session 31's 4 GiB return, in place): not slow. Judged slow at
        // 299 ms before; now not yet, and fast once 256 KiB are in.
        assert_eq!(verdict(254_489, ms(299), false), Verdict::Wait);
        assert_eq!(verdict(PROBE_BYTES, ms(308), false), Verdict::Skip);
        // Nothing else awaited: no reason to wait, nothing to judge by.
        assert_eq!(verdict(10, ms(5), true), Verdict::Skip);
        // Idle but already known slow.
        assert_eq!(verdict(10, ms(600), true), Verdict::Build);
    }
}

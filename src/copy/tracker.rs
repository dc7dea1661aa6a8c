//! How a live copy finds what changed between passes: the
//! [`ChangeTracker`] trait and its three kinds. [`Reread`] re-reads every
//! block and compares its XXH3 with the value read when its strong digest
//! was taken (any file or device); [`FullRehash`] recomputes every strong
//! digest (the seed's way, kept to measure against); [`SnapTracker`] asks
//! device-mapper snapshots of an LVM logical volume which chunks were
//! written, so that nothing else is read (`--rescan lvm-snapshot`).
//!
//! The snapshot tracker:
//!
//! A snapshot taken at the start of a pass records, in its exception table,
//! every origin chunk written after it was taken. At the end of the pass a
//! new snapshot is taken first, then the old one's table is read and the old
//! one removed: no write falls between the two. So each pass learns exactly
//! which chunks changed without reading the disk, and the frozen pass costs
//! what changed, not what the disk holds. Snapshots are removed afterwards,
//! also on failure.
//!
//! Taking and removing a snapshot take seconds under emulation (4 and 3 s
//! idle in the lab, 10 or more while xl copies memory), and a migration's
//! source is suspended by xl at a moment nobody chooses. So no pass waits
//! for an LVM command once the source is frozen: a snapshot is taken in a
//! thread, and a pass that learns meanwhile that the source froze (the
//! flag given to [`ChangeTracker::watch_freeze`]) stops waiting and finds
//! nothing; the last call then reads the current snapshot, which holds
//! every write since it was taken. Old snapshots are removed by a thread
//! of their own, never by the pass that read them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, SendError, Sender};

use crate::storage::dmsnap;
use crate::storage::lvm::{LvRef, Lvm};

use super::source::Rescan;
use super::EngineError;
use crate::blocks::layout::Layout;

/// How a re-read block is judged changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compare {
    /// Its XXH3 against the one read when its strong digest was taken; the
    /// strong digest is recomputed only for blocks that differ.
    Fast,
    /// Its strong digest, recomputed, against the one last announced.
    Strong,
}

/// What to re-read after a live pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Candidates {
    /// Every block, compared as said.
    All(Compare),
    /// Only these blocks (they were written), compared by strong digest.
    Only(BTreeSet<u64>),
}

/// Finds the blocks of a live source that may have changed since the last
/// call (or since tracking started). `last` is the call made while the
/// source is frozen: nothing needs tracking after it.
pub trait ChangeTracker: Send + Sync {
    fn candidates(&mut self, layout: &Layout, last: bool) -> Result<Candidates, EngineError>;
    /// What `--rescan` calls it.
    fn name(&self) -> &'static str;
    /// `frozen` is set once the source stops changing (xl suspended the
    /// guest): from then on no call waits for a slow tracking step; what it
    /// would have found, the last call finds.
    fn watch_freeze(&mut self, _frozen: Arc<AtomicBool>) {}
}

/// `--rescan fast`: re-read everything, compare XXH3s.
pub struct Reread;

impl ChangeTracker for Reread {
    fn candidates(&mut self, _: &Layout, _: bool) -> Result<Candidates, EngineError> {
        Ok(Candidates::All(Compare::Fast))
    }
    fn name(&self) -> &'static str {
        "fast"
    }
}

/// `--rescan full`: re-read everything, recompute every strong digest.
pub struct FullRehash;

impl ChangeTracker for FullRehash {
    fn candidates(&mut self, _: &Layout, _: bool) -> Result<Candidates, EngineError> {
        Ok(Candidates::All(Compare::Strong))
    }
    fn name(&self) -> &'static str {
        "full"
    }
}

/// The tracker `--rescan` names, started on the image at `path` of `size`
/// bytes (a snapshot tracker fails here, before the target is touched, when
/// `path` is not a logical volume).
pub fn start(rescan: Rescan, path: &Path, size: u64) -> Result<Box<dyn ChangeTracker>, EngineError> {
    Ok(match rescan {
        Rescan::Fast => Box::new(Reread),
        Rescan::Full => Box::new(FullRehash),
        Rescan::LvmSnapshot => Box::new(SnapTracker::start(path, size)?),
        Rescan::Auto => match SnapTracker::start(path, size) {
            Ok(t) => Box::new(t),
            Err(e) => {
                log::warn!("{}: passes re-read the disk (--rescan fast): {e}", path.display());
                Box::new(Reread)
            }
        },
    })
}

impl ChangeTracker for SnapTracker {
    fn candidates(&mut self, layout: &Layout, last: bool) -> Result<Candidates, EngineError> {
        Ok(match self.changed(last)? {
            // Overflowed: this pass re-reads everything.
            None => Candidates::All(Compare::Fast),
            Some(ranges) => {
                let mut blocks = BTreeSet::new();
                for (start, end) in ranges {
                    let end = end.min(layout.size);
                    if start < end {
                        blocks.extend(layout.block_at(start)..=layout.block_at(end - 1));
                    }
                }
                Candidates::Only(blocks)
            }
        })
    }
    fn name(&self) -> &'static str {
        "lvm-snapshot"
    }
    fn watch_freeze(&mut self, frozen: Arc<AtomicBool>) {
        self.frozen = Some(frozen);
    }
}

/// A job in a thread of its own (an LVM command) whose waiter may stop
/// waiting: the job runs to its end anyway (an lvm2 command killed half
/// way could leave a device suspended), and its result is collected later.
pub struct Background<T> {
    rx: Receiver<T>,
    thread: JoinHandle<()>,
}

impl<T: Send + 'static> Background<T> {
    pub fn start(job: impl FnOnce() -> T + Send + 'static) -> Background<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::spawn(move || {
            let _ = tx.send(job());
        });
        Background { rx, thread }
    }

    /// The result, or `Err(self)` as soon as `give_up` is set (polled every
    /// 20 ms) while the job still runs.
    pub fn wait_unless(self, give_up: Option<&AtomicBool>) -> Result<T, Background<T>> {
        loop {
            match self.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(t) => {
                    let _ = self.thread.join();
                    return Ok(t);
                }
                Err(RecvTimeoutError::Timeout) if give_up.is_some_and(|g| g.load(Ordering::SeqCst)) => {
                    return Err(self)
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The job panicked: join says so.
                    let e = self.thread.join().err();
                    std::panic::resume_unwind(e.unwrap_or_else(|| Box::new("background job ended without a result")));
                }
            }
        }
    }

    /// The result, however long it takes.
    pub fn wait(self) -> T {
        match self.wait_unless(None) {
            Ok(t) => t,
            Err(_) => unreachable!("nothing to give up on"),
        }
    }
}

pub struct SnapTracker {
    lvm: Lvm,
    origin: LvRef,
    /// The snapshot whose table the next call reads.
    current: Option<LvRef>,
    /// A snapshot being taken, which a frozen source stopped waiting for.
    taking: Option<Background<Result<LvRef, EngineError>>>,
    /// Removes read snapshots, one after another (see [`Remover`]).
    remover: Remover,
    /// Read by the last call; removed on drop, after the thaw.
    retired: Option<LvRef>,
    seq: u32,
    cow_bytes: u64,
    frozen: Option<Arc<AtomicBool>>,
    /// Where device-mapper's nodes are (`/dev/mapper`).
    mapper: PathBuf,
}

/// Removes snapshots in a thread: `lvremove` takes seconds under emulation,
/// and the pass that read a snapshot must not wait for its removal (the
/// source may be frozen by then). Dropping it waits for what is queued.
#[derive(Default)]
struct Remover {
    queue: Option<(Sender<LvRef>, JoinHandle<()>)>,
}

impl Remover {
    fn remove(&mut self, lvm: &Lvm, snap: LvRef) {
        let (tx, _) = self.queue.get_or_insert_with(|| {
            let (tx, rx) = crossbeam_channel::unbounded::<LvRef>();
            let lvm = lvm.clone();
            let thread = std::thread::spawn(move || {
                for snap in rx {
                    match lvm.remove(&snap) {
                        Ok(()) => log::debug!("change tracking: removed snapshot {snap}"),
                        Err(e) => log::error!("could not remove tracking snapshot {snap}: {e}"),
                    }
                }
            });
            (tx, thread)
        });
        if let Err(SendError(snap)) = tx.send(snap) {
            // The thread is gone (it panicked): remove here.
            if let Err(e) = lvm.remove(&snap) {
                log::error!("could not remove tracking snapshot {snap}: {e}");
            }
        }
    }
}

impl Drop for Remover {
    fn drop(&mut self) {
        if let Some((tx, thread)) = self.queue.take() {
            drop(tx);
            let _ = thread.join();
        }
    }
}

/// The names of the tracking snapshots process `pid` takes begin with
/// this (then a sequence number): a process killed before it removed them
/// leaves them, and `migrate --recover` finds them by it.
pub fn snapshot_prefix(pid: u32) -> String {
    format!("xenmigtrack{pid}s")
}

/// The device-mapper name of `vg/lv`: each `-` inside a name is doubled.
fn dm_name(r: &LvRef) -> String {
    format!("{}-{}", r.vg.replace('-', "--"), r.lv.replace('-', "--"))
}

/// The COW device of snapshot `r`.
pub fn cow_path(r: &LvRef) -> PathBuf {
    cow_path_in(Path::new("/dev/mapper"), r)
}

fn cow_path_in(mapper: &Path, r: &LvRef) -> PathBuf {
    mapper.join(format!("{}-cow", dm_name(r)))
}

fn lvm_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tracking(e.to_string())
}

impl SnapTracker {
    /// Start tracking the LV at `path`, whose size is `size` bytes: take the
    /// first snapshot. Its COW area gets a quarter of the origin (at least
    /// 8 MiB); a snapshot that overflows is detected and that pass falls back
    /// to a full re-read.
    pub fn start(path: &Path, size: u64) -> Result<SnapTracker, EngineError> {
        Self::start_with(Lvm::new(), Path::new("/dev/mapper"), path, size)
    }

    /// [`start`](Self::start) with these lvm2 commands and device-mapper
    /// nodes in `mapper` (tests: fake commands).
    pub fn start_with(lvm: Lvm, mapper: &Path, path: &Path, size: u64) -> Result<SnapTracker, EngineError> {
        let lv = lvm.lv_for_path(path).map_err(lvm_err)?.ok_or_else(|| {
            EngineError::Tracking(format!(
                "--rescan lvm-snapshot needs a logical volume source; {} is not one",
                path.display()
            ))
        })?;
        let mut t = SnapTracker {
            lvm,
            origin: lv.lv_ref(),
            current: None,
            taking: None,
            remover: Remover::default(),
            retired: None,
            seq: 0,
            cow_bytes: (size / 4).max(8 << 20),
            frozen: None,
            mapper: mapper.to_path_buf(),
        };
        t.current = Some(t.take().wait()?);
        Ok(t)
    }

    /// Start taking the next snapshot.
    fn take(&mut self) -> Background<Result<LvRef, EngineError>> {
        self.seq += 1;
        let name = format!("{}{}", snapshot_prefix(std::process::id()), self.seq);
        let (lvm, origin, cow) = (self.lvm.clone(), self.origin.clone(), self.cow_bytes);
        Background::start(move || {
            let snap = lvm.snapshot(&origin, &name, cow).map_err(lvm_err)?;
            log::debug!("change tracking: took snapshot {}", snap.lv_ref());
            Ok(snap.lv_ref())
        })
    }

    /// Byte ranges of the origin written since the last call (or since
    /// `start`). Unless `last`, a new snapshot keeps tracking. None when the
    /// snapshot overflowed and the caller must re-read everything.
    ///
    /// A call that is not `last` and learns, while the next snapshot is
    /// being taken, that the source froze returns no ranges at once: the
    /// current snapshot keeps every write since it was taken, and the last
    /// call reads it.
    pub fn changed(&mut self, last: bool) -> Result<Option<Vec<(u64, u64)>>, EngineError> {
        if !last {
            let taking = match self.taking.take() {
                Some(t) => t,
                None => self.take(),
            };
            match taking.wait_unless(self.frozen.as_deref()) {
                Ok(next) => {
                    let next = next?;
                    let cur = self.current.replace(next).expect("a snapshot is tracking");
                    let table = dmsnap::read_cow_device(&cow_path_in(&self.mapper, &cur));
                    self.remover.remove(&self.lvm, cur.clone());
                    return Self::ranges(&cur, table);
                }
                Err(taking) => {
                    log::info!("change tracking: the source froze while a snapshot was taken; the last pass reads the current one");
                    self.taking = Some(taking);
                    return Ok(Some(Vec::new()));
                }
            }
        }
        // The last call: the source is frozen, no new snapshot is needed (a
        // snapshot still being taken is removed on drop).
        let cur = self.current.take().expect("a snapshot is tracking");
        let table = dmsnap::read_cow_device(&cow_path_in(&self.mapper, &cur));
        self.retired = Some(cur.clone());
        Self::ranges(&cur, table)
    }

    fn ranges(
        cur: &LvRef,
        table: Result<dmsnap::ExceptionTable, dmsnap::DmSnapError>,
    ) -> Result<Option<Vec<(u64, u64)>>, EngineError> {
        let table = table.map_err(lvm_err)?;
        if !table.valid {
            log::warn!("snapshot {cur} overflowed; this pass re-reads the whole volume");
            return Ok(None);
        }
        Ok(Some(table.ranges().collect()))
    }
}

impl Drop for SnapTracker {
    fn drop(&mut self) {
        let mut left: Vec<LvRef> = [self.current.take(), self.retired.take()].into_iter().flatten().collect();
        if let Some(t) = self.taking.take() {
            // Taken after all (or failed): it goes too.
            if let Ok(snap) = t.wait() {
                left.push(snap);
            }
        }
        for snap in left {
            self.remover.remove(&self.lvm, snap);
        }
        // The remover's drop (after this) waits for the queue.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_rereading_a_source_that_is_no_lv() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("disk.img");
        std::fs::write(&f, vec![0u8; 1 << 16]).unwrap();
        let t = start(Rescan::Auto, &f, 1 << 16).unwrap();
        assert_eq!(t.name(), Reread.name());
        assert!(start(Rescan::LvmSnapshot, &f, 1 << 16).is_err());
    }

    #[test]
    fn rescan_and_align_names_read_back() {
        for r in [Rescan::Fast, Rescan::Full, Rescan::LvmSnapshot, Rescan::Auto] {
            assert_eq!(r.name().parse::<Rescan>().unwrap(), r);
        }
        use crate::blocks::layout::Align;
        for a in [Align::Partitions, Align::Flat] {
            assert_eq!(a.to_string().parse::<Align>().unwrap(), a);
        }
    }

    #[test]
    fn rereading_trackers_name_their_comparison() {
        let layout = Layout::flat(1 << 20, 4096).unwrap();
        let mut t = start(Rescan::Fast, Path::new("/nonexistent"), 1 << 20).unwrap();
        assert_eq!(t.candidates(&layout, false).unwrap(), Candidates::All(Compare::Fast));
        assert_eq!(t.name(), "fast");
        let mut t = start(Rescan::Full, Path::new("/nonexistent"), 1 << 20).unwrap();
        assert_eq!(t.candidates(&layout, true).unwrap(), Candidates::All(Compare::Strong));
        assert_eq!(t.name(), "full");
    }

    #[test]
    fn a_background_job_is_waited_for_until_the_source_freezes() {
        let frozen = AtomicBool::new(false);
        let (go, wait) = crossbeam_channel::bounded::<()>(0);
        let job = Background::start(move || {
            wait.recv().unwrap();
            7
        });
        frozen.store(true, Ordering::SeqCst);
        // Frozen while the job runs: the waiter gets the job back.
        let job = match job.wait_unless(Some(&frozen)) {
            Err(job) => job,
            Ok(v) => panic!("the job cannot have ended: {v}"),
        };
        // The job runs on, and its result is still there to collect.
        go.send(()).unwrap();
        assert_eq!(job.wait(), 7);
        // A job that ends is waited for while not frozen.
        frozen.store(false, Ordering::SeqCst);
        assert_eq!(Background::start(|| 8).wait_unless(Some(&frozen)).ok(), Some(8));
    }

    #[test]
    fn cow_paths_follow_device_mapper_naming() {
        assert_eq!(cow_path(&LvRef::new("vg0", "snap1")), PathBuf::from("/dev/mapper/vg0-snap1-cow"));
        assert_eq!(cow_path(&LvRef::new("my-vg", "a-b")), PathBuf::from("/dev/mapper/my--vg-a--b-cow"));
    }
}

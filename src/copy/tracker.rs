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

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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
}

pub struct SnapTracker {
    lvm: Lvm,
    origin: LvRef,
    current: Option<LvRef>,
    /// Read but not yet removed: removing a snapshot takes seconds under
    /// emulation, so the last one is removed after the thaw, on drop.
    retired: Option<LvRef>,
    seq: u32,
    cow_bytes: u64,
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
    PathBuf::from(format!("/dev/mapper/{}-cow", dm_name(r)))
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
        let lvm = Lvm::new();
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
            retired: None,
            seq: 0,
            cow_bytes: (size / 4).max(8 << 20),
        };
        t.current = Some(t.take()?);
        Ok(t)
    }

    fn take(&mut self) -> Result<LvRef, EngineError> {
        self.seq += 1;
        let name = format!("{}{}", snapshot_prefix(std::process::id()), self.seq);
        let snap = self.lvm.snapshot(&self.origin, &name, self.cow_bytes).map_err(lvm_err)?;
        log::debug!("change tracking: took snapshot {}", snap.lv_ref());
        Ok(snap.lv_ref())
    }

    /// Byte ranges of the origin written since the last call (or since
    /// `start`). Unless `last`, a new snapshot keeps tracking. None when the
    /// snapshot overflowed and the caller must re-read everything.
    pub fn changed(&mut self, last: bool) -> Result<Option<Vec<(u64, u64)>>, EngineError> {
        let next = if last { None } else { Some(self.take()?) };
        let cur = self.current.take().expect("a snapshot is tracking");
        self.current = next;
        let table = dmsnap::read_cow_device(&cow_path(&cur));
        if last {
            self.retired = Some(cur.clone());
        } else {
            self.lvm.remove(&cur).map_err(lvm_err)?;
        }
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
        for snap in [self.current.take(), self.retired.take()].into_iter().flatten() {
            if let Err(e) = self.lvm.remove(&snap) {
                log::error!("could not remove tracking snapshot {snap}: {e}");
            }
        }
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
    fn cow_paths_follow_device_mapper_naming() {
        assert_eq!(cow_path(&LvRef::new("vg0", "snap1")), PathBuf::from("/dev/mapper/vg0-snap1-cow"));
        assert_eq!(cow_path(&LvRef::new("my-vg", "a-b")), PathBuf::from("/dev/mapper/my--vg-a--b-cow"));
    }
}

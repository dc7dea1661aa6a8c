//! Change tracking of an LVM logical volume through device-mapper
//! snapshots, for live copies (`--rescan lvm-snapshot`).
//!
//! A snapshot taken at the start of a pass records, in its exception table,
//! every origin chunk written after it was taken. At the end of the pass a
//! new snapshot is taken first, then the old one's table is read and the old
//! one removed: no write falls between the two. So each pass learns exactly
//! which chunks changed without reading the disk, and the frozen pass costs
//! what changed, not what the disk holds. Snapshots are removed afterwards,
//! also on failure.

use std::path::{Path, PathBuf};

use crate::storage::dmsnap;
use crate::storage::lvm::{LvRef, Lvm};

use super::EngineError;

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

/// The device-mapper name of `vg/lv`: each `-` inside a name is doubled.
fn dm_name(r: &LvRef) -> String {
    format!("{}-{}", r.vg.replace('-', "--"), r.lv.replace('-', "--"))
}

/// The COW device of snapshot `r`.
pub fn cow_path(r: &LvRef) -> PathBuf {
    PathBuf::from(format!("/dev/mapper/{}-cow", dm_name(r)))
}

fn lvm_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Other(format!("change tracking: {e}"))
}

impl SnapTracker {
    /// Start tracking the LV at `path`, whose size is `size` bytes: take the
    /// first snapshot. Its COW area gets a quarter of the origin (at least
    /// 8 MiB); a snapshot that overflows is detected and that pass falls back
    /// to a full re-read.
    pub fn start(path: &Path, size: u64) -> Result<SnapTracker, EngineError> {
        let lvm = Lvm::new();
        let lv = lvm.lv_for_path(path).map_err(lvm_err)?.ok_or_else(|| {
            EngineError::Other(format!(
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
        let name = format!("xenmigtrack{}s{}", std::process::id(), self.seq);
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
    fn cow_paths_follow_device_mapper_naming() {
        assert_eq!(cow_path(&LvRef::new("vg0", "snap1")), PathBuf::from("/dev/mapper/vg0-snap1-cow"));
        assert_eq!(cow_path(&LvRef::new("my-vg", "a-b")), PathBuf::from("/dev/mapper/my--vg-a--b-cow"));
    }
}

//! A test double: a [`Disk`] that passes everything to a real one except
//! what its [`FaultPlan`] says to break. Fault tests use it to make a target
//! fail the way hardware and full file systems do (EIO on a read or write at
//! a chosen offset, ENOSPC, short reads and writes, a write that lands
//! changed, a device that hangs) without shell stubs or device-mapper. Not used by xenmig itself.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::disk::Disk;

/// Which operation a rule breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    /// Writes, and hole punching (a freed range is a write too).
    Write,
    Sync,
}

/// What happens to an operation a rule catches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fails with this errno (`libc::EIO`, `libc::ENOSPC`...).
    Errno(i32),
    /// Transfers only half of what was asked (at least one byte); the
    /// caller must come back for the rest.
    Short,
    /// Reports success, but what lands differs from what was given (its
    /// first byte inverted): a device or another writer changing the data
    /// under the copy.
    Changed,
    /// Hangs this long (a device that stopped answering), then goes on.
    Stall(std::time::Duration),
}

/// One fault: `fault` on operations `op` that touch `[from, to)`, at most
/// `times` times (None: every time).
#[derive(Clone, Debug)]
pub struct Rule {
    pub op: Op,
    pub from: u64,
    pub to: u64,
    pub fault: Fault,
    pub times: Option<u32>,
}

impl Rule {
    /// `fault` on every `op` anywhere.
    pub fn always(op: Op, fault: Fault) -> Rule {
        Rule { op, from: 0, to: u64::MAX, fault, times: None }
    }

    /// `fault` once, on the first `op` touching `[from, to)`.
    pub fn once_at(op: Op, from: u64, to: u64, fault: Fault) -> Rule {
        Rule { op, from, to, fault, times: Some(1) }
    }
}

/// The faults to inject, shared between the test and the disk. Rules apply
/// only while the plan is armed (so that a test can let a copy reach a
/// phase first); [`fired`](Self::fired) counts the faults injected.
#[derive(Debug, Default)]
pub struct FaultPlan {
    rules: Mutex<Vec<Rule>>,
    armed: AtomicBool,
    fired: AtomicU64,
}

impl FaultPlan {
    /// A plan holding `rules`, armed or not.
    pub fn new(rules: Vec<Rule>, armed: bool) -> Arc<FaultPlan> {
        Arc::new(FaultPlan { rules: Mutex::new(rules), armed: AtomicBool::new(armed), fired: AtomicU64::new(0) })
    }

    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Faults injected so far.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::SeqCst)
    }

    /// The fault for `op` on `[offset, offset+len)`, if a rule catches it
    /// (and uses up one of its times).
    fn take(&self, op: Op, offset: u64, len: u64) -> Option<Fault> {
        if !self.armed.load(Ordering::SeqCst) {
            return None;
        }
        let end = offset.saturating_add(len.max(1));
        let mut rules = self.rules.lock().expect("fault plan lock");
        let rule = rules.iter_mut().find(|r| r.op == op && offset < r.to && end > r.from && r.times != Some(0))?;
        if let Some(t) = rule.times.as_mut() {
            *t -= 1;
        }
        self.fired.fetch_add(1, Ordering::SeqCst);
        Some(rule.fault)
    }
}

/// A disk that breaks what its plan says and passes the rest to `inner`.
#[derive(Debug)]
pub struct FaultyDisk {
    inner: Box<dyn Disk>,
    plan: Arc<FaultPlan>,
}

impl FaultyDisk {
    pub fn new(inner: Box<dyn Disk>, plan: Arc<FaultPlan>) -> FaultyDisk {
        FaultyDisk { inner, plan }
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl Disk for FaultyDisk {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn is_block_device(&self) -> bool {
        self.inner.is_block_device()
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self.plan.take(Op::Read, offset, buf.len() as u64) {
            None | Some(Fault::Changed) => self.inner.pread(buf, offset),
            Some(Fault::Stall(d)) => {
                std::thread::sleep(d);
                self.inner.pread(buf, offset)
            }
            Some(Fault::Errno(e)) => Err(errno(e)),
            Some(Fault::Short) => {
                let half = (buf.len() / 2).max(1).min(buf.len());
                self.inner.pread(&mut buf[..half], offset)
            }
        }
    }

    fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        match self.plan.take(Op::Write, offset, buf.len() as u64) {
            None => self.inner.pwrite(buf, offset),
            Some(Fault::Stall(d)) => {
                std::thread::sleep(d);
                self.inner.pwrite(buf, offset)
            }
            Some(Fault::Errno(e)) => Err(errno(e)),
            Some(Fault::Short) => {
                let half = (buf.len() / 2).max(1).min(buf.len());
                self.inner.pwrite(&buf[..half], offset)
            }
            Some(Fault::Changed) => {
                let mut changed = buf.to_vec();
                if let Some(b) = changed.first_mut() {
                    *b = !*b;
                }
                self.inner.pwrite(&changed, offset)
            }
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        match self.plan.take(Op::Write, offset, len) {
            Some(Fault::Errno(e)) => Err(errno(e)),
            Some(Fault::Stall(d)) => {
                std::thread::sleep(d);
                self.inner.punch_hole(offset, len)
            }
            // A short or changed hole: none at all; the caller writes zeros
            // (through pwrite, where the plan sees them again).
            Some(_) => Ok(false),
            None => self.inner.punch_hole(offset, len),
        }
    }

    fn flush(&self) -> io::Result<()> {
        match self.plan.take(Op::Sync, 0, 0) {
            Some(Fault::Errno(e)) => Err(errno(e)),
            Some(Fault::Stall(d)) => {
                std::thread::sleep(d);
                self.inner.flush()
            }
            _ => self.inner.flush(),
        }
    }

    fn drop_cache(&self) {
        self.inner.drop_cache()
    }

    fn evict(&self, offset: u64, len: u64) {
        self.inner.evict(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::image::{Image, ImageError};

    fn disk(rules: Vec<Rule>) -> (tempfile::TempDir, FaultyDisk, Arc<FaultPlan>) {
        let d = tempfile::tempdir().unwrap();
        let (img, _) = Image::open_target(&d.path().join("t.img"), 1 << 16).unwrap();
        let plan = FaultPlan::new(rules, true);
        (d, FaultyDisk::new(Box::new(img), plan.clone()), plan)
    }

    #[test]
    fn short_transfers_are_completed_by_the_loops() {
        let (_d, disk, plan) = disk(vec![
            Rule { times: Some(3), ..Rule::always(Op::Write, Fault::Short) },
            Rule { times: Some(3), ..Rule::always(Op::Read, Fault::Short) },
        ]);
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        disk.write_at(&data, 8192).unwrap();
        let mut back = vec![0u8; 4096];
        disk.read_at(&mut back, 8192).unwrap();
        assert_eq!(back, data);
        assert_eq!(plan.fired(), 6, "every short transfer was injected and completed");
    }

    #[test]
    fn errors_hit_only_the_chosen_range_and_name_it() {
        let (_d, disk, plan) = disk(vec![Rule::once_at(Op::Write, 4096, 8192, Fault::Errno(libc::EIO))]);
        disk.write_at(&[1u8; 4096], 0).unwrap();
        let e = disk.write_at(&[1u8; 4096], 4096).unwrap_err();
        assert!(matches!(e, ImageError::Write { offset: 4096, .. }), "{e}");
        assert!(e.to_string().contains("t.img") && e.to_string().contains("Input/output error"), "{e}");
        // Once only: the next write there goes through.
        disk.write_at(&[1u8; 4096], 4096).unwrap();
        assert_eq!(plan.fired(), 1);
    }

    #[test]
    fn a_full_disk_refuses_writes_and_holes_alike() {
        let (_d, disk, _) = disk(vec![Rule::always(Op::Write, Fault::Errno(libc::ENOSPC))]);
        let e = disk.write_at(&[1u8; 512], 0).unwrap_err().to_string();
        assert!(e.contains("No space left"), "{e}");
        let e = disk.zero_range(0, 4096).unwrap_err().to_string();
        assert!(e.contains("No space left"), "{e}");
    }

    #[test]
    fn a_changed_write_reports_success_and_lands_different() {
        let (_d, disk, _) = disk(vec![Rule::once_at(Op::Write, 0, 1, Fault::Changed)]);
        disk.write_at(&[7u8; 512], 0).unwrap();
        let mut back = [0u8; 512];
        disk.read_at(&mut back, 0).unwrap();
        assert_eq!(back[0], !7u8);
        assert_eq!(back[1..], [7u8; 511]);
    }

    #[test]
    fn an_unarmed_plan_injects_nothing_and_sync_can_fail() {
        let d = tempfile::tempdir().unwrap();
        let (img, _) = Image::open_target(&d.path().join("t.img"), 4096).unwrap();
        let plan = FaultPlan::new(vec![Rule::always(Op::Sync, Fault::Errno(libc::EIO))], false);
        let disk = FaultyDisk::new(Box::new(img), plan.clone());
        disk.sync().unwrap();
        plan.arm();
        assert!(matches!(disk.sync(), Err(ImageError::Sync { .. })));
        assert_eq!(plan.fired(), 1);
    }
}

//! Writeback started while a copy still runs.
//!
//! A copy that writes a whole disk would otherwise leave it all dirty in the
//! page cache until its final fsync (background writeback starts only at
//! 10% of RAM dirty, gigabytes on a dom0), and that fsync then waits for
//! every byte: 0.3 s for 1 GiB here, 0.2 s at the end of the experiments'
//! cold copy. Each finished range goes to the device as soon as it is
//! written, so the I/O overlaps the rest of the copy and the fsync finds
//! little left.
//!
//! From a thread of its own: starting writeback can block on the device's
//! queue, and neither the hashing threads nor the receiver should wait on
//! it.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::disk::Disk;

/// Hands finished byte ranges of one disk to a thread that starts their
/// writeback ([`Disk::start_writeback`]). Dropping it waits for the thread.
pub struct Writeback {
    ranges: Option<Sender<(u64, u64)>>,
    thread: Option<JoinHandle<()>>,
}

impl Writeback {
    pub fn start(disk: Arc<dyn Disk>) -> Writeback {
        let (ranges, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || kick_all(&*disk, &rx))
            // Only a hint: without the thread, the final fsync does it all.
            .map_err(|e| log::debug!("no writeback thread: {e}"))
            .ok();
        Writeback { ranges: thread.as_ref().map(|_| ranges), thread }
    }

    /// `[offset, offset+len)` is written: start sending it to the device.
    pub fn kick(&self, offset: u64, len: u64) {
        if let Some(tx) = &self.ranges {
            let _ = tx.send((offset, len));
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.ranges = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start writeback of every range received, adjacent ones merged into one
/// call (groups finish in order, one megabyte each).
fn kick_all(disk: &dyn Disk, rx: &Receiver<(u64, u64)>) {
    while let Ok((mut start, mut len)) = rx.recv() {
        while let Ok((s, l)) = rx.try_recv() {
            if s == start + len {
                len += l;
            } else {
                disk.start_writeback(start, len);
                (start, len) = (s, l);
            }
        }
        disk.start_writeback(start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A disk that records the writeback it is asked for.
    #[derive(Debug)]
    struct Recorder(Mutex<Vec<(u64, u64)>>);

    impl Disk for Recorder {
        fn path(&self) -> &std::path::Path {
            std::path::Path::new("recorder")
        }
        fn size(&self) -> u64 {
            1 << 30
        }
        fn is_block_device(&self) -> bool {
            false
        }
        fn pread(&self, _: &mut [u8], _: u64) -> std::io::Result<usize> {
            Ok(0)
        }
        fn pwrite(&self, b: &[u8], _: u64) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn punch_hole(&self, _: u64, _: u64) -> std::io::Result<bool> {
            Ok(false)
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn drop_cache(&self) {}
        fn evict(&self, _: u64, _: u64) {}
        fn start_writeback(&self, offset: u64, len: u64) {
            self.0.lock().unwrap().push((offset, len));
        }
    }

    #[test]
    fn every_byte_kicked_is_written_back_once_adjacent_ranges_merged() {
        let disk = Arc::new(Recorder(Mutex::new(Vec::new())));
        let kicks = [(0u64, 10u64), (10, 5), (15, 1), (100, 20), (120, 4), (7, 3)];
        {
            let wb = Writeback::start(disk.clone());
            for (s, l) in kicks {
                wb.kick(s, l);
            }
        }
        let got = disk.0.lock().unwrap().clone();
        // However the thread batched them, the bytes asked for are the
        // bytes kicked, in order, and no call spans a gap.
        let mut expanded = Vec::new();
        for (s, l) in &got {
            expanded.extend(*s..s + l);
        }
        let want: Vec<u64> = kicks.iter().flat_map(|&(s, l)| s..s + l).collect();
        assert_eq!(expanded, want);
        assert!(got.len() >= 3 && got.len() <= kicks.len(), "{got:?}");
    }
}

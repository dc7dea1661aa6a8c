//! The source end: hash the image, stream group digests, answer requests;
//! for a live copy, repeat on what changed, then freeze for the last delta.
//!
//! Threads: the caller hashes (on all cores through rayon) and streams
//! group digests; a reader thread takes requests off the link; a few worker
//! threads read, compress and frame the requested blocks; one writer thread
//! owns the link's write half. Replies carry their block numbers, so
//! workers may finish in any order.
//!
//! Live copies find changed blocks generically, for any file or device: each
//! pass re-reads the image and compares every block's XXH3 with the value
//! read when its strong digest was taken, and only blocks whose XXH3 differs
//! are re-hashed with the strong digest. The re-read is the cost that still
//! grows with the disk; what lands on the target is verified with the strong
//! digest as always.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use rayon::prelude::*;

use crate::blockmap::{byte_range, group_digest, image_digest, BlockMap};
use crate::compress::{AutoPolicy, Choice, Codec};
use crate::digest::{is_zero, key_of, Algorithm, Digest, ZeroDigests};
use crate::image::{Image, ImageError};
use crate::layout::{Align, Layout};
use crate::protocol::{self, read_message, write_message, Message, ProtocolError, Role, CAP_LIVE, MAX_RUN_BYTES};
use crate::transport::{Link, LinkStats, Reader, Writer};

use super::hooks::Freeze;
use super::references::layout_of;
use super::tracker::SnapTracker;
use super::{EngineError, Progress, Report};

/// How a live copy iterates before it freezes the source.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// Passes in all, the frozen one included (at least 2).
    pub max_passes: u32,
    /// Freeze once a pass finds at most this many changed blocks.
    pub converge_blocks: u64,
    /// Shell command that quiesces the source (e.g. `fsfreeze -f /mnt`, or
    /// pausing the guest); run before the last pass.
    pub freeze_cmd: Option<String>,
    /// Shell command that undoes the freeze; run after the last pass,
    /// whether the copy succeeded or not.
    pub thaw_cmd: Option<String>,
    /// How each pass finds changed blocks.
    pub rescan: Rescan,
}

/// How a live pass finds the blocks that changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Rescan {
    /// Re-read every block and compare its XXH3; strong digests only for
    /// blocks that differ (default).
    #[default]
    Fast,
    /// Recompute every block's strong digest, as the seed did while the
    /// guest was paused; kept to measure against.
    Full,
    /// The source is an LVM logical volume: device-mapper snapshots list
    /// the chunks written during each pass, so nothing else is read.
    LvmSnapshot,
}

impl std::str::FromStr for Rescan {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fast" => Ok(Rescan::Fast),
            "full" => Ok(Rescan::Full),
            "lvm-snapshot" => Ok(Rescan::LvmSnapshot),
            _ => Err(format!("unknown rescan '{s}' (expected fast, full or lvm-snapshot)")),
        }
    }
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions { max_passes: 6, converge_blocks: 256, freeze_cmd: None, thaw_cmd: None, rescan: Rescan::Fast }
    }
}

#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub algo: Algorithm,
    pub block_size: u32,
    pub align: Align,
    pub compress: Choice,
    /// Copy while the source changes (None: the source is quiescent).
    pub live: Option<LiveOptions>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            algo: Algorithm::Blake3,
            block_size: 4096,
            align: Align::Partitions,
            compress: Choice::Auto,
            live: None,
        }
    }
}

/// State shared by the source's threads.
struct Shared {
    img: Image,
    layout: Layout,
    /// Block digests hashed so far (a prefix of the image, whole groups);
    /// between passes of a live copy, updated where blocks changed.
    digests: RwLock<Vec<Digest>>,
    compress: Choice,
    auto: Mutex<AutoPolicy>,
    stats: Arc<LinkStats>,
    workers: usize,
}

/// What the reader thread hands to the caller.
enum Event {
    PassDone { pass: u32, stale: Vec<u64> },
    Done(Report),
}

/// Serve `path` as the source of a copy over `link`. Returns the target's
/// report once the target has verified its copy and said Done.
pub fn run(path: &Path, opts: &SourceOptions, mut link: Link, progress: &Progress) -> Result<Report, EngineError> {
    let img = Image::open_read(path)?;
    let layout = layout_of(&img, opts.block_size, opts.align)?;
    // Snapshot tracking starts first: a source that cannot be tracked fails
    // before the target is touched, and writes made while pass 1 hashes are
    // caught too.
    let tracker = match &opts.live {
        Some(l) if l.rescan == Rescan::LvmSnapshot => Some(SnapTracker::start(path, img.size())?),
        _ => None,
    };
    let want_caps = if opts.live.is_some() { CAP_LIVE } else { 0 };
    let caps = protocol::handshake(&mut link.reader, &mut link.writer, Role::Source, want_caps)?;
    if caps & want_caps != want_caps {
        return Err(EngineError::Other("the target's xenmig cannot take a live copy; upgrade it".into()));
    }
    write_message(&mut link.writer, &Message::ImageInfo { algo: opts.algo, layout: layout.clone() })?;
    link.writer.flush().map_err(ProtocolError::Io)?;

    let workers = thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8);
    let shared = Arc::new(Shared {
        img,
        layout: layout.clone(),
        digests: RwLock::new(Vec::with_capacity(layout.block_count() as usize)),
        compress: opts.compress,
        auto: Mutex::new(AutoPolicy::default()),
        stats: link.stats.clone(),
        workers,
    });

    let Link { reader, writer, .. } = link;
    let (frames_tx, frames_rx) = bounded::<Message>(2 * workers + 2);
    let (work_tx, work_rx) = unbounded::<Message>();
    // Failures of any thread, and the reader's events: the caller waits on
    // whichever comes first, so a dead link never leaves it waiting for an
    // answer that cannot come.
    let (fail_tx, fail_rx) = unbounded::<EngineError>();
    let (event_tx, event_rx) = unbounded::<Result<Event, EngineError>>();
    let (writer_done_tx, writer_done_rx) = bounded::<()>(1);

    let fail = fail_tx.clone();
    let writer_thread = thread::spawn(move || {
        if let Err(e) = write_loop(writer, frames_rx) {
            let _ = fail.send(e);
        }
        let _ = writer_done_tx.send(());
    });
    let reader_frames = frames_tx.clone();
    thread::spawn(move || read_loop(reader, work_tx, reader_frames, event_tx));
    let mut worker_threads = Vec::new();
    for _ in 0..workers {
        let (rx, tx, sh, fail) = (work_rx.clone(), frames_tx.clone(), shared.clone(), fail_tx.clone());
        worker_threads.push(thread::spawn(move || {
            if let Err(e) = work_loop(&sh, rx, tx) {
                let _ = fail.send(e);
            }
        }));
    }
    drop((work_rx, fail_tx));

    let mut session =
        Session { shared: &shared, opts, frames: &frames_tx, fail_rx: &fail_rx, events: &event_rx, progress };
    let mut freeze: Option<Freeze> = None;
    let mut tracker = tracker;
    let outcome = session.passes(&mut freeze, &mut tracker);
    let report = match outcome {
        Ok(r) => r,
        Err(e) => {
            // Thaw first (the guest must not stay frozen), then let the
            // writer flush what it has (an Error frame, say) before we
            // return and the process may exit.
            let thawed = freeze.take().map(Freeze::thaw);
            drop(tracker);
            // Tell the target why, so that it stops waiting and hangs up
            // (which also ends our reader); a no-op if the link is gone.
            let _ = frames_tx.try_send(Message::Error { message: format!("source: {e}") });
            drop(frames_tx);
            let _ = writer_done_rx.recv_timeout(Duration::from_secs(2));
            if let Some(Err(t)) = thawed {
                log::error!("{t}");
            }
            return Err(e);
        }
    };
    let mut report = report;
    let downtime = match freeze.take() {
        Some(f) => Some(f.thaw()?),
        None => None,
    };
    // Snapshots go only now: removing them is slow and the guest is running.
    drop(tracker);
    let downtime_ns = downtime.map(|d| d.as_nanos() as u64).unwrap_or(0);
    let _ = frames_tx.send(Message::Bye { downtime_ns });
    drop(frames_tx);
    for w in worker_threads {
        w.join().expect("worker thread panicked");
    }
    writer_thread.join().expect("writer thread panicked");
    // A failure to deliver Bye is still a failure of this end.
    if let Ok(e) = fail_rx.try_recv() {
        return Err(e);
    }
    report.downtime_seconds = downtime_ns as f64 / 1e9;
    Ok(report)
}

/// The caller's side of one source run: hashing and announcing passes.
struct Session<'a> {
    shared: &'a Shared,
    opts: &'a SourceOptions,
    frames: &'a Sender<Message>,
    fail_rx: &'a Receiver<EngineError>,
    events: &'a Receiver<Result<Event, EngineError>>,
    progress: &'a Progress,
}

impl Session<'_> {
    fn send(&self, m: Message) -> Result<(), EngineError> {
        self.frames.send(m).map_err(|_| self.failure())
    }

    /// The reason the link or a thread stopped.
    fn failure(&self) -> EngineError {
        match self.fail_rx.try_recv() {
            Ok(e) => e,
            Err(_) => match self.events.try_recv() {
                Ok(Err(e)) => e,
                _ => EngineError::Other("the link to the target closed".into()),
            },
        }
    }

    /// Wait for the reader's next event or any failure.
    fn next_event(&self) -> Result<Event, EngineError> {
        crossbeam_channel::select! {
            recv(self.events) -> r => r.unwrap_or_else(|_| Err(EngineError::Other("the source's reader stopped without an answer".into()))),
            recv(self.fail_rx) -> e => Err(e.unwrap_or_else(|_| EngineError::Other("a source thread failed".into()))),
        }
    }

    /// Run every pass; returns the target's report (before any thaw).
    fn passes(
        &mut self,
        freeze: &mut Option<Freeze>,
        tracker: &mut Option<SnapTracker>,
    ) -> Result<Report, EngineError> {
        let sh = self.shared;
        let layout = &sh.layout;
        let algo = self.opts.algo;
        let live = self.opts.live.clone();
        if live.is_some() {
            self.send(Message::PassBegin { pass: 1, final_pass: false, changed_blocks: layout.block_count() })?;
        }
        self.progress.phase("hashing", layout.size);
        let mut fast: Vec<u64> = Vec::with_capacity(layout.block_count() as usize);
        let mut groups: Vec<Digest> = Vec::with_capacity(layout.group_count() as usize);
        let hashed = BlockMap::compute_streaming(
            &sh.img,
            layout.clone(),
            algo,
            |first, batch| {
                {
                    let mut d = sh.digests.write().unwrap();
                    for g in batch {
                        d.extend_from_slice(&g.blocks);
                    }
                }
                for g in batch {
                    fast.extend_from_slice(&g.fast);
                    groups.push(g.digest);
                }
                let digests = batch.iter().map(|g| g.digest).collect();
                // Stop hashing as soon as the link or a worker has failed.
                self.frames.send(Message::Groups { first, digests }).is_ok()
                    && self.fail_rx.is_empty()
                    && self.events.is_empty()
            },
            &|n| self.progress.inc(n),
        );
        let map = match hashed {
            Ok(Some(map)) => map,
            Ok(None) => return Err(self.failure()),
            Err(e) => {
                let _ = self.frames.send(Message::Error { message: format!("source: {e}") });
                return Err(e.into());
            }
        };
        self.send(Message::GroupsEnd { image_digest: map.image_digest })?;
        self.progress.phase("sending", layout.size);

        if let Some(live) = live {
            let mut pass = 1;
            let mut previous = layout.block_count();
            loop {
                let stale = match self.next_event()? {
                    Event::PassDone { pass: p, stale } if p == pass => stale,
                    Event::PassDone { pass: p, .. } => {
                        return Err(EngineError::BadReply(format!("the end of pass {p} during pass {pass}")))
                    }
                    Event::Done(_) => return Err(EngineError::BadReply("Done before the final pass".into())),
                };
                let changed = self.changed_blocks(&mut fast, &mut groups, live.rescan, tracker, false)?;
                let mut announce: BTreeSet<u64> = stale.into_iter().filter(|&g| g < layout.group_count()).collect();
                announce.extend(changed.iter().map(|&b| b / layout.group_blocks()));
                let n = changed.len() as u64;
                let last = pass + 1 >= live.max_passes.max(2) || n <= live.converge_blocks || n * 10 >= previous * 9;
                log::info!(
                    "pass {pass}: {n} blocks changed since hashed; next pass {}",
                    if last { "is final (frozen)" } else { "runs live" }
                );
                let mut changed_blocks = n;
                if last {
                    *freeze = Some(Freeze::run(live.freeze_cmd.as_deref(), live.thaw_cmd.clone())?);
                    let more = self.changed_blocks(&mut fast, &mut groups, live.rescan, tracker, true)?;
                    changed_blocks += more.len() as u64;
                    announce.extend(more.iter().map(|&b| b / layout.group_blocks()));
                }
                pass += 1;
                previous = n;
                self.send(Message::PassBegin { pass, final_pass: last, changed_blocks })?;
                self.announce(&announce, &groups)?;
                self.send(Message::GroupsEnd { image_digest: image_digest(algo, layout, &groups) })?;
                if last {
                    break;
                }
            }
        }
        match self.next_event()? {
            Event::Done(report) => Ok(report),
            Event::PassDone { pass, .. } => {
                Err(EngineError::BadReply(format!("the end of pass {pass} after the final pass")))
            }
        }
    }

    /// Send the digests of `set` (ascending), consecutive groups together.
    fn announce(&self, set: &BTreeSet<u64>, groups: &[Digest]) -> Result<(), EngineError> {
        let mut run: Vec<Digest> = Vec::new();
        let mut first = 0;
        for &g in set {
            if !run.is_empty() && (first + run.len() as u64 != g || run.len() == 64) {
                self.send(Message::Groups { first, digests: std::mem::take(&mut run) })?;
            }
            if run.is_empty() {
                first = g;
            }
            run.push(groups[g as usize]);
        }
        if !run.is_empty() {
            self.send(Message::Groups { first, digests: run })?;
        }
        Ok(())
    }

    /// Blocks changed since the last call, with digests and group digests
    /// updated: from the snapshot tracker when there is one (falling back to
    /// a re-read if its snapshot overflowed), else by re-reading.
    fn changed_blocks(
        &self,
        fast: &mut [u64],
        groups: &mut [Digest],
        how: Rescan,
        tracker: &mut Option<SnapTracker>,
        last: bool,
    ) -> Result<Vec<u64>, EngineError> {
        let layout = &self.shared.layout;
        let Some(t) = tracker else { return self.rescan(fast, groups, how, None) };
        match t.changed(last)? {
            None => self.rescan(fast, groups, Rescan::Fast, None),
            Some(ranges) => {
                let mut blocks = BTreeSet::new();
                for (start, end) in ranges {
                    let end = end.min(layout.size);
                    if start < end {
                        blocks.extend(layout.block_at(start)..=layout.block_at(end - 1));
                    }
                }
                self.rescan(fast, groups, how, Some(&blocks))
            }
        }
    }

    /// Re-read the image (or only `only`); re-hash the blocks whose content
    /// changed, update digests and group digests, and return those blocks.
    fn rescan(
        &self,
        fast: &mut [u64],
        groups: &mut [Digest],
        how: Rescan,
        only: Option<&BTreeSet<u64>>,
    ) -> Result<Vec<u64>, EngineError> {
        let sh = self.shared;
        let layout = &sh.layout;
        let algo = self.opts.algo;
        let zeros = ZeroDigests::new(algo, layout.block_size as usize);
        // Read what the device holds now, not what an earlier pass cached.
        sh.img.drop_cache();
        self.progress.phase("rescanning", layout.size);
        let fast_ro: &[u64] = fast;
        let digests_guard = sh.digests.read().unwrap();
        let digests_ro: &[Digest] = &digests_guard;
        let found: Vec<(u64, Vec<(u64, Digest, u64)>)> = if let Some(only) = only {
            // Only the blocks the tracker named: read each, keep those whose
            // strong digest moved.
            let list: Vec<u64> = only.iter().copied().collect();
            let checked: Vec<(u64, Digest, u64)> = list
                .par_iter()
                .map(|&i| {
                    let (off, len) = layout.extent(i);
                    let mut data = vec![0u8; len];
                    sh.img.read_at(&mut data, off)?;
                    let d = if is_zero(&data) { zeros.get(len) } else { algo.digest(&data) };
                    Ok((i, d, xxhash_rust::xxh3::xxh3_64(&data)))
                })
                .collect::<Result<_, ImageError>>()?;
            let mut by_group: Vec<(u64, Vec<(u64, Digest, u64)>)> = Vec::new();
            for (i, d, x) in checked.into_iter().filter(|(i, d, _)| *d != digests_ro[*i as usize]) {
                let g = i / layout.group_blocks();
                match by_group.last_mut() {
                    Some((lg, v)) if *lg == g => v.push((i, d, x)),
                    _ => by_group.push((g, vec![(i, d, x)])),
                }
            }
            by_group
        } else {
            (0..layout.group_count())
                .into_par_iter()
                .map(|g| {
                    let (a, b) = layout.group_range(g);
                    let (start, stop) = byte_range(layout, a, b);
                    let mut buf = vec![0u8; (stop - start) as usize];
                    sh.img.read_at(&mut buf, start)?;
                    self.progress.inc(stop - start);
                    let mut changed = Vec::new();
                    for i in a..b {
                        let (off, len) = layout.extent(i);
                        let data = &buf[(off - start) as usize..(off - start) as usize + len];
                        let x = xxhash_rust::xxh3::xxh3_64(data);
                        let strong = || if is_zero(data) { zeros.get(len) } else { algo.digest(data) };
                        match how {
                            Rescan::Fast if x != fast_ro[i as usize] => changed.push((i, strong(), x)),
                            Rescan::Fast => {}
                            Rescan::Full | Rescan::LvmSnapshot => {
                                let d = strong();
                                if d != digests_ro[i as usize] {
                                    changed.push((i, d, x));
                                }
                            }
                        }
                    }
                    Ok((g, changed))
                })
                .filter(|r: &Result<_, ImageError>| r.as_ref().map_or(true, |(_, c)| !c.is_empty()))
                .collect::<Result<_, ImageError>>()?
        };
        drop(digests_guard);
        let mut blocks = Vec::new();
        let mut digests = sh.digests.write().unwrap();
        for (g, changed) in found {
            for (i, d, x) in changed {
                digests[i as usize] = d;
                fast[i as usize] = x;
                blocks.push(i);
            }
            let (a, b) = layout.group_range(g);
            groups[g as usize] = group_digest(algo, &digests[a as usize..b as usize]);
        }
        self.progress.phase("sending", layout.size);
        Ok(blocks)
    }
}

/// Own the write half: send frames, flushing whenever the queue runs dry.
fn write_loop(mut w: Writer, rx: Receiver<Message>) -> Result<(), EngineError> {
    loop {
        let m = match rx.try_recv() {
            Ok(m) => m,
            Err(_) => {
                w.flush().map_err(ProtocolError::Io)?;
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => return Ok(()),
                }
            }
        };
        write_message(&mut w, &m)?;
    }
}

/// Take requests off the link and pass events on, until Done.
fn read_loop(
    mut r: Reader,
    work: Sender<Message>,
    frames: Sender<Message>,
    events: Sender<Result<Event, EngineError>>,
) {
    let result = (|| loop {
        match read_message(&mut r, "before the target said Done")? {
            m @ (Message::WantDigests { .. } | Message::Fetch { .. }) => {
                let _ = work.send(m);
            }
            Message::PassDone { pass, stale_groups } => {
                let _ = events.send(Ok(Event::PassDone { pass, stale: stale_groups }));
            }
            Message::Done { report } => {
                let report: Report = serde_json::from_str(&report)
                    .map_err(|e| EngineError::BadReply(format!("an unreadable report: {e}")))?;
                return Ok(report);
            }
            other => {
                return Err(EngineError::Protocol(ProtocolError::Unexpected {
                    got: other.kind(),
                    state: "serving requests",
                }))
            }
        }
    })();
    match result {
        Ok(report) => {
            let _ = events.send(Ok(Event::Done(report)));
        }
        Err(e) => {
            let _ = frames.send(Message::Error { message: format!("source: {e}") });
            let _ = events.send(Err(e));
        }
    }
}

fn work_loop(sh: &Shared, rx: Receiver<Message>, tx: Sender<Message>) -> Result<(), EngineError> {
    for m in rx {
        let reply = match m {
            Message::WantDigests { first_group, count } => want_digests(sh, first_group, count, &tx),
            Message::Fetch { first_block, count } => fetch(sh, first_block, count).map(|m| {
                let _ = tx.send(m);
            }),
            _ => unreachable!("reader forwards only requests"),
        };
        if let Err(e) = reply {
            let _ = tx.send(Message::Error { message: format!("source: {e}") });
            return Err(e);
        }
    }
    Ok(())
}

fn want_digests(sh: &Shared, first: u64, count: u32, tx: &Sender<Message>) -> Result<(), EngineError> {
    let end = first.checked_add(count as u64).filter(|&e| e <= sh.layout.group_count() && count > 0);
    let Some(end) = end else {
        return Err(EngineError::BadRequest(format!(
            "digests of groups {first}+{count}, image has {}",
            sh.layout.group_count()
        )));
    };
    for g in first..end {
        let (a, b) = sh.layout.group_range(g);
        let keys = {
            let d = sh.digests.read().unwrap();
            if (d.len() as u64) < b {
                return Err(EngineError::BadRequest(format!("digests of group {g} before it was announced")));
            }
            d[a as usize..b as usize].iter().map(key_of).collect()
        };
        let _ = tx.send(Message::BlockDigests { group: g, keys });
    }
    Ok(())
}

fn fetch(sh: &Shared, first: u64, count: u32) -> Result<Message, EngineError> {
    let end = first.checked_add(count as u64).filter(|&e| e <= sh.layout.block_count() && count > 0);
    let Some(end) = end else {
        return Err(EngineError::BadRequest(format!("blocks {first}+{count}, image has {}", sh.layout.block_count())));
    };
    let (start, stop) = byte_range(&sh.layout, first, end);
    if stop - start > MAX_RUN_BYTES {
        return Err(EngineError::BadRequest(format!("a run of {} bytes, more than {MAX_RUN_BYTES}", stop - start)));
    }
    let mut raw = vec![0u8; (stop - start) as usize];
    sh.img.read_at(&mut raw, start)?;
    let raw_len = raw.len() as u32;
    let codec = match sh.compress {
        Choice::Fixed(c) => c,
        Choice::Auto => {
            let mut p = sh.auto.lock().unwrap();
            if p.wants_sample() {
                p.sample(&raw);
            }
            p.choose(sh.stats.drain_rate(), sh.workers, raw.len() as u64)
        }
    };
    let (mut payload, mut code) = (raw, Codec::None.code());
    if codec != Codec::None {
        let packed = codec.compress(&payload);
        // Incompressible data goes raw: cheaper to decode, never larger.
        if packed.len() < payload.len() {
            (payload, code) = (packed, codec.code());
        }
    }
    Ok(Message::Blocks { first_block: first, count, codec: code, raw_len, payload })
}

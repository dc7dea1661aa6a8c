//! The source end: hash the image, stream group digests, answer requests;
//! for a live copy, repeat on what changed, then freeze for the last delta.
//!
//! Threads: the caller hashes (on all cores through rayon) and streams
//! group digests; a reader thread takes requests off the link; a few worker
//! threads read, compress and frame the requested blocks; one writer thread
//! owns the link's write half. Replies carry their block numbers, so
//! workers may finish in any order. Runs that go through the copy's zstd
//! stream (`wire::stream`) are compressed by one more thread, the only
//! owner of the encoder, which hands each frame to the writer as soon as it
//! is compressed: the stream's pieces reach the link in the order they were
//! compressed, as the target's decoder needs.
//!
//! Live copies find changed blocks generically, for any file or device: each
//! pass re-reads the image and compares every block's XXH3 with the value
//! read when its strong digest was taken, and only blocks whose XXH3 differs
//! are re-hashed with the strong digest. The re-read is the cost that still
//! grows with the disk; what lands on the target is verified with the strong
//! digest as always.

use std::collections::{BTreeSet, VecDeque};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};
use rayon::prelude::*;

use crate::blocks::blockmap::{byte_range, group_digest, image_digest, BlockMap, HashedGroup, Hashing};
use crate::blocks::digest::{hex, is_zero, key_of, Algorithm, Digest, ZeroDigests};
use crate::blocks::layout::{Align, Layout};
use crate::blocks::runs::checked_end;
use crate::storage::disk::Disk;
use crate::storage::image::{Image, ImageError};
use crate::wire::compress::{piece_limit, AutoPolicy, Choice, Codec, LinkView, Route};
use crate::wire::held::{self, HeldSet};
use crate::wire::liveness::{handshake_within, keepalive_interval, Waiting, Watchdog, DEFAULT_IDLE_TIMEOUT};
use crate::wire::protocol::{
    read_message, write_message, Message, ProtocolError, Role, CAP_BLOCK_HINTS, CAP_DELTA_BATCH, CAP_HELD_KEYS,
    CAP_LATE_REF, CAP_LIVE, CAP_RECEIPTS, CAP_SHARED_REF, CAP_SHORT_SUB_HASHES, CAP_SIMILAR, CAP_SPLIT_RUNS,
    CAP_STREAM_LEVELS, CAP_SUB_DELTA, CAP_SUB_GROUPS, CAP_ZSTD_STREAM, MAX_RUN_BYTES, WINDOW,
};
use crate::wire::rate::Rate;
use crate::wire::receipts::Receipts;
use crate::wire::stream::{self as zstream, StreamEncoder, STREAM_CODE, STREAM_REF_CODE, STREAM_REF_SOON_CODE};
use crate::wire::subgroup::{self, ShortKey, Signature};
use crate::wire::transport::{Link, LinkStats, Reader, Writer};
use crate::wire::{sketch, subdelta};

use super::early_hash::EarlyHash;
use super::interrupt;
use super::quiesce::Freeze;
use super::references::layout_of;
use super::shared_ref::{self, LatePolicy, SharedRef, SourceRef};
use super::tracker::{self, Candidates, ChangeTracker, Compare};
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
    /// A freeze command still running after this long is killed, the thaw
    /// runs and the copy fails.
    pub freeze_timeout: Duration,
    /// The frozen pass ([`SourceSession::final_pass`], from the call to the
    /// target's report) fails after this long (None: only the idle timeout
    /// bounds it). The idle timeout alone does not bound it: a target whose
    /// disk hangs keeps sending keep-alives from another thread, and the
    /// source would stay frozen as long as the disk hangs.
    pub final_timeout: Option<Duration>,
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
    /// `LvmSnapshot` when the source is an LV whose volume group has room
    /// for the snapshot, else `Fast` (the log says which and why).
    Auto,
}

impl Rescan {
    /// What `--rescan` calls it (read back by `FromStr`).
    pub fn name(self) -> &'static str {
        match self {
            Rescan::Fast => "fast",
            Rescan::Full => "full",
            Rescan::LvmSnapshot => "lvm-snapshot",
            Rescan::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Rescan {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fast" => Ok(Rescan::Fast),
            "full" => Ok(Rescan::Full),
            "lvm-snapshot" => Ok(Rescan::LvmSnapshot),
            "auto" => Ok(Rescan::Auto),
            _ => Err(format!("unknown rescan '{s}' (expected fast, full, lvm-snapshot or auto)")),
        }
    }
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            max_passes: 6,
            converge_blocks: 256,
            freeze_cmd: None,
            thaw_cmd: None,
            rescan: Rescan::Fast,
            freeze_timeout: super::quiesce::DEFAULT_FREEZE_TIMEOUT,
            final_timeout: None,
        }
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
    /// Fail when the target sends nothing for this long while this end
    /// waits for it (None: wait forever). Keep-alives go out at a quarter of
    /// it. Only with a version-2 target (see `protocol`).
    pub idle_timeout: Option<Duration>,
    /// Bytes per second this end may write to the link (`--bwlimit`; 0:
    /// no limit).
    pub bwlimit: Rate,
    /// Images this host holds that the target may hold too
    /// (`--source-reference`): one the target offers, with the same image
    /// digest, becomes the zstd stream's dictionary (`copy::shared_ref`).
    pub source_references: Vec<std::path::PathBuf>,
    /// `auto` may raise the zstd stream's level on a slow link
    /// (`CAP_STREAM_LEVELS`), once per copy, after a steady slow spell of
    /// blocked writes (`wire::compress`, `wire::flow`). On by default; off,
    /// the stream stays at its first level (the way to compare).
    pub raise_levels: bool,
    /// When a large shared reference becomes the stream's dictionary
    /// with a target that takes it late (`CAP_LATE_REF`).
    pub late_reference: shared_ref::LatePolicy,
    /// The target's references (`-r`) as the target was given them, looked
    /// for at the same paths on this host: one whose bytes have the digest
    /// of one the target offers serves as a `--source-reference` would
    /// (`shared_ref::same_path_candidates`; only with a target that takes
    /// references late, `CAP_LATE_REF`). Set where the target is remote
    /// (`copy` to a host, `migrate`): a local copy's references are this
    /// host's already, and its fast link gains nothing from a dictionary.
    pub same_path_references: Vec<std::path::PathBuf>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            algo: Algorithm::Blake3,
            block_size: 4096,
            align: Align::Partitions,
            compress: Choice::Auto,
            live: None,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            bwlimit: Rate(0),
            source_references: Vec::new(),
            raise_levels: true,
            late_reference: shared_ref::LatePolicy::default(),
            same_path_references: Vec::new(),
        }
    }
}

/// State shared by the source's threads.
struct Shared {
    img: Image,
    layout: Layout,
    algo: Algorithm,
    zeros: ZeroDigests,
    /// Block digests hashed so far (a prefix of the image, whole groups);
    /// between passes of a live copy, updated where blocks changed.
    digests: RwLock<Vec<Digest>>,
    compress: Choice,
    auto: Mutex<AutoPolicy>,
    /// The level `auto` wants the stream at (the stream's thread follows
    /// it between runs, when the target follows level changes).
    stream_level: AtomicI32,
    /// The levels the stream compressed at, in order (for the report).
    stream_levels: Mutex<Vec<i32>>,
    /// Nanoseconds the stream's thread spent compressing so far (`auto`
    /// drops a raised level only where the compressor set the pace).
    stream_compressing: AtomicU64,
    stats: Arc<LinkStats>,
    /// The target's receipts (`CAP_RECEIPTS` agreed): `auto` measures the
    /// link by them, and the stream waits at their gate.
    receipts: Option<Arc<Receipts>>,
    /// The keys the target holds (`CAP_HELD_KEYS`, once its `Holds`
    /// came): `WantChangedKeys` is then answered with `HeldKeys`.
    held: Arc<OnceLock<HeldSet>>,
    /// `CAP_SPLIT_RUNS` agreed: a run of blocks may go in several `Blocks`
    /// frames (`cut_run`).
    split_runs: bool,
    workers: usize,
}

/// Longest the stream holds its pieces, in all, for a first rise of its
/// level whose measurement is running (`AutoPolicy::first_rise_pending`).
const RISE_HOLD: Duration = Duration::from_millis(500);

/// What the reader thread hands to the caller.
enum Event {
    PassDone {
        pass: u32,
        stale: Vec<u64>,
    },
    /// (Boxed: a report is some 400 bytes, every other event a few dozen.)
    Done(Box<Report>),
}

/// Changed blocks by group: (group, its changed blocks as (block, strong
/// digest, XXH3)), groups ascending.
type ChangedByGroup = Vec<(u64, Vec<(u64, Digest, u64)>)>;

/// When a live copy stops iterating and freezes the source: once a pass
/// finds at most `converge_blocks` changed blocks, once the changed set stops
/// shrinking (by 10%), or at `max_passes`. The one home of that rule, used
/// by `copy --live` for one image and by `migrate` for all of a domain's
/// disks at once (it sums their counts).
#[derive(Clone, Debug)]
pub struct Convergence {
    max_passes: u32,
    converge_blocks: u64,
    previous: u64,
}

impl Convergence {
    /// `total_blocks`: what pass 1 sent (every block of every image).
    pub fn new(max_passes: u32, converge_blocks: u64, total_blocks: u64) -> Convergence {
        Convergence { max_passes: max_passes.max(2), converge_blocks, previous: total_blocks }
    }

    /// After pass `done` found `changed` blocks: is the next pass the final,
    /// frozen one?
    pub fn next_is_final(&mut self, done: u32, changed: u64) -> bool {
        let last = done + 1 >= self.max_passes
            || changed <= self.converge_blocks
            || changed.saturating_mul(10) >= self.previous.saturating_mul(9);
        self.previous = changed;
        last
    }
}

/// What [`SourceSession::scan`] found since the previous pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scan {
    /// The pass the target just finished.
    pub pass_done: u32,
    /// Blocks whose content changed since they were last announced.
    pub changed_blocks: u64,
    /// Groups the target reported stale (changed under it while fetching).
    pub stale_groups: u64,
}

/// The source end driven step by step, so that the caller owns the pass
/// loop and the freeze: [`start`](Self::start) hashes and announces pass 1;
/// then, as often as the caller's policy wants, [`scan`](Self::scan) (wait
/// for the target to finish the pass in flight and find what changed) and
/// [`send_pass`](Self::send_pass) (announce it as a live pass); once the
/// caller has frozen the source, [`final_pass`](Self::final_pass) sends the
/// last delta and returns the target's report, checked against this end's
/// own digest; [`finish`](Self::finish) says goodbye. Dropping a session
/// that did not finish tells the target why and hangs up.
pub struct SourceSession {
    shared: Arc<Shared>,
    opts: SourceOptions,
    progress: Progress,
    frames: Option<Sender<Message>>,
    fail_rx: Receiver<EngineError>,
    events: Receiver<Result<Event, EngineError>>,
    writer_done: Receiver<()>,
    threads: Vec<thread::JoinHandle<()>>,
    /// Times out a silent target (version 2 and an idle timeout only).
    watchdog: Option<Watchdog>,
    /// How live passes find changes (None: not a live copy).
    tracker: Option<Box<dyn ChangeTracker>>,
    /// XXH3 of every block as last hashed, and every group's strong digest.
    fast: Vec<u64>,
    groups: Vec<Digest>,
    /// The pass announced last, and whether the target is still on it.
    pass: u32,
    in_flight: bool,
    /// Found by scans and not yet announced.
    pending: BTreeSet<u64>,
    pending_changed: u64,
    finished: bool,
}

/// The change tracker of a finished session, kept until dropped: dropping
/// it removes what the tracker holds (the last device-mapper snapshot).
#[must_use = "dropping it at once removes the tracking snapshots now, which is slow"]
pub struct Tracking {
    _tracker: Option<Box<dyn ChangeTracker>>,
}

impl SourceSession {
    /// Open `path`, start change tracking (a source that cannot be tracked
    /// fails before the target is touched), shake hands, hash the image and
    /// announce it as pass 1. A live session (`opts.live` set) then waits
    /// for [`scan`](Self::scan); a plain one for [`final_pass`](Self::final_pass).
    pub fn start(
        path: &Path,
        opts: &SourceOptions,
        link: Link,
        progress: Progress,
    ) -> Result<SourceSession, EngineError> {
        let img = Image::open_read(path)?;
        let layout = layout_of(&img, opts.block_size, opts.align)?;
        let tracker = match &opts.live {
            Some(l) => Some(tracker::start(l.rescan, path, img.size())?),
            None => None,
        };
        // A plain copy hashes while ssh connects (`copy::early_hash`; a
        // live one, as before, once the handshake is done).
        let early = match opts.live {
            None => {
                progress.phase("hashing", layout.size);
                Some(EarlyHash::start(img.try_clone()?, layout.clone(), opts.algo, progress.clone()))
            }
            Some(_) => None,
        };
        let live_cap = if opts.live.is_some() { CAP_LIVE } else { 0 };
        // A shared reference serves only the zstd stream: offer the
        // capability only when runs may go through it.
        let may_stream = matches!(opts.compress, Choice::Auto | Choice::Fixed(Codec::Zstd(_)));
        // Patterns are expanded on this host, now (never to SRC itself).
        let source_refs = if may_stream && !opts.source_references.is_empty() {
            let refs = super::refglob::expand(&opts.source_references, Some(path))?;
            shared_ref::check_source_references(&refs)?;
            refs
        } else {
            Vec::new()
        };
        let same_path =
            if may_stream { shared_ref::same_path_candidates(&opts.same_path_references, path) } else { Vec::new() };
        let shared_cap = if source_refs.is_empty() && same_path.is_empty() { 0 } else { CAP_SHARED_REF };
        // Every frame this end writes from here on, keep-alives included,
        // goes through the link's bucket.
        link.throttle.set(opts.bwlimit);
        let caps = live_cap
            | shared_cap
            | if shared_cap != 0 { CAP_LATE_REF } else { 0 }
            | CAP_ZSTD_STREAM
            | CAP_SUB_DELTA
            | CAP_SUB_GROUPS
            | CAP_SIMILAR
            | CAP_STREAM_LEVELS
            | CAP_BLOCK_HINTS
            | CAP_SHORT_SUB_HASHES
            | CAP_HELD_KEYS
            | CAP_DELTA_BATCH
            | CAP_SPLIT_RUNS
            // Receipts serve `auto` only, and its levels: without them
            // (`raise_levels` off) the copy stays the way to compare.
            | if opts.compress == Choice::Auto && opts.raise_levels { CAP_RECEIPTS } else { 0 };
        let (mut link, agreed) = handshake_within(link, Role::Source, caps, opts.idle_timeout)?;
        if agreed.caps & live_cap != live_cap {
            return Err(EngineError::NoLiveSupport);
        }
        // The level runs are streamed at, when the target takes a stream
        // and the choice can be zstd; otherwise every run is on its own.
        let stream_level = match opts.compress {
            _ if agreed.caps & CAP_ZSTD_STREAM == 0 => None,
            Choice::Fixed(Codec::Zstd(level)) => Some(level),
            Choice::Auto => Some(zstream::AUTO_LEVEL),
            Choice::Fixed(_) => None,
        };
        // `auto` may change the stream's level where the link is slow
        // when the target follows; `--compress zstd:L` keeps L.
        let levels = agreed.caps & CAP_STREAM_LEVELS != 0 && opts.compress == Choice::Auto && stream_level.is_some();
        // The encoder is made on the stream's thread: with a shared
        // reference agreed, only once the target's offer is answered.
        let shared_agreed = agreed.caps & CAP_SHARED_REF != 0;
        // The target takes the reference at a piece that says so, so a
        // large one need not hold up the stream's start.
        let late = (agreed.caps & (CAP_LATE_REF | CAP_STREAM_LEVELS) == CAP_LATE_REF | CAP_STREAM_LEVELS)
            .then_some(opts.late_reference);
        let encoder = match stream_level {
            Some(level) if shared_agreed => Some(Pending::Prefix { level, image_size: layout.size, levels, late }),
            Some(level) => {
                let enc = StreamEncoder::new(level, zstream::window_log_for(layout.size))?;
                Some(Pending::Ready(if levels { enc.follow_levels() } else { enc }))
            }
            None => None,
        };
        write_message(&mut link.writer, &Message::ImageInfo { algo: opts.algo, layout: layout.clone() })?;
        link.writer.flush().map_err(ProtocolError::Io)?;

        let workers = thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8);
        let shared = Arc::new(Shared {
            img,
            layout: layout.clone(),
            algo: opts.algo,
            zeros: ZeroDigests::new(opts.algo, layout.block_size as usize),
            digests: RwLock::new(Vec::with_capacity(layout.block_count() as usize)),
            compress: opts.compress,
            auto: Mutex::new(if levels && opts.raise_levels {
                AutoPolicy::new(true, layout.size).with_levels()
            } else {
                AutoPolicy::new(stream_level.is_some(), layout.size)
            }),
            stream_level: AtomicI32::new(stream_level.unwrap_or(zstream::AUTO_LEVEL)),
            stream_levels: Mutex::new(Vec::new()),
            stream_compressing: AtomicU64::new(0),
            stats: link.stats.clone(),
            receipts: (agreed.caps & CAP_RECEIPTS != 0).then(|| Arc::new(Receipts::new(link.stats.clone()))),
            held: Arc::new(OnceLock::new()),
            split_runs: agreed.caps & CAP_SPLIT_RUNS != 0,
            workers,
        });

        let Link { reader, writer, .. } = link;
        let (frames_tx, frames_rx) = bounded::<Message>(2 * workers + 2);
        // A version-2 target keeps at most WINDOW replies outstanding: a full
        // queue holds the reader (and, through the link, a flooding peer).
        // A version-1 target has no window; its queue stays unbounded.
        let (work_tx, work_rx) = if agreed.keepalive() { bounded::<Message>(WINDOW) } else { unbounded::<Message>() };
        let keepalive = opts.idle_timeout.filter(|_| agreed.keepalive()).map(keepalive_interval);
        if !agreed.keepalive() {
            log::warn!(
                "the target speaks protocol version {}: no idle timeout, no keep-alives (a version-1 xenmig refuses a \
                 newer source: if it hangs up now, upgrade xenmig on the target host first)",
                agreed.version
            );
        }
        let waiting = Waiting::default();
        // Failures of any thread, and the reader's events: the caller waits on
        // whichever comes first, so a dead link never leaves it waiting for an
        // answer that cannot come.
        let (fail_tx, fail_rx) = unbounded::<EngineError>();
        let (event_tx, event_rx) = unbounded::<Result<Event, EngineError>>();
        let (writer_done_tx, writer_done_rx) = bounded::<()>(1);

        let mut threads = Vec::new();
        let fail = fail_tx.clone();
        threads.push(thread::spawn(move || {
            if let Err(e) = write_loop(writer, frames_rx, keepalive) {
                let _ = fail.send(e);
            }
            let _ = writer_done_tx.send(());
        }));
        let reader_frames = frames_tx.clone();
        let reader_waiting = waiting.clone();
        let optional = Optional {
            deltas: agreed.caps & CAP_SUB_DELTA != 0,
            subgroups: agreed.caps & CAP_SUB_GROUPS != 0,
            sketches: agreed.caps & CAP_SIMILAR != 0,
            hints: agreed.caps & CAP_SUB_GROUPS != 0 && agreed.caps & CAP_BLOCK_HINTS != 0,
            short_hashes: agreed.caps & CAP_SUB_DELTA != 0 && agreed.caps & CAP_SHORT_SUB_HASHES != 0,
            receipts: shared.receipts.clone(),
            held: (agreed.caps & CAP_HELD_KEYS != 0 && agreed.caps & CAP_SUB_GROUPS != 0)
                .then(|| (shared.held.clone(), held::max_count(layout.block_count()))),
            batches: agreed.delta_batch(),
        };
        // The reader answers the target's offer and hands the chosen
        // reference to the stream's thread (None: start empty).
        let (prefix_tx, prefix_rx) = bounded::<Dictionary>(1);
        // Read and hash this end's references now, while the target loads
        // its own: its offer then finds them ready. (Only if a stream can
        // use them.)
        let offer = (shared_agreed && stream_level.is_some()).then(|| {
            let (algo, block_size) = (opts.algo, opts.block_size);
            Offer {
                loading: thread::spawn(move || shared_ref::load_all(&source_refs, &same_path, algo, block_size)),
                prefix: prefix_tx,
                late: late.is_some(),
            }
        });
        let offer = match offer {
            Some(o) => Some(Some(o)),
            None if shared_agreed => Some(None),
            None => None,
        };
        thread::spawn(move || read_loop(reader, work_tx, reader_frames, event_tx, reader_waiting, optional, offer));
        let watchdog = match opts.idle_timeout {
            Some(idle) if agreed.keepalive() => {
                let fail = fail_tx.clone();
                Some(Watchdog::start("target", shared.stats.clone(), idle, waiting, move |e| {
                    let _ = fail.send(EngineError::Protocol(e));
                }))
            }
            _ => None,
        };
        // The stream's thread ends once every worker (holding its input) has.
        let stream_tx = encoder.map(|enc| {
            let (tx, rx) = bounded::<RawRun>(workers + 2);
            let (frames, fail, sh) = (frames_tx.clone(), fail_tx.clone(), shared.clone());
            threads.push(thread::spawn(move || {
                if let Err(e) = stream_loop(enc, prefix_rx, rx, &frames, &sh) {
                    let _ = frames.send(Message::Error { message: format!("source: {e}") });
                    let _ = fail.send(e);
                }
            }));
            tx
        });
        for _ in 0..workers {
            let (rx, tx, sh, fail) = (work_rx.clone(), frames_tx.clone(), shared.clone(), fail_tx.clone());
            let stream = stream_tx.clone();
            threads.push(thread::spawn(move || {
                if let Err(e) = work_loop(&sh, rx, tx, stream) {
                    let _ = fail.send(e);
                }
            }));
        }
        drop((work_rx, fail_tx, stream_tx));

        let mut session = SourceSession {
            shared,
            opts: opts.clone(),
            progress,
            frames: Some(frames_tx),
            fail_rx,
            events: event_rx,
            writer_done: writer_done_rx,
            threads,
            watchdog,
            tracker,
            fast: Vec::new(),
            groups: Vec::new(),
            pass: 1,
            in_flight: true,
            pending: BTreeSet::new(),
            pending_changed: 0,
            finished: false,
        };
        session.first_pass(early)?;
        Ok(session)
    }

    /// Blocks in the image.
    pub fn block_count(&self) -> u64 {
        self.shared.layout.block_count()
    }

    /// Image size in bytes.
    pub fn image_size(&self) -> u64 {
        self.shared.layout.size
    }

    /// The pass announced last (1 after [`start`](Self::start)).
    pub fn pass(&self) -> u32 {
        self.pass
    }

    /// Bytes that crossed the link so far, both directions.
    pub fn bytes_wire(&self) -> u64 {
        self.shared.stats.total()
    }

    fn frames(&self) -> &Sender<Message> {
        self.frames.as_ref().expect("frames open until finish")
    }

    fn send(&self, m: Message) -> Result<(), EngineError> {
        if send_unless_failed(self.frames(), &self.fail_rx, m) {
            Ok(())
        } else {
            Err(self.failure())
        }
    }

    /// The reason the link or a thread stopped.
    fn failure(&self) -> EngineError {
        if let Err(e) = interrupt::check() {
            return e;
        }
        match self.fail_rx.try_recv() {
            Ok(e) => e,
            Err(_) => match self.events.try_recv() {
                Ok(Err(e)) => e,
                _ => EngineError::LinkClosed("the link to the target closed"),
            },
        }
    }

    /// Between passes (nothing in flight): fail now if the link or a
    /// thread has already failed, so that a caller about to stop the source
    /// (migrate, before it lets xl suspend the guest) learns of a dead
    /// target first, not in the frozen pass.
    pub fn check_link(&self) -> Result<(), EngineError> {
        if let Ok(e) = self.fail_rx.try_recv() {
            return Err(e);
        }
        match self.events.try_recv() {
            Ok(Err(e)) => Err(e),
            Ok(Ok(_)) => Err(EngineError::BadReply("a report while no pass was in flight".into())),
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                Err(EngineError::LinkClosed("the link to the target closed"))
            }
            Err(crossbeam_channel::TryRecvError::Empty) => Ok(()),
        }
    }

    /// Wait for the reader's next event or any failure.
    /// A signal caught meanwhile ([`interrupt`]) ends the wait too.
    /// Past `deadline` (of the frozen pass), fail with
    /// [`EngineError::FinalTimeout`].
    fn next_event(&self, deadline: Option<(Instant, Duration)>) -> Result<Event, EngineError> {
        loop {
            interrupt::check()?;
            if let Some((at, limit)) = deadline {
                if Instant::now() >= at {
                    return Err(EngineError::FinalTimeout { seconds: limit.as_secs_f64() });
                }
            }
            crossbeam_channel::select! {
                recv(self.events) -> r => return r.unwrap_or(Err(EngineError::LinkClosed("the source's reader stopped without an answer"))),
                recv(self.fail_rx) -> e => return Err(e.unwrap_or(EngineError::LinkClosed("a source thread failed"))),
                default(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Pass 1: hash everything and announce every group as it is hashed
    /// (or, for a plain copy, as `early` hashed it).
    fn first_pass(&mut self, early: Option<EarlyHash>) -> Result<(), EngineError> {
        let sh = self.shared.clone();
        let layout = &sh.layout;
        let algo = self.opts.algo;
        if self.opts.live.is_some() {
            self.send(Message::PassBegin { pass: 1, final_pass: false, changed_blocks: layout.block_count() })?;
        }
        if early.is_none() {
            self.progress.phase("hashing", layout.size);
        }
        // XXH3s only for a live copy, whose later passes compare them.
        let live = self.opts.live.is_some();
        let mut fast: Vec<u64> = Vec::with_capacity(if live { layout.block_count() as usize } else { 0 });
        let mut groups: Vec<Digest> = Vec::with_capacity(layout.group_count() as usize);
        let frames = self.frames().clone();
        let on_batch = |first, batch: &[HashedGroup]| {
            {
                let mut d = sh.digests.write().unwrap();
                for g in batch {
                    d.extend_from_slice(&g.blocks);
                }
            }
            for g in batch {
                if live {
                    fast.extend_from_slice(&g.fast);
                }
                groups.push(g.digest);
            }
            let digests = batch.iter().map(|g| g.digest).collect();
            // Stop hashing as soon as the link or a worker has failed.
            send_unless_failed(&frames, &self.fail_rx, Message::Groups { first, digests })
                && self.fail_rx.is_empty()
                && self.events.is_empty()
                && interrupt::pending().is_none()
        };
        let hashed = match early {
            Some(early) => early.feed(on_batch),
            None => {
                BlockMap::stream_with(&sh.img, layout, algo, Hashing { fast: live, with_data: None }, on_batch, &|n| {
                    self.progress.inc(n)
                })
            }
        };
        match hashed {
            Ok(true) => {}
            Ok(false) => return Err(self.failure()),
            Err(e) => return Err(e.into()),
        }
        let digest = image_digest(algo, layout, &groups);
        self.fast = fast;
        self.groups = groups;
        self.send(Message::GroupsEnd { image_digest: digest })?;
        self.progress.phase("sending", layout.size);
        Ok(())
    }

    /// Wait until the target has finished the pass in flight, then find what
    /// changed since it was announced (the target's stale groups included).
    /// What is found is kept for the next [`send_pass`](Self::send_pass) or
    /// [`final_pass`](Self::final_pass).
    pub fn scan(&mut self) -> Result<Scan, EngineError> {
        let stale_groups = self.wait_pass()?;
        let mut scan = Scan { pass_done: self.pass, stale_groups, ..Scan::default() };
        let changed = self.changed_blocks(false)?;
        scan.changed_blocks = changed;
        log::info!("pass {}: {changed} blocks changed since hashed", self.pass);
        Ok(scan)
    }

    /// Wait until the target has finished the pass in flight, if one is,
    /// and keep the groups it reports stale for the next pass; returns
    /// their count. [`scan`](Self::scan) does this first; a caller that
    /// learns meanwhile that the source has stopped changing (migrate: the
    /// guest is suspended) can stop here and leave the finding of changes
    /// to [`final_pass`](Self::final_pass), which with snapshot tracking
    /// costs no new snapshot.
    pub fn wait_pass(&mut self) -> Result<u64, EngineError> {
        if self.opts.live.is_none() {
            return Err(EngineError::StepOrder("scan() on a session that is not live".into()));
        }
        if !self.in_flight {
            return Ok(0);
        }
        let stale = self.wait_pass_done(None)?;
        let n = stale.len() as u64;
        let gc = self.shared.layout.group_count();
        self.pending.extend(stale.into_iter().filter(|&g| g < gc));
        Ok(n)
    }

    fn wait_pass_done(&mut self, deadline: Option<(Instant, Duration)>) -> Result<Vec<u64>, EngineError> {
        let stale = match self.next_event(deadline)? {
            Event::PassDone { pass: p, stale } if p == self.pass => stale,
            Event::PassDone { pass: p, .. } => {
                return Err(EngineError::BadReply(format!("the end of pass {p} during pass {}", self.pass)))
            }
            Event::Done(_) => return Err(EngineError::BadReply("Done before the final pass".into())),
        };
        self.in_flight = false;
        Ok(stale)
    }

    /// `frozen` is set once the source stops changing (migrate: xl suspended
    /// the guest). From then on a [`scan`](Self::scan) does not wait for a
    /// slow tracking step (a snapshot being taken) and finds nothing; the
    /// [`final_pass`](Self::final_pass) finds it all.
    pub fn watch_freeze(&mut self, frozen: Arc<AtomicBool>) {
        if let Some(t) = self.tracker.as_mut() {
            t.watch_freeze(frozen);
        }
    }

    /// Announce what the scans found as a live pass (the source keeps running).
    pub fn send_pass(&mut self) -> Result<(), EngineError> {
        if self.in_flight {
            return Err(EngineError::StepOrder(format!(
                "send_pass() while pass {} is in flight; scan() first",
                self.pass
            )));
        }
        self.announce_pending(false)
    }

    fn announce_pending(&mut self, final_pass: bool) -> Result<(), EngineError> {
        self.pass += 1;
        let changed_blocks = std::mem::take(&mut self.pending_changed);
        self.send(Message::PassBegin { pass: self.pass, final_pass, changed_blocks })?;
        let set = std::mem::take(&mut self.pending);
        self.announce(&set)?;
        let layout = &self.shared.layout;
        self.send(Message::GroupsEnd { image_digest: image_digest(self.opts.algo, layout, &self.groups) })?;
        self.in_flight = true;
        Ok(())
    }

    /// The source is frozen (the caller made sure): wait for the pass in
    /// flight, find the last changes, send them as the final pass, and wait
    /// for the target's report. The report counts as verified only if the
    /// digest the target reports is this end's own image digest.
    ///
    /// A live session's `final_timeout` bounds all of it: past it, the call
    /// fails with [`EngineError::FinalTimeout`] and the caller thaws.
    pub fn final_pass(&mut self) -> Result<Report, EngineError> {
        let limit = self.opts.live.as_ref().and_then(|l| l.final_timeout);
        let deadline = limit.map(|l| (Instant::now() + l, l));
        if self.opts.live.is_some() {
            if self.in_flight {
                let stale = self.wait_pass_done(deadline)?;
                let gc = self.shared.layout.group_count();
                self.pending.extend(stale.into_iter().filter(|&g| g < gc));
            }
            self.changed_blocks(true)?;
            self.announce_pending(true)?;
        }
        let mut report = match self.next_event(deadline)? {
            Event::Done(report) => *report,
            Event::PassDone { pass, .. } => {
                return Err(EngineError::BadReply(format!("the end of pass {pass} after the final pass")))
            }
        };
        // (every piece was decoded by now: the stream's thread is idle)
        report.stream_levels = self.shared.stream_levels.lock().unwrap().clone();
        report.receipts = self.shared.receipts.as_ref().map_or(0, |r| r.count());
        let algo = self.opts.algo;
        let own = hex(&image_digest(algo, &self.shared.layout, &self.groups)[..algo.width()]);
        if !report.verified || report.digest != own {
            let got = report.digest.clone();
            report.verified = false;
            return Err(EngineError::NotVerified { got, want: own });
        }
        Ok(report)
    }

    /// Say goodbye (with the time the source was frozen) and wait for this
    /// end's threads. A failure to deliver Bye is still a failure.
    ///
    /// What change tracking left behind (device-mapper snapshots) comes
    /// back as [`Tracking`]: removing it takes seconds under emulation, so
    /// the caller drops it once the source runs again (or is gone), outside
    /// the window in which the source is frozen.
    pub fn finish(mut self, downtime: Duration) -> Result<Tracking, EngineError> {
        let tracking = Tracking { _tracker: self.tracker.take() };
        drop(self.watchdog.take());
        let downtime_ns = downtime.as_nanos() as u64;
        let _ = self.frames().send(Message::Bye { downtime_ns });
        drop(self.frames.take());
        for t in std::mem::take(&mut self.threads) {
            t.join().expect("source thread panicked");
        }
        self.finished = true;
        if let Ok(e) = self.fail_rx.try_recv() {
            return Err(e);
        }
        Ok(tracking)
    }

    /// Give up: tell the target why (so that it stops waiting and hangs up)
    /// and let the writer flush that before returning.
    pub fn abort(mut self, why: &EngineError) {
        self.abort_inner(&why.to_string());
    }

    fn abort_inner(&mut self, why: &str) {
        if self.finished {
            return;
        }
        self.finished = true;
        drop(self.tracker.take());
        drop(self.watchdog.take());
        if let Some(f) = self.frames.take() {
            let _ = f.try_send(Message::Error { message: format!("source: {why}") });
        }
        let _ = self.writer_done.recv_timeout(Duration::from_secs(2));
    }
    /// Send the digests of `set` (ascending), consecutive groups together.
    fn announce(&self, set: &BTreeSet<u64>) -> Result<(), EngineError> {
        let groups = &self.groups;
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

    /// Find the blocks changed since the last call, update digests and group
    /// digests, and add their groups to what the next pass announces;
    /// returns how many. From the snapshot tracker when there is one
    /// (falling back to a re-read if its snapshot overflowed), else by
    /// re-reading.
    fn changed_blocks(&mut self, last: bool) -> Result<u64, EngineError> {
        let layout = self.shared.layout.clone();
        let candidates = match self.tracker.as_mut() {
            Some(t) => t.candidates(&layout, last)?,
            None => return Err(EngineError::StepOrder("a live pass on a session that is not live".into())),
        };
        let mut fast = std::mem::take(&mut self.fast);
        let mut groups = std::mem::take(&mut self.groups);
        let found = match &candidates {
            Candidates::All(how) => self.rescan(&mut fast, &mut groups, *how, None),
            Candidates::Only(blocks) => self.rescan(&mut fast, &mut groups, Compare::Strong, Some(blocks)),
        };
        self.fast = fast;
        self.groups = groups;
        let blocks = found?;
        let gb = layout.group_blocks();
        self.pending.extend(blocks.iter().map(|&b| b / gb));
        self.pending_changed += blocks.len() as u64;
        Ok(blocks.len() as u64)
    }

    /// Re-read the image (or only `only`); re-hash the blocks whose content
    /// changed, update digests and group digests, and return those blocks.
    fn rescan(
        &self,
        fast: &mut [u64],
        groups: &mut [Digest],
        how: Compare,
        only: Option<&BTreeSet<u64>>,
    ) -> Result<Vec<u64>, EngineError> {
        let sh = &*self.shared;
        let layout = &sh.layout;
        let algo = self.opts.algo;
        let zeros = ZeroDigests::new(algo, layout.block_size as usize);
        // Read what the device holds now, not what an earlier pass cached.
        sh.img.drop_cache();
        self.progress.phase("rescanning", layout.size);
        let fast_ro: &[u64] = fast;
        let digests_guard = sh.digests.read().unwrap();
        let digests_ro: &[Digest] = &digests_guard;
        let found: ChangedByGroup = if let Some(only) = only {
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
            let mut by_group: ChangedByGroup = Vec::new();
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
                    if interrupt::pending().is_some() {
                        // Stop reading; the caller returns Interrupted.
                        return Ok((g, Vec::new()));
                    }
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
                            Compare::Fast if x != fast_ro[i as usize] => changed.push((i, strong(), x)),
                            Compare::Fast => {}
                            Compare::Strong => {
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
        interrupt::check()?;
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

impl Drop for SourceSession {
    fn drop(&mut self) {
        self.abort_inner("the source end stopped");
    }
}

/// Serve `path` as the source of a whole copy over `link`: the pass loop of
/// `copy --live` (the [`Convergence`] rule, the shell freeze and thaw) on
/// top of [`SourceSession`]. Returns the target's report once the target has
/// verified its copy and said Done.
pub fn run(path: &Path, opts: &SourceOptions, link: Link, progress: &Progress) -> Result<Report, EngineError> {
    let mut session = SourceSession::start(path, opts, link, progress.clone())?;
    let mut freeze: Option<Freeze> = None;
    let outcome = (|| {
        if let Some(live) = &opts.live {
            let mut policy = Convergence::new(live.max_passes, live.converge_blocks, session.block_count());
            loop {
                interrupt::check()?;
                let scan = session.scan()?;
                let last = policy.next_is_final(scan.pass_done, scan.changed_blocks);
                log::info!("next pass {}", if last { "is final (frozen)" } else { "runs live" });
                if last {
                    break;
                }
                interrupt::check()?;
                session.send_pass()?;
            }
            interrupt::check()?;
            freeze = Some(Freeze::run_limited(live.freeze_cmd.as_deref(), live.thaw_cmd.clone(), live.freeze_timeout)?);
        }
        session.final_pass()
    })();
    match outcome {
        Ok(mut report) => {
            let downtime = match freeze.take() {
                Some(f) => f.thaw()?,
                None => Duration::ZERO,
            };
            // Thawed already: the snapshots may go now.
            drop(session.finish(downtime)?);
            report.downtime_seconds = downtime.as_secs_f64();
            Ok(report)
        }
        Err(e) => {
            // Thaw first (the guest must not stay frozen), then tell the
            // target why.
            let thawed = freeze.take().map(Freeze::thaw);
            session.abort(&e);
            if let Some(Err(t)) = thawed {
                log::error!("{t}");
            }
            Err(e)
        }
    }
}

/// Send `m` unless a thread failed first (the writer may be stuck on a dead
/// link, and a failure must not wait for it). True if sent.
fn send_unless_failed(frames: &Sender<Message>, fail: &Receiver<EngineError>, mut m: Message) -> bool {
    loop {
        match frames.send_timeout(m, Duration::from_millis(100)) {
            Ok(()) => return true,
            Err(crossbeam_channel::SendTimeoutError::Timeout(back)) if fail.is_empty() => m = back,
            Err(_) => return false,
        }
    }
}

/// Own the write half: send frames, flushing whenever the queue runs dry,
/// and a keep-alive whenever it stayed dry for `keepalive`.
fn write_loop(mut w: Writer, rx: Receiver<Message>, keepalive: Option<Duration>) -> Result<(), EngineError> {
    loop {
        let m = match rx.try_recv() {
            Ok(m) => m,
            Err(_) => {
                w.flush().map_err(ProtocolError::Io)?;
                let next = match keepalive {
                    Some(every) => match rx.recv_timeout(every) {
                        Ok(m) => Ok(m),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(Message::KeepAlive),
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(()),
                    },
                    None => rx.recv().map_err(|_| ()),
                };
                match next {
                    Ok(m) => m,
                    Err(()) => return Ok(()),
                }
            }
        };
        write_message(&mut w, &m)?;
    }
}

/// Optional requests the target may make, and frames it may send
/// (capabilities both ends set).
struct Optional {
    /// `FetchDelta` (`CAP_SUB_DELTA`).
    deltas: bool,
    /// `WantChangedKeys` (`CAP_SUB_GROUPS`).
    subgroups: bool,
    /// `WantSketches` (`CAP_SIMILAR`).
    sketches: bool,
    /// `WantHintedKeys` (`CAP_BLOCK_HINTS` with `CAP_SUB_GROUPS`).
    hints: bool,
    /// `FetchDeltaShort` (`CAP_SHORT_SUB_HASHES` with `CAP_SUB_DELTA`).
    short_hashes: bool,
    /// `Received` (`CAP_RECEIPTS`): where receipts go.
    receipts: Option<Arc<Receipts>>,
    /// `Holds` (`CAP_HELD_KEYS` with `CAP_SUB_GROUPS`): where the set goes,
    /// and the most keys it may hold.
    held: Option<(Arc<OnceLock<HeldSet>>, u64)>,
    /// `FetchDeltas` (`CAP_DELTA_BATCH`).
    batches: bool,
}

/// Take requests off the link and pass events on, until Done.
fn read_loop(
    mut r: Reader,
    work: Sender<Message>,
    frames: Sender<Message>,
    events: Sender<Result<Event, EngineError>>,
    waiting: Waiting,
    optional: Optional,
    // Some(None): the capability was agreed but no stream can use a
    // reference, so the answer is none.
    mut offer: Option<Option<Offer>>,
) {
    // Whether a request came yet: the target's held set comes before any.
    let mut asked = false;
    let result = (|| loop {
        waiting.set(true);
        let m = read_message(&mut r, "before the target said Done");
        waiting.set(false);
        let m = m?;
        // Receipts may come before anything else, the offer included: the
        // target sends them from the handshake on, while it loads its
        // references.
        if let (Message::Received { bytes, waited_ns }, Some(r)) = (&m, &optional.receipts) {
            r.on_receipt(*bytes, *waited_ns);
            continue;
        }
        if let Some(o) = offer.take() {
            // CAP_SHARED_REF: the target's offer comes before anything else.
            let Message::RefOffer { refs } = m else {
                return Err(EngineError::Protocol(ProtocolError::Unexpected {
                    got: m.kind(),
                    state: "waiting for the target's RefOffer",
                }));
            };
            let (chosen, prefix) = match o {
                // (Nothing offered: the loader's work is simply dropped.)
                Some(o) if refs.is_empty() => (Dictionary::None, Some(o.prefix)),
                Some(o) => match o.loading.join() {
                    Ok(loaded) if o.late => {
                        (shared_ref::pick(loaded?, &refs).map_or(Dictionary::None, Dictionary::Later), Some(o.prefix))
                    }
                    Ok(loaded) => {
                        (shared_ref::choose(loaded?, &refs).map_or(Dictionary::None, Dictionary::Now), Some(o.prefix))
                    }
                    Err(_) => return Err(EngineError::Aborted("the source references' loader panicked".into())),
                },
                None => (Dictionary::None, None),
            };
            // Before any reply: the stream's first piece follows it.
            let _ = frames.send(Message::RefChosen { chosen: chosen.digest() });
            if let Some(tx) = prefix {
                let _ = tx.send(chosen);
            }
            continue;
        }
        let m = match (m, &optional.held) {
            (Message::Holds { range, k, count, bits }, Some((slot, max))) => {
                let set = HeldSet::decode(&held::Encoded { range, k, count, bits }, *max)
                    .map_err(|e| EngineError::BadRequest(format!("the target's held keys: {e}")))?;
                if asked || slot.set(set).is_err() {
                    return Err(EngineError::BadRequest("held keys after the target's first request, or twice".into()));
                }
                continue;
            }
            (m, _) => m,
        };
        asked |= !matches!(m, Message::PassDone { .. } | Message::Done { .. });
        match m {
            m @ (Message::WantDigests { .. } | Message::Fetch { .. }) => {
                // Blocks while the queue is full: back-pressure.
                let _ = work.send(m);
            }
            m @ Message::FetchDelta { .. } if optional.deltas => {
                let _ = work.send(m);
            }
            m @ Message::FetchDeltaShort { .. } if optional.short_hashes => {
                let _ = work.send(m);
            }
            // (One work item: its answer is one piece, one `Deltas`.)
            m @ Message::FetchDeltas { .. } if optional.batches => {
                let _ = work.send(m);
            }
            m @ Message::WantChangedKeys { .. } if optional.subgroups => {
                let _ = work.send(m);
            }
            m @ Message::WantSketches { .. } if optional.sketches => {
                let _ = work.send(m);
            }
            m @ (Message::WantHintedKeys { .. } | Message::WantChangedSubs { .. }) if optional.hints => {
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
            let _ = events.send(Ok(Event::Done(Box::new(report))));
        }
        Err(e) => {
            let _ = frames.send(Message::Error { message: format!("source: {e}") });
            let _ = events.send(Err(e));
        }
    }
}

/// What the reader needs to answer the target's `RefOffer`.
struct Offer {
    /// This end's references, being read and hashed (a catalog's: listed).
    loading: thread::JoinHandle<Result<Vec<SourceRef>, EngineError>>,
    /// To the stream's thread.
    prefix: Sender<Dictionary>,
    /// `CAP_LATE_REF` agreed: choose without reading a catalog's entry.
    late: bool,
}

/// The reader's answer to the offer, for the stream's thread.
enum Dictionary {
    None,
    /// The stream begins with it (a target without `CAP_LATE_REF`).
    Now(SharedRef),
    /// The stream takes it when the policy says (`CAP_LATE_REF`).
    Later(SourceRef),
}

impl Dictionary {
    fn digest(&self) -> Option<Digest> {
        match self {
            Dictionary::None => None,
            Dictionary::Now(r) => Some(r.digest),
            Dictionary::Later(r) => r.digest(),
        }
    }
}

/// The stream's encoder, or what it waits for to make one.
enum Pending {
    Ready(StreamEncoder),
    /// A shared reference was agreed: the encoder starts with the reference
    /// the reader chose as its prefix (or empty, if none).
    Prefix {
        level: i32,
        image_size: u64,
        /// Without a reference chosen, the stream may change level.
        levels: bool,
        /// `CAP_LATE_REF` agreed: when the reference is taken.
        late: Option<LatePolicy>,
    },
}

/// What the reference's thread made: the encoder to continue as, with the
/// reference's path (None: not taken, said in the log).
type Prepared = Result<Option<(StreamEncoder, std::path::PathBuf)>, EngineError>;

/// A large reference the stream takes late (`CAP_LATE_REF`).
struct Late {
    policy: LatePolicy,
    image_size: u64,
    /// Until its read starts.
    source: Option<SourceRef>,
    /// Read, verified, judged and indexed on a thread of its own (at the
    /// stream's level then, which the reference's frame keeps).
    ready: Option<thread::JoinHandle<Prepared>>,
    /// Set by that thread once the reference is read, verified and judged
    /// worth taking, before it indexes it, and cleared when the target is
    /// told to read its copy (`STREAM_REF_SOON_CODE`): only then, so that a
    /// reference not taken costs the target no read and no memory.
    judged: Arc<AtomicBool>,
}

impl Late {
    /// Whether to start reading and indexing: the stream carried enough,
    /// and the link is slow enough (`link_rate`, bytes a second, as `auto`
    /// measures it; nothing yet: not known to be).
    fn due(&self, enc: &StreamEncoder, link_rate: impl FnOnce() -> Option<f64>) -> bool {
        self.source.is_some()
            && enc.content() >= self.policy.after_content
            && match self.policy.max_link_rate {
                None => true,
                Some(max) => link_rate().is_some_and(|r| r < max),
            }
    }

    /// Start reading and indexing; it is taken only if `enc`'s recent
    /// content resembles it.
    fn start(&mut self, enc: &StreamEncoder) {
        let Some(source) = self.source.take() else { return };
        let (level, image_size, min) = (enc.level(), self.image_size, self.policy.min_resemblance);
        let recent = enc.recent();
        let judged = self.judged.clone();
        self.ready = Some(thread::spawn(move || {
            let Some(r) = source.into_verified() else { return Ok(None) };
            let share = recent.and_then(|s| shared_ref::resemblance(&r.bytes, &s));
            if let Some(share) = share {
                let what =
                    format!("{} resembles {:.1}% of the stream's recent content", r.path.display(), share * 100.0);
                if share < min {
                    log::info!("stream: {what}, less than {:.1}%: not taken", min * 100.0);
                    return Ok(None);
                }
                log::debug!("stream: {what}");
            }
            judged.store(true, Ordering::Release);
            let mut enc = StreamEncoder::with_prefix(level, r.bytes, image_size)?;
            enc.prime()?;
            Ok(Some((enc, r.path)))
        }));
    }

    /// Whether to tell the target now to read its copy: the reference was
    /// judged worth taking since the last call (the thread sets the flag
    /// once).
    fn hint_due(&self) -> bool {
        self.judged.swap(false, Ordering::AcqRel)
    }

    /// The encoder to continue as, once ready.
    fn take_ready(&mut self) -> Option<Prepared> {
        if !self.ready.as_ref().is_some_and(|h| h.is_finished()) {
            return None;
        }
        let h = self.ready.take().expect("checked above");
        Some(h.join().unwrap_or_else(|_| Err(EngineError::Aborted("the shared reference's indexer panicked".into()))))
    }
}

/// A run read for the stream's thread to compress.
struct RawRun {
    first_block: u64,
    count: u32,
    raw: Vec<u8>,
    /// What `raw` holds, and so the frame it goes in.
    what: RunOf,
}

/// What a [`RawRun`] holds.
enum RunOf {
    /// `count` blocks from `first_block`: a `Blocks` frame.
    Blocks,
    /// The delta body of block `first_block`: a `Delta` frame.
    Delta,
    /// The delta bodies of these blocks, one after another: a `Deltas`
    /// frame (`CAP_DELTA_BATCH`).
    Deltas(Vec<u64>),
}

/// `run` as pieces of about `limit` raw bytes, in order, where the target
/// takes them apart: a `Deltas` batch between its bodies; a run of blocks
/// between blocks where `CAP_SPLIT_RUNS` was agreed, and only at group
/// boundaries where the target may have asked for unkeyed runs (each lies
/// in one group, and is checked whole: `CAP_HELD_KEYS`). A run that cannot
/// be cut stays whole.
fn cut_run(sh: &Shared, run: RawRun, limit: usize) -> VecDeque<RawRun> {
    let layout = &sh.layout;
    let mut out = VecDeque::new();
    match run.what {
        RunOf::Deltas(blocks) => {
            let (mut at, mut from) = (0, 0);
            let mut batch = Vec::new();
            for &b in &blocks {
                // (The bodies are this end's own: they split.)
                let n = subdelta::body_len(layout.extent(b).1, &run.raw[at..]).expect("this end's own body");
                if !batch.is_empty() && at + n - from > limit {
                    let raw = run.raw[from..at].to_vec();
                    let first_block = batch[0];
                    out.push_back(RawRun {
                        first_block,
                        count: batch.len() as u32,
                        raw,
                        what: RunOf::Deltas(std::mem::take(&mut batch)),
                    });
                    from = at;
                }
                batch.push(b);
                at += n;
            }
            let first_block = batch[0];
            out.push_back(RawRun {
                first_block,
                count: batch.len() as u32,
                raw: run.raw[from..].to_vec(),
                what: RunOf::Deltas(batch),
            });
        }
        RunOf::Blocks if sh.split_runs && run.count > 1 => {
            let end = run.first_block + run.count as u64;
            let gb = layout.group_blocks();
            let whole_groups = sh.held.get().is_some();
            let base = byte_range(layout, run.first_block, run.first_block + 1).0;
            let mut first = run.first_block;
            while first < end {
                // The piece's end: blocks up to the limit (one at least), then
                // back to a group boundary if unkeyed runs may lie here.
                let (mut stop, mut bytes) = (first, 0);
                while stop < end {
                    let len = layout.extent(stop).1;
                    if stop > first && bytes + len > limit {
                        break;
                    }
                    (stop, bytes) = (stop + 1, bytes + len);
                }
                if whole_groups && stop < end {
                    let boundary = stop / gb * gb;
                    stop = if boundary > first { boundary } else { ((first / gb + 1) * gb).min(end) };
                }
                let (s, e) = byte_range(layout, first, stop);
                let raw = run.raw[(s - base) as usize..(e - base) as usize].to_vec();
                out.push_back(RawRun { first_block: first, count: (stop - first) as u32, raw, what: RunOf::Blocks });
                first = stop;
            }
        }
        what => out.push_back(RawRun { what, ..run }),
    }
    out
}

/// What a worker made of a Fetch.
enum Reply {
    /// A finished frame for the writer.
    Frame(Message),
    /// A run for the copy's zstd stream.
    Stream(RawRun),
}

/// Let `auto` judge the stream's level on the link as it is now, while the
/// stream's thread waits (the workers route no run meanwhile), and publish
/// its choice to the stream.
fn tick_levels(sh: &Shared) {
    let mut p = sh.auto.lock().unwrap();
    p.levels_tick(link_view(sh, Instant::now()), sh.workers, Instant::now());
    sh.stream_level.store(p.stream_level(), Ordering::Relaxed);
}

/// The next run for the stream, None once the workers are done. With
/// `ticking` (a stream whose level may change, at the receipts' gate),
/// `auto` judges the link every tenth of a second while none comes: only
/// routing and the gate's waits decided, and while the workers route
/// nothing (waiting for the target's signatures, at the start of a return
/// copy) and the stream waits for runs rather than at the gate, a rate
/// the receipts already showed, and the levels' measurement with it,
/// waited for the next run routed.
fn next_run(rx: &Receiver<RawRun>, ticking: bool, sh: &Shared) -> Option<RawRun> {
    if !ticking {
        return rx.recv().ok();
    }
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(run) => return Some(run),
            Err(RecvTimeoutError::Timeout) => tick_levels(sh),
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// Own the stream's encoder: compress each run as the next piece of the
/// stream and pass its frame on at once, so that pieces reach the writer
/// (and the target's decoder) in the order they were compressed.
fn stream_loop(
    enc: Pending,
    prefix: Receiver<Dictionary>,
    rx: Receiver<RawRun>,
    frames: &Sender<Message>,
    sh: &Shared,
) -> Result<(), EngineError> {
    // The codec of the next piece: STREAM_REF_CODE where the reference's
    // frame begins in it.
    let mut code = STREAM_CODE;
    let mut late = None;
    let mut enc = match enc {
        Pending::Ready(enc) => enc,
        Pending::Prefix { level, image_size, levels, late: policy } => {
            let plain = || -> Result<StreamEncoder, EngineError> {
                let enc = StreamEncoder::new(level, zstream::window_log_for(image_size))?;
                // With CAP_LATE_REF the target ends frames as with levels.
                Ok(if levels || policy.is_some() { enc.follow_levels() } else { enc })
            };
            let with = |r: SharedRef| -> Result<StreamEncoder, EngineError> {
                let mut enc = StreamEncoder::with_prefix(level, r.bytes, image_size)?;
                // Index the prefix while the target loads its copy of it.
                enc.prime()?;
                Ok(enc)
            };
            match prefix.recv() {
                Ok(Dictionary::Now(r)) => with(r)?,
                Ok(Dictionary::None) => plain()?,
                Ok(Dictionary::Later(r)) => {
                    let policy = policy.expect("a late choice only with CAP_LATE_REF");
                    if r.size() <= policy.from_start_up_to {
                        match r.into_verified() {
                            Some(r) => {
                                code = STREAM_REF_CODE;
                                with(r)?
                            }
                            None => plain()?,
                        }
                    } else {
                        late = Some(Late {
                            policy,
                            image_size,
                            source: Some(r),
                            ready: None,
                            judged: Arc::new(AtomicBool::new(false)),
                        });
                        plain()?
                    }
                }
                Err(_) => return Ok(()), // the reader ended first: the copy is failing already
            }
        }
    };
    let mut used = None;
    // Only a stream that may change level waits for receipts: what it
    // compresses after `auto` measured the link is at the level chosen
    // then, not megabytes compressed ahead into buffers.
    let gate = sh.receipts.as_ref().filter(|_| enc.follows_levels());
    let (mut held, mut holds) = (Duration::ZERO, 0u32);
    let mut rise_held = Duration::ZERO;
    let mut idle = Duration::ZERO;
    // Pieces cut from a run taken, still to go.
    let mut cut = VecDeque::new();
    loop {
        let run = match cut.pop_front() {
            Some(run) => run,
            None => {
                let t = Instant::now();
                let next = next_run(&rx, gate.is_some(), sh);
                idle += t.elapsed();
                match next {
                    Some(run) => run,
                    None => break,
                }
            }
        };
        if let Some(g) = gate {
            let t = Instant::now();
            // The route and the level are decided when runs are routed;
            // while this thread waits the workers, whose runs it holds,
            // route none. So decide here, on what the wait shows, every
            // tenth of a second of it and at its end: the link's first
            // slow reading otherwise waited out the hold (0.5-1 s of the
            // return copy at 2 Mbit/s compressed at level 3).
            loop {
                let room = g.wait_for_room_at_most(Duration::from_millis(100));
                if t.elapsed() > Duration::from_millis(1) {
                    tick_levels(sh);
                }
                if room {
                    break;
                }
            }
            let waited = t.elapsed();
            if waited > Duration::from_millis(1) {
                (held, holds) = (held + waited, holds + 1);
            }
            // A first rise of the level moments away: wait for it rather
            // than compress this piece at the first level (at most
            // RISE_HOLD in all; on a link that slow the gate's second of
            // data in flight keeps it busy meanwhile).
            while rise_held < RISE_HOLD && sh.auto.lock().unwrap().first_rise_pending() {
                let t = Instant::now();
                std::thread::sleep(Duration::from_millis(5));
                tick_levels(sh);
                rise_held += t.elapsed();
            }
        }
        // A slow link gets small pieces: the gate and a raised level act
        // between pieces (`compress::piece_limit`). Decided here, after the
        // gate, when the most is known of the link.
        let limit = gate.and_then(|g| {
            let (rate, spell, _) = g.view(Instant::now());
            piece_limit(rate, spell)
        });
        let run = match limit {
            Some(limit) if run.raw.len() > limit => {
                let mut pieces = cut_run(sh, run, limit);
                let first = pieces.pop_front().expect("a run cuts into one piece at least");
                while let Some(p) = pieces.pop_back() {
                    cut.push_front(p);
                }
                first
            }
            _ => run,
        };
        if let Some(l) = &mut late {
            if l.due(&enc, || late_link_rate(sh)) {
                l.start(&enc);
            }
            if l.hint_due() {
                // The target reads its copy while this end indexes its own.
                code = STREAM_REF_SOON_CODE;
            }
            if enc.can_change_level() {
                match l.take_ready() {
                    Some(Ok(Some((next, path)))) => {
                        log::info!(
                            "stream: {} is the dictionary from {} bytes of content on",
                            path.display(),
                            enc.content()
                        );
                        enc.begin_reference_frame(next)?;
                        code = STREAM_REF_CODE;
                        late = None;
                    }
                    Some(Ok(None)) => late = None, // (said in the log)
                    Some(Err(e)) => {
                        log::warn!("the shared reference is not used: {e}");
                        late = None;
                    }
                    None => {}
                }
            }
        }
        let want = sh.stream_level.load(Ordering::Relaxed);
        if enc.can_change_level() && want != enc.level() {
            enc.set_level(want)?;
            log::debug!(
                "stream: level {want} from now on, after {} bytes of content ({} bytes written to the link)",
                enc.content(),
                sh.stats.written()
            );
            used = None;
        }
        if used != Some(enc.level()) {
            used = Some(enc.level());
            sh.stream_levels.lock().unwrap().push(enc.level());
        }
        let t = Instant::now();
        let payload = enc.compress_run(&run.raw)?;
        sh.stream_compressing.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let raw_len = run.raw.len() as u32;
        let codec = std::mem::replace(&mut code, STREAM_CODE);
        let m = match run.what {
            RunOf::Blocks => {
                Message::Blocks { first_block: run.first_block, count: run.count, codec, raw_len, payload }
            }
            RunOf::Delta => Message::Delta { block: run.first_block, codec, raw_len, payload },
            RunOf::Deltas(blocks) => Message::Deltas { codec, raw_len, blocks, payload },
        };
        if frames.send(m).is_err() {
            break; // the writer is gone: the copy is failing already
        }
    }
    if gate.is_some() {
        log::debug!(
            "stream: held {:.2} s at the receipts' gate ({holds} times), {:.2} s for a rise of its level; \
             compressed for {:.2} s, waited {:.2} s for runs",
            held.as_secs_f64(),
            rise_held.as_secs_f64(),
            sh.stream_compressing.load(Ordering::Relaxed) as f64 / 1e9,
            idle.as_secs_f64()
        );
    }
    Ok(())
}

fn work_loop(
    sh: &Shared,
    rx: Receiver<Message>,
    tx: Sender<Message>,
    stream: Option<Sender<RawRun>>,
) -> Result<(), EngineError> {
    for m in rx {
        let reply = match m {
            Message::WantDigests { first_group, count } => want_digests(sh, first_group, count, &tx).map(|()| None),
            Message::Fetch { first_block, count } => fetch(sh, first_block, count, stream.is_some()),
            Message::FetchDelta { block, sig } => fetch_delta(sh, block, &sig, false, stream.is_some()),
            Message::FetchDeltaShort { block, sig } => fetch_delta(sh, block, &sig, true, stream.is_some()),
            Message::FetchDeltas { blocks, sigs } => fetch_deltas(sh, blocks, &sigs, stream.is_some()),
            Message::WantChangedKeys { group, subs, zero, keys } => {
                changed_keys(sh, group, subs, Signature { zero, keys }).map(|m| Some(Reply::Frame(m)))
            }
            Message::WantSketches { first_block, count } => {
                sketches(sh, first_block, count).map(|m| Some(Reply::Frame(m)))
            }
            Message::WantChangedSubs { group, subs, zero, keys } => {
                changed_subs(sh, group, subs, &zero, &keys).map(|m| Some(Reply::Frame(m)))
            }
            Message::WantHintedKeys { group, subs, differ, zero, hints } => {
                hinted_keys(sh, group, subs, &differ, &zero, &hints).map(|m| Some(Reply::Frame(m)))
            }
            _ => unreachable!("reader forwards only requests"),
        }
        .map(|r| match r {
            Some(Reply::Frame(m)) => {
                let _ = tx.send(m);
            }
            Some(Reply::Stream(run)) => {
                if let Some(s) = &stream {
                    let _ = s.send(run);
                }
            }
            None => {}
        });
        if let Err(e) = reply {
            let _ = tx.send(Message::Error { message: format!("source: {e}") });
            return Err(e);
        }
    }
    Ok(())
}

fn want_digests(sh: &Shared, first: u64, count: u32, tx: &Sender<Message>) -> Result<(), EngineError> {
    let Some(end) = checked_end(first, count, sh.layout.group_count()) else {
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

/// Answer a `WantChangedKeys`: which sub-groups of group `g` differ from
/// the target's signature `sig` of `subs` sub-groups, and their keys.
/// With the target's held set (`CAP_HELD_KEYS`), only the keys of zero
/// blocks and of blocks the set may hold go, as `HeldKeys`.
fn changed_keys(sh: &Shared, g: u64, subs: u16, sig: Signature) -> Result<Message, EngineError> {
    if let Some(set) = sh.held.get() {
        let a = with_group(sh, g, "changed keys", |own, is_zero| {
            held::held_keys(sh.algo, own, is_zero, subs as usize, &sig, set)
        })?;
        let held::HeldAnswer { differ, count, keyed, keys, run_keys } = a;
        return Ok(Message::HeldKeys { group: g, subs, differ, count, keyed, keys, run_keys });
    }
    let (differ, keys) = with_group(sh, g, "changed keys", |own, is_zero| {
        subgroup::differing(sh.algo, own, is_zero, subs as usize, &sig)
    })?;
    Ok(Message::ChangedKeys { group: g, subs, differ, keys })
}

/// Answer a `WantChangedSubs` (`CAP_BLOCK_HINTS`): which sub-groups of
/// group `g` differ from the target's short signature, no keys.
fn changed_subs(sh: &Shared, g: u64, subs: u16, zero: &[u8], keys: &[ShortKey]) -> Result<Message, EngineError> {
    let differ = with_group(sh, g, "changed sub-groups", |own, is_zero| {
        subgroup::differing_short(sh.algo, own, is_zero, subs as usize, zero, keys)
    })?;
    Ok(Message::ChangedSubs { group: g, subs, differ })
}

/// Answer a `WantHintedKeys` (`CAP_BLOCK_HINTS`): the keys of group `g`'s
/// blocks in the sub-groups marked in `differ` whose hint differs from DST's.
fn hinted_keys(
    sh: &Shared,
    g: u64,
    subs: u16,
    differ: &[u8],
    zero: &[u8],
    hints: &[u8],
) -> Result<Message, EngineError> {
    let (count, changed, keys) = with_group(sh, g, "hinted keys", |own, is_zero| {
        subgroup::hinted(own, is_zero, subs as usize, differ, zero, hints)
    })?;
    // (At most a group's blocks: MAX_FRAME bounds the hints that named them.)
    let count = u32::try_from(count)
        .map_err(|_| EngineError::BadRequest(format!("hinted keys of group {g}: too many blocks")))?;
    Ok(Message::HintedKeys { group: g, count, changed, keys })
}

/// Run `f` on the block digests of group `g` (and whether each of its
/// blocks is zero), once the group is announced; `what` names the request.
fn with_group<T>(
    sh: &Shared,
    g: u64,
    what: &str,
    f: impl FnOnce(&[Digest], &dyn Fn(usize) -> bool) -> Result<T, subgroup::SubGroupError>,
) -> Result<T, EngineError> {
    if g >= sh.layout.group_count() {
        return Err(EngineError::BadRequest(format!("{what} of group {g}, image has {}", sh.layout.group_count())));
    }
    let (a, b) = sh.layout.group_range(g);
    let d = sh.digests.read().unwrap();
    if (d.len() as u64) < b {
        return Err(EngineError::BadRequest(format!("{what} of group {g} before it was announced")));
    }
    let own = &d[a as usize..b as usize];
    let is_zero = |k: usize| sh.zeros.is_zero_digest(&own[k], sh.layout.extent(a + k as u64).1);
    f(own, &is_zero).map_err(|e| EngineError::BadRequest(format!("{what} of group {g}: {e}")))
}

/// Read a requested run and send it as [`route`] says.
fn fetch(sh: &Shared, first: u64, count: u32, streaming: bool) -> Result<Option<Reply>, EngineError> {
    let Some(end) = checked_end(first, count, sh.layout.block_count()) else {
        return Err(EngineError::BadRequest(format!("blocks {first}+{count}, image has {}", sh.layout.block_count())));
    };
    let (start, stop) = byte_range(&sh.layout, first, end);
    if stop - start > MAX_RUN_BYTES {
        return Err(EngineError::BadRequest(format!("a run of {} bytes, more than {MAX_RUN_BYTES}", stop - start)));
    }
    let mut raw = vec![0u8; (stop - start) as usize];
    sh.img.read_at(&mut raw, start)?;
    Ok(Some(match route(sh, raw, streaming) {
        Routed::Stream(raw) => Reply::Stream(RawRun { first_block: first, count, raw, what: RunOf::Blocks }),
        Routed::Coded { code, raw_len, payload } => {
            Reply::Frame(Message::Blocks { first_block: first, count, codec: code, raw_len, payload })
        }
    }))
}

/// Answer a `WantSketches`: the resemblance sketch of each block of a run
/// (no longer than a `Fetch` may ask for).
fn sketches(sh: &Shared, first: u64, count: u32) -> Result<Message, EngineError> {
    let Some(end) = checked_end(first, count, sh.layout.block_count()) else {
        return Err(EngineError::BadRequest(format!(
            "sketches of blocks {first}+{count}, image has {}",
            sh.layout.block_count()
        )));
    };
    let (start, stop) = byte_range(&sh.layout, first, end);
    if stop - start > MAX_RUN_BYTES {
        return Err(EngineError::BadRequest(format!(
            "sketches of a run of {} bytes, more than {MAX_RUN_BYTES}",
            stop - start
        )));
    }
    let mut raw = vec![0u8; (stop - start) as usize];
    sh.img.read_at(&mut raw, start)?;
    let sketches = (first..end)
        .map(|i| {
            let (off, len) = sh.layout.extent(i);
            let at = (off - start) as usize;
            // A block without features: zeros, which the target takes
            // as "none" (and a sketch of zeros by chance as the same).
            sketch::sketch(&raw[at..at + len]).map(|s| sketch::to_bytes(&s)).unwrap_or_default()
        })
        .collect();
    Ok(Message::Sketches { first_block: first, sketches })
}

/// Answer a `FetchDeltas` (`CAP_DELTA_BATCH`): the delta body of each
/// block against its short signature, cut from `sigs` at its length for
/// the block's sub-blocks, the bodies one after another in one payload,
/// routed like any run. Blocks past the image, signatures that do not add
/// up, or a batch whose bodies could pass
/// [`MAX_BATCH_BODY`](subdelta::MAX_BATCH_BODY) are an error.
fn fetch_deltas(sh: &Shared, blocks: Vec<u64>, sigs: &[u8], streaming: bool) -> Result<Option<Reply>, EngineError> {
    let layout = &sh.layout;
    let mut rest = sigs;
    let mut raw = Vec::new();
    let mut most = 0u64;
    for &block in &blocks {
        if block >= layout.block_count() {
            return Err(EngineError::BadRequest(format!(
                "a batch of deltas asks block {block}, image has {}",
                layout.block_count()
            )));
        }
        let want = subdelta::sub_count(layout.extent(block).1) * subdelta::SHORT_HASH_LEN;
        if rest.len() < want {
            return Err(EngineError::BadRequest(format!(
                "a batch of {} deltas: its signatures end before block {block}'s",
                blocks.len()
            )));
        }
        let len = layout.extent(block).1;
        most += subdelta::max_body(len) as u64;
        if most > subdelta::MAX_BATCH_BODY {
            return Err(EngineError::BadRequest(format!(
                "a batch of {} deltas, whose bodies may pass the {} bytes of a run",
                blocks.len(),
                subdelta::MAX_BATCH_BODY
            )));
        }
        let (sig, tail) = rest.split_at(want);
        rest = tail;
        let mut new = vec![0u8; len];
        sh.img.read_at(&mut new, layout.extent(block).0)?;
        let body =
            subdelta::encode_short(&new, sig).map_err(|e| EngineError::BadRequest(format!("block {block}: {e}")))?;
        raw.extend_from_slice(&body);
    }
    if !rest.is_empty() {
        return Err(EngineError::BadRequest(format!(
            "a batch of {} deltas: {} bytes of signatures past its last block's",
            blocks.len(),
            rest.len()
        )));
    }
    let first_block = blocks[0];
    Ok(Some(match route(sh, raw, streaming) {
        Routed::Stream(raw) => {
            Reply::Stream(RawRun { first_block, count: blocks.len() as u32, raw, what: RunOf::Deltas(blocks) })
        }
        Routed::Coded { code, raw_len, payload } => {
            Reply::Frame(Message::Deltas { codec: code, raw_len, blocks, payload })
        }
    }))
}

/// Answer a `FetchDelta`: block `block` as the sub-blocks that differ from
/// the target's old version, whose signature is `sig` (its length checked
/// against the block's here), through the stream or a codec like any run.
/// Answer a `FetchDelta` (or, `short`, a `FetchDeltaShort`).
fn fetch_delta(
    sh: &Shared,
    block: u64,
    sig: &[u8],
    short: bool,
    streaming: bool,
) -> Result<Option<Reply>, EngineError> {
    if checked_end(block, 1, sh.layout.block_count()).is_none() {
        return Err(EngineError::BadRequest(format!(
            "a delta of block {block}, image has {}",
            sh.layout.block_count()
        )));
    }
    let (off, len) = sh.layout.extent(block);
    let mut raw = vec![0u8; len];
    sh.img.read_at(&mut raw, off)?;
    let body = if short { subdelta::encode_short(&raw, sig) } else { subdelta::encode(&raw, sig) };
    let body = body.map_err(|e| EngineError::BadRequest(format!("block {block}: {e}")))?;
    Ok(Some(match route(sh, body, streaming) {
        Routed::Stream(raw) => Reply::Stream(RawRun { first_block: block, count: 1, raw, what: RunOf::Delta }),
        Routed::Coded { code, raw_len, payload } => {
            Reply::Frame(Message::Delta { block, codec: code, raw_len, payload })
        }
    }))
}

/// How a payload travels.
enum Routed {
    /// As the next piece of the copy's stream.
    Stream(Vec<u8>),
    /// On its own, compressed with `code` (or raw).
    Coded { code: u8, raw_len: u32, payload: Vec<u8> },
}

/// The link's drain rate as the late reference's policy sees it: with
/// `auto`, only once `auto` has judged the link slow. A reading alone
/// may be a moment of a fast link: unshaped, with both ends on one 2-core
/// host, about one copy in ten started reading and hashing a 316 MB
/// reference on a dip while the link was still unknown, on the cores the
/// copy needed (docs/experiments.md, session 21).
fn late_link_rate(sh: &Shared) -> Option<f64> {
    let rate = link_view(sh, Instant::now()).drain_rate;
    match sh.compress {
        Choice::Auto => rate.filter(|_| sh.auto.lock().unwrap().link_is_slow()),
        _ => rate,
    }
}

/// What `auto` knows of the link at `now`.
fn link_view(sh: &Shared, now: Instant) -> LinkView {
    let mut link = LinkView {
        drain_rate: sh.stats.drain_rate(),
        written: sh.stats.written(),
        spell: sh.stats.spell(now),
        busy: sh.stats.busy_secs(now),
        receipts: false,
        compressing: Some(sh.stream_compressing.load(Ordering::Relaxed) as f64 / 1e9),
    };
    if let Some(r) = &sh.receipts {
        // The receipts' view wherever it has evidence: behind ssh's and the
        // kernel's buffers the gate keeps the stream from blocking writes
        // for long, and the few that block read any rate (preferring
        // theirs, a 2 Mbit/s copy read fast a second after its level rose
        // and dropped it back). The writes' view where receipts have none:
        // `--bwlimit` holds bytes before they count as written, so
        // receipts see no backlog there. Busy time adds up, so that the
        // level drops only when neither shows the link busy.
        let (drain_rate, spell, busy) = r.view(now);
        if spell.is_some() {
            (link.spell, link.receipts) = (spell, true);
        }
        link.drain_rate = drain_rate.or(link.drain_rate);
        link.busy += busy;
    }
    link
}

/// Pick how `raw` (a run, or a delta body) travels: through the copy's
/// zstd stream (`streaming`: the target takes one) when the user chose
/// zstd or `auto` routes it there, else compressed on its own (or raw).
fn route(sh: &Shared, raw: Vec<u8>, streaming: bool) -> Routed {
    let raw_len = raw.len() as u32;
    let route = match sh.compress {
        Choice::Fixed(Codec::Zstd(_)) if streaming => Route::Stream,
        Choice::Fixed(c) => Route::Run(c),
        Choice::Auto => {
            let mut p = sh.auto.lock().unwrap();
            if p.wants_sample() {
                p.sample(&raw);
            }
            p.observe(&raw);
            let now = Instant::now();
            let link = link_view(sh, now);
            let route = p.choose(link, sh.workers, raw.len() as u64, now);
            sh.stream_level.store(p.stream_level(), Ordering::Relaxed);
            route
        }
    };
    let codec = match route {
        // Never sent raw instead: both ends' streams must see the same runs.
        Route::Stream if streaming => return Routed::Stream(raw),
        // (auto offers the stream only to a copy that has one)
        Route::Stream => Codec::Zstd(zstream::AUTO_LEVEL),
        Route::Run(c) => c,
    };
    let (mut payload, mut code) = (raw, Codec::None.code());
    if codec != Codec::None {
        let packed = codec.compress(&payload);
        // Incompressible data goes raw: cheaper to decode, never larger.
        if packed.len() < payload.len() {
            (payload, code) = (packed, codec.code());
        }
    }
    Routed::Coded { code, raw_len, payload }
}

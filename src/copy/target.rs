//! The target end: rebuild the source's image in DST from what is already
//! here, fetching only what is missing, and verify all of it.
//!
//! For each group the source announces, in order of preference:
//! 1. DST already holds it at the same place (group digests equal): nothing
//!    moves. This is what makes precache and resumed copies cheap.
//! 2. The group is all zeros: nothing moves; holes stay holes.
//! 3. A reference holds the same group: copied, then checked against the
//!    source's full group digest.
//! 4. Otherwise ask for the group's per-block keys and settle each block:
//!    zero, in place, from a reference (re-read and checked), or fetched in
//!    runs, pipelined. Fetched blocks are checked before they are written.
//!    With `CAP_SUB_GROUPS` only the keys of the sub-groups that differ
//!    from the old copy's come (`wire::subgroup`); the other sub-groups'
//!    blocks are kept as the old copy holds them, keyless. With
//!    `CAP_SUB_DELTA` a missing block may come as a delta against its old
//!    version, or against a similar old block (`CAP_SIMILAR`).
//!
//! The old copy is what DST held when the copy began. A DST that held
//! nothing is first filled from a reference laid out exactly as the
//! source's image, if there is one (the first such `-r`, the *base*), while
//! that reference is hashed, from the very buffers hashed: a return
//! migration to a new volume, with the guest's earlier image as
//! reference, then costs what it costs in place, plus that one write.
//! Similar blocks are then looked for in the base itself, which keeps
//! every old block where DST's are overwritten as the copy goes. Where DST
//! has written a block since (an earlier live pass), that block is its old
//! version.
//!
//! A settled group is verified by recomputing its digest from the full
//! digests of exactly what was written; a group that fails (a key collision,
//! or a reference changed under us) is fetched whole once more; one that
//! kept blocks keyless is first asked for again with every key.
//!
//! Live copies come in passes (see `protocol`). In a live pass the source
//! is still changing, so a fetched block may not match the key announced
//! earlier: it is written anyway (it is newer), its group is reported stale
//! and the source announces it again. Only the final, frozen pass is strict,
//! and only it can end in Done and `verified`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};

use crate::blocks::blockmap::{
    byte_range, digest_all, digest_range, group_digest, image_digest, BlockMap, HashedGroup, Hashing,
};
use crate::blocks::digest::{hex, key_of, Algorithm, Digest, Key, ZeroDigests};
use crate::blocks::layout::Layout;
use crate::blocks::runs::{checked_end, runs};
use crate::storage::disk::Disk;
use crate::storage::image::Image;
use crate::storage::writeback::Writeback;
use crate::wire::compress::Codec;
use crate::wire::held::{self, Given};
use crate::wire::liveness::{handshake_within, keepalive_interval, KeepAlive, Waiting, Watchdog, DEFAULT_IDLE_TIMEOUT};
use crate::wire::protocol::{
    read_message, write_message, Message, ProtocolError, Role, CAP_BLOCK_HINTS, CAP_DELTA_BATCH, CAP_HELD_KEYS,
    CAP_LATE_REF, CAP_LIVE, CAP_RECEIPTS, CAP_SHARED_REF, CAP_SHORT_SUB_HASHES, CAP_SIMILAR, CAP_SPLIT_RUNS,
    CAP_STREAM_LEVELS, CAP_SUB_DELTA, CAP_SUB_GROUPS, CAP_ZSTD_STREAM, MAX_FRAME, MAX_RUN_BYTES, WINDOW,
};
use crate::wire::receipts::{ReadWait, ReceiptSender};
use crate::wire::sketch::{self, SKETCH_LEN};
use crate::wire::stream::{is_stream_code, StreamDecoder, STREAM_REF_CODE, STREAM_REF_SOON_CODE};
use crate::wire::subdelta;
use crate::wire::subgroup;
use crate::wire::transport::{Link, LinkStats, Writer};

use super::kept::{kept_limit, Kept, Old};
use super::readback::{self, Written};
use super::references::ReferenceSet;
use super::shared_ref;
use super::similar;
use super::{EngineError, PassReport, Progress, Report};

#[derive(Clone, Debug)]
pub struct TargetOptions {
    /// Reference images or index files on this side.
    pub references: Vec<std::path::PathBuf>,
    /// Write to a logical volume even though lvm reports it open, because
    /// the caller knows who holds it: `migrate` names its own paused
    /// incoming domain. Never skips the exclusive open of the device.
    pub allow_open_by: Option<String>,
    /// Permission bits of a DST file created now (before the umask); None:
    /// 0600, for when the source's are unknown.
    pub create_mode: Option<u32>,
    /// Fail when the source sends nothing for this long while this end
    /// waits for it (None: wait forever). Keep-alives go out at a quarter of
    /// it. Only with a version-2 source (see `protocol`).
    pub idle_timeout: Option<Duration>,
    /// Refuse a source image larger than this many bytes (None: only the
    /// room on DST limits it).
    pub max_image_size: Option<u64>,
    /// Read back what this copy wrote, from the device, before a pass
    /// counts (see [`readback`](super::readback)). Off by default: on a
    /// cold copy it costs a third to a half of the copy's time again
    /// (docs/benchmarks.md, "Read-back"); `migrate` always sets it.
    pub readback: bool,
    /// Build the index of similar blocks without judging the link first,
    /// and let the blocks wait for it however long it takes
    /// (`copy::similar`): for callers that know the link is slow, and for
    /// tests, whose in-process links are fast. Not a flag of the CLI.
    pub always_index_similar: bool,
}

/// Refuse a block-device DST that is a logical volume lvm reports open (a
/// running guest's disk: blkback does not claim it exclusively, so the
/// exclusive open alone would not notice), unless `allow_open_by` names who
/// holds it. A DST that is not an LV, or lvm that cannot be asked, passes.
fn check_lv_not_open(dst: &Path, allow_open_by: Option<&str>) -> Result<(), EngineError> {
    use std::os::unix::fs::FileTypeExt;
    let is_dev = std::fs::metadata(dst).map(|m| m.file_type().is_block_device()).unwrap_or(false);
    if !is_dev {
        return Ok(());
    }
    let lv = match crate::storage::lvm::Lvm::new().lv_for_path(dst) {
        Ok(Some(lv)) => lv,
        Ok(None) => return Ok(()),
        Err(e) => {
            log::debug!("cannot ask lvm whether {} is an open logical volume: {e}", dst.display());
            return Ok(());
        }
    };
    if !lv.is_open() {
        return Ok(());
    }
    match allow_open_by {
        Some(holder) => {
            log::info!("{} ({}) is open; allowed: held by {holder}", dst.display(), lv.lv_ref());
            Ok(())
        }
        None => Err(EngineError::TargetOpen { path: dst.into(), lv: lv.lv_ref().to_string() }),
    }
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            references: Vec::new(),
            allow_open_by: None,
            create_mode: None,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_image_size: None,
            readback: false,
            always_index_similar: false,
        }
    }
}

/// Refuse an image DST cannot hold, before anything is allocated for it or
/// written: a block device must be at least as large; a regular file (or a
/// new one) needs the image's size free on its file system (what the file
/// already holds counts as free), and at most `max` bytes.
pub fn check_room(dst: &Path, size: u64, max: Option<u64>) -> Result<(), EngineError> {
    if let Some(max) = max.filter(|&m| size > m) {
        return Err(EngineError::ImageTooLarge { path: dst.into(), size, max });
    }
    let meta = std::fs::metadata(dst).ok();
    if meta.as_ref().is_some_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type())) {
        let have = Image::open_read(dst)?.size();
        if have < size {
            return Err(crate::storage::image::ImageError::TooSmall { path: dst.into(), have, need: size }.into());
        }
        return Ok(());
    }
    let held = meta.filter(|m| m.is_file()).map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
    let dir = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let free = free_bytes(if dst.exists() { dst } else { &dir })
        .map_err(|source| EngineError::FreeSpace { path: dst.into(), source })?;
    if size > free.saturating_add(held) {
        return Err(EngineError::NoRoom { path: dst.into(), size, free: free.saturating_add(held) });
    }
    Ok(())
}

/// Bytes of state the target keeps per block at most (`have` 32, `state` 1,
/// the compact index of DST's earlier content 12, the read-back's bit of
/// what was written 1/8; docs/benchmarks.md).
pub const BYTES_PER_BLOCK: u64 = 46;

/// Refuse an image whose per-block state would not fit in the memory
/// available now (MemAvailable), before allocating it.
pub fn check_memory(layout: &Layout) -> Result<(), EngineError> {
    let need = layout.block_count().saturating_mul(BYTES_PER_BLOCK);
    match mem_available() {
        Some(available) if need > available => {
            Err(EngineError::TooManyBlocks { size: layout.size, blocks: layout.block_count(), need, available })
        }
        _ => Ok(()),
    }
}

/// The memory available now (MemAvailable), if the kernel says.
pub(super) fn mem_available() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    })
}

/// Bytes an unprivileged writer may still allocate on `path`'s file system.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statvfs is a plain C struct of integers; all zeroes is a valid
    // value, overwritten by the call below.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a struct to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Pending,
    Zero,
    InPlace,
    Reused,
    Fetched,
    /// Fetched as a delta against its old version (`wire::subdelta`).
    Delta,
    /// Fetched as a delta against a similar block elsewhere in the old
    /// copy (`wire::sketch`).
    Similar,
}

/// The old copy's index of blocks by sketch, through its life
/// (`copy::similar`).
enum SimIndex {
    /// Not needed yet.
    NotYet,
    /// Being built on a thread of its own while the link is judged by what
    /// arrives (since when, and the link's bytes read then; None once
    /// judged slow, or when the caller asked for it whatever the link);
    /// `idle`: since when nothing else is awaited.
    Pending { build: similar::Building, judging: Option<(Instant, u64)>, idle: Option<Instant> },
    /// Built; None where the old copy held nothing to index, or the link
    /// was judged fast (then the build was given up).
    Ready(Option<sketch::Index>),
}

/// The base a DST that held nothing was filled from: the reference, and
/// which of its blocks are zeros.
struct Base {
    image: u32,
    zero: Vec<bool>,
}

/// The receiver's states, as `protocol` draws them. A plain copy starts
/// announcing pass 1 strictly; a live one is switched to its pass 1 by the
/// first `PassBegin`. Each frame is accepted only in the states listed with
/// it: `PassBegin` between passes (or first thing), `Groups` and
/// `GroupsEnd` while announcing, `BlockDigests` and `Blocks` while
/// announcing or settling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Receiving {
    /// The source announces groups (and the target already asks about them).
    Announcing { pass: u32, strict: bool },
    /// `GroupsEnd` came: what is open settles, then `Done` (strict) or
    /// `PassDone`.
    Settling { pass: u32, strict: bool, image_digest: Digest },
    /// A live pass ended with `PassDone`; the next `PassBegin` is due.
    BetweenPasses { done: u32 },
}

impl Receiving {
    fn pass(self) -> u32 {
        match self {
            Receiving::Announcing { pass, .. } | Receiving::Settling { pass, .. } => pass,
            Receiving::BetweenPasses { done } => done,
        }
    }
    fn strict(self) -> bool {
        matches!(self, Receiving::Announcing { strict: true, .. } | Receiving::Settling { strict: true, .. })
    }
    fn name(self) -> &'static str {
        match self {
            Receiving::Announcing { .. } => "announcing",
            Receiving::Settling { .. } => "settling",
            Receiving::BetweenPasses { .. } => "between passes",
        }
    }
}

/// One group as the target sees it.
#[derive(Clone, Copy, Debug, Default)]
struct Group {
    /// The source's digest, as last announced.
    digest: Option<Digest>,
    /// Pass in which it was last announced (0: not yet).
    announced_in: u32,
    /// Blocks still to settle in this pass.
    pending: u32,
    /// A block did not match its key in a live pass: announced again.
    tainted: bool,
    /// Its blocks as written reproduce `digest`.
    verified: bool,
    /// Blocks kept in place in this pass without their key (their
    /// sub-group matched DST's, `CAP_SUB_GROUPS`).
    keyless: u32,
    /// Blocks asked for in this pass without their key (not in the held
    /// set, `CAP_HELD_KEYS`).
    unkeyed: u32,
}

pub(super) struct Target<'a> {
    algo: Algorithm,
    layout: Layout,
    dst: Arc<dyn Disk>,
    /// Verified groups go to the device at once, so that the final fsync
    /// has little left to write.
    writeback: Writeback,
    refs: ReferenceSet,
    zeros: ZeroDigests,
    /// Digest of what DST holds now at each block (a fresh file reads as
    /// zeros); kept current as blocks are written.
    have: Vec<Digest>,
    /// Blocks written since the last read-back; None: no read-back.
    written: Option<Written>,
    /// What the target knows of each group, in one place.
    grp: Vec<Group>,
    /// Where the exchange stands (the protocol module's receiver states).
    at: Receiving,
    state: Vec<State>,
    /// Keys of groups being settled block by block.
    keys: HashMap<u64, Vec<Key>>,
    /// Groups announced in this pass and not yet verified or found stale.
    open_groups: u64,
    stale: Vec<u64>,
    refetched: HashSet<u64>,
    groups_matched: u64,
    bytes_fetched: u64,
    bytes_payload: u64,
    codecs: std::collections::BTreeMap<String, u64>,
    pass_report: PassReport,
    pass_started: Instant,
    passes: Vec<PassReport>,
    /// Shared with the keep-alive thread; a frame is written under the lock.
    /// None: no link (a direct local copy, which never asks for anything).
    out: Option<Arc<Mutex<Writer>>>,
    /// Replies awaited (a Fetch awaits one, WantDigests(_, n) n), and
    /// requests held back while [`WINDOW`] are awaited (version 2).
    outstanding: usize,
    held: VecDeque<Message>,
    windowed: bool,
    /// The copy's zstd stream, when the capability was agreed (created at
    /// its first piece: its window is allocated only if a stream comes).
    stream: Option<Option<StreamDecoder>>,
    /// `CAP_SUB_DELTA` agreed: blocks with an old version in DST may be
    /// asked for as deltas.
    deltas: bool,
    /// Blocks asked for with `FetchDelta` and not answered yet, each with
    /// the old block its signature was made of (itself, or a similar block
    /// elsewhere); at most the request window: the old bytes are read again
    /// when the answer comes.
    delta_asked: HashMap<u64, u64>,
    /// `CAP_SIMILAR` (and `CAP_SUB_DELTA`) agreed: blocks without an old
    /// version at the same place may be asked for as deltas against a
    /// similar block of the old copy, found by sketch.
    similar: bool,
    /// The old copy's blocks by sketch (`copy::similar`).
    sim_index: SimIndex,
    /// Blocks whose sketches came while the index was pending, with them.
    far_waiting: Vec<(u64, [u8; SKETCH_LEN])>,
    /// DST held nothing and was filled from this base (see the module's
    /// summary): the blocks it keeps count as reused, none as in place,
    /// and similar blocks are looked for in the base.
    base: Option<Base>,
    /// In place, with similar blocks agreed: DST's old blocks kept aside
    /// before their first write, as bases for similar blocks
    /// (`copy::kept`).
    kept: Option<Arc<Mutex<Kept>>>,
    /// The link's counters (None: a direct local copy).
    stats: Option<Arc<LinkStats>>,
    /// [`TargetOptions::always_index_similar`].
    always_index_similar: bool,
    /// `WantSketches` awaiting their answer: first block, count.
    sketch_asked: HashMap<u64, u32>,
    /// Deltas that did not rebuild their block, each then fetched whole.
    deltas_failed: u64,
    /// Whether deltas pay on this disk: their body's share of the block,
    /// as a moving average, and the candidates seen while they did not.
    delta_share: DeltaShare,
    /// Held deltas the policy kept as probes while merging others into runs.
    probing: HashSet<u64>,
    /// `CAP_SUB_GROUPS` agreed: a group's keys may be asked for against
    /// DST's sub-groups.
    subgroups: bool,
    /// `CAP_STREAM_LEVELS` agreed: the stream's decoder follows level
    /// changes.
    levels: bool,
    /// `CAP_LATE_REF` agreed (with `CAP_SHARED_REF` and
    /// `CAP_STREAM_LEVELS`): a chosen reference becomes the stream's
    /// prefix at a piece of [`STREAM_REF_CODE`], not from the start.
    late_ref: bool,
    /// With `late_ref`: the reference chosen (digest, index into
    /// `refs.images`), until its frame begins.
    late_chosen: Option<(Digest, usize)>,
    /// Stream content decoded before the reference's frame began.
    shared_after: u64,
    /// Groups asked for with `WantChangedKeys` (or `WantChangedSubs`) and
    /// not answered yet.
    sub_asked: HashSet<u64>,
    /// `CAP_SHORT_SUB_HASHES` agreed (with `CAP_SUB_DELTA`): deltas are
    /// asked with `FetchDeltaShort`.
    short_hashes: bool,
    /// `CAP_DELTA_BATCH` agreed: the deltas asked since the last flush
    /// wait here, each block with its short signature, and go in one
    /// `FetchDeltas` ([`subdelta::Batch`]).
    batch: Option<subdelta::Batch>,
    /// `CAP_SPLIT_RUNS` agreed: each `Fetch` sent and not wholly answered
    /// yet, by the next block its answer must begin with, to the end of
    /// the run asked (a run may come in several `Blocks` frames). None:
    /// one `Blocks` frame answers a `Fetch`.
    fetch_open: Option<HashMap<u64, u64>>,
    /// `CAP_BLOCK_HINTS` agreed (with `CAP_SUB_GROUPS`): the sub-groups
    /// that differ come first (`ChangedSubs`), their blocks' keys after
    /// `WantHintedKeys`.
    hints: bool,
    /// Groups asked for with `WantHintedKeys` and not answered yet: the
    /// sub-groups asked about (the source's `ChangedSubs` bitmap).
    hint_asked: HashMap<u64, Vec<u8>>,
    /// Blocks kept keyless (summed over passes), and groups that kept some
    /// keyless but failed their digest, then asked for with every key.
    blocks_keyless: u64,
    groups_rekeyed: u64,
    /// A group asked for again with every key: its blocks' states then, so
    /// that a block this copy fetched or reused before counts as such, not
    /// as found in place, when its key shows DST holds it now.
    rekeyed: HashMap<u64, Vec<State>>,
    /// `CAP_HELD_KEYS` agreed (with `CAP_SUB_GROUPS` and
    /// `CAP_BLOCK_HINTS`): a DST that holds nothing may send its held set.
    held_keys: bool,
    /// The held set was sent: `WantChangedKeys` is answered with `HeldKeys`.
    holds_sent: bool,
    /// Runs of blocks asked for without their keys and not answered yet,
    /// by first block: length, and the run's key that checks them.
    unkeyed_runs: HashMap<u64, (u32, Key)>,
    /// Blocks fetched without a key (summed over passes).
    blocks_unkeyed: u64,
    /// `CAP_SHARED_REF`: the references offered, until the source's
    /// `RefChosen` (digest, size, index into `refs.images`).
    ref_offer: Option<Vec<(Digest, u64, usize)>>,
    /// The reference the stream's prefix was made of (chosen and verified).
    shared_used: Option<PathBuf>,
    /// The chosen reference (until the choice: the first offered) being
    /// read and verified on a thread of its own, so that requests go on
    /// meanwhile; the first stream piece waits for it.
    shared_loading: Option<SharedLoading>,
    progress: &'a Progress,
}

/// A shared reference being read into memory and checked against the
/// digest offered (`Target::load_shared`).
struct SharedLoading {
    digest: Digest,
    path: PathBuf,
    loading: thread::JoinHandle<Result<Arc<[u8]>, EngineError>>,
}

/// Rebuild the source's image into `dst` over `link`.
pub fn run(dst: &Path, opts: &TargetOptions, link: Link, progress: &Progress) -> Result<Report, EngineError> {
    run_with(dst, opts, link, progress, &|img| Box::new(img))
}

/// [`run`], reading and writing DST through `wrap(DST)`: the seam where a
/// fault test puts a [`FaultyDisk`](crate::storage::faulty::FaultyDisk)
/// around the real file.
pub fn run_with(
    dst: &Path,
    opts: &TargetOptions,
    link: Link,
    progress: &Progress,
    wrap: &dyn Fn(Image) -> Box<dyn Disk>,
) -> Result<Report, EngineError> {
    let started = Instant::now();
    let (link, agreed) = handshake_within(
        link,
        Role::Target,
        CAP_LIVE
            | CAP_ZSTD_STREAM
            | CAP_SUB_DELTA
            | CAP_SUB_GROUPS
            | CAP_SHARED_REF
            | CAP_SIMILAR
            | CAP_STREAM_LEVELS
            | CAP_BLOCK_HINTS
            | CAP_SHORT_SUB_HASHES
            | CAP_RECEIPTS
            | CAP_LATE_REF
            | CAP_HELD_KEYS
            | CAP_DELTA_BATCH
            | CAP_SPLIT_RUNS,
        opts.idle_timeout,
    )?;
    let Link { mut reader, writer, stats, .. } = link;
    let v2 = agreed.keepalive();
    if !v2 {
        log::warn!("the source speaks protocol version {}: no idle timeout, no keep-alives", agreed.version);
    }
    let out = Arc::new(Mutex::new(writer));
    let idle = opts.idle_timeout.filter(|_| v2);
    // Keep-alives from now on: hashing DST and the references can take long.
    let keepalive = idle.map(|i| KeepAlive::start(out.clone(), stats.clone(), keepalive_interval(i)));
    // Receipts of what arrived, for the source's `auto` (`wire::receipts`).
    let read_wait = Arc::new(ReadWait::default());
    let receipts =
        (agreed.caps & CAP_RECEIPTS != 0).then(|| ReceiptSender::start(out.clone(), stats.clone(), read_wait.clone()));
    // A reader thread keeps the link drained while we hash and write, so
    // the source never stalls on a full pipe while we are busy.
    let (tx, rx) = bounded::<Result<Message, ProtocolError>>(64);
    let waiting = Waiting::default();
    let reader_waiting = waiting.clone();
    let reader_tx = tx.clone();
    let reader_thread = thread::spawn(move || loop {
        reader_waiting.set(true);
        read_wait.begin();
        let m = read_message(&mut reader, "before the copy was complete");
        read_wait.end();
        reader_waiting.set(false);
        let stop = matches!(m, Err(_) | Ok(Message::Bye { .. }));
        if reader_tx.send(m).is_err() || stop {
            return;
        }
    });
    let watchdog = idle.map(|i| {
        Watchdog::start("source", stats.clone(), i, waiting, move |e| {
            let _ = tx.send(Err(e));
        })
    });
    let result = (|| {
        let (algo, layout) = match rx.recv().map_err(|_| ProtocolError::Eof("before describing the image"))?? {
            Message::ImageInfo { algo, layout } => (algo, layout),
            other => return Err(ProtocolError::Unexpected { got: other.kind(), state: "waiting for ImageInfo" }.into()),
        };
        let link = LinkSide {
            out: out.clone(),
            stats: stats.clone(),
            windowed: v2,
            stream: agreed.caps & CAP_ZSTD_STREAM != 0,
            deltas: agreed.caps & CAP_SUB_DELTA != 0,
            subgroups: agreed.caps & CAP_SUB_GROUPS != 0,
            hints: agreed.caps & CAP_SUB_GROUPS != 0 && agreed.caps & CAP_BLOCK_HINTS != 0,
            short_hashes: agreed.caps & CAP_SUB_DELTA != 0 && agreed.caps & CAP_SHORT_SUB_HASHES != 0,
            similar: agreed.caps & CAP_SIMILAR != 0 && agreed.caps & CAP_SUB_DELTA != 0,
            levels: agreed.caps & CAP_STREAM_LEVELS != 0,
            late_ref: agreed.caps & (CAP_LATE_REF | CAP_SHARED_REF | CAP_STREAM_LEVELS)
                == CAP_LATE_REF | CAP_SHARED_REF | CAP_STREAM_LEVELS,
            held_keys: agreed.caps & (CAP_HELD_KEYS | CAP_SUB_GROUPS | CAP_BLOCK_HINTS)
                == CAP_HELD_KEYS | CAP_SUB_GROUPS | CAP_BLOCK_HINTS,
            batch: agreed.delta_batch(),
            split_runs: agreed.caps & CAP_SPLIT_RUNS != 0,
        };
        let mut t = Target::open(dst, opts, algo, layout, progress, wrap, Some(link))?;
        if agreed.caps & CAP_SHARED_REF != 0 {
            t.offer_references(dst)?;
        }
        t.send_holds()?;
        t.progress.phase("copying", t.layout.size);
        t.main_loop(&rx)
    })();
    drop((watchdog, keepalive, receipts));
    if let Err(e) = &result {
        if let Ok(mut w) = out.lock() {
            let _ = write_message(&mut *w, &Message::Error { message: format!("target: {e}") });
            let _ = w.flush();
        }
    }
    drop(rx);
    // On success the reader ended at Bye; on failure it ends when the
    // source hangs up after our Error frame.
    if result.is_ok() {
        let _ = reader_thread.join();
    }
    match result {
        Ok(mut report) => {
            report.seconds = started.elapsed().as_secs_f64();
            report.bytes_wire = stats.total();
            Ok(report)
        }
        Err(e) => Err(e),
    }
}

/// The target's side of the link, when there is one (a direct local copy
/// has none: `copy::direct`).
pub(super) struct LinkSide {
    out: Arc<Mutex<Writer>>,
    /// What was read from it, to judge the link by (`copy::similar`).
    stats: Arc<LinkStats>,
    /// Version 2: requests are windowed.
    windowed: bool,
    /// `CAP_ZSTD_STREAM` agreed.
    stream: bool,
    /// `CAP_SUB_DELTA` agreed.
    deltas: bool,
    /// `CAP_SUB_GROUPS` agreed.
    subgroups: bool,
    /// `CAP_BLOCK_HINTS` and `CAP_SUB_GROUPS` agreed.
    hints: bool,
    /// `CAP_SHORT_SUB_HASHES` and `CAP_SUB_DELTA` agreed.
    short_hashes: bool,
    /// `CAP_SIMILAR` and `CAP_SUB_DELTA` agreed.
    similar: bool,
    /// `CAP_STREAM_LEVELS` agreed.
    levels: bool,
    /// `CAP_LATE_REF`, `CAP_SHARED_REF` and `CAP_STREAM_LEVELS` agreed.
    late_ref: bool,
    /// `CAP_HELD_KEYS`, `CAP_SUB_GROUPS` and `CAP_BLOCK_HINTS` agreed.
    held_keys: bool,
    /// `CAP_DELTA_BATCH` agreed (with `CAP_SUB_DELTA` and
    /// `CAP_SHORT_SUB_HASHES`).
    batch: bool,
    /// `CAP_SPLIT_RUNS` agreed.
    split_runs: bool,
}

impl<'a> Target<'a> {
    /// Everything between learning the image's shape and the first group:
    /// refuse what DST cannot hold, load the references, open (or create)
    /// DST and learn what it holds. Nothing is written to DST before this
    /// has passed.
    pub(super) fn open(
        dst: &Path,
        opts: &TargetOptions,
        algo: Algorithm,
        layout: Layout,
        progress: &'a Progress,
        wrap: &dyn Fn(Image) -> Box<dyn Disk>,
        link: Option<LinkSide>,
    ) -> Result<Target<'a>, EngineError> {
        if !algo.collision_safe() {
            log::warn!("the source hashes with SHA-1, which is not collision-safe: do not use references holding other tenants' data");
        }
        // What the source claims must fit before anything is sized by it.
        check_room(dst, layout.size, opts.max_image_size)?;
        check_memory(&layout)?;
        // References first: a bad one stops the copy before DST is touched.
        // Patterns are expanded now, on this host (never to DST itself).
        let references = super::refglob::expand(&opts.references, Some(dst))?;
        let mut refs = ReferenceSet::load(&references, algo, layout.block_size, Some(&layout))?;
        check_lv_not_open(dst, opts.allow_open_by.as_deref())?;
        let (dst_img, had_data) = Image::open_target_mode(dst, layout.size, opts.create_mode.unwrap_or(0o600))?;
        let dst_img: Arc<dyn Disk> = Arc::from(wrap(dst_img));
        let zeros = ZeroDigests::new(algo, layout.block_size as usize);
        let mut base = None;
        let have = if had_data {
            progress.phase("scanning", layout.size);
            // Only the digests are kept (they become `have`); the compact
            // index of DST is built from them.
            let mut digests: Vec<Digest> = Vec::with_capacity(layout.block_count() as usize);
            let mut groups: Vec<Digest> = Vec::with_capacity(layout.group_count() as usize);
            BlockMap::stream_with(
                &*dst_img,
                &layout,
                algo,
                Hashing::default(),
                |_, batch| {
                    for h in batch {
                        digests.extend_from_slice(&h.blocks);
                        groups.push(h.digest);
                    }
                    true
                },
                &|n| progress.inc(n),
            )?;
            // Blocks that moved within DST count too; each is re-read and
            // checked, so one overwritten meanwhile is simply fetched.
            let is_zero = |i: usize| zeros.is_zero_digest(&digests[i], layout.extent(i as u64).1);
            refs.add_own_parts(dst.into(), Image::open_read(dst)?, &layout, &digests, is_zero, &groups);
            // (In place DST itself is the old copy: a reference like any.)
            refs.add_same_layout(None, &|_| {})?;
            digests
        } else if refs.has_same_layout() {
            progress.phase("filling", layout.size);
            let (image, map) = refs.add_same_layout(Some(&*dst_img), &|n| progress.inc(n))?.expect("checked above");
            log::info!("DST held nothing: filled from the reference laid out as the source's image");
            base = Some(Base { image, zero: map.zero });
            map.digests
        } else {
            (0..layout.block_count()).map(|i| zeros.get(layout.extent(i).1)).collect()
        };
        let stats = link.as_ref().map(|l| l.stats.clone());
        let n = layout.block_count() as usize;
        let mut written = opts.readback.then(|| Written::new(n as u64));
        if let (true, Some(w)) = (base.is_some(), written.as_mut()) {
            // (The fill wrote them: read back like every block written.)
            let kept = (0..n as u64).filter(|&i| !zeros.is_zero_digest(&have[i as usize], layout.extent(i).1));
            kept.for_each(|i| w.mark(i));
        }
        let g = layout.group_count() as usize;
        let kept = (had_data && base.is_none() && link.as_ref().is_some_and(|l| l.similar))
            .then(|| Arc::new(Mutex::new(Kept::new(n as u64, kept_limit(mem_available())))));
        Ok(Target {
            algo,
            zeros,
            writeback: Writeback::start(dst_img.clone()),
            dst: dst_img,
            refs,
            have,
            written,
            grp: vec![Group::default(); g],
            at: Receiving::Announcing { pass: 1, strict: true },
            state: vec![State::Pending; n],
            keys: HashMap::new(),
            open_groups: 0,
            stale: Vec::new(),
            refetched: HashSet::new(),
            groups_matched: 0,
            bytes_fetched: 0,
            bytes_payload: 0,
            codecs: Default::default(),
            pass_report: PassReport { pass: 1, final_pass: true, changed_blocks: n as u64, ..Default::default() },
            pass_started: Instant::now(),
            passes: Vec::new(),
            layout: layout.clone(),
            outstanding: 0,
            held: VecDeque::new(),
            windowed: link.as_ref().is_some_and(|l| l.windowed),
            stream: link.as_ref().is_some_and(|l| l.stream).then_some(None),
            deltas: link.as_ref().is_some_and(|l| l.deltas),
            subgroups: link.as_ref().is_some_and(|l| l.subgroups),
            hints: link.as_ref().is_some_and(|l| l.hints),
            short_hashes: link.as_ref().is_some_and(|l| l.short_hashes),
            batch: link.as_ref().is_some_and(|l| l.batch).then(|| subdelta::Batch::new(layout.block_size as usize)),
            fetch_open: link.as_ref().is_some_and(|l| l.split_runs).then(HashMap::new),
            hint_asked: HashMap::new(),
            similar: link.as_ref().is_some_and(|l| l.similar),
            levels: link.as_ref().is_some_and(|l| l.levels),
            late_ref: link.as_ref().is_some_and(|l| l.late_ref),
            held_keys: link.as_ref().is_some_and(|l| l.held_keys),
            late_chosen: None,
            shared_after: 0,
            out: link.map(|l| l.out),
            delta_asked: HashMap::new(),
            sim_index: SimIndex::NotYet,
            far_waiting: Vec::new(),
            kept,
            base,
            stats,
            always_index_similar: opts.always_index_similar,
            sketch_asked: HashMap::new(),
            deltas_failed: 0,
            delta_share: DeltaShare::default(),
            probing: HashSet::new(),
            sub_asked: HashSet::new(),
            blocks_keyless: 0,
            groups_rekeyed: 0,
            rekeyed: HashMap::new(),
            holds_sent: false,
            unkeyed_runs: HashMap::new(),
            blocks_unkeyed: 0,
            ref_offer: None,
            shared_used: None,
            shared_loading: None,
            progress,
        })
    }
}

type Inbox = Receiver<Result<Message, ProtocolError>>;

impl Target<'_> {
    /// Write one frame (under the lock the keep-alive thread shares).
    fn send(&self, m: &Message) -> Result<(), EngineError> {
        let short;
        let m = match m {
            // (Held and matched as FetchDelta; cut only on the way out.)
            Message::FetchDelta { block, sig } if self.short_hashes => {
                short = Message::FetchDeltaShort { block: *block, sig: subdelta::short_signature(sig) };
                &short
            }
            m => m,
        };
        let mut w = self.link()?.lock().expect("writer lock");
        write_message(&mut *w, m)?;
        Ok(())
    }

    /// Send what is batched and push every frame written out.
    fn flush(&mut self) -> Result<(), EngineError> {
        self.send_batch()?;
        self.link()?.lock().expect("writer lock").flush().map_err(ProtocolError::Io)?;
        Ok(())
    }

    fn link(&self) -> Result<&Arc<Mutex<Writer>>, EngineError> {
        self.out.as_ref().ok_or_else(|| EngineError::StepOrder("a direct local copy has no source to ask".into()))
    }

    /// Send a request, or hold it while the window is full (version 2).
    fn request(&mut self, m: Message) -> Result<(), EngineError> {
        let units = replies_to(&m);
        if self.windowed && (!self.held.is_empty() || self.outstanding + units > WINDOW) {
            self.held.push_back(m);
            return Ok(());
        }
        self.outstanding += units;
        self.send_request(m)
    }

    /// Send a request the window allows: a delta into the batch where
    /// batches were agreed (sent when full and at the next flush), anything
    /// else at once.
    fn send_request(&mut self, m: Message) -> Result<(), EngineError> {
        match (m, self.batch.as_mut()) {
            (Message::FetchDelta { block, sig }, Some(batch)) => {
                let full = batch.add(block, subdelta::short_signature(&sig), self.layout.extent(block).1);
                if full {
                    self.send_batch()?;
                }
                Ok(())
            }
            (m, _) => {
                if let (Message::Fetch { first_block, count }, Some(open)) = (&m, self.fetch_open.as_mut()) {
                    open.insert(*first_block, *first_block + *count as u64);
                }
                self.send(&m)
            }
        }
    }

    /// Send the deltas batched so far, if any, in one `FetchDeltas`.
    fn send_batch(&mut self) -> Result<(), EngineError> {
        match self.batch.as_mut().and_then(subdelta::Batch::take) {
            Some((blocks, sigs)) => self.send(&Message::FetchDeltas { blocks, sigs }),
            None => Ok(()),
        }
    }

    /// A reply arrived: one fewer awaited; send what the window now allows.
    fn replied(&mut self, what: &str) -> Result<(), EngineError> {
        self.outstanding = self
            .outstanding
            .checked_sub(1)
            .ok_or_else(|| EngineError::BadReply(format!("{what}, with no request outstanding")))?;
        while let Some(m) = self.held.front() {
            let units = replies_to(m);
            if self.outstanding + units > WINDOW {
                break;
            }
            let mut m = self.held.pop_front().expect("front");
            if let Message::FetchDelta { block, .. } = m {
                if !self.probing.remove(&block) && !self.delta_share.ask() {
                    m = self.undelta(block);
                }
            }
            self.outstanding += units;
            self.send_request(m)?;
        }
        Ok(())
    }

    /// Deltas do not pay here ([`DeltaShare`]): ask for `block`, held as a
    /// delta, whole instead, in one run with the held deltas of the blocks
    /// after it (each of those the policy may keep as a delta, to probe).
    fn undelta(&mut self, block: u64) -> Message {
        let max = (MAX_RUN_BYTES / self.layout.block_size as u64).max(1) as u32;
        self.delta_asked.remove(&block);
        let mut count = 1u32;
        while count < max {
            let next = block + count as u64;
            if !matches!(self.held.front(), Some(Message::FetchDelta { block: b, .. }) if *b == next) {
                break;
            }
            if self.delta_share.ask() {
                self.probing.insert(next);
                break;
            }
            self.held.pop_front();
            self.delta_asked.remove(&next);
            count += 1;
        }
        Message::Fetch { first_block: block, count }
    }

    fn main_loop(&mut self, rx: &Inbox) -> Result<Report, EngineError> {
        loop {
            let m = loop {
                super::interrupt::check()?;
                self.poll_similar()?;
                // (Sooner while the index is built: blocks wait for it.)
                let tick = if matches!(self.sim_index, SimIndex::Pending { .. }) { 5 } else { 100 };
                match rx.recv_timeout(std::time::Duration::from_millis(tick)) {
                    Ok(m) => break m,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        return Err(ProtocolError::Eof("before the copy was complete").into())
                    }
                }
            }?;
            match m {
                Message::PassBegin { pass, final_pass, changed_blocks } => {
                    self.on_pass_begin(pass, final_pass, changed_blocks)?
                }
                Message::Groups { first, digests } => self.on_groups(first, digests)?,
                Message::GroupsEnd { image_digest } => match self.at {
                    Receiving::Announcing { pass, strict } => {
                        self.at = Receiving::Settling { pass, strict, image_digest }
                    }
                    at => {
                        return Err(EngineError::BadReply(format!("an end of pass {} while {}", at.pass(), at.name())))
                    }
                },
                Message::RefChosen { chosen } if self.ref_offer.is_some() => self.on_ref_chosen(chosen)?,
                Message::BlockDigests { .. }
                | Message::Blocks { .. }
                | Message::Delta { .. }
                | Message::Deltas { .. }
                | Message::ChangedKeys { .. }
                | Message::HeldKeys { .. }
                | Message::ChangedSubs { .. }
                | Message::HintedKeys { .. }
                | Message::Sketches { .. }
                    if self.ref_offer.is_some() =>
                {
                    return Err(EngineError::BadReply(format!(
                        "{:?} before answering the offer of references (RefChosen)",
                        m.kind()
                    )))
                }
                Message::BlockDigests { .. }
                | Message::Blocks { .. }
                | Message::Delta { .. }
                | Message::Deltas { .. }
                | Message::ChangedKeys { .. }
                | Message::HeldKeys { .. }
                | Message::ChangedSubs { .. }
                | Message::HintedKeys { .. }
                | Message::Sketches { .. }
                    if matches!(self.at, Receiving::BetweenPasses { .. }) =>
                {
                    return Err(EngineError::BadReply(format!(
                        "{:?} between passes (after pass {})",
                        m.kind(),
                        self.at.pass()
                    )))
                }
                Message::BlockDigests { group, keys } => self.on_block_digests(group, keys)?,
                Message::Blocks { first_block, count, codec, raw_len, payload } => {
                    self.on_blocks(first_block, count, codec, raw_len, payload)?
                }
                Message::Delta { block, codec, raw_len, payload } if self.deltas => {
                    self.on_delta(block, codec, raw_len, payload)?
                }
                Message::Deltas { codec, raw_len, blocks, payload } if self.batch.is_some() => {
                    self.on_deltas(codec, raw_len, blocks, payload)?
                }
                // (With CAP_BLOCK_HINTS too: the answer to a group asked the
                // previous way.)
                Message::ChangedKeys { group, subs, differ, keys } if self.subgroups && !self.holds_sent => {
                    self.on_changed_keys(group, subs, differ, keys)?
                }
                Message::HeldKeys { group, subs, differ, count, keyed, keys, run_keys } if self.holds_sent => {
                    self.on_held_keys(group, subs, held::HeldAnswer { differ, count, keyed, keys, run_keys })?
                }
                Message::ChangedSubs { group, subs, differ } if self.hints => {
                    self.on_changed_subs(group, subs, differ)?
                }
                Message::HintedKeys { group, count, changed, keys } if self.hints => {
                    self.on_hinted_keys(group, count, changed, keys)?
                }
                Message::Sketches { first_block, sketches } if self.similar => {
                    self.on_sketches(first_block, sketches)?
                }
                other => return Err(ProtocolError::Unexpected { got: other.kind(), state: "copying" }.into()),
            }
            if let Receiving::Settling { pass, strict, image_digest } = self.at {
                // (An offer of references is answered before a pass ends:
                // its answer may still be on its way when nothing was asked.)
                if self.open_groups == 0 && self.ref_offer.is_none() {
                    if self.outstanding != 0 || !self.held.is_empty() {
                        return Err(EngineError::BadReply(format!(
                            "the end of pass {pass} with {} replies still awaited",
                            self.outstanding
                        )));
                    }
                    if strict {
                        return self.finish(image_digest, rx);
                    }
                    self.end_live_pass()?;
                    self.at = Receiving::BetweenPasses { done: pass };
                }
            }
            if rx.is_empty() {
                self.flush()?;
            }
        }
    }

    /// `CAP_HELD_KEYS`: onto a DST that holds nothing (no old copy, no
    /// base), tell the source which keys the references hold, before any
    /// request, so that it keys only blocks that may be found here
    /// (`wire::held`). Not sent where it would cost more than the keys it
    /// saves (more keys held than [`held::max_count`] allows) or not fit a
    /// frame; the source then keys every block, as before.
    fn send_holds(&mut self) -> Result<(), EngineError> {
        let holds_nothing =
            || self.have.iter().enumerate().all(|(i, d)| self.zeros.is_zero_digest(d, self.layout.extent(i as u64).1));
        if !self.held_keys || self.base.is_some() || !holds_nothing() {
            return Ok(());
        }
        let blocks = self.layout.block_count();
        let prefixes = self.refs.key_prefixes();
        if prefixes.len() as u64 > held::max_count(blocks) {
            log::debug!("held keys not sent: {} keys held for an image of {blocks} blocks", prefixes.len());
            return Ok(());
        }
        let e = held::encode(prefixes, blocks);
        if e.bits.len() + 13 > MAX_FRAME {
            return Ok(());
        }
        log::debug!("held keys: {} in {} bytes (k = {})", e.count, e.bits.len(), e.k);
        self.send(&Message::Holds { range: e.range, k: e.k, count: e.count, bits: e.bits })?;
        self.holds_sent = true;
        Ok(())
    }

    /// `CAP_SHARED_REF`: tell the source which references could serve as
    /// the stream's dictionary (before any request, as the protocol says),
    /// and start reading the first of them at once: the source has
    /// references of its own (it would not have set the capability
    /// otherwise), and its choice comes after it has read and hashed them;
    /// reading ours meanwhile takes that off the first piece's wait.
    fn offer_references(&mut self, dst: &Path) -> Result<(), EngineError> {
        let offer = shared_ref::offers(&self.refs, dst);
        self.send(&Message::RefOffer { refs: offer.iter().map(|&(d, s, _)| (d, s)).collect() })?;
        // (With CAP_LATE_REF a large reference is read only when the
        // source says it reads its own, or takes it.)
        if let Some(&(d, _, i)) = offer.first().filter(|&&(_, size, _)| self.read_early(size)) {
            self.shared_loading = Some(self.load_shared(d, i));
        }
        self.ref_offer = Some(offer);
        Ok(())
    }

    /// Whether a reference of `size` bytes is read as soon as it is offered
    /// or chosen: always, unless `CAP_LATE_REF` lets the source take a
    /// large one late (`shared_ref::LatePolicy`).
    fn read_early(&self, size: u64) -> bool {
        !self.late_ref || size <= shared_ref::LatePolicy::default().from_start_up_to
    }

    /// Read reference `i` into memory on a thread of its own and check that
    /// those bytes still have digest `d` (the one offered).
    fn load_shared(&self, d: Digest, i: usize) -> SharedLoading {
        let path = self.refs.index.images[i].path.clone();
        let layout = self.refs.images[i].layout.clone();
        let (algo, block_size) = (self.algo, self.layout.block_size);
        let p = path.clone();
        let loading = thread::spawn(move || {
            let img = Image::open_read(&p)?;
            let r = shared_ref::load(&p, &img, Some(layout), algo, block_size)?;
            if r.digest != d {
                return Err(EngineError::Reference {
                    path: p,
                    what: "changed since it was hashed: its bytes no longer have the digest offered to the source; \
                           copy again"
                        .into(),
                });
            }
            Ok(r.bytes)
        });
        SharedLoading { digest: d, path, loading }
    }

    /// The source's choice: the chosen reference's bytes (already being
    /// read if it was the first offered; a load of another is dropped
    /// unread by anyone) become the stream's prefix once checked.
    fn on_ref_chosen(&mut self, chosen: Option<Digest>) -> Result<(), EngineError> {
        let offer = self.ref_offer.take().unwrap_or_default();
        let early = self.shared_loading.take();
        let Some(d) = chosen else { return Ok(()) };
        let Some(&(_, _, i)) = offer.iter().find(|(o, _, _)| *o == d) else {
            return Err(EngineError::BadReply(format!("a shared reference {} that was not offered", hex(&d))));
        };
        if !matches!(self.stream, Some(None)) {
            return Err(EngineError::BadReply(
                "a shared reference, but no zstd stream was agreed (or it began)".into(),
            ));
        }
        let size = offer.iter().find(|(o, _, _)| *o == d).map_or(0, |o| o.1);
        self.shared_loading = match early {
            Some(l) if l.digest == d => Some(l),
            _ if self.read_early(size) => Some(self.load_shared(d, i)),
            _ => None,
        };
        if self.late_ref {
            self.late_chosen = Some((d, i));
        }
        Ok(())
    }

    /// A piece of [`STREAM_REF_SOON_CODE`]: the source has read the chosen
    /// reference and is indexing it; read ours too (once).
    fn read_late_reference(&mut self, block: u64) -> Result<(), EngineError> {
        if !self.late_ref {
            return Err(EngineError::BadReply(format!(
                "a zstd stream piece for block {block} announcing a shared reference, without CAP_LATE_REF agreed"
            )));
        }
        if let (Some((d, i)), None) = (self.late_chosen, &self.shared_loading) {
            self.shared_loading = Some(self.load_shared(d, i));
        }
        Ok(())
    }

    /// The chosen reference's bytes, for a piece of [`STREAM_REF_CODE`]
    /// (read now if no read was started).
    fn late_reference(&mut self) -> Result<Arc<[u8]>, EngineError> {
        let Some((d, i)) = self.late_chosen.take() else {
            return Err(EngineError::BadReply(
                "a zstd stream piece beginning a shared reference's frame, with no reference chosen (or a second \
                 one)"
                    .into(),
            ));
        };
        let loading = match self.shared_loading.take() {
            Some(l) => l,
            None => self.load_shared(d, i),
        };
        let SharedLoading { path, loading, .. } = loading;
        let bytes =
            loading.join().map_err(|_| EngineError::Aborted("the shared reference's loader panicked".into()))??;
        log::info!("shared reference: {} is the stream's dictionary from here on", path.display());
        self.shared_used = Some(path);
        Ok(bytes)
    }

    /// Wait for the chosen reference (if one is loading) and make it the
    /// stream's decoder.
    fn take_shared_decoder(&mut self) -> Result<(), EngineError> {
        if self.ref_offer.is_some() {
            return Ok(()); // not chosen yet: what loads is a guess, no prefix
        }
        if self.late_ref {
            return Ok(()); // the reference's frame begins at a piece that says so
        }
        let Some(SharedLoading { path, loading, .. }) = self.shared_loading.take() else { return Ok(()) };
        let bytes =
            loading.join().map_err(|_| EngineError::Aborted("the shared reference's loader panicked".into()))??;
        log::info!("shared reference: {} is the stream's dictionary", path.display());
        if let Some(slot) = self.stream.as_mut() {
            *slot = Some(StreamDecoder::with_prefix(bytes, self.layout.size)?);
        }
        self.shared_used = Some(path);
        Ok(())
    }

    fn close_pass_report(&mut self) {
        let mut r = std::mem::take(&mut self.pass_report);
        r.seconds = self.pass_started.elapsed().as_secs_f64();
        r.groups_stale = self.stale.len() as u64;
        self.passes.push(r);
    }

    fn on_pass_begin(&mut self, pass: u32, final_pass: bool, changed_blocks: u64) -> Result<(), EngineError> {
        // First thing of a live copy (nothing announced yet), or between passes.
        let first = self.passes.is_empty()
            && self.grp.iter().all(|g| g.announced_in == 0)
            && matches!(self.at, Receiving::Announcing { pass: 1, .. });
        let expected = match self.at {
            _ if first => 1,
            Receiving::BetweenPasses { done } => done + 1,
            at => {
                return Err(EngineError::BadReply(format!("pass {pass} begun while {} pass {}", at.name(), at.pass())))
            }
        };
        if pass != expected {
            return Err(EngineError::BadReply(format!("pass {pass} out of order (pass {expected} is due)")));
        }
        self.at = Receiving::Announcing { pass, strict: final_pass };
        self.pass_report = PassReport { pass, final_pass, changed_blocks, ..Default::default() };
        self.pass_started = Instant::now();
        let label = if final_pass { format!("final {pass}") } else { format!("pass {pass}") };
        // The count is the peer's (an honest source's may even count a
        // block twice across scans): clamp it, and never let it overflow.
        let bytes = changed_blocks.min(self.layout.block_count()).saturating_mul(self.layout.block_size as u64);
        self.progress.phase(&label, bytes.min(self.layout.size));
        Ok(())
    }

    /// A live pass is settled: tell the source which groups must go again.
    fn end_live_pass(&mut self) -> Result<(), EngineError> {
        // Each pass's writes are read back at its end, so that the frozen
        // pass reads back only the last delta.
        if self.written.as_ref().is_some_and(|w| w.count() > 0) {
            self.dst.sync()?;
            self.read_back()?;
        }
        self.close_pass_report();
        let stale = std::mem::take(&mut self.stale);
        self.send(&Message::PassDone { pass: self.at.pass(), stale_groups: stale })?;
        self.flush()?;
        Ok(())
    }

    /// The final pass settled: verify, report Done, wait for Bye.
    fn finish(&mut self, want: Digest, rx: &Inbox) -> Result<Report, EngineError> {
        let mut report = self.conclude(want)?;
        let json = serde_json::to_string(&report).expect("report serialises");
        self.send(&Message::Done { report: json })?;
        self.flush()?;
        match rx.recv().map_err(|_| ProtocolError::Eof("before saying Bye"))?? {
            Message::Bye { downtime_ns } => {
                report.downtime_seconds = downtime_ns as f64 / 1e9;
                Ok(report)
            }
            other => Err(ProtocolError::Unexpected { got: other.kind(), state: "waiting for Bye" }.into()),
        }
    }

    /// Every group settled: check each was verified and that their digests
    /// make the source's image digest `want`, make DST durable (and read it
    /// back, if asked), and count what happened. The one place where a copy
    /// counts as verified, with the link or without (`copy::direct`).
    pub(super) fn conclude(&mut self, want: Digest) -> Result<Report, EngineError> {
        // A reference chosen but never needed (nothing streamed): its
        // loading must still end, and fail only the dictionary, not the copy.
        if let Err(e) = self.take_shared_decoder() {
            log::warn!("{e} (no block was decoded with it)");
        }
        // (A late reference never taken is not waited for: its read ends
        // on its own thread.)
        drop(self.shared_loading.take());
        if let Some(g) = self.grp.iter().position(|g| !g.verified) {
            return Err(EngineError::BadReply(format!("the final pass ended with group {g} never verified")));
        }
        let groups: Vec<Digest> = self.grp.iter().map(|g| g.digest.expect("every group verified")).collect();
        let got = image_digest(self.algo, &self.layout, &groups);
        if got != want {
            return Err(EngineError::NotVerified { got: hex(&got), want: hex(&want) });
        }
        self.dst.sync()?;
        self.read_back()?;
        // Nothing of this copy stays in dom0's page cache: a Xen guest's
        // backend writes under it, so cached pages would later be stale.
        self.dst.drop_cache();
        self.close_pass_report();
        self.progress.finish();
        if let Some(k) = &self.kept {
            log::debug!(
                "in place: {} bytes of old blocks kept aside as bases",
                k.lock().expect("the kept blocks' lock").bytes()
            );
        }
        let count = |s: State| self.state.iter().filter(|&&x| x == s).count() as u64;
        Ok(Report {
            target: self.dst.path().display().to_string(),
            image_size: self.layout.size,
            block_size: self.layout.block_size,
            algorithm: self.algo.name().into(),
            blocks_total: self.layout.block_count(),
            blocks_zero: count(State::Zero),
            blocks_reused: count(State::InPlace) + count(State::Reused),
            blocks_in_place: if self.base.is_some() { 0 } else { count(State::InPlace) },
            blocks_fetched: count(State::Fetched) + count(State::Delta) + count(State::Similar),
            blocks_delta: count(State::Delta) + count(State::Similar),
            blocks_similar: count(State::Similar),
            deltas_failed: self.deltas_failed,
            blocks_keyless: self.blocks_keyless,
            blocks_unkeyed: self.blocks_unkeyed,
            groups_rekeyed: self.groups_rekeyed,
            groups_matched: self.groups_matched,
            groups_total: self.layout.group_count(),
            groups_refetched: self.refetched.len() as u64,
            bytes_fetched: self.bytes_fetched,
            bytes_payload_wire: self.bytes_payload,
            codecs: std::mem::take(&mut self.codecs),
            verified: true,
            read_back: self.written.is_some(),
            digest: hex(&want[..self.algo.width()]),
            passes: std::mem::take(&mut self.passes),
            shared_reference: self.shared_used.as_ref().map(|p| p.display().to_string()),
            shared_reference_after: self.shared_after,
            stream_frames: self.stream.as_ref().and_then(|s| s.as_ref()).map_or(0, |d| d.frames()),
            ..Report::default()
        })
    }

    fn group_bytes(&self, g: u64) -> u64 {
        let (a, b) = self.layout.group_range(g);
        let (s, e) = byte_range(&self.layout, a, b);
        e - s
    }

    fn on_groups(&mut self, first: u64, digests: Vec<Digest>) -> Result<(), EngineError> {
        let end = first.checked_add(digests.len() as u64).filter(|&e| e <= self.layout.group_count());
        if !matches!(self.at, Receiving::Announcing { .. }) {
            return Err(EngineError::BadReply(format!(
                "group digests while {} pass {}",
                self.at.name(),
                self.at.pass()
            )));
        }
        if end.is_none() || digests.is_empty() {
            return Err(EngineError::BadReply(format!(
                "digests for groups {first}+{}, the image has {}",
                digests.len(),
                self.layout.group_count()
            )));
        }
        let mut want = Vec::new();
        for (i, d) in digests.into_iter().enumerate() {
            let g = first + i as u64;
            self.announce(g, d)?;
            if self.settle_group_locally(g, &d)? {
                continue;
            }
            let (a, b) = self.layout.group_range(g);
            if self.subgroups && subgroup::worth_it((b - a) as usize) {
                self.want_changed_keys(g)?;
            } else {
                want.push(g);
            }
        }
        for (f, c) in runs(want, MAX_WANT) {
            self.request(Message::WantDigests { first_group: f, count: c })?;
        }
        Ok(())
    }

    /// Take group `g` with digest `d` into this pass, forgetting any earlier
    /// settlement of it.
    fn announce(&mut self, g: u64, d: Digest) -> Result<(), EngineError> {
        if self.grp[g as usize].announced_in == self.at.pass() {
            return Err(EngineError::BadReply(format!("group {g} twice in pass {}", self.at.pass())));
        }
        self.grp[g as usize].verified = false;
        let (a, b) = self.layout.group_range(g);
        self.state[a as usize..b as usize].fill(State::Pending);
        self.grp[g as usize].pending = (b - a) as u32;
        self.keys.remove(&g);
        self.grp[g as usize].tainted = false;
        self.grp[g as usize].keyless = 0;
        self.grp[g as usize].unkeyed = 0;
        if !self.unkeyed_runs.is_empty() {
            (a..b).for_each(|i| _ = self.unkeyed_runs.remove(&i));
        }
        self.grp[g as usize].digest = Some(d);
        self.grp[g as usize].announced_in = self.at.pass();
        self.open_groups += 1;
        self.pass_report.groups += 1;
        Ok(())
    }

    /// Try to settle a whole group without per-block keys.
    fn settle_group_locally(&mut self, g: u64, want: &Digest) -> Result<bool, EngineError> {
        let (a, b) = self.layout.group_range(g);
        let (ai, bi) = (a as usize, b as usize);
        // 1. Already in place (this covers all-zero groups of a fresh file).
        if group_digest(self.algo, &self.have[ai..bi]) == *want {
            for i in a..b {
                let len = self.layout.extent(i).1;
                self.state[i as usize] =
                    if self.zeros.is_zero_digest(&self.have[i as usize], len) { State::Zero } else { State::InPlace };
            }
            self.groups_matched += 1;
            return self.group_done(g, true);
        }
        // 2. All zeros.
        let zero: Vec<Digest> = (a..b).map(|i| self.zeros.get(self.layout.extent(i).1)).collect();
        if group_digest(self.algo, &zero) == *want {
            for i in a..b {
                self.set_zero(i)?;
            }
            self.groups_matched += 1;
            return self.group_done(g, true);
        }
        // 3. A reference holds the same group.
        if let Some((image, pos)) = self.refs.find_group(&key_of(want)) {
            let r = &self.refs.images[image as usize];
            let (ra, rb) = r.layout.group_range(pos);
            if rb - ra == b - a {
                let mut blocks = Vec::with_capacity(bi - ai);
                for (k, i) in (a..b).enumerate() {
                    match self.refs.read_block(image, ra + k as u64, self.layout.extent(i).1) {
                        Some(data) => blocks.push(data),
                        None => return Ok(false),
                    }
                }
                let slices: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
                let digests = digest_all(self.algo, &slices, true);
                if group_digest(self.algo, &digests) == *want {
                    for (k, i) in (a..b).enumerate() {
                        if crate::blocks::digest::is_zero(&blocks[k]) {
                            self.set_zero(i)?;
                        } else {
                            self.write_block(i, &blocks[k], digests[k], State::Reused)?;
                        }
                    }
                    self.groups_matched += 1;
                    return self.group_done(g, true);
                }
            }
        }
        Ok(false)
    }

    /// Check (once DST is synced) that the device holds the blocks written
    /// since the last read-back; they need not be read again after that.
    fn read_back(&mut self) -> Result<(), EngineError> {
        let Some(written) = self.written.as_mut() else { return Ok(()) };
        readback::check(&*self.dst, &self.layout, self.algo, written, &self.have, self.progress)?;
        written.clear();
        Ok(())
    }

    fn mark_written(&mut self, first: u64, end: u64) {
        if let Some(w) = self.written.as_mut() {
            (first..end).for_each(|i| w.mark(i));
        }
    }

    fn write_block(&mut self, i: u64, data: &[u8], digest: Digest, state: State) -> Result<(), EngineError> {
        self.keep_aside(i, i + 1)?;
        self.dst.write_at(data, self.layout.extent(i).0)?;
        self.wrote(i, digest, state);
        Ok(())
    }

    /// Blocks `first..end` of DST are about to be written: keep the old
    /// bytes of those written for the first time, where they may serve a
    /// similar block as its base and there is room (`copy::kept`).
    fn keep_aside(&mut self, first: u64, end: u64) -> Result<(), EngineError> {
        if matches!(self.sim_index, SimIndex::Ready(None)) {
            // No index, for good (a fast link, or nothing to index): no
            // block will ever lean on another; the reads would be waste.
            self.kept = None;
        }
        let Some(kept) = &self.kept else { return Ok(()) };
        // Bytes only once an index is wanted (a block asked for has no old
        // version at its place): before, the reads may well be waste (an
        // unshaped release copy in place, which rewrites 100 MB, took 9%
        // longer keeping 64 MiB of them). Blocks written before are marked
        // all the same: their old bytes are gone.
        let keeping = !matches!(self.sim_index, SimIndex::NotYet);
        // (Held across the writes' marks: the indexer reads them.)
        let mut kept = kept.lock().expect("the kept blocks' lock");
        for j in first..end {
            let len = self.layout.extent(j).1;
            let worth = keeping
                && kept.wants(j, len)
                && self.state[j as usize] == State::Pending
                && !self.zeros.is_zero_digest(&self.have[j as usize], len);
            let old = if worth { Some(self.read_old(j)?) } else { None };
            kept.overwritten(j, old);
        }
        Ok(())
    }

    /// Block `i` of DST now holds data whose digest is `digest`.
    fn wrote(&mut self, i: u64, digest: Digest, state: State) {
        self.mark_written(i, i + 1);
        self.have[i as usize] = digest;
        self.state[i as usize] = state;
        if state == State::Reused {
            self.pass_report.blocks_reused += 1;
        }
    }

    /// DST, for a direct local copy's hashing threads to write to
    /// (`copy::direct`), which then report each group to
    /// [`settle_direct`](Self::settle_direct).
    pub(super) fn disk(&self) -> Arc<dyn Disk> {
        self.dst.clone()
    }

    /// Group `g` as this process hashed it from the source (`copy::direct`):
    /// its non-zero blocks were written to DST from the very bytes that
    /// were hashed, so each block's digest is that of what DST now holds.
    /// Zero blocks are made zero (a fresh file already reads as zeros);
    /// then the group is verified and counted like any other.
    pub(super) fn settle_direct(&mut self, g: u64, hashed: &HashedGroup) -> Result<(), EngineError> {
        let (a, b) = self.layout.group_range(g);
        if hashed.blocks.len() as u64 != b - a || hashed.zero.len() as u64 != b - a {
            return Err(EngineError::StepOrder(format!("group {g} reported with the wrong number of blocks")));
        }
        self.announce(g, hashed.digest)?;
        let none = Codec::name_of(Codec::None.code()).to_string();
        for (k, i) in (a..b).enumerate() {
            if hashed.zero[k] {
                self.set_zero(i)?;
            } else {
                self.wrote(i, hashed.blocks[k], State::Fetched);
                let len = self.layout.extent(i).1 as u64;
                self.bytes_fetched += len;
                *self.codecs.entry(none.clone()).or_default() += len;
                self.pass_report.blocks_fetched += 1;
            }
        }
        self.grp[g as usize].pending = 0;
        if !self.group_done(g, false)? {
            return Err(EngineError::GroupMismatch { group: g, first: a, end: b });
        }
        Ok(())
    }

    /// Make block `i` zero in DST (nothing to do where it already is).
    fn set_zero(&mut self, i: u64) -> Result<(), EngineError> {
        let (off, len) = self.layout.extent(i);
        if !self.zeros.is_zero_digest(&self.have[i as usize], len) {
            self.keep_aside(i, i + 1)?;
            self.dst.zero_range(off, len)?;
            self.mark_written(i, i + 1);
            self.have[i as usize] = self.zeros.get(len);
        }
        self.state[i as usize] = State::Zero;
        Ok(())
    }

    fn on_block_digests(&mut self, g: u64, keys: Vec<Key>) -> Result<(), EngineError> {
        if g >= self.layout.group_count()
            || self.grp[g as usize].announced_in != self.at.pass()
            || self.grp[g as usize].verified
            || self.keys.contains_key(&g)
            || self.sub_asked.contains(&g)
            || self.hint_asked.contains_key(&g)
        {
            return Err(EngineError::BadReply(format!("block digests for group {g}, which was not asked for")));
        }
        let (a, b) = self.layout.group_range(g);
        if keys.len() as u64 != b - a {
            return Err(EngineError::BadReply(format!(
                "{} block digests for group {g} of {} blocks",
                keys.len(),
                b - a
            )));
        }
        self.replied(&format!("block digests for group {g}"))?;
        self.settle_keys(g, keys.into_iter().map(Given::Key).collect())
    }

    /// Ask for the keys of group `g` that differ from what the old copy
    /// holds there (`CAP_SUB_GROUPS`).
    fn want_changed_keys(&mut self, g: u64) -> Result<(), EngineError> {
        let (a, b) = self.layout.group_range(g);
        let old = &self.have[a as usize..b as usize];
        let sig = subgroup::signature(self.algo, old, |k| {
            self.zeros.is_zero_digest(&old[k], self.layout.extent(a + k as u64).1)
        });
        let subs = subgroup::sub_count((b - a) as usize) as u16;
        self.sub_asked.insert(g);
        // Hints pay only where the old copy holds something in the group:
        // where it is all zeros (say, a new DST without a base) the two more
        // frames would cost bytes and save none, so such a group is asked
        // the previous way.
        if self.hints && !sig.keys.is_empty() {
            let keys = sig.keys.iter().map(subgroup::short).collect();
            return self.request(Message::WantChangedSubs { group: g, subs, zero: sig.zero, keys });
        }
        self.request(Message::WantChangedKeys { group: g, subs, zero: sig.zero, keys: sig.keys })
    }

    /// The answer to a `WantChangedKeys`: keys for the sub-groups that
    /// differ from DST's; the others' blocks are kept as they are (checked
    /// with the whole group against its digest in `group_done`).
    fn on_changed_keys(&mut self, g: u64, subs: u16, differ: Vec<u8>, keys: Vec<Key>) -> Result<(), EngineError> {
        if g >= self.layout.group_count()
            || self.grp[g as usize].announced_in != self.at.pass()
            || self.grp[g as usize].verified
            || self.keys.contains_key(&g)
            || !self.sub_asked.remove(&g)
        {
            return Err(EngineError::BadReply(format!("changed keys for group {g}, which were not asked for")));
        }
        let (a, b) = self.layout.group_range(g);
        let given = subgroup::keys_given((b - a) as usize, subs as usize, &differ, keys)
            .map_err(|e| EngineError::BadReply(format!("changed keys for group {g}: {e}")))?;
        self.replied(&format!("changed keys for group {g}"))?;
        self.settle_keys(g, given.into_iter().map(Given::from).collect())
    }

    /// The answer to a `WantChangedKeys` once the held set was sent
    /// (`CAP_HELD_KEYS`): as `ChangedKeys`, but the blocks the set cannot
    /// hold come without a key and are fetched whole, each run of them
    /// checked against its run key.
    fn on_held_keys(&mut self, g: u64, subs: u16, answer: held::HeldAnswer) -> Result<(), EngineError> {
        if !self.open_for_keys(g) || !self.sub_asked.remove(&g) {
            return Err(EngineError::BadReply(format!("held keys for group {g}, which were not asked for")));
        }
        let (a, b) = self.layout.group_range(g);
        let (given, runs) = held::held_given((b - a) as usize, subs as usize, answer)
            .map_err(|e| EngineError::BadReply(format!("held keys for group {g}: {e}")))?;
        self.replied(&format!("held keys for group {g}"))?;
        for (first, len, key) in runs {
            self.unkeyed_runs.insert(a + first as u64, (len as u32, key));
        }
        self.settle_keys(g, given)
    }

    /// Whether group `g` may take an answer about its sub-groups now: in
    /// this pass, not verified, its keys not settled yet.
    fn open_for_keys(&self, g: u64) -> bool {
        g < self.layout.group_count()
            && self.grp[g as usize].announced_in == self.at.pass()
            && !self.grp[g as usize].verified
            && !self.keys.contains_key(&g)
    }

    /// The answer to a `WantChangedSubs` (`CAP_BLOCK_HINTS`): the
    /// sub-groups of `g` that differ from DST's, without keys. Ask for the
    /// keys of their blocks that differ, with a hint of each of DST's
    /// blocks there (none where DST's sub-group is all zeros).
    fn on_changed_subs(&mut self, g: u64, subs: u16, differ: Vec<u8>) -> Result<(), EngineError> {
        if !self.open_for_keys(g) || !self.sub_asked.remove(&g) {
            return Err(EngineError::BadReply(format!("changed sub-groups of group {g}, which were not asked for")));
        }
        let (a, b) = self.layout.group_range(g);
        subgroup::check_differ((b - a) as usize, subs as usize, &differ)
            .map_err(|e| EngineError::BadReply(format!("changed sub-groups of group {g}: {e}")))?;
        self.replied(&format!("changed sub-groups of group {g}"))?;
        if differ.iter().all(|&x| x == 0) {
            // (A sub-group key collided, or the source lies: the group
            // digest decides, as after ChangedKeys.)
            return self.settle_keys(g, vec![Given::Kept; (b - a) as usize]);
        }
        let old = &self.have[a as usize..b as usize];
        let (zero, hints) =
            subgroup::hints(old, &differ, |k| self.zeros.is_zero_digest(&old[k], self.layout.extent(a + k as u64).1));
        self.hint_asked.insert(g, differ.clone());
        self.request(Message::WantHintedKeys { group: g, subs, differ, zero, hints })
    }

    /// The answer to a `WantHintedKeys`: keys for the blocks whose hint
    /// differed; every other block is kept as DST holds it (checked with
    /// the whole group against its digest in `group_done`).
    fn on_hinted_keys(&mut self, g: u64, count: u32, changed: Vec<u8>, keys: Vec<Key>) -> Result<(), EngineError> {
        let differ = match self.hint_asked.remove(&g) {
            Some(d) if self.open_for_keys(g) => d,
            _ => return Err(EngineError::BadReply(format!("hinted keys for group {g}, which were not asked for"))),
        };
        let (a, b) = self.layout.group_range(g);
        let given = subgroup::hinted_given((b - a) as usize, &differ, count as usize, &changed, keys)
            .map_err(|e| EngineError::BadReply(format!("hinted keys for group {g}: {e}")))?;
        self.replied(&format!("hinted keys for group {g}"))?;
        self.settle_keys(g, given.into_iter().map(Given::from).collect())
    }

    /// Settle each block of group `g` by its key: zero, in place, from a
    /// reference, or asked for. A block kept without a key (its sub-group
    /// matched the old copy's) is kept as the old copy holds it; one
    /// unkeyed (not in the held set) is fetched whole.
    fn settle_keys(&mut self, g: u64, given: Vec<Given>) -> Result<(), EngineError> {
        let (a, b) = self.layout.group_range(g);
        let mut missing = Vec::new();
        let mut unkeyed = Vec::new();
        let mut keys = Vec::with_capacity(given.len());
        let mut keyless = Vec::new();
        let before = self.rekeyed.remove(&g);
        for (k, i) in (a..b).enumerate() {
            let len = self.layout.extent(i).1;
            let key = match given[k] {
                Given::Key(key) => key,
                // The key it would have had: nothing is asked for it, so
                // no reply can be checked against it. The group's digest
                // checks it (`group_done`). (Filled in below.)
                Given::Kept => {
                    keys.push(Key::default());
                    keyless.push(i);
                    continue;
                }
                // No key of its own: its run's key checks the reply
                // (`on_blocks`), the group's digest the group.
                Given::Unkeyed => {
                    keys.push(Key::default());
                    unkeyed.push(i);
                    continue;
                }
            };
            keys.push(key);
            if self.zeros.is_zero_key(&key, len) {
                self.set_zero(i)?;
            } else if key_of(&self.have[i as usize]) == key {
                // (Written by this copy before its group was asked for
                // again: it counts as it came.)
                self.state[i as usize] = match before.as_ref().map(|b| b[k]) {
                    Some(s @ (State::Reused | State::Fetched | State::Delta | State::Similar)) => s,
                    _ => State::InPlace,
                };
            } else if !self.reuse_block(i, &key)? {
                missing.push(i);
            }
        }
        for (i, key) in keyless.iter().zip(self.keep_old(&keyless)) {
            keys[(i - a) as usize] = key;
        }
        self.grp[g as usize].keyless += keyless.len() as u32;
        self.blocks_keyless += keyless.len() as u64;
        self.grp[g as usize].unkeyed += unkeyed.len() as u32;
        self.blocks_unkeyed += unkeyed.len() as u64;
        let settled = (b - a) as u32 - missing.len() as u32 - unkeyed.len() as u32;
        self.grp[g as usize].pending =
            self.grp[g as usize].pending.checked_sub(settled).ok_or_else(|| underflow("blocks pending", g))?;
        self.keys.insert(g, keys);
        self.request_missing(&missing, &unkeyed)?;
        if self.grp[g as usize].pending == 0 {
            self.group_done(g, false)?;
        }
        Ok(())
    }

    /// Keep `blocks` (ascending) as DST holds them. Their keys, in order.
    fn keep_old(&mut self, blocks: &[u64]) -> Vec<Key> {
        blocks
            .iter()
            .map(|&i| {
                let (old, len) = (&self.have[i as usize], self.layout.extent(i).1);
                self.state[i as usize] = if self.zeros.is_zero_digest(old, len) { State::Zero } else { State::InPlace };
                key_of(old)
            })
            .collect()
    }

    /// Read old block `j` from DST (where it may since have been
    /// overwritten: the caller knows, or the rebuilt block fails its key).
    fn read_old(&self, j: u64) -> Result<Vec<u8>, EngineError> {
        let (off, len) = self.layout.extent(j);
        let mut old = vec![0u8; len];
        self.dst.read_at(&mut old, off)?;
        Ok(old)
    }

    /// Copy block `i` from a reference if one holds data with `key`.
    fn reuse_block(&mut self, i: u64, key: &Key) -> Result<bool, EngineError> {
        let Some((image, pos)) = self.refs.find_block(key) else {
            return Ok(false);
        };
        let len = self.layout.extent(i).1;
        let Some(data) = self.refs.read_block(image, pos, len) else {
            return Ok(false);
        };
        let d = self.algo.digest(&data);
        if key_of(&d) != *key {
            log::debug!("reference block changed since indexing; fetching block {i} instead");
            return Ok(false);
        }
        self.write_block(i, &data, d, State::Reused)?;
        Ok(true)
    }

    /// Ask for missing `blocks` (ascending): as a delta each one whose old
    /// version the old copy holds at the same place (non-zero; it differs,
    /// or the block would not be missing), the others in runs, or
    /// (`CAP_SIMILAR`, the old copy holding something) first their
    /// sketches, to look for a similar block in the old copy.
    /// Blocks `unkeyed` (ascending) are fetched whole in the same runs: no
    /// key would check a rebuilt one. (All of them lie in one group, which
    /// fits one run: each unkeyed run is asked for in one `Fetch`, as
    /// `on_blocks` requires to check it.)
    fn request_missing(&mut self, blocks: &[u64], unkeyed: &[u64]) -> Result<(), EngineError> {
        if !self.deltas {
            return self.request_runs(&merged(blocks, unkeyed));
        }
        let mut whole = Vec::with_capacity(blocks.len() + unkeyed.len());
        let mut far = Vec::new();
        for &i in blocks {
            let len = self.layout.extent(i).1;
            if !subdelta::worth_it(len) {
                whole.push(i);
                continue;
            }
            if self.zeros.is_zero_digest(&self.have[i as usize], len) {
                if self.similar && self.similar_index()? {
                    far.push(i);
                } else {
                    whole.push(i);
                }
                continue;
            }
            if !self.delta_share.ask() {
                whole.push(i);
                continue;
            }
            let old = self.read_old(i)?;
            self.delta_asked.insert(i, i);
            self.request(Message::FetchDelta { block: i, sig: subdelta::signature(&old) })?;
        }
        self.request_runs(&merged(&whole, unkeyed))?;
        self.ask_sketches(far)
    }

    /// Ask for the sketches of `far` (ascending) in runs.
    fn ask_sketches(&mut self, far: Vec<u64>) -> Result<(), EngineError> {
        let max = (MAX_RUN_BYTES / self.layout.block_size as u64).max(1) as u32;
        for (f, c) in runs(far, max) {
            if self.sketch_asked.contains_key(&f) {
                // (Cannot happen within a pass; never two answers for one key.)
                self.request_runs(&(f..f + c as u64).collect::<Vec<_>>())?;
                continue;
            }
            self.sketch_asked.insert(f, c);
            self.request(Message::WantSketches { first_block: f, count: c })?;
        }
        Ok(())
    }

    /// Whether DST still holds block `j` as it held it when indexed: kept
    /// in place, or not yet settled in this pass (then it may be rewritten
    /// before a delta against it comes back, which the key check catches).
    fn still_old(&self, j: u64) -> bool {
        match self.state[j as usize] {
            State::InPlace => true,
            State::Pending => !self.keys.contains_key(&(j / self.layout.group_blocks())),
            _ => false,
        }
    }

    /// Whether old block `j` may be a similar block's base: the base's
    /// blocks always (a changed one fails its key check); in place, DST's
    /// until their first write and after it where they were kept aside
    /// (`copy::kept`), else while they hold what DST held
    /// ([`still_old`](Self::still_old)).
    fn similar_usable(&self, j: u64) -> bool {
        let kept = self.kept.as_ref().map(|k| k.lock().expect("the kept blocks' lock"));
        self.base.is_some() || self.old_usable(kept.as_deref(), j)
    }

    /// [`similar_usable`](Self::similar_usable) in place, the kept blocks
    /// (if any) locked by the caller.
    fn old_usable(&self, kept: Option<&Kept>, j: u64) -> bool {
        kept.map_or_else(|| self.still_old(j), |k| k.available(j))
    }

    /// Read the old block `j` that block `i` is asked for as a delta
    /// against: DST's own at the same place (`j == i`), else a similar
    /// block, looked for in the base if DST was filled from one (the base
    /// keeps every old block, where DST's are overwritten as the copy
    /// goes: on the quick images' return copy, 643 similar blocks against
    /// 173), else in DST. None where the base no longer holds it (then the
    /// block is fetched whole).
    fn read_delta_base(&self, i: u64, j: u64) -> Result<Option<Vec<u8>>, EngineError> {
        match &self.base {
            Some(base) if self.delta_base_in_base(i, j) => {
                Ok(self.refs.read_block(base.image, j, self.layout.extent(j).1))
            }
            _ => {
                if let Some(k) = self.kept.as_ref().filter(|_| j != i) {
                    // (Rewritten since it was indexed: its old bytes, kept.)
                    if let Old::Kept(old) = k.lock().expect("the kept blocks' lock").old(j) {
                        return Ok(Some(old.to_vec()));
                    }
                }
                self.read_old(j).map(Some)
            }
        }
    }

    /// Whether the old block `j` a delta for block `i` leans on is the
    /// base's (a similar block of a DST filled from one) rather than DST's.
    fn delta_base_in_base(&self, i: u64, j: u64) -> bool {
        self.base.is_some() && j != i
    }

    /// Whether there may be an index of the old copy's blocks by sketch
    /// to look in. The first call starts building it on a thread of its
    /// own and judging the link (`copy::similar`); false once it is known
    /// that there is none.
    fn similar_index(&mut self) -> Result<bool, EngineError> {
        if matches!(self.sim_index, SimIndex::NotYet) {
            let judging =
                (!self.always_index_similar).then(|| (Instant::now(), self.stats.as_ref().map_or(0, |s| s.read())));
            self.sim_index = match self.build_similar()? {
                Some(build) => SimIndex::Pending { build, judging, idle: None },
                None => SimIndex::Ready(None),
            };
        }
        Ok(!matches!(self.sim_index, SimIndex::Ready(None)))
    }

    /// Start building the index on a thread of its own; None where the old
    /// copy holds nothing to index.
    fn build_similar(&self) -> Result<Option<similar::Building>, EngineError> {
        let zero = |d: &Digest, j: u64| self.zeros.is_zero_digest(d, self.layout.extent(j).1);
        let (old, wanted): (Arc<dyn Disk>, Vec<bool>) = match &self.base {
            Some(base) => (
                Arc::new(self.refs.images[base.image as usize].image.try_clone()?),
                base.zero.iter().map(|&z| !z).collect(),
            ),
            None => {
                let kept = self.kept.as_ref().map(|k| k.lock().expect("the kept blocks' lock"));
                let usable = |j: u64| self.old_usable(kept.as_deref(), j) && !zero(&self.have[j as usize], j);
                (self.dst.clone(), (0..self.layout.block_count()).map(usable).collect())
            }
        };
        if !wanted.contains(&true) {
            return Ok(None);
        }
        Ok(Some(similar::Building::spawn(old, self.kept.clone(), self.layout.clone(), wanted, similar::MAX_ENTRIES)))
    }

    /// While the index is pending: judge the link (`similar::verdict`),
    /// and, judged slow, take the index once it is built. Fast: the index
    /// is given up (its thread stops) and the blocks whose sketches came
    /// meanwhile are asked for whole; built: each is asked for against its
    /// similar block, or whole.
    fn poll_similar(&mut self) -> Result<(), EngineError> {
        let idle_now = self.outstanding == 0 && self.held.is_empty();
        let SimIndex::Pending { judging, idle, .. } = &mut self.sim_index else { return Ok(()) };
        *idle = if idle_now { Some(idle.unwrap_or_else(Instant::now)) } else { None };
        // (Not when asked for whatever the link: then the blocks wait.)
        let waited = idle.is_some_and(|t| t.elapsed() >= similar::IDLE_WAIT);
        if waited && !self.far_waiting.is_empty() && !self.always_index_similar {
            log::debug!("similar blocks: the link idled waiting for the index; blocks fetched whole");
            self.sim_index = SimIndex::Ready(None);
        } else if let Some((since, read)) = *judging {
            let now = self.stats.as_ref().map_or(0, |s| s.read());
            let idle = idle_now;
            let (got, took) = (now.saturating_sub(read), since.elapsed());
            match similar::verdict(got, took, idle) {
                similar::Verdict::Wait => {}
                similar::Verdict::Build => {
                    log::debug!("similar blocks: the link is slow ({got} bytes in {:.3} s)", took.as_secs_f64());
                    *judging = None;
                }
                similar::Verdict::Skip => {
                    log::debug!(
                        "similar blocks: the link is fast ({got} bytes in {:.3} s): no index, blocks fetched whole",
                        took.as_secs_f64()
                    );
                    self.sim_index = SimIndex::Ready(None);
                }
            }
        }
        // (The index is used only once the link is judged slow: on a fast
        // one the blocks are fetched whole even where it happens to be
        // built already, so that what a copy does does not depend on
        // which of the two came first.)
        if let SimIndex::Pending { build, judging: None, .. } = &mut self.sim_index {
            match build.take()? {
                Some(index) => self.sim_index = SimIndex::Ready(index),
                None => return Ok(()),
            }
        }
        let parked = std::mem::take(&mut self.far_waiting);
        if parked.is_empty() {
            return Ok(());
        }
        let whole = self.resolve_far(parked)?;
        self.request_runs(&whole)?;
        // (Called between frames: nothing else flushes these requests.)
        self.flush()
    }

    /// Ask for each block of `far` (with its sketch) still awaited as a
    /// delta against the most similar block of the old copy; the blocks
    /// with none, to be asked for whole. While the index is pending the
    /// blocks wait for it.
    fn resolve_far(&mut self, far: Vec<(u64, [u8; SKETCH_LEN])>) -> Result<Vec<u64>, EngineError> {
        if matches!(self.sim_index, SimIndex::Pending { .. }) {
            self.far_waiting.extend(far);
            return Ok(Vec::new());
        }
        let gb = self.layout.group_blocks();
        let mut whole = Vec::new();
        for (i, s) in far {
            // (A group forgotten meanwhile asks for its blocks again.)
            if self.state[i as usize] != State::Pending || !self.keys.contains_key(&(i / gb)) {
                continue;
            }
            let len = self.layout.extent(i).1;
            let found = match &self.sim_index {
                // (All zeros: the source's block has no features.)
                SimIndex::Ready(Some(index)) if s.iter().any(|&x| x != 0) => index.best(&sketch::from_bytes(&s), |j| {
                    j != i && j < self.layout.block_count() && self.layout.extent(j).1 == len && self.similar_usable(j)
                }),
                _ => None,
            };
            let old = match found {
                Some((j, _)) if self.delta_share.ask() => self.read_delta_base(i, j)?.map(|old| (j, old)),
                _ => None,
            };
            match old {
                Some((j, old)) => {
                    self.delta_asked.insert(i, j);
                    self.request(Message::FetchDelta { block: i, sig: subdelta::signature(&old) })?;
                }
                None => whole.push(i),
            }
        }
        whole.sort_unstable();
        Ok(whole)
    }

    /// Sketches of the run at `first`: each block still awaited is asked
    /// for as a delta against the most similar block of the old copy, or
    /// whole where there is none (once the index is there).
    fn on_sketches(&mut self, first: u64, sketches: Vec<[u8; SKETCH_LEN]>) -> Result<(), EngineError> {
        match self.sketch_asked.remove(&first) {
            Some(n) if n as usize == sketches.len() => {}
            _ => {
                return Err(EngineError::BadReply(format!(
                    "sketches of blocks {first}+{}, which were not asked for in pass {}",
                    sketches.len(),
                    self.at.pass()
                )))
            }
        }
        self.replied(&format!("sketches of blocks {first}+{}", sketches.len()))?;
        let far = sketches.into_iter().enumerate().map(|(k, s)| (first + k as u64, s)).collect();
        let whole = self.resolve_far(far)?;
        self.request_runs(&whole)
    }

    /// Ask for `blocks` (ascending) in runs of consecutive blocks.
    fn request_runs(&mut self, blocks: &[u64]) -> Result<(), EngineError> {
        let max = (MAX_RUN_BYTES / self.layout.block_size as u64).max(1) as u32;
        for (f, c) in runs(blocks.iter().copied(), max) {
            self.request(Message::Fetch { first_block: f, count: c })?;
        }
        Ok(())
    }

    fn on_blocks(
        &mut self,
        first: u64,
        count: u32,
        codec: u8,
        raw_len: u32,
        payload: Vec<u8>,
    ) -> Result<(), EngineError> {
        let Some(end) = checked_end(first, count, self.layout.block_count()) else {
            return Err(EngineError::BadReply(format!(
                "blocks {first}+{count}, the image has {}",
                self.layout.block_count()
            )));
        };
        // Only blocks requested in this pass: pending, in a group whose keys
        // arrived in this pass (keys are forgotten when a group is announced
        // again or settled).
        let gb = self.layout.group_blocks();
        if (first..end).any(|i| self.state[i as usize] != State::Pending || !self.keys.contains_key(&(i / gb))) {
            return Err(EngineError::BadReply(format!(
                "blocks {first}+{count}, which were not asked for in pass {}",
                self.at.pass()
            )));
        }
        // (A run may come in pieces: CAP_SPLIT_RUNS.)
        let answered = match self.fetch_open.as_mut() {
            None => true,
            Some(open) => match open.remove(&first) {
                Some(run_end) if end < run_end => {
                    open.insert(end, run_end);
                    false
                }
                Some(run_end) if end == run_end => true,
                other => {
                    return Err(EngineError::BadReply(format!(
                        "blocks {first}+{count}, {}",
                        match other {
                            Some(run_end) => format!("past the end of the run asked for, block {run_end}"),
                            None => "which do not begin a run asked for or its rest".to_string(),
                        }
                    )))
                }
            },
        };
        if answered {
            self.replied(&format!("blocks {first}+{count}"))?;
        }
        let (start, stop) = byte_range(&self.layout, first, end);
        if stop - start != raw_len as u64 {
            return Err(EngineError::BadReply(format!(
                "a run of {raw_len} bytes for blocks {first}+{count}, which hold {}",
                stop - start
            )));
        }
        let payload_len = payload.len() as u64;
        let raw = self.decode(first, codec, payload, raw_len)?;
        let digests = digest_range(self.algo, &self.layout, &raw, start, first, end, true);
        // Blocks up to here lie in a run asked for without keys, checked
        // whole by its run key (`CAP_HELD_KEYS`).
        let mut in_run = first;
        for (k, i) in (first..end).enumerate() {
            let g = i / gb;
            // (No lookup per block when no run is awaited: the usual case.)
            let run = if self.unkeyed_runs.is_empty() { None } else { self.unkeyed_runs.remove(&i) };
            let matched = if let Some((len, key)) = run {
                in_run = i + len as u64;
                if in_run > end {
                    return Err(EngineError::BadReply(format!(
                        "blocks {first}+{count} end inside the run of {len} blocks from block {i}, asked for whole"
                    )));
                }
                held::run_key(self.algo, &digests[k..k + len as usize]) == key
            } else if i < in_run {
                continue;
            } else {
                self.keys.get(&g).map(|keys| keys[(i - g * gb) as usize]) == Some(key_of(&digests[k]))
            };
            if !matched {
                if self.at.strict() {
                    let offset = self.layout.extent(i).0;
                    return Err(match &self.shared_used {
                        // Name the likelier cause: the two ends' dictionaries.
                        Some(path) if is_stream_code(codec) => {
                            EngineError::SharedRefMismatch { block: i, offset, path: path.clone() }
                        }
                        _ if run.is_some() => EngineError::BadRun { first: i, end: in_run, offset },
                        _ => EngineError::BadBlock { block: i, offset },
                    });
                }
                // Changed since the source hashed it: newer data, announced
                // again in the next pass.
                self.grp[g as usize].tainted = true;
            }
        }
        self.keep_aside(first, end)?;
        self.dst.write_at(&raw, start)?;
        self.mark_written(first, end);
        self.bytes_fetched += raw_len as u64;
        self.bytes_payload += payload_len;
        *self.codecs.entry(Codec::name_of(codec).to_string()).or_default() += raw_len as u64;
        self.pass_report.blocks_fetched += count as u64;
        let mut touched = Vec::new();
        for (k, i) in (first..end).enumerate() {
            self.have[i as usize] = digests[k];
            self.state[i as usize] = State::Fetched;
            let g = i / gb;
            self.grp[g as usize].pending =
                self.grp[g as usize].pending.checked_sub(1).ok_or_else(|| underflow("blocks pending", g))?;
            if self.grp[g as usize].pending == 0 {
                touched.push(g);
            }
        }
        for g in touched {
            self.group_done(g, false)?;
        }
        Ok(())
    }

    /// Decompress the payload of a reply about `block` onward to exactly
    /// `raw_len` bytes: a stream piece in arrival order (frames arrive in
    /// the order the source compressed them), anything else on its own.
    fn decode(&mut self, block: u64, codec: u8, payload: Vec<u8>, raw_len: u32) -> Result<Vec<u8>, EngineError> {
        if is_stream_code(codec) {
            self.take_shared_decoder()?;
            if codec == STREAM_REF_SOON_CODE {
                self.read_late_reference(block)?;
            }
            let reference = if codec == STREAM_REF_CODE { Some(self.late_reference()?) } else { None };
            let image_size = self.layout.size;
            let Some(slot) = self.stream.as_mut() else {
                return Err(EngineError::BadReply(format!(
                    "a zstd stream piece for block {block}, but no stream was agreed"
                )));
            };
            let began = slot.is_some();
            let dec = match (slot, reference) {
                (Some(d), Some(r)) => {
                    self.shared_after = d.decoded();
                    d.reference_next_frame(r, image_size)
                        .map_err(|detail| crate::wire::compress::CodecError::Corrupt { codec: "zstd-stream", detail })
                        .map_err(|source| EngineError::Codec { block, source })?;
                    d
                }
                // The stream's first frame begins with the reference.
                (slot @ None, Some(r)) => slot.insert(StreamDecoder::with_prefix(r, image_size)?),
                (Some(d), None) => d,
                (slot @ None, None) if self.levels => slot.insert(StreamDecoder::new()?.follow_levels()),
                (slot @ None, None) => slot.insert(StreamDecoder::new()?),
            };
            let out = dec.decompress_run(&payload, raw_len as usize);
            if out.is_ok() && began && dec.reference_pending() {
                return Err(EngineError::BadReply(format!(
                    "the zstd stream piece for block {block} was to begin the shared reference's frame and began none"
                )));
            }
            out
        } else {
            Codec::decompress(codec, payload, raw_len as usize)
        }
        .map_err(|source| EngineError::Codec { block, source })
    }

    /// A delta for block `i`: rebuilt from its old version and written
    /// only if it matches the block's key; otherwise the block is fetched
    /// whole (a sub-block hash collision, an old block that changed, a
    /// damaged body). Frames that do not fit what was asked fail the copy.
    fn on_delta(&mut self, i: u64, codec: u8, raw_len: u32, payload: Vec<u8>) -> Result<(), EngineError> {
        self.check_delta_asked(i)?;
        let len = self.layout.extent(i).1;
        if raw_len as usize > subdelta::max_body(len) {
            return Err(EngineError::BadReply(format!(
                "a delta of {raw_len} bytes for block {i} of {len} bytes (at most {})",
                subdelta::max_body(len)
            )));
        }
        self.bytes_payload += payload.len() as u64;
        self.bytes_fetched += raw_len as u64;
        *self.codecs.entry(Codec::name_of(codec).to_string()).or_default() += raw_len as u64;
        let body = self.decode(i, codec, payload, raw_len)?;
        self.settle_delta(i, Ok(body))
    }

    /// Several deltas in one piece (`CAP_DELTA_BATCH`): every block must
    /// have been asked as a delta, and the bodies, split by their bitmaps,
    /// must fill the piece exactly. Each is then settled as a `Delta`
    /// would be. Bodies that do not split (a damaged piece) fetch their
    /// blocks whole, as a body that does not rebuild its block does.
    fn on_deltas(&mut self, codec: u8, raw_len: u32, blocks: Vec<u64>, payload: Vec<u8>) -> Result<(), EngineError> {
        let mut most = 0u64;
        for &i in &blocks {
            self.check_delta_asked(i)?;
            most += subdelta::max_body(self.layout.extent(i).1) as u64;
        }
        if raw_len as u64 > most {
            return Err(EngineError::BadReply(format!(
                "{raw_len} bytes of deltas for {} blocks from block {} (at most {most})",
                blocks.len(),
                blocks[0]
            )));
        }
        self.bytes_payload += payload.len() as u64;
        self.bytes_fetched += raw_len as u64;
        *self.codecs.entry(Codec::name_of(codec).to_string()).or_default() += raw_len as u64;
        let piece = self.decode(blocks[0], codec, payload, raw_len)?;
        // The bodies up to the first that does not split; past it none can
        // be trusted, and bytes left over after the last spoil them all.
        let mut bodies = Vec::with_capacity(blocks.len());
        let mut rest = &piece[..];
        let mut why = None;
        for &i in &blocks {
            match subdelta::body_len(self.layout.extent(i).1, rest) {
                Ok(n) => {
                    let (body, tail) = rest.split_at(n);
                    bodies.push(body.to_vec());
                    rest = tail;
                }
                Err(e) => {
                    why = Some(e.to_string());
                    break;
                }
            }
        }
        if why.is_none() && !rest.is_empty() {
            why = Some(format!("the batch's piece holds {} bytes past its last body", rest.len()));
            bodies.clear();
        }
        let bodies = bodies.into_iter().map(Ok).chain(std::iter::repeat_with(|| Err(why.clone().unwrap_or_default())));
        for (i, body) in blocks.into_iter().zip(bodies) {
            self.settle_delta(i, body)?;
        }
        Ok(())
    }

    /// Fail the copy unless a delta for block `i` is awaited now.
    fn check_delta_asked(&self, i: u64) -> Result<(), EngineError> {
        let g = i / self.layout.group_blocks();
        if checked_end(i, 1, self.layout.block_count()).is_none()
            || self.state[i as usize] != State::Pending
            || !self.keys.contains_key(&g)
            || !self.delta_asked.contains_key(&i)
        {
            return Err(EngineError::BadReply(format!(
                "a delta for block {i}, which was not asked for in pass {}",
                self.at.pass()
            )));
        }
        Ok(())
    }

    /// The delta body for block `i` came (checked by
    /// [`check_delta_asked`](Self::check_delta_asked)), or could not be
    /// read (`Err`, why): write the rebuilt block if it matches its key,
    /// else ask for it whole.
    fn settle_delta(&mut self, i: u64, body: Result<Vec<u8>, String>) -> Result<(), EngineError> {
        let gb = self.layout.group_blocks();
        let g = i / gb;
        let base = self.delta_asked.remove(&i).expect("checked by check_delta_asked");
        self.replied(&format!("a delta for block {i}"))?;
        let len = self.layout.extent(i).1;
        // (A body that could not be read helps no more than a whole block.)
        self.delta_share.answered(body.as_ref().map_or(len, Vec::len), len);
        let want = self.keys[&g][(i - g * gb) as usize];
        let old = self.read_delta_base(i, base)?.ok_or_else(|| "the old block cannot be read any more".to_string());
        let rebuilt = body
            .and_then(|body| old.map(|old| (old, body)))
            .and_then(|(old, body)| subdelta::apply(&old, &body).map_err(|e| e.to_string()))
            .and_then(|new| {
                let d = self.algo.digest(&new);
                if key_of(&d) == want {
                    Ok((new, d))
                } else {
                    Err("the rebuilt block does not match its key".to_string())
                }
            });
        let (new, d) = match rebuilt {
            Ok(r) => r,
            Err(why) => {
                let what = if self.delta_base_in_base(i, base) { "the base's" } else { "DST's" };
                log::warn!("block {i}: the delta against {what} block {base} failed ({why}); fetching it whole");
                self.deltas_failed += 1;
                return self.request_runs(&[i]);
            }
        };
        self.write_block(i, &new, d, if base == i { State::Delta } else { State::Similar })?;
        self.pass_report.blocks_fetched += 1;
        self.grp[g as usize].pending =
            self.grp[g as usize].pending.checked_sub(1).ok_or_else(|| underflow("blocks pending", g))?;
        if self.grp[g as usize].pending == 0 {
            self.group_done(g, false)?;
        }
        Ok(())
    }

    /// Verify a settled group against the source's full group digest.
    /// `from_digest` groups were settled by that very comparison.
    fn group_done(&mut self, g: u64, from_digest: bool) -> Result<bool, EngineError> {
        let (a, b) = self.layout.group_range(g);
        let want = self.grp[g as usize].digest.expect("announced");
        let matches = from_digest || group_digest(self.algo, &self.have[a as usize..b as usize]) == want;
        if !self.at.strict() && (self.grp[g as usize].tainted || !matches) {
            self.grp[g as usize].tainted = false;
            self.keys.remove(&g);
            self.stale.push(g);
            self.open_groups = self.open_groups.checked_sub(1).ok_or_else(|| underflow("open groups", g))?;
            self.progress.inc(self.group_bytes(g));
            return Ok(false);
        }
        if !matches && self.grp[g as usize].keyless + self.grp[g as usize].unkeyed > 0 {
            // A sub-group key collided, the source said a sub-group was
            // the same when it was not, or sent a block asked for without
            // its key that is not the one its group holds: ask again, with
            // every key.
            log::warn!(
                "group {g} did not match its digest with blocks settled without their keys; asking for all its keys"
            );
            let (keyless, (a, b)) = (self.grp[g as usize].keyless, self.layout.group_range(g));
            self.grp[g as usize].keyless = 0;
            self.grp[g as usize].unkeyed = 0;
            self.blocks_keyless -= keyless as u64;
            self.groups_rekeyed += 1;
            self.keys.remove(&g);
            self.rekeyed.insert(g, self.state[a as usize..b as usize].to_vec());
            self.state[a as usize..b as usize].fill(State::Pending);
            self.grp[g as usize].pending = (b - a) as u32;
            self.request(Message::WantDigests { first_group: g, count: 1 })?;
            return Ok(false);
        }
        if !matches {
            if !self.refetched.insert(g) {
                return Err(EngineError::GroupMismatch { group: g, first: a, end: b });
            }
            log::warn!("group {g} did not match its digest; fetching it whole");
            let redo: Vec<u64> = (a..b).filter(|&i| self.state[i as usize] != State::Zero).collect();
            if redo.is_empty() {
                return Err(EngineError::GroupMismatch { group: g, first: a, end: b });
            }
            for &i in &redo {
                self.state[i as usize] = State::Pending;
            }
            self.grp[g as usize].pending = redo.len() as u32;
            self.request_runs(&redo)?;
            return Ok(false);
        }
        self.grp[g as usize].pending = 0;
        self.keys.remove(&g);
        self.grp[g as usize].verified = true;
        let (start, stop) = byte_range(&self.layout, a, b);
        self.writeback.kick(start, stop - start);
        self.open_groups = self.open_groups.checked_sub(1).ok_or_else(|| underflow("open groups", g))?;
        self.progress.inc(self.group_bytes(g));
        Ok(true)
    }
}

// A group's blocks always fit one `Fetch` (see `request_missing`).
const _: () = assert!(crate::blocks::layout::GROUP_BYTES <= MAX_RUN_BYTES);

/// Two ascending lists of blocks as one.
fn merged(a: &[u64], b: &[u64]) -> Vec<u64> {
    if b.is_empty() {
        return a.to_vec();
    }
    let mut all = [a, b].concat();
    all.sort_unstable();
    all
}

/// Groups asked for in one WantDigests at most.
const MAX_WANT: u32 = 64;

/// Replies a request awaits.
fn replies_to(m: &Message) -> usize {
    match m {
        Message::WantDigests { count, .. } => *count as usize,
        _ => 1,
    }
}

/// A counter would go below zero: the source sent something this state
/// does not allow.
fn underflow(what: &str, group: u64) -> EngineError {
    EngineError::BadReply(format!("frames out of order: {what} of group {group} would go below zero"))
}

/// Whether sub-block deltas pay. A delta costs a request and an answer of
/// their own (about 74 bytes with the signature) and saves only the
/// sub-blocks that did not change, so on a DST whose old blocks are
/// unrelated to the new ones (another guest's data, a different release)
/// every delta is a whole block plus that cost: 4.4 MB more on the
/// experiments' release cell in place. Once the answers show that (their
/// bodies average more than [`DeltaShare::USELESS`] of the block), blocks
/// go in runs again, with one candidate in [`DeltaShare::PROBE_EVERY`]
/// still asked as a delta, so that a region where deltas pay again is
/// found.
#[derive(Debug)]
struct DeltaShare {
    /// Moving average of body / block length over the answered deltas.
    share: f64,
    answered: u64,
    skipped: u64,
}

impl Default for DeltaShare {
    fn default() -> Self {
        DeltaShare { share: 0.0, answered: 0, skipped: 0 }
    }
}

impl DeltaShare {
    const USELESS: f64 = 0.85;
    const PROBE_EVERY: u64 = 32;
    /// Answers before the average counts.
    const EVIDENCE: u64 = 64;
    /// Weight of one answer in the average.
    const WEIGHT: f64 = 1.0 / 64.0;

    /// Whether the next candidate should be asked as a delta.
    fn ask(&mut self) -> bool {
        if self.answered < Self::EVIDENCE || self.share <= Self::USELESS {
            return true;
        }
        self.skipped += 1;
        self.skipped % Self::PROBE_EVERY == 0
    }

    /// A delta of `body` bytes came for a block of `len` bytes.
    fn answered(&mut self, body: usize, len: usize) {
        let s = body as f64 / len.max(1) as f64;
        self.share = if self.answered == 0 { s } else { self.share + (s - self.share) * Self::WEIGHT };
        self.answered += 1;
    }
}

#[cfg(test)]
mod tests {

    /// Deltas stop where their answers are whole blocks, one candidate in
    /// 32 is still asked, and they resume once those pay again.
    #[test]
    fn deltas_stop_where_old_blocks_are_unrelated_and_resume_where_they_pay() {
        let mut d = DeltaShare::default();
        for _ in 0..DeltaShare::EVIDENCE {
            assert!(d.ask(), "asked before the evidence is in");
            d.answered(4096 + 1, 4096); // every sub-block changed
        }
        let asked = (0..320).filter(|_| d.ask()).count();
        assert_eq!(asked, 10, "one in {}", DeltaShare::PROBE_EVERY);
        // The probes come back small: deltas pay again.
        let mut n = 0;
        while !(0..DeltaShare::PROBE_EVERY).all(|_| d.ask()) {
            d.answered(520, 4096);
            n += 1;
            assert!(n < 64, "deltas never resumed");
        }
        // Small answers from the start never stop them.
        let mut d = DeltaShare::default();
        for _ in 0..1000 {
            assert!(d.ask());
            d.answered(600, 4096);
        }
    }
    use super::*;
    use crate::wire::protocol;
    use std::io::Write;

    /// A source that sends an ImageInfo whose segment lengths wrap around
    /// 2^64 to the declared 512 KiB: the target must refuse it before DST
    /// is created, never write 1 MiB "verified".
    #[test]
    fn a_hostile_layout_is_refused_before_dst_is_touched() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("dst.img");
        let (mut src, tgt) = Link::pair().unwrap();
        let peer = thread::spawn(move || {
            protocol::handshake(&mut src.reader, &mut src.writer, Role::Source, 0).unwrap();
            let size = 512u64 << 10;
            let segs = [(0u64, 1u64 << 20), (1 << 20, 0u64.wrapping_sub(1 << 20).wrapping_add(size))];
            let mut p = vec![Algorithm::Blake3.code()];
            p.extend_from_slice(&size.to_le_bytes());
            p.extend_from_slice(&4096u32.to_le_bytes());
            p.extend_from_slice(&(segs.len() as u32).to_le_bytes());
            for (start, len) in segs {
                p.extend_from_slice(&start.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
            }
            let mut frame = vec![2u8];
            frame.extend_from_slice(&(p.len() as u32).to_le_bytes());
            frame.extend_from_slice(&p);
            let _ = src.writer.write_all(&frame);
            let _ = src.writer.flush();
            src
        });
        let r = run(&dst, &TargetOptions::default(), tgt, &Progress::hidden());
        let e = r.expect_err("a hostile layout is refused").to_string();
        assert!(e.contains("past") || e.contains("tile"), "{e}");
        assert!(!dst.exists(), "DST was created");
        drop(peer.join());
    }

    /// Found by fuzzing (fuzz/regressions/target_end/): a PassBegin whose
    /// changed-block count times the block size overflows u64 panicked
    /// (overflow checks on) while sizing the progress phase.
    #[test]
    fn a_huge_changed_block_count_is_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("dst.img");
        let (mut src, tgt) = Link::pair().unwrap();
        let peer = thread::spawn(move || {
            protocol::handshake(&mut src.reader, &mut src.writer, Role::Source, CAP_LIVE).unwrap();
            let layout = Layout::flat(64 << 10, 4096).unwrap();
            write_message(&mut src.writer, &Message::ImageInfo { algo: Algorithm::Blake3, layout }).unwrap();
            let begin = Message::PassBegin { pass: 1, final_pass: false, changed_blocks: u64::MAX };
            write_message(&mut src.writer, &begin).unwrap();
            src.writer.flush().unwrap();
            // Then hang up: the target must fail cleanly.
        });
        let r = run(&dst, &TargetOptions::default(), tgt, &Progress::hidden());
        assert!(r.is_err());
        peer.join().unwrap();
    }
}

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
//!
//! A settled group is verified by recomputing its digest from the full
//! digests of exactly what was written; a group that fails (a key collision,
//! or a reference changed under us) is fetched whole once more.
//!
//! Live copies come in passes (see `protocol`). In a live pass the source
//! is still changing, so a fetched block may not match the key announced
//! earlier: it is written anyway (it is newer), its group is reported stale
//! and the source announces it again. Only the final, frozen pass is strict,
//! and only it can end in Done and `verified`.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::thread;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver};
use rayon::prelude::*;

use crate::blocks::blockmap::{byte_range, group_digest, image_digest, BlockMap};
use crate::wire::compress::Codec;
use crate::blocks::digest::{hex, key_of, Algorithm, Digest, Key, ZeroDigests};
use crate::storage::image::Image;
use crate::blocks::layout::Layout;
use crate::wire::protocol::{self, read_message, write_message, Message, ProtocolError, Role, CAP_LIVE, MAX_RUN_BYTES};
use crate::wire::transport::{Link, Reader, Writer};

use super::references::ReferenceSet;
use super::{EngineError, PassReport, Progress, Report};

#[derive(Clone, Debug, Default)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Pending,
    Zero,
    InPlace,
    Reused,
    Fetched,
}

struct Target<'a> {
    algo: Algorithm,
    layout: Layout,
    dst: Image,
    refs: ReferenceSet,
    zeros: ZeroDigests,
    /// Digest of what DST holds now at each block (a fresh file reads as
    /// zeros); kept current as blocks are written.
    have: Vec<Digest>,
    /// Source digest of each group, as last announced.
    groups: Vec<Option<Digest>>,
    /// Pass in which each group was last announced (0: not yet).
    announced_in: Vec<u32>,
    image_digest: Option<Digest>,
    state: Vec<State>,
    /// Keys of groups being settled block by block.
    keys: HashMap<u64, Vec<Key>>,
    pending_in_group: Vec<u32>,
    /// A block of the group did not match its key in a live pass.
    tainted: Vec<bool>,
    verified: Vec<bool>,
    /// Groups announced in this pass and not yet verified or found stale.
    open_groups: u64,
    stale: Vec<u64>,
    refetched: HashSet<u64>,
    groups_matched: u64,
    bytes_fetched: u64,
    bytes_payload: u64,
    codecs: std::collections::BTreeMap<String, u64>,
    pass: u32,
    strict: bool,
    pass_report: PassReport,
    pass_started: Instant,
    passes: Vec<PassReport>,
    out: Writer,
    progress: &'a Progress,
}

/// Rebuild the source's image into `dst` over `link`.
pub fn run(dst: &Path, opts: &TargetOptions, link: Link, progress: &Progress) -> Result<Report, EngineError> {
    let started = Instant::now();
    let Link { mut reader, mut writer, stats } = link;
    protocol::handshake(&mut reader, &mut writer, Role::Target, CAP_LIVE)?;
    let (algo, layout) = match read_message(&mut reader, "before describing the image")? {
        Message::ImageInfo { algo, layout } => (algo, layout),
        other => return Err(ProtocolError::Unexpected { got: other.kind(), state: "waiting for ImageInfo" }.into()),
    };
    let result = (|| {
        if !algo.collision_safe() {
            log::warn!("the source hashes with SHA-1, which is not collision-safe: do not use references holding other tenants' data");
        }
        // References first: a bad one stops the copy before DST is touched.
        let mut refs = ReferenceSet::load(&opts.references, algo, layout.block_size)?;
        check_lv_not_open(dst, opts.allow_open_by.as_deref())?;
        let (dst_img, had_data) = Image::open_target_mode(dst, layout.size, opts.create_mode.unwrap_or(0o600))?;
        let zeros = ZeroDigests::new(algo, layout.block_size as usize);
        let have = if had_data {
            progress.phase("scanning", layout.size);
            let m = BlockMap::compute(&dst_img, layout.clone(), algo, |_, _| {}, &|n| progress.inc(n))?;
            // Blocks that moved within DST count too; each is re-read and
            // checked, so one overwritten meanwhile is simply fetched.
            refs.add_image(dst.into(), Image::open_read(dst)?, &m);
            m.digests
        } else {
            (0..layout.block_count()).map(|i| zeros.get(layout.extent(i).1)).collect()
        };
        let n = layout.block_count() as usize;
        let g = layout.group_count() as usize;
        let mut t = Target {
            algo,
            zeros,
            dst: dst_img,
            refs,
            have,
            groups: vec![None; g],
            announced_in: vec![0; g],
            image_digest: None,
            state: vec![State::Pending; n],
            keys: HashMap::new(),
            pending_in_group: vec![0; g],
            tainted: vec![false; g],
            verified: vec![false; g],
            open_groups: 0,
            stale: Vec::new(),
            refetched: HashSet::new(),
            groups_matched: 0,
            bytes_fetched: 0,
            bytes_payload: 0,
            codecs: Default::default(),
            pass: 1,
            strict: true,
            pass_report: PassReport { pass: 1, final_pass: true, changed_blocks: n as u64, ..Default::default() },
            pass_started: Instant::now(),
            passes: Vec::new(),
            layout: layout.clone(),
            out: writer,
            progress,
        };
        t.progress.phase("copying", t.layout.size);
        t.receive(reader)
    })();
    match result {
        Ok(mut report) => {
            report.seconds = started.elapsed().as_secs_f64();
            report.bytes_wire = stats.total();
            Ok(report)
        }
        Err(e) => Err(e),
    }
}

type Inbox = Receiver<Result<Message, ProtocolError>>;

impl Target<'_> {
    fn receive(&mut self, reader: Reader) -> Result<Report, EngineError> {
        // A reader thread keeps the link drained while we hash and write, so
        // the source never stalls on a full pipe while we are busy.
        let (tx, rx) = bounded::<Result<Message, ProtocolError>>(64);
        let mut reader = reader;
        let reader_thread = thread::spawn(move || loop {
            let m = read_message(&mut reader, "before the copy was complete");
            let stop = matches!(m, Err(_) | Ok(Message::Bye { .. }));
            if tx.send(m).is_err() || stop {
                return;
            }
        });
        let result = self.main_loop(&rx);
        if let Err(e) = &result {
            let _ = write_message(&mut self.out, &Message::Error { message: format!("target: {e}") });
            let _ = self.out.flush();
        }
        drop(rx);
        // On success the reader ended at Bye; on failure it ends when the
        // source hangs up after our Error frame.
        if result.is_ok() {
            let _ = reader_thread.join();
        }
        result
    }

    fn main_loop(&mut self, rx: &Inbox) -> Result<Report, EngineError> {
        loop {
            let m = loop {
                super::interrupt::check()?;
                match rx.recv_timeout(std::time::Duration::from_millis(100)) {
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
                Message::GroupsEnd { image_digest } => {
                    if self.image_digest.replace(image_digest).is_some() {
                        return Err(EngineError::BadReply(format!("a second end of pass {}", self.pass)));
                    }
                }
                Message::BlockDigests { group, keys } => self.on_block_digests(group, keys)?,
                Message::Blocks { first_block, count, codec, raw_len, payload } => {
                    self.on_blocks(first_block, count, codec, raw_len, payload)?
                }
                other => return Err(ProtocolError::Unexpected { got: other.kind(), state: "copying" }.into()),
            }
            if let Some(want) = self.image_digest {
                if self.open_groups == 0 {
                    if self.strict {
                        return self.finish(want, rx);
                    }
                    self.end_live_pass()?;
                }
            }
            if rx.is_empty() {
                self.out.flush().map_err(ProtocolError::Io)?;
            }
        }
    }

    fn close_pass_report(&mut self) {
        let mut r = std::mem::take(&mut self.pass_report);
        r.seconds = self.pass_started.elapsed().as_secs_f64();
        r.groups_stale = self.stale.len() as u64;
        self.passes.push(r);
    }

    fn on_pass_begin(&mut self, pass: u32, final_pass: bool, changed_blocks: u64) -> Result<(), EngineError> {
        let first = self.passes.is_empty() && self.announced_in.iter().all(|&p| p == 0);
        if (first && pass != 1) || (!first && (pass != self.pass + 1 || self.image_digest.is_some())) {
            return Err(EngineError::BadReply(format!("pass {pass} out of order (at pass {})", self.pass)));
        }
        self.pass = pass;
        self.strict = final_pass;
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
        self.close_pass_report();
        let stale = std::mem::take(&mut self.stale);
        write_message(&mut self.out, &Message::PassDone { pass: self.pass, stale_groups: stale })?;
        self.out.flush().map_err(ProtocolError::Io)?;
        self.image_digest = None;
        Ok(())
    }

    fn finish(&mut self, want: Digest, rx: &Inbox) -> Result<Report, EngineError> {
        if let Some(g) = self.verified.iter().position(|v| !v) {
            return Err(EngineError::BadReply(format!("the final pass ended with group {g} never verified")));
        }
        let groups: Vec<Digest> = self.groups.iter().map(|g| g.expect("every group verified")).collect();
        let got = image_digest(self.algo, &self.layout, &groups);
        if got != want {
            return Err(EngineError::NotVerified { got: hex(&got), want: hex(&want) });
        }
        self.dst.sync()?;
        // Nothing of this copy stays in dom0's page cache: a Xen guest's
        // backend writes under it, so cached pages would later be stale.
        self.dst.drop_cache();
        self.close_pass_report();
        self.progress.finish();
        let count = |s: State| self.state.iter().filter(|&&x| x == s).count() as u64;
        let mut report = Report {
            target: self.dst.path().display().to_string(),
            image_size: self.layout.size,
            block_size: self.layout.block_size,
            algorithm: self.algo.name().into(),
            blocks_total: self.layout.block_count(),
            blocks_zero: count(State::Zero),
            blocks_reused: count(State::InPlace) + count(State::Reused),
            blocks_in_place: count(State::InPlace),
            blocks_fetched: count(State::Fetched),
            groups_matched: self.groups_matched,
            groups_total: self.layout.group_count(),
            groups_refetched: self.refetched.len() as u64,
            bytes_fetched: self.bytes_fetched,
            bytes_payload_wire: self.bytes_payload,
            codecs: std::mem::take(&mut self.codecs),
            verified: true,
            digest: hex(&want[..self.algo.width()]),
            passes: std::mem::take(&mut self.passes),
            ..Report::default()
        };
        let json = serde_json::to_string(&report).expect("report serialises");
        write_message(&mut self.out, &Message::Done { report: json })?;
        self.out.flush().map_err(ProtocolError::Io)?;
        match rx.recv().map_err(|_| ProtocolError::Eof("before saying Bye"))?? {
            Message::Bye { downtime_ns } => {
                report.downtime_seconds = downtime_ns as f64 / 1e9;
                Ok(report)
            }
            other => Err(ProtocolError::Unexpected { got: other.kind(), state: "waiting for Bye" }.into()),
        }
    }

    fn group_bytes(&self, g: u64) -> u64 {
        let (a, b) = self.layout.group_range(g);
        let (s, e) = byte_range(&self.layout, a, b);
        e - s
    }

    fn on_groups(&mut self, first: u64, digests: Vec<Digest>) -> Result<(), EngineError> {
        let end = first.checked_add(digests.len() as u64).filter(|&e| e <= self.layout.group_count());
        if end.is_none() || digests.is_empty() || self.image_digest.is_some() {
            return Err(EngineError::BadReply(format!(
                "digests for groups {first}+{}, the image has {}",
                digests.len(),
                self.layout.group_count()
            )));
        }
        let mut want: Option<(u64, u32)> = None;
        for (i, d) in digests.into_iter().enumerate() {
            let g = first + i as u64;
            self.announce(g, d)?;
            if self.settle_group_locally(g, &d)? {
                continue;
            }
            want = match want {
                Some((f, c)) if f + c as u64 == g => Some((f, c + 1)),
                Some((f, c)) => {
                    write_message(&mut self.out, &Message::WantDigests { first_group: f, count: c })?;
                    Some((g, 1))
                }
                None => Some((g, 1)),
            };
        }
        if let Some((f, c)) = want {
            write_message(&mut self.out, &Message::WantDigests { first_group: f, count: c })?;
        }
        Ok(())
    }

    /// Take group `g` with digest `d` into this pass, forgetting any earlier
    /// settlement of it.
    fn announce(&mut self, g: u64, d: Digest) -> Result<(), EngineError> {
        if self.announced_in[g as usize] == self.pass {
            return Err(EngineError::BadReply(format!("group {g} twice in pass {}", self.pass)));
        }
        self.verified[g as usize] = false;
        let (a, b) = self.layout.group_range(g);
        self.state[a as usize..b as usize].fill(State::Pending);
        self.pending_in_group[g as usize] = (b - a) as u32;
        self.keys.remove(&g);
        self.tainted[g as usize] = false;
        self.groups[g as usize] = Some(d);
        self.announced_in[g as usize] = self.pass;
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
        if let Some(e) = self.refs.index.find_group(&key_of(want)) {
            let r = &self.refs.images[e.image as usize];
            let (ra, rb) = r.layout.group_range(e.pos);
            if rb - ra == b - a {
                let mut blocks = Vec::with_capacity(bi - ai);
                for (k, i) in (a..b).enumerate() {
                    match self.refs.read_block(e.image, ra + k as u64, self.layout.extent(i).1) {
                        Some(data) => blocks.push(data),
                        None => return Ok(false),
                    }
                }
                let digests: Vec<Digest> = blocks.par_iter().map(|d| self.algo.digest(d)).collect();
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

    fn write_block(&mut self, i: u64, data: &[u8], digest: Digest, state: State) -> Result<(), EngineError> {
        self.dst.write_at(data, self.layout.extent(i).0)?;
        self.have[i as usize] = digest;
        self.state[i as usize] = state;
        if state == State::Reused {
            self.pass_report.blocks_reused += 1;
        }
        Ok(())
    }

    /// Make block `i` zero in DST (nothing to do where it already is).
    fn set_zero(&mut self, i: u64) -> Result<(), EngineError> {
        let (off, len) = self.layout.extent(i);
        if !self.zeros.is_zero_digest(&self.have[i as usize], len) {
            self.dst.zero_range(off, len)?;
            self.have[i as usize] = self.zeros.get(len);
        }
        self.state[i as usize] = State::Zero;
        Ok(())
    }

    fn on_block_digests(&mut self, g: u64, keys: Vec<Key>) -> Result<(), EngineError> {
        if g >= self.layout.group_count()
            || self.announced_in[g as usize] != self.pass
            || self.verified[g as usize]
            || self.keys.contains_key(&g)
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
        let mut missing = Vec::new();
        for (k, i) in (a..b).enumerate() {
            let key = &keys[k];
            let len = self.layout.extent(i).1;
            if self.zeros.is_zero_key(key, len) {
                self.set_zero(i)?;
            } else if key_of(&self.have[i as usize]) == *key {
                self.state[i as usize] = State::InPlace;
            } else if !self.reuse_block(i, key)? {
                missing.push(i);
            }
        }
        self.pending_in_group[g as usize] -= (b - a) as u32 - missing.len() as u32;
        self.keys.insert(g, keys);
        self.request_runs(&missing)?;
        if self.pending_in_group[g as usize] == 0 {
            self.group_done(g, false)?;
        }
        Ok(())
    }

    /// Copy block `i` from a reference if one holds data with `key`.
    fn reuse_block(&mut self, i: u64, key: &Key) -> Result<bool, EngineError> {
        let Some(e) = self.refs.index.find_block(key) else {
            return Ok(false);
        };
        let len = self.layout.extent(i).1;
        let Some(data) = self.refs.read_block(e.image, e.pos, len) else {
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

    /// Ask for `blocks` (ascending) in runs of consecutive blocks.
    fn request_runs(&mut self, blocks: &[u64]) -> Result<(), EngineError> {
        let max = (MAX_RUN_BYTES / self.layout.block_size as u64).max(1) as u32;
        let mut run: Option<(u64, u32)> = None;
        for &i in blocks {
            run = match run {
                Some((f, c)) if f + c as u64 == i && c < max => Some((f, c + 1)),
                Some((f, c)) => {
                    write_message(&mut self.out, &Message::Fetch { first_block: f, count: c })?;
                    Some((i, 1))
                }
                None => Some((i, 1)),
            };
        }
        if let Some((f, c)) = run {
            write_message(&mut self.out, &Message::Fetch { first_block: f, count: c })?;
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
        let end = first.checked_add(count as u64).filter(|&e| e <= self.layout.block_count() && count > 0);
        let Some(end) = end else {
            return Err(EngineError::BadReply(format!(
                "blocks {first}+{count}, the image has {}",
                self.layout.block_count()
            )));
        };
        if (first..end).any(|i| self.state[i as usize] != State::Pending) {
            return Err(EngineError::BadReply(format!("blocks {first}+{count}, which were not asked for")));
        }
        let (start, stop) = byte_range(&self.layout, first, end);
        if stop - start != raw_len as u64 {
            return Err(EngineError::BadReply(format!(
                "a run of {raw_len} bytes for blocks {first}+{count}, which hold {}",
                stop - start
            )));
        }
        let payload_len = payload.len() as u64;
        let raw = Codec::decompress(codec, payload, raw_len as usize)
            .map_err(|source| EngineError::Codec { block: first, source })?;
        let layout = &self.layout;
        let algo = self.algo;
        let digests: Vec<Digest> = (first..end)
            .into_par_iter()
            .map(|i| {
                let (off, len) = layout.extent(i);
                algo.digest(&raw[(off - start) as usize..(off - start) as usize + len])
            })
            .collect();
        let gb = self.layout.group_blocks();
        for (k, i) in (first..end).enumerate() {
            let g = i / gb;
            let want = self.keys.get(&g).map(|keys| keys[(i - g * gb) as usize]);
            if want != Some(key_of(&digests[k])) {
                if self.strict {
                    return Err(EngineError::BadBlock { block: i, offset: self.layout.extent(i).0 });
                }
                // Changed since the source hashed it: newer data, announced
                // again in the next pass.
                self.tainted[g as usize] = true;
            }
        }
        self.dst.write_at(&raw, start)?;
        self.bytes_fetched += raw_len as u64;
        self.bytes_payload += payload_len;
        *self.codecs.entry(Codec::name_of(codec).to_string()).or_default() += raw_len as u64;
        self.pass_report.blocks_fetched += count as u64;
        let mut touched = Vec::new();
        for (k, i) in (first..end).enumerate() {
            self.have[i as usize] = digests[k];
            self.state[i as usize] = State::Fetched;
            let g = i / gb;
            self.pending_in_group[g as usize] -= 1;
            if self.pending_in_group[g as usize] == 0 {
                touched.push(g);
            }
        }
        for g in touched {
            self.group_done(g, false)?;
        }
        Ok(())
    }

    /// Verify a settled group against the source's full group digest.
    /// `from_digest` groups were settled by that very comparison.
    fn group_done(&mut self, g: u64, from_digest: bool) -> Result<bool, EngineError> {
        let (a, b) = self.layout.group_range(g);
        let want = self.groups[g as usize].expect("announced");
        let matches = from_digest || group_digest(self.algo, &self.have[a as usize..b as usize]) == want;
        if !self.strict && (self.tainted[g as usize] || !matches) {
            self.tainted[g as usize] = false;
            self.keys.remove(&g);
            self.stale.push(g);
            self.open_groups -= 1;
            self.progress.inc(self.group_bytes(g));
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
            self.pending_in_group[g as usize] = redo.len() as u32;
            self.request_runs(&redo)?;
            return Ok(false);
        }
        self.pending_in_group[g as usize] = 0;
        self.keys.remove(&g);
        self.verified[g as usize] = true;
        self.open_groups -= 1;
        self.progress.inc(self.group_bytes(g));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let e = r.err().expect("a hostile layout is refused").to_string();
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

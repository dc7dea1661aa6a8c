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

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::thread;
use std::time::Instant;

use crossbeam_channel::bounded;
use rayon::prelude::*;

use crate::blockmap::{byte_range, group_digest, image_digest, BlockMap};
use crate::compress::Codec;
use crate::digest::{hex, key_of, Algorithm, Digest, Key, ZeroDigests};
use crate::image::Image;
use crate::layout::Layout;
use crate::protocol::{
    self, read_message, write_message, Message, ProtocolError, Role, MAX_RUN_BYTES,
};
use crate::transport::{Link, Writer};

use super::references::ReferenceSet;
use super::{EngineError, Progress, Report};

#[derive(Clone, Debug, Default)]
pub struct TargetOptions {
    /// Reference images or index files on this side.
    pub references: Vec<std::path::PathBuf>,
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
    /// DST held no data before: zero blocks need no writing.
    fresh: bool,
    dst_map: Option<BlockMap>,
    refs: ReferenceSet,
    zeros: ZeroDigests,
    /// Source digest of each group, as announced.
    groups: Vec<Option<Digest>>,
    image_digest: Option<Digest>,
    state: Vec<State>,
    written: Vec<Digest>,
    /// Keys of groups being settled block by block.
    keys: std::collections::HashMap<u64, Vec<Key>>,
    pending_in_group: Vec<u32>,
    verified: Vec<bool>,
    verified_count: u64,
    refetched: HashSet<u64>,
    groups_matched: u64,
    bytes_fetched: u64,
    bytes_payload: u64,
    out: Writer,
    progress: &'a Progress,
}

/// Rebuild the source's image into `dst` over `link`.
pub fn run(
    dst: &Path,
    opts: &TargetOptions,
    link: Link,
    progress: &Progress,
) -> Result<Report, EngineError> {
    let started = Instant::now();
    let Link {
        mut reader,
        mut writer,
        stats,
    } = link;
    protocol::handshake(&mut reader, &mut writer, Role::Target, 0)?;
    let result = (|| {
        let (algo, layout) = match read_message(&mut reader, "before describing the image")? {
            Message::ImageInfo { algo, layout } => (algo, layout),
            other => {
                return Err(ProtocolError::Unexpected {
                    got: other.kind(),
                    state: "waiting for ImageInfo",
                }
                .into())
            }
        };
        if !algo.collision_safe() {
            log::warn!("the source hashes with SHA-1, which is not collision-safe: do not use references holding other tenants' data");
        }
        // References first: a bad one stops the copy before DST is touched.
        let mut refs = ReferenceSet::load(&opts.references, algo, layout.block_size)?;
        let (dst_img, had_data) = Image::open_target(dst, layout.size)?;
        progress.phase("scanning", if had_data { layout.size } else { 0 });
        let dst_map = if had_data {
            Some(BlockMap::compute(
                &dst_img,
                layout.clone(),
                algo,
                |_, _| {},
                &|n| progress.inc(n),
            )?)
        } else {
            None
        };
        if let Some(m) = &dst_map {
            // Blocks that moved within DST count too; each is re-read and
            // checked, so one overwritten meanwhile is simply fetched.
            refs.add_image(dst.into(), Image::open_read(dst)?, m);
        }
        let n = layout.block_count() as usize;
        let g = layout.group_count() as usize;
        let mut t = Target {
            algo,
            zeros: ZeroDigests::new(algo, layout.block_size as usize),
            dst: dst_img,
            fresh: !had_data,
            dst_map,
            refs,
            groups: vec![None; g],
            image_digest: None,
            state: vec![State::Pending; n],
            written: vec![[0; 32]; n],
            keys: Default::default(),
            pending_in_group: (0..g as u64)
                .map(|i| {
                    let (a, b) = layout.group_range(i);
                    (b - a) as u32
                })
                .collect(),
            verified: vec![false; g],
            verified_count: 0,
            refetched: HashSet::new(),
            groups_matched: 0,
            bytes_fetched: 0,
            bytes_payload: 0,
            layout,
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

impl Target<'_> {
    fn receive(&mut self, reader: crate::transport::Reader) -> Result<Report, EngineError> {
        // A reader thread keeps the link drained while we hash and write, so
        // the source never stalls on a full pipe while we are busy.
        let (tx, rx) = bounded::<Result<Message, ProtocolError>>(64);
        let mut reader = reader;
        let reader_thread = thread::spawn(move || loop {
            let m = read_message(&mut reader, "before the copy was complete");
            let stop = matches!(m, Err(_) | Ok(Message::Bye));
            if tx.send(m).is_err() || stop {
                return;
            }
        });
        let result = self.main_loop(&rx);
        if let Err(e) = &result {
            let _ = write_message(
                &mut self.out,
                &Message::Error {
                    message: format!("target: {e}"),
                },
            );
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

    fn main_loop(
        &mut self,
        rx: &crossbeam_channel::Receiver<Result<Message, ProtocolError>>,
    ) -> Result<Report, EngineError> {
        loop {
            let m = rx
                .recv()
                .map_err(|_| ProtocolError::Eof("before the copy was complete"))??;
            match m {
                Message::Groups { first, digests } => self.on_groups(first, digests)?,
                Message::GroupsEnd { image_digest } => self.image_digest = Some(image_digest),
                Message::BlockDigests { group, keys } => self.on_block_digests(group, keys)?,
                Message::Blocks {
                    first_block,
                    count,
                    codec,
                    raw_len,
                    payload,
                } => self.on_blocks(first_block, count, codec, raw_len, payload)?,
                other => {
                    return Err(ProtocolError::Unexpected {
                        got: other.kind(),
                        state: "copying",
                    }
                    .into())
                }
            }
            if rx.is_empty() {
                self.out.flush().map_err(ProtocolError::Io)?;
            }
            if let Some(want) = self.image_digest {
                if self.verified_count == self.layout.group_count() {
                    return self.finish(want, rx);
                }
            }
        }
    }

    fn finish(
        &mut self,
        want: Digest,
        rx: &crossbeam_channel::Receiver<Result<Message, ProtocolError>>,
    ) -> Result<Report, EngineError> {
        let groups: Vec<Digest> = self
            .groups
            .iter()
            .map(|g| g.expect("every group verified"))
            .collect();
        let got = image_digest(self.algo, &self.layout, &groups);
        if got != want {
            return Err(EngineError::NotVerified {
                got: hex(&got),
                want: hex(&want),
            });
        }
        self.dst.sync()?;
        self.progress.finish();
        let count = |s: State| self.state.iter().filter(|&&x| x == s).count() as u64;
        let report = Report {
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
            verified: true,
            digest: hex(&want[..self.algo.width()]),
            ..Report::default()
        };
        let json = serde_json::to_string(&report).expect("report serialises");
        write_message(&mut self.out, &Message::Done { report: json })?;
        self.out.flush().map_err(ProtocolError::Io)?;
        match rx
            .recv()
            .map_err(|_| ProtocolError::Eof("before saying Bye"))??
        {
            Message::Bye => Ok(report),
            other => Err(ProtocolError::Unexpected {
                got: other.kind(),
                state: "waiting for Bye",
            }
            .into()),
        }
    }

    fn group_bytes(&self, g: u64) -> u64 {
        let (a, b) = self.layout.group_range(g);
        let (s, e) = byte_range(&self.layout, a, b);
        e - s
    }

    fn on_groups(&mut self, first: u64, digests: Vec<Digest>) -> Result<(), EngineError> {
        let end = first
            .checked_add(digests.len() as u64)
            .filter(|&e| e <= self.layout.group_count());
        if end.is_none() || digests.is_empty() {
            return Err(EngineError::BadReply(format!(
                "digests for groups {first}+{}, the image has {}",
                digests.len(),
                self.layout.group_count()
            )));
        }
        let mut want: Option<(u64, u32)> = None;
        for (i, d) in digests.into_iter().enumerate() {
            let g = first + i as u64;
            if self.groups[g as usize].is_some() {
                return Err(EngineError::BadReply(format!("group {g} twice")));
            }
            self.groups[g as usize] = Some(d);
            if self.settle_group_locally(g, &d)? {
                continue;
            }
            want = match want {
                Some((f, c)) if f + c as u64 == g => Some((f, c + 1)),
                Some((f, c)) => {
                    write_message(
                        &mut self.out,
                        &Message::WantDigests {
                            first_group: f,
                            count: c,
                        },
                    )?;
                    Some((g, 1))
                }
                None => Some((g, 1)),
            };
        }
        if let Some((f, c)) = want {
            write_message(
                &mut self.out,
                &Message::WantDigests {
                    first_group: f,
                    count: c,
                },
            )?;
        }
        Ok(())
    }

    /// Try to settle a whole group without per-block keys.
    fn settle_group_locally(&mut self, g: u64, want: &Digest) -> Result<bool, EngineError> {
        let (a, b) = self.layout.group_range(g);
        // 1. Already in place.
        if let Some(m) = &self.dst_map {
            if m.groups[g as usize] == *want {
                for i in a..b {
                    self.written[i as usize] = m.digests[i as usize];
                    self.state[i as usize] = if m.zero[i as usize] {
                        State::Zero
                    } else {
                        State::InPlace
                    };
                }
                self.groups_matched += 1;
                return self.group_done(g, true);
            }
        }
        // 2. All zeros.
        let zero: Vec<Digest> = (a..b)
            .map(|i| self.zeros.get(self.layout.extent(i).1))
            .collect();
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
                let mut blocks = Vec::with_capacity((b - a) as usize);
                for (k, i) in (a..b).enumerate() {
                    match self
                        .refs
                        .read_block(e.image, ra + k as u64, self.layout.extent(i).1)
                    {
                        Some(data) => blocks.push(data),
                        None => return Ok(false),
                    }
                }
                let digests: Vec<Digest> = blocks.par_iter().map(|d| self.algo.digest(d)).collect();
                if group_digest(self.algo, &digests) == *want {
                    for (k, i) in (a..b).enumerate() {
                        if crate::digest::is_zero(&blocks[k]) {
                            self.set_zero(i)?;
                        } else {
                            self.dst.write_at(&blocks[k], self.layout.extent(i).0)?;
                            self.written[i as usize] = digests[k];
                            self.state[i as usize] = State::Reused;
                        }
                    }
                    self.groups_matched += 1;
                    return self.group_done(g, true);
                }
            }
        }
        Ok(false)
    }

    /// Make block `i` zero in DST (nothing to do in a fresh file).
    fn set_zero(&mut self, i: u64) -> Result<(), EngineError> {
        let (off, len) = self.layout.extent(i);
        let already = self.fresh
            || self
                .dst_map
                .as_ref()
                .is_some_and(|m| m.zero[i as usize] && self.state[i as usize] == State::Pending);
        if !already {
            self.dst.zero_range(off, len)?;
        }
        self.written[i as usize] = self.zeros.get(len);
        self.state[i as usize] = State::Zero;
        Ok(())
    }

    fn on_block_digests(&mut self, g: u64, keys: Vec<Key>) -> Result<(), EngineError> {
        if g >= self.layout.group_count()
            || self.groups[g as usize].is_none()
            || self.verified[g as usize]
            || self.keys.contains_key(&g)
        {
            return Err(EngineError::BadReply(format!(
                "block digests for group {g}, which was not asked for"
            )));
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
                continue;
            }
            if let Some(m) = &self.dst_map {
                if key_of(&m.digests[i as usize]) == *key {
                    self.written[i as usize] = m.digests[i as usize];
                    self.state[i as usize] = State::InPlace;
                    continue;
                }
            }
            if self.reuse_block(i, key)? {
                continue;
            }
            missing.push(i);
        }
        let settled = (b - a) as u32 - missing.len() as u32;
        self.pending_in_group[g as usize] -= settled;
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
        let (off, len) = self.layout.extent(i);
        let Some(data) = self.refs.read_block(e.image, e.pos, len) else {
            return Ok(false);
        };
        let d = self.algo.digest(&data);
        if key_of(&d) != *key {
            log::debug!("reference block changed since indexing; fetching block {i} instead");
            return Ok(false);
        }
        self.dst.write_at(&data, off)?;
        self.written[i as usize] = d;
        self.state[i as usize] = State::Reused;
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
                    write_message(
                        &mut self.out,
                        &Message::Fetch {
                            first_block: f,
                            count: c,
                        },
                    )?;
                    Some((i, 1))
                }
                None => Some((i, 1)),
            };
        }
        if let Some((f, c)) = run {
            write_message(
                &mut self.out,
                &Message::Fetch {
                    first_block: f,
                    count: c,
                },
            )?;
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
        let end = first
            .checked_add(count as u64)
            .filter(|&e| e <= self.layout.block_count() && count > 0);
        let Some(end) = end else {
            return Err(EngineError::BadReply(format!(
                "blocks {first}+{count}, the image has {}",
                self.layout.block_count()
            )));
        };
        if (first..end).any(|i| self.state[i as usize] != State::Pending) {
            return Err(EngineError::BadReply(format!(
                "blocks {first}+{count}, which were not asked for"
            )));
        }
        let (start, stop) = byte_range(&self.layout, first, end);
        if stop - start != raw_len as u64 {
            return Err(EngineError::BadReply(format!(
                "a run of {raw_len} bytes for blocks {first}+{count}, which hold {}",
                stop - start
            )));
        }
        let payload_len = payload.len() as u64;
        let raw = Codec::decompress(codec, payload, raw_len as usize).map_err(|source| {
            EngineError::Codec {
                block: first,
                source,
            }
        })?;
        let layout = &self.layout;
        let algo = self.algo;
        let digests: Vec<Digest> = (first..end)
            .into_par_iter()
            .map(|i| {
                let (off, len) = layout.extent(i);
                algo.digest(&raw[(off - start) as usize..(off - start) as usize + len])
            })
            .collect();
        for (k, i) in (first..end).enumerate() {
            let g = i / self.layout.group_blocks();
            let want = self
                .keys
                .get(&g)
                .map(|keys| keys[(i - g * self.layout.group_blocks()) as usize]);
            if want != Some(key_of(&digests[k])) {
                return Err(EngineError::BadBlock {
                    block: i,
                    offset: self.layout.extent(i).0,
                });
            }
        }
        self.dst.write_at(&raw, start)?;
        self.bytes_fetched += raw_len as u64;
        self.bytes_payload += payload_len;
        let mut touched = Vec::new();
        for (k, i) in (first..end).enumerate() {
            self.written[i as usize] = digests[k];
            self.state[i as usize] = State::Fetched;
            let g = i / self.layout.group_blocks();
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
        if !from_digest && group_digest(self.algo, &self.written[a as usize..b as usize]) != want {
            if !self.refetched.insert(g) {
                return Err(EngineError::GroupMismatch {
                    group: g,
                    first: a,
                    end: b,
                });
            }
            log::warn!("group {g} did not match its digest; fetching it whole");
            let redo: Vec<u64> = (a..b)
                .filter(|&i| self.state[i as usize] != State::Zero)
                .collect();
            for &i in &redo {
                self.state[i as usize] = State::Pending;
            }
            self.pending_in_group[g as usize] = redo.len() as u32;
            if redo.is_empty() {
                return Err(EngineError::GroupMismatch {
                    group: g,
                    first: a,
                    end: b,
                });
            }
            self.request_runs(&redo)?;
            return Ok(false);
        }
        self.pending_in_group[g as usize] = 0;
        self.keys.remove(&g);
        self.verified[g as usize] = true;
        self.verified_count += 1;
        self.progress.inc(self.group_bytes(g));
        Ok(true)
    }
}

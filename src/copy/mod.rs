//! The two ends of a copy and what they report.
//!
//! [`source::SourceSession`] reads the image and answers requests, driven
//! pass by pass by its caller ([`source::run`] for `copy`, the migrate
//! orchestrator for a domain's disks); [`target::run`] rebuilds the image
//! from zero blocks, its own earlier content, reference images and fetched
//! runs, verifying everything. [`run`] joins two local ends with a socket
//! pair so that a local copy speaks exactly the protocol a remote one does,
//! except where nothing on the target side can be reused: then [`direct`]
//! reads, hashes and writes each block once, through the target's code.
//! [`quiesce`] freezes and thaws a live source; [`tracker`] finds what
//! changed between passes; [`readback`] checks that the target's device
//! holds what was written.

pub mod direct;
mod early_hash;
pub mod interrupt;
mod kept;
pub mod progress;
pub mod quiesce;
pub mod readback;
pub mod references;
pub mod refglob;
pub mod run;
pub mod shared_ref;
mod similar;
pub mod source;
pub mod target;
pub mod tracker;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::formats::framing::FormatError;
use crate::storage::image::ImageError;
use crate::wire::compress::CodecError;
use crate::wire::protocol::ProtocolError;
use crate::wire::stream::StreamError;
use crate::wire::transport::TransportError;

pub use progress::Progress;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("fetched run at block {block}: {source}")]
    Codec { block: u64, source: CodecError },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("block {block} (offset {offset}) from the source does not match its digest: the source changed during the copy, or the link corrupted data")]
    BadBlock { block: u64, offset: u64 },
    #[error("blocks {first}..{end} (offset {offset}), sent without their keys, do not match their run's key: the source changed during the copy, or the link corrupted data")]
    BadRun { first: u64, end: u64, offset: u64 },
    #[error("group {group} (blocks {first}..{end}) still differs from the source's digest after refetching it")]
    GroupMismatch { group: u64, first: u64, end: u64 },
    #[error("the peer's request is out of range: {0}")]
    BadRequest(String),
    #[error("the peer sent {0}")]
    BadReply(String),
    #[error("reference {path}: {what}")]
    Reference { path: PathBuf, what: String },
    #[error("block {block} (offset {offset}), decoded with the shared reference {path} as the stream's dictionary, does not match its digest: the source's copy of that reference differs from this host's (or the link corrupted data); nothing is verified: copy again without --source-reference")]
    SharedRefMismatch { block: u64, offset: u64, path: PathBuf },
    #[error("{path}: blocks {first}..{end} (bytes {start}..{stop}) read back from the device differ from what was written and verified there ({differing} of the {read} blocks read back differ): the device, or another writer, changed them; nothing is verified")]
    ReadBack { path: PathBuf, first: u64, end: u64, start: u64, stop: u64, differing: u64, read: u64 },
    #[error("the copy finished but its digest {got} does not match the source's {want}")]
    NotVerified { got: String, want: String },
    #[error("interrupted by {}", interrupt::signal_name(*signal))]
    Interrupted { signal: i32 },
    #[error("cannot catch {signal}: {source}")]
    Signals { signal: &'static str, source: std::io::Error },
    #[error("the {what} command '{command}' did not finish within {seconds} s; it was killed")]
    HookTimeout { what: &'static str, command: String, seconds: u64 },
    #[error("the final (frozen) pass did not end within {seconds} s (--final-timeout): the target stopped making progress; nothing is verified")]
    FinalTimeout { seconds: f64 },
    #[error("SRC {path} changed during the copy ({before} before, {after} after); the copy is not verified: copy it again while nothing writes to it, or with --live")]
    SourceChanged { path: PathBuf, before: String, after: String },
    #[error("SRC {src} and DST {dst} are the same {what}; refusing to copy it onto itself")]
    SameFile { src: PathBuf, dst: PathBuf, what: &'static str },
    #[error("target {path} is logical volume {lv}, which is open (a running guest's disk, or in use by another process); refusing to write to it")]
    TargetOpen { path: PathBuf, lv: String },
    #[error("the source claims a {size}-byte image, more than the {max}-byte limit for {path} (--max-image-size); nothing was written")]
    ImageTooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("the source claims a {size}-byte image, but the file system holding {path} has only {free} bytes free (No space left on device); nothing was written")]
    NoRoom { path: PathBuf, size: u64, free: u64 },
    #[error("the source claims a {size}-byte image of {blocks} blocks, whose state would take {need} bytes of memory, more than the {available} available; use a larger --block-size")]
    TooManyBlocks { size: u64, blocks: u64, need: u64, available: u64 },
    #[error("cannot cut the image into blocks: {0}")]
    BadLayout(String),
    #[error("the target's xenmig cannot take a live copy; upgrade it")]
    NoLiveSupport,
    #[error("{0}")]
    LinkClosed(&'static str),
    #[error("the copy was used out of order: {0}")]
    StepOrder(String),
    #[error("the {what} command '{command}' {detail}")]
    Hook { what: &'static str, command: String, detail: String },
    #[error("cannot tell the free space for {path}: {source}")]
    FreeSpace { path: PathBuf, source: std::io::Error },
    #[error("change tracking: {0}")]
    Tracking(String),
    #[error("both SRC and DST are remote; run xenmig on one of the two hosts")]
    BothRemote,
    #[error("stopped: {0}")]
    Aborted(String),
}

pub use crate::wire::transport::sanitize;

/// Version of the [`Report`] layout: raised when a field changes meaning.
/// Reports travel between the two ends in `Done`; every field has a
/// default and unknown fields are ignored, so a report from a peer one
/// release apart parses (a missing field reads as 0, false or empty).
pub const REPORT_VERSION: u32 = 2;

fn report_version() -> u32 {
    REPORT_VERSION
}

/// The outcome of a copy, as `--json` prints it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Report {
    /// [`REPORT_VERSION`] of the end that wrote it (1: before the field).
    #[serde(default = "report_version_1")]
    pub report_version: u32,
    pub source: String,
    pub target: String,
    pub image_size: u64,
    pub block_size: u32,
    pub algorithm: String,
    pub blocks_total: u64,
    /// All-zero blocks: never sent, left as holes in a fresh file.
    pub blocks_zero: u64,
    /// Non-zero blocks found on the target side (its own earlier content or
    /// a reference), each verified.
    pub blocks_reused: u64,
    /// Non-zero blocks fetched from the source, each verified.
    pub blocks_fetched: u64,
    /// Of the fetched blocks, those sent as the sub-blocks that differ from
    /// the target's old version of them (`wire::subdelta`), each verified.
    pub blocks_delta: u64,
    /// Of the delta blocks, those rebuilt on a similar block elsewhere in
    /// the target (found by resemblance sketch, `wire::sketch`).
    pub blocks_similar: u64,
    /// Deltas that did not rebuild their block (then fetched whole).
    pub deltas_failed: u64,
    /// Of the zero and reused blocks, those kept as the target held them
    /// without their key travelling: their sub-group matched the target's,
    /// or (block hints) their hint matched the target's block
    /// (`wire::subgroup`), the whole group checked against its digest.
    /// Summed over the passes of a live copy.
    pub blocks_keyless: u64,
    /// Groups that kept blocks keyless (or fetched some unkeyed) but failed
    /// their group digest, then asked for again with every key.
    pub groups_rekeyed: u64,
    /// Of the fetched blocks, those asked for without their key travelling:
    /// a new DST's host held no block with it (`wire::held`); each run of
    /// them checked against one run key, the whole group against its
    /// digest. Summed over passes.
    pub blocks_unkeyed: u64,
    /// Of the reused blocks, those already in place in the target.
    pub blocks_in_place: u64,
    /// Groups settled by their group digest alone (no per-block keys sent).
    pub groups_matched: u64,
    pub groups_total: u64,
    /// Groups fetched whole again because their blocks did not add up.
    pub groups_refetched: u64,
    /// Raw bytes fetched (blocks, and delta bodies), and what they cost on
    /// the wire.
    pub bytes_fetched: u64,
    pub bytes_payload_wire: u64,
    /// Fetched runs by the codec they travelled with (what `auto` chose):
    /// codec name -> raw bytes.
    pub codecs: std::collections::BTreeMap<String, u64>,
    /// Every byte that crossed between the two ends, both directions,
    /// framing included.
    pub bytes_wire: u64,
    pub seconds: f64,
    /// True only when every group, and so the whole target as written,
    /// matched the source's digests (and, with `read_back`, what was
    /// written was read back from the device as written).
    pub verified: bool,
    /// The target read back from its device every block this copy wrote
    /// (false: `--no-readback`, or a target before the read-back).
    pub read_back: bool,
    /// The source's whole-image digest (hex).
    pub digest: String,
    /// Passes of the copy: one for a plain copy; for a live copy, the live
    /// passes and the final, frozen one.
    pub passes: Vec<PassReport>,
    /// Live copy: time the source was frozen (freeze to thaw), in seconds.
    pub downtime_seconds: f64,
    /// A direct local copy (`direct`): each block read once, hashed once
    /// and written in one process, no wire (bytes_wire 0).
    pub direct: bool,
    /// The target's reference that both ends used as the zstd stream's
    /// dictionary (`--source-reference`; absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_reference: Option<String>,
    /// Stream content (bytes) that went before the shared reference's
    /// frame began: 0 from the start; more where the source took a large
    /// reference once the stream had carried that much (`CAP_LATE_REF`).
    #[serde(skip_serializing_if = "is_zero")]
    pub shared_reference_after: u64,
    /// The zstd levels the source's stream compressed at, in order (`auto`
    /// raises the level where the link is slow; absent: no stream, or the
    /// source was the remote end).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stream_levels: Vec<i32>,
    /// Frames of the zstd stream the target decoded: one per level the
    /// source used (0: no stream).
    #[serde(skip_serializing_if = "is_zero")]
    pub stream_frames: u64,
    /// Receipts of what it read that the target sent and the source took
    /// (`CAP_RECEIPTS`, with `auto`; absent: none, or the source was the
    /// remote end).
    #[serde(skip_serializing_if = "is_zero")]
    pub receipts: u64,
    /// `--bwlimit`: bytes per second the source end could write (absent:
    /// no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn report_version_1() -> u32 {
    1
}

impl Default for Report {
    fn default() -> Self {
        Report {
            report_version: report_version(),
            source: String::new(),
            target: String::new(),
            image_size: 0,
            block_size: 0,
            algorithm: String::new(),
            blocks_total: 0,
            bwlimit: None,
            shared_reference: None,
            shared_reference_after: 0,
            stream_levels: Vec::new(),
            stream_frames: 0,
            receipts: 0,
            blocks_zero: 0,
            blocks_reused: 0,
            blocks_fetched: 0,
            blocks_delta: 0,
            blocks_similar: 0,
            deltas_failed: 0,
            blocks_keyless: 0,
            groups_rekeyed: 0,
            blocks_unkeyed: 0,
            blocks_in_place: 0,
            groups_matched: 0,
            groups_total: 0,
            groups_refetched: 0,
            bytes_fetched: 0,
            bytes_payload_wire: 0,
            codecs: Default::default(),
            bytes_wire: 0,
            seconds: 0.0,
            verified: false,
            read_back: false,
            digest: String::new(),
            passes: Vec::new(),
            downtime_seconds: 0.0,
            direct: false,
        }
    }
}

/// One pass of a copy, as the target saw it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PassReport {
    pub pass: u32,
    pub final_pass: bool,
    /// Blocks the source found changed since the previous pass.
    pub changed_blocks: u64,
    /// Groups announced in this pass.
    pub groups: u64,
    pub blocks_fetched: u64,
    pub blocks_reused: u64,
    /// Groups that changed under the pass and go again in the next one.
    pub groups_stale: u64,
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_one_release_apart_parses() {
        // An older peer's report: no report_version, no blocks_in_place, no
        // passes; a newer one's field this release does not know.
        let json = r#"{"source":"a","target":"b","image_size":8192,"block_size":4096,"algorithm":"blake3",
            "blocks_total":2,"blocks_zero":1,"blocks_reused":0,"blocks_fetched":1,"groups_matched":0,
            "groups_total":1,"groups_refetched":0,"bytes_fetched":4096,"bytes_payload_wire":100,"codecs":{},
            "bytes_wire":500,"seconds":0.5,"verified":true,"digest":"ab","downtime_seconds":0.0,
            "some_future_field":{"x":[1,2]}}"#;
        let r: Report = serde_json::from_str(json).unwrap();
        assert_eq!(r.report_version, 1);
        assert_eq!(r.blocks_in_place, 0);
        assert!(r.passes.is_empty());
        assert!(r.verified);
        assert_eq!(r.blocks_fetched, 1);
        let p: PassReport = serde_json::from_str(r#"{"pass":2,"unknown":1}"#).unwrap();
        assert_eq!(p.pass, 2);
        assert!(!p.final_pass);
        // What this release writes carries its version and reads back.
        let mine = Report { verified: true, ..Report::default() };
        let back: Report = serde_json::from_str(&serde_json::to_string(&mine).unwrap()).unwrap();
        assert_eq!(back.report_version, REPORT_VERSION);
        assert_eq!(back, mine);
    }
}

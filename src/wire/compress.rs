//! Compression of fetched blocks, and `auto`, which picks a codec from the
//! measured link rate and CPU cost.
//!
//! Why `auto`: the seed found that on a 100 Mbps LAN compression costs more
//! CPU time than it saves, while at 2 Mbps zlib wins. The right codec moves
//! with the link, so the sender measures both sides of the trade while it
//! works: how fast the link drains (the rate of the writes that blocked:
//! `wire::transport`) and, per candidate codec, compressed ratio and CPU
//! seconds per byte on a megabyte of recent data. Compression and sending
//! overlap, so a codec's cost per input byte is the larger of its CPU time
//! and its output's link time.
//!
//! That model holds where the link is the bottleneck. Where it drains fast,
//! the receiver's CPU (or, with both ends on one host, CPU they share) may
//! be, which the sender cannot see: there `auto` times the candidates on
//! the data itself, a segment each, and keeps the fastest
//! ([`AutoPolicy::choose`]). A copy starts on the smallest output until
//! the link is known: a slow link's first megabytes cost the most.

use std::collections::VecDeque;
use std::str::FromStr;
use std::time::Instant;

pub use super::flow::Spell;

use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    None,
    Lz4,
    Zstd(i32),
    Zlib(u32),
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Auto,
    Fixed(Codec),
}

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("unknown codec code {0} on the wire")]
    Unknown(u8),
    #[error("{codec} payload does not decompress: {detail}")]
    Corrupt { codec: &'static str, detail: String },
    #[error("{codec} payload decompressed to {got} bytes, expected {want}")]
    Length { codec: &'static str, got: usize, want: usize },
}

impl Codec {
    pub fn code(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd(_) => 2,
            Codec::Zlib(_) => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd(_) => "zstd",
            Codec::Zlib(_) => "zlib",
        }
    }

    pub fn compress(self, data: &[u8]) -> Vec<u8> {
        match self {
            Codec::None => data.to_vec(), // callers send raw data as is; see source::fetch
            Codec::Lz4 => lz4_flex::block::compress(data),
            Codec::Zstd(level) => zstd::bulk::compress(data, level).expect("zstd compression of an in-memory buffer"),
            Codec::Zlib(level) => {
                use std::io::Write;
                let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(level));
                e.write_all(data).expect("in-memory write");
                e.finish().expect("in-memory write")
            }
        }
    }

    /// The name of a wire codec code (for reports).
    pub fn name_of(code: u8) -> &'static str {
        match code {
            0 => "none",
            1 => "lz4",
            2 => "zstd",
            3 => "zlib",
            c if super::stream::is_stream_code(c) => "zstd-stream",
            _ => "unknown",
        }
    }

    /// Decompress a payload that must expand to exactly `raw_len` bytes.
    /// Takes the payload by value so that raw data is never copied.
    pub fn decompress(code: u8, payload: Vec<u8>, raw_len: usize) -> Result<Vec<u8>, CodecError> {
        let data = &payload[..];
        let (name, out) = match code {
            0 => ("none", Ok(payload)),
            1 => ("lz4", lz4_flex::block::decompress(data, raw_len).map_err(|e| e.to_string())),
            2 => ("zstd", zstd::bulk::decompress(data, raw_len).map_err(|e| e.to_string())),
            3 => {
                use std::io::Read;
                let mut out = Vec::with_capacity(raw_len);
                // Read one byte past raw_len so an over-long stream is caught.
                let r = flate2::read::ZlibDecoder::new(data)
                    .take(raw_len as u64 + 1)
                    .read_to_end(&mut out)
                    .map(|_| out)
                    .map_err(|e| e.to_string());
                ("zlib", r)
            }
            c => return Err(CodecError::Unknown(c)),
        };
        let out = out.map_err(|detail| CodecError::Corrupt { codec: name, detail })?;
        if out.len() != raw_len {
            return Err(CodecError::Length { codec: name, got: out.len(), want: raw_len });
        }
        Ok(out)
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::Zstd(l) => write!(f, "zstd:{l}"),
            Codec::Zlib(l) => write!(f, "zlib:{l}"),
            c => f.write_str(c.name()),
        }
    }
}

/// What `--compress` calls it (read back by `FromStr`).
impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Choice::Auto => f.write_str("auto"),
            Choice::Fixed(c) => c.fmt(f),
        }
    }
}

impl FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, level) = match s.split_once(':') {
            Some((n, l)) => (n, Some(l.parse::<i32>().map_err(|_| format!("bad compression level '{l}'"))?)),
            None => (s, None),
        };
        let codec = match (name, level) {
            ("auto", None) => return Ok(Choice::Auto),
            ("none", None) => Codec::None,
            ("lz4", None) => Codec::Lz4,
            ("zstd", l) => {
                let l = l.unwrap_or(3);
                if !(1..=19).contains(&l) {
                    return Err(format!("zstd level {l} is outside 1..=19"));
                }
                Codec::Zstd(l)
            }
            ("zlib", l) => {
                let l = l.unwrap_or(6);
                if !(1..=9).contains(&l) {
                    return Err(format!("zlib level {l} is outside 1..=9"));
                }
                Codec::Zlib(l as u32)
            }
            _ => {
                return Err(format!(
                    "unknown compression '{s}' (expected auto, none, lz4, zstd[:LEVEL] or zlib[:LEVEL])"
                ))
            }
        };
        Ok(Choice::Fixed(codec))
    }
}

/// How one fetched run travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Compressed on its own (or raw), in any order.
    Run(Codec),
    /// As the next piece of the copy's zstd stream (`wire::stream`), at the
    /// stream's level.
    Stream,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Run(c) => c.fmt(f),
            Route::Stream => f.write_str("zstd-stream"),
        }
    }
}

/// Candidates `auto` chooses among, cheapest CPU first.
const CANDIDATES: [Route; 4] =
    [Route::Run(Codec::None), Route::Run(Codec::Lz4), Route::Run(Codec::Zstd(1)), Route::Run(Codec::Zstd(6))];
/// The candidates when the copy has a stream: it takes the place of the
/// slower per-run zstd (at level 3 with its history it sends fewer bytes
/// than zstd 6 run by run: docs/experiments.md), the fast one stays for
/// links where one thread's zstd would not keep up. The stream is listed
/// before it, so it wins near ties.
const STREAM_CANDIDATES: [Route; 4] =
    [Route::Run(Codec::None), Route::Run(Codec::Lz4), Route::Stream, Route::Run(Codec::Zstd(1))];
/// The stream's output against per-run zstd at the same level, as measured
/// on the experiments' images (14-17% smaller: docs/experiments.md, "One
/// zstd stream per copy"). A sample is one megabyte on its own, without the
/// stream's history, so its ratio is scaled by this. Unscaled, a sample of
/// mostly incompressible data (where zstd and lz4 tie) sent the text after
/// it through lz4 on a slow link.
const STREAM_HISTORY: f64 = 0.85;
/// Re-measure the candidates after this many input bytes; more often
/// where the link decides ([`PROBE_RATE`]), as a sample of mostly
/// incompressible data (where zstd and lz4 tie) must not pick the codec
/// for long stretches of text after it, and CPU is cheap on a slow link.
const RESAMPLE_BYTES: u64 = 64 << 20;
const RESAMPLE_BYTES_SLOW_LINK: u64 = 16 << 20;
/// Where the link is known fast, CPU is what the copy waits for, and a
/// measurement (all candidates on a megabyte, the stream's zstd among
/// them: about 12 ms of a core, under the policy's lock) is paid by the
/// copy itself. At 64 MiB, `auto` used 0.15 CPU seconds more than lz4
/// alone on the unshaped cold copy (the host's busy time, 3 pairs), and
/// in a profile the samples' zstd was most of what it spent besides lz4
/// (session 22).
/// On a fast link the samples only say which routes are worth timing,
/// and an image too small to time routes on ([`TIMING_MIN_IMAGE`]) takes
/// no sample there at all: its route is [`FAST_LINK_ROUTE`]. (Should the
/// link turn slow, the next payload is sampled: the interval has passed.)
const RESAMPLE_BYTES_FAST_LINK: u64 = 256 << 20;
/// The stream's levels are measured on the last [`SAMPLE_BYTES`] routed
/// (what the stream is about to compress: the receipts' gate holds it
/// about a second behind the routing), when the link first reads slow and
/// again after every this many bytes routed, while the level may still
/// rise. The data changes along a copy: on the return copy the first
/// megabytes of changed blocks lose 11-16% of their bytes at level 19
/// against level 3, the last four 44-46% (docs/experiments.md,
/// "Receipts"), and levels measured on the first megabyte alone chose 15
/// where 19 sent a fifth less. A measurement costs up to about a third of
/// a second of one core (level 19), on a thread of its own; a megabyte of
/// input is about a second of a link slow enough for the levels (at the
/// return copy's ratios). Every 2 MiB, one return copy in three at
/// 2 Mbit/s never measured again after rising to 15, and stayed there.
const RESAMPLE_BYTES_LEVELS: u64 = 1 << 20;
/// A measurement runs on this much of the data being sent (consecutive
/// payloads): one run alone can be a single block, on which zstd's set-up
/// dominates its CPU time and no codec finds what it would on more.
const SAMPLE_BYTES: usize = 1 << 20;
/// The levels' first measurement runs on the last this many bytes routed,
/// as soon as the link reads slow and this much was routed. Where it
/// waited for [`SAMPLE_BYTES`], and took as long again to measure level
/// 19 on them, the return copy at 2 Mbit/s decided its first rise 1.7 s
/// after its first blocked write: by then the stream had sent 3.5 MB of
/// content, half its bytes, at level 3 (session 28). A quarter of that
/// measures level 19 in about a tenth of a second; the measurements after
/// it (every [`RESAMPLE_BYTES_LEVELS`]) take the whole [`SAMPLE_BYTES`].
const FIRST_LEVELS_BYTES: usize = 256 << 10;
/// Bytes written without one blocked write after which the link counts as
/// faster than anything we send. Below it, ssh's and the kernel's buffers
/// (a few MB) may still be taking what a slow link cannot carry yet.
const NO_BLOCK_EVIDENCE: u64 = 8 << 20;
/// `auto` decides once per segment of this many input bytes, and times
/// the second half of each: payloads routed before a decision are still
/// queued ahead of the first half (several megabytes), which would time
/// the previous route instead.
const SEGMENT_BYTES: u64 = 16 << 20;
/// Segments where candidates are timed on a fast link ([`PROBE_RATE`]):
/// at a few hundred MB/s a 16 MiB segment's timed half lasts some 40 ms,
/// and one scheduling hiccup on a shared host moved such timings by half
/// (`-vv` logs of the unshaped cells, docs/experiments.md).
const TIMED_SEGMENT_BYTES: u64 = 64 << 20;
/// Timing the candidates on a fast link costs a segment each on routes
/// that are mostly slower; it pays only on a copy long enough that the
/// trials are a small part of it (3 trials of [`TIMED_SEGMENT_BYTES`]
/// are under 5% of this). Smaller images take [`FAST_LINK_ROUTE`] there.
const TIMING_MIN_IMAGE: u64 = 4 << 30;
/// The route on a fast link when the copy is too short to time the
/// candidates: the link is not what limits the copy there, the CPUs are
/// (often shared with the receiver, or ssh's), and lz4 halves the bytes
/// for a few percent of a core, where zstd costs several times that
/// (docs/experiments.md, "Direction 5, unshaped").
const FAST_LINK_ROUTE: Route = Route::Run(Codec::Lz4);
/// Above this drain rate the link is not clearly the bottleneck: blocked
/// writes may be waiting for the receiver's CPU (or, with both ends on one
/// host, for CPU we share), which the link model cannot see. There `auto`
/// times each candidate on a segment and keeps the fastest. Below it the
/// link decides, and trying a lighter codec would only cost bytes.
pub const PROBE_RATE: f64 = 30e6;
/// A link seen fast counts as slow again only once it drained this end's
/// writes (or, with receipts, reached the target) slowly (below half of
/// [`PROBE_RATE`]) for this long in one spell (`wire::flow`): a reading
/// alone, or beside a spell that ran faster (11.5 MB/s beside 0.25 s at
/// 35.9 MB/s, unshaped), is a dip. With both ends and both ssh processes
/// on one 2-core host, ssh left without a core for a tenth of a second
/// reads like a 15 MB/s link: on the unshaped clone, four receipts in
/// 90 ms read 10-35 MB/s between readings of 120-400 MB/s, and the stream
/// they chose made the copy 1.66 s against 1.22 s. A link that is slow
/// forms such a spell within this time: the 100 and 20 Mbit/s cells
/// measured no slower (docs/experiments.md, session 21).
const SLOW_AGAIN_SPELL_SECS: f64 = 0.25;
/// A candidate's timing is trusted for this many segments, then re-taken.
const TIMING_SEGMENTS: u64 = 12;
/// Timings within this fraction of the fastest count as a tie.
const TIMED_TIE: f64 = 0.10;
/// The levels the stream may move between on a slow link
/// (`CAP_STREAM_LEVELS`), lowest first: the first is the level it starts
/// at. Measured on the quick images (docs/experiments.md, "The stream's
/// level"): each step sends fewer bytes for more CPU, 19 about 18% fewer
/// than 3 on the release cell for 90x its CPU.
const STREAM_LEVELS: [i32; 6] = [super::stream::AUTO_LEVEL, 6, 9, 12, 15, 19];
/// The highest of [`STREAM_LEVELS`].
const MAX_LEVEL: i32 = STREAM_LEVELS[STREAM_LEVELS.len() - 1];
/// A level above the first counts its CPU time this many times over. Its
/// sample is a megabyte compressed on its own; the stream compresses with a
/// 128 MiB window and long-distance matching, and re-indexes 16 MiB at each
/// change. Measured side by side on the return cell at 2 Mbit/s without
/// this margin (on cores shared with another measurement), level 19 sent
/// 24% fewer bytes and took 9% longer (docs/experiments.md): the stream's
/// thread, not the link, was the bottleneck. The margin (a judgement, not
/// fitted) keeps a level only where its CPU leaves the link the bottleneck
/// with room to spare; on a quiet machine that cell still takes 19 with it,
/// 7% faster than level 3.
const LEVEL_CPU_MARGIN: f64 = 1.5;
/// A new level must promise at least this much less time per byte than the
/// current one: each change ends the stream's frame and re-indexes its
/// last 16 MiB at the new level (`wire::stream`), so two levels that the
/// samples barely tell apart must not alternate.
const LEVEL_GAIN: f64 = 0.95;
/// The stream's level rises only below this drain rate (8 Mbit/s). Above
/// it, over real ssh on a tc-shaped link at 20 Mbit/s, the level moved
/// between 3 and 19 ten times in a copy: each move re-indexes 16 MiB at
/// the new level (seconds at 15-19), the stream's thread stalled, writes
/// stopped blocking, and the copy took 1.38x level 3's time
/// (docs/experiments.md, "Direction 5, continued"). Below it, level 19's
/// CPU (about 2 MB/s of input, 0.45 MB/s of output) still leaves the link
/// the bottleneck, and re-indexing hides behind it.
const LEVELS_BELOW: f64 = 1e6;
/// The level rises only once the link drained this end's writes steadily
/// below [`LEVELS_BELOW`] for this long, in one spell (`wire::flow`): one
/// slow reading was often a receiver busy at the start, over fast links
/// too (docs/experiments.md, "The merge, measured"), and a receiver that
/// makes writes wait steadily for seconds is as slow as a slow link.
const RAISE_SPELL_SECS: f64 = 2.0;
/// ... and carried at least this much in that spell: the link moved data,
/// at its own pace.
const RAISE_SPELL_BYTES: u64 = 256 << 10;
/// With receipts (`wire::receipts`) a spell is the link's own pace behind
/// every buffer, seen within a receipt's time, and the stream is held
/// about a second ahead of it: half a second and 64 KiB of it decide.
/// (A busy receiver still breaks a spell: it acknowledges late, then all
/// at once, as `wire::flow`'s rules tell.) Two seconds here would leave a
/// return migration at 2 Mbit/s, 6 s in all, a third of its stream at the
/// first level.
const RECEIPT_SPELL_SECS: f64 = 0.5;
const RECEIPT_SPELL_BYTES: u64 = 64 << 10;
/// A drain rate below [`LEVELS_BELOW`] with a spell running at this rate
/// or faster is no reason to measure the levels: the reading came from a
/// few writes that waited for something else than the link. At the start
/// of an unshaped copy the target loads its references and the source
/// hashes its image on the same two cores; writes of a few hundred bytes
/// then took milliseconds, the rate read 0.3-0.8 MB/s beside a spell at
/// 19 MB/s, and the stream held its pieces half a second for a rise that
/// never came (docs/experiments.md, session 21). A rise needs a spell
/// below [`LEVELS_BELOW`] anyway; at 2 Mbit/s a spell, which begins with
/// a blocked piece, reads the link's rate.
const SPELL_NOT_SLOW: f64 = 4.0 * LEVELS_BELOW;
/// Between [`LEVELS_BELOW`] and this rate (40 Mbit/s) a link is
/// *moderately* slow: the stream's level may rise there once, to at most
/// [`MODERATE_LEVEL_MAX`], when its receipts showed the link behind for a
/// spell of [`RECEIPT_SPELL_SECS`] and [`MODERATE_SPELL_BYTES`] read in
/// that range too, and the levels, measured once on the last megabyte
/// routed, leave the CPU room at the link's rate.
///
/// Why 40 Mbit/s (docs/experiments.md, session 29): fixed levels from the
/// start sent 1-5% fewer bytes at 100 Mbit/s (6 or 7 against 3) and 3-7%
/// fewer at 20 Mbit/s (7-12), but a change of level mid-stream keeps only
/// the last 16 MiB as the new frame's history (`wire::stream`). With this
/// rule up to 120 Mbit/s the template clone at 100 Mbit/s rose to 6 and
/// sent 3% more bytes in 9% more time (3 rounds), while the clone at
/// 20 Mbit/s rose to 9 and took 3.4% less time for 3.5% fewer bytes.
/// Rising there only while the whole stream still fits in those 16 MiB
/// never happens: by the time the spell confirms 100 Mbit/s, the stream
/// has compressed 37-42 MB (session 30).
const MODERATE_BELOW: f64 = 5e6;
/// The highest level a moderately slow link may take.
const MODERATE_LEVEL_MAX: i32 = 9;
/// Bytes the receipts' spell carried at least before a moderately slow
/// link's level rises.
const MODERATE_SPELL_BYTES: u64 = 1 << 20;
/// Raw bytes a piece of the stream carries at most until the link is
/// known to be fast ([`piece_limit`]).
pub const SLOW_PIECE: usize = 128 << 10;

/// The most raw bytes one piece of the stream should carry on a link whose
/// receipts (`wire::receipts`) read `drain_rate` and `spell`:
/// [`SLOW_PIECE`] until it is known to drain at [`LEVELS_BELOW`] or
/// faster (or a spell runs at [`SPELL_NOT_SLOW`]), else no limit.
///
/// Why: a raised level applies from the next piece, and the receipts'
/// gate holds the stream between pieces, not within one. On the quick
/// images' return migration at 2 Mbit/s one run of 684 whole blocks
/// (2.8 MB) was one piece: compressed at level 3 the moment the gate
/// opened, 617 KB, two and a half seconds of the link, while the level
/// rose to 15 and 19 a tenth of a second later. Half the stream's bytes
/// went at level 3 (docs/experiments.md, session 27). The same run, taken
/// in another copy a tenth of a second before the link's rate was known,
/// went whole: so the limit holds while the link is unknown too. (The
/// receipts' view, not the writes': writes into ssh's buffers read a fast
/// spell at the start of a slow copy, and a third run went whole so.) At
/// 128 KiB a piece at level 3 is about a tenth of a second of a 2 Mbit/s
/// link; on a link known to be fast pieces stay whole, as the levels do
/// not move there.
pub fn piece_limit(drain_rate: Option<f64>, spell: Option<Spell>) -> Option<usize> {
    let fast = drain_rate.is_some_and(|r| r >= LEVELS_BELOW) || spell.is_some_and(|s| s.rate() >= SPELL_NOT_SLOW);
    (!fast).then_some(SLOW_PIECE)
}
/// At a raised level, the share of wall time the writer spends in writes
/// is checked over windows of this length...
const DROP_WINDOW_SECS: f64 = 2.0;
/// ... and the level drops back to the first, for good, when it is below
/// this: the link no longer waits for this end's writes, the stream's
/// compressor (or the receiver) does. On a slow link that the raised level
/// keeps busy the writer is in writes nearly all the time.
const DROP_BUSY: f64 = 0.5;
/// ... and where the stream's compressing time is counted, only when the
/// stream's thread spent at least this share of the window compressing:
/// a link idle while the compressor is idle too waits for the runs (the
/// target's signatures, its requests), and the first level would only
/// send more bytes when they come. A return copy at 2 Mbit/s whose
/// stream compressed for 2.6 s of 3.5 s dropped level 19 for good with
/// the link busy 39% of a window, and sent 9% more than its siblings
/// (session 28).
const DROP_COMPRESSING: f64 = 0.5;

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    ratio: f64,
    cpu_per_byte: f64,
}

/// What `auto` knows of the link when it chooses.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkView {
    /// Bytes per second the link drained while writes blocked (None until
    /// enough writes blocked to tell).
    pub drain_rate: Option<f64>,
    /// Bytes written so far.
    pub written: u64,
    /// The spell of steadily blocked writes running now (`wire::flow`).
    pub spell: Option<Spell>,
    /// Seconds the writer has spent in writes so far.
    pub busy: f64,
    /// The spell comes from the target's receipts (`wire::receipts`): the
    /// intervals between receipts in which the link had a backlog. (With
    /// receipts the drain rate is theirs too when they have one, and
    /// `busy` adds the seconds the link had a backlog.)
    pub receipts: bool,
    /// Seconds the stream's thread has spent compressing so far (None:
    /// not counted; the link's busy time alone then tells whether a raised
    /// level set the pace).
    pub compressing: Option<f64>,
}

/// Where the stream's level is: at the first level, raised (it may rise
/// further), or dropped back for good.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Levels {
    /// At the first level, and may rise.
    First,
    /// Raised; the writer's busy time (and the stream's compressing time)
    /// is checked from the instant and seconds given. A level too costly
    /// goes back to `below` (the level it rose from, or the first: then
    /// for good); `rises`: it may still rise (not once a rise was undone).
    /// `ceiling`: the drain rate below which the link still counts as
    /// slow for it ([`LEVELS_BELOW`], or [`MODERATE_BELOW`] for a
    /// moderately slow link's one rise).
    Raised { since: Instant, busy: f64, compressing: f64, below: i32, rises: bool, ceiling: f64 },
    /// Back at the first level for the rest of the copy.
    Dropped,
}

/// One candidate's measured speed: input bytes per second, end to end.
#[derive(Clone, Copy, Debug)]
struct Timing {
    rate: f64,
    segment: u64,
}

/// The `auto` policy's state, fed by the sender.
#[derive(Debug)]
pub struct AutoPolicy {
    candidates: &'static [Route; 4],
    samples: [Option<Sample>; 4],
    since_sample: u64,
    pending: Vec<u8>,
    current: Route,
    /// The running segment: its number, input bytes so far, and when its
    /// second half began. The first segment is not timed: buffers along
    /// the link are still empty.
    segment: u64,
    segment_bytes: u64,
    half_start: Option<Instant>,
    timings: [Option<Timing>; 4],
    /// The current route was chosen before any write blocked (at the
    /// start, or with the link counted as infinitely fast): the first
    /// blocked writes end the segment, as raw data on a slow link is the
    /// costliest mistake, and a short copy on a slow link would otherwise
    /// end before its first decision (and the stream's level).
    blind: bool,
    /// The last decision was the model's (the link drains below
    /// [`PROBE_RATE`]).
    slow_link: bool,
    /// The image is large enough to time candidates on a fast link
    /// ([`TIMING_MIN_IMAGE`]).
    may_time: bool,
    /// No decision was taken yet: the route is the initial one, kept until
    /// the link is known.
    unknown: bool,
    /// The last decision took the link as fast, and the one before had
    /// not seen it yet: until the segment ends, a slow reading decides at
    /// once. At 100 Mbit/s the first readings jump between 2.6 and
    /// 116 MB/s while TCP's window grows into the shaper's queue, and a
    /// fast one waiting out its segment sent 16.8 MB through lz4 in 2
    /// copies of 4 (docs/experiments.md, "The start and the end of a copy").
    probation: bool,
    /// The stream may change level (`CAP_STREAM_LEVELS` agreed).
    levels: bool,
    /// The stream at each of [`STREAM_LEVELS`], measured on a slow link as
    /// far as a level could still win (None: not measured).
    level_samples: [Option<Sample>; STREAM_LEVELS.len()],
    /// The level the stream should compress at.
    stream_level: i32,
    /// The level's rises and its one fall.
    level_state: Levels,
    /// The last [`SAMPLE_BYTES`] routed, kept while the level may still
    /// rise ([`AutoPolicy::observe`]), to measure the levels on.
    recent: VecDeque<u8>,
    /// Bytes routed since the levels were last measured.
    since_levels: u64,
    /// The levels were last measured on fewer than [`SAMPLE_BYTES`].
    levels_partial: bool,
    /// The measurement of the levels running on its own thread, if any.
    measuring: Option<std::thread::JoinHandle<[Option<Sample>; STREAM_LEVELS.len()]>>,
    /// At the first level, the levels measured show a higher one paying on
    /// the slow link read now, and only the spell that decides is still
    /// short ([`AutoPolicy::first_rise_pending`]).
    rise_waits: bool,
    /// A moderately slow link's levels were measured ([`AutoPolicy::moderate_rise`]): once a copy.
    moderate_measured: bool,
    /// When the level's state on a slow link was last logged.
    noted: Option<Instant>,
}

impl Default for AutoPolicy {
    fn default() -> Self {
        AutoPolicy::new(false, 0)
    }
}

impl AutoPolicy {
    /// `streamed`: the copy has a zstd stream (the capability was agreed),
    /// which `auto` may route runs through besides the per-run codecs.
    ///
    /// Until the link is known, runs take the route with the smallest
    /// output (the stream, or per-run zstd 6): on a slow link the first
    /// megabytes cost the most, on a fast one the stronger codec only costs
    /// CPU for the few megabytes it takes to learn that the link is fast.
    /// `image_bytes`: the image's size, which bounds what the copy sends.
    pub fn new(streamed: bool, image_bytes: u64) -> AutoPolicy {
        AutoPolicy {
            candidates: if streamed { &STREAM_CANDIDATES } else { &CANDIDATES },
            samples: [None; 4],
            since_sample: u64::MAX,
            pending: Vec::new(),
            current: if streamed { Route::Stream } else { CANDIDATES[3] },
            segment: 0,
            segment_bytes: 0,
            half_start: None,
            timings: [None; 4],
            // (until the link is known: `unknown`)
            blind: false,
            slow_link: false,
            may_time: image_bytes >= TIMING_MIN_IMAGE,
            unknown: true,
            probation: false,
            levels: false,
            level_samples: [None; STREAM_LEVELS.len()],
            stream_level: super::stream::AUTO_LEVEL,
            level_state: Levels::First,
            recent: VecDeque::new(),
            since_levels: 0,
            levels_partial: false,
            measuring: None,
            rise_waits: false,
            moderate_measured: false,
            noted: None,
        }
    }

    /// The copy's stream may change level (`CAP_STREAM_LEVELS` agreed):
    /// where the link is slow, `auto` also picks the stream's level by the
    /// same model ([`AutoPolicy::stream_level`]).
    pub fn with_levels(mut self) -> AutoPolicy {
        self.levels = self.candidates.contains(&Route::Stream);
        self
    }

    /// Whether the last decision took the link as slow (below
    /// [`PROBE_RATE`]): neither still unknown nor fast, whatever a
    /// reading says now.
    pub fn link_is_slow(&self) -> bool {
        self.slow_link
    }

    /// The level the stream should compress at from now on: its first
    /// level until the link is known to be slow, then the level the model
    /// finds fastest (the larger of one thread's CPU time and the output's
    /// link time), back to the first on a fast link.
    pub fn stream_level(&self) -> i32 {
        self.stream_level
    }

    /// A first rise of the stream's level may be moments away: the link
    /// reads slow enough for the levels, and their measurement (a tenth
    /// of a second of one core at most, [`FIRST_LEVELS_BYTES`]) is
    /// running, or it showed a higher level paying and only the spell
    /// that decides is still short. The stream holds its next piece
    /// meanwhile (`copy::source`): compressed now, it would go at the
    /// first level, and the gate would then keep the stream waiting for it
    /// to drain before the new level could apply (seconds, at 2 Mbit/s;
    /// docs/experiments.md, session 17). On a link that slow the gate's
    /// second of stream in flight keeps it busy meanwhile.
    pub fn first_rise_pending(&self) -> bool {
        self.levels && self.level_state == Levels::First && (self.measuring.is_some() || self.rise_waits)
    }

    /// Whether the next payload should go into a measurement of the
    /// candidates ([`AutoPolicy::sample`]).
    pub fn wants_sample(&self) -> bool {
        let every = if self.slow_link {
            RESAMPLE_BYTES_SLOW_LINK
        } else if self.unknown {
            RESAMPLE_BYTES
        } else if self.may_time {
            RESAMPLE_BYTES_FAST_LINK
        } else {
            u64::MAX
        };
        self.since_sample >= every
    }

    /// Whether the stream's level may still rise: it is the route, below
    /// the highest level, may rise (not dropped, no rise undone), and the
    /// link is not known to be fast ([`PROBE_RATE`]). (Not the drain rate
    /// of the last route decision against [`LEVELS_BELOW`]: the first
    /// blocked writes often read fast while buffers fill, and until the
    /// segment's end the release copy at 2 Mbit/s then kept nothing to
    /// measure the levels on, for 23 s.)
    fn may_rise(&self) -> bool {
        self.levels
            && self.current == Route::Stream
            && matches!(self.level_state, Levels::First | Levels::Raised { rises: true, .. })
            && self.stream_level < STREAM_LEVELS[STREAM_LEVELS.len() - 1]
            && (self.unknown || self.slow_link)
    }

    /// Keep `data` (a payload about to be routed) among the last
    /// [`SAMPLE_BYTES`] routed while the stream's level may still rise
    /// (otherwise nothing is kept: a fast link pays no copy), and ask for
    /// the levels to be measured again every [`RESAMPLE_BYTES_LEVELS`].
    pub fn observe(&mut self, data: &[u8]) {
        if !self.may_rise() {
            self.recent = VecDeque::new();
            return;
        }
        let keep = data.len().min(SAMPLE_BYTES);
        self.recent.extend(&data[data.len() - keep..]);
        let over = self.recent.len().saturating_sub(SAMPLE_BYTES);
        self.recent.drain(..over);
        self.since_levels += data.len() as u64;
    }

    /// Whether the levels are due to be measured (again): never measured,
    /// or [`RESAMPLE_BYTES_LEVELS`] routed since, or measured on fewer
    /// than [`SAMPLE_BYTES`] (the first time) with that much routed now.
    /// (Routing runs ahead of the stream, a run up to megabytes: a return
    /// copy at 2 Mbit/s had routed all but a megabyte when its first
    /// measurement chose 15 over 19, which sampled 0.097 and 0.099 on the
    /// quarter megabyte, and then compressed 3.6 MB at 15, never measured
    /// again: 25% more bytes than its siblings at 19 (session 28).)
    fn levels_due(&self) -> bool {
        self.level_samples[0].is_none()
            || self.since_levels >= RESAMPLE_BYTES_LEVELS
            || (self.levels_partial && self.recent.len() >= SAMPLE_BYTES)
    }

    /// Add `data` (a payload about to be sent) to the next measurement, and
    /// measure once [`SAMPLE_BYTES`] are together: every candidate
    /// compresses them, its CPU time counted on this thread's clock (other
    /// processes on the host do not inflate it). The stream is measured as
    /// plain zstd at its level, its output scaled by [`STREAM_HISTORY`].
    pub fn sample(&mut self, data: &[u8]) {
        let room = SAMPLE_BYTES - self.pending.len();
        self.pending.extend_from_slice(&data[..data.len().min(room)]);
        if self.pending.len() < SAMPLE_BYTES {
            return;
        }
        let data = std::mem::take(&mut self.pending);
        for (i, r) in self.candidates.iter().enumerate() {
            let c = match r {
                Route::Run(c) => *c,
                Route::Stream => Codec::Zstd(super::stream::AUTO_LEVEL),
            };
            let t = thread_cpu_time();
            let out = c.compress(&data);
            let cpu = thread_cpu_time() - t;
            self.samples[i] = Some(Sample {
                ratio: out.len() as f64 / data.len() as f64 * if *r == Route::Stream { STREAM_HISTORY } else { 1.0 },
                cpu_per_byte: if c == Codec::None { 0.0 } else { cpu / data.len() as f64 },
            });
        }
        self.since_sample = 0;
        if log::log_enabled!(log::Level::Debug) {
            let seen: Vec<String> = (self.candidates.iter().zip(&self.samples))
                .filter_map(|(r, s)| s.map(|s| format!("{r} {:.3} at {:.0} MB/s", s.ratio, 1e-6 / s.cpu_per_byte)))
                .collect();
            log::debug!("auto: sampled {}", seen.join(", "));
        }
    }

    /// The stream's cost per input byte at `rate`, and the level that
    /// gives it: the current level unless another measured one is faster
    /// by more than [`LEVEL_GAIN`].
    fn stream_cost(&self, base: Sample, rate: f64) -> (f64, i32) {
        let cost = |s: Sample, l: i32| Self::level_cost(s, l, rate);
        let measured = STREAM_LEVELS.iter().zip(&self.level_samples).filter_map(|(l, s)| s.map(|s| (cost(s, *l), *l)));
        let best = measured.clone().min_by(|a, b| a.0.total_cmp(&b.0));
        let current = measured.clone().find(|(_, l)| *l == self.stream_level);
        match (best, current) {
            (Some(b), Some(c)) if b.0 < c.0 * LEVEL_GAIN => b,
            (_, Some(c)) => c,
            (Some(b), None) => b,
            (None, None) => (cost(base, STREAM_LEVELS[0]), STREAM_LEVELS[0]),
        }
    }

    /// One level's cost per input byte at `rate`: the larger of its CPU
    /// time (above the first level with [`LEVEL_CPU_MARGIN`]) and its
    /// output's time on the link.
    fn level_cost(s: Sample, level: i32, rate: f64) -> f64 {
        let margin = if level == STREAM_LEVELS[0] { 1.0 } else { LEVEL_CPU_MARGIN };
        (s.cpu_per_byte * margin).max(s.ratio / rate)
    }

    /// The stream's cost as a route, comparable with the other candidates'
    /// (measured on the candidates' sample, `base` the stream's): the
    /// levels were measured on other data (the last payloads routed), so
    /// the model's level counts with its ratio relative to the first
    /// level's on that data, applied to `base`. Compared as measured, a
    /// stretch of incompressible payloads made level 19 look dearer than
    /// per-run zstd on a compressible sample, the route left the stream,
    /// and the level fell back to 3 for good (release at 2 Mbit/s).
    ///
    /// It is never counted dearer than the stream at its first level on
    /// that sample: the stream can go back to that level, while leaving
    /// the stream drops its level back for good anyway. Counted at a
    /// raised level alone, level 19's CPU on a very compressible sample
    /// once lost the route to per-run zstd:1, which the first level beat;
    /// the stream came back at level 3 for good (release at 2 Mbit/s, 28%
    /// more bytes, session 24).
    fn stream_route_cost(&self, base: Sample, rate: f64) -> f64 {
        let (cost, level) = self.stream_cost(base, rate);
        let at = STREAM_LEVELS.iter().position(|l| *l == level).and_then(|j| self.level_samples[j]);
        let cost = match (at, self.level_samples[0]) {
            (Some(s), Some(first)) if first.ratio > 0.0 => {
                Self::level_cost(Sample { ratio: base.ratio * s.ratio / first.ratio, ..s }, level, rate)
            }
            _ => cost,
        };
        cost.min(Self::level_cost(base, STREAM_LEVELS[0], rate))
    }

    /// The route for the next `bytes` of input, sent at `now`. Decided once
    /// per segment of [`SEGMENT_BYTES`]:
    ///
    /// - Until the link is known (no write blocked yet, and fewer than
    ///   [`NO_BLOCK_EVIDENCE`] bytes written), the current route stays.
    /// - On a link that drains below [`PROBE_RATE`], the model decides:
    ///   the route with the least time per input byte, the larger of its
    ///   CPU time (per-run codecs spread over `workers` threads, the stream
    ///   on one) and its output's time on the link.
    /// - On a faster link (or one that never blocked a write: sending raw
    ///   wins in the model there), the model may be wrong, as the receiver
    ///   or a shared CPU can be the bottleneck. Each candidate whose CPU
    ///   alone could beat the fastest timed one is timed on a segment of
    ///   its own (segments of [`TIMED_SEGMENT_BYTES`]); then the fastest
    ///   stays, until the timings are [`TIMING_SEGMENTS`] old. On an image
    ///   smaller than [`TIMING_MIN_IMAGE`] nothing is timed: the route is
    ///   [`FAST_LINK_ROUTE`].
    ///
    /// The stream's level is decided on every call ([`AutoPolicy::levels_step`]).
    pub fn choose(&mut self, link: LinkView, workers: usize, bytes: u64, now: Instant) -> Route {
        let route = self.choose_route(link, workers, bytes, now);
        self.levels_step(link, now);
        route
    }

    /// What [`AutoPolicy::choose`] decides at `now` without routing
    /// anything (the stream's thread, while it waits for the link): the
    /// route, if the link just became known, and the stream's level.
    pub fn levels_tick(&mut self, link: LinkView, workers: usize, now: Instant) {
        self.choose(link, workers, 0, now);
    }

    /// The stream's level: a measurement only ever raises it; a further
    /// rise that proves too costly is undone, once; and it falls back to
    /// the first level at most once, for good.
    ///
    /// - It first rises only while the stream is the route on a slow link
    ///   (below [`LEVELS_BELOW`]) whose writes blocked steadily for
    ///   [`RAISE_SPELL_SECS`] in one spell at that rate (with receipts:
    ///   whose receipts showed a backlog for [`RECEIPT_SPELL_SECS`]), to
    ///   the level the model finds fastest on the last payloads routed
    ///   (the levels measured on them as soon as the link reads slow).
    /// - Raised, it rises again when the levels, measured again on the
    ///   last payloads after every [`RESAMPLE_BYTES_LEVELS`] routed, show
    ///   a higher one faster by the model; a measurement never lowers it.
    /// - It falls back to the first level, for good, when the route leaves
    ///   the stream or the link stops counting as slow, or when over
    ///   [`DROP_WINDOW_SECS`] the writer was in writes (or, with receipts,
    ///   the link had a backlog) less than [`DROP_BUSY`] of the time: the
    ///   compressor, not the link, set the pace. After a further rise that
    ///   last one goes back to the level it rose from instead, and the
    ///   level rises no more.
    fn levels_step(&mut self, link: LinkView, now: Instant) {
        if !self.levels {
            return;
        }
        // Raised (again) at `now`: the windows' counts start there.
        let raised = |below: i32, rises: bool, ceiling: f64| Levels::Raised {
            since: now,
            busy: link.busy,
            compressing: link.compressing.unwrap_or(0.0),
            below,
            rises,
            ceiling,
        };
        let slow_below = |ceiling: f64| {
            self.current == Route::Stream && self.slow_link && link.drain_rate.is_some_and(|r| r < ceiling)
        };
        let slow = slow_below(LEVELS_BELOW);
        match self.level_state {
            Levels::Dropped => {}
            Levels::Raised { since, busy, compressing, below, rises, ceiling } => {
                let slow = slow_below(ceiling);
                let secs = now.saturating_duration_since(since).as_secs_f64();
                let share = if secs >= DROP_WINDOW_SECS { Some((link.busy - busy) / secs) } else { None };
                let compressor_busy = link.compressing.map_or(true, |c| (c - compressing) / secs >= DROP_COMPRESSING);
                let costly = share.filter(|s| *s < DROP_BUSY && compressor_busy);
                if !slow || (costly.is_some() && below == STREAM_LEVELS[0]) {
                    let why = match costly {
                        Some(s) if slow => format!("the writer was busy {:.0}% of {secs:.1} s", s * 100.0),
                        _ => "the link no longer counts as slow".to_string(),
                    };
                    log::debug!(
                        "auto: stream level {} back to {} for good: {why}",
                        self.stream_level,
                        STREAM_LEVELS[0]
                    );
                    self.stream_level = STREAM_LEVELS[0];
                    self.level_state = Levels::Dropped;
                    return;
                }
                if let Some(s) = costly {
                    // A further rise that left the link idle: back to the
                    // level that kept it busy, and no more rises.
                    log::debug!(
                        "auto: stream level {} back to {below}, no more rises: the writer was busy {:.0}% of {secs:.1} s",
                        self.stream_level,
                        s * 100.0
                    );
                    self.stream_level = below;
                    self.level_state = raised(STREAM_LEVELS[0], false, ceiling);
                    return;
                }
                if share.is_some() {
                    self.level_state = raised(below, rises, ceiling);
                }
                if !rises {
                    return;
                }
                // A newer sample may show a higher level paying: measure
                // the levels from the current one up on it, and rise if
                // one is faster by the model. (Never down: the drop above
                // is what a level too costly for the link meets.)
                let (Some(rate), Some(base)) =
                    (link.drain_rate, self.index(Route::Stream).and_then(|i| self.samples[i]))
                else {
                    return;
                };
                if slow && self.levels_due() && !self.recent.is_empty() {
                    self.measure_recent(rate, self.stream_level, SAMPLE_BYTES);
                }
                if !self.collect_levels(false) || !slow {
                    return;
                }
                let level = self.stream_cost(base, rate).1;
                if level > self.stream_level {
                    log::debug!(
                        "auto: stream level {level} from now on (was {}): a new sample at a link of {:.0} kB/s",
                        self.stream_level,
                        rate / 1e3
                    );
                    self.level_state = raised(self.stream_level, true, ceiling);
                    self.stream_level = level;
                }
            }
            Levels::First => {
                if slow && self.noted.map_or(true, |t| now.saturating_duration_since(t).as_secs_f64() >= 1.0) {
                    // Why the level has not risen yet, once a second at most.
                    log::debug!(
                        "auto: stream level {} ({}): drain {:.0} kB/s, spell {}, writer busy {:.1} s",
                        self.stream_level,
                        self.current,
                        link.drain_rate.unwrap_or(0.0) / 1e3,
                        link.spell.map_or("none".into(), |s| format!("{:.1} s at {:.0} kB/s", s.secs, s.rate() / 1e3)),
                        link.busy
                    );
                    self.noted = Some(now);
                }
                self.rise_waits = false;
                let Some(rate) = link.drain_rate else { return };
                if !slow && self.moderate_rise(link, rate) {
                    self.level_state = raised(STREAM_LEVELS[0], false, MODERATE_BELOW);
                    return;
                }
                // The levels are measured on the last payloads as soon as
                // the link reads slow, before the spell that decides: the
                // measurement then overlaps the wait for that evidence
                // instead of delaying the change by as much. Not while the
                // spell running now reads far faster ([`SPELL_NOT_SLOW`]).
                // (Not waiting for the candidates' sample either: the
                // levels' own first one decides the level.)
                let contradicted = link.spell.is_some_and(|s| s.rate() >= SPELL_NOT_SLOW);
                let first = self.level_samples[0].is_none();
                let enough = if first { FIRST_LEVELS_BYTES } else { 1 };
                if slow && !contradicted && self.levels_due() && self.recent.len() >= enough {
                    self.measure_recent(rate, STREAM_LEVELS[0], if first { FIRST_LEVELS_BYTES } else { SAMPLE_BYTES });
                }
                self.collect_levels(false);
                let Some(first_level) = self.level_samples[0] else { return };
                if !slow || contradicted {
                    return;
                }
                // The slower of the two readings: either may still be
                // catching up with the other.
                let rate = link.spell.map_or(rate, |s| rate.max(s.rate()));
                let level = self.stream_cost(first_level, rate).1;
                if level == self.stream_level {
                    // Not worth a new frame: measured again on the next sample.
                    return;
                }
                let (secs, bytes) = if link.receipts {
                    (RECEIPT_SPELL_SECS, RECEIPT_SPELL_BYTES)
                } else {
                    (RAISE_SPELL_SECS, RAISE_SPELL_BYTES)
                };
                let Some(spell) = link.spell.filter(|s| s.secs >= secs && s.bytes >= bytes && s.rate() < LEVELS_BELOW)
                else {
                    self.rise_waits = true;
                    return;
                };
                log::debug!(
                    "auto: stream level {level} from now on: the link drained {:.1} MB/s steadily for {:.1} s",
                    rate / 1e6,
                    spell.secs
                );
                self.stream_level = level;
                self.level_state = raised(STREAM_LEVELS[0], true, LEVELS_BELOW);
            }
        }
    }

    /// At the first level on a moderately slow link ([`MODERATE_BELOW`]):
    /// once its receipts' spell confirms the rate, measure the levels up to
    /// [`MODERATE_LEVEL_MAX`] once, on the last megabyte routed, and take
    /// the highest whose CPU time (with [`LEVEL_CPU_MARGIN`]) stays within
    /// its own output's time on the link: the link stays the bottleneck and
    /// carries fewer bytes. Whether the level rose (no further rise
    /// follows, even where the link later slows below [`LEVELS_BELOW`];
    /// the drop rules of a raised level apply). Measured on the calling
    /// thread: at most three levels of one megabyte, tens of milliseconds,
    /// once a copy.
    fn moderate_rise(&mut self, link: LinkView, rate: f64) -> bool {
        let moderate = |r: f64| (LEVELS_BELOW..MODERATE_BELOW).contains(&r);
        if self.moderate_measured
            || self.current != Route::Stream
            || !self.slow_link
            || !link.receipts
            || !moderate(rate)
            || self.recent.len() < SAMPLE_BYTES
        {
            return false;
        }
        let Some(spell) = link
            .spell
            .filter(|s| s.secs >= RECEIPT_SPELL_SECS && s.bytes >= MODERATE_SPELL_BYTES && moderate(s.rate()))
        else {
            return false;
        };
        self.moderate_measured = true;
        // The slower reading: the level must keep up with either.
        let rate = rate.min(spell.rate());
        let data: Vec<u8> = self.recent.iter().copied().collect();
        let measured = measure_levels(&data, rate, STREAM_LEVELS[0], MODERATE_LEVEL_MAX);
        let Some(first) = measured[0] else { return false };
        let fits = |s: &Sample| s.cpu_per_byte * LEVEL_CPU_MARGIN <= s.ratio / rate && s.ratio < first.ratio;
        let level = STREAM_LEVELS.iter().zip(&measured).skip(1).rev().find(|(_, s)| s.is_some_and(|s| fits(&s)));
        let Some((&level, _)) = level else {
            log::debug!(
                "auto: stream level stays {}: no higher level keeps up with {:.1} MB/s",
                self.stream_level,
                rate / 1e6
            );
            return false;
        };
        log::debug!(
            "auto: stream level {level} from now on: a moderately slow link ({:.1} MB/s, {:.1} s of spell) leaves the CPU room",
            rate / 1e6,
            spell.secs
        );
        self.stream_level = level;
        true
    }

    /// [`measure_levels`] on the last payloads routed.
    ///
    /// It runs on a thread of its own: level 19 alone takes about a third
    /// of a second on a megabyte, and measured on the thread that asked
    /// (the stream's, or a worker holding this policy's lock) it stalled
    /// the stream for as long. The results count once collected
    /// ([`AutoPolicy::collect_levels`]); one measurement runs at a time.
    fn measure_recent(&mut self, rate: f64, from: i32, at_most: usize) {
        if self.measuring.is_some() {
            return;
        }
        let skip = self.recent.len().saturating_sub(at_most);
        let last = || -> Vec<u8> { self.recent.iter().skip(skip).copied().collect() };
        let data = last();
        log::debug!("auto: measuring the levels from {from} up on the last {} bytes routed", data.len());
        self.since_levels = 0;
        self.levels_partial = data.len() < SAMPLE_BYTES;
        let run = std::thread::Builder::new().name("xenmig-levels".into());
        match run.spawn(move || measure_levels(&data, rate, from, MAX_LEVEL)) {
            Ok(h) => self.measuring = Some(h),
            // (no thread to be had: measured here instead)
            Err(_) => self.level_samples = measure_levels(&last(), rate, from, MAX_LEVEL),
        }
    }

    /// Take a finished measurement of the levels (or, with `wait`, wait
    /// for the one running); whether new levels came in. (Unit tests
    /// always wait: their clocks are not the measurement's.)
    fn collect_levels(&mut self, wait: bool) -> bool {
        let done = self.measuring.as_ref().is_some_and(|h| wait || cfg!(test) || h.is_finished());
        if !done {
            return false;
        }
        match self.measuring.take().map(|h| h.join()) {
            Some(Ok(measured)) => {
                self.level_samples = measured;
                true
            }
            // (a measurement that panicked leaves the levels as they were)
            _ => false,
        }
    }

    fn choose_route(&mut self, link: LinkView, workers: usize, bytes: u64, now: Instant) -> Route {
        self.since_sample = self.since_sample.saturating_add(bytes);
        let len = if self.may_time && !self.slow_link && !self.unknown { TIMED_SEGMENT_BYTES } else { SEGMENT_BYTES };
        let half = len / 2;
        if self.segment_bytes < half && self.segment_bytes + bytes >= half {
            self.half_start = Some(now);
        }
        self.segment_bytes += bytes;
        // The link just became known: decide now, not at the end of the
        // segment, when it turned out slow, or took 8 MiB without blocking
        // a write, or blocked one after a route chosen blind. A fast first
        // reading waits for the segment's end: the first blocked writes may
        // have found ssh's and the kernel's buffers partly empty (at
        // 100 Mbit/s, deciding on it sent the first 16 MiB of 2 copies in 3
        // through lz4). Past the first segment, a fast first reading
        // decides at once unless the spell running now is slow: a second
        // segment on the first route, waiting for it, made an unshaped copy
        // 0.2-0.3 s slower in 3 of 8, while at 100 Mbit/s the first
        // readings after a segment still read 40-99 MB/s on the cold copy
        // and deciding on them cost it 1.5 MB; its spell (the receipts')
        // reads the link's 12 MB/s there, an unshaped one 29-50 MB/s.
        // (A slow reading of a link seen fast decides only on a spell:
        // SLOW_AGAIN_SPELL_SECS.)
        let slow = link.spell.filter(|s| s.rate() < PROBE_RATE / 2.0);
        let (slow_spell, steady) = (slow.is_some(), slow.is_some_and(|s| s.secs >= SLOW_AGAIN_SPELL_SECS));
        let learnt = match link.drain_rate {
            Some(rate) => {
                self.blind
                    || (self.unknown && (rate < PROBE_RATE || (self.segment > 0 && !slow_spell)))
                    || (self.probation && rate < PROBE_RATE / 2.0 && steady)
            }
            None => self.unknown && link.written >= NO_BLOCK_EVIDENCE,
        };
        if self.segment_bytes < len && !learnt {
            return self.current;
        }
        if learnt {
            self.half_start = None; // not a whole segment: not timed
        }
        if let Some(start) = self.half_start.take() {
            let secs = now.duration_since(start).as_secs_f64();
            if self.may_time && self.segment > 0 && secs > 0.0 {
                if let Some(i) = self.index(self.current) {
                    let rate = (self.segment_bytes - half) as f64 / secs;
                    log::debug!("auto: {} timed at {:.1} MB/s in segment {}", self.current, rate / 1e6, self.segment);
                    self.timings[i] = Some(Timing { rate, segment: self.segment });
                }
            }
        }
        self.segment += 1;
        self.segment_bytes = 0;

        let rate = match link.drain_rate {
            Some(rate) => rate,
            // Slow before, and writes stopped blocking (the stream's level
            // fell back above): the route stays for this segment, and the
            // next blocked write decides at once. Counting the link as
            // fast here sent 52 MB of a 20 Mbit/s copy through lz4.
            None if self.slow_link => {
                self.slow_link = false;
                self.blind = true;
                return self.current;
            }
            None if link.written >= NO_BLOCK_EVIDENCE => f64::INFINITY,
            None => {
                log::debug!("auto: link still unknown after {} bytes written (segment {})", link.written, self.segment);
                return self.current;
            }
        };
        self.blind = link.drain_rate.is_none();
        // Once the link was fast, a dip below PROBE_RATE is more often the
        // receiver (or a CPU it shares with us) pausing than the link
        // slowing: on the unshaped cells the drain rate read 22-26 MB/s for
        // a moment in most copies, and the stream it then chose was the
        // slowest route there. A slow link reads far below that.
        let slow_below = if self.slow_link || self.unknown { PROBE_RATE } else { PROBE_RATE / 2.0 };
        let was_fast = !self.unknown && !self.slow_link;
        // A slow reading without a spell of it: a dip, not (yet) the link.
        // The verdict stays fast, on probation, so that the spell, if it
        // comes, decides at once.
        let dip = was_fast && rate < slow_below && !steady;
        if dip {
            log::debug!("auto: the link read {:.1} MB/s, but not steadily: still fast", rate / 1e6);
        }
        if self.unknown {
            log::debug!(
                "auto: the link is known, {:.1} MB/s, after {} bytes written{}",
                rate / 1e6,
                link.written,
                if link.receipts { " (receipts)" } else { "" }
            );
        }
        self.unknown = false;
        self.slow_link = rate < slow_below && !dip;
        self.probation = !self.slow_link && (!was_fast || dip);
        let next = if self.slow_link { self.modelled(rate, workers) } else { self.timed(workers) };
        if next != self.current {
            let spell = link
                .spell
                .map_or("no spell".into(), |s| format!("a spell of {:.2} s at {:.1} MB/s", s.secs, s.rate() / 1e6));
            log::debug!(
                "auto: {next} from now on at a link of {:.1} MB/s ({spell}{})",
                rate / 1e6,
                if link.receipts { ", receipts" } else { "" }
            );
        }
        self.current = next;
        self.current
    }

    fn index(&self, r: Route) -> Option<usize> {
        self.candidates.iter().position(|c| *c == r)
    }

    fn threads(r: Route, workers: usize) -> f64 {
        if r == Route::Stream {
            1.0
        } else {
            workers.max(1) as f64
        }
    }

    /// The model's choice at `rate`.
    fn modelled(&self, rate: f64, workers: usize) -> Route {
        let mut best = (f64::INFINITY, self.current);
        for (i, r) in self.candidates.iter().enumerate() {
            if let Some(s) = self.samples[i] {
                let cost = match r {
                    Route::Stream => self.stream_route_cost(s, rate),
                    _ => (s.cpu_per_byte / Self::threads(*r, workers)).max(s.ratio / rate),
                };
                // The cheaper codec on a near tie (2%): any wider margin is
                // link time given away where the link decides.
                if cost < best.0 * 0.98 {
                    best = (cost, *r);
                }
            }
        }
        best.1
    }

    /// On a fast link: the fastest timed route, or one to time first.
    fn timed(&self, workers: usize) -> Route {
        if !self.may_time {
            return FAST_LINK_ROUTE;
        }
        let fresh = |t: &Option<Timing>| t.filter(|t| self.segment - t.segment <= TIMING_SEGMENTS);
        let best =
            (0..4).filter_map(|i| fresh(&self.timings[i]).map(|t| (t.rate, i))).max_by(|a, b| a.0.total_cmp(&b.0));
        let Some((best_rate, best)) = best else {
            // Nothing timed yet: start from the light codec.
            return FAST_LINK_ROUTE;
        };
        for (i, r) in self.candidates.iter().enumerate() {
            if fresh(&self.timings[i]).is_some() {
                continue;
            }
            if self.cpu(i, workers).is_some_and(|cpu| cpu < 0.95 / best_rate) {
                return *r;
            }
        }
        // Each route was timed on other data than the others (the segments
        // differ in how well they compress), so timings a few percent apart
        // are a tie, and a tie goes to the route with less CPU per byte:
        // on a host whose cores the receiver shares, it leaves them to it.
        let lightest = (0..4)
            .filter(|&i| fresh(&self.timings[i]).is_some_and(|t| t.rate >= best_rate * (1.0 - TIMED_TIE)))
            .min_by(|&a, &b| {
                let cpu = |i| self.cpu(i, workers).unwrap_or(f64::INFINITY);
                cpu(a).total_cmp(&cpu(b))
            });
        self.candidates[lightest.unwrap_or(best)]
    }

    /// Sampled CPU seconds per input byte of candidate `i`, its threads
    /// counted.
    fn cpu(&self, i: usize, workers: usize) -> Option<f64> {
        self.samples[i].map(|s| s.cpu_per_byte / Self::threads(self.candidates[i], workers))
    }
}

/// On a slow link, measure the stream's levels on `data` (the last
/// payloads routed), lowest first, as long as one could still win: a
/// level whose CPU time alone exceeds the best link time so far cannot,
/// and every level above it costs more CPU still. (Level 19 takes about
/// a third of a second on a megabyte: measured only where the link is
/// that slow.)
///
/// Levels below `from` are not measured, except the first, against
/// which the others are compared: raised, the level only rises
/// further.
///
/// CPU time is counted on the thread that runs it.
fn measure_levels(data: &[u8], rate: f64, from: i32, up_to: i32) -> [Option<Sample>; STREAM_LEVELS.len()] {
    let mut measured = [None; STREAM_LEVELS.len()];
    let mut best_link = f64::INFINITY;
    for (j, &level) in STREAM_LEVELS.iter().enumerate() {
        if j > 0 && level < from {
            continue;
        }
        if level > up_to {
            break;
        }
        let t = thread_cpu_time();
        let out = Codec::Zstd(level).compress(data);
        let cpu = thread_cpu_time() - t;
        let s = Sample {
            ratio: out.len() as f64 / data.len() as f64 * STREAM_HISTORY,
            cpu_per_byte: cpu / data.len() as f64,
        };
        measured[j] = Some(s);
        if j == 0 {
            best_link = s.ratio / rate;
            continue;
        }
        log::debug!(
            "auto: level {level} sampled {:.3} at {:.1} MB/s (link {:.0} kB/s)",
            s.ratio,
            1e-6 / s.cpu_per_byte.max(1e-12),
            rate / 1e3
        );
        best_link = best_link.min(s.ratio / rate);
        if s.cpu_per_byte * LEVEL_CPU_MARGIN >= best_link {
            break;
        }
    }
    measured
}

/// CPU seconds this thread has used.
fn thread_cpu_time() -> f64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID) {
        Ok(t) => t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9,
        // (never on Linux; without a clock every codec looks free and the
        // link alone decides)
        Err(_) => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn choice_names_read_back() {
        for c in ["auto", "none", "lz4", "zstd:3", "zstd:19", "zlib:6"] {
            let choice: Choice = c.parse().unwrap();
            assert_eq!(choice.to_string(), c);
            assert_eq!(choice.to_string().parse::<Choice>().unwrap(), choice);
        }
    }

    #[test]
    fn every_codec_round_trips() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 97) as u8).collect();
        for c in [Codec::None, Codec::Lz4, Codec::Zstd(3), Codec::Zlib(6)] {
            let z = c.compress(&data);
            assert_eq!(Codec::decompress(c.code(), z, data.len()).unwrap(), data, "{c}");
        }
    }

    #[test]
    fn corrupt_or_mis_sized_payloads_are_errors() {
        let data = vec![7u8; 10_000];
        for c in [Codec::Lz4, Codec::Zstd(3), Codec::Zlib(6)] {
            let z = c.compress(&data);
            assert!(Codec::decompress(c.code(), z.clone(), data.len() - 1).is_err(), "{c} short");
            assert!(Codec::decompress(c.code(), z[..z.len() / 2].to_vec(), data.len()).is_err(), "{c} cut");
        }
        assert!(Codec::decompress(0, data.clone(), 5).is_err());
        assert!(matches!(Codec::decompress(9, data, 5), Err(CodecError::Unknown(9))));
    }

    #[test]
    fn parse_choices() {
        assert_eq!("auto".parse::<Choice>().unwrap(), Choice::Auto);
        assert_eq!("zstd:9".parse::<Choice>().unwrap(), Choice::Fixed(Codec::Zstd(9)));
        assert_eq!("zlib".parse::<Choice>().unwrap(), Choice::Fixed(Codec::Zlib(6)));
        assert!("zstd:99".parse::<Choice>().is_err());
        assert!("lzo".parse::<Choice>().is_err());
    }

    /// A link draining `r` bytes a second steadily: the reading comes
    /// with a spell of it.
    fn rate(r: f64) -> LinkView {
        let spell = Some(Spell { secs: 10.0, bytes: (r * 10.0) as u64 });
        LinkView { drain_rate: Some(r), written: 1 << 30, spell, ..LinkView::default() }
    }

    /// A reading of `r` bytes a second without a spell: a dip.
    fn dip(r: f64) -> LinkView {
        LinkView { drain_rate: Some(r), written: 1 << 30, ..LinkView::default() }
    }

    fn text(len: usize) -> Vec<u8> {
        let words = ["block ", "digest ", "xen ", "guest ", "disk ", "migrate ", "lvm ", "hash ", "zero "];
        let mut x = 12345u32;
        let mut data = Vec::new();
        while data.len() < len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            data.extend_from_slice(words[(x >> 16) as usize % words.len()].as_bytes());
        }
        data.truncate(len);
        data
    }

    /// One whole segment's worth of input routed at `at`.
    fn segment(p: &mut AutoPolicy, link: LinkView, workers: usize, at: Instant) -> Route {
        p.choose(link, workers, SEGMENT_BYTES, at)
    }

    /// Before the link is known, runs take the smallest output; a link that
    /// took several megabytes without blocking counts as fast.
    #[test]
    fn auto_starts_strong_until_the_link_is_known() {
        let data = text(2 << 20);
        let now = Instant::now();
        for streamed in [true, false] {
            let mut p = AutoPolicy::new(streamed, 1 << 30);
            p.sample(&data);
            let strongest = if streamed { Route::Stream } else { Route::Run(Codec::Zstd(6)) };
            let unknown = LinkView { drain_rate: None, written: 0, ..LinkView::default() };
            // Within a segment nothing changes.
            assert_eq!(p.choose(unknown, 2, 4096, now), strongest);
            assert_eq!(segment(&mut p, unknown, 2, now), strongest);
            let buffers_filling = LinkView { drain_rate: None, written: NO_BLOCK_EVIDENCE - 1, ..LinkView::default() };
            assert_eq!(segment(&mut p, buffers_filling, 2, now), strongest);
            // Known as soon as it is: not at the end of the segment.
            let never_blocked = LinkView { drain_rate: None, written: NO_BLOCK_EVIDENCE, ..LinkView::default() };
            assert_eq!(p.choose(never_blocked, 2, 4096, now), FAST_LINK_ROUTE);
            assert_eq!(p.choose(never_blocked, 2, 4096, now), FAST_LINK_ROUTE);
            // A fast first reading waits for the end of the segment (the
            // buffers may still have been filling); a slow one decides now.
            let mut q = AutoPolicy::new(streamed, 1 << 30);
            q.sample(&data);
            assert_eq!(q.choose(rate(100e6), 2, 4096, now), strongest);
            assert_eq!(q.segment, 0);
            assert_eq!(q.choose(rate(1e6), 2, 4096, now), strongest);
            assert_eq!(q.segment, 1);
            // Past a first segment that ended with the link unknown, a fast
            // first reading decides at once too.
            let mut u = AutoPolicy::new(streamed, 1 << 30);
            u.sample(&data);
            assert_eq!(segment(&mut u, buffers_filling, 2, now), strongest);
            assert_eq!(u.segment, 1);
            let beside_a_slow_spell = LinkView { spell: Some(Spell { secs: 0.2, bytes: 2_400_000 }), ..dip(100e6) };
            assert_eq!(u.choose(beside_a_slow_spell, 2, 4096, now), strongest);
            assert_eq!(u.segment, 1, "a fast reading beside a slow spell decided");
            assert_eq!(u.choose(rate(100e6), 2, 4096, now), FAST_LINK_ROUTE);
            assert_eq!(u.segment, 2, "the fast reading waited for the second segment's end");
            // Raw data blocked and measured a slow link: strong again at
            // once, not at the end of the segment.
            assert_eq!(p.choose(rate(1e6), 2, 4096, now), strongest);
        }
    }

    #[test]
    fn auto_follows_the_link() {
        // Text-like data: words drawn pseudo-randomly from a small vocabulary.
        let data = text(SAMPLE_BYTES);
        let mut p = AutoPolicy::default();
        assert!(p.wants_sample());
        // Measured only once a megabyte is together.
        p.sample(&data[..4096]);
        assert!(p.wants_sample() && p.samples.iter().all(Option::is_none));
        p.sample(&data);
        assert!(!p.wants_sample());
        // A slow link makes the smallest output win; an infinitely fast one
        // makes sending raw win.
        assert!(matches!(p.modelled(1_000.0, 2), Route::Run(Codec::Zstd(_))));
        assert_eq!(p.modelled(1e15, 2), Route::Run(Codec::None));
        // With a stream: it is a candidate too, never on an infinitely fast link.
        let mut p = AutoPolicy::new(true, 1 << 30);
        p.sample(&data);
        assert_eq!(p.modelled(1_000.0, 2), Route::Stream);
        assert_eq!(p.modelled(1e15, 2), Route::Run(Codec::None));
    }

    /// The stream's CPU is one thread's: with many workers, a link just
    /// slow enough for zstd spread over them is too fast for the stream; on
    /// a slow link the stream's smaller output (its history) wins.
    #[test]
    fn auto_does_not_spread_the_streams_cpu_over_the_workers() {
        let none = Sample { ratio: 1.0, cpu_per_byte: 0.0 };
        let lz4 = Sample { ratio: 0.5, cpu_per_byte: 1e-9 };
        let zstd = Sample { ratio: 0.3, cpu_per_byte: 1e-8 };
        let stream = Sample { ratio: 0.2, cpu_per_byte: 1e-8 };
        let mut p = AutoPolicy::new(true, 1 << 30);
        p.samples = [Some(none), Some(lz4), Some(stream), Some(zstd)];
        // 60 MB/s: per-run zstd on 8 threads costs max(1.25e-9, 5e-9); the
        // stream on one thread max(1e-8, 3.3e-9): per-run zstd wins.
        assert_eq!(p.modelled(60e6, 8), Route::Run(Codec::Zstd(1)));
        // 1 MB/s: the link decides; the stream's smaller output wins.
        assert_eq!(p.modelled(1e6, 8), Route::Stream);
        // Without a stream it is never chosen.
        let mut p = AutoPolicy::new(false, 1 << 30);
        p.samples = [Some(none), Some(lz4), Some(zstd), Some(Sample { ratio: 0.25, cpu_per_byte: 3e-8 })];
        // (here the fourth candidate is per-run zstd 6)
        assert_eq!(p.modelled(1e6, 8), Route::Run(Codec::Zstd(6)));
    }

    /// Samples as measured on the quick experiments' images, roughly.
    fn measured_samples(p: &mut AutoPolicy) {
        p.samples = [
            Some(Sample { ratio: 1.0, cpu_per_byte: 0.0 }),
            Some(Sample { ratio: 0.47, cpu_per_byte: 2e-9 }),
            Some(Sample { ratio: 0.3, cpu_per_byte: 7e-9 }),
            Some(Sample { ratio: 0.35, cpu_per_byte: 3e-9 }),
        ];
    }

    /// Routes chosen for `n` segments of 1 MiB payloads in a world where
    /// each route moves input at `speed(route)` bytes/s end to end, the
    /// link draining `drain` bytes/s while writes block.
    fn run(p: &mut AutoPolicy, drain: f64, n: usize, speed: impl Fn(Route) -> f64) -> Vec<Route> {
        let mut at = Instant::now();
        let link = rate(drain);
        let per_segment = (SEGMENT_BYTES >> 20) as usize;
        let mut routes = Vec::new();
        for i in 0..n * per_segment {
            let r = p.choose(link, 2, 1 << 20, at);
            at += Duration::from_secs_f64((1 << 20) as f64 / speed(r));
            if i % per_segment == per_segment - 1 {
                routes.push(r);
            }
        }
        routes
    }

    /// Where the link drains fast, the receiver or a shared CPU may be the
    /// bottleneck, which the model cannot see: on a copy long enough,
    /// candidates are timed, and the fastest kept, even against the model
    /// (which picks raw at 1 GB/s).
    #[test]
    fn on_a_fast_link_a_long_copy_keeps_the_fastest_timed_route() {
        let mut p = AutoPolicy::new(true, 8 << 30);
        measured_samples(&mut p);
        let speed = |r: Route| match r {
            Route::Run(Codec::None) => 300e6,
            Route::Run(Codec::Lz4) => 400e6,
            Route::Run(_) => 600e6,
            Route::Stream => 100e6,
        };
        let routes = run(&mut p, 1e9, 40, speed);
        // Light first: the first segment goes through lz4.
        assert_eq!(routes[0], FAST_LINK_ROUTE, "{routes:?}");
        let tail = &routes[routes.len() - 10..];
        assert!(tail.iter().all(|r| *r == Route::Run(Codec::Zstd(1))), "zstd 1 not kept: {routes:?}");
        // The stream, whose CPU alone is slower than what was timed, is
        // never tried.
        assert!(!routes.contains(&Route::Stream), "{routes:?}");
        assert_eq!(p.timings.iter().flatten().count(), 3);
    }

    /// Timings a few percent apart were taken on different data: a tie,
    /// which the route with less CPU per byte wins.
    #[test]
    fn timings_a_few_percent_apart_are_a_tie_for_the_lighter_route() {
        let mut p = AutoPolicy::new(true, 8 << 30);
        measured_samples(&mut p);
        let speed = |r: Route| match r {
            Route::Run(Codec::None) => 300e6,
            Route::Run(Codec::Lz4) => 500e6,
            Route::Run(_) => 520e6,
            Route::Stream => 100e6,
        };
        let routes = run(&mut p, 1e9, 40, speed);
        assert!(routes.contains(&Route::Run(Codec::Zstd(1))), "zstd 1 never timed: {routes:?}");
        let tail = &routes[routes.len() - 10..];
        assert!(tail.iter().all(|r| *r == Route::Run(Codec::Lz4)), "lz4 not kept: {routes:?}");
    }

    /// A copy too short for trials to pay takes the light codec on a fast
    /// link and times nothing, whatever the model would say.
    #[test]
    fn on_a_fast_link_a_short_copy_takes_the_light_codec() {
        let mut p = AutoPolicy::new(true, 1 << 30);
        measured_samples(&mut p);
        for drain in [40e6, 1e9] {
            let routes = run(&mut p, drain, 20, |_| 300e6);
            assert!(routes.iter().all(|r| *r == FAST_LINK_ROUTE), "{routes:?}");
        }
        assert!(p.timings.iter().all(Option::is_none));
    }

    /// Once the link was fast, a short dip of the drain rate below
    /// [`PROBE_RATE`] (the receiver pausing) does not send the copy
    /// through the stream; a link that really slows down does.
    #[test]
    fn a_fast_link_that_dips_keeps_the_light_codec() {
        let mut p = AutoPolicy::new(true, 1 << 30);
        measured_samples(&mut p);
        assert!(run(&mut p, 200e6, 2, |_| 300e6).iter().all(|r| *r == FAST_LINK_ROUTE));
        assert!(run(&mut p, 22e6, 2, |_| 300e6).iter().all(|r| *r == FAST_LINK_ROUTE));
        assert_eq!(run(&mut p, 10e6, 2, |_| 300e6).last(), Some(&Route::Stream));
        // Once slow, the model decides until the link is fast again.
        assert_eq!(run(&mut p, 22e6, 1, |_| 300e6).last(), Some(&Route::Stream));
        assert_eq!(run(&mut p, 200e6, 2, |_| 300e6).last(), Some(&FAST_LINK_ROUTE));
    }

    /// A streamed copy's policy with measured samples, whose first segment
    /// found the link fast (on probation).
    fn seen_fast(now: Instant) -> AutoPolicy {
        let mut p = AutoPolicy::new(true, 1 << 30);
        measured_samples(&mut p);
        assert_eq!(segment(&mut p, rate(116e6), 2, now), FAST_LINK_ROUTE);
        p
    }

    /// Samples cost the copy its CPU where the link is fast: there they
    /// come every 256 MiB on an image large enough to time routes on, and
    /// not at all on a smaller one (its route is fixed); a slow or unknown
    /// link keeps its intervals.
    #[test]
    fn a_fast_link_is_sampled_rarely_and_a_small_image_not_at_all() {
        let now = Instant::now();
        let mut small = seen_fast(now);
        small.since_sample = u64::MAX - 1;
        assert!(!small.wants_sample(), "a small image on a fast link sampled");
        let mut big = AutoPolicy::new(true, TIMING_MIN_IMAGE);
        big.since_sample = RESAMPLE_BYTES;
        assert!(big.wants_sample(), "an unknown link keeps its interval");
        big.unknown = false;
        assert!(!big.wants_sample());
        big.since_sample = RESAMPLE_BYTES_FAST_LINK;
        assert!(big.wants_sample());
        for mut p in [small, big] {
            p.slow_link = true;
            p.since_sample = RESAMPLE_BYTES_SLOW_LINK;
            assert!(p.wants_sample(), "a link turned slow is sampled at once");
        }
    }

    /// The first fast verdict is on probation for its segment: a slow
    /// reading then decides at once (the shaper's queue was still filling
    /// when the link looked fast). A later dip waits for the segment's end.
    #[test]
    fn a_first_fast_reading_gives_way_to_a_slow_one_at_once() {
        let now = Instant::now();
        let mut p = seen_fast(now);
        assert_eq!(p.choose(rate(60e6), 2, 1 << 20, now), FAST_LINK_ROUTE);
        let at = p.segment;
        assert_eq!(p.choose(rate(12e6), 2, 1 << 20, now), Route::Stream);
        assert_eq!(p.segment, at + 1, "the slow reading waited for the segment's end");
        // Fast again, past probation: a whole segment confirms it, and a
        // dip within the next one waits for that one's end.
        assert_eq!(segment(&mut p, rate(116e6), 2, now), FAST_LINK_ROUTE);
        assert_eq!(segment(&mut p, rate(116e6), 2, now), FAST_LINK_ROUTE);
        assert_eq!(p.choose(rate(12e6), 2, 1 << 20, now), FAST_LINK_ROUTE);
        assert_eq!(p.choose(rate(12e6), 2, SEGMENT_BYTES, now), Route::Stream);
    }

    /// A slow reading of a link seen fast, without a spell of it (or with
    /// one shorter than SLOW_AGAIN_SPELL_SECS, or faster), is a dip: ssh
    /// or the target without a core for a moment. The route stays fast and
    /// on probation, so that a spell, when it comes, decides at once.
    #[test]
    fn a_dip_without_a_spell_leaves_a_fast_link_fast() {
        let now = Instant::now();
        let mut p = seen_fast(now);
        let short = LinkView { spell: Some(Spell { secs: SLOW_AGAIN_SPELL_SECS / 2.0, bytes: 1 << 20 }), ..dip(12e6) };
        let fast_spell = LinkView { spell: Some(Spell { secs: SLOW_AGAIN_SPELL_SECS, bytes: 9 << 20 }), ..dip(11.5e6) };
        let at = p.segment;
        for link in [dip(12e6), short, fast_spell] {
            assert_eq!(p.choose(link, 2, 1 << 20, now), FAST_LINK_ROUTE);
        }
        assert_eq!(p.segment, at, "a dip decided within the segment");
        // Nor at the segment's end: still fast, and still on probation.
        assert_eq!(p.choose(dip(12e6), 2, SEGMENT_BYTES, now), FAST_LINK_ROUTE);
        let at = p.segment;
        assert_eq!(p.choose(rate(12e6), 2, 1 << 20, now), Route::Stream);
        assert_eq!(p.segment, at + 1, "the spell waited for the segment's end");
    }

    /// Where the link is slow, lighter codecs are not tried: they would only
    /// cost bytes.
    #[test]
    fn on_a_slow_link_auto_follows_the_model_without_trying() {
        let mut p = AutoPolicy::new(true, 8 << 30);
        measured_samples(&mut p);
        let routes = run(&mut p, 12.5e6, 40, |_| 40e6);
        assert!(routes.iter().all(|r| *r == Route::Stream), "{routes:?}");
    }

    /// The stream's level by the model: given a drain rate and measured
    /// costs, the level with the least time per byte (one thread's CPU
    /// against the output's link time), kept unless another is clearly
    /// faster; its first level on a fast link or without the capability.
    #[test]
    fn auto_picks_the_streams_level_by_the_link() {
        // Roughly the release cell's measured costs (docs/experiments.md,
        // "The stream's level"), CPU per byte on one thread.
        let measured = [
            (3, 0.29, 6e-9),
            (6, 0.28, 1.3e-8),
            (9, 0.268, 2.3e-8),
            (12, 0.263, 5.8e-8),
            (15, 0.261, 1.7e-7),
            (19, 0.237, 5.3e-7),
        ];
        let policy = |levels: bool, current: i32| {
            let mut p = AutoPolicy::new(true, 1 << 30);
            if levels {
                p = p.with_levels();
            }
            measured_samples(&mut p);
            for (j, (l, ratio, cpu)) in measured.iter().enumerate() {
                assert_eq!(STREAM_LEVELS[j], *l);
                if levels {
                    p.level_samples[j] = Some(Sample { ratio: *ratio, cpu_per_byte: *cpu });
                }
            }
            p.stream_level = current;
            p
        };
        let base = Sample { ratio: 0.29, cpu_per_byte: 6e-9 };
        // 2 Mbit/s: the link time of 0.237 (9.5e-7 s/B) beats level 19's CPU.
        assert_eq!(policy(true, 3).stream_cost(base, 250e3).1, 19);
        // 20 Mbit/s: level 19's CPU (5.3e-7) is over the link time of any
        // level; 12 and 15 are the best link times under their CPU...
        assert_eq!(policy(true, 3).stream_cost(base, 2.5e6).1, 12);
        // ...100 Mbit/s: 12's CPU (5.8e-8) is over 3's link time (2.3e-8);
        // level 6 (2.24e-8) is fastest, but not by 5% over 3: 3 stays...
        assert_eq!(policy(true, 3).stream_cost(base, 12.5e6).1, 3);
        // ...but from 9 (its CPU with the margin: 3.45e-8) it is: 6.
        assert_eq!(policy(true, 9).stream_cost(base, 12.5e6).1, 6);
        // Within 5% of the current level, the current one stays.
        assert_eq!(policy(true, 6).stream_cost(base, 12.5e6).1, 6);
        // At 40 MB/s (above PROBE_RATE the model is not asked, but the rule
        // holds): 9's CPU exceeds 3's cost by more than 5%: back to 3.
        assert_eq!(policy(true, 9).stream_cost(base, 40e6).1, 3);
        // Without the capability: its first level, whatever the link.
        assert_eq!(policy(false, 3).stream_cost(base, 250e3).1, 3);
    }

    /// The levels are measured lowest first, only as far as one could
    /// still win.
    #[test]
    fn auto_measures_the_levels_only_as_far_as_they_can_win() {
        let data = text(SAMPLE_BYTES);
        let mut p = AutoPolicy::new(true, 1 << 30).with_levels();
        p.sample(&data);
        // A link too slow for any CPU to matter: every level is measured.
        p.level_samples = measure_levels(&data, 1.0, 3, MAX_LEVEL);
        assert!(p.level_samples.iter().all(Option::is_some), "{:?}", p.level_samples);
        // A link just slow enough for the model: stops at the first level
        // whose CPU alone exceeds the best link time (for 1 MiB of text at
        // level 19, far more than 1 ns a byte).
        p.level_samples = measure_levels(&data, 29e6, 3, MAX_LEVEL);
        let measured = p.level_samples.iter().filter(|s| s.is_some()).count();
        assert!(measured < STREAM_LEVELS.len(), "{measured} levels measured at 29 MB/s");
    }

    const SLOW: f64 = 250e3;

    /// What the link shows at one call: its drain rate, the running spell
    /// (seconds, bytes per second) and the writer's busy seconds so far.
    fn view(drain: Option<f64>, spell: Option<(f64, f64)>, busy: f64) -> LinkView {
        LinkView {
            drain_rate: drain,
            written: 1 << 30,
            spell: spell.map(|(secs, rate)| Spell { secs, bytes: (secs * rate) as u64 }),
            busy,
            receipts: false,
            compressing: None,
        }
    }

    /// A policy that routes through the stream, on a link known slow by
    /// its first reading, with a sample of text kept.
    fn slow_policy(at: Instant) -> AutoPolicy {
        let mut p = AutoPolicy::new(true, 1 << 30).with_levels();
        p.sample(&text(SAMPLE_BYTES));
        p.observe(&text(SAMPLE_BYTES));
        assert_eq!(p.choose(view(Some(SLOW), None, 0.0), 2, 4096, at), Route::Stream);
        assert!(p.slow_link);
        p
    }

    /// A policy raised by 2.5 s of steady slow spell from now (calls
    /// 100 ms apart, the writer always busy), the instant after, and the
    /// writer's busy seconds so far.
    fn raised_policy() -> (AutoPolicy, Instant, f64) {
        let t0 = Instant::now();
        let mut p = slow_policy(t0);
        let mut b = 0.0;
        let (_, t) = feed(&mut p, t0, 25, Duration::from_millis(100), Some(SLOW), Some(SLOW), &mut b, 1.0);
        (p, t, b)
    }

    /// Feed `calls` calls `every` apart from `at`: the drain rate, and a
    /// spell (rate) that began at `at` (None: no spell), with the writer
    /// busy `share` of the time (`busy`: its seconds so far, carried from
    /// call to call). Returns the levels seen and the time after.
    #[allow(clippy::too_many_arguments)]
    fn feed(
        p: &mut AutoPolicy,
        at: Instant,
        calls: usize,
        every: Duration,
        drain: Option<f64>,
        spell: Option<f64>,
        busy: &mut f64,
        share: f64,
    ) -> (Vec<i32>, Instant) {
        let mut levels = Vec::new();
        let mut t = at;
        for i in 1..=calls {
            t = at + every * i as u32;
            *busy += share * every.as_secs_f64();
            let secs = (t - at).as_secs_f64();
            p.choose(view(drain, spell.map(|r| (secs, r)), *busy), 2, 4096, t);
            if levels.last() != Some(&p.stream_level()) {
                levels.push(p.stream_level());
            }
        }
        (levels, t)
    }

    /// The levels' first measurement starts as soon as the link reads
    /// slow and FIRST_LEVELS_BYTES were routed, without waiting for the
    /// candidates' sample, on the last FIRST_LEVELS_BYTES only; with
    /// receipts, half a second of slow spell then raises the level.
    #[test]
    fn the_first_levels_are_measured_on_a_quarter_megabyte_at_once() {
        let t0 = Instant::now();
        let mut p = AutoPolicy::new(true, 1 << 30).with_levels();
        let slow = |secs: f64| LinkView { receipts: true, ..view(Some(SLOW), Some((secs, SLOW)), secs) };
        p.observe(&text(FIRST_LEVELS_BYTES - 1));
        p.choose(slow(0.1), 2, 4096, t0);
        assert!(p.slow_link, "the link is known");
        assert!(p.level_samples[0].is_none(), "measured on less than FIRST_LEVELS_BYTES");
        // Noise, then a quarter megabyte of text: measured on the text alone.
        p.observe(&noise(SAMPLE_BYTES / 2));
        p.observe(&text(FIRST_LEVELS_BYTES));
        p.choose(slow(0.2), 2, 4096, t0 + Duration::from_millis(100));
        assert!(p.samples.iter().all(Option::is_none), "no candidates' sample was taken");
        let first = p.level_samples[0].expect("levels measured");
        assert!(first.ratio < 0.5, "measured on the noise too: {first:?}");
        assert_eq!(p.stream_level(), 3, "0.2 s of spell is not enough");
        p.choose(slow(0.5), 2, 4096, t0 + Duration::from_millis(400));
        assert!(p.stream_level() > 3, "no rise after half a second of slow spell");
    }

    /// A first measurement on fewer than SAMPLE_BYTES is followed by one
    /// on SAMPLE_BYTES as soon as that much was routed, not
    /// RESAMPLE_BYTES_LEVELS later.
    #[test]
    fn a_partial_first_measurement_is_followed_by_a_whole_one() {
        let t0 = Instant::now();
        let mut p = AutoPolicy::new(true, 1 << 30).with_levels();
        let slow = |secs: f64| LinkView { receipts: true, ..view(Some(SLOW), Some((secs, SLOW)), secs) };
        p.observe(&text(FIRST_LEVELS_BYTES));
        p.choose(slow(0.1), 2, 4096, t0);
        assert!(p.level_samples[0].is_some() && p.levels_partial);
        assert!(!p.levels_due(), "nothing routed since");
        p.observe(&text(SAMPLE_BYTES - FIRST_LEVELS_BYTES - 1));
        assert!(!p.levels_due(), "less than SAMPLE_BYTES kept");
        p.observe(&text(1));
        assert!(p.levels_due(), "SAMPLE_BYTES kept");
        p.choose(slow(0.2), 2, 4096, t0 + Duration::from_millis(100));
        assert!(!p.levels_partial && !p.levels_due(), "measured again on the whole");
    }

    /// A first rise is pending while the levels' measurement runs, and
    /// while it shows a higher level paying with the spell that decides
    /// still short, at the first level, in a copy whose stream may change
    /// level: then the stream holds its next piece for it.
    #[test]
    fn a_first_rise_is_pending_while_measured_or_waiting_for_its_spell() {
        let t0 = Instant::now();
        let mut p = slow_policy(t0);
        let ms = Duration::from_millis(100);
        let link = |secs: f64, rate: f64| LinkView { receipts: true, ..view(Some(SLOW), Some((secs, rate)), secs) };
        // Measured (unit tests collect at once), text on a slow link: a
        // higher level pays, the spell is short.
        p.choose(link(0.1, SLOW), 2, 4096, t0 + ms);
        assert!(p.level_samples[0].is_some() && p.measuring.is_none());
        assert!(p.first_rise_pending(), "a rise waiting for its spell is not pending");
        // A spell far faster: no rise waits.
        p.choose(link(0.2, SPELL_NOT_SLOW), 2, 4096, t0 + ms * 2);
        assert!(!p.first_rise_pending());
        // Slow again, and the spell long enough: raised, nothing pending.
        p.choose(link(0.3, SLOW), 2, 4096, t0 + ms * 3);
        assert!(p.first_rise_pending());
        p.choose(link(0.6, SLOW), 2, 4096, t0 + ms * 6);
        assert!(p.stream_level() > 3 && !p.first_rise_pending());
    }

    /// A policy on the stream at the first level, on a link that drains
    /// `rate` (moderately slow: between LEVELS_BELOW and MODERATE_BELOW),
    /// with a megabyte of text routed.
    fn moderate_policy(rate: f64, at: Instant) -> AutoPolicy {
        let mut p = AutoPolicy::new(true, 1 << 30).with_levels();
        p.sample(&text(SAMPLE_BYTES));
        p.observe(&text(SAMPLE_BYTES));
        assert_eq!(p.choose(view(Some(rate), None, 0.0), 2, 4096, at), Route::Stream);
        assert!(p.slow_link && p.stream_level() == 3);
        p
    }

    /// On a moderately slow link the level rises once, to at most
    /// MODERATE_LEVEL_MAX, when the receipts' spell confirms the rate;
    /// never on the writes' readings alone, nor with a spell that reads a
    /// slow link (the slow link's own rules decide there), and a reading
    /// above MODERATE_BELOW takes it back to the first level for good.
    #[test]
    fn a_moderately_slow_link_raises_the_level_once() {
        const RATE: f64 = 1.5e6;
        let t0 = Instant::now();
        let ms = Duration::from_millis(100);
        let link = |secs: f64, spell: f64| LinkView { receipts: true, ..view(Some(RATE), Some((secs, spell)), secs) };
        // Not without receipts, nor on a short spell, nor on one that
        // reads a slow link.
        let mut p = moderate_policy(RATE, t0);
        p.choose(view(Some(RATE), Some((1.0, RATE)), 1.0), 2, 4096, t0 + ms);
        p.choose(link(0.3, RATE), 2, 4096, t0 + ms * 2);
        p.choose(link(1.0, SLOW), 2, 4096, t0 + ms * 3);
        assert_eq!(p.stream_level(), 3);
        assert!(!p.moderate_measured && p.level_state == Levels::First);
        // Half a second of spell in the range: measured once, raised.
        p.choose(link(RECEIPT_SPELL_SECS + 0.3, RATE), 2, 4096, t0 + ms * 4);
        let level = p.stream_level();
        assert!(level > 3 && level <= MODERATE_LEVEL_MAX, "level {level}");
        assert!(matches!(p.level_state, Levels::Raised { rises: false, .. }));
        assert!(!p.first_rise_pending(), "the stream never holds for it");
        // It stays while the link reads moderately slow...
        p.choose(link(2.0, RATE), 2, 4096, t0 + ms * 20);
        assert_eq!(p.stream_level(), level);
        // ... and goes back for good on a faster reading.
        p.choose(LinkView { receipts: true, ..view(Some(MODERATE_BELOW * 1.5), None, 2.1) }, 2, 4096, t0 + ms * 21);
        assert_eq!((p.stream_level(), p.level_state), (3, Levels::Dropped));
    }

    /// Where no higher level keeps up with the link, the level stays, and
    /// the levels are not measured again.
    #[test]
    fn a_moderately_slow_link_keeps_the_first_level_where_the_cpu_has_no_room() {
        let rate = MODERATE_BELOW * 0.99;
        let t0 = Instant::now();
        let mut p = moderate_policy(rate, t0);
        // Noise: no level compresses it better, at any CPU.
        p.observe(&noise(SAMPLE_BYTES));
        let link = |secs: f64| LinkView { receipts: true, ..view(Some(rate), Some((secs, rate)), secs) };
        p.choose(link(1.0), 2, 4096, t0 + Duration::from_millis(100));
        assert!(p.moderate_measured);
        assert_eq!((p.stream_level(), p.level_state), (3, Levels::First));
        p.observe(&text(SAMPLE_BYTES));
        p.choose(link(2.0), 2, 4096, t0 + Duration::from_millis(200));
        assert_eq!(p.stream_level(), 3, "measured again");
    }

    /// A first rise is pending exactly while the levels' measurement runs
    /// (where no level shows paying), at the first level, in a copy whose
    /// stream may change level.
    #[test]
    fn a_first_rise_is_pending_only_while_its_measurement_runs() {
        let running = || Some(std::thread::spawn(|| [None; STREAM_LEVELS.len()]));
        let t0 = Instant::now();
        // Slow, with nothing routed to measure.
        let mut p = AutoPolicy::new(true, 1 << 30).with_levels();
        p.choose(view(Some(SLOW), None, 0.0), 2, 4096, t0);
        assert!(p.slow_link);
        assert!(!p.first_rise_pending(), "nothing is being measured");
        p.measuring = running();
        assert!(p.first_rise_pending());
        // Collected (unit tests collect at once): no longer pending.
        p.levels_tick(view(Some(SLOW), None, 0.0), 2, t0 + Duration::from_millis(10));
        assert!(p.measuring.is_none() && !p.first_rise_pending());
        // Raised already: a later measurement holds nothing.
        p.level_state = Levels::Raised {
            since: t0,
            busy: 0.0,
            compressing: 0.0,
            below: STREAM_LEVELS[0],
            rises: true,
            ceiling: LEVELS_BELOW,
        };
        p.measuring = running();
        assert!(!p.first_rise_pending());
        // A stream that cannot change level never holds.
        let mut q = AutoPolicy::new(true, 1 << 30);
        q.measuring = running();
        assert!(!q.first_rise_pending());
    }

    /// A slow reading beside a spell running far faster (a few writes that
    /// waited for the CPUs at the start of a copy) measures no levels, and
    /// so holds no piece for a rise; one beside a slow spell does, at once.
    #[test]
    fn a_slow_reading_beside_a_fast_spell_measures_no_levels() {
        let t0 = Instant::now();
        let mut p = AutoPolicy::new(true, 1 << 30).with_levels();
        p.sample(&text(SAMPLE_BYTES));
        p.observe(&text(SAMPLE_BYTES));
        let busy_start = view(Some(437e3), Some((0.1, 19e6)), 0.0);
        assert_eq!(p.choose(busy_start, 2, 4096, t0), Route::Stream);
        assert!(p.slow_link);
        assert!(p.level_samples.iter().all(Option::is_none) && !p.first_rise_pending(), "levels measured");
        p.choose(view(Some(SLOW), Some((0.1, SLOW)), 0.0), 2, 4096, t0 + Duration::from_millis(100));
        assert!(p.level_samples[0].is_some(), "a slow spell measured no levels");
    }

    /// A slow reading alone raises nothing: the writes must have blocked
    /// steadily, at that rate, for RAISE_SPELL_SECS in one spell. Then
    /// the level rises once, to the model's level.
    #[test]
    fn the_level_rises_only_after_a_steady_slow_spell() {
        let t0 = Instant::now();
        let mut p = slow_policy(t0);
        let mut b = 0.0;
        let ms = Duration::from_millis(100);
        // Slow readings, no spell (the writes waited on a busy receiver).
        let (levels, t) = feed(&mut p, t0, 50, ms, Some(SLOW), None, &mut b, 1.0);
        assert_eq!(levels, [3]);
        // A spell, but short: 1.9 s.
        let (levels, t) = feed(&mut p, t, 19, ms, Some(SLOW), Some(SLOW), &mut b, 1.0);
        assert_eq!(levels, [3]);
        // A long spell, but at a fast link's rate, the drain rate lagging.
        let (levels, t) = feed(&mut p, t, 50, ms, Some(SLOW), Some(5e6), &mut b, 1.0);
        assert_eq!(levels, [3]);
        // A slow spell with the drain rate fast: not slow.
        let (levels, t) = feed(&mut p, t, 50, ms, Some(2e6), Some(SLOW), &mut b, 1.0);
        assert_eq!(levels, [3]);
        // Slow and steady for 2 s: up, once (on text at 250 kB/s the
        // model's level is above the first).
        let mut p = slow_policy(t);
        let (levels, _) = feed(&mut p, t, 25, ms, Some(SLOW), Some(SLOW), &mut b, 1.0);
        assert_eq!(levels.len(), 2, "{levels:?}");
        assert!(levels[1] > 3, "{levels:?}");
        assert!(matches!(p.level_state, Levels::Raised { .. }));
    }

    /// With receipts (`wire::receipts`) the spell is the link's own pace
    /// behind every buffer: half a second of it decides, where the
    /// writer's spell needs two.
    #[test]
    fn with_receipts_half_a_second_of_slow_spell_raises_the_level() {
        let t0 = Instant::now();
        let mut p = slow_policy(t0);
        let mut levels = vec![p.stream_level()];
        for i in 1..=7u32 {
            let t = t0 + Duration::from_millis(100) * i;
            let secs = (t - t0).as_secs_f64();
            let link = LinkView { receipts: true, ..view(Some(SLOW), Some((secs, SLOW)), secs) };
            p.choose(link, 2, 4096, t);
            if i == 4 {
                assert_eq!(p.stream_level(), 3, "0.4 s is not enough");
            }
            if levels.last() != Some(&p.stream_level()) {
                levels.push(p.stream_level());
            }
        }
        assert_eq!(levels.len(), 2, "{levels:?}");
        assert!(levels[1] > 3, "{levels:?}");
        // The same half second from the writer's spell: nothing yet.
        let mut p = slow_policy(t0);
        let mut b = 0.0;
        let (levels, _) = feed(&mut p, t0, 7, Duration::from_millis(100), Some(SLOW), Some(SLOW), &mut b, 1.0);
        assert_eq!(levels, [3]);
    }

    /// Without the capability (or with `raise_levels` off: no
    /// `with_levels`), a slow spell changes nothing.
    #[test]
    fn without_levels_a_slow_spell_keeps_the_first_level() {
        let t0 = Instant::now();
        let mut p = AutoPolicy::new(true, 1 << 30);
        p.sample(&text(SAMPLE_BYTES));
        p.observe(&text(SAMPLE_BYTES));
        assert!(p.recent.is_empty());
        let mut b = 0.0;
        let (levels, _) = feed(&mut p, t0, 100, Duration::from_millis(100), Some(SLOW), Some(SLOW), &mut b, 1.0);
        assert_eq!(levels, [3]);
    }

    /// Raised, the level stays while the writer is busy nearly all the
    /// time; it drops back to the first for good when, over
    /// DROP_WINDOW_SECS, the writer was in writes less than half of it
    /// (the compressor set the pace), and never rises again.
    #[test]
    fn the_level_drops_once_for_good_when_the_compressor_sets_the_pace() {
        let ms = Duration::from_millis(100);
        let (mut p, t, mut b) = raised_policy();
        let raised = p.stream_level();
        // 60 s of the link busy 95% of the time: kept.
        let (levels, t) = feed(&mut p, t, 600, ms, Some(SLOW), Some(SLOW), &mut b, 0.95);
        assert_eq!(levels, [raised]);
        // The writer busy 40% of the time: down within two windows (the
        // first may still hold busier time).
        let (levels, t) = feed(&mut p, t, 45, ms, Some(SLOW), None, &mut b, 0.4);
        assert_eq!(levels, [raised, 3]);
        assert_eq!(p.level_state, Levels::Dropped);
        // Slow and steady again, for a minute, new payloads and a new
        // sample: stays 3.
        p.sample(&text(SAMPLE_BYTES));
        p.observe(&text(RESAMPLE_BYTES_LEVELS as usize));
        let (levels, _) = feed(&mut p, t, 600, ms, Some(SLOW), Some(SLOW), &mut b, 1.0);
        assert_eq!(levels, [3]);
    }

    /// Raised, the level stays when the link idled while the stream's
    /// compressor idled too (the runs came slowly: the target's
    /// signatures, its requests); it drops where the compressor was busy
    /// while the link idled.
    #[test]
    fn a_raised_level_drops_only_where_the_compressor_kept_the_link_idle() {
        let ms = Duration::from_millis(100);
        for (compressor_share, drops) in [(0.3, false), (0.8, true)] {
            let (mut p, t0, mut busy) = raised_policy();
            let raised = p.stream_level();
            let mut compressing = 0.0;
            for i in 1..=45u32 {
                busy += 0.4 * 0.1;
                compressing += compressor_share * 0.1;
                let link = LinkView { compressing: Some(compressing), ..view(Some(SLOW), Some((0.1, SLOW)), busy) };
                p.choose(link, 2, 4096, t0 + ms * i);
            }
            let level = p.stream_level();
            assert_eq!(level == 3, drops, "compressor busy {compressor_share}: level {level} (raised {raised})");
        }
    }

    /// Incompressible bytes: every level sends them alike.
    fn noise(len: usize) -> Vec<u8> {
        crate::test_data::Noise::new(0x9E37_79B9_7F4A_7C15).bytes(len)
    }

    /// The levels are measured on the last payloads routed (what the
    /// stream compresses next), not on the candidates' sample: text after
    /// noise raises the level, noise after text does not.
    #[test]
    fn the_levels_are_measured_on_the_last_payloads_routed() {
        let ms = Duration::from_millis(100);
        for (first, last, rises) in
            [(noise(SAMPLE_BYTES), text(SAMPLE_BYTES), true), (text(SAMPLE_BYTES), noise(SAMPLE_BYTES), false)]
        {
            let t0 = Instant::now();
            let mut p = AutoPolicy::new(true, 1 << 30).with_levels();
            p.sample(&first);
            p.observe(&first);
            p.observe(&last);
            assert_eq!(p.choose(view(Some(SLOW), None, 0.0), 2, 4096, t0), Route::Stream);
            let mut b = 0.0;
            let (levels, _) = feed(&mut p, t0, 25, ms, Some(SLOW), Some(SLOW), &mut b, 1.0);
            assert_eq!(levels.len() == 2 && levels[1] > 3, rises, "{levels:?}");
        }
    }

    /// The levels measured on other data than the candidates' sample (here
    /// incompressible payloads after a sample of text) do not turn the
    /// route away from the stream: it counts with its levels' ratios
    /// relative to each other, applied to its own sample.
    #[test]
    fn levels_measured_on_other_data_keep_the_stream_the_route() {
        let t0 = Instant::now();
        let mut p = AutoPolicy::new(true, 1 << 30).with_levels();
        p.sample(&text(SAMPLE_BYTES));
        p.observe(&noise(SAMPLE_BYTES));
        assert_eq!(p.choose(view(Some(SLOW), None, 0.0), 2, 4096, t0), Route::Stream);
        p.measure_recent(SLOW, STREAM_LEVELS[0], SAMPLE_BYTES);
        assert!(p.collect_levels(true));
        assert!(p.level_samples[0].is_some_and(|s| s.ratio > 0.8), "{:?}", p.level_samples[0]);
        assert_eq!(p.modelled(SLOW, 2), Route::Stream);
    }

    /// A raised level whose CPU the candidates' sample makes look slow
    /// does not turn the route away from the stream where the stream at
    /// its first level is still the cheapest route: the stream can go back
    /// to that level, while leaving it drops the level for good. The
    /// samples are those of a release copy at 2 Mbit/s that left the
    /// stream for per-run zstd:1 at level 19 and came back at level 3 for
    /// good, 28% more bytes (docs/experiments.md, session 24).
    #[test]
    fn a_costly_raised_level_keeps_the_stream_the_route_where_its_first_level_wins() {
        let mut p = AutoPolicy::new(true, 1 << 30).with_levels();
        let at = |ratio: f64, mb_s: f64| Some(Sample { ratio, cpu_per_byte: 1e-6 / mb_s });
        // none, lz4, the stream (level 3), zstd:1: very compressible data.
        p.samples = [at(1.0, f64::INFINITY), at(0.108, 952.0), at(0.050, 511.0), at(0.057, 787.0)];
        // The levels, measured on later payloads that compress less.
        p.level_samples = [None; STREAM_LEVELS.len()];
        p.level_samples[0] = at(0.22, 150.0);
        p.level_samples[STREAM_LEVELS.len() - 1] = at(0.197, 3.1);
        p.stream_level = STREAM_LEVELS[STREAM_LEVELS.len() - 1];
        p.current = Route::Stream;
        assert_eq!(p.modelled(181e3, 2), Route::Stream);
        // Where per-run zstd:1 beats even the first level, it is taken.
        p.samples[3] = at(0.040, 787.0);
        assert_eq!(p.modelled(181e3, 2), Route::Run(Codec::Zstd(1)));
    }

    /// Raised below the highest level on a slow link, the levels are
    /// measured again after every RESAMPLE_BYTES_LEVELS routed, and a
    /// higher one paying raises the level again; the drop rule still holds
    /// after it, and then nothing is kept.
    #[test]
    fn a_later_measurement_raises_the_level_again() {
        let ms = Duration::from_millis(100);
        let (mut p, t, mut b) = raised_policy();
        assert!(p.stream_level() > STREAM_LEVELS[1], "text at 250 kB/s: {}", p.stream_level());
        // As if the first rise had been taken on data that promised less
        // (the return copy's first megabytes): a lower raised level.
        p.stream_level = STREAM_LEVELS[1];
        // Nothing new routed: it stays, however long the link is slow.
        let (levels, t) = feed(&mut p, t, 50, ms, Some(SLOW), Some(SLOW), &mut b, 1.0);
        assert_eq!(levels, [STREAM_LEVELS[1]]);
        // Less than RESAMPLE_BYTES_LEVELS routed: still measured.
        let chunk = text(SAMPLE_BYTES);
        p.observe(&chunk[..SAMPLE_BYTES / 2]);
        assert!(!p.levels_due());
        // Then enough: measured again on the next call, and raised back to
        // the model's level, once. (The model's level comes from measured
        // CPU times, 15 or 19 by the host's speed: not compared with the
        // first rise's.)
        p.observe(&chunk);
        p.observe(&chunk[SAMPLE_BYTES / 2..]);
        assert!(p.levels_due());
        let (levels, t) = feed(&mut p, t, 20, ms, Some(SLOW), Some(SLOW), &mut b, 1.0);
        assert_eq!(levels.len(), 1, "{levels:?}");
        assert!(levels[0] > STREAM_LEVELS[1], "{levels:?}");
        assert!(matches!(p.level_state, Levels::Raised { .. }));
        let second = levels[0];
        // At the highest level nothing is kept any more.
        let at = p.stream_level;
        p.stream_level = STREAM_LEVELS[STREAM_LEVELS.len() - 1];
        p.observe(&chunk);
        assert!(p.recent.is_empty());
        p.stream_level = at;
        // The compressor setting the pace undoes the second rise first:
        // back to the level it rose from, which may rise no more...
        let (levels, t) = feed(&mut p, t, 21, ms, Some(SLOW), None, &mut b, 0.4);
        assert_eq!(levels, [second, STREAM_LEVELS[1]]);
        assert!(matches!(p.level_state, Levels::Raised { rises: false, .. }));
        p.observe(&chunk);
        assert!(p.recent.is_empty(), "no more rises: nothing kept");
        // ...and then, still so, the first: for good.
        let (levels, _) = feed(&mut p, t, 21, ms, Some(SLOW), None, &mut b, 0.4);
        assert_eq!(levels, [STREAM_LEVELS[1], 3]);
        assert_eq!(p.level_state, Levels::Dropped);
    }

    /// A later measurement never lowers a raised level: on data where no
    /// level pays (incompressible) it stays where it is.
    #[test]
    fn a_later_measurement_never_lowers_the_level() {
        let ms = Duration::from_millis(100);
        let (mut p, t, mut b) = raised_policy();
        let raised = p.stream_level();
        p.observe(&noise(RESAMPLE_BYTES_LEVELS as usize));
        assert!(p.levels_due());
        let (levels, _) = feed(&mut p, t, 20, ms, Some(SLOW), Some(SLOW), &mut b, 1.0);
        assert_eq!(levels, [raised]);
        assert!(!p.levels_due(), "measured again");
    }

    /// Raised, the level drops when the link stops counting as slow: a
    /// stale drain rate, or one at or above LEVELS_BELOW.
    #[test]
    fn the_level_drops_when_the_link_is_no_longer_slow() {
        let ms = Duration::from_millis(100);
        for drain in [None, Some(LEVELS_BELOW)] {
            let (mut p, t, mut b) = raised_policy();
            assert!(p.stream_level() > 3);
            let (levels, _) = feed(&mut p, t, 1, ms, drain, Some(SLOW), &mut b, 1.0);
            assert_eq!(levels, [3], "{drain:?}");
            assert_eq!(p.level_state, Levels::Dropped);
        }
    }

    /// Fast links whose receiver is busy at the start, as seen over real
    /// ssh: slow drain readings for a few seconds, writes waiting in
    /// stalls (no spell) or spells at a fast rate, then a fast link. The
    /// level never changes.
    #[test]
    fn a_busy_receiver_on_a_fast_link_never_moves_the_level() {
        let ms = Duration::from_millis(50);
        for fast in [2.5e6, 12.5e6, 1e9] {
            let t0 = Instant::now();
            let mut p = slow_policy(t0);
            let mut b = 0.0;
            let (mut all, t) = feed(&mut p, t0, 60, ms, Some(400e3), None, &mut b, 1.0);
            // Short spells between stalls, each under RAISE_SPELL_SECS.
            let mut t = t;
            for _ in 0..5 {
                let (l, t2) = feed(&mut p, t, 30, ms, Some(400e3), Some(300e3), &mut b, 1.0);
                all.extend(l);
                t = t2 + Duration::from_millis(500);
            }
            // The stall ends: a long spell at the link's rate, the drain
            // rate still reading slow for a while.
            let (l, t) = feed(&mut p, t, 60, ms, Some(400e3), Some(fast), &mut b, 1.0);
            all.extend(l);
            let (l, _) = feed(&mut p, t, 400, ms, Some(fast), Some(fast), &mut b, 1.0);
            all.extend(l);
            assert!(all.iter().all(|&l| l == 3), "at {fast}: {all:?}");
        }
    }
}

//! One zstd stream per copy, across runs (capability
//! [`CAP_ZSTD_STREAM`](crate::wire::protocol::CAP_ZSTD_STREAM)).
//!
//! Why: runs compressed one by one start with an empty history each time,
//! so a block that repeats data from a run sent earlier (the same library in
//! two places, a file's second copy) pays for it again. A whole-stream
//! compressor keeps its history: with one compression context on the source
//! and one decompression context on the target, each run is compressed with
//! everything sent before it as history (long-distance matching over a
//! window of up to [`WINDOW_LOG_MAX`]), and the stream is flushed after each
//! run so that every `Blocks` frame decompresses on its own arrival, in the
//! order the frames were written.
//!
//! The order is the contract: the source compresses runs in exactly the
//! order it writes their frames (one thread owns the encoder, see
//! `copy::source`), and the target decompresses `Blocks` frames of codec
//! [`STREAM_CODE`] in the order it reads them. Runs sent with a per-run
//! codec (or raw) do not pass through the stream on either end.
//!
//! Memory: the source picks the window from the image size, at most
//! 2^[`WINDOW_LOG_MAX`] bytes; the target's decoder refuses a stream whose
//! frame asks for a larger window (zstd's `windowLogMax`), so a hostile
//! source cannot make it allocate more than that bound plus a run. Each
//! payload must expand to exactly the run's declared length, checked before
//! anything is written; every block is then checked against its key as
//! always.
//!
//! A shared reference (capability
//! [`CAP_SHARED_REF`](crate::wire::protocol::CAP_SHARED_REF)): when both
//! ends hold the same reference image, the stream starts with that image's
//! bytes as its prefix (zstd's `refPrefix`, what `zstd --patch-from` does),
//! so a missing block that resembles any part of the reference costs only
//! the difference. The window then covers the prefix and the image
//! ([`window_log_with_prefix`]), up to 2^[`WINDOW_LOG_PREFIX_MAX`]; both
//! ends compute it from the agreed reference's and the image's sizes, and
//! the target refuses a stream asking for more. Each end holds the prefix
//! in memory (read once, hashed from memory: never a mapping of a file that
//! may change), so the reference's size is the memory this costs, besides
//! the part of the window the stream fills.
//!
//! The level (capability
//! [`CAP_STREAM_LEVELS`](crate::wire::protocol::CAP_STREAM_LEVELS)): on a
//! slow link the CPU is mostly idle and a higher level sends fewer bytes,
//! but how slow the link is becomes known only after the stream has begun
//! (`auto`'s drain rate needs blocked writes). libzstd applies a new
//! `compressionLevel` inside a frame only in multithreaded mode, where each
//! flush ends a job and the next job re-indexes a slice of the window as
//! its history: with a flush per run that is a re-index per run and a
//! history cut to that slice, so that is not used. Nor is a new stream per
//! level, which would start with no history. Instead the source ends the
//! frame and starts the next one at the new level with the last
//! [`LEVEL_PREFIX`] bytes of the stream's content as its prefix (zstd's
//! `refPrefix`); the target, when a frame ends, gives the next frame the
//! same bytes, the last [`LEVEL_PREFIX`] bytes it decoded. Both ends keep
//! that tail only with the capability agreed (a copy of what passes
//! through, at most [`LEVEL_PREFIX`], plus the frozen prefix of the
//! running frame: 2 x 16 MiB each end, besides the window), and the window
//! bound is unchanged: every frame's window is checked against the same
//! `windowLogMax`. Above [`LEVEL_PREFIX_HIGH_ABOVE`] the source indexes
//! only the tail's last [`LEVEL_PREFIX_HIGH`] bytes (a new frame at level
//! 19 would otherwise cost seconds); the target's longer prefix ends with
//! the same bytes, so the frame decodes the same. A stream that began with a shared reference keeps its
//! level (a new frame would lose the reference); so does `--compress
//! zstd:L`.
//!
//! A shared reference taken late (capability
//! [`CAP_LATE_REF`](crate::wire::protocol::CAP_LATE_REF)): reading,
//! hashing and indexing a reference costs about a second for 316 MB on
//! each end, which a return migration of 2 MB or a template clone whose
//! new blocks the reference lacks never earns back. So the stream may
//! begin without it and take it at a frame boundary, as a level change
//! does: the source makes the new frame's encoder
//! ([`StreamEncoder::with_prefix`], primed) on a thread of its own while
//! the running one goes on, then swaps it in
//! ([`StreamEncoder::begin_reference_frame`]) and marks the piece
//! [`STREAM_REF_CODE`]; the target gives the frame that begins in that
//! piece the reference instead of the tail
//! ([`StreamDecoder::reference_next_frame`]), with the reference's window
//! bound. The stream's history before it is not in that frame's window
//! (the reference is); it is the last frame.

use std::collections::VecDeque;
use std::sync::Arc;

use thiserror::Error;
use zstd::stream::raw::{CParameter, DParameter, InBuffer, OutBuffer};
use zstd::zstd_safe::{CCtx, DCtx, ResetDirective};

use super::compress::CodecError;

/// The codec code of a `Blocks` payload that is the next flushed piece of
/// the copy's stream.
pub const STREAM_CODE: u8 = 4;

/// Largest window either end uses: 128 MiB of history. The bound both ends
/// agree on by agreeing on the capability; the target allocates at most this
/// much for the window (plus a run).
pub const WINDOW_LOG_MAX: u32 = 27;

/// The codec code of a stream piece in which the running frame ends and
/// the next begins with the agreed shared reference as its prefix
/// (capability [`CAP_LATE_REF`](crate::wire::protocol::CAP_LATE_REF));
/// otherwise a piece as [`STREAM_CODE`]. As the first piece, the stream's
/// first frame has that prefix.
pub const STREAM_REF_CODE: u8 = 5;

/// The codec code of a stream piece as [`STREAM_CODE`] that also says
/// the source has read the chosen reference and will take it late once
/// indexed (capability
/// [`CAP_LATE_REF`](crate::wire::protocol::CAP_LATE_REF)): the target
/// starts reading its copy, so that both are ready about together. Only
/// a hint: a [`STREAM_REF_CODE`] piece may come without it (the target
/// then reads its copy when that comes) or never after it.
pub const STREAM_REF_SOON_CODE: u8 = 6;

/// Whether a payload of codec `code` is a piece of the copy's stream
/// ([`STREAM_CODE`], [`STREAM_REF_CODE`] or [`STREAM_REF_SOON_CODE`]).
pub fn is_stream_code(code: u8) -> bool {
    matches!(code, STREAM_CODE | STREAM_REF_CODE | STREAM_REF_SOON_CODE)
}

/// Largest window with a shared reference as prefix: zstd's bound on
/// 64-bit hosts (2 GiB). A reference and image larger than that together
/// still work; the oldest of the reference slides out of reach.
pub const WINDOW_LOG_PREFIX_MAX: u32 = 31;

/// Smallest window the source picks (zstd's levels use 2^19..2^21 anyway).
const WINDOW_LOG_MIN: u32 = 20;

/// The zstd level `auto` starts the stream at, and keeps while the link is
/// fast or unknown (zstd's default, the level the experiments compare
/// against).
pub const AUTO_LEVEL: i32 = 3;

/// Bytes of the stream's content a new frame (a level change) starts with
/// as its prefix: the same on both ends, part of the capability. 16 MiB:
/// what the source re-indexes at the new level (a few seconds at level 19,
/// on a link slow enough for level 19), and what each end keeps besides the
/// window.
pub const LEVEL_PREFIX: usize = 16 << 20;

/// Above this level the source's new frame uses only the last
/// [`LEVEL_PREFIX_HIGH`] bytes of the tail as its prefix. Indexing a prefix
/// costs about what compressing it would: 16 MiB at level 19 took 6.6 s of
/// CPU (`zstd -19 --patch-from`, one thread; 4 MiB: 1.1 s, 2 MiB: 0.6 s;
/// level 12: 0.34 s for 16 MiB), during which the stream sends nothing.
/// The target still gives the frame all [`LEVEL_PREFIX`] bytes: the
/// source's prefix is their end, so every match it finds is there too,
/// at the same distance, and nothing changes on the wire.
pub const LEVEL_PREFIX_HIGH_ABOVE: i32 = 12;
/// See [`LEVEL_PREFIX_HIGH_ABOVE`]: about a second of level 19.
pub const LEVEL_PREFIX_HIGH: usize = 4 << 20;

/// Content a frame carries at least before the next may begin: each new
/// frame costs the target a copy of the tail (up to [`LEVEL_PREFIX`]), so
/// this bounds that copying to 16 bytes per byte decoded, whatever a
/// source sends. The source waits for it before it changes level.
pub const LEVEL_FRAME_MIN: u64 = 1 << 20;

#[derive(Debug, Error)]
#[error("zstd stream: {0}")]
pub struct StreamError(String);

fn zerr(code: usize) -> String {
    zstd::zstd_safe::get_error_name(code).to_string()
}

/// The window for an image of `size` bytes: the whole image if it fits
/// under the bound, so a small copy does not make either end allocate the
/// full window.
pub fn window_log_for(size: u64) -> u32 {
    let need = 64 - size.saturating_sub(1).leading_zeros();
    need.clamp(WINDOW_LOG_MIN, WINDOW_LOG_MAX)
}

/// The window for a stream whose prefix is `prefix_len` bytes, for an
/// image of `size` bytes: prefix and image together, up to
/// 2^[`WINDOW_LOG_PREFIX_MAX`]. Both ends compute it from the agreed sizes.
pub fn window_log_with_prefix(prefix_len: u64, size: u64) -> u32 {
    let total = prefix_len.saturating_add(size);
    let need = 64 - total.saturating_sub(1).leading_zeros();
    need.clamp(WINDOW_LOG_MIN, WINDOW_LOG_PREFIX_MAX)
}

/// `prefix` as a slice zstd's context may keep.
///
/// # Safety
/// The caller keeps the `Arc` alive, unchanged, for as long as the
/// returned slice is used (here: in the `prefix` field of the same
/// encoder or decoder, declared after the context that borrows it, so
/// dropped after it, and replaced only once the frame that used it ended).
unsafe fn extend(prefix: &Arc<[u8]>) -> &'static [u8] {
    // SAFETY: an Arc's data never moves while a strong count exists, and
    // `[u8]` behind an Arc is never mutated (no `get_mut` is ever called on
    // it); the caller's contract keeps that count for the slice's life.
    unsafe { &*Arc::as_ptr(prefix) }
}

/// The last [`LEVEL_PREFIX`] bytes of the stream's content: the next
/// frame's prefix.
#[derive(Default)]
struct Tail(VecDeque<u8>);

impl Tail {
    fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(LEVEL_PREFIX)..];
        let excess = (self.0.len() + data.len()).saturating_sub(LEVEL_PREFIX);
        self.0.drain(..excess);
        self.0.extend(data);
    }

    /// A copy that stays unchanged for the frame that uses it.
    fn freeze(&self) -> Arc<[u8]> {
        self.freeze_last(LEVEL_PREFIX)
    }

    /// A copy of its last `n` bytes at most.
    fn freeze_last(&self, n: usize) -> Arc<[u8]> {
        let skip = self.0.len().saturating_sub(n);
        self.0.range(skip..).copied().collect::<Vec<u8>>().into()
    }
}

/// The source's end of the stream.
pub struct StreamEncoder {
    ctx: CCtx<'static>,
    /// The running frame's prefix, which `ctx` borrows: declared after it,
    /// so dropped after it.
    prefix: Option<Arc<[u8]>>,
    /// Bytes [`prime`](Self::prime) or a level change made that no piece
    /// has carried yet.
    primed: Vec<u8>,
    level: i32,
    /// The content's tail, kept when the level may change
    /// ([`follow_levels`](Self::follow_levels)).
    tail: Option<Tail>,
    /// Content compressed in the running frame, and in all.
    frame_content: u64,
    content: u64,
}

impl StreamEncoder {
    /// A stream at `level` with long-distance matching over 2^`window_log`
    /// bytes (at most [`WINDOW_LOG_MAX`]).
    pub fn new(level: i32, window_log: u32) -> Result<StreamEncoder, StreamError> {
        Self::configure(CCtx::create(), None, level, window_log.min(WINDOW_LOG_MAX))
    }

    /// A stream at `level` whose history starts with `prefix` (a reference
    /// the target holds too), with the window
    /// [`window_log_with_prefix`]`(prefix, image_size)`.
    pub fn with_prefix(level: i32, prefix: Arc<[u8]>, image_size: u64) -> Result<StreamEncoder, StreamError> {
        let window_log = window_log_with_prefix(prefix.len() as u64, image_size);
        let mut ctx = CCtx::create();
        // SAFETY: `prefix` goes into the `prefix` field of the encoder that
        // owns `ctx`, and is dropped after it.
        let slice = unsafe { extend(&prefix) };
        ctx.ref_prefix(slice).map_err(|c| StreamError(zerr(c)))?;
        Self::configure(ctx, Some(prefix), level, window_log)
    }

    fn configure(
        mut ctx: CCtx<'static>,
        prefix: Option<Arc<[u8]>>,
        level: i32,
        window_log: u32,
    ) -> Result<StreamEncoder, StreamError> {
        let e = |c: usize| StreamError(zerr(c));
        ctx.set_parameter(CParameter::CompressionLevel(level)).map_err(e)?;
        ctx.set_parameter(CParameter::WindowLog(window_log)).map_err(e)?;
        ctx.set_parameter(CParameter::EnableLongDistanceMatching(true)).map_err(e)?;
        // Blocks are verified by their digests; zstd's checksum would only
        // cost bytes (and a streamed frame never ends anyway).
        ctx.set_parameter(CParameter::ChecksumFlag(false)).map_err(e)?;
        Ok(StreamEncoder { ctx, prefix, primed: Vec::new(), level, tail: None, frame_content: 0, content: 0 })
    }

    /// Allow [`set_level`](Self::set_level): the target follows level
    /// changes (`CAP_STREAM_LEVELS` agreed). Not for a stream with a shared
    /// reference, which a new frame would lose.
    pub fn follow_levels(mut self) -> StreamEncoder {
        if self.prefix.is_none() {
            self.tail = Some(Tail::default());
        }
        self
    }

    /// Whether the target follows level changes (`follow_levels`).
    pub fn follows_levels(&self) -> bool {
        self.tail.is_some()
    }

    /// Whether [`set_level`](Self::set_level) may be called now: the
    /// target follows, and the running frame carried [`LEVEL_FRAME_MIN`].
    pub fn can_change_level(&self) -> bool {
        self.tail.is_some() && self.frame_content >= LEVEL_FRAME_MIN
    }

    /// A copy of the stream's recent content (the last
    /// [`LEVEL_PREFIX`] bytes), kept where the target follows frames.
    pub fn recent(&self) -> Option<Arc<[u8]>> {
        self.tail.as_ref().map(Tail::freeze)
    }

    /// Content compressed so far, all frames.
    pub fn content(&self) -> u64 {
        self.content
    }

    /// The level the next piece is compressed at.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Compress from the next piece on at `level`: end the running frame
    /// (its last bytes ride with the next piece) and begin one at `level`
    /// whose prefix is the stream's last [`LEVEL_PREFIX`] bytes, as the
    /// target's decoder will give it (above [`LEVEL_PREFIX_HIGH_ABOVE`],
    /// only their last [`LEVEL_PREFIX_HIGH`]). Indexing that prefix at the
    /// new level is this call's cost.
    pub fn set_level(&mut self, level: i32) -> Result<(), StreamError> {
        if level == self.level {
            return Ok(());
        }
        if self.tail.is_none() {
            return Err(StreamError("the level of a stream the target cannot follow changes in".into()));
        }
        if self.frame_content < LEVEL_FRAME_MIN {
            return Err(StreamError(format!(
                "a level change after {} bytes of the frame, before the {LEVEL_FRAME_MIN} the target asks",
                self.frame_content
            )));
        }
        let e = |c: usize| StreamError(zerr(c));
        self.end_frame()?;
        let tail = self.tail.as_ref().expect("checked above");
        let prefix = tail.freeze_last(if level > LEVEL_PREFIX_HIGH_ABOVE { LEVEL_PREFIX_HIGH } else { LEVEL_PREFIX });
        self.ctx.reset(ResetDirective::SessionOnly).map_err(e)?;
        self.ctx.set_parameter(CParameter::CompressionLevel(level)).map_err(e)?;
        // SAFETY: `prefix` goes into `self.prefix`, dropped after `ctx` and
        // replaced only by the next level change, once this frame ended.
        let slice = unsafe { extend(&prefix) };
        self.ctx.ref_prefix(slice).map_err(e)?;
        // The previous prefix belonged to the frame that just ended.
        self.prefix = Some(prefix);
        self.level = level;
        self.frame_content = 0;
        Ok(())
    }

    /// End the running frame; its last bytes ride with the next piece.
    fn end_frame(&mut self) -> Result<(), StreamError> {
        let mut out = std::mem::take(&mut self.primed);
        loop {
            out.reserve(1 << 10);
            let pos = out.len();
            let mut o = OutBuffer::around_pos(&mut out, pos);
            if self.ctx.end_stream(&mut o).map_err(|c| StreamError(zerr(c)))? == 0 {
                break;
            }
        }
        self.primed = out;
        Ok(())
    }

    /// Continue as `next`, a stream made by [`with_prefix`](Self::with_prefix)
    /// (and [`prime`](Self::prime)d: its prefix indexed on another thread
    /// while this one kept compressing): the running frame ends, its last
    /// bytes riding with the next piece, which the source sends as
    /// [`STREAM_REF_CODE`]; the next frame is `next`'s, with the shared
    /// reference as its prefix, and the last one the stream begins (its
    /// level stays). Allowed where a level change is
    /// ([`can_change_level`](Self::can_change_level)).
    pub fn begin_reference_frame(&mut self, next: StreamEncoder) -> Result<(), StreamError> {
        if !self.can_change_level() {
            return Err(StreamError(format!(
                "a reference's frame after {} bytes of a frame the target cannot end (or before the {LEVEL_FRAME_MIN} \
                 it asks)",
                self.frame_content
            )));
        }
        self.end_frame()?;
        let end = std::mem::take(&mut self.primed);
        let content = self.content;
        // The old context goes before the prefix it borrowed (field order).
        *self = next;
        self.primed = [end, std::mem::take(&mut self.primed)].concat();
        self.tail = None;
        self.content += content;
        Ok(())
    }

    /// Start the stream now, with nothing in it: with a prefix, this is
    /// when zstd indexes it (about 2 s a GiB at level 3 with long-distance
    /// matching), which would otherwise delay the first run. Whatever
    /// bytes zstd already writes ride with the next piece.
    pub fn prime(&mut self) -> Result<(), StreamError> {
        let mut out = vec![0u8; 1 << 10];
        let mut input = InBuffer::around(&[]);
        let mut o = OutBuffer::around(&mut out[..]);
        self.ctx.compress_stream(&mut o, &mut input).map_err(|c| StreamError(zerr(c)))?;
        let n = o.pos();
        self.primed.extend_from_slice(&out[..n]);
        Ok(())
    }

    /// Compress `data` as the next piece of the stream and flush it, so that
    /// the returned bytes decompress to exactly `data` once every earlier
    /// piece has been decompressed.
    pub fn compress_run(&mut self, data: &[u8]) -> Result<Vec<u8>, StreamError> {
        let e = |c: usize| StreamError(zerr(c));
        let mut out: Vec<u8> = std::mem::take(&mut self.primed);
        out.reserve(zstd::zstd_safe::compress_bound(data.len()) + 128);
        let mut input = InBuffer::around(data);
        while input.pos() < data.len() {
            if out.capacity() == out.len() {
                out.reserve(64 << 10);
            }
            let pos = out.len();
            let mut o = OutBuffer::around_pos(&mut out, pos);
            self.ctx.compress_stream(&mut o, &mut input).map_err(e)?;
        }
        loop {
            if out.capacity() == out.len() {
                out.reserve(64 << 10);
            }
            let pos = out.len();
            let mut o = OutBuffer::around_pos(&mut out, pos);
            if self.ctx.flush_stream(&mut o).map_err(e)? == 0 {
                break;
            }
        }
        if let Some(t) = &mut self.tail {
            t.push(data);
        }
        self.frame_content += data.len() as u64;
        self.content += data.len() as u64;
        Ok(out)
    }
}

/// The target's end of the stream.
pub struct StreamDecoder {
    ctx: DCtx<'static>,
    /// The running frame's prefix, which `ctx` borrows: declared after it,
    /// so dropped after it.
    prefix: Option<Arc<[u8]>>,
    /// The content's tail, kept when the source may change levels.
    tail: Option<Tail>,
    /// A frame ended: the next one starts with the tail as its prefix.
    frame_ended: bool,
    /// The next frame's prefix is this shared reference, within this
    /// window, instead of the tail (a piece of [`STREAM_REF_CODE`]).
    reference_next: Option<(Arc<[u8]>, u32)>,
    /// Frames begun (0 until a piece is decoded).
    frames: u64,
    /// Content decoded before the running piece, and where the running
    /// frame began in it.
    decoded: u64,
    frame_began: u64,
}

impl StreamDecoder {
    pub fn new() -> Result<StreamDecoder, StreamError> {
        Self::bounded(DCtx::create(), None, WINDOW_LOG_MAX)
    }

    /// The decoder of a stream whose history starts with `prefix` (the
    /// agreed reference, as this end holds it), refusing a window larger
    /// than [`window_log_with_prefix`]`(prefix, image_size)`.
    pub fn with_prefix(prefix: Arc<[u8]>, image_size: u64) -> Result<StreamDecoder, StreamError> {
        let window_log = window_log_with_prefix(prefix.len() as u64, image_size);
        let mut ctx = DCtx::create();
        // SAFETY: `prefix` goes into the `prefix` field of the decoder that
        // owns `ctx`, and is dropped after it.
        let slice = unsafe { extend(&prefix) };
        ctx.ref_prefix(slice).map_err(|c| StreamError(zerr(c)))?;
        Self::bounded(ctx, Some(prefix), window_log)
    }

    fn bounded(
        mut ctx: DCtx<'static>,
        prefix: Option<Arc<[u8]>>,
        window_log: u32,
    ) -> Result<StreamDecoder, StreamError> {
        // The memory bound: a frame declaring a larger window is an error,
        // not an allocation. (A parameter: it holds for every frame.)
        ctx.set_parameter(DParameter::WindowLogMax(window_log)).map_err(|c| StreamError(zerr(c)))?;
        Ok(StreamDecoder {
            ctx,
            prefix,
            tail: None,
            reference_next: None,
            frame_ended: false,
            frames: 0,
            decoded: 0,
            frame_began: 0,
        })
    }

    /// Follow the source's level changes (`CAP_STREAM_LEVELS` agreed): a
    /// frame after the first starts with the last [`LEVEL_PREFIX`] bytes
    /// decoded as its prefix. Not with a shared reference: a source that
    /// began with one never changes level.
    pub fn follow_levels(mut self) -> StreamDecoder {
        if self.prefix.is_none() {
            self.tail = Some(Tail::default());
        }
        self
    }

    /// Frames of the stream decoded so far: one per level the source used.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Content decoded so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    /// The frame that begins next (in the next piece, a
    /// [`STREAM_REF_CODE`] one) has `reference` as its prefix, bounded by
    /// [`window_log_with_prefix`]`(reference, image_size)` instead of the
    /// first frame's window; it is the last frame the decoder follows
    /// (no tail is kept after it). Only while following levels: the
    /// reference's frame begins where a level change's would.
    pub fn reference_next_frame(&mut self, reference: Arc<[u8]>, image_size: u64) -> Result<(), String> {
        if self.tail.is_none() {
            return Err("a frame with the shared reference, in a stream that begins no frame".into());
        }
        let window_log = window_log_with_prefix(reference.len() as u64, image_size);
        self.reference_next = Some((reference, window_log));
        Ok(())
    }

    /// Whether [`reference_next_frame`](Self::reference_next_frame)'s
    /// frame is still to begin.
    pub fn reference_pending(&self) -> bool {
        self.reference_next.is_some()
    }

    /// Give the next frame, beginning after `at` bytes of content, its
    /// prefix: the tail, which holds everything decoded before it (or the
    /// shared reference, once, if a piece said so).
    fn next_frame(&mut self, at: u64) -> Result<(), String> {
        self.frame_ended = false;
        self.frames += 1;
        let carried = at - self.frame_began;
        self.frame_began = at;
        // Without the capability frames are independent, as zstd decodes them.
        let Some(tail) = self.tail.take() else { return Ok(()) };
        if carried < LEVEL_FRAME_MIN {
            return Err(format!("a frame of {carried} bytes before the next, less than {LEVEL_FRAME_MIN}"));
        }
        let prefix = match self.reference_next.take() {
            Some((reference, window_log)) => {
                // Between frames, as refPrefix: the reference's window bound
                // holds from this frame on, and no tail is kept after it.
                self.ctx.set_parameter(DParameter::WindowLogMax(window_log)).map_err(zerr)?;
                reference
            }
            None => {
                let prefix = tail.freeze();
                self.tail = Some(tail);
                prefix
            }
        };
        // SAFETY: `prefix` goes into `self.prefix`, dropped after `ctx` and
        // replaced only at the next frame's start, once this one ended.
        let slice = unsafe { extend(&prefix) };
        self.ctx.ref_prefix(slice).map_err(zerr)?;
        self.prefix = Some(prefix);
        Ok(())
    }

    /// Decompress the next piece of the stream, which must expand to
    /// exactly `raw_len` bytes (at most `raw_len + 1` are ever produced, so
    /// a piece claiming less than it holds is caught without growing).
    /// After an error the stream is unusable; the copy fails.
    pub fn decompress_run(&mut self, payload: &[u8], raw_len: usize) -> Result<Vec<u8>, CodecError> {
        let corrupt = |detail: String| CodecError::Corrupt { codec: "zstd-stream", detail };
        self.frames = self.frames.max(1);
        let mut out = vec![0u8; raw_len + 1];
        let mut input = InBuffer::around(payload);
        // Output bytes so far, and how many of them the tail holds already.
        let (mut got, mut kept) = (0, 0);
        loop {
            if self.frame_ended && input.pos() < payload.len() {
                // (the level changed between runs: nothing of this piece
                // was decoded yet, unless the source ended a frame mid-run)
                if let Some(t) = &mut self.tail {
                    t.push(&out[kept..got]);
                    kept = got;
                }
                self.next_frame(self.decoded + got as u64).map_err(corrupt)?;
            }
            let before = (input.pos(), got);
            let mut o = OutBuffer::around_pos(&mut out[..], got);
            let left = self.ctx.decompress_stream(&mut o, &mut input).map_err(|c| corrupt(zerr(c)))?;
            got = o.pos();
            if left == 0 {
                self.frame_ended = true;
            }
            let done = input.pos() == payload.len() && got < out.len();
            // A full output (one byte past the run) or no progress ends it.
            if done || got == out.len() || (input.pos(), got) == before {
                break;
            }
        }
        let used = input.pos();
        if got != raw_len {
            return Err(CodecError::Length { codec: "zstd-stream", got, want: raw_len });
        }
        if used != payload.len() {
            return Err(corrupt(format!("{} bytes of the payload left undecoded", payload.len() - used)));
        }
        out.truncate(raw_len);
        if let Some(t) = &mut self.tail {
            t.push(&out[kept..]);
        }
        self.decoded += raw_len as u64;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zstd::stream::raw::{Encoder, Operation};

    /// Runs that repeat data from earlier runs: the stream finds it, runs
    /// compressed one by one do not.
    fn runs() -> Vec<Vec<u8>> {
        let mut rng = crate::test_data::Noise::new(7);
        let mut noise = |n: usize| rng.bytes(n);
        let a = noise(256 << 10);
        let b = noise(64 << 10);
        vec![a.clone(), b.clone(), [b.clone(), a[1000..90_000].to_vec()].concat(), a.clone(), vec![5; 4096]]
    }

    #[test]
    fn runs_round_trip_in_order_and_history_pays() {
        let mut enc = StreamEncoder::new(3, window_log_for(1 << 30)).unwrap();
        let mut dec = StreamDecoder::new().unwrap();
        let (mut streamed, mut alone) = (0, 0);
        for r in runs() {
            let p = enc.compress_run(&r).unwrap();
            streamed += p.len();
            alone += zstd::bulk::compress(&r, 3).unwrap().len();
            assert_eq!(dec.decompress_run(&p, r.len()).unwrap(), r);
        }
        // The repeated 256 KiB of noise costs almost nothing the second time.
        assert!(streamed * 10 < alone * 6, "streamed {streamed}, run by run {alone}");
    }

    #[test]
    fn a_wrong_length_or_a_corrupt_piece_is_an_error() {
        let rs = runs();
        let mut enc = StreamEncoder::new(3, 22).unwrap();
        let pieces: Vec<Vec<u8>> = rs.iter().map(|r| enc.compress_run(r).unwrap()).collect();
        // Claiming fewer bytes than the piece holds.
        let mut dec = StreamDecoder::new().unwrap();
        assert!(matches!(dec.decompress_run(&pieces[0], rs[0].len() - 1), Err(CodecError::Length { .. })));
        // Claiming more.
        let mut dec = StreamDecoder::new().unwrap();
        assert!(matches!(dec.decompress_run(&pieces[0], rs[0].len() + 1), Err(CodecError::Length { .. })));
        // A piece cut short.
        let mut dec = StreamDecoder::new().unwrap();
        let cut = &pieces[0][..pieces[0].len() / 2];
        assert!(dec.decompress_run(cut, rs[0].len()).is_err());
        // Pieces out of order: the second one alone has no frame header.
        let mut dec = StreamDecoder::new().unwrap();
        assert!(dec.decompress_run(&pieces[1], rs[1].len()).is_err());
        // Flipped bytes never come back as the run (zstd errors or the
        // output differs; the caller then fails on the block's key).
        for at in [0, 5, pieces[2].len() / 2, pieces[2].len() - 1] {
            let mut dec = StreamDecoder::new().unwrap();
            dec.decompress_run(&pieces[0], rs[0].len()).unwrap();
            dec.decompress_run(&pieces[1], rs[1].len()).unwrap();
            let mut bad = pieces[2].clone();
            bad[at] ^= 0x40;
            if let Ok(out) = dec.decompress_run(&bad, rs[2].len()) {
                assert_ne!(out, rs[2], "flip at {at} went unnoticed");
            }
        }
    }

    #[test]
    fn a_window_over_the_bound_is_refused_not_allocated() {
        // A source (here: zstd itself) asking for a 1 GiB window.
        let mut big = Encoder::new(3).unwrap();
        big.set_parameter(CParameter::WindowLog(30)).unwrap();
        let mut out = vec![0u8; 1 << 16];
        let data = vec![1u8; 1000];
        let mut input = InBuffer::around(&data);
        let mut o = OutBuffer::around(&mut out[..]);
        big.run(&mut input, &mut o).unwrap();
        while big.flush(&mut o).unwrap() != 0 {}
        let n = o.pos();
        let e = StreamDecoder::new().unwrap().decompress_run(&out[..n], data.len()).unwrap_err();
        assert!(e.to_string().contains("zstd-stream"), "{e}");
    }

    /// A reference both ends hold: runs that resemble it cost little, they
    /// round-trip, and a decoder with other prefix bytes never returns them.
    #[test]
    fn a_shared_prefix_pays_and_must_be_the_same_on_both_ends() {
        let rs = runs();
        let prefix: Arc<[u8]> = rs[0].iter().chain(rs[1].iter()).copied().collect::<Vec<u8>>().into();
        // What is sent: edits of the prefix's data.
        let mut edited = prefix[..200_000].to_vec();
        for i in (0..edited.len()).step_by(4000) {
            edited[i] ^= 1;
        }
        let image = 1 << 20;
        let mut plain = StreamEncoder::new(3, window_log_for(image)).unwrap();
        let mut enc = StreamEncoder::with_prefix(3, prefix.clone(), image).unwrap();
        enc.prime().unwrap(); // (indexes the prefix ahead; changes nothing the target sees)
        let without = plain.compress_run(&edited).unwrap();
        let with = enc.compress_run(&edited).unwrap();
        assert!(with.len() * 5 < without.len(), "with the prefix {}, without {}", with.len(), without.len());
        let mut dec = StreamDecoder::with_prefix(prefix.clone(), image).unwrap();
        assert_eq!(dec.decompress_run(&with, edited.len()).unwrap(), edited);
        // The same size of prefix, other bytes: never the run.
        let mut other = prefix.to_vec();
        for b in other.iter_mut().step_by(7) {
            *b = b.wrapping_add(1);
        }
        let mut dec = StreamDecoder::with_prefix(other.into(), image).unwrap();
        if let Ok(out) = dec.decompress_run(&with, edited.len()) {
            assert_ne!(out, edited);
        }
        // No prefix at all: never the run either.
        let mut dec = StreamDecoder::new().unwrap();
        if let Ok(out) = dec.decompress_run(&with, edited.len()) {
            assert_ne!(out, edited);
        }
    }

    /// The target computes the window from the agreed sizes and refuses a
    /// stream that asks for more (here: a source claiming a larger image).
    #[test]
    fn a_prefixed_window_over_what_the_sizes_allow_is_refused() {
        let prefix: Arc<[u8]> = vec![7u8; 1 << 20].into();
        let mut enc = StreamEncoder::with_prefix(3, prefix.clone(), 64 << 20).unwrap();
        let run = vec![7u8; 4096];
        let piece = enc.compress_run(&run).unwrap();
        let mut dec = StreamDecoder::with_prefix(prefix, 1 << 20).unwrap();
        assert!(dec.decompress_run(&piece, run.len()).is_err());
        assert_eq!(window_log_with_prefix(1 << 20, 1 << 20), WINDOW_LOG_MIN + 1);
        assert_eq!(window_log_with_prefix(300 << 20, 300 << 20), 30);
        assert_eq!(window_log_with_prefix(u64::MAX, u64::MAX), WINDOW_LOG_PREFIX_MAX);
    }

    #[test]
    fn the_window_follows_the_image_up_to_the_bound() {
        assert_eq!(window_log_for(0), WINDOW_LOG_MIN);
        assert_eq!(window_log_for(4 << 20), 22);
        assert_eq!(window_log_for((4 << 20) + 1), 23);
        assert_eq!(window_log_for(u64::MAX), WINDOW_LOG_MAX);
    }

    /// The level changes mid-stream: every piece still decodes in order,
    /// and the history before the change still pays after it (the new
    /// frame's prefix is the content's tail).
    #[test]
    fn a_level_change_keeps_the_history() {
        // The test's runs, each after a megabyte of text (a frame carries
        // at least LEVEL_FRAME_MIN before the level may change).
        let filler = |seed: usize| -> Vec<u8> {
            (0..LEVEL_FRAME_MIN as usize).map(|i| b"guest disk xen lvm "[(i * 7 + seed + i / 4096) % 19]).collect()
        };
        let rs: Vec<Vec<u8>> = runs().into_iter().enumerate().flat_map(|(i, r)| [filler(i), r]).collect();
        let mut enc = StreamEncoder::new(3, window_log_for(1 << 30)).unwrap().follow_levels();
        let mut dec = StreamDecoder::new().unwrap().follow_levels();
        assert!(!enc.can_change_level(), "nothing in the frame yet");
        assert!(enc.set_level(9).is_err());
        let mut pieces = Vec::new();
        for (i, r) in rs.iter().enumerate() {
            // 3, then 19 from the second test run on, 6 from the fourth.
            match i {
                3 => enc.set_level(19).unwrap(),
                7 => enc.set_level(6).unwrap(),
                _ => enc.set_level(enc.level()).unwrap(), // (no change: no new frame)
            }
            let p = enc.compress_run(r).unwrap();
            assert_eq!(dec.decompress_run(&p, r.len()).unwrap(), *r, "run {i}");
            pieces.push(p);
        }
        assert_eq!(enc.level(), 6);
        assert_eq!(dec.frames(), 3);
        // Test run 3 repeats run 0 (256 KiB of noise) after two level
        // changes: found in the prefix, it costs almost nothing.
        assert!(pieces[7].len() < 8 << 10, "{} bytes for a run the history holds", pieces[7].len());
        // A decoder that does not follow levels decodes the new frames
        // without the prefix: never the runs that need it.
        let mut blind = StreamDecoder::new().unwrap();
        let mut wrong = 0;
        for (p, r) in pieces.iter().zip(&rs) {
            match blind.decompress_run(p, r.len()) {
                Ok(out) if out == *r => {}
                Ok(_) => wrong += 1,
                Err(_) => {
                    wrong += 1;
                    break;
                }
            }
        }
        assert!(wrong > 0);
    }

    /// At a high level the source's prefix is the tail's last
    /// LEVEL_PREFIX_HIGH bytes while the target's is all LEVEL_PREFIX: the
    /// target decodes every run, and what lies in both still pays.
    #[test]
    fn a_high_levels_shorter_prefix_decodes_against_the_whole_tail() {
        // 20 MiB of runs, each 1 MiB of pseudo-random bytes (nothing to
        // compress but what repeats).
        let noise =
            |seed: u64| crate::test_data::Noise::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).bytes(1 << 20);
        let rs: Vec<Vec<u8>> = (0..20).map(noise).collect();
        let mut enc = StreamEncoder::new(3, window_log_for(1 << 30)).unwrap().follow_levels();
        let mut dec = StreamDecoder::new().unwrap().follow_levels();
        for r in &rs {
            let p = enc.compress_run(r).unwrap();
            assert_eq!(dec.decompress_run(&p, r.len()).unwrap(), *r);
        }
        enc.set_level(LEVEL_PREFIX_HIGH_ABOVE + 1).unwrap();
        // Run 18 is in the source's short prefix (the last 4 MiB: 16-19),
        // run 10 only in the target's.
        for (r, max) in [(&rs[18], 64 << 10), (&rs[10], 2 << 20)] {
            let p = enc.compress_run(r).unwrap();
            assert!(p.len() < max, "{} bytes", p.len());
            assert_eq!(dec.decompress_run(&p, r.len()).unwrap(), *r);
        }
        let p = enc.compress_run(&rs[10]).unwrap();
        assert!(p.len() < 64 << 10, "run 10 is now in the frame itself: {} bytes", p.len());
        assert_eq!(dec.decompress_run(&p, rs[10].len()).unwrap(), rs[10]);
        assert_eq!(dec.frames(), 2);
    }

    /// Only a stream whose target follows levels may change them, and a
    /// stream with a shared reference never does.
    #[test]
    fn the_level_changes_only_where_the_target_follows() {
        let mut enc = StreamEncoder::new(3, 22).unwrap();
        assert!(!enc.can_change_level());
        assert!(enc.set_level(9).is_err());
        enc.set_level(3).unwrap(); // (the same level: nothing to follow)
        let prefix: Arc<[u8]> = vec![1u8; 4096].into();
        let mut enc = StreamEncoder::with_prefix(3, prefix, 1 << 20).unwrap().follow_levels();
        assert!(!enc.can_change_level());
        assert!(enc.set_level(9).is_err());
    }

    /// The tail holds the last LEVEL_PREFIX bytes, whatever the pieces.
    #[test]
    fn the_tail_is_the_contents_last_bytes() {
        let mut t = Tail::default();
        let data: Vec<u8> = (0..LEVEL_PREFIX + 3000).map(|i| (i % 251) as u8).collect();
        t.push(&data[..1000]);
        assert_eq!(&*t.freeze(), &data[..1000]);
        t.push(&data[1000..LEVEL_PREFIX + 100]);
        t.push(&data[LEVEL_PREFIX + 100..]);
        assert_eq!(&*t.freeze(), &data[3000..]);
        let mut t = Tail::default();
        t.push(&data);
        assert_eq!(&*t.freeze(), &data[3000..]);
    }

    /// A source that starts frames closer than LEVEL_FRAME_MIN apart (each
    /// would cost the target a copy of its tail) is refused; a decoder
    /// that does not follow levels decodes back-to-back frames as zstd
    /// does, independently.
    #[test]
    fn frames_closer_than_the_minimum_are_refused() {
        let run = vec![7u8; 4096];
        let mut two = zstd::bulk::compress(&run, 3).unwrap();
        two.extend_from_slice(&zstd::bulk::compress(&run, 3).unwrap());
        let mut dec = StreamDecoder::new().unwrap().follow_levels();
        let e = dec.decompress_run(&two, 8192).unwrap_err().to_string();
        assert!(e.contains("less than"), "{e}");
        let mut dec = StreamDecoder::new().unwrap();
        assert_eq!(dec.decompress_run(&two, 8192).unwrap(), [run.clone(), run].concat());
        assert_eq!(dec.frames(), 2);
    }

    /// A stream that takes a shared reference late (`CAP_LATE_REF`): the
    /// source ends its frame and continues as a stream prefixed with the
    /// reference (indexed ahead, as on its own thread); the target, told
    /// by the piece's code, gives that frame the same reference. The
    /// content round-trips, the reference pays from there on, and the
    /// stream begins no frame after it.
    #[test]
    fn a_reference_frame_begins_late_and_pays() {
        let mut rng = crate::test_data::Noise::new(9);
        let reference: Arc<[u8]> = rng.bytes(1 << 20).into();
        let before: Vec<Vec<u8>> = (0..5).map(|_| rng.bytes(256 << 10)).collect();
        let after: Vec<Vec<u8>> = (0..4)
            .map(|k| {
                let mut run = reference[k << 18..(k + 1) << 18].to_vec();
                for i in (0..run.len()).step_by(4096) {
                    run[i] ^= 0x55;
                }
                run
            })
            .collect();
        let image = 8 << 20;
        let prepared = || {
            let mut next = StreamEncoder::with_prefix(3, reference.clone(), image).unwrap();
            next.prime().unwrap();
            next
        };
        let mut enc = StreamEncoder::new(3, window_log_for(image)).unwrap().follow_levels();
        let mut dec = StreamDecoder::new().unwrap().follow_levels();
        for (k, run) in before.iter().enumerate() {
            if k == 1 {
                // Before the frame carried LEVEL_FRAME_MIN: refused.
                assert!(enc.begin_reference_frame(prepared()).is_err());
            }
            let p = enc.compress_run(run).unwrap();
            assert_eq!(&dec.decompress_run(&p, run.len()).unwrap(), run);
        }
        enc.begin_reference_frame(prepared()).unwrap();
        assert_eq!(enc.content(), 5 * (256 << 10));
        dec.reference_next_frame(reference.clone(), image).unwrap();
        let mut sent = 0;
        for run in &after {
            let p = enc.compress_run(run).unwrap();
            sent += p.len();
            assert_eq!(&dec.decompress_run(&p, run.len()).unwrap(), run);
            assert!(!dec.reference_pending());
        }
        assert!(sent * 20 < 1 << 20, "{sent} bytes for 1 MiB of edited reference");
        assert_eq!(dec.frames(), 2);
        // The reference's frame is the last: no level change after it.
        assert!(!enc.can_change_level());
        assert!(enc.set_level(5).is_err());
    }

    /// A decoder told that the next frame has the reference, given a piece
    /// in which no frame ends, still waits for that frame (the target
    /// fails the copy on it); a decoder that begins no frames cannot take
    /// a reference late at all.
    #[test]
    fn a_reference_frame_that_does_not_begin_is_seen() {
        let reference: Arc<[u8]> = vec![3u8; 1 << 16].into();
        let runs = runs();
        let mut enc = StreamEncoder::new(3, 22).unwrap().follow_levels();
        let mut dec = StreamDecoder::new().unwrap().follow_levels();
        let p0 = enc.compress_run(&runs[0]).unwrap();
        let p1 = enc.compress_run(&runs[1]).unwrap();
        dec.decompress_run(&p0, runs[0].len()).unwrap();
        dec.reference_next_frame(reference.clone(), 1 << 20).unwrap();
        assert_eq!(dec.decompress_run(&p1, runs[1].len()).unwrap(), runs[1]);
        assert!(dec.reference_pending());
        let mut fixed = StreamDecoder::new().unwrap();
        assert!(fixed.reference_next_frame(reference, 1 << 20).is_err());
    }
}

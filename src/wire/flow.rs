//! How steadily a link drains this end's writes: the current *spell* of
//! writes that blocked one after another, each a little, and the time the
//! writer spent in writes at all. `auto` raises the zstd stream's level
//! only on a spell of a slow link, and drops it when the writer stops
//! being busy (`wire::compress`).
//!
//! Why not the drain rate alone: it is the lower quartile of the last
//! blocked writes, and a write that waited for a busy receiver (the target
//! loading its references at the start) reads as slow as a 2 Mbit/s link.
//! Over real ssh that made fast links raise the stream to level 15-19,
//! which then stalled the copy (docs/experiments.md, "The merge,
//! measured"). Seen piece by piece, the two differ: a slow link takes every
//! piece of a write a little late, steadily; a busy receiver takes one
//! piece very late, then the rest at once, or without blocking at all.
//! So the writer's link counts its writes in pieces of [`PIECE`] bytes
//! (`wire::transport`), and a spell is a run of pieces that begins with one
//! that blocked, none longer than [`STALL`], none far longer than the
//! spell's average, with the writer never idle more than [`GAP`] between
//! them. A spell is
//! the link, not the receiver or this end's compressor, setting the pace.
//!
//! Times are nanoseconds from any fixed origin (the link's creation), so
//! that the rules are tested with made-up sequences, without sleeping.

/// What a link's writes are cut into for [`Flow`]: small enough that a
/// 2 Mbit/s link completes several a second (a 1 MiB write takes 4 s
/// there), large enough to cost nothing on a fast one.
pub const PIECE: usize = 32 << 10;
/// A piece that took longer than this waited for something other than a
/// link draining steadily (a receiver busy elsewhere, a descheduled ssh):
/// the spell ends. At [`PIECE`] bytes this leaves links of 16 kB/s and up
/// able to form spells.
const STALL: u64 = 2_000_000_000;
/// The writer idle longer than this between two pieces (waiting for frames
/// to send): this end, not the link, set the pace there; the spell ends.
/// Frames are copied into the writer's buffer in microseconds; a compressor
/// that keeps up leaves no gap near this.
const GAP: u64 = 50_000_000;
/// A piece taking this many times the spell's average piece time, once the
/// spell has [`SPIKE_AFTER`] pieces, waited for something else than the
/// link (a fast link whose receiver paused): it starts a new spell.
const SPIKE: u64 = 8;
const SPIKE_AFTER: u64 = 4;

/// The running spell, as far as it is known.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spell {
    /// From the start of its first piece to the end of its last.
    pub secs: f64,
    /// Bytes its pieces carried.
    pub bytes: u64,
}

impl Spell {
    /// Bytes per second the link drained during the spell.
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs
        } else {
            f64::INFINITY
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Running {
    start: u64,
    last_end: u64,
    bytes: u64,
    pieces: u64,
    /// Time spent in its pieces (their sum, without the gaps).
    writing: u64,
}

/// A link's writer as [`Flow`] saw it.
#[derive(Debug, Default)]
pub struct Flow {
    spell: Option<Running>,
    /// Nanoseconds spent in finished writes.
    busy: u64,
    /// Start of the write in progress.
    writing_since: Option<u64>,
}

impl Flow {
    /// A write call begins at `at`.
    pub fn begin_write(&mut self, at: u64) {
        self.writing_since = Some(at);
    }

    /// The write call that began at [`begin_write`](Self::begin_write)
    /// ended at `at`.
    pub fn end_write(&mut self, at: u64) {
        if let Some(s) = self.writing_since.take() {
            self.busy += at.saturating_sub(s);
        }
    }

    /// One piece of `bytes` written from `start` to `end`; `blocked`: it
    /// waited for the link (the transport's rule), rather than only
    /// copying into buffers with room.
    ///
    /// A piece that did not block starts no spell, but one running goes on
    /// through it, its bytes counted: a token bucket (`--bwlimit`) or a
    /// shaper lets a few pieces through at once after a late one, and a
    /// steady slow link is no less steady for that (with the bucket, spells
    /// ended so often that a 500 kB/s copy did not raise its level in 1 of
    /// 5 copies under load). On a fast link such pieces only make the
    /// spell's rate faster.
    pub fn piece(&mut self, start: u64, end: u64, bytes: u64, blocked: bool) {
        let took = end.saturating_sub(start);
        if took > STALL || (!blocked && self.spell.is_none()) {
            self.spell = None;
            return;
        }
        let fresh = Running { start, last_end: end, bytes, pieces: 1, writing: took };
        self.spell = match self.spell {
            Some(s)
                if start.saturating_sub(s.last_end) <= GAP
                    && !(s.pieces >= SPIKE_AFTER && took > SPIKE * (s.writing / s.pieces)) =>
            {
                Some(Running {
                    start: s.start,
                    last_end: end,
                    bytes: s.bytes + bytes,
                    pieces: s.pieces + 1,
                    writing: s.writing + took,
                })
            }
            _ => blocked.then_some(fresh),
        };
    }

    /// The spell running at `now`: none if the writer has been idle longer
    /// than [`GAP`], or stuck in one piece longer than [`STALL`].
    pub fn spell(&self, now: u64) -> Option<Spell> {
        let s = self.spell?;
        let quiet_since = match self.writing_since {
            // In a write: a piece of it may be waiting; a stall shows here
            // before the piece ends.
            Some(w) if now.saturating_sub(w.max(s.last_end)) > STALL => return None,
            Some(_) => return Some(Self::of(s)),
            None => s.last_end,
        };
        (now.saturating_sub(quiet_since) <= GAP).then(|| Self::of(s))
    }

    fn of(s: Running) -> Spell {
        Spell { secs: (s.last_end - s.start) as f64 / 1e9, bytes: s.bytes }
    }

    /// Seconds spent in writes up to `now`, the one in progress included.
    pub fn busy_secs(&self, now: u64) -> f64 {
        let running = self.writing_since.map_or(0, |s| now.saturating_sub(s));
        (self.busy + running) as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// `n` pieces of [`PIECE`] bytes back to back from `at`, each taking
    /// `each` ns; returns the end.
    fn pieces(f: &mut Flow, mut at: u64, n: usize, each: u64) -> u64 {
        for _ in 0..n {
            f.begin_write(at);
            f.piece(at, at + each, PIECE as u64, true);
            at += each;
            f.end_write(at);
        }
        at
    }

    #[test]
    fn a_slow_link_makes_one_long_spell_at_its_rate() {
        let mut f = Flow::default();
        // 2 Mbit/s: 32 KiB every 131 ms, for 4 s.
        let end = pieces(&mut f, 0, 30, 131 * MS);
        let s = f.spell(end + MS).expect("a spell");
        assert!((s.secs - 3.93).abs() < 0.01, "{s:?}");
        assert!((s.rate() - 250e3).abs() < 1e3, "{}", s.rate());
        assert!((f.busy_secs(end) - 3.93).abs() < 0.01);
    }

    #[test]
    fn a_busy_receiver_then_a_fast_link_makes_no_slow_spell() {
        let mut f = Flow::default();
        // Buffers with room: pieces that did not block, no spell.
        for i in 0..10 {
            f.piece(i * MS, i * MS + 10_000, PIECE as u64, false);
        }
        assert_eq!(f.spell(10 * MS), None);
        // The receiver busy for 3 s: one piece waits that long.
        f.piece(10 * MS, 3010 * MS, PIECE as u64, true);
        assert_eq!(f.spell(3010 * MS), None, "a stall is no spell");
        // Busy for 1.5 s (under STALL), then 100 Mbit/s: the slow piece
        // starts a spell, which the fast pieces then make fast.
        let mut f = Flow::default();
        f.piece(0, 1500 * MS, PIECE as u64, true);
        let end = pieces(&mut f, 1500 * MS, 500, 2_600_000);
        let s = f.spell(end).unwrap();
        assert!(s.rate() > 5e6, "{s:?}");
        // Pieces that did not block go on with a running spell, counted:
        // the spell's rate rises with them.
        let mut f = Flow::default();
        let end = pieces(&mut f, 0, 10, 131 * MS);
        f.piece(end, end + 10_000, PIECE as u64, false);
        let s = f.spell(end + 10_000).unwrap();
        assert_eq!(s.bytes, 11 * PIECE as u64);
        // A fast spell, then one piece waiting 8x its average: a new spell.
        let mut f = Flow::default();
        let end = pieces(&mut f, 0, 100, 2_600_000);
        f.piece(end, end + 500 * MS, PIECE as u64, true);
        let s = f.spell(end + 500 * MS).unwrap();
        assert_eq!(s.bytes, PIECE as u64, "{s:?}");
    }

    #[test]
    fn an_idle_writer_or_a_stuck_write_ends_the_spell() {
        let mut f = Flow::default();
        let end = pieces(&mut f, 0, 20, 131 * MS);
        assert!(f.spell(end + GAP).is_some());
        assert_eq!(f.spell(end + GAP + 1), None, "idle: the compressor set the pace");
        // The next piece after a gap starts over.
        pieces(&mut f, end + 200 * MS, 1, 131 * MS);
        assert_eq!(f.spell(end + 331 * MS).unwrap().bytes, PIECE as u64);
        // Stuck in a write for longer than STALL: no spell, before the
        // piece even ends.
        let mut f = Flow::default();
        let end = pieces(&mut f, 0, 20, 131 * MS);
        f.begin_write(end);
        assert!(f.spell(end + STALL).is_some());
        assert_eq!(f.spell(end + STALL + 1), None);
        assert!((f.busy_secs(end + STALL) - (20.0 * 0.131 + 2.0)).abs() < 1e-6);
    }
}

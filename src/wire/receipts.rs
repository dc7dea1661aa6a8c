//! Receipts (capability
//! [`CAP_RECEIPTS`](crate::wire::protocol::CAP_RECEIPTS)): the target says
//! now and then how many bytes it has read, and the source's `auto` measures
//! the link by them and keeps its zstd stream close to what arrived.
//!
//! Why: `auto` measured the link by its own writes that blocked, and a
//! write blocks only once ssh's and the kernel's buffers between the ends
//! are full, several megabytes. A copy that fetches little (a return
//! migration: 1.3 MB of stream on the quick images) fits in those buffers
//! whole; the stream had compressed all of it at its first level within
//! 1.8 s of a 5.9 s copy at 2 Mbit/s, before any evidence of a slow link
//! (docs/experiments.md, "The stream's level made safe"). A receipt is
//! the link's own clock: bytes that reached the target, whatever waits in
//! between.
//!
//! - The target's [`ReceiptSender`] looks every [`RECEIPT_GAP`] and sends
//!   `Received` when [`RECEIPT_EVERY`] more bytes arrived, or when any
//!   arrived and the link has since gone quiet (so the last bytes before a
//!   pause are always acknowledged: a source waiting at its gate is
//!   answered within [`RECEIPT_GAP`]).
//! - The source's [`Clock`] turns receipts into what `auto` knew from
//!   blocked writes: a drain rate, a spell (`wire::flow`) and the time the
//!   link was busy. An interval between two receipts says how fast the
//!   link drained only when the target did not catch up with what was
//!   already outstanding at its start (*backlogged*; otherwise it says how
//!   fast this end produced), and its reader spent at least
//!   [`LINK_WAIT_SHARE`] of it waiting for bytes ([`ReadWait`]; otherwise
//!   the target, busy with what it had, set the pace: over real ssh at
//!   100 Mbit/s, a target busy with sub-block deltas acknowledged below
//!   1 MB/s for half a second and raised the level of a copy the link
//!   would have carried at level 3, 8.7 s instead of 6.5).
//! - The source's stream waits at the gate
//!   ([`Receipts::wait_for_room_at_most`]) while more than
//!   [`Clock::window`] bytes are unacknowledged: at least
//!   [`GATE_MIN`], else a second of the link's drain rate (twice what
//!   arrived while that is unknown), so a fast link is not held and a
//!   slow one has about a second of stream in flight.
//!
//! Nothing in a receipt is trusted beyond pacing this end: a count above
//! what this end wrote counts as what it wrote, a count below an earlier
//! one is ignored, and a target that stops sending receipts is not waited
//! for after [`GATE_GIVE_UP`] without one that acknowledged more.
//!
//! Times are nanoseconds from any fixed origin, so that the rules are
//! tested with made-up sequences, without sleeping.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};

use super::flow::{Flow, Spell};
use super::protocol::{write_message, Message};
use super::transport::{LinkStats, RecentRates, Writer};

/// Bytes read between two receipts while the link flows. (A source
/// knows a drain rate after [`RATE_INTERVALS`] backlogged intervals: at
/// 32 KiB, 4 of 11 return copies at 2 Mbit/s learnt their link only
/// after 384-553 KB were written, at the first level, of a stream of
/// about 1 MB, the others after 270 KB; at 16 KiB, 14 of 16 after
/// 270 KB (session 28). Links faster than 6 Mbit/s get a receipt every
/// [`RECEIPT_GAP`] either way.)
pub const RECEIPT_EVERY: u64 = 16 << 10;
/// How often the target's sender looks: receipts come at most this often
/// (about 50 a second, a few hundred bytes a second upstream).
pub const RECEIPT_GAP: Duration = Duration::from_millis(20);
/// Least the source's stream may have unacknowledged: about a second of a
/// 2 Mbit/s link, a few milliseconds of a fast one until its first
/// receipts show it fast.
pub const GATE_MIN: u64 = 256 << 10;
/// Seconds of the link that the stream may run ahead.
const GATE_SECS: f64 = 1.0;
/// A gate that has had no receipt acknowledging more for this long stops
/// waiting for good: a target that stopped sending them, or sends the same
/// count again and again (a bug, or a hostile one), must not hold the
/// copy. A link this slow still sends a receipt every
/// [`RECEIPT_EVERY`] bytes, at 16 kB/s every second (every 2 s from a
/// target before session 28).
pub const GATE_GIVE_UP: Duration = Duration::from_secs(5);
/// Unacknowledged bytes at which the link counts as busy between two
/// receipts (two receipts' worth from a target before session 28, which
/// sent one every 32 KiB; four of one since).
const BUSY_BACKLOG: u64 = 64 << 10;
/// An interval is the link's pace only if the target's reader spent at
/// least this share of it waiting for bytes.
const LINK_WAIT_SHARE: f64 = 0.5;
/// Backlogged bytes and intervals before [`Clock::drain_rate`] answers:
/// a quarter of a second at 2 Mbit/s.
const RATE_EVIDENCE: u64 = 64 << 10;
const RATE_INTERVALS: usize = 4;
/// A drain rate is stale once this many bytes were written after the last
/// backlogged interval (as `wire::transport`'s for blocked writes).
const RATE_STALE: u64 = 8 << 20;

/// The source's view of the link through the target's receipts.
#[derive(Debug, Default)]
pub struct Clock {
    /// Bytes acknowledged, as far as believed (never above what was written).
    acked: u64,
    /// Time of the last receipt, bytes written then, and the target's
    /// reader's waiting time it reported.
    last: Option<(u64, u64, u64)>,
    /// Intervals as pieces: backlogged ones are "blocked", the time spent
    /// waiting for a receipt with [`BUSY_BACKLOG`] outstanding is "in a
    /// write".
    flow: Flow,
    /// Rates of the last backlogged intervals.
    backlogged: RecentRates,
    backlogged_bytes: u64,
    /// Bytes written at the end of the last backlogged interval.
    backlogged_at: u64,
    /// Receipts taken (for the log and tests).
    receipts: u64,
}

impl Clock {
    /// A receipt of `claimed` bytes arrived at `now`, the target's reader
    /// having waited `waited` ns for bytes in all, this end having written
    /// `written` bytes by then.
    pub fn on_receipt(&mut self, now: u64, claimed: u64, waited: u64, written: u64) {
        let acked = claimed.min(written).max(self.acked);
        self.receipts += 1;
        let mut waited_before = 0;
        if let Some((at, written_then, w)) = self.last {
            waited_before = w;
            let (delta, took) = (acked - self.acked, now.saturating_sub(at));
            // What was outstanding when the interval began and is still
            // not all here, while the target's reader mostly waited for
            // bytes: the link, not this end or the target, set the pace.
            // (Two clocks: the share is approximate, and a claim past the
            // interval only counts as all of it.)
            let waiting = waited.saturating_sub(w) as f64 / took.max(1) as f64;
            let backlogged = delta > 0 && delta < written_then.saturating_sub(self.acked) && waiting >= LINK_WAIT_SHARE;
            self.flow.end_write(now);
            self.flow.piece(at, now, delta, backlogged);
            if took > 0 && delta > 0 {
                let rate = delta as f64 / (took as f64 / 1e9);
                if backlogged {
                    if self.backlogged.len() > 0 && self.stale(written) {
                        // The rate went stale (see `drain_rate`): its
                        // intervals are no evidence now either. Kept, one
                        // new backlogged interval made their old rate
                        // current again (an unshaped copy read the
                        // 14.6 MB/s of a dip 0.24 s earlier, and went back
                        // to the stream).
                        self.backlogged.clear();
                        self.backlogged_bytes = 0;
                    }
                    self.backlogged.push(rate);
                    self.backlogged_bytes += delta;
                    self.backlogged_at = written;
                }
            }
        }
        self.acked = acked;
        self.last = Some((now, written, waited.max(waited_before)));
        if written - acked >= BUSY_BACKLOG {
            self.flow.begin_write(now);
        }
    }

    /// Bytes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Receipts taken so far.
    pub fn receipts(&self) -> u64 {
        self.receipts
    }

    /// Bytes per second the link drained while backlogged (the lower
    /// quartile of the last intervals); None until enough evidence, and
    /// None again once [`RATE_STALE`] bytes were written without a
    /// backlogged interval (this end, not the link, set the pace since).
    pub fn drain_rate(&self, written: u64) -> Option<f64> {
        if self.backlogged_bytes < RATE_EVIDENCE || self.backlogged.len() < RATE_INTERVALS {
            return None;
        }
        if self.stale(written) {
            return None;
        }
        self.backlogged.lower_quartile()
    }

    /// Whether [`RATE_STALE`] bytes were written, up to `written`, since
    /// the last backlogged interval.
    fn stale(&self, written: u64) -> bool {
        written.saturating_sub(self.backlogged_at) > RATE_STALE
    }

    /// The spell of backlogged intervals running at `now` (`wire::flow`).
    pub fn spell(&self, now: u64) -> Option<Spell> {
        self.flow.spell(now)
    }

    /// Seconds the link was busy (this end waiting for receipts with
    /// [`BUSY_BACKLOG`] outstanding) up to `now`.
    pub fn busy_secs(&self, now: u64) -> f64 {
        self.flow.busy_secs(now)
    }

    /// Bytes the stream may have unacknowledged, `written` having been
    /// written: a second of the link's drain rate where it is known; until
    /// then twice what the target has acknowledged, so that on a fast link
    /// the window doubles with every receipt (as TCP's slow start), while
    /// on a slow one it stays near [`GATE_MIN`] until the rate is known; at
    /// least [`GATE_MIN`]. (Not a rate from deliveries: after a pause ssh
    /// and TCP deliver what waited in one burst, and a window from the
    /// fastest let a 2 Mbit/s copy compress most of its stream ahead; one
    /// from their lower quartile held unshaped copies at the start, 0.2 to
    /// 0.7 s of copies of 1.3 to 2 s.)
    pub fn window(&self, written: u64) -> u64 {
        let w = match self.drain_rate(written) {
            Some(rate) => (rate * GATE_SECS) as u64,
            None => self.acked.saturating_mul(2),
        };
        GATE_MIN.max(w)
    }
}

/// The source's receipts, shared by its reader (which takes them) and its
/// stream (which waits for them).
pub struct Receipts {
    clock: Mutex<State>,
    arrived: Condvar,
    stats: Arc<LinkStats>,
    origin: Instant,
}

struct State {
    clock: Clock,
    /// When a receipt last acknowledged more (or the gate was made).
    last_at: Instant,
    /// The gate stopped waiting for good.
    gave_up: bool,
}

impl Receipts {
    /// Receipts of the link whose writes `stats` counts.
    pub fn new(stats: Arc<LinkStats>) -> Receipts {
        let now = Instant::now();
        Receipts {
            clock: Mutex::new(State { clock: Clock::default(), last_at: now, gave_up: false }),
            arrived: Condvar::new(),
            stats,
            origin: now,
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.origin).as_nanos() as u64
    }

    /// A `Received(claimed, waited)` frame arrived.
    pub fn on_receipt(&self, claimed: u64, waited: u64) {
        let now = Instant::now();
        let mut s = self.clock.lock().unwrap();
        let before = s.clock.acked();
        s.clock.on_receipt(self.ns(now), claimed, waited, self.stats.written());
        // Only progress counts: receipts that repeat a count must not hold
        // the gate shut for ever.
        if s.clock.acked() > before {
            s.last_at = now;
        }
        self.arrived.notify_all();
    }

    /// What `auto` knows of the link at `now`: the drain rate, the spell,
    /// the seconds it was busy.
    pub fn view(&self, now: Instant) -> (Option<f64>, Option<Spell>, f64) {
        let s = self.clock.lock().unwrap();
        let at = self.ns(now);
        (s.clock.drain_rate(self.stats.written()), s.clock.spell(at), s.clock.busy_secs(at))
    }

    /// Wait while more than the window is unacknowledged (see the module's
    /// notes), for at most about `max`: whether there is room (false: still
    /// none after `max`, so that the caller can look at the link
    /// meanwhile). Returns true at once after [`GATE_GIVE_UP`] without a
    /// receipt that acknowledged more, and from then on for the rest of
    /// the copy.
    pub fn wait_for_room_at_most(&self, max: Duration) -> bool {
        let start = Instant::now();
        let mut s = self.clock.lock().unwrap();
        loop {
            let written = self.stats.written();
            let outstanding = written.saturating_sub(s.clock.acked());
            if s.gave_up || outstanding <= s.clock.window(written) {
                return true;
            }
            if start.elapsed() >= max {
                return false;
            }
            if s.last_at.elapsed() >= GATE_GIVE_UP {
                log::warn!(
                    "the target acknowledged nothing more for {} s with {outstanding} bytes outstanding: the \
                     stream no longer waits for its receipts",
                    GATE_GIVE_UP.as_secs()
                );
                s.gave_up = true;
                return true;
            }
            s = self.arrived.wait_timeout(s, Duration::from_millis(100).min(max)).unwrap().0;
        }
    }

    /// Receipts taken so far.
    pub fn count(&self) -> u64 {
        self.clock.lock().unwrap().clock.receipts()
    }
}

/// The time the target's reader spends waiting for the link: from when it
/// asks for the next frame to when it has it (its other time goes to
/// handing frames to the target, which waits while the target is busy).
#[derive(Debug)]
pub struct ReadWait {
    origin: Instant,
    /// Nanoseconds of finished waits.
    total: AtomicU64,
    /// Start of the wait in progress, nanoseconds after `origin` plus one
    /// (0: none).
    since: AtomicU64,
}

impl Default for ReadWait {
    fn default() -> Self {
        ReadWait { origin: Instant::now(), total: AtomicU64::new(0), since: AtomicU64::new(0) }
    }
}

impl ReadWait {
    fn ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64 + 1
    }

    /// The reader asks for the next frame.
    pub fn begin(&self) {
        self.since.store(self.ns(), Ordering::Relaxed);
    }

    /// ... and has it.
    pub fn end(&self) {
        let s = self.since.swap(0, Ordering::Relaxed);
        if s != 0 {
            self.total.fetch_add(self.ns().saturating_sub(s), Ordering::Relaxed);
        }
    }

    /// Nanoseconds waited so far, the wait in progress included.
    pub fn waited(&self) -> u64 {
        let s = self.since.load(Ordering::Relaxed);
        self.total.load(Ordering::Relaxed) + if s != 0 { self.ns().saturating_sub(s) } else { 0 }
    }
}

/// The target's side: sends `Received` on the shared writer (see the
/// module's notes). Stops when dropped.
pub struct ReceiptSender {
    _stop: Sender<()>,
}

impl ReceiptSender {
    pub fn start(out: Arc<Mutex<Writer>>, stats: Arc<LinkStats>, wait: Arc<ReadWait>) -> ReceiptSender {
        let (stop, stopped) = bounded::<()>(0);
        thread::spawn(move || {
            let (mut sent, mut seen, mut waited) = (stats.read(), stats.read(), 0);
            loop {
                match stopped.recv_timeout(RECEIPT_GAP) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let read = stats.read();
                if read >= sent + RECEIPT_EVERY || (read > sent && read == seen) {
                    let Ok(mut w) = out.lock() else { return };
                    // (Never going back, whatever the two counters' race.)
                    waited = wait.waited().max(waited);
                    let m = Message::Received { bytes: read, waited_ns: waited };
                    // A failed write shows on the copy's own next write.
                    if write_message(&mut *w, &m).and_then(|()| Ok(w.flush()?)).is_err() {
                        return;
                    }
                    sent = read;
                }
                seen = read;
            }
        });
        ReceiptSender { _stop: stop }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A link draining `rate` bytes/s with the source keeping `lead` bytes
    /// unacknowledged: receipts every `every` ns from `at`, `n` of them,
    /// the target's reader waiting `share` of the time.
    #[allow(clippy::too_many_arguments)]
    fn drain(
        c: &mut Clock,
        at: u64,
        written0: u64,
        n: u64,
        every: u64,
        rate: f64,
        lead: u64,
        share: f64,
    ) -> (u64, u64) {
        let (mut t, mut written) = (at, written0);
        for _ in 0..n {
            t += every;
            let acked = c.acked() + (rate * every as f64 / 1e9) as u64;
            written = written.max(acked + lead);
            c.on_receipt(t, acked, (t as f64 * share) as u64, written);
        }
        (t, written)
    }

    #[test]
    fn a_backlogged_slow_link_gives_its_rate_a_spell_and_busy_time() {
        let mut c = Clock::default();
        c.on_receipt(0, 0, 0, GATE_MIN);
        assert_eq!(c.drain_rate(GATE_MIN), None, "one receipt is no interval");
        // 250 kB/s (2 Mbit/s), a receipt every 131 ms, 256 KiB ahead, the
        // target's reader waiting for bytes 90% of the time.
        let (end, written) = drain(&mut c, 0, GATE_MIN, 8, 131 * MS, 250e3, GATE_MIN, 0.9);
        let rate = c.drain_rate(written).expect("8 intervals, 260 kB");
        assert!((rate - 250e3).abs() < 2e3, "{rate}");
        let s = c.spell(end + MS).expect("a spell");
        assert!((s.secs - 8.0 * 0.131).abs() < 0.01, "{s:?}");
        assert!((s.rate() - 250e3).abs() < 2e3);
        assert!((c.busy_secs(end) - 8.0 * 0.131).abs() < 0.01);
        // The window: a second of the drain rate, at least GATE_MIN.
        assert_eq!(c.window(written), GATE_MIN);
    }

    #[test]
    fn a_target_that_keeps_up_shows_no_drain_rate_and_a_fast_window() {
        let mut c = Clock::default();
        c.on_receipt(0, 0, 0, 40_000);
        // Everything written arrives by each receipt: this end sets the
        // pace (its compressor), not the link.
        let mut written = 40_000;
        for i in 1..=50u64 {
            let acked = written;
            written += 40_000;
            c.on_receipt(i * 20 * MS, acked, i * 20 * MS, written);
        }
        assert_eq!(c.drain_rate(written), None);
        assert_eq!(c.spell(50 * 20 * MS), None);
        // No drain rate: twice what arrived.
        assert_eq!(c.window(written), 2 * c.acked());
        assert_eq!(c.acked(), 2_000_000);
    }

    #[test]
    fn lies_count_as_nothing_beyond_what_was_written() {
        let mut c = Clock::default();
        c.on_receipt(0, u64::MAX, u64::MAX, 1000);
        assert_eq!(c.acked(), 1000, "capped at what was written");
        c.on_receipt(MS, 10, 0, 5000);
        assert_eq!(c.acked(), 1000, "a count going back is ignored");
        c.on_receipt(2 * MS, 4000, 0, 5000);
        assert_eq!(c.acked(), 4000);
    }

    #[test]
    fn a_rate_goes_stale_once_writes_outrun_the_backlog() {
        let mut c = Clock::default();
        c.on_receipt(0, 0, 0, GATE_MIN);
        let (end, written) = drain(&mut c, 0, GATE_MIN, 8, 131 * MS, 250e3, GATE_MIN, 1.0);
        assert!(c.drain_rate(written + RATE_STALE).is_some());
        assert_eq!(c.drain_rate(written + RATE_STALE + 1), None);
        // Nor is the stale rate made current again by one new backlogged
        // interval: it starts over, from new intervals only.
        let later = written + RATE_STALE + 1;
        let (end, written) = drain(&mut c, end, later, 1, 131 * MS, 1e6, GATE_MIN, 1.0);
        assert_eq!(c.drain_rate(written), None, "the stale intervals made a rate of one new one");
        let (_, written) = drain(&mut c, end, written, 3, 131 * MS, 1e6, GATE_MIN, 1.0);
        let r = c.drain_rate(written).expect("4 new backlogged intervals");
        assert!((r - 1e6).abs() < 1e4, "rate {r}: the stale intervals counted");
    }

    /// A target busy with what it has (its reader handing frames on, not
    /// waiting for bytes) acknowledges slowly with a backlog, as a slow
    /// link would: that is no evidence of the link.
    #[test]
    fn a_busy_target_is_not_a_slow_link() {
        let mut c = Clock::default();
        c.on_receipt(0, 0, 0, GATE_MIN);
        let (end, written) = drain(&mut c, 0, GATE_MIN, 20, 131 * MS, 250e3, GATE_MIN, 0.2);
        assert_eq!(c.drain_rate(written), None);
        assert_eq!(c.spell(end), None);
    }

    #[test]
    fn the_reader_s_wait_counts_the_wait_in_progress() {
        let w = ReadWait::default();
        assert_eq!(w.waited(), 0);
        w.begin();
        std::thread::sleep(Duration::from_millis(20));
        let mid = w.waited();
        assert!(mid >= 20 * MS, "{mid}");
        w.end();
        let done = w.waited();
        assert!(done >= mid);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(w.waited(), done, "not waiting: nothing added");
    }

    #[test]
    fn the_gate_gives_up_on_a_silent_target() {
        let stats = Arc::new(LinkStats::default());
        stats.count_written_for_tests(GATE_MIN + 1);
        let r = Receipts::new(stats.clone());
        // Nothing acknowledged, more than the window written: it waits,
        // until GATE_GIVE_UP passes without a receipt.
        r.clock.lock().unwrap().last_at = Instant::now() - GATE_GIVE_UP;
        let t = Instant::now();
        r.wait_for_room_at_most(Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(r.clock.lock().unwrap().gave_up);
        // Receipts that acknowledge nothing more do not keep it waiting.
        let r = Receipts::new(stats.clone());
        r.clock.lock().unwrap().last_at = Instant::now() - GATE_GIVE_UP;
        r.on_receipt(0, 0);
        r.wait_for_room_at_most(Duration::from_secs(10));
        assert!(r.clock.lock().unwrap().gave_up);
        // A receipt of everything opens it too.
        let r = Receipts::new(stats.clone());
        r.on_receipt(GATE_MIN + 1, 0);
        r.wait_for_room_at_most(Duration::from_secs(10));
        assert!(!r.clock.lock().unwrap().gave_up);
        assert_eq!(r.count(), 1);
    }

    /// The bounded wait returns after its time with no room, and at once
    /// with room.
    #[test]
    fn the_bounded_wait_says_whether_there_is_room() {
        let stats = Arc::new(LinkStats::default());
        stats.count_written_for_tests(GATE_MIN + 1);
        let r = Receipts::new(stats.clone());
        let t = Instant::now();
        assert!(!r.wait_for_room_at_most(Duration::from_millis(30)));
        assert!(t.elapsed() >= Duration::from_millis(30) && t.elapsed() < Duration::from_secs(1));
        r.on_receipt(GATE_MIN + 1, 0);
        assert!(r.wait_for_room_at_most(Duration::from_millis(30)));
    }
}

//! The bandwidth limit (`--bwlimit`): a token bucket in front of a link's
//! writer, so that every frame, whoever writes it, counts against one
//! budget.
//!
//! Writes are cut into slices of at most a twentieth of a second's worth,
//! so the rate holds within a fraction of a second rather than in 1 MiB
//! lumps. The bucket holds up to four slices: time lost to a write that
//! blocked or a sleep that overslept is made up within 200 ms instead of
//! being lost, and the limit is still never exceeded by more than that. Keep-alives pass through the same bucket; they are
//! only sent after a quiet spell, when the bucket is full, so they never
//! wait, and while data flows the peer sees bytes arriving and does not
//! time out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::rate::Rate;

/// One link's limit, shared by its writers; no limit until [`set`](Self::set).
#[derive(Debug, Default)]
pub struct Throttle {
    rate: AtomicU64,
    bucket: Mutex<Option<Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Smallest slice, so that a very low limit still makes progress in
/// reasonably sized writes.
const MIN_BURST: u64 = 1024;
/// Largest slice: the writer's buffer size.
const MAX_BURST: u64 = 1 << 20;
/// Slices the bucket holds when full.
const BUCKET_SLICES: u64 = 4;

impl Throttle {
    pub fn set(&self, rate: Rate) {
        self.rate.store(rate.0, Ordering::Relaxed);
        // Starts empty: the first burst is earned like the others, so a
        // short copy is not faster than the limit.
        *self.bucket.lock().unwrap() = None;
    }

    pub fn limit(&self) -> Rate {
        Rate(self.rate.load(Ordering::Relaxed))
    }

    fn burst(rate: u64) -> u64 {
        (rate / 20).clamp(MIN_BURST, MAX_BURST)
    }

    /// Wait until up to `want` bytes may be written; returns how many (at
    /// least 1 when `want` > 0).
    pub fn admit(&self, want: usize) -> usize {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 || want == 0 {
            return want;
        }
        let burst = Self::burst(rate);
        let n = (want as u64).min(burst);
        loop {
            let mut b = self.bucket.lock().unwrap();
            let now = Instant::now();
            let bucket = b.get_or_insert(Bucket { tokens: 0.0, at: now });
            let refill = now.duration_since(bucket.at).as_secs_f64() * rate as f64;
            bucket.tokens = (bucket.tokens + refill).min((BUCKET_SLICES * burst) as f64);
            bucket.at = now;
            if bucket.tokens >= n as f64 {
                bucket.tokens -= n as f64;
                return n as usize;
            }
            let wait = (n as f64 - bucket.tokens) / rate as f64;
            drop(b);
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }

    /// Give back what was admitted but not written (a short write).
    pub fn refund(&self, bytes: usize) {
        if let Some(b) = self.bucket.lock().unwrap().as_mut() {
            b.tokens += bytes as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_admits_everything_at_once() {
        let t = Throttle::default();
        assert_eq!(t.admit(10 << 20), 10 << 20);
        assert_eq!(t.limit(), Rate(0));
    }

    #[test]
    fn slices_are_at_most_one_burst() {
        let t = Throttle::default();
        t.set(Rate(1 << 20));
        assert_eq!(t.admit(1 << 20), (1 << 20) / 20);
        assert_eq!(t.admit(100), 100);
    }

    /// The bucket's own arithmetic: admitting 4 bursts at 200 KiB/s cannot
    /// take less than the 4 bursts' worth of time (it may take longer on a
    /// loaded machine; the rate over a real link is tested in tests/bwlimit.rs).
    #[test]
    fn admitting_takes_at_least_the_budgeted_time() {
        let t = Throttle::default();
        let rate = 200 << 10;
        t.set(Rate(rate));
        let start = Instant::now();
        let mut admitted = 0u64;
        while admitted < 4 * Throttle::burst(rate) {
            admitted += t.admit(1 << 20) as u64;
        }
        let floor = admitted as f64 / rate as f64;
        assert!(start.elapsed().as_secs_f64() >= floor * 0.99, "{:?} < {floor}", start.elapsed());
    }
}

//! Idle timeouts and keep-alives (protocol version 2).
//!
//! A [`Watchdog`] watches the bytes one end reads: while that end's reader
//! waits for the peer (and is not itself held up handing a frame on), no
//! byte arriving for the idle timeout means the peer is dead or the link is
//! down, and the watchdog reports it once. Any byte counts, so a big frame
//! on a slow link is progress. [`KeepAlive`] sends an empty frame whenever an
//! end has written nothing for a quarter of its timeout, so that a healthy
//! peer that is busy or idle never looks silent.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};

use super::protocol::{handshake, write_message, Agreed, Message, ProtocolError, Role};
use super::transport::{Link, LinkStats, Writer};

/// The handshake, bounded by `limit` (the idle timeout; None: unbounded).
/// No watchdog runs yet, and a far end that never says Hello (a link that
/// stalled, a far end stuck before it speaks) would hold this end forever.
/// The exchange runs in a thread; past the limit that thread is left
/// blocked on its read until the link closes (this end is failing anyway).
pub fn handshake_within(
    mut link: Link,
    role: Role,
    caps: u32,
    limit: Option<Duration>,
) -> Result<(Link, Agreed), ProtocolError> {
    let Some(limit) = limit else {
        let agreed = handshake(&mut link.reader, &mut link.writer, role, caps)?;
        return Ok((link, agreed));
    };
    let (tx, rx) = bounded(1);
    thread::spawn(move || {
        let r = handshake(&mut link.reader, &mut link.writer, role, caps);
        let _ = tx.send(r.map(|agreed| (link, agreed)));
    });
    let started = Instant::now();
    rx.recv_timeout(limit).unwrap_or_else(|_| {
        Err(ProtocolError::IdleTimeout {
            peer: if role == Role::Source { "target" } else { "source" },
            silent_secs: started.elapsed().as_secs_f64(),
            limit_secs: limit.as_secs(),
        })
    })
}

/// Default idle timeout of both ends.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long an end may write nothing before it sends a keep-alive.
pub fn keepalive_interval(idle: Duration) -> Duration {
    idle / 4
}

/// How often the watchdog and the keep-alive thread look.
fn tick(idle: Duration) -> Duration {
    (idle / 16).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Whether a reader is waiting for the peer right now (false while it hands
/// a frame to a full queue of ours, or after it stopped for good).
#[derive(Clone, Debug, Default)]
pub struct Waiting(Arc<AtomicBool>);

impl Waiting {
    pub fn set(&self, waiting: bool) {
        self.0.store(waiting, Ordering::Relaxed);
    }
    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Fires `on_silence` once when the peer has been silent for `idle` while
/// our reader waited for it. Stops when dropped.
pub struct Watchdog {
    _stop: Sender<()>,
}

impl Watchdog {
    pub fn start(
        peer: &'static str,
        stats: Arc<LinkStats>,
        idle: Duration,
        waiting: Waiting,
        on_silence: impl FnOnce(ProtocolError) + Send + 'static,
    ) -> Watchdog {
        let (stop, stopped) = bounded::<()>(0);
        let step = tick(idle);
        thread::spawn(move || {
            let mut seen = stats.read();
            let mut since = Instant::now();
            loop {
                match stopped.recv_timeout(step) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let now = stats.read();
                if now != seen || !waiting.get() {
                    seen = now;
                    since = Instant::now();
                } else if since.elapsed() >= idle {
                    on_silence(ProtocolError::IdleTimeout {
                        peer,
                        silent_secs: since.elapsed().as_secs_f64(),
                        limit_secs: idle.as_secs(),
                    });
                    return;
                }
            }
        });
        Watchdog { _stop: stop }
    }
}

/// Sends a keep-alive on a shared writer whenever nothing was written for
/// the interval. Stops when dropped.
pub struct KeepAlive {
    _stop: Sender<()>,
}

impl KeepAlive {
    pub fn start(writer: Arc<Mutex<Writer>>, stats: Arc<LinkStats>, interval: Duration) -> KeepAlive {
        let (stop, stopped) = bounded::<()>(0);
        let step = tick(interval * 4).min(interval);
        thread::spawn(move || {
            let mut seen = stats.written();
            let mut since = Instant::now();
            loop {
                match stopped.recv_timeout(step) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let now = stats.written();
                if now != seen {
                    seen = now;
                    since = Instant::now();
                } else if since.elapsed() >= interval {
                    let Ok(mut w) = writer.lock() else { return };
                    if write_message(&mut *w, &Message::KeepAlive).is_err() || w.flush().is_err() {
                        return;
                    }
                    since = Instant::now();
                }
            }
        });
        KeepAlive { _stop: stop }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::transport::Link;
    use std::io::Read;

    #[test]
    fn silence_fires_and_traffic_or_a_busy_reader_holds_it() {
        let (mut a, mut b) = Link::pair().unwrap();
        let waiting = Waiting::default();
        let (tx, rx) = crossbeam_channel::unbounded();
        let _w = Watchdog::start("target", a.stats.clone(), Duration::from_millis(300), waiting.clone(), move |e| {
            let _ = tx.send(e);
        });
        // Not waiting (busy handing frames on): never fires.
        thread::sleep(Duration::from_millis(500));
        assert!(rx.try_recv().is_err());
        // Waiting, with a byte every 100 ms: never fires.
        waiting.set(true);
        for _ in 0..6 {
            b.writer.write_all(&[0]).unwrap();
            b.writer.flush().unwrap();
            let mut x = [0u8];
            a.reader.read_exact(&mut x).unwrap();
            thread::sleep(Duration::from_millis(100));
        }
        assert!(rx.try_recv().is_err());
        // Silence: fires within the timeout plus a tick.
        let t = Instant::now();
        let e = rx.recv_timeout(Duration::from_secs(3)).unwrap();
        assert!(t.elapsed() < Duration::from_millis(600), "{:?}", t.elapsed());
        assert!(e.to_string().contains("the target sent nothing for 0."), "{e}");
    }

    #[test]
    fn keepalives_flow_when_idle() {
        let (a, mut b) = Link::pair().unwrap();
        let w = Arc::new(Mutex::new(a.writer));
        let _k = KeepAlive::start(w, a.stats.clone(), Duration::from_millis(50));
        let m = crate::wire::protocol::read_frame(&mut b.reader, "t").unwrap();
        assert_eq!(m, Message::KeepAlive);
    }
}

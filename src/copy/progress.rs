//! Progress of long work, as the library reports it: phases (with the bytes
//! they cover), bytes done, notes. The library draws nothing: a caller
//! gives a [`Meter`] (xenmig's CLI: a bar on a terminal, one line per phase
//! otherwise) or an event [`Sink`], or nothing.

use std::sync::Arc;

use crate::wire::rate::Rate;

/// What a progress sink is told.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event<'a> {
    /// A phase began, covering `bytes` of the image.
    Phase { name: &'a str, bytes: u64 },
    /// A step inside a phase worth a line (a migrate phase, a disk pass).
    Note(&'a str),
}

/// Receives the events of a progress without a bar.
pub type Sink = Arc<dyn Fn(Event<'_>) + Send + Sync>;

/// Something that shows progress (a terminal bar, a log).
pub trait Meter: Send + Sync {
    /// A phase of `total` bytes begins.
    fn phase(&self, name: &str, total: u64);
    /// `bytes` more of the phase are done.
    fn inc(&self, bytes: u64);
    /// A note about the work (a pass done, a phase of migrate).
    fn message(&self, msg: &str);
    /// The bandwidth limit the work runs under.
    fn limit(&self, _rate: Rate) {}
    /// The work is over.
    fn finish(&self) {}
}

/// A [`Sink`] as a meter: phases and notes become events, bytes nothing.
struct Events(Sink);

impl Meter for Events {
    fn phase(&self, name: &str, total: u64) {
        (self.0)(Event::Phase { name, bytes: total });
    }
    fn inc(&self, _: u64) {}
    fn message(&self, msg: &str) {
        (self.0)(Event::Note(msg));
    }
}

/// The handle the engine reports through; cheap to clone.
#[derive(Clone)]
pub struct Progress {
    meter: Option<Arc<dyn Meter>>,
}

impl Progress {
    /// Report to `meter`.
    pub fn new(meter: Arc<dyn Meter>) -> Progress {
        Progress { meter: Some(meter) }
    }

    /// Events to `sink` (phases and notes; bytes are not counted).
    pub fn events(sink: Sink) -> Progress {
        Progress::new(Arc::new(Events(sink)))
    }

    /// Report nowhere.
    pub fn hidden() -> Progress {
        Progress { meter: None }
    }

    /// Show the bandwidth limit next to the rate (nothing when there is none).
    pub fn limit(&self, rate: Rate) {
        if let Some(m) = &self.meter {
            m.limit(rate);
        }
    }

    /// Start a phase of `total` bytes.
    pub fn phase(&self, name: &str, total: u64) {
        if let Some(m) = &self.meter {
            m.phase(name, total);
        }
    }

    pub fn inc(&self, bytes: u64) {
        if let Some(m) = &self.meter {
            m.inc(bytes);
        }
    }

    pub fn message(&self, msg: String) {
        if let Some(m) = &self.meter {
            m.message(&msg);
        }
    }

    pub fn finish(&self) {
        if let Some(m) = &self.meter {
            m.finish();
        }
    }
}

//! Progress display: a bar with rate and ETA on a terminal; without one
//! (hooks, cron, systemd), each phase as one event handed to the caller's
//! sink, which writes it as a log line (the library prints nothing itself).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Arc;

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

#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    sink: Option<Sink>,
}

impl Progress {
    /// A bar on stderr if it is a terminal and `quiet` is false.
    pub fn stderr(quiet: bool) -> Progress {
        if quiet || !std::io::stderr().is_terminal() {
            return Progress::hidden();
        }
        Progress::bar()
    }

    /// Events to `sink` instead of a bar.
    pub fn events(sink: Sink) -> Progress {
        Progress { bar: None, sink: Some(sink) }
    }

    fn bar() -> Progress {
        // Hidden until the first phase gives it a length, so that no empty
        // "0 B/0 B" bar flashes up.
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Progress { bar: Some(bar), sink: None }
    }

    /// Show the bandwidth limit next to the rate (nothing when there is none).
    pub fn limit(&self, rate: crate::wire::rate::Rate) {
        if let (Some(b), Some(_)) = (&self.bar, rate.limit()) {
            b.set_style(
                ProgressStyle::with_template(&format!(
                    "{{prefix:>9}} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} (limit {rate}/s) ETA {{eta}} {{msg}}"
                ))
                .expect("valid template")
                .progress_chars("=> "),
            );
        }
    }

    pub fn hidden() -> Progress {
        Progress { bar: None, sink: None }
    }

    /// Start a phase of `total` bytes.
    pub fn phase(&self, name: &str, total: u64) {
        if let Some(s) = &self.sink {
            s(Event::Phase { name, bytes: total });
        }
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(0);
            b.reset_eta();
            b.set_prefix(name.to_string());
            if b.is_hidden() {
                b.set_draw_target(ProgressDrawTarget::stderr());
            }
        }
    }

    pub fn inc(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    pub fn message(&self, msg: String) {
        if let Some(s) = &self.sink {
            s(Event::Note(&msg));
        }
        if let Some(b) = &self.bar {
            b.set_message(msg);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

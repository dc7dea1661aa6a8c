//! The progress bar on a terminal (indicatif): the CLI's [`Meter`].

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use xenmig::copy::progress::Meter;
use xenmig::wire::rate::Rate;

/// A bar with rate and ETA on stderr.
pub(crate) struct Bar(ProgressBar);

fn style(limit: Option<String>) -> ProgressStyle {
    let limit = limit.map(|l| format!(" (limit {l}/s)")).unwrap_or_default();
    ProgressStyle::with_template(&format!(
        "{{prefix:>9}} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}}{limit} ETA {{eta}} {{msg}}"
    ))
    .expect("valid template")
    .progress_chars("=> ")
}

impl Bar {
    pub(crate) fn new() -> Bar {
        // Hidden until the first phase gives it a length, so that no empty
        // "0 B/0 B" bar flashes up.
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
        bar.set_style(style(None));
        Bar(bar)
    }
}

impl Meter for Bar {
    fn phase(&self, name: &str, total: u64) {
        let b = &self.0;
        b.set_length(total);
        b.set_position(0);
        b.reset_eta();
        b.set_prefix(name.to_string());
        if b.is_hidden() {
            b.set_draw_target(ProgressDrawTarget::stderr());
        }
    }

    fn inc(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    fn message(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }

    fn limit(&self, rate: Rate) {
        if rate.limit().is_some() {
            self.0.set_style(style(Some(rate.to_string())));
        }
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

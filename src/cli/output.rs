//! What xenmig writes on stderr: the log format (`--log-format`), log
//! records, progress without a terminal, and the final error line.
//!
//! On a terminal the progress is a bar (unchanged by `--log-format`).
//! Without one (hooks, cron, systemd) each phase is one line with a
//! timestamp; `--log-format json` makes every stderr line, log records and
//! the final error included, one JSON object for log collectors.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, OnceLock};

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use serde_json::json;

pub(crate) use xenmig::config::LogFormat;
use xenmig::copy::progress::{Event, Progress};

/// `--log-format`'s parser: the values, with their help for `--help` and
/// the completions, read by the one `FromStr` the configuration file uses.
pub(crate) fn log_format_parser() -> impl TypedValueParser<Value = LogFormat> {
    PossibleValuesParser::new([
        PossibleValue::new("text").help("Human-readable lines, each with a timestamp when stderr is not a terminal"),
        PossibleValue::new("json").help("One JSON object per line: ts, level, event or target, message"),
    ])
    .map(|s| s.parse::<LogFormat>().expect("a possible value of --log-format"))
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// RFC 3339 UTC with milliseconds.
fn now() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

/// Set up `log` for the run: level from -v (or RUST_LOG), format from
/// `--log-format`; timestamps whenever stderr is not a terminal.
pub(crate) fn init(verbose: u8, format: LogFormat) {
    let _ = FORMAT.set(format);
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let tty = std::io::stderr().is_terminal();
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    b.target(env_logger::Target::Stderr);
    match format {
        LogFormat::Json => {
            b.format(|buf, r| {
                let line = json!({
                    "ts": now(), "level": r.level().as_str().to_ascii_lowercase(),
                    "target": r.target(), "message": xenmig::copy::sanitize(&r.args().to_string()),
                });
                writeln!(buf, "{line}")
            });
        }
        LogFormat::Text if tty => {
            b.format_timestamp(None);
        }
        LogFormat::Text => {
            b.format(|buf, r| {
                writeln!(buf, "{} xenmig: {}: {}", now(), r.level().as_str().to_ascii_lowercase(), r.args())
            });
        }
    }
    b.init();
}

/// The progress of a command: a bar on a terminal (unless `hide_bar`),
/// one line per phase otherwise (unless `quiet`).
pub(crate) fn progress(quiet: bool, hide_bar: bool, what: &str) -> Progress {
    if quiet {
        return Progress::hidden();
    }
    if std::io::stderr().is_terminal() {
        return if hide_bar { Progress::hidden() } else { Progress::new(Arc::new(super::bar::Bar::new())) };
    }
    let what = what.to_string();
    let json = format() == LogFormat::Json;
    Progress::events(Arc::new(move |e: Event<'_>| {
        let line = match (e, json) {
            (Event::Phase { name, bytes }, false) => format!("{} xenmig {what}: {name} ({bytes} bytes)", now()),
            (Event::Note(n), false) => format!("{} xenmig {what}: {}", now(), xenmig::copy::sanitize(n)),
            (Event::Phase { name, bytes }, true) => {
                json!({"ts": now(), "level": "info", "command": what, "event": "phase", "phase": name, "bytes": bytes})
                    .to_string()
            }
            (Event::Note(n), true) => {
                json!({"ts": now(), "level": "info", "command": what, "event": "note", "message": xenmig::copy::sanitize(n)})
                    .to_string()
            }
        };
        // One write per line, so that lines of concurrent threads do not mix.
        let _ = std::io::stderr().lock().write_all(format!("{line}\n").as_bytes());
    }))
}

/// The line a failed command ends with (`msg` is already sanitized).
pub(crate) fn error(msg: &str) {
    match format() {
        LogFormat::Json => eprintln!("{}", json!({"ts": now(), "level": "error", "message": msg})),
        LogFormat::Text => eprintln!("xenmig: {msg}"),
    }
}

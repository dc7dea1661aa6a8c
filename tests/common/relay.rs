//! A copy in-process through a relay that can edit each frame on its way:
//! hide a capability in a Hello (a peer of the previous release), lie in a
//! request or damage a reply. Shared by the tests of the optional
//! exchanges (`tests/subdelta.rs`, `tests/subgroup.rs`, `tests/similar.rs`,
//! `tests/stream.rs`, `tests/stream_levels.rs`).

#![allow(dead_code)]

use std::path::Path;
use std::thread;
use std::time::Duration;

use xenmig::blocks::layout::Align;
use xenmig::copy::source::{SourceOptions, SourceSession};
use xenmig::copy::target::{self, TargetOptions};
use xenmig::copy::{EngineError, Progress, Report};
use xenmig::storage::disk::Disk;
use xenmig::storage::image::Image;
use xenmig::wire::compress::Choice;
use xenmig::wire::protocol::{read_frame, write_message, Message, ProtocolError};
use xenmig::wire::transport::{Link, Reader, Writer};

/// What the relay does to each frame on its way.
pub type Edit = Box<dyn FnMut(Message) -> Message + Send>;

/// Pass frames from `from` to `to` through `edit` until either side stops;
/// an Error frame is passed on as such.
pub fn relay(mut from: Reader, mut to: Writer, mut edit: Edit) -> thread::JoinHandle<()> {
    thread::spawn(move || loop {
        let m = match read_frame(&mut from, "relay") {
            Ok(m) => edit(m),
            Err(ProtocolError::Remote(message)) => Message::Error { message },
            Err(_) => return,
        };
        let stop = matches!(m, Message::Error { .. });
        if write_message(&mut to, &m).and_then(|_| Ok(to.flush()?)).is_err() || stop {
            return;
        }
    })
}

pub fn keep() -> Edit {
    Box::new(|m| m)
}

/// `first`, then `then`, on each frame.
pub fn chain(mut first: Edit, mut then: Edit) -> Edit {
    Box::new(move |m| then(first(m)))
}

/// Hide capability bits `caps` in a Hello (a peer that does not know them).
pub fn hide(caps: u32) -> Edit {
    Box::new(move |m| match m {
        Message::Hello { version, role, caps: c } => Message::Hello { version, role, caps: c & !caps },
        m => m,
    })
}

pub struct Outcome {
    pub source: Result<Report, EngineError>,
    pub target: Result<Report, EngineError>,
}

/// The source's options of these copies: flat layout, blocks of `bs`
/// bytes, `codec`, a 30 s idle timeout.
pub fn source_options(bs: u32, codec: &str) -> SourceOptions {
    SourceOptions {
        block_size: bs,
        align: Align::Flat,
        compress: codec.parse::<Choice>().unwrap(),
        idle_timeout: Some(Duration::from_secs(30)),
        ..SourceOptions::default()
    }
}

/// The target's options of these copies: a 30 s idle timeout.
pub fn target_options() -> TargetOptions {
    TargetOptions { idle_timeout: Some(Duration::from_secs(30)), ..TargetOptions::default() }
}

/// Copy `src` onto `dst` ([`source_options`]) through a relay editing each
/// direction.
pub fn copy_through(src: &Path, dst: &Path, bs: u32, codec: &str, to_target: Edit, to_source: Edit) -> Outcome {
    copy_with(src, dst, &source_options(bs, codec), to_target, to_source)
}

/// Copy `src` onto `dst` with the source's `opts` through a relay editing
/// each direction.
pub fn copy_with(src: &Path, dst: &Path, opts: &SourceOptions, to_target: Edit, to_source: Edit) -> Outcome {
    copy_onto(src, dst, opts, target_options(), to_target, to_source)
}

/// [`copy_with`], the target's options given too (its references).
pub fn copy_onto(
    src: &Path,
    dst: &Path,
    opts: &SourceOptions,
    topts: TargetOptions,
    to_target: Edit,
    to_source: Edit,
) -> Outcome {
    copy_onto_disk(src, dst, opts, topts, to_target, to_source, |img| Box::new(img))
}

/// [`copy_onto`], the target writing DST through `wrap(DST)`
/// (`target::run_with`).
pub fn copy_onto_disk(
    src: &Path,
    dst: &Path,
    opts: &SourceOptions,
    topts: TargetOptions,
    to_target: Edit,
    to_source: Edit,
    wrap: fn(Image) -> Box<dyn Disk>,
) -> Outcome {
    let (src_link, relay_s) = Link::pair().unwrap();
    let (relay_t, tgt_link) = Link::pair().unwrap();
    let r1 = relay(relay_s.reader, relay_t.writer, to_target);
    let r2 = relay(relay_t.reader, relay_s.writer, to_source);
    let dst_path = dst.to_path_buf();
    let target = thread::spawn(move || target::run_with(&dst_path, &topts, tgt_link, &Progress::hidden(), &wrap));
    let source = SourceSession::start(src, opts, src_link, Progress::hidden()).and_then(|mut s| match s.final_pass() {
        Ok(rep) => s.finish(Duration::ZERO).map(|_| rep),
        Err(e) => {
            s.abort(&e);
            Err(e)
        }
    });
    let target = target.join().unwrap();
    let _ = (r1.join(), r2.join());
    Outcome { source, target }
}

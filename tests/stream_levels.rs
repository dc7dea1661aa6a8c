//! The stream's level (capability `CAP_STREAM_LEVELS`): on a link that
//! drains slowly (`--bwlimit` here, which `auto` measures like any slow
//! link) `auto` raises the stream's level mid-copy, the new frame starting
//! with the stream's recent content as its prefix; the copy stays
//! byte-identical and verified, and a peer without the capability (either
//! end) gets one frame at the first level.

mod common;
#[path = "common/relay.rs"]
mod relay;

use std::fs;
use std::path::Path;
use std::time::Duration;

use relay::{chain, copy_with, hide, keep, Edit};
use xenmig::blocks::layout::Align;
use xenmig::copy::source::SourceOptions;
use xenmig::copy::Report;
use xenmig::wire::protocol::{Message, CAP_RECEIPTS, CAP_STREAM_LEVELS};
use xenmig::wire::rate::Rate;

/// [`common::words`] with every 16th block zero.
fn text(len: usize, seed: u32) -> Vec<u8> {
    let mut data = common::words(len, seed);
    // Every 16th block zero: the target asks for runs of 15 blocks, so
    // `auto` routes them one by one as the link takes them (one run of
    // the whole image would be routed before the link is known).
    for block in data.chunks_mut(4096).step_by(16) {
        block.fill(0);
    }
    data
}

/// Copy `src` onto `dst` with `compress` through a relay editing each
/// direction, the source writing at most `bwlimit` bytes a second.
fn copy(src: &Path, dst: &Path, compress: &str, bwlimit: u64, to_target: Edit, to_source: Edit) -> (Report, Report) {
    let o = copy_with(src, dst, &options(compress, bwlimit), to_target, to_source);
    (o.source.unwrap(), o.target.unwrap())
}

/// The source's options of every copy here.
fn options(compress: &str, bwlimit: u64) -> SourceOptions {
    SourceOptions {
        block_size: 4096,
        align: Align::Flat,
        compress: compress.parse().unwrap(),
        idle_timeout: Some(Duration::from_secs(60)),
        bwlimit: Rate(bwlimit),
        raise_levels: true,
        ..SourceOptions::default()
    }
}

/// What every copy here must show: DST is the source, verified, the
/// counters add up, every fetched byte went through the stream, and the
/// target decoded one frame per level the source used.
fn check(src: &[u8], dst: &Path, rep: &Report, trep: &Report) {
    assert_eq!(fs::read(dst).unwrap(), src);
    assert!(rep.verified && trep.verified);
    assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched);
    assert_eq!(rep.blocks_total, (src.len() as u64).div_ceil(4096));
    assert_eq!(rep.bytes_fetched, rep.codecs.values().sum::<u64>());
    assert_eq!(rep.codecs.get("zstd-stream"), Some(&rep.bytes_fetched), "{:?}", rep.codecs);
    assert_eq!(trep.stream_frames, rep.stream_levels.len() as u64, "levels {:?}", rep.stream_levels);
}

/// 500 kB/s (below `LEVELS_BELOW`): once the writes blocked steadily for
/// 2 s (a slow spell), a higher level, whose CPU time stays far below the
/// link's, sends fewer bytes; the stream moves to it without losing its
/// history. 16 MiB of text take several seconds of this link: with 8 MiB
/// the stream had compressed nearly everything (the writer's buffer holds
/// 1 MiB) by the time the spell was long enough, in 3 copies of 5 under
/// load.
#[test]
fn a_slow_link_raises_the_streams_level() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let data = text(16 << 20, 1);
    fs::write(&a, &data).unwrap();
    let (rep, trep) = copy(&a, &b, "auto", 500_000, keep(), keep());
    check(&data, &b, &rep, &trep);
    assert_eq!(rep.stream_levels.first(), Some(&3), "{:?}", rep.stream_levels);
    assert!(rep.stream_levels.iter().any(|&l| l > 3), "the level never rose: {:?}", rep.stream_levels);
}

/// Either end without the capability: one frame, at the first level, on
/// the same slow link; so with `--compress zstd:3` between two current ends.
#[test]
fn without_the_capability_or_with_a_fixed_level_the_stream_keeps_its_level() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let data = text(2 << 20, 2);
    fs::write(&a, &data).unwrap();
    for (name, compress, to_target, to_source) in [
        // A target of the previous release: the source sees no bit.
        ("old target", "auto", keep(), hide(CAP_STREAM_LEVELS)),
        // A source of the previous release neither offers nor uses it.
        ("old source", "auto", hide(CAP_STREAM_LEVELS), hide(CAP_STREAM_LEVELS)),
        ("zstd:3", "zstd:3", keep(), keep()),
    ] {
        let _ = fs::remove_file(&b);
        let (rep, trep) = copy(&a, &b, compress, 1_000_000, to_target, to_source);
        check(&data, &b, &rep, &trep);
        assert_eq!(rep.stream_levels, [3], "{name}");
        assert_eq!(trep.stream_frames, 1, "{name}");
    }
}

/// A link of `rate` bytes a second behind the relay's buffers: each frame
/// towards the target waits its time on the link before it goes on.
fn paced(rate: f64) -> Edit {
    Box::new(move |m: Message| {
        std::thread::sleep(Duration::from_secs_f64(m.encode().len() as f64 / rate));
        m
    })
}

/// Receipts (`CAP_RECEIPTS`): the target's receipts show the link's pace
/// within half a second and the stream is held about a second ahead of
/// it, so the level rises mid-copy on a copy of 5 MiB of text (about two
/// seconds and a half at 300 kB/s). With the capability hidden both ways
/// (a peer of the previous release) a copy of 3 MiB, whose stream crosses
/// in about a second and a half, well under the writer's 2 s spell,
/// keeps level 3. (With receipts the 3 MiB copy rose too on a host
/// running at its usual speed; on one running 1.5x slower, in session
/// 24, the levels' measurement, 1.1 s there, ended after its last piece.)
#[test]
fn receipts_raise_the_level_mid_copy() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let data = text(5 << 20, 3);
    fs::write(&a, &data).unwrap();
    let (rep, trep) = copy(&a, &b, "auto", 0, paced(300e3), keep());
    check(&data, &b, &rep, &trep);
    eprintln!("with receipts: {:?}, {} receipts, {} bytes", rep.stream_levels, rep.receipts, rep.bytes_wire);
    assert!(rep.receipts > 0);
    assert_eq!(rep.stream_levels.first(), Some(&3), "{:?}", rep.stream_levels);
    assert!(rep.stream_levels.iter().any(|&l| l > 3), "the level never rose: {:?}", rep.stream_levels);
    let _ = fs::remove_file(&b);
    let data = text(3 << 20, 3);
    fs::write(&a, &data).unwrap();
    let (rep, trep) = copy(&a, &b, "auto", 0, chain(hide(CAP_RECEIPTS), paced(300e3)), hide(CAP_RECEIPTS));
    check(&data, &b, &rep, &trep);
    eprintln!("without: {:?}, {} bytes", rep.stream_levels, rep.bytes_wire);
    assert_eq!(rep.receipts, 0);
    assert_eq!(rep.stream_levels, [3]);
}

/// Receipts are trusted for pacing only: a target that claims more than
/// was written, or the same count over and over, makes no wrong block and
/// no stalled copy (the gate stops waiting after GATE_GIVE_UP without
/// progress).
#[test]
fn lying_receipts_pace_nothing_wrong() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let data = text(2 << 20, 4);
    fs::write(&a, &data).unwrap();
    for (name, lie) in [("far ahead", u64::MAX), ("stuck", 0)] {
        let _ = fs::remove_file(&b);
        let edit: Edit = Box::new(move |m| match m {
            Message::Received { waited_ns, .. } => Message::Received { bytes: lie, waited_ns },
            m => m,
        });
        let t = std::time::Instant::now();
        let (rep, trep) = copy(&a, &b, "auto", 0, paced(2e6), edit);
        check(&data, &b, &rep, &trep);
        assert!(rep.receipts > 0, "{name}");
        assert!(t.elapsed() < Duration::from_secs(30), "{name}: {:?}", t.elapsed());
    }
}

/// A target that sends receipts the source never agreed to (its Hello
/// offered none, as the relay makes it look here) is refused, the frame
/// named; nothing is reported verified.
#[test]
fn a_receipt_without_the_capability_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let data = text(2 << 20, 5);
    fs::write(&a, &data).unwrap();
    let o = copy_with(&a, &b, &options("auto", 0), paced(1e6), hide(CAP_RECEIPTS));
    let e = o.source.expect_err("the source took a receipt it never agreed to");
    assert!(format!("{e}").contains("Received"), "{e}");
    assert!(o.target.is_err());
}

//! The copy's zstd stream across runs (capability `CAP_ZSTD_STREAM`):
//! random images through a relay that can hide the capability (a peer of
//! the previous release) or damage the stream's pieces on the way.

mod common;
#[path = "common/relay.rs"]
mod relay;

use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

use proptest::prelude::*;
use relay::{hide, keep, relay, Edit};
use xenmig::blocks::layout::Align;
use xenmig::copy::source::{LiveOptions, SourceOptions, SourceSession};
use xenmig::copy::target::{self, TargetOptions};
use xenmig::copy::Progress;
use xenmig::wire::compress::Choice;
use xenmig::wire::protocol::{Message, CAP_ZSTD_STREAM};
use xenmig::wire::stream::STREAM_CODE;
use xenmig::wire::transport::Link;

const BS: usize = 512;

/// Hide the stream capability in a Hello (a peer that does not know it).
fn hide_stream() -> Edit {
    hide(CAP_ZSTD_STREAM)
}

/// Flip one byte of the `nth` stream piece, `at` (modulo its length) bytes in.
fn damage_piece(nth: usize, at: usize) -> Edit {
    let mut seen = 0;
    Box::new(move |m| match m {
        Message::Blocks { first_block, count, codec, raw_len, mut payload } if codec == STREAM_CODE => {
            if seen == nth && !payload.is_empty() {
                let i = at % payload.len();
                payload[i] ^= 0x5a;
            }
            seen += 1;
            Message::Blocks { first_block, count, codec, raw_len, payload }
        }
        m => m,
    })
}

/// Copy `src` onto `dst` in-process through a relay editing each direction.
fn copy_through(src: &Path, dst: &Path, opts: &SourceOptions, to_target: Edit, to_source: Edit) -> relay::Outcome {
    relay::copy_with(src, dst, opts, to_target, to_source)
}

fn source_opts(compress: &str) -> SourceOptions {
    SourceOptions {
        block_size: BS as u32,
        align: Align::Flat,
        compress: compress.parse::<Choice>().unwrap(),
        idle_timeout: Some(Duration::from_secs(30)),
        ..SourceOptions::default()
    }
}

/// Block contents: zero, a few text-like blocks that repeat (across runs:
/// what the stream's history finds), and blocks of noise seeded by the pick.
fn block(pick: u16) -> Vec<u8> {
    match pick % 16 {
        0 => vec![0; BS],
        p @ 1..=7 => (0..BS).map(|j| b"xen guest disk block "[(j + p as usize) % 21]).collect(),
        _ => common::noise(pick as u64, BS),
    }
}

fn build(picks: &[u16]) -> Vec<u8> {
    picks.iter().flat_map(|&p| block(p)).collect()
}

/// Each block of `dst` is the source's or what DST held before: a failed
/// copy never leaves a wrong block.
fn only_right_or_old_blocks(dst: &[u8], src: &[u8], old: &[u8]) -> Result<(), TestCaseError> {
    for (i, got) in dst.chunks(BS).enumerate() {
        let at = |v: &[u8]| v.get(i * BS..(i * BS + got.len()).min(v.len())).map(|s| s.to_vec());
        let old_block = at(old).filter(|b| b.len() == got.len()).unwrap_or_else(|| vec![0; got.len()]);
        prop_assert!(at(src).as_deref() == Some(got) || got == &old_block[..], "block {i} is neither");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// With the stream or without it (a peer lacking the capability on
    /// either side), the copy is byte-identical and its counters add up.
    #[test]
    fn streamed_or_not_the_copy_is_identical_and_counted(
        src in proptest::collection::vec(0u16..400, 1..3000),
        old in proptest::collection::vec(0u16..400, 0..3000),
        reference in proptest::collection::vec(0u16..400, 0..600),
        codec in prop_oneof![Just("zstd:1"), Just("zstd:3"), Just("lz4"), Just("auto")],
        hidden in 0u8..3,
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b, r) = (d.path().join("a"), d.path().join("b"), d.path().join("r"));
        let data = build(&src);
        fs::write(&a, &data).unwrap();
        fs::write(&b, build(&old)).unwrap();
        fs::write(&r, build(&reference)).unwrap();
        let (to_target, to_source) = match hidden {
            0 => (keep(), keep()),
            // A target that lacks it: the source sees no bit in its Hello.
            1 => (keep(), hide_stream()),
            // A source that lacks it neither offers nor uses it: hidden
            // both ways.
            _ => (hide_stream(), hide_stream()),
        };
        let (src_link, relay_s) = Link::pair().unwrap();
        let (relay_t, tgt_link) = Link::pair().unwrap();
        let r1 = relay(relay_s.reader, relay_t.writer, to_target);
        let r2 = relay(relay_t.reader, relay_s.writer, to_source);
        let (bp, rp) = (b.clone(), r.clone());
        let target = thread::spawn(move || {
            let opts = TargetOptions { references: vec![rp], ..TargetOptions::default() };
            target::run(&bp, &opts, tgt_link, &Progress::hidden())
        });
        let mut s = SourceSession::start(&a, &source_opts(codec), src_link, Progress::hidden()).unwrap();
        let rep = s.final_pass().unwrap();
        drop(s.finish(Duration::ZERO).unwrap());
        let trep = target.join().unwrap().unwrap();
        let _ = (r1.join(), r2.join());
        prop_assert_eq!(fs::read(&b).unwrap(), data.clone());
        prop_assert!(rep.verified && trep.verified);
        prop_assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched);
        prop_assert_eq!(rep.blocks_total, (data.len() as u64).div_ceil(BS as u64));
        prop_assert_eq!(rep.bytes_fetched, rep.codecs.values().sum::<u64>());
        let streamed = rep.codecs.get("zstd-stream").copied().unwrap_or(0);
        if hidden != 0 || codec == "lz4" {
            prop_assert_eq!(streamed, 0, "streamed without the capability on both ends: {:?}", rep.codecs);
        } else if codec.starts_with("zstd") {
            // Every fetched byte went through the stream.
            prop_assert_eq!(streamed, rep.bytes_fetched, "{:?}", rep.codecs);
        }
        prop_assert_eq!(fs::read(&a).unwrap(), data);
    }

    /// A damaged piece of the stream: the copy fails (zstd refuses it or a
    /// block misses its key) or, if the damage happened to change nothing,
    /// verifies; it never leaves a wrong block in DST.
    #[test]
    fn a_damaged_piece_never_lands_a_wrong_block(
        src in proptest::collection::vec(0u16..400, 600..3000),
        old in proptest::collection::vec(0u16..400, 0..3000),
        nth in 0usize..3,
        at in any::<usize>(),
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let data = build(&src);
        let before = build(&old);
        fs::write(&a, &data).unwrap();
        fs::write(&b, &before).unwrap();
        let out = copy_through(&a, &b, &source_opts("zstd:3"), damage_piece(nth, at), keep());
        let dst = fs::read(&b).unwrap();
        match (&out.source, &out.target) {
            (Ok(rep), Ok(_)) => {
                prop_assert!(rep.verified);
                prop_assert_eq!(&dst, &data);
            }
            (_, Err(e)) => {
                prop_assert!(out.source.is_err(), "the source reported success after the target failed: {e}");
                only_right_or_old_blocks(&dst, &data, &before)?;
            }
            (Err(e), Ok(_)) => prop_assert!(false, "the target verified a copy the source failed: {}", e),
        }
    }
}

/// Flipping a byte in the middle of a piece that carries noise (stored as
/// literals) changes the output: the target fails naming the block, and
/// never writes it.
#[test]
fn a_flipped_literal_fails_the_copy_with_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let data = common::noise(11, 64 * BS);
    fs::write(&a, &data).unwrap();
    let out = copy_through(&a, &b, &source_opts("zstd:3"), damage_piece(0, 10 * BS), keep());
    let e = out.target.expect_err("a damaged piece fails the copy").to_string();
    // (Onto a new DST the blocks come without keys, checked by run: the
    // run's key names them, CAP_HELD_KEYS.)
    assert!(
        e.contains("does not match its digest")
            || e.contains("do not match their run's key")
            || e.contains("zstd-stream"),
        "{e}"
    );
    assert!(out.source.is_err());
    let dst = fs::read(&b).unwrap();
    assert!(dst.chunks(BS).zip(data.chunks(BS)).all(|(got, want)| got == want || got.iter().all(|&x| x == 0)));
}

/// A source that streams although the target did not agree to it (here:
/// the relay hides the source's capability from the target) is refused.
#[test]
fn a_stream_piece_without_the_capability_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    fs::write(&a, common::noise(3, 40 * BS)).unwrap();
    let out = copy_through(&a, &b, &source_opts("zstd:3"), hide_stream(), keep());
    let e = out.target.expect_err("refused").to_string();
    assert!(e.contains("no stream was agreed"), "{e}");
}

/// A stream piece whose frame asks for a window over the bound (1 GiB) is
/// refused with an error naming the stream, without allocating it.
#[test]
fn a_stream_asking_for_a_huge_window_is_refused() {
    use zstd::stream::raw::{CParameter, Encoder, InBuffer, Operation, OutBuffer};
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let data = common::noise(5, 40 * BS);
    fs::write(&a, &data).unwrap();
    let image = data.clone();
    let mut first = true;
    let swap: Edit = Box::new(move |m| match m {
        Message::Blocks { first_block, count, codec, raw_len, .. } if codec == STREAM_CODE && first => {
            first = false;
            // The same run, as a stream with a 2^30-byte window.
            let raw = &image[first_block as usize * BS..][..raw_len as usize];
            let mut enc = Encoder::new(3).unwrap();
            enc.set_parameter(CParameter::WindowLog(30)).unwrap();
            let mut out = vec![0u8; raw.len() + 4096];
            let mut i = InBuffer::around(raw);
            let mut o = OutBuffer::around(&mut out[..]);
            while i.pos() < raw.len() {
                enc.run(&mut i, &mut o).unwrap();
            }
            while enc.flush(&mut o).unwrap() != 0 {}
            let n = o.pos();
            out.truncate(n);
            Message::Blocks { first_block, count, codec, raw_len, payload: out }
        }
        m => m,
    });
    let out = copy_through(&a, &b, &source_opts("zstd:3"), swap, keep());
    let e = out.target.expect_err("refused").to_string();
    assert!(e.contains("zstd-stream") && e.contains("memory"), "{e}");
}

/// A live copy keeps one stream across its passes.
#[test]
fn a_live_copy_streams_across_passes() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    common::sample_image(&a, 9, 512);
    let (src_link, tgt_link) = Link::pair().unwrap();
    let bp = b.clone();
    let target = thread::spawn(move || target::run(&bp, &TargetOptions::default(), tgt_link, &Progress::hidden()));
    let opts = SourceOptions {
        compress: "zstd:3".parse().unwrap(),
        live: Some(LiveOptions::default()),
        ..SourceOptions::default()
    };
    let mut s = SourceSession::start(&a, &opts, src_link, Progress::hidden()).unwrap();
    s.scan().unwrap();
    common::change_blocks(&a, 10, 20, 77);
    s.send_pass().unwrap();
    s.scan().unwrap();
    common::change_blocks(&a, 300, 5, 78);
    let rep = s.final_pass().unwrap();
    drop(s.finish(Duration::ZERO).unwrap());
    assert!(rep.verified && target.join().unwrap().unwrap().verified);
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    assert!(rep.passes.len() >= 3, "{:?}", rep.passes);
    assert_eq!(rep.codecs.keys().collect::<Vec<_>>(), ["zstd-stream"], "{:?}", rep.codecs);
    assert_eq!(rep.bytes_fetched, rep.codecs["zstd-stream"]);
}

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

use relay::{copy_with, hide, keep, Edit};
use xenmig::blocks::layout::Align;
use xenmig::copy::source::SourceOptions;
use xenmig::copy::Report;
use xenmig::wire::protocol::CAP_STREAM_LEVELS;
use xenmig::wire::rate::Rate;

/// Text-like data: words drawn pseudo-randomly from a vocabulary, which
/// every zstd level compresses, the higher ones clearly better.
fn text(len: usize, seed: u32) -> Vec<u8> {
    let words =
        ["block ", "digest ", "xen ", "guest ", "disk ", "migrate ", "lvm ", "hash ", "zero ", "dom0 ", "link "];
    let mut x = seed;
    let mut data = Vec::with_capacity(len + 16);
    while data.len() < len {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        data.extend_from_slice(words[(x >> 16) as usize % words.len()].as_bytes());
        if x % 7 == 0 {
            data.extend_from_slice(format!("{} ", x % 1000).as_bytes());
        }
    }
    data.truncate(len);
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
    let opts = SourceOptions {
        block_size: 4096,
        align: Align::Flat,
        compress: compress.parse().unwrap(),
        idle_timeout: Some(Duration::from_secs(60)),
        bwlimit: Rate(bwlimit),
        raise_levels: true,
        ..SourceOptions::default()
    };
    let o = copy_with(src, dst, &opts, to_target, to_source);
    (o.source.unwrap(), o.target.unwrap())
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

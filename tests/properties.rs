//! Property tests: random images and references, copied through the engine
//! in-process. The output is byte-identical to the source and the counters
//! are consistent, whatever the mix of zero, shared, moved and new blocks.

use std::fs;

use proptest::prelude::*;
use xenmig::copy::run::{copy, CopyOptions};
use xenmig::copy::target::TargetOptions;
use xenmig::copy::Progress;
use xenmig::wire::transport::Location;

const BS: usize = 512;

/// A palette of block contents; images are sequences of palette indices so
/// that source, target and reference share blocks at random places.
fn palette() -> Vec<Vec<u8>> {
    let mut p = vec![vec![0u8; BS]];
    for i in 1..12u8 {
        p.push((0..BS).map(|j| i.wrapping_mul(31).wrapping_add((j % 7) as u8)).collect());
    }
    p
}

fn build(picks: &[u8], tail: usize) -> Vec<u8> {
    let p = palette();
    let mut v: Vec<u8> = picks.iter().flat_map(|&i| p[i as usize % p.len()].clone()).collect();
    v.extend(std::iter::repeat(7u8).take(tail));
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]
    #[test]
    fn copies_are_identical_and_counted(
        src in proptest::collection::vec(0u8..12, 0..3000),
        tail in 0usize..BS,
        old in proptest::collection::vec(0u8..12, 0..3000),
        reference in proptest::collection::vec(0u8..12, 0..500),
        codec in prop_oneof![Just("none"), Just("lz4"), Just("zstd:1"), Just("auto")],
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b, r) = (d.path().join("a"), d.path().join("b"), d.path().join("r"));
        let data = build(&src, tail);
        fs::write(&a, &data).unwrap();
        fs::write(&b, build(&old, 0)).unwrap();
        fs::write(&r, build(&reference, 3)).unwrap();
        let mut opts = CopyOptions::default();
        opts.source.block_size = BS as u32;
        opts.source.compress = codec.parse().unwrap();
        opts.target = TargetOptions { references: vec![r.clone()], ..TargetOptions::default() };
        let rep = copy(&Location::Local(a.clone()), &Location::Local(b.clone()), &opts, &Progress::hidden()).unwrap();
        prop_assert_eq!(fs::read(&b).unwrap(), data.clone());
        prop_assert!(rep.verified);
        prop_assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched);
        prop_assert_eq!(rep.blocks_total, (data.len() as u64).div_ceil(BS as u64));
        prop_assert!(rep.bytes_fetched <= rep.blocks_fetched * BS as u64);
        prop_assert_eq!(fs::read(&a).unwrap(), data);
    }
}

//! Changed blocks against their old version (capability `CAP_SUB_DELTA`):
//! random images copied onto an old copy of themselves with small edits,
//! shifted data, rewritten and zeroed blocks, through a relay that can hide
//! the capability (a peer of the previous release), lie in the target's
//! signatures or damage the source's deltas on the way.

mod common;
#[path = "common/relay.rs"]
mod relay;

use std::fs;
use std::path::Path;

use proptest::prelude::*;
use relay::{chain, hide, keep, Edit, Outcome};
use xenmig::copy::Report;
use xenmig::wire::protocol::{Message, CAP_DELTA_BATCH, CAP_SHORT_SUB_HASHES, CAP_SUB_DELTA};
use xenmig::wire::subdelta;

const BS: usize = 4096;

/// Hide the capability in a Hello (a peer that does not know it).
fn hide_delta() -> Edit {
    hide(CAP_SUB_DELTA)
}

/// The signature of the source's own block `block` of `src`: what a lying
/// target sends, so that the source sends nothing and the target rebuilds
/// its old block.
fn own_signature(src: &[u8], block: u64) -> Vec<u8> {
    let at = block as usize * BS;
    subdelta::signature(&src[at..(at + BS).min(src.len())])
}

/// A target that lies in every `FetchDelta` ([`own_signature`]).
fn lying_signatures(src: Vec<u8>) -> Edit {
    Box::new(move |m| match m {
        Message::FetchDelta { block, .. } => Message::FetchDelta { block, sig: own_signature(&src, block) },
        m => m,
    })
}

/// Flip one byte of every delta's payload, `at` (modulo its length) bytes in.
fn damage_deltas(at: usize) -> Edit {
    Box::new(move |m| match m {
        Message::Delta { block, codec, raw_len, mut payload } => {
            if !payload.is_empty() {
                let i = at % payload.len();
                payload[i] ^= 0x5a;
            }
            Message::Delta { block, codec, raw_len, payload }
        }
        m => m,
    })
}

/// Copy `src` onto `dst` in-process through a relay editing each direction.
///
/// With the 4-byte sub-block hashes of `FetchDelta` (`CAP_SHORT_SUB_HASHES`
/// hidden both ways, the exchange a peer of the previous release gets): a
/// 4-byte hash matches by chance once in 2^32 sub-blocks, so every failed
/// delta here is one the test caused.
fn copy_through(src: &Path, dst: &Path, codec: &str, to_target: Edit, to_source: Edit) -> Outcome {
    let (to_target, to_source) =
        (chain(hide(CAP_SHORT_SUB_HASHES), to_target), chain(hide(CAP_SHORT_SUB_HASHES), to_source));
    relay::copy_through(src, dst, BS as u32, codec, to_target, to_source)
}

/// How a block of the new image relates to the old one at the same place.
#[derive(Clone, Copy, Debug)]
enum Change {
    Same,
    /// A few bytes overwritten in place.
    Edit(u16, u8),
    /// Bytes inserted at an offset: the rest of the block shifts.
    Shift(u16),
    /// New content altogether.
    Rewrite,
    /// New content where the old copy had zeros (no old version to sign).
    OverZero,
    /// Zeroed.
    Zeroed,
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => Just(Change::Same),
        4 => (any::<u16>(), any::<u8>()).prop_map(|(a, v)| Change::Edit(a, v)),
        2 => any::<u16>().prop_map(Change::Shift),
        2 => Just(Change::Rewrite),
        1 => Just(Change::OverZero),
        1 => Just(Change::Zeroed),
    ]
}

/// The old and the new image, and how many blocks should travel as deltas
/// (changed, non-zero, with a non-zero old version, found nowhere in the
/// old image).
fn images(seed: u64, changes: &[Change], tail: usize) -> (Vec<u8>, Vec<u8>, u64) {
    let mut old = Vec::new();
    let mut new = Vec::new();
    for (i, c) in changes.iter().enumerate() {
        let o = common::noise(seed ^ (i as u64 * 7919), BS);
        let fresh = common::noise(!seed ^ (i as u64 * 104_729), BS);
        let (ob, nb) = match *c {
            Change::Same => (o.clone(), o),
            Change::Edit(at, v) => {
                let mut n = o.clone();
                let at = at as usize % BS;
                for b in &mut n[at..(at + 40).min(BS)] {
                    *b ^= v | 1;
                }
                (o, n)
            }
            Change::Shift(at) => {
                let at = at as usize % BS;
                let mut n = o[..at].to_vec();
                n.extend_from_slice(b"inserted!");
                n.extend_from_slice(&o[at..]);
                n.truncate(BS);
                (o, n)
            }
            Change::Rewrite => (o, fresh),
            Change::OverZero => (vec![0; BS], fresh),
            Change::Zeroed => (o, vec![0; BS]),
        };
        old.extend(ob);
        new.extend(nb);
    }
    new.extend(common::noise(seed, tail));
    old.extend(vec![3u8; tail]);
    let old_blocks: std::collections::HashSet<&[u8]> = old.chunks(BS).collect();
    let deltas = new
        .chunks(BS)
        .zip(old.chunks(BS))
        .filter(|(n, o)| {
            n != o
                && subdelta::worth_it(n.len())
                && n.iter().any(|&b| b != 0)
                && o.iter().any(|&b| b != 0)
                && !old_blocks.contains(n)
        })
        .count() as u64;
    (old, new, deltas)
}

fn counted(rep: &Report, len: usize) -> Result<(), TestCaseError> {
    prop_assert!(rep.verified);
    prop_assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched);
    prop_assert_eq!(rep.blocks_total, (len as u64).div_ceil(BS as u64));
    prop_assert!(rep.blocks_delta <= rep.blocks_fetched);
    prop_assert_eq!(rep.bytes_fetched, rep.codecs.values().sum::<u64>());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Onto an old copy, with the capability on both ends or hidden on
    /// either: byte-identical, counted, and every changed block with an old
    /// version went as a delta exactly when both ends have it.
    #[test]
    fn deltas_rebuild_the_image_and_are_counted(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..48),
        tail in prop_oneof![Just(0usize), 1usize..BS],
        codec in prop_oneof![Just("none"), Just("zstd:1"), Just("lz4"), Just("auto")],
        hidden in 0u8..3,
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let (old, new, deltas) = images(seed, &changes, tail);
        fs::write(&a, &new).unwrap();
        fs::write(&b, &old).unwrap();
        let (to_target, to_source) = match hidden {
            0 => (keep(), keep()),
            // A source without it: the target sees no bit and never asks.
            1 => (hide_delta(), keep()),
            // A target without it neither offers nor asks: hidden both ways.
            _ => (hide_delta(), hide_delta()),
        };
        let o = copy_through(&a, &b, codec, to_target, to_source);
        let rep = o.source.unwrap();
        prop_assert!(o.target.unwrap().verified);
        prop_assert_eq!(fs::read(&b).unwrap(), new.clone());
        counted(&rep, new.len())?;
        prop_assert_eq!(rep.deltas_failed, 0);
        prop_assert_eq!(rep.blocks_delta, if hidden == 0 { deltas } else { 0 }, "{:?}", rep);
    }

    /// A target whose signatures lie (or whose old blocks changed after it
    /// signed them): every rebuilt block misses its key and is fetched
    /// whole; the copy is still byte-identical.
    #[test]
    fn a_wrong_signature_costs_a_refetch_never_a_wrong_block(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..32),
        codec in prop_oneof![Just("none"), Just("zstd:1")],
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let (old, new, deltas) = images(seed, &changes, 0);
        fs::write(&a, &new).unwrap();
        fs::write(&b, &old).unwrap();
        let o = copy_through(&a, &b, codec, keep(), lying_signatures(new.clone()));
        let rep = o.source.unwrap();
        prop_assert_eq!(fs::read(&b).unwrap(), new.clone());
        counted(&rep, new.len())?;
        prop_assert_eq!(rep.blocks_delta, 0);
        prop_assert_eq!(rep.deltas_failed, deltas);
    }

    /// Damaged deltas: sent raw, each fails to rebuild or to match its key
    /// and is fetched whole (byte-identical copy); through the stream, the
    /// stream breaks and the copy fails with an error saying so. Either
    /// way no block in DST is wrong: each is the new one or the old one.
    #[test]
    fn a_damaged_delta_is_refetched_or_fails_clearly(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..32),
        at in any::<usize>(),
        codec in prop_oneof![Just("none"), Just("zstd:1")],
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let (old, new, deltas) = images(seed, &changes, 0);
        fs::write(&a, &new).unwrap();
        fs::write(&b, &old).unwrap();
        let o = copy_through(&a, &b, codec, damage_deltas(at), keep());
        damaged_outcome(o, &b, &old, &new, deltas, codec)?;
    }
}

/// What a copy through damaged deltas may end in: every block in DST the
/// new one or the old one; a finished copy byte-identical and counted,
/// each delta rebuilt or refetched; a failed one only through the stream
/// (a raw delta is always refetched), with an error saying why.
fn damaged_outcome(
    o: Outcome,
    b: &Path,
    old: &[u8],
    new: &[u8],
    deltas: u64,
    codec: &str,
) -> Result<(), TestCaseError> {
    let got = fs::read(b).unwrap();
    for (i, blk) in got.chunks(BS).enumerate() {
        prop_assert!(blk == &new[i * BS..i * BS + blk.len()] || blk == &old[i * BS..i * BS + blk.len()], "block {i}");
    }
    match o.target {
        Ok(trep) => {
            prop_assert_eq!(got, new.to_vec());
            counted(&trep, new.len())?;
            prop_assert_eq!(trep.deltas_failed + trep.blocks_delta, deltas);
        }
        Err(e) => {
            prop_assert!(codec != "none", "{e}");
            let msg = e.to_string();
            prop_assert!(msg.contains("zstd") || msg.contains("does not match its digest"), "{msg}");
        }
    }
    Ok(())
}

/// A source answering with a delta claiming more bytes than the block can
/// need is refused before it is decoded.
#[test]
fn an_oversized_delta_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let (old, new, _) = images(9, &[Change::Edit(100, 1); 4], 0);
    fs::write(&a, &new).unwrap();
    fs::write(&b, &old).unwrap();
    let grow: Edit = Box::new(|m| match m {
        Message::Delta { block, codec, .. } => {
            let raw_len = (subdelta::max_body(BS) + 1) as u32;
            Message::Delta { block, codec, raw_len, payload: vec![0; raw_len as usize] }
        }
        m => m,
    });
    let o = copy_through(&a, &b, "none", grow, keep());
    let e = o.target.unwrap_err().to_string();
    assert!(e.contains("a delta of 4098 bytes for block"), "{e}");
    assert!(o.source.is_err());
}

/// Onto a DST whose old blocks are unrelated to the new ones (another
/// guest's data), every delta would be a whole block plus its request:
/// once the answers show that, the target asks for runs. Only the deltas
/// sent before the first answers came back (at most the request window)
/// and one probe in 32 after that are asked as deltas.
#[test]
fn deltas_stop_when_the_old_blocks_are_unrelated() {
    let blocks = 24 * 1024;
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let new = common::noise(1, blocks * BS);
    fs::write(&a, &new).unwrap();
    fs::write(&b, common::noise(2, blocks * BS)).unwrap();
    let o = copy_through(&a, &b, "none", keep(), keep());
    let rep = o.target.unwrap();
    assert!(fs::read(&b).unwrap() == new, "the copy differs");
    assert!(rep.verified);
    assert_eq!(rep.blocks_fetched, blocks as u64);
    let limit = xenmig::wire::protocol::WINDOW as u64 + 64 + blocks as u64 / 32;
    assert!(rep.blocks_delta > 0 && rep.blocks_delta <= limit, "{} deltas of {} blocks", rep.blocks_delta, blocks);
}

/// Blocks of `new` that differ from `old` where some changed sub-block has
/// the same short hash as the old one: the only deltas that may fail with
/// `FetchDeltaShort` when nobody lies.
fn chance_matches(old: &[u8], new: &[u8]) -> u64 {
    let short = |b: &[u8]| subdelta::short_signature(&subdelta::signature(b));
    old.chunks(BS)
        .zip(new.chunks(BS))
        .filter(|(o, n)| {
            let (so, sn) = (short(o), short(n));
            o.chunks(subdelta::SUB)
                .zip(n.chunks(subdelta::SUB))
                .zip(so.chunks(subdelta::SHORT_HASH_LEN).zip(sn.chunks(subdelta::SHORT_HASH_LEN)))
                .any(|((a, b), (ha, hb))| a != b && ha == hb)
        })
        .count() as u64
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Short sub-block hashes (`CAP_SHORT_SUB_HASHES`) on both ends, or
    /// hidden both ways (a peer of the previous release on either side):
    /// byte-identical, counted, the deltas asked with `FetchDeltaShort`
    /// exactly when both ends have it, and a delta fails only where a short
    /// hash matched by chance (then the block is fetched whole).
    #[test]
    fn short_hashes_rebuild_the_image_and_are_counted(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..48),
        tail in prop_oneof![Just(0usize), 1usize..BS],
        codec in prop_oneof![Just("none"), Just("zstd:1"), Just("auto")],
        hidden in any::<bool>(),
    ) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let (old, new, deltas) = images(seed, &changes, tail);
        fs::write(&a, &new).unwrap();
        fs::write(&b, &old).unwrap();
        let (short, long) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s2, l2) = (short.clone(), long.clone());
        let count: Edit = Box::new(move |m| {
            match &m {
                Message::FetchDeltaShort { .. } => s2.fetch_add(1, Ordering::SeqCst),
                Message::FetchDelta { .. } => l2.fetch_add(1, Ordering::SeqCst),
                _ => 0,
            };
            m
        });
        let (to_target, to_source) =
            if hidden { (hide(CAP_SHORT_SUB_HASHES), chain(hide(CAP_SHORT_SUB_HASHES), count)) } else { (keep(), count) };
        let o = unbatched(&a, &b, codec, to_target, to_source);
        let rep = o.source.unwrap();
        prop_assert!(o.target.unwrap().verified);
        prop_assert_eq!(fs::read(&b).unwrap(), new.clone());
        counted(&rep, new.len())?;
        prop_assert_eq!(rep.blocks_delta + rep.deltas_failed, deltas, "{:?}", rep);
        if hidden {
            prop_assert_eq!(rep.deltas_failed, 0);
            prop_assert_eq!((short.load(Ordering::SeqCst), long.load(Ordering::SeqCst) as u64), (0, deltas));
        } else {
            prop_assert!(rep.deltas_failed <= chance_matches(&old, &new));
            prop_assert_eq!((short.load(Ordering::SeqCst) as u64, long.load(Ordering::SeqCst)), (deltas, 0));
        }
    }

    /// A target whose short signatures are the source's own (as if every
    /// short hash matched by chance): every rebuilt block misses its key
    /// and is fetched whole; the copy is still byte-identical.
    #[test]
    fn a_chance_match_of_short_hashes_costs_a_refetch_never_a_wrong_block(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..32),
        codec in prop_oneof![Just("none"), Just("zstd:1")],
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let (old, new, deltas) = images(seed, &changes, 0);
        fs::write(&a, &new).unwrap();
        fs::write(&b, &old).unwrap();
        let src = new.clone();
        let lie: Edit = Box::new(move |m| match m {
            Message::FetchDeltaShort { block, .. } => {
                Message::FetchDeltaShort { block, sig: subdelta::short_signature(&own_signature(&src, block)) }
            }
            m => m,
        });
        let o = unbatched(&a, &b, codec, keep(), lie);
        let rep = o.source.unwrap();
        prop_assert_eq!(fs::read(&b).unwrap(), new.clone());
        counted(&rep, new.len())?;
        prop_assert_eq!(rep.blocks_delta, 0);
        prop_assert_eq!(rep.deltas_failed, deltas);
    }
}

/// Copy through the relay with short sub-block hashes and without batches
/// of deltas (`CAP_DELTA_BATCH` hidden both ways): one `FetchDeltaShort`
/// and one `Delta` a block, the exchange of the previous release.
fn unbatched(src: &Path, dst: &Path, codec: &str, to_target: Edit, to_source: Edit) -> Outcome {
    let (to_target, to_source) = (chain(hide(CAP_DELTA_BATCH), to_target), chain(hide(CAP_DELTA_BATCH), to_source));
    relay::copy_through(src, dst, BS as u32, codec, to_target, to_source)
}

/// A short signature of the wrong length, or a `FetchDeltaShort` from a
/// target that did not agree to it, fails the copy with an error naming
/// the block or the frame; DST keeps its old blocks.
#[test]
fn a_misshapen_short_signature_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let (old, new, _) = images(9, &[Change::Edit(100, 1); 4], 0);
    fs::write(&a, &new).unwrap();
    let cut: Edit = Box::new(|m| match m {
        Message::FetchDeltaShort { block, mut sig } => {
            sig.truncate(sig.len() - 2);
            Message::FetchDeltaShort { block, sig }
        }
        m => m,
    });
    fs::write(&b, &old).unwrap();
    let o = unbatched(&a, &b, "none", keep(), cut);
    let e = o.source.unwrap_err().to_string();
    assert!(e.contains("a signature of 14 bytes for a block of 4096 bytes, which needs 16"), "{e}");
    assert!(o.target.is_err());
    assert_eq!(fs::read(&b).unwrap(), old);
    // The source without the bit: a FetchDeltaShort is not a request it takes.
    let long_to_short: Edit = Box::new(|m| match m {
        Message::FetchDelta { block, sig } => Message::FetchDeltaShort { block, sig: subdelta::short_signature(&sig) },
        m => m,
    });
    let o = unbatched(&a, &b, "none", hide(CAP_SHORT_SUB_HASHES), chain(hide(CAP_SHORT_SUB_HASHES), long_to_short));
    let e = o.source.unwrap_err().to_string();
    assert!(e.contains("unexpected FetchDeltaShort frame"), "{e}");
    assert_eq!(fs::read(&b).unwrap(), old);
}

/// Copy `src` into a new `dst` (flat layout, `codec`), the target given
/// `refs`, through a relay editing each direction (short sub-block hashes
/// hidden, as in [`copy_through`]).
fn copy_with_refs(src: &Path, dst: &Path, refs: &[&Path], codec: &str, to_source: Edit) -> Outcome {
    let topts = xenmig::copy::target::TargetOptions {
        references: refs.iter().map(|r| r.to_path_buf()).collect(),
        ..relay::target_options()
    };
    let (to_target, to_source) = (hide(CAP_SHORT_SUB_HASHES), chain(hide(CAP_SHORT_SUB_HASHES), to_source));
    relay::copy_onto(src, dst, &relay::source_options(BS as u32, codec), topts, to_target, to_source)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// A new DST, the old copy given as a reference of the same size: the
    /// reference is DST's old copy (the base), and every changed block
    /// with an old version goes as a delta, as it does in place.
    #[test]
    fn a_reference_laid_out_alike_is_a_new_dst_s_old_copy(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..48),
        tail in prop_oneof![Just(0usize), 1usize..BS],
        codec in prop_oneof![Just("none"), Just("zstd:1"), Just("auto")],
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b, r) = (d.path().join("a"), d.path().join("b"), d.path().join("r"));
        let (old, new, deltas) = images(seed, &changes, tail);
        fs::write(&a, &new).unwrap();
        fs::write(&r, &old).unwrap();
        let o = copy_with_refs(&a, &b, &[&r], codec, keep());
        let rep = o.target.unwrap();
        prop_assert_eq!(fs::read(&b).unwrap(), new.clone());
        prop_assert_eq!(fs::read(&r).unwrap(), old, "the reference is only read");
        counted(&rep, new.len())?;
        prop_assert_eq!(rep.deltas_failed, 0);
        prop_assert_eq!(rep.blocks_in_place, 0);
        prop_assert_eq!(rep.blocks_delta, deltas, "{:?}", rep);
    }
}

/// Old and new images of `groups` groups of 256 blocks, the new one with
/// small edits in the first 8 blocks of each group; and how many blocks
/// were edited.
fn edited_images(groups: usize) -> (Vec<u8>, Vec<u8>, u64) {
    let old = common::noise(5, groups * 256 * BS);
    let mut new = old.clone();
    let mut edited = 0;
    for g in 0..groups {
        for k in 0..8 {
            let at = (g * 256 + k) * BS + 100 * k;
            new[at..at + 24].fill(0xA5);
            edited += 1;
        }
    }
    (old, new, edited)
}

/// The base only where it is laid out exactly as the source's image: the
/// same old copy one block longer is still a reference (its blocks are
/// found by key), but no old copy: the edited blocks come whole, with every
/// key of their groups, where with the base they come as deltas with the
/// keys of the changed sub-groups only.
#[test]
fn only_a_reference_of_the_same_layout_is_the_base() {
    let d = tempfile::tempdir().unwrap();
    let (a, r, longer) = (d.path().join("a"), d.path().join("r"), d.path().join("longer"));
    let (old, new, edited) = edited_images(4);
    fs::write(&a, &new).unwrap();
    fs::write(&r, &old).unwrap();
    let mut l = old.clone();
    l.extend(common::noise(6, BS));
    fs::write(&longer, &l).unwrap();
    let run = |refs: &[&Path], name: &str| {
        let b = d.path().join(name);
        let rep = copy_with_refs(&a, &b, refs, "none", keep()).target.unwrap();
        assert!(fs::read(&b).unwrap() == new, "{name}: the copy differs");
        assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched);
        rep
    };
    let based = run(&[&longer, &r], "based");
    let other = run(&[&longer], "other");
    assert_eq!((based.blocks_delta, based.deltas_failed), (edited, 0), "{based:?}");
    assert!(based.blocks_keyless > 0, "{based:?}");
    assert_eq!((other.blocks_delta, other.blocks_keyless, other.blocks_fetched), (0, 0, edited), "{other:?}");
    assert!(
        based.bytes_wire * 3 < other.bytes_wire,
        "with the base {} bytes, without {}",
        based.bytes_wire,
        other.bytes_wire
    );
}

/// The base rewritten, or cut to half its size, after the target filled
/// DST from it (at its first request): DST holds the bytes that were
/// hashed, so the change costs nothing: no group is asked for again, no
/// delta fails (the changed blocks' deltas lean on DST's blocks), and the
/// copy is byte-identical. (Deltas against the base itself, for similar
/// blocks: `tests/similar.rs`.)
#[test]
fn a_base_changed_after_the_fill_changes_nothing() {
    use std::os::unix::fs::FileExt;
    for cut in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let (a, b, r) = (d.path().join("a"), d.path().join("b"), d.path().join("r"));
        let (old, new, _) = edited_images(4);
        fs::write(&a, &new).unwrap();
        fs::write(&r, &old).unwrap();
        let (path, len) = (r.clone(), old.len());
        let mut done = false;
        let change: Edit = Box::new(move |m| {
            let request = !matches!(m, Message::Hello { .. } | Message::KeepAlive | Message::Received { .. });
            if request && !done {
                // (The target holds the reference open: it would see this.)
                let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
                if cut {
                    f.set_len(len as u64 / 2).unwrap();
                } else {
                    f.write_all_at(&common::noise(7, len), 0).unwrap();
                }
                done = true;
            }
            m
        });
        let rep = copy_with_refs(&a, &b, &[&r], "none", change).target.unwrap();
        assert!(fs::read(&b).unwrap() == new, "the copy differs (cut: {cut})");
        assert!(rep.verified);
        assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched);
        assert_eq!((rep.groups_rekeyed, rep.groups_refetched, rep.deltas_failed), (0, 0, 0), "cut: {cut}: {rep:?}");
        assert!(rep.blocks_delta > 0 && rep.blocks_keyless > 0, "cut: {cut}: {rep:?}");
    }
}

// Deltas in batches (`CAP_DELTA_BATCH`, with short sub-block hashes): the
// default exchange between two ends of this release.

/// Frames of deltas the relay saw going to the source: blocks asked in
/// `FetchDeltas` frames, those frames, and `FetchDeltaShort` frames.
#[derive(Default)]
struct Asked {
    batched_blocks: std::sync::atomic::AtomicU64,
    batches: std::sync::atomic::AtomicU64,
    single: std::sync::atomic::AtomicU64,
}

fn count_asked(asked: std::sync::Arc<Asked>) -> Edit {
    use std::sync::atomic::Ordering::SeqCst;
    Box::new(move |m| {
        match &m {
            Message::FetchDeltas { blocks, .. } => {
                asked.batched_blocks.fetch_add(blocks.len() as u64, SeqCst);
                asked.batches.fetch_add(1, SeqCst);
            }
            Message::FetchDeltaShort { .. } | Message::FetchDelta { .. } => {
                asked.single.fetch_add(1, SeqCst);
            }
            _ => {}
        }
        m
    })
}

/// Each batch's signatures replaced by the source's own blocks' (as if
/// every short hash matched by chance).
fn lying_batches(src: Vec<u8>) -> Edit {
    Box::new(move |m| match m {
        Message::FetchDeltas { blocks, .. } => {
            let sigs =
                blocks.iter().flat_map(|&block| subdelta::short_signature(&own_signature(&src, block))).collect();
            Message::FetchDeltas { blocks, sigs }
        }
        m => m,
    })
}

/// Flip one byte of every batch's payload, `at` (modulo its length) bytes in.
fn damage_batches(at: usize) -> Edit {
    Box::new(move |m| match m {
        Message::Deltas { codec, raw_len, blocks, mut payload } => {
            if !payload.is_empty() {
                let i = at % payload.len();
                payload[i] ^= 0x5a;
            }
            Message::Deltas { codec, raw_len, blocks, payload }
        }
        m => m,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// With batches on both ends, hidden from the target's view, or hidden
    /// both ways: byte-identical, counted, every changed block with an old
    /// version asked as a delta once, in batches exactly when both ends
    /// agreed them, and a delta fails only where a short hash matched by
    /// chance.
    #[test]
    fn batched_deltas_rebuild_the_image_and_are_counted(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..64),
        tail in prop_oneof![Just(0usize), 1usize..BS],
        codec in prop_oneof![Just("none"), Just("zstd:1"), Just("lz4"), Just("auto")],
        hidden in 0u8..3,
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let (old, new, deltas) = images(seed, &changes, tail);
        fs::write(&a, &new).unwrap();
        fs::write(&b, &old).unwrap();
        let asked = std::sync::Arc::new(Asked::default());
        let (to_target, to_source) = match hidden {
            0 => (keep(), count_asked(asked.clone())),
            // A source without it: the target never batches.
            1 => (hide(CAP_DELTA_BATCH), count_asked(asked.clone())),
            _ => (hide(CAP_DELTA_BATCH), chain(hide(CAP_DELTA_BATCH), count_asked(asked.clone()))),
        };
        let o = relay::copy_through(&a, &b, BS as u32, codec, to_target, to_source);
        let rep = o.source.unwrap();
        prop_assert!(o.target.unwrap().verified);
        prop_assert_eq!(fs::read(&b).unwrap(), new.clone());
        counted(&rep, new.len())?;
        prop_assert_eq!(rep.blocks_delta + rep.deltas_failed, deltas, "{:?}", rep);
        prop_assert!(rep.deltas_failed <= chance_matches(&old, &new));
        let (batched, batches, single) =
            (asked.batched_blocks.load(SeqCst), asked.batches.load(SeqCst), asked.single.load(SeqCst));
        if hidden == 0 {
            prop_assert_eq!((batched, single), (deltas, 0));
            prop_assert!(batches <= deltas);
        } else {
            prop_assert_eq!((batched, batches, single), (0, 0, deltas));
        }
    }

    /// A batch whose signatures lie: every rebuilt block misses its key and
    /// is fetched whole; the copy is still byte-identical.
    #[test]
    fn a_lying_batch_costs_a_refetch_never_a_wrong_block(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..32),
        codec in prop_oneof![Just("none"), Just("zstd:1")],
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let (old, new, deltas) = images(seed, &changes, 0);
        fs::write(&a, &new).unwrap();
        fs::write(&b, &old).unwrap();
        let o = relay::copy_through(&a, &b, BS as u32, codec, keep(), lying_batches(new.clone()));
        let rep = o.source.unwrap();
        prop_assert_eq!(fs::read(&b).unwrap(), new.clone());
        counted(&rep, new.len())?;
        prop_assert_eq!(rep.blocks_delta, 0);
        prop_assert_eq!(rep.deltas_failed, deltas);
    }

    /// Damaged batches: sent raw, their bodies split wrong, fail to
    /// rebuild or miss their keys, and the blocks are fetched whole
    /// (byte-identical copy); through the stream, the stream breaks and
    /// the copy fails with an error saying so. Either way every block in
    /// DST is the new one or the old one.
    #[test]
    fn a_damaged_batch_is_refetched_or_fails_clearly(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..32),
        at in any::<usize>(),
        codec in prop_oneof![Just("none"), Just("zstd:1")],
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let (old, new, deltas) = images(seed, &changes, 0);
        fs::write(&a, &new).unwrap();
        fs::write(&b, &old).unwrap();
        let o = relay::copy_through(&a, &b, BS as u32, codec, damage_batches(at), keep());
        damaged_outcome(o, &b, &old, &new, deltas, codec)?;
    }
}

/// A batch whose signatures are cut short or run past its last block, or
/// one sent to a source that did not agree to batches, fails the copy
/// with an error naming it; so does a batch of answers naming a block
/// that was not asked. DST keeps its old blocks.
#[test]
fn a_misshapen_batch_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let (old, new, _) = images(9, &[Change::Edit(100, 1); 4], 0);
    fs::write(&a, &new).unwrap();
    let edit_sigs = |f: fn(&mut Vec<u8>)| -> Edit {
        Box::new(move |m| match m {
            Message::FetchDeltas { blocks, mut sigs } => {
                f(&mut sigs);
                Message::FetchDeltas { blocks, sigs }
            }
            m => m,
        })
    };
    for (edit, want) in [
        (edit_sigs(|s| s.truncate(s.len() - 2)), "its signatures end before block 3's"),
        (edit_sigs(|s| s.extend_from_slice(&[1, 2])), "2 bytes of signatures past its last block's"),
    ] {
        fs::write(&b, &old).unwrap();
        let o = relay::copy_through(&a, &b, BS as u32, "none", keep(), edit);
        let e = o.source.unwrap_err().to_string();
        assert!(e.contains("a batch of 4 deltas") && e.contains(want), "{e}");
        assert!(o.target.is_err());
        assert_eq!(fs::read(&b).unwrap(), old);
    }
    // A source without the bit: a FetchDeltas is not a request it takes.
    let singles_to_batch: Edit = Box::new(|m| match m {
        Message::FetchDeltaShort { block, sig } => Message::FetchDeltas { blocks: vec![block], sigs: sig },
        m => m,
    });
    fs::write(&b, &old).unwrap();
    let o = relay::copy_through(
        &a,
        &b,
        BS as u32,
        "none",
        hide(CAP_DELTA_BATCH),
        chain(hide(CAP_DELTA_BATCH), singles_to_batch),
    );
    let e = o.source.unwrap_err().to_string();
    assert!(e.contains("unexpected FetchDeltas frame"), "{e}");
    assert_eq!(fs::read(&b).unwrap(), old);
    // Answers for a block not asked (the batch's blocks moved by one).
    let shifted: Edit = Box::new(|m| match m {
        Message::Deltas { codec, raw_len, blocks, payload } => {
            Message::Deltas { codec, raw_len, blocks: blocks.iter().map(|b| b + 1).collect(), payload }
        }
        m => m,
    });
    fs::write(&b, &old).unwrap();
    let o = relay::copy_through(&a, &b, BS as u32, "none", shifted, keep());
    let e = o.target.unwrap_err().to_string();
    assert!(e.contains("a delta for block 4, which was not asked for"), "{e}");
    assert_eq!(fs::read(&b).unwrap(), old);
}

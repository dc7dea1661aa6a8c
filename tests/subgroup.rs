//! Groups that mostly match DST (capability `CAP_SUB_GROUPS`): random
//! images copied onto an old copy of themselves with a few blocks changed
//! per group, zero sub-groups filled and data zeroed, through a relay that
//! can hide the capability (a peer of the previous release), lie in the
//! source's answer (sub-groups called the same when they are not, keys
//! that do not fit the bitmap) or in the target's signature (a sub-group
//! key collision). The tests of `ChangedKeys` run with `CAP_BLOCK_HINTS`
//! hidden both ways (the exchange a peer of the previous release gets);
//! those of the block hints (`ChangedSubs`, `WantHintedKeys`,
//! `HintedKeys`) at the end, with it.

mod common;
#[path = "common/relay.rs"]
mod relay;

use std::collections::HashSet;
use std::fs;

use proptest::prelude::*;
use relay::{chain, hide, keep, Edit, Outcome};
use xenmig::blocks::digest::{Algorithm, Digest};
use xenmig::copy::Report;
use xenmig::wire::protocol::{Message, CAP_BLOCK_HINTS, CAP_SUB_DELTA, CAP_SUB_GROUPS};
use xenmig::wire::subgroup::{self, SUB_BLOCKS};

/// Groups are 1 MiB whatever the block size.
const GROUP: usize = 1 << 20;

/// How a group of the new image relates to the old one at the same place.
#[derive(Clone, Debug)]
enum Change {
    Same,
    /// These blocks (modulo the group's) rewritten.
    Blocks(Vec<u16>),
    /// A run of blocks that were zeros in the old copy now hold data.
    Filled(u16, u16),
    /// A run of blocks zeroed.
    Zeroed(u16, u16),
    /// All new.
    Rewrite,
    /// All zeros in both.
    Zeros,
    /// All zeros in the old copy, a run of data now (a new file in free
    /// space).
    Fresh(u16, u16),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        2 => Just(Change::Same),
        5 => proptest::collection::vec(any::<u16>(), 1..5).prop_map(Change::Blocks),
        2 => (any::<u16>(), 1u16..40).prop_map(|(a, n)| Change::Filled(a, n)),
        2 => (any::<u16>(), 1u16..40).prop_map(|(a, n)| Change::Zeroed(a, n)),
        1 => Just(Change::Rewrite),
        1 => Just(Change::Zeros),
        1 => (any::<u16>(), 1u16..80).prop_map(|(a, n)| Change::Fresh(a, n)),
    ]
}

/// The old and the new image, `bs`-byte blocks, a group per change (the
/// last one cut short by `short` bytes, so that the last group and block
/// may be partial). Every block of data is distinct noise, so nothing is
/// found elsewhere but where a change says.
fn images(seed: u64, bs: usize, changes: &[Change], short: usize) -> (Vec<u8>, Vec<u8>) {
    let gb = GROUP / bs;
    let mut old = Vec::new();
    let mut new = Vec::new();
    for (g, c) in changes.iter().enumerate() {
        let blk = |s: u64, i: usize| common::noise(s ^ ((g * gb + i) as u64).wrapping_mul(0x9e37_79b9), bs);
        let mut o: Vec<Vec<u8>> = (0..gb).map(|i| blk(seed, i)).collect();
        let mut n = o.clone();
        let run = |a: u16, len: u16| (a as usize % gb)..((a as usize % gb) + len as usize).min(gb);
        match c {
            Change::Same => {}
            Change::Blocks(at) => at.iter().for_each(|&i| n[i as usize % gb] = blk(!seed, i as usize % gb)),
            Change::Filled(a, len) => {
                for i in run(*a, *len) {
                    o[i] = vec![0; bs];
                    n[i] = blk(!seed, i);
                }
            }
            Change::Zeroed(a, len) => run(*a, *len).for_each(|i| n[i] = vec![0; bs]),
            Change::Rewrite => n = (0..gb).map(|i| blk(!seed, i)).collect(),
            Change::Zeros => {
                o = vec![vec![0; bs]; gb];
                n = o.clone();
            }
            Change::Fresh(a, len) => {
                o = vec![vec![0; bs]; gb];
                n = o.clone();
                run(*a, *len).for_each(|i| n[i] = blk(!seed, i));
            }
        }
        old.extend(o.concat());
        new.extend(n.concat());
    }
    let keep = old.len().saturating_sub(short).max(1);
    old.truncate(keep);
    new.truncate(keep);
    (old, new)
}

/// Blocks a copy onto `old` keeps without their key: those of the
/// sub-groups equal to `old`'s, in groups that differ from `old`'s, are not
/// all zeros, are found nowhere else in `old` and have two sub-groups or
/// more (the others are settled without any keys, or with all of them).
fn keyless(old: &[u8], new: &[u8], bs: usize) -> u64 {
    let old_groups: HashSet<&[u8]> = old.chunks(GROUP).collect();
    let mut n = 0;
    for (o, g) in old.chunks(GROUP).zip(new.chunks(GROUP)) {
        if o == g || g.iter().all(|&b| b == 0) || old_groups.contains(g) || !subgroup::worth_it(g.len().div_ceil(bs)) {
            continue;
        }
        for (os, ns) in o.chunks(SUB_BLOCKS * bs).zip(g.chunks(SUB_BLOCKS * bs)) {
            if os == ns {
                n += ns.len().div_ceil(bs) as u64;
            }
        }
    }
    n
}

/// Groups asked about by sub-group (those [`keyless`] looks at).
fn asked(old: &[u8], new: &[u8], bs: usize) -> u64 {
    let old_groups: HashSet<&[u8]> = old.chunks(GROUP).collect();
    old.chunks(GROUP)
        .zip(new.chunks(GROUP))
        .filter(|(o, g)| {
            o != g && g.iter().any(|&b| b != 0) && !old_groups.contains(*g) && subgroup::worth_it(g.len().div_ceil(bs))
        })
        .count() as u64
}

fn counted(rep: &Report, len: usize, bs: usize) -> Result<(), TestCaseError> {
    prop_assert!(rep.verified);
    prop_assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched);
    prop_assert_eq!(rep.blocks_total, (len as u64).div_ceil(bs as u64));
    prop_assert!(rep.blocks_keyless <= rep.blocks_zero + rep.blocks_reused);
    prop_assert_eq!(rep.bytes_fetched, rep.codecs.values().sum::<u64>());
    Ok(())
}

/// Copy `new` onto `old` with the exchange of a peer without
/// `CAP_BLOCK_HINTS` (the bit hidden both ways: keys in `ChangedKeys`).
fn copy_onto_old(
    old: &[u8],
    new: &[u8],
    bs: usize,
    codec: &str,
    to_target: Edit,
    to_source: Edit,
) -> (Outcome, Vec<u8>) {
    let (to_target, to_source) = (chain(hide(CAP_BLOCK_HINTS), to_target), chain(hide(CAP_BLOCK_HINTS), to_source));
    copy_onto_old_hinted(old, new, bs, codec, to_target, to_source)
}

/// Copy `new` onto `old`, every capability as the relay leaves it.
fn copy_onto_old_hinted(
    old: &[u8],
    new: &[u8],
    bs: usize,
    codec: &str,
    to_target: Edit,
    to_source: Edit,
) -> (Outcome, Vec<u8>) {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    fs::write(&a, new).unwrap();
    fs::write(&b, old).unwrap();
    let o = relay::copy_through(&a, &b, bs as u32, codec, to_target, to_source);
    (o, fs::read(&b).unwrap())
}

/// A source that calls every sub-group the same as the target's (keys
/// dropped): the target keeps its old blocks, the group fails its digest
/// and is asked for again with every key.
fn all_the_same() -> Edit {
    Box::new(|m| match m {
        Message::ChangedKeys { group, subs, differ, .. } => {
            Message::ChangedKeys { group, subs, differ: vec![0; differ.len()], keys: vec![] }
        }
        m => m,
    })
}

/// A target whose signature collides with the source's: it sends the
/// sub-group keys of the new image (read here), so the source calls every
/// sub-group the same.
fn colliding_signature(new: Vec<u8>, bs: usize) -> Edit {
    Box::new(move |m| match m {
        Message::WantChangedKeys { group, subs, .. } => {
            let g = &new[group as usize * GROUP..((group as usize + 1) * GROUP).min(new.len())];
            let digests: Vec<Digest> = g.chunks(bs).map(|b| Algorithm::Blake3.digest(b)).collect();
            let sig = subgroup::signature(Algorithm::Blake3, &digests, |_| false);
            Message::WantChangedKeys { group, subs, zero: sig.zero, keys: sig.keys }
        }
        m => m,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    /// Onto an old copy, with the capability on both ends or hidden on
    /// either (and with or without sub-block deltas): byte-identical,
    /// counted, and exactly the blocks of matching sub-groups of the groups
    /// asked about kept keyless when both ends have it.
    #[test]
    fn sub_groups_rebuild_the_image_and_are_counted(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..5),
        bs in prop_oneof![Just(4096usize), Just(16384), Just(32768), Just(65536)],
        short in prop_oneof![Just(0usize), 1usize..70_000],
        codec in prop_oneof![Just("none"), Just("zstd:1"), Just("auto")],
        hidden in 0u8..4,
    ) {
        let (old, new) = images(seed, bs, &changes, short);
        let (to_target, to_source) = match hidden {
            0 => (keep(), keep()),
            // A source without it: the target sees no bit and never asks.
            1 => (hide(CAP_SUB_GROUPS), keep()),
            // A target without it neither offers nor asks.
            2 => (hide(CAP_SUB_GROUPS), hide(CAP_SUB_GROUPS)),
            // Sub-groups without sub-block deltas.
            _ => (hide(CAP_SUB_DELTA), keep()),
        };
        let (o, got) = copy_onto_old(&old, &new, bs, codec, to_target, to_source);
        let rep = o.source.unwrap();
        prop_assert!(o.target.unwrap().verified);
        prop_assert!(got == new, "DST differs from the source");
        counted(&rep, new.len(), bs)?;
        prop_assert_eq!(rep.groups_rekeyed, 0);
        let want = if matches!(hidden, 1 | 2) { 0 } else { keyless(&old, &new, bs) };
        prop_assert_eq!(rep.blocks_keyless, want, "{:?}", rep);
    }

    /// A source that lies (every sub-group "the same"), or a target whose
    /// sub-group keys collide with the source's: every group asked about
    /// fails its digest, is asked for again with every key, and the copy is
    /// byte-identical.
    #[test]
    fn a_lying_answer_or_a_collision_costs_the_keys_never_a_wrong_block(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..4),
        bs in prop_oneof![Just(4096usize), Just(32768)],
        codec in prop_oneof![Just("none"), Just("zstd:1")],
        collide in any::<bool>(),
    ) {
        let (old, new) = images(seed, bs, &changes, 0);
        let (to_target, to_source) =
            if collide { (keep(), colliding_signature(new.clone(), bs)) } else { (all_the_same(), keep()) };
        let (o, got) = copy_onto_old(&old, &new, bs, codec, to_target, to_source);
        let rep = o.source.unwrap();
        prop_assert!(got == new, "DST differs from the source");
        counted(&rep, new.len(), bs)?;
        prop_assert_eq!(rep.groups_rekeyed, asked(&old, &new, bs));
        prop_assert_eq!(rep.blocks_keyless, 0);
    }
}

/// A source whose answer does not fit the group (a wrong count of
/// sub-groups, a bitmap too long for them, more keys than the bitmap calls
/// for) fails the copy with an error naming the frame; DST keeps the old
/// blocks it had (nothing is written for that group).
#[test]
fn a_misshapen_answer_is_a_clear_error() {
    let bs = 4096;
    let (old, new) = images(5, bs, &[Change::Blocks(vec![3, 200])], 0);
    type Lie = fn(u16, Vec<u8>, Vec<[u8; 15]>) -> (u16, Vec<u8>, Vec<[u8; 15]>);
    let lies: [(Lie, &str); 3] = [
        (|s, d, k| (s - 1, d, k), "changed keys for group 0: 15 sub-groups for a group of 256 blocks, which has 16"),
        // Caught by the frame's own length check.
        (
            |s, mut d, k| {
                (
                    s,
                    {
                        d.push(1);
                        d
                    },
                    k,
                )
            },
            "malformed ChangedKeys frame",
        ),
        (
            |s, d, mut k| {
                (s, d, {
                    k.push([7; 15]);
                    k
                })
            },
            "changed keys for group 0: 33 keys, where the bitmap calls for 32",
        ),
    ];
    for (lie, says) in lies {
        let edit: Edit = Box::new(move |m| match m {
            Message::ChangedKeys { group, subs, differ, keys } => {
                let (subs, differ, keys) = lie(subs, differ, keys);
                Message::ChangedKeys { group, subs, differ, keys }
            }
            m => m,
        });
        let (o, got) = copy_onto_old(&old, &new, bs, "none", edit, keep());
        let e = o.target.unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
        assert!(o.source.is_err());
        assert_eq!(got, old, "DST was written");
    }
}

/// A `ChangedKeys` nobody asked for (or one without the capability
/// agreed) is refused.
#[test]
fn an_unasked_answer_is_refused() {
    let bs = 4096;
    let (old, new) = images(6, bs, &[Change::Blocks(vec![1])], 0);
    // The target never asks: the capability is hidden from it; the relay
    // turns the source's first Groups frame into an answer.
    let mut hidden = hide(CAP_SUB_GROUPS);
    let unasked: Edit = Box::new(move |m| match m {
        Message::Groups { .. } => Message::ChangedKeys { group: 0, subs: 16, differ: vec![0, 0], keys: vec![] },
        m => hidden(m),
    });
    let (o, got) = copy_onto_old(&old, &new, bs, "none", unasked, hide(CAP_SUB_GROUPS));
    let e = o.target.unwrap_err().to_string();
    assert!(e.contains("ChangedKeys"), "{e}");
    assert_eq!(got, old);
    // Asked with sub-groups, answered twice.
    let twice: Edit = {
        let mut again = None;
        Box::new(move |m| match m {
            Message::ChangedKeys { .. } if again.is_none() => {
                again = Some(m.clone());
                m
            }
            Message::Blocks { .. } | Message::Delta { .. } | Message::Deltas { .. } if again.is_some() => {
                again.take().unwrap()
            }
            m => m,
        })
    };
    let (o, _) = copy_onto_old(&old, &new, bs, "none", twice, keep());
    let e = o.target.unwrap_err().to_string();
    assert!(e.contains("changed keys for group 0, which were not asked for"), "{e}");
}

/// The keys saved, measured on a small return-like image: 8 groups, each
/// with a few blocks changed, take a sixteenth of the keys or less.
#[test]
fn groups_that_mostly_match_send_few_keys() {
    let bs = 4096;
    let changes: Vec<Change> = (0..8).map(|g| Change::Blocks(vec![g * 31, g * 31 + 100])).collect();
    let (old, new) = images(7, bs, &changes, 0);
    let run = |edit: Edit| {
        let (o, got) = copy_onto_old(&old, &new, bs, "zstd:3", edit, keep());
        assert_eq!(got, new);
        assert!(o.source.unwrap().verified);
        // The target's report: it counted the link's bytes.
        o.target.unwrap()
    };
    let with = run(keep());
    let without = run(hide(CAP_SUB_GROUPS));
    assert_eq!(with.blocks_keyless, 8 * 256 - 8 * 2 * 16);
    // Keys of 8 x 256 blocks (30,720 bytes) against those of 8 x 2
    // sub-groups (3,840) plus the signatures (8 x 16 x 15 = 1,920).
    let saved = without.bytes_wire - with.bytes_wire;
    assert!(saved > 24_000, "saved {saved} bytes: {} with, {} without", with.bytes_wire, without.bytes_wire);
}

/// A live copy onto an old copy: pass 1 asks by sub-group against the old
/// blocks, the later passes against what pass 1 wrote; every pass keeps
/// the unchanged sub-groups of the groups that changed, and the copy is
/// byte-identical.
#[test]
fn a_live_copy_asks_by_sub_group_in_every_pass() {
    use std::time::Duration;
    use xenmig::copy::source::{LiveOptions, SourceOptions, SourceSession};
    use xenmig::copy::target::{self, TargetOptions};
    use xenmig::copy::Progress;
    use xenmig::wire::transport::Link;

    let bs = 4096;
    let changes: Vec<Change> = (0..4).map(|g| Change::Blocks(vec![g * 40 + 1])).collect();
    let (old, new) = images(8, bs, &changes, 0);
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    fs::write(&a, &new).unwrap();
    fs::write(&b, &old).unwrap();
    let (src_link, tgt_link) = Link::pair().unwrap();
    let bp = b.clone();
    let target = std::thread::spawn(move || target::run(&bp, &TargetOptions::default(), tgt_link, &Progress::hidden()));
    let opts = SourceOptions { live: Some(LiveOptions::default()), ..SourceOptions::default() };
    let mut s = SourceSession::start(&a, &opts, src_link, Progress::hidden()).unwrap();
    s.scan().unwrap();
    // A block in each of groups 1 and 3, then one in group 2.
    common::change_blocks(&a, 256 + 7, 1, 77);
    common::change_blocks(&a, 3 * 256 + 200, 1, 78);
    s.send_pass().unwrap();
    s.scan().unwrap();
    common::change_blocks(&a, 2 * 256 + 100, 1, 79);
    let rep = s.final_pass().unwrap();
    drop(s.finish(Duration::ZERO).unwrap());
    let trep = target.join().unwrap().unwrap();
    assert!(rep.verified && trep.verified);
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    assert!(rep.passes.len() >= 3, "{:?}", rep.passes);
    assert_eq!(rep.groups_rekeyed, 0);
    // Pass 1: 4 groups with one block changed each; later passes: three
    // more groups, one changed block each. With the block hints (both ends
    // here) every other block of those groups is kept keyless (but for a
    // hint that matches by chance, which would rekey a group: none here).
    assert_eq!(keyless(&old, &new, bs), 4 * 240);
    assert_eq!(rep.blocks_keyless, 4 * 255 + 3 * 255, "{rep:?}");
}

// ---- Block hints (`CAP_BLOCK_HINTS`): the keys of a differing sub-group's
// blocks only where the block's hint differs from DST's.

/// What a copy of `new` onto `old` with the block hints keeps keyless, and
/// how many groups it asks for again with every key: in each group asked
/// about, the blocks of matching sub-groups (only those where DST's group
/// is all zeros: it is asked the previous way); in a differing one, each
/// block that is zero in both where DST's sub-group is all zeros, else
/// each whose hint equals DST's. A hint equal by chance for a block that
/// changed keeps an old block: that group fails its digest and is asked
/// for again (its blocks then not keyless).
fn hinted_expect(old: &[u8], new: &[u8], bs: usize) -> (u64, u64) {
    let old_groups: HashSet<&[u8]> = old.chunks(GROUP).collect();
    let digest = |b: &[u8]| Algorithm::Blake3.digest(b);
    let (mut keyless, mut rekeyed) = (0, 0);
    for (o, g) in old.chunks(GROUP).zip(new.chunks(GROUP)) {
        if o == g || g.iter().all(|&b| b == 0) || old_groups.contains(g) || !subgroup::worth_it(g.len().div_ceil(bs)) {
            continue;
        }
        let (mut n, mut chance) = (0, false);
        let dst_zero = o.iter().all(|&b| b == 0);
        for (os, ns) in o.chunks(SUB_BLOCKS * bs).zip(g.chunks(SUB_BLOCKS * bs)) {
            if os == ns {
                n += ns.len().div_ceil(bs) as u64;
            } else if dst_zero {
            } else if os.iter().all(|&b| b == 0) {
                n += ns.chunks(bs).filter(|b| b.iter().all(|&x| x == 0)).count() as u64;
            } else {
                for (ob, nb) in os.chunks(bs).zip(ns.chunks(bs)) {
                    if subgroup::hint(&digest(ob)) == subgroup::hint(&digest(nb)) {
                        n += 1;
                        chance |= ob != nb;
                    }
                }
            }
        }
        if chance {
            rekeyed += 1;
        } else {
            keyless += n;
        }
    }
    (keyless, rekeyed)
}

/// Of the groups asked about, those where DST's group is all zeros (asked
/// the previous way even with the block hints): how many, and the blocks
/// of their matching sub-groups (kept keyless).
fn zero_dst(old: &[u8], new: &[u8], bs: usize) -> (u64, u64) {
    let old_groups: HashSet<&[u8]> = old.chunks(GROUP).collect();
    let (mut groups, mut kept) = (0, 0);
    for (o, g) in old.chunks(GROUP).zip(new.chunks(GROUP)) {
        if !o.iter().all(|&b| b == 0)
            || o == g
            || g.iter().all(|&b| b == 0)
            || old_groups.contains(g)
            || !subgroup::worth_it(g.len().div_ceil(bs))
        {
            continue;
        }
        groups += 1;
        for (os, ns) in o.chunks(SUB_BLOCKS * bs).zip(g.chunks(SUB_BLOCKS * bs)) {
            if os == ns {
                kept += ns.len().div_ceil(bs) as u64;
            }
        }
    }
    (groups, kept)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    /// Onto an old copy, with the block hints on both ends (with or
    /// without sub-block deltas), hidden both ways (a peer of the previous
    /// release on either side: neither end agrees to it), or without
    /// sub-groups: byte-identical, counted, and exactly the expected blocks
    /// keyless.
    #[test]
    fn block_hints_rebuild_the_image_and_are_counted(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..5),
        bs in prop_oneof![Just(4096usize), Just(16384), Just(65536)],
        short in prop_oneof![Just(0usize), 1usize..70_000],
        codec in prop_oneof![Just("none"), Just("zstd:1"), Just("auto")],
        hidden in 0u8..4,
    ) {
        let (old, new) = images(seed, bs, &changes, short);
        let (to_target, to_source) = match hidden {
            0 => (keep(), keep()),
            1 => (hide(CAP_BLOCK_HINTS), hide(CAP_BLOCK_HINTS)),
            2 => (hide(CAP_SUB_DELTA), keep()),
            _ => (hide(CAP_SUB_GROUPS), hide(CAP_SUB_GROUPS)),
        };
        let (o, got) = copy_onto_old_hinted(&old, &new, bs, codec, to_target, to_source);
        let rep = o.source.unwrap();
        prop_assert!(o.target.unwrap().verified);
        prop_assert!(got == new, "DST differs from the source");
        counted(&rep, new.len(), bs)?;
        let (want_keyless, want_rekeyed) = match hidden {
            0 | 2 => hinted_expect(&old, &new, bs),
            1 => (keyless(&old, &new, bs), 0),
            _ => (0, 0),
        };
        prop_assert_eq!(rep.groups_rekeyed, want_rekeyed);
        prop_assert_eq!(rep.blocks_keyless, want_keyless, "{:?}", rep);
    }

    /// A source that calls every block the same as DST's (keys dropped from
    /// `HintedKeys`), or a target whose hints all match (the source's own,
    /// as a chance match would): every group asked about with hints fails
    /// its digest, is asked for again with every key, and the copy is
    /// byte-identical.
    #[test]
    fn a_lying_hinted_answer_costs_the_keys_never_a_wrong_block(
        seed in any::<u64>(),
        changes in proptest::collection::vec(change(), 1..4),
        bs in prop_oneof![Just(4096usize), Just(32768)],
        codec in prop_oneof![Just("none"), Just("zstd:1")],
        collide in any::<bool>(),
    ) {
        let (old, new) = images(seed, bs, &changes, 0);
        let (to_target, to_source): (Edit, Edit) = if collide {
            let new = new.clone();
            let colliding: Edit = Box::new(move |m| match m {
                Message::WantHintedKeys { group, subs, differ, zero, .. } => {
                    let g = &new[group as usize * GROUP..((group as usize + 1) * GROUP).min(new.len())];
                    let digests: Vec<Digest> = g.chunks(bs).map(|b| Algorithm::Blake3.digest(b)).collect();
                    let (_, hints) = subgroup::hints(&digests, &differ, |_| false);
                    // (DST's zero sub-groups too: every block "the same".)
                    Message::WantHintedKeys { group, subs, differ, zero: vec![0; zero.len()], hints }
                }
                m => m,
            });
            (keep(), colliding)
        } else {
            let lie: Edit = Box::new(|m| match m {
                Message::HintedKeys { group, count, changed, .. } => {
                    Message::HintedKeys { group, count, changed: vec![0; changed.len()], keys: vec![] }
                }
                m => m,
            });
            (lie, keep())
        };
        let (o, got) = copy_onto_old_hinted(&old, &new, bs, codec, to_target, to_source);
        let rep = o.source.unwrap();
        prop_assert!(got == new, "DST differs from the source");
        counted(&rep, new.len(), bs)?;
        let (zero_groups, zero_kept) = zero_dst(&old, &new, bs);
        prop_assert_eq!(rep.groups_rekeyed, asked(&old, &new, bs) - zero_groups);
        prop_assert_eq!(rep.blocks_keyless, zero_kept);
    }
}

/// Hostile answers and requests of the hinted exchange fail the copy with
/// an error naming what was wrong; DST keeps the old blocks it had.
#[test]
fn a_misshapen_hinted_exchange_is_a_clear_error() {
    let bs = 4096;
    let (old, new) = images(5, bs, &[Change::Blocks(vec![3, 200])], 0);
    let answers: Vec<(Edit, &str)> = vec![
        (
            Box::new(|m| match m {
                Message::ChangedSubs { group, subs, differ } => Message::ChangedSubs { group, subs: subs - 1, differ },
                m => m,
            }),
            "changed sub-groups of group 0: 15 sub-groups for a group of 256 blocks, which has 16",
        ),
        (
            Box::new(|m| match m {
                Message::HintedKeys { group, count, changed, keys } => {
                    Message::HintedKeys { group, count: count - 8, changed: changed[1..].to_vec(), keys }
                }
                m => m,
            }),
            "hinted keys for group 0: an answer covering 24 blocks, where the sub-groups asked about hold 32",
        ),
        (
            Box::new(|m| match m {
                Message::HintedKeys { group, count, changed, mut keys } => {
                    keys.push([7; 15]);
                    Message::HintedKeys { group, count, changed, keys }
                }
                m => m,
            }),
            "hinted keys for group 0: 3 keys, where the bitmap calls for 2",
        ),
        (
            Box::new(|m| match m {
                Message::HintedKeys { group: 0, count, changed, keys } => {
                    Message::HintedKeys { group: 1, count, changed, keys }
                }
                m => m,
            }),
            "hinted keys for group 1, which were not asked for",
        ),
    ];
    for (edit, says) in answers {
        let (o, got) = copy_onto_old_hinted(&old, &new, bs, "none", edit, keep());
        let e = o.target.unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
        assert!(o.source.is_err());
        assert_eq!(got, old, "DST was written");
    }
    // A request with a hint too few, or a zero bit where no sub-group was
    // named: the source refuses it, naming the group.
    let requests: Vec<(Edit, &str)> = vec![
        (
            Box::new(|m| match m {
                Message::WantHintedKeys { group, subs, differ, zero, mut hints } => {
                    hints.truncate(hints.len() - 2);
                    Message::WantHintedKeys { group, subs, differ, zero, hints }
                }
                m => m,
            }),
            "hinted keys of group 0: 62 bytes of block hints, where the bitmaps call for 64",
        ),
        (
            Box::new(|m| match m {
                Message::WantHintedKeys { group, subs, differ, hints, .. } => {
                    Message::WantHintedKeys { group, subs, differ, zero: vec![0, 0x80], hints }
                }
                m => m,
            }),
            "hinted keys of group 0: a sub-group marked as all zeros in DST that was not named as differing",
        ),
    ];
    for (edit, says) in requests {
        let (o, got) = copy_onto_old_hinted(&old, &new, bs, "none", keep(), edit);
        let e = o.source.unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
        assert!(o.target.is_err());
        assert_eq!(got, old, "DST was written");
    }
}

/// The keys saved by the hints, on a small return-like image: 8 groups with
/// two changed blocks each send 2 keys per group instead of 2 sub-groups'.
#[test]
fn block_hints_send_the_keys_of_changed_blocks_only() {
    let bs = 4096;
    let changes: Vec<Change> = (0..8).map(|g| Change::Blocks(vec![g * 31, g * 31 + 100])).collect();
    let (old, new) = images(7, bs, &changes, 0);
    let run = |hinted: bool| {
        let edit = || if hinted { keep() } else { hide(CAP_BLOCK_HINTS) };
        let (o, got) = copy_onto_old_hinted(&old, &new, bs, "zstd:3", edit(), edit());
        assert_eq!(got, new);
        assert!(o.source.unwrap().verified);
        o.target.unwrap()
    };
    let (with, without) = (run(true), run(false));
    assert_eq!(with.blocks_keyless, 8 * 256 - 8 * 2);
    assert_eq!(without.blocks_keyless, 8 * 256 - 8 * 2 * 16);
    // Keys of 8 x 2 sub-groups (3,840 bytes) against 8 x 2 keys (240), the
    // hints (8 x 2 x 16 x 2 = 512) and two more frames per group.
    let saved = without.bytes_wire - with.bytes_wire;
    assert!(saved > 2_500, "saved {saved} bytes: {} with, {} without", with.bytes_wire, without.bytes_wire);
}

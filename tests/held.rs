//! The keys a new DST's host holds (capability `CAP_HELD_KEYS`): random
//! images made of a reference's blocks, zeros and new data, copied onto a
//! DST that holds nothing with the reference on the target's side, through
//! a relay that can hide the capability (a peer of the previous release),
//! lie in the target's set (holding nothing) or damage what the source
//! sends for blocks asked for without their key.

mod common;
#[path = "common/relay.rs"]
mod relay;

use std::fs;

use proptest::prelude::*;
use relay::{hide, keep, Edit, Outcome};
use xenmig::copy::target::TargetOptions;
use xenmig::copy::Report;
use xenmig::wire::held;
use xenmig::wire::protocol::{Message, CAP_HELD_KEYS};

const BS: usize = 4096;

/// What one block of the source image is.
#[derive(Clone, Debug)]
enum Block {
    /// Block n (modulo its size) of the reference.
    Ref(u16),
    Zero,
    /// New data.
    New,
    /// A copy of the n-th earlier block of the image (modulo).
    Again(u16),
}

fn block() -> impl Strategy<Value = Block> {
    prop_oneof![
        3 => any::<u16>().prop_map(Block::Ref),
        2 => Just(Block::Zero),
        5 => Just(Block::New),
        1 => any::<u16>().prop_map(Block::Again),
    ]
}

/// A reference of `ref_blocks` noise blocks and an image made by `plan`,
/// in runs of `run` blocks of each kind (so that groups hold all kinds).
fn images(seed: u64, ref_blocks: usize, plan: &[Block], run: usize) -> (Vec<u8>, Vec<u8>) {
    let reference: Vec<u8> = (0..ref_blocks).flat_map(|i| common::noise(seed ^ (i as u64) << 20, BS)).collect();
    let mut image: Vec<u8> = Vec::new();
    for (n, b) in plan.iter().flat_map(|b| std::iter::repeat(b).take(run)).enumerate() {
        let blk = match b {
            Block::Ref(r) => {
                let at = (*r as usize + n) % ref_blocks * BS;
                reference[at..at + BS].to_vec()
            }
            Block::Zero => vec![0; BS],
            Block::New => common::noise(!seed ^ (n as u64) << 24, BS),
            Block::Again(k) if image.is_empty() => common::noise(seed.wrapping_add(*k as u64), BS),
            Block::Again(k) => {
                let at = *k as usize % (image.len() / BS) * BS;
                image[at..at + BS].to_vec()
            }
        };
        image.extend(blk);
    }
    (reference, image)
}

/// Copy `image` onto a DST that does not exist yet, with `reference` on
/// the target's side; the outcome and what DST holds after.
fn copy_new(reference: &[u8], image: &[u8], codec: &str, to_target: Edit, to_source: Edit) -> (Outcome, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, r) = (dir.path().join("src"), dir.path().join("dst"), dir.path().join("ref"));
    fs::write(&src, image).unwrap();
    fs::write(&r, reference).unwrap();
    let topts = TargetOptions { references: vec![r], ..relay::target_options() };
    let o = relay::copy_onto(&src, &dst, &relay::source_options(BS as u32, codec), topts, to_target, to_source);
    let got = fs::read(&dst).unwrap_or_default();
    (o, got)
}

fn counted(rep: &Report, len: usize) -> Result<(), TestCaseError> {
    prop_assert_eq!(rep.blocks_total, len.div_ceil(BS) as u64);
    prop_assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched, "{:?}", rep);
    prop_assert!(rep.blocks_unkeyed <= rep.blocks_fetched, "{:?}", rep);
    Ok(())
}

/// The protocol's bytes as the target counted them (all but the payload).
fn protocol_bytes(rep: &Report) -> u64 {
    rep.bytes_wire - rep.bytes_payload_wire
}

/// Change the target's held set to one holding nothing.
fn holding_nothing() -> Edit {
    Box::new(|m| match m {
        Message::Holds { .. } => {
            let e = held::encode(std::iter::empty(), 1);
            Message::Holds { range: e.range, k: e.k, count: e.count, bits: e.bits }
        }
        m => m,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// With the capability on both ends or hidden on either: byte-identical,
    /// counted, the same blocks reused (the set never hides a block the
    /// target holds), and unkeyed blocks only when both ends have it.
    #[test]
    fn held_keys_rebuild_the_image_and_reuse_what_the_target_holds(
        seed in any::<u64>(),
        plan in proptest::collection::vec(block(), 4..24),
        run in prop_oneof![Just(1usize), Just(7), Just(40)],
        ref_blocks in 50usize..400,
        codec in prop_oneof![Just("none"), Just("zstd:1"), Just("auto")],
    ) {
        let (reference, image) = images(seed, ref_blocks, &plan, run);
        prop_assume!(reference.len() != image.len());
        let mut reps = Vec::new();
        for hidden in 0..3 {
            let (to_target, to_source) = match hidden {
                0 => (keep(), keep()),
                // A source without it: the target sees no bit, sends no set.
                1 => (hide(CAP_HELD_KEYS), keep()),
                // A target without it sends no set.
                _ => (hide(CAP_HELD_KEYS), hide(CAP_HELD_KEYS)),
            };
            let (o, got) = copy_new(&reference, &image, codec, to_target, to_source);
            let trep = o.target.map_err(|e| TestCaseError::fail(format!("hidden {hidden}: {e}")))?;
            let rep = o.source.unwrap();
            prop_assert!(trep.verified);
            prop_assert!(got == image, "DST differs from the source");
            counted(&rep, image.len())?;
            prop_assert_eq!(rep.groups_rekeyed, 0);
            if hidden != 0 {
                prop_assert_eq!(rep.blocks_unkeyed, 0);
            }
            reps.push(rep);
        }
        prop_assert_eq!(reps[0].blocks_reused, reps[1].blocks_reused, "{:?}", reps[0]);
        prop_assert_eq!(reps[0].blocks_fetched, reps[1].blocks_fetched);
    }

    /// A target whose set holds nothing (a lie, or a set gone wrong): its
    /// references' blocks come unkeyed and are fetched; the copy is still
    /// byte-identical.
    #[test]
    fn a_set_holding_nothing_costs_bytes_never_a_wrong_block(
        seed in any::<u64>(),
        plan in proptest::collection::vec(block(), 4..16),
        codec in prop_oneof![Just("none"), Just("zstd:1")],
    ) {
        let (reference, image) = images(seed, 300, &plan, 30);
        prop_assume!(reference.len() != image.len());
        let (o, got) = copy_new(&reference, &image, codec, keep(), holding_nothing());
        let rep = o.source.unwrap();
        prop_assert!(got == image, "DST differs from the source");
        counted(&rep, image.len())?;
        prop_assert_eq!(rep.groups_rekeyed, 0);
    }
}

/// A new DST, a reference holding a sixth of the image: most blocks come
/// unkeyed, the protocol's bytes fall by most of the keys, and the reused
/// blocks are the same as without the capability.
#[test]
fn unkeyed_blocks_save_their_keys() {
    let plan: Vec<Block> = (0..60).map(|i| if i % 6 == 0 { Block::Ref(i) } else { Block::New }).collect();
    let (reference, image) = images(11, 2000, &plan, 50);
    let run = |hidden: bool| {
        let edit = || if hidden { hide(CAP_HELD_KEYS) } else { keep() };
        let (o, got) = copy_new(&reference, &image, "zstd:1", edit(), edit());
        let target = o.target.expect("the copy succeeds");
        assert!(got == image, "DST differs from the source");
        assert!(o.source.unwrap().verified);
        target
    };
    let with = run(false);
    let without = run(true);
    assert_eq!((with.blocks_reused, without.blocks_reused), (500, 500));
    assert_eq!(without.blocks_unkeyed, 0);
    // 2,500 new blocks; a chance pass (1 in 2^k) keys one of them.
    assert!(with.blocks_unkeyed > 2400 && with.blocks_unkeyed <= 2500, "{with:?}");
    let saved = protocol_bytes(&without) as i64 - protocol_bytes(&with) as i64;
    // The keys of the unkeyed blocks, less the set (2,000 keys, about a
    // byte each), a bit per block keyed or not, and a run key per run (50
    // blocks each, at most 60 runs).
    assert!(saved > 2400 * 15 - 2000 * 2 - 3000 / 8 - 60 * 15, "saved {saved} bytes: {with:?}");
}

/// Damage the data of block `at` in every `Blocks` frame that carries it
/// (codec none), and every `Delta` for it, up to `times` frames.
fn damage_block(at: u64, mut times: u32) -> Edit {
    Box::new(move |m| match m {
        Message::Blocks { first_block, count, codec, raw_len, mut payload }
            if times > 0 && (first_block..first_block + count as u64).contains(&at) =>
        {
            times -= 1;
            payload[(at - first_block) as usize * BS] ^= 0x5a;
            Message::Blocks { first_block, count, codec, raw_len, payload }
        }
        Message::Delta { block, codec, raw_len, mut payload } if times > 0 && block == at => {
            times -= 1;
            *payload.last_mut().unwrap() ^= 0x5a;
            Message::Delta { block, codec, raw_len, payload }
        }
        m => m,
    })
}

/// A block sent wrong for a block asked for without its key: its run
/// fails its run key before anything of it is written, and the copy fails
/// naming the run, as a keyed block that fails its key does. DST holds
/// only right blocks (or zeros: not written yet).
#[test]
fn a_wrong_unkeyed_block_fails_the_copy_naming_its_run_and_is_never_written() {
    let plan: Vec<Block> = (0..12).map(|i| if i % 4 == 0 { Block::Ref(i) } else { Block::New }).collect();
    let (reference, image) = images(12, 500, &plan, 40);
    // Block 45: new data, in the first group.
    let (o, got) = copy_new(&reference, &image, "none", damage_block(45, u32::MAX), keep());
    let e = o.target.unwrap_err().to_string();
    assert!(e.contains("sent without their keys, do not match their run's key"), "{e}");
    assert!(o.source.is_err());
    assert!(got.chunks(BS).zip(image.chunks(BS)).all(|(g, w)| g == w || g.iter().all(|&x| x == 0)));
    assert!(got.len() < 46 * BS || got[45 * BS..46 * BS].iter().all(|&x| x == 0), "the damaged block was written");
}

/// Answers that do not fit, or come unasked, are refused with an error
/// naming the frame: a `HeldKeys` whose key count does not fit its bitmap,
/// a `ChangedKeys` after the set was sent, a set sent after a request.
#[test]
fn misfit_held_frames_are_clear_errors() {
    let plan: Vec<Block> = (0..8).map(|i| if i % 2 == 0 { Block::Ref(i) } else { Block::New }).collect();
    let (reference, image) = images(13, 500, &plan, 40);
    let check = |to_target: Edit, to_source: Edit, says: &str, side: &str| {
        let (o, _) = copy_new(&reference, &image, "none", to_target, to_source);
        let e = match side {
            "target" => o.target.unwrap_err().to_string(),
            _ => o.source.unwrap_err().to_string(),
        };
        assert!(e.contains(says), "{says}: {e}");
    };
    let extra_key: Edit = Box::new(|m| match m {
        Message::HeldKeys { group, subs, differ, count, keyed, keys, mut run_keys } => {
            run_keys.push([7; 15]);
            Message::HeldKeys { group, subs, differ, count, keyed, keys, run_keys }
        }
        m => m,
    });
    // (Any group may be answered first: the source answers on several
    // threads.)
    check(extra_key, keep(), "keys, where the bitmap calls for", "target");
    let as_changed: Edit = Box::new(|m| match m {
        Message::HeldKeys { group, subs, differ, .. } => Message::ChangedKeys { group, subs, differ, keys: vec![] },
        m => m,
    });
    check(as_changed, keep(), "unexpected ChangedKeys", "target");
    // The set moved behind the target's first request (in place of its
    // second, which is lost: the source fails first).
    let late: Edit = {
        let (mut set, mut requests) = (None, 0);
        Box::new(move |m| match m {
            Message::Holds { .. } => {
                set = Some(m);
                Message::KeepAlive
            }
            Message::WantChangedKeys { .. } | Message::WantDigests { .. } if set.is_some() => {
                requests += 1;
                if requests == 2 {
                    set.take().unwrap()
                } else {
                    m
                }
            }
            m => m,
        })
    };
    let (o, _) = copy_new(&reference, &image, "none", keep(), late);
    let e = o.source.unwrap_err().to_string();
    assert!(e.contains("held keys after the target's first request"), "{e}");
}

/// A set sent twice is refused too.
#[test]
fn a_second_set_is_refused() {
    let plan: Vec<Block> = (0..8).map(|i| if i % 2 == 0 { Block::Ref(i) } else { Block::New }).collect();
    let (reference, image) = images(14, 500, &plan, 40);
    let twice: Edit = {
        let mut again = None;
        Box::new(move |m| match m {
            Message::Holds { .. } if again.is_none() => {
                again = Some(m.clone());
                m
            }
            Message::KeepAlive | Message::Received { .. } if again.is_some() => again.take().unwrap(),
            Message::WantChangedKeys { .. } | Message::WantDigests { .. } if again.is_some() => again.take().unwrap(),
            m => m,
        })
    };
    let (o, _) = copy_new(&reference, &image, "none", keep(), twice);
    let e = o.source.unwrap_err().to_string();
    assert!(e.contains("held keys after the target's first request, or twice"), "{e}");
}

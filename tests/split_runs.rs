//! A run in pieces (capability `CAP_SPLIT_RUNS`): on a link not known to be
//! fast the source's stream answers a `Fetch` of many blocks with several
//! `Blocks` frames of at most `compress::SLOW_PIECE` raw bytes, so that its
//! gate and a raised level act within the run. The copy stays
//! byte-identical and verified; a peer without the capability gets one
//! frame per `Fetch`; pieces never split a run the target asked for
//! unkeyed (`CAP_HELD_KEYS`); a piece that does not continue its run is
//! refused, named.

mod common;
#[path = "common/relay.rs"]
mod relay;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay::{chain, copy_onto, copy_with, hide, keep, Edit, Outcome};
use xenmig::blocks::layout::Align;
use xenmig::copy::source::SourceOptions;
use xenmig::copy::target::TargetOptions;
use xenmig::wire::compress::SLOW_PIECE;
use xenmig::wire::protocol::{Message, CAP_HELD_KEYS, CAP_SPLIT_RUNS};

const BS: usize = 4096;

fn options() -> SourceOptions {
    SourceOptions {
        block_size: BS as u32,
        align: Align::Flat,
        compress: "auto".parse().unwrap(),
        idle_timeout: Some(Duration::from_secs(60)),
        raise_levels: true,
        ..SourceOptions::default()
    }
}

/// A link of `rate` bytes a second behind the relay's buffers.
fn paced(rate: f64) -> Edit {
    Box::new(move |m: Message| {
        std::thread::sleep(Duration::from_secs_f64(m.encode().len() as f64 / rate));
        m
    })
}

/// What the relays saw: runs asked for (first block to count) and the
/// `Blocks` frames that answered them (first block, count, raw bytes).
#[derive(Default)]
struct Seen {
    asked: Mutex<HashMap<u64, u32>>,
    pieces: Mutex<Vec<(u64, u32, u32)>>,
}

fn watch_requests(seen: Arc<Seen>) -> Edit {
    Box::new(move |m| {
        if let Message::Fetch { first_block, count } = &m {
            seen.asked.lock().unwrap().insert(*first_block, *count);
        }
        m
    })
}

fn watch_pieces(seen: Arc<Seen>) -> Edit {
    Box::new(move |m| {
        if let Message::Blocks { first_block, count, raw_len, .. } = &m {
            seen.pieces.lock().unwrap().push((*first_block, *count, *raw_len));
        }
        m
    })
}

impl Seen {
    /// Every run asked for, covered exactly by the pieces that began at its
    /// first block and went on from there; how many runs came in more than
    /// one piece.
    fn runs_in_pieces(&self) -> usize {
        let asked = self.asked.lock().unwrap();
        let pieces = self.pieces.lock().unwrap();
        let by_first: HashMap<u64, (u32, u32)> = pieces.iter().map(|&(f, c, r)| (f, (c, r))).collect();
        assert_eq!(by_first.len(), pieces.len(), "two pieces began at the same block");
        let mut split = 0;
        for (&first, &count) in asked.iter() {
            let (mut at, mut n) = (first, 0);
            while at < first + count as u64 {
                let (c, _) = by_first.get(&at).unwrap_or_else(|| panic!("run {first}+{count}: no piece at {at}"));
                at += *c as u64;
                n += 1;
            }
            assert_eq!(at, first + count as u64, "run {first}+{count}: pieces past its end");
            split += (n > 1) as usize;
        }
        split
    }
}

fn check(data: &[u8], dst: &Path, o: Outcome) {
    let (rep, trep) = (o.source.unwrap(), o.target.unwrap());
    assert_eq!(fs::read(dst).unwrap(), data);
    assert!(rep.verified && trep.verified);
    assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched);
    assert_eq!(rep.bytes_fetched, rep.codecs.values().sum::<u64>());
}

/// The keys a new DST's host holds (`CAP_HELD_KEYS`) hidden both ways: the
/// target then asks for runs across groups, up to 1024 blocks (with them,
/// a new DST's runs lie in one group each, and pieces end only at group
/// boundaries: [`pieces_keep_unkeyed_runs_whole`]).
fn no_held_keys(e: Edit) -> Edit {
    chain(hide(CAP_HELD_KEYS), e)
}

/// Copy `src` onto `dst` over a 400 kB/s link without held keys, the
/// relays editing each way and `seen` watching the runs and their pieces.
fn paced_copy(src: &Path, dst: &Path, seen: &Arc<Seen>, to_target: Edit, to_source: Edit) -> Outcome {
    copy_with(
        src,
        dst,
        &options(),
        no_held_keys(chain(to_target, chain(watch_pieces(seen.clone()), paced(400e3)))),
        no_held_keys(chain(to_source, watch_requests(seen.clone()))),
    )
}

/// A slow link (400 kB/s): runs of 1024 blocks come in pieces of at most
/// `SLOW_PIECE` raw bytes, each run covered exactly, the copy
/// byte-identical. With the capability hidden (a peer of the previous
/// release on either end) each run is one frame.
#[test]
fn a_slow_link_gets_its_runs_in_pieces() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let data = common::words(6 << 20, 1);
    fs::write(&a, &data).unwrap();
    let seen = Arc::new(Seen::default());
    check(&data, &b, paced_copy(&a, &b, &seen, keep(), keep()));
    assert!(seen.runs_in_pieces() > 0, "no run came in pieces");
    let pieces = seen.pieces.lock().unwrap();
    assert!(pieces.len() > 6, "{} pieces", pieces.len());
    // (The first run may go whole: it can be compressed before the
    // target's first receipt.)
    assert!(pieces.iter().filter(|p| p.2 as usize > SLOW_PIECE).count() <= 1, "{pieces:?}");
    drop(pieces);

    for (name, to_target, to_source) in
        [("old target", keep(), hide(CAP_SPLIT_RUNS)), ("old source", hide(CAP_SPLIT_RUNS), hide(CAP_SPLIT_RUNS))]
    {
        let _ = fs::remove_file(&b);
        let data = common::words(3 << 20, 2);
        fs::write(&a, &data).unwrap();
        let seen = Arc::new(Seen::default());
        check(&data, &b, paced_copy(&a, &b, &seen, to_target, to_source));
        assert_eq!(seen.runs_in_pieces(), 0, "{name}");
        assert_eq!(seen.pieces.lock().unwrap().len(), seen.asked.lock().unwrap().len(), "{name}");
    }
}

/// Onto a new DST beside a reference (the target sends the keys it holds,
/// `CAP_HELD_KEYS`, and asks for runs unkeyed): pieces end only at group
/// boundaries, so each unkeyed run is checked whole; the copy is
/// byte-identical and some blocks went unkeyed.
#[test]
fn pieces_keep_unkeyed_runs_whole() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, r) = (d.path().join("a"), d.path().join("b"), d.path().join("r"));
    let mut data = common::words(4 << 20, 3);
    let reference = data[..1 << 20].to_vec();
    // New text after the reference's megabyte: unkeyed runs.
    data[1 << 20..].copy_from_slice(&common::words(3 << 20, 4));
    fs::write(&a, &data).unwrap();
    fs::write(&r, &reference).unwrap();
    let seen = Arc::new(Seen::default());
    let topts = TargetOptions { references: vec![r.clone()], ..relay::target_options() };
    let o = copy_onto(
        &a,
        &b,
        &options(),
        topts,
        chain(watch_pieces(seen.clone()), paced(400e3)),
        watch_requests(seen.clone()),
    );
    let trep = o.target.as_ref().unwrap().clone();
    check(&data, &b, o);
    assert!(trep.blocks_unkeyed > 0, "{trep:?}");
    seen.runs_in_pieces();
    let group = (1 << 20) / BS as u64;
    let asked = seen.asked.lock().unwrap();
    for &(first, count, _) in seen.pieces.lock().unwrap().iter() {
        let end = first + count as u64;
        let run_end = asked.iter().find(|(&f, &c)| f <= first && end <= f + c as u64).map(|(&f, &c)| f + c as u64);
        assert!(asked.contains_key(&first) || first % group == 0, "piece {first}+{count} begins inside a group");
        assert!(Some(end) == run_end || end % group == 0, "piece {first}+{count} ends inside a group");
    }
}

/// A piece moved within its run (it no longer begins the rest of the run)
/// fails the copy with an error naming its blocks; nothing is reported
/// verified, and DST holds no wrong block.
#[test]
fn a_piece_that_does_not_continue_its_run_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let data = common::words(6 << 20, 5);
    fs::write(&a, &data).unwrap();
    let firsts = Arc::new(Mutex::new(HashSet::new()));
    let f2 = firsts.clone();
    let asked: Edit = Box::new(move |m| {
        if let Message::Fetch { first_block, .. } = &m {
            f2.lock().unwrap().insert(*first_block);
        }
        m
    });
    let mut moved = false;
    let shift: Edit = Box::new(move |m| match m {
        // The first piece that continues a run: claimed one piece later.
        Message::Blocks { first_block, count, codec, raw_len, payload }
            if !moved && !firsts.lock().unwrap().contains(&first_block) =>
        {
            moved = true;
            Message::Blocks { first_block: first_block + count as u64, count, codec, raw_len, payload }
        }
        m => m,
    });
    let o = copy_with(&a, &b, &options(), no_held_keys(chain(shift, paced(400e3))), no_held_keys(asked));
    let e = o.target.unwrap_err().to_string();
    assert!(e.contains("which do not begin a run asked for or its rest"), "{e}");
    assert!(o.source.is_err());
    let got = fs::read(&b).unwrap_or_default();
    for (i, blk) in got.chunks(BS).enumerate() {
        assert!(blk.iter().all(|&x| x == 0) || blk == &data[i * BS..i * BS + blk.len()], "block {i} is wrong");
    }
}
